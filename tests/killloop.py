"""The SIGKILL loop: ``postgate serve`` killed at random moments while clients send mail, restarted, killed
again; at the end every message that got a 250 must arrive at its destination (lost: must be 0), and
messages that arrived more than once are counted (a kill between the next hop's 250 and the queue's record
of it makes a duplicate; RFC 5321 §6.1 accepts that, a loss never).

Used by ``tests/test_killloop.py``: bounded in the suite, for minutes with ``scripts/soak`` (which sets
``POSTGATE_SOAK_KILLS``).
"""

from __future__ import annotations

import os
import random
import secrets
import signal
import smtplib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from fixtures.pgserve import TRUSTED, PostgateServer
from fixtures.testnet import TestNet

DESTINATION = "dane-ok.test"
RECEIVER = "mx.dane-ok.test"


@dataclass
class Report:
    mode: str
    kills: int
    acked: int = 0
    delivered: int = 0
    lost: list[str] = field(default_factory=list)
    duplicates: int = 0
    refused: int = 0               # client tries that got no 250 (server down or killed first): not lost
    corrupt_files: int = 0
    tracebacks: int = 0
    seconds: float = 0.0
    last_client_error: str = ""
    log_tail: str = ""

    def line(self) -> str:
        return (f"mode={self.mode} kills={self.kills} acked={self.acked} delivered={self.delivered} "
                f"lost={len(self.lost)} duplicates={self.duplicates} failed_client_tries={self.refused} "
                f"corrupt_files={self.corrupt_files} tracebacks={self.tracebacks} seconds={self.seconds:.0f} "
                f"(last client error: {self.last_client_error or 'none'})")


def _body(run: str, token: str) -> bytes:
    return (f"From: <loop@client.test>\r\nTo: <bob@{DESTINATION}>\r\nSubject: {run} {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\n{token}\r\n" + ("y" * 76 + "\r\n") * 20).encode()


class Client(threading.Thread):
    """Sends one message after the other, reconnecting whenever the server is gone."""

    def __init__(self, address: str, run: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.address, self.run_id, self.stop = address, run, stop
        self.acked: list[str] = []
        self.refused = 0
        self.last_error = ""

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                with smtplib.SMTP(self.address, 25, timeout=20, source_address=(TRUSTED, 0)) as s:
                    s.ehlo("client.test")
                    while not self.stop.is_set():
                        token = secrets.token_hex(6)
                        s.mail("loop@client.test")
                        s.rcpt(f"bob@{DESTINATION}")
                        code, _ = s.data(_body(self.run_id, token))
                        if code == 250:
                            self.acked.append(token)
                        else:
                            self.refused += 1
            except (OSError, smtplib.SMTPException) as e:
                if not isinstance(e, ConnectionRefusedError):
                    self.last_error = repr(e)
                self.refused += 1
                time.sleep(0.02)


def _queued(spool: Path) -> int:
    return sum(len(os.listdir(spool / d)) for d in ("incoming", "deferred", "active") if (spool / d).exists())


def kill_loop(net: TestNet, directory: Path, *, mode: str, kills: int, address: str, clients: int = 3,
              max_gap: float = 0.6, seed: int | None = None, drain: float = 90.0) -> Report:
    rng = random.Random(seed)
    run = f"loop-{secrets.token_hex(4)}"
    pg = PostgateServer(net, directory, address=address, prequeue={"mode": mode, "budget": 10.0},
                        queue={"min_backoff": 1.0, "max_backoff": 2.0})
    report = Report(mode, kills)
    t0 = time.monotonic()
    stop = threading.Event()
    workers = [Client(address, run, stop) for _ in range(clients)]
    pg.start()
    for w in workers:
        w.start()
    try:
        for _ in range(kills):
            time.sleep(rng.uniform(0.05, max_gap))   # a random moment: in a session, a batch, a delivery
            assert pg.proc is not None
            pg.proc.send_signal(signal.SIGKILL)
            pg.proc.wait()
            pg.start()
    finally:
        stop.set()
        for w in workers:
            w.join(30)
    # the last run delivers what is queued
    deadline = time.monotonic() + drain
    while time.monotonic() < deadline and _queued(pg.spool):
        time.sleep(0.2)
    time.sleep(0.5)
    pg.stop()
    report.seconds = time.monotonic() - t0
    acked = [t for w in workers for t in w.acked]
    report.acked = len(acked)
    report.refused = sum(w.refused for w in workers)
    report.last_client_error = next((w.last_error for w in workers if w.last_error), "")
    copies: dict[str, int] = {}
    for m in net.received(RECEIVER):
        if f"Subject: {run} " in m["data"]:
            token = m["data"].split(f"Subject: {run} ", 1)[1].split("\n", 1)[0].strip()
            copies[token] = copies.get(token, 0) + 1
    report.delivered = len(copies)
    report.lost = [t for t in acked if t not in copies]
    report.duplicates = sum(n - 1 for n in copies.values() if n > 1)
    corrupt = pg.spool / "corrupt"
    report.corrupt_files = len(os.listdir(corrupt)) if corrupt.exists() else 0
    report.tracebacks = pg.log().count("Traceback")
    report.log_tail = pg.log()[-4000:]
    return report
