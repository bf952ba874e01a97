"""Validated DNS lookups per second: Postgate's own validator vs Unbound, on the same names, same run.

Run (as root, Debian 12): ``scripts/bench dns`` — it brings the test network up in a private namespace,
measures, and rewrites the DNS section of ``bench/README.md``.

What is measured, each over every (owner, type) of the test network that Unbound answers without
SERVFAIL:

- Postgate ``validate``, cold: a fresh resolver (empty Postgate cache; Unbound upstream warm), all names
  asked with 50 in flight. Each answer is validated up to the root: signatures, DS links, denial proofs.
- Postgate ``validate``, cached: the same resolver asked again.
- Postgate ``trust-ad``: trusting Unbound's AD bit (cold and cached).
- Unbound, cold: the first pass after it started (empty cache), with ``dnsperf`` (DO bit, 50 in flight).
- Unbound, cached: ``dnsperf`` for 5 seconds over the same names.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from postgate.outbound.resolver import Resolver, load_anchors

from bench.report import identity, write_section
from fixtures.testnet import TestNet


async def _pass(r: Resolver, names: list[tuple[str, str]], inflight: int = 50) -> tuple[float, list[float]]:
    sem = asyncio.Semaphore(inflight)
    lat: list[float] = []

    async def one(n: str, t: str) -> None:
        async with sem:
            t0 = time.perf_counter()
            await r.resolve(n, t)
            lat.append(time.perf_counter() - t0)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(n, t) for n, t in names))
    return len(names) / (time.perf_counter() - t0), lat


def _postgate(net: TestNet, names: list[tuple[str, str]], mode: str) -> tuple[float, float, float]:
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), mode=mode, timeout=5)
    cold, lat = asyncio.run(_pass(r, names))
    cached, _ = asyncio.run(_pass(r, names))
    return cold, cached, statistics.median(lat) * 1000


def _dnsperf(net: TestNet, names: list[tuple[str, str]], *args: str) -> float:
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        for n, t in names:
            f.write(f"{n} {t}\n")
    out = subprocess.run(["dnsperf", "-s", net.resolver, "-d", f.name, "-D", "-q", "50", *args],
                         capture_output=True, text=True, timeout=120).stdout
    os.unlink(f.name)
    m = re.search(r"Queries per second:\s+([\d.]+)", out)
    return float(m.group(1)) if m else float("nan")


def main() -> int:
    state = Path(tempfile.mkdtemp(prefix="postgate-bench-"))
    net = TestNet(state).start()
    try:
        names = [(n, t) for n, t in net.questions() if net.query(n, t).rcode() != 2]  # drop SERVFAIL
        unbound_cold = _dnsperf(net, names, "-n", "1")  # first pass after start: Unbound's cache empty
        _dnsperf(net, names, "-n", "1")
        v_cold, v_cached, v_p50 = _postgate(net, names, "validate")
        a_cold, a_cached, a_p50 = _postgate(net, names, "trust-ad")
        unbound_cached = _dnsperf(net, names, "-l", "5")
    finally:
        net.stop()
    rows = [
        ("Postgate validate, cold (own cache empty)", v_cold, f"{v_p50:.2f} ms"),
        ("Postgate validate, cached", v_cached, ""),
        ("Postgate trust-ad, cold", a_cold, f"{a_p50:.2f} ms"),
        ("Postgate trust-ad, cached", a_cached, ""),
        ("Unbound (dnsperf), cold: first pass after start", unbound_cold, ""),
        ("Unbound (dnsperf), cached, 5 s", unbound_cached, ""),
    ]
    write_section("dns-bench", "DNSSEC-validated lookups", [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {identity()}; {len(names)} names (every owner and "
        "type of the test network that does not SERVFAIL), 50 lookups in flight.",
        "Command: `scripts/bench dns`",
        "",
        "| what | lookups/s | median latency |",
        "|---|---:|---:|",
        *[f"| {what} | {qps:,.0f} | {lat} |" for what, qps, lat in rows],
    ])
    return 0


if __name__ == "__main__":
    sys.exit(main())
