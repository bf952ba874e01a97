"""Relay benchmark: Postgate (pre-queue and queue-first) against Postfix, same network, same run.

Run: ``scripts/bench relay`` (as root on Debian 12; about 25 minutes; ``BENCH_QUICK=1``: one run, half the
messages; ``BENCH_RUNS=n``: n runs per cell; ``BENCH_IDLE=n``: idle sessions, default 10,000;
``BENCH_MTAS=queue-first,asyncio``: only the Postgate configurations whose label contains one of these;
``BENCH_KEEP=1``: keep the servers' directories and logs, and print where). It rewrites
the relay section of ``bench/README.md``.

Set-up, all inside the private test network:

- MX receiver: a Postfix ``smtpd`` with TLS and a ``discard`` transport on 127.0.1.60, named by a
  DNSSEC-signed MX with a TLSA record (``bench.test``), so every relayed message is DANE-verified; ten more
  destinations ``d0.bench.test`` … ``d9.bench.test`` with their own MX names and TLSA records lead to it too.
- Load generator: Postfix's ``smtp-source`` (C), N messages over C concurrent connections, each
  connection reused (``-d``); for the many-destinations cell, ten ``smtp-source`` at once, one per domain.
- MTAs under test, each relaying with DANE: Postgate pre-queue on asyncio's loop and on uvloop, with DKIM
  off (uvloop), with ``[server] workers = 2`` (one per core, uvloop), Postgate queue-first (one process,
  with DKIM off too — Postfix signs nothing, so this row compares the queues —, and two with
  ``[queue] run_in_workers``: both processes accept and deliver), and Postfix
  (``smtp_tls_security_level = dane``, DNSSEC via the same Unbound, connection caching and
  ``smtp_tls_connection_reuse = yes``, 100 processes), and the same Postfix signing through the OpenDKIM
  milter, as an operator who signs runs it (RSA with own.test's key; Postgate signs RSA and Ed25519), so
  "with DKIM" compares with "with DKIM" (``BENCH_POSTFIX_DKIM=0`` leaves it out).
- Cells: 2 KB, 100 KB and 1 MB at C=10 and C=100, and 2 KB at C=100 to ten destinations; every cell runs
  BENCH_RUNS times (default 3), the MTAs taking turns, so a noisy neighbour hits all of them alike. Per
  cell: relayed/s (median and min–max over the runs), the ratio to Postfix of the same run, and the CPU
  time per message of each MTA: the utime+stime (children included) of its whole process tree from
  /proc/<pid>/stat, before and after the run.
- Latency probe: while the load runs, a Python client sends messages one by one to a Python receiver
  (``dane-ok.test``), measuring the time to the DATA reply and until the receiver stored the message.
- Floor: the receiver and load generator alone (smtp-source straight into the receiver), and the C-speed
  cost of the cryptography every relayed message needs (RSA-2048 and Ed25519 signatures, SHA-256 of the
  body, AES-GCM of the body on both TLS legs), timed through OpenSSL.
- Concurrency: BENCH_IDLE idle SMTP sessions (a NOOP every 5 s) are held open on Postgate while the relay
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
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import identity, write_section
from fixtures.filterd import Daemon, wait_port
from fixtures.pgserve import PostgateServer
from fixtures.postfix import Postfix
from fixtures.testnet import TestNet

SINK = "127.0.1.60"
QUICK = os.environ.get("BENCH_QUICK") == "1"
RUNS = int(os.environ.get("BENCH_RUNS", "1" if QUICK else "3"))
IDLE = int(os.environ.get("BENCH_IDLE", "10000"))
DESTINATIONS = [f"d{i}.bench.test" for i in range(10)]
# the test fixture's short timeouts would turn a busy receiver into deferrals; use the defaults of a server
PRODUCTION_TIMEOUTS = {"connect_timeout": 30.0, "command_timeout": 300.0, "tls_timeout": 60.0, "data_timeout": 600.0}
CLK_TCK = os.sysconf("SC_CLK_TCK")


def sink(net: TestNet) -> Postfix:
    assert net.pki is not None
    chain, key = net.pki.paths("mx.bench.test")
    return Postfix(SINK, myhostname="mx.bench.test", mydestination=" ".join(["bench.test", *DESTINATIONS]),
                   local_recipient_maps="", local_transport="discard:", smtpd_tls_cert_file=str(chain),
                   smtpd_tls_key_file=str(key), smtpd_tls_security_level="may", default_process_limit=500,
                   smtpd_client_connection_count_limit=0, smtpd_client_connection_rate_limit=0, in_flow_delay="0s",
                   message_size_limit=50_000_000)


def postfix_mta(address: str, **extra: str) -> Postfix:
    return Postfix(address, **extra, relay_domains=" ".join(["bench.test", "dane-ok.test", *DESTINATIONS]),
                   smtp_tls_security_level="dane",
                   smtp_dns_support_level="dnssec", smtp_connection_cache_on_demand="yes",
                   smtp_tls_connection_reuse="yes", default_process_limit=100,
                   smtp_destination_concurrency_limit=50, smtpd_client_connection_count_limit=0,
                   smtpd_client_connection_rate_limit=0, in_flow_delay="0s", smtp_tls_session_cache_database="",
                   message_size_limit=50_000_000)


class SigningOpenDKIM(Daemon):
    """OpenDKIM as a Postfix operator signs with it: a milter signing every message from the internal
    network with own.test's RSA key (the key Postgate signs with), whatever its From: domain."""

    name = "opendkim-bench"

    def __init__(self, net: TestNet) -> None:
        super().__init__()
        rsa = next(k for k in sorted((net.dkim_dir / "own.test").glob("*.private"))
                   if b"BEGIN" in k.read_bytes())
        self.key = self.dir / rsa.name
        shutil.copy(rsa, self.key)
        self.key.chmod(0o600)
        self.selector = rsa.name.removesuffix(".private")

    def start(self) -> SigningOpenDKIM:
        (self.dir / "keytable").write_text(f"own own.test:{self.selector}:{self.key}\n")
        (self.dir / "signingtable").write_text("* own\n")
        conf = self.dir / "opendkim.conf"
        conf.write_text("\n".join([
            "Syslog no", "Background no", "Mode s", f"Socket inet:{self.port}@127.0.0.1",
            f"KeyTable file:{self.dir}/keytable", f"SigningTable refile:{self.dir}/signingtable",
            "Canonicalization relaxed/relaxed", "RequireSafeKeys no", f"PidFile {self.dir}/opendkim.pid",
            "InternalHosts 127.0.0.0/8", "SignatureAlgorithm rsa-sha256", ""]))
        self.spawn(["opendkim", "-f", "-x", str(conf)])
        wait_port(self.port, self.procs[0], self.startup, "opendkim", self.log)
        return self


