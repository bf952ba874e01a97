"""Hand-built signed responses: every denial-proof branch, and answers an honest server never sends.

Each test builds the exact upstream replies (signed with a key the resolver trusts as anchor) and checks
the verdict of Postgate's validating resolver. Rows cite the RFC rule they exercise.
"""

from __future__ import annotations

import asyncio
import bisect
import time
from collections.abc import Iterator

import dns.dnssec
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rrset
import pytest
from postgate.outbound.resolver import Resolver
from postgate.policy.vocab import Security

from tests.dnsfake import FakeUpstream, Reply, Signer

NX, OK = dns.rcode.NXDOMAIN, dns.rcode.NOERROR
ADDR = "127.0.60.1"


@pytest.fixture
def up() -> Iterator[FakeUpstream]:
    with FakeUpstream(ADDR) as f:
        yield f


def resolver(*signers: Signer, timeout: float = 2.0) -> Resolver:
    return Resolver([(ADDR, 53)], anchors={s.zone: [s.dnskey] for s in signers}, timeout=timeout)


def ask(r: Resolver, name: str, rdtype: str) -> tuple[Security, str]:
    a = asyncio.run(r.resolve(name, rdtype))
    return a.security, a.reason


# --- NSEC zone -----------------------------------------------------------------------------------
# hand.test: apex, a, c, sub.e (so e is an empty non-terminal), *.w (wildcard). Canonical NSEC chain:
# hand.test -> a -> c -> sub.e -> *.w -> hand.test

def nsec_zone() -> tuple[Signer, dict[str, list[dns.rrset.RRset]]]:
    s = Signer("hand.test.")
    chain = {
        "apex": s.signed(s.rr("@", "NSEC", "a.hand.test. SOA NS DNSKEY RRSIG NSEC")),
        "a": s.signed(s.rr("a", "NSEC", "c.hand.test. A RRSIG NSEC")),
        "c": s.signed(s.rr("c", "NSEC", "sub.e.hand.test. A RRSIG NSEC")),
        "sub.e": s.signed(s.rr("sub.e", "NSEC", "*.w.hand.test. A RRSIG NSEC")),
        "*.w": s.signed(s.rr("*.w", "NSEC", "hand.test. A RRSIG NSEC")),
    }
    return s, chain


def nsec_zone_record(s: Signer, name: str) -> list[dns.rrset.RRset]:
    nxt = {"a": "c.hand.test.", "c": "sub.e.hand.test."}[name]
    return s.signed(s.rr(name, "NSEC", f"{nxt} A RRSIG NSEC"))


NSEC_CASES = [
    # (question, rcode, NSEC records in the authority section, expected, RFC rule)
    ("b.hand.test A", NX, ["a", "apex"], Security.SECURE, "RFC 4035 §3.1.3.2 NXDOMAIN: cover + wildcard"),
    ("b.hand.test A", NX, [], Security.BOGUS, "RFC 4035 §5.4: NXDOMAIN without NSEC"),
    ("b.hand.test A", NX, ["a"], Security.BOGUS, "RFC 4035 §5.4: wildcard not denied"),
    ("b.hand.test A", NX, ["apex"], Security.BOGUS, "RFC 4035 §5.4: name not covered"),
    ("a.hand.test TXT", OK, ["a"], Security.SECURE, "RFC 4035 §3.1.3.1 NODATA: matching NSEC"),
    ("a.hand.test TXT", OK, [], Security.BOGUS, "RFC 4035 §5.4: NODATA without NSEC"),
    ("a.hand.test A", OK, ["a"], Security.BOGUS, "RFC 4035 §5.4: NSEC lists the type asked"),
    ("e.hand.test A", OK, ["c"], Security.SECURE, "RFC 4035 §3.1.3.2: empty non-terminal NODATA"),
    ("x.w.hand.test TXT", OK, ["sub.e", "*.w"], Security.SECURE, "RFC 4035 §3.1.3.4 wildcard NODATA"),
    ("x.w.hand.test TXT", OK, ["sub.e"], Security.BOGUS, "RFC 4035 §3.1.3.4: wildcard not shown"),
]


@pytest.mark.parametrize(("question", "rcode", "proof", "expected", "rule"), NSEC_CASES,
                         ids=[c[4] for c in NSEC_CASES])
def test_nsec_denial(up: FakeUpstream, question: str, rcode: int, proof: list[str], expected: Security,
                     rule: str) -> None:
    s, chain = nsec_zone()
    up.signers.append(s)
    name, rdtype = question.split()
    up.add(name + ".", rdtype, Reply(rcode, authority=s.soa() + [rr for p in proof for rr in chain[p]]))
    sec, why = ask(resolver(s), name, rdtype)
    assert sec is expected, why


