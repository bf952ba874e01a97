"""DANE TLSA matching for SMTP (RFC 6698, RFC 7671, RFC 7672 §3).

A TLSA record says which certificate or key a TLS server must present. Its three parameters:

- **usage**: 0 PKIX-TA and 1 PKIX-EE constrain a PKIX-validated chain; SMTP does not use them
  (RFC 7672 §3.1.3: unusable). 2 DANE-TA names a trust anchor (a CA certificate or key) from which the
  server's chain must be built; 3 DANE-EE names the server's own certificate or key.
- **selector**: 0 the whole certificate (DER), 1 its SubjectPublicKeyInfo.
- **matching type**: 0 the data itself, 1 its SHA-256, 2 its SHA-512.

For DANE-EE, only the key or certificate matters: names and validity dates are ignored (RFC 7672
§3.1.1). For DANE-TA, the chain from the leaf to the anchor must verify, every certificate must be within
its validity dates, and the leaf must carry one of the reference identifiers (RFC 7672 §3.2.2, wildcards
per RFC 6125 §6.4.3). A TLSA RRset none of whose records is usable means TLS is mandatory but
unauthenticated (RFC 7672 §2.2, §3.1). Digest agility (RFC 7671 §9): for each usage and selector only the
records of the most preferred digest present are used (SHA-512 over SHA-256); Full(0) records are not
digests and always count, as in OpenSSL's DANE implementation. A DANE-TA record never matches the
server's own (leaf) certificate: the trust anchor is an issuer (RFC 7671 §5.2.2).

A certificate the ``cryptography`` library cannot load (an SM2 key, an unknown signature algorithm, a
malformed extension) is a certificate that matches nothing and verifies nothing: the peer chose it, so it
must never turn into an exception that escapes ``verify`` (RFC 7672 §3: an unauthenticated server is not
used for DANE; the message is deferred, not stranded).
"""

from __future__ import annotations

import datetime as dt
import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from postgate.policy.vocab import (
    CERT,
    DANE_EE,
    FULL,
    MTYPE_PREFERENCE,
    SHA256,
    SHA512,
    SPKI,
    Tlsa,
)

MAX_CHAIN = 16  # certificates considered from a presented chain
# what loading a peer's certificate, key or extension can raise: each means "does not match"
CERT_ERRORS = (UnsupportedAlgorithm, ValueError, TypeError, AssertionError)


class DaneStatus(enum.Enum):
    VERIFIED = "verified"             # a usable record matched
    NO_USABLE = "no-usable-records"   # TLS mandatory, unauthenticated
    MISMATCH = "mismatch"             # usable records, none matched: never deliver


@dataclass(frozen=True)
class DaneResult:
    status: DaneStatus
    reason: str
    matched: Tlsa | None = None


def selected(cert: x509.Certificate, selector: int) -> bytes:
    if selector == CERT:
        return cert.public_bytes(serialization.Encoding.DER)
    return cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)


def association(data: bytes, mtype: int) -> bytes:
    if mtype == SHA256:
        return hashlib.sha256(data).digest()
    if mtype == SHA512:
        return hashlib.sha512(data).digest()
    return data


def tlsa_for(cert: x509.Certificate, usage: int, selector: int, mtype: int) -> Tlsa:
    """The TLSA record that matches ``cert`` (for operators: ``postgate check`` prints it)."""
    return Tlsa(usage, selector, mtype, association(selected(cert, selector), mtype))


def agile(records: Sequence[Tlsa]) -> list[Tlsa]:
    """RFC 7671 §9: per (usage, selector), keep the records of the most preferred digest type present;
    Full(0) records are kept whatever digests exist beside them."""
    best: dict[tuple[int, int], int] = {}
    for r in records:
        if r.mtype != FULL:
            k = (r.usage, r.selector)
            best[k] = max(best.get(k, -1), MTYPE_PREFERENCE[r.mtype])
    return [r for r in records if r.mtype == FULL or MTYPE_PREFERENCE[r.mtype] == best[(r.usage, r.selector)]]


