"""The shared queue (outbound/queue/pgspool.py) against a real PostgreSQL 15 primary with a synchronous
streaming standby and a real S3 server (SeaweedFS), both started inside the test namespace.

Each test gets its own cluster where it breaks one (kills, promotion); the others share one.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.pgspool import LEASE_PER_DESTINATION, SCHEMA_VERSION, PgSettings, PostgresSpool
from postgate.outbound.queue.protocol import LeaseLost, Spool, SpoolError, SpoolUnavailable, State
from postgate.policy.vocab import Outcome

from fixtures.postgres import Cluster
from fixtures.s3 import ACCESS_KEY, SECRET_KEY, SeaweedS3
from tests.test_spool_contract import CASE_IDS, CASES

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def s3() -> Iterator[SeaweedS3]:
    srv = SeaweedS3(port=18333).start()
    try:
        yield srv
    finally:
        srv.stop(cleanup=True)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    c = Cluster(port=25432).start()
    try:
        yield c
    finally:
        c.stop()


def spool_for(c: Cluster, s3: SeaweedS3 | None = None, **kw: float) -> PostgresSpool:
    return PostgresSpool(PgSettings(dsn=c.dsn(), object_store=s3.url if s3 else None,
                                    access_key=ACCESS_KEY, secret_key=SECRET_KEY, **kw))  # type: ignore[arg-type]


def empty_database(cluster: Cluster, name: str) -> str:
    """A new, empty database ``name`` on the cluster (dropped first if a run left it); its DSN."""
    cluster.primary.psql(f"DROP DATABASE IF EXISTS {name}")
    cluster.primary.psql(f"CREATE DATABASE {name} OWNER {cluster.user}")
    return cluster.dsn().replace("/postgate?", f"/{name}?")


def message(n: int = 0, size: int = 2000) -> tuple[Envelope, bytes]:
    content = (f"Subject: {n}\r\nMessage-ID: <{n}.{time.time()}@test>\r\n\r\n".encode() +
               b"x" * size + b"\r\n")
    return Envelope.new("a@x.test", [Recipient(f"r{n}@y.test")], content), content


def test_leases_fencing_and_idempotent_enqueue(cluster: Cluster, s3: SeaweedS3) -> None:
    async def run() -> None:
        sp = spool_for(cluster, s3)
        await sp.check()
        env, content = message(1)
        assert await sp.enqueue(env, content) == env.id
        # an enqueue retried after an ambiguous failure makes no second message (client-made id)
        assert await sp.enqueue(env, content) == env.id
        assert [e.id for e in await sp.entries()].count(env.id) == 1
        assert await sp.content(env.id) == content               # the body came back from S3

        now = time.time()
        (lease_a, got), = await sp.lease_due(now, "node-a", 1.0, 10)
        assert got.id == env.id
        assert await sp.lease_due(now, "node-b", 1.0, 10) == []      # leased: nobody else gets it
        # node-a is paused past its lease: node-b takes the message over
        assert await sp.reclaim(now + 2) == [env.id]
        (lease_b, _), = await sp.lease_due(now + 2, "node-b", 60.0, 10)
        assert lease_b.token > lease_a.token
        got.recipients[0].status = Outcome.DELIVERED
        # node-a wakes up: its result must not overwrite node-b's (fencing token)
        with pytest.raises(LeaseLost):
            await sp.record(lease_a, got)
        with pytest.raises(LeaseLost):
            await sp.finish(lease_a)
        await sp.record(lease_b, got)
        await sp.finish(lease_b)
        assert await sp.get(env.id) is None
        await sp.close()
    asyncio.run(run())


def test_operator_actions_and_requests(cluster: Cluster) -> None:
    async def run() -> None:
        sp = spool_for(cluster)               # bodies in PostgreSQL
        await sp.check()
        env, content = message(2)
        await sp.enqueue(env, content)
        assert await sp.content(env.id) == content
        assert await sp.hold(env.id)
        assert await sp.lease_due(time.time(), "n", 5, 10) == []     # held mail is never leased
        assert (await sp.get(env.id))[0] is State.HOLD  # type: ignore[index]
        assert await sp.release_hold(env.id, time.time())
        assert await sp.reschedule(env.id, time.time() + 3600)
        assert await sp.lease_due(time.time(), "n", 5, 10) == []
        await sp.request("flush", "")
        await sp.request("delete", env.id)
        assert await sp.take_requests() == [("flush", ""), ("delete", env.id)]
        assert await sp.take_requests() == []
        assert await sp.delete(env.id)
        assert not await sp.delete(env.id)
        await sp.close()
    asyncio.run(run())


def test_object_store_down_refuses_new_mail_and_queued_mail_waits(cluster: Cluster) -> None:
    srv = SeaweedS3(port=19333).start()
    try:
        async def run() -> None:
            sp = spool_for(cluster, srv)
            await sp.check()
            env, content = message(3)
            await sp.enqueue(env, content)
            srv.stop()
            new, new_content = message(4)
            with pytest.raises(SpoolError):
                await sp.enqueue(new, new_content)         # no 250 without the body stored
            assert await sp.get(new.id) is None            # and no envelope without its body
            (lease, _), = await sp.lease_due(time.time(), "n", 30, 10)
            with pytest.raises(SpoolError):
                await sp.content(env.id)                   # queued mail can't be read now: it waits
            await sp.release(lease, env)
            assert (await sp.get(env.id))[0] is State.DEFERRED  # type: ignore[index]
            srv.start()
            deadline = time.monotonic() + 60
            while True:              # once the store is back (its volume server registered), the body is there
                try:
                    assert await sp.content(env.id) == content
                    break
                except SpoolError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.5)
            await sp.delete(env.id)
            await sp.close()
        asyncio.run(run())
    finally:
        srv.stop(cleanup=True)


def test_standby_gone_no_acknowledgement_without_replication() -> None:
    """With the synchronous standby gone, a commit waits for ever on the primary: the spool bounds the wait
    and refuses (the client gets 451), and never reports the message as queued."""
    c = Cluster(port=26432).start()
    try:
        async def run() -> None:
            sp = spool_for(c, commit_timeout=2.0)
            await sp.check()
            env, content = message(5)
            await sp.enqueue(env, content)
            assert c.standby is not None
            c.standby.kill()
            new, new_content = message(6)
            t = time.monotonic()
            with pytest.raises(SpoolError):
                await sp.enqueue(new, new_content)
            assert time.monotonic() - t < 15          # bounded, not a hang (a bound, not a timing claim)
            await sp.close()
        asyncio.run(run())
    finally:
        c.stop()


def test_failover_to_the_promoted_standby_loses_nothing_acknowledged() -> None:
    c = Cluster(port=27432).start()
    try:
        async def run() -> None:
            sp = spool_for(c)
            await sp.check()
            acked = []
            for n in range(20):
                env, content = message(100 + n)
                await sp.enqueue(env, content)
                acked.append(env.id)
            c.primary.kill()                       # power loss of the primary ...
            assert c.standby is not None
            c.standby.promote()                    # ... and the standby takes over (Patroni's job in production)
            deadline = time.monotonic() + 30
            while True:                            # the pool reconnects to the new primary (multi-host DSN)
                try:
                    env, content = message(200)
                    await sp.enqueue(env, content)
                    break
                except SpoolError:
                    if time.monotonic() > deadline:
                        raise
                    await asyncio.sleep(0.2)
            ids = {e.id for e in await sp.entries()}
            assert set(acked) <= ids               # every acknowledged message is on the new primary
            assert env.id in ids
            await sp.close()
        asyncio.run(run())
    finally:
        c.stop()


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_spool_contract_on_postgresql(case: Callable[[Spool], Awaitable[None]], cluster: Cluster,
                                      s3: SeaweedS3) -> None:
    """The same table of behaviours the directory spool passes (tests/test_spool_contract.py)."""
    cluster.primary.psql("DROP TABLE IF EXISTS pg_messages, pg_requests, pg_queue_schema, pg_destinations; DROP SEQUENCE IF EXISTS pg_lease_tokens", db="postgate")

    async def go() -> None:
        sp = spool_for(cluster, s3)
        await sp.check()
        assert await sp.try_lock()
        try:
            await sp.recover()
            await case(sp)
        finally:
            await sp.unlock()
    asyncio.run(go())


def test_postgate_check_reports_the_shared_queue(cluster: Cluster) -> None:
    """postgate check (issue 15): reach, a writable primary and the schema version; it never creates the
    schema itself (serve does)."""
    from postgate import config as configmod
    from postgate.check import FAIL, PASS, WARN, check_queue

    def cfg(dsn: str) -> configmod.Config:
        c = configmod.Config()
        c.queue.backend, c.queue.dsn = "postgresql", dsn
        return c

    [fresh] = asyncio.run(check_queue(cfg(empty_database(cluster, "fresh"))))
    assert fresh.status == WARN and "no Postgate queue schema" in fresh.message
    asyncio.run(spool_for(cluster).check())                         # what serve does at start
    [ok] = asyncio.run(check_queue(cfg(cluster.dsn())))
    assert ok.status == PASS and f"schema version {SCHEMA_VERSION}" in ok.message, ok
    [down] = asyncio.run(check_queue(cfg(cluster.dsn().replace(f":{cluster.primary.port}", ":1")
                                         .replace(f",{cluster.primary.host}:{cluster.standby.port}"  # type: ignore[union-attr]
                                                  if cluster.standby else "", ""))))
    assert down.status == FAIL and "cannot reach PostgreSQL" in down.message


def test_schema_version_1_is_upgraded_by_serve_and_reported_by_check(cluster: Cluster) -> None:
    """Version 2 (shared destination state) adds a destination column, filled from each stored envelope,
    and the destinations table. ``postgate check`` reports an older schema (WARN: serve upgrades it);
    serve's start upgrades it in place, keeping the queued mail."""
    from postgate import config as configmod
    from postgate.check import PASS, WARN, check_queue

    dsn = empty_database(cluster, "upgrade")
    env, content = message(7)

    async def as_version_1() -> None:
        sp = PostgresSpool(PgSettings(dsn=dsn))
        await sp.check()
        await sp.enqueue(env, content)
        await sp.close()
    asyncio.run(as_version_1())
    # what a version-1 Postgate left: no destination column, no destinations table
    cluster.primary.psql("ALTER TABLE pg_messages DROP COLUMN destination; DROP TABLE pg_destinations; "
                         "DELETE FROM pg_queue_schema; INSERT INTO pg_queue_schema VALUES (1)", db="upgrade")
    c = configmod.Config()
    c.queue.backend, c.queue.dsn = "postgresql", dsn
    [old] = asyncio.run(check_queue(c))
    assert old.status == WARN and "schema version 1" in old.message and "upgrades it" in old.message, old

    async def serve_start() -> str:
        sp = PostgresSpool(PgSettings(dsn=dsn))
        await sp.check()
        got = await sp.get(env.id)
        assert got is not None and got[1].id == env.id               # the queued mail is kept
        await sp.close()
        return sp.found
    assert "upgraded from 1" in asyncio.run(serve_start())
    assert cluster.primary.psql("SELECT destination FROM pg_messages", db="upgrade") == "y.test"
    [ok] = asyncio.run(check_queue(c))
    assert ok.status == PASS and f"schema version {SCHEMA_VERSION}" in ok.message, ok


