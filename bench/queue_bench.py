"""Durable enqueue rate of the local spool: messages per second with fsync, one writer and many.

Run: ``scripts/bench queue`` (rewrites the queue section of bench/README.md). Each enqueue writes the
content and the envelope to temporary files, fsyncs them, renames them into place and fsyncs the
directories (outbound/queue/spool.py) — what must happen before an SMTP server may answer 250.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.spool import DirectorySpool

from bench.report import identity, write_section


def run(writers: int, n: int, size: int, fsync: bool = True) -> float:
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as d:
        spool = DirectorySpool(d, fsync=fsync)
        content = (b"Subject: bench\r\n\r\n" + b"x" * 76 + b"\r\n") * (size // 78)

        def one(_: int) -> None:
            env = Envelope.new("a@bench.test", [Recipient("b@bench.test")], content)
            spool.enqueue(env, content)

        t0 = time.perf_counter()
        if writers == 1:
            for i in range(n):
                one(i)
        else:
            with ThreadPoolExecutor(writers) as pool:
                list(pool.map(one, range(n)))
        return n / (time.perf_counter() - t0)


def main() -> int:
    rows = []
    for size in (2_000, 100_000):
        for writers in (1, 10, 50):
            n = 400 if writers == 1 else 1000
            rows.append((size, writers, run(writers, n, size)))
    no_fsync = run(1, 1000, 2_000, fsync=False)
    fs = subprocess.run(["df", "-T", tempfile.gettempdir()], capture_output=True, text=True).stdout.splitlines()[-1]
    write_section("queue-bench", "Durable enqueue (local queue)", [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {identity()}, file system: `{' '.join(fs.split()[:2])}`.",
        "Command: `scripts/bench queue`",
        "",
        "| message size | concurrent writers | durable enqueues/s |",
        "|---:|---:|---:|",
        *[f"| {s // 1000} KB | {w} | {r:,.0f} |" for s, w, r in rows],
        f"| 2 KB | 1, **without fsync** (for scale only, not safe) | {no_fsync:,.0f} |",
        "",
        "Each enqueue costs two fsync'd files and two directory fsyncs; concurrent writers let the file "
        "system's journal commit several of them together, which is where the higher rates come from.",
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
