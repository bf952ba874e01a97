"""``postgate tls-check``: connect to each MX host as delivery would and report, without sending mail.

Like Postfix's posttls-finger: the same next-hop resolution, the same policy lookup and the same
requirement as a delivery, so what it reports is what a delivery would do.
"""

from __future__ import annotations

from typing import Any

from postgate.outbound.delivery import Deliverer, host_requirement
from postgate.outbound.smtp_client import SessionError, open_session
from postgate.policy.tls import Level
from postgate.policy.vocab import Security


def _report(mx: str, address: str | None, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"mx": mx, "address": address, "status": "failed", "security": None,
                            "tls_version": None, "cipher": None, "tlsa_matched": None, "chain": [],
                            "reason": "", "suspected_attack": False}
    base.update(kw)
    return base


async def tls_check(d: Deliverer, domain: str, level: Level | None = None) -> list[dict[str, Any]]:
    rt = await d.route(domain, level)
    nh, port, nexthop, policy = rt.nexthop, rt.port, rt.name, rt.policy
    out: list[dict[str, Any]] = []
    sts = await d._sts(nexthop, rt.via_relay)  # RFC 8461: the MTA-STS policy in force, as delivery sees it
    if not nh.hosts:
        return [_report(domain, None, reason=nh.reason, suspected_attack=nh.mx_security is Security.BOGUS)]
    for host in nh.hosts:
        mx = host.name.to_text(omit_final_dot=True)
        if host.unusable:
            bogus = Security.BOGUS in (host.address_security, host.tlsa_security)
            out.append(_report(mx, None, reason=host.unusable, suspected_attack=bogus))
            continue
        req = host_requirement(policy, host, nexthop)
        if req.refuse:
            out.append(_report(mx, None, reason=req.refuse))
            continue
        req, sts_refuse = d._apply_sts(sts, req, host, policy)
        if sts_refuse:
            out.append(_report(mx, None, reason=sts_refuse))
            continue
        sni = host.tlsa_base.to_text(omit_final_dot=True) if host.tlsa_base else mx
        for address in host.addresses:
            try:
                s = await open_session(address, port, mx, req, helo=d.config.helo, sni=sni,
                                       timeouts=d.config.timeouts, ca_file=d.config.ca_file)
            except SessionError as e:
                out.append(_report(mx, address, reason=e.reason, suspected_attack=e.suspected_attack))
                continue
            t = s.tls
            out.append(_report(mx, address, status="ok", security=t.security, tls_version=t.version,
                               cipher=t.cipher,
                               tlsa_matched=t.tlsa_matched.text() if t.tlsa_matched else None,
                               chain=[c.subject.rfc4514_string() for c in t.chain],
                               reason=f"policy {policy.text()} ({policy.source})"))
            await s.close()
    return out
