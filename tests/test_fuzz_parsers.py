"""Standing fuzz checks (issue 13): hostile input to the DNS response handling, to DANE verification and to
the record parsers never ends in an exception nobody expects, and never in a wrong "secure".

Bounded for the suite (a few hundred examples each); ``scripts/soak-smtp`` style long runs can raise
``HYPOTHESIS_PROFILE=soak``.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
from collections.abc import Iterator

import dns.exception
import dns.message
import dns.rdatatype
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from postgate.outbound import dane
from postgate.outbound.dns_transport import parse_message, tlsa_problem
from postgate.outbound.resolver import Resolver
from postgate.policy import caps, mtasts, tlsrpt
from postgate.policy.vocab import DANE_TA, FULL, Security, Tlsa

from tests.dnsfake import FakeUpstream, Signer

EXAMPLES = 2000 if os.environ.get("HYPOTHESIS_PROFILE") == "soak" else 150
ADDR = "127.0.61.1"

# --- DNS responses ---------------------------------------------------------------------------------------

SIGNER = Signer("fz.test.")
ANSWER = SIGNER.signed(SIGNER.rr("a", "A", "192.0.2.1"))


def honest(q: dns.message.Message) -> bytes:
    r = dns.message.make_response(q)
    qq = q.question[0]
    if qq.rdtype == dns.rdatatype.DNSKEY:
        r.answer = SIGNER.signed(SIGNER.dnskeys)
    else:
        r.answer = list(ANSWER)
    return r.to_wire()


mutations = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), min_size=1, max_size=6)


def mutate(wire: bytes, changes: list[tuple[float, int]], cut: float | None) -> bytes:
    b = bytearray(wire)
    for where, value in changes:
        b[12 + int(where * (len(b) - 12))] = value   # keep the id: the answer must reach the resolver
    if cut is not None:
        b = b[: 12 + int(cut * (len(b) - 12))]
    return bytes(b)


@pytest.fixture(scope="module")
def fuzz_upstream() -> Iterator[FakeUpstream]:
    with FakeUpstream(ADDR) as f:
        yield f


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(changes=mutations, cut=st.one_of(st.none(), st.floats(0, 1)))
def test_mutated_signed_answers_never_crash_and_are_never_wrongly_secure(
        fuzz_upstream: FakeUpstream, changes: list[tuple[float, int]], cut: float | None) -> None:
    def handler(q: dns.message.Message) -> bytes:
        wire = honest(q)
        return wire if q.question[0].rdtype == dns.rdatatype.DNSKEY else mutate(wire, changes, cut)

    fuzz_upstream.handler = handler
    r = Resolver([(ADDR, 53)], anchors={SIGNER.zone: [SIGNER.dnskey]}, timeout=0.5)
    a = asyncio.run(r.resolve("a.fz.test.", "A"))      # never raises: a verdict, whatever came back
    assert isinstance(a.security, Security)
    if a.security is Security.SECURE:                   # only the signed data itself can be secure
        assert a.rrset is not None and {rd.to_text() for rd in a.rrset} == {"192.0.2.1"}


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(st.binary(max_size=600) | st.builds(lambda w, c: mutate(w, c, None),
                                           st.just(dns.message.make_response(
                                               dns.message.make_query("a.fz.test.", "TLSA")).to_wire()), mutations))
def test_parse_message_raises_only_dns_errors(wire: bytes) -> None:
    try:
        parse_message(wire)
    except dns.exception.DNSException:
        pass                      # FormError, ShortHeader, TooBig …: the exchange treats it as no answer


@given(st.binary(max_size=80))
def test_tlsa_problem_judges_any_rdata(data: bytes) -> None:
    assert isinstance(tlsa_problem(data), str)


# --- DANE with hostile chains -------------------------------------------------------------------------------

def _cert(name: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name | None = None,
          signer: ec.EllipticCurvePrivateKey | None = None, days: int = 30, ca: bool = False) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    b = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer or subject)
         .public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - dt.timedelta(days=10)).not_valid_after(now + dt.timedelta(days=days))
         .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    return b.sign(signer or key, hashes.SHA256())


_CA_KEY, _LEAF_KEY, _OTHER_KEY = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
CA = _cert("ca.fz.test", _CA_KEY, ca=True)
LEAF = _cert("mx.fz.test", _LEAF_KEY, issuer=CA.subject, signer=_CA_KEY)
POOL = [CA, LEAF, _cert("mx.fz.test", _OTHER_KEY), _cert("evil.test", _OTHER_KEY, issuer=CA.subject, signer=_OTHER_KEY),
        _cert("mx.fz.test", _LEAF_KEY, days=-2)]
REAL = [dane.tlsa_for(c, u, s, m) for c in (CA, LEAF) for u in (2, 3) for s in (0, 1) for m in (0, 1, 2)]

records = st.lists(st.one_of(st.sampled_from(REAL),
                             st.builds(Tlsa, st.integers(0, 255), st.integers(0, 255), st.integers(0, 255),
                                       st.binary(max_size=70))), max_size=5)
chains = st.lists(st.sampled_from(POOL), max_size=6)


@settings(max_examples=EXAMPLES * 2, deadline=None)
@given(records, chains, st.lists(st.sampled_from(["mx.fz.test", "fz.test", "*.fz.test", "", "evil.test"]),
                                 max_size=3))
def test_dane_verify_never_raises_and_verifies_only_a_match(recs: list[Tlsa], chain: list[x509.Certificate],
                                                             names: list[str]) -> None:
    res = dane.verify(recs, chain, names)
    assert isinstance(res.status, dane.DaneStatus)
    if res.status is dane.DaneStatus.VERIFIED:
        assert res.matched in recs and res.matched is not None and res.matched.usable
        # what matched is a certificate of the chain (RFC 7671 §5: EE the leaf, TA any in the chain), or a
        # trust anchor given whole in the record, which the server need not send (RFC 7671 §5.2.2)
        assert any(dane.tlsa_for(c, res.matched.usage, res.matched.selector, res.matched.mtype) == res.matched
                   for c in chain) or (res.matched.usage == DANE_TA and res.matched.mtype == FULL)


# --- record parsers ------------------------------------------------------------------------------------------

record_text = st.one_of(st.text(max_size=200),
                        st.lists(st.sampled_from(["v=STSv1", "v=TLSRPTv1", "v=MTACAPS1", "id=", "rua=",
                                                  "mailto:a@b", "https://x", ";", " ", "=", "starttls", "dane",
                                                  "tls=1.3", "\x00", "é", "mode: enforce", "mx: *.x", "\n",
                                                  "max_age: 99999999999", "version: STSv1", "\r\n"]),
                                 max_size=20).map("".join))


@settings(max_examples=EXAMPLES * 3, deadline=None)
@given(record_text)
def test_record_parsers_refuse_with_their_own_error(text: str) -> None:
    for parse, error in ((mtasts.parse_record, mtasts.StsError), (mtasts.parse_policy, mtasts.StsError),
                         (tlsrpt.parse_record, tlsrpt.RecordError), (caps.parse, caps.CapsError)):
        try:
            parse(text)
        except error:
            pass
    mtasts.select_record([text, text])
    tlsrpt.select_record([text])
    caps.select([text])
