"""An async DNS resolver whose every answer carries its DNSSEC verdict, validated by Postgate itself.

Mode ``validate`` (the default) asks any recursive resolver with the DO and CD bits set (RFC 4035 §3.2.2),
so the upstream returns signatures and does not filter bogus data, and then builds the chain of trust
itself: for the zone that signed an RRset it fetches the DS from the parent, validates that with the
parent's keys, and so on up to a trust anchor (RFC 4035 §5). Unsigned data is secure-or-bogus depending on
whether a signed proof shows the chain ending above it (an insecure delegation, RFC 4035 §5.2). Each link of
a CNAME or DNAME chain gets its own verdict; the answer's verdict is the weakest of them.

Mode ``trust-ad`` trusts the AD bit of the configured resolvers, as Postfix and Exim do. That is only as
safe as the path to the resolver, so it is refused for non-loopback resolvers unless explicitly allowed.

Answers, keys and upstream messages are cached with their TTLs (capped by each RRSIG's original TTL and
expiry), bounded in size; concurrent identical questions share one upstream query.
"""

from __future__ import annotations

import asyncio
import ipaddress
import random
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.NSEC3 import NSEC3
from dns.rdtypes.ANY.RRSIG import RRSIG
from postgate.outbound import dnssec
from postgate.outbound.dnssec import Denial, weakest
from postgate.policy.vocab import Security

Name = dns.name.Name
MAX_CHAIN = 12            # CNAME/DNAME links followed before giving up (loop guard)
MAX_DEPTH = 40            # nested chain-of-trust look-ups
FAILURE_TTL = 5           # RFC 9520 §3.2: cache resolution failures briefly
EDNS_PAYLOAD = 1232       # DNS flag day 2020 buffer size

# IANA root zone trust anchors (https://data.iana.org/root-anchors/): KSK-2017 and KSK-2024.
IANA_ROOT_ANCHORS = """
. IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D
. IN DS 38696 8 2 683D2D0ACB8C9B712A1948B27F741219298D0A450D612C483AF444A4C0FB2B16
"""


class ResolverConfigError(ValueError):
    pass


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
    security: Security
    keys: dns.rrset.RRset | None
    reason: str
    ttl: int


class LookupFailed(Exception):
    """The upstream gave no usable answer: timeout, SERVFAIL, REFUSED, malformed."""


def parse_anchors(text: str, source: str = "<anchors>") -> dict[Name, list[DS | DNSKEY]]:
    """Trust anchors in zone-file syntax (DS or DNSKEY lines), as Unbound's trust-anchor-file."""
    out: dict[Name, list[DS | DNSKEY]] = {}
    for lineno, line in _logical_lines(text):
        try:
            rr = dns.rrset.from_text_list(*_split_anchor(line))
        except (dns.exception.DNSException, ValueError) as e:
            raise ResolverConfigError(f"{source}:{lineno}: not a DS or DNSKEY record: {e}") from e
        for rd in rr:
            if not isinstance(rd, DS | DNSKEY):
                raise ResolverConfigError(f"{source}:{lineno}: trust anchors are DS or DNSKEY records")
            out.setdefault(rr.name, []).append(rd)
    if not out:
        raise ResolverConfigError(f"{source}: no trust anchor found")
    return out


def _logical_lines(text: str) -> list[tuple[int, str]]:
    """Zone-file lines without comments, with parenthesised continuations joined (RFC 1035 §5.1), each
    with the number of the line it starts on."""
    out: list[tuple[int, str]] = []
    pending, start, depth = "", 0, 0
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split(";", 1)[0]
        if not line.strip() and depth == 0:
            continue
        if depth == 0:
            start = lineno
        depth += line.count("(") - line.count(")")
        pending += " " + line.replace("(", " ").replace(")", " ")
        if depth <= 0:
            out.append((start, " ".join(pending.split())))
            pending, depth = "", 0
    if pending.strip():
        out.append((start, " ".join(pending.split())))
    return out


def _split_anchor(line: str) -> tuple[str, int, str, str, list[str]]:
    parts = line.split()
    owner, rest = parts[0], parts[1:]
    ttl = 3600
    if rest and rest[0].isdigit():
        ttl, rest = int(rest[0]), rest[1:]
    if rest and rest[0].upper() == "IN":
        rest = rest[1:]
    if not rest:
        raise ValueError("missing type")
    return owner, ttl, "IN", rest[0], [" ".join(rest[1:])]