def postgate(net: TestNet, state: Path, name: str, address: str, **extra: dict[str, object]) -> PostgateServer:
    sections: dict[str, dict[str, object]] = {
        "relay": {"trusted_networks": ["127.0.0.0/8"]}, "delivery": dict(PRODUCTION_TIMEOUTS),
        "limits": {"max_sessions_per_client": 20000, "max_sessions": max(20000, IDLE + 1000)},
        "prequeue": {"budget": 30.0, "grace": 120.0, "max_inflight": 500},
        "check": {"downgrade": ["*"]}}
    for k, v in extra.items():
        sections.setdefault(k, {}).update(v)
    return PostgateServer(net, state / name, address=address, **sections)


def discarded(pf: Postfix) -> int:
    return len(re.findall(r"postfix/discard\[\d+\]: .* status=sent", pf.log()))


def smtp_source(target: str, n: int, c: int, size: int, rcpt: str = "rcpt@bench.test") -> float:
    t0 = time.perf_counter()
    subprocess.run(["smtp-source", "-d", "-l", str(size), "-m", str(n), "-s", str(c), "-f", "load@load.test",
                    "-t", rcpt, "-M", "load.test", f"{target}:25"], check=True, capture_output=True,
                   timeout=900)
    return time.perf_counter() - t0


