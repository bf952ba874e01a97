"""The chain of trust: a verdict for every RRset of an answer, built from a trust anchor down (RFC 4035 §5).

For each RRset (each CNAME/DNAME link on its own) the signer's *trusted keys* are found: a trust anchor
verifies a zone's DNSKEY RRset directly; otherwise the zone's DS RRset is fetched from the parent,
verified with the parent's trusted keys, and must match a DNSKEY that signs the DNSKEY RRset (§5.2).
Unsigned data is placed in its zone with a DS question: a signed proof of an insecure delegation above it
makes it insecure, anything else bogus (§5.2, §4.3). Negative answers need NSEC/NSEC3 proofs
(``outbound.dnssec``). Records are fetched through ``fetch`` (the transport behind a cache); keys are
cached in ``keys``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

import dns.message
import dns.name
import dns.rcode
import dns.rdatatype
import dns.rrset
from dns.rdtypes.ANY.DNSKEY import DNSKEY
from dns.rdtypes.ANY.DS import DS
from dns.rdtypes.ANY.NSEC import NSEC
from dns.rdtypes.ANY.NSEC3 import NSEC3
from postgate.outbound import dnssec
from postgate.outbound.dns_cache import TTLCache
from postgate.outbound.dns_types import (
    FAILURE_TTL,
    MAX_CHAIN,
    MAX_DEPTH,
    Answer,
    KeyResult,
    LookupFailed,
    Name,
    dname_for,
    find,
    negative_for,
    negative_ttl,
    rr_text,
    rrsigs_of,
)
from postgate.outbound.dnssec import Denial, weakest
from postgate.outbound.trust_anchors import TrustAnchors
from postgate.policy.vocab import Security

Fetch = Callable[[Name, int], Awaitable[dns.message.Message]]


class ChainOfTrust:
    """Validates messages fetched with ``fetch`` against ``anchors``."""

    def __init__(self, fetch: Fetch, anchors: TrustAnchors, keys: TTLCache, clock: Callable[[], float],
                 skew: int) -> None:
        self.fetch = fetch
        self.anchors = anchors
        self.keys = keys
        self.clock = clock
        self.skew = skew

    async def validate(self, qname: Name, rdtype: int, msg: dns.message.Message) -> Answer:
        """The answer in ``msg`` to (qname, rdtype), each link and the data with its own verdict."""
        return await self._validate(qname, rdtype, msg, 0)

    async def _validate(self, qname: Name, rdtype: int, msg: dns.message.Message, depth: int) -> Answer:
        verdicts: list[Security] = []
        reasons: list[str] = []
        chain: list[dns.rrset.RRset] = []
        links: list[Security] = []   # the verdicts of the CNAME/DNAME links alone
        ttls: list[int] = []
        name = qname
        seen: set[Name] = set()
        for _ in range(MAX_CHAIN):
            if name in seen:
                return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.BOGUS,
                              f"CNAME/DNAME loop at {name}", None, tuple(chain))
            seen.add(name)
            data = find(msg.answer, name, rdtype)
            if data is not None:
                sec, why, ttl = await self._check_rrset(data, msg.answer, msg, depth)
                verdicts.append(sec)
                reasons.append(why)
                ttls.append(ttl)
                return self._answer(qname, rdtype, dns.rcode.NOERROR, verdicts, reasons, data, chain,
                                    ttls, links)
            # RFC 6672 §5.3.3: a DNAME's synthesized CNAME is unsigned; the signed DNAME is what counts
            dname_first = dname_for(msg.answer, name)
            link = None if rdtype == dns.rdatatype.CNAME or dname_first is not None else \
                find(msg.answer, name, dns.rdatatype.CNAME)
            if link is not None:
                sec, why, ttl = await self._check_rrset(link, msg.answer, msg, depth)
                verdicts.append(sec)
                reasons.append(why)
                ttls.append(ttl)
                chain.append(link)
                links.append(sec)
                name = next(iter(link)).target
                if find(msg.answer, name, rdtype) is None and \
                        find(msg.answer, name, dns.rdatatype.CNAME) is None and \
                        dname_for(msg.answer, name) is None and not negative_for(msg, name):
                    try:
                        msg = await self.fetch(name, rdtype)
                    except LookupFailed as e:
                        return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.INDETERMINATE,
                                      f"lookup of CNAME target {name} failed: {e}", None, tuple(chain))
                continue
            dname = dname_for(msg.answer, name)
            if dname is not None:  # RFC 6672 §3: substitute the DNAME owner's suffix by its target
                sec, why, ttl = await self._check_rrset(dname, msg.answer, msg, depth)
                verdicts.append(sec)
                reasons.append(why)
                ttls.append(ttl)
                chain.append(dname)
                links.append(sec)
                try:
                    name = name.relativize(dname.name).derelativize(next(iter(dname)).target)
                except dns.name.NameTooLong:
                    return Answer(qname, rdtype, dns.rcode.YXDOMAIN, weakest(*verdicts),
                                  "DNAME substitution too long", None, tuple(chain))
                if find(msg.answer, name, rdtype) is None and find(msg.answer, name,
                                                                     dns.rdatatype.CNAME) is None:
                    msg = await self.fetch(name, rdtype)
                continue
            # no data and no link: a negative answer for ``name``
            sec, why, ttl = await self._check_denial(name, rdtype, msg, depth)
            verdicts.append(sec)
            reasons.append(why)
            ttls.append(ttl)
            return self._answer(qname, rdtype, msg.rcode(), verdicts, reasons, None, chain, ttls, links)
        return Answer(qname, rdtype, dns.rcode.SERVFAIL, Security.BOGUS,
                      f"more than {MAX_CHAIN} CNAME/DNAME links", None, tuple(chain))

    def _answer(self, qname: Name, rdtype: int, rcode: int, verdicts: list[Security], reasons: list[str],
                data: dns.rrset.RRset | None, chain: list[dns.rrset.RRset], ttls: list[int],
                links: list[Security]) -> Answer:
        sec = weakest(*verdicts)
        why = "; ".join(r for s, r in zip(verdicts, reasons, strict=True) if s is sec and r)
        return Answer(qname, rdtype, rcode, sec, why, data, tuple(chain), max(1, min(ttls or [1])),
                      weakest(*links))

    async def _check_rrset(self, rrset: dns.rrset.RRset, section: list[dns.rrset.RRset],
                           msg: dns.message.Message, depth: int) -> tuple[Security, str, int]:
        """Verdict for one RRset of an answer, from its own signer's keys."""
        sigs = rrsigs_of(section, rrset.name, rrset.rdtype)
        ttl = rrset.ttl
        if not sigs:
            zsec, why = await self._name_security(rrset.name, depth + 1)
            if zsec is Security.SECURE:
                return Security.BOGUS, f"{rr_text(rrset)} is unsigned in a signed zone", 0
            return zsec, why, ttl
        reasons = []
        for signer in dict.fromkeys(s.signer for s in sigs):
            if not rrset.name.is_subdomain(signer):
                reasons.append(f"{rr_text(rrset)}: signer {signer} does not enclose the owner")
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
                proof = await self._wildcard_proof(rrset.name, ce, msg, signer, kr.keys)
                if not proof.proven:
                    reasons.append(f"{rr_text(rrset)}: wildcard expansion without proof of non-existence")
                    continue
                if proof.denial is Denial.INSECURE or proof.optout:
                    # RFC 9276 §3.2 (NSEC3 beyond the iteration limit), RFC 5155 §9.2 (opt-out span): the
                    # proof is only an insecure one, so the wildcard answer is insecure, never secure
                    return Security.INSECURE, f"{rr_text(rrset)}: wildcard answer: {proof.reason}", ttl
            ttl = min(ttl, res.rrsig.original_ttl, max(0, int(res.rrsig.expiration - self.clock())))
            return Security.SECURE, "", ttl
        return Security.BOGUS, "; ".join(reasons), 0

    async def _wildcard_proof(self, qname: Name, ce: Name, msg: dns.message.Message, zone: Name,
                              keys: dns.rrset.RRset) -> dnssec.Proof:
        """RFC 4035 §5.3.4 / RFC 5155 §8.8: the proof that ``qname`` itself does not exist."""
        nsecs, nsec3s, _ = self._proof_records(msg, zone, keys)
        if nsecs and dnssec.nsec_wildcard_ok(qname, nsecs, zone):
            return dnssec.Proof(Denial.NXDOMAIN, f"NSEC covers {qname}")
        if nsec3s:
            return dnssec.nsec3_denial(qname, 0, nsec3s, zone, wildcard_ce=ce)
        return dnssec.Proof(Denial.NONE, "no NSEC or NSEC3 records")

    def _proof_records(self, msg: dns.message.Message, zone: Name, keys: dns.rrset.RRset
                       ) -> tuple[list[tuple[Name, NSEC]], list[tuple[Name, NSEC3]], list[str]]:
        """NSEC/NSEC3 records of the authority section that verify with the zone's keys."""
        nsecs: list[tuple[Name, NSEC]] = []
        nsec3s: list[tuple[Name, NSEC3]] = []
        bad: list[str] = []
        for rr in msg.authority:
            if rr.rdtype not in (dns.rdatatype.NSEC, dns.rdatatype.NSEC3):
                continue
            res = dnssec.verify_rrset(rr, rrsigs_of(msg.authority, rr.name, rr.rdtype), zone, keys,
                                      self.clock(), self.skew)
            if not res.ok:
                bad.append(res.reason)
                continue
            assert res.rrsig is not None
            if dnssec.expanded_from_wildcard(rr.name, res.rrsig):
                continue  # RFC 4035 §5.3.4, §5.4: a wildcard-expanded NSEC/NSEC3 is no proof of anything
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
        if d is Denial.INSECURE_DELEGATION:  # RFC 4035 §5.2: the name lies in a proven unsigned zone
            return Security.INSECURE, proof.reason, ttl
        if proof.optout and ((nx and d is Denial.NXDOMAIN) or (not nx and d is Denial.NODATA)):
            return Security.INSECURE, proof.reason, ttl  # RFC 5155 §9.2: proven, but in an opt-out span
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
        ttl = negative_ttl(msg)
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
        soa = find(msg.authority, zone, dns.rdatatype.SOA)
        if soa is not None:
            res = dnssec.verify_rrset(soa, rrsigs_of(msg.authority, zone, dns.rdatatype.SOA), zone, kr.keys,
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
        if self.anchors.closest(name) is None:  # RFC 4035 §4.3: no anchor, no chain: insecure
            return Security.INSECURE, self.anchors.why_outside(name)
        if name in self.anchors:  # a trust anchor's zone needs no DS from its parent
            kr = await self._trusted_keys(name, depth + 1)
            return kr.security, kr.reason
        try:
            msg = await self.fetch(name, dns.rdatatype.DS)
        except LookupFailed as e:
            return Security.INDETERMINATE, f"DS lookup for {name} failed: {e}"
        if find(msg.answer, name, dns.rdatatype.DS) is not None:
            kr = await self._trusted_keys(name, depth + 1)
            return kr.security, kr.reason
        cname = find(msg.answer, name, dns.rdatatype.CNAME)
        if cname is not None:
            sigs = rrsigs_of(msg.answer, name, dns.rdatatype.CNAME)
            if sigs and name.is_subdomain(sigs[0].signer):
                kr = await self._trusted_keys(sigs[0].signer, depth + 1)
                return kr.security, kr.reason
            return await self._name_security(name.parent(), depth + 1)
        sec, proof, _, _ = await self._denial(name, dns.rdatatype.DS, msg, depth + 1)
        if sec is not Security.SECURE:
            return sec, proof.reason
        if proof.denial in (Denial.NO_DS, Denial.OPT_OUT, Denial.INSECURE, Denial.INSECURE_DELEGATION) \
                or proof.optout:
            return Security.INSECURE, f"{name}: {proof.reason}"
        if proof.denial in (Denial.NODATA, Denial.NXDOMAIN):
            return Security.SECURE, ""
        return Security.BOGUS, f"no proof about DS of {name}: {proof.reason}"

    async def _trusted_keys(self, zone: Name, depth: int) -> KeyResult:
        if depth > MAX_DEPTH:
            raise RecursionError
        return await self.keys.get(zone, lambda: self._make_keys(zone, depth))

    async def _make_keys(self, zone: Name, depth: int) -> tuple[KeyResult, int]:
        kr = await self._build_keys(zone, depth)
        return kr, (kr.ttl if kr.security in (Security.SECURE, Security.INSECURE) else FAILURE_TTL)

    async def _build_keys(self, zone: Name, depth: int) -> KeyResult:
        """The validated DNSKEY RRset of ``zone`` (RFC 4035 §5.2), or why there is none."""
        if zone in self.anchors:
            return await self._keys_from(zone, list(self.anchors[zone]), f"trust anchor for {zone}")
        if self.anchors.closest(zone) is None:
            # RFC 4035 §4.3: a zone under no (usable, RFC 6840 §5.4) trust anchor is insecure
            return KeyResult(Security.INSECURE, None, self.anchors.why_outside(zone), 3600)
        try:
            msg = await self.fetch(zone, dns.rdatatype.DS)
        except LookupFailed as e:
            return KeyResult(Security.INDETERMINATE, None, f"DS lookup for {zone} failed: {e}", FAILURE_TTL)
        ds = find(msg.answer, zone, dns.rdatatype.DS)
        if ds is not None:
            sigs = rrsigs_of(msg.answer, zone, dns.rdatatype.DS)
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
        if find(msg.answer, zone, dns.rdatatype.CNAME) is not None:
            return KeyResult(Security.BOGUS, None, f"{zone} is a CNAME, not a zone", FAILURE_TTL)
        sec, proof, _, ttl = await self._denial(zone, dns.rdatatype.DS, msg, depth + 1)
        if sec is not Security.SECURE:
            return KeyResult(sec, None, proof.reason, ttl if sec is Security.INSECURE else FAILURE_TTL)
        if proof.denial in (Denial.NO_DS, Denial.OPT_OUT, Denial.INSECURE, Denial.INSECURE_DELEGATION) \
                or proof.optout:
            return KeyResult(Security.INSECURE, None, f"insecure delegation: {proof.reason}", ttl)
        return KeyResult(Security.BOGUS, None,
                         f"{zone} signs records but its parent has no DS for it ({proof.reason})",
                         FAILURE_TTL)

    async def _keys_from(self, zone: Name, anchors: list[DS | DNSKEY], source: str) -> KeyResult:
        try:
            msg = await self.fetch(zone, dns.rdatatype.DNSKEY)
        except LookupFailed as e:
            return KeyResult(Security.INDETERMINATE, None, f"DNSKEY lookup for {zone} failed: {e}",
                             FAILURE_TTL)
        keys = find(msg.answer, zone, dns.rdatatype.DNSKEY)
        if keys is None:
            return KeyResult(Security.BOGUS, None, f"{zone} has a {source} but no DNSKEY", FAILURE_TTL)
        res = dnssec.verify_dnskeys(zone, keys, rrsigs_of(msg.answer, zone, dns.rdatatype.DNSKEY), anchors,
                                    self.clock(), self.skew)
        if not res.ok:
            return KeyResult(Security.BOGUS, None, f"DNSKEY of {zone}: {res.reason}", FAILURE_TTL)
        assert res.rrsig is not None
        ttl = min(keys.ttl, res.rrsig.original_ttl, max(1, int(res.rrsig.expiration - self.clock())))
        return KeyResult(Security.SECURE, keys, "", ttl)


