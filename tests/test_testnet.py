"""The test network itself: real NSD + Unbound over a private signed root, real TLS receivers."""

from __future__ import annotations

import smtplib
import ssl
import subprocess
import sys
import time

import dns.flags
import dns.rcode
import pytest
from cryptography import x509

from fixtures import netns
from fixtures.receivers import RAW_BEHAVIOURS
from fixtures.testnet import TestNet

# (owner, type, what a validating resolver must say). secure = AD set; bogus = SERVFAIL; insecure = no AD.
VERDICTS = [
    ("mx.dane-ok.test", "A", "secure"),
    ("_25._tcp.mx.dane-ok.test", "TLSA", "secure"),
    ("dane-ok.test", "MX", "secure"),
    ("nonexistent.dane-ok.test", "A", "secure"),        # NXDOMAIN proven by NSEC
    ("www.dane-ok.test", "AAAA", "secure"),             # NODATA proven by NSEC
    ("x.wild.dane-ok.test", "A", "secure"),             # wildcard expansion, NSEC
    ("www.nsec3.test", "A", "secure"),                  # ECDSA P-384, NSEC3
    ("nope.nsec3.test", "A", "secure"),                 # NXDOMAIN proven by NSEC3
    ("x.wild.nsec3.test", "A", "secure"),               # wildcard expansion, NSEC3
    ("b.c.nsec3.test", "A", "secure"),                  # empty non-terminal, NSEC3 NODATA
    ("www.signed.n3", "A", "secure"),                   # Ed25519 zone under an NSEC3 opt-out TLD
    ("www.rsa.test", "A", "secure"),                    # RSASHA512
    ("nullmx.test", "MX", "secure"),
    ("nomx.test", "MX", "secure"),                      # NODATA: no MX, only A
    ("secure.cname.test", "A", "secure"),               # CNAME within the signed tree
    ("_25._tcp.u3s1m1.tlsa.test", "TLSA", "secure"),
    ("mx.unsigned.test", "A", "insecure"),              # delegation without DS
    ("mx.optout.n3", "A", "insecure"),                  # NSEC3 opt-out span
    ("www.optout2.n3", "A", "insecure"),                # second unsigned delegation in the span
    ("mx.cname.test", "A", "insecure"),                 # CNAME chain signed -> unsigned -> signed
    ("mx.bogus-sig.test", "A", "bogus"),                # corrupted RRSIG on this RRset
    ("good.bogus-sig.test", "A", "secure"),             # ... and only on that one
    ("_25._tcp.mx.bogus-tlsa.test", "TLSA", "bogus"),
    ("mx.expired.test", "A", "bogus"),                  # RRSIG expired
    ("mx.future.test", "A", "bogus"),                   # RRSIG not yet valid
    ("mx.ds-mismatch.test", "A", "bogus"),              # DS matches no DNSKEY
    ("mx.dead.test", "A", "bogus"),                     # authoritative server does not answer
]


def verdict_of(net: TestNet, name: str, rdtype: str) -> str:
    r = net.query(name, rdtype)
    if r.rcode() == dns.rcode.SERVFAIL:
        return "bogus"
    return "secure" if r.flags & dns.flags.AD else "insecure"


def test_runs_in_private_namespace() -> None:
    assert netns.inside()


@pytest.mark.parametrize(("name", "rdtype", "expected"), VERDICTS)
def test_unbound_verdicts(testnet: TestNet, name: str, rdtype: str, expected: str) -> None:
    assert verdict_of(testnet, name, rdtype) == expected


def test_tlsa_matrix_is_complete_and_secure(testnet: TestNet) -> None:
    seen = set()
    for u in range(4):
        for s in range(2):
            for m in range(3):
                r = testnet.query(f"_25._tcp.u{u}s{s}m{m}.tlsa.test", "TLSA")
                assert r.flags & dns.flags.AD
                rrs = [rr for rr in r.answer if rr.rdtype == dns.rdatatype.TLSA]
                assert len(rrs) == 1
                rd = next(iter(rrs[0]))
                seen.add((rd.usage, rd.selector, rd.mtype))
    assert len(seen) == 24


def _presented_chain(address: str, port: int = 25) -> list[x509.Certificate]:
    """The chain a receiver sends after STARTTLS, as OpenSSL's s_client sees it."""
    out = subprocess.run(
        ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{address}:{port}", "-showcerts",
         "-servername", "ignored.invalid"],
        input=b"", capture_output=True, timeout=20).stdout
    pems = []
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    while begin in out:
        a = out.index(begin)
        b = out.index(end, a) + len(end)
        pems.append(x509.load_pem_x509_certificate(out[a:b]))
        out = out[b:]
    return pems


