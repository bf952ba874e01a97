"""Next-hop resolution for SMTP with DANE (RFC 7672 §2.2, RFC 5321 §5.1, RFC 7505).

Given a destination domain, find where to deliver and what DNSSEC says about each step:

1. MX lookup. A bogus or failed MX lookup defers delivery (RFC 7672 §2.1.1); a null MX (``MX 0 .``)
   means the domain accepts no mail: a permanent failure (RFC 7505 §3); NXDOMAIN means the domain does not
   exist (permanent); no MX records (NODATA) means the domain itself is the one MX host (RFC 5321 §5.1).
2. For every MX host: its A and AAAA records, each with its own verdict. CNAMEs are expanded; the
   *TLSA base domain* is the fully expanded name when every link is secure, otherwise the original name
   (RFC 7672 §2.2.2).
3. TLSA records at ``_25._tcp.<base>`` are looked up only when the host's address records are secure
   (RFC 7672 §2.2); with a secure CNAME expansion the expanded name is tried first, then the original
   name. A TLSA lookup that fails or is bogus makes the host unusable (RFC 7672 §2.1.1) — never "no TLSA".
   One exception (RFC 7672 §2.2.2, RFC 7671 §7; Postfix does the same): when the CNAME chain itself is
   secure but its target lies in an unsigned zone, the alias was still published securely, so the host
   stays DANE-eligible with the *original* name as its TLSA base domain. An insecure link anywhere in the
   chain makes no name a secure TLSA base domain.
4. Each TLSA record is judged on its own (RFC 7671 §9, RFC 6698 §2.1): a record whose data does not fit
   its matching type is kept (the RRSIG covered it) but unusable, the others still count; with none
   usable, TLS is mandatory but unauthenticated (policy/tls.py).

An insecure MX RRset does not disable DANE for hosts whose own records are secure (RFC 7672 §2.2.1 allows
it; Postfix's default ``smtp_tls_dane_insecure_mx_policy = dane`` does the same).
"""

from __future__ import annotations

import enum
import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.name
import dns.rcode
import dns.rdatatype
from dns.rdtypes.ANY.TLSA import TLSA
from postgate.outbound import eager
from postgate.outbound.dns_transport import RawTLSA
from postgate.outbound.dnssec import rtype_text, weakest
from postgate.outbound.resolver import Answer, ResolverProtocol, shuffle_equal
from postgate.policy import caps as capsmod
from postgate.policy.vocab import Security, Tlsa

Name = dns.name.Name


class Failure(enum.Enum):
    NONE = "none"
    TEMPORARY = "temporary"
    PERMANENT = "permanent"


