"""Outbound delivery on the test network: one row per scenario and level, the outcome RFC 7672 requires.

Each row delivers a message with a unique token and checks the outcome per recipient — status,
security, the MX host used, the suspected-attack flag — and that the receiver stored it exactly when
Postgate says it was delivered.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import secrets
import subprocess
import sys
from pathlib import Path

import pytest
from postgate.outbound.delivery import Deliverer, DeliveryConfig, RecipientResult
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.policy.maps import TlsPolicyMap
from postgate.policy.tls import Level, Policy
from postgate.policy.vocab import Outcome

from fixtures.testnet import TestNet

FAST = Timeouts(connect=3, greeting=3, command=3, tls=3, data=5)
A, NA = True, False  # suspected attack or not

# (domain, level, match, status, security, mx that got it, suspected attack, rule)
ROWS = [
    ("dane-ok.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx.dane-ok.test", NA, "7672 §3.1.1 DANE-EE"),
    ("mismatch.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx2.mismatch.test", NA,
     "7672 §2.2: first MX mismatched, second valid"),
    ("dane-ta.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx.dane-ta.test", NA, "7672 §3.1.2 DANE-TA"),
    ("dane-ta-wrongname.test", "dane", "", Outcome.DEFERRED, None, None, A, "7672 §3.2.2 DANE-TA name check"),
    ("dane-ee-expired.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx.dane-ee-expired.test", NA,
     "7672 §3.1.1 DANE-EE ignores dates"),
    ("unusable.test", "dane", "", Outcome.DELIVERED, "tls-unauthenticated", "mx.unusable.test", NA,
     "7672 §2.2 only unusable TLSA: TLS, never cleartext"),
    ("nostarttls.test", "dane", "", Outcome.DEFERRED, None, None, A, "7672 §2.2 STARTTLS missing where TLSA exists"),
    ("agility.test", "dane", "", Outcome.DEFERRED, None, None, A, "7671 §9 SHA-512 record rules, it does not match"),
    ("ta-root.test", "dane", "", Outcome.DEFERRED, None, None, A, "7671 §5.2.2 TA digest, root not sent"),
    ("full.ta-root.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx2.ta-root.test", NA,
     "7671 §5.2.2 TA key in the record itself"),
    ("selfsigned.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx.selfsigned.test", NA, "DANE-EE 3 0 1"),
    ("bogus-tlsa.test", "dane", "", Outcome.DEFERRED, None, None, A, "7672 §2.1.1 bogus TLSA"),
    ("bogus-sig.test", "dane", "", Outcome.DEFERRED, None, None, A, "7672 §2.1.1 bogus address records"),
    ("expired.test", "dane", "", Outcome.DEFERRED, None, None, A, "7672 §2.1.1 bogus MX"),
    ("dead.test", "dane", "", Outcome.DEFERRED, None, None, NA, "7672 §2.1.1 MX lookup fails"),
    ("unsigned.test", "dane", "", Outcome.DELIVERED, "tls-unauthenticated", "mx.unsigned.test", NA,
     "7672 §2.2 insecure: opportunistic TLS"),
    ("nodane.test", "dane", "", Outcome.DELIVERED, "tls-unauthenticated", "mx.nodane.test", NA, "secure, no TLSA"),
    ("mxsecure.unsigned.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx.dane-ok.test", NA,
     "7672 §2.2.1 insecure MX, secure host"),
    ("nomx.test", "dane", "", Outcome.DELIVERED, "dane-verified", "nomx.test", NA, "5321 §5.1 implicit MX"),
    ("nullmx.test", "dane", "", Outcome.BOUNCED, None, None, NA, "7505 §3 null MX"),
    ("optout.n3", "dane", "", Outcome.DELIVERED, "tls-unauthenticated", "mx.optout.n3", NA, "opt-out: insecure"),
    ("cname.test", "dane", "", Outcome.DELIVERED, "tls-unauthenticated", "mx.cname.test", NA,
     "7672 §2.2.2 CNAME through an unsigned zone"),
    ("alias.cname.test", "dane", "", Outcome.DELIVERED, "dane-verified", "dane-alias.cname.test", NA,
     "7672 §2.2.2 secure CNAME to an unsigned zone: TLSA at the original name"),
    ("malformed-tlsa.test", "dane", "", Outcome.DELIVERED, "dane-verified", "mx.malformed-tlsa.test", NA,
     "7671 §9 a malformed TLSA record is skipped, the well-formed one matches"),
    ("only.malformed-tlsa.test", "dane", "", Outcome.DELIVERED, "tls-unauthenticated", "mx2.malformed-tlsa.test",
     NA, "7672 §2.2 only malformed TLSA: TLS mandatory, unauthenticated"),
    # dane-only
    ("dane-ok.test", "dane-only", "", Outcome.DELIVERED, "dane-verified", "mx.dane-ok.test", NA, "dane-only"),
    ("unsigned.test", "dane-only", "", Outcome.DEFERRED, None, None, NA, "dane-only without DANE"),
    ("unusable.test", "dane-only", "", Outcome.DEFERRED, None, None, NA, "dane-only, unusable TLSA"),
    ("only.malformed-tlsa.test", "dane-only", "", Outcome.DEFERRED, None, None, NA, "dane-only, malformed TLSA"),
    # may, none, encrypt
    ("nostarttls.test", "may", "", Outcome.DELIVERED, "cleartext", "mx.nostarttls.test", NA, "may: cleartext"),
    ("mismatch.test", "may", "", Outcome.DELIVERED, "tls-unauthenticated", "mx1.mismatch.test", NA, "may: no auth"),
    ("dane-ok.test", "none", "", Outcome.DELIVERED, "cleartext", "mx.dane-ok.test", NA, "none: no TLS"),
    ("nostarttls.test", "encrypt", "", Outcome.DEFERRED, None, None, NA, "encrypt: TLS mandatory"),
    ("unsigned.test", "encrypt", "", Outcome.DELIVERED, "tls-unauthenticated", "mx.unsigned.test", NA, "encrypt"),
    # verify / secure against the private CA
    ("dane-ok.test", "verify", "", Outcome.DELIVERED, "verified", "mx.dane-ok.test", NA, "verify: hostname"),
    ("dane-ta-wrongname.test", "verify", "", Outcome.DEFERRED, None, None, NA, "verify: wrong name"),
    ("selfsigned.test", "verify", "", Outcome.DEFERRED, None, None, NA, "verify: untrusted issuer"),
    ("dane-ee-expired.test", "verify", "", Outcome.DEFERRED, None, None, NA, "verify: expired"),
    ("dane-ok.test", "secure", "", Outcome.DELIVERED, "verified", "mx.dane-ok.test", NA, "secure: dot-nexthop"),
    ("mismatch.test", "secure", "", Outcome.DELIVERED, "verified", "mx1.mismatch.test", NA, "secure ignores TLSA"),
    ("mxsecure.unsigned.test", "secure", "", Outcome.DEFERRED, None, None, NA, "secure: MX outside nexthop"),
    ("mxsecure.unsigned.test", "secure", "mx.dane-ok.test", Outcome.DELIVERED, "verified", "mx.dane-ok.test", NA,
     "secure: match= name"),
    # fingerprint
    ("selfsigned.test", "fingerprint", "{fp:mx.selfsigned.test}", Outcome.DELIVERED, "verified", "mx.selfsigned.test",
     NA, "fingerprint of the certificate"),
    ("selfsigned.test", "fingerprint", "{spki:mx.selfsigned.test}", Outcome.DELIVERED, "verified",
     "mx.selfsigned.test", NA, "fingerprint of the public key"),
    ("selfsigned.test", "fingerprint", "00" * 32, Outcome.DEFERRED, None, None, NA, "fingerprint mismatch"),
    # misbehaving servers
    ("garbage.bad.test", "dane", "", Outcome.DEFERRED, None, None, A, "garbage after STARTTLS"),
    ("hang.bad.test", "dane", "", Outcome.DEFERRED, None, None, A, "hang after STARTTLS"),
    ("closehs.bad.test", "dane", "", Outcome.DEFERRED, None, None, A, "close mid-handshake"),
    ("closedata.bad.test", "dane", "", Outcome.DEFERRED, None, None, NA, "close mid-DATA"),
    ("greeting.bad.test", "dane", "", Outcome.DEFERRED, None, None, NA, "garbage greeting"),
]


def _match(net: TestNet, spec: str) -> tuple[str, ...]:
    if not spec:
        return ()
    assert net.pki is not None
    if spec.startswith("{fp:"):
        leaf = net.pki.leaves[spec[4:-1]].cert
        return (hashlib.sha256(leaf.public_bytes(_der())).hexdigest(),)
    if spec.startswith("{spki:"):
        leaf = net.pki.leaves[spec[6:-1]].cert
        from cryptography.hazmat.primitives import serialization
        spki = leaf.public_key().public_bytes(serialization.Encoding.DER,
                                              serialization.PublicFormat.SubjectPublicKeyInfo)
        return (":".join(f"{b:02X}" for b in hashlib.sha256(spki).digest()),)
    return (spec,)


def _der():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    return serialization.Encoding.DER


def deliverer(net: TestNet, policy: Policy, **kw: object) -> Deliverer:
    r = Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)
    cfg = DeliveryConfig(helo="client.test", default_policy=policy, timeouts=FAST,
                         ca_file=str(net.state / "pki" / "root.crt"), **kw)  # type: ignore[arg-type]
    return Deliverer(r, cfg)


def message(token: str) -> bytes:
    return (f"From: alice@client.test\r\nTo: bob@example\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\nHello {token}\r\n").encode()


def run(d: Deliverer, rcpts: list[str], data: bytes) -> list[RecipientResult]:
    async def go() -> list[RecipientResult]:
        try:
            return await d.deliver("alice@client.test", rcpts, data)
        finally:
            await d.close()
    return asyncio.run(go())


def stored(net: TestNet, token: str) -> list[str]:
    return [h.host for h in net.scenarios.receivers for m in net.received(h.host) if token in m["data"]]


@pytest.mark.parametrize(("domain", "level", "match", "status", "security", "mx", "attack", "rule"), ROWS,
                         ids=[f"{r[0]}-{r[1]}" + (f"-{r[2][:6]}" if r[2] else "") for r in ROWS])
def test_delivery_table(testnet: TestNet, domain: str, level: str, match: str, status: str,
                        security: str | None, mx: str | None, attack: bool, rule: str) -> None:
    token = secrets.token_hex(8)
    policy = Policy(Level(level), _match(testnet, match))
    [res] = run(deliverer(testnet, policy), [f"bob@{domain}"], message(token))
    assert (res.status, res.security, res.mx, res.suspected_attack) == (status, security, mx, attack), \
        res.reason
    receiver = [h.host for h in testnet.scenarios.receivers if h.address == res.address]
    assert stored(testnet, token) == (receiver if status == Outcome.DELIVERED else [])
    if status == Outcome.DEFERRED:
        assert res.dsn.startswith("4.") and res.reason
    if status == Outcome.DELIVERED and security == "dane-verified":
        assert res.tlsa_matched and res.tls_version in ("TLSv1.2", "TLSv1.3")


def test_long_chain_does_not_crash(testnet: TestNet) -> None:
    """A 200-certificate chain: delivered via DANE-EE, or deferred with a reason; never a crash."""
    token = secrets.token_hex(8)
    [res] = run(deliverer(testnet, Policy()), ["bob@longchain.bad.test"], message(token))
    assert res.status in (Outcome.DELIVERED, Outcome.DEFERRED)
    assert (res.status == Outcome.DELIVERED) == (stored(testnet, token) == ["mx.longchain.bad.test"])
    if res.status == Outcome.DEFERRED:
        assert res.reason


def test_per_recipient_outcomes_and_connection_reuse(testnet: TestNet) -> None:
    d = deliverer(testnet, Policy())
    token = secrets.token_hex(8)
    rcpts = ["ok1@dane-ok.test", "reject-x@dane-ok.test", "tempfail-y@dane-ok.test", "ok2@dane-ok.test",
             "z@unsigned.test"]

    async def go() -> tuple[list[RecipientResult], list[RecipientResult]]:
        try:
            first = await d.deliver("alice@client.test", rcpts, message(token))
            second = await d.deliver("alice@client.test", ["again@dane-ok.test"], message(token + "b"))
            return first, second
        finally:
            await d.close()

    first, second = asyncio.run(go())
    by = {r.recipient: r for r in first}
    assert by["ok1@dane-ok.test"].status == Outcome.DELIVERED and by["ok2@dane-ok.test"].status == Outcome.DELIVERED
    assert by["reject-x@dane-ok.test"].status == Outcome.BOUNCED and by["reject-x@dane-ok.test"].dsn == "5.1.1"
    assert by["tempfail-y@dane-ok.test"].status == Outcome.DEFERRED and by["tempfail-y@dane-ok.test"].dsn == "4.3.0"
    assert by["z@unsigned.test"].status == Outcome.DELIVERED
    msgs = [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]]
    assert len(msgs) == 2  # one transaction with two accepted recipients, then the reused one
    assert sorted(msgs[0]["rcpt_tos"]) == ["ok1@dane-ok.test", "ok2@dane-ok.test"]
    # the second message went over the same TLS connection (same client port)
    assert msgs[0]["peer"] == msgs[1]["peer"]
    assert second[0].status == Outcome.DELIVERED and second[0].security == "dane-verified"


def test_reuse_never_crosses_next_hop_domains(testnet: TestNet) -> None:
    """mxsecure.unsigned.test and dane-ok.test share an MX host; each domain gets its own connection."""
    d = deliverer(testnet, Policy())
    token = secrets.token_hex(8)

    async def go() -> None:
        try:
            await d.deliver("alice@client.test", ["a@dane-ok.test"], message(token))
            await d.deliver("alice@client.test", ["b@mxsecure.unsigned.test"], message(token + "x"))
        finally:
            await d.close()

    asyncio.run(go())
    msgs = [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]]
    assert len(msgs) == 2 and msgs[0]["peer"] != msgs[1]["peer"]


def test_policy_map_file_drives_delivery(testnet: TestNet, tmp_path: Path) -> None:
    pm = tmp_path / "tls_policy"
    pm.write_text("# Postfix smtp_tls_policy_maps syntax\n"
                  "nostarttls.test   may\n"
                  ".unsigned.test    dane-only\n"
                  "unsigned.test     encrypt\n")
    d = deliverer(testnet, Policy(), policy_map=TlsPolicyMap(pm))
    res = {r.recipient: r for r in run(d, ["a@nostarttls.test", "b@mxsecure.unsigned.test",
                                           "c@unsigned.test"], message(secrets.token_hex(8)))}
    assert res["a@nostarttls.test"].status == Outcome.DELIVERED and res["a@nostarttls.test"].security == "cleartext"
    assert res["b@mxsecure.unsigned.test"].security == "dane-verified"       # .unsigned.test: dane-only
    assert res["c@unsigned.test"].security == "tls-unauthenticated"          # exact key: encrypt


def postgate(*args: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "postgate.cli", *args], input=stdin, capture_output=True,
                          timeout=120)


def test_cli_deliver_json_and_exit_codes(testnet: TestNet, tmp_path: Path) -> None:
    # every message Postgate sends is DKIM-signed: deliver needs a key (without one it refuses: test_ops.py)
    (tmp_path / "postgate.toml").write_text(f'[dkim]\nkey_directory = "{testnet.dkim_dir}"\ndefault_domain = "own.test"\n')
    common = ["--resolver", testnet.resolver, "--trust-anchor", str(testnet.anchor_file), "--json",
              "--config", str(tmp_path / "postgate.toml")]
    token = secrets.token_hex(8)
    res = postgate("deliver", "--from", "a@client.test", "--to", "b@dane-ok.test", *common, stdin=message(token))
    assert res.returncode == 0, res.stderr
    [r] = json.loads(res.stdout)
    assert r["status"] == "delivered" and r["security"] == "dane-verified" and r["mx"] == "mx.dane-ok.test"
    assert r["address"] == "127.0.1.1" and r["tlsa_matched"].startswith("3 1 1 ")
    assert b"status=sent" in res.stderr and b"tls=dane-verified" in res.stderr
    res = postgate("deliver", "--from", "a@client.test", "--to", "b@mismatch.test", "--to",
                   "c@nostarttls.test", "--to", "d@nullmx.test", *common, stdin=message(token))
    assert res.returncode == 75
    out = {r["recipient"]: r for r in json.loads(res.stdout)}
    assert out["c@nostarttls.test"]["status"] == "deferred" and out["c@nostarttls.test"]["suspected_attack"]
    assert out["d@nullmx.test"]["status"] == "bounced"
    assert b"suspected_attack=yes" in res.stderr and b"status=deferred" in res.stderr
    res = postgate("deliver", "--from", "a@client.test", "--to", "d@nullmx.test", *common, stdin=message(token))
    assert res.returncode == 69
    res = postgate("deliver", "--from", "a@client.test", "--to", "c@nostarttls.test", "--level", "may",
                   *common, stdin=message(token))
    assert res.returncode == 0 and json.loads(res.stdout)[0]["security"] == "cleartext"


def test_cli_tls_check(testnet: TestNet) -> None:
    common = ["--resolver", testnet.resolver, "--trust-anchor", str(testnet.anchor_file), "--json"]
    res = postgate("tls-check", "mismatch.test", *common)
    assert res.returncode == 75
    reports = json.loads(res.stdout)
    assert [(r["mx"], r["status"], r["suspected_attack"]) for r in reports] == [
        ("mx1.mismatch.test", "failed", True), ("mx2.mismatch.test", "ok", False)]
    assert reports[1]["security"] == "dane-verified" and len(reports[1]["chain"]) == 2
    before = len(testnet.received("mx2.mismatch.test"))
    res = postgate("tls-check", "dane-ok.test", *common)
    assert res.returncode == 0
    assert len(testnet.received("mx2.mismatch.test")) == before  # no mail sent


def test_smart_host_with_auth_over_dane(testnet: TestNet) -> None:
    from postgate.policy.maps import parse_relay
    token = secrets.token_hex(8)
    relay = parse_relay("[smtp.relay.test]:587")
    d = deliverer(testnet, Policy(), relay=relay, relay_auth=("postgate", "secret"))
    [res] = run(d, ["someone@anywhere.example"], message(token))
    assert (res.status, res.security, res.mx) == (Outcome.DELIVERED, "dane-verified", "smtp.relay.test"), res.reason
    assert stored(testnet, token) == ["smtp.relay.test"]
    # wrong password: deferred, not bounced
    d = deliverer(testnet, Policy(), relay=relay, relay_auth=("postgate", "wrong"))
    [res] = run(d, ["someone@anywhere.example"], message(token))
    assert res.status == Outcome.DEFERRED and res.dsn == "4.7.8"
    # a relay level can demand more than the default; here a fingerprint that does not match
    d = deliverer(testnet, Policy(), relay=relay, relay_auth=("postgate", "secret"),
                  relay_policy=Policy(Level.FINGERPRINT, ("00" * 32,)))
    [res] = run(d, ["someone@anywhere.example"], message(token))
    assert res.status == Outcome.DEFERRED


def test_auth_is_never_sent_in_cleartext(testnet: TestNet) -> None:
    from postgate.policy.maps import parse_relay
    d = deliverer(testnet, Policy(), relay=parse_relay("[plain.relay.test]:25"), relay_auth=("postgate", "secret"),
                  relay_policy=Policy(Level.MAY))
    [res] = run(d, ["someone@anywhere.example"], message(secrets.token_hex(8)))
    assert res.status == Outcome.DEFERRED and "without TLS" in res.reason


def test_cli_deliver_signs_and_fixes_line_ends(testnet: TestNet, tmp_path: Path) -> None:
    import shutil

    keys = tmp_path / "keys"
    shutil.copytree(testnet.dkim_dir / "own.test", keys / "own.test")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[server]\nhostname = "mail.own.test"\n[dkim]\nkey_directory = "{keys}"\n'
                   f'[resolver]\nservers = ["{testnet.resolver}"]\ntrust_anchor_file = "{testnet.anchor_file}"\n')
    token = secrets.token_hex(8)
    lf_message = f"From: alice@own.test\nSubject: {token}\nDate: Tue, 24 Nov 2026 10:00:00 +0000\n\nhi\n".encode()
    res = postgate("deliver", "--config", str(cfg), "--from", "alice@own.test", "--to", "b@dane-ok.test",
                   stdin=lf_message)
    assert res.returncode == 0, res.stderr
    [m] = [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]]
    assert m["data"].startswith("DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=own.test;")


def test_cli_tls_check_text_shows_what_delivery_would_do(testnet: TestNet) -> None:
    """Issue 19 item 5: no None; on a TLSA mismatch the presented certificate and the TLSA it would need;
    a non-existent domain and a null MX fail permanently like `resolve` (5.1.2 / 5.1.10, exit 69)."""
    common = ["--resolver", testnet.resolver, "--trust-anchor", str(testnet.anchor_file)]
    res = postgate("tls-check", "mismatch.test", *common)
    out = res.stdout.decode()
    assert res.returncode == 75 and "None" not in out, out
    leaf = testnet.pki.leaves["mx1.mismatch.test"].cert if "mx1.mismatch.test" in testnet.pki.leaves else None
    assert "mx1.mismatch.test[127.0.1." in out and "tlsa-invalid SUSPECTED ATTACK" in out, out
    assert "the server presented:\n  cert 0: O=Postgate test network,CN=mx1.mismatch.test (issuer " in out, out
    needed = [ln for ln in out.splitlines() if "a TLSA record matching it would be: 3 1 1 " in ln]
    assert len(needed) == 1, out
    if leaf is not None:
        from postgate.outbound import dane
        assert needed[0].endswith(dane.tlsa_for(leaf, 3, 1, 1).text())
    assert "mx2.mismatch.test[127.0.1." in out and ": ok dane-verified TLSv1." in out, out
    for domain, code in (("no-such-domain.test", "5.1.2"), ("nullmx.test", "5.1.10")):
        res = postgate("tls-check", domain, *common)
        out = res.stdout.decode()
        assert res.returncode == 69 and f"{domain}: bounced {code}" in out and "None" not in out, out
        resolve = postgate("resolve", domain, *common)
        assert resolve.returncode == 69 and code in resolve.stdout.decode()
    # a host delivery refuses to use (a secure promise of DANE without TLSA) is not reported ok either
    res = postgate("tls-check", "nodane.caps.test", *common)
    assert res.returncode == 75 and "dane-required SUSPECTED ATTACK" in res.stdout.decode(), res.stdout


def test_smtputf8_delivered_where_offered_bounced_5_6_7_where_not(testnet: TestNet, tmp_path: Path) -> None:
    """RFC 6531 §3.4: a UTF-8 envelope goes with MAIL FROM … SMTPUTF8 to a hop that offers it; a hop that
    does not (a real Postfix with smtputf8_enable=no) gets nothing, and the message bounces 5.6.7."""
    from postgate.policy.maps import parse_relay

    from fixtures.postfix import Postfix
    token = secrets.token_hex(8)
    [res] = run(deliverer(testnet, Policy()), ["jörg@dane-ok.test"], message(token))
    assert (res.status, res.security) == (Outcome.DELIVERED, "dane-verified"), res.text
    [m] = [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]]
    assert "jörg@dane-ok.test" in json.dumps(m, ensure_ascii=False)
    for enable, outcome in (("no", Outcome.BOUNCED), ("yes", Outcome.DELIVERED)):
        with Postfix("127.0.1.54", smtputf8_enable=enable,
                     smtpd_tls_security_level="none", relay_domains="utf8.example",
                     transport_maps="", defer_transports="smtp"):
            d = deliverer(testnet, Policy(), relay=parse_relay("[mx.nocaps.caps.test]:25"), relay_policy=Policy(Level.MAY))
            [res] = run(d, ["jörg@utf8.example"], message(token))
        assert res.status is outcome, res.text
        if outcome is Outcome.BOUNCED:
            assert res.dsn == "5.6.7" and "SMTPUTF8" in res.reason


@pytest.mark.parametrize(("attrs", "check"), [
    ("protocols=<=TLSv1.2", lambda r: r.tls_version == "TLSv1.2"),
    ("protocols=!TLSv1.2", lambda r: r.tls_version == "TLSv1.3"),
    ("protocols=TLSv1.2 ciphers=high exclude=AESGCM", lambda r: r.tls_version == "TLSv1.2" and "GCM" not in r.cipher),
    ("protocols=TLSv1.2 ciphers=null", lambda r: r.status is Outcome.DEFERRED),
])
def test_policy_map_tls_attributes_are_enforced(testnet: TestNet, tmp_path: Path, attrs: str,
                                                check: object) -> None:
    """Issue 19 item 3, against a real TLS server: protocols, ciphers and exclude change the handshake."""
    p = tmp_path / "tls_policy"
    p.write_text(f"unsigned.test encrypt {attrs}\n")
    [res] = run(deliverer(testnet, Policy(), policy_map=TlsPolicyMap(p)), ["bob@unsigned.test"],
                message(secrets.token_hex(8)))
    assert callable(check) and check(res), (res.status, res.tls_version, res.cipher, res.text)


def test_tafile_and_connection_reuse(testnet: TestNet, tmp_path: Path) -> None:
    """tafile= anchors verify/secure without the CA store (DANE-TA path); connection_reuse=no closes."""
    root = testnet.state / "pki" / "root.crt"
    p = tmp_path / "tls_policy"
    p.write_text(f"dane-ok.test verify tafile={root} connection_reuse=no\nunsigned.test verify tafile={root}\n"
                 f"nodane.test secure tafile={testnet.state / 'pki' / 'root.crt'}\n")
    r = Resolver([(testnet.resolver, 53)], load_anchors(testnet.anchor_file), timeout=3)
    d = Deliverer(r, DeliveryConfig(helo="client.test", timeouts=FAST, policy_map=TlsPolicyMap(p)))  # no ca_file

    async def go() -> list[RecipientResult]:
        try:
            out = await d.deliver("alice@client.test", ["bob@dane-ok.test"], message(secrets.token_hex(8)))
            assert not d.cache._idle  # connection_reuse=no: not kept
            return out
        finally:
            await d.close()
    [res] = asyncio.run(go())
    assert (res.status, res.security) == (Outcome.DELIVERED, "verified"), res.text
    other = tmp_path / "other.pem"
    other.write_bytes(testnet.pki.leaves["mx.selfsigned.test"].cert.public_bytes(_pem()))
    p.write_text(f"dane-ok.test verify tafile={other}\n")
    [res] = run(deliverer(testnet, Policy(), policy_map=TlsPolicyMap(p)), ["bob@dane-ok.test"],
                message(secrets.token_hex(8)))
    assert res.status is Outcome.DEFERRED and "tafile trust anchor" in res.reason, res.text
    assert res.tls_result == "certificate-not-trusted"


def _pem():  # type: ignore[no-untyped-def]
    from cryptography.hazmat.primitives import serialization
    return serialization.Encoding.PEM
