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
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

import aiosmtplib
from postgate.outbound import smtp_data
from postgate.outbound.crash import crashpoint
from postgate.outbound.downgrade import DowngradeMemory, Protection
from postgate.outbound.mtasts import StsLookup, StsResolver, pkix_problem
from postgate.outbound.nexthop import Failure, MXHost, NextHop, caps_owner, resolve_nexthop
from postgate.outbound.resolver import Resolver
from postgate.outbound.smtp_client import CLEARTEXT, Session, SessionError, Timeouts, open_session
from postgate.policy import mtasts
from postgate.policy.caps import Caps
from postgate.policy.maps import Relay, TlsPolicyMap, TransportMap
from postgate.policy.tls import Auth, Level, Policy, Requirement, TLSMode, requirement
from postgate.policy.tlsrpt import Attempt, PolicyType, ResultType
from postgate.policy.vocab import Security, Tlsa

log = logging.getLogger("postgate.delivery")

DELIVERED, DEFERRED, BOUNCED = "delivered", "deferred", "bounced"


@dataclass
class RecipientResult:
    recipient: str
    status: str
    dsn: str
    reason: str = ""
    reply: str = ""
    security: str | None = None
    mx: str | None = None
    address: str | None = None
    tls_version: str | None = None
    cipher: str | None = None
    tlsa_matched: str | None = None
    suspected_attack: bool = False
    relayed_without_dsn: bool = False     # RFC 3461 §5.2.2: delivered to a server without DSN support

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("recipient", "status", "dsn", "security", "mx", "address",
                                             "tls_version", "cipher", "tlsa_matched", "reply", "reason",
                                             "suspected_attack")}


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


def new_queue_id() -> str:
    """Sortable by arrival: microseconds since the epoch in hex, then randomness (Postfix long ids)."""
    return f"{int(time.time() * 1_000_000):014X}{secrets.token_hex(3).upper()}"


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
    tls_report: Callable[[Attempt], Awaitable[None]] | None = None
    cleartext_fallback_delay: float = 300.0   # 'may': cleartext after a failed handshake only this long after arrival


# the arrival time of the message being delivered (deliver(arrival=...)), seen by the 'may' fallback
_ARRIVAL: ContextVar[float] = ContextVar("arrival", default=0.0)


def _domain(addr: str) -> str:
    return addr.rsplit("@", 1)[-1].lower().rstrip(".") if "@" in addr else ""