def load_anchors(path: Path | None) -> dict[Name, list[DS | DNSKEY]]:
    if path is None:
        return parse_anchors(IANA_ROOT_ANCHORS, "IANA root anchors")
    try:
        text = path.read_text()
    except OSError as e:
        raise ResolverConfigError(f"{path}: cannot read trust anchors: {e.strerror}") from e
    return parse_anchors(text, str(path))


def parse_server(spec: str) -> tuple[str, int]:
    """``ADDR``, ``ADDR:PORT``, ``[v6]:PORT`` or bare v6."""
    spec = spec.strip()
    try:
        if spec.startswith("["):
            host, _, port = spec[1:].partition("]")
            addr = str(ipaddress.ip_address(host))
            return addr, int(port.lstrip(":") or 53)
        if spec.count(":") == 1:
            host, port = spec.split(":")
            return str(ipaddress.ip_address(host)), int(port)
        return str(ipaddress.ip_address(spec)), 53
    except ValueError as e:
        raise ResolverConfigError(f"resolver {spec!r}: expected ADDR[:PORT]") from e


T = TypeVar("T")


class _TTLCache:
    """LRU cache of (value, expiry) bounded in entries; concurrent misses for one key share one task."""

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self.max = max_entries
        self.clock = clock
        self.data: OrderedDict[Any, tuple[Any, float]] = OrderedDict()
        self.inflight: dict[Any, asyncio.Future[Any]] = {}
        self.hits = 0
        self.misses = 0

    def peek(self, key: Any) -> Any:
        """The cached value, or None, without waiting (the hot path of a cached lookup)."""
        hit = self.data.get(key)
        if hit is not None and hit[1] > self.clock():
            self.data.move_to_end(key)
            self.hits += 1
            return hit[0]
        return None

    async def get(self, key: Any, make: Callable[[], Awaitable[tuple[T, int]]]) -> T:
        hit = self.data.get(key)
        if hit is not None and hit[1] > self.clock():
            self.data.move_to_end(key)
            self.hits += 1
            return hit[0]  # type: ignore[no-any-return]
        fut = self.inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            value, ttl = await make()
        except BaseException as e:
            self.inflight.pop(key, None)
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        self.inflight.pop(key, None)
        if ttl > 0:
            self.data[key] = (value, self.clock() + ttl)
            self.data.move_to_end(key)
            while len(self.data) > self.max:
                self.data.popitem(last=False)
        fut.set_result(value)
        return value


