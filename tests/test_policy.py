"""Pure policy decisions: TLS levels, Postfix-syntax maps, RFC 6125 name matching. No network."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
from postgate.outbound.dane import name_matches
from postgate.policy.maps import MapError, SaslPasswordMap, TlsPolicyMap, TransportMap, parse_relay
from postgate.policy.tls import Auth, Level, Policy, TLSMode, requirement
from postgate.policy.vocab import Security, Tlsa

EE = Tlsa(3, 1, 1, b"\x01" * 32)
PKIX_EE = Tlsa(1, 1, 1, b"\x02" * 32)
S, INS = Security.SECURE, Security.INSECURE

# (level, TLSA, TLSA security, expected TLS mode, auth, refused?, RFC / Postfix rule)
LEVEL_ROWS = [
    ("none", (EE,), S, TLSMode.NONE, Auth.NONE, False, "none: never TLS"),
    ("may", (EE,), S, TLSMode.OPTIONAL, Auth.NONE, False, "may ignores TLSA"),
    ("encrypt", (), None, TLSMode.REQUIRED, Auth.NONE, False, "encrypt"),
    ("dane", (EE,), S, TLSMode.REQUIRED, Auth.DANE, False, "RFC 7672 §2.2: usable secure TLSA"),
    ("dane", (PKIX_EE,), S, TLSMode.REQUIRED, Auth.NONE, False, "RFC 7672 §2.2: none usable: TLS, no auth"),
    ("dane", (EE,), INS, TLSMode.OPTIONAL, Auth.NONE, False, "RFC 7672 §2.2: insecure TLSA is ignored"),
    ("dane", (), None, TLSMode.OPTIONAL, Auth.NONE, False, "no TLSA looked up: opportunistic"),
    ("dane", (), S, TLSMode.OPTIONAL, Auth.NONE, False, "secure denial of TLSA: opportunistic"),
    ("dane-only", (EE,), S, TLSMode.REQUIRED, Auth.DANE, False, "dane-only with TLSA"),
    ("dane-only", (), S, TLSMode.REQUIRED, Auth.DANE, True, "dane-only without TLSA: host not used"),
    ("dane-only", (PKIX_EE,), S, TLSMode.REQUIRED, Auth.DANE, True, "dane-only, unusable TLSA"),
    ("verify", (EE,), S, TLSMode.REQUIRED, Auth.PKIX, False, "verify ignores TLSA"),
    ("secure", (), None, TLSMode.REQUIRED, Auth.PKIX, False, "secure"),
]


@pytest.mark.parametrize(("level", "tlsa", "sec", "mode", "auth", "refused", "rule"), LEVEL_ROWS,
                         ids=[r[6] for r in LEVEL_ROWS])
def test_requirement(level: str, tlsa: tuple[Tlsa, ...], sec: Security | None, mode: TLSMode, auth: Auth,
                     refused: bool, rule: str) -> None:
    req = requirement(Policy(Level(level)), mx_host="mx.example.net", nexthop="example.net", tlsa=tlsa,
                      tlsa_security=sec, reference_names=("mx.example.net",))
    assert (req.tls, req.auth, bool(req.refuse)) == (mode, auth, refused)
    if auth is Auth.DANE and not refused:
        assert req.tlsa == tuple(t for t in tlsa if t.usable) and req.names == ("mx.example.net",)


def test_pkix_match_keywords() -> None:
    r = requirement(Policy(Level.SECURE), mx_host="MX.Example.NET.", nexthop="example.net", tlsa=(),
                    tlsa_security=None, reference_names=())
    assert r.names == ("example.net", ".example.net")
    r = requirement(Policy(Level.VERIFY), mx_host="mx.example.net", nexthop="example.net", tlsa=(),
                    tlsa_security=None, reference_names=())
    assert r.names == ("mx.example.net",)
    r = requirement(Policy(Level.SECURE, ("hostname", "nexthop", "other.org")), mx_host="mx.x.net",
                    nexthop="x.net", tlsa=(), tlsa_security=None, reference_names=())
    assert r.names == ("mx.x.net", "x.net", "other.org")


@pytest.mark.parametrize(("pattern", "name", "ok"), [
    ("mx.example.com", "MX.example.com.", True),
    ("*.example.com", "mx.example.com", True),
    ("*.example.com", "a.b.example.com", False),   # RFC 6125 §6.4.3: one label only
    ("*.example.com", "example.com", False),
    ("*.com", "example.com", False),               # no wildcard directly under a TLD
    ("m*.example.com", "mx.example.com", False),   # partial-label wildcards not accepted
    ("mx.example.com", "mx.example.org", False),
])
def test_name_matching(pattern: str, name: str, ok: bool) -> None:
    assert name_matches(pattern, name) is ok


POSTFIX_MAP = """\
# an existing Postfix smtp_tls_policy_maps file
example.com        secure match=example.com:.example.com
.example.com       encrypt
[mx.partner.net]:25  fingerprint
    match=3D:95:34:51:24:66:33:B9:D2:40:99:C0:C1:17:0B:D1:B3:A5:2C:62:F3:B4:D9:1B:2E:0B:9C:6E:3A:7F:5B:1C|
    match=EC:3A:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00:00
