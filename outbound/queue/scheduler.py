"""The retry scheduler: takes due messages from the spool, delivers them, records every recipient's
result durably, and decides what happens next.

- Backoff per message, Postfix-like: 5 minutes after the first failure, doubling, at most 4000 s
  (``minimal_backoff_time`` / ``maximal_backoff_time``).
- A message older than its maximal lifetime (5 days, ``maximal_queue_lifetime``) bounces its remaining
  recipients, with the last reason from delivery.
- An optional delay warning (RFC 3464 action ``delayed``) once a message has waited ``delay_warning``.
- A continuous feeder, like Postfix's queue manager: up to ``max_deliveries`` attempts at once, at most
  ``destination_concurrency`` per destination; a finished attempt hands its slot to the next waiting
  message at once, and more mail is leased as slots free and as new mail arrives (``wake``), so a slow
  destination never holds back a fast one, and no attempt waits for a batch to end.
- A destination that has not answered yet, or whose backoff just ended, gets one attempt at a time (a
  probe); once a server answered, a window of ``initial_concurrency`` that grows by 1/window with every
  answer (while attempts fill it) up to ``destination_concurrency`` (Postfix's slow start: a backlog opens
  the connections it needs, and the
  delivery agent's connection cache carries the following messages over them). An attempt that no server
  of the destination answered (no MX host reachable, suspected attack, a timeout) takes one off the window
  and adds 1/window to its failed pseudo-cohorts; when these reach ``failed_cohort_limit`` (one whole
  window of such attempts with no answer in between, or a failed probe) the destination is dead and left
  alone for ``destination_backoff`` seconds, so a dead or hostile site is not hammered, while one lost
  attempt among many answered ones does not stop a destination (Postfix's qmgr_queue_throttle). An
  attempt under way while this process itself was stalled (SIGSTOP, a VM freeze: the event loop looked
  at STALL_MIN seconds or more late) is not held against its destination at all: its timers ran out while
  nothing ran, and the server's answer may be waiting unread. The
  backoff and the per-destination lease count live in the spool
  (``lease_due(per_destination=…)``, ``backing_off``/``note_destination``), so a shared spool applies them
  across every node: one node's failure makes all skip the destination, and one of them probes it when
  the backoff ends; the slow-start window is each node's own.
- Attempts to the same destination reuse the delivery agent's cached connections (outbound/delivery.py).
- No exception may strand a message: an unexpected error in an attempt (a bug, an encoding error deep in
  the SMTP client, a full disk) becomes a deferral with the normal backoff, logged as
  ``status=deferred (internal error …)`` with the queue id and counted (``attempt_error``). A deferral
  the spool cannot write (disk full) is kept and written again at every pass, and a lease not ended in
  time is taken back (``Spool.reclaim``), so nothing stays in ``active`` until a restart.
- Leases are renewed while their attempts run (a heartbeat): every third of ``lease_time``, one
  ``Spool.renew`` call extends the leases of every attempt under way, so an attempt may outlast
  ``lease_time`` (a 600 s DATA timeout, several MX hosts in turn) without another node taking its message
  over, and ``lease_time`` only says how soon a dead node's mail is taken over. A renewal that finds a
  lease lost (taken back after a pause or a partition, the message deleted by the operator) is logged
  with the queue id; an attempt still talking to the remote server is stopped (its result could not be
  recorded: the message's new owner delivers it, and stopping before the end of DATA spares the
  recipient a duplicate); a result written under a lost lease is refused anyway (``LeaseLost``).
- When to retry is the pure function ``retry.next_attempt``; the spool is any ``Spool`` (protocol.py).

The clock is injectable, so tests can move time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from postgate.outbound.crash import crashpoint
from postgate.outbound.delivery import Counters, Dsn, RecipientResult, RecipientRoute
from postgate.outbound.queue import dsn, retry
from postgate.outbound.queue.envelope import (
    Envelope,
    EnvelopeError,
    Recipient,
)
from postgate.outbound.queue.protocol import WAITING, Lease, LeaseLost, Spool, State
from postgate.outbound.queue.retry import Attempt, Expire, Retry, RetryPolicy
from postgate.outbound.smtp_wire import STALL_LATE
from postgate.policy.vocab import Outcome, domain_of

log = logging.getLogger("postgate.queue")


class DeliversMail(Protocol):
    """What the queue and the pre-queue path need of the delivery agent (outbound/delivery.py)."""

    async def deliver(self, sender: str, recipients: Sequence[str], data: bytes, *, queue_id: str | None = None,
                      requiretls: bool = False, dsn: Dsn | None = None,
                      arrival: float | None = None, smtputf8: bool = False,
                      routes: Mapping[str, RecipientRoute] | None = None) -> list[RecipientResult]: ...


def routes_of(rcpts: Sequence[Recipient]) -> dict[str, RecipientRoute]:
    """The per-recipient routes an inbound filter stored on the envelope (Sieve vnd.postgate)."""
    return {r.address: RecipientRoute.parse(r.tls_level, r.transport) for r in rcpts if r.tls_level or r.transport}


STALL_TICK = 0.5   # seconds between the stall watch's looks at the event loop
STALL_MIN = STALL_LATE  # a look this much later than due: stalled (SIGSTOP, a VM freeze) — the SMTP client's rule


@dataclass
class SchedulerConfig:
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0          # 0: no delay warnings
    destination_concurrency: int = 20
    initial_concurrency: int = 5      # a destination's window after its first answer (Postfix's default)
    destination_backoff: float = 300.0
    failed_cohort_limit: float = 1.0  # whole windows of no-answer attempts that make a destination dead
    batch: int = 200                  # messages leased at most per spool call
    max_deliveries: int = 100         # attempts under way at once, all destinations (Postfix: 100 processes)
    active_limit: int = 2000          # messages leased at once (under way or waiting for a slot)
    in_flow_delay: float = 1.0        # Postfix's default; 0: off
    requests: bool = True             # apply operator requests (several runners: the main process only)
    poll: float = 1.0                 # look for due mail at least this often (several runners: mail
                                      # accepted by another process wakes nobody here)
    lease_time: float = 3600.0
    reporting_mta: str = "localhost"


@dataclass
class Scheduler:
    spool: Spool
    deliverer: DeliversMail
    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    clock: Callable[[], float] = time.time
    owner: str = "local"

    signer: Callable[[bytes], bytes] | None = None   # DKIM for the DSNs this scheduler writes
    counters: Counters = field(default_factory=Counters)

    def __post_init__(self) -> None:
        self._dead_until: dict[str, float] = {}
        self._alive: dict[str, float] = {}        # destinations that answered: their concurrency window
        self._fail_cohorts: dict[str, float] = {}  # no-answer attempts since the last answer, in windows
        # stalls of this process (monotonic start, end): a timeout then is not the destination's failure
        self._stalls: deque[tuple[float, float]] = deque(maxlen=32)
        self._stall_loop: asyncio.AbstractEventLoop | None = None
        self._last_look = 0.0
        self._stall_logged = -1e9   # a warning a minute at most (a starved loop stalls again and again)
        self._stalls_unlogged = 0
        self._waiting: dict[str, deque[tuple[Lease, Envelope]]] = {}
        self._busy: dict[str, int] = {}           # attempts under way per destination
        self._tasks: set[asyncio.Task[None]] = set()
        self._freed: asyncio.Event | None = None
        self._running = False
        self.flow_control = False   # set by the daemon in a process that runs the queue: inflow_delay()
        self._sems: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.config.destination_concurrency))
        self.wake = asyncio.Event()
        # deferrals the spool could not write yet (disk full): written again at every pass
        self._unsaved: dict[str, tuple[Lease, Envelope]] = {}
        # lease renewal: the leases of the attempts under way, and those talking to a remote server now
        self._inflight: dict[str, Lease] = {}
        self._delivering: dict[str, asyncio.Task[Any]] = {}

    @property
    def retry_policy(self) -> RetryPolicy:
        c = self.config
        return RetryPolicy(c.min_backoff, c.max_backoff, c.max_lifetime)

    def backoff(self, attempts: int) -> float:
        return retry.backoff(attempts, self.retry_policy)

    # --- the feeder ------------------------------------------------------------------------------------
    # Leased messages wait in memory per destination (``_waiting``) until a delivery slot is free: at most
    # ``max_deliveries`` attempts at once in all, at most ``_dest_limit`` per destination. A finished attempt
    # hands its slot on at once (``_done``), and the run loop leases more as slots free and new mail arrives,
    # so no delivery waits for an unrelated slow one (no pass ends with its slowest message).

    async def run_once(self, fresh: bool = False) -> int:
        """One pass: apply operator requests, take back stranded leases, then deliver every due message
        once and wait for all of them (``fresh``: only the new mail handed over, as :meth:`run` does when
        new mail wakes it). Returns messages attempted."""
        await self._housekeeping()
        renewer = asyncio.create_task(self._renewing())
        try:
            leased = await self._lease(self.config.batch, fresh=fresh)
            while self._tasks:
                await asyncio.wait(set(self._tasks))
        finally:
            renewer.cancel()
        return leased

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        """Deliver continuously until ``stop``: housekeeping (requests, unsaved deferrals, reclaim) once per
        ``tick``; leasing whenever new mail arrives (``wake``), slots free up, or a tick passes."""
        freed = asyncio.Event()
        self._freed = freed
        self._running = True
        self.spool.hand_over(self.owner, self.config.lease_time)
        last_house = -tick
        renewer = asyncio.create_task(self._renewing())
        last_scan = -self.config.poll
        fresh_more = scan_more = False
        try:
            while not stop.is_set():
                new_mail = self.wake.is_set()
                self.wake.clear()
                freed.clear()
                more = False
                try:
                    if time.monotonic() - last_house >= tick:
                        last_house = time.monotonic()
                        await self._housekeeping()
                    room = self._room()
                    if room > 0:
                        limit = min(room, self.config.batch)
                        # new mail is handed over (lease_fresh: no scan of the spool); the spool is scanned
                        # at every poll, and at once again while a scan finds more than it may lease
                        if (new_mail or fresh_more) and not scan_more and \
                                time.monotonic() - last_scan < self.config.poll:
                            n = await self._lease(limit, give_back_surplus=True, fresh=True)
                            more = fresh_more = n >= limit
                        else:
                            last_scan = time.monotonic()
                            n = await self._lease(limit, give_back_surplus=True)
                            more = scan_more = n >= limit   # more may be due already
                            fresh_more = fresh_more and more
                except Exception:
                    self.counters.inc("run_error")
                    log.exception("queue run failed; retrying in %gs", tick)
                    more = False
                if more and self._room() > 0:
                    await asyncio.sleep(0)
                    continue
                # wait for new mail, a freed slot (if leasing was limited by room), the stop, or the tick
                waits = [self.wake.wait(), stop.wait()]
                if more or self._room() <= 0:
                    waits.append(freed.wait())
                timeout = min(self.config.poll, max(0.0, tick - (time.monotonic() - last_house)))
                await self._first_of(waits, timeout)
        finally:
            self._freed = None
            self._running = False
            self.spool.hand_over(None)
            try:
                await self._drain()
            finally:
                renewer.cancel()

    @staticmethod
    async def _first_of(waits: list[Coroutine[Any, Any, Any]], timeout: float) -> None:
        tasks = [asyncio.ensure_future(w) for w in waits]
        try:
            await asyncio.wait(tasks, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in tasks:
                t.cancel()

    async def _drain(self) -> None:
        """At stop: messages leased but not started are given back (due as they were); the attempts under
        way end (bounded by the delivery timeouts), as a pass did."""
        waiting = [item for q in self._waiting.values() for item in q]
        self._waiting.clear()
        # and what was handed over (leased as it was queued) but not taken yet
        waiting += await self.spool.lease_fresh(self.clock(), self.owner, self.config.lease_time, 1 << 30)
        await asyncio.gather(*(self._release(lease, env) for lease, env in waiting))   # several per commit
        while self._tasks:
            await asyncio.wait(set(self._tasks))

    async def _housekeeping(self) -> None:
        if self.config.requests:
            await self.apply_requests()
        await self._save_unsaved()
        for qid in await self.spool.reclaim(self.clock()):
            self.counters.inc("lease_reclaimed")
            log.warning("%s: lease taken back (expired or its result was never written); due again", qid)

    def inflow_delay(self) -> float:
        """Seconds the SMTP server waits before its 250 to a newly queued message: ``in_flow_delay`` while
        this runner holds as many messages as it may (``active_limit``: the queue grows faster than it is
        delivered) or does not run yet (the daemon recovers the spool: listeners start first), else 0; only
        where ``flow_control`` is on (a process that runs the queue). Postfix's flow control: a sender
        cannot fill the queue faster than it drains for long, and a restart never has to recover an
        unbounded backlog."""
        if not self.flow_control:
            return 0.0
        # not running yet (the spool is being recovered at start) or saturated: the queue does not drain
        return self.config.in_flow_delay if not self._running or self._room() <= 0 else 0.0

    def _room(self) -> int:
        """How many more messages may be leased: in flight plus waiting stays under ``active_limit``."""
        held = len(self._tasks) + sum(len(q) for q in self._waiting.values())
        return self.config.active_limit - held

    async def _lease(self, limit: int, give_back_surplus: bool = False, fresh: bool = False) -> int:
        now = self.clock()
        # a shared spool counts every node's leases per destination; a local one has a single runner, whose
        # own per-destination window (_dest_limit) is the limit: a spool-level cap there would only make the
        # runner wait for its next poll once a destination's slots are taken
        shared = self.spool.shared
        per_destination = self.config.destination_concurrency if shared else 0
        take = self.spool.lease_fresh if fresh else self.spool.lease_due
        leased = await take(now, self.owner, self.config.lease_time, limit, per_destination)
        surplus: list[tuple[Lease, Envelope]] = []
        for lease, env in leased:
            dest = domain_of(env.pending[0].address) if env.pending else ""
            q = self._waiting.setdefault(dest, deque())
            if give_back_surplus and shared and not self._dest_dead(dest, now) and \
                    self._busy.get(dest, 0) + len(q) >= self._dest_limit(dest):
                # a shared spool: a lease this node cannot start now would hold one of the destination's
                # cluster-wide slots (every node's leases counted) while another node could use it; given
                # back at once, due as it was
                surplus.append((lease, env))
                continue
            q.append((lease, env))
        self._dispatch()
        if surplus:
            await asyncio.gather(*(self._release(lease, env) for lease, env in surplus))   # several per commit
            return len(leased) - len(surplus)
        return len(leased)

    def _dispatch(self) -> None:
        """Start waiting messages while there are free slots: per destination up to ``_dest_limit``; a
        destination backing off takes no slot of its own (its messages are only rescheduled)."""
        now = self.clock()
        for dest in list(self._waiting):
            q = self._waiting[dest]
            dead = self._dest_dead(dest, now)
            while q and len(self._tasks) < self.config.max_deliveries and (
                    dead or self._busy.get(dest, 0) < self._dest_limit(dest)):
                self._start(dest, *q.popleft())
            if not q:
                del self._waiting[dest]

    def _start(self, dest: str, lease: Lease, env: Envelope) -> None:
        self._busy[dest] = self._busy.get(dest, 0) + 1
        if lease.until - self.clock() < self.config.lease_time / 2:
            # waited in memory for half its lease: given back unchanged (due again), so a shared spool
            # never hands it to another node while we deliver it
            work: Coroutine[Any, Any, None] = self._release(lease, env)
        else:
            work = self._attempt(lease, env)
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(lambda t: self._done(t, dest))

    def _done(self, task: asyncio.Task[None], dest: str) -> None:
        self._tasks.discard(task)
        n = self._busy.get(dest, 1) - 1
        if n > 0:
            self._busy[dest] = n
        else:
            self._busy.pop(dest, None)
        if not task.cancelled() and task.exception() is not None:   # _attempt lets nothing out; a last net
            log.error("queue task failed: %r", task.exception())
        self._dispatch()   # the freed slot goes to the next waiting message at once
        if self._freed is not None:
            self._freed.set()

    # --- lease renewal (a heartbeat for the attempts under way) ---------------------------------------------
    async def _renewing(self) -> None:
        """Renew the leases of the attempts under way every third of ``lease_time``: a renewal that fails
        once (the database briefly away) leaves two more chances before a lease runs out."""
        while True:
            await asyncio.sleep(self.config.lease_time / 3)
            await self.renew_leases()

    async def renew_leases(self) -> list[str]:
        """Extend the leases of every attempt under way, in one spool call. Returns the queue ids whose
        lease was lost: each is logged, and its attempt stopped if it is still talking to the remote server
        (its result could not be recorded; the message's new owner delivers it)."""
        held = list(self._inflight.values())
        if not held:
            return []
        try:
            kept = {lease.id for lease in await self.spool.renew(held, self.clock(), self.config.lease_time)}
        except Exception as e:   # nothing known to be lost: the next renewal tries again
            self.counters.inc("lease_renew_error")
            log.error("queue: cannot renew the leases of %d attempts under way (%s); trying again in %gs",
                      len(held), e, self.config.lease_time / 3)
            return []
        lost = []
        for lease in held:
            if lease.id in kept or self._inflight.get(lease.id) is not lease:
                continue   # renewed, or the attempt ended meanwhile (its own result ended the lease)
            del self._inflight[lease.id]
            task = self._delivering.get(lease.id)
            if task is None:
                continue   # writing its result: that write is refused (LeaseLost) and logged by _attempt
            lost.append(lease.id)
            self.counters.inc("lease_lost")
            log.warning("%s: lease lost while delivering (taken back or removed; another node may deliver "
                        "it); attempt stopped, no result recorded", lease.id)
            task.cancel()
        return lost

    # --- stalls of this process ------------------------------------------------------------------------
    def _watch_stalls(self) -> None:
        """Look at the event loop every STALL_TICK seconds (a timer, no task) from the first attempt on
        this loop; a look that comes STALL_MIN seconds late records a stall."""
        loop = asyncio.get_running_loop()
        if self._stall_loop is loop:
            return
        self._stall_loop = loop
        self._last_look = time.monotonic()

        def look() -> None:
            if self._stall_loop is not loop or loop.is_closed():
                return
            self._stalled_now()
            loop.call_later(STALL_TICK, look)

        loop.call_later(STALL_TICK, look)

    def _stalled_now(self) -> None:
        """Record a stall if the last look is overdue by STALL_MIN (also called before results are judged:
        after a pause, an attempt's overdue timeout may run before the overdue look)."""
        now = time.monotonic()
        gap = now - self._last_look
        if gap >= STALL_TICK + STALL_MIN:
            self._stalls.append((self._last_look, now))
            self.counters.inc("stall")
            if now - self._stall_logged >= 60:
                more = f" ({self._stalls_unlogged} more in the last minute)" if self._stalls_unlogged else ""
                log.warning("this process was stalled for %.1fs (paused, or starved of CPU)%s; attempts under "
                            "way then that got no answer are not held against their destinations", gap, more)
                self._stall_logged, self._stalls_unlogged = now, 0
            else:
                self._stalls_unlogged += 1
        self._last_look = now

    def _stalled_during(self, start: float, end: float) -> float:
        """Seconds this process was stalled between the monotonic times ``start`` and ``end``."""
        return sum(max(0.0, min(e, end) - max(s, start)) for s, e in self._stalls)

    # --- per-destination state (kept behind these helpers: a shared spool may store it elsewhere) -------
    def _dest_dead(self, dest: str, now: float) -> bool:
        """The destination is backing off after a destination-wide failure."""
        return self._dead_until.get(dest, 0) > now

    def _dest_limit(self, dest: str) -> int:
        """Deliveries at once to ``dest``: one (a probe) until it answered; then a window that starts at
        ``initial_concurrency`` (Postfix's ``initial_destination_concurrency``) and grows by 1/window per
        answer (Postfix's positive feedback ``1/concurrency``: one more per round of answers) up to
        ``destination_concurrency``, and only while it is within ``initial_concurrency`` of the attempts
        under way (Postfix's qmgr_queue_unthrottle), so a backlog opens the connections the destination
        keeps answering on, not all at once. Measured (bench/README.md): Postfix's default feedback of one
        per answer opened 163 TLS connections for a burst of 400 messages to ten destinations and relayed
        it at a third of the rate (each handshake costs both sides ~1.5 ms); 1/window: 26-38 connections
        for 400 messages, Postfix 23-25. After a destination-wide failure, one probe again when its
        backoff ends."""
        window = self._alive.get(dest)
        return 1 if window is None else int(window)

    def _dest_failed(self, dest: str, now: float) -> bool:
        """An attempt got no answer from any server of ``dest``. Is the destination dead now?

        Postfix's rule (qmgr_queue_throttle, ``destination_concurrency_failed_cohort_limit``): each such
        failure adds 1/window to the destination's failed pseudo-cohorts and takes one off its window
        (negative feedback 1, down to 1); it is dead only when the failures since its last answer add up
        to ``failed_cohort_limit`` windows — a whole window's worth of attempts, none answered. A probe
        (no window: never answered, or just back from a backoff) is a window of one, so its failure
        alone is enough. One attempt timing out among many answered ones (a slow server, a lost packet,
        or this process paused mid-attempt) leaves the destination open on every node."""
        window = self._alive.get(dest)
        cohorts = self._fail_cohorts.get(dest, 0.0) + (1.0 if window is None else 1.0 / window)
        if window is None or cohorts >= self.config.failed_cohort_limit:
            self._dead_until[dest] = now + self.config.destination_backoff
            self._alive.pop(dest, None)
            self._fail_cohorts.pop(dest, None)
            return True
        self._fail_cohorts[dest] = cohorts
        self._alive[dest] = max(1.0, window - 1.0)
        return False

    def _dest_answered(self, dest: str, now: float) -> None:
        self._dead_until.pop(dest, None)
        self._fail_cohorts.pop(dest, None)   # Postfix: an answer ends the failed cohorts (qmgr_queue_unthrottle)
        window = self._alive.get(dest)
        if window is None:
            if len(self._alive) >= 100_000:   # bounded: forgetting a destination costs one probe
                self._alive.clear()
                self._fail_cohorts.clear()
            window = float(min(self.config.initial_concurrency, self.config.destination_concurrency))
        elif window < self._busy.get(dest, 0) + self.config.initial_concurrency:
            # the attempt answering is still counted busy here (it ends after its results are noted)
            window = min(float(self.config.destination_concurrency), window + 1 / window)
        self._alive[dest] = window

    async def _attempt(self, lease: Lease, env: Envelope) -> None:
        """One delivery attempt. No exception leaves it: whatever goes wrong becomes a deferral with backoff
        (logged with the queue id and counted), so no message is ever stranded in ``active``."""
        attempts = len(env.attempts)
        self._inflight[lease.id] = lease
        try:
            await self._deliver(lease, env)
        except asyncio.CancelledError:
            raise
        except LeaseLost as e:   # fencing: the message is another owner's now; nothing of ours is written
            self.counters.inc("lease_lost")
            log.warning("%s: lease lost during the attempt (%s); its result is not recorded", env.id, e)
        except Exception as e:  # the rule: no exception may strand a message
            self.counters.inc("attempt_error")
            log.error("%s: status=deferred (internal error during the delivery attempt: %s: %s)", env.id,
                      type(e).__name__, e, exc_info=True)
            await self._defer_after_error(lease, env, e, counted=len(env.attempts) > attempts)
        finally:
            if self._inflight.get(lease.id) is lease:
                del self._inflight[lease.id]

    async def _defer_after_error(self, lease: Lease, env: Envelope, err: Exception, counted: bool) -> None:
        now = self.clock()
        for r in env.pending:
            r.status, r.dsn = Outcome.DEFERRED, "4.3.0"
            if not (counted and r.reason):
                r.explain(f"internal error during delivery: {type(err).__name__}: {err}"[:500])
        if not counted:
            env.attempts.append({"time": now, "delivered": 0, "deferred": len(env.pending), "error": True})
        decision = retry.next_attempt(env, Attempt.ERROR, now, self.retry_policy)
        # an error is no reason to give up early; at the end of the lifetime, expiry is tried next time
        env.next_attempt = decision.at if isinstance(decision, Retry) else now + self.config.min_backoff
        await self._release(lease, env)

    async def _release(self, lease: Lease, env: Envelope) -> None:
        """End the lease with a deferral; if the spool cannot write it now (disk full), keep it and try again
        at every pass, so the message is back in deferred/ as soon as the disk allows."""
        try:
            await self.spool.release(lease, env)
            self._unsaved.pop(env.id, None)
        except LeaseLost:
            self._unsaved.pop(env.id, None)  # taken back meanwhile: the spool's state wins
        except Exception as e:
            self.counters.inc("release_error")
            if env.id not in self._unsaved:  # one line per message, not one per pass while the disk is full
                log.error("%s: cannot record the deferral (%s); retrying at every queue pass", env.id, e)
            self._unsaved[env.id] = (lease, env)

    async def _save_unsaved(self) -> None:
        for lease, env in list(self._unsaved.values()):
            await self._release(lease, env)

    async def _deliver(self, lease: Lease, env: Envelope) -> None:
        now = self.clock()
        try:
            content = await self.spool.checked_content(env)
        except (FileNotFoundError, EnvelopeError) as e:
            await self.spool.quarantine(env.id, State.ACTIVE, str(e))
            return
        pending = env.pending
        dead = await self._backing_off({domain_of(r.address) for r in pending}, now)
        for d, until in dead.items():   # what another node found (shared spool): this node's dispatch too
            self._dead_until[d] = max(until, self._dead_until.get(d, 0))
        ready = [r for r in pending if domain_of(r.address) not in dead]
        results: list[RecipientResult] = []
        started = time.monotonic()
        if ready:
            self._watch_stalls()
            dest = domain_of(ready[0].address)
            me = asyncio.current_task()
            if me is not None:
                self._delivering[env.id] = me   # a renewal that finds the lease lost stops the attempt
            try:
                async with self._sems[dest]:
                    results = await self.deliverer.deliver(env.sender, [r.address for r in ready], content,
                                                           queue_id=env.id, requiretls=env.requiretls,
                                                           dsn=dsn.params(env), arrival=env.arrival,
                                                           smtputf8=env.smtputf8, routes=routes_of(ready))
            finally:
                self._delivering.pop(env.id, None)
            crashpoint("queue-after-remote-reply")
        now = self.clock()
        by_addr = {r.recipient: r for r in results}
        for rcpt in ready:
            res = by_addr.get(rcpt.address)
            if res is None:
                continue
            rcpt.record(res, now)
        await self._note_destinations(results, now, started)
        for rcpt in pending:
            if rcpt not in ready:
                if not rcpt.reason:
                    rcpt.explain("destination is backing off after failures")
        env.attempts.append({"time": now, "delivered": sum(r.status is Outcome.DELIVERED for r in results),
                             "deferred": sum(not r.status.final for r in results)})
        bounced_now = [r for r in ready if r.status is Outcome.BOUNCED]
        relayed = [r for r in ready if r.status is Outcome.DELIVERED and by_addr.get(r.address) is not None
                   and by_addr[r.address].relayed_without_dsn]
        # each report on its own: a success report that cannot be queued never keeps the failure report
        # from being queued (RFC 5321 §6.1: a failure after acceptance MUST be reported)
        if bounced_now:
            # RFC 3464: the sender learns of the failure; if the report cannot be queued, the recipients
            # are deferred instead, so the next attempt bounces them again (never a silent loss)
            await self._notify_or_defer(env, content, bounced_now, "failed")
        if relayed:  # RFC 3461 §5.2.2: NOTIFY=SUCCESS and a next hop without DSN: we report "relayed"
            await self.notify_success(env, content, relayed, "relayed")
        if not env.pending:
            # every recipient is final: the bounce (if any) is queued durably, then the message removed;
            # recording the results first would only add an fsync
            await self.spool.finish(lease)
            crashpoint("queue-after-record")
            log.info("%s: removed", env.id)
            return
        await self.spool.record(lease, env)  # per-recipient results are durable
        crashpoint("queue-after-record")
        decision = retry.next_attempt(env, Attempt.DEFERRED if ready else Attempt.NOT_TRIED, now,
                                      self.retry_policy)
        if isinstance(decision, Expire):
            expired = env.pending
            for r in expired:
                r.status = Outcome.BOUNCED
                r.dsn = "4.4.7" if r.dsn.startswith("4") or not r.dsn else r.dsn
                life = env.lifetime if env.lifetime is not None else self.config.max_lifetime
                r.explain(f"message expired after {life / 86400:g} days in queue: " + (
                    r.reason or "no attempt succeeded"))
                log.warning("%s: to=<%s>, dsn=%s, status=expired, returned to sender (%s)", env.id, r.address,
                            r.dsn, r.reason)
            await self._notify_or_defer(env, content, expired, "failed")
            if not env.pending:
                await self.spool.finish(lease)
                return
            decision = Retry(now + self.config.min_backoff)  # the report could not be queued: expire later
        if self.config.delay_warning and not env.delay_warned and now - env.arrival >= self.config.delay_warning:
            try:
                await self.notify(env, content, env.pending, "delayed")
                env.delay_warned = True
            except Exception as e:  # a warning that cannot be queued is tried next time
                self.counters.inc("notify_error")
                log.error("%s: cannot queue the delay warning (%s); trying again next attempt", env.id, e)
        env.next_attempt = decision.at
        await self._release(lease, env)

    async def notify_success(self, env: Envelope, content: bytes, rcpts: list[Recipient], action: str) -> None:
        """A success report (RFC 3461 §5.2.2 "relayed", §6.2 "delivered") that never raises: one that cannot
        be queued is logged, counted (``notify_error``) and given up. Its recipients are delivered and final,
        so there is no later attempt to report them from; and no failure report waits for it."""
        try:
            await self.notify(env, content, rcpts, action)
        except Exception as e:
            self.counters.inc("notify_error")
            log.error("%s: cannot queue the success report (%s) for %s; not sent", env.id, e,
                      ", ".join(f"<{r.address}>" for r in rcpts))

    async def _notify_or_defer(self, env: Envelope, content: bytes, rcpts: list[Recipient], action: str) -> None:
        try:
            await self.notify(env, content, rcpts, action)
        except Exception as e:
            if action != "failed":
                raise
            self.counters.inc("notify_error")
            log.error("%s: cannot queue the non-delivery report (%s); recipients deferred to bounce later",
                      env.id, e)
            for r in rcpts:
                r.status = Outcome.DEFERRED

    # --- destination backoff, kept by the spool (shared by every node of a shared spool) ------------------
    async def _backing_off(self, dests: set[str], now: float) -> dict[str, float]:
        """The destinations to leave alone now. One whose backoff just ended is ours to probe: the others
        wait for the probe's result at most one backoff (or one lease, if shorter)."""
        probe_for = min(self.config.lease_time, self.config.destination_backoff)
        return await self.spool.backing_off(sorted(dests), now, probe_for)

    async def _note_destinations(self, results: list[RecipientResult], now: float,
                                 started: float | None = None) -> None:
        by: dict[str, list[RecipientResult]] = defaultdict(list)
        for r in results:
            by[domain_of(r.recipient)].append(r)
        stalled: float | None = None   # looked at only when an attempt failed (not on the success path)
        for dest, rs in by.items():
            # destination-wide failure: nobody answered for it (no reply from any server)
            failed = bool(rs) and all(not r.status.final and not r.reply for r in rs)
            if failed and stalled is None:
                stalled = 0.0
                if started is not None and self._stall_loop is not None:
                    self._stalled_now()
                    stalled = self._stalled_during(started, time.monotonic())
            if failed and stalled:   # our stall, not the destination's failure: neither counted nor noted
                self.counters.inc("stalled_attempt")
                log.info("destination %s: no answer (%s), not counted: this process was stalled for %.1fs "
                         "during the attempt", dest, rs[0].reason, stalled)
                continue
            dead = failed and self._dest_failed(dest, now)
            if dead:
                log.info("destination %s: backing off for %.0fs (%s)", dest, self.config.destination_backoff,
                         rs[0].reason)
            elif failed:   # not dead yet: the window shrinks, the shared backoff is left as it is
                log.info("destination %s: no answer (%s); concurrency %d, failed cohorts %.2f", dest,
                         rs[0].reason, self._dest_limit(dest), self._fail_cohorts.get(dest, 0.0))
                continue
            else:
                self._dest_answered(dest, now)
            try:
                await self.spool.note_destination(dest, now + self.config.destination_backoff if dead else None)
            except Exception as e:  # the attempt's results matter more than the note: record them anyway
                self.counters.inc("destination_note_error")
                log.error("destination %s: cannot record its state (%s)", dest, e)

    async def notify(self, env: Envelope, content: bytes, rcpts: list[Recipient], action: str = "failed") -> None:
        """Queue a DSN (RFC 3464) to the sender of ``env`` about ``rcpts``, if one is due. Raises if it
        cannot be queued (the caller decides what that means for the recipients)."""
        retry_until = env.arrival + (env.lifetime if env.lifetime is not None else self.config.max_lifetime)
        now = self.clock()

        def build() -> bytes | None:  # CPU work (MIME, DKIM signature): off the event loop
            body = dsn.build(env, content, rcpts, action=action, reporting_mta=self.config.reporting_mta,
                             now=now, retry_until=retry_until)
            if body is not None and self.signer is not None:
                body = self.signer(body)
            return body

        body = await asyncio.to_thread(build)
        if body is None:
            return
        bounce = Envelope.new("", [Recipient(env.sender, notify=["NEVER"])], body, now=now, is_bounce=True)
        await self.spool.enqueue(bounce, body)
        log.info("%s: sender %s notification: %s", env.id, {"failed": "non-delivery", "delayed": "delay"}.get(
            action, "delivery status"), bounce.id)

    # --- operator requests --------------------------------------------------------------------------------
    async def apply_requests(self) -> list[str]:
        done = []
        now = self.clock()
        for action, arg in await self.spool.take_requests():
            try:
                ok = await self._apply(action, arg, now)
            except Exception as e:  # one bad request never stops the queue
                log.error("queue request %s %s failed: %s", action, arg, e)
                done.append(f"{action} {arg}: failed ({e})")
                continue
            done.append(f"{action} {arg}: {'done' if ok else 'nothing to do'}")
            log.info("queue request %s %s: %s", action, arg, "done" if ok else "nothing to do")
        return done

    async def _apply(self, action: str, arg: str, now: float) -> bool:
        if action == "hold":
            return await self.spool.hold(arg)
        if action == "release":
            return await self.spool.release_hold(arg, now)
        if action == "delete":
            return await self.spool.delete(arg)
        if action == "flush":
            return await self.spool.reschedule(arg, now)
        if action in ("flush-all", "flush-domain", "requeue"):
            for e in await self.spool.entries():
                if e.envelope is None:
                    continue
                if action == "flush-domain" and not any(domain_of(r.address) == arg.lower()
                                                        for r in e.envelope.pending):
                    continue
                if action == "requeue" and e.state == State.HOLD:
                    await self.spool.release_hold(e.id, now)
                elif e.state in WAITING:
                    await self.spool.reschedule(e.id, now)
            if action == "flush-domain":   # the operator says: try now (Postfix postqueue -s)
                self._dead_until.pop(arg.lower(), None)
                self._fail_cohorts.pop(arg.lower(), None)
            else:
                self._dead_until.clear()
                self._fail_cohorts.clear()
            await self.spool.forget_destinations(arg.lower() if action == "flush-domain" else None)
            return True
        return False
