"""The policy delegation client (inbound/policyd.py) against real policy servers from Debian: postgrey and
postfix-policyd-spf-python (SPF records served by the test network), plus servers that fail."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest
from postgate.inbound.filters import (
    Action,
    FilterChain,
    HeaderEdit,
    HeaderOp,
    Route,
    Stage,
    StageContext,
    Verdict,
)
from postgate.inbound.policyd import PolicyError, PolicyService, PolicySettings, parse_action
from postgate.policy.vocab import Reply

from fixtures.filterd import Postgrey, Spawn
from fixtures.testnet import TestNet


def rcpt_ctx(client: str = "192.0.2.10", sender: str = "alice@spf.test",
             rcpt: str = "bob@dane-ok.test") -> StageContext:
    return StageContext(Stage.RCPT, "mx", client, client_port=40000, helo="client.example", esmtp=True,
                        queue_id="7E1F00BA12", sender=sender, recipient=rcpt, hostname="mx.own.test")


async def ask_outcomes(service: PolicyService, *ctxs: StageContext) -> list[tuple[Verdict, list[Verdict]]]:
    chain = FilterChain([service])
    out = []
    try:
        for c in ctxs:
            o = await chain.on(c)
            out.append((o.verdict, o.edits))
    finally:
        await chain.close()
    return out


# --- postgrey ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def postgrey(testnet: TestNet) -> Iterator[Postgrey]:
    d = Postgrey(delay=1).start()
    yield d
    d.stop()


def test_postgrey_greylists_then_accepts_the_retry(postgrey: Postgrey) -> None:
    svc = PolicyService(PolicySettings("postgrey", postgrey.address, timeout=10))
    ctx = rcpt_ctx(sender="retry@grey.example", rcpt="bob@dane-ok.test")
    [(first, _)] = asyncio.run(ask_outcomes(svc, ctx))
    assert first.action is Action.TEMPFAIL and first.reply is not None and first.reply.code == 450, first
    assert "reylist" in first.reply.text
    time.sleep(2.2)      # past postgrey's --delay=1 (it counts whole seconds)
    [(retry, edits)] = asyncio.run(ask_outcomes(svc, ctx))
    assert not retry.final, retry
    assert [h.name for v in edits for h in v.headers] == ["X-Greylist"]   # postgrey's PREPEND
    # another triplet is still greylisted
    [(other, _)] = asyncio.run(ask_outcomes(svc, rcpt_ctx(sender="new@grey.example")))
    assert other.action is Action.TEMPFAIL


# --- postfix-policyd-spf-python ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def spf(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Spawn]:
    conf = tmp_path_factory.mktemp("spf") / "policyd-spf.conf"
    # Debian's defaults, except that the test clients (192.0.2.x) are not skipped like 127/8
    conf.write_text("debugLevel = 1\nTestOnly = 1\nHELO_reject = Fail\nMail_From_reject = Fail\n"
                    "PermError_reject = False\nTempError_Defer = False\nskip_addresses = 127.0.0.0/8,::1\n")
    d = Spawn(["policyd-spf", str(conf)]).start()
    yield d
    d.stop()


def test_spf_fail_is_rejected_and_pass_gets_received_spf(spf: Spawn) -> None:
    svc = PolicyService(PolicySettings("spf", spf.address, timeout=20))

    async def two_sessions() -> list[tuple[Verdict, list[Verdict]]]:
        # two SMTP sessions (policyd-spf caches its answer per message instance), one process
        return [*await ask_outcomes(svc, rcpt_ctx("192.0.2.66", "alice@spf.test")),
                *await ask_outcomes(svc, rcpt_ctx("192.0.2.10", "alice@spf.test"))]

    (fail, _), (ok, edits) = asyncio.run(two_sessions())
    assert fail.action is Action.REJECT and fail.reply is not None and fail.reply.code == 550, fail
    assert fail.reply.enhanced == "5.7.23" and "SPF" in fail.reply.text
    assert not ok.final
    [received] = [h for v in edits for h in v.headers]
    assert received.name == "Received-SPF" and received.value.startswith("Pass")
    assert received.op is HeaderOp.INSERT and received.index == 0
    # connection reuse (smtpd_policy_service_max_idle): both requests went over one connection
    assert len(spf.children) == 1


# --- servers that fail ------------------------------------------------------------------------------
class Misbehaving:
    """A policy server that hangs, closes, or answers garbage; counts connections."""

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.requests: list[dict[str, str]] = []
        self.connections = 0
        threading.Thread(target=self.serve, daemon=True).start()

    def serve(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self.one, args=(c,), daemon=True).start()

    def one(self, c: socket.socket) -> None:
        f = c.makefile("rb")
        while True:
            attrs = {}
            for line in f:
                if line == b"\n":
                    break
                k, _, v = line.decode().rstrip("\n").partition("=")
                attrs[k] = v
            else:
                return
            self.requests.append(attrs)
            if self.mode == "hang":
                time.sleep(30)
            elif self.mode == "close":
                c.close()
                return
            elif self.mode == "garbage":
                c.sendall(b"\x00\x01 no equals sign here\n\n")
            else:
                c.sendall(f"action={self.mode}\n\n".encode())


@pytest.mark.parametrize("mode", ["hang", "close", "garbage"])
def test_broken_policy_service_gets_the_default_action(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    srv = Misbehaving(mode)
    caplog.set_level(logging.WARNING, "postgate.policyd")
    svc = PolicyService(PolicySettings("broken", f"inet:127.0.0.1:{srv.port}", timeout=0.5, retry_delay=0.1))
    [(v, _)] = asyncio.run(ask_outcomes(svc, rcpt_ctx()))
    assert v.action is Action.TEMPFAIL and v.reply == Reply(451, "4.3.5", "Server configuration problem")
    assert "policy service broken" in caplog.text and "default action 451 4.3.5" in caplog.text
    assert srv.connections == 2           # smtpd_policy_service_try_limit = 2
    # default_action DUNNO: the session goes on
    svc = PolicyService(PolicySettings("broken", f"inet:127.0.0.1:{srv.port}", timeout=0.5, try_limit=1,
                                       default_action="DUNNO"))
    [(v, _)] = asyncio.run(ask_outcomes(svc, rcpt_ctx()))
    assert v.action is Action.CONTINUE


def test_unreachable_policy_service_and_per_request_default() -> None:
    svc = PolicyService(PolicySettings("gone", "inet:127.0.0.1:1", timeout=1, retry_delay=0.05))
    [(v, _), (v2, _)] = asyncio.run(ask_outcomes(svc, rcpt_ctx(), rcpt_ctx(rcpt="carol@dane-ok.test")))
    assert v.action is Action.TEMPFAIL and v2.action is Action.TEMPFAIL   # asked again, not stuck failed


def test_every_attribute_postfix_sends_and_stages() -> None:
    srv = Misbehaving("DUNNO")
    svc = PolicyService(PolicySettings("rec", f"inet:127.0.0.1:{srv.port}", stages=(Stage.RCPT, Stage.DATA),
                                       policy_context="mx-in"))
    connect = StageContext(Stage.CONNECT, "mx", "192.0.2.10")
    r1, r2 = rcpt_ctx(), rcpt_ctx(rcpt="carol@dane-ok.test")
    r2.recipients = ["bob@dane-ok.test"]
    data = rcpt_ctx()
    data.stage, data.recipient, data.recipients, data.message = Stage.DATA, None, ["a@b", "c@d"], b"x\r\n"
    asyncio.run(ask_outcomes(svc, connect, r1, r2, data))
    assert [r["protocol_state"] for r in srv.requests] == ["RCPT", "RCPT", "END-OF-MESSAGE"]  # stages chosen
    req = srv.requests[0]
    for attr in ("request", "protocol_state", "protocol_name", "helo_name", "queue_id", "sender", "recipient",
                 "recipient_count", "client_address", "client_name", "reverse_client_name", "instance",
                 "sasl_method", "sasl_username", "sasl_sender", "size", "ccert_subject", "ccert_issuer",
                 "ccert_fingerprint", "ccert_pubkey_fingerprint", "encryption_protocol", "encryption_cipher",
                 "encryption_keysize", "etrn_domain", "stress", "client_port", "server_address", "server_port",
                 "policy_context", "compatibility_level", "mail_version"):
        assert attr in req, attr
    assert req["request"] == "smtpd_access_policy" and req["protocol_name"] == "ESMTP"
    assert req["sender"] == "alice@spf.test" and req["recipient"] == "bob@dane-ok.test"
    assert req["client_address"] == "192.0.2.10" and req["helo_name"] == "client.example"
    assert req["policy_context"] == "mx-in"
    # SMTPD_POLICY_README: instance is the same for every request about one message
    assert srv.requests[0]["instance"] == srv.requests[1]["instance"] == srv.requests[2]["instance"]
    assert srv.requests[2]["recipient_count"] == "2"
    assert srv.connections == 1


ACTIONS = [
    ("OK", Verdict(reason="policy OK")),
    ("dunno", Verdict(reason="policy DUNNO")),
    ("REJECT", Verdict(Action.REJECT, Reply(554, "5.7.1", "Access denied"), "policy REJECT")),
    ("REJECT 5.7.9 go away", Verdict(Action.REJECT, Reply(554, "5.7.9", "go away"), "policy REJECT 5.7.9 go away")),
    ("DEFER later", Verdict(Action.TEMPFAIL, Reply(450, "4.7.1", "later"), "policy DEFER later")),
    ("DEFER_IF_PERMIT Greylisted", Verdict(Action.TEMPFAIL, Reply(450, "4.7.1", "Greylisted"),
                                           "policy DEFER_IF_PERMIT Greylisted")),
    ("DEFER_IF_REJECT x", Verdict(reason="policy DEFER_IF_REJECT x")),
    ("550 5.7.23 SPF fail", Verdict(Action.REJECT, Reply(550, "5.7.23", "SPF fail"), "policy 550 5.7.23 SPF fail")),
    ("421 closing", Verdict(Action.TEMPFAIL, Reply(421, "4.7.1", "closing"), "policy 421 closing")),
    ("PREPEND X-Test: a b", Verdict(headers=(HeaderEdit(HeaderOp.INSERT, "X-Test", "a b", 0),),
                                    reason="policy PREPEND X-Test")),
    ("HOLD check me", Verdict(Action.HOLD, reason="policy HOLD check me", quarantine_reason="check me")),
    ("DISCARD", Verdict(Action.DISCARD, reason="policy DISCARD")),
    ("FILTER smtp:[127.0.0.1]:10025", Verdict(routes=(Route(transport="smtp:[127.0.0.1]:10025"),),
                                              reason="policy FILTER smtp:[127.0.0.1]:10025")),
    ("BCC archive@own.test", Verdict(add_recipients=("archive@own.test",), reason="policy BCC archive@own.test")),
    ("WARN odd", Verdict(reason="policy WARN odd")),
    ("INFO fyi", Verdict(reason="policy INFO fyi")),
]


@pytest.mark.parametrize("text,verdict", ACTIONS, ids=[a[0] for a in ACTIONS])
def test_access5_actions(text: str, verdict: Verdict) -> None:
    """access(5) "ACCEPT ACTIONS", "REJECT ACTIONS", "OTHER ACTIONS"."""
    assert parse_action(text) == verdict


def test_redirect_replaces_the_recipients() -> None:
    v = parse_action("REDIRECT abuse@own.test", rcpt_ctx())
    assert v.add_recipients == ("abuse@own.test",) and v.remove_recipients == ("bob@dane-ok.test",)


@pytest.mark.parametrize("bad", ["FROB", "PREPEND no header", "FILTER nocolon", "REDIRECT nobody", "699 x"])
def test_unknown_actions_are_errors(bad: str) -> None:
    with pytest.raises(PolicyError):
        parse_action(bad)


@pytest.mark.parametrize("settings,connections", [
    ({}, 1),                          # one connection for every request of the process
    ({"request_limit": 2}, 2),        # smtpd_policy_service_request_limit
    ({"max_idle": 0.05}, 4),          # smtpd_policy_service_max_idle: the pause below outlasts it
    ({"max_ttl": 0.05}, 4),           # smtpd_policy_service_max_ttl
])
def test_connection_reuse_limits(settings: dict[str, float], connections: int) -> None:
    srv = Misbehaving("DUNNO")
    svc = PolicyService(PolicySettings("reuse", f"inet:127.0.0.1:{srv.port}", **settings))  # type: ignore[arg-type]

    async def four_sessions() -> None:
        for _ in range(4):
            await ask_outcomes(svc, rcpt_ctx())
            await asyncio.sleep(0.1)

    asyncio.run(four_sessions())
    assert len(srv.requests) == 4 and srv.connections == connections