class ConnectionCache:
    """Idle authenticated sessions keyed by (next-hop, host, address, port, requirement)."""

    def __init__(self, idle: float) -> None:
        self.idle = idle
        self._idle: dict[tuple[Any, ...], list[tuple[float, Session]]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._sweeper: asyncio.Future[None] | None = None

    def sweep(self) -> None:
        """Close connections idle for longer than ``idle`` (so servers do not time them out)."""
        now = time.monotonic()
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
        self.sweep()
        now = time.monotonic()
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


def _req_key(req: Requirement) -> tuple[Any, ...]:
    return (req.level, req.tls, req.auth, tuple(t.text() for t in req.tlsa), req.names, req.fingerprints)


class Deliverer:
    def __init__(self, resolver: Resolver, config: DeliveryConfig | None = None,
                 counters: Counters | None = None) -> None:
        self.resolver = resolver
        self.config = config or DeliveryConfig()
        self.counters = counters or Counters()
        self.cache = ConnectionCache(self.config.reuse_idle)

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
                      dsn: Dsn | None = None, arrival: float | None = None) -> list[RecipientResult]:
        """Deliver now. ``requiretls`` (RFC 8689): only over TLS with a verified certificate (DANE, or
        PKIX for the MX host name) to a server that offers REQUIRETLS, which is passed on."""
        qid = queue_id or new_queue_id()
        start = time.monotonic()
        _ARRIVAL.set(arrival if arrival is not None else time.time())
        groups: dict[str, list[str]] = {}
        for r in recipients:
            groups.setdefault(_domain(r), []).append(r)
        if requiretls:
            mail_options = [*mail_options, "REQUIRETLS"]
        results = await asyncio.gather(*(self._deliver_domain(qid, sender, d, rcpts, data, level,
                                                              mail_options, requiretls, dsn)
                                         for d, rcpts in groups.items()))
        out = [res for group in results for res in group]
        delay = time.monotonic() - start
        for res in out:
            _log_result(qid, res, delay)
            self.counters.inc(f"status_{res.status}")
            if res.suspected_attack:
                self.counters.inc("suspected_attack")
        return out

    async def route(self, domain: str, level: Level | None = None) -> Route:
        """Where mail for ``domain`` goes (smart host or MX) and under which TLS policy."""
        relay = self.relay_for(domain)
        policy = self.policy_for(domain, relay)
        if level is not None:
            policy = Policy(level, policy.match, policy.protocols, policy.ciphers, "command line")
        if relay is not None:
            nh = await resolve_nexthop(self.resolver, relay.host, port=relay.port, use_mx=relay.mx)
            return Route(relay.host, relay.port, policy, nh, True)
        return Route(domain, 25, policy, await resolve_nexthop(self.resolver, domain), False)

    async def _deliver_domain(self, qid: str, sender: str, domain: str, rcpts: list[str], data: bytes,
                              level: Level | None, mail_options: Sequence[str],
                              requiretls: bool = False, dsn: Dsn | None = None) -> list[RecipientResult]:
        if not domain:
            return [RecipientResult(r, BOUNCED, "5.1.3", "recipient address has no domain") for r in rcpts]
        rt = await self.route(domain, level)
        nh, port, nexthop_name, policy = rt.nexthop, rt.port, rt.name, rt.policy
        if nh.failure is Failure.PERMANENT:
            return [RecipientResult(r, BOUNCED, nh.status, nh.reason) for r in rcpts]
        attack = nh.mx_security is Security.BOGUS
        if nh.failure is Failure.TEMPORARY and not nh.hosts:
            why = nh.reason + (" — suspected attack" if attack else "")
            return [RecipientResult(r, DEFERRED, nh.status, why, suspected_attack=attack) for r in rcpts]
        return await self._try_hosts(qid, sender, nexthop_name, nh, port, policy, rcpts, data, mail_options,
                                     rt.via_relay, requiretls, dsn)

    async def _try_hosts(self, qid: str, sender: str, nexthop: str, nh: NextHop, port: int, policy: Policy,
                         rcpts: list[str], data: bytes, mail_options: Sequence[str],
                         via_relay: bool, requiretls: bool = False, dsn: Dsn | None = None) -> list[RecipientResult]:
        failures: list[str] = []
        attack = False
        status_code = "4.4.1"
        pending = list(rcpts)
        done: list[RecipientResult] = []
        sts = await self._sts(nexthop, via_relay)
        guard = await self._downgrade(nexthop, nh, sts, via_relay)
        if guard:
            return [RecipientResult(r, DEFERRED, "4.7.5", guard, suspected_attack=True) for r in pending]
        for host in nh.hosts:
            if host.unusable:
                bogus = host.address_security is Security.BOGUS or host.tlsa_security is Security.BOGUS
                attack |= bogus
                if bogus and not via_relay:  # RFC 8460 §4.3.2.1: DNSSEC validation failed
                    await self._report(nexthop, sts, host_requirement(policy, host, nexthop), _h(host), "",
                                       ResultType.DNSSEC_INVALID, host.unusable)
                failures.append(f"{_h(host)}: {host.unusable}" + (" — suspected attack" if bogus else ""))
                continue
            caps = host.enforced_caps
            caps_name = caps_owner(host.name).to_text(omit_final_dot=True)
            if host.caps is not None and caps is None:
                log.info("%s: %s has an insecure MTA-capability record (%s): not enforced", qid, _h(host),
                         host.caps.text())
            if policy.level is Level.CAPS_REQUIRED and caps is None:
                # no connection at all to a host that publishes no secure promise
                failures.append(f"{_h(host)}: caps-required: no secure MTA-capability record at {caps_name}")
                continue
            if caps is not None and caps.dane and not host.dane:
                attack = True
                failures.append(f"{_h(host)}: MTA-capability dane promised by {caps_name} but no secure "
                                "usable TLSA record — suspected attack")
                continue
            req = host_requirement(policy, host, nexthop)
            if req.refuse:
                failures.append(f"{_h(host)}: {req.refuse}")
                continue
            req, sts_refuse = self._apply_sts(sts, req, host, policy)
            if sts_refuse:  # RFC 8461 §4.1: an MX host the enforced policy does not list is not used
                failures.append(sts_refuse)
                await self._report(nexthop, sts, req, _h(host), "", ResultType.VALIDATION_FAILURE, sts_refuse)
                continue
            if requiretls and req.auth not in (Auth.DANE, Auth.PKIX):
                # RFC 8689 §4.2.1: a verified certificate: DANE, else PKIX for the MX host name
                req = Requirement(req.level, TLSMode.REQUIRED, Auth.PKIX, names=(_h(host),))
            sni = host.tlsa_base.to_text(omit_final_dot=True) if host.tlsa_base else _h(host)
            for address in host.addresses:
                try:
                    results = await self._send_via(qid, nexthop, host, address, port, req, sni, sender,
                                                   pending, data, mail_options, via_relay, caps, caps_name, dsn,
                                                   sts=sts)
                except SessionError as e:
                    if e.tlsrpt is not None and not via_relay and not e.cleartext_retry:
                        await self._report(nexthop, sts, req, _h(host), address, e.tlsrpt, e.reason)
                    attack |= e.suspected_attack
                    failures.append(e.reason)
                    status_code = e.dsn
                    if e.code >= 500 and not e.temporary:
                        return done + [RecipientResult(r, BOUNCED, e.dsn, e.reason, reply=e.reason,
                                                       mx=_h(host), address=address) for r in pending]
                    continue
                # the server's own replies are this attempt's outcome; a 4xx recipient waits for a retry
                return done + results
        reason = "; ".join(failures) or "no MX host could be tried"
        return done + [RecipientResult(r, DEFERRED, "4.7.5" if attack else status_code, reason,
                                       suspected_attack=attack) for r in pending]

    async def _send_via(self, qid: str, nexthop: str, host: MXHost, address: str, port: int,
                        req: Requirement, sni: str, sender: str, rcpts: list[str], data: bytes,
                        mail_options: Sequence[str], via_relay: bool, caps: Caps | None = None,
                        caps_name: str = "", dsn: Dsn | None = None,
                        sts: StsLookup | None = None) -> list[RecipientResult]:
        key: tuple[Any, ...] = (nexthop, _h(host), address, port, _req_key(req), caps.text() if caps else "")
        session = self.cache.take(key)
        if session is None:
            try:
                session = await open_session(address, port, _h(host), req, helo=self.config.helo, sni=sni,
                                             timeouts=self.config.timeouts, ca_file=self.config.ca_file,
                                             auth=self.config.relay_auth if via_relay else None,
                                             caps=caps, caps_name=caps_name)
            except SessionError as e:
                if not e.cleartext_retry:
                    raise
                # Postfix 'may': a failed opportunistic handshake is retried in cleartext — but not at once
                # (that hands an active attacker the plaintext), and never to a destination that did TLS
                await self._may_fallback(e, nexthop, _h(host), address, sts, req, via_relay)
                plain = Requirement(req.level, TLSMode.NONE, req.auth)
                session = await open_session(address, port, _h(host), plain, helo=self.config.helo, sni=sni,
                                             timeouts=self.config.timeouts)
                key = (*key, "cleartext-fallback")  # one message's fallback never serves a younger message
        if "REQUIRETLS" in mail_options and not session.supports("requiretls"):
            await session.close()  # RFC 8689 §4.2.1: the next hop must offer REQUIRETLS
            raise SessionError(f"{_h(host)} does not offer REQUIRETLS, required for this message", dsn="4.7.30")
        try:
            results = await _transaction(session, sender, rcpts, data, mail_options, dsn)
        except SessionError:
            await session.close()
            raise
        for r in results:
            r.mx, r.address = _h(host), address
            r.security = session.tls.security
            r.tls_version, r.cipher = session.tls.version, session.tls.cipher
            r.tlsa_matched = session.tls.tlsa_matched.text() if session.tls.tlsa_matched else None
        session.messages += 1
        if session.alive and key[-1] != "cleartext-fallback":
            self.cache.put(key, session)
        elif session.alive:
            await session.close()
        if session.messages == 1:
            await self._session_done(nexthop, session, req, sts, via_relay)
        return results

    # --- issue 18: MTA-STS, the downgrade memory, TLS-RPT (docs/mta-sts.md) ---------------------------
    async def _sts(self, domain: str, via_relay: bool) -> StsLookup | None:
        if self.config.sts is None or via_relay:
            return None  # RFC 8461 applies to MX delivery, not to a configured smart host
        return await self.config.sts.lookup(domain)

    async def _downgrade(self, domain: str, nh: NextHop, sts: StsLookup | None, via_relay: bool) -> str:
        """The reason to defer for a suspected downgrade, or ""."""
        mem = self.config.downgrade
        if mem is None or via_relay:
            return ""
        if any(h.dane and any(Tlsa.from_rdata(t).usable for t in h.tlsa) for h in nh.hosts):
            current = Protection.DANE
        elif sts is not None and sts.policy is not None and sts.policy.mode is mtasts.Mode.ENFORCE:
            current = Protection.STS
        else:
            current = Protection.NONE
        verdict = await mem.observe(domain, current, sts_vanished=sts is not None and sts.txt_missing)
        if verdict.suspected:
            self.counters.inc("downgrade_suspected")
        return verdict.reason if verdict.defer else ""

    def _apply_sts(self, sts: StsLookup | None, req: Requirement, host: MXHost,
                   policy: Policy) -> tuple[Requirement, str]:
        """RFC 8461 §4-§5 through policy/mtasts.tighten: an enforced policy makes Web-PKI TLS to a listed MX
        mandatory and an unlisted MX unusable; DANE and explicit levels are left alone (RFC 8461 §2)."""
        req, refuse = mtasts.tighten(sts.policy if sts is not None else None, req, _h(host), policy.level)
        if refuse:
            self.counters.inc("sts_mx_mismatch")
        return req, refuse

    async def _may_fallback(self, e: SessionError, domain: str, mx: str, address: str, sts: StsLookup | None,
                            req: Requirement, via_relay: bool) -> None:
        """Allow the cleartext retry of a failed opportunistic handshake, or raise a deferral."""
        if e.tlsrpt is not None and not via_relay:
            await self._report(domain, sts, req, mx, address, e.tlsrpt, e.reason)
        mem = self.config.downgrade
        if mem is not None and mem.tls_recent(domain):
            self.counters.inc("cleartext_fallback_refused")
            raise SessionError(e.reason + f"; no cleartext fallback: {domain} did TLS before (downgrade memory)"
                               " — suspected attack", suspected_attack=True, dsn="4.7.5")
        waited = time.time() - _ARRIVAL.get()
        if waited < self.config.cleartext_fallback_delay:
            self.counters.inc("cleartext_fallback_deferred")
            raise SessionError(e.reason + f"; cleartext fallback only after {self.config.cleartext_fallback_delay:g}s "
                               f"in the queue (waited {waited:.0f}s)", dsn="4.7.5")
        self.counters.inc("cleartext_fallback")
        log.warning("%s[%s]: STARTTLS failed, falling back to cleartext after %.0fs — possible downgrade (%s)",
                    mx, address, waited, e.reason)

    async def _session_done(self, domain: str, s: Session, req: Requirement, sts: StsLookup | None,
                            via_relay: bool) -> None:
        """A session carried mail: remember TLS, and count it for TLS-RPT."""
        if via_relay:
            return
        if s.tls.security != CLEARTEXT and self.config.downgrade is not None:
            await self.config.downgrade.note_tls(domain)
        result: ResultType | None = None
        detail = ""
        if s.tls.security == CLEARTEXT:
            result, detail = ResultType.STARTTLS_NOT_SUPPORTED, "delivered without TLS"
        elif (sts is not None and sts.policy is not None and sts.policy.mode is mtasts.Mode.TESTING
              and req.auth is Auth.NONE):
            # RFC 8461 §5: testing mode: deliver, but report what enforce would have refused
            if not sts.policy.matches(s.mx):
                result, detail = ResultType.VALIDATION_FAILURE, f"{s.mx} matches no mx of the policy"
            else:
                problem = pkix_problem(s.tls.chain, s.mx, self.config.ca_file)
                if problem is not None:
                    result, detail = problem
        await self._report(domain, sts, req, s.mx, s.address, result, detail)

    async def _report(self, domain: str, sts: StsLookup | None, req: Requirement, mx: str, address: str,
                      result: ResultType | None, detail: str) -> None:
        """One session's TLS outcome to the TLS-RPT hook (RFC 8460 §4.1; ``when`` is stamped by the hook)."""
        hook = self.config.tls_report
        if hook is None:
            return
        strings: tuple[str, ...] = ()
        patterns: tuple[str, ...] = ()
        if req.auth is Auth.DANE and req.tlsa:
            ptype, strings = PolicyType.TLSA, tuple(t.text() for t in req.tlsa)
        elif sts is not None and sts.policy is not None and sts.policy.mode is not mtasts.Mode.NONE:
            ptype, strings, patterns = PolicyType.STS, tuple(sts.policy.lines()), sts.policy.mx
        else:
            ptype = PolicyType.NO_POLICY
        await hook(Attempt(domain, ptype, result, mx, address, "", strings, patterns, detail[:200]))