def test_wildcard_answer_needs_proof(up: FakeUpstream) -> None:
    """RFC 4035 §5.3.4: an RRSIG with fewer labels than its owner is a wildcard expansion; it is secure
    only with an NSEC proving the queried name itself does not exist."""
    s, chain = nsec_zone()
    up.signers.append(s)
    data = s.rr("x.w", "A", "192.0.2.1")
    up.add("x.w.hand.test.", "A", Reply(answer=s.signed(data, wildcard_labels=3), authority=chain["*.w"]))
    up.add("y.w.hand.test.", "A", Reply(answer=s.signed(s.rr("y.w", "A", "192.0.2.1"),
                                                        wildcard_labels=3)))
    r = resolver(s)
    assert ask(r, "x.w.hand.test", "A")[0] is Security.SECURE
    assert ask(r, "y.w.hand.test", "A")[0] is Security.BOGUS


def test_signature_problems(up: FakeUpstream) -> None:
    s, _ = nsec_zone()
    other = Signer("hand.test.")  # same zone name, a key nobody trusts
    up.signers.append(s)
    up.add("a.hand.test.", "A", Reply(answer=s.signed(s.rr("a", "A", "192.0.2.1"), expired=True)))
    up.add("c.hand.test.", "A", Reply(answer=[s.rr("c", "A", "192.0.2.3")]))
    # the DS question Postgate asks to place the unsigned RRset: c is no delegation, so it is in hand.test
    up.add("c.hand.test.", "DS", Reply(authority=s.soa() + nsec_zone_record(s, "c")))
    up.add("d.hand.test.", "A", Reply(answer=other.signed(other.rr("d", "A", "192.0.2.4"))))
    good = s.rr("f", "A", "192.0.2.6")
    up.add("f.hand.test.", "A", Reply(answer=[s.rr("f", "A", "192.0.2.66"), s.sign(good)]))
    r = resolver(s)
    sec, why = ask(r, "a.hand.test", "A")
    assert sec is Security.BOGUS and "expired" in why
    sec, why = ask(r, "c.hand.test", "A")
    assert sec is Security.BOGUS and "unsigned" in why
    assert ask(r, "d.hand.test", "A")[0] is Security.BOGUS       # signed by an untrusted key
    assert ask(r, "f.hand.test", "A")[0] is Security.BOGUS       # data altered after signing


def test_cname_loop_is_bogus_not_a_hang(up: FakeUpstream) -> None:
    s, _ = nsec_zone()
    up.signers.append(s)
    l1 = s.signed(s.rr("l1", "CNAME", "l2.hand.test."))
    l2 = s.signed(s.rr("l2", "CNAME", "l1.hand.test."))
    up.add("l1.hand.test.", "A", Reply(answer=l1 + l2))
    up.add("l2.hand.test.", "A", Reply(answer=l2 + l1))
    t0 = time.monotonic()
    sec, why = ask(resolver(s), "l1.hand.test", "A")
    assert sec is Security.BOGUS and "loop" in why
    assert time.monotonic() - t0 < 5


def test_cname_links_validated_each_on_its_own(up: FakeUpstream) -> None:
    s, chain = nsec_zone()
    up.signers.append(s)
    link = s.signed(s.rr("alias", "CNAME", "a.hand.test."))
    up.add("alias.hand.test.", "A", Reply(answer=[*link, s.rr("a", "A", "192.0.2.1")]))  # target unsigned
    up.add("a.hand.test.", "DS", Reply(authority=s.soa() + chain["a"]))
    up.add("alias2.hand.test.", "DS", Reply(NX, authority=s.soa() + chain["a"] + chain["apex"]))
    unsigned_link = s.rr("alias2", "CNAME", "a.hand.test.")
    up.add("alias2.hand.test.", "A", Reply(answer=[unsigned_link, *s.signed(s.rr("a", "A", "192.0.2.1"))]))
    r = resolver(s)
    assert ask(r, "alias.hand.test", "A")[0] is Security.BOGUS
    assert ask(r, "alias2.hand.test", "A")[0] is Security.BOGUS


# --- NSEC3 zone ----------------------------------------------------------------------------------

class N3Zone:
    """hand3.test with names apex, a, deleg (an unsigned delegation in an opt-out span unless
    ``optout`` is False) and *.wild; builds the hashed chain and finds matching/covering records."""

    def __init__(self, optout: bool = False, iterations: int = 0) -> None:
        self.s = Signer("hand3.test.")
        self.it = iterations
        names = {"@": "SOA NS DNSKEY RRSIG NSEC3PARAM", "a": "A RRSIG", "*.wild": "A RRSIG",
                 "wild": ""}
        if not optout:
            names["deleg"] = "NS"
        self.optout = optout
        self.entries = sorted((self.s.nsec3_hash(n, iterations), n, t) for n, t in names.items())
        self.hashes = [e[0] for e in self.entries]

    def record(self, idx: int) -> list[dns.rrset.RRset]:
        _h, name, types = self.entries[idx]
        nxt = self.entries[(idx + 1) % len(self.entries)][0]
        return self.s.nsec3(name, "=" + nxt, types, optout=self.optout, iterations=self.it)

    def matching(self, name: str) -> list[dns.rrset.RRset]:
        return self.record(self.hashes.index(self.s.nsec3_hash(name, self.it)))

    def cover_index(self, name: str) -> int:
        h = self.s.nsec3_hash(name, self.it)
        assert h not in self.hashes
        return (bisect.bisect(self.hashes, h) - 1) % len(self.hashes)

    def covering(self, name: str) -> list[dns.rrset.RRset]:
        return self.record(self.cover_index(name))

    def name_apart_from_wildcard(self) -> str:
        """A non-existent name whose hash lies in another NSEC3 span than the wildcard's and the apex's, so
        that leaving out any one record really leaves a gap in the proof."""
        for i in range(1000):
            n = f"nx{i}"
            apex = self.hashes.index(self.s.nsec3_hash("@", self.it))
            if self.cover_index(n) not in (self.cover_index("*"), apex):
                return n
        raise AssertionError("no such name")


