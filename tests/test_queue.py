"""The local queue: crash safety under SIGKILL, corrupt files, retry timing, expiry, DSNs, queue CLI."""

from __future__ import annotations

import asyncio
import email
import email.policy
import json
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from postgate.outbound.delivery import Deliverer, DeliveryConfig
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.queue.spool import DirectorySpool
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.policy.vocab import Outcome

from fixtures.testnet import TestNet
from tests.queue_child import body

# --- crash safety --------------------------------------------------------------------------------------

CRASH_POINTS = [
    # (crash point, n-th pass, duplicates allowed). Six messages are enqueued in waves of three, so the
    # group commit writes batches of several messages (outbound/queue/spool.py).
    ("spool-batch-written", 1, False),            # first batch written, nothing fsync'd
    ("spool-batch-written", 2, False),            # second batch written, the first acknowledged
    ("spool-batch-synced", 1, False),             # first batch durable, envelope index not yet written
    ("spool-batch-synced", 2, False),
    ("spool-index-linked", 2, False),             # in the middle of linking a batch's envelope index
    ("spool-enqueued", 2, False),                 # right after the second batch's acknowledgement point
    ("spool-leased-fresh", 2, False),             # new mail handed over to the runner: 2nd lease taken
    ("delivery-before-data", 1, False),           # connected, recipients accepted, DATA not sent
    ("queue-after-remote-reply", 1, True),        # the remote said 250, the result is not yet recorded
    ("queue-after-record", 2, False),             # the results are durable (delivered: removed)
    ("spool-results-written", 2, False),          # a delivered message's file unlinked, nothing synced yet
    ("spool-results-synced", 2, False),           # its removal durable, the envelope not yet removed
    ("spool-deleted-message", 3, False),          # a delivered message's file removed, envelope not yet
]


def _child(net: TestNet, spool: Path, *args: str, crash: str = "",
           fresh: bool = False) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("POSTGATE_CRASH_AT", None)
    env.pop("QUEUE_CHILD_FRESH", None)
    if fresh:   # the runner takes new mail from the in-memory hand-over (lease_fresh), as serve does
        env["QUEUE_CHILD_FRESH"] = "1"
    if crash:
        env["POSTGATE_CRASH_AT"] = crash
    return subprocess.run([sys.executable, "-m", "tests.queue_child", str(net.state / "manifest.json"), str(spool),
                           *args], capture_output=True, text=True, timeout=120, env=env)


@pytest.mark.parametrize(("point", "nth", "dupes"), CRASH_POINTS, ids=[f"{p}:{n}" for p, n, _ in CRASH_POINTS])
def test_sigkill_loses_nothing_acknowledged(testnet: TestNet, tmp_path: Path, point: str, nth: int,
                                            dupes: bool) -> None:
    spool = tmp_path / "spool"
    first = _child(testnet, spool, "enqueue-and-run", "6", "dane-ok.test", "3", crash=f"{point}:{nth}",
                   fresh=point == "spool-leased-fresh")
    assert first.returncode == -signal.SIGKILL, first.stderr
    acked = [line.split()[2] for line in first.stdout.splitlines() if line.startswith("ACK ")]
    second = _child(testnet, spool, "run")
    assert second.returncode == 0 and "DONE" in second.stdout, second.stderr
    received = [m for m in testnet.received("mx.dane-ok.test") if "@crash.test" in m["data"]]
    for token in acked:
        copies = [m for m in received if f"Subject: {token}" in m["data"]]
        assert copies, f"acknowledged message {token} was lost (crash at {point}:{nth})"
        assert len(copies) == 1 or dupes, f"{token} delivered {len(copies)} times"
        for m in copies:  # nothing partial is ever delivered
            assert m["data"].encode().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n") == body(token)
    # whatever was not acknowledged was either never delivered or delivered whole, and the queue is empty
    left = {d: os.listdir(spool / d) for d in ("incoming", "deferred", "active", "hold", "messages", "tmp")}
    assert all(not v for v in left.values()), left
    # a crash is not corruption: its leftovers are cleaned silently (issue 13 item 11)
    assert os.listdir(spool / "corrupt") == [] and "status=corrupt" not in second.stderr, second.stderr


# --- spool files ---------------------------------------------------------------------------------------

def test_corrupt_files_go_to_corrupt_and_crash_leftovers_are_cleaned(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    s = DirectorySpool(tmp_path)
    good = Envelope.new("a@x.test", [Recipient("b@y.test")], b"Subject: ok\r\n\r\nok\r\n")
    s.files.enqueue(good, b"Subject: ok\r\n\r\nok\r\n")
    trunc = Envelope.new("a@x.test", [Recipient("b@y.test")], b"Subject: t\r\n\r\nlong body\r\n")
    s.files.enqueue(trunc, b"Subject: t\r\n\r\nlong body\r\n")
    (tmp_path / "messages" / trunc.id).write_bytes(b"Subject: t\r\n")      # truncated content
    garbage = Envelope.new("a@x.test", [Recipient("b@y.test")], b"x")
    s.files.enqueue(garbage, b"x")
    (tmp_path / "deferred" / garbage.id).write_bytes(b'{"format": 1, "id": ')  # half-written envelope
    os.unlink(tmp_path / "incoming" / garbage.id)
    # what a kill leaves is not corruption (issue 13 item 11): an unfinished envelope update, the envelope
    # of a delivered message whose message file was already removed, a torn message file of a batch that
    # was never acknowledged, and a complete message file whose envelope index was not yet written
    (tmp_path / "tmp" / "0660FB0000000000AAAA.1234").write_bytes(b"partial")
    done = Envelope.new("a@x.test", [Recipient("b@y.test")], b"gone")
    s.files.enqueue(done, b"gone")
    os.unlink(tmp_path / "messages" / done.id)
    torn = Envelope.new("a@x.test", [Recipient("b@y.test")], b"o")
    (tmp_path / "messages" / torn.id).write_bytes(torn.to_bytes()[:30])
    unindexed = Envelope.new("a@x.test", [Recipient("b@y.test")], b"u")
    s.files.enqueue(unindexed, b"u")
    os.unlink(tmp_path / "incoming" / unindexed.id)
    caplog.set_level(logging.INFO, logger="postgate.queue")
    s2 = DirectorySpool(tmp_path)
    assert s2.files.try_lock()
    s2.files.recover()
    corrupt = sorted(os.listdir(tmp_path / "corrupt"))
    assert corrupt == sorted([trunc.id, f"{trunc.id}.content", garbage.id, f"{garbage.id}.content"])
    assert os.listdir(tmp_path / "tmp") == [] and not (tmp_path / "messages" / torn.id).exists()
    assert not (tmp_path / "incoming" / done.id).exists()
    assert sorted(os.listdir(tmp_path / "incoming")) == sorted([good.id, unindexed.id])
    assert caplog.text.count("status=corrupt") == 2
    leased = s2.files.lease_due(good.next_attempt + 1, "t", 60, 10)
    # only the good ones are ever offered for delivery, whole
    assert sorted(env.id for _, env in leased) == sorted([good.id, unindexed.id])
    assert s2.files.content(unindexed.id) == b"u"


def test_spool_written_before_group_commit_is_still_delivered_whole(tmp_path: Path) -> None:
    """A message file without the envelope line (the layout before group commit) is all content."""
    s = DirectorySpool(tmp_path)
    content = b"Subject: old\r\n\r\nwritten by the previous version\r\n"
    env = Envelope.new("a@x.test", [Recipient("b@y.test")], content)
    (tmp_path / "messages" / env.id).write_bytes(content)
    s.files._write(s.files.path("incoming", env.id), env.to_bytes())
    assert s.files.try_lock()
    s.files.recover()
    assert os.listdir(tmp_path / "corrupt") == []
    [(_, leased)] = s.files.lease_due(env.next_attempt + 1, "t", 60, 10)
    assert leased.id == env.id and s.files.content(env.id) == content


def test_second_owner_is_refused(tmp_path: Path) -> None:
    a, b = DirectorySpool(tmp_path), DirectorySpool(tmp_path)
    assert a.files.try_lock() and not b.files.try_lock()
    a.files.unlock()
    assert b.files.try_lock()


# --- scheduling with a controllable clock, real delivery ------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _scheduler(net: TestNet, spool: DirectorySpool, clock: Clock, **kw: float) -> tuple[Scheduler, Deliverer]:
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)
    d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))
    return Scheduler(spool, d, SchedulerConfig(reporting_mta="queue.test", **kw), clock=clock), d


