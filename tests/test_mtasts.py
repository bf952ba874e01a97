"""MTA-STS (RFC 8461): the pure rules as tables, then delivery against nginx policy hosts on the test network.

Policy hosts ``mta-sts.<domain>.sts.test`` are nginx virtual hosts with certificates of the test PKI
(fixtures/https.py); Postgate trusts the test root through its configurable CA file.
"""

from __future__ import annotations

import asyncio
import secrets
from pathlib import Path

import pytest
from postgate.outbound.delivery import Deliverer, DeliveryConfig, RecipientResult
from postgate.outbound.mtasts import FetchError, Source, StsResolver, StsSettings, fetch
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.policy import mtasts
from postgate.policy.mtasts import Mode, StsError
from postgate.policy.tls import HostFacts, Level, Policy, Requirement, decide
from postgate.policy.tlsrpt import Attempt, PolicyType, ResultType
from postgate.policy.vocab import Outcome, Security, Tlsa

from fixtures.testnet import TestNet

FAST = Timeouts(connect=3, greeting=3, command=3, tls=3, data=5)

# --- pure: the TXT record (RFC 8461 §3.1) ------------------------------------------------------------
RECORDS = [
    ("v=STSv1; id=20160831085700Z;", "20160831085700Z", "§3.1 example"),
    ("v=STSv1;id=abc", "abc", "§3.1 no spaces needed"),
    ("v=STSv1; id=abc; ext=1", "abc", "§3.1 extension fields ignored"),
    ("v=STSv2; id=abc", None, "§3.1 wrong version"),
    ("id=abc; v=STSv1", None, "§3.1 version must come first"),
    ("v=STSv1; id=", None, "§3.1 empty id"),
    ("v=STSv1; id=" + "a" * 33, None, "§3.1 id at most 32 characters"),
    ("v=STSv1; id=a-b", None, "§3.1 id is letters and digits"),
    ("v=STSv1", None, "§3.1 id required"),
    ("v=STSv1 ; id=abc", "abc", "§3.1 sts-sep allows blanks before the semicolon"),
    ("v=STSv1; id=abc; id=def", "abc", "§3.1 a duplicated field: only the first counts"),
]


@pytest.mark.parametrize(("txt", "rid", "rule"), RECORDS, ids=[r[2] for r in RECORDS])
def test_record(txt: str, rid: str | None, rule: str) -> None:
    rec = mtasts.select_record([txt])
    assert (rec.id if rec else None) == rid


def test_two_records_mean_none() -> None:
    # RFC 8461 §3.1: more than one STSv1 record: no policy
    assert mtasts.select_record(["v=STSv1; id=1", "v=STSv1; id=2"]) is None
    assert mtasts.select_record(["v=spf1 -all", "v=STSv1; id=2"]) == mtasts.Record("2")
    # records that do not begin with "v=STSv1;" are discarded, v=STSv10 among them: one record remains
    assert mtasts.select_record(["v=STSv1; id=a", "v=STSv10; id=b"]) == mtasts.Record("a")


# --- pure: the policy file (RFC 8461 §3.2) -----------------------------------------------------------
GOOD = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 604800\r\n"
POLICIES = [
    (GOOD, (Mode.ENFORCE, 604800, ("mail.example.com", "*.example.net")), "§3.2 example (CRLF)"),
    (GOOD.replace("\r\n", "\n"), (Mode.ENFORCE, 604800, ("mail.example.com", "*.example.net")), "§3.2 LF"),
    ("version: STSv1\nmode: none\nmax_age: 86400\n", (Mode.NONE, 86400, ()), "§3.2 mode none needs no mx"),
    ("version: STSv1\nmode: testing\nmx: a.example\nmax_age: 99999999999\n", None, "§3.2 max_age 10 digits"),
    ("version: STSv1\nmode: testing\nmx: a.example\nmax_age: 9999999999\n",
     (Mode.TESTING, mtasts.MAX_AGE_LIMIT, ("a.example",)), "§3.2 max_age capped at one year"),
    ("version: STSv1\nmode: enforce\nmax_age: 86400\n", None, "§3.2 enforce without mx"),
    ("version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n", None, "§3.2 unknown mode"),
    ("mode: enforce\nmx: a.example\nmax_age: 1\n", None, "§3.2 version required"),
    ("version: STSv1\nmode: enforce\nmx: a.example\n", None, "§3.2 max_age required"),
    ("version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n", None, "§3.2 wildcard only leftmost"),
    ("version: STSv1\nmode: enforce\nmx: a.example\nmax_age: 1\nfoo: bar\n",
     (Mode.ENFORCE, 1, ("a.example",)), "§3.2 unknown keys ignored"),
    # §3.2: "If any non-repeated field -- i.e., all fields excepting "mx" -- is duplicated, all entries except
    # for the first SHALL be ignored": a later mode, version or max_age never weakens the policy
    (GOOD + "mode: none\n", (Mode.ENFORCE, 604800, ("mail.example.com", "*.example.net")), "§3.2 first mode"),
    (GOOD + "mode: bogus\n", (Mode.ENFORCE, 604800, ("mail.example.com", "*.example.net")),
     "§3.2 a later invalid mode ignored"),
    (GOOD + "version: STSv2\n", (Mode.ENFORCE, 604800, ("mail.example.com", "*.example.net")), "§3.2 first version"),
    (GOOD + "max_age: 0\n", (Mode.ENFORCE, 604800, ("mail.example.com", "*.example.net")), "§3.2 first max_age"),
]