@dataclass(frozen=True)
class MXHost:
    """One MX host with its addresses and TLSA records, each with its DNSSEC verdict."""

    name: Name
    preference: int
    addresses: tuple[str, ...] = ()
    address_security: Security = Security.INDETERMINATE
    address_reason: str = ""
    cname_chain: tuple[Name, ...] = ()
    tlsa_base: Name | None = None
    tlsa: tuple[TLSA | RawTLSA, ...] = ()   # RawTLSA: malformed RDATA, unusable (RFC 7671 §9)
    tlsa_security: Security | None = None     # None: not looked up (addresses not secure)
    tlsa_reason: str = ""
    tlsa_problems: tuple[str, ...] = ()       # why records of the RRset are unusable
    unusable: str = ""                        # why delivery must not use this host
    implicit: bool = False                    # the domain itself, for lack of MX records
    caps: capsmod.Caps | None = None          # the MTA-capability record (docs/mta-caps.md)
    caps_security: Security | None = None     # None: no record
    caps_problem: str = ""                    # why a record present was ignored

    # made once per host, not once per message (a host lives as long as its answers are cached; issue 20:
    # to_text and Tlsa.from_rdata were ~3% of the relay's Python time); frozen, so never stale
    @functools.cached_property
    def text(self) -> str:
        """The host name as text, without the final dot (logs, connection-cache keys, SNI)."""
        return self.name.to_text(omit_final_dot=True)

    @functools.cached_property
    def dane_records(self) -> tuple[Tlsa, ...]:
        """The secure usable TLSA records: where DANE applies (RFC 7672 §2.2, RFC 8461 §2)."""
        if self.tlsa_security is not Security.SECURE:
            return ()
        return tuple(t for t in (Tlsa.from_rdata(r) for r in self.tlsa) if t.usable)

    @property
    def enforced_caps(self) -> capsmod.Caps | None:
        """Only a DNSSEC-secure record may cause a deferral (docs/mta-caps.md §6)."""
        return self.caps if self.caps_security is Security.SECURE else None

    @property
    def dane(self) -> bool:
        """TLSA records apply: secure addresses and a secure, non-empty TLSA RRset."""
        return self.tlsa_security is Security.SECURE and bool(self.tlsa)

    @property
    def reference_names(self) -> tuple[Name, ...]:
        """RFC 7672 §3.2.2: names a DANE-TA certificate may carry: the TLSA base domain, then the
        MX host name as published (before CNAME expansion)."""
        out: list[Name] = []
        for n in (self.tlsa_base, self.name):
            if n is not None and n not in out:
                out.append(n)
        return tuple(out)

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.name.to_text(omit_final_dot=True),
            "preference": self.preference,
            "implicit": self.implicit,
            "addresses": list(self.addresses),
            "address_security": str(self.address_security),
            "address_reason": self.address_reason,
            "cname_chain": [n.to_text(omit_final_dot=True) for n in self.cname_chain],
            "tlsa_base_domain": self.tlsa_base.to_text(omit_final_dot=True) if self.tlsa_base else None,
            "tlsa": [rd.to_text() for rd in self.tlsa],
            "tlsa_security": str(self.tlsa_security) if self.tlsa_security else None,
            "tlsa_reason": self.tlsa_reason,
            "tlsa_problems": list(self.tlsa_problems),
            "dane": self.dane,
            "caps": self.caps.text() if self.caps else None,
            "caps_security": str(self.caps_security) if self.caps_security else None,
            "caps_problem": self.caps_problem or None,
            "unusable": self.unusable or None,
        }


@dataclass(frozen=True)
class NextHop:
    domain: Name
    mx_security: Security
    mx_reason: str = ""
    hosts: tuple[MXHost, ...] = ()
    failure: Failure = Failure.NONE
    status: str = ""          # enhanced status code for a failure
    reason: str = ""
    null_mx: bool = False
    answers: list[Answer] = field(default_factory=list, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "domain": self.domain.to_text(omit_final_dot=True),
            "mx_security": str(self.mx_security),
            "mx_reason": self.mx_reason,
            "null_mx": self.null_mx,
            "failure": None if self.failure is Failure.NONE else self.failure.value,
            "status": self.status or None,
            "reason": self.reason or None,
            "hosts": [h.to_json() for h in self.hosts],
        }


def parse_domain(text: str) -> Name:
    """A mail domain as given by a user or an address; ValueError with the reason when it is not one."""
    t = text.strip().rstrip(".")
    if not t or t.startswith("."):
        raise ValueError(f"{text!r} is not a domain name")
    try:
        name = dns.name.from_text(t)
    except dns.exception.DNSException as e:
        raise ValueError(f"{text!r} is not a domain name: {e}") from e
    if len(name.labels) < 2:
        raise ValueError(f"{text!r} is not a domain name")
    return name


def caps_owner(host: Name) -> Name:
    """docs/mta-caps.md §2: ``_mta-caps.<MX host name>``."""
    return dns.name.Name((b"_mta-caps", *host.labels))


