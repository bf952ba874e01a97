"""A queue that outlives its server: the :class:`~postgate.outbound.queue.protocol.Spool` on PostgreSQL, with
message bodies in S3-compatible object storage (or in PostgreSQL when none is configured).

Any number of ``postgate serve`` nodes share one such queue. Each message is one row of ``pg_messages``:
its envelope (the same JSON the directory spool writes), its state, its due time and its lease. Work is
handed out with row locks that never wait (``SELECT … FOR UPDATE SKIP LOCKED``), so two nodes never lease
the same message; the lease has an expiry, after which any node takes the message back (:meth:`reclaim`)
and delivers it. Every lease sets ``lease_token`` from a sequence, a *fencing token*: a result is written only
``WHERE lease_token = <the token of the lease it was obtained under>``, so a node that lost its lease —
paused past the expiry, or partitioned away — can never overwrite what the new owner recorded; it gets
:class:`~postgate.outbound.queue.protocol.LeaseLost` instead (Kleppmann's fencing, applied to a queue).
While its attempts run, a node renews their leases (:meth:`renew`: one ``UPDATE`` for all of them, fenced
the same way), so ``lease_time`` is how long a dead node's mail waits, not a bound on an attempt.

**Destinations, shared.** Each row carries its destination (the domain of the first pending recipient).
``lease_due(…, per_destination=N)`` counts the active leases per destination and leases at most N minus
that many of each, in one statement under a transaction-scoped advisory lock, so two nodes leasing at the
same moment cannot both take the last slot. ``pg_destinations`` holds the backoff of destinations that
failed as a whole (``dead_until``, ``failures``): every node skips them, and when the backoff ends the
first node to ask claims the probe with a row-locked ``UPDATE … WHERE dead_until <= now`` that moves
``dead_until`` on; the others see the destination still backing off until the probe's result is noted.

**Acceptance and durability.** ``enqueue`` writes the body first (to the object store, key = queue id),
then commits the row; a body without a row is garbage (collected by :meth:`recover`), never a row without
its body. The commit returns only when a synchronous standby has the WAL (the server's
``synchronous_commit``/``synchronous_standby_names``): a 250 is given only after that. Three traps of
PostgreSQL's synchronous replication are handled here:

- a call that raised (the connection died at the commit) may still have committed and replicated: every
  write is idempotent — the queue id is made by the client and ``INSERT … ON CONFLICT (id) DO NOTHING`` —
  so the retried enqueue never makes a second message;
- with the synchronous standby gone, a commit waits for ever (``statement_timeout`` does not end the wait);
  cancelling it makes PostgreSQL report *success* with a WARNING although nothing reached a standby. The
  wait is bounded here (``commit_timeout``), the connection is cancelled and discarded, and such a WARNING
  is treated as a failure: :class:`SpoolError`, the client gets 451, no 250;
- a network partition hangs an open connection unless TCP keepalives and ``tcp_user_timeout`` are set:
  they are, on every connection.

Failover is the engines' business: the DSN names every server (libpq multi-host) with
``target_session_attrs=read-write``, so after the standby is promoted new connections find it. The
connection pool (psycopg 3) replaces connections that died.

Driver: psycopg 3 with psycopg_pool. It speaks through libpq, so every libpq connection parameter
(multi-host, target_session_attrs, keepalives, tcp_user_timeout) works as documented, and it reports
NOTICE/WARNING messages to a handler, which the synchronous-commit trap needs. Object store: obstore (the
Rust object_store crate), one small dependency that speaks every S3 dialect (AWS, Ceph RGW, MinIO, Garage,
SeaweedFS).
"""

from __future__ import annotations

import asyncio
import logging
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any, TypeVar

import psycopg
from postgate.outbound.queue.envelope import Envelope, EnvelopeError
from postgate.outbound.queue.protocol import (
    WAITING,
    Entry,
    Lease,
    LeaseLost,
    Spool,
    SpoolError,
    SpoolUnavailable,
    State,
    Summary,
    destination_of,
)
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import tuple_row
from psycopg_pool import AsyncConnectionPool

log = logging.getLogger("postgate.queue")

SCHEMA_VERSION = 3

# advisory lock keys (pg_advisory_xact_lock): schema creation/upgrade, and handing out leases with a
# per-destination limit (one node at a time counts and leases, so the limit holds across nodes)
LOCK_SCHEMA = 0x70670001
LOCK_LEASES = 0x70670002

# version 2: shared destination state. Leases counted per destination (an index on the active ones), and
# the backoff of destinations that failed as a whole, seen by every node.
V2 = [
    """ALTER TABLE pg_messages ADD COLUMN IF NOT EXISTS destination text NOT NULL DEFAULT ''""",
    """CREATE INDEX IF NOT EXISTS pg_messages_active_dest ON pg_messages (destination) WHERE state = 'active'""",
    """CREATE TABLE IF NOT EXISTS pg_destinations (
        destination  text PRIMARY KEY,
        dead_until   double precision NOT NULL,   -- leave it alone until then; a probe's claim moves it on
        failures     integer NOT NULL DEFAULT 0   -- destination-wide failures in a row
    )""",
]

