"""The Spool protocol's contract (outbound/queue/protocol.py), run against every implementation: add a
factory to ``FACTORIES`` and the same table of behaviours runs against it. No network needed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import replace
from pathlib import Path

import pytest
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.protocol import LeaseLost, Spool, State
from postgate.outbound.queue.spool import DirectorySpool
from postgate.policy.vocab import Outcome

DELIVERED = Outcome.DELIVERED

T0 = 1_800_000_000.0

FACTORIES: dict[str, Callable[[Path], Spool]] = {
    "directory": lambda p: DirectorySpool(p / "spool"),
}


def _run(fn: Callable[[Spool], Awaitable[None]], factory: Callable[[Path], Spool], tmp_path: Path) -> None:
    async def go() -> None:
        spool = factory(tmp_path)
        await spool.check()
        assert await spool.try_lock()
        try:
            await spool.recover()
            await fn(spool)
        finally:
            await spool.unlock()
    asyncio.run(go())


def _env(i: int, now: float = T0) -> tuple[Envelope, bytes]:
    content = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
    return Envelope.new("a@x.test", [Recipient(f"r{i}@y.test"), Recipient(f"s{i}@y.test")], content, now=now), content


async def _lifecycle(spool: Spool) -> None:
    envs = [_env(i) for i in range(5)]
    ids = await asyncio.gather(*(spool.enqueue(e, c) for e, c in envs))   # concurrent: one batch or more
    assert ids == [e.id for e, _ in envs]
    for e, c in envs:
        got = await spool.get(e.id)
        assert got is not None and got[0] == State.INCOMING and got[1].id == e.id
        assert await spool.content(e.id) == c
    assert await spool.lease_due(T0 - 1, "n1", 60, 10) == []            # nothing due before its time
    leased = await spool.lease_due(T0, "n1", 60, 3)
    assert len(leased) == 3 and all(lease.owner == "n1" and lease.until == T0 + 60 for lease, _ in leased)
    assert len({lease.token for lease, _ in leased}) == 3
    (l1, e1), (l2, e2), (l3, e3) = leased
    # progress recorded under the lease, then a deferral
    e1.recipients[0].status = DELIVERED
    await spool.record(l1, e1)
    e1.next_attempt = T0 + 300
    await spool.release(l1, e1)
    got = await spool.get(e1.id)
    assert got is not None and got[0] == State.DEFERRED and got[1].recipients[0].status == DELIVERED
    # finished: gone
    await spool.finish(l2)
    assert await spool.get(e2.id) is None
    # a lease that expires is taken back; a late result under it is refused (fencing)
    assert await spool.reclaim(T0 + 59) == []
    assert await spool.reclaim(T0 + 60) == [e3.id]
    got = await spool.get(e3.id)
    assert got is not None and got[0] in (State.INCOMING, State.DEFERRED)
    with pytest.raises(LeaseLost):
        await spool.release(l3, e3)
    entries = await spool.entries()
    assert [x.id for x in entries] == sorted(x.id for x in entries)
    assert {x.id for x in entries} == {e.id for e, _ in envs} - {e2.id}


async def _operator(spool: Spool) -> None:
    (e, c), (f, d) = _env(1), _env(2)
    await spool.enqueue(e, c)
    await spool.enqueue(f, d)
    assert await spool.hold(e.id)
    assert await spool.lease_due(T0 + 10_000, "n", 60, 10) != []          # f only
    assert (await spool.get(e.id) or (None,))[0] == State.HOLD
    assert await spool.release_hold(e.id, T0 + 5)
    got = await spool.get(e.id)
    assert got is not None and got[0] == State.DEFERRED and got[1].next_attempt == T0 + 5
    assert await spool.reschedule(e.id, T0 + 99)
    got = await spool.get(e.id)
    assert got is not None and got[1].next_attempt == T0 + 99
    assert not await spool.update(e.id, State.INCOMING, got[1])          # not in that state: refused
    assert await spool.update(e.id, State.DEFERRED, got[1])
    assert await spool.delete(e.id)
    assert await spool.get(e.id) is None and not await spool.delete(e.id)
    await spool.request("flush", f.id)
    await spool.request("hold", "x")
    assert await spool.take_requests() == [("flush", f.id), ("hold", "x")]
    assert await spool.take_requests() == []


async def _destinations(spool: Spool) -> None:
    """Destination backoff (shared by every node of a shared spool): noted once, seen by every caller;
    when it ends one caller probes and the others wait for the probe's result."""
    assert await spool.backing_off(["a.test", "b.test"], T0, 30) == {}
    await spool.note_destination("a.test", T0 + 300)                    # a destination-wide failure
    assert await spool.backing_off(["a.test", "b.test"], T0, 30) == {"a.test": T0 + 300}
    assert await spool.backing_off(["b.test"], T0, 30) == {}
    # the backoff is over: this caller probes; every other caller sees it backing off until the result
    assert await spool.backing_off(["a.test"], T0 + 300, 30) == {}
    assert await spool.backing_off(["a.test"], T0 + 301, 30) == {"a.test": T0 + 330}
    await spool.note_destination("a.test", T0 + 700)                    # the probe failed: back off again
    assert await spool.backing_off(["a.test"], T0 + 400, 30) == {"a.test": T0 + 700}
    # a probe whose result never comes (its node died) ends after probe_for: another caller probes
    assert await spool.backing_off(["a.test"], T0 + 700, 30) == {}
    assert await spool.backing_off(["a.test"], T0 + 729, 30) == {"a.test": T0 + 730}
    assert await spool.backing_off(["a.test"], T0 + 730, 30) == {}
    await spool.note_destination("a.test", None)                        # it answered: no backoff
    assert await spool.backing_off(["a.test"], T0 + 731, 30) == {}
    assert await spool.backing_off(["a.test"], T0 + 732, 30) == {}
    # operator flush: one destination, then all
    await spool.note_destination("a.test", T0 + 9000)
    await spool.note_destination("b.test", T0 + 9000)
    await spool.forget_destinations("a.test")
    assert await spool.backing_off(["a.test", "b.test"], T0 + 800, 30) == {"b.test": T0 + 9000}
    await spool.forget_destinations()
    assert await spool.backing_off(["a.test", "b.test"], T0 + 800, 30) == {}


