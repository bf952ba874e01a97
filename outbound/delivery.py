"""The outbound delivery agent: one message, its recipients grouped by next hop, an outcome per recipient.

For each destination domain: pick the next hop (a smart host from the transport map or configuration,
else the domain's MX hosts, RFC 7672 §2.2), the TLS policy (policy map, else the default level), and try
the MX hosts in order and every address of each. A host that fails DANE or TLS where they are required —
TLSA mismatch, STARTTLS missing, handshake failure, bogus DNS, failed TLSA lookup — is skipped for the
next one, as RFC 7672 §2.2 prescribes; if none succeeds the recipients are **deferred**, never bounced,
and the failure is flagged as a suspected attack in the log line and in ``Counters``. Bounces come only
from a 5xx reply of the server or a null MX.

A connection is reused for further messages to the same MX host address, but only under the same
next-hop domain and the same requirement, so one domain's authentication result never serves another's
policy.

Which hosts may be used and what TLS each must provide is ``policy.tls.decide`` (the one TLS decision);
:meth:`Deliverer.attempts` walks the hosts and addresses in order applying it, and both delivery and
``postgate tls-check`` consume that walk, so tls-check reports exactly what delivery does. Every outcome is
data: an :class:`~postgate.policy.vocab.Outcome`, the server's :class:`~postgate.policy.vocab.Reply`, the
TLS result (:class:`~postgate.policy.vocab.TlsOutcome`, RFC 8460's types for failures) and the
``suspected_attack`` flag.

SMTPUTF8 (RFC 6531): a message flagged SMTPUTF8, or with a non-ASCII envelope address, goes out with
``MAIL FROM:<…> SMTPUTF8`` and UTF-8 addresses to a hop that offers the extension; to one that does not it
is bounced with 5.6.7 (RFC 6531 §3.4: the client must not send it there), never sent mangled.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import Counter
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from postgate.outbound import eager, smtp_wire
from postgate.outbound.crash import crashpoint
from postgate.outbound.downgrade import DowngradeMemory, Protection
from postgate.outbound.mtasts import StsLookup, StsResolver, pkix_problem
from postgate.outbound.nexthop import Failure, MXHost, NextHop, NextHopMemo, caps_owner
from postgate.outbound.resolver import Resolver
from postgate.outbound.smtp_client import Session, SessionError, Timeouts, open_session
from postgate.outbound.smtp_wire import ReplyError, WireError
from postgate.policy import metrics, tlsrpt
from postgate.policy.logline import arrival_of, delays
from postgate.policy.maps import Relay, TlsPolicyMap, TransportMap, parse_relay
from postgate.policy.tls import (
    Auth,
    Decision,
    HostFacts,
    Level,
    Policy,
    Requirement,
    Skip,
    Sts,
    StsMode,
    TLSMode,
    decide,
)
from postgate.policy.tlsrpt import PolicyType
from postgate.policy.vocab import Outcome, QueueId, Reply, Security, Tlsa, TlsOutcome, domain_of, new_queue_id

log = logging.getLogger("postgate.delivery")


@dataclass
class RecipientResult:
    recipient: str
    status: Outcome
    dsn: str
    reason: str = ""
    reply: Reply | None = None            # the server's own reply, when there was one
    security: TlsOutcome | None = None    # the session's TLS (a success kind)
    mx: str | None = None
    address: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    tlsa_matched: str | None = None
    suspected_attack: bool = False
    tls_result: TlsOutcome | None = None  # RFC 8460 result type of the failure that deferred it
    relayed_without_dsn: bool = False     # RFC 3461 §5.2.2: delivered to a server without DSN support
    port: int | None = None               # the port of ``address`` (for the log's relay=host[addr]:port)
    last_tried: str | None = None         # a deferral: the last MX contacted, host[addr]:port (for the log)

    def to_json(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in ("recipient", "status", "dsn", "security", "mx", "address",
                                            "tls_version", "cipher", "tlsa_matched", "reason",
                                            "suspected_attack", "tls_result")}
        out["reply"] = str(self.reply) if self.reply else ""
        return out

    @property
    def text(self) -> str:
        """The reply if there was one, else the reason: what a log line or DSN diagnostic shows."""
        return str(self.reply) if self.reply else self.reason


def xtext(s: str) -> str:
    """RFC 3461 §4: '!' to '~' stand for themselves, except '+' and '='; anything else is +XX."""
    return "".join(c if "!" <= c <= "~" and c not in "+=" else f"+{ord(c):02X}"
                   for c in s.encode("utf-8").decode("latin-1"))


@dataclass(frozen=True)
class Dsn:
    """RFC 3461 parameters of a message, passed on to a next hop that offers DSN."""

    ret: str | None = None
    envid: str | None = None
    notify: dict[str, tuple[str, ...]] = field(default_factory=dict)
    orcpt: dict[str, str] = field(default_factory=dict)

    def mail_options(self) -> list[str]:
        out = []
        if self.ret:
            out.append(f"RET={self.ret}")
        if self.envid:
            out.append(f"ENVID={xtext(self.envid)}")
        return out

    def rcpt_options(self, rcpt: str) -> list[str]:
        out = []
        if rcpt in self.notify:
            out.append("NOTIFY=" + ",".join(self.notify[rcpt]))
        if rcpt in self.orcpt:
            kind, _, addr = self.orcpt[rcpt].partition(";")
            out.append(f"ORCPT={kind};{xtext(addr)}")
        return out


@dataclass(frozen=True)
class RecipientRoute:
    """One recipient's delivery choices made by an inbound filter (Sieve ``vnd.postgate``, issue 17)."""

    level: Level | None = None
    relay: Relay | None = None

    @classmethod
    def parse(cls, tls_level: str | None, transport: str | None) -> RecipientRoute:
        """From the stored strings; a bad one is a ValueError (checked when the filter set it)."""
        return cls(Level(tls_level) if tls_level else None,
                   parse_relay(transport, "route") if transport else None)


