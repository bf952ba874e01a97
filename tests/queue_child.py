"""Child process for the crash-safety tests: enqueue messages and run the queue against the test network.

    python -m tests.queue_child MANIFEST SPOOL enqueue-and-run N DOMAIN [WAVE]
    python -m tests.queue_child MANIFEST SPOOL run

WAVE messages are enqueued at once (one group-commit batch), wave after wave. Prints
``ACK <queue id> <token>`` the moment a message is durably enqueued (the point where an SMTP
server would answer 250). ``POSTGATE_CRASH_AT`` makes it SIGKILL itself at a chosen point.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import sys
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
        if os.environ.get("QUEUE_CHILD_FRESH"):   # new mail handed over in memory first, as serve does
            await s.run_once(fresh=True)
        for _ in range(50):
            await s.run_once()
            if not any(e.state in ("incoming", "deferred", "active") for e in await spool.entries()):
                return
            await asyncio.sleep(0.05)
    finally:
        await d.close()


async def amain(manifest: dict[str, str], spool: DirectorySpool, argv: list[str]) -> int:
    if not await spool.try_lock():
        print("spool locked", file=sys.stderr)
        return 1
    await spool.recover()
    if os.environ.get("QUEUE_CHILD_FRESH"):
        spool.hand_over("local", 3600.0)
    if argv[0] == "enqueue-and-run":
        # waves of concurrent enqueues, so the group commit writes several messages per batch
        n, domain, wave = int(argv[1]), argv[2], int(argv[3]) if len(argv) > 3 else 1

        async def one() -> None:
            token = secrets.token_hex(8)
            content = body(token)
            local = os.environ.get("QUEUE_CHILD_LOCAL", "bob")   # e.g. reject-…: a bounce (DSN) is queued
            env = Envelope.new("sender@crash.test", [Recipient(f"{local}@{domain}")], content)
            await spool.enqueue(env, content)
            print(f"ACK {env.id} {token}", flush=True)

        for start in range(0, n, wave):
            await asyncio.gather(*(one() for _ in range(min(wave, n - start))))
    await run_queue(spool, manifest)
    await spool.unlock()
    print("DONE", flush=True)
    return 0


def main() -> int:
    manifest = json.loads(Path(sys.argv[1]).read_text())
    return asyncio.run(amain(manifest, DirectorySpool(sys.argv[2]), sys.argv[3:]))


if __name__ == "__main__":
    sys.exit(main())
