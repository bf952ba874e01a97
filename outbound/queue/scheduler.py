"""The retry scheduler: takes due messages from the spool, delivers them, records every recipient's
result durably, and decides what happens next.

- Backoff per message, Postfix-like: 5 minutes after the first failure, doubling, at most 4000 s
  (``minimal_backoff_time`` / ``maximal_backoff_time``).
- A message older than its maximal lifetime (5 days, ``maximal_queue_lifetime``) bounces its remaining
  recipients, with the last reason from delivery.
- An optional delay warning (RFC 3464 action ``delayed``) once a message has waited ``delay_warning``.
- Per destination: at most ``destination_concurrency`` deliveries at once, and after a destination-wide
  failure (no MX host reachable, suspected attack) the destination is left alone for
  ``destination_backoff`` seconds, so a dead or hostile site is not hammered.
- Messages to the same destination are delivered one after the other, so they share one connection
  (the delivery agent's connection cache).

The clock is injectable, so tests can move time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from postgate.outbound.crash import crashpoint
from postgate.outbound.delivery import Dsn, RecipientResult
from postgate.outbound.queue import dsn
from postgate.outbound.queue.envelope import (
    Envelope,
    EnvelopeError,
    Recipient,
)
from postgate.outbound.queue.spool import DirectorySpool, Lease
from postgate.policy.vocab import Outcome, domain_of

log = logging.getLogger("postgate.queue")


class DeliversMail(Protocol):
    """What the queue and the pre-queue path need of the delivery agent (outbound/delivery.py)."""

    async def deliver(self, sender: str, recipients: Sequence[str], data: bytes, *, queue_id: str | None = None,
                      requiretls: bool = False, dsn: Dsn | None = None,
                      arrival: float | None = None, smtputf8: bool = False) -> list[RecipientResult]: ...


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
    spool: DirectorySpool
    deliverer: DeliversMail
    config: SchedulerConfig = field(default_factory=SchedulerConfig)
    clock: Callable[[], float] = time.time
    owner: str = "local"

    signer: Callable[[bytes], bytes] | None = None   # DKIM for the DSNs this scheduler writes

    def __post_init__(self) -> None:
        self._dead_until: dict[str, float] = {}
        self._sems: dict[str, asyncio.Semaphore] = defaultdict(
            lambda: asyncio.Semaphore(self.config.destination_concurrency))
        self.wake = asyncio.Event()

    def backoff(self, attempts: int) -> float:
        return float(min(self.config.max_backoff, self.config.min_backoff * 2 ** max(0, attempts - 1)))

    # --- one pass ----------------------------------------------------------------------------------------
    async def run_once(self) -> int:
        """Apply operator requests, then deliver every due message once. Returns messages attempted."""
        self.apply_requests()
        now = self.clock()
        # spool I/O (fsync) runs in worker threads, so deliveries overlap with it
        leased = await asyncio.to_thread(self.spool.lease_due, now, self.owner, self.config.lease_time,
                                         self.config.batch)
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
                log.exception("queue run failed")
            if done >= self.config.batch or self.wake.is_set():
                continue  # more may be due already (a full batch, or new mail arrived during the pass)
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
        now = self.clock()
        try:
            content = await asyncio.to_thread(self.spool.content, env.id)
            env.check_content(content)
        except (OSError, EnvelopeError) as e:
            self.spool.quarantine(env.id, "active", str(e))
            return
        pending = env.pending
        ready = [r for r in pending if self._dead_until.get(domain_of(r.address), 0) <= now]
        results: list[RecipientResult] = []
        if ready:
            dest = domain_of(ready[0].address)
            async with self._sems[dest]:
                results = await self.deliverer.deliver(env.sender, [r.address for r in ready], content,
                                                       queue_id=env.id, requiretls=env.requiretls,
                                                       dsn=dsn.params(env), arrival=env.arrival,
                                                       smtputf8=env.smtputf8)
            crashpoint("queue-after-remote-reply")
        now = self.clock()
        by_addr = {r.recipient: r for r in results}
        for rcpt in ready:
            res = by_addr.get(rcpt.address)
            if res is None:
                continue
            rcpt.record(res, now)
        self._note_destinations(results, now)
        for rcpt in pending:
            if rcpt not in ready:
                rcpt.reason = rcpt.reason or "destination is backing off after failures"
        env.attempts.append({"time": now, "delivered": sum(r.status is Outcome.DELIVERED for r in results),
                             "deferred": sum(not r.status.final for r in results)})
        bounced_now = [r for r in ready if r.status is Outcome.BOUNCED]
        relayed = [r for r in ready if r.status is Outcome.DELIVERED and by_addr.get(r.address) is not None
                   and by_addr[r.address].relayed_without_dsn]
        if relayed:  # RFC 3461 §5.2.2: NOTIFY=SUCCESS and a next hop without DSN: we report "relayed"
            await asyncio.to_thread(self.notify, env, content, relayed, "relayed")
        if not env.pending:
            # every recipient is final: the bounce (if any) is queued durably, then the message removed;
            # recording the results first would only add an fsync
            if bounced_now:
                await asyncio.to_thread(self.notify, env, content, bounced_now, "failed")
            await asyncio.to_thread(self.spool.finish, lease)
            crashpoint("queue-after-record")
            log.info("%s: removed", env.id)
            return
        await asyncio.to_thread(self.spool.record, lease, env)  # per-recipient results are durable
        crashpoint("queue-after-record")
        if bounced_now:
            self.notify(env, content, bounced_now, "failed")
        if now - env.arrival >= self.config.max_lifetime:
            expired = env.pending
            for r in expired:
                r.status = Outcome.BOUNCED
                r.dsn = "4.4.7" if r.dsn.startswith("4") or not r.dsn else r.dsn
                r.reason = f"message expired after {self.config.max_lifetime / 86400:g} days in queue: " + (
                    r.reason or "no attempt succeeded")
                log.warning("%s: to=<%s>, dsn=%s, status=expired, returned to sender (%s)", env.id, r.address,
                            r.dsn, r.reason)
            self.spool.record(lease, env)
            self.notify(env, content, expired, "failed")
            self.spool.finish(lease)
            return
        if self.config.delay_warning and not env.delay_warned and now - env.arrival >= self.config.delay_warning:
            env.delay_warned = True
            self.notify(env, content, env.pending, "delayed")
        env.next_attempt = now + self.backoff(len(env.attempts))
        await asyncio.to_thread(self.spool.release, lease, env)

    def _note_destinations(self, results: list[RecipientResult], now: float) -> None:
        by: dict[str, list[RecipientResult]] = defaultdict(list)
        for r in results:
            by[domain_of(r.recipient)].append(r)
        for dest, rs in by.items():
            # destination-wide failure: nobody answered for it (no reply from any server)
            if rs and all(not r.status.final and not r.reply for r in rs):
                self._dead_until[dest] = now + self.config.destination_backoff
                log.info("destination %s: backing off for %.0fs (%s)", dest, self.config.destination_backoff,
                         rs[0].reason)
            else:
                self._dead_until.pop(dest, None)

    def notify(self, env: Envelope, content: bytes, rcpts: list[Recipient], action: str = "failed") -> None:
        """Queue a DSN (RFC 3464) to the sender of ``env`` about ``rcpts``, if one is due."""
        retry_until = env.arrival + self.config.max_lifetime
        body = dsn.build(env, content, rcpts, action=action, reporting_mta=self.config.reporting_mta,
                         now=self.clock(), retry_until=retry_until)
        if body is None:
            return
        if self.signer is not None:
            body = self.signer(body)
        bounce = Envelope.new("", [Recipient(env.sender, notify=["NEVER"])], body, now=self.clock(),
                              is_bounce=True)
        self.spool.enqueue(bounce, body)
        log.info("%s: sender %s notification: %s", env.id, "non-delivery" if action == "failed" else "delay",
                 bounce.id)

    # --- operator requests --------------------------------------------------------------------------------
    def apply_requests(self) -> list[str]:
        done = []
        now = self.clock()
        for action, arg in self.spool.take_requests():
            ok = False
            if action == "hold":
                ok = self.spool.hold(arg)
            elif action == "release":
                ok = self.spool.release_hold(arg, now)
            elif action == "delete":
                ok = self.spool.delete(arg)
            elif action == "flush":
                ok = self.spool.reschedule(arg, now)
            elif action in ("flush-all", "flush-domain", "requeue"):
                for state, qid, env in list(self.spool.entries()):
                    if env is None:
                        continue
                    if action == "flush-domain" and not any(domain_of(r.address) == arg.lower() for r in env.pending):
                        continue
                    if action == "requeue" and state == "hold":
                        self.spool.release_hold(qid, now)
                    elif state in ("incoming", "deferred"):
                        self.spool.reschedule(qid, now)
                if action == "flush-domain":
                    self._dead_until.pop(arg.lower(), None)
                else:
                    self._dead_until.clear()
                ok = True
            done.append(f"{action} {arg}: {'done' if ok else 'nothing to do'}")
            log.info("queue request %s %s: %s", action, arg, "done" if ok else "nothing to do")
        return done
