"""Relay control: who may send mail where. Pure decisions.

A recipient is accepted when it is in a local domain (mail for us), or when the client may relay: it
authenticated (submission), or its address is in the trusted networks (other MTAs of ours, such as a
Postfix that hands mail to Postgate). Anything else is refused with 554 5.7.1 on every port: Postgate is
never an open relay.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from postgate.policy.vocab import domain_of


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

    def decide(self, client_ip: str, user: str | None, recipient: str) -> str | None:
        """None when accepted, else the reason for a 554 5.7.1 refusal."""
        if self.is_local(recipient):
            return None
        if user is not None or self.trusted(client_ip):
            return None
        return f"<{recipient}>: Relay access denied"