def _run(s: Scheduler, d: Deliverer) -> int:
    async def go() -> int:
        try:
            return await s.run_once()
        finally:
            await d.close()
    return asyncio.run(go())


def _enqueue(spool: DirectorySpool, clock: Clock, sender: str, rcpts: list[Recipient], content: bytes,
             **kw: object) -> Envelope:
    env = Envelope.new(sender, rcpts, content, now=clock.t, **kw)  # type: ignore[arg-type]
    spool.files.enqueue(env, content)
    return env


def _bounces(spool: DirectorySpool) -> list[tuple[Envelope, email.message.Message]]:
    out = []
    for e in spool.files.entries():
        if e.envelope is not None and e.envelope.is_bounce:
            out.append((e.envelope, email.message_from_bytes(spool.files.content(e.id), policy=email.policy.default)))
    return out


def test_retry_timing_expiry_and_bounce_structure(testnet: TestNet, tmp_path: Path) -> None:
    clock = Clock()
    spool = DirectorySpool(tmp_path)
    content = b"From: a@client.test\r\nSubject: will expire\r\nMessage-ID: <exp@client.test>\r\n\r\nbody\r\n"
    env = _enqueue(spool, clock, "alice@client.test",
                   [Recipient("tempfail-1@dane-ok.test", orcpt="rfc822;tempfail-1@dane-ok.test"),
                    Recipient("ok@dane-ok.test")], content, envid="ENV-42")
    s, _d = _scheduler(testnet, spool, clock, delay_warning=0)
    start = clock.t
    waits = []
    for _ in range(12):
        assert _run(*_scheduler_pair(s, testnet, spool, clock)) == 1
        e = spool.files.read_envelope("deferred", env.id)
        waits.append(e.next_attempt - clock.t)
        assert _run(*_scheduler_pair(s, testnet, spool, clock)) == 0  # not due yet
        clock.t = e.next_attempt
        if clock.t - start > 5 * 86400:
            break
    assert waits[:6] == [300, 600, 1200, 2400, 4000, 4000]   # 5 min doubling to 4000 s
    # the delivered recipient stays delivered and is never retried
    e = spool.files.read_envelope("deferred", env.id)
    assert [r.status for r in e.recipients] == [Outcome.DEFERRED, Outcome.DELIVERED]
    ok_copies = [m for m in testnet.received("mx.dane-ok.test") if "ok@dane-ok.test" in m["rcpt_tos"]
                 and "will expire" in m["data"]]
    assert len(ok_copies) == 1
    # past the maximal lifetime: bounced with the delivery's reason
    clock.t = start + 5 * 86400 + 1
    e.next_attempt = clock.t
    spool.files._write(spool.files.path("deferred", env.id), e.to_bytes())
    _run(*_scheduler_pair(s, testnet, spool, clock))
    assert spool.files.state_of(env.id) is None
    [(benv, msg)] = _bounces(spool)
    assert benv.sender == "" and [r.address for r in benv.recipients] == ["alice@client.test"]
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    parts = list(msg.iter_parts())
    assert [p.get_content_type() for p in parts] == ["text/plain", "message/delivery-status", "message/rfc822"]
    status = parts[1].get_payload()
    per_msg, per_rcpt = status[0], status[1]
    assert per_msg["Reporting-MTA"] == "dns; queue.test" and per_msg["Original-Envelope-Id"] == "ENV-42"
    assert per_rcpt["Final-Recipient"] == "rfc822; tempfail-1@dane-ok.test"
    assert per_rcpt["Original-Recipient"] == "rfc822;tempfail-1@dane-ok.test"
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"].startswith("4.")
    assert "try again later" in per_rcpt["Diagnostic-Code"] and "expired" in per_rcpt["Diagnostic-Code"]
    assert len(status) == 2  # the delivered recipient is not in the bounce
    assert parts[2].get_payload()[0]["Message-ID"] == "<exp@client.test>"