async def lookup_caps(resolver: ResolverProtocol, host: Name) -> tuple[capsmod.Caps | None, Security | None, str, str]:
    """(record, its security, problem, unusable-reason) for one MX host."""
    ans = await resolver.resolve(caps_owner(host), dns.rdatatype.TXT)
    if not ans.ok:
        # a failed or bogus look-up may hide a promise: the host is not used (docs/mta-caps.md §5)
        return None, ans.security, ans.reason, f"MTA-capability lookup for {caps_owner(host)} is {ans.security}"
    txts = [b"".join(rd.strings).decode("ascii", "replace") for rd in ans.records()]
    sel = capsmod.select(txts)
    if sel.caps is None:
        return None, (ans.security if sel.problem else None), sel.problem, ""
    return sel.caps, ans.security, "", ""


def tlsa_owner(base: Name, port: int = 25) -> Name:
    """RFC 6698 §3 / RFC 7672 §2.2: ``_<port>._tcp.<base>``."""
    return dns.name.Name((f"_{port}".encode(), b"_tcp", *base.labels))


async def resolve_nexthop(resolver: ResolverProtocol, domain: str | Name, port: int = 25,
                          use_mx: bool = True) -> NextHop:
    """Resolve ``domain`` as RFC 7672 §2.2 describes; ``use_mx=False`` for ``[host]`` destinations."""
    try:
        d = parse_domain(domain) if isinstance(domain, str) else domain
    except ValueError as e:
        return NextHop(dns.name.root, Security.INDETERMINATE, failure=Failure.PERMANENT, status="5.1.2",
                       reason=str(e))
    if not use_mx:
        host = await resolve_host(resolver, d, 0, port, implicit=True)
        return NextHop(d, Security.SECURE, "", (host,), reason=host.unusable)
    mx = await resolver.resolve(d, dns.rdatatype.MX)
    if not mx.ok:  # RFC 7672 §2.1.1: MX lookup failure or bogus: defer
        return NextHop(d, mx.security, mx.reason, failure=Failure.TEMPORARY, status="4.4.3",
                       reason=f"MX lookup for {d} is {mx.security}: {mx.reason}", answers=[mx])
    if mx.nxdomain:
        return NextHop(d, mx.security, mx.reason, failure=Failure.PERMANENT, status="5.1.2",
                       reason=f"domain {d} does not exist", answers=[mx])
    records = [rd for rd in mx.records()]
    if any(rd.preference == 0 and rd.exchange == dns.name.root for rd in records):
        # RFC 7505 §3: a null MX means the domain accepts no mail
        return NextHop(d, mx.security, mx.reason, failure=Failure.PERMANENT, status="5.1.10",
                       reason=f"domain {d} accepts no mail (null MX)", null_mx=True, answers=[mx])
    if not records:  # RFC 5321 §5.1: no MX: the domain itself is the implicit MX
        target = mx.canonical if mx.chain else d
        host = await resolve_host(resolver, target, 0, port, implicit=True)
        if not host.addresses and not host.unusable:
            return NextHop(d, mx.security, mx.reason, (host,), failure=Failure.PERMANENT, status="5.1.2",
                           reason=f"{d} has no MX and no address records", answers=[mx])
        return NextHop(d, mx.security, mx.reason, (host,), answers=[mx])
    ordered = shuffle_equal(records, key=lambda rd: rd.preference)
    # started at once: with every answer cached, no turn of the loop (outbound/eager.py, issue 20)
    hosts = await eager.gather(*(resolve_host(resolver, rd.exchange, rd.preference, port)
                                 for rd in ordered))
    usable = [h for h in hosts if not h.unusable and h.addresses]
    if not usable:
        temporary = any(h.unusable for h in hosts)
        return NextHop(d, mx.security, mx.reason, tuple(hosts),
                       failure=Failure.TEMPORARY if temporary else Failure.PERMANENT,
                       status="4.4.3" if temporary else "5.4.4",
                       reason="no usable MX host: " + "; ".join(
                           f"{h.name}: {h.unusable or 'no address records'}" for h in hosts),
                       answers=[mx])
    return NextHop(d, mx.security, mx.reason, tuple(hosts), answers=[mx])


