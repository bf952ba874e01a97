"""Issue 15 item 5, the delivery side of the local queue: the scheduler is a continuous feeder (a slow
destination holds back no other), and the delivery results are written several per fsync (group commit)
without losing anything on SIGKILL. Real receivers: the test network's MX hosts and an aiosmtpd server
that holds its DATA reply until the test lets it go."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Session
from aiosmtpd.smtp import Envelope as SmtpEnvelope
from postgate.outbound.delivery import Deliverer, DeliveryConfig
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.protocol import State
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.queue.spool import DirectorySpool
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.policy.vocab import Outcome

from fixtures.pgserve import TRUSTED, PostgateServer
from fixtures.testnet import TestNet
from tests.test_inbound import client, data_reply


def _msg(token: str) -> bytes:
    return f"Subject: {token}\r\nMessage-ID: <{token}@feeder.test>\r\n\r\n{token}\r\n".encode()


def _copies(net: TestNet, token: str) -> int:
    return sum(f"Subject: {token}" in m["data"] for m in net.received("mx.dane-ok.test"))


def _all_copies(net: TestNet, tokens: list[str]) -> list[int]:
    """How many copies of each token arrived, from one read of the receiver's log."""
    received = net.received("mx.dane-ok.test")
    return [sum(f"Subject: {t}" in m["data"] for m in received) for t in tokens]


def _free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return int(s.getsockname()[1])


def _address(net: TestNet, host: str) -> str:
    return next(r.address for r in net.scenarios.receivers if r.host == host)


class HeldReceiver:
    """An SMTP server (aiosmtpd) that takes a message but holds its DATA reply until ``gate`` is set."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.stored: list[bytes] = []

    async def handle_DATA(self, server: SMTP, session: Session, envelope: SmtpEnvelope) -> str:
        self.entered.set()
        await asyncio.get_running_loop().run_in_executor(None, self.gate.wait, 60)
        self.stored.append(envelope.original_content or b"")
        return "250 2.0.0 stored late"


def test_slow_destination_does_not_hold_back_a_fast_one(testnet: TestNet, tmp_path: Path) -> None:
    """A message whose destination holds the DATA reply is in flight; mail to another destination that
    arrives meanwhile is delivered while it still waits (the old pass-based runner leased nothing new
    until its slowest message was done)."""
    spool = DirectorySpool(tmp_path / "spool")
    held = HeldReceiver()
    # the held receiver listens beside mx.dane-ok.test's, on a port of its own: a [host]:port transport
    # route (as a filter sets) leads the slow message there, without TLS
    address = _address(testnet, "mx.dane-ok.test")
    port = _free_port(address)
    ctl = Controller(held, hostname=address, port=port)
    ctl.start()
    fast = [f"fast-{i}-{os.getpid()}" for i in range(6)]
    seen: dict[str, object] = {}

    async def main() -> None:
        r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
        d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 60)))
        s = Scheduler(spool, d, SchedulerConfig(reporting_mta="queue.test"))
        stop = asyncio.Event()
        runner = asyncio.create_task(s.run(stop, tick=0.2))
        try:
            content = _msg("held-1")
            await spool.enqueue(Envelope.new("alice@client.test", [Recipient(
                "late@slow.test", tls_level="none", transport=f"smtp:[mx.dane-ok.test]:{port}")], content), content)
            s.wake.set()
            seen["entered"] = await asyncio.to_thread(held.entered.wait, 30)
            for t in fast:   # new mail while the slow attempt waits for its reply
                await spool.enqueue(Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], _msg(t)),
                                    _msg(t))
                s.wake.set()
            for _ in range(300):   # a bound, not a timing assertion: 30 s for six local deliveries
                if _all_copies(testnet, fast) == [1] * len(fast):
                    break
                await asyncio.sleep(0.1)
            seen["fast_while_held"] = [_copies(testnet, t) for t in fast]
            seen["slow_stored_before"] = len(held.stored)
            held.gate.set()
            for _ in range(300):
                if not any(e.state in (State.INCOMING, State.DEFERRED, State.ACTIVE) for e in await spool.entries()):
                    break
                await asyncio.sleep(0.1)
            seen["left"] = [(e.state, e.id) for e in await spool.entries()]
        finally:
            held.gate.set()
            stop.set()
            await runner
            await d.close()
            await spool.unlock()

    try:
        asyncio.run(main())
    finally:
        held.gate.set()
        ctl.stop()
    assert seen["entered"], "the held receiver never got the slow message"
    assert seen["slow_stored_before"] == 0                      # it was still waiting for its reply ...
    assert seen["fast_while_held"] == [1] * len(fast)           # ... while every fast message was delivered
    assert len(held.stored) == 1 and b"held-1" in held.stored[0]
    assert seen["left"] == []


def test_results_are_written_several_per_commit(testnet: TestNet, tmp_path: Path) -> None:
    """Twenty messages with a recipient that is deferred: the results committer writes their results in
    fewer batches than messages (group commit). Ten delivered messages are removed without any commit (a
    removal is not fsync'd: a power loss that undoes it costs a duplicate, RFC 5321 §6.1), each delivered
    once."""
    spool = DirectorySpool(tmp_path / "spool")
    deferred = [f"batch-{i}-{os.getpid()}" for i in range(20)]
    done = [f"done-{i}-{os.getpid()}" for i in range(10)]
    for t in deferred:
        spool.files.enqueue(Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test"),
                                                               Recipient("tempfail@dane-ok.test")], _msg(t)), _msg(t))
    for t in done:
        spool.files.enqueue(Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], _msg(t)), _msg(t))

    async def main() -> int:
        r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
        d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))
        s = Scheduler(spool, d, SchedulerConfig(reporting_mta="queue.test"))
        try:
            n = await s.run_once()          # the first one probes the destination: the others wait for it
            return n + await s.run_once()
        finally:
            await d.close()
            await spool.unlock()
    assert asyncio.run(main()) == 30
    assert [_copies(testnet, t) for t in deferred + done] == [1] * 30
    # a record and a release per deferred message, several per commit; a removal is done on the loop unless
    # the committer holds the spool's lock at that moment (then it goes to the committer: a few)
    assert 2 * 20 <= spool.results.messages < 2 * 20 + 10 and spool.results.batches < spool.results.messages
    assert len(os.listdir(tmp_path / "spool" / "deferred")) == 20 and len(os.listdir(tmp_path / "spool" / "messages")) == 20
    assert all(not os.listdir(tmp_path / "spool" / d) for d in ("incoming", "active", "tmp"))


def test_a_removal_is_not_fsynced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Removing a delivered message unlinks its files and syncs nothing (Postfix does not either): a kill
    cannot undo an unlink, and a power loss that does leaves a message recovery delivers again (RFC 5321
    §6.1: a duplicate, never a loss) or an envelope without its message file, which it cleans."""
    spool = DirectorySpool(tmp_path / "spool")
    env = Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], _msg("rm"))
    spool.files.enqueue(env, _msg("rm"))
    [(lease, _)] = spool.files.lease_due(time.time(), "t", 60, 10)
    synced: list[int] = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    asyncio.run(spool.finish(lease))
    assert synced == [] and spool.results.messages == 0     # no fsync, and no hand-off to the committer
    assert all(not os.listdir(tmp_path / "spool" / d) for d in ("incoming", "active", "messages", "tmp"))


