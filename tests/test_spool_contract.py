"""The Spool protocol's contract (outbound/queue/protocol.py), run against every implementation: add a
factory to ``FACTORIES`` and the same table of behaviours runs against it. No network needed."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
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


@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("case", [_lifecycle, _operator], ids=["lifecycle", "operator"])
def test_spool_contract(name: str, case: Callable[[Spool], Awaitable[None]], tmp_path: Path) -> None:
    _run(case, FACTORIES[name], tmp_path)