# version 3: queue priorities, and per-destination leasing without sorting every due row. Each row has the
# priority a filter gave its message (Sieve queue_priority, 0 … 9, default 5): due messages are handed out
# highest priority first. lease_due(per_destination=N) numbers the due rows of each destination in that
# order (a window function); with this index the rows come in that order already (an index-only scan),
# where version 2 sorted them all at every call, under the lease lock (EXPLAIN ANALYZE, 20,000 due rows
# over 500 destinations: a 20,000-row quicksort, 42 ms; then 9 ms and only the top-N sort of the rows
# handed out; tests/test_pgqueue.py checks the plan).
V3 = [
    """ALTER TABLE pg_messages ADD COLUMN IF NOT EXISTS priority smallint NOT NULL DEFAULT 5""",
    """CREATE INDEX IF NOT EXISTS pg_messages_due_dest ON pg_messages (destination, priority DESC, next_attempt, id)
        WHERE state IN ('incoming', 'deferred')""",
]

# Rolling upgrades: each row of pg_queue_schema may say which is the oldest Postgate schema version that can
# still work on the database as that version left it (``compatible_from``). A node meets a newer schema
# than its own: when the newest row's compatible_from is at most its own version, the newer schema only
# added what it does not use (a column with a default, an index) and it goes on (logging that it should be
# upgraded); else it refuses to start. So a cluster is upgraded node by node whenever a release keeps the
# schema compatible, and every later schema change says whether it does. Nodes from before this column
# read only max(version): it is invisible to them.
COMPAT = """ALTER TABLE pg_queue_schema ADD COLUMN IF NOT EXISTS compatible_from integer"""
COMPATIBLE_FROM = 3    # a node of version 3 works on what this version writes (version 2 nodes refuse it)

SCHEMA = [
    """CREATE TABLE IF NOT EXISTS pg_queue_schema (version integer NOT NULL, compatible_from integer)""",
    """CREATE TABLE IF NOT EXISTS pg_messages (
        id            text PRIMARY KEY,
        state         text NOT NULL,
        envelope      bytea NOT NULL,
        next_attempt  double precision NOT NULL,
        arrival       double precision NOT NULL,
        lease_owner   text,
        lease_until   double precision,
        lease_token   bigint NOT NULL DEFAULT 0,
        body          bytea,            -- NULL: the body is in the object store under key = id
        why           text,
        destination   text NOT NULL DEFAULT '',  -- domain of the first pending recipient (version 2)
        priority      smallint NOT NULL DEFAULT 5 -- 0 … 9, leased highest first (version 3)
    )""",
    """CREATE INDEX IF NOT EXISTS pg_messages_due ON pg_messages (next_attempt)
        WHERE state IN ('incoming', 'deferred')""",
    """CREATE INDEX IF NOT EXISTS pg_messages_leases ON pg_messages (lease_until) WHERE state = 'active'""",
    # fencing tokens: one sequence, so a token names one lease of one message, never reused
    """CREATE SEQUENCE IF NOT EXISTS pg_lease_tokens""",
    """CREATE TABLE IF NOT EXISTS pg_requests (
        n       bigserial PRIMARY KEY,
        action  text NOT NULL,
        arg     text NOT NULL DEFAULT ''
    )""",
    *V2,
    *V3,
]

# lease_due(per_destination=N): N minus the active leases of each destination, at most, highest priority
# first, then in due order. The due
# rows are numbered per destination straight from pg_messages_due_dest (in that order already: no sort of
# every due row, version 3); the active leases are joined afterwards. A window function cannot go with FOR
# UPDATE: the outer UPDATE re-checks the state of each row it takes instead (an operator's hold/delete).
LEASE_PER_DESTINATION = (
    "WITH busy AS (SELECT destination, count(*) AS n FROM pg_messages WHERE state = 'active' "
    "GROUP BY destination), "
    "due AS (SELECT id, priority, next_attempt, destination, row_number() OVER "
    "(PARTITION BY destination ORDER BY priority DESC, next_attempt, id) AS k FROM pg_messages "
    "WHERE state IN ('incoming', 'deferred') AND next_attempt <= %(now)s), "
    "pick AS (SELECT d.id FROM due d LEFT JOIN busy b ON b.destination = d.destination "
    "WHERE d.k + coalesce(b.n, 0) <= %(per)s ORDER BY d.priority DESC, d.next_attempt, d.id LIMIT %(limit)s) "
    "UPDATE pg_messages SET state = 'active', lease_owner = %(owner)s, lease_until = %(until)s, "
    "lease_token = nextval('pg_lease_tokens') WHERE id IN (SELECT id FROM pick) "
    "AND state IN ('incoming', 'deferred') "
    "RETURNING id, envelope, lease_token, next_attempt, destination, priority")

T = TypeVar("T")

# libpq's WARNING when a wait for synchronous replication was cancelled: committed locally only
_NOT_REPLICATED = "might not have been replicated"


def _envelope(data: bytes, next_attempt: float) -> Envelope:
    """The stored envelope with its due time from the row (operator actions change only the column)."""
    env = Envelope.from_bytes(data)
    env.next_attempt = next_attempt
    return env