@dataclass
class Resolver:
    """Validating stub resolver. ``servers`` are recursive resolvers as (address, port)."""

    servers: Sequence[tuple[str, int]]
    anchors: dict[Name, list[DS | DNSKEY]] = field(default_factory=lambda: load_anchors(None))
    mode: str = "validate"
    timeout: float = 5.0
    skew: int = dnssec.DEFAULT_SKEW
    cache_size: int = 20000
    max_ttl: int = 86400
    clock: Callable[[], float] = time.time
    allow_remote_trust_ad: bool = False

    def __post_init__(self) -> None:
        if not self.servers:
            raise ResolverConfigError("no resolver configured")
        if self.mode not in ("validate", "trust-ad"):
            raise ResolverConfigError(f"resolver mode {self.mode!r}: expected validate or trust-ad")
        if self.mode == "trust-ad" and not self.allow_remote_trust_ad:
            for addr, _ in self.servers:
                if not ipaddress.ip_address(addr).is_loopback:
                    raise ResolverConfigError(
                        f"mode trust-ad with non-loopback resolver {addr}: the AD bit can be forged on "
                        "the path; set allow_remote_trust_ad = true to accept that risk")
        self._messages = _TTLCache(self.cache_size, self.clock)
        self._answers = _TTLCache(self.cache_size, self.clock)
        self._keys = _TTLCache(max(256, self.cache_size // 10), self.clock)
        self.queries_sent = 0

    # --- public -----------------------------------------------------------------------------------
    async def resolve(self, qname: Name | str, rdtype: int | str) -> Answer:
        """The answer to (qname, rdtype) with its verdict, within ``timeout`` seconds (never raises)."""
        name = dns.name.from_text(qname) if isinstance(qname, str) else qname
        rt = dns.rdatatype.from_text(rdtype) if isinstance(rdtype, str) else dns.rdatatype.RdataType(rdtype)
        cached = self._answers.peek((name, rt))
        if cached is not None:
            return cached  # type: ignore[no-any-return]
        try:
            async with asyncio.timeout(self.timeout * 3):  # no extra task, unlike wait_for
                return await self._answers.get((name, rt), lambda: self._resolve(name, rt))
        except TimeoutError:
            return Answer(name, rt, dns.rcode.SERVFAIL, Security.INDETERMINATE, "resolution timed out")

    def cache_stats(self) -> dict[str, int]:
        return {"answer_hits": self._answers.hits, "answer_misses": self._answers.misses,
                "queries_sent": self.queries_sent}

    # --- upstream ---------------------------------------------------------------------------------
    async def _fetch(self, qname: Name, rdtype: int) -> dns.message.Message:
        return await self._messages.get((qname, rdtype), lambda: self._query(qname, rdtype))

    async def _query(self, qname: Name, rdtype: int) -> tuple[dns.message.Message, int]:
        q = dns.message.make_query(qname, dns.rdatatype.RdataType.make(rdtype), want_dnssec=True,
                                   payload=EDNS_PAYLOAD)
        if self.mode == "validate":
            q.flags |= dns.flags.CD  # RFC 4035 §3.2.2: we validate, the upstream must not filter
        q.flags |= dns.flags.AD  # RFC 6840 §5.7: ask for the AD bit
        errors = []
        for addr, port in self.servers:
            self.queries_sent += 1
            try:
                r = await dns.asyncquery.udp(q, addr, port=port, timeout=self.timeout,
                                             ignore_unexpected=True, ignore_trailing=False)
                if r.flags & dns.flags.TC:  # RFC 7766 §5: retry over TCP
                    r = await dns.asyncquery.tcp(q, addr, port=port, timeout=self.timeout)
                    if r.flags & dns.flags.TC:
                        errors.append(f"{addr}: truncated answer over TCP")
                        continue
            except (dns.exception.Timeout, TimeoutError):
                errors.append(f"{addr}: timeout")
                continue
            except (dns.exception.DNSException, OSError, ValueError, EOFError) as e:
                errors.append(f"{addr}: {type(e).__name__}: {e}")
                continue
            if r.rcode() not in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                if self.mode == "trust-ad" and r.rcode() == dns.rcode.SERVFAIL:
                    return r, FAILURE_TTL
                errors.append(f"{addr}: {dns.rcode.to_text(r.rcode())}")
                continue
            return r, self._message_ttl(r)
        raise LookupFailed("; ".join(errors) or "no resolver answered")

    def _message_ttl(self, r: dns.message.Message) -> int:
        ttls = [rr.ttl for rr in (*r.answer, *r.authority)]
        for rr in (*r.answer, *r.authority):
            for rd in rr:
                if isinstance(rd, RRSIG):
                    ttls.append(rd.original_ttl)
                    ttls.append(max(0, int(rd.expiration - self.clock())))
        return max(1, min([self.max_ttl, *ttls]))

    # --- trust-ad ---------------------------------------------------------------------------------
    async def _resolve(self, qname: Name, rdtype: int) -> tuple[Answer, int]:
        try:
            msg = await self._fetch(qname, rdtype)
        except LookupFailed as e:
            return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.INDETERMINATE,
                          f"lookup of {qname} {dnssec.rtype_text(rdtype)} failed: {e}"), FAILURE_TTL
        if self.mode == "trust-ad":
            return self._trust_ad(qname, rdtype, msg)
        try:
            ans = await self._validate(qname, rdtype, msg, 0)
        except LookupFailed as e:
            ans = Answer(qname, rdtype, msg.rcode(), Security.INDETERMINATE,
                         f"could not fetch DNSSEC records: {e}")
        except RecursionError:
            ans = Answer(qname, rdtype, msg.rcode(), Security.BOGUS, "chain of trust too deep")
        ttl = ans.ttl if ans.security in (Security.SECURE, Security.INSECURE) else FAILURE_TTL
        return ans, max(1, ttl)

    def _trust_ad(self, qname: Name, rdtype: int, msg: dns.message.Message) -> tuple[Answer, int]:
        if msg.rcode() == dns.rcode.SERVFAIL:
            return Answer(qname, rdtype, msg.rcode(), Security.INDETERMINATE,
                          "resolver answered SERVFAIL (bogus or unreachable)"), FAILURE_TTL
        sec = Security.SECURE if msg.flags & dns.flags.AD else Security.INSECURE
        chain, data, _ = _walk(qname, rdtype, msg)
        ttl = self._message_ttl(msg)
        reason = "" if sec is Security.SECURE else "resolver did not set AD"
        return Answer(qname, rdtype, msg.rcode(), sec, reason, data, tuple(chain), ttl), ttl

    # --- validation -------------------------------------------------------------------------------
    async def _validate(self, qname: Name, rdtype: int, msg: dns.message.Message, depth: int) -> Answer:
        verdicts: list[Security] = []
        reasons: list[str] = []
        chain: list[dns.rrset.RRset] = []
        ttls: list[int] = []
        name = qname
        seen: set[Name] = set()
        for _ in range(MAX_CHAIN):
            if name in seen:
                return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.BOGUS,
                              f"CNAME/DNAME loop at {name}", None, tuple(chain))
            seen.add(name)
            data = _find(msg.answer, name, rdtype)
            if data is not None:
                sec, why, ttl = await self._check_rrset(data, msg.answer, msg, depth)
                verdicts.append(sec)
                reasons.append(why)
                ttls.append(ttl)
                return self._answer(qname, rdtype, dns.rcode.NOERROR, verdicts, reasons, data, chain,
                                    ttls)
            # RFC 6672 §5.3.3: a DNAME's synthesized CNAME is unsigned; the signed DNAME is what counts
            dname_first = _dname_for(msg.answer, name)
            link = None if rdtype == dns.rdatatype.CNAME or dname_first is not None else \
                _find(msg.answer, name, dns.rdatatype.CNAME)
            if link is not None:
                sec, why, ttl = await self._check_rrset(link, msg.answer, msg, depth)
                verdicts.append(sec)
                reasons.append(why)
                ttls.append(ttl)
                chain.append(link)
                name = next(iter(link)).target
                if _find(msg.answer, name, rdtype) is None and \
                        _find(msg.answer, name, dns.rdatatype.CNAME) is None and \
                        _dname_for(msg.answer, name) is None and not _negative_for(msg, name):
                    try:
                        msg = await self._fetch(name, rdtype)
                    except LookupFailed as e:
                        return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.INDETERMINATE,
                                      f"lookup of CNAME target {name} failed: {e}", None, tuple(chain))
                continue
            dname = _dname_for(msg.answer, name)
            if dname is not None:  # RFC 6672 §3: substitute the DNAME owner's suffix by its target
                sec, why, ttl = await self._check_rrset(dname, msg.answer, msg, depth)
                verdicts.append(sec)
                reasons.append(why)
                ttls.append(ttl)
                chain.append(dname)
                try:
                    name = name.relativize(dname.name).derelativize(next(iter(dname)).target)
                except dns.name.NameTooLong:
                    return Answer(qname, rdtype, dns.rcode.YXDOMAIN, weakest(*verdicts),
                                  "DNAME substitution too long", None, tuple(chain))
                if _find(msg.answer, name, rdtype) is None and _find(msg.answer, name,
                                                                     dns.rdatatype.CNAME) is None:
                    msg = await self._fetch(name, rdtype)
                continue
            # no data and no link: a negative answer for ``name``
            sec, why, ttl = await self._check_denial(name, rdtype, msg, depth)
            verdicts.append(sec)
            reasons.append(why)
            ttls.append(ttl)
            return self._answer(qname, rdtype, msg.rcode(), verdicts, reasons, None, chain, ttls)
        return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.BOGUS,
                      f"more than {MAX_CHAIN} CNAME/DNAME links", None, tuple(chain))

    def _answer(self, qname: Name, rdtype: int, rcode: int, verdicts: list[Security], reasons: list[str],
                data: dns.rrset.RRset | None, chain: list[dns.rrset.RRset], ttls: list[int]) -> Answer:
        sec = weakest(*verdicts)
        why = "; ".join(r for s, r in zip(verdicts, reasons, strict=True) if s is sec and r)
        return Answer(qname, rdtype, rcode, sec, why, data, tuple(chain), max(1, min(ttls or [1])))

    async def _check_rrset(self, rrset: dns.rrset.RRset, section: list[dns.rrset.RRset],
                           msg: dns.message.Message, depth: int) -> tuple[Security, str, int]:
        """Verdict for one RRset of an answer, from its own signer's keys."""
        sigs = _sigs(section, rrset.name, rrset.rdtype)
        ttl = rrset.ttl
        if not sigs:
            zsec, why = await self._name_security(rrset.name, depth + 1)
            if zsec is Security.SECURE:
                return Security.BOGUS, f"{_rr(rrset)} is unsigned in a signed zone", 0
            return zsec, why, ttl
        reasons = []
        for signer in dict.fromkeys(s.signer for s in sigs):
            if not rrset.name.is_subdomain(signer):
                reasons.append(f"{_rr(rrset)}: signer {signer} does not enclose the owner")
                continue
            kr = await self._trusted_keys(signer, depth + 1)
            if kr.security is not Security.SECURE:
                if kr.security is Security.INSECURE:
                    return Security.INSECURE, kr.reason, ttl
                reasons.append(kr.reason)
                continue
            assert kr.keys is not None
            res = dnssec.verify_rrset(rrset, [s for s in sigs if s.signer == signer], signer, kr.keys,
                                      self.clock(), self.skew)
            if not res.ok:
                reasons.append(res.reason)
                continue
            assert res.rrsig is not None
            if res.rrsig.labels < dnssec.owner_labels(rrset.name):
                # RFC 4035 §5.3.4: a wildcard expansion needs proof that the name itself does not exist
                ce = Name(rrset.name.labels[-(res.rrsig.labels + 1):])
                if not await self._wildcard_proven(rrset.name, ce, msg, signer, kr.keys):
                    reasons.append(f"{_rr(rrset)}: wildcard expansion without proof of non-existence")
                    continue
            ttl = min(ttl, res.rrsig.original_ttl, max(0, int(res.rrsig.expiration - self.clock())))
            return Security.SECURE, "", ttl
        return Security.BOGUS, "; ".join(reasons), 0

    async def _wildcard_proven(self, qname: Name, ce: Name, msg: dns.message.Message, zone: Name,
                               keys: dns.rrset.RRset) -> bool:
        nsecs, nsec3s, _ = self._proof_records(msg, zone, keys)
        if nsecs and dnssec.nsec_wildcard_ok(qname, nsecs, zone):
            return True
        if nsec3s:
            return dnssec.nsec3_denial(qname, 0, nsec3s, zone, wildcard_ce=ce).proven
        return False

    def _proof_records(self, msg: dns.message.Message, zone: Name, keys: dns.rrset.RRset
                       ) -> tuple[list[tuple[Name, NSEC]], list[tuple[Name, NSEC3]], list[str]]:
        """NSEC/NSEC3 records of the authority section that verify with the zone's keys."""
        nsecs: list[tuple[Name, NSEC]] = []
        nsec3s: list[tuple[Name, NSEC3]] = []
        bad: list[str] = []
        for rr in msg.authority:
            if rr.rdtype not in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3):
                continue
            res = dnssec.verify_rrset(rr, _sigs(msg.authority, rr.name, rr.rdtype), zone, keys,
                                      self.clock(), self.skew)
            if not res.ok:
                bad.append(res.reason)
                continue
            for rd in rr:
                if isinstance(rd, NSEC):
                    nsecs.append((rr.name, rd))
                elif isinstance(rd, NSEC3):
                    nsec3s.append((rr.name, rd))
        return nsecs, nsec3s, bad

    def _denial_zone(self, msg: dns.message.Message) -> tuple[Name | None, bool]:
        """The zone that answered negatively: signer of the SOA/NSEC signatures, else the SOA owner."""
        for rr in msg.authority:
            if rr.rdtype == dns.rdatatype.RRSIG:
                for rd in rr:
                    if rd.type_covered in (dns.rdatatype.SOA, dns.rdatatype.NSEC, dns.rdatatype.NSEC3):
                        return rd.signer, True
        for rr in msg.authority:
            if rr.rdtype == dns.rdatatype.SOA:
                return rr.name, False
        return None, False

    async def _check_denial(self, name: Name, rdtype: int, msg: dns.message.Message, depth: int,
                            ) -> tuple[Security, str, int]:
        sec, proof, _, ttl = await self._denial(name, rdtype, msg, depth)
        if sec is not Security.SECURE:
            return sec, proof.reason, ttl
        nx = msg.rcode() == dns.rcode.NXDOMAIN
        d = proof.denial
        if d in (Denial.OPT_OUT, Denial.INSECURE) and (nx or rdtype == dns.rdatatype.DS or
                                                       d is Denial.INSECURE):
            return Security.INSECURE, proof.reason, ttl
        if nx and d is Denial.NXDOMAIN:
            return Security.SECURE, "", ttl
        if not nx and d in (Denial.NODATA, Denial.NO_DS):
            return Security.SECURE, "", ttl
        what = "NXDOMAIN" if nx else "NODATA"
        return Security.BOGUS, f"{what} for {name} {dnssec.rtype_text(rdtype)} not proven: " + (
            proof.reason or "no denial records"), 0

    async def _denial(self, name: Name, rdtype: int, msg: dns.message.Message, depth: int,
                      ) -> tuple[Security, dnssec.Proof, Name | None, int]:
        """Validate the denial records of a negative response: (zone security, proof, zone, ttl)."""
        ttl = _negative_ttl(msg)
        zone, signed = self._denial_zone(msg)
        if zone is None:
            if name == dns.name.root:
                return Security.INDETERMINATE, dnssec.Proof(Denial.NONE, "negative answer without SOA"), \
                    None, FAILURE_TTL
            zsec, why = await self._name_security(name.parent(), depth + 1)
            if zsec is Security.SECURE:
                return Security.BOGUS, dnssec.Proof(Denial.NONE, f"no SOA or denial records for {name}"), \
                    None, 0
            return zsec, dnssec.Proof(Denial.NONE, why), None, ttl
        if not name.is_subdomain(zone):
            return Security.BOGUS, dnssec.Proof(Denial.NONE, f"denial from {zone} for {name} outside it"), \
                zone, 0
        if rdtype == dns.rdatatype.DS and zone == name and name != dns.name.root:
            return Security.BOGUS, dnssec.Proof(Denial.NONE, f"DS denial for {name} came from the child"), \
                zone, 0
        kr = await self._trusted_keys(zone, depth + 1)
        if kr.security is not Security.SECURE:
            return kr.security, dnssec.Proof(Denial.NONE, kr.reason), zone, ttl
        if not signed:
            why = f"unsigned negative answer from signed {zone}"
            return Security.BOGUS, dnssec.Proof(Denial.NONE, why), zone, 0
        assert kr.keys is not None
        soa = _find(msg.authority, zone, dns.rdatatype.SOA)
        if soa is not None:
            res = dnssec.verify_rrset(soa, _sigs(msg.authority, zone, dns.rdatatype.SOA), zone, kr.keys,
                                      self.clock(), self.skew)
            if not res.ok:
                return Security.BOGUS, dnssec.Proof(Denial.NONE, res.reason), zone, 0
        nsecs, nsec3s, bad = self._proof_records(msg, zone, kr.keys)
        if bad:
            return Security.BOGUS, dnssec.Proof(Denial.NONE, "; ".join(bad)), zone, 0
        proof = dnssec.Proof(Denial.NONE, "no NSEC or NSEC3 records")
        if nsecs:
            proof = dnssec.nsec_denial(name, rdtype, nsecs, zone)
        if not proof.proven and nsec3s:
            proof = dnssec.nsec3_denial(name, rdtype, nsec3s, zone)
        return Security.SECURE, proof, zone, ttl

    async def _name_security(self, name: Name, depth: int) -> tuple[Security, str]:
        """Security of the zone holding ``name``: INSECURE when a signed proof shows the chain ends."""
        if depth > MAX_DEPTH:
            raise RecursionError
        if name in self.anchors:  # a trust anchor's zone needs no DS from its parent
            kr = await self._trusted_keys(name, depth + 1)
            return kr.security, kr.reason
        try:
            msg = await self._fetch(name, dns.rdatatype.DS)
        except LookupFailed as e:
            return Security.INDETERMINATE, f"DS lookup for {name} failed: {e}"
        if _find(msg.answer, name, dns.rdatatype.DS) is not None:
            kr = await self._trusted_keys(name, depth + 1)
            return kr.security, kr.reason
        cname = _find(msg.answer, name, dns.rdatatype.CNAME)
        if cname is not None:
            sigs = _sigs(msg.answer, name, dns.rdatatype.CNAME)
            if sigs and name.is_subdomain(sigs[0].signer):
                kr = await self._trusted_keys(sigs[0].signer, depth + 1)
                return kr.security, kr.reason
            return await self._name_security(name.parent(), depth + 1)
        sec, proof, _, _ = await self._denial(name, dns.rdatatype.DS, msg, depth + 1)
        if sec is not Security.SECURE:
            return sec, proof.reason
        if proof.denial in (Denial.NO_DS, Denial.OPT_OUT, Denial.INSECURE):
            return Security.INSECURE, f"{name}: {proof.reason}"
        if proof.denial in (Denial.NODATA, Denial.NXDOMAIN):
            return Security.SECURE, ""
        return Security.BOGUS, f"no proof about DS of {name}: {proof.reason}"

    async def _trusted_keys(self, zone: Name, depth: int) -> KeyResult:
        if depth > MAX_DEPTH:
            raise RecursionError
        return await self._keys.get(zone, lambda: self._make_keys(zone, depth))

    async def _make_keys(self, zone: Name, depth: int) -> tuple[KeyResult, int]:
        kr = await self._build_keys(zone, depth)
        return kr, (kr.ttl if kr.security in (Security.SECURE, Security.INSECURE) else FAILURE_TTL)

    async def _build_keys(self, zone: Name, depth: int) -> KeyResult:
        """The validated DNSKEY RRset of ``zone`` (RFC 4035 §5.2), or why there is none."""
        if zone in self.anchors:
            return await self._keys_from(zone, list(self.anchors[zone]), f"trust anchor for {zone}")
        if not any(zone.is_subdomain(a) for a in self.anchors):
            return KeyResult(Security.INDETERMINATE, None, f"no trust anchor above {zone}", FAILURE_TTL)
        try:
            msg = await self._fetch(zone, dns.rdatatype.DS)
        except LookupFailed as e:
            return KeyResult(Security.INDETERMINATE, None, f"DS lookup for {zone} failed: {e}", FAILURE_TTL)
        ds = _find(msg.answer, zone, dns.rdatatype.DS)
        if ds is not None:
            sigs = _sigs(msg.answer, zone, dns.rdatatype.DS)
            if not sigs:
                psec, why = await self._name_security(zone.parent(), depth + 1)
                if psec is Security.SECURE:
                    return KeyResult(Security.BOGUS, None, f"unsigned DS for {zone}", FAILURE_TTL)
                return KeyResult(psec, None, why, ds.ttl)
            signer = sigs[0].signer
            if not (zone.is_subdomain(signer) and zone != signer):
                return KeyResult(Security.BOGUS, None, f"DS of {zone} signed by {signer}, not its parent",
                                 FAILURE_TTL)
            pk = await self._trusted_keys(signer, depth + 1)
            if pk.security is not Security.SECURE:
                return KeyResult(pk.security, None, pk.reason, pk.ttl)
            assert pk.keys is not None
            res = dnssec.verify_rrset(ds, sigs, signer, pk.keys, self.clock(), self.skew)
            if not res.ok:
                return KeyResult(Security.BOGUS, None, f"DS of {zone}: {res.reason}", FAILURE_TTL)
            usable = dnssec.usable_ds(ds)
            if not usable:  # RFC 4035 §5.2, RFC 6840 §5.2
                return KeyResult(Security.INSECURE, None,
                                 f"{zone}: no DS with a supported algorithm and digest", ds.ttl)
            kr = await self._keys_from(zone, list(usable), f"DS of {zone}")
            return KeyResult(kr.security, kr.keys, kr.reason, min(kr.ttl, ds.ttl))
        if _find(msg.answer, zone, dns.rdatatype.CNAME) is not None:
            return KeyResult(Security.BOGUS, None, f"{zone} is a CNAME, not a zone", FAILURE_TTL)
        sec, proof, _, ttl = await self._denial(zone, dns.rdatatype.DS, msg, depth + 1)
        if sec is not Security.SECURE:
            return KeyResult(sec, None, proof.reason, ttl if sec is Security.INSECURE else FAILURE_TTL)
        if proof.denial in (Denial.NO_DS, Denial.OPT_OUT, Denial.INSECURE):
            return KeyResult(Security.INSECURE, None, f"insecure delegation: {proof.reason}", ttl)
        return KeyResult(Security.BOGUS, None,
                         f"{zone} signs records but its parent has no DS for it ({proof.reason})",
                         FAILURE_TTL)

    async def _keys_from(self, zone: Name, anchors: list[DS | DNSKEY], source: str) -> KeyResult:
        try:
            msg = await self._fetch(zone, dns.rdatatype.DNSKEY)
        except LookupFailed as e:
            return KeyResult(Security.INDETERMINATE, None, f"DNSKEY lookup for {zone} failed: {e}",
                             FAILURE_TTL)
        keys = _find(msg.answer, zone, dns.rdatatype.DNSKEY)
        if keys is None:
            return KeyResult(Security.BOGUS, None, f"{zone} has a {source} but no DNSKEY", FAILURE_TTL)
        res = dnssec.verify_dnskeys(zone, keys, _sigs(msg.answer, zone, dns.rdatatype.DNSKEY), anchors,
                                    self.clock(), self.skew)
        if not res.ok:
            return KeyResult(Security.BOGUS, None, f"DNSKEY of {zone}: {res.reason}", FAILURE_TTL)
        assert res.rrsig is not None
        ttl = min(keys.ttl, res.rrsig.original_ttl, max(1, int(res.rrsig.expiration - self.clock())))
        return KeyResult(Security.SECURE, keys, "", ttl)