@pytest.mark.parametrize(("parts", "expected"), [
    (("ce", "nc", "wc"), Security.SECURE),     # RFC 5155 §8.4: closest encloser + next closer + wildcard
    (("ce", "nc"), Security.BOGUS),            # wildcard not denied
    (("ce", "wc"), Security.BOGUS),            # next closer not covered
    (("nc", "wc"), Security.BOGUS),            # no closest encloser
])
def test_nsec3_nxdomain(up: FakeUpstream, parts: tuple[str, ...], expected: Security) -> None:
    z = N3Zone()
    up.signers.append(z.s)
    nx = z.name_apart_from_wildcard()
    recs = {"ce": z.matching("@"), "nc": z.covering(nx), "wc": z.covering("*")}
    up.add(f"{nx}.hand3.test.", "A", Reply(NX, authority=z.s.soa() + [r for p in parts for r in recs[p]]))
    assert ask(resolver(z.s), f"{nx}.hand3.test", "A")[0] is expected


def test_nsec3_nodata_and_wildcard_nodata(up: FakeUpstream) -> None:
    z = N3Zone()
    up.signers.append(z.s)
    up.add("a.hand3.test.", "TXT", Reply(authority=z.s.soa() + z.matching("a")))        # §8.5
    up.add("a.hand3.test.", "A", Reply(authority=z.s.soa() + z.matching("a")))          # lists A: bogus
    up.add("x.wild.hand3.test.", "TXT", Reply(                                          # §8.7
        authority=z.s.soa() + z.matching("wild") + z.covering("x.wild") + z.matching("*.wild")))
    r = resolver(z.s)
    assert ask(r, "a.hand3.test", "TXT")[0] is Security.SECURE
    assert ask(r, "a.hand3.test", "A")[0] is Security.BOGUS
    assert ask(r, "x.wild.hand3.test", "TXT")[0] is Security.SECURE


def test_nsec3_wildcard_answer(up: FakeUpstream) -> None:
    """RFC 5155 §8.8: a wildcard answer needs the NSEC3 covering the next closer name."""
    z = N3Zone()
    up.signers.append(z.s)
    data = z.s.rr("x.wild", "A", "192.0.2.7")
    up.add("x.wild.hand3.test.", "A", Reply(answer=z.s.signed(data, wildcard_labels=3),
                                            authority=z.covering("x.wild")))
    up.add("y.wild.hand3.test.", "A", Reply(answer=z.s.signed(z.s.rr("y.wild", "A", "192.0.2.7"),
                                                              wildcard_labels=3)))
    r = resolver(z.s)
    assert ask(r, "x.wild.hand3.test", "A")[0] is Security.SECURE
    assert ask(r, "y.wild.hand3.test", "A")[0] is Security.BOGUS


def test_nsec3_opt_out_makes_delegation_insecure_never_secure_denial(up: FakeUpstream) -> None:
    """RFC 5155 §6, §8.6: an opt-out span proves at most an insecure delegation."""
    z = N3Zone(optout=True)
    s = z.s
    up.signers.append(s)
    proof = z.matching("@") + z.covering("deleg")
    # the unsigned child's data, and the DS question Postgate asks to place it
    up.add("www.deleg.hand3.test.", "A", Reply(answer=[s.rr("www.deleg", "A", "192.0.2.8")]))
    child_soa = s.rr("deleg", "SOA", "ns.deleg.hand3.test. h.deleg.hand3.test. 1 3600 600 86400 300")
    up.add("www.deleg.hand3.test.", "DS", Reply(authority=[child_soa]))
    up.add("deleg.hand3.test.", "DS", Reply(authority=s.soa() + proof))
    # an NXDOMAIN whose next closer name lies in an opt-out span is not a secure denial either
    up.add("deleg2.hand3.test.", "A", Reply(NX, authority=s.soa() + z.matching("@") + z.covering("deleg2")
                                            + z.covering("*")))
    r = resolver(s)
    sec, why = ask(r, "www.deleg.hand3.test", "A")
    assert sec is Security.INSECURE, why
    assert "opt-out" in why
    assert ask(r, "deleg2.hand3.test", "A")[0] is Security.INSECURE