def _h(host: MXHost) -> str:
    return host.name.to_text(omit_final_dot=True)


@dataclass(frozen=True)
class Route:
    name: str            # the next-hop name: the domain, or the smart host
    port: int
    policy: Policy
    nexthop: NextHop
    via_relay: bool


def host_requirement(policy: Policy, host: MXHost, nexthop: str) -> Requirement:
    """The TLS requirement for one MX host under ``policy`` (policy/tls.py), from what DNS said of it."""
    return requirement(policy, mx_host=_h(host), nexthop=nexthop, tlsa=tuple(Tlsa.from_rdata(t) for t in host.tlsa),
                       tlsa_security=host.tlsa_security,
                       reference_names=tuple(n.to_text(omit_final_dot=True) for n in host.reference_names))


async def _transaction(s: Session, sender: str, rcpts: Sequence[str], data: bytes,
                       mail_options: Sequence[str], dsn: Dsn | None = None) -> list[RecipientResult]:
    """MAIL, RCPT per recipient, DATA: each recipient's outcome from the server's own replies."""
    smtp = s.smtp
    t = s.timeouts
    try:
        if s.messages:
            await smtp.rset(timeout=t.command)
        opts = [o for o in mail_options if smtp.supports_extension(o.split("=")[0].lower())]
        with_dsn = dsn is not None and smtp.supports_extension("dsn")
        if with_dsn:  # RFC 3461 §5.2.1: a DSN-capable next hop gets the parameters
            assert dsn is not None
            opts += dsn.mail_options()
        try:
            await smtp.mail(sender, options=opts, timeout=t.command)
        except aiosmtplib.SMTPSenderRefused as e:
            raise SessionError(f"MAIL FROM refused by {s.mx}: {e.code} {e.message}", code=e.code,
                               temporary=e.code < 500, dsn=_dsn(e.code, e.message)) from e
        results: list[RecipientResult] = []
        accepted: list[str] = []
        for r in rcpts:
            try:
                resp = await smtp.rcpt(r, options=dsn.rcpt_options(r) if with_dsn and dsn else [],
                                       timeout=t.command)
                accepted.append(r)
                results.append(RecipientResult(r, DELIVERED, "", reply=f"{resp.code} {resp.message}",
                                               relayed_without_dsn=dsn is not None and not with_dsn))
            except aiosmtplib.SMTPRecipientRefused as e:
                status = BOUNCED if e.code >= 500 else DEFERRED
                results.append(RecipientResult(r, status, _dsn(e.code, e.message), f"{e.code} {e.message}",
                                               reply=f"{e.code} {e.message}"))
        if not accepted:
            await smtp.rset(timeout=t.command)
            return results
        crashpoint("delivery-before-data")
        try:
            resp = await smtp_data.send_data(smtp, data, t.data)  # bulk, one write (issue 20)
        except aiosmtplib.SMTPDataError as e:
            status = BOUNCED if e.code >= 500 else DEFERRED
            for res in results:
                if res.recipient in accepted:
                    res.status, res.dsn = status, _dsn(e.code, e.message)
                    res.reply = res.reason = f"{e.code} {e.message}"
            return results
        for res in results:
            if res.recipient in accepted:
                res.dsn = _dsn(resp.code, resp.message)
                res.reply = f"{resp.code} {resp.message}"
        return results
    except aiosmtplib.SMTPResponseException as e:
        raise SessionError(f"{s.mx}[{s.address}] said {e.code} {e.message}", code=e.code,
                           temporary=e.code < 500) from e
    except (aiosmtplib.SMTPException, OSError, TimeoutError) as e:
        raise SessionError(f"lost connection with {s.mx}[{s.address}] during the transaction: "
                           f"{type(e).__name__}: {e}") from e