def _matches(r: Tlsa, cert: x509.Certificate) -> bool:
    try:
        return association(selected(cert, r.selector), r.mtype) == r.data
    except CERT_ERRORS:  # a key we cannot load matches no record
        return False


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 §6.4.3 as RFC 7672 §3.2.3 allows: a '*' only as the whole left-most label, matching
    exactly one label; comparison case-insensitive, trailing dots ignored."""
    p = pattern.rstrip(".").lower().split(".")
    n = name.rstrip(".").lower().split(".")
    if len(p) != len(n) or not all(p):
        return False
    if p[0] == "*":
        return len(p) > 2 and p[1:] == n[1:]
    return p == n


def cert_names(cert: x509.Certificate) -> list[str]:
    """DNS names of the certificate: SAN dNSNames, or the CN only when there is no SAN DNS name
    (RFC 7672 §3.2.3)."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names = san.get_values_for_type(x509.DNSName)
        if names:
            return list(names)
    except x509.ExtensionNotFound:
        pass
    except CERT_ERRORS:  # extensions that cannot be parsed: no name we can trust
        return []
    try:
        return [str(a.value) for a in cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)]
    except CERT_ERRORS:
        return []


def _public_key(cert: x509.Certificate) -> PublicKeyTypes | None:
    """The certificate's key, or None when ``cryptography`` cannot load it (e.g. SM2)."""
    try:
        return cert.public_key()
    except CERT_ERRORS:
        return None


def _verify_sig(child: x509.Certificate, key: PublicKeyTypes | None) -> bool:
    """Does ``key`` verify the signature on ``child``? False for anything we cannot load or check."""
    if key is None:
        return False
    try:
        sig, tbs = child.signature, child.tbs_certificate_bytes
        h = child.signature_hash_algorithm  # UnsupportedAlgorithm for e.g. SM3withSM2
        if isinstance(key, rsa.RSAPublicKey):
            assert h is not None
            pad: padding.AsymmetricPadding = padding.PKCS1v15()
            params = child.signature_algorithm_parameters
            if isinstance(params, padding.PSS):
                pad = params
            key.verify(sig, tbs, pad, h)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            assert h is not None
            key.verify(sig, tbs, ec.ECDSA(h))
        elif isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
            key.verify(sig, tbs)
        elif isinstance(key, dsa.DSAPublicKey):
            assert h is not None
            key.verify(sig, tbs, h)
        else:
            return False
    except (InvalidSignature, *CERT_ERRORS):
        return False
    return True


def _valid_at(cert: x509.Certificate, now: dt.datetime) -> bool:
    try:
        return cert.not_valid_before_utc <= now <= cert.not_valid_after_utc
    except CERT_ERRORS:
        return False


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return cert.version == x509.Version.v1  # v1 certificates predate the extension
    except CERT_ERRORS:
        return False


def _ta_from_record(r: Tlsa) -> x509.Certificate | PublicKeyTypes | None:
    """A DANE-TA record with matching type Full carries the anchor itself, which the server need not
    send (RFC 7671 §5.2.2, as OpenSSL supports)."""
    if r.mtype != FULL:
        return None
    try:
        if r.selector == CERT:
            return x509.load_der_x509_certificate(r.data)
        return serialization.load_der_public_key(r.data)
    except CERT_ERRORS:
        return None


def verify(records: Sequence[Tlsa], chain: Sequence[x509.Certificate], reference_names: Sequence[str],
           now: dt.datetime | None = None) -> DaneResult:
    """Authenticate a server's presented ``chain`` (leaf first) against a TLSA RRset. Never raises for
    anything in the chain: a certificate that cannot be loaded matches nothing."""
    try:
        return _verify(records, chain, reference_names, now or dt.datetime.now(dt.UTC))
    except CERT_ERRORS as e:  # a last guard: every certificate access below already catches these
        return DaneResult(DaneStatus.MISMATCH, f"certificate chain cannot be processed: {type(e).__name__}: {e}")


