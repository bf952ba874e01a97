"""``postgate tls-check``: connect to each MX host as delivery would and report, without sending mail.

Like Postfix's posttls-finger: the same next-hop resolution, the same policy lookup and the same
requirement as a delivery, so what it reports is what a delivery would do.
"""

from __future__ import annotations

from typing import Any

from outbound.dane import Tlsa
from outbound.delivery import Deliverer
from outbound.dnssec import Security
from outbound.nexthop import resolve_nexthop
from outbound.smtp_client import SessionError, open_session
from policy.tls import Level, Policy, requirement


def _report(mx: str, address: str | None, **kw: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"mx": mx, "address": address, "status": "failed", "security": None,
                            "tls_version": None, "cipher": None, "tlsa_matched": None, "chain": [],
                            "reason": "", "suspected_attack": False}
    base.update(kw)
    return base


async def tls_check(d: Deliverer, domain: str, level: Level | None = None) -> list[dict[str, Any]]:
    relay = d.relay_for(domain)
    policy = d.policy_for(domain, relay)
    if level is not None:
        policy = Policy(level, policy.match, source="command line")
    if relay is not None:
        nh = await resolve_nexthop(d.resolver, relay.host, port=relay.port, use_mx=relay.mx)
        port, nexthop = relay.port, relay.host
    else:
        nh = await resolve_nexthop(d.resolver, domain)
        port, nexthop = 25, domain
    out: list[dict[str, Any]] = []
    if not nh.hosts:
        return [_report(domain, None, reason=nh.reason, suspected_attack=nh.mx_security is Security.BOGUS)]
    for host in nh.hosts:
        mx = host.name.to_text(omit_final_dot=True)
        if host.unusable:
            bogus = Security.BOGUS in (host.address_security, host.tlsa_security)
            out.append(_report(mx, None, reason=host.unusable, suspected_attack=bogus))
            continue
        tlsa = tuple(Tlsa.from_rdata(t) for t in host.tlsa)
        req = requirement(policy, mx_host=mx, nexthop=nexthop, tlsa=tlsa,
                          tlsa_security=host.tlsa_security,
                          reference_names=tuple(n.to_text(omit_final_dot=True) for n in host.reference_names))
        if req.refuse:
            out.append(_report(mx, None, reason=req.refuse))
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
