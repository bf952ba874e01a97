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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import dkim as dkimpy
from postgate.inbound.filters import Route
from postgate.inbound.local import LocalResult
from postgate.inbound.relay import RelayPolicy
from postgate.inbound.smtpd import Session, neuter_helo, xtext_decode
from postgate.outbound import smtp_data
from postgate.outbound.delivery import RecipientResult
from postgate.outbound.queue import dsn
from postgate.outbound.queue.envelope import (
    Envelope,
    EnvelopeError,
    Recipient,
)
from postgate.outbound.queue.protocol import Spool, SpoolError, State
from postgate.outbound.queue.scheduler import DeliversMail, Scheduler, routes_of
from postgate.policy.vocab import Outcome, Reply, domain_of, new_queue_id

log = logging.getLogger("postgate.smtpd")


def apply_routes(env: Envelope, routes: Sequence[Route]) -> None:
    """Store the filters' delivery choices (inbound/filters.Route, e.g. Sieve ``vnd.postgate``) on the
    envelope, in chain order (a later filter's choice wins): per recipient the TLS level and the transport,
    per message the queue lifetime and the queue priority (a priority for some recipients, ``:recipients``,
    applies to the message if it names one of them: the message is leased as a whole). The DKIM signing
    domain is the signer's (``dkim_choice``)."""
    for rt in routes:
        wanted = {a.lower() for a in rt.recipients}
        for r in env.recipients:
            if wanted and r.address.lower() not in wanted:
                continue
            if rt.tls_level is not None:
                r.tls_level = rt.tls_level
            if rt.transport is not None:
                r.transport = rt.transport
        if rt.lifetime is not None:
            env.lifetime = rt.lifetime
        if rt.dkim_domain:  # applied by the signer (dkim_choice), logged here with the message's routes
            log.info("%s: route dkim=%s%s (filter)", env.id, rt.dkim_domain,
                     f"/{rt.dkim_selector}" if rt.dkim_selector else "")
        if rt.priority is not None and (not wanted or any(r.address.lower() in wanted for r in env.recipients)):
            env.priority = max(0, min(9, rt.priority))
            log.info("%s: route priority=%d (filter)", env.id, env.priority)
    for r in env.recipients:
        if r.tls_level or r.transport:
            log.info("%s: to=<%s>: route tls_level=%s transport=%s (filter)", env.id, r.address,
                     r.tls_level or "-", r.transport or "-")


class SignsMessages(Protocol):
    async def __call__(self, data: bytes, prefix: bytes, sender: str, crlf_only: bool, *,
                       domain: str | None = None, selector: str | None = None) -> bytes: ...


def dkim_choice(routes: Sequence[Route]) -> tuple[str | None, str | None]:
    """The signing domain and selector a filter chose (Sieve ``dkim_sign``): the last choice in chain order
    wins, like every other route; (None, None) when no filter chose."""
    domain = selector = None
    for rt in routes:
        if rt.dkim_domain:
            domain, selector = rt.dkim_domain, rt.dkim_selector
    return domain, selector