def test_nsec3_iterations_beyond_limit_are_insecure(up: FakeUpstream) -> None:
    """RFC 9276 §3.2: too many iterations: insecure (as Unbound and BIND do above 150)."""
    z = N3Zone(iterations=200)
    up.signers.append(z.s)
    up.add("a.hand3.test.", "TXT", Reply(authority=z.s.soa() + z.matching("a")))
    assert ask(resolver(z.s), "a.hand3.test", "TXT")[0] is Security.INSECURE


# --- bad input from the upstream -----------------------------------------------------------------

def _bad(up: FakeUpstream, handler: object, timeout: float = 1.0) -> tuple[Security, str, float]:
    s = Signer("hand.test.")
    up.handler = handler  # type: ignore[assignment]
    t0 = time.monotonic()
    sec, why = ask(resolver(s, timeout=timeout), "a.hand.test", "A")
    return sec, why, time.monotonic() - t0


@pytest.mark.parametrize("kind", ["garbage", "truncated", "wrong-question", "silent", "tc-then-silent",
                                  "servfail", "wrong-id"])
def test_bad_upstream_gives_indeterminate_within_timeout(up: FakeUpstream, kind: str) -> None:
    def handler(q: dns.message.Message) -> bytes | dns.message.Message | None:
        r = dns.message.make_response(q)
        if kind == "garbage":
            return b"\x00\x01garbage that is no DNS message"
        if kind == "truncated":
            r.answer.append(dns.rrset.from_text(q.question[0].name, 300, "IN", "A", "192.0.2.1"))
            return r.to_wire()[:-7]
        if kind == "wrong-question":
            return dns.message.make_response(dns.message.make_query("other.test.", "A", id=q.id))
        if kind == "wrong-id":
            r.id = (q.id + 1) % 65536
            return r
        if kind == "tc-then-silent":
            r.flags |= dns.flags.TC
            return r
        if kind == "servfail":
            r.set_rcode(dns.rcode.SERVFAIL)
            return r
        return None

    sec, why, elapsed = _bad(up, handler)
    assert sec is Security.INDETERMINATE, why
    assert elapsed < 3 * 1.0 + 1.5


def test_oversized_answer_over_tcp(up: FakeUpstream) -> None:
    """A signed RRset too large for UDP: truncated over UDP, fetched whole over TCP, validated."""
    s = Signer("hand.test.")
    up.signers.append(s)
    big = s.rr("big", "A", *[f"10.0.{i // 250}.{i % 250 + 1}" for i in range(2000)])
    up.add("big.hand.test.", "A", Reply(answer=s.signed(big)))
    a = asyncio.run(resolver(s).resolve("big.hand.test", "A"))
    assert a.security is Security.SECURE
    assert a.rrset is not None and len(a.rrset) == 2000


def test_concurrent_identical_questions_share_one_query(up: FakeUpstream) -> None:
    s, _ = nsec_zone()
    up.signers.append(s)
    up.add("a.hand.test.", "A", Reply(answer=s.signed(s.rr("a", "A", "192.0.2.1"))))
    r = resolver(s)

    async def many() -> list[Security]:
        return [a.security for a in await asyncio.gather(*(r.resolve("a.hand.test", "A")
                                                          for _ in range(50)))]

    assert set(asyncio.run(many())) == {Security.SECURE}
    assert up.queries.count(("a.hand.test.", "A")) == 1
    assert up.queries.count(("hand.test.", "DNSKEY")) == 1


def test_tlsa_rdata_altered_after_signing_makes_the_host_unusable_not_tlsa_less(up: FakeUpstream) -> None:
    """TLSA RDATA cut after signing: parsed leniently, but the RRSIG over the wire form fails, so the lookup
    is bogus and the host unusable (RFC 7672 §2.1.1), never 'no TLSA'."""
    from postgate.outbound.nexthop import Failure, resolve_nexthop

    s, chain = nsec_zone()
    up.signers.append(s)
    up.add("hand.test.", "MX", Reply(answer=s.signed(s.rr("@", "MX", "10 a.hand.test."))))
    up.add("a.hand.test.", "A", Reply(answer=s.signed(s.rr("a", "A", "192.0.2.1"))))
    up.add("a.hand.test.", "AAAA", Reply(authority=s.soa() + chain["a"]))
    good = s.rr("_25._tcp.a", "TLSA", "3 1 1 " + "ab" * 32)

    def handler(q: dns.message.Message) -> bytes | dns.message.Message | None:
        qq = q.question[0]
        if qq.rdtype != dns.rdatatype.TLSA:
            up.handler = None
            try:
                return up.respond(q)
            finally:
                up.handler = handler
        r = dns.message.make_response(q)
        r.answer = s.signed(good)
        wire = bytearray(r.to_wire())
        # cut the TLSA rdata to 2 octets: usage and selector, no matching type, no data
        i = wire.find(bytes([0x03, 0x01, 0x01, 0xAB]))
        rdlen_at = i - 2
        wire[rdlen_at:rdlen_at + 2] = (2).to_bytes(2, "big")
        del wire[i + 2:i + 3 + 32]
        return bytes(wire)

    up.handler = handler
    nh = asyncio.run(resolve_nexthop(resolver(s, timeout=1), "hand.test"))
    assert nh.failure is Failure.TEMPORARY
    assert nh.hosts[0].unusable and "TLSA" in nh.hosts[0].unusable