def test_each_receiver_presents_its_chain(testnet: TestNet) -> None:
    assert testnet.pki is not None
    for r in testnet.scenarios.receivers:
        if r.behaviour in RAW_BEHAVIOURS:
            continue  # misbehaving on purpose; see test_misbehaving_receivers
        chain = _presented_chain(r.address, r.port)
        if r.profile == "no-starttls":
            assert chain == [], r.host
            continue
        assert chain == list(testnet.pki.leaves[r.host].presented), r.host
        leaf = chain[0]
        if r.profile == "self-signed":
            assert leaf.issuer == leaf.subject
        else:
            assert leaf.issuer == testnet.pki.intermediate.cert.subject
        if r.profile == "chain-full":
            assert chain[-1] == testnet.pki.root.cert
        names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns_names = names.get_values_for_type(x509.DNSName)
        assert (r.host in dns_names) == (r.profile != "wrong-name"), r.host
        if r.profile == "expired":
            assert leaf.not_valid_after_utc.timestamp() < time.time()


def test_misbehaving_receivers(testnet: TestNet) -> None:
    s = smtplib.SMTP("127.0.1.30", 25, timeout=10)
    s.ehlo("client.test")
    assert s.has_extn("starttls")
    code, _ = s.docmd("STARTTLS")
    assert code == 220
    assert s.file is not None and b"not a TLS server hello" in s.file.readline()
    s.close()
    import socket
    with socket.create_connection(("127.0.1.35", 25), timeout=5) as sock:
        assert sock.recv(100).startswith(b"\x00\xffNOT SMTP")
    assert len(_presented_chain("127.0.1.34")) == 200


def test_no_starttls_receiver_does_not_advertise_it(testnet: TestNet) -> None:
    with smtplib.SMTP("127.0.1.17", 25, timeout=10) as s:
        s.ehlo("client.test")
        assert not s.has_extn("starttls")
    with smtplib.SMTP("127.0.1.1", 25, timeout=10) as s:
        s.ehlo("client.test")
        assert s.has_extn("starttls")


def test_receiver_records_message_with_tls_details(testnet: TestNet) -> None:
    assert testnet.pki is not None
    ctx = ssl.create_default_context(cafile=str(testnet.state / "pki" / "root.crt"))
    ctx.check_hostname = False  # smtplib sends the IP address as SNI; the chain is still verified
    before = len(testnet.received("mx.dane-ok.test"))
    with smtplib.SMTP("127.0.1.1", 25, timeout=10) as s:
        s.starttls(context=ctx)
        s.sendmail("a@client.test", ["bob@dane-ok.test"], b"Subject: hi\r\n\r\nhello\r\n")
    msgs = testnet.received("mx.dane-ok.test")
    assert len(msgs) == before + 1
    m = msgs[-1]
    assert m["rcpt_tos"] == ["bob@dane-ok.test"]
    assert "hello" in m["data"]
    assert m["tls"]["version"] in ("TLSv1.2", "TLSv1.3")
    assert m["tls"]["cipher"]
    leaf = testnet.pki.leaves["mx.dane-ok.test"].cert
    assert m["tls"]["certificate_sha256"] == leaf.fingerprint(leaf.signature_hash_algorithm).hex()


def test_receiver_refuses_reject_recipients(testnet: TestNet) -> None:
    with smtplib.SMTP("127.0.1.1", 25, timeout=10) as s:
        s.ehlo("client.test")
        s.mail("a@client.test")
        code, _ = s.rcpt("reject-me@dane-ok.test")
        assert code == 550
        code, _ = s.rcpt("tempfail@dane-ok.test")
        assert code == 451


def test_namespace_teardown_kills_every_process(tmp_path) -> None:
    """A command run by fixtures.netns leaves nothing behind, even a daemon it forked and forgot."""
    pidfile = tmp_path / "pid"
    res = subprocess.run(
        [sys.executable, "-m", "fixtures.netns", "sh", "-c",
         f"sleep 300 & echo $$ > {pidfile}; ls /sys/class/net >/dev/null; exit 7"],
        capture_output=True, timeout=30)
    assert res.returncode == 7
    # The inner namespace had its own PID space; the orphaned sleep must be gone from ours.
    out = subprocess.run(["pgrep", "-f", "^sleep 300$"], capture_output=True)
    assert out.stdout.strip() == b""