[relay.partner.net]:587 dane-only
unsigned.org       may
"""


def test_postfix_policy_map_loads_and_looks_up(tmp_path: Path) -> None:
    p = tmp_path / "tls_policy"
    p.write_text(POSTFIX_MAP)
    m = TlsPolicyMap(p)
    assert m.lookup("example.com") == Policy(Level.SECURE, ("example.com", ".example.com"), source=f"{p}:2")
    assert m.lookup("sub.example.com") is not None and m.lookup("sub.example.com").level is Level.ENCRYPT
    assert m.lookup("a.b.example.com").level is Level.ENCRYPT  # type: ignore[union-attr]
    fp = m.lookup("mx.partner.net", 25, bracketed=True)
    assert fp is not None and fp.level is Level.FINGERPRINT and len(fp.match) == 2
    assert m.lookup("relay.partner.net", 587, bracketed=True).level is Level.DANE_ONLY  # type: ignore[union-attr]
    assert m.lookup("relay.partner.net", 25, bracketed=True) is None
    assert m.lookup("other.net") is None
    assert m.lookup("UNSIGNED.org.").level is Level.MAY  # type: ignore[union-attr]


@pytest.mark.parametrize(("line", "message"), [
    ("example.com paranoid", "unknown security level 'paranoid'"),
    ("example.com dane foo=bar", "unknown attribute 'foo'"),
    ("example.com may match=x", "match= applies only"),
    ("example.com fingerprint", "needs match="),
    ("example.com fingerprint match=zz", "not a SHA-256 or SHA-512"),
    ("[mx.example.com:25 encrypt", "bad key"),
    ("exa mple.com", "unknown security level"),
    ("bad/key encrypt", "bad key"),
    ("example.com", "has no value"),
    ("example.com dane\nexample.com may", "duplicate key"),
    ("  continuation first", "continuation line"),
    # issue 19 item 3: every attribute enforced as Postfix does, or refused here with file:line
    ("example.com encrypt protocols=!TLSv1.2:!TLSv1.3", "leaves no protocol"),
    ("example.com encrypt protocols=>=TLSv1.4", "unknown protocol '>=TLSv1.4'"),
    ("example.com encrypt protocols=TLSv1:TLSv1.1", "RFC 8996"),
    ("example.com encrypt protocols=<=TLSv1.1", "leaves no protocol"),
    ("example.com encrypt ciphers=bogus", "unknown grade 'bogus'"),
    ("example.com encrypt exclude=AES;rm", "not an OpenSSL cipher name"),
    ("example.com encrypt servername=bad..name", "servername"),
    ("example.com encrypt connection_reuse=maybe", "expected yes or no"),
    ("example.com verify tafile=/nonexistent/ta.pem", "tafile /nonexistent/ta.pem: No such file"),
    ("example.com dane tafile=/etc/hostname", "applies only to verify and secure"),
    ("example.com verify tafile=/etc/hostname", "no PEM certificate"),
    ("example.com encrypt enable_rpk=yes", "not supported"),
])
def test_policy_map_errors_name_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    p = tmp_path / "tls_policy"
    p.write_text("# header\n\n" + line + "\n")
    with pytest.raises(MapError) as e:
        TlsPolicyMap(p)
    assert str(e.value).startswith(f"{p}:3") or str(e.value).startswith(f"{p}:4")
    assert message in str(e.value)


@pytest.mark.parametrize(("attrs", "versions"), [
    ("", ("TLSv1.2", "TLSv1.3")),
    ("protocols=!SSLv2,!SSLv3,!TLSv1,!TLSv1.1", ("TLSv1.2", "TLSv1.3")),   # Postfix's default, as written
    ("protocols=!TLSv1.3", ("TLSv1.2",)),
    ("protocols=>=TLSv1.3", ("TLSv1.3",)),
    ("protocols=TLSv1.2", ("TLSv1.2",)),
    ("protocols=>=TLSv1:<=TLSv1.2", ("TLSv1.2",)),                         # RFC 8996: never below 1.2
    ("protocols=tlsv1.3", ("TLSv1.3",)),
])
def test_protocols_attribute(tmp_path: Path, attrs: str, versions: tuple[str, ...]) -> None:
    p = tmp_path / "tls_policy"
    p.write_text(f"example.com encrypt {attrs}\n")
    pol = TlsPolicyMap(p).lookup("example.com")
    assert pol is not None and pol.params.protocols == versions


def test_cipher_and_other_attributes_reach_the_requirement(tmp_path: Path) -> None:
    from postgate.policy.tls import HostFacts, Requirement, decide
    p = tmp_path / "tls_policy"
    p.write_text("example.com encrypt ciphers=HIGH exclude=AESGCM,CHACHA20 servername=nexthop "
                 "connection_reuse=no\n.example.com encrypt servername=sni.example.org\n")
    m = TlsPolicyMap(p)
    pol = m.lookup("example.com")
    assert pol is not None
    req = decide(pol, HostFacts("mx.example.net", tlsa_base="mx.example.net"), nexthop="example.com")
    assert isinstance(req, Requirement)
    assert req.params.cipherlist() == "aNULL:-aNULL:HIGH:@STRENGTH:!AESGCM:!CHACHA20"
    assert (req.sni, req.reuse) == ("example.com", False)
    sub = m.lookup("a.example.com")
    assert sub is not None
    req = decide(sub, HostFacts("mx.example.net"), nexthop="a.example.com")
    assert isinstance(req, Requirement) and req.sni == "sni.example.org" and req.reuse is None


def test_tafile_anchors_become_dane_ta_records(tmp_path: Path) -> None:
    import datetime as dt

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID
    from postgate.policy.tls import HostFacts, Requirement, decide
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "anchor")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now).not_valid_after(now + dt.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    ta = tmp_path / "ta.pem"
    ta.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    p = tmp_path / "tls_policy"
    p.write_text(f"example.com secure tafile={ta}\n")
    pol = TlsPolicyMap(p).lookup("example.com")
    assert pol is not None
    assert [(t.usage, t.selector, t.mtype) for t in pol.tafile] == [(2, 0, 0), (2, 1, 0)]
    req = decide(pol, HostFacts("mx.example.com"), nexthop="example.com")
    assert isinstance(req, Requirement)
    assert (req.auth, req.tlsa, req.pkix_names) == (Auth.DANE, pol.tafile, ("example.com", ".example.com"))


def test_policy_map_reloads_without_restart_and_keeps_old_on_error(tmp_path: Path) -> None:
    p = tmp_path / "tls_policy"
    p.write_text("example.com may\n")
    m = TlsPolicyMap(p)
    assert not m.reload_if_changed()
    p.write_text("example.com dane-only\nother.com encrypt\n")
    os.utime(p, (time.time() + 5, time.time() + 5))
    assert m.reload_if_changed()
    assert m.lookup("example.com").level is Level.DANE_ONLY  # type: ignore[union-attr]
    p.write_text("example.com nonsense\n")
    os.utime(p, (time.time() + 10, time.time() + 10))
    with pytest.raises(MapError, match=":1: unknown security level"):
        m.reload_if_changed()
    assert m.lookup("other.com").level is Level.ENCRYPT  # type: ignore[union-attr]


def test_transport_and_sasl_maps(tmp_path: Path) -> None:
    t = tmp_path / "transport"
    t.write_text("example.com smtp:[relay.example.net]:587\n* smtp:[fallback.example.net]\n")
    tm = TransportMap(t)
    assert tm.lookup("example.com") == parse_relay("[relay.example.net]:587")
    assert tm.lookup("x.org") == parse_relay("[fallback.example.net]:25")
    assert parse_relay("relay.example.net:2525").mx is True
    with pytest.raises(MapError):
        parse_relay("[relay.example.net]:99999")
    s = tmp_path / "sasl_passwd"
    s.write_text("[relay.example.net]:587 user:secret\n")
    s.chmod(0o644)
    with pytest.raises(MapError, match="chmod 600"):
        SaslPasswordMap(s)
    s.chmod(0o600)
    assert SaslPasswordMap(s).lookup(parse_relay("[relay.example.net]:587")) == ("user", "secret")


def test_a_full_tlsa_record_must_be_one_der_structure() -> None:
    """RFC 6698 §2.1.3: matching type Full carries the DER certificate or SubjectPublicKeyInfo; data that is
    not one DER SEQUENCE filling the record is unusable (OpenSSL refuses to load it, Postfix logs "unusable
    TLSA RR"), so a host with only such records gets unauthenticated TLS, as with Postfix - not a deferral
    for a mismatch."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519
    spki = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert Tlsa(3, 1, 0, spki).usable and Tlsa(2, 1, 0, spki).usable
    long_form = b"\x30\x81\x80" + b"\x00" * 128
    assert Tlsa(3, 0, 0, long_form).usable
    for bad in (b"not a certificate", spki[:-1], spki + b"\x00", b"\x30\x81\x05abcde", b"\x30",
                b"\x30\x82\x00\x03abc", b""):
        assert not Tlsa(3, 1, 0, bad).usable, bad
    assert Tlsa(3, 1, 1, b"\xab" * 32).usable     # the digests: length only, as before