class LocalDelivery(Protocol):
    async def deliver(self, sender: str, recipients: list[str], data: bytes, *,
                      queue_id: str = "") -> list[LocalResult]: ...


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
    # the DKIM-Signature fields for the message ``prefix + data`` (prefix: the Received field), given as
    # (data, prefix, sender, crlf_only); the message is then built once (outbound/dkim.Signer.signature_fields)
    signer: SignsMessages | None = None
    inflight: int = 0
    late: set[asyncio.Task[None]] = field(default_factory=set)

    # --- RCPT ------------------------------------------------------------------------------------------
    async def check_rcpt(self, s: Session, rcpt: str, params: dict[str, str]) -> Reply | None:
        # relay control is the first filter of every listener (relay.RelayFilter, asked before this)
        if self.relay.is_local(rcpt):
            if self.local is None:
                return Reply(550, "5.1.1", "no local delivery configured")
            known = self.config.local_recipients
            if known is not None and rcpt.lower().split("+", 1)[0] not in known and \
                    _unplus(rcpt).lower() not in known:
                return Reply(550, "5.1.1", f"<{rcpt}>: recipient address rejected: user unknown")
        return None

    # --- after DATA --------------------------------------------------------------------------------------
    async def message(self, s: Session, data: bytes) -> Reply:
        now = time.time()
        qid = s.queue_id or new_queue_id(now)
        assert s.sender is not None
        received = self._received(s, qid, now)
        signatures = b""
        # RFC 5321 §2.3.8: the smtpd refused every bare CR and LF, and only a filter's edit could bring one
        # back; without edits neither the signer nor the outbound encoding need count the line ends again
        unedited = not any(v.headers or v.new_body is not None for v in s.edits)
        if self.signer is not None:
            try:
                domain, selector = dkim_choice(s.routes)
                signatures = await self.signer(data, received, s.sender, unedited, domain=domain, selector=selector)
            except dkimpy.MessageFormatError as e:
                # the smtpd repaired the header (smtpd.repair_header); what dkimpy still refuses is refused
                log.info("%s: reject: message format: %s", qid, e)
                return Reply(554, "5.6.0", f"message format refused: {e}")
        # the fields go in front of the body in one copy (a 1 MB body was copied once per prepend)
        content = b"".join((signatures, received, data))
        if unedited and (not data or data.endswith(b"\r\n")):
            # what the smtpd checked (RFC 5321 §2.3.8), with our own CRLF fields in front: the outbound
            # encoding need not count its line ends again
            content = smtp_data.Canonical(content)
        rcpts = [_recipient(addr, params) for addr, params in s.recipients]
        if not self._verified_sender(s):
            # RFC 3461 §4.1 lets a server decline NOTIFY=SUCCESS; from a client that neither authenticated
            # nor is trusted, the sender is unverified (maybe forged): a success report would be backscatter
            # to a stranger, with content the client chose. FAILURE/DELAY stay (RFC 5321 §6.1 requires them).
            for r in rcpts:
                if r.notify and "SUCCESS" in r.notify:
                    r.notify = [n for n in r.notify if n != "SUCCESS"] or ["NEVER"]
                    log.info("%s: NOTIFY=SUCCESS for <%s> not honoured: unauthenticated client, unverified sender",
                             qid, r.address)
        params = s.mail_params
        env = Envelope.new(s.sender, rcpts, content, now=now, envid=xtext_decode(params["ENVID"])
                           if "ENVID" in params else None, ret=params.get("RET", "").upper() or None,
                           requiretls="REQUIRETLS" in params, smtputf8="SMTPUTF8" in params,
                           body=params.get("BODY", "").upper())
        env.id = qid
        log.info("%s: client=%s[%s]%s", qid, s.client_name, s.peer[0], f", sasl_username={s.user}" if s.user else "")
        logging.getLogger("postgate.queue").info("%s: from=<%s>, size=%d, nrcpt=%d, tls=%s (queue active)", qid,
                                                 s.sender, len(content), len(rcpts), s.tls_version or "none")
        if s.routes:
            apply_routes(env, s.routes)
        if s.hold is not None:
            return await self._queue(env, content, f"hold: {s.hold}", hold=True)
        queue_why = "queue-first" if self.config.mode == "queue-first" else \
            "too many pre-queue deliveries under way" if self.inflight >= self.config.max_inflight else ""
        if queue_why:
            # mail for our own domains is delivered locally in every mode: queueing it would send it to our
            # own MX, that is back here (a loop the hop count would only stop after 50 rounds)
            if self.local is not None and any(self.relay.is_local(r.address) for r in env.recipients):
                success: list[tuple[str, str]] = []
                await self._deliver_local(env, content, success, {})
                await self._notify_success(env, content, success)
                if not env.pending and not any(r.status is Outcome.BOUNCED for r in env.recipients):
                    return self._answer_delivered(env)
            return await self._queue(env, content, queue_why)
        self.inflight += 1
        try:
            return await self._prequeue(env, content)
        finally:
            self.inflight -= 1

    async def _prequeue(self, env: Envelope, content: bytes) -> Reply:
        success: list[tuple[str, str]] = []  # recipients owed a success DSN (RFC 3461 NOTIFY=SUCCESS)
        got: dict[str, RecipientResult] = {}   # each recipient's outcome, with the reply as data
        remote = [r for r in env.recipients if not self.relay.is_local(r.address)]
        await self._deliver_local(env, content, success, got)
        if remote:
            task = asyncio.create_task(self.deliverer.deliver(env.sender, [r.address for r in remote], content,
                                                              queue_id=env.id, requiretls=env.requiretls,
                                                              dsn=dsn.params(env), smtputf8=env.smtputf8,
                                                              routes=routes_of(remote)))
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
                    got[res.recipient] = res
                    _apply(env, res)
                    if res.relayed_without_dsn:
                        success.append((res.recipient, "relayed"))
            except Exception as e:
                log.exception("%s: delivery failed", env.id)
                for r in remote:
                    r.status, r.dsn = Outcome.DEFERRED, "4.3.0"
                    r.explain(f"internal delivery error: {e}")
        await self._notify_success(env, content, success)
        statuses = {r.status for r in env.recipients}
        if statuses == {Outcome.DELIVERED}:
            return self._answer_delivered(env)
        if statuses == {Outcome.BOUNCED}:
            first = env.recipients[0]
            rep = got[first.address].reply if first.address in got else None
            code = rep.code if rep is not None and rep.permanent else 550
            text = rep.text if rep is not None and rep.permanent else first.reason
            log.info("%s: outcome=refused (pre-queue, %s)", env.id, first.reason)
            return Reply(code, first.dsn or "5.0.0", text)
        # this was the first attempt: the queue's first retry comes after the first backoff
        now = time.time()
        env.attempts.append({"time": now, "prequeue": True})
        env.next_attempt = now + self.scheduler.backoff(1)
        return await self._queue(env, content, "mixed or temporary results" if Outcome.DELIVERED in statuses or
                                 Outcome.BOUNCED in statuses else "temporary failure")

    async def _deliver_local(self, env: Envelope, content: bytes, success: list[tuple[str, str]],
                             got: dict[str, RecipientResult]) -> None:
        """Deliver the recipients in our own domains (LMTP or Maildir), each with its own result."""
        local = [r for r in env.recipients if self.relay.is_local(r.address) and not r.final]
        if not local or self.local is None:
            return
        for lres in await self.local.deliver(env.sender, [r.address for r in local], content, queue_id=env.id):
            lreply = Reply.parse(lres.code, lres.text)
            got[lres.recipient] = RecipientResult(lres.recipient, Outcome.DELIVERED if lres.ok else (
                Outcome.BOUNCED if lres.code >= 500 else Outcome.DEFERRED), lreply.status,
                lres.text, lreply, mx="local")
            _apply(env, got[lres.recipient])
            if lres.ok:
                success.append((lres.recipient, "delivered"))

    async def _notify_success(self, env: Envelope, content: bytes, success: list[tuple[str, str]]) -> None:
        """RFC 3461 §5.2.2/§6.2: success reports for the recipients that asked (NOTIFY=SUCCESS). One that
        cannot be queued is logged and given up (Scheduler.notify_success): the mail is delivered, and neither
        the client's answer nor a failure report may depend on it."""
        for action in ("delivered", "relayed"):
            owed = [r for r in env.recipients if (r.address, action) in success and r.wants("SUCCESS")
                    and r.notify is not None]
            if owed:
                await self.scheduler.notify_success(env, content, owed, action)

    def _answer_delivered(self, env: Envelope) -> Reply:
        log.info("%s: outcome=delivered (pre-queue)", env.id)
        return Reply(250, "2.0.0", f"Ok: delivered as {env.id}")

    def _verified_sender(self, s: Session) -> bool:
        """The client vouches for its sender: it authenticated, or it is one of our trusted networks."""
        return s.user is not None or self.relay.trusted(s.peer[0])

    async def _queue(self, env: Envelope, content: bytes, why: str, hold: bool = False) -> Reply:
        bounced = [r for r in env.recipients if r.status is Outcome.BOUNCED]
        pending = env.pending
        try:
            if pending:
                # a filter's HOLD: stored on hold at once (the operator releases it: postgate queue release),
                # so no runner can lease it between the enqueue and the hold
                await self.spool.enqueue(env, content, hold=hold)
            if bounced:
                await self.scheduler.notify(env, content, bounced)
        except (OSError, SpoolError) as e:
            log.error("%s: cannot queue: %s", env.id, e)
            return Reply(451, "4.3.0", "queue write failed, try again later")
        attack = any(r.suspected_attack for r in env.recipients)
        log.info("%s: outcome=queued (%s)%s", env.id, why, " suspected_attack=yes" if attack else "")
        self.scheduler.wake.set()
        delay = self.scheduler.inflow_delay()
        if delay:   # Postfix in_flow_delay: mail arrives faster than it leaves; the client waits (it is queued)
            await asyncio.sleep(delay)
        return Reply(250, "2.0.0", f"Ok: queued as {env.id}")

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
            success: list[tuple[str, str]] = []
            for res in results:
                if _apply(env, res) and res.status is Outcome.DELIVERED and res.relayed_without_dsn:
                    success.append((res.recipient, "relayed"))
            # RFC 3461 §5.2.2: a late result relayed to a next hop without DSN is reported "relayed" to a
            # NOTIFY=SUCCESS recipient's sender, as the queue does (a report that cannot be queued is logged)
            await self._notify_success(env, content, success)
            bounced = [r for r in env.recipients if r.status is Outcome.BOUNCED]
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
        proto = "SMTP"
        if s.esmtp:
            # RFC 3848 §1-§2: the S (TLS) and A (AUTH) suffixes are defined for ESMTP only; a HELO session is
            # "SMTP" whatever its TLS and AUTH
            proto = "UTF8SMTP" if "SMTPUTF8" in s.mail_params else "ESMTP"
            if s.tls:
                proto += "S"
            if s.user:
                proto += "A"
        tls = f" ({s.tls_version}:{s.tls_cipher})" if s.tls else ""
        for_ = f"\r\n\tfor <{s.recipients[0][0]}>" if len(s.recipients) == 1 else ""
        # RFC 5321 §4.4: the "from" clause is an Extended-Domain: the smtpd stores the name neutered already
        # (printable ASCII, no space < > ( ) \ " ; @); again here for a Session made elsewhere
        helo = neuter_helo(s.helo)[:100]
        # RFC 5321 §4.1.3: an IPv6 address literal is "[IPv6:" addr "]" (IPv4 stays "[192.0.2.1]")
        ip = s.peer[0].split("%", 1)[0]   # no zone index in a literal
        literal = f"[IPv6:{ip}]" if ":" in ip else f"[{ip}]"
        return (f"Received: from {helo} ({literal})\r\n\tby {self.config.hostname} (Postgate) with "
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


def _apply(env: Envelope, res: RecipientResult) -> bool:
    """Record ``res`` on its recipient if that one is not final yet; True if it was recorded."""
    for r in env.recipients:
        if r.address == res.recipient and not r.final:
            r.record(res)
            return True
    return False


__all__ = ["PreQueue", "PreQueueConfig", "domain_of"]
