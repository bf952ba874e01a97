"""The DNS exchange with the upstream resolver (outbound/dns_transport.py), against raw UDP servers on
loopback: a question whose datagram is lost is sent again (RFC 1035 §4.2.1) and its answer taken."""

from __future__ import annotations

import asyncio
from typing import cast

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest
from postgate.outbound import dns_transport
from postgate.outbound.dns_transport import LookupFailed, Upstream


class Dropper(asyncio.DatagramProtocol):
    """Answers every question, except the first ``drop`` datagrams it receives (lost on the way)."""

    def __init__(self, drop: int) -> None:
        self.drop = drop
        self.ids: list[int] = []
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str | int, ...]) -> None:
        q = dns.message.from_wire(data)
        self.ids.append(q.id)
        if len(self.ids) <= self.drop:
            return
        r = dns.message.make_response(q)
        r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", "192.0.2.7"))
        assert self.transport is not None
        self.transport.sendto(r.to_wire(), addr)


async def _ask(drop: int, timeout: float) -> tuple[dns.message.Message | LookupFailed, Dropper]:
    loop = asyncio.get_running_loop()
    server = Dropper(drop)
    transport, _ = await loop.create_datagram_endpoint(lambda: server, local_addr=("127.0.0.1", 0))
    port = transport.get_extra_info("sockname")[1]
    try:
        up = Upstream([("127.0.0.1", port)], timeout=timeout)
        try:
            r, _ttl = await up.query(dns.name.from_text("lost.example."), dns.rdatatype.A)
            return r, server
        except LookupFailed as e:
            return e, server
    finally:
        transport.close()


@pytest.mark.parametrize("drop", [1, 2])
def test_a_lost_question_is_sent_again(drop: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns_transport, "RESEND_FIRST", 0.05)   # the test's patience, not the rule
    r, server = asyncio.run(_ask(drop, timeout=5))
    assert isinstance(r, dns.message.Message) and r.answer, r
    assert len(server.ids) == drop + 1 and len(set(server.ids)) == 1   # the same question, same ID


def test_no_answer_at_all_is_a_timeout_within_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns_transport, "RESEND_FIRST", 0.05)
    r, server = asyncio.run(_ask(1000, timeout=1))
    assert isinstance(r, LookupFailed) and "timeout" in str(r)
    assert 2 <= len(server.ids) <= 6    # sent again at growing intervals (0.05, 0.1, 0.2, 0.4 ...), bounded
