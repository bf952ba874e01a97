"""Relay benchmark: Postgate (pre-queue and queue-first) against Postfix, same network, same run.

Run: ``scripts/bench relay`` (as root on Debian 12; about 10 minutes). It rewrites the relay section of
``bench/README.md``.

Set-up, all inside the private test network:

- MX receiver: a Postfix ``smtpd`` with TLS and a ``discard`` transport on 127.0.1.60, named by a
  DNSSEC-signed MX with a TLSA record (``bench.test``), so every relayed message is DANE-verified.
- Load generator: Postfix's ``smtp-source`` (C), N messages over C concurrent connections, each
  connection reused (``-d``).
- MTAs under test, each relaying ``bench.test`` with DANE: Postgate pre-queue (one process, and with
  ``[server] workers = 2``, one per core), Postgate queue-first, and Postfix
  (``smtp_tls_security_level = dane``, DNSSEC via the same Unbound, connection caching and
  ``smtp_tls_connection_reuse = yes``, 100 processes).
- Latency probe: while the load runs, a Python client sends 40 messages one by one to a Python receiver
  (``dane-ok.test``), measuring the time to the DATA reply and until the receiver stored the message.
- Concurrency: 10,000 idle SMTP sessions (a NOOP every 5 s) are held open on Postgate while the relay
  load runs; Postgate's resident memory and the throughput drop are reported.
- Profile: py-spy samples Postgate during a pre-queue run; the top functions by own time are listed.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import resource
import shutil
import smtplib
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import identity, write_section
from fixtures.pgserve import PostgateServer
from fixtures.postfix import Postfix
from fixtures.testnet import TestNet

SINK = "127.0.1.60"
QUICK = os.environ.get("BENCH_QUICK") == "1"
# the test fixture's short timeouts would turn a busy receiver into deferrals; use the defaults of a server
PRODUCTION_TIMEOUTS = {"connect_timeout": 30.0, "command_timeout": 300.0, "tls_timeout": 60.0, "data_timeout": 600.0}


def sink(net: TestNet) -> Postfix:
    assert net.pki is not None
    chain, key = net.pki.paths("mx.bench.test")
    return Postfix(SINK, myhostname="mx.bench.test", mydestination="bench.test", local_recipient_maps="",
                   local_transport="discard:", smtpd_tls_cert_file=str(chain), smtpd_tls_key_file=str(key),
                   smtpd_tls_security_level="may", default_process_limit=500, smtpd_client_connection_count_limit=0,
                   smtpd_client_connection_rate_limit=0, in_flow_delay="0s")


def postfix_mta(address: str) -> Postfix:
    return Postfix(address, relay_domains="bench.test dane-ok.test", smtp_tls_security_level="dane",
                   smtp_dns_support_level="dnssec", smtp_connection_cache_on_demand="yes",
                   smtp_tls_connection_reuse="yes", default_process_limit=100,
                   smtp_destination_concurrency_limit=50, smtpd_client_connection_count_limit=0,
                   smtpd_client_connection_rate_limit=0, in_flow_delay="0s", smtp_tls_session_cache_database="")


def discarded(pf: Postfix) -> int:
    return len(re.findall(r"postfix/discard\[\d+\]: .* status=sent", pf.log()))


def smtp_source(target: str, n: int, c: int, size: int) -> float:
    t0 = time.perf_counter()
    subprocess.run(["smtp-source", "-d", "-l", str(size), "-m", str(n), "-s", str(c), "-f", "load@load.test",
                    "-t", "rcpt@bench.test", "-M", "load.test", f"{target}:25"], check=True, capture_output=True,
                   timeout=900)
    return time.perf_counter() - t0


def wait_for(pf: Postfix, total: int, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while discarded(pf) < total and time.perf_counter() - t0 < timeout:
        time.sleep(0.1)
    return time.perf_counter() - t0


class Probe:
    """Messages sent one by one during the load, to the Python receiver of dane-ok.test."""

    def __init__(self, net: TestNet, target: str) -> None:
        self.net, self.target = net, target
        self.reply: list[float] = []
        self.stored: list[float] = []

    def run(self, count: int, stop_after: float) -> None:
        deadline = time.time() + stop_after
        for _ in range(count):
            if time.time() > deadline:
                break
            token = f"probe-{os.getpid()}-{time.time_ns()}"
            body = f"Subject: {token}\r\nDate: x\r\nFrom: p@load.test\r\n\r\n{token}\r\n".encode()
            try:
                with smtplib.SMTP(self.target, 25, timeout=120) as s:
                    s.ehlo("probe.test")
                    s.mail("p@load.test")
                    s.rcpt("probe@dane-ok.test")
                    t0 = time.time()
                    s.data(body)
                    self.reply.append(time.time() - t0)
            except (OSError, smtplib.SMTPException):
                continue
            for _ in range(300):
                got = [m for m in self.net.received("mx.dane-ok.test") if token in m["data"]]
                if got:
                    self.stored.append(got[0]["time"] - t0)
                    break
                time.sleep(0.02)
            time.sleep(0.05)


def pct(values: list[float], p: float) -> str:
    if not values:
        return "–"
    v = sorted(values)
    return f"{v[min(len(v) - 1, int(p / 100 * len(v)))] * 1000:.0f} ms"


def run_case(net: TestNet, receiver: Postfix, target: str, n: int, c: int, size: int) -> dict[str, object]:
    import threading
    before = discarded(receiver)
    probe = Probe(net, target)
    th = threading.Thread(target=probe.run, args=(40, 60), daemon=True)
    th.start()
    t_send = smtp_source(target, n, c, size)
    t_all = t_send + wait_for(receiver, before + n)
    th.join(120)
    return {"accept": n / t_send, "relay": n / t_all, "p50_reply": pct(probe.reply, 50),
            "p99_reply": pct(probe.reply, 99), "p50_stored": pct(probe.stored, 50), "p99_stored": pct(probe.stored, 99)}


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


IDLE_CLIENT = r'''
import asyncio, sys, resource
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
async def one(target, src):
    try:
        r, w = await asyncio.open_connection(target, 25, local_addr=(src, 0))
        await r.readline()
        w.write(b"EHLO idle.test\r\n")
        while (await r.readline())[3:4] == b"-":
            pass
        while True:
            await asyncio.sleep(5)
            w.write(b"NOOP\r\n")
            await r.readline()
    except Exception:
        pass
async def main(target, n):
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(target, f"127.0.{100 + i // 250}.{1 + i % 250}")))
        if i % 500 == 0:
            await asyncio.sleep(0.05)
    print("open", flush=True)
    await asyncio.gather(*tasks)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
'''


def profile(pid: int, seconds: int, out: Path) -> list[tuple[str, float]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    res = subprocess.run([spy, "record", "--format", "raw", "-o", str(out), "-d", str(seconds), "-r", "100",
                          "-p", str(pid), "--nonblocking"], capture_output=True, text=True, timeout=seconds + 60)
    if res.returncode != 0 or not out.exists():
        return [("py-spy failed: " + res.stderr.strip()[:200], 0.0)]
    own: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        own[re.sub(r" \(.*/site-packages/", " (", leaf)] += int(count)
        total += int(count)
    return [(f, 100 * n / total) for f, n in own.most_common(15)] if total else []


def main() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    state = Path(tempfile.mkdtemp(prefix="postgate-bench-"))
    net = TestNet(state / "net").start()
    sizes = [(2_000, 2000 if not QUICK else 300), (100_000, 300 if not QUICK else 60)]
    conc = [10, 100]
    results: list[tuple[str, int, int, dict[str, object]]] = []
    notes: list[str] = []
    try:
        with sink(net) as receiver:
            # the receiver and the load generator alone: smtp-source straight into the Postfix receiver
            for size, n in sizes:
                before = discarded(receiver)
                t = smtp_source(SINK, n * 2, 100, size)
                wait_for(receiver, before + n * 2)
                notes.append(f"receiver + load generator alone, {size // 1000} KB, C=100: "
                             f"{n * 2 / t:,.0f} msg/s accepted")
            pq = PostgateServer(net, state / "pg-prequeue", address="127.0.2.10",
                                relay={"trusted_networks": ["127.0.0.0/8"]}, delivery=PRODUCTION_TIMEOUTS,
                                limits={"max_sessions_per_client": 20000, "max_sessions": 20000},
                                prequeue={"budget": 30.0, "grace": 120.0, "max_inflight": 500},
                                check={"downgrade": ["*"]}).start()
            qf = PostgateServer(net, state / "pg-queuefirst", address="127.0.2.11",
                                relay={"trusted_networks": ["127.0.0.0/8"]}, delivery=PRODUCTION_TIMEOUTS,
                                limits={"max_sessions_per_client": 20000, "max_sessions": 20000},
                                prequeue={"mode": "queue-first"}, queue={"destination_concurrency": 100},
                                check={"downgrade": ["*"]}).start()
            pq2 = PostgateServer(net, state / "pg-prequeue-2w", address="127.0.2.13",
                                 relay={"trusted_networks": ["127.0.0.0/8"]}, delivery=PRODUCTION_TIMEOUTS,
                                 server={"workers": 2},
                                 limits={"max_sessions_per_client": 20000, "max_sessions": 20000},
                                 prequeue={"budget": 30.0, "grace": 120.0, "max_inflight": 500},
                                 check={"downgrade": ["*"]}).start()
            pf = postfix_mta("127.0.2.12").start()
            try:
                for size, n in sizes:
                    for c in conc:
                        for name, target in (("Postgate pre-queue", "127.0.2.10"),
                                             ("Postgate pre-queue, 2 workers", "127.0.2.13"),
                                             ("Postgate queue-first", "127.0.2.11"), ("Postfix (dane)", "127.0.2.12")):
                            r = run_case(net, receiver, target, n, c, size)
                            results.append((name, size, c, r))
                            print(name, size, c, r, flush=True)
                # concurrency: 10,000 idle sessions on the pre-queue Postgate while the 2 KB load runs
                assert pq.proc is not None
                rss0 = rss_kib(pq.proc.pid)
                idle = subprocess.Popen([sys.executable, "-c", IDLE_CLIENT, "127.0.2.10", "10000"],
                                        stdout=subprocess.PIPE, text=True)
                assert idle.stdout is not None
                idle.stdout.readline()
                time.sleep(8)
                rss1 = rss_kib(pq.proc.pid)
                sessions = sum(1 for _ in Path(f"/proc/{pq.proc.pid}/fd").iterdir())
                n2 = sizes[0][1]
                loaded = run_case(net, receiver, "127.0.2.10", n2, 100, 2_000)
                rss2 = rss_kib(pq.proc.pid)
                idle.kill()
                idle.wait()
                # profile the pre-queue hot path
                import threading
                th = threading.Thread(target=smtp_source, args=("127.0.2.10", n2, 100, 2_000), daemon=True)
                th.start()
                prof = profile(pq.proc.pid, 8, state / "profile.txt")
                th.join(600)
            finally:
                pq.stop()
                pq2.stop()
                qf.stop()
                pf.stop()
                pf.cleanup()
            receiver.cleanup()
    finally:
        net.stop()
        shutil.rmtree(state, ignore_errors=True)
    base_rate = next(r["relay"] for name, s, c, r in results if name == "Postgate pre-queue" and s == 2000 and c == 100)
    postfix_version = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                                     text=True).stdout.strip()
    lines = [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {identity()}, Postfix {postfix_version}.",
        "Command: `scripts/bench relay`" + (" (BENCH_QUICK=1: fewer messages)" if QUICK else ""),
        "",
        "Every message is relayed to the MX receiver over DANE-verified TLS (TLSA 3 1 1, DNSSEC via Unbound). "
        "*accepted/s*: messages the MTA answered 250 to, per second of load; *relayed/s*: messages the "
        "receiver got, per second until the last one arrived. Latencies are from a probe client sending "
        "one message at a time during the load (to a Python receiver).",
        "",
        "| MTA | size | C | accepted/s | relayed/s | DATA reply p50 / p99 | stored p50 / p99 |",
        "|---|---:|---:|---:|---:|---:|---:|",
        *[f"| {name} | {s // 1000} KB | {c} | {r['accept']:,.0f} | {r['relay']:,.0f} | {r['p50_reply']} / "
          f"{r['p99_reply']} | {r['p50_stored']} / {r['p99_stored']} |" for name, s, c, r in results],
        "",
        "Postfix was tuned as an operator would for this: `smtp_connection_cache_on_demand = yes`, "
        "`smtp_tls_connection_reuse = yes` (tlsproxy), `default_process_limit = 100`, "
        "`smtp_destination_concurrency_limit = 50`, no client rate or connection limits, `in_flow_delay = 0s`.",
        "",
        "Bottleneck check: " + "; ".join(notes) + ".",
        "",
        "### 10,000 concurrent sessions",
        "",
        f"Postgate pre-queue, resident memory: {rss0 / 1024:.0f} MiB idle, {rss1 / 1024:.0f} MiB with 10,000 "
        f"idle sessions open ({sessions} descriptors), {rss2 / 1024:.0f} MiB after the 2 KB / C=100 relay load on "
        f"top. Relay rate under that load: {loaded['relay']:,.0f} msg/s against {base_rate:,.0f} msg/s without "
        f"the idle sessions ({100 * (1 - float(loaded['relay']) / float(base_rate)):.0f}% drop); DATA reply p50 "  # type: ignore[arg-type]
        f"{loaded['p50_reply']}, p99 {loaded['p99_reply']}.",
        "",
        "### Where the time goes (py-spy, Postgate pre-queue, 2 KB, C=100; own time of the top functions)",
        "",
        "| function | own samples |",
        "|---|---:|",
        *[f"| `{f[:110]}` | {p:.1f}% |" for f, p in prof],
    ]
    write_section("relay-bench", "Relay throughput and latency against Postfix", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