def test_dname_substitution_is_validated_not_its_synthesized_cname(up: FakeUpstream) -> None:
    """RFC 6672 §5.3.3: the synthesized CNAME is unsigned; the signed DNAME and the target carry the proof."""
    s, _ = nsec_zone()
    up.signers.append(s)
    dname = s.signed(s.rr("old", "DNAME", "new.hand.test."))
    synth = s.rr("x.old", "CNAME", "x.new.hand.test.", ttl=0)
    target = s.signed(s.rr("x.new", "A", "192.0.2.9"))
    up.add("x.old.hand.test.", "A", Reply(answer=[*dname, synth, *target]))
    forged = s.rr("x.new", "A", "203.0.113.66")
    up.add("y.old.hand.test.", "A", Reply(answer=[*dname, s.rr("y.old", "CNAME", "y.new.hand.test.", ttl=0), forged]))
    up.add("y.new.hand.test.", "DS", Reply(authority=s.soa() + s.signed(s.rr("sub.e", "NSEC", "*.w.hand.test. A RRSIG NSEC"))))
    r = resolver(s)
    a = asyncio.run(r.resolve("x.old.hand.test", "A"))
    assert a.security is Security.SECURE and [rd.to_text() for rd in a.records()] == ["192.0.2.9"]
    assert asyncio.run(r.resolve("y.old.hand.test", "A")).security is not Security.SECURE


@pytest.mark.parametrize(("ds", "why"), [
    ("12345 13 3 " + "ab" * 32, "GOST digest (3) not implemented"),
    ("12345 12 2 " + "ab" * 32, "ECC-GOST algorithm (12) not implemented"),
    ("12345 253 2 " + "ab" * 32, "private algorithm"),
])
def test_unsupported_ds_makes_the_child_insecure_not_bogus(up: FakeUpstream, ds: str, why: str) -> None:
    """RFC 4035 §5.2, RFC 6840 §5.2: no DS with a supported algorithm and digest: the zone is insecure."""
    parent = Signer("hand.test.")
    child = Signer("child.hand.test.")
    up.signers += [parent, child]
    up.add("child.hand.test.", "DS", Reply(answer=parent.signed(parent.rr("child", "DS", ds))))
    up.add("www.child.hand.test.", "A", Reply(answer=child.signed(child.rr("www", "A", "192.0.2.10"))))
    sec, reason = ask(resolver(parent), "www.child.hand.test", "A")
    assert sec is Security.INSECURE, (why, reason)
    # and with a proper DS the same answer is secure
    up.add("child.hand.test.", "DS", Reply(answer=parent.signed(dns.rrset.from_rdata(
        child.zone, 300, dns.dnssec.make_ds(child.zone, child.dnskey, "SHA256")))))
    assert ask(resolver(parent), "www.child.hand.test", "A")[0] is Security.SECURE


@pytest.mark.parametrize("algorithm", [8, 10, 13, 14, 15, 16])
def test_every_required_algorithm_validates(up: FakeUpstream, algorithm: int) -> None:
    """RSA/SHA-256, RSA/SHA-512, ECDSA P-256/P-384, Ed25519 and Ed448 (RFC 8624 §3.1)."""
    from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa

    s = Signer("alg.test.")
    s.key = {8: lambda: rsa.generate_private_key(65537, 2048), 10: lambda: rsa.generate_private_key(65537, 2048),
             13: lambda: ec.generate_private_key(ec.SECP256R1()), 14: lambda: ec.generate_private_key(ec.SECP384R1()),
             15: ed25519.Ed25519PrivateKey.generate, 16: ed448.Ed448PrivateKey.generate}[algorithm]()  # type: ignore[assignment]
    s.dnskey = dns.dnssec.make_dnskey(s.key.public_key(), algorithm, flags=257)
    s.dnskeys = dns.rrset.from_rdata(s.zone, 3600, s.dnskey)
    up.signers.append(s)
    up.add("www.alg.test.", "A", Reply(answer=s.signed(s.rr("www", "A", "192.0.2.11"))))
    bad = s.signed(s.rr("bad", "A", "192.0.2.12"))
    up.add("bad.alg.test.", "A", Reply(answer=[s.rr("bad", "A", "192.0.2.13"), bad[1]]))
    r = resolver(s)
    assert ask(r, "www.alg.test", "A")[0] is Security.SECURE
    assert ask(r, "bad.alg.test", "A")[0] is Security.BOGUS


def test_equal_mx_preferences_are_shuffled() -> None:
    """RFC 5321 §5.1: by preference, and in random order among equal preferences."""
    import random

    from postgate.outbound.resolver import shuffle_equal

    items = [(20, "c"), (10, "a"), (10, "b"), (30, "d")]
    orders = {tuple(x[1] for x in shuffle_equal(items, key=lambda x: x[0], rng=random.Random(seed)))
              for seed in range(50)}
    assert orders == {("a", "b", "c", "d"), ("b", "a", "c", "d")}