async def _until_delivered(testnet: TestNet, tokens: list[str], seconds: float = 60.0) -> None:
    """Wait until every token was received once (a liveness bound, not a timing assertion)."""
    for _ in range(int(seconds * 10)):
        if _all_copies(testnet, tokens) == [1] * len(tokens):
            return
        await asyncio.sleep(0.1)


def test_a_backlog_over_the_destination_limit_drains_between_ticks(testnet: TestNet, tmp_path: Path) -> None:
    """A local spool has one runner, whose per-destination window is the limit; when its attempts finish,
    the next messages start at once. Merged with the shared queue's per-destination lease limit (every
    node's leases counted), the local runner leased one slot-full per poll instead (the SIGKILL loop's final
    drain ran out of time). With a poll of 120 s, 30 messages over a limit of 3 must all be delivered: a
    bound of 60 s, a liveness check, not a timing assertion (ten polls would be 20 minutes)."""
    spool = DirectorySpool(tmp_path / "spool")
    tokens = [f"backlog-{i}-{os.getpid()}" for i in range(30)]
    for t in tokens:
        spool.files.enqueue(Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], _msg(t)), _msg(t))
    left: list[object] = []

    async def main() -> None:
        r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
        d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))
        s = Scheduler(spool, d, SchedulerConfig(reporting_mta="queue.test", destination_concurrency=3,
                                                poll=120.0))
        stop = asyncio.Event()
        runner = asyncio.create_task(s.run(stop, tick=120.0))
        try:
            await _until_delivered(testnet, tokens)
        finally:
            stop.set()
            await runner
            await d.close()
            left.extend(e.id for e in await spool.entries() if e.state != State.CORRUPT)
            await spool.unlock()
    asyncio.run(main())
    assert [_copies(testnet, t) for t in tokens] == [1] * len(tokens)
    assert left == []