def _dsn(code: int, message: str) -> str:
    """The enhanced status code of a reply (RFC 3463), or one derived from the basic code."""
    first = message.split(" ", 1)[0]
    parts = first.split(".")
    if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] in "245":
        return first
    return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(code // 100, "4.0.0")


def _log_result(qid: str, r: RecipientResult, delay: float) -> None:
    status = {DELIVERED: "sent", DEFERRED: "deferred", BOUNCED: "bounced"}[r.status]
    relay = f"{r.mx}[{r.address}]" if r.mx else "none"
    line = (f"{qid}: to=<{r.recipient}>, relay={relay}, delay={delay:.2f}, dsn={r.dsn}, "
            f"status={status} ({r.reply or r.reason})")
    if r.security:
        line += f" tls={r.security}"
        if r.tls_version:
            line += f" tls_version={r.tls_version}"
        if r.tlsa_matched:
            line += f' tlsa="{r.tlsa_matched}"'
    if r.suspected_attack:
        line += " suspected_attack=yes"
    (log.warning if r.status != DELIVERED else log.info)(line)


def summarize(results: Iterable[RecipientResult]) -> str:
    return ", ".join(f"{r.recipient}: {r.status}" for r in results)


__all__ = [
    "BOUNCED",
    "CLEARTEXT",
    "DEFERRED",
    "DELIVERED",
    "Counters",
    "Deliverer",
    "DeliveryConfig",
    "RecipientResult",
    "new_queue_id",
]