@pytest.mark.parametrize(("text", "expected", "rule"), POLICIES, ids=[r[2] for r in POLICIES])
def test_policy(text: str, expected: tuple[Mode, int, tuple[str, ...]] | None, rule: str) -> None:
    if expected is None:
        with pytest.raises(StsError):
            mtasts.parse_policy(text)
        return
    p = mtasts.parse_policy(text)
    assert (p.mode, p.max_age, p.mx) == expected


def _reply_stream(*pieces: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    for p in pieces:
        r.feed_data(p)
    r.feed_eof()
    return r


def test_a_policy_body_is_read_whole_and_a_truncated_one_refused() -> None:
    """RFC 9112 §6.3: a body is Content-Length octets, or (without one) everything up to the end of the
    connection. One that ends early is a fetch error, never a shortened policy; one in several pieces is
    read whole."""
    from postgate.outbound import mtasts as fetcher
    head = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
    url = "https://mta-sts.example.com/.well-known/mta-sts.txt"

    async def read(*pieces: bytes) -> str:
        return await fetcher._response(_reply_stream(*pieces), url, 65536)
    body = GOOD.encode()
    with pytest.raises(fetcher.FetchError, match="truncated"):
        asyncio.run(read(head + b"Content-Length: %d\r\n\r\n" % (len(body) + 40) + body))
    assert asyncio.run(read(head + b"Content-Length: %d\r\n\r\n" % len(body) + body[:20], body[20:])) == GOOD
    assert asyncio.run(read(head + b"\r\n" + body[:20], body[20:50], body[50:])) == GOOD


# --- pure: MX matching (RFC 8461 §4.1) and the decision per host --------------------------------------
MATCHES = [
    ("mail.example.com", "mail.example.com", True),
    ("mail.example.com", "MAIL.Example.COM.", True),
    ("*.example.com", "mx1.example.com", True),
    ("*.example.com", "example.com", False),
    ("*.example.com", "a.b.example.com", False),
    ("*.example.com", "mx1.example.net", False),
    ("mail.example.com", "mx.mail.example.com", False),
]


@pytest.mark.parametrize(("pattern", "host", "ok"), MATCHES)
def test_mx_matching(pattern: str, host: str, ok: bool) -> None:
    assert mtasts.mx_matches(pattern, host) is ok


def test_decision_table() -> None:
    # the policy is one input of the one TLS decision (policy.tls.decide, golden file tests/golden/tls_decision.txt)
    enforce = mtasts.parse_policy("version: STSv1\nmode: enforce\nmx: *.example.com\nmax_age: 86400\n")
    testing = mtasts.parse_policy("version: STSv1\nmode: testing\nmx: *.example.com\nmax_age: 86400\n")
    none = mtasts.parse_policy("version: STSv1\nmode: none\nmax_age: 86400\n")
    dane = (Tlsa(3, 1, 1, b"\x01" * 32),)
    pkix = "require tls=required auth=pkix names={mx} sts=enforce sni={mx}"
    rows = [  # (policy, mx, secure TLSA, level, decision, RFC section)
        (None, "mx.example.com", (), Level.DANE, "require tls=optional auth=none sni={mx}", "no policy"),
        (none, "mx.example.com", (), Level.DANE, "require tls=optional auth=none sni={mx}", "§8.3 mode none"),
        (enforce, "mx.example.com", (), Level.DANE, pkix, "§4.2 enforce, MX matches: Web-PKI TLS"),
        (enforce, "mx.example.com", (), Level.MAY, pkix, "§4.2 enforce tightens may"),
        (enforce, "mx.example.net", (), Level.MAY, "skip 4.7.5 validation-failure: {mx}: MTA-STS: matches no "
         "mx pattern of the enforced policy of example.com (*.example.com)", "§4.1 enforce, MX does not match"),
        (enforce, "mx.example.net", dane, Level.DANE, "require tls=required auth=dane tlsa=1 names={mx} sni={mx}",
         "§2 DANE first"),
        (enforce, "mx.example.net", (), Level.NONE, "require tls=none auth=none", "the operator's explicit none"),
        (testing, "mx.example.net", (), Level.DANE, "require tls=optional auth=none sni={mx}",
         "§5 testing: report only"),
    ]
    for policy, mx, tlsa, level, want, rule in rows:
        host = HostFacts(mx, tlsa_security=Security.SECURE, tlsa=tlsa, reference_names=(mx,))
        d = decide(Policy(level), host, nexthop="example.com", sts=policy.sts() if policy else None)
        got = ("require " + d.text()) if isinstance(d, Requirement) else d.text()
        assert got == want.format(mx=mx), rule


# --- on the test network -----------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        import time
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def _resolver(net: TestNet) -> Resolver:
    return Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)