@dataclass
class Counters:
    values: Counter[str] = field(default_factory=Counter)

    def inc(self, name: str, n: int = 1) -> None:
        self.values[name] += n


@dataclass
class DeliveryConfig:
    helo: str = "localhost"
    default_policy: Policy = field(default_factory=Policy)
    policy_map: TlsPolicyMap | None = None
    transport_map: TransportMap | None = None
    relay: Relay | None = None
    relay_policy: Policy | None = None
    relay_auth: tuple[str, str] | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    ca_file: str | None = None
    reuse_idle: float = 5.0
    # issue 18 (docs/mta-sts.md): MTA-STS, the downgrade memory, the TLS-RPT hook, the 'may' fallback delay
    sts: StsResolver | None = None
    downgrade: DowngradeMemory | None = None
    tls_report: Callable[[tlsrpt.Attempt], Awaitable[None]] | None = None
    cleartext_fallback_delay: float = 300.0   # 'may': cleartext after a failed handshake only this long after arrival


SWEEP_EVERY = 1.0   # seconds


class ConnectionCache:
    """Idle authenticated sessions keyed by (next-hop, host, address, port, requirement)."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self._idle: dict[tuple[Any, ...], list[tuple[float, Session]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Future[None] | None = None
        self._swept = 0.0

    def sweep(self) -> None:
        """Close connections idle for longer than ``idle`` (so servers do not time them out)."""
        now = self._swept = time.monotonic()
        for key in list(self._idle):
            keep = []
            for t, s in self._idle[key]:
                if now - t <= self.idle and s.alive:
                    keep.append((t, s))
                else:
                    task = asyncio.ensure_future(s.close())
                    self._closing.add(task)
                    task.add_done_callback(self._closing.discard)
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]

    def take(self, key: tuple[Any, ...]) -> Session | None:
        # the session taken is checked itself; the others are swept at most once a second (a sweep visits
        # every idle session: per message, with a hundred cached connections, 6% of the relay's CPU time)
        now = time.monotonic()
        if now - self._swept >= SWEEP_EVERY:
            self.sweep()
        entries = self._idle.get(key, [])
        while entries:
            t, s = entries.pop()
            if now - t <= self.idle and s.alive:
                return s
            task = asyncio.ensure_future(s.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        return None

    def put(self, key: tuple[Any, ...], s: Session) -> None:
        self._idle.setdefault(key, []).append((time.monotonic(), s))
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.ensure_future(self._sweep_later())

    async def _sweep_later(self) -> None:
        while self._idle:
            await asyncio.sleep(self.idle)
            self.sweep()

    async def close_all(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        sessions = [s for entries in self._idle.values() for _, s in entries]
        self._idle.clear()
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)


@dataclass
class Attempt:
    """One step of the walk over a next hop's hosts: a host skipped by the TLS decision, or one address
    tried — an open session, or the error that prevented it."""

    host: MXHost
    decision: Decision
    address: str | None = None
    session: Session | None = None
    error: SessionError | None = None
    fallback: SessionError | None = None   # the failed opportunistic handshake before a cleartext session

    @property
    def mx(self) -> str:
        return self.host.text


class Deliverer:
    def __init__(self, resolver: Resolver, config: DeliveryConfig | None = None,
                 counters: Counters | None = None) -> None:
        self.resolver = resolver
        self.config = config or DeliveryConfig()
        self.counters = counters or Counters()
        self.cache = ConnectionCache(self.config.reuse_idle)
        self.nexthops = NextHopMemo()   # next hops kept while their DNS answers are cached (at most 1 s)
        self._facts: dict[int, tuple[MXHost, HostFacts]] = {}   # id(host) -> (host, its facts)

    async def close(self) -> None:
        await self.cache.close_all()

    # --- policy --------------------------------------------------------------------------------------
    def relay_for(self, domain: str) -> Relay | None:
        if self.config.transport_map is not None:
            r = self.config.transport_map.lookup(domain)
            if r is not None:
                return r
        return self.config.relay

    def policy_for(self, domain: str, relay: Relay | None) -> Policy:
        pm = self.config.policy_map
        if relay is not None:
            if pm is not None:
                p = pm.lookup(relay.host, relay.port, bracketed=not relay.mx)
                if p is not None:
                    return p
            return self.config.relay_policy or self.config.default_policy
        if pm is not None:
            p = pm.lookup(domain)
            if p is not None:
                return p
        return self.config.default_policy

    # --- delivery ------------------------------------------------------------------------------------
    async def deliver(self, sender: str, recipients: Sequence[str], data: bytes, *,
                      queue_id: str | None = None, level: Level | None = None,
                      mail_options: Sequence[str] = (), requiretls: bool = False,
                      dsn: Dsn | None = None, arrival: float | None = None,
                      smtputf8: bool = False, routes: Mapping[str, RecipientRoute] | None = None,
                      ) -> list[RecipientResult]:
        """Deliver now. ``routes``: per-recipient choices of an inbound filter (Sieve ``vnd.postgate``): a
        TLS level in place of the policy map's, a transport in place of the transport map's.
        ``requiretls`` (RFC 8689): only over TLS with a verified certificate (DANE, or
        PKIX for the MX host name) to a server that offers REQUIRETLS, which is passed on. ``smtputf8``
        (RFC 6531): the message needs the SMTPUTF8 extension (also implied by a non-ASCII address).
        ``arrival``: when the message arrived (POSIX time; None: now), for the 'may' cleartext-fallback delay."""
        qid = QueueId(queue_id) if queue_id else new_queue_id()
        start, start_wall = time.monotonic(), time.time()
        arrival = arrival if arrival is not None else time.time()
        groups: dict[tuple[str, Level | None, Relay | None], list[str]] = {}
        for r in recipients:
            rr = (routes or {}).get(r)
            lv = rr.level if rr is not None and rr.level is not None else level
            groups.setdefault((domain_of(r), lv, rr.relay if rr is not None else None), []).append(r)
        if requiretls:
            mail_options = [*mail_options, "REQUIRETLS"]
        # RFC 6531 §3.4: an envelope address with non-ASCII characters needs SMTPUTF8 as well
        smtputf8 = smtputf8 or not all(a.isascii() for a in (sender, *recipients))
        mail_options = [o for o in mail_options if o.upper() != "SMTPUTF8"]
        # each destination started at once (outbound/eager.py): no turn of the loop before the first write
        results = await eager.gather(*(self._deliver_domain(qid, sender, d, rcpts, data, lv,
                                                            mail_options, requiretls, dsn, smtputf8, arrival,
                                                            relay=rl)
                                       for (d, lv, rl), rcpts in groups.items()))
        out = [res for group in results for res in group]
        delay = time.monotonic() - start
        for res in out:
            _log_result(qid, res, delay, start_wall)
            _count(qid, res, delay)
            self.counters.inc(f"status_{res.status}")
            if res.suspected_attack:
                self.counters.inc("suspected_attack")
            if res.tls_result is not None:
                self.counters.inc(f"tls_{res.tls_result}")
        return out

    async def route(self, domain: str, level: Level | None = None, relay: Relay | None = None) -> Route:
        """Where mail for ``domain`` goes (smart host or MX) and under which TLS policy. ``level`` and
        ``relay`` override the policy and transport maps (the command line, or an inbound filter's route)."""
        relay = relay or self.relay_for(domain)
        policy = self.policy_for(domain, relay)
        if level is not None:
            policy = replace(policy, level=level, source="override")
        if relay is not None:
            nh = await self.nexthops.resolve(self.resolver, relay.host, port=relay.port, use_mx=relay.mx)
            return Route(relay.host, relay.port, policy, nh, True)
        nh, sts = await eager.gather(self.nexthops.resolve(self.resolver, domain), self._sts(domain))
        return Route(domain, 25, policy, nh, False, sts)

    def decide(self, rt: Route, host: MXHost, requiretls: bool = False) -> Decision:
        """The one TLS decision (policy/tls.py) for one host of a route, with its MTA-STS policy."""
        facts = self._facts.get(id(host))
        if facts is None or facts[0] is not host:   # computed once per resolved host, not per message
            if len(self._facts) >= 1024:
                self._facts.clear()
            facts = self._facts[id(host)] = (host, host_facts(host))
        return decide(rt.policy, facts[1], nexthop=rt.name, requiretls=requiretls, sts=rt.sts_policy)

    async def attempts(self, qid: str, rt: Route, requiretls: bool = False,
                       arrival: float | None = None) -> AsyncGenerator[Attempt, None]:
        """Walk the route's hosts in order (RFC 7672 §2.2: a host that fails is skipped for the next) and
        each host's addresses, yielding each skip, each failed connection and each open session. The
        consumer stops when it is done (delivery: at the first success); what it does not take is closed.
        ``arrival`` (None: now) is when the message arrived, for the 'may' cleartext-fallback delay."""
        arrival = arrival if arrival is not None else time.time()
        for host in rt.nexthop.hosts:
            if host.caps is not None and host.enforced_caps is None and not host.unusable:
                log.info("%s: %s has an insecure MTA-capability record (%s): not enforced", qid, host.text,
                         host.caps.text())
            d = self.decide(rt, host, requiretls)
            if isinstance(d, Skip):
                yield Attempt(host, d)
                continue
            for address in host.addresses:
                try:
                    session, fallback = await self._connect(rt, host, address, d, arrival)
                except SessionError as e:
                    yield Attempt(host, d, address, error=e)
                    continue
                yield Attempt(host, d, address, session=session, fallback=fallback)

    async def _connect(self, rt: Route, host: MXHost, address: str, req: Requirement,
                       arrival: float) -> tuple[Session, SessionError | None]:
        """An open session under ``req`` (a reused one if allowed), and the failed opportunistic handshake if
        the session is a cleartext fallback."""
        key = self._key(rt, host, address, req)
        session = self.cache.take(key) if req.reuse is not False else None
        if session is not None:
            return session, None
        auth = self.config.relay_auth if rt.via_relay else None
        try:
            return await open_session(address, rt.port, host.text, req, helo=self.config.helo,
                                      timeouts=self.config.timeouts, ca_file=self.config.ca_file,
                                      auth=auth), None
        except SessionError as e:
            if not e.cleartext_retry:
                raise
            # Postfix 'may': a failed opportunistic handshake is retried in cleartext — but not at once
            # (that hands an active attacker the plaintext), and never to a destination that did TLS
            self._may_fallback(e, rt.name, host.text, address, arrival)
            plain = Requirement(req.level, TLSMode.NONE, req.auth, requiretls=req.requiretls)
            return await open_session(address, rt.port, host.text, plain, helo=self.config.helo,
                                      timeouts=self.config.timeouts), e

    def _key(self, rt: Route, host: MXHost, address: str, req: Requirement) -> tuple[Any, ...]:
        return (rt.name, host.text, address, rt.port, req.key())

    async def _deliver_domain(self, qid: str, sender: str, domain: str, rcpts: list[str], data: bytes,
                              level: Level | None, mail_options: Sequence[str], requiretls: bool = False,
                              dsn: Dsn | None = None, smtputf8: bool = False,
                              arrival: float | None = None, relay: Relay | None = None) -> list[RecipientResult]:
        if not domain:
            return [RecipientResult(r, Outcome.BOUNCED, "5.1.3", "recipient address has no domain") for r in rcpts]
        rt = await self.route(domain, level, relay)
        nh = rt.nexthop
        metrics.inc("dnssec_verdicts", verdict=str(nh.mx_security))
        if nh.failure is Failure.PERMANENT:
            return [RecipientResult(r, Outcome.BOUNCED, nh.status, nh.reason) for r in rcpts]
        attack = nh.mx_security is Security.BOGUS
        if nh.failure is Failure.TEMPORARY and not nh.hosts:
            why = nh.reason + (" — suspected attack" if attack else "")
            return [RecipientResult(r, Outcome.DEFERRED, nh.status, why, suspected_attack=attack,
                                    tls_result=TlsOutcome.DNSSEC_INVALID if attack else None) for r in rcpts]
        return await self._try_hosts(qid, sender, rt, rcpts, data, mail_options, requiretls, dsn, smtputf8,
                                     arrival)

    async def _try_hosts(self, qid: str, sender: str, rt: Route, rcpts: list[str], data: bytes,
                         mail_options: Sequence[str], requiretls: bool = False, dsn: Dsn | None = None,
                         smtputf8: bool = False, arrival: float | None = None) -> list[RecipientResult]:
        failures: list[str] = []
        attack = False
        status_code = "4.4.1"
        tls_result: TlsOutcome | None = None
        guard = await self._downgrade(rt)
        if guard:
            return [RecipientResult(r, Outcome.DEFERRED, "4.7.5", guard, suspected_attack=True) for r in rcpts]
        await self._report_policy_failure(rt)
        contacted: tuple[str | None, str | None] = (None, None)  # the last MX address tried, for the log
        walk = self.attempts(qid, rt, requiretls, arrival)
        try:
            async for a in walk:
                if isinstance(a.decision, Skip):
                    sk = a.decision
                    attack |= sk.suspected_attack
                    failures.append(sk.reason)
                    status_code = sk.reply.status
                    tls_result = sk.tls_result or tls_result
                    if sk.tls_result is not None:  # RFC 8460 §4.3.2: a policy failure for this MX host
                        await self._report(rt, a.host.dane_records, a.mx, "", sk.tls_result, sk.reason)
                    if rt.sts_policy is not None and rt.sts_policy.mode is StsMode.ENFORCE and \
                            not rt.sts_policy.allows(a.mx):
                        self.counters.inc("sts_mx_mismatch")
                    continue
                assert isinstance(a.decision, Requirement)
                if a.error is not None:
                    e = a.error
                    contacted = (a.mx, a.address)
                    if e.tls_result is not None:  # RFC 8460 §4.3.1: a failed negotiation
                        await self._report(rt, _applied_tlsa(a.decision), a.mx, a.address or "", e.tls_result,
                                           e.reason, e.local_address)
                    attack |= e.suspected_attack
                    failures.append(e.reason)
                    status_code = e.dsn
                    tls_result = e.tls_result or tls_result
                    if e.code >= 500 and not e.temporary:
                        return [RecipientResult(r, Outcome.BOUNCED, e.dsn, e.reason, reply=e.reply, mx=a.mx,
                                                address=a.address, port=rt.port) for r in rcpts]
                    continue
                assert a.session is not None and a.address is not None
                session = a.session
                if a.fallback is not None and a.fallback.tls_result is not None:
                    # the opportunistic handshake failed before this cleartext session (RFC 8460 §4.3.1)
                    await self._report(rt, (), a.mx, a.address, a.fallback.tls_result, a.fallback.reason,
                                       session.local_address)
                if smtputf8 and not session.supports("smtputf8"):
                    # RFC 6531 §3.4: a message that needs SMTPUTF8 must not go to a hop without it
                    await self._release(rt, a, session)
                    why = f"{a.mx} does not offer SMTPUTF8, required for this message (RFC 6531 §3.4)"
                    return [RecipientResult(r, Outcome.BOUNCED, "5.6.7", why, mx=a.mx, address=a.address)
                            for r in rcpts]
                try:
                    results = await _transaction(session, sender, rcpts, data, mail_options, dsn, smtputf8)
                except asyncio.CancelledError:
                    # the attempt was stopped (the queue lost its lease): the connection is dropped, no QUIT;
                    # before the end of mail data confirms it, the transaction is not delivered (RFC 5321 §3.3)
                    session.conn.abort()
                    raise
                except SessionError as e:
                    await session.close()
                    if e.code >= 500 and not e.temporary:  # the server's own permanent refusal
                        return [RecipientResult(r, Outcome.BOUNCED, e.dsn, e.reason, reply=e.reply, mx=a.mx,
                                                address=a.address) for r in rcpts]
                    attack |= e.suspected_attack
                    failures.append(e.reason)
                    status_code = e.dsn
                    continue
                for res in results:
                    res.mx, res.address = a.mx, a.address
                    res.security = session.tls.security
                    res.tls_version, res.cipher = session.tls.version, session.tls.cipher
                    res.tlsa_matched = session.tls.tlsa_matched.text() if session.tls.tlsa_matched else None
                session.messages += 1
                if session.messages == 1:
                    await self._session_done(rt, session, a.decision)
                await self._release(rt, a, session)
                # the server's own replies are this attempt's outcome; a 4xx recipient waits for a retry
                for res in results:
                    res.port = rt.port
                return results
        finally:
            await walk.aclose()
        reason = "; ".join(failures) or "no MX host could be tried"
        tried = f"{contacted[0]}[{contacted[1]}]:{rt.port}" if contacted[1] else None
        return [RecipientResult(r, Outcome.DEFERRED, "4.7.5" if attack else status_code, reason,
                                suspected_attack=attack, tls_result=tls_result, last_tried=tried) for r in rcpts]

    async def _release(self, rt: Route, a: Attempt, session: Session) -> None:
        """Keep the session for the next message (same next hop, same requirement), or close it. A cleartext
        fallback is never kept: one message's fallback never serves a younger message."""
        assert isinstance(a.decision, Requirement) and a.address is not None
        if session.alive and a.decision.reuse is not False and a.fallback is None:
            self.cache.put(self._key(rt, a.host, a.address, a.decision), session)
        else:
            await session.close()

    # --- issue 18: MTA-STS, the downgrade memory, TLS-RPT (docs/mta-sts.md) ---------------------------
    async def _sts(self, domain: str) -> StsLookup | None:
        """The MTA-STS policy in force for an MX-delivered domain (RFC 8461 applies to MX delivery, not to
        a configured smart host: route() asks only for those)."""
        if self.config.sts is None:
            return None
        return await self.config.sts.lookup(domain)

    async def _downgrade(self, rt: Route) -> str:
        """The reason to defer for a suspected downgrade, or ""."""
        mem = self.config.downgrade
        if mem is None or rt.via_relay:
            return ""
        sts = rt.sts
        if any(h.dane_records for h in rt.nexthop.hosts):
            current = Protection.DANE
        elif rt.sts_policy is not None and rt.sts_policy.mode is StsMode.ENFORCE:
            current = Protection.STS
        else:
            current = Protection.NONE
        verdict = await mem.observe(rt.name, current, sts_vanished=sts is not None and sts.txt_missing)
        if verdict.suspected:
            self.counters.inc("downgrade_suspected")
        return verdict.reason if verdict.defer else ""

    def _may_fallback(self, e: SessionError, domain: str, mx: str, address: str, arrival: float) -> None:
        """Allow the cleartext retry of a failed opportunistic handshake, or raise a deferral that carries
        the handshake's RFC 8460 result."""
        mem = self.config.downgrade
        if mem is not None and mem.tls_recent(domain):
            self.counters.inc("cleartext_fallback_refused")
            raise SessionError(e.reason + f"; no cleartext fallback: {domain} did TLS before (downgrade memory)"
                               " — suspected attack", suspected_attack=True, dsn="4.7.5", tls_result=e.tls_result,
                               chain=e.chain)
        waited = time.time() - arrival
        if waited < self.config.cleartext_fallback_delay:
            self.counters.inc("cleartext_fallback_deferred")
            raise SessionError(e.reason + f"; cleartext fallback only after {self.config.cleartext_fallback_delay:g}s "
                               f"in the queue (waited {waited:.0f}s)", dsn="4.7.5", tls_result=e.tls_result,
                               chain=e.chain)
        self.counters.inc("cleartext_fallback")
        log.warning("%s[%s]: STARTTLS failed, falling back to cleartext after %.0fs — possible downgrade (%s)",
                    mx, address, waited, e.reason)

    async def _session_done(self, rt: Route, s: Session, req: Requirement) -> None:
        """A session carried mail: remember TLS, and count it for TLS-RPT."""
        if rt.via_relay:
            return
        if s.tls.security is not TlsOutcome.CLEARTEXT and self.config.downgrade is not None:
            await self.config.downgrade.note_tls(rt.name)
        result: TlsOutcome | None = None
        detail = ""
        sts = rt.sts.policy if rt.sts is not None else None
        if s.tls.security is TlsOutcome.CLEARTEXT:
            result, detail = TlsOutcome.STARTTLS_NOT_SUPPORTED, "delivered without TLS"
        elif sts is not None and sts.mode is StsMode.TESTING and req.auth is Auth.NONE:
            # RFC 8461 §5: testing mode: deliver, but report what enforce would have refused
            if not sts.matches(s.mx):
                result, detail = TlsOutcome.VALIDATION_FAILURE, f"{s.mx} matches no mx of the policy"
            else:
                problem = pkix_problem(s.tls.chain, s.mx, self.config.ca_file)
                if problem is not None:
                    result, detail = problem
        await self._report(rt, _applied_tlsa(req), s.mx, s.address, result, detail, s.local_address)

    async def _report_policy_failure(self, rt: Route) -> None:
        """RFC 8460 §4.3.2.2: an MTA-STS policy that could not be fetched (``sts-policy-fetch-error``), was
        invalid (``sts-policy-invalid``) or whose host failed Web PKI (``sts-webpki-invalid``) is a failure of
        the sts policy type for this attempt, reported whether a cached copy stood in for it or not."""
        hook = self.config.tls_report
        failure = rt.sts.failure if rt.sts is not None else None
        if hook is None or rt.via_relay or failure is None:
            return
        policy = rt.sts.policy if rt.sts is not None else None
        strings = tuple(policy.lines()) if policy is not None else ()
        patterns = policy.mx if policy is not None else ()
        await hook(tlsrpt.Attempt(rt.name, PolicyType.STS, failure.result, "", "", "", strings, patterns,
                                  failure.reason[:200]))

    async def _report(self, rt: Route, tlsa: tuple[Tlsa, ...], mx: str, address: str,
                      result: TlsOutcome | None, detail: str, sending_ip: str = "") -> None:
        """One session's TLS outcome to the TLS-RPT hook (RFC 8460 §4.1; ``when`` is stamped by the hook).
        ``tlsa``: the DANE records applied to the host, if any (RFC 8460 §4.4: policy-type tlsa);
        ``sending_ip``: our address on the connection (RFC 8460 §4.4 sending-mta-ip), "" if none was open."""
        hook = self.config.tls_report
        if hook is None or rt.via_relay:
            return
        strings: tuple[str, ...] = ()
        patterns: tuple[str, ...] = ()
        sts = rt.sts.policy if rt.sts is not None else None
        if tlsa:
            ptype, strings = PolicyType.TLSA, tuple(t.text() for t in tlsa)
        elif sts is not None and sts.mode is not StsMode.NONE:
            ptype, strings, patterns = PolicyType.STS, tuple(sts.lines()), sts.mx
        else:
            ptype = PolicyType.NO_POLICY
        await hook(tlsrpt.Attempt(rt.name, ptype, result, mx, address, sending_ip, strings, patterns,
                                  detail[:200]))


@dataclass(frozen=True)
class Route:
    name: str            # the next-hop name: the domain, or the smart host
    port: int
    policy: Policy
    nexthop: NextHop
    via_relay: bool
    sts: StsLookup | None = None   # RFC 8461: the MTA-STS lookup for an MX-delivered domain

    @property
    def sts_policy(self) -> Sts | None:
        """The MTA-STS policy in force, as the TLS decision's input."""
        return self.sts.policy.sts() if self.sts is not None and self.sts.policy is not None else None


def _applied_tlsa(req: Requirement) -> tuple[Tlsa, ...]:
    """The TLSA records a requirement enforces as DANE (not tafile anchors)."""
    return req.tlsa if req.auth is Auth.DANE and not req.pkix_names else ()


def host_facts(host: MXHost) -> HostFacts:
    """What DNS said of one MX host, as the TLS decision's input."""
    return HostFacts(
        name=host.text, address_security=host.address_security, tlsa_security=host.tlsa_security,
        tlsa=tuple(Tlsa.from_rdata(t) for t in host.tlsa), unusable=host.unusable,
        reference_names=tuple(n.to_text(omit_final_dot=True) for n in host.reference_names),
        tlsa_base=host.tlsa_base.to_text(omit_final_dot=True) if host.tlsa_base else "",
        caps=host.caps, caps_security=host.caps_security,
        caps_owner=caps_owner(host.name).to_text(omit_final_dot=True))


# RFC 5321 §4.1.2: a mailbox on a command line; outside a quoted local part, no white space or angle
# brackets (they would end the path and smuggle parameters or commands), and CR, LF, NUL nowhere
_QUOTED_LOCAL = re.compile(r'^"(?:[^"\\\r\n]|\\.)*"(?=@|$)')
_UNSAFE = re.compile(r"[\s<>]")


def _path(address: str, encoding: str) -> bytes:
    """``<address>`` for MAIL FROM / RCPT TO (RFC 5321 §4.1.2; ``<>`` for the null reverse-path); ValueError
    for an address that cannot be put on a command line safely."""
    a = address.strip()
    if a.startswith("<") and a.endswith(">"):
        a = a[1:-1]
    if any(c in a for c in "\r\n\0") or _UNSAFE.search(_QUOTED_LOCAL.sub("", a, count=1)):
        raise ValueError(f"address {address!r} cannot be sent on an SMTP command line")
    return b"<" + a.encode(encoding) + b">"


def _command(verb: bytes, path: bytes, options: Sequence[str]) -> bytes:
    return b" ".join([verb + path, *(o.encode("ascii") for o in options)])


async def _transaction(s: Session, sender: str, rcpts: Sequence[str], data: bytes,
                       mail_options: Sequence[str], dsn: Dsn | None = None,
                       smtputf8: bool = False) -> list[RecipientResult]:
    """MAIL, RCPT per recipient, DATA (or BDAT) — pipelined where the server offers it
    (``smtp_wire.transaction``): each recipient's outcome from the server's own replies."""
    conn = s.conn
    t = s.timeouts
    # RFC 6531 §3.4: the SMTPUTF8 parameter on MAIL FROM, then UTF-8 addresses in MAIL and RCPT
    enc = "utf-8" if smtputf8 else "ascii"
    opts = [o for o in mail_options if conn.supports(o.split("=")[0].lower())]
    if conn.supports("size"):
        # RFC 1870 §6.1: the message's size declared on MAIL; one larger than the server's announced fixed
        # limit is not sent at all (§6.3: the server would refuse it, 552): a permanent failure, 5.3.4
        limit = conn.extensions.size
        if limit and len(data) > limit:
            why = f"message size {len(data)} exceeds the fixed limit of {limit} of {s.mx} (RFC 1870)"
            return [RecipientResult(r, Outcome.BOUNCED, "5.3.4", why) for r in rcpts]
        opts.append(f"SIZE={len(data)}")
    if conn.supports("8bitmime") and not data.isascii():
        opts.append("BODY=8BITMIME")   # RFC 6152 §2: 8-bit octets in the content are declared
    if smtputf8:
        opts.append("SMTPUTF8")
    with_dsn = dsn is not None and conn.supports("dsn")
    if with_dsn:  # RFC 3461 §5.2.1: a DSN-capable next hop gets the parameters
        assert dsn is not None
        opts += dsn.mail_options()
    results: list[RecipientResult] = []
    sent: list[RecipientResult] = []   # the recipients whose RCPT goes out, in order
    lines: list[bytes] = []
    try:
        try:
            mail = _command(b"MAIL FROM:", _path(sender, enc), opts)
        except UnicodeError:
            raise
        except ValueError as e:
            raise SessionError(f"sender: {e}", code=553, temporary=False, dsn="5.1.7") from e
        for r in rcpts:
            try:
                line = _command(b"RCPT TO:", _path(r, enc), dsn.rcpt_options(r) if with_dsn and dsn else [])
            except UnicodeError:
                raise
            except ValueError as e:  # RFC 3463: 5.1.3 bad destination mailbox address syntax
                results.append(RecipientResult(r, Outcome.BOUNCED, "5.1.3", str(e)))
                continue
            res = RecipientResult(r, Outcome.DELIVERED, "", relayed_without_dsn=dsn is not None and not with_dsn)
            results.append(res)
            sent.append(res)
            lines.append(line)
        if not sent:
            return results
        ex = await smtp_wire.transaction(conn, mail, lines, data, reset=s.messages > 0,
                                         command_timeout=t.command, data_timeout=t.data,
                                         before_content=lambda: crashpoint("delivery-before-data"))
    except (WireError, OSError, TimeoutError, UnicodeError) as e:
        if isinstance(e, ReplyError):
            # a refused RSET says nothing about this message: the connection is unusable, try again
            raise SessionError(f"{s.mx}[{s.address}] said {e.reply} to RSET", code=e.reply.code) from e
        raise SessionError(f"lost connection with {s.mx}[{s.address}] during the transaction: "
                           f"{type(e).__name__}: {e}") from e
    if ex.mail.code != 250:
        raise SessionError(f"MAIL FROM refused by {s.mx}: {ex.mail}", code=ex.mail.code,
                           temporary=ex.mail.code < 500, dsn=ex.mail.status)
    accepted = set(ex.accepted)
    for i, (res, reply) in enumerate(zip(sent, ex.rcpts, strict=True)):
        res.reply = reply
        if i not in accepted:
            res.status = Outcome.BOUNCED if reply.code >= 500 else Outcome.DEFERRED
            res.dsn, res.reason = reply.status, str(reply)
    if not accepted:
        return results
    # the end of the transaction: the reply after the content (or to BDAT LAST), else DATA's refusal
    end = ex.end
    assert end is not None
    # RFC 5321 §4.1.1.4, §4.3.2: the content is accepted only by the reply that follows it (2xx); DATA itself
    # has no success reply but 354, so a 2xx (or any other code below 400) to DATA, with no content sent, is a
    # protocol error - never a delivery: the recipients are deferred
    ok = ex.final is not None and ex.final.code // 100 == 2
    broken = not ok and end.code < 400
    for i in accepted:
        res = sent[i]
        res.dsn, res.reply = end.status, end
        if broken:
            res.status, res.dsn = Outcome.DEFERRED, "4.5.0"   # RFC 3463 X.5.0: other protocol status
            res.reason = f"protocol error: {s.mx} said {end} to DATA, not 354 (RFC 5321 section 4.3.2)"
        elif not ok:  # RFC 5321 §4.1.1.4: a refused DATA or content refuses every accepted recipient
            res.status = Outcome.BOUNCED if end.code >= 500 else Outcome.DEFERRED
            res.reason = str(end)
    return results


def _log_result(qid: str, r: RecipientResult, delay: float, start_wall: float = 0.0) -> None:
    status = "sent" if r.status is Outcome.DELIVERED else str(r.status)
    # Postfix: relay=host[addr]:port once an address was contacted; delay= since arrival, delays=a/b/c/d
    relay = (f"{r.mx or r.address}[{r.address}]" + (f":{r.port}" if r.port else "")) if r.address else \
        (r.last_tried or "none")
    times = delays(qid, start_wall or time.time() - delay, (start_wall or time.time() - delay) + delay)
    line = (f"{qid}: to=<{r.recipient}>, relay={relay}, {times}, dsn={r.dsn}, "
            f"status={status} ({r.text})")
    if r.security:
        line += f" tls={r.security}"
        if r.tls_version:
            line += f" tls_version={r.tls_version}"
        if r.tlsa_matched:
            line += f' tlsa="{r.tlsa_matched}"'
    if r.tls_result is not None:
        line += f" tls_result={r.tls_result}"
    if r.suspected_attack:
        line += " suspected_attack=yes"
    (log.warning if r.status is not Outcome.DELIVERED else log.info)(line)


def _count(qid: str, r: RecipientResult, attempt: float) -> None:
    metrics.inc("deliveries", outcome=r.status)
    metrics.observe("attempt_duration_seconds", attempt, outcome=r.status)
    arrival = arrival_of(qid)
    if r.status is not Outcome.DEFERRED and arrival is not None:
        metrics.observe("delivery_latency_seconds", max(0.0, time.time() - arrival), outcome=r.status)
    metrics.inc("tls_outcomes", result=r.security or ("none" if r.address or r.last_tried else "not-connected"))
    if r.suspected_attack:
        # the kind of attack: the RFC 8460 result type of the failure (tlsa-invalid, dnssec-invalid, …)
        metrics.inc("suspected_attacks", kind=str(r.tls_result) if r.tls_result is not None else r.dsn)


def summarize(results: Iterable[RecipientResult]) -> str:
    return ", ".join(f"{r.recipient}: {r.status}" for r in results)


__all__ = [
    "Attempt",
    "Counters",
    "Deliverer",
    "DeliveryConfig",
    "RecipientResult",
    "host_facts",
]