def smtp_source_many(target: str, n: int, c: int, size: int) -> float:
    """``n`` messages over ``c`` connections, spread evenly over the ten destinations."""
    t0 = time.perf_counter()
    ths = [threading.Thread(target=smtp_source, args=(target, n // len(DESTINATIONS), max(1, c // len(DESTINATIONS)),
                                                      size, f"rcpt@{d}")) for d in DESTINATIONS]
    for th in ths:
        th.start()
    for th in ths:
        th.join()
    return time.perf_counter() - t0


def connections(pf: Postfix) -> int:
    """SMTP connections the receiver accepted so far (its smtpd's ``connect from`` lines)."""
    return len(re.findall(r"postfix/smtpd\[\d+\]: connect from", pf.log()))


def wait_for(pf: Postfix, total: int, timeout: float = 600) -> float:
    t0 = time.perf_counter()
    while discarded(pf) < total and time.perf_counter() - t0 < timeout:
        time.sleep(0.1)
    return time.perf_counter() - t0


def tree_cpu(root: int) -> float:
    """CPU seconds used so far by ``root`` and every process under it, the exited (reaped) ones included:
    utime + stime + cutime + cstime from /proc/<pid>/stat (proc(5))."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        f = stat[stat.rindex(")") + 2:].split()  # fields from 3 (state) on
        parent[int(d.name)] = int(f[1])
        ticks[int(d.name)] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    total = 0
    for pid, t in ticks.items():
        p = pid
        while p > 1 and p != root:
            p = parent.get(p, 0)
        if p == root:
            total += t
    return total / CLK_TCK


def postfix_master(pf: Postfix) -> int:
    return int((pf.dir / "queue" / "pid" / "master.pid").read_text().split()[0])


class Probe:
    """Messages sent one by one during the load, to the Python receiver of dane-ok.test."""

    def __init__(self, net: TestNet, target: str) -> None:
        self.net, self.target = net, target
        self.reply: list[float] = []
        self.stored: list[float] = []
        self.stop = threading.Event()

    def run(self, count: int) -> None:
        for _ in range(count):
            if self.stop.is_set():
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


@dataclass
class Result:
    relay: float
    accept: float
    cpu_ms: float  # CPU time of the MTA per message
    connections: int = 0  # connections the receiver got during the run (reuse: far fewer than messages)
    reply: list[float] = field(default_factory=list)
    stored: list[float] = field(default_factory=list)


def run_case(net: TestNet, receiver: Postfix, target: str, root: int | tuple[int, ...], n: int, c: int, size: int,
             many: bool = False) -> Result:
    roots = root if isinstance(root, tuple) else (root,)
    before = discarded(receiver)
    conn0 = connections(receiver)
    probe = Probe(net, target)
    th = threading.Thread(target=probe.run, args=(40,), daemon=True)
    cpu0 = sum(tree_cpu(r) for r in roots)
    th.start()
    t_send = smtp_source_many(target, n, c, size) if many else smtp_source(target, n, c, size)
    t_all = t_send + wait_for(receiver, before + n)
    probe.stop.set()
    cpu1 = sum(tree_cpu(r) for r in roots)
    th.join(120)
    return Result(n / t_all, n / t_send, 1000 * (cpu1 - cpu0) / n, connections(receiver) - conn0, probe.reply,
                  probe.stored)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


IDLE_CLIENT = r'''
import asyncio, sys, resource
hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (int(sys.argv[2]) + 1000, int(sys.argv[2]) + 1000))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
opened = failed = 0
opening = None
async def one(target, src):
    global opened, failed
    try:
        async with opening:   # a bounded number of handshakes at once: no SYN dropped from a full listen queue
            async with asyncio.timeout(120):
                r, w = await asyncio.open_connection(target, 25, local_addr=(src, 0))
                await r.readline()
                w.write(b"EHLO idle.test\r\n")
                while (await r.readline())[3:4] == b"-":
                    pass
        opened += 1
    except Exception:
        failed += 1
        return
    try:
        while True:
            await asyncio.sleep(5)
            w.write(b"NOOP\r\n")
            await r.readline()
    except Exception:
        pass
async def main(target, n):
    global opening
    opening = asyncio.Semaphore(500)
    tasks = []
    for i in range(n):
        # one session per client address, 127.100.0.1 and up: past the port range of one address
        j = i + (int(sys.argv[3]) if len(sys.argv) > 3 else 0)
        src = f"127.{100 + j // 62500}.{(j // 250) % 250}.{1 + j % 250}"
        tasks.append(asyncio.create_task(one(target, src)))
        if i % 500 == 0:
            await asyncio.sleep(0.05)
    while opened + failed < n:  # every session open, or failed (refused, or not greeted within 120 s)
        await asyncio.sleep(1)
    print("open", opened, flush=True)
    await asyncio.gather(*tasks)
asyncio.run(main(sys.argv[1], int(sys.argv[2])))
'''


def profile(pid: int, seconds: int, out: Path) -> list[tuple[str, float]]:
    spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    # --gil: only the thread holding the GIL is sampled, i.e. Python's CPU time (a thread waiting in fsync or
    # a socket write in another thread is not counted as busy)
    rate = os.environ.get("BENCH_PROFILE_RATE", "100")
    res = subprocess.run([spy, "record", "--format", "raw", "-o", str(out), "-d", str(seconds), "-r", rate,
                          "-p", str(pid), "--nonblocking", "--gil"], capture_output=True, text=True,
                         timeout=seconds + 60)
    if res.returncode != 0 or not out.exists():
        return [("py-spy failed: " + res.stderr.strip()[:200], 0.0)]
    own: Counter[str] = Counter()
    total = 0
    for line in out.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")
        leaf = re.sub(r" \(.*/site-packages/", " (", frames[-1])
        # the caller names which path the time belongs to (e.g. whose transport.write: smtpd or client)
        caller = frames[-2].split(" (")[0] if len(frames) > 1 else ""
        own[leaf + (f" ← {caller}" if caller else "")] += int(count)
        total += int(count)
    return [(f, 100 * n / total) for f, n in own.most_common(15)] if total else []


def crypto_floor(sizes: list[int]) -> dict[int, float]:
    """Milliseconds of OpenSSL work (C speed) each relayed message needs at least: an RSA-2048 and an
    Ed25519 signature (DKIM), SHA-256 of the body (DKIM body hash), AES-128-GCM of the message on the
    inbound and the outbound TLS leg."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    def per_call(f: object, n: int) -> float:
        t0 = time.perf_counter()
        for _ in range(n):
            f()  # type: ignore[operator]
        return (time.perf_counter() - t0) / n

    rk, ek = rsa.generate_private_key(65537, 2048), ed25519.Ed25519PrivateKey.generate()
    sign = per_call(lambda: rk.sign(b"x" * 32, padding.PKCS1v15(), hashes.SHA256()), 100) + \
        per_call(lambda: ek.sign(b"x" * 32), 200)
    gcm = AESGCM(AESGCM.generate_key(128))
    out = {}
    for size in sizes:
        body = os.urandom(size)

        def digest(body: bytes = body) -> None:
            h = hashes.Hash(hashes.SHA256())
            h.update(body)
            h.finalize()

        def seal(body: bytes = body) -> None:
            gcm.encrypt(b"0" * 12, body, None)
        n = max(5, 2_000_000 // size)
        out[size] = 1000 * (sign + per_call(digest, n) + 2 * per_call(seal, n))
    return out


def spread(values: list[float], fmt: str = "{:,.0f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.median(values))} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def main() -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    state = Path(tempfile.mkdtemp(prefix="postgate-bench-"))
    net = TestNet(state / "net").start()
    q = 2 if QUICK else 1
    # (label, size, messages, concurrency, many destinations). Enough messages that every session sends
    # several (at C=100: 15 at 2 KB, 10 at 100 KB, 3 at 1 MB in the quick run): with one or two per session
    # (the counts before 2026-12-03: 100 messages of 100 KB at C=100 in the quick run) a cell measured the
    # start-up — connections opened, first look-ups, TLS handshakes — more than the relaying
    cells = [("2 KB", 2_000, 3000 // q, 10, False), ("2 KB", 2_000, 3000 // q, 100, False),
             ("100 KB", 100_000, 2000 // q, 10, False), ("100 KB", 100_000, 2000 // q, 100, False),
             ("1 MB", 1_000_000, 300 // q, 10, False), ("1 MB", 1_000_000, 600 // q, 100, False),
             ("2 KB, 10 destinations", 2_000, 3000 // q, 100, True)]
    mtas: list[tuple[str, str, dict[str, dict[str, object]]]] = [
            ("Postgate pre-queue, asyncio", "127.0.2.10", {"server": {"event_loop": "asyncio"}}),
            ("Postgate pre-queue, uvloop", "127.0.2.14", {"server": {"event_loop": "uvloop"}}),
            ("Postgate pre-queue, uvloop, DKIM off", "127.0.2.15",
             {"server": {"event_loop": "uvloop"}, "dkim": {"key_directory": str(state / "no-keys"),
                                                           "required": False}}),
            ("Postgate pre-queue, uvloop, 2 workers", "127.0.2.13", {"server": {"event_loop": "uvloop", "workers": 2}}),
            ("Postgate queue-first", "127.0.2.11", {"prequeue": {"mode": "queue-first"},
                                                    "queue": {"destination_concurrency": 100}}),
            ("Postgate queue-first, DKIM off", "127.0.2.17",
             {"prequeue": {"mode": "queue-first"}, "queue": {"destination_concurrency": 100},
              "dkim": {"key_directory": str(state / "no-keys"), "required": False}}),
            ("Postgate queue-first, 2 workers", "127.0.2.16",
             {"server": {"workers": 2}, "prequeue": {"mode": "queue-first"},
              "queue": {"destination_concurrency": 100, "run_in_workers": True}})]
    only = [s.strip() for s in os.environ.get("BENCH_MTAS", "").split(",") if s.strip()]
    if only:  # a subset of the Postgate configurations (Postfix always runs): BENCH_MTAS="queue-first,asyncio"
        mtas = [m for m in mtas if any(o in m[0] for o in only)]
    POSTFIX = "Postfix (dane)"
    # Postgate DKIM-signs every message (RSA and Ed25519); a Postfix that signs does it through a milter
    POSTFIX_DKIM = "Postfix (dane) + OpenDKIM milter"
    with_dkim = os.environ.get("BENCH_POSTFIX_DKIM", "1") != "0"
    results: dict[tuple[str, int], list[Result]] = {}
    floor: list[str] = []
    load: list[float] = []
    try:
        with sink(net) as receiver:
            sink_root = postfix_master(receiver)
            # the receiver and the load generator alone: smtp-source straight into the Postfix receiver
            for label, size, n, c, many in cells:
                if c != 100 or many:
                    continue
                before = discarded(receiver)
                cpu0 = tree_cpu(sink_root)
                t = smtp_source(SINK, n * 2, 100, size)
                t_all = t + wait_for(receiver, before + n * 2)
                floor.append(f"| {label} | 100 | {n * 2 / t:,.0f} | {n * 2 / t_all:,.0f} | "
                             f"{1000 * (tree_cpu(sink_root) - cpu0) / (n * 2):.2f} ms |")
            servers = [(name, target, postgate(net, state, f"pg{i}", target, **extra).start())
                       for i, (name, target, extra) in enumerate(mtas)]
            pf = postfix_mta("127.0.2.12").start()
            roots: dict[str, tuple[int, ...]] = {name: (srv.proc.pid,) for name, _, srv in servers
                                                 if srv.proc is not None}
            roots[POSTFIX] = (postfix_master(pf),)
            targets = [(name, target) for name, target, _ in servers] + [(POSTFIX, "127.0.2.12")]
            odkim = pfd = None
            if with_dkim:
                odkim = SigningOpenDKIM(net).start()
                pfd = postfix_mta("127.0.2.18", smtpd_milters=odkim.address, milter_default_action="tempfail",
                                  milter_protocol="6").start()
                roots[POSTFIX_DKIM] = (postfix_master(pfd), odkim.procs[0].pid)
                targets.append((POSTFIX_DKIM, "127.0.2.18"))
            # the idle-sessions test and the profile: the one-process uvloop pre-queue Postgate, or with
            # BENCH_MTAS the first pre-queue configuration that runs
            pq_name, _, pq = next((m for m in servers if m[0] == "Postgate pre-queue, uvloop"),
                                  next((m for m in servers if "pre-queue" in m[0]), servers[0]))
            assert pq.proc is not None
            try:
                for run in range(RUNS):
                    for ci, (label, size, n, c, many) in enumerate(cells):
                        load.append(os.getloadavg()[0])
                        for name, target in targets:
                            r = run_case(net, receiver, target, roots[name], n, c, size, many)
                            results.setdefault((name, ci), []).append(r)
                            print(f"run {run + 1} {label} C={c} {name}: {r.relay:,.0f} relayed/s, "
                                  f"{r.cpu_ms:.2f} ms CPU/msg, {r.connections} connections to the receiver",
                                  flush=True)
                # concurrency: idle sessions on the pre-queue Postgate while the 2 KB load runs
                rss0 = rss_kib(pq.proc.pid)
                idle = subprocess.Popen([sys.executable, "-c", IDLE_CLIENT, pq.address, str(IDLE)],
                                        stdout=subprocess.PIPE, text=True)
                assert idle.stdout is not None
                opened = idle.stdout.readline().split()[-1]
                time.sleep(8)
                rss1 = rss_kib(pq.proc.pid)
                sessions = sum(1 for _ in Path(f"/proc/{pq.proc.pid}/fd").iterdir())
                n2 = cells[1][2]
                loaded = run_case(net, receiver, pq.address, pq.proc.pid, n2, 100, 2_000)
                rss2 = rss_kib(pq.proc.pid)
                idle.kill()
                idle.wait()
                time.sleep(2)
                base2 = run_case(net, receiver, pq.address, pq.proc.pid, n2, 100, 2_000)
                # profile the pre-queue hot path
                th = threading.Thread(target=smtp_source, args=(pq.address, n2, 100, 2_000), daemon=True)
                th.start()
                prof = profile(pq.proc.pid, 8, state / "profile.txt")
                th.join(600)
            finally:
                for _, _, srv in servers:
                    srv.stop()
                pf.stop()
                pf.cleanup()
                if pfd is not None:
                    pfd.stop()
                    pfd.cleanup()
                if odkim is not None:
                    odkim.stop()
            receiver.cleanup()
    finally:
        net.stop()
        if os.environ.get("BENCH_KEEP") != "1":
            shutil.rmtree(state, ignore_errors=True)
        else:
            print("state kept in", state, flush=True)
    cfloor = crypto_floor([2_000, 100_000, 1_000_000])
    postfix_version = subprocess.run(["postconf", "-d", "-h", "mail_version"], capture_output=True,
                                     text=True).stdout.strip()
    rows = []
    for ci, (label, _size, _n, c, _many) in enumerate(cells):
        pf_runs = results[(POSTFIX, ci)]
        pfd_runs = results.get((POSTFIX_DKIM, ci))
        for name, _ in targets:
            rs = results[(name, ci)]
            ratios = [r.relay / p.relay for r, p in zip(rs, pf_runs, strict=True)]
            ratio = "1" if name == POSTFIX else spread(ratios, "{:.2f}")
            ratio_d = "–" if pfd_runs is None else "1" if name == POSTFIX_DKIM else spread(
                [r.relay / p.relay for r, p in zip(rs, pfd_runs, strict=True)], "{:.2f}")
            reply = [x for r in rs for x in r.reply]
            stored = [x for r in rs for x in r.stored]
            rows.append(f"| {name} | {label} | {c} | {spread([r.relay for r in rs])} | **{ratio}** | {ratio_d} | "
                        f"{spread([r.cpu_ms for r in rs], '{:.2f}')} ms | {spread([r.accept for r in rs])} | "
                        f"{pct(reply, 50)} / {pct(reply, 99)} | {pct(stored, 50)} / {pct(stored, 99)} |")
    lines = [
        f"Run {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, {identity()}, Postfix {postfix_version}; "
        f"load average (1 min) at the start of each cell: {min(load):.1f}–{max(load):.1f} (the machine is shared).",
        "Command: `scripts/bench relay`" + (" (BENCH_QUICK=1: fewer messages)" if QUICK else ""),
        "",
        "Every message is relayed to the MX receiver over DANE-verified TLS (TLSA 3 1 1, DNSSEC via Unbound). "
        f"Each cell ran {RUNS} time(s), the MTAs taking turns; numbers are the median (min–max). *relayed/s*: "
        "messages the receiver got, per second until the last one arrived; *× Postfix*: relayed/s over "
        "Postfix's in the same run (*× Postfix+DKIM*: over Postfix's with the OpenDKIM milter signing, RSA "
        "only, while Postgate signs twice, RSA and Ed25519); *CPU/msg*: CPU time of the MTA's whole process "
        "tree per message (the milter's included) "
        "(/proc/<pid>/stat, children included); *accepted/s*: messages the MTA answered 250 to, per second of "
        "load. Latencies are from a probe client sending one message at a time during the load (to a Python "
        "receiver), all runs together.",
        "",
        "| MTA | size | C | relayed/s | × Postfix | × Postfix+DKIM | CPU/msg | accepted/s | DATA reply p50 / p99 | "
        "stored p50 / p99 |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
        *rows,
        "",
        "Postfix was tuned as an operator would for this: `smtp_connection_cache_on_demand = yes`, "
        "`smtp_tls_connection_reuse = yes` (tlsproxy), `default_process_limit = 100`, "
        "`smtp_destination_concurrency_limit = 50`, no client rate or connection limits, `in_flow_delay = 0s`.",
        "",
        "### Floor",
        "",
        "The receiver and the load generator alone (smtp-source straight into the Postfix receiver, no TLS), "
        "with the receiver's CPU per message:",
        "",
        "| size | C | accepted/s | received/s | receiver CPU/msg |",
        "|---|---:|---:|---:|---:|",
        *floor,
        "",
        "C-speed floor of the cryptography a relayed message needs (OpenSSL through `cryptography`: RSA-2048 "
        "and Ed25519 signatures, SHA-256 of the body, AES-128-GCM of the message on both TLS legs): "
        + ", ".join(f"{s // 1000 if s < 1_000_000 else s // 1_000_000} {'KB' if s < 1_000_000 else 'MB'}: "
                    f"{ms:.2f} ms" for s, ms in cfloor.items()) + " per message.",
        "",
        f"### {IDLE:,} concurrent sessions",
        "",
        f"{pq_name}, resident memory: {rss0 / 1024:.0f} MiB idle, "
        f"{rss1 / 1024:.0f} MiB with {opened} idle sessions open ({sessions} descriptors), {rss2 / 1024:.0f} MiB "
        f"after the 2 KB / C=100 relay load on top. Relay rate under that load: {loaded.relay:,.0f} msg/s "
        f"against {base2.relay:,.0f} msg/s right after they closed; DATA reply p50 {pct(loaded.reply, 50)}, "
        f"p99 {pct(loaded.reply, 99)}.",
        "",
        f"### Where the time goes (py-spy, {pq_name}, 2 KB, C=100; own time of the top functions, "
        "samples holding the GIL)",
        "",
        "| function | own samples |",
        "|---|---:|",
        *[f"| `{f[:110]}` | {p:.1f}% |" for f, p in prof],
    ]
    if only:   # a partial run gets its own section and leaves the full table alone
        write_section("relay-bench-" + "-".join(o.replace(" ", "") for o in only),
                      f"Relay against Postfix, only {', '.join(only)}", lines)
    else:
        write_section("relay-bench", "Relay throughput and latency against Postfix", lines)
    return 0


if __name__ == "__main__":
    sys.exit(main())