def _verify(records: Sequence[Tlsa], chain: Sequence[x509.Certificate], reference_names: Sequence[str],
            now: dt.datetime) -> DaneResult:
    usable = [r for r in records if r.usable]
    if not usable:  # RFC 7672 §2.2: TLS required, no authentication possible
        return DaneResult(DaneStatus.NO_USABLE, "no usable TLSA records: TLS without authentication")
    if not chain:
        return DaneResult(DaneStatus.MISMATCH, "server presented no certificate")
    usable = agile(usable)
    leaf = chain[0]
    pool = list(chain[:MAX_CHAIN])
    reasons = []
    for r in usable:
        if r.usage == DANE_EE:
            if _matches(r, leaf):  # RFC 7672 §3.1.1: no name or date checks
                return DaneResult(DaneStatus.VERIFIED, "DANE-EE matched", r)
            continue
        # DANE-TA: find the anchor in the chain (not the leaf, RFC 7671 §5.2.2) or in the record itself
        anchors: list[x509.Certificate | PublicKeyTypes] = [c for c in pool[1:] if _matches(r, c)]
        inline = _ta_from_record(r)
        if inline is not None and inline != leaf:
            anchors.append(inline)
        for ta in anchors:
            why = _chain_to(leaf, pool[1:], ta, now)
            if why:
                reasons.append(f"TLSA {r.usage} {r.selector} {r.mtype}: {why}")
                continue
            names = cert_names(leaf)
            if not any(name_matches(p, ref) for p in names for ref in reference_names):
                reasons.append(f"certificate names {', '.join(names) or 'none'} match none of "
                               f"{', '.join(reference_names)} (RFC 7672 §3.2.2)")
                continue
            return DaneResult(DaneStatus.VERIFIED, "DANE-TA chain verified", r)
    if not reasons:
        reasons.append("no TLSA record matches the presented certificate chain")
    return DaneResult(DaneStatus.MISMATCH, "; ".join(dict.fromkeys(reasons)))


def _chain_to(leaf: x509.Certificate, intermediates: list[x509.Certificate],
              ta: x509.Certificate | PublicKeyTypes, now: dt.datetime) -> str:
    """Empty string when a path leaf -> intermediates* -> ta verifies with valid dates, else why not."""
    if not _valid_at(leaf, now):
        return "server certificate outside its validity period"
    current = leaf
    used: set[int] = set()
    for _ in range(MAX_CHAIN):
        if isinstance(ta, x509.Certificate):
            if current.issuer == ta.subject and _verify_sig(current, _public_key(ta)):
                if not _valid_at(ta, now):
                    return "trust anchor certificate outside its validity period"
                return ""
        elif _verify_sig(current, ta):
            return ""
        nxt = None
        for i, c in enumerate(intermediates):
            if i in used or c.subject != current.issuer:
                continue
            if _is_ca(c) and _verify_sig(current, _public_key(c)):
                nxt = (i, c)
                break
        if nxt is None:
            return "chain does not lead to the TLSA trust anchor"
        used.add(nxt[0])
        current = nxt[1]
        if not _valid_at(current, now):
            return "intermediate certificate outside its validity period"
    return "chain too long"


def fingerprint_matches(chain: Sequence[x509.Certificate], fingerprints: Sequence[str]) -> str | None:
    """Postfix ``fingerprint`` level: the leaf's certificate or public-key digest (SHA-256 or SHA-512,
    hex with or without colons) equals one configured. Returns the matching fingerprint."""
    if not chain:
        return None
    leaf = chain[0]
    candidates = {}
    for sel in (CERT, SPKI):
        try:
            raw = selected(leaf, sel)
        except CERT_ERRORS:  # a key we cannot load: only the certificate digest can match
            continue
        for algo in (hashlib.sha256, hashlib.sha512):
            candidates[algo(raw).hexdigest()] = True
    for fp in fingerprints:
        if fp.replace(":", "").lower() in candidates:
            return fp
    return None


def leaf_sha256(chain: Sequence[x509.Certificate]) -> str:
    return chain[0].fingerprint(hashes.SHA256()).hex() if chain else ""