def _scheduler_pair(s: Scheduler, net: TestNet, spool: DirectorySpool, clock: Clock) -> tuple[Scheduler, Deliverer]:
    """A fresh delivery agent per pass (asyncio.run closes its loop), keeping the scheduler's state."""
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)
    d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))
    s.deliverer = d
    return s, d


def test_permanent_failure_bounces_now_never_to_null_sender(testnet: TestNet, tmp_path: Path) -> None:
    clock = Clock()
    spool = DirectorySpool(tmp_path)
    content = b"Subject: hello\r\n\r\nbody\r\n"
    _enqueue(spool, clock, "alice@client.test", [Recipient("reject-1@dane-ok.test")], content, ret="HDRS")
    _enqueue(spool, clock, "", [Recipient("reject-2@dane-ok.test")], content)
    _enqueue(spool, clock, "bob@client.test", [Recipient("reject-3@dane-ok.test", notify=["NEVER"])], content)
    s, d = _scheduler(testnet, spool, clock)
    assert _run(s, d) == 3
    bounces = _bounces(spool)
    assert len(bounces) == 1  # none for <>, none for NOTIFY=NEVER
    benv, msg = bounces[0]
    assert benv.recipients[0].address == "alice@client.test"
    parts = list(msg.iter_parts())
    assert parts[2].get_content_type() == "text/rfc822-headers"  # RET=HDRS
    assert parts[1].get_payload()[1]["Status"] == "5.1.1"
    # the bounce itself goes out from the null sender and, if it fails, produces no second bounce
    assert benv.sender == "" and benv.is_bounce


def test_delay_warning_once(testnet: TestNet, tmp_path: Path) -> None:
    import secrets
    clock = Clock()
    spool = DirectorySpool(tmp_path)
    sender = f"warn-{secrets.token_hex(6)}@dane-ok.test"
    env = _enqueue(spool, clock, sender, [Recipient("tempfail-9@dane-ok.test")], b"Subject: d\r\n\r\nx\r\n")
    s, d = _scheduler(testnet, spool, clock, delay_warning=3600)
    _run(s, d)
    assert _bounces(spool) == []
    for _ in range(4):
        clock.t += 4000
        _run(*_scheduler_pair(s, testnet, spool, clock))
    # the warning was queued once, delivered for real to the sender's MX, from the null sender
    notices = [m for m in testnet.received("mx.dane-ok.test") if m["rcpt_tos"] == [sender]]
    assert len(notices) == 1 and notices[0]["mail_from"] in ("<>", "")
    msg = email.message_from_string(notices[0]["data"], policy=email.policy.default)
    per_rcpt = list(msg.iter_parts())[1].get_payload()[1]
    assert per_rcpt["Action"] == "delayed" and "Will-Retry-Until" in per_rcpt
    assert spool.files.read_envelope("deferred", env.id).delay_warned


def test_dead_destination_is_not_hammered(testnet: TestNet, tmp_path: Path) -> None:
    clock = Clock()
    spool = DirectorySpool(tmp_path)
    for i in range(3):
        _enqueue(spool, clock, "alice@client.test", [Recipient(f"u{i}@dead.test")], b"Subject: x\r\n\r\nx\r\n")
    s, _d = _scheduler(testnet, spool, clock, destination_backoff=3600, min_backoff=60)
    r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
    calls: list[int] = []
    real = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))

    class Counting:
        async def deliver(self, *a: object, **kw: object) -> list:  # type: ignore[type-arg]
            calls.append(1)
            return await real.deliver(*a, **kw)  # type: ignore[arg-type]

    s.deliverer = Counting()
    asyncio.run(s.run_once())
    assert len(calls) == 1  # the first failure marks the destination; the two others wait
    clock.t += 120
    asyncio.run(s.run_once())
    assert len(calls) == 1  # still backing off
    clock.t += 3600
    asyncio.run(s.run_once())
    assert len(calls) == 2


