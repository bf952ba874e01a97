"""Issue 20, the DATA reply's tail at C=100: work that need not wait costs no turn of the event loop.

Under load a turn of the loop waits behind every other session's ready work, so the pre-queue DATA reply's
latency is, to first order, the number of turns between the end of the data and the reply times the length
of a turn. These tests count turns, never time: a *ticker* callback re-schedules itself once per turn (asyncio
runs the callbacks that were ready when a turn began, so one a turn), and a coroutine that needs no turn is
driven with ``send(None)`` and must finish in that one step.

- ``outbound/eager.py``: gather and task with asyncio's semantics, without the turns a Task costs;
- next-hop resolution and the route of a delivery (MX hosts, A/AAAA, the MTA-capability record, MTA-STS)
  from cached answers: no turn at all (it was about ten);
- ``postgate serve`` freezes its start-up objects (gc.freeze), so a full collection under load is short;
- a lockstep transaction (a server without PIPELINING) sends each command from the protocol as the reply
  to the one before arrives, not a turn later in the coroutine: same commands, same order.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import dns.name
import dns.rdatatype
import pytest
from postgate.outbound import eager, smtp_data, smtp_wire
from postgate.outbound.delivery import RecipientResult
from postgate.outbound.mtasts import StsResolver, StsSettings
from postgate.outbound.nexthop import NextHopMemo, resolve_nexthop
from postgate.policy.tls import Level, Policy
from postgate.policy.vocab import Outcome

from fixtures.pgserve import PostgateServer
from fixtures.testnet import TestNet

from .test_delivery import deliverer
from .test_smtp_wire import LOOPS, _run

# --- counting turns ------------------------------------------------------------------------------------


class Ticker:
    """Counts the turns of the running loop: one callback, re-scheduled from itself (so once per turn)."""

    def __init__(self) -> None:
        self.turns = 0
        self.running = True
        asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.turns += 1
        if self.running:
            asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self.running = False


def finishes_in_one_step(coro: Coroutine[Any, Any, Any]) -> Any:
    """Drive ``coro`` by hand (inside a running loop): it must finish without yielding to the loop."""
    try:
        yielded = coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise AssertionError(f"suspended (yielded {yielded!r}): a turn of the loop")


# --- eager.gather / eager.task: asyncio's semantics --------------------------------------------------------


async def _now(x: int) -> int:
    return x


async def _later(x: int, log: list[int] | None = None) -> int:
    await asyncio.sleep(0)
    await asyncio.sleep(0.001)
    if log is not None:
        log.append(x)
    return x


async def _fails(after_turn: bool) -> int:
    if after_turn:
        await asyncio.sleep(0)
    raise ValueError("refused")


@LOOPS
def test_gather_keeps_asyncio_semantics(event_loop: str) -> None:
    """Results in argument order whoever finished first; the first exception propagates and the others
    keep running (asyncio.gather does not cancel them); cancelling the caller cancels those still running."""
    async def go() -> None:
        assert await eager.gather() == []
        assert await eager.gather(_later(1), _now(2), _later(3), _now(4)) == [1, 2, 3, 4]
        assert await eager.gather(_now(1), _later(2)) == [1, 2]
        for failing in (_fails(False), _fails(True)):
            ran: list[int] = []
            with pytest.raises(ValueError):
                await eager.gather(_later(1, ran), failing, _later(3, ran))
            for _ in range(50):
                await asyncio.sleep(0.001)
            assert sorted(ran) == [1, 3]   # the siblings were not cancelled
        ran = []
        caller = asyncio.ensure_future(eager.gather(_later(1, ran), asyncio.sleep(30)))
        await asyncio.sleep(0)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        await asyncio.sleep(0.01)
        assert ran == []   # cancelled with the caller
        t = eager.task(_now(7))
        assert t.done() and t.result() == 7   # no turn: done on return
        t = eager.task(_later(8))
        assert not t.done() and await t == 8
        t = eager.task(_fails(False))
        assert t.done() and isinstance(t.exception(), ValueError)
        # the first step runs as the new task's: asyncio.timeout entered there cancels that task, not the
        # caller (a delivery's command timeout must never cancel the session that started it)
        me = asyncio.current_task()
        t = eager.task(_who())
        assert t.done() and t.result() is not me and asyncio.current_task() is me
        t = eager.task(_times_out())
        with pytest.raises(TimeoutError):
            await t
        assert await eager.gather(_times_out_caught(), _now(2)) == ["timed out", 2]
    _run(go(), event_loop)


async def _who() -> asyncio.Task[Any] | None:
    return asyncio.current_task()


async def _times_out() -> None:
    async with asyncio.timeout(0.01):
        await asyncio.sleep(30)


async def _times_out_caught() -> str:
    try:
        await _times_out()
    except TimeoutError:
        return "timed out"
    return "no"


def test_gather_of_coroutines_that_do_not_wait_takes_no_turn() -> None:
    """The point of eager.gather: asyncio.gather of coroutines that never suspend still yields to the loop
    (a Task each, and the waiter's wake-up); eager.gather returns in the same step."""
    async def go() -> None:
        assert finishes_in_one_step(eager.gather(_now(1), eager.gather(_now(2), _now(3)))) == [1, [2, 3]]
        async def plain() -> list[int]:
            return await asyncio.gather(_now(1), _now(2))
        with pytest.raises(AssertionError, match="suspended"):
            finishes_in_one_step(plain())
    asyncio.run(go())


# --- the route of a delivery from cached answers -----------------------------------------------------------


def test_cached_route_takes_no_turn(testnet: TestNet) -> None:
    """Next-hop resolution (RFC 7672 §2.2: MX, each host's A/AAAA, TLSA, the MTA-capability record) and the
    MTA-STS lookup (RFC 8461 §5.1: TXT, the cached policy) answered from the caches: the whole route is
    computed in one step — it took about ten turns of nested gathers and an MTA-STS task."""
    async def go() -> None:
        d = deliverer(testnet, Policy(Level.DANE))
        r = d.resolver
        d.config.sts = StsResolver(r, StsSettings(ca_file=str(testnet.state / "pki" / "root.crt"), fetch_timeout=5))
        for domain in ("dane-ok.test", "cached.sts.test"):
            first = await d.route(domain)   # fills the caches (and fetches the MTA-STS policy)
            nh = finishes_in_one_step(resolve_nexthop(r, domain))
            assert [h.name for h in nh.hosts] == [h.name for h in first.nexthop.hosts] and nh.hosts
            again = finishes_in_one_step(d.route(domain))
            assert again.nexthop.hosts == first.nexthop.hosts
            assert (again.sts_policy is None) == (first.sts_policy is None)
        assert first.sts_policy is not None   # cached.sts.test has a policy: it came from the cache
        await d.close()
    asyncio.run(go())


def test_one_cache_entry_per_name_whatever_its_case_or_form(testnet: TestNet) -> None:
    """The validated-answer cache is keyed by the name's labels in lower case (RFC 4343 §3), computed once
    per Name object (dnspython hashes a Name character by character in Python): the same name as text, as a
    Name and in other letter cases is one entry — one upstream query — and the answers are equal."""
    async def go() -> None:
        r = deliverer(testnet, Policy()).resolver
        first = await r.resolve("dane-ok.test", dns.rdatatype.MX)
        sent = r.queries_sent
        assert sent > 0 and first.ok
        for q in ("DANE-OK.test", "Dane-Ok.Test.", dns.name.from_text("dane-ok.TEST"), dns.name.from_text("dane-ok.test")):
            again = await r.resolve(q, dns.rdatatype.MX)
            assert again is first, q
        assert r.queries_sent == sent
        other = await r.resolve("nodane.test", dns.rdatatype.MX)   # another name is another entry
        assert other is not first and r.queries_sent > sent
    asyncio.run(go())


# --- work done once, not once per message ------------------------------------------------------------------


class _Counting:
    """The real resolver, counting questions; ``short`` makes answers of that type leave the cache sooner."""

    def __init__(self, resolver: Any, short: int | None = None, clock: Any = time.time) -> None:
        self.resolver, self.short, self.clock, self.asked = resolver, short, clock, 0

    async def resolve(self, qname: Any, rdtype: Any) -> Any:
        self.asked += 1
        ans = await self.resolver.resolve(qname, rdtype)
        if self.short is not None and ans.rdtype == self.short:
            ans = dataclasses.replace(ans, expires=self.clock() + 0.2)
        return ans


def test_a_next_hop_is_kept_while_its_answers_are_cached(testnet: TestNet) -> None:
    """Issue 20: the relay resolved the same next hop from the resolver's cache for every message (MX, each
    host's addresses, TLSA and capability records: a tenth of the pre-queue CPU time). NextHopMemo keeps it
    at most a second and never longer than the first of its answers leaves the resolver's cache; failures are
    not kept; hosts of equal preference are shuffled at each use (RFC 5321 §5.1)."""
    async def go() -> None:
        d = deliverer(testnet, Policy(Level.DANE))
        now = [1000.0]
        counting = _Counting(d.resolver)
        memo = NextHopMemo(lifetime=1.0, clock=lambda: now[0])
        first = await memo.resolve(counting, "dane-ok.test")
        asked = counting.asked
        assert asked >= 4 and first.hosts   # MX, A, AAAA, TLSA, the capability record
        for _ in range(20):
            assert (await memo.resolve(counting, "dane-ok.test")).hosts == first.hosts
        assert counting.asked == asked       # from the memo
        now[0] += 1.01                       # past the memo's lifetime: resolved again
        await memo.resolve(counting, "dane-ok.test")
        assert counting.asked == 2 * asked
        # an answer that leaves the resolver's cache sooner bounds the memo (real time here: the resolver's)
        short = _Counting(d.resolver, short=dns.rdatatype.A)
        memo2 = NextHopMemo(lifetime=60.0)
        await memo2.resolve(short, "dane-ok.test")
        n = short.asked
        await memo2.resolve(short, "dane-ok.test")
        assert short.asked == n
        await asyncio.sleep(0.25)
        await memo2.resolve(short, "dane-ok.test")
        assert short.asked == 2 * n
        # a failure (a bogus address record) is resolved again every time
        bad = await memo.resolve(counting, "bogus-sig.test")
        assert any(h.unusable for h in bad.hosts)
        before = counting.asked
        await memo.resolve(counting, "bogus-sig.test")
        assert counting.asked > before
        # RFC 5321 §5.1: equal preferences in a random order at each use, from the memo too
        orders = {tuple(h.name.to_text() for h in (await memo.resolve(counting, "pair.dane-ok.test")).hosts)
                  for _ in range(30)}
        assert len(orders) == 2
        # the deliverer routes through its memo
        d.resolver = counting   # type: ignore[assignment]
        await d.route("dane-ok.test")
        n = counting.asked
        for _ in range(5):
            await d.route("dane-ok.test")
        assert counting.asked == n
        await d.close()
    asyncio.run(go())


def test_the_connection_cache_does_not_visit_every_session_per_message() -> None:
    """Issue 20: taking a cached connection swept every idle session (an ``alive`` check each): with a hundred
    cached connections, 6% of the relay's CPU time. Now the session taken is checked, and the others at
    most once a second; a dead or stale one is still never handed out."""
    from postgate.outbound import delivery

    class FakeSession:
        checks = 0

        def __init__(self, alive: bool = True) -> None:
            self._alive = alive

        @property
        def alive(self) -> bool:
            FakeSession.checks += 1
            return self._alive

        async def close(self) -> None:
            pass

    async def go() -> None:
        cache = delivery.ConnectionCache(idle=60)
        for i in range(100):
            cache.put(("other", i), FakeSession())   # type: ignore[arg-type]
        cache.take(("none",))                        # the first take sweeps
        FakeSession.checks = 0
        for _ in range(200):
            cache.put(("hot",), FakeSession())       # type: ignore[arg-type]
            assert cache.take(("hot",)) is not None
        assert FakeSession.checks <= 200 + 100       # one per take, plus at most one sweep
        cache.put(("hot",), FakeSession(alive=False))  # type: ignore[arg-type]
        assert cache.take(("hot",)) is None          # a dead session is never handed out
        await cache.close_all()
    asyncio.run(go())


# --- a lockstep transaction: each command sent as the reply to the one before arrives -----------------------


class _Transport:
    """Records what the protocol writes (the protocol under test is driven by hand, without a loop)."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False


M, R1, R2 = b"MAIL FROM:<a@x.test>", b"RCPT TO:<b@y.test>", b"RCPT TO:<c@y.test>"
BODY = smtp_data.encode(b"Subject: t\r\n\r\nhello\r\n")
# (reset, replies as they arrive, what the protocol writes after the first command, RFC rule)
LOCKSTEP = [
    (False, [b"250 ok", b"250 ok", b"550 no", b"354 go", b"250 queued"], [R1, R2, b"DATA", BODY],
     "RFC 5321 §4.1.1: MAIL, each RCPT whatever the last got, DATA when one was accepted, the content"),
    (True, [b"250 reset", b"250 ok", b"251 forwarded", b"250 ok", b"354 go", b"250 queued"],
     [M, R1, R2, b"DATA", BODY], "reused connection: RSET first; 251 accepts a recipient (§4.1.1.3)"),
    (True, [b"421 closing"], [], "RSET refused: nothing more"),
    (False, [b"550 sender refused"], [], "§4.1.1.2: MAIL refused: no RCPT"),
    (False, [b"250 ok", b"550 no", b"452 full", b"250 reset"], [R1, R2, b"RSET"],
     "§4.1.1.5: no recipient accepted: RSET abandons the transaction, no DATA"),
    (False, [b"250 ok", b"250 ok", b"250 ok", b"554 no data"], [R1, R2, b"DATA"], "§4.1.1.4: no content without 354"),
]


@pytest.mark.parametrize(("reset", "replies", "follows", "rule"), LOCKSTEP, ids=[c[3][:40] for c in LOCKSTEP])
def test_lockstep_sends_the_next_command_as_the_reply_arrives(reset: bool, replies: list[bytes],
                                                               follows: list[bytes], rule: str) -> None:
    """Each reply fed to the protocol by hand: the next command is written inside ``data_received`` — before
    any coroutine could run — and only the commands a one-by-one client would send, in its order."""
    proto = smtp_wire._Wire()
    t = _Transport()
    proto.connection_made(t)  # type: ignore[arg-type]
    conn = smtp_wire.Connection(proto)
    plan = smtp_wire._Lockstep(M, [R1, R2], b"Subject: t\r\n\r\nhello\r\n", reset, 5.0, 10.0, lambda: None)
    conn.follow(plan)
    assert t.written == [b"RSET\r\n" if reset else M + b"\r\n"], rule
    for i, r in enumerate(replies):
        proto.data_received(r + b"\r\n")
        want = [x if x is BODY else x + b"\r\n" for x in follows[:i + 1]]
        assert t.written[1:] == want, (rule, i)
    assert plan.commands == len(replies), rule   # one reply owed per command written
    assert len(proto.replies) == len(replies)    # every reply is still there for the coroutine


@LOOPS
def test_lockstep_transaction_on_a_server_without_pipelining(event_loop: str) -> None:
    """End to end against a server without PIPELINING (lockstep), two messages on one connection: the
    second starts with RSET (a reused session), every recipient gets its own reply, a refused DATA or
    refused recipients give per-recipient outcomes, and the server saw one command at a time."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test ESMTP\r\n")
        while True:
            line = await asyncio.wait_for(reader.readline(), 10)
            if not line:
                return
            assert not reader._buffer, "a command came before the reply to the one before"  # type: ignore[attr-defined]
            verb = line.split(b" ")[0].split(b":")[0].strip()
            seen.append(verb)
            if verb == b"EHLO":
                writer.write(b"250-old.test\r\n250 8BITMIME\r\n")
            elif verb == b"RCPT" and b"no@" in line:
                writer.write(b"550 5.1.1 no such user\r\n")
            elif verb == b"DATA":
                writer.write(b"354 go\r\n")
                await writer.drain()
                await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 10)
                writer.write(b"250 2.0.0 queued\r\n")
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async def go() -> tuple[list[RecipientResult], list[RecipientResult]]:
        from postgate.outbound import delivery

        from .test_smtp_wire import _open, _serve
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            assert not s.supports("pipelining")
            try:
                first = await delivery._transaction(s, "a@client.test", ["ok@x.test", "no@x.test"], b"m\r\n", [])
                s.messages += 1
                second = await delivery._transaction(s, "a@client.test", ["ok@x.test"], b"m\r\n", [])
                return first, second
            finally:
                await s.close()
    first, second = _run(go(), event_loop)
    assert [(r.status, r.dsn) for r in first] == [(Outcome.DELIVERED, "2.0.0"), (Outcome.BOUNCED, "5.1.1")]
    assert [(r.status, r.dsn) for r in second] == [(Outcome.DELIVERED, "2.0.0")]
    assert seen == [b"EHLO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"RSET", b"MAIL", b"RCPT", b"DATA", b"QUIT"]



# --- the collector: start-up objects frozen ----------------------------------------------------------------


def test_serve_freezes_its_start_up_objects(testnet: TestNet, tmp_path: Path) -> None:
    """Once started, every process of ``postgate serve`` (the main one and a worker) moves what start-up made
    to the collector's permanent generation (gc.freeze): a full collection under load no longer walks the
    modules, keys and caches of a long-lived process (14-32 ms pauses of every session at 2 KB, C=100;
    1-4 ms after). Each process logs how many objects it froze."""
    pg = PostgateServer(testnet, tmp_path, address="127.0.2.41", server={"workers": 2}).start()
    try:
        frozen = lambda: re.findall(r"\[(\d+)\]: gc: (\d+) start-up objects frozen", pg.log())  # noqa: E731
        for _ in range(200):
            if len(frozen()) == 2:
                break
            time.sleep(0.05)
        assert len({pid for pid, _ in frozen()}) == 2, pg.log()[-3000:]
        assert all(int(n) > 10_000 for _, n in frozen())   # modules, configuration, keys: far more than that
    finally:
        assert pg.stop() == 0
