"""DNSSEC validation primitives: signatures, DS links and authenticated denial of existence.

DNSSEC (RFC 4033-4035) lets a resolver prove that a DNS answer is the one the zone's owner published. Each
zone signs its RRsets with its DNSKEYs (RRSIG records); the parent zone vouches for the child's key with a
DS record, which the parent signs in turn, up to a *trust anchor* the resolver already knows (the root
KSK). Non-existence is proven with NSEC records (RFC 4034 §4), which list the next existing name and the
types present at a name, or NSEC3 records (RFC 5155), which do the same over hashed names and may *opt out*
of covering unsigned delegations.

Every answer gets one of four verdicts (RFC 4033 §5, RFC 4035 §4.3):

- **secure**: an unbroken chain of signatures from a trust anchor covers it;
- **insecure**: a signed proof shows that the chain ends on the way (a delegation without DS, an opt-out
  span, or a DS with only algorithms we do not implement, RFC 6840 §5.2);
- **bogus**: a chain should exist but does not verify (bad or missing signature, expired, no proof);
- **indeterminate**: the records needed to decide could not be obtained.

This module is pure: functions over dnspython records, no I/O. ``outbound.resolver`` fetches the records.
"""

from __future__ import annotations

import base64
import enum
import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import dns.dnssec
import dns.exception
import dns.name
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from dns.dnssec import UnsupportedAlgorithm, ValidationFailure  # type: ignore[attr-defined]
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.NSEC3 import NSEC3
from dns.rdtypes.ANY.RRSIG import RRSIG
from postgate.policy.vocab import Security


def weakest(*verdicts: Security) -> Security:
    """Combine verdicts of the links of one answer: any bogus makes it bogus, and so on down."""
    for v in (Security.BOGUS, Security.INDETERMINATE, Security.INSECURE):
        if v in verdicts:
            return v
    return Security.SECURE


# RFC 8624 §3.1 (kept by RFC 9904): validators MUST or RECOMMENDED implement these; 1, 3, 6 and 12 are
# MUST NOT / unsupported. A zone whose DS names only other algorithms is insecure (RFC 4035 §5.2).
SUPPORTED_ALGORITHMS = frozenset({5, 7, 8, 10, 13, 14, 15, 16})
# RFC 8624 §3.3: DS digests SHA-1 (1), SHA-256 (2), SHA-384 (4); GOST (3) is not implemented.
SUPPORTED_DIGESTS = frozenset({1, 2, 4})
# RFC 9276 §3.2: validators may treat NSEC3 with many iterations as insecure; 150 is Unbound's and
# BIND's threshold, so Postgate agrees with them.
NSEC3_MAX_ITERATIONS = 150
DEFAULT_SKEW = 300  # seconds of clock skew tolerated on RRSIG validity windows


@dataclass(frozen=True)
class SigResult:
    """Outcome of checking one RRset's signatures."""

    ok: bool
    reason: str
    rrsig: RRSIG | None = None

    @property
    def wildcard_labels(self) -> int | None:
        """Labels field of the RRSIG that verified, when it shows a wildcard expansion."""
        return None if self.rrsig is None else self.rrsig.labels


def owner_labels(name: dns.name.Name) -> int:
    """Label count as the RRSIG labels field counts it (RFC 4034 §3.1.3): no root, no leading '*'."""
    n = len(name.labels) - 1
    if name.labels and name.labels[0] == b"*":
        n -= 1
    return n