def _sorts(node: dict[str, Any]) -> list[tuple[str, int]]:
    """Every Sort of an EXPLAIN (ANALYZE, FORMAT JSON) plan: its method and how many rows went into it."""
    out = []
    if node.get("Node Type") == "Sort":
        out.append((str(node.get("Sort Method")), int(node["Plans"][0]["Actual Rows"])))
    for child in node.get("Plans", []):
        out.extend(_sorts(child))
    return out


# lease_due(per_destination=) as version 2 ran it: a window over every due row, joined with the active leases
LEASE_PER_DESTINATION_V2 = (
    "WITH busy AS (SELECT destination, count(*) AS n FROM pg_messages WHERE state = 'active' "
    "GROUP BY destination), "
    "due AS (SELECT m.id, m.next_attempt, coalesce(b.n, 0) + row_number() OVER "
    "(PARTITION BY m.destination ORDER BY m.next_attempt, m.id) AS k FROM pg_messages m "
    "LEFT JOIN busy b ON b.destination = m.destination "
    "WHERE m.state IN ('incoming', 'deferred') AND m.next_attempt <= %(now)s), "
    "pick AS (SELECT id FROM due WHERE k <= %(per)s ORDER BY next_attempt, id LIMIT %(limit)s) "
    "UPDATE pg_messages SET state = 'active', lease_owner = %(owner)s, lease_until = %(until)s, "
    "lease_token = nextval('pg_lease_tokens') WHERE id IN (SELECT id FROM pick) "
    "AND state IN ('incoming', 'deferred') "
    "RETURNING id, envelope, lease_token, next_attempt, destination")