async def resolve_host(resolver: ResolverProtocol, name: Name, preference: int, port: int = 25,
                       implicit: bool = False) -> MXHost:
    host, (caps, caps_sec, problem, unusable) = await eager.gather(
        _resolve_host(resolver, name, preference, port, implicit), lookup_caps(resolver, name))
    host = _replace(host, caps=caps, caps_security=caps_sec, caps_problem=problem)
    if unusable and not host.unusable:
        host = _replace(host, unusable=unusable)
    return host


async def _resolve_host(resolver: ResolverProtocol, name: Name, preference: int, port: int = 25,
                        implicit: bool = False) -> MXHost:
    a, aaaa = await eager.gather(resolver.resolve(name, dns.rdatatype.A),
                                 resolver.resolve(name, dns.rdatatype.AAAA))
    answers = [x for x in (a, aaaa)]
    bad = [x for x in answers if not x.ok]
    if bad:
        # RFC 7672 §2.1.1: a bogus or failed address lookup makes this host unusable
        why = "; ".join(f"{rtype_text(x.rdtype)}: {x.security} ({x.reason})" for x in bad)
        return MXHost(name, preference, address_security=weakest(*(x.security for x in answers)),
                      address_reason=why, unusable=f"address lookup failed: {why}", implicit=implicit)
    addrs = tuple(str(rd.address) for x in (a, aaaa) for rd in x.records())
    sec = weakest(*(x.security for x in answers))
    reason = "; ".join(dict.fromkeys(x.reason for x in answers
                                     if x.reason and x.security is not Security.SECURE))
    chain = _expanded(name, a.chain or aaaa.chain)
    host = MXHost(name, preference, addrs, sec, reason, chain, implicit=implicit)
    linked = [x for x in answers if x.chain]
    secure_alias = bool(linked) and all(x.chain_security is Security.SECURE for x in linked)
    if addrs and sec is Security.INSECURE and secure_alias:
        # RFC 7672 §2.2.2, RFC 7671 §7: a secure CNAME to a host in an unsigned zone: the original name,
        # published securely, is the TLSA base domain
        bases = [name]
    elif sec is not Security.SECURE or not addrs:
        # RFC 7672 §2.2: no TLSA lookup unless the address records are secure
        return _replace(host, tlsa_base=name)
    else:
        # RFC 7672 §2.2.2: a secure CNAME expansion: try the expanded name first, then the original
        bases = [chain[-1], name] if chain else [name]
    last: Answer | None = None
    for base in bases:
        ans = await resolver.resolve(tlsa_owner(base, port), dns.rdatatype.TLSA)
        last = ans
        if not ans.ok:
            return _replace(host, tlsa_base=base, tlsa_security=ans.security, tlsa_reason=ans.reason,
                            unusable=f"TLSA lookup for {tlsa_owner(base, port)} is {ans.security}: "
                                     f"{ans.reason}")
        tlsa = tuple(rd for rd in ans.records() if isinstance(rd, TLSA | RawTLSA))
        if tlsa and ans.security is not Security.SECURE and base is not bases[-1]:
            # RFC 7672 §2.2.2, RFC 7671 §7: the expanded name gave no *secure* TLSA records: the original
            # name is tried next (an insecure answer there must not hide the original name's secure ones)
            continue
        if tlsa:
            # RFC 7671 §9: a malformed record is unusable on its own; the RRset's other records count
            problems = tuple(f"unusable TLSA RR {rd.to_text()}: {rd.problem}" for rd in tlsa
                             if isinstance(rd, RawTLSA))
            return _replace(host, tlsa_base=base, tlsa=tlsa, tlsa_security=ans.security,
                            tlsa_reason=ans.reason, tlsa_problems=problems)
    assert last is not None
    return _replace(host, tlsa_base=bases[0], tlsa_security=last.security, tlsa_reason=last.reason)