def verify_rrset(rrset: dns.rrset.RRset, rrsigs: Iterable[RRSIG], zone: dns.name.Name,
                 keys: dns.rrset.RRset, now: float, skew: int = DEFAULT_SKEW) -> SigResult:
    """Check that at least one RRSIG by ``zone`` over ``rrset`` verifies with ``keys``.

    RFC 4035 §5.3.1: the signer name is the zone, the owner is within it, the labels field is not larger
    than the owner's labels, the validity window contains now (with ``skew`` either side), and a DNSKEY
    with the key tag and algorithm and the zone-key flag verifies the signature.
    """
    reasons = []
    candidates = [s for s in rrsigs if s.type_covered == rrset.rdtype]
    if not candidates:
        return SigResult(False, f"no RRSIG over {rrset.name} {dns.rdatatype.to_text(rrset.rdtype)}")
    for sig in candidates:
        what = (f"RRSIG {rrset.name} {dns.rdatatype.to_text(rrset.rdtype)} "
                f"(key {sig.key_tag}, alg {sig.algorithm})")
        if sig.signer != zone:
            reasons.append(f"{what}: signer {sig.signer} is not the zone {zone}")
            continue
        if not rrset.name.is_subdomain(zone):
            reasons.append(f"{what}: owner outside the signer's zone")
            continue
        if sig.labels > owner_labels(rrset.name):  # RFC 4035 §5.3.1
            reasons.append(f"{what}: labels field larger than the owner's")
            continue
        if sig.algorithm not in SUPPORTED_ALGORITHMS:
            reasons.append(f"{what}: unsupported algorithm")
            continue
        if now > sig.expiration + skew:
            reasons.append(f"{what}: signature expired at {_ts(sig.expiration)}")
            continue
        if now < sig.inception - skew:
            reasons.append(f"{what}: signature not valid before {_ts(sig.inception)}")
            continue
        zone_keys = [k for k in keys if isinstance(k, DNSKEY) and k.flags & 0x0100 and k.protocol == 3
                     and k.algorithm == sig.algorithm and dns.dnssec.key_id(k) == sig.key_tag]
        if not zone_keys:  # RFC 4035 §5.3.1: Zone Key flag set, tag and algorithm match
            reasons.append(f"{what}: no matching DNSKEY in {zone}")
            continue
        keyset = dns.rrset.from_rdata_list(zone, keys.ttl, zone_keys)
        inside = min(max(now, sig.inception), sig.expiration)  # skew already granted above
        try:
            dns.dnssec.validate_rrsig(rrset, sig, {zone: keyset}, now=inside,
                                      policy=dns.dnssec.allow_all_policy)
        except (ValidationFailure, UnsupportedAlgorithm, dns.exception.DNSException,
                ValueError, TypeError) as e:
            reasons.append(f"{what}: {e or 'signature does not verify'}")
            continue
        return SigResult(True, "verified", sig)
    return SigResult(False, "; ".join(reasons))


def rtype_text(rdtype: int) -> str:
    return dns.rdatatype.to_text(dns.rdatatype.RdataType.make(rdtype))


def _ts(t: int) -> str:
    import datetime as dt
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def usable_ds(ds_rrset: Iterable[dns.rdata.Rdata]) -> list[DS]:
    """DS records with an algorithm and digest type we implement (RFC 4035 §5.2, RFC 6840 §5.2).

    RFC 4509 §3: when a SHA-256 (or stronger) DS exists, SHA-1 DS records are ignored.
    """
    ds = [d for d in ds_rrset if isinstance(d, DS) and d.algorithm in SUPPORTED_ALGORITHMS
          and d.digest_type in SUPPORTED_DIGESTS]
    if any(d.digest_type != 1 for d in ds):
        ds = [d for d in ds if d.digest_type != 1]
    return ds


def ds_matches(ds: DS, owner: dns.name.Name, key: DNSKEY) -> bool:
    """RFC 4034 §5.1.4: digest over owner name | DNSKEY RDATA, with tag and algorithm equal."""
    if ds.algorithm != key.algorithm or ds.key_tag != dns.dnssec.key_id(key):
        return False
    try:
        made = dns.dnssec.make_ds(owner, key, ds.digest_type, policy=dns.dnssec.allow_all_policy)
    except (UnsupportedAlgorithm, ValueError):
        return False
    return made.digest == ds.digest


def verify_dnskeys(zone: dns.name.Name, dnskeys: dns.rrset.RRset, rrsigs: Sequence[RRSIG],
                   anchors: Sequence[DS | DNSKEY], now: float, skew: int = DEFAULT_SKEW) -> SigResult:
    """RFC 4035 §5.2: the DNSKEY RRset is trusted when a key matching an anchor (DS or DNSKEY) signs it."""
    trusted: list[DNSKEY] = []
    for k in dnskeys:
        if not isinstance(k, DNSKEY) or not k.flags & 0x0100 or k.protocol != 3:
            continue
        for a in anchors:
            if isinstance(a, DS) and ds_matches(a, zone, k):
                trusted.append(k)
            elif isinstance(a, DNSKEY) and a.algorithm == k.algorithm and a.key == k.key:
                trusted.append(k)
    if not trusted:
        return SigResult(False, f"no DNSKEY of {zone} matches its DS/trust anchor")
    trusted_set = dns.rrset.from_rdata_list(zone, dnskeys.ttl, trusted)
    return verify_rrset(dnskeys, rrsigs, zone, trusted_set, now, skew)


