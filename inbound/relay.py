"""Relay control: who may send mail where. Pure decisions.

A recipient is accepted when it is in a local domain (mail for us), or when the client may relay: it
authenticated (submission), or its address is in the trusted networks (other MTAs of ours, such as a
Postfix that hands mail to Postgate). Anything else is refused with 554 5.7.1 on every port: Postgate is
never an open relay.

:class:`RelayFilter` is this decision as the first stage hook of every listener (``inbound/filters.py``),
Postfix's ``reject_unauth_destination`` in ``smtpd_recipient_restrictions``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from postgate.inbound.filters import Action, Stage, StageContext, Verdict
from postgate.policy.vocab import Reply, domain_of


@dataclass(frozen=True)
class RelayPolicy:
    trusted_networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    local_domains: frozenset[str] = frozenset()

    @classmethod
    def build(cls, networks: Iterable[str], local_domains: Iterable[str]) -> RelayPolicy:
        return cls(tuple(ipaddress.ip_network(n, strict=False) for n in networks),
                   frozenset(d.lower().rstrip(".") for d in local_domains))

    def is_local(self, address: str) -> bool:
        return domain_of(address) in self.local_domains

    def trusted(self, ip: str) -> bool:
        try:
            a = ipaddress.ip_address(ip)
        except ValueError:
            return False
        return any(a in n for n in self.trusted_networks)

    def decide(self, client_ip: str, user: str | None, recipient: str, hostname: str = "") -> str | None:
        """None when accepted, else the reason for a 554 5.7.1 refusal. ``hostname``: the server's name, whose
        postmaster is accepted from anyone."""
        if self.is_local(recipient):
            return None
        # RFC 5321 §4.5.1: "RCPT TO:<Postmaster>" (no domain) MUST be accepted; the smtpd rewrites it to
        # postmaster@<its hostname>, which is accepted from any client even when the hostname is not a local
        # domain. Only that address: postmaster@ any other domain is relayed as any address is.
        if hostname and recipient.rpartition("@")[0].lower() == "postmaster" and \
                domain_of(recipient) == hostname.lower().rstrip("."):
            return None
        if user is not None or self.trusted(client_ip):
            return None
        return f"<{recipient}>: Relay access denied"


class RelayFilter:
    """Relay control as a filter: at RCPT, a recipient the client may not send to is refused (554 5.7.1).

    Stateless, so it is its own session. It never fails; if it did, the session would be tempfailed
    (``default_action``), never opened up."""

    name = "relay"
    default_action = Action.TEMPFAIL

    def __init__(self, policy: RelayPolicy) -> None:
        self.policy = policy

    def session(self) -> RelayFilter:
        return self

    async def on(self, ctx: StageContext) -> Verdict:
        if ctx.stage is not Stage.RCPT or ctx.recipient is None:
            return Verdict()
        why = self.policy.decide(ctx.client_address, ctx.auth_user, ctx.recipient, ctx.hostname)
        if why is None:
            return Verdict()
        # RFC 5321 §3.6.2 / §7.1: relaying is the server's choice; 554 5.7.1 as Postfix's relay_domains check
        return Verdict(Action.REJECT, Reply(554, "5.7.1", why), reason="relay access denied")

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass

