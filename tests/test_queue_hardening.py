"""Issue 13, the queue's part: no exception strands a message, leases come back while running, a full disk
recovers without a restart, a read-only spool is refused cleanly. Real delivery on the test network; the
full disk and the read-only spool are real tmpfs mounts inside the test's mount namespace."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import smtplib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from postgate.outbound import crash
from postgate.outbound.delivery import Deliverer, DeliveryConfig
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.protocol import SpoolError, State
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.queue.spool import DirectorySpool
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.policy.vocab import Outcome

from fixtures.pgserve import TRUSTED, PostgateServer
from fixtures.testnet import TestNet

DELIVERED = Outcome.DELIVERED

T0 = 1_800_000_000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def _pass(net: TestNet, s: Scheduler) -> int:
    """One scheduler pass with a fresh delivery agent (asyncio.run closes its loop)."""
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)
    d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))
    s.deliverer = d

    async def go() -> int:
        try:
            return await s.run_once()
        finally:
            await d.close()
    return asyncio.run(go())


def _scheduler(spool: DirectorySpool, clock: Clock) -> Scheduler:
    return Scheduler(spool, Deliverer.__new__(Deliverer), SchedulerConfig(reporting_mta="queue.test"), clock=clock)


def _msg(token: str) -> bytes:
    return f"Subject: {token}\r\nMessage-ID: <{token}@queue.test>\r\n\r\n{token}\r\n".encode()


def _copies(net: TestNet, token: str) -> int:
    return sum(f"Subject: {token}" in m["data"] for m in net.received("mx.dane-ok.test"))


@contextlib.contextmanager
def _tmpfs(path: Path, *options: str) -> Iterator[Path]:
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(("size=512k", *options)), "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


# --- item 1: no exception may strand a message ------------------------------------------------------------

def test_unexpected_error_in_an_attempt_becomes_a_deferral_with_backoff(
        testnet: TestNet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    spool = DirectorySpool(tmp_path)
    content = _msg("stranded-1")
    env = Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], content, now=clock.t)
    spool.files.enqueue(env, content)
    s = _scheduler(spool, clock)
    caplog.set_level(logging.INFO, logger="postgate.queue")
    # what the issue saw was an encoding error escaping from the SMTP client in the middle of the transaction;
    # delivery now turns that one into a deferral of its own (SMTPUTF8 handling, RFC 6531), so the scheduler's
    # net is shown with an error nothing below it expects
    crash.inject("delivery-before-data", LookupError("an error nobody expected"))
    try:
        assert _pass(testnet, s) == 1
    finally:
        crash.inject("delivery-before-data", None)
    assert spool.files.state_of(env.id) == State.DEFERRED          # not stranded in active/
    deferred = spool.files.read_envelope("deferred", env.id)
    assert deferred.next_attempt == clock.t + 300                     # the first backoff, not a tight loop
    assert deferred.recipients[0].status == "deferred" and "LookupError" in deferred.recipients[0].reason
    assert s.counters.values["attempt_error"] == 1
    assert f"{env.id}: status=deferred (internal error" in caplog.text
    assert _pass(testnet, s) == 0                                     # waits for its backoff
    clock.t += 300
    assert _pass(testnet, s) == 1
    assert spool.files.state_of(env.id) is None and _copies(testnet, "stranded-1") == 1


# --- item 1: leases come back while running --------------------------------------------------------------

def test_expired_lease_is_taken_back_while_running(testnet: TestNet, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    spool = DirectorySpool(tmp_path)
    content = _msg("lease-1")
    env = Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], content, now=clock.t)
    spool.files.enqueue(env, content)
    # an attempt took the message and never came back (its task died): the lease is all that is left
    [(lease, _)] = spool.files.lease_due(clock.t, "local", 600, 10)
    s = _scheduler(spool, clock)
    assert _pass(testnet, s) == 0 and spool.files.state_of(env.id) == State.ACTIVE   # lease still valid
    clock.t = lease.until
    caplog.set_level(logging.WARNING, logger="postgate.queue")
    assert _pass(testnet, s) == 1                                     # taken back and delivered, no restart
    assert f"{env.id}: lease taken back" in caplog.text and s.counters.values["lease_reclaimed"] == 1
    assert spool.files.state_of(env.id) is None and _copies(testnet, "lease-1") == 1


# --- item 2: disk full ------------------------------------------------------------------------------------

def _fill(fs: Path) -> Path:
    filler = fs / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_disk_full_during_retries_recovers_without_restart(testnet: TestNet, tmp_path: Path) -> None:
    clock = Clock()
    with _tmpfs(tmp_path / "fs") as fs:
        spool = DirectorySpool(fs / "spool")
        content = _msg("full-1")
        env = Envelope.new("alice@client.test", [Recipient("tempfail-1@dane-ok.test"),
                                                 Recipient("ok@dane-ok.test")], content, now=clock.t)
        spool.files.enqueue(env, content)
        filler = _fill(fs)
        # a message refused on the full disk: an error for the SMTP server (451), and nothing left behind
        refused = Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], _msg("refused"), now=clock.t)
        with pytest.raises(SpoolError):
            asyncio.run(spool.enqueue(refused, _msg("refused")))
        assert os.listdir(fs / "spool" / "tmp") == [] and not (fs / "spool" / "messages" / refused.id).exists()
        assert spool.files.state_of(refused.id) is None
        # a retry on the full disk: delivered to one recipient, deferred for the other, and the deferral
        # cannot be written; nothing escapes the pass
        s = _scheduler(spool, clock)
        assert _pass(testnet, s) == 1
        assert s.counters.values["release_error"] >= 1 and spool.files.state_of(env.id) == State.ACTIVE
        os.unlink(filler)                                              # space returns
        _pass(testnet, s)                                              # the next pass (one tick later)
        assert spool.files.state_of(env.id) == State.DEFERRED         # no restart needed
        e = spool.files.read_envelope("deferred", env.id)
        assert [r.status for r in e.recipients] == ["deferred", DELIVERED]  # never delivered twice
        assert e.next_attempt == clock.t + 300
        assert _copies(testnet, "full-1") == 1
        assert asyncio.run(spool.enqueue(refused, _msg("refused"))) == refused.id   # accepting again
        assert os.listdir(fs / "spool" / "tmp") == []


# --- item 12: a read-only spool ----------------------------------------------------------------------------

def test_read_only_spool_is_refused_with_exit_78(testnet: TestNet, tmp_path: Path) -> None:
    pg = PostgateServer(testnet, tmp_path / "pg")
    with _tmpfs(pg.spool, "ro"):
        res = subprocess.run([sys.executable, "-m", "postgate.cli", "serve", "--config", str(pg.config)],
                             capture_output=True, text=True, timeout=120)
    assert res.returncode == 78, res.stderr
    assert "refusing to start: [queue] directory:" in res.stderr and "Read-only file system" in res.stderr
    assert "Traceback" not in res.stderr


def test_full_disk_gives_451_and_leaves_nothing_then_accepts_again(testnet: TestNet, tmp_path: Path) -> None:
    """End to end: a full spool disk is no reason not to start; mail gets 451 (never a 250 it cannot keep)
    and leaves no file behind; once space returns the same server accepts and delivers without restart."""
    pg = PostgateServer(testnet, tmp_path / "pg", address="127.0.2.2", prequeue={"mode": "queue-first"})
    with _tmpfs(pg.spool):
        filler = _fill(pg.spool)
        with pg:
            spool = pg.spool
            with smtplib.SMTP("127.0.2.2", 25, timeout=30, source_address=(TRUSTED, 0)) as s:
                s.ehlo("client.test")
                s.mail("alice@client.test")
                s.rcpt("bob@dane-ok.test")
                code, text = s.data(_msg("full-disk-1"))
                assert code == 451, text
                assert os.listdir(spool / "tmp") == [] and os.listdir(spool / "messages") == []
                assert os.listdir(spool / "incoming") == []
                os.unlink(filler)
                s.mail("alice@client.test")
                s.rcpt("bob@dane-ok.test")
                code, text = s.data(_msg("full-disk-2"))
                assert code == 250, text
            deadline = time.monotonic() + 30
            while _copies(testnet, "full-disk-2") == 0 and time.monotonic() < deadline:
                time.sleep(0.1)
            assert _copies(testnet, "full-disk-2") == 1 and _copies(testnet, "full-disk-1") == 0
            assert "Traceback" not in pg.log()