# --- authenticated denial of existence ------------------------------------------------------------

class Denial(enum.Enum):
    """What a denial proof established."""

    NXDOMAIN = "nxdomain"            # the name does not exist
    NODATA = "nodata"                # the name exists without the type
    NO_DS = "no-ds"                  # a delegation without DS: the child is insecure
    OPT_OUT = "opt-out"              # covered by an NSEC3 opt-out span: may be an unsigned delegation
    INSECURE_DELEGATION = "insecure-delegation"  # the name lies below a delegation proven to have no DS
    INSECURE = "insecure-nsec3"      # NSEC3 parameters beyond what we validate (RFC 9276)
    NONE = "none"                    # nothing proven


@dataclass(frozen=True)
class Proof:
    denial: Denial
    reason: str
    # RFC 5155 §9.2: the next closer name lies in an opt-out span, so an unsigned delegation may exist
    # there: the denial holds, but only as an insecure one
    optout: bool = False

    @property
    def proven(self) -> bool:
        return self.denial not in (Denial.NONE,)


_NO = Proof(Denial.NONE, "")


def _types(rd: NSEC | NSEC3) -> set[int]:
    out: set[int] = set()
    for window, bitmap in rd.windows:
        for i, byte in enumerate(bitmap):
            for bit in range(8):
                if byte & (0x80 >> bit):
                    out.add(window * 256 + i * 8 + bit)
    return out


def _nsec_covers(owner: dns.name.Name, nxt: dns.name.Name, name: dns.name.Name) -> bool:
    """RFC 4034 §6.1 canonical order: owner < name < next, with the last NSEC wrapping to the apex."""
    if owner < nxt:
        return bool(owner < name < nxt)
    return bool(name > owner or name < nxt)


def _common(a: dns.name.Name, b: dns.name.Name) -> dns.name.Name:
    _, _, n = a.fullcompare(b)
    return dns.name.Name(a.labels[-n:]) if n else dns.name.root


def _wildcard(ce: dns.name.Name) -> dns.name.Name:
    return dns.name.Name((b"*", *ce.labels))


def nsec_denial(qname: dns.name.Name, qtype: int, nsecs: Sequence[tuple[dns.name.Name, NSEC]],
                zone: dns.name.Name) -> Proof:
    """Proof from validated NSEC records that (qname, qtype) has no data (RFC 4035 §5.4, RFC 6840 §4)."""
    cname, ns, soa, ds, dname = (dns.rdatatype.CNAME, dns.rdatatype.NS, dns.rdatatype.SOA,
                                 dns.rdatatype.DS, dns.rdatatype.DNAME)
    for owner, rd in nsecs:
        if owner != qname:
            continue
        t = _types(rd)
        if qtype in t or (cname in t and qtype != cname):
            return Proof(Denial.NONE, f"NSEC at {owner} lists the type")
        if qtype == ds:
            if soa in t and qname != dns.name.root:
                return Proof(Denial.NONE, f"NSEC at {owner} is from the child zone, not the parent")
            if ns in t:  # RFC 4035 §5.2: delegation, no DS bit: the child is insecure
                return Proof(Denial.NO_DS, f"NSEC at {owner} proves a delegation without DS")
            return Proof(Denial.NODATA, f"NSEC at {owner}: no DS, not a delegation")
        if ns in t and soa not in t:  # RFC 6840 §4.1: parent-side NSEC cannot deny child data
            return Proof(Denial.NONE, f"NSEC at {owner} is the parent side of a delegation")
        return Proof(Denial.NODATA, f"NSEC at {owner} lacks {rtype_text(qtype)}")
    covering = None
    for owner, rd in nsecs:
        if qname.is_subdomain(zone) and _nsec_covers(owner, rd.next, qname):
            t = _types(rd)
            if qname.is_subdomain(owner) and owner != zone and (
                    (ns in t and soa not in t) or dname in t):
                if dname not in t and ds not in t:
                    # RFC 4035 §5.2: the parent-side NSEC of a delegation without DS: the name lies in
                    # an unsigned zone, whose answers are insecure
                    return Proof(Denial.INSECURE_DELEGATION,
                                 f"NSEC at {owner} proves an insecure delegation above {qname}")
                # RFC 6840 §4.1: an ancestor delegation or DNAME cannot deny names below it
                return Proof(Denial.NONE, f"NSEC at {owner} is a delegation/DNAME above {qname}")
            covering = (owner, rd)
            break
    if covering is None:
        return Proof(Denial.NONE, f"no NSEC matches or covers {qname}")
    owner, rd = covering
    if rd.next.is_subdomain(qname) and rd.next != qname:
        # empty non-terminal: qname exists (it has descendants) but holds no records
        return Proof(Denial.NODATA, f"NSEC {owner} -> {rd.next} proves an empty non-terminal")
    ce = max(_common(qname, owner), _common(qname, rd.next), key=lambda n: len(n.labels))
    if not ce.is_subdomain(zone):
        ce = zone
    wc = _wildcard(ce)
    for o, r in nsecs:
        if o == wc:
            t = _types(r)
            if qtype in t or (cname in t and qtype != cname):
                return Proof(Denial.NONE, f"wildcard {wc} exists with the type")
            return Proof(Denial.NODATA, f"wildcard {wc} exists without the type (RFC 4035 §3.1.3.4)")
    for o, r in nsecs:
        if _nsec_covers(o, r.next, wc):
            return Proof(Denial.NXDOMAIN, f"NSEC {owner} covers {qname}, NSEC {o} covers {wc}")
    return Proof(Denial.NONE, f"no NSEC denies the wildcard {wc}")


