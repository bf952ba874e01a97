"""Child process for the crash-safety tests: enqueue messages and run the queue against the test network.

    python -m tests.queue_child MANIFEST SPOOL enqueue-and-run N DOMAIN
    python -m tests.queue_child MANIFEST SPOOL run

Prints ``ACK <queue id> <token>`` the moment a message is durably enqueued (the point where an SMTP
server would answer 250). ``POSTGATE_CRASH_AT`` makes it SIGKILL itself at a chosen point.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
import time
from pathlib import Path

from postgate.outbound.delivery import Deliverer, DeliveryConfig
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.queue.spool import DirectorySpool
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts


def body(token: str) -> bytes:
    filler = ("x" * 70 + "\r\n") * 200  # ~14 KB, so a torn write would show
    return f"Subject: {token}\r\nMessage-ID: <{token}@crash.test>\r\n\r\n{token}\r\n{filler}END {token}\r\n".encode()


async def run_queue(spool: DirectorySpool, manifest: dict[str, str]) -> None:
    r = Resolver([(manifest["resolver"], 53)], load_anchors(Path(manifest["trust_anchor_file"])), timeout=3)
    d = Deliverer(r, DeliveryConfig(helo="crash.test", timeouts=Timeouts(3, 3, 3, 3, 5)))
    # one delivery at a time, so "the n-th pass through a crash point" names one state: with parallel
    # deliveries a message could already be accepted remotely (not yet recorded) when another's record
    # crashes, and its retry would be an expected duplicate at a point that allows none
    s = Scheduler(spool, d, SchedulerConfig(reporting_mta="crash.test", destination_concurrency=1))
    try:
        for _ in range(50):
            await s.run_once()
            if not any(st in ("incoming", "deferred", "active") for st, _, _ in spool.entries()):
                return
            time.sleep(0.05)
    finally:
        await d.close()


def main() -> int:
    manifest = json.loads(Path(sys.argv[1]).read_text())
    spool = DirectorySpool(sys.argv[2])
    if not spool.try_lock():
        print("spool locked", file=sys.stderr)
        return 1
    spool.recover()
    if sys.argv[3] == "enqueue-and-run":
        n, domain = int(sys.argv[4]), sys.argv[5]
        for _ in range(n):
            token = secrets.token_hex(8)
            content = body(token)
            env = Envelope.new("sender@crash.test", [Recipient(f"bob@{domain}")], content)
            spool.enqueue(env, content)
            print(f"ACK {env.id} {token}", flush=True)
    asyncio.run(run_queue(spool, manifest))
    print("DONE", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
