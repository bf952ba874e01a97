"""TLSA verdicts against an independent implementation: OpenSSL's own DANE code.

For receivers presenting each kind of chain (CA chain, chain with root, self-signed, expired, wrong
name) and TLSA sets covering every DANE usage, selector and matching type — for the leaf, the
intermediate, the root and an unrelated certificate, alone and in digest-agility combinations —
``openssl s_client -dane_tlsa_domain … -dane_tlsa_rrdata …`` and ``outbound.dane.verify`` must agree on
whether the server is authenticated. PKIX usages (0, 1) are out of scope: RFC 7672 §3.1.3 makes them
unusable for SMTP, where OpenSSL would apply them.
"""

from __future__ import annotations

import hashlib
import itertools
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from postgate.outbound import dane
from postgate.policy.vocab import Tlsa

from fixtures.pki import tlsa_rdata
from fixtures.testnet import TestNet

RECEIVERS = ["mx.dane-ok.test", "mx.unusable.test", "mx.selfsigned.test", "mx.dane-ee-expired.test",
             "mx.dane-ta-wrongname.test"]


def openssl_verified(address: str, host: str, records: list[str]) -> bool:
    cmd = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{address}:25", "-servername", host,
           "-dane_tlsa_domain", host, "-dane_ee_no_namechecks", "-verify_return_error"]
    for r in records:
        cmd += ["-dane_tlsa_rrdata", r]
    res = subprocess.run(cmd, input=b"QUIT\r\n", capture_output=True, timeout=30)
    out = res.stdout.decode(errors="replace")
    return res.returncode == 0 and "Verification: OK" in out


def record_sets(net: TestNet, host: str) -> list[list[str]]:
    assert net.pki is not None
    sources = {"leaf": net.pki.leaves[host].cert, "intermediate": net.pki.intermediate.cert,
               "root": net.pki.root.cert, "other": net.pki.other.cert}
    sets = [[tlsa_rdata(c, u, s, m)] for (u, s, m), c in itertools.product(
        itertools.product((2, 3), (0, 1), (0, 1, 2)), sources.values())]
    leaf, other, inter = sources["leaf"], sources["other"], sources["intermediate"]
    sets += [
        [tlsa_rdata(leaf, 3, 1, 1), tlsa_rdata(other, 3, 1, 2)],    # RFC 7671 §9: SHA-512 rules
        [tlsa_rdata(leaf, 3, 1, 2), tlsa_rdata(other, 3, 1, 1)],
        [tlsa_rdata(leaf, 3, 1, 1), tlsa_rdata(other, 3, 1, 0)],
        [tlsa_rdata(leaf, 3, 1, 0), tlsa_rdata(other, 3, 1, 1)],
        [tlsa_rdata(leaf, 3, 0, 1), tlsa_rdata(other, 3, 1, 2)],    # other selector: both groups count
        [tlsa_rdata(inter, 2, 0, 1), tlsa_rdata(other, 2, 0, 2)],
        [tlsa_rdata(other, 3, 1, 1), tlsa_rdata(inter, 2, 1, 1)],
    ]
    return sets


def ours_verified(net: TestNet, host: str, records: list[str]) -> bool:
    assert net.pki is not None
    tlsa = [Tlsa(int(u), int(s), int(m), bytes.fromhex(d)) for u, s, m, d in (r.split() for r in records)]
    chain = list(net.pki.leaves[host].presented)
    return dane.verify(tlsa, chain, [host]).status is dane.DaneStatus.VERIFIED


def test_tlsa_verdicts_agree_with_openssl(testnet: TestNet) -> None:
    cases = []
    for host in RECEIVERS:
        address = next(r.address for r in testnet.scenarios.receivers if r.host == host)
        for records in record_sets(testnet, host):
            cases.append((host, address, records))

    def check(case: tuple[str, str, list[str]]) -> tuple[str, list[str], bool, bool]:
        host, address, records = case
        return host, records, openssl_verified(address, host, records), ours_verified(testnet, host, records)

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(check, cases))
    disagreements = [f"{h} {[r[:40] for r in recs]}: openssl={o} postgate={p}"
                     for h, recs, o, p in results if o != p]
    assert len(results) > 250
    assert disagreements == [], "\n".join(disagreements)
    # the comparison is only meaningful with both verdicts present
    assert {o for _, _, o, _ in results} == {True, False}