class ObjectStore:
    """Message bodies in S3-compatible storage. URL form (configuration ``[queue] object_store``)::

        s3://BUCKET[/PREFIX]?endpoint=https://s3.example:9000&region=us-east-1[&allow_http=true]

    Credentials from ``access_key``/``secret_key`` (configuration) or the usual AWS environment variables.
    """

    def __init__(self, url: str, access_key: str | None = None, secret_key: str | None = None,
                 timeout: float = 10.0) -> None:
        from obstore.store import S3Store

        u = urllib.parse.urlsplit(url)
        if u.scheme != "s3" or not u.netloc:
            raise ValueError(f"object store URL must be s3://bucket[/prefix]?endpoint=…: {url!r}")
        q = dict(urllib.parse.parse_qsl(u.query))
        self.prefix = u.path.strip("/")
        kw: dict[str, Any] = {"region": q.get("region", "us-east-1")}
        if "endpoint" in q:
            kw["endpoint"] = q["endpoint"]
            kw["virtual_hosted_style_request"] = False
        if access_key:
            kw["access_key_id"] = access_key
        if secret_key:
            kw["secret_access_key"] = secret_key
        self.timeout = timeout
        self.store = S3Store(u.netloc, client_options={"allow_http": q.get("allow_http") == "true",
                                                       "timeout": f"{int(timeout)}s",
                                                       "connect_timeout": "3s"},
                             retry_config={"max_retries": 1,
                                           "backoff": {"init_backoff": timedelta(milliseconds=100),
                                                       "max_backoff": timedelta(seconds=1), "base": 2},
                                           "retry_timeout": timedelta(seconds=max(timeout, 1.0))}, **kw)

    def key(self, qid: str) -> str:
        return f"{self.prefix}/{qid}" if self.prefix else qid

    async def put(self, qid: str, data: bytes) -> None:
        import obstore
        await asyncio.wait_for(obstore.put_async(self.store, self.key(qid), data), self.timeout)

    async def get(self, qid: str) -> bytes:
        import obstore
        res = await asyncio.wait_for(obstore.get_async(self.store, self.key(qid)), self.timeout)
        return bytes(await res.bytes_async())

    async def delete(self, qid: str) -> None:
        import obstore
        await asyncio.wait_for(obstore.delete_async(self.store, self.key(qid)), self.timeout)

    async def keys(self) -> list[tuple[str, float]]:
        """Every stored body: (queue id, last-modified epoch seconds)."""
        import obstore
        out: list[tuple[str, float]] = []
        stream = obstore.list(self.store, prefix=self.prefix or None)
        async for batch in stream:
            for meta in batch:
                path = str(meta["path"])
                out.append((path.rsplit("/", 1)[-1], meta["last_modified"].timestamp()))
        return out


@dataclass
class PgSettings:
    dsn: str
    commit_timeout: float = 10.0         # bound on one write, incl. the wait for the synchronous standby
    connect_timeout: float = 5.0
    pool_size: int = 8
    object_store: str | None = None
    access_key: str | None = None
    secret_key: str | None = None
    orphan_age: float = 3600.0           # bodies without a row older than this are removed by recover()
    # a partition must not hang a connection (libpq parameters; a value in the DSN wins): unacknowledged
    # data for tcp_user_timeout ends a busy connection, keepalive probes an idle one
    tcp_user_timeout: float = 10.0       # seconds; 0: the kernel's default (about 15 minutes of retries)
    keepalives_idle: int = 5
    keepalives_interval: int = 2
    keepalives_count: int = 3

    @classmethod
    def from_config(cls, q: Any) -> PgSettings:
        """From the ``[queue]`` section (``postgate.config.QueueSettings``, docs/configuration.md)."""
        return cls(dsn=q.dsn, commit_timeout=q.commit_timeout, connect_timeout=q.connect_timeout,
                   object_store=q.object_store or None, access_key=q.object_store_access_key or None,
                   secret_key=q.object_store_secret_key or None, tcp_user_timeout=q.tcp_user_timeout,
                   keepalives_idle=q.keepalives_idle, keepalives_interval=q.keepalives_interval,
                   keepalives_count=q.keepalives_count)


