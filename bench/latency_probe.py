"""The relay benchmark's 2 KB / C=100 cell alone, for the DATA-reply latency of the probe (issue 20: p99 < 250 ms).

Run: ``.venv/bin/python -m fixtures.netns .venv/bin/python bench/latency_probe.py`` (as root). Starts only
the test network, the Postfix sink receiver and one Postgate pre-queue server (uvloop), and runs the cell
``LP_RUNS`` times (default 5) with ``LP_N`` messages (default 400, the quick bench's count) over ``LP_C``
connections (default 100), ``LP_PAUSE`` seconds apart (default 6: in the bench the other MTAs run between
two turns of Postgate, so its idle outbound connections, ``[delivery] reuse_idle`` 5 s, are gone by then).
Prints the probe's DATA-reply latency p50/p90/p95/p99/max over all runs, and relayed/s and CPU per message
per run. ``LP_EVENT_LOOP`` picks the loop (default uvloop). Nothing is written to bench/README.md.

What it showed (issue 20, traced in the server): the probe's DATA reply is a number of turns of the event
loop, and under this load a turn is everyone's work: with C sessions in a closed loop on a saturated
process, a turn lasts about C x (CPU per message) / (turns per load message), so the probe waits roughly
(its turns / a load message's turns) x C x CPU per message — about 200 ms at 1.5 ms per message. Its
receiver (mx.dane-ok.test) has no PIPELINING: RSET, MAIL, RCPT, DATA and the content are five round trips.
What is not in that product — turns nobody needed (tasks for cached lookups, a command sent a turn after
its reply), collector pauses — is what can be removed; the rest goes only with less CPU per message.
"""

from __future__ import annotations

import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.relay_bench import postgate, run_case, sink
from fixtures.testnet import TestNet


def pcts(values: list[float]) -> str:
    v = sorted(values)
    if not v:
        return "no samples"

    def at(p: float) -> float:
        return v[min(len(v) - 1, int(p / 100 * len(v)))] * 1000
    return (f"n={len(v)} p50 {at(50):.0f} ms, p90 {at(90):.0f} ms, p95 {at(95):.0f} ms, p99 {at(99):.0f} ms, "
            f"max {v[-1] * 1000:.0f} ms")


def main() -> int:
    runs = int(os.environ.get("LP_RUNS", "5"))
    n = int(os.environ.get("LP_N", "400"))
    c = int(os.environ.get("LP_C", "100"))
    pause = float(os.environ.get("LP_PAUSE", "6"))
    loop = os.environ.get("LP_EVENT_LOOP", "uvloop")
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    state = Path(tempfile.mkdtemp(prefix="postgate-latency-"))
    net = TestNet(state / "net").start()
    replies: list[float] = []
    stored: list[float] = []
    try:
        with sink(net) as receiver:
            srv = postgate(net, state, "pg", "127.0.2.14", server={"event_loop": loop}).start()
            try:
                assert srv.proc is not None
                run_case(net, receiver, srv.address, srv.proc.pid, 100, 10, 2_000)  # warm-up
                for i in range(runs):
                    time.sleep(pause)
                    r = run_case(net, receiver, srv.address, srv.proc.pid, n, c, 2_000)
                    replies += r.reply
                    stored += r.stored
                    print(f"run {i + 1}: {r.relay:,.0f} relayed/s, {r.cpu_ms:.2f} ms CPU/msg, "
                          f"{r.connections} connections to the receiver, load "
                          f"{os.getloadavg()[0]:.1f}; DATA reply {pcts(r.reply)}; "
                          f"samples {' '.join(f'{x * 1000:.0f}' for x in r.reply)}", flush=True)
                if os.environ.get("LP_LOG"):
                    shutil.copy(srv.logfile, os.environ["LP_LOG"])
            finally:
                srv.stop()
            receiver.cleanup()
    finally:
        net.stop()
        shutil.rmtree(state, ignore_errors=True)
    print(f"ALL DATA reply: {pcts(replies)}")
    print(f"ALL stored:     {pcts(stored)}")
    if replies:
        print(f"mean DATA reply {statistics.mean(replies) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