def _expanded(name: Name, links: Sequence[Any]) -> tuple[Name, ...]:
    """The names an alias chain leads ``name`` through, in order (the last is the canonical name): a CNAME's
    target, or for a DNAME the name with the owner's suffix replaced by the target (RFC 6672 §2.2 - the
    DNAME's own target is only the new suffix: taken as the expanded name, it made ``_25._tcp.<suffix>`` the
    TLSA owner and missed the host's DANE records, RFC 7672 §2.2.2)."""
    out: list[Name] = []
    cur = name
    for link in links:
        target = next(iter(link)).target
        if link.rdtype == dns.rdatatype.DNAME and cur.is_subdomain(link.name) and cur != link.name:
            try:
                cur = cur.relativize(link.name).derelativize(target)
            except dns.name.NameTooLong:
                cur = target
        else:
            cur = target
        out.append(cur)
    return tuple(out)


def _replace(h: MXHost, **kw: Any) -> MXHost:
    from dataclasses import replace
    return replace(h, **kw)


class _Recording:
    """A resolver view that notes when the first of the answers it handed out leaves the resolver's cache."""

    __slots__ = ("resolver", "until")

    def __init__(self, resolver: ResolverProtocol) -> None:
        self.resolver = resolver
        self.until = float("inf")

    async def resolve(self, qname: Name | str, rdtype: int | str) -> Answer:
        ans = await self.resolver.resolve(qname, rdtype)
        self.until = min(self.until, ans.expires)   # 0 (unknown): nothing is kept
        return ans


class NextHopMemo:
    """The next hops resolved recently, so that a busy relay does not rebuild the same MX hosts, addresses,
    TLSA records and capability records from the resolver's cache for every message (issue 20: about a
    tenth of the pre-queue relay's CPU time).

    A next hop is kept no longer than every answer it was built from stays in the resolver's cache (each
    answer carries that time) and at most ``lifetime`` seconds, so DNS changes are seen exactly as without
    the memo. Only complete results are kept: a next hop with a failure or an unusable host is resolved
    again every time (the resolver caches failures briefly itself, RFC 9520 §3.2). MX hosts of equal
    preference are shuffled again at each use (RFC 5321 §5.1: the sender MUST randomize them)."""

    def __init__(self, lifetime: float = 1.0, max_entries: int = 4096,
                 clock: Callable[[], float] | None = None) -> None:
        self.lifetime = lifetime
        self.max_entries = max_entries
        self.clock = clock or time.time
        self._kept: dict[tuple[Any, ...], tuple[float, ResolverProtocol, NextHop, bool]] = {}

    async def resolve(self, resolver: ResolverProtocol, domain: Name | str, port: int = 25,
                      use_mx: bool = True) -> NextHop:
        key = (domain, port, use_mx)
        now = self.clock()
        hit = self._kept.get(key)
        if hit is not None and hit[0] > now and hit[1] is resolver:
            nh, equal = hit[2], hit[3]
            if equal:   # RFC 5321 §5.1
                nh = NextHop(nh.domain, nh.mx_security, nh.mx_reason,
                             tuple(shuffle_equal(list(nh.hosts), key=lambda h: h.preference)), nh.failure,
                             nh.status, nh.reason, nh.null_mx, nh.answers)
            return nh
        rec = _Recording(resolver)
        nh = await resolve_nexthop(rec, domain, port=port, use_mx=use_mx)
        until = min(rec.until, now + self.lifetime)
        if nh.failure is Failure.NONE and nh.hosts and not any(h.unusable for h in nh.hosts) and until > now:
            if len(self._kept) >= self.max_entries:
                self._kept = {k: v for k, v in self._kept.items() if v[0] > now}
                if len(self._kept) >= self.max_entries:
                    self._kept.clear()
            prefs = [h.preference for h in nh.hosts]
            self._kept[key] = (until, resolver, nh, len(set(prefs)) < len(prefs))
        return nh