def test_new_mail_is_handed_over_to_the_running_queue(testnet: TestNet, tmp_path: Path) -> None:
    """New mail queued in the process that runs the queue is leased as it is queued and delivered when it
    wakes the runner, without a scan of the spool: with a poll and a tick of 120 s (no scan after the first),
    ten messages queued one by one while the runner runs are all delivered (a bound of 60 s, a liveness
    check), and none of them was ever in incoming/ (the index went straight to active/)."""
    spool = DirectorySpool(tmp_path / "spool")
    tokens = [f"handover-{i}-{os.getpid()}" for i in range(10)]
    seen_incoming: set[str] = set()

    async def main() -> None:
        r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
        d = Deliverer(r, DeliveryConfig(helo="queue.test", timeouts=Timeouts(3, 3, 3, 3, 5)))
        s = Scheduler(spool, d, SchedulerConfig(reporting_mta="queue.test", poll=120.0))
        stop = asyncio.Event()
        runner = asyncio.create_task(s.run(stop, tick=120.0))
        try:
            await asyncio.sleep(0.2)   # the first pass (scan) is done
            for t in tokens:
                env = Envelope.new("alice@client.test", [Recipient("ok@dane-ok.test")], _msg(t))
                await spool.enqueue(env, _msg(t))
                seen_incoming.update(os.listdir(tmp_path / "spool" / "incoming"))
                s.wake.set()
            await _until_delivered(testnet, tokens)
        finally:
            stop.set()
            await runner
            await d.close()
            await spool.unlock()
    asyncio.run(main())
    assert [_copies(testnet, t) for t in tokens] == [1] * len(tokens)
    assert seen_incoming == set()


def test_destination_window_grows_by_one_per_round_of_answers(tmp_path: Path) -> None:
    """Postfix's concurrency feedback (qmgr_queue_unthrottle) with positive feedback 1/concurrency: after the
    first answer the window is initial_concurrency; a full round of answers (one per slot) adds one, while
    the window is within initial_concurrency of the attempts under way, never past destination_concurrency."""
    s = Scheduler(DirectorySpool(tmp_path / "spool"), Deliverer.__new__(Deliverer),
                  SchedulerConfig(initial_concurrency=5, destination_concurrency=12))
    assert s._dest_limit("d.test") == 1                       # a probe until it answers
    s._dest_answered("d.test", 0)
    assert s._dest_limit("d.test") == 5
    s._busy["d.test"] = 5                                     # a backlog fills the window: it grows
    for want in (6, 7, 8):
        answers = 0
        while s._dest_limit("d.test") < want:                  # one round of answers: one more slot
            s._dest_answered("d.test", 0)
            answers += 1
        assert want - 1 <= answers <= want + 1 and s._dest_limit("d.test") == want
    s._busy["d.test"] = 1                                     # a trickle: the window stays
    for _ in range(50):
        s._dest_answered("d.test", 0)
    assert s._dest_limit("d.test") == 8
    s._busy["d.test"] = 12
    for _ in range(500):
        s._dest_answered("d.test", 0)
    assert s._dest_limit("d.test") == 12                      # never past destination_concurrency
    # Postfix's negative feedback (qmgr_queue_throttle): an unanswered attempt takes one off the window and
    # adds 1/window to the failed cohorts; an answer clears them; a whole window's worth makes it dead
    assert s._dest_failed("d.test", 0) is False and s._dest_limit("d.test") == 11
    s._dest_answered("d.test", 0)
    assert s._fail_cohorts.get("d.test") is None
    fails = 1
    while not s._dest_failed("d.test", 0):                    # 1/11.1 + 1/10.1 + … + 1/4.1 >= 1
        fails += 1
    assert fails == 8 and s._dest_dead("d.test", 1) and s._dest_limit("d.test") == 1
    assert s._dest_failed("d.test", 400) is True              # a failed probe: dead again at once


