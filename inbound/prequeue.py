"""Pre-queue delivery: deliver first, answer after, so the client's reply is the real outcome.

After DATA, the message gets its ``Received:`` header (and DKIM signature), then:

- mail for local domains goes to LMTP or a Maildir, each recipient with its own result;
- other mail goes to the outbound delivery agent, which gets ``budget`` seconds.

The answer to the client:

====================================  ===============================================================
all recipients delivered              250, "delivered as <id>"
all refused permanently               the remote's 5xx (status code and reason), and no bounce: the
                                      sender learns it in the session
anything else — a temporary failure,  the message is written durably to the queue first, then 250
a suspected attack, the budget spent, "queued as <id>"; recipients refused permanently get a bounce
mixed results, too many pre-queue     (RFC 3464), the rest is retried by the queue
deliveries under way
====================================  ===============================================================

When the budget runs out the delivery keeps going: the message is queued with its first retry far
enough ahead, and the late results are recorded in the queue when they arrive, so nothing is sent twice
and nothing is lost (a 250 is only ever given for a delivered or durably queued message).
"""

from __future__ import annotations

import asyncio
import email.utils
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from postgate.inbound.local import LocalResult
from postgate.inbound.relay import RelayPolicy, domain_of
from postgate.inbound.smtpd import Reply, Session, xtext_decode
from postgate.outbound.delivery import BOUNCED, DELIVERED, RecipientResult
from postgate.outbound.queue import dsn
from postgate.outbound.queue.envelope import (
    BOUNCED as R_BOUNCED,
)
from postgate.outbound.queue.envelope import (
    DEFERRED as R_DEFERRED,
)
from postgate.outbound.queue.envelope import (
    DELIVERED as R_DELIVERED,
)
from postgate.outbound.queue.envelope import (
    Envelope,
    EnvelopeError,
    Recipient,
    new_queue_id,
)
from postgate.outbound.queue.protocol import Spool, SpoolError, State
from postgate.outbound.queue.scheduler import DeliversMail, Scheduler

log = logging.getLogger("postgate.smtpd")


class LocalDelivery(Protocol):
    async def deliver(self, sender: str, recipients: list[str], data: bytes) -> list[LocalResult]: ...


@dataclass
class PreQueueConfig:
    hostname: str = "localhost"
    mode: str = "prequeue"           # or "queue-first"
    budget: float = 30.0
    max_inflight: int = 200
    grace: float = 900.0
    local_recipients: frozenset[str] | None = None   # None: any local part of a local domain


