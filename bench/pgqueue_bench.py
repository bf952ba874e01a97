"""Durable enqueue rate of the shared queue (PostgreSQL with a synchronous standby; bodies in PostgreSQL or
in S3), and how long a dead node's message waits before another node delivers it.

Run: ``scripts/bench pgqueue`` (inside the test namespace; rewrites the pgqueue section of bench/README.md).
Every enqueue is acknowledged only after the synchronous standby confirmed the commit — what must happen
before an SMTP server may answer 250. Several runs per row; the table gives the median and the spread.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.pgspool import PgSettings, PostgresSpool

from bench.report import identity, write_section
from fixtures.postgres import Cluster
from fixtures.s3 import ACCESS_KEY, SECRET_KEY, SeaweedS3

RUNS = 3


async def rate(spool: PostgresSpool, writers: int, n: int, size: int) -> float:
    content = (b"Subject: bench\r\n\r\n" + b"x" * 76 + b"\r\n") * (size // 78)
    sem = asyncio.Semaphore(writers)

    async def one() -> None:
        async with sem:
            await spool.enqueue(Envelope.new("a@bench.test", [Recipient("b@bench.test")], content), content)

    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    return n / (time.perf_counter() - t0)


async def takeover(spool: PostgresSpool, lease: float) -> float:
    """A node leases a message and dies; another polls once a second (the scheduler tick) and takes it."""
    content = b"Subject: t\r\n\r\nt\r\n"
    env = Envelope.new("a@bench.test", [Recipient("b@bench.test")], content)
    await spool.enqueue(env, content)
    await spool.lease_due(time.time(), "dead", lease, 1000)
    t0 = time.time()
    while True:
        await spool.reclaim(time.time())
        got = await spool.lease_due(time.time(), "alive", 60, 1000)
        if any(le.id == env.id for le, _ in got):
            return time.time() - t0
        await asyncio.sleep(1.0)


async def amain() -> int:
    c = Cluster(port=35432).start()
    s3 = SeaweedS3(port=35333).start()
    rows = []
    try:
        for label, store in (("PostgreSQL", None), ("PostgreSQL + S3", s3.url)):
            sp = PostgresSpool(PgSettings(dsn=c.dsn(), object_store=store, access_key=ACCESS_KEY,
                                          secret_key=SECRET_KEY, pool_size=16))
            await sp.check()
            for size in (2_000, 100_000):
                for writers in (1, 16):
                    n = 200 if writers == 1 else 1000
                    runs = [await rate(sp, writers, n, size) for _ in range(RUNS)]
                    rows.append((label, size, writers, statistics.median(runs), min(runs), max(runs)))
                    print(rows[-1], flush=True)
            c.primary.psql("TRUNCATE pg_messages", db="postgate")   # only the takeover's message left
            take = await takeover(sp, 5.0)
            await sp.close()
    finally:
        s3.stop(cleanup=True)
        c.stop()
    write_section("pgqueue-bench", "Durable enqueue (shared queue on PostgreSQL)", [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {identity()}; PostgreSQL 15 primary with one "
        "synchronous streaming standby on the same machine, SeaweedFS as S3.",
        "Command: `scripts/bench pgqueue`",
        "",
        "| queue | message size | concurrent writers | durable enqueues/s, median (min–max of "
        f"{RUNS} runs) |",
        "|---|---:|---:|---:|",
        *[f"| {q} | {s // 1000} KB | {w} | {m:,.0f} ({lo:,.0f}–{hi:,.0f}) |" for q, s, w, m, lo, hi in rows],
        "",
        f"Takeover: a message leased by a node that died (lease 5 s) was leased again by another node "
        f"{take:.1f} s after the lease was taken (lease expiry + at most one 1 s scheduler tick).",
        "",
        "Each enqueue is a commit the synchronous standby confirmed (and, with S3, a PUT before it); PostgreSQL "
        "commits concurrent transactions with one WAL flush, so concurrent writers are where the rate comes "
        "from.",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(amain()))