# --- message helpers ------------------------------------------------------------------------------

def _find(section: list[dns.rrset.RRset], name: Name, rdtype: int) -> dns.rrset.RRset | None:
    for rr in section:
        if rr.name == name and rr.rdtype == rdtype and rr.rdclass == dns.rdataclass.IN:
            return rr
    return None


def _sigs(section: list[dns.rrset.RRset], name: Name, covered: int) -> list[RRSIG]:
    return [rd for rr in section if rr.name == name and rr.rdtype == dns.rdatatype.RRSIG
            for rd in rr if isinstance(rd, RRSIG) and rd.type_covered == covered]


def _dname_for(section: list[dns.rrset.RRset], name: Name) -> dns.rrset.RRset | None:
    for rr in section:
        if rr.rdtype == dns.rdatatype.DNAME and name.is_subdomain(rr.name) and name != rr.name:
            return rr
    return None


def _negative_for(msg: dns.message.Message, name: Name) -> bool:
    """The message ends its chain at ``name`` with a negative answer (SOA in the authority section)."""
    return any(rr.rdtype == dns.rdatatype.SOA and name.is_subdomain(rr.name) for rr in msg.authority)


def _negative_ttl(msg: dns.message.Message) -> int:
    """RFC 2308 §5: the SOA's TTL, capped by its MINIMUM field."""
    for rr in msg.authority:
        if rr.rdtype == dns.rdatatype.SOA:
            return max(1, min(int(rr.ttl), int(next(iter(rr)).minimum)))
    return FAILURE_TTL


def _walk(qname: Name, rdtype: int, msg: dns.message.Message
          ) -> tuple[list[dns.rrset.RRset], dns.rrset.RRset | None, Name]:
    """Follow the CNAME chain inside one message without validating (trust-ad mode)."""
    chain: list[dns.rrset.RRset] = []
    name = qname
    for _ in range(MAX_CHAIN):
        data = _find(msg.answer, name, rdtype)
        if data is not None:
            return chain, data, name
        link = _find(msg.answer, name, dns.rdatatype.CNAME)
        if link is None:
            break
        chain.append(link)
        name = next(iter(link)).target
    return chain, None, name


def _rr(rrset: dns.rrset.RRset) -> str:
    return f"{rrset.name} {dnssec.rtype_text(rrset.rdtype)}"


def shuffle_equal(items: list[T], key: Callable[[T], int], rng: random.Random | None = None) -> list[T]:
    """Sort by ``key`` and shuffle runs of equal keys (RFC 5321 §5.1: equal MX preferences)."""
    r = rng or random.Random()
    decorated = [(key(i), r.random(), i) for i in items]
    decorated.sort(key=lambda t: (t[0], t[1]))
    return [i for _, _, i in decorated]
