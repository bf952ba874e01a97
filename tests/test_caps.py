"""The MTA-capability record: parser properties, and men in the middle that break its promises."""

from __future__ import annotations

import logging
import secrets
import ssl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postgate.policy import caps
from postgate.policy.tls import Level, Policy
from postgate.policy.vocab import Outcome

from fixtures.testnet import TestNet
from tests.mitm import Mitm
from tests.test_delivery import deliverer, message, run, stored

BACKEND = ("127.0.1.50", 25)


@pytest.mark.parametrize(("text", "ok"), [
    ("v=MTACAPS1; starttls; dane; tls-min=1.3; requiretls; smtputf8; size=52428800", True),
    ("v=MTACAPS1;starttls;", True),
    ("V=mtacaps1; STARTTLS", True),
    ("v=MTACAPS1; starttls; future-thing=42", True),     # unknown tags are ignored
    ("v=MTACAPS2; starttls", False),                     # unknown version
    ("starttls; v=MTACAPS1", False),
    ("v=MTACAPS1; starttls=yes", False),
    ("v=MTACAPS1; tls-min=1.1", False),
    ("v=MTACAPS1; size=big", False),
    ("v=MTACAPS1; starttls; starttls", False),
    ("v=MTACAPS1; ; starttls", False),
    ("v=MTACAPS1; st@rttls", False),
    ("v=MTACAPS1; smtputf8\x00", False),
])
def test_parser(text: str, ok: bool) -> None:
    if ok:
        assert isinstance(caps.parse(text), caps.Caps)
    else:
        with pytest.raises(caps.CapsError):
            caps.parse(text)


@settings(max_examples=2000, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_raises_anything_but_its_own_error(text: str) -> None:
    try:
        caps.parse(text)
    except caps.CapsError:
        pass
    caps.select([text, text[::-1]])


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from(["starttls", "dane", "tls-min=1.2", "tls-min=1.3", "requiretls", "smtputf8",
                                 "8bitmime", "pipelining", "chunking", "size=1000", "x-new", "y=1"]),
                unique_by=lambda s: s.split("=")[0]),
       st.sampled_from(["; ", ";", " ; "]))
def test_parser_round_trip(items: list[str], sep: str) -> None:
    c = caps.parse(sep.join(["v=MTACAPS1", *items]))
    again = caps.parse(c.text())
    assert again == caps.Caps(**{**c.__dict__, "unknown": ()})


def test_select_rules() -> None:
    assert caps.select(["v=spf1 -all"]).caps is None
    assert caps.select(["v=MTACAPS1; starttls", "v=spf1 -all"]).caps == caps.Caps(starttls=True)
    assert caps.select(["v=MTACAPS1; starttls", "v=MTACAPS1; dane"]).caps is None
    assert "unknown versions" in caps.select(["v=MTACAPS9; x"]).problem
    assert "invalid" in caps.select(["v=MTACAPS1; tls-min=9"]).problem