@dataclass
class PreQueue:
    config: PreQueueConfig
    relay: RelayPolicy
    deliverer: DeliversMail
    spool: Spool
    scheduler: Scheduler
    local: LocalDelivery | None = None
    signer: Callable[[bytes, str], bytes] | None = None
    inflight: int = 0
    late: set[asyncio.Task[None]] = field(default_factory=set)

    # --- RCPT ------------------------------------------------------------------------------------------
    async def check_rcpt(self, s: Session, rcpt: str, params: dict[str, str]) -> Reply | None:
        why = self.relay.decide(s.peer[0], s.user, rcpt)
        if why is not None:
            return Reply(554, f"5.7.1 {why}")
        if self.relay.is_local(rcpt):
            if self.local is None:
                return Reply(550, "5.1.1 no local delivery configured")
            known = self.config.local_recipients
            if known is not None and rcpt.lower().split("+", 1)[0] not in known and \
                    _unplus(rcpt).lower() not in known:
                return Reply(550, f"5.1.1 <{rcpt}>: recipient address rejected: user unknown")
        return None

    # --- after DATA --------------------------------------------------------------------------------------
    async def message(self, s: Session, data: bytes) -> Reply:
        now = time.time()
        qid = new_queue_id(now)
        assert s.sender is not None
        content = self._received(s, qid, now) + data
        if self.signer is not None:
            content = self.signer(content, s.sender)
        rcpts = [_recipient(addr, params) for addr, params in s.recipients]
        params = s.mail_params
        env = Envelope.new(s.sender, rcpts, content, now=now, envid=xtext_decode(params["ENVID"])
                           if "ENVID" in params else None, ret=params.get("RET", "").upper() or None,
                           requiretls="REQUIRETLS" in params, smtputf8="SMTPUTF8" in params,
                           body=params.get("BODY", "").upper())
        env.id = qid
        who = f"{qid}: client={s.helo}[{s.peer[0]}]" + (f", sasl_username={s.user}" if s.user else "")
        log.info("%s, from=<%s>, size=%d, nrcpt=%d, tls=%s", who, s.sender, len(content), len(rcpts),
                 s.tls_version or "none")
        if self.config.mode == "queue-first":
            return await self._queue(env, content, "queue-first")
        if self.inflight >= self.config.max_inflight:
            return await self._queue(env, content, "too many pre-queue deliveries under way")
        self.inflight += 1
        try:
            return await self._prequeue(env, content)
        finally:
            self.inflight -= 1

    async def _prequeue(self, env: Envelope, content: bytes) -> Reply:
        success: list[tuple[str, str]] = []  # recipients owed a success DSN (RFC 3461 NOTIFY=SUCCESS)
        local = [r for r in env.recipients if self.relay.is_local(r.address)]
        remote = [r for r in env.recipients if not self.relay.is_local(r.address)]
        if local and self.local is not None:
            for lres in await self.local.deliver(env.sender, [r.address for r in local], content):
                _apply(env, RecipientResult(lres.recipient, DELIVERED if lres.ok else (
                    BOUNCED if lres.code >= 500 else "deferred"), _dsn_of(lres.text, lres.code),
                    lres.text, f"{lres.code} {lres.text}", mx="local"))
                if lres.ok:
                    success.append((lres.recipient, "delivered"))
        if remote:
            task = asyncio.create_task(self.deliverer.deliver(env.sender, [r.address for r in remote], content,
                                                              queue_id=env.id, requiretls=env.requiretls,
                                                              dsn=dsn.params(env)))
            done, _ = await asyncio.wait({task}, timeout=self.config.budget)
            if not done:
                # the budget is spent: queue now, record the late results when they come
                env.next_attempt = time.time() + self.config.grace
                reply = await self._queue(env, content, f"pre-queue budget of {self.config.budget:g}s spent")
                late = asyncio.create_task(self._late(env.id, task))
                self.late.add(late)
                late.add_done_callback(self.late.discard)
                return reply
            try:
                for res in task.result():
                    _apply(env, res)
                    if res.relayed_without_dsn:
                        success.append((res.recipient, "relayed"))
            except Exception as e:
                log.exception("%s: delivery failed", env.id)
                for r in remote:
                    r.status, r.dsn, r.reason = R_DEFERRED, "4.3.0", f"internal delivery error: {e}"
        for action in ("delivered", "relayed"):
            owed = [r for r in env.recipients if (r.address, action) in success and r.wants("SUCCESS")
                    and r.notify is not None]
            if owed:
                await self.scheduler.notify(env, content, owed, action)
        statuses = {r.status for r in env.recipients}
        if statuses == {R_DELIVERED}:
            log.info("%s: outcome=delivered (pre-queue)", env.id)
            return Reply(250, f"2.0.0 Ok: delivered as {env.id}")
        if statuses == {R_BOUNCED}:
            first = env.recipients[0]
            code = int(first.reason[:3]) if first.reason[:3].isdigit() and first.reason[0] == "5" else 550
            text = first.reason[4:] if first.reason[:3].isdigit() else first.reason
            if text.split(" ", 1)[0].count(".") == 2:
                text = text.split(" ", 1)[1] if " " in text else text
            log.info("%s: outcome=refused (pre-queue, %s)", env.id, first.reason)
            return Reply(code, f"{first.dsn or '5.0.0'} {text}")
        # this was the first attempt: the queue's first retry comes after the first backoff
        now = time.time()
        env.attempts.append({"time": now, "prequeue": True})
        env.next_attempt = now + self.scheduler.backoff(1)
        return await self._queue(env, content, "mixed or temporary results" if R_DELIVERED in statuses or
                                 R_BOUNCED in statuses else "temporary failure")

    async def _queue(self, env: Envelope, content: bytes, why: str) -> Reply:
        bounced = [r for r in env.recipients if r.status == R_BOUNCED]
        pending = env.pending
        try:
            if pending:
                await self.spool.enqueue(env, content)
            if bounced:
                await self.scheduler.notify(env, content, bounced)
        except (OSError, SpoolError) as e:
            log.error("%s: cannot queue: %s", env.id, e)
            return Reply(451, "4.3.0 queue write failed, try again later")
        attack = any("suspected attack" in r.reason for r in env.recipients)
        log.info("%s: outcome=queued (%s)%s", env.id, why, " suspected_attack=yes" if attack else "")
        self.scheduler.wake.set()
        return Reply(250, f"2.0.0 Ok: queued as {env.id}")

    async def _late(self, qid: str, task: asyncio.Task[list[RecipientResult]]) -> None:
        try:
            results = await task
        except Exception:
            log.exception("%s: late delivery failed; the queue retries it", qid)
            return
        try:
            found = await self.spool.get(qid)
            if found is None or found[0] != State.INCOMING:
                return  # already taken by the queue or the operator: the queue's view wins
            env = found[1]
            content = await self.spool.content(qid)
            for res in results:
                _apply(env, res)
            bounced = [r for r in env.recipients if r.status == R_BOUNCED]
            if bounced:
                await self.scheduler.notify(env, content, bounced)
            if not env.pending:
                await self.spool.delete(qid, State.INCOMING)
                log.info("%s: late results recorded, removed", qid)
            else:
                env.next_attempt = time.time() + self.scheduler.backoff(1)
                await self.spool.update(qid, State.INCOMING, env)
                log.info("%s: late results recorded", qid)
        except (OSError, SpoolError, EnvelopeError) as e:
            # the queued copy stays as it was and is retried by the queue (a duplicate, never a loss)
            log.error("%s: late results not recorded (%s); the queue retries the message", qid, e)

    def _received(self, s: Session, qid: str, now: float) -> bytes:
        """RFC 5321 §4.4 trace field, with the protocol names of RFC 3848 and RFC 6531 §3.7.3."""
        proto = ("UTF8SMTP" if "SMTPUTF8" in s.mail_params else "ESMTP") if s.esmtp else "SMTP"
        if s.tls:
            proto += "S"
        if s.user:
            proto += "A"
        tls = f" ({s.tls_version}:{s.tls_cipher})" if s.tls else ""
        for_ = f"\r\n\tfor <{s.recipients[0][0]}>" if len(s.recipients) == 1 else ""
        helo = "".join(c for c in s.helo if c.isprintable() and c not in "()")[:100]
        return (f"Received: from {helo} ([{s.peer[0]}])\r\n\tby {self.config.hostname} (Postgate) with "
                f"{proto}{tls} id {qid}{for_};\r\n\t{email.utils.formatdate(now)}\r\n").encode()


def _unplus(addr: str) -> str:
    local, _, domain = addr.rpartition("@")
    return f"{local.split('+', 1)[0]}@{domain}"


def _recipient(addr: str, params: dict[str, str]) -> Recipient:
    notify = params["NOTIFY"].upper().split(",") if "NOTIFY" in params else None
    orcpt = None
    if "ORCPT" in params:
        t, _, x = params["ORCPT"].partition(";")
        orcpt = f"{t};{xtext_decode(x)}"
    return Recipient(addr, orcpt=orcpt, notify=notify)


def _dsn_of(text: str, code: int) -> str:
    first = text.split(" ", 1)[0]
    if first.count(".") == 2 and first[0] in "245":
        return first
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def _apply(env: Envelope, res: RecipientResult) -> None:
    for r in env.recipients:
        if r.address == res.recipient and not r.final:
            r.record(res)
            return


__all__ = ["PreQueue", "PreQueueConfig", "domain_of"]