def test_schema_version_2_is_upgraded_to_3_and_leasing_per_destination_sorts_no_due_row(cluster: Cluster) -> None:
    """Version 3 adds queue priorities and indexes the waiting rows by (destination, priority DESC,
    next_attempt, id): ``lease_due(per_destination=)`` numbers each destination's due rows in that order
    without sorting them. On 20,000 due rows over 500
    destinations the version-2 plan sorts all of them (quicksort) at every call, under the lease lock; the
    upgraded one only keeps the top ``limit`` rows (top-N heapsort). ``postgate check`` reports version 2
    (WARN), serve's start upgrades it."""
    from postgate import config as configmod
    from postgate.check import PASS, WARN, check_queue

    dsn = empty_database(cluster, "plan")
    asyncio.run(PostgresSpool(PgSettings(dsn=dsn)).check())
    cluster.primary.psql("INSERT INTO pg_messages (id, state, envelope, next_attempt, arrival, destination) "
                         "SELECT 'm' || g, 'deferred', '\\x00', 1000 + g, g, 'd' || (g % 500) || '.test' "
                         "FROM generate_series(1, 20000) g", db="plan")
    # what a version-2 Postgate left: no priority column, no index of the waiting rows by destination
    cluster.primary.psql("ALTER TABLE pg_messages DROP COLUMN priority; DELETE FROM pg_queue_schema; "
                         "INSERT INTO pg_queue_schema VALUES (2)",
                         db="plan")
    cluster.primary.psql("VACUUM ANALYZE pg_messages", db="plan")

    def plan(query: str) -> tuple[list[tuple[str, int]], float]:
        with psycopg.connect(dsn, cursor_factory=psycopg.ClientCursor) as conn:
            cur = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + query,
                               {"now": 1e12, "per": 20, "limit": 200, "owner": "n", "until": 2e12})
            row = cur.fetchone()
            conn.rollback()                # EXPLAIN ANALYZE ran the UPDATE: nothing of it is kept
        assert row is not None
        top = row[0][0]
        return _sorts(top["Plan"]), float(top["Execution Time"])

    c = configmod.Config()
    c.queue.backend, c.queue.dsn = "postgresql", dsn
    [old] = asyncio.run(check_queue(c))
    assert old.status == WARN and "schema version 2" in old.message and "upgrades it" in old.message, old
    before, t_before = plan(LEASE_PER_DESTINATION_V2)
    assert any(method != "top-N heapsort" and rows >= 20_000 for method, rows in before), before

    async def serve_start() -> str:
        sp = PostgresSpool(PgSettings(dsn=dsn))
        await sp.check()
        await sp.close()
        return sp.found
    assert "upgraded from 2" in asyncio.run(serve_start())
    [ok] = asyncio.run(check_queue(c))
    assert ok.status == PASS and f"schema version {SCHEMA_VERSION}" in ok.message, ok
    cluster.primary.psql("VACUUM ANALYZE pg_messages", db="plan")
    after, t_after = plan(LEASE_PER_DESTINATION)
    assert all(method == "top-N heapsort" or rows <= 200 for method, rows in after), after
    print(f"\nlease_due(per_destination=20, limit=200) over 20,000 due rows: version 2 sorts {before} "
          f"({t_before:.1f} ms), version 3 {after} ({t_after:.1f} ms)")


