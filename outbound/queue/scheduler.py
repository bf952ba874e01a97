"""The retry scheduler: takes due messages from the spool, delivers them, records every recipient's
result durably, and decides what happens next.

- Backoff per message, Postfix-like: 5 minutes after the first failure, doubling, at most 4000 s
  (``minimal_backoff_time`` / ``maximal_backoff_time``).
- A message older than its maximal lifetime (5 days, ``maximal_queue_lifetime``) bounces its remaining
  recipients, with the last reason from delivery.
- An optional delay warning (RFC 3464 action ``delayed``) once a message has waited ``delay_warning``.
- Per destination: at most ``destination_concurrency`` deliveries at once, and after a destination-wide
  failure (no MX host reachable, suspected attack) the destination is left alone for
  ``destination_backoff`` seconds, so a dead or hostile site is not hammered. Both live in the spool
  (``lease_due(per_destination=…)``, ``backing_off``/``note_destination``), so a shared spool applies them
  across every node: one node's failure makes all skip the destination, and one of them probes it when
  the backoff ends.
- Messages to the same destination are delivered one after the other, so they share one connection
  (the delivery agent's connection cache).
- No exception may strand a message: an unexpected error in an attempt (a bug, an encoding error deep in
  the SMTP client, a full disk) becomes a deferral with the normal backoff, logged as
  ``status=deferred (internal error …)`` with the queue id and counted (``attempt_error``). A deferral
  the spool cannot write (disk full) is kept and written again at every pass, and a lease not ended in
  time is taken back (``Spool.reclaim``), so nothing stays in ``active`` until a restart.
- When to retry is the pure function ``retry.next_attempt``; the spool is any ``Spool`` (protocol.py).

The clock is injectable, so tests can move time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

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


@dataclass
class SchedulerConfig:
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_lifetime: float = 5 * 86400.0
    delay_warning: float = 4 * 3600.0          # 0: no delay warnings
    destination_concurrency: int = 20
    destination_backoff: float = 300.0
    batch: int = 200
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
        self._sems: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.config.destination_concurrency))
        self.wake = asyncio.Event()
        # deferrals the spool could not write yet (disk full): written again at every pass
        self._unsaved: dict[str, tuple[Lease, Envelope]] = {}

    @property
    def retry_policy(self) -> RetryPolicy:
        c = self.config
        return RetryPolicy(c.min_backoff, c.max_backoff, c.max_lifetime)

    def backoff(self, attempts: int) -> float:
        return retry.backoff(attempts, self.retry_policy)

    # --- one pass ----------------------------------------------------------------------------------------
    async def run_once(self) -> int:
        """Apply operator requests, take back stranded leases, then deliver every due message once.
        Returns messages attempted."""
        await self.apply_requests()
        now = self.clock()
        await self._save_unsaved()
        for qid in await self.spool.reclaim(now):
            self.counters.inc("lease_reclaimed")
            log.warning("%s: lease taken back (expired or its result was never written); due again", qid)
        leased = await self.spool.lease_due(now, self.owner, self.config.lease_time, self.config.batch,
                                            self.config.destination_concurrency)
        by_dest: dict[str, list[tuple[Lease, Envelope]]] = defaultdict(list)
        for lease, env in leased:
            dest = domain_of(env.pending[0].address) if env.pending else ""
            by_dest[dest].append((lease, env))
        await asyncio.gather(*(self._run_destination(items) for items in by_dest.values()))
        return len(leased)

    async def run(self, stop: asyncio.Event, tick: float = 1.0) -> None:
        while not stop.is_set():
            self.wake.clear()
            done = 0
            try:
                done = await self.run_once()
            except Exception:
                self.counters.inc("run_error")
                log.exception("queue run failed; retrying in %gs", tick)
            if done or self.wake.is_set():
                # more may be due already: a pass takes at most destination_concurrency messages of one
                # destination (all nodes' leases counted), or new mail arrived during the pass
                continue
            try:
                await asyncio.wait_for(asyncio.shield(asyncio.ensure_future(self._either(stop))), tick)
            except TimeoutError:
                pass

    async def _either(self, stop: asyncio.Event) -> None:
        w = asyncio.ensure_future(self.wake.wait())
        s = asyncio.ensure_future(stop.wait())
        await asyncio.wait({w, s}, return_when=asyncio.FIRST_COMPLETED)
        w.cancel()
        s.cancel()

    async def _run_destination(self, items: list[tuple[Lease, Envelope]]) -> None:
        """Up to ``destination_concurrency`` workers per destination, each delivering its share one message
        after the other, so each worker's connection serves several messages."""
        # the first message probes the destination; only if it is not dead do the others fan out
        first, rest = items[0], items[1:]
        await self._attempt(*first)
        workers = max(1, min(self.config.destination_concurrency, len(rest)))

        async def worker(share: list[tuple[Lease, Envelope]]) -> None:
            for lease, env in share:
                await self._attempt(lease, env)

        if rest:
            await asyncio.gather(*(worker(rest[i::workers]) for i in range(workers)))

    async def _attempt(self, lease: Lease, env: Envelope) -> None:
        """One delivery attempt. No exception leaves it: whatever goes wrong becomes a deferral with backoff
        (logged with the queue id and counted), so no message is ever stranded in ``active``."""
        attempts = len(env.attempts)
        try:
            await self._deliver(lease, env)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the rule: no exception may strand a message
            self.counters.inc("attempt_error")
            log.error("%s: status=deferred (internal error during the delivery attempt: %s: %s)", env.id,
                      type(e).__name__, e, exc_info=True)
            await self._defer_after_error(lease, env, e, counted=len(env.attempts) > attempts)

    async def _defer_after_error(self, lease: Lease, env: Envelope, err: Exception, counted: bool) -> None:
        now = self.clock()
        for r in env.pending:
            r.status, r.dsn = Outcome.DEFERRED, "4.3.0"
            r.reason = r.reason if counted and r.reason else \
                f"internal error during delivery: {type(err).__name__}: {err}"[:500]
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
            content = await self.spool.content(env.id)
            env.check_content(content)
        except (FileNotFoundError, EnvelopeError) as e:
            await self.spool.quarantine(env.id, State.ACTIVE, str(e))
            return
        pending = env.pending
        dead = await self._backing_off({domain_of(r.address) for r in pending}, now)
        ready = [r for r in pending if domain_of(r.address) not in dead]
        results: list[RecipientResult] = []
        if ready:
            dest = domain_of(ready[0].address)
            async with self._sems[dest]:
                results = await self.deliverer.deliver(env.sender, [r.address for r in ready], content,
                                                       queue_id=env.id, requiretls=env.requiretls,
                                                       dsn=dsn.params(env), arrival=env.arrival,
                                                       smtputf8=env.smtputf8, routes=routes_of(ready))
            crashpoint("queue-after-remote-reply")
        now = self.clock()
        by_addr = {r.recipient: r for r in results}
        for rcpt in ready:
            res = by_addr.get(rcpt.address)
            if res is None:
                continue
            rcpt.record(res, now)
        await self._note_destinations(results, now)
        for rcpt in pending:
            if rcpt not in ready:
                rcpt.reason = rcpt.reason or "destination is backing off after failures"
        env.attempts.append({"time": now, "delivered": sum(r.status is Outcome.DELIVERED for r in results),
                             "deferred": sum(not r.status.final for r in results)})
        bounced_now = [r for r in ready if r.status is Outcome.BOUNCED]
        relayed = [r for r in ready if r.status is Outcome.DELIVERED and by_addr.get(r.address) is not None
                   and by_addr[r.address].relayed_without_dsn]
        if relayed:  # RFC 3461 §5.2.2: NOTIFY=SUCCESS and a next hop without DSN: we report "relayed"
            await self._notify_or_defer(env, content, relayed, "relayed")
        if bounced_now:
            # RFC 3464: the sender learns of the failure; if the report cannot be queued, the recipients
            # are deferred instead, so the next attempt bounces them again (never a silent loss)
            await self._notify_or_defer(env, content, bounced_now, "failed")
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
                r.reason = f"message expired after {life / 86400:g} days in queue: " + (
                    r.reason or "no attempt succeeded")
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

    async def _note_destinations(self, results: list[RecipientResult], now: float) -> None:
        by: dict[str, list[RecipientResult]] = defaultdict(list)
        for r in results:
            by[domain_of(r.recipient)].append(r)
        for dest, rs in by.items():
            # destination-wide failure: nobody answered for it (no reply from any server)
            dead = bool(rs) and all(not r.status.final and not r.reply for r in rs)
            try:
                await self.spool.note_destination(dest, now + self.config.destination_backoff if dead else None)
            except Exception as e:  # the attempt's results matter more than the note: record them anyway
                self.counters.inc("destination_note_error")
                log.error("destination %s: cannot record its state (%s)", dest, e)
                continue
            if dead:
                log.info("destination %s: backing off for %.0fs (%s)", dest, self.config.destination_backoff,
                         rs[0].reason)

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
        log.info("%s: sender %s notification: %s", env.id, "non-delivery" if action == "failed" else "delay",
                 bounce.id)

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
            await self.spool.forget_destinations(arg.lower() if action == "flush-domain" else None)
            return True
        return False