class PostgresSpool:
    """The shared queue. Every node may run the queue (``try_lock`` is always True)."""

    shared = True

    def __init__(self, settings: PgSettings) -> None:
        self.settings = settings
        self.store = ObjectStore(settings.object_store, settings.access_key, settings.secret_key) \
            if settings.object_store else None
        self.pool: AsyncConnectionPool | None = None
        self.found = ""                   # what check() found, for postgate check
        self._lock = asyncio.Lock()

    # --- connections ---------------------------------------------------------------------------------------
    def _conninfo(self) -> dict[str, Any]:
        """libpq parameters added to the DSN's (those the DSN names win). A partition must not hang a
        connection: with ``tcp_user_timeout`` (Linux TCP_USER_TIMEOUT, RFC 5482) a connection whose sent
        data stays unacknowledged that long is closed by the kernel, and keepalive probes find an idle one
        dead (libpq, PostgreSQL 12+); ``connect_timeout`` bounds each host of a multi-host DSN."""
        st = self.settings
        want: dict[str, Any] = {"keepalives": 1, "keepalives_idle": st.keepalives_idle,
                                "keepalives_interval": st.keepalives_interval,
                                "keepalives_count": st.keepalives_count,
                                "tcp_user_timeout": int(st.tcp_user_timeout * 1000),
                                "connect_timeout": max(1, int(st.connect_timeout)),
                                "application_name": "postgate"}
        try:
            named = conninfo_to_dict(st.dsn)
        except psycopg.ProgrammingError:
            named = {}
        return {k: v for k, v in want.items() if k not in named}

    async def _pool(self) -> AsyncConnectionPool:
        async with self._lock:
            if self.pool is None:
                pool = AsyncConnectionPool(self.settings.dsn, min_size=1, max_size=self.settings.pool_size,
                                           kwargs=self._conninfo(), open=False, timeout=self.settings.connect_timeout,
                                           check=AsyncConnectionPool.check_connection, reconnect_timeout=3600,
                                           configure=self._configure)
                await pool.open(wait=False)
                self.pool = pool
            return self.pool

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        """Every pooled session: a transaction whose client vanished (a partition cut it off after a
        statement, before the commit) is ended by the server after ``2 × commit_timeout``, releasing its
        locks — the lease lock above all, which every node's ``lease_due`` waits for — instead of holding
        them until the server's TCP keepalive gives up (two hours by default)."""
        ms = int(2 * self.settings.commit_timeout * 1000)
        await conn.execute(f"SET idle_in_transaction_session_timeout = {ms}")
        await conn.commit()

    async def _tx(self, fn: Callable[[psycopg.AsyncCursor[Any]], Awaitable[T]], *, write: bool = True) -> T:
        """Run ``fn`` in one transaction, bounded by ``commit_timeout``; a commit that PostgreSQL reports
        as not replicated (cancelled synchronous wait) is a failure."""
        pool = await self._pool()
        warnings: list[str] = []
        try:
            conn = await pool.getconn(timeout=self.settings.connect_timeout)
        except Exception as e:
            raise SpoolError(f"PostgreSQL unreachable: {e}") from e
        ok = False

        def notice(diag: psycopg.errors.Diagnostic) -> None:
            warnings.append(f"{diag.severity}: {diag.message_primary}")

        conn.add_notice_handler(notice)
        try:
            async def run() -> T:
                async with conn.cursor(row_factory=tuple_row) as cur:
                    res = await fn(cur)
                await conn.commit()
                return res
            try:
                res = await asyncio.wait_for(run(), self.settings.commit_timeout)
            except TimeoutError as e:
                # the wait for a synchronous standby cannot be ended by statement_timeout: end it here
                try:
                    await conn.cancel_safe(timeout=2.0)
                except Exception:
                    pass
                raise SpoolError(f"PostgreSQL write not confirmed within {self.settings.commit_timeout:g}s "
                                 "(synchronous standby unreachable?)") from e
            if write and any(_NOT_REPLICATED in w for w in warnings):
                raise SpoolError("PostgreSQL committed locally but not on a synchronous standby: " +
                                 "; ".join(warnings))
            ok = True
            return res
        except psycopg.Error as e:
            raise SpoolError(f"PostgreSQL: {str(e).strip() or type(e).__name__}") from e
        finally:
            conn.remove_notice_handler(notice)
            if ok:
                await pool.putconn(conn)
            else:
                # a connection that failed or timed out in a transaction is not given back for reuse
                try:
                    await conn.close()
                except Exception:
                    pass
                await pool.putconn(conn)

    # --- ownership and start-up -----------------------------------------------------------------------------
    async def check(self, create: bool = True) -> None:
        """Reach, schema version, a writable primary and the object store. ``create``: make the schema if
        the database has none (``serve``); ``postgate check`` only reports. What was found: ``self.found``."""
        found = ""
        try:
            conn = await asyncio.wait_for(psycopg.AsyncConnection.connect(self.settings.dsn, **self._conninfo()),
                                          self.settings.connect_timeout + 1)
        except (psycopg.Error, OSError, TimeoutError) as e:
            raise SpoolUnavailable(f"[queue] dsn: cannot reach PostgreSQL: {str(e).strip() or 'timeout'}") from e
        try:
            async with conn.cursor() as cur:
                if create:   # nodes starting together: one creates or upgrades, the others wait and see it
                    await cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_SCHEMA,))
                await cur.execute("SELECT to_regclass('pg_queue_schema')")
                row = await cur.fetchone()
                if row is None or row[0] is None:
                    if not create:
                        raise SpoolUnavailable("[queue] dsn: the database has no Postgate queue schema yet "
                                               "(postgate serve creates it)")
                    for stmt in SCHEMA:
                        await cur.execute(stmt)
                    await cur.execute("INSERT INTO pg_queue_schema (version, compatible_from) VALUES (%s, %s)",
                                      (SCHEMA_VERSION, COMPATIBLE_FROM))
                    await conn.commit()
                    log.info("queue: created schema version %d", SCHEMA_VERSION)
                    found = f"schema version {SCHEMA_VERSION} created"
                else:
                    await cur.execute("SELECT pg_is_in_recovery()")
                    row = await cur.fetchone()
                    if create and not (row and row[0]):   # a standby is refused below, untouched
                        await cur.execute(COMPAT)
                    await cur.execute("SELECT max(version) FROM pg_queue_schema")
                    row = await cur.fetchone()
                    version = row[0] if row else None
                    compatible = await self._compatible_from(cur, version)
                    if version in (1, 2) and create:
                        if version == 1:
                            await self._upgrade_to_2(cur)
                        await self._upgrade_to_3(cur)
                        await conn.commit()
                        log.info("queue: schema upgraded from version %d to %d", version, SCHEMA_VERSION)
                        found = f"schema version {SCHEMA_VERSION} (upgraded from {version})"
                    elif isinstance(version, int) and version > SCHEMA_VERSION and compatible is not None \
                            and compatible <= SCHEMA_VERSION:
                        # a rolling upgrade: a newer node made it, and said this version still works on it
                        log.warning("queue: schema version %d (a newer Postgate made it, compatible from version "
                                    "%d): this node (version %d) goes on; upgrade it", version, compatible,
                                    SCHEMA_VERSION)
                        found = (f"schema version {version}, newer than this Postgate's {SCHEMA_VERSION} and "
                                 f"compatible with it (upgrade this node)")
                    elif version != SCHEMA_VERSION:
                        hint = " (postgate serve upgrades it at its start)" if version in (1, 2) else \
                            " (a newer Postgate made it, not compatible with this one: upgrade this node)"
                        raise SpoolUnavailable(f"[queue] dsn: schema version {version}, this Postgate needs "
                                               f"{SCHEMA_VERSION}{hint}")
                    else:
                        found = f"schema version {version}"
                    await conn.commit()   # the compatible_from column, if it was added now
                await cur.execute("SELECT pg_is_in_recovery()")
                row = await cur.fetchone()
                if row and row[0]:
                    raise SpoolUnavailable("[queue] dsn: the server is a read-only standby "
                                           "(add target_session_attrs=read-write and the primary to the DSN)")
        except psycopg.Error as e:
            raise SpoolUnavailable(f"[queue] dsn: {str(e).strip()}") from e
        finally:
            await conn.close()
        if self.store is not None:
            probe = "postgate-probe"
            try:
                await self.store.put(probe, b"probe")
                await self.store.delete(probe)
            except Exception as e:
                raise SpoolUnavailable(f"[queue] object_store: cannot write: {e}") from e
        self.found = found + (", object store writable" if self.store is not None else ", bodies in PostgreSQL")

    @staticmethod
    async def _upgrade_to_2(cur: psycopg.AsyncCursor[Any]) -> None:
        """Version 1 -> 2, in the caller's transaction: the destination column (filled from each stored
        envelope) and the shared destination table. Upgrade every node: a version-1 node refuses to start."""
        for stmt in V2:
            await cur.execute(stmt)
        await cur.execute("SELECT id, envelope FROM pg_messages WHERE destination = ''")
        fill = []
        for qid, data in await cur.fetchall():
            try:
                fill.append((destination_of(Envelope.from_bytes(bytes(data))), qid))
            except EnvelopeError:
                continue                  # unreadable: quarantined when leased, counted under ""
        if fill:
            await cur.executemany("UPDATE pg_messages SET destination = %s WHERE id = %s", fill)
        await cur.execute("INSERT INTO pg_queue_schema (version) VALUES (2)")

    @staticmethod
    async def _compatible_from(cur: psycopg.AsyncCursor[Any], version: object) -> int | None:
        """What the newest schema row says about older nodes (None: nothing, or no such column yet)."""
        await cur.execute("SELECT count(*) FROM information_schema.columns WHERE table_name = 'pg_queue_schema' "
                          "AND column_name = 'compatible_from' AND table_schema = current_schema()")
        row = await cur.fetchone()
        if not row or not row[0] or not isinstance(version, int):
            return None
        await cur.execute("SELECT max(compatible_from) FROM pg_queue_schema WHERE version = %s", (version,))
        row = await cur.fetchone()
        return row[0] if row and isinstance(row[0], int) else None

    @staticmethod
    async def _upgrade_to_3(cur: psycopg.AsyncCursor[Any]) -> None:
        """Version 2 -> 3, in the caller's transaction: the priority column (every queued message gets the
        default, as its stored envelope reads) and the index of waiting rows by destination, priority and due
        time (built in the upgrade's transaction: writers wait for it)."""
        for stmt in V3:
            await cur.execute(stmt)
        await cur.execute(COMPAT)
        await cur.execute("INSERT INTO pg_queue_schema (version, compatible_from) VALUES (3, %s)", (COMPATIBLE_FROM,))

    async def try_lock(self) -> bool:
        return True     # a shared queue: every node runs it; leases keep them apart

    async def unlock(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def close(self) -> None:
        await self.unlock()

    async def recover(self) -> list[str]:
        """At start: expired leases back to deferred, and bodies in the object store that no row names
        (a crash between the body's upload and the row's commit) removed once they are old enough."""
        out = [f"{qid}: lease expired, taken back" for qid in await self.reclaim(time.time())]
        if self.store is not None:
            try:
                stored = await self.store.keys()
            except Exception as e:
                return [*out, f"object store not listed: {e}"]
            old = [k for k, mtime in stored if time.time() - mtime > self.settings.orphan_age]
            if old:
                async def known(cur: psycopg.AsyncCursor[Any]) -> set[str]:
                    await cur.execute("SELECT id FROM pg_messages WHERE id = ANY(%s)", (old,))
                    return {r[0] for r in await cur.fetchall()}
                have = await self._tx(known, write=False)
                for k in old:
                    if k not in have and k != "postgate-probe":
                        await self.store.delete(k)
                        out.append(f"{k}: body without envelope removed")
        return out

    # --- acceptance ------------------------------------------------------------------------------------------
    async def enqueue(self, env: Envelope, content: bytes, *, hold: bool = False) -> str:
        env.seal(content)
        if self.store is not None:
            try:
                await self.store.put(env.id, content)       # the body first …
            except Exception as e:
                raise SpoolError(f"{env.id}: object store: {e}") from e
        body = None if self.store is not None else content

        async def insert(cur: psycopg.AsyncCursor[Any]) -> None:
            # … then the row; idempotent, so a retry after an ambiguous failure makes no second message
            await cur.execute(
                "INSERT INTO pg_messages (id, state, envelope, next_attempt, arrival, body, destination, priority) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (env.id, "hold" if hold else "incoming", env.to_bytes(), env.next_attempt, env.arrival, body,
                 destination_of(env), env.priority))

        last: SpoolError | None = None
        for _ in range(2):
            try:
                await self._tx(insert)
                return env.id
            except SpoolError as e:
                last = e
                if "not on a synchronous standby" in str(e) or "not confirmed" in str(e):
                    break    # the standby is away: retrying only waits again
        assert last is not None
        raise last

    # --- delivery -------------------------------------------------------------------------------------------
    async def lease_fresh(self, now: float, owner: str, duration: float, limit: int,
                          per_destination: int = 0) -> list[tuple[Lease, Envelope]]:
        # new mail is a row like any other: one indexed statement finds it (and what other nodes queued)
        return await self.lease_due(now, owner, duration, limit, per_destination)

    def hand_over(self, owner: str | None, duration: float = 0.0) -> None:
        pass   # every node leases from the table

    async def lease_due(self, now: float, owner: str, duration: float, limit: int,
                        per_destination: int = 0) -> list[tuple[Lease, Envelope]]:
        async def lease(cur: psycopg.AsyncCursor[Any]) -> list[tuple[str, bytes, int, float, str, int]]:
            if per_destination <= 0:
                # (the runner of a shared spool always passes per_destination: this is for tools and tests)
                await cur.execute(
                    "UPDATE pg_messages SET state = 'active', lease_owner = %s, lease_until = %s, "
                    "lease_token = nextval('pg_lease_tokens') WHERE id IN (SELECT id FROM pg_messages "
                    "WHERE state IN ('incoming', 'deferred') AND next_attempt <= %s "
                    "ORDER BY priority DESC, next_attempt LIMIT %s FOR UPDATE SKIP LOCKED) "
                    "RETURNING id, envelope, lease_token, next_attempt, destination, priority",
                    (owner, now + duration, now, limit))
            else:
                # one node at a time counts the active leases per destination and leases at most
                # per_destination minus that many of each, so the bound holds across nodes; the lock is
                # held for one statement and its commit. A window function cannot go with FOR UPDATE: the
                # outer UPDATE re-checks the state of each row it takes instead (an operator's hold/delete).
                await cur.execute("SELECT pg_advisory_xact_lock(%s)", (LOCK_LEASES,))
                await cur.execute(
                    LEASE_PER_DESTINATION,
                    {"now": now, "per": per_destination, "limit": limit, "owner": owner, "until": now + duration})
            return [(r[0], bytes(r[1]), r[2], r[3], r[4], r[5]) for r in await cur.fetchall()]

        out: list[tuple[Lease, Envelope]] = []
        for qid, data, token, due, dest, _ in sorted(await self._tx(lease), key=lambda r: (-r[5], r[3], r[0])):
            try:
                env = _envelope(data, due)
            except EnvelopeError as e:
                await self.quarantine(qid, State.ACTIVE, str(e))
                continue
            out.append((Lease(qid, owner, now + duration, token, dest), env))
        return out

    async def renew(self, leases: Sequence[Lease], now: float, duration: float) -> list[Lease]:
        """One statement for every lease given (a node renews all of its attempts under way at once), fenced
        like a result: only a row still ``active`` under the lease's token and owner is extended; a row
        taken back, leased again, deleted or quarantined is not in the answer."""
        if not leases:
            return []

        async def run(cur: psycopg.AsyncCursor[Any]) -> dict[tuple[str, int], float]:
            await cur.execute(
                "UPDATE pg_messages m SET lease_until = greatest(m.lease_until, %s) "
                "FROM unnest(%s::text[], %s::bigint[], %s::text[]) AS k(id, token, owner) "
                "WHERE m.id = k.id AND m.lease_token = k.token AND m.lease_owner = k.owner AND m.state = 'active' "
                "RETURNING m.id, m.lease_token, m.lease_until",
                (now + duration, [x.id for x in leases], [x.token for x in leases], [x.owner for x in leases]))
            return {(r[0], r[1]): r[2] for r in await cur.fetchall()}
        kept = await self._tx(run)
        return [replace(x, until=kept[(x.id, x.token)]) for x in leases if (x.id, x.token) in kept]

    async def content(self, qid: str) -> bytes:
        async def body(cur: psycopg.AsyncCursor[Any]) -> bytes | None:
            await cur.execute("SELECT body FROM pg_messages WHERE id = %s", (qid,))
            row = await cur.fetchone()
            if row is None:
                raise SpoolError(f"{qid}: not queued")
            return bytes(row[0]) if row[0] is not None else None
        data = await self._tx(body, write=False)
        if data is not None:
            return data
        if self.store is None:
            raise SpoolError(f"{qid}: body in an object store, but none is configured")
        try:
            return await self.store.get(qid)
        except Exception as e:
            raise SpoolError(f"{qid}: object store: {e}") from e

    async def checked_content(self, env: Envelope) -> bytes:
        content = await self.content(env.id)
        env.check_content(content)   # read back from PostgreSQL or the object store: always checked
        return content

    async def _fenced(self, lease: Lease, sql: str, args: tuple[Any, ...]) -> None:
        async def run(cur: psycopg.AsyncCursor[Any]) -> int:
            await cur.execute(sql + " WHERE id = %s AND state = 'active' AND lease_token = %s AND lease_owner = %s",
                              (*args, lease.id, lease.token, lease.owner))
            return cur.rowcount
        if await self._tx(run) != 1:
            raise LeaseLost(f"{lease.id}: lease {lease.token} of {lease.owner} was taken back")

    async def record(self, lease: Lease, env: Envelope) -> None:
        await self._fenced(lease, "UPDATE pg_messages SET envelope = %s, destination = %s",
                           (env.to_bytes(), destination_of(env)))

    async def release(self, lease: Lease, env: Envelope) -> None:
        await self._fenced(lease, "UPDATE pg_messages SET state = 'deferred', envelope = %s, next_attempt = %s, "
                                  "lease_owner = NULL, lease_until = NULL, destination = %s",
                           (env.to_bytes(), env.next_attempt, destination_of(env)))

    async def finish(self, lease: Lease) -> None:
        async def run(cur: psycopg.AsyncCursor[Any]) -> int:
            await cur.execute("DELETE FROM pg_messages WHERE id = %s AND state = 'active' AND lease_token = %s "
                              "AND lease_owner = %s", (lease.id, lease.token, lease.owner))
            return cur.rowcount
        if await self._tx(run) != 1:
            raise LeaseLost(f"{lease.id}: lease {lease.token} of {lease.owner} was taken back")
        await self._drop_body(lease.id)

    async def _drop_body(self, qid: str) -> None:
        if self.store is not None:
            try:
                await self.store.delete(qid)
            except Exception as e:
                log.warning("%s: body not removed from the object store: %s", qid, e)

    async def reclaim(self, now: float) -> list[str]:
        async def run(cur: psycopg.AsyncCursor[Any]) -> list[str]:
            await cur.execute("UPDATE pg_messages SET state = 'deferred', lease_owner = NULL, lease_until = NULL "
                              "WHERE state = 'active' AND lease_until <= %s RETURNING id", (now,))
            return [r[0] for r in await cur.fetchall()]
        return await self._tx(run)

    async def quarantine(self, qid: str, state: State, why: str) -> None:
        async def run(cur: psycopg.AsyncCursor[Any]) -> None:
            await cur.execute("UPDATE pg_messages SET state = 'corrupt', why = %s, lease_owner = NULL "
                              "WHERE id = %s", (why, qid))
        await self._tx(run)
        log.warning("%s: status=corrupt (%s)", qid, why)

    # --- destinations, shared by every node ------------------------------------------------------------------
    async def backing_off(self, dests: Sequence[str], now: float, probe_for: float) -> dict[str, float]:
        if not dests:
            return {}

        async def run(cur: psycopg.AsyncCursor[Any]) -> dict[str, float]:
            # the claim of a probe: the row lock makes a concurrent caller wait for this commit, then its
            # re-check (dead_until <= now) fails and it sees the destination backing off
            await cur.execute("UPDATE pg_destinations SET dead_until = %s WHERE destination = ANY(%s) "
                              "AND dead_until <= %s RETURNING destination", (now + probe_for, list(dests), now))
            claimed = {r[0] for r in await cur.fetchall()}
            await cur.execute("SELECT destination, dead_until FROM pg_destinations WHERE destination = ANY(%s) "
                              "AND dead_until > %s", (list(dests), now))
            return {d: until for d, until in await cur.fetchall() if d not in claimed}
        return await self._tx(run)

    async def note_destination(self, dest: str, until: float | None) -> None:
        async def run(cur: psycopg.AsyncCursor[Any]) -> None:
            if until is None:
                await cur.execute("DELETE FROM pg_destinations WHERE destination = %s", (dest,))
            else:
                await cur.execute("INSERT INTO pg_destinations (destination, dead_until, failures) VALUES (%s, %s, 1) "
                                  "ON CONFLICT (destination) DO UPDATE SET dead_until = EXCLUDED.dead_until, "
                                  "failures = pg_destinations.failures + 1", (dest, until))
        await self._tx(run)

    async def forget_destinations(self, dest: str | None = None) -> None:
        if dest is None:
            await self._one("DELETE FROM pg_destinations", ())
        else:
            await self._one("DELETE FROM pg_destinations WHERE destination = %s", (dest,))

    # --- reading -------------------------------------------------------------------------------------------
    async def get(self, qid: str) -> tuple[State, Envelope] | None:
        async def run(cur: psycopg.AsyncCursor[Any]) -> tuple[str, bytes, float] | None:
            await cur.execute("SELECT state, envelope, next_attempt FROM pg_messages WHERE id = %s", (qid,))
            row = await cur.fetchone()
            return (row[0], bytes(row[1]), row[2]) if row else None
        row = await self._tx(run, write=False)
        if row is None:
            return None
        try:
            return State(row[0]), _envelope(row[1], row[2])
        except EnvelopeError:
            return None

    async def entries(self) -> list[Entry]:
        async def run(cur: psycopg.AsyncCursor[Any]) -> list[tuple[Any, ...]]:
            await cur.execute("SELECT state, id, envelope, lease_owner, lease_until, lease_token, next_attempt, "
                              "destination FROM pg_messages ORDER BY arrival, id")
            return list(await cur.fetchall())
        out = []
        for state, qid, data, owner, until, token, due, dest in await self._tx(run, write=False):
            try:
                env: Envelope | None = _envelope(bytes(data), due)
            except EnvelopeError:
                env = None
            lease = Lease(qid, owner, until, token, dest) if state == State.ACTIVE and owner else None
            out.append(Entry(State(state), qid, env, lease))
        return out

    async def summary(self) -> Summary:
        async def run(cur: psycopg.AsyncCursor[Any]) -> list[tuple[Any, ...]]:
            await cur.execute("SELECT state, count(*), min(arrival) FROM pg_messages GROUP BY state")
            return list(await cur.fetchall())
        rows = await self._tx(run, write=False)
        arrivals = [r[2] for r in rows if r[2] is not None]
        return Summary({State(r[0]): int(r[1]) for r in rows}, min(arrivals) if arrivals else None)

    # --- changes by an operator or a late pre-queue result ----------------------------------------------------
    async def _one(self, sql: str, args: tuple[Any, ...]) -> bool:
        async def run(cur: psycopg.AsyncCursor[Any]) -> int:
            await cur.execute(sql, args)
            return cur.rowcount
        return await self._tx(run) == 1

    async def update(self, qid: str, state: State, env: Envelope) -> bool:
        return await self._one("UPDATE pg_messages SET envelope = %s, next_attempt = %s, destination = %s, "
                               "priority = %s WHERE id = %s AND state = %s",
                               (env.to_bytes(), env.next_attempt, destination_of(env), env.priority, qid,
                                str(state)))

    async def delete(self, qid: str, state: State | None = None) -> bool:
        if state is None:
            done = await self._one("DELETE FROM pg_messages WHERE id = %s", (qid,))
        else:
            done = await self._one("DELETE FROM pg_messages WHERE id = %s AND state = %s", (qid, str(state)))
        if done:
            await self._drop_body(qid)
        return done

    async def hold(self, qid: str) -> bool:
        return await self._one("UPDATE pg_messages SET state = 'hold' WHERE id = %s AND state IN "
                               "('incoming', 'deferred')", (qid,))

    async def release_hold(self, qid: str, now: float) -> bool:
        return await self._one("UPDATE pg_messages SET state = 'deferred', next_attempt = %s WHERE id = %s "
                               "AND state = 'hold'", (now, qid))

    async def reschedule(self, qid: str, when: float) -> bool:
        return await self._one("UPDATE pg_messages SET next_attempt = %s WHERE id = %s AND state = ANY(%s)",
                               (when, qid, [str(s) for s in WAITING]))

    async def request(self, action: str, arg: str = "") -> None:
        await self._one("INSERT INTO pg_requests (action, arg) VALUES (%s, %s)", (action, arg))

    async def take_requests(self) -> list[tuple[str, str]]:
        async def run(cur: psycopg.AsyncCursor[Any]) -> list[tuple[str, str]]:
            await cur.execute("DELETE FROM pg_requests WHERE n IN (SELECT n FROM pg_requests ORDER BY n "
                              "FOR UPDATE SKIP LOCKED LIMIT 100) RETURNING action, arg")
            return [(r[0], r[1]) for r in await cur.fetchall()]
        return await self._tx(run)


def _conforms(s: PostgresSpool) -> Spool:  # mypy checks that PostgresSpool implements every method
    return s