def _settings(net: TestNet, tmp: Path | None = None) -> StsSettings:
    return StsSettings(ca_file=str(net.state / "pki" / "root.crt"), fetch_timeout=5,
                       cache_file=str(tmp / "sts.json") if tmp else None)


def _deliverer(net: TestNet, sts: StsResolver, reports: list[Attempt] | None = None,
               level: Level = Level.DANE) -> Deliverer:
    async def hook(a: Attempt) -> None:
        if reports is not None:
            reports.append(a)
    cfg = DeliveryConfig(helo="client.test", default_policy=Policy(level), timeouts=FAST,
                         ca_file=str(net.state / "pki" / "root.crt"), sts=sts, tls_report=hook)
    return Deliverer(sts.resolver, cfg)


def _send(d: Deliverer, rcpt: str) -> tuple[RecipientResult, str]:
    token = secrets.token_hex(8)
    data = (f"From: alice@client.test\r\nTo: {rcpt}\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\nHello {token}\r\n").encode()

    async def go() -> list[RecipientResult]:
        try:
            return await d.deliver("alice@client.test", [rcpt], data)
        finally:
            await d.close()
    return asyncio.run(go())[0], token


def _arrived(net: TestNet, token: str) -> list[dict[str, object]]:
    return [m for h in net.scenarios.receivers for m in net.received(h.host) if token in str(m["data"])]


def test_fetch_is_webpki_validated_and_follows_no_redirect(testnet: TestNet) -> None:
    s = _settings(testnet)

    async def go(domain: str, settings: StsSettings = s) -> str:
        return await fetch(domain, _resolver(testnet), settings)
    assert "mode: enforce" in asyncio.run(go("enforce.sts.test"))
    with pytest.raises(FetchError) as e:  # RFC 8461 §3.3: redirects are not followed
        asyncio.run(go("redirect.sts.test"))
    assert "301" in e.value.reason
    with pytest.raises(FetchError) as e:  # an expired certificate on the policy host
        asyncio.run(go("badweb.sts.test"))
    assert e.value.result is ResultType.STS_WEBPKI_INVALID
    with pytest.raises(FetchError) as e:  # the system store does not know the test CA
        asyncio.run(go("enforce.sts.test", StsSettings(fetch_timeout=5)))
    assert e.value.result is ResultType.STS_WEBPKI_INVALID


def test_enforce_with_matching_mx_delivers_verified(testnet: TestNet) -> None:
    reports: list[Attempt] = []
    res, token = _send(_deliverer(testnet, StsResolver(_resolver(testnet), _settings(testnet)), reports),
                       "bob@enforce.sts.test")
    assert res.status == Outcome.DELIVERED and res.security == "verified", res
    assert [m["receiver"] for m in _arrived(testnet, token)] == ["mx.enforce.sts.test"]
    assert [(a.policy_type, a.result) for a in reports] == [(PolicyType.STS, None)]