def test_one_attempt_lost_among_answered_ones_leaves_the_destination_open(testnet: TestNet, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    """Postfix's failed pseudo-cohort rule (qmgr_queue_throttle): one attempt that no server answered, among
    concurrent ones that were answered, narrows the destination's window but does not make it dead (before,
    it backed the destination off for ``destination_backoff``, on a shared queue for every node); a whole
    window of unanswered attempts does. The unanswered attempt is real: its recipient is routed (a Sieve
    route) to a server that greets and then says nothing, so it ends in the client's timeout."""
    clock = Clock()
    spool = DirectorySpool(tmp_path)
    s, d = _scheduler(testnet, spool, clock, destination_backoff=3600, min_backoff=60)
    content = b"Subject: x\r\n\r\nx\r\n"
    tag = os.urandom(4).hex()

    def hung(i: int) -> Recipient:
        return Recipient(f"hung{i}-{tag}@dane-ok.test", tls_level="may", transport="smtp:[mx.hang.bad.test]")

    async def go() -> None:
        try:
            _enqueue(spool, clock, "alice@client.test", [Recipient(f"first-{tag}@dane-ok.test")], content)
            assert await s.run_once() == 1
            assert s._dest_limit("dane-ok.test") == 5       # answered: the initial window
            # a window's worth at once, one of them unanswered
            for i in range(3):
                _enqueue(spool, clock, "alice@client.test", [Recipient(f"ok{i}-{tag}@dane-ok.test")], content)
            lost = _enqueue(spool, clock, "alice@client.test", [hung(0)], content)
            caplog.clear()
            with caplog.at_level(logging.INFO, logger="postgate"):
                await s.run_once()
            assert spool.files.state_of(lost.id) == "deferred"
            assert not s._dest_dead("dane-ok.test", clock.t)
            assert await spool.backing_off(["dane-ok.test"], clock.t, 60) == {}   # nothing noted for others
            assert "backing off" not in caplog.text and "destination dane-ok.test: no answer" in caplog.text
            # the next message goes at once, without waiting for any backoff
            clock.t += 1
            nxt = _enqueue(spool, clock, "alice@client.test", [Recipient(f"next-{tag}@dane-ok.test")], content)
            await s.run_once()
            assert spool.files.state_of(nxt.id) is None                      # delivered and removed
            # a whole window of unanswered attempts with no answer between them: now it is dead
            clock.t += 1
            for i in range(1, 6):
                _enqueue(spool, clock, "alice@client.test", [hung(i)], content)
            await s.run_once()
            assert s._dest_dead("dane-ok.test", clock.t)
            assert "dane-ok.test" in await spool.backing_off(["dane-ok.test"], clock.t, 60)
            late = _enqueue(spool, clock, "alice@client.test", [Recipient(f"late-{tag}@dane-ok.test")], content)
            await s.run_once()
            assert spool.files.state_of(late.id) == "deferred"              # left alone while dead
        finally:
            await d.close()

    asyncio.run(go())
    got = testnet.received("mx.dane-ok.test")
    tos = {a for m in got for a in m["rcpt_tos"]}
    for name in ("first", "ok0", "ok1", "ok2", "next"):
        assert f"{name}-{tag}@dane-ok.test" in tos, name
    assert f"late-{tag}@dane-ok.test" not in tos


class _StallingServer:
    """A plain SMTP server in a thread of its own (so it runs while the event loop is blocked). At the first
    end of DATA it blocks the test's event loop for ``stall`` seconds — a stand-in for SIGSTOP or a VM
    freeze — and, if ``answer``, answers 250 during the stall (the client's overdue timeout and the unread
    answer meet when the loop runs again); else it never answers that message."""

    def __init__(self, loop: asyncio.AbstractEventLoop, stall: float, address: str, answer: bool) -> None:
        import socket
        import threading
        self.loop, self.stall, self.answer = loop, stall, answer
        self.sock = socket.create_server((address, 0))
        self.port = self.sock.getsockname()[1]
        self.messages = 0
        self.stalled = False
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        import time as _time
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, conn.makefile("rb") as r:
                conn.sendall(b"220 stall.test ESMTP\r\n")
                for line in r:
                    cmd = line[:4].upper()
                    if cmd in (b"EHLO", b"HELO", b"MAIL", b"RCPT", b"RSET", b"NOOP"):
                        conn.sendall(b"250 ok\r\n")
                    elif cmd == b"DATA":
                        conn.sendall(b"354 go on\r\n")
                        for body in r:
                            if body == b".\r\n":
                                break
                        self.messages += 1
                        if not self.stalled:
                            self.stalled = True
                            self.loop.call_soon_threadsafe(_time.sleep, self.stall)
                            _time.sleep(0.5)       # the loop is blocked now
                            if not self.answer:
                                for _ in r:        # no answer to this one: wait for the client to give up
                                    pass
                                break
                        conn.sendall(b"250 2.0.0 stored\r\n")
                    elif cmd == b"QUIT":
                        conn.sendall(b"221 bye\r\n")
                        break
                    else:
                        conn.sendall(b"500 what\r\n")

    def close(self) -> None:
        self.sock.close()


def _stall_case(testnet: TestNet, tmp_path: Path, answer: bool,
                check: Callable[[Scheduler, DirectorySpool, Clock, Envelope, _StallingServer], Awaitable[None]]) -> None:
    """One message to stall.test (never answered before: its first failure alone would make it dead), routed
    to a _StallingServer beside mx.dane-ok.test's receiver (a [host]:port route, as a filter sets), on
    uvloop (the daemon's loop by default: its turn runs the overdue timers before it reads the sockets;
    asyncio's reads first). The client's reply timeout is 1 s, the stall 3.5 s."""
    from postgate.outbound.queue.scheduler import STALL_MIN, STALL_TICK

    from postgate import eventloop

    clock = Clock()
    spool = DirectorySpool(tmp_path)
    r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
    d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 1)))
    s = Scheduler(spool, d, SchedulerConfig(reporting_mta="queue.test", destination_backoff=3600, min_backoff=60),
                  clock=clock)
    address = next(x.address for x in testnet.scenarios.receivers if x.host == "mx.dane-ok.test")

    async def go() -> None:
        server = _StallingServer(asyncio.get_running_loop(), STALL_TICK + STALL_MIN + 1.0, address, answer)
        try:
            env = _enqueue(spool, clock, "alice@client.test", [Recipient(
                "x@stall.test", tls_level="none", transport=f"smtp:[mx.dane-ok.test]:{server.port}")],
                b"Subject: stalled\r\n\r\nx\r\n")
            await s.run_once()
            assert server.stalled
            await check(s, spool, clock, env, server)
        finally:
            server.close()
            await d.close()

    eventloop.run(go(), "uvloop")