# --- certificates the cryptography library cannot load (issue 13 item 1) ---------------------------

def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _sm2_chain(tmp: Path) -> tuple[x509.Certificate, x509.Certificate, x509.Certificate]:
    """An SM2 CA (SM3withSM2 signature, a key ``cryptography`` cannot load), an ECDSA leaf it issued,
    and an SM2 self-signed leaf: what a hostile or exotic next hop may present."""
    _openssl("genpkey", "-algorithm", "SM2", "-out", "ca.key", cwd=tmp)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-sm3", "-subj", "/CN=sm2 ca", "-days", "30",
             "-addext", "basicConstraints=critical,CA:true", "-out", "ca.pem", cwd=tmp)
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", "leaf.key", cwd=tmp)
    _openssl("req", "-new", "-key", "leaf.key", "-subj", "/CN=mx.sm2.test", "-out", "leaf.csr", cwd=tmp)
    (tmp / "ext").write_text("subjectAltName=DNS:mx.sm2.test\n")
    _openssl("x509", "-req", "-in", "leaf.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-sm3", "-days", "30",
             "-set_serial", "2", "-extfile", "ext", "-out", "leaf.pem", cwd=tmp)
    _openssl("req", "-x509", "-new", "-key", "ca.key", "-sm3", "-subj", "/CN=mx.sm2.test", "-days", "30",
             "-addext", "subjectAltName=DNS:mx.sm2.test", "-out", "self.pem", cwd=tmp)
    load = lambda n: x509.load_pem_x509_certificate((tmp / n).read_bytes())  # noqa: E731
    return load("ca.pem"), load("leaf.pem"), load("self.pem")


def _digest(cert: x509.Certificate, selector: int) -> bytes:
    der = cert.public_bytes(serialization.Encoding.DER) if selector == 0 else \
        cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).digest()


def test_unloadable_certificates_never_match_and_never_raise(tmp_path: Path) -> None:
    """RFC 7672 §3 with issue 13: an SM2 certificate in a DANE-TA chain is a non-matching certificate;
    ``verify`` returns a verdict, and the records it can judge still count."""
    ca, leaf, selfsigned = _sm2_chain(tmp_path)
    chain = [leaf, ca]
    names = ["mx.sm2.test"]
    ta_cert = Tlsa(2, 0, 1, hashlib.sha256(ca.public_bytes(serialization.Encoding.DER)).digest())
    ta_spki = Tlsa(2, 1, 1, b"\x00" * 32)
    ee_other = Tlsa(3, 1, 1, b"\x11" * 32)
    for records in ([ta_cert], [ta_spki], [ta_cert, ta_spki], [Tlsa(2, 0, 0, ca.public_bytes(serialization.Encoding.DER))]):
        res = dane.verify(records, chain, names)
        assert res.status is dane.DaneStatus.MISMATCH, res.reason
    # a DANE-EE record for the (loadable) leaf key still authenticates the same chain
    res = dane.verify([ta_cert, Tlsa(3, 1, 1, _digest(leaf, 1))], chain, names)
    assert res.status is dane.DaneStatus.VERIFIED
    # an SM2 leaf: its key matches no SPKI record, its certificate digest still can (DANE-EE, selector 0)
    assert dane.verify([ee_other], [selfsigned], names).status is dane.DaneStatus.MISMATCH
    assert dane.verify([Tlsa(3, 0, 1, _digest(selfsigned, 0))], [selfsigned], names).status \
        is dane.DaneStatus.VERIFIED
    assert dane.fingerprint_matches([selfsigned], [_digest(selfsigned, 0).hex()]) is not None
