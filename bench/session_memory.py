"""What one idle SMTP session costs the smtpd in memory, on one process (issue 20: 100,000 sessions under
1 GiB). No root, no test network: an :class:`SMTPServer` on 127.0.0.1 in a child process, N clients (EHLO,
then idle) from this one, the server's resident memory (/proc) and Python heap (tracemalloc, a second run)
measured before and after.

Run: ``.venv/bin/python bench/session_memory.py [N] [asyncio|uvloop]`` (default 2,000 sessions, both loops).
Prints KiB per session, and with ``--top`` the allocation sites that grew most.
"""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import subprocess
import sys
from pathlib import Path

SERVER = r'''
import asyncio, gc, logging, os, sys, tracemalloc
logging.disable(logging.CRITICAL)
from postgate import eventloop
from postgate.inbound.smtpd import Limits, Listener, SMTPServer
trace = sys.argv[2] == "1"
class Nothing:
    async def check_rcpt(self, *a):
        return None
    async def message(self, *a):
        raise AssertionError
def rss():
    for ln in open(f"/proc/{os.getpid()}/status"):
        if ln.startswith("VmRSS:"):
            return int(ln.split()[1])
async def main():
    srv = SMTPServer(Listener("mx", "127.0.0.1", 0), Nothing(), hostname="mx.test",
                     limits=Limits(max_sessions=200000, max_sessions_per_client=200000))
    await srv.start()
    print(srv.server.sockets[0].getsockname()[1], flush=True)
    if trace:
        tracemalloc.start(4)
    loop = asyncio.get_running_loop()
    r = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(r), sys.stdin)
    snap = None
    while (cmd := (await r.readline()).decode().strip()):
        gc.collect()
        if cmd == "measure":
            cur = tracemalloc.get_traced_memory()[0] if trace else 0
            print(rss(), cur, srv.sessions, flush=True)
            if trace:
                if snap is not None and "--top" in sys.argv:
                    top = tracemalloc.take_snapshot().compare_to(snap, os.environ.get("KEY", "traceback"))
                    for st in top[:25]:
                        print("#", st.size_diff // max(1, srv.sessions), "B/session", st.count_diff,
                              " <- ".join(f"{f.filename.split('/')[-1]}:{f.lineno}" for f in st.traceback),
                              file=sys.stderr)
                snap = tracemalloc.take_snapshot()
eventloop.run(main(), sys.argv[1])
'''


async def clients(port: int, n: int) -> list[asyncio.StreamWriter]:
    ws = []

    async def one() -> None:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await r.readline()
        w.write(b"EHLO idle.test\r\nNOOP\r\n")
        while (await r.readline())[3:4] == b"-":
            pass
        await r.readline()
        ws.append(w)
    for i in range(0, n, 200):
        await asyncio.gather(*(one() for _ in range(min(200, n - i))))
    return ws


def measure(loop: str, n: int, trace: bool) -> tuple[float, float]:
    args = [sys.executable, "-c", SERVER, loop, "1" if trace else "0", *(["--top"] if "--top" in sys.argv else [])]
    p = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert p.stdin is not None and p.stdout is not None
    port = int(p.stdout.readline())

    def ask() -> tuple[int, int, int]:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write("measure\n")
        p.stdin.flush()
        a, b, c = p.stdout.readline().split()
        return int(a), int(b), int(c)

    async def run() -> tuple[float, float]:
        ask()
        w0 = await clients(port, 200)      # warm up: first allocations of every kind
        rss0, heap0, _ = ask()
        ws = await clients(port, n)
        await asyncio.sleep(1)
        rss1, heap1, open_ = ask()
        assert open_ == n + 200, open_
        for w in ws + w0:
            w.close()
        return (rss1 - rss0) / n, (heap1 - heap0) / 1024 / n
    try:
        return asyncio.run(run())
    finally:
        p.stdin.close()
        p.wait(timeout=30)


def main() -> int:
    logging.disable(logging.CRITICAL)
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    pos = [a for a in sys.argv[1:] if not a.startswith("--")]
    n = int(pos[0]) if pos else 2000
    loops = pos[1:] or ["asyncio", "uvloop"]
    os.chdir(Path(__file__).resolve().parent.parent)
    for loop in loops:
        rss, _ = measure(loop, n, False)
        _, heap = measure(loop, n, True)
        print(f"{loop}: {n} idle sessions: {rss:.2f} KiB RSS per session, {heap:.2f} KiB Python heap per session")
    return 0


if __name__ == "__main__":
    sys.exit(main())