def test_an_answer_that_came_while_this_process_was_stalled_is_read_not_timed_out(
        testnet: TestNet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A node resumed from SIGSTOP (or a VM freeze) finds its attempts' timers run out while nothing ran,
    and the servers' answers waiting unread. The SMTP client sees its timer ran seconds late and looks once
    more (outbound/smtp_wire.py, STALL_GRACE): the 250 that came during the stall is read, the message is
    delivered once — before, it timed out, was retried (a duplicate), and the destination, never answered
    before, was made dead: on a shared queue for every node (what CI saw in the cluster kill test)."""
    async def check(s: Scheduler, spool: DirectorySpool, clock: Clock, env: Envelope,
                    server: _StallingServer) -> None:
        assert spool.files.state_of(env.id) is None and server.messages == 1     # delivered, once
        assert not s._dest_dead("stall.test", clock.t) and "backing off" not in caplog.text

    with caplog.at_level(logging.INFO, logger="postgate"):
        _stall_case(testnet, tmp_path, True, check)


def test_no_answer_while_this_process_was_stalled_is_not_the_destinations_failure(
        testnet: TestNet, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """An attempt under way while this process was stalled that got no answer at all is deferred as usual,
    but not held against its destination (outbound/queue/scheduler.py, the stall watch): no failed cohort,
    not dead, nothing noted for other nodes — the stall was ours. Its retry is delivered."""
    async def check(s: Scheduler, spool: DirectorySpool, clock: Clock, env: Envelope,
                    server: _StallingServer) -> None:
        assert spool.files.state_of(env.id) == "deferred" and server.messages == 1
        assert not s._dest_dead("stall.test", clock.t) and s._fail_cohorts.get("stall.test") is None
        assert await spool.backing_off(["stall.test"], clock.t, 60) == {}
        assert "process was stalled" in caplog.text and "not counted" in caplog.text
        assert "backing off" not in caplog.text and s.counters.values["stalled_attempt"] == 1
        clock.t += 61
        await s.run_once()
        assert spool.files.state_of(env.id) is None and server.messages == 2

    with caplog.at_level(logging.INFO, logger="postgate"):
        _stall_case(testnet, tmp_path, False, check)


@pytest.mark.parametrize(("value", "error"), [("0", True), ("nan", True), ("true", True), ("101", True),
                                             ("2.5", False)])
def test_failed_cohort_limit_is_checked(tmp_path: Path, value: str, error: bool) -> None:
    from postgate import config as configmod
    p = tmp_path / "postgate.toml"
    p.write_text(f"[queue]\nmin_backoff = 60\ndestination_failed_cohort_limit = {value}\n")
    if error:
        with pytest.raises(configmod.ConfigError, match=r"postgate.toml:3: \[queue\] destination_failed_cohort_limit"):
            configmod.load(p)
    else:
        assert configmod.load(p).queue.destination_failed_cohort_limit == 2.5


# --- queue CLI -----------------------------------------------------------------------------------------

def _cli(spool: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(spool), *args],
                          capture_output=True, text=True, timeout=60)


def test_queue_cli(tmp_path: Path) -> None:
    spool = DirectorySpool(tmp_path)
    a = Envelope.new("a@x.test", [Recipient("b@y.test")], b"one")
    spool.files.enqueue(a, b"one")
    b = Envelope.new("a@x.test", [Recipient("c@z.test")], b"two")
    spool.files.enqueue(b, b"two")
    rows = json.loads(_cli(tmp_path, "list", "--json").stdout)
    assert [(r["id"], r["state"]) for r in rows] == [(a.id, "incoming"), (b.id, "incoming")]
    assert _cli(tmp_path, "hold", a.id).returncode == 0
    assert spool.files.state_of(a.id) == "hold"
    shown = json.loads(_cli(tmp_path, "show", a.id, "--json").stdout)
    assert shown["state"] == "hold" and shown["recipients"][0]["address"] == "b@y.test"
    assert _cli(tmp_path, "release", a.id).returncode == 0 and spool.files.state_of(a.id) == "deferred"
    assert _cli(tmp_path, "delete", b.id).returncode == 0 and spool.files.state_of(b.id) is None
    assert not (tmp_path / "messages" / b.id).exists()
    assert _cli(tmp_path, "show", "NOTANID").returncode == 64
    assert _cli(tmp_path, "show", b.id).returncode == 66
    # while a daemon owns the spool, changes wait for it: nothing is touched behind its back
    assert spool.files.try_lock()
    res = _cli(tmp_path, "hold", a.id)
    assert "running daemon" in res.stdout and spool.files.state_of(a.id) == "deferred"
    asyncio.run(Scheduler(spool, Deliverer.__new__(Deliverer)).apply_requests())
    assert spool.files.state_of(a.id) == "hold"
    spool.files.unlock()
    assert "1 message" in _cli(tmp_path, "list").stdout