def test_a_newer_schema_that_says_it_is_compatible_lets_an_older_node_run(cluster: Cluster) -> None:
    """Rolling upgrades: a newer Postgate records, with its schema version, the oldest version that still
    works on the database (``compatible_from``). A node meeting a newer schema goes on when that is at most
    its own version (logged: upgrade it), and refuses to start otherwise; ``postgate check`` says which."""
    from postgate.outbound.queue.pgspool import COMPATIBLE_FROM

    from postgate import config as configmod
    from postgate.check import FAIL, PASS, check_queue

    dsn = empty_database(cluster, "rolling")
    env, content = message(8)

    async def start() -> str:
        sp = PostgresSpool(PgSettings(dsn=dsn))
        await sp.check()
        await sp.enqueue(env, content)
        assert (await sp.get(env.id)) is not None
        await sp.delete(env.id)
        await sp.close()
        return sp.found
    asyncio.run(start())
    assert cluster.primary.psql("SELECT version, compatible_from FROM pg_queue_schema", db="rolling") == \
        f"{SCHEMA_VERSION}|{COMPATIBLE_FROM}"
    c = configmod.Config()
    c.queue.backend, c.queue.dsn = "postgresql", dsn
    # a next version that only added what this one does not use
    cluster.primary.psql(f"INSERT INTO pg_queue_schema VALUES ({SCHEMA_VERSION + 1}, {SCHEMA_VERSION})", db="rolling")
    assert "compatible with it" in asyncio.run(start())
    [ok] = asyncio.run(check_queue(c))
    assert ok.status == PASS and "upgrade this node" in ok.message, ok
    # one that changed what this version relies on
    cluster.primary.psql(f"INSERT INTO pg_queue_schema VALUES ({SCHEMA_VERSION + 2}, {SCHEMA_VERSION + 2})",
                         db="rolling")
    with pytest.raises(SpoolUnavailable, match="not compatible with this one"):
        asyncio.run(start())
    [bad] = asyncio.run(check_queue(c))
    assert bad.status == FAIL and "not compatible" in bad.message, bad
