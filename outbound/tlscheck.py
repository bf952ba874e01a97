"""``postgate tls-check``: connect to each MX host as delivery would and report, without sending mail.

Like Postfix's posttls-finger, but with no logic of its own: it consumes delivery's own walk over the
next hop's hosts (:meth:`Deliverer.attempts`, which applies the one TLS decision of ``policy/tls.py``), so
what it reports is what a delivery would do — the same hosts skipped for the same reasons (including the
MTA-capability record's rules and the MTA-STS policy in force), the same requirement on each connection,
the same cleartext-fallback rule for a new message. Unlike delivery it does not stop
at the first host that works: every host and address is reported, and the first usable one is the one
delivery would use.

On a TLSA mismatch it shows what the server presented (the chain, leaf first) and the DANE-EE record
(``3 1 1``) that would match it. A next hop that does not exist (RFC 7505 null MX, NXDOMAIN) is a
permanent failure with the status delivery would bounce with (5.1.2, 5.1.10).
"""

from __future__ import annotations

from typing import Any

from postgate.outbound.delivery import Deliverer
from postgate.outbound.nexthop import Failure
from postgate.outbound.smtp_client import needed_tlsa
from postgate.policy.tls import Level, Requirement, Skip
from postgate.policy.vocab import QueueId, Security, TlsOutcome


def _report(mx: str, address: str | None, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"mx": mx, "address": address, "status": "failed", "dsn": None, "security": None,
                            "tls_version": None, "cipher": None, "tlsa_matched": None, "chain": [],
                            "needed_tlsa": None, "requirement": None, "reason": "", "suspected_attack": False,
                            "tls_result": None}
    base.update(kw)
    return base


def _subject(c: Any) -> str:
    """A chain summary line: subject, issuer and validity."""
    return (f"{c.subject.rfc4514_string()} (issuer {c.issuer.rfc4514_string()}, valid "
            f"{c.not_valid_before_utc:%Y-%m-%d} to {c.not_valid_after_utc:%Y-%m-%d})")


async def tls_check(d: Deliverer, domain: str, level: Level | None = None) -> list[dict[str, Any]]:
    """One report per host skipped and per address tried, in delivery's order."""
    rt = await d.route(domain, level)
    nh = rt.nexthop
    if nh.failure is Failure.PERMANENT:
        return [_report(domain, None, status="bounced", dsn=nh.status, reason=nh.reason)]
    if not nh.hosts:
        attack = nh.mx_security is Security.BOGUS
        return [_report(domain, None, dsn=nh.status, reason=nh.reason, suspected_attack=attack,
                        tls_result=TlsOutcome.DNSSEC_INVALID if attack else None)]
    # RFC 8461: the MTA-STS policy in force is part of the route, applied by the walk as delivery applies it
    sts = f"; {rt.sts.describe()}" if rt.sts is not None else ""
    out: list[dict[str, Any]] = []
    async for a in d.attempts(QueueId("tls-check"), rt):
        if isinstance(a.decision, Skip):
            sk = a.decision
            out.append(_report(a.mx, None, dsn=sk.reply.status, reason=sk.reason,
                               suspected_attack=sk.suspected_attack, tls_result=sk.tls_result))
            continue
        req: Requirement = a.decision
        if a.error is not None:
            e = a.error
            out.append(_report(a.mx, a.address, dsn=e.dsn, reason=e.reason, suspected_attack=e.suspected_attack,
                               tls_result=e.tls_result, chain=[_subject(c) for c in e.chain],
                               needed_tlsa=needed_tlsa(e.chain) if e.tls_result is TlsOutcome.TLSA_INVALID
                               else None, requirement=req.text()))
            continue
        assert a.session is not None
        t = a.session.tls
        out.append(_report(a.mx, a.address, status="ok", security=t.security, tls_version=t.version,
                           cipher=t.cipher, tlsa_matched=t.tlsa_matched.text() if t.tlsa_matched else None,
                           chain=[_subject(c) for c in t.chain], requirement=req.text(),
                           reason=f"policy {rt.policy.text()} ({rt.policy.source})" + sts
                           + (f"; cleartext after a failed handshake ({a.fallback.reason})" if a.fallback else "")))
        await a.session.close()
    return out