async def _per_destination(spool: Spool) -> None:
    """``lease_due(per_destination=N)``: at most N leases per destination at once, whoever holds them."""
    envs = []
    for i, dom in enumerate(["y.test"] * 3 + ["z.test"] * 2 + ["w.test"]):
        content = f"Subject: {i}\r\n\r\nbody {i}\r\n".encode()
        envs.append((Envelope.new("a@x.test", [Recipient(f"r{i}@{dom.upper()}")], content, now=T0), content))
    for e, c in envs:
        await spool.enqueue(e, c)
    first = await spool.lease_due(T0, "n1", 60, 10, per_destination=2)
    dests = sorted(lease.destination for lease, _ in first)
    assert dests == ["w.test", "y.test", "y.test", "z.test", "z.test"]
    # another owner gets nothing: every destination is at its limit, counting n1's leases
    assert await spool.lease_due(T0, "n2", 60, 10, per_destination=2) == []
    # one y.test message done: exactly one more y.test message may be leased
    done = next(lease for lease, _ in first if lease.destination == "y.test")
    await spool.finish(done)
    (third, env3), = await spool.lease_due(T0, "n2", 60, 10, per_destination=2)
    left = {e.id for e, _ in envs[:3]} - {lease.id for lease, _ in first}
    assert third.destination == "y.test" and {env3.id} == left
    assert await spool.lease_due(T0, "n2", 60, 10, per_destination=2) == []
    # leases taken back count no more
    assert len(await spool.reclaim(T0 + 60)) == 5
    assert len(await spool.lease_due(T0 + 60, "n3", 60, 10, per_destination=1)) == 3   # one per destination