def test_honest_server_keeps_every_promise(testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    [r] = run(deliverer(testnet, Policy()), ["bob@honest.caps.test"], message(token))
    assert (r.status, r.security) == (Outcome.DELIVERED, "dane-verified"), r.reason
    assert stored(testnet, token) == ["mx.honest.caps.test"]


def test_stripped_starttls_is_deferred_naming_the_capability(testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    with Mitm("127.0.1.51", BACKEND, "strip", strip=("STARTTLS",)) as m:
        [r] = run(deliverer(testnet, Policy()), ["bob@strip.caps.test"], message(token))
        assert m.connections == 1
    assert r.status == Outcome.DEFERRED and r.suspected_attack and "starttls" in r.reason, r.reason
    assert stored(testnet, token) == []


@pytest.mark.parametrize("keyword", ["SMTPUTF8", "REQUIRETLS"])
def test_stripped_ehlo_keyword_is_deferred(testnet: TestNet, keyword: str) -> None:
    token = secrets.token_hex(8)
    with Mitm("127.0.1.52", BACKEND, "terminate", strip=(keyword,)):
        [r] = run(deliverer(testnet, Policy()), ["bob@ext.caps.test"], message(token))
    assert r.status == Outcome.DEFERRED and r.suspected_attack and keyword.lower() in r.reason, r.reason
    assert stored(testnet, token) == []


def test_honest_terminating_relay_delivers(testnet: TestNet) -> None:
    """Control for the rows above: the same relay, stripping nothing, keeps every promise."""
    token = secrets.token_hex(8)
    with Mitm("127.0.1.52", BACKEND, "terminate"):
        [r] = run(deliverer(testnet, Policy()), ["bob@ext.caps.test"], message(token))
    assert r.status == Outcome.DELIVERED, r.reason
    assert stored(testnet, token) == ["mx.honest.caps.test"]


def test_forced_tls12_where_13_promised(testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    with Mitm("127.0.1.53", BACKEND, "terminate", tls_max=ssl.TLSVersion.TLSv1_2):
        [r] = run(deliverer(testnet, Policy()), ["bob@tls13.caps.test"], message(token))
    assert r.status == Outcome.DEFERRED and r.suspected_attack and "tls-min" in r.reason, r.reason


def test_dane_promised_without_tlsa(testnet: TestNet) -> None:
    token = secrets.token_hex(8)
    [r] = run(deliverer(testnet, Policy()), ["bob@nodane.caps.test"], message(token))
    assert r.status == Outcome.DEFERRED and r.suspected_attack and "dane" in r.reason
    assert stored(testnet, token) == []


def test_caps_required_makes_no_connection_without_a_record(testnet: TestNet) -> None:
    with Mitm("127.0.1.54", BACKEND, "plain") as m:
        [r] = run(deliverer(testnet, Policy(Level.CAPS_REQUIRED)), ["bob@nocaps.caps.test"],
                  message(secrets.token_hex(8)))
        assert r.status == Outcome.DEFERRED and "caps-required" in r.reason
        assert m.connections == 0
        [r] = run(deliverer(testnet, Policy()), ["bob@nocaps.caps.test"], message(secrets.token_hex(8)))
        assert r.status == Outcome.DELIVERED and m.connections == 1  # control: the host is reachable
    [r] = run(deliverer(testnet, Policy(Level.CAPS_REQUIRED)), ["bob@honest.caps.test"],
              message(secrets.token_hex(8)))
    assert r.status == Outcome.DELIVERED and r.security == "dane-verified"


def test_insecure_record_is_only_logged(testnet: TestNet, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="postgate.delivery")
    [r] = run(deliverer(testnet, Policy()), ["bob@capsless.test"], message(secrets.token_hex(8)))
    assert r.status == Outcome.DELIVERED  # promises tls-min=1.3 and chunking it does not keep: not enforced
    assert "insecure MTA-capability record" in caplog.text


def test_two_records_are_ignored(testnet: TestNet) -> None:
    [r] = run(deliverer(testnet, Policy()), ["bob@twice.caps.test"], message(secrets.token_hex(8)))
    assert r.status == Outcome.DELIVERED


def test_caps_record_command(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import json
    import subprocess
    import sys
    cert = tmp_path / "c.pem"
    cert.write_text("x")
    cfg = tmp_path / "p.toml"
    cfg.write_text(f'[server]\nhostname = "mx.example.org"\ntls_cert_file = "{cert}"\ntls_key_file = "{cert}"\n'
                   'tls_min_version = "1.3"\npublish_dane = true\nmax_message_size = 10485760\n')
    out = subprocess.run([sys.executable, "-m", "postgate.cli", "caps-record", "--config", str(cfg), "--json"],
                         capture_output=True, text=True, check=True).stdout
    rec = json.loads(out)
    assert rec["owner"] == "_mta-caps.mx.example.org."
    c = caps.parse(rec["value"])
    assert c.starttls and c.dane and c.tls_min == "1.3" and c.requiretls and c.size == 10485760
    # without a certificate nothing that needs TLS is promised
    cfg.write_text('[server]\nhostname = "mx.example.org"\n')
    out = subprocess.run([sys.executable, "-m", "postgate.cli", "caps-record", "--config", str(cfg)],
                         capture_output=True, text=True, check=True).stdout
    c = caps.parse(out.split('"')[1])
    assert not (c.starttls or c.dane or c.requiretls or c.tls_min)
    cfg.write_text('[server]\npublish_dane = true\n')
    res = subprocess.run([sys.executable, "-m", "postgate.cli", "caps-record", "--config", str(cfg)],
                         capture_output=True, text=True)
    assert res.returncode == 78 and ":2: [server] publish_dane" in res.stderr