def expanded_from_wildcard(owner: dns.name.Name, rrsig: RRSIG) -> bool:
    """RFC 4035 §5.3.4: an RRSIG labels field smaller than the owner's shows a wildcard expansion. Such an
    NSEC/NSEC3 was synthesised for the question and proves nothing about other names (RFC 4035 §5.4;
    CVE-2017-15105), nor about a delegation (RFC 6840 §4.4)."""
    return bool(rrsig.labels < owner_labels(owner))


def nsec_wildcard_ok(qname: dns.name.Name, nsecs: Sequence[tuple[dns.name.Name, NSEC]],
                     zone: dns.name.Name) -> bool:
    """RFC 4035 §5.3.4: a wildcard-expanded answer needs an NSEC proving qname itself does not exist."""
    return any(o != qname and _nsec_covers(o, r.next, qname) for o, r in nsecs)


@dataclass(frozen=True)
class _N3:
    owner_hash: bytes
    rd: NSEC3


def _b32(label: bytes) -> bytes | None:
    try:
        return base64.b32hexdecode(label.upper())
    except (ValueError, base64.binascii.Error):  # type: ignore[attr-defined]
        return None


def _n3hash(name: dns.name.Name, salt: bytes, iterations: int) -> bytes:
    """RFC 5155 §5: IH(salt, x, k) over the canonical wire form."""
    wire = name.canonicalize().to_wire() or b""
    d = hashlib.sha1(wire + salt).digest()
    for _ in range(iterations):
        d = hashlib.sha1(d + salt).digest()
    return d