def test_stalls_are_recorded_and_warned_about_once_a_minute(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The stall watch (scheduler._stalled_now): a look at the loop that comes STALL_MIN late records a stall
    (its span, for the attempts under way then); a loop starved again and again warns once a minute, with a
    count of the stalls since, not once per stall."""
    import time as _time

    from postgate.outbound.queue.scheduler import STALL_MIN, STALL_TICK
    s = Scheduler(DirectorySpool(tmp_path / "spool"), Deliverer.__new__(Deliverer), SchedulerConfig())
    with caplog.at_level(logging.WARNING, logger="postgate"):
        for _ in range(3):
            s._last_look = _time.monotonic() - (STALL_TICK + STALL_MIN + 1)
            s._stalled_now()
        s._last_look = _time.monotonic()
        s._stalled_now()                                       # on time: no stall
    assert len(s._stalls) == 3 and s.counters.values["stall"] == 3
    assert caplog.text.count("this process was stalled") == 1 and s._stalls_unlogged == 2
    start, end = s._stalls[0]
    assert s._stalled_during(start - 10, start) == 0 and s._stalled_during(start, end) > STALL_MIN


# --- a batch of results under SIGKILL ----------------------------------------------------------------------

RESULTS_CHILD = r"""
import sys
from postgate.outbound.queue.spool import SpoolFiles
from postgate.outbound.queue.envelope import Recipient
from postgate.policy.vocab import Outcome
files = SpoolFiles(sys.argv[1])
ids = sys.argv[2:]
leased = {lease.id: (lease, env) for lease, env in files.lease_due(2e9, "child", 3600, 10)}
ops = []
for qid, kind in zip(ids, ["record", "release", "finish", "finish"]):
    lease, env = leased[qid]
    env.recipients[0].status = Outcome.DELIVERED          # the first recipient got a 250
    env.recipients[0].dsn = "2.0.0"
    if kind == "release":
        env.next_attempt = 2e9 + 300
    ops.append((kind, lease, None if kind == "finish" else env))
errors = files.results_batch(ops)
print("DONE", errors, flush=True)
"""

# (crash point, n-th pass, expected after recovery: the record and release messages carry the new results;
# the two finished messages are gone)
RESULT_POINTS = [
    ("spool-results-written", 1, False),      # new envelopes in tmp/, message files unlinked, nothing synced
    ("spool-results-synced", 1, False),       # all of it durable, nothing renamed yet
    ("spool-deleted-message", 1, True),       # renamed (record, release), first envelope of a removal left
    ("spool-deleted-message", 2, True),
    ("", 0, True),                            # no crash
]


@pytest.mark.parametrize(("point", "nth", "new"), RESULT_POINTS, ids=[f"{p}:{n}" for p, n, _ in RESULT_POINTS])
def test_batched_results_survive_sigkill(tmp_path: Path, point: str, nth: int, new: bool) -> None:
    root = tmp_path / "spool"
    spool = DirectorySpool(root)
    envs = []
    for i in range(4):
        content = _msg(f"result-{i}")
        env = Envelope.new("alice@client.test", [Recipient(f"a{i}@dane-ok.test"), Recipient(f"b{i}@dane-ok.test")],
                           content, now=1e9 + i)
        spool.files.enqueue(env, content)
        envs.append(env)
    environ = dict(os.environ)
    environ.pop("POSTGATE_CRASH_AT", None)
    if point:
        environ["POSTGATE_CRASH_AT"] = f"{point}:{nth}"
    child = subprocess.run([sys.executable, "-c", RESULTS_CHILD, str(root), *(e.id for e in envs)],
                           capture_output=True, text=True, timeout=60, env=environ)
    if point:
        assert child.returncode == -signal.SIGKILL, child.stderr
    else:
        assert child.returncode == 0 and "DONE [None, None, None, None]" in child.stdout, child.stderr
    after = DirectorySpool(root)
    asyncio.run(after.recover())
    rec, rel, fin1, fin2 = envs
    # the two removed messages: gone, whatever the point (their message files went first)
    assert after.files.get(fin1.id) is None and after.files.get(fin2.id) is None
    # the recorded and the released message: the old envelope or the new one, whole, with its content
    for env in (rec, rel):
        found = after.files.get(env.id)
        assert found is not None
        state, stored = found
        assert state in (State.INCOMING, State.DEFERRED)
        stored.check_content(after.files.content(env.id))
        expected = Outcome.DELIVERED if new else Outcome.PENDING
        assert [r.status for r in stored.recipients] == [expected, Outcome.PENDING]
    if new:
        assert after.files.get(rel.id) is not None and after.files.get(rel.id)[0] == State.DEFERRED  # type: ignore[index]
    assert os.listdir(root / "tmp") == [] and os.listdir(root / "corrupt") == []
    assert sorted(os.listdir(root / "messages")) == sorted([rec.id, rel.id])


# --- several queue runners on one directory spool ----------------------------------------------------------

RUNNER_CHILD = r"""
import sys, time
from postgate.outbound.queue.envelope import Envelope
from postgate.outbound.queue.spool import SpoolFiles
parse = Envelope.from_bytes
# a slow parse widens the window between reading a waiting envelope and renaming it (the lease)
Envelope.from_bytes = staticmethod(lambda data: (time.sleep(0.002), parse(data))[1])  # type: ignore
files = SpoolFiles(sys.argv[1], fsync=False, partition=(int(sys.argv[2]), 2))
files.adopt(1 - int(sys.argv[2]))          # both shares: the two processes race for every message
out = open(sys.argv[3], "w")
idle = 0
while idle < 200:
    leased = files.lease_due(2e9, sys.argv[2], 3600, 3)
    idle = 0 if leased else idle + 1
    for lease, env in leased:
        out.write(f"{lease.id} {len(env.attempts)}\n")
        out.flush()
        if len(env.attempts) < 2:          # twice a deferral, due again at once (a new envelope)
            env.attempts.append({"time": 1.0})
            files.release(lease, env)
        else:
            files.finish(lease)
"""


def test_two_runners_never_lease_the_same_message(tmp_path: Path) -> None:
    """Two processes lease from one directory spool at once, each release making the message due again
    with a new envelope in the same place (deferred/): every message is leased exactly three times, once per
    version (0, 1, 2 attempts), never twice in the same version (a stale read: read, another runner leases
    and releases, then the rename takes the new file with the old envelope) and never by both at once (the
    rename is the lease, and the state lock makes read-and-rename one step across processes)."""
    root = tmp_path / "spool"
    files = DirectorySpool(root, fsync=False).files
    ids = []
    for i in range(150):
        content = _msg(f"runner-{i}")
        env = Envelope.new("alice@client.test", [Recipient(f"r{i}@dane-ok.test")], content, now=1e9 + i)
        files.enqueue(env, content)
        ids.append(env.id)
    logs = [tmp_path / f"runner-{k}.log" for k in (0, 1)]
    procs = [subprocess.Popen([sys.executable, "-c", RUNNER_CHILD, str(root), str(k), str(logs[k])])
             for k in (0, 1)]
    for p in procs:
        assert p.wait(120) == 0
    leases: dict[str, list[int]] = {}
    per_runner = []
    for log in logs:
        lines = log.read_text().split()
        pairs = list(zip(lines[::2], lines[1::2], strict=True))
        per_runner.append(len(pairs))
        for qid, attempts in pairs:
            leases.setdefault(qid, []).append(int(attempts))
    assert sorted(leases) == sorted(ids)
    bad = {k: v for k, v in leases.items() if sorted(v) != [0, 1, 2]}
    assert not bad, bad
    assert all(n > 0 for n in per_runner)                 # both took part
    assert all(not os.listdir(root / d) for d in ("incoming", "deferred", "active", "messages", "tmp"))


def test_shares_partition_the_queue(tmp_path: Path) -> None:
    """Runner k of n leases and takes back only its share; after ``adopt`` it takes over a dead runner's
    share, leases left in active/ included."""
    root = tmp_path / "spool"
    a = DirectorySpool(root, fsync=False, partition=(0, 2)).files
    b = DirectorySpool(root, fsync=False, partition=(1, 2)).files
    for i in range(40):
        content = _msg(f"share-{i}")
        a.enqueue(Envelope.new("alice@client.test", [Recipient(f"s{i}@dane-ok.test")], content, now=1e9 + i), content)
    got_b = {lease.id for lease, _ in b.lease_due(2e9, "b", 3600, 100)}
    got_a = {lease.id for lease, _ in a.lease_due(2e9, "a", 3600, 100)}
    assert got_a and got_b and not got_a & got_b and len(got_a | got_b) == 40
    assert a.reclaim(2e9) == []                   # b's leases are not a's to take back ...
    a.adopt(1)                                    # ... until b is gone and a adopts its share
    assert sorted(a.reclaim(2e9)) == sorted(got_b)
    assert {lease.id for lease, _ in a.lease_due(2e9, "a", 3600, 100)} == got_b


def test_workers_run_the_queue_and_the_main_process_adopts_a_dead_ones_share(testnet: TestNet,
                                                                              tmp_path: Path) -> None:
    """``[server] workers = 2`` with ``[queue] run_in_workers``: queue-first mail is delivered by both
    processes, each message once and by the process that accepted it (its queue id is in that process's
    share: handed over in memory, no sibling's scan of the spool); after a SIGKILL of the worker, the main
    process delivers its share too."""
    here = "127.0.2.30"
    pg = PostgateServer(testnet, tmp_path, address=here, server={"workers": 2},
                        prequeue={"mode": "queue-first"}, queue={"run_in_workers": True}).start()

    def send(tokens: list[str]) -> None:
        with client(address=here, source=TRUSTED) as s:
            s.ehlo("helo.example")
            for t in tokens:
                code, text, _ = data_reply(s, "a@client.test", ["bob@dane-ok.test"], _msg(t))
                assert code == 250 and "queued as" in text, text

    def all_stored(tokens: list[str]) -> bool:
        return min(_all_copies(testnet, tokens)) >= 1

    def wait(pred: object, timeout: float = 60) -> bool:
        for _ in range(int(timeout * 10)):
            if pred():  # type: ignore[operator]
                return True
            threading.Event().wait(0.1)
        return False

    def by_pid(what: str) -> dict[str, int]:
        return {q: int(p) for p, q in re.findall(r"\[(\d+)\]: ([0-9A-F]{20}): " + what, pg.log())}

    try:
        assert pg.proc is not None
        [worker] = [int(p) for p in Path(f"/proc/{pg.proc.pid}/task/{pg.proc.pid}/children").read_text().split()]
        first: list[str] = []
        # the kernel spreads connections over the two listeners (SO_REUSEPORT): new connections until both
        # accepted some (20 connections on one side only: one chance in half a million)
        for c in range(20):
            batch = [f"share-{c}-{i}-{os.getpid()}" for i in range(4)]
            send(batch)
            first += batch
            if c >= 3 and set(by_pid("client=").values()) == {pg.proc.pid, worker}:
                break
        assert wait(lambda: all_stored(first)), pg.log()[-3000:]
        assert [_copies(testnet, t) for t in first] == [1] * len(first)
        accepted, sent = by_pid("client="), by_pid(r"to=<bob@dane-ok.test>.*status=sent")
        assert set(sent.values()) == {pg.proc.pid, worker}, sent          # both processes delivered
        assert sent == {q: accepted[q] for q in sent}, (accepted, sent)   # each what it accepted itself
        os.kill(worker, signal.SIGKILL)
        assert wait(lambda: "the main process delivers its share" in pg.log()), pg.log()[-3000:]
        second = [f"adopted-{i}-{os.getpid()}" for i in range(20)]
        send(second)
        assert wait(lambda: all_stored(second)), pg.log()[-3000:]
        assert [_copies(testnet, t) for t in second] == [1] * len(second)
    finally:
        pg.stop()


@pytest.mark.parametrize("point", ["spool-results-written:1", "spool-results-synced:1", "spool-deleted-message:1"])
def test_bounce_is_durable_before_its_message_is_removed(testnet: TestNet, tmp_path: Path, point: str) -> None:
    """A recipient refused with 550: the non-delivery report is queued (durably) before the message's
    removal is even submitted to the results committer; SIGKILL in the middle of that removal leaves the
    report queued and the message gone, never the message gone without its report."""
    spool = tmp_path / "spool"
    environ = dict(os.environ, POSTGATE_CRASH_AT=point, QUEUE_CHILD_LOCAL="reject-bounce")
    child = subprocess.run([sys.executable, "-m", "tests.queue_child", str(testnet.state / "manifest.json"),
                            str(spool), "enqueue-and-run", "1", "dane-ok.test"], capture_output=True, text=True,
                           timeout=120, env=environ)
    assert child.returncode == -signal.SIGKILL, child.stderr
    [acked] = [line.split()[1] for line in child.stdout.splitlines() if line.startswith("ACK ")]
    after = DirectorySpool(spool)
    asyncio.run(after.recover())
    entries = asyncio.run(after.entries())
    assert acked not in {e.id for e in entries}                       # the refused message is removed ...
    [report] = entries                                                # ... and its report is queued
    assert report.envelope is not None and report.envelope.is_bounce and report.envelope.sender == ""
    assert [r.address for r in report.envelope.recipients] == ["sender@crash.test"]
    assert b"reject-bounce@dane-ok.test" in after.files.content(report.id)
    assert os.listdir(spool / "corrupt") == []