async def _summary(spool: Spool) -> None:
    """The ``/metrics`` gauges' source: messages per state and the oldest arrival."""
    empty = await spool.summary()
    assert not any(empty.counts.values()) and empty.oldest is None
    (e, c), (f, d), (g, b) = _env(1, T0 + 5), _env(2, T0), _env(3, T0 + 9)
    for env, content in ((e, c), (f, d), (g, b)):
        await spool.enqueue(env, content)
    assert await spool.hold(g.id)
    assert len(await spool.lease_due(T0 + 5, "n", 60, 1)) == 1          # f: due first
    s = await spool.summary()
    assert {k: n for k, n in s.counts.items() if n} == {State.ACTIVE: 1, State.INCOMING: 1, State.HOLD: 1}
    assert s.oldest == T0


async def _held_at_enqueue(spool: Spool) -> None:
    """A filter's HOLD is stored with the message: never leasable, not even between enqueue and hold."""
    (e, c), (f, d) = _env(1), _env(2)
    await spool.enqueue(e, c, hold=True)
    await spool.enqueue(f, d)
    got = await spool.get(e.id)
    assert got is not None and got[0] == State.HOLD
    assert [env.id for _, env in await spool.lease_due(T0 + 1, "n", 60, 10)] == [f.id]
    assert await spool.lease_fresh(T0 + 1, "n", 60, 10) == []
    assert await spool.release_hold(e.id, T0 + 2)
    assert [env.id for _, env in await spool.lease_due(T0 + 2, "n", 60, 10)] == [e.id]
    assert await spool.content(e.id) == c


async def _handed_over(spool: Spool) -> None:
    """New mail queued in the process that runs the queue is handed over: lease_fresh leases it (once),
    with the content as queued; lease_due leases it too if the runner did not take it yet; after the
    runner stopped, new mail waits for the scan as before."""
    spool.hand_over("n", 60)
    (e, c), (f, d), (g, b) = _env(1, T0 - 1), _env(2), _env(3)   # e due first (a shared spool orders by time)
    await spool.enqueue(e, c)
    await spool.enqueue(f, d)
    first = await spool.lease_fresh(T0, "n", 60, 1)
    assert [env.id for _, env in first] == [e.id] and first[0][0].owner == "n" and first[0][0].until == T0 + 60
    assert await spool.content(e.id) == c
    rest = await spool.lease_due(T0, "n", 60, 10)          # the poll's scan takes what was handed over
    assert [env.id for _, env in rest] == [f.id]
    assert await spool.lease_fresh(T0, "n", 60, 10) == [] and await spool.lease_due(T0, "n", 60, 10) == []
    await spool.finish(first[0][0])
    assert await spool.get(e.id) is None
    f.next_attempt = T0 + 300
    await spool.release(rest[0][0], f)
    got = await spool.get(f.id)
    assert got is not None and got[0] == State.DEFERRED
    # mail queued after a pre-queue attempt (or with a later first attempt) is not due: never handed over
    (h, x) = _env(4)
    h.attempts.append({"time": T0, "prequeue": True})
    h.next_attempt = T0 + 300
    await spool.enqueue(h, x)
    assert await spool.lease_fresh(T0, "n", 60, 10) == [] and await spool.lease_due(T0, "n", 60, 10) == []
    assert h.id in [env.id for _, env in await spool.lease_due(T0 + 300, "n", 60, 10)]   # (f is due again too)
    spool.hand_over(None)
    await spool.enqueue(g, b)
    got = await spool.get(g.id)
    assert got is not None and got[0] == State.INCOMING
    assert [env.id for _, env in await spool.lease_due(T0, "n", 60, 10)] == [g.id]
    assert await spool.content(g.id) == b


