"""What the nodes of one shared queue (PostgreSQL) share besides the messages, and what a node does when a
network partition cuts it off from PostgreSQL.

- Destination backoff: a destination that one node found dead (no server answered) is skipped by every
  node until its backoff ends; then one node, not each, probes it.
- Destination concurrency: at most ``destination_concurrency`` messages of one destination leased at once
  across all nodes, read from the database while the nodes deliver.
- Partition (issue 15, item 4): packets between a node and PostgreSQL are dropped (nftables,
  fixtures/netcut.py), so its connections hang as behind a dead switch. The node answers 451 within a
  bounded time (never 250 without the commit); ``tcp_user_timeout``/keepalives end its open connections;
  a lease it held is taken over by a node on the other side, and its late result is refused (fencing);
  once the partition heals it accepts and delivers again, nothing acknowledged lost.

All against a real PostgreSQL 15 (fixtures/postgres.py) listening on two loopback addresses: the partition
cuts one of them, the other stays reachable.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from postgate.outbound.delivery import Deliverer, DeliveryConfig, RecipientResult
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.pgspool import LOCK_LEASES, PgSettings, PostgresSpool
from postgate.outbound.queue.protocol import LeaseLost, SpoolError, State
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.policy.vocab import Outcome

from fixtures.netcut import Partition, established
from fixtures.pgserve import PostgateServer
from fixtures.postgres import Cluster
from fixtures.testnet import TestNet
from tests.test_pgcluster import send_code as pgcluster_send_code

pytestmark = pytest.mark.cluster

HOST = "127.0.3.1"         # PostgreSQL as the rest of the cluster reaches it
CUT = "127.0.3.2"          # the same server, reached by the node that the partition cuts off
PORT = 30432
NODE = "127.0.2.21"
CLIENT = "127.0.5.1"       # inside the node's trusted_networks: relaying allowed (as tests/test_pgcluster.py's)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(host=HOST, port=PORT, standby=False, also_listen=(CUT,)).start()
    try:
        yield c
    finally:
        c.stop()


def fresh_db(c: Cluster, name: str, via: str | None = None) -> str:
    c.primary.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    c.primary.psql(f"CREATE DATABASE {name} OWNER {c.user}")
    return dsn_of(c, name, via)


def dsn_of(c: Cluster, name: str, via: str | None = None) -> str:
    return c.dsn(via).replace("/postgate?", f"/{name}?")


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def deliverer(net: TestNet) -> Deliverer:
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)
    return Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))


class Counting:
    """The real delivery agent, counting its calls (queue ids)."""

    def __init__(self, real: Deliverer) -> None:
        self.real, self.calls = real, list[str]()

    async def deliver(self, *a: Any, **kw: Any) -> list[RecipientResult]:
        self.calls.append(str(kw.get("queue_id")))
        return await self.real.deliver(*a, **kw)


async def enqueue(sp: PostgresSpool, rcpt: str, now: float) -> Envelope:
    content = f"Subject: {rcpt}\r\nMessage-ID: <{rcpt}.{time.time()}@share.test>\r\n\r\nhello\r\n".encode()
    env = Envelope.new("alice@client.test", [Recipient(rcpt)], content, now=now)
    await sp.enqueue(env, content)
    return env


def test_a_dead_destination_found_by_one_node_is_skipped_by_every_node(testnet: TestNet, cluster: Cluster) -> None:
    dsn = fresh_db(cluster, "deaddest")
    clock = Clock()

    async def run() -> None:
        spa, spb = PostgresSpool(PgSettings(dsn=dsn)), PostgresSpool(PgSettings(dsn=dsn))
        await spa.check()
        await spb.check()
        da, db = Counting(deliverer(testnet)), Counting(deliverer(testnet))
        cfg = {"destination_backoff": 3600.0, "min_backoff": 60.0, "max_backoff": 60.0,
               "reporting_mta": "queue.test", "lease_time": 600.0}
        a = Scheduler(spa, da, SchedulerConfig(**cfg), clock=clock, owner="node-a")  # type: ignore[arg-type]
        b = Scheduler(spb, db, SchedulerConfig(**cfg), clock=clock, owner="node-b")  # type: ignore[arg-type]
        try:
            await enqueue(spa, "u1@dead.test", clock.t)
            await a.run_once()
            assert len(da.calls) == 1           # node A tried: no server of dead.test answered
            row = cluster.primary.psql("SELECT dead_until, failures FROM pg_destinations "
                                       "WHERE destination = 'dead.test'", db="deaddest")
            assert row == f"{clock.t + 3600:.0f}|1", row
            # node B has its own messages to dead.test: it leaves them alone (A's finding is shared)
            m2, m3 = await enqueue(spb, "u2@dead.test", clock.t), await enqueue(spb, "u3@dead.test", clock.t)
            assert await b.run_once() == 2
            assert db.calls == []
            for m in (m2, m3):
                got = await spb.get(m.id)
                assert got is not None and got[0] is State.DEFERRED
                assert "backing off" in got[1].recipients[0].reason
            # the backoff is over and each node holds one message to dead.test: one node probes, not both
            clock.t += 3600 + 60
            a.config.batch = b.config.batch = 1
            await asyncio.gather(a.run_once(), b.run_once())
            assert len(da.calls) + len(db.calls) == 2, (da.calls, db.calls)
            row = cluster.primary.psql("SELECT failures FROM pg_destinations WHERE destination = 'dead.test'",
                                       db="deaddest")
            assert row == "2"                   # the probe failed: backing off again, for every node
            # an operator's flush-domain ends the backoff for every node
            await spb.request("flush-domain", "dead.test")
            await b.apply_requests()
            assert cluster.primary.psql("SELECT count(*) FROM pg_destinations", db="deaddest") == "0"
        finally:
            await da.real.close()
            await db.real.close()
            await spa.close()
            await spb.close()
    asyncio.run(run())


def test_destination_concurrency_holds_across_two_nodes(testnet: TestNet, cluster: Cluster) -> None:
    """Two nodes deliver 16 messages to one destination with ``destination_concurrency = 2``: the database
    never shows more than 2 of them leased at once (read at every delivery and by a sampler), and no more
    than 2 deliveries run at once across both nodes."""
    dsn = fresh_db(cluster, "concur")
    limit = 2
    tokens = [f"c{n:02d}" for n in range(16)]

    async def run() -> None:
        sps = [PostgresSpool(PgSettings(dsn=dsn)) for _ in range(2)]
        for sp in sps:
            await sp.check()
        for t in tokens:
            await enqueue(sps[0], f"bob+{t}@dane-ok.test", time.time())
        db = await psycopg.AsyncConnection.connect(dsn, autocommit=True)
        seen: list[int] = []
        inflight = [0, 0]            # now, most

        async def active() -> int:
            cur = await db.execute("SELECT count(*) FROM pg_messages WHERE state = 'active' "
                                   "AND destination = 'dane-ok.test'")
            row = await cur.fetchone()
            return int(row[0]) if row else 0

        lock = asyncio.Lock()

        class Watching:
            def __init__(self, real: Deliverer) -> None:
                self.real = real

            async def deliver(self, *a: Any, **kw: Any) -> list[RecipientResult]:
                inflight[0] += 1
                inflight[1] = max(inflight[1], inflight[0])
                try:
                    async with lock:
                        seen.append(await active())
                    await asyncio.sleep(0.1)          # deliveries overlap: the bound is what keeps them few
                    return await self.real.deliver(*a, **kw)
                finally:
                    inflight[0] -= 1

        reals = [deliverer(testnet) for _ in range(2)]
        nodes = [Scheduler(sp, Watching(r), SchedulerConfig(destination_concurrency=limit, min_backoff=1.0,
                                                               max_backoff=2.0, reporting_mta="queue.test",
                                                               lease_time=60.0), owner=f"node-{i}")
                 for i, (sp, r) in enumerate(zip(sps, reals, strict=True))]
        stop = asyncio.Event()
        runs = [asyncio.ensure_future(n.run(stop, tick=0.1)) for n in nodes]

        async def sampler() -> None:
            while not stop.is_set():
                async with lock:
                    seen.append(await active())
                await asyncio.sleep(0.02)

        sampling = asyncio.ensure_future(sampler())
        try:
            deadline = time.monotonic() + 90
            while time.monotonic() < deadline and await sps[0].entries():
                await asyncio.sleep(0.2)
            assert await sps[0].entries() == []
        finally:
            stop.set()
            await asyncio.gather(*runs, sampling)
            for r in reals:
                await r.close()
            for sp in sps:
                await sp.close()
            await db.close()
        print(f"\nconcurrency: most leased at once {max(seen)}, most deliveries at once {inflight[1]}, "
              f"{len(seen)} samples")
        assert max(seen) <= limit, seen
        assert inflight[1] <= limit
    asyncio.run(run())
    got = {r[4:].split("@")[0] for m in testnet.received("mx.dane-ok.test") for r in m["rcpt_tos"]
           if r.startswith("bob+c")}
    assert set(tokens) <= got


def send_code(address: str, token: str) -> int:
    """The reply code to the end of DATA (tests/test_pgcluster.py's client, with this module's domain)."""
    return pgcluster_send_code(address, token, domain="share.test", timeout=60)


def delivered(testnet: TestNet) -> set[str]:
    return {r[4:].split("@")[0] for m in testnet.received("mx.dane-ok.test") for r in m["rcpt_tos"]
            if r.startswith("bob+p") and "@share.test" in m["data"]}


def test_network_partition_between_a_node_and_postgresql(testnet: TestNet, tmp_path: Path,
                                                         cluster: Cluster) -> None:
    fresh_db(cluster, "cut")
    tcp = {"connect_timeout": 2.0, "tcp_user_timeout": 3.0, "keepalives_idle": 2, "keepalives_interval": 1,
           "keepalives_count": 2}
    node = PostgateServer(testnet, tmp_path / "node", address=NODE,
                          queue={"backend": "postgresql", "dsn": dsn_of(cluster, "cut", via=CUT),
                                 "lease_time": 4.0, "min_backoff": 1.0, "max_backoff": 2.0,
                                 "commit_timeout": 4.0, **tcp},
                          prequeue={"mode": "queue-first"})
    # a second node on the same side of the cut (this test process), and one on the other side; they share
    # a queue of their own (same server, another database), so the serve node's leases stay its own
    fresh_db(cluster, "fence")
    cut_off = PostgresSpool(PgSettings(dsn=dsn_of(cluster, "fence", via=CUT), commit_timeout=4.0,
                                       **tcp))  # type: ignore[arg-type]
    other = PostgresSpool(PgSettings(dsn=dsn_of(cluster, "fence"), commit_timeout=4.0))
    loop = asyncio.new_event_loop()
    acked: list[str] = []
    part = Partition(CUT, PORT)

    stuck: psycopg.AsyncConnection[Any] | None = None

    def cleanup() -> None:
        part.heal()
        if not loop.is_closed():
            if stuck is not None:
                loop.run_until_complete(stuck.close())
            loop.run_until_complete(cut_off.close())
            loop.run_until_complete(other.close())
            loop.close()
        node.stop()

    node.start()
    try:
        for n in range(3):
            assert send_code(NODE, f"p0{n}") == 250
            acked.append(f"p0{n}")
        # the cut-off side leases a message (as a delivery would), then the partition starts
        loop.run_until_complete(cut_off.check())
        loop.run_until_complete(other.check())
        fence = Envelope.new("alice@client.test", [Recipient("fenced@elsewhere.test")], b"x\r\n",
                             now=time.time() + 3600)       # due in an hour: only this test leases it
        loop.run_until_complete(cut_off.enqueue(fence, b"x\r\n"))
        (lease_a, env_a), = loop.run_until_complete(cut_off.lease_due(fence.next_attempt, "cut-off", 3.0, 1))
        # and a transaction of the cut-off side holds the lease lock (as lease_due does for one statement)
        pool = loop.run_until_complete(cut_off._pool())
        stuck = loop.run_until_complete(pool.getconn())
        loop.run_until_complete(stuck.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_LEASES,)))
        assert established(CUT, PORT) > 0
        part.start()
        t0 = time.monotonic()

        # the node answers 451 within a bounded time: no 250 without the commit
        codes: list[int] = []
        client = threading.Thread(target=lambda: codes.append(send_code(NODE, "pcut")))
        client.start()
        # a result written from the cut-off side fails within a bounded time, not a hang
        t = time.monotonic()
        env_a.recipients[0].status = Outcome.DELIVERED
        with pytest.raises(SpoolError):
            loop.run_until_complete(asyncio.wait_for(cut_off.record(lease_a, env_a), 60))
        assert time.monotonic() - t < 30              # a bound (tcp_user_timeout + commit_timeout), not a hang
        client.join(90)
        assert codes == [451], codes
        # tcp_user_timeout and keepalives end every connection that was open across the cut (the node's pool
        # and this process's): none is left established, though no packet crosses
        deadline = time.monotonic() + 30
        while established(CUT, PORT) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert established(CUT, PORT) == 0
        print(f"\npartition: 451 and connections dropped within {time.monotonic() - t0:.1f}s")

        # the cut-off transaction's lease lock does not stall every other node's leasing for ever: the server
        # ends the session (idle_in_transaction_session_timeout), lease_due with a per-destination limit
        # goes on
        deadline = time.monotonic() + 60
        while True:
            try:
                loop.run_until_complete(other.lease_due(time.time(), "other", 5.0, 10, per_destination=5))
                break
            except SpoolError:
                assert time.monotonic() < deadline, "the lease lock of a cut-off transaction is never released"
        print(f"partition: leasing by the other side resumed after {time.monotonic() - t0:.1f}s")

        # the other side takes the lease over once it expired (its clock at the expiry), and records its
        # own result
        assert loop.run_until_complete(other.reclaim(lease_a.until)) == [fence.id]
        (lease_b, env_b), = loop.run_until_complete(other.lease_due(lease_a.until, "other", 60.0, 1))
        env_b.recipients[0].reason = "the new owner's result"
        loop.run_until_complete(other.record(lease_b, env_b))
    except BaseException:
        cleanup()
        raise
    part.heal()

    try:
        # healed: the cut-off side's late result is refused (fencing), the new owner's stays
        deadline = time.monotonic() + 60
        while True:
            try:
                loop.run_until_complete(cut_off.release(lease_a, env_a))
                raise AssertionError("a result written under a lease that was taken over")
            except LeaseLost:
                break
            except SpoolError:              # the pool is reconnecting
                assert time.monotonic() < deadline
                time.sleep(0.5)
        got = loop.run_until_complete(other.get(fence.id))
        assert got is not None and got[0] is State.ACTIVE
        assert got[1].recipients[0].reason == "the new owner's result"
        assert got[1].recipients[0].status is not Outcome.DELIVERED
        loop.run_until_complete(other.finish(lease_b))

        # the node goes on: it accepts (once its pool reconnected) and delivers; nothing acknowledged is lost
        deadline = time.monotonic() + 60
        n = 0
        while len(acked) < 6 and time.monotonic() < deadline:
            n += 1
            if send_code(NODE, f"p1{n:02d}") == 250:
                acked.append(f"p1{n:02d}")
            else:
                time.sleep(0.5)
        assert len(acked) == 6, "acceptance did not resume after the partition healed"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not set(acked) <= delivered(testnet):
            time.sleep(0.3)
        assert set(acked) <= delivered(testnet), sorted(set(acked) - delivered(testnet))
    finally:
        cleanup()


class StallingReceiver:
    """An SMTP server (aiosmtpd) that takes each message whole, then waits ``stall`` seconds before its reply
    to the end of DATA: a slow destination whose attempt outlasts several lease times."""

    def __init__(self, stall: float) -> None:
        self.stall = stall
        self.entered: list[str] = []          # Subject of each message whose DATA ended (one per attempt)
        self.stored: list[str] = []
        self.dropped: list[str] = []          # the client closed the connection while the reply was held

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        subject = next((line[9:] for line in (envelope.original_content or b"").decode().splitlines()
                        if line.startswith("Subject: ")), "")
        self.entered.append(subject)
        try:
            await asyncio.sleep(self.stall)
        except asyncio.CancelledError:        # aiosmtpd: the connection was lost
            self.dropped.append(subject)
            raise
        self.stored.append(subject)
        return "250 2.0.0 stored late"


def test_a_long_attempt_keeps_its_lease_and_a_lost_one_is_stopped(testnet: TestNet, cluster: Cluster,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """Lease renewal. Two nodes share a queue with ``lease_time`` = 2 s; a destination holds its reply to the
    end of DATA for 8 s (four lease times). The delivering node renews the lease while it waits: the message
    is delivered exactly once, its lease keeps the one token it got (the other node never leases it, nor
    does the delivering node lease it twice), and ``lease_until`` moves on while the attempt runs. Without
    renewal the lease expires after 2 s, a node takes the message back and delivers it again.
    Then a lease lost during an attempt (taken over in the database, as after a pause past the expiry): the
    next renewal logs it with the queue id and stops the attempt (its connection dropped); nothing of it is
    recorded."""
    import logging

    from aiosmtpd.controller import Controller

    from tests.test_queue_feeder import _address, _free_port
    dsn = fresh_db(cluster, "renew")
    lease = 2.0
    held = StallingReceiver(stall=4 * lease)
    address = _address(testnet, "mx.dane-ok.test")
    port = _free_port(address)
    ctl = Controller(held, hostname=address, port=port)
    ctl.start()
    caplog.set_level(logging.INFO, logger="postgate.queue")
    seen: dict[str, Any] = {}

    def slow(token: str) -> tuple[Envelope, bytes]:
        content = f"Subject: {token}\r\nMessage-ID: <{token}.{time.time()}@share.test>\r\n\r\nslow\r\n".encode()
        # a [host]:port transport route (as a filter sets) leads the message to the stalling server
        return Envelope.new("alice@client.test", [Recipient("late@slow.test", tls_level="none",
                                                            transport=f"smtp:[mx.dane-ok.test]:{port}")],
                            content), content

    async def run() -> None:
        sps = [PostgresSpool(PgSettings(dsn=dsn)) for _ in range(2)]
        for sp in sps:
            await sp.check()
        reals = [Deliverer(Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3),
                           DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 60))) for _ in range(2)]
        nodes = [Scheduler(sp, r, SchedulerConfig(lease_time=lease, min_backoff=60.0, max_backoff=60.0,
                                                  reporting_mta="queue.test"), owner=f"node-{i}")
                 for i, (sp, r) in enumerate(zip(sps, reals, strict=True))]
        stop = asyncio.Event()
        runs = [asyncio.ensure_future(n.run(stop, tick=0.2)) for n in nodes]
        db = await psycopg.AsyncConnection.connect(dsn, autocommit=True)

        async def row(qid: str) -> tuple[Any, ...] | None:
            cur = await db.execute("SELECT state, lease_owner, lease_token, lease_until FROM pg_messages "
                                   "WHERE id = %s", (qid,))
            return await cur.fetchone()

        try:
            # 1. a long attempt: one lease from start to end, renewed
            env, content = slow("renewed")
            await sps[0].enqueue(env, content)
            leases: set[tuple[str, int]] = set()
            untils: list[float] = []
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                r = await row(env.id)
                if r is None:
                    break
                if r[0] == "active":
                    leases.add((r[1], r[2]))
                    untils.append(r[3])
                await asyncio.sleep(0.1)
            seen["gone"] = await row(env.id) is None
            seen["leases"] = leases
            seen["untils"] = untils

            # 2. a lease lost during the attempt: taken over in the database while the receiver stalls
            env2, content2 = slow("lost")
            await sps[1].enqueue(env2, content2)
            deadline = time.monotonic() + 30
            while "lost" not in held.entered and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            await db.execute("UPDATE pg_messages SET lease_owner = 'node-x', lease_token = nextval('pg_lease_tokens'), "
                             "lease_until = %s WHERE id = %s AND state = 'active'", (time.time() + 3600, env2.id))
            deadline = time.monotonic() + 30
            while sum(n.counters.values["lease_lost"] for n in nodes) == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            seen["lost_counted"] = sum(n.counters.values["lease_lost"] for n in nodes)
            deadline = time.monotonic() + 10
            while "lost" not in held.dropped and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            seen["lost_id"] = env2.id
            seen["lost_row"] = await row(env2.id)
            got = await sps[0].get(env2.id)
            seen["lost_attempts"] = got[1].attempts if got else None
        finally:
            stop.set()
            await asyncio.gather(*runs)
            for r in reals:
                await r.close()
            for sp in sps:
                await sp.close()
            await db.close()

    try:
        asyncio.run(run())
    finally:
        ctl.stop()
    print(f"\nrenewal: one lease {seen['leases']}, lease_until from {min(seen['untils']):.1f} to "
          f"{max(seen['untils']):.1f} over {len(seen['untils'])} samples; receiver got {held.entered}")
    assert seen["gone"], "the slow message was never finished"
    assert held.entered.count("renewed") == 1 and held.stored.count("renewed") == 1   # delivered exactly once
    assert len(seen["leases"]) == 1, seen["leases"]   # one owner, one token for the whole attempt
    assert max(seen["untils"]) - min(seen["untils"]) >= 2 * lease   # the lease moved on while it ran
    assert "lease taken back" not in caplog.text
    # the lost lease: counted, logged with the queue id, the attempt stopped, nothing recorded
    assert seen["lost_counted"] == 1
    assert "lost" in held.dropped and "lost" not in held.stored   # the stopped attempt dropped its connection
    lines = [r.getMessage() for r in caplog.records if "lease lost" in r.getMessage()]
    assert lines == [f"{seen['lost_id']}: lease lost while delivering (taken back or removed; another node may "
                     "deliver it); attempt stopped, no result recorded"], lines
    assert seen["lost_row"] is not None and seen["lost_row"][:2] == ("active", "node-x")
    assert seen["lost_attempts"] == []