def test_trust_anchor_file_formats(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Unbound's trust-anchor-file and auto-trust-anchor-file syntax: DS or DNSKEY, comments, parentheses."""
    from postgate.outbound.resolver import ResolverConfigError, load_anchors, parse_anchors

    s = Signer("anchor.test.")
    key_b64 = s.dnskey.to_text().split(" ", 3)[3]
    f = tmp_path / "root.key"
    f.write_text("; autotrust trust anchor file\n;;id: . 1\n"
                 f"anchor.test. 172800 IN DNSKEY 257 3 13 (\n    {key_b64[:20]}\n    {key_b64[20:]} ) ;{{id = 1 (ksk)}}\n"
                 ". IN DS 20326 8 2 E06D44B80B8F1D39A95C0B0D7C65D08458E880409BBC683457104237C7F8EC8D ;state=2 [ VALID ]\n")
    anchors = load_anchors(f)
    assert anchors[s.zone] == [s.dnskey]
    assert len(anchors[dns.name.root]) == 1
    with pytest.raises(ResolverConfigError, match=":2: not a DS or DNSKEY"):
        parse_anchors("; comment\n. IN DS nonsense\n", "x")
    with pytest.raises(ResolverConfigError, match="no trust anchor"):
        parse_anchors("; nothing\n", "x")


# --- issue 14: downgrades and needless failures, each from its RFC rule ----------------------------

def test_wildcard_expanded_nsec_is_no_denial(up: FakeUpstream) -> None:
    """RFC 4035 §5.3.4 and §5.4 (CVE-2017-15105): an NSEC whose RRSIG has fewer labels than its owner was
    synthesised from a wildcard; it proves nothing about the name it is presented under."""
    s, chain = nsec_zone()
    up.signers.append(s)
    # the zone's own NSEC at *.w, replayed under the queried names as if expanded from the wildcard
    fake_nodata = s.rr("x.w", "NSEC", "hand.test. A RRSIG NSEC")
    up.add("x.w.hand.test.", "TXT", Reply(authority=s.soa() + s.signed(fake_nodata, wildcard_labels=3)))
    fake_tlsa = s.rr("_25._tcp.mx.w", "NSEC", "hand.test. A RRSIG NSEC")
    up.add("_25._tcp.mx.w.hand.test.", "TLSA", Reply(authority=s.soa() + s.signed(fake_tlsa, wildcard_labels=3)))
    # an NXDOMAIN "proven" by an NSEC expanded from a wildcard *.hand.test (a -> c covers b)
    fake_cover = s.rr("a", "NSEC", "c.hand.test. A RRSIG NSEC")
    up.add("b.hand.test.", "A", Reply(NX, authority=s.soa() + s.signed(fake_cover, wildcard_labels=2)
                                      + chain["apex"]))
    r = resolver(s)
    assert ask(r, "x.w.hand.test", "TXT")[0] is Security.BOGUS
    sec, why = ask(r, "_25._tcp.mx.w.hand.test", "TLSA")
    assert sec is Security.BOGUS, why          # never "no TLSA": that would switch DANE off
    assert ask(r, "b.hand.test", "A")[0] is Security.BOGUS


def test_wildcard_nsec_cannot_deny_a_ds(up: FakeUpstream) -> None:
    """RFC 4035 §5.2, RFC 6840 §4.4: only the parent-side NSEC at the delegation itself (NS, no DS, no SOA,
    not wildcard-expanded) proves an insecure delegation."""
    parent = Signer("hand.test.")
    child = Signer("child.hand.test.")
    up.signers += [parent, child]
    up.add("www.child.hand.test.", "A", Reply(answer=child.signed(child.rr("www", "A", "192.0.2.20"))))
    wild_ns = parent.rr("child", "NSEC", "d.hand.test. NS RRSIG NSEC")   # from "*.hand.test NSEC … NS"
    up.add("child.hand.test.", "DS", Reply(authority=parent.soa() + parent.signed(wild_ns, wildcard_labels=2)))
    sec, why = ask(resolver(parent), "www.child.hand.test", "A")
    assert sec is Security.BOGUS, why
    # the honest proof (the NSEC at the delegation, signed as itself) does make the child insecure
    up.add("child.hand.test.", "DS", Reply(authority=parent.soa() + parent.signed(wild_ns)))
    assert ask(resolver(parent), "www.child.hand.test", "A")[0] is Security.INSECURE


def test_nsec3_iterations_beyond_limit_make_a_wildcard_answer_insecure(up: FakeUpstream) -> None:
    """RFC 9276 §3.2: NSEC3 above the iteration limit is treated as insecure — so a wildcard answer proven
    only by such records (RFC 5155 §8.8) is insecure, not secure."""
    z = N3Zone(iterations=200)
    up.signers.append(z.s)
    data = z.s.rr("x.wild", "A", "192.0.2.7")
    up.add("x.wild.hand3.test.", "A", Reply(answer=z.s.signed(data, wildcard_labels=3),
                                            authority=z.covering("x.wild")))
    sec, why = ask(resolver(z.s), "x.wild.hand3.test", "A")
    assert sec is Security.INSECURE, why


def test_nsec3_opt_out_nxdomain_still_needs_the_wildcard_denial(up: FakeUpstream) -> None:
    """RFC 5155 §8.4: closest encloser, next closer covered (here by an opt-out NSEC3) *and* the wildcard
    at the closest encloser covered; without the last the NXDOMAIN is bogus, not insecure."""
    z = N3Zone(optout=True)
    up.signers.append(z.s)
    nx = z.name_apart_from_wildcard()
    up.add(f"{nx}.hand3.test.", "A", Reply(NX, authority=z.s.soa() + z.matching("@") + z.covering(nx)))
    sec, why = ask(resolver(z.s), f"{nx}.hand3.test", "A")
    assert sec is Security.BOGUS, why
    up.add(f"{nx}.hand3.test.", "TXT", Reply(NX, authority=z.s.soa() + z.matching("@") + z.covering(nx)
                                             + z.covering("*")))
    assert ask(resolver(z.s), f"{nx}.hand3.test", "TXT")[0] is Security.INSECURE


def test_nsec3_opt_out_wildcard_answers_are_insecure(up: FakeUpstream) -> None:
    """RFC 5155 §8.7 with §9.2: a wildcard NODATA whose next closer name lies in an opt-out span is
    insecure (an unsigned delegation could exist there), not bogus; and so is a wildcard answer (§8.8)."""
    z = N3Zone(optout=True)
    up.signers.append(z.s)
    up.add("x.wild.hand3.test.", "TXT", Reply(
        authority=z.s.soa() + z.matching("wild") + z.covering("x.wild") + z.matching("*.wild")))
    data = z.s.rr("x.wild", "A", "192.0.2.7")
    up.add("x.wild.hand3.test.", "A", Reply(answer=z.s.signed(data, wildcard_labels=3),
                                            authority=z.covering("x.wild")))
    r = resolver(z.s)
    sec, why = ask(r, "x.wild.hand3.test", "TXT")
    assert sec is Security.INSECURE, why
    sec, why = ask(r, "x.wild.hand3.test", "A")
    assert sec is Security.INSECURE, why


def _with_algorithm(rd: dns.rdata.Rdata, text: str) -> dns.rdata.Rdata:
    return dns.rdata.from_text("IN", dns.rdatatype.to_text(rd.rdtype), text)


@pytest.mark.parametrize("kind", ["DNSKEY alg 12", "DNSKEY alg 253", "DS digest 3", "DS alg 12"])
def test_trust_anchor_with_only_unsupported_algorithms_is_absent(up: FakeUpstream, kind: str) -> None:
    """RFC 4035 §5.2, RFC 6840 §5.2/§5.4: an anchor the validator cannot use is treated as if absent, so
    its zone is insecure, not bogus."""
    s, _ = nsec_zone()
    up.signers.append(s)
    up.add("a.hand.test.", "A", Reply(answer=s.signed(s.rr("a", "A", "192.0.2.1"))))
    key = s.dnskey.to_text().split(" ", 3)[3]
    ds = dns.dnssec.make_ds(s.zone, s.dnskey, "SHA256")
    anchor = {"DNSKEY alg 12": f"257 3 12 {key}", "DNSKEY alg 253": f"257 3 253 {key}",
              "DS digest 3": f"{ds.key_tag} 13 3 {'ab' * 32}",
              "DS alg 12": f"{ds.key_tag} 12 2 {ds.digest.hex()}"}[kind]
    rd = dns.rdata.from_text("IN", kind.split()[0], anchor)
    r = Resolver([(ADDR, 53)], anchors={s.zone: [rd]}, timeout=2)  # type: ignore[list-item]
    sec, why = ask(r, "a.hand.test", "A")
    assert sec is Security.INSECURE, why
    # beside a usable anchor for the same zone, the unusable one changes nothing
    r = Resolver([(ADDR, 53)], anchors={s.zone: [rd, s.dnskey]}, timeout=2)  # type: ignore[list-item]
    assert ask(r, "a.hand.test", "A")[0] is Security.SECURE


def test_names_outside_every_trust_anchor_are_insecure(up: FakeUpstream) -> None:
    """RFC 4035 §4.3: with only a non-root anchor configured, a name under no anchor is insecure (it cannot
    be validated either way), not indeterminate — mail elsewhere must still flow."""
    s, _ = nsec_zone()
    other = Signer("other.test.")
    up.signers += [s, other]
    up.add("mx.other.test.", "A", Reply(answer=[other.rr("mx", "A", "192.0.2.30")]))
    up.add("signed.other.test.", "A", Reply(answer=other.signed(other.rr("signed", "A", "192.0.2.31"))))
    up.add("nx.other.test.", "A", Reply(NX, authority=[other.rr("@", "SOA", "ns. h. 1 3600 600 86400 300")]))
    r = resolver(s)
    for name in ("mx.other.test", "signed.other.test", "nx.other.test"):
        sec, why = ask(r, name, "A")
        assert sec is Security.INSECURE, (name, why)


def test_cname_into_a_proven_unsigned_delegation_is_insecure(up: FakeUpstream) -> None:
    """RFC 4035 §5.2: the NSEC of the parent at ``unsig`` (NS, no DS) proves the delegation insecure, so a
    negative answer for a name below it, reached through a secure CNAME, is insecure, not bogus."""
    s, _ = nsec_zone()
    up.signers.append(s)
    link = s.signed(s.rr("www", "CNAME", "x.unsig.hand.test."))
    proof = s.signed(s.rr("unsig", "NSEC", "w.hand.test. NS RRSIG NSEC"))
    child_soa = s.rr("unsig", "SOA", "ns.unsig.hand.test. h.unsig.hand.test. 1 3600 600 86400 300")
    up.add("www.hand.test.", "A", Reply(answer=link, authority=[child_soa, *proof]))
    sec, why = ask(resolver(s), "www.hand.test", "A")
    assert sec is Security.INSECURE, why
    # the same NSEC with the DS bit proves a signed child: then the unsigned negative answer is bogus
    signed_deleg = s.signed(s.rr("unsig", "NSEC", "w.hand.test. NS DS RRSIG NSEC"))
    up.add("www2.hand.test.", "A", Reply(answer=s.signed(s.rr("www2", "CNAME", "x.unsig.hand.test.")),
                                         authority=[child_soa, *signed_deleg]))
    assert ask(resolver(s), "www2.hand.test", "A")[0] is Security.BOGUS


def _tlsa_host(up: FakeUpstream, *rdatas: bytes) -> tuple[Signer, Resolver]:
    """hand.test MX a.hand.test with a secure A record and a TLSA RRset of the given raw RDATA, signed
    over exactly those octets (as a zone served with RFC 3597 generic data would be)."""
    s, chain = nsec_zone()
    up.signers.append(s)
    up.add("hand.test.", "MX", Reply(answer=s.signed(s.rr("@", "MX", "10 a.hand.test."))))
    up.add("a.hand.test.", "A", Reply(answer=s.signed(s.rr("a", "A", "192.0.2.1"))))
    up.add("a.hand.test.", "AAAA", Reply(authority=s.soa() + chain["a"]))
    up.add("_mta-caps.a.hand.test.", "TXT", Reply(NX, authority=s.soa() + chain["a"]))
    tlsa = dns.rrset.from_rdata_list(s.n("_25._tcp.a"), 300, [
        dns.rdata.GenericRdata(dns.rdataclass.IN, dns.rdatatype.TLSA, d) for d in rdatas])
    up.add("_25._tcp.a.hand.test.", "TLSA", Reply(answer=s.signed(tlsa)))
    return s, resolver(s, timeout=1)


GOOD = bytes([3, 1, 1]) + b"\xab" * 32
SHORT_DIGEST = bytes([3, 1, 1]) + b"\xab" * 31       # SHA2-256 data must be 32 octets (RFC 6698 §2.1.3)
NO_FIELDS = bytes([3, 1])                            # no matching type, no data (RFC 6698 §2.1)


@pytest.mark.parametrize(("rdatas", "usable"), [
    ((GOOD, SHORT_DIGEST), 1),
    ((SHORT_DIGEST, GOOD, NO_FIELDS), 1),
    ((SHORT_DIGEST,), 0),
    ((SHORT_DIGEST, NO_FIELDS), 0),
])
def test_malformed_tlsa_records_are_judged_one_by_one(up: FakeUpstream, rdatas: tuple[bytes, ...],
                                                      usable: int) -> None:
    """RFC 7671 §9, RFC 6698 §2.1: the RRSIG is verified over the wire form; each record is then judged
    alone: a malformed one is unusable, the others still count; none usable: TLS mandatory but
    unauthenticated (Postfix: "unusable TLSA RR … fallback to unauthenticated TLS")."""
    from postgate.outbound.nexthop import Failure, resolve_nexthop
    from postgate.policy.tls import Auth, Level, Policy, TLSMode, requirement
    from postgate.policy.vocab import Tlsa

    _, r = _tlsa_host(up, *rdatas)
    nh = asyncio.run(resolve_nexthop(r, "hand.test"))
    assert nh.failure is Failure.NONE, nh.reason
    from postgate.outbound.dns_transport import RawTLSA
    h = nh.hosts[0]
    assert h.tlsa_security is Security.SECURE and not h.unusable
    assert len(h.tlsa) == len(rdatas)
    assert len(h.tlsa_problems) == sum(isinstance(t, RawTLSA) for t in h.tlsa) == len(rdatas) - usable
    records = tuple(Tlsa.from_rdata(t) for t in h.tlsa)
    assert sum(t.usable for t in records) == usable
    req = requirement(Policy(Level.DANE), mx_host="a.hand.test", nexthop="hand.test", tlsa=records,
                      tlsa_security=h.tlsa_security, reference_names=("a.hand.test",))
    assert req.tls is TLSMode.REQUIRED and not req.refuse
    assert req.auth is (Auth.DANE if usable else Auth.NONE)