async def _renew(spool: Spool) -> None:
    """``renew`` (the heartbeat of attempts under way): it extends the leases still held, in one call; a
    lease taken back, held under another token or by another owner, or whose message was removed, is
    reported lost (missing from the answer) and never extended."""
    envs = [_env(i) for i in range(4)]
    for e, c in envs:
        await spool.enqueue(e, c)
    (l1, e1), (l2, _), (l3, e3), (l4, e4) = await spool.lease_due(T0, "n1", 60, 10)
    assert await spool.renew([], T0, 60) == []
    # renewed before its expiry: extended, and the message is not taken back at the old expiry
    kept = await spool.renew([l1, l2], T0 + 40, 60)
    assert [(x.id, x.token, x.owner, x.until) for x in kept] == [(l1.id, l1.token, "n1", T0 + 100),
                                                              (l2.id, l2.token, "n1", T0 + 100)]
    # a renewal never shortens a lease
    assert [x.until for x in await spool.renew([l1], T0 + 41, 10)] == [T0 + 100]
    # another owner cannot renew what it does not hold (same id and token, other owner)
    assert await spool.renew([replace(l1, owner="n2")], T0 + 45, 600) == []
    assert sorted(await spool.reclaim(T0 + 60)) == sorted([l3.id, l4.id])   # l1, l2: renewed, kept
    # a lease taken back is lost: reported, not extended, even if nobody leased the message again
    assert await spool.renew([l3], T0 + 61, 60) == []
    got = await spool.get(e3.id)
    assert got is not None and got[0] in (State.INCOMING, State.DEFERRED)
    # leased again by another owner: the former owner's renewal is refused, the new owner's lease stands
    again = await spool.lease_due(T0 + 61, "n2", 60, 10)
    l4b = next(x for x, _ in again if x.id == e4.id)
    assert await spool.renew([l4, l1], T0 + 62, 60) != [] and \
        [x.id for x in await spool.renew([l4], T0 + 62, 60)] == []
    assert [x.until for x in await spool.renew([l4b], T0 + 62, 60)] == [T0 + 122]
    with pytest.raises(LeaseLost):
        await spool.release(l4, e4)
    # a renewed lease's results are written (its token fences it, the new until does not matter)
    e1.next_attempt = T0 + 300
    await spool.release(l1, e1)
    got = await spool.get(e1.id)
    assert got is not None and got[0] == State.DEFERRED
    assert await spool.renew([l1], T0 + 70, 60) == []                    # ended by its owner: not held
    # the message removed by the operator while leased: the lease is lost
    assert await spool.delete(l2.id)
    assert await spool.renew([l2], T0 + 70, 60) == []
    # the reclaim at the renewed expiry takes back only what was not renewed again
    assert await spool.reclaim(T0 + 100) == []


async def _priority(spool: Spool) -> None:
    """Due messages are handed out highest queue priority first (a filter's ``queue_priority``, 0 … 9), then
    in due order; a message not due yet waits whatever its priority. With a per-destination limit too."""
    backlog = []
    for i in range(6):
        e, c = _env(i, T0 + i)
        e.priority = 1
        await spool.enqueue(e, c)
        backlog.append(e)
    mid, c = _env(50, T0 + 40)                   # the default priority (5)
    await spool.enqueue(mid, c)
    urgent, c = _env(90, T0 + 50)
    urgent.priority = 9
    await spool.enqueue(urgent, c)
    later, c = _env(91, T0 + 5000)               # highest priority, but not due yet
    later.priority = 9
    await spool.enqueue(later, c)
    (_, first), = await spool.lease_due(T0 + 100, "n", 60, 1)
    assert first.id == urgent.id and first.priority == 9
    (_, second), = await spool.lease_due(T0 + 100, "n", 60, 1, per_destination=10)
    assert second.id == mid.id and second.priority == 5
    rest = await spool.lease_due(T0 + 100, "n", 60, 3)
    assert [e.priority for _, e in rest] == [1, 1, 1] and {e.id for _, e in rest} <= {e.id for e in backlog}
    assert later.id not in {e.id for _, e in await spool.lease_due(T0 + 100, "n", 60, 10)}
    got = await spool.get(urgent.id)
    assert got is not None and got[1].priority == 9   # kept in the stored envelope