def nsec3_denial(qname: dns.name.Name, qtype: int, nsec3s: Sequence[tuple[dns.name.Name, NSEC3]],
                 zone: dns.name.Name, *, wildcard_ce: dns.name.Name | None = None) -> Proof:
    """Proof from validated NSEC3 records (RFC 5155 §8). With ``wildcard_ce``, checks the next-closer
    name of a wildcard-expanded answer instead (§8.8)."""
    recs: list[_N3] = []
    for owner, rd in nsec3s:
        # RFC 5155 §8.1-8.2: ignore unknown hash algorithms, owners not directly under the zone
        if rd.algorithm != 1 or owner.parent() != zone:
            continue
        owner_hash = _b32(owner.labels[0])
        if owner_hash is not None:
            recs.append(_N3(owner_hash, rd))
    if not recs:
        return Proof(Denial.NONE, "no usable NSEC3 records")
    salt, iters = recs[0].rd.salt, recs[0].rd.iterations
    recs = [r for r in recs if r.rd.salt == salt and r.rd.iterations == iters]
    if iters > NSEC3_MAX_ITERATIONS:  # RFC 9276 §3.2
        return Proof(Denial.INSECURE, f"NSEC3 with {iters} iterations treated as insecure (RFC 9276)")
    cache: dict[dns.name.Name, bytes] = {}

    def h(n: dns.name.Name) -> bytes:
        if n not in cache:
            cache[n] = _n3hash(n, salt, iters)
        return cache[n]

    def match(n: dns.name.Name) -> _N3 | None:
        return next((r for r in recs if r.owner_hash == h(n)), None)

    def cover(n: dns.name.Name) -> _N3 | None:
        x = h(n)
        for r in recs:
            a, b = r.owner_hash, r.rd.next
            if (a < x < b) if a < b else (x > a or x < b):
                return r
        return None

    ns, soa, ds, cname, dname = (dns.rdatatype.NS, dns.rdatatype.SOA, dns.rdatatype.DS,
                                 dns.rdatatype.CNAME, dns.rdatatype.DNAME)

    def closest_encloser(name: dns.name.Name) -> tuple[dns.name.Name, _N3] | Proof | None:
        """RFC 5155 §8.3: the closest encloser matches, the next closer name is covered."""
        n = name
        prev = None
        while True:
            m = match(n)
            if m is not None and prev is not None:
                t = _types(m.rd)
                if ns in t and soa not in t and ds not in t and dname not in t and n != zone:
                    # RFC 4035 §5.2: a delegation without DS above the name (matched, RFC 5155 §8.3): the name
                    # lies in an unsigned zone
                    return Proof(Denial.INSECURE_DELEGATION,
                                 f"NSEC3 for {n} proves an insecure delegation above {name}")
                if (ns in t and soa not in t) or dname in t:
                    return None  # §8.3: a delegation or DNAME cannot be a closest encloser here
                c = cover(prev)
                return (n, c) if c is not None else None
            if n == zone:
                return None
            prev, n = n, n.parent()

    if wildcard_ce is not None:  # §8.8
        nc = dns.name.Name(qname.labels[-(len(wildcard_ce.labels) + 1):])
        c = cover(nc)
        if c is None:
            return _NO
        # §9.2: in an opt-out span the wildcard answer could be shadowed by an unsigned delegation
        return Proof(Denial.NXDOMAIN, f"NSEC3 covers next closer {nc}" + (
            " (opt-out span: insecure)" if c.rd.flags & 1 else ""), optout=bool(c.rd.flags & 1))

    m = match(qname)
    if m is not None:  # §8.5 / §8.6: NODATA
        t = _types(m.rd)
        if qtype in t or (cname in t and qtype != cname):
            return Proof(Denial.NONE, f"NSEC3 for {qname} lists the type")
        if qtype == ds:
            if soa in t and qname != dns.name.root:
                return Proof(Denial.NONE, f"NSEC3 for {qname} is from the child zone")
            if ns in t:
                return Proof(Denial.NO_DS, f"NSEC3 for {qname} proves a delegation without DS")
            return Proof(Denial.NODATA, f"NSEC3 for {qname}: no DS, not a delegation")
        if ns in t and soa not in t:
            return Proof(Denial.NONE, f"NSEC3 for {qname} is the parent side of a delegation")
        return Proof(Denial.NODATA, f"NSEC3 for {qname} lacks {rtype_text(qtype)}")
    ce = closest_encloser(qname)
    if isinstance(ce, Proof):
        return ce
    if ce is None:
        return Proof(Denial.NONE, f"no NSEC3 closest-encloser proof for {qname}")
    encloser, nc_cover = ce
    optout = bool(nc_cover.rd.flags & 1)
    span = f"; next closer name of {qname} lies in an NSEC3 opt-out span" if optout else ""
    if optout and qtype == ds:
        # RFC 5155 §8.6: DS NODATA by an opt-out span: at most an insecure delegation
        return Proof(Denial.OPT_OUT, f"next closer name of {qname} lies in an NSEC3 opt-out span")
    wc = _wildcard(encloser)
    wm = match(wc)
    if wm is not None:  # §8.7: wildcard NODATA (insecure in an opt-out span, §9.2)
        t = _types(wm.rd)
        if qtype in t or (cname in t and qtype != cname):
            return Proof(Denial.NONE, f"wildcard {wc} exists with the type")
        return Proof(Denial.NODATA, f"wildcard {wc} exists without the type{span}", optout=optout)
    if cover(wc) is not None:  # §8.4: NXDOMAIN needs the wildcard covered, opt-out or not
        return Proof(Denial.NXDOMAIN, f"NSEC3 proves {qname} absent (closest encloser {encloser}){span}",
                     optout=optout)
    return Proof(Denial.NONE, f"no NSEC3 denies the wildcard {wc}{span}")