@pytest.mark.parametrize(("domain", "why"), [
    ("mismatch.sts.test", "matches no mx pattern"),       # RFC 8461 §4.1
    ("badcert.sts.test", "TLS handshake"),                # RFC 8461 §4.2: Web-PKI certificate required
])
def test_enforce_failures_defer_without_cleartext(testnet: TestNet, domain: str, why: str) -> None:
    # At level 'may' these would otherwise be delivered (cleartext after the fallback delay, or TLS)
    for level in (Level.DANE, Level.MAY):
        reports: list[Attempt] = []
        d = _deliverer(testnet, StsResolver(_resolver(testnet), _settings(testnet)), reports, level)
        d.config.cleartext_fallback_delay = 0
        res, token = _send(d, f"bob@{domain}")
        assert res.status == Outcome.DEFERRED and why in res.reason, res
        assert _arrived(testnet, token) == []
        assert reports and all(a.result is not None and a.policy_type is PolicyType.STS for a in reports)


@pytest.mark.parametrize(("domain", "result"), [("redirect.sts.test", ResultType.STS_POLICY_FETCH_ERROR),
                                                 ("badweb.sts.test", ResultType.STS_WEBPKI_INVALID)])
def test_a_policy_that_cannot_be_fetched_is_reported(testnet: TestNet, domain: str, result: ResultType) -> None:
    """RFC 8460 §4.3.2.2: a policy fetch that fails (a redirect, RFC 8461 §3.3) or whose host fails Web PKI
    is reported as a failure of the sts policy type (sts-policy-fetch-error, sts-webpki-invalid) for the
    attempt, besides whatever the session itself gives."""
    reports: list[Attempt] = []
    _send(_deliverer(testnet, StsResolver(_resolver(testnet), _settings(testnet)), reports), f"bob@{domain}")
    assert (PolicyType.STS, result) in [(a.policy_type, a.result) for a in reports], reports
    [failed] = [a for a in reports if a.result is result]
    assert failed.policy_domain == domain and failed.detail


def test_testing_mode_delivers_and_reports(testnet: TestNet) -> None:
    reports: list[Attempt] = []
    res, token = _send(_deliverer(testnet, StsResolver(_resolver(testnet), _settings(testnet)), reports),
                       "bob@testing.sts.test")
    assert res.status == Outcome.DELIVERED and res.security == "tls-unauthenticated", res
    assert len(_arrived(testnet, token)) == 1
    # RFC 8461 §5: testing: delivered, and what enforce would have refused is reported (self-signed)
    assert [(a.policy_type, a.result) for a in reports] == [(PolicyType.STS, ResultType.CERTIFICATE_NOT_TRUSTED)]


def test_dane_decides_when_both_apply(testnet: TestNet) -> None:
    # danests.sts.test: secure TLSA for its MX, and an enforced policy naming another MX. RFC 8461 §2: DANE
    res, token = _send(_deliverer(testnet, StsResolver(_resolver(testnet), _settings(testnet))),
                       "bob@danests.sts.test")
    assert res.status == Outcome.DELIVERED and res.security == "dane-verified", res
    assert len(_arrived(testnet, token)) == 1


def test_fetch_failure_uses_the_cached_policy(testnet: TestNet, tmp_path: Path) -> None:
    clock = Clock()
    site = testnet.web("mta-sts.cached.sts.test")
    sts = StsResolver(_resolver(testnet), _settings(testnet, tmp_path), clock)
    first = asyncio.run(sts.lookup("cached.sts.test"))
    assert first.source is Source.FETCHED and first.policy and first.policy.mode is Mode.ENFORCE
    site.serve(testnet.state, None)  # the policy host now answers 404
    try:
        clock.now += 2 * 86400  # a refresh is due (RFC 8461 §5.1), max_age (7 days) is not over
        # a new process: the cache survives on disk
        sts2 = StsResolver(_resolver(testnet), _settings(testnet, tmp_path), clock)
        again = asyncio.run(sts2.lookup("cached.sts.test"))
        assert again.source is Source.CACHED_FALLBACK and again.failure is not None
        assert again.policy == first.policy
        res, _ = _send(_deliverer(testnet, sts2), "bob@cached.sts.test")
        assert res.status == Outcome.DELIVERED and res.security == "verified", res  # the cached policy is enforced
        clock.now += 6 * 86400  # max_age over: no policy any more
        assert asyncio.run(sts2.lookup("cached.sts.test")).policy is None
    finally:
        site.serve(testnet.state, site.policy)


def test_id_change_refetches(testnet: TestNet, tmp_path: Path) -> None:
    zone = next(z for z in testnet.scenarios.zones if z.name == "sts.test.")
    site = testnet.web("mta-sts.idchange.sts.test")
    sts = StsResolver(_resolver(testnet), _settings(testnet, tmp_path))
    first = asyncio.run(sts.lookup("idchange.sts.test"))
    assert first.policy and first.policy.mode is Mode.TESTING and first.id == "1"
    old = list(zone.records)
    site.serve(testnet.state, site.policy.replace("mode: testing", "mode: enforce"))
    # same id: the cached policy stands, the new file is not fetched
    assert asyncio.run(StsResolver(_resolver(testnet), _settings(testnet, tmp_path)).lookup(
        "idchange.sts.test")).policy.mode is Mode.TESTING  # type: ignore[union-attr]
    try:
        zone.records = [r.replace('_mta-sts.idchange TXT "v=STSv1; id=1"', '_mta-sts.idchange TXT "v=STSv1; id=2"')
                        for r in old]
        testnet.resign("sts.test.")
        new = asyncio.run(StsResolver(_resolver(testnet), _settings(testnet, tmp_path)).lookup("idchange.sts.test"))
        assert new.source is Source.FETCHED and new.id == "2" and new.policy and new.policy.mode is Mode.ENFORCE
    finally:
        zone.records = old
        site.serve(testnet.state, site.policy)
        testnet.resign("sts.test.")


def test_cli_resolve_and_tls_check_show_the_policy(testnet: TestNet, tmp_path: Path) -> None:
    import subprocess
    import sys
    (tmp_path / "q").mkdir()
    cfg = tmp_path / "postgate.toml"
    cfg.write_text(f'[delivery]\nca_file = "{testnet.state / "pki" / "root.crt"}"\n\n'
                   f'[queue]\ndirectory = "{tmp_path / "q"}"\n')

    def pg(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "postgate.cli", *args, "--config", str(cfg), "--resolver",
                               testnet.resolver, "--trust-anchor", str(testnet.anchor_file)],
                              capture_output=True, text=True, timeout=120)
    r = pg("resolve", "enforce.sts.test")
    assert r.returncode == 0 and "MTA-STS mode=enforce mx=mx.enforce.sts.test id=20260101" in r.stdout, r
    assert "downgrade memory: nothing remembered" in r.stdout
    assert (tmp_path / "q" / "mta-sts.json").exists()  # the policy cache lives beside the queue
    r = pg("tls-check", "mismatch.sts.test")
    assert r.returncode == 75 and "matches no mx pattern" in r.stdout, r  # tls-check says what delivery does
    r = pg("tls-check", "enforce.sts.test")
    assert r.returncode == 0 and ": ok verified" in r.stdout and "MTA-STS: mode=enforce" in r.stdout, r


@pytest.mark.parametrize(("text", "error"), [
    ('[downgrade]\naction = "bounce"\n', ':2: [downgrade] action: '),
    ('[mta_sts]\n\nfetch_timeout = 0.0\n', ':3: [mta_sts] fetch_timeout: '),
    ('[tlsrpt]\nreporter = "other"\n', ':2: [tlsrpt] reporter: '),
    ('[downgrade]\ndefer_domains = ["a.example"]\nlog_domains = ["a.example"]\n', ':2: [downgrade] defer_domains'),
    ('[mta_sts]\nunknown = 1\n', ':2: [mta_sts] unknown key'),
])
def test_config_errors_name_file_and_line(tmp_path: Path, text: str, error: str) -> None:
    from postgate import config
    p = tmp_path / "pg.toml"
    p.write_text(text)
    with pytest.raises(config.ConfigError) as e:
        config.load(p)
    assert f"{p}{error}" in str(e.value)


def test_proactive_refresh(testnet: TestNet, tmp_path: Path) -> None:
    clock = Clock()
    sts = StsResolver(_resolver(testnet), _settings(testnet, tmp_path), clock)
    first = asyncio.run(sts.lookup("enforce.sts.test"))
    assert first.source is Source.FETCHED
    assert asyncio.run(sts.refresh_all()) == 0  # nothing due
    clock.now += 86400 + 1  # RFC 8461 §5.1: refreshed before max_age (7 days) runs out
    assert asyncio.run(sts.refresh_all()) == 1
    e = sts.cache.get("enforce.sts.test")
    assert e is not None and e.fetched == clock.now and e.expires == clock.now + 604800
