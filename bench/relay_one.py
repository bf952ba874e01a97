"""One Postgate configuration against Postfix on the relay bench's set-up, for profiling and A/B runs.

Run (as root, inside the test network's namespace)::

    .venv/bin/python -m fixtures.netns .venv/bin/python bench/relay_one.py

Environment: ``MODE`` = ``prequeue`` (default) or ``queuefirst``; ``SIZE`` (octets, 2000), ``C`` (sessions,
10), ``N`` (messages per run, 1200), ``RUNS`` (3); ``DKIMOFF=1``: no DKIM keys; ``WORKERS=n``: ``[server]
workers``; ``MANY=1``: to the ten destinations (the relay bench's many-destinations cell);
``B='{"section": {"key": value}}'``: a second Postgate with these settings on top, taking turns with the
first (an A/B run), ``B_ENV='{"NAME": "value"}'``: environment variables for that second one only,
``B_PYTHON``: the interpreter it runs on (a venv whose editable install points at another checkout: an A/B
of code); ``POSTFIX=0``: without Postfix; ``PROFILE=seconds``: py-spy samples the first Postgate under load
afterwards (own time per function; ``BENCH_PROFILE_RATE``: samples per second, 100; ``PERF=1``: ``perf
record`` instead, to ``perf.data``). Prints relayed/s, CPU per message, DATA reply p50/p99 per run and the
ratios of the runs. Nothing is written to bench/README.md (``scripts/bench relay`` is the benchmark of record).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import relay_bench as rb
from fixtures.testnet import TestNet


def main() -> int:
    mode = os.environ.get("MODE", "prequeue")
    c, n, size = int(os.environ.get("C", "10")), int(os.environ.get("N", "1200")), int(os.environ.get("SIZE", "2000"))
    runs = int(os.environ.get("RUNS", "3"))
    many = os.environ.get("MANY") == "1"
    state = Path(tempfile.mkdtemp(prefix="relay-one-"))
    net = TestNet(state / "net").start()
    extra: dict[str, dict[str, object]] = {"server": {"event_loop": "uvloop"}}
    if mode == "queuefirst":
        extra = {"prequeue": {"mode": "queue-first"}, "queue": {"destination_concurrency": 100}}
    if os.environ.get("WORKERS"):
        extra.setdefault("server", {})["workers"] = int(os.environ["WORKERS"])
    if os.environ.get("DKIMOFF") == "1":
        extra["dkim"] = {"key_directory": str(state / "no-keys"), "required": False}
    try:
        with rb.sink(net) as receiver:
            a = rb.postgate(net, state, "a", "127.0.2.14", **extra).start()
            servers = [a]
            assert a.proc is not None
            targets = [("postgate", "127.0.2.14", (a.proc.pid,))]
            if os.environ.get("B"):
                more = {k: dict(extra.get(k, {}), **v) for k, v in json.loads(os.environ["B"]).items()}
                saved = dict(os.environ)
                os.environ.update(json.loads(os.environ.get("B_ENV", "{}")))
                try:
                    b = rb.postgate(net, state, "b", "127.0.2.15", **{**extra, **more})
                    if os.environ.get("B_PYTHON"):   # another checkout's venv: an A/B of code
                        b.python = os.environ["B_PYTHON"]
                    b.start()
                finally:
                    os.environ.clear()
                    os.environ.update(saved)
                assert b.proc is not None
                servers.append(b)
                targets.append(("postgate-b", "127.0.2.15", (b.proc.pid,)))
            pf = rb.postfix_mta("127.0.2.12").start() if os.environ.get("POSTFIX", "1") == "1" else None
            if pf is not None:
                targets.append(("postfix", "127.0.2.12", (rb.postfix_master(pf),)))
            rb.run_case(net, receiver, "127.0.2.14", (a.proc.pid,), 100, c, size)   # warm-up
            res: dict[str, list[rb.Result]] = {}
            for _ in range(runs):
                for name, target, roots in targets:
                    r = rb.run_case(net, receiver, target, roots, n, c, size, many)
                    res.setdefault(name, []).append(r)
                    print(f"{name}: {r.relay:.0f} relayed/s, {r.cpu_ms:.2f} ms CPU/msg, DATA reply p50 "
                          f"{rb.pct(r.reply, 50)} p99 {rb.pct(r.reply, 99)}", flush=True)
            for x, y in (("postgate", "postfix"), ("postgate-b", "postfix"), ("postgate", "postgate-b")):
                if x in res and y in res:
                    ratios = [p.relay / q.relay for p, q in zip(res[x], res[y], strict=True)]
                    print(f"{x} / {y}: {' '.join(f'{v:.2f}' for v in ratios)} (median {statistics.median(ratios):.2f})")
            if os.environ.get("PROFILE"):
                secs = int(os.environ["PROFILE"])
                th = threading.Thread(target=rb.smtp_source, args=("127.0.2.14", n * 3, c, size), daemon=True)
                th.start()
                if os.environ.get("PERF") == "1":
                    subprocess.run(["perf", "record", "-F", "499", "-g", "-o", "perf.data", "-p", str(a.proc.pid),
                                    "--", "sleep", str(secs)], capture_output=True, check=False)
                else:
                    for f, p in rb.profile(a.proc.pid, secs, state / "profile.txt"):
                        print(f"{p:5.1f}% {f}")
                th.join(600)
            for s in servers:
                s.stop()
            if pf is not None:
                pf.stop()
                pf.cleanup()
            receiver.cleanup()
    finally:
        net.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
