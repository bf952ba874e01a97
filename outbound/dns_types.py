"""The resolver's vocabulary: an answer with its DNSSEC verdict, and helpers to read DNS messages.

Shared by the transport (``outbound.dns_transport``), the chain of trust (``outbound.chain_of_trust``) and
the resolver facade (``outbound.resolver``); callers see only :class:`Answer`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.RRSIG import RRSIG
from postgate.outbound.dnssec import rtype_text
from postgate.policy.vocab import Security

Name = dns.name.Name
MAX_CHAIN = 12            # CNAME/DNAME links followed before giving up (loop guard)
MAX_DEPTH = 40            # nested chain-of-trust look-ups
FAILURE_TTL = 5           # RFC 9520 §3.2: cache resolution failures briefly


class ResolverConfigError(ValueError):
    pass


class LookupFailed(Exception):
    """The upstream gave no usable answer: timeout, SERVFAIL, REFUSED, malformed."""


@dataclass(frozen=True)
class Answer:
    """A validated answer to one question."""

    qname: Name
    rdtype: int
    rcode: int
    security: Security
    reason: str = ""
    rrset: dns.rrset.RRset | None = None          # the data at the end of the chain, if any
    chain: tuple[dns.rrset.RRset, ...] = ()       # CNAME/DNAME links followed, in order
    ttl: int = 0
    # the weakest verdict of the CNAME/DNAME links alone (SECURE without links): RFC 7672 §2.2.2 needs
    # to know whether an alias was published securely even when its target lies in an unsigned zone
    chain_security: Security = Security.SECURE
    # when the resolver's cache stops serving this answer (its clock; 0: unknown, e.g. not from a cache)
    expires: float = field(default=0.0, compare=False)

    @property
    def canonical(self) -> Name:
        return self.rrset.name if self.rrset is not None else self.qname

    @property
    def ok(self) -> bool:
        """The lookup produced a usable answer (data, NODATA or NXDOMAIN), whatever its security."""
        return self.security in (Security.SECURE, Security.INSECURE)

    @property
    def nxdomain(self) -> bool:
        return self.rcode == dns.rcode.NXDOMAIN

    def records(self) -> list[Any]:
        return list(self.rrset) if self.rrset is not None else []

    def describe(self) -> str:
        return f"{self.security}" + (f" ({self.reason})" if self.reason and self.security is not
                                       Security.SECURE else "")


@dataclass(frozen=True)
class KeyResult:
    """The validated DNSKEY RRset of a zone, or why there is none."""

    security: Security
    keys: dns.rrset.RRset | None
    reason: str
    ttl: int


# --- message helpers ------------------------------------------------------------------------------

def find(section: list[dns.rrset.RRset], name: Name, rdtype: int) -> dns.rrset.RRset | None:
    for rr in section:
        if rr.name == name and rr.rdtype == rdtype and rr.rdclass == dns.rdataclass.IN:
            return rr
    return None


def rrsigs_of(section: list[dns.rrset.RRset], name: Name, covered: int) -> list[RRSIG]:
    return [rd for rr in section if rr.name == name and rr.rdtype == dns.rdatatype.RRSIG
            for rd in rr if isinstance(rd, RRSIG) and rd.type_covered == covered]


def dname_for(section: list[dns.rrset.RRset], name: Name) -> dns.rrset.RRset | None:
    for rr in section:
        if rr.rdtype == dns.rdatatype.DNAME and name.is_subdomain(rr.name) and name != rr.name:
            return rr
    return None


def negative_for(msg: dns.message.Message, name: Name) -> bool:
    """The message ends its chain at ``name`` with a negative answer (SOA in the authority section)."""
    return any(rr.rdtype == dns.rdatatype.SOA and name.is_subdomain(rr.name) for rr in msg.authority)


def negative_ttl(msg: dns.message.Message) -> int:
    """RFC 2308 §5: the SOA's TTL, capped by its MINIMUM field."""
    for rr in msg.authority:
        if rr.rdtype == dns.rdatatype.SOA:
            return max(1, min(int(rr.ttl), int(next(iter(rr)).minimum)))
    return FAILURE_TTL


def walk(qname: Name, rdtype: int, msg: dns.message.Message
         ) -> tuple[list[dns.rrset.RRset], dns.rrset.RRset | None, Name]:
    """Follow the CNAME chain inside one message without validating (trust-ad mode)."""
    chain: list[dns.rrset.RRset] = []
    name = qname
    for _ in range(MAX_CHAIN):
        data = find(msg.answer, name, rdtype)
        if data is not None:
            return chain, data, name
        link = find(msg.answer, name, dns.rdatatype.CNAME)
        if link is None:
            break
        chain.append(link)
        name = next(iter(link)).target
    return chain, None, name


def rr_text(rrset: dns.rrset.RRset) -> str:
    return f"{rrset.name} {rtype_text(rrset.rdtype)}"