async def _priority_fresh(spool: Spool) -> None:
    """New mail handed over to the runner of this process (``hand_over``/``lease_fresh``: the directory
    spool leases it as it is queued) comes highest priority first too: an urgent message queued after a
    burst of newsletters is taken before them. A fresh lease is renewed like any other."""
    spool.hand_over("n", 60)
    try:
        burst = []
        for i in range(4):
            e, c = _env(i)
            e.priority = 1
            await spool.enqueue(e, c)
            burst.append(e.id)
        urgent, c = _env(9)
        urgent.priority = 9
        await spool.enqueue(urgent, c)
        (lease, first), = await spool.lease_fresh(T0 + 1, "n", 60, 1)
        assert first.id == urgent.id and first.priority == 9
        assert [x.id for x in await spool.renew([lease], T0 + 30, 60)] == [urgent.id]
        rest = await spool.lease_fresh(T0 + 1, "n", 60, 10)
        assert sorted(e.id for _, e in rest) == sorted(burst)
    finally:
        spool.hand_over(None)


async def _sealed(spool: Spool) -> None:
    """The content's digest is taken when the message is stored, not when its envelope is made (a
    pre-queue delivery never queued needs none): what the spool gives back carries it, and a copy altered
    without a change of size is found."""
    import hashlib

    from postgate.outbound.queue.envelope import EnvelopeError
    e, c = _env(1)
    assert e.sha256 == ""
    await spool.enqueue(e, c)
    got = await spool.get(e.id)
    assert got is not None and got[1].sha256 == hashlib.sha256(c).hexdigest()
    got[1].check_content(await spool.content(e.id))
    with pytest.raises(EnvelopeError):
        got[1].check_content(c[:-1] + bytes([c[-1] ^ 1]))


async def _checked(spool: Spool) -> None:
    """``checked_content``: the content of a leased message, handed over or found by the scan, checked
    against its envelope: a size or (read back from storage) a digest that does not match is an
    EnvelopeError, never a content delivered as it is."""
    from postgate.outbound.queue.envelope import EnvelopeError
    spool.hand_over("n", 60)
    try:
        (e, c), (f, d) = _env(1), _env(2)
        await spool.enqueue(e, c)
        [(_, fresh)] = await spool.lease_fresh(T0, "n", 60, 10)
        assert fresh.id == e.id and await spool.checked_content(fresh) == c
    finally:
        spool.hand_over(None)
    await spool.enqueue(f, d)
    [(_, scanned)] = await spool.lease_due(T0, "n", 60, 10)
    assert scanned.id == f.id and await spool.checked_content(scanned) == d
    with pytest.raises(EnvelopeError):
        await spool.checked_content(replace(scanned, sha256="0" * 64))
    with pytest.raises(EnvelopeError):
        await spool.checked_content(replace(scanned, size=len(d) + 1))
    g, b = _env(3)
    spool.hand_over("n", 60)
    try:
        await spool.enqueue(g, b)
        [(_, fresh)] = await spool.lease_fresh(T0, "n", 60, 10)
        with pytest.raises(EnvelopeError):
            await spool.checked_content(replace(fresh, size=len(b) - 1))
    finally:
        spool.hand_over(None)


CASES = [_lifecycle, _operator, _destinations, _per_destination, _summary, _held_at_enqueue, _handed_over, _renew,
         _priority, _priority_fresh, _sealed, _checked]
CASE_IDS = ["lifecycle", "operator", "destinations", "per-destination", "summary", "held-at-enqueue",
            "handed-over", "renew", "priority", "priority-fresh", "sealed", "checked"]


def test_an_envelope_stored_without_a_priority_reads_as_the_default() -> None:
    """Envelopes written before queue priorities existed (no ``priority`` field) stay readable: the
    default, 5; a stored priority outside 0 … 9 is an inconsistent envelope."""
    import json

    from postgate.outbound.queue.envelope import DEFAULT_PRIORITY, EnvelopeError
    e, _ = _env(1)
    d = json.loads(e.to_bytes())
    assert d["priority"] == DEFAULT_PRIORITY == 5
    del d["priority"]
    assert Envelope.from_bytes(json.dumps(d).encode()).priority == 5
    d["priority"] = 10
    with pytest.raises(EnvelopeError):
        Envelope.from_bytes(json.dumps(d).encode())


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_spool_contract(name: str, case: Callable[[Spool], Awaitable[None]], tmp_path: Path) -> None:
    _run(case, FACTORIES[name], tmp_path)


@pytest.mark.parametrize(("line", "error"), [
    ("tcp_user_timeout = -1", "tcp_user_timeout: must be between 0"),
    ("tcp_user_timeout = nan", "tcp_user_timeout"),
    ("connect_timeout = 0", "connect_timeout: must be between 1 and 300"),
    ("keepalives_idle = 0", "keepalives_idle: must be an integer between 1 and 7200"),
    ("keepalives_count = 1000", "keepalives_count: must be an integer between 1 and 100"),
    ("keepalives_interval = 1.5", "keepalives_interval"),
    ("tcp_user_timeout = 5.5", None),
])
def test_partition_settings_are_checked(tmp_path: Path, line: str, error: str | None) -> None:
    """[queue] connect_timeout, tcp_user_timeout and keepalives_* (docs/configuration.md): wrong values are
    refused with file:line, right ones reach the PostgreSQL connection parameters."""
    from postgate.outbound.queue.pgspool import PgSettings, PostgresSpool

    from postgate import config as configmod
    p = tmp_path / "postgate.toml"
    p.write_text(f'[queue]\nbackend = "postgresql"\ndsn = "postgresql://db1,db2/postgate"\n{line}\n')
    if error is not None:
        with pytest.raises(configmod.ConfigError, match=f"postgate.toml:4: \\[queue\\] {error}"):
            configmod.load(p)
        return
    cfg = configmod.load(p)
    params = PostgresSpool(PgSettings.from_config(cfg.queue))._conninfo()
    assert params["tcp_user_timeout"] == 5500 and params["keepalives"] == 1
    assert params["keepalives_idle"] == 5 and params["connect_timeout"] == 5
    # a parameter written in the DSN wins over the [queue] key
    cfg.queue.dsn += "?tcp_user_timeout=1234"
    assert "tcp_user_timeout" not in PostgresSpool(PgSettings.from_config(cfg.queue))._conninfo()


@pytest.mark.parametrize(("lines", "error", "warns"), [
    ("lease_time = 2", "postgate.toml:4: \\[queue\\] lease_time: must be between 3 and 86400 seconds", False),
    ("lease_time = nan", "lease_time", False),
    ("lease_time = 3\ncommit_timeout = 1", None, False),
    ("lease_time = 20", None, True),           # under 3 x commit_timeout (10 s): renewals may come too late
    ("lease_time = 30", None, False),
])
def test_lease_time_is_checked_against_its_renewal(tmp_path: Path, lines: str, error: str | None,
                                                   warns: bool) -> None:
    """``[queue] lease_time`` (docs/configuration.md): leases are renewed every third of it, so at least
    3 s; ``postgate check`` warns when a renewal slowed by the database (up to ``commit_timeout``) could
    come after the lease ran out."""
    from postgate import config as configmod
    from postgate.check import WARN, check_lease_time
    p = tmp_path / "postgate.toml"
    p.write_text(f'[queue]\nbackend = "postgresql"\ndsn = "postgresql://db1/postgate"\n{lines}\n')
    if error is not None:
        with pytest.raises(configmod.ConfigError, match=error):
            configmod.load(p)
        return
    found = check_lease_time(configmod.load(p))
    assert [r.status for r in found] == ([WARN] if warns else []), found
