"""Idle sessions: how many concurrent SMTP sessions one Postgate process holds, at what resident memory,
and the relay rate beside them (issue 20: 100,000 under 1 GiB).

Run: ``scripts/bench sessions`` (as root; ``BENCH_IDLE=n``, default 100,000; ``BENCH_LOOPS=uvloop``: one loop
only, default both; ``BENCH_PYTHON=…/bin/python``: the interpreter whose ``postgate`` runs, e.g. the venv
``scripts/install`` makes, whose processes are smaller than the development venv's, which holds the test
tools' packages that dnspython imports when present). Rewrites the sessions
section of bench/README.md. Set-up as in bench/relay_bench.py (its receiver and load generator); the idle
clients come from 127.100.0.1 and up, one session per address, so the ephemeral port range of a single
client address is no limit. ``postgate serve`` raises its own descriptor limit to what ``[limits]
max_sessions`` needs (it runs as root here).
"""

from __future__ import annotations

import datetime as dt
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.relay_bench import IDLE_CLIENT, pct, postgate, rss_kib, run_case, sink
from bench.report import identity, write_section
from fixtures.testnet import TestNet

N = int(os.environ.get("BENCH_IDLE", "100000"))
LOOPS = tuple(os.environ.get("BENCH_LOOPS", "uvloop,asyncio").split(","))
PYTHON = os.environ.get("BENCH_PYTHON", sys.executable)


def tree(root: int) -> list[int]:
    """``root`` and its child processes (the listener workers)."""
    kids = [int(p) for p in Path(f"/proc/{root}/task/{root}/children").read_text().split()]
    return [root, *kids]


def tree_rss(root: int) -> int:
    return sum(rss_kib(p) for p in tree(root))


def main() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # without the privilege to raise the hard limit, one process holds fewer than `hard` sessions: then as
    # many idle-client processes and Postgate listener processes ([server] workers) as that takes
    per_proc = hard - 2000
    procs = -(-N // per_proc)
    state = Path(tempfile.mkdtemp(prefix="postgate-sessions-"))
    net = TestNet(state / "net").start()
    out: list[str] = []
    try:
        with sink(net) as receiver:
            for loop in LOOPS:
                pg = postgate(net, state, f"pg-{loop}", "127.0.2.14",
                              server={"event_loop": loop, "workers": procs},
                              limits={"max_sessions": min(N, per_proc) + 1000,
                                      "max_sessions_per_client": min(N, per_proc) + 1000})
                pg.python = PYTHON
                pg.start()
                assert pg.proc is not None
                try:
                    base = run_case(net, receiver, pg.address, pg.proc.pid, 600, 100, 2_000)
                    rss0 = tree_rss(pg.proc.pid)
                    t0 = time.time()
                    idles = [subprocess.Popen([sys.executable, "-c", IDLE_CLIENT, pg.address, str(N // procs),
                                               str(i * (N // procs))], stdout=subprocess.PIPE, text=True)
                             for i in range(procs)]
                    opened = 0
                    for idle in idles:
                        assert idle.stdout is not None
                        opened += int(idle.stdout.readline().split()[-1])
                    took = time.time() - t0
                    time.sleep(6)
                    rss1 = tree_rss(pg.proc.pid)
                    fds = sum(sum(1 for _ in Path(f"/proc/{p}/fd").iterdir()) for p in tree(pg.proc.pid))
                    loaded = run_case(net, receiver, pg.address, pg.proc.pid, 600, 100, 2_000)
                    rss2 = tree_rss(pg.proc.pid)
                    for idle in idles:
                        idle.kill()
                        idle.wait()
                    limit = Path(f"/proc/{pg.proc.pid}/limits").read_text()
                    nofile = next(ln.split()[3:5] for ln in limit.splitlines() if ln.startswith("Max open files"))
                    out.append(f"| {loop} | {opened:,} of {N:,} | {fds:,} | {rss0 / 1024:.0f} | {rss1 / 1024:.0f} | "
                               f"{(rss1 - rss0) / max(opened, 1):.1f} KiB | {rss2 / 1024:.0f} | {base.relay:,.0f} | "
                               f"{loaded.relay:,.0f} | {pct(loaded.reply, 50)} / {pct(loaded.reply, 99)} | "
                               f"{took:.0f} s | {'/'.join(nofile)} |")
                    print(out[-1], flush=True)
                finally:
                    pg.stop(timeout=120)
            receiver.cleanup()
    finally:
        net.stop()
        shutil.rmtree(state, ignore_errors=True)
    write_section("sessions-bench", "Concurrent idle sessions", [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {identity()}; load average {os.getloadavg()[0]:.1f}.",
        "Command: `" + "".join(f"{k}={v} " for k, v in (("BENCH_IDLE", str(N)), ("BENCH_LOOPS", ",".join(LOOPS)),
                                                       ("BENCH_PYTHON", PYTHON)) if k in os.environ)
        + "scripts/bench sessions`" + ("" if PYTHON == sys.executable else
                                       " (Postgate from the venv of `scripts/install`, as installed in production)"),
        "",
        f"Postgate pre-queue, {procs} listener process(es) (`[server] workers`: the hard descriptor limit here is "
        f"{hard:,} and `serve` may not raise it); idle sessions (EHLO, then a NOOP every 5 s) from one client address "
        "each; then the 2 KB / C=100 relay load of the relay benchmark on top. "
        "RSS: the sum over the processes, from /proc/<pid>/status.",
        "",
        "| loop | sessions open | descriptors | RSS before, MiB | RSS with them, MiB | per session | RSS after the "
        "load, MiB | relayed/s alone | relayed/s beside them | DATA reply p50 / p99 | time to open | fd limit "
        "(soft/hard) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        *out,
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
