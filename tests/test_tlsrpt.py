"""TLS-RPT (RFC 8460): the record and report rules as tables, then a day of real attempts on the test network
reported through Postgate's own queue and read back by a real consumer (parsedmarc)."""

from __future__ import annotations

import asyncio
import datetime as dt
import gzip
import ipaddress
import json
import secrets
from pathlib import Path

import jsonschema
import parsedmarc
import pytest
from postgate.outbound import dkim, tlsrptsend
from postgate.outbound.delivery import Deliverer, DeliveryConfig
from postgate.outbound.mtasts import StsResolver, StsSettings
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.scheduler import Scheduler
from postgate.outbound.queue.spool import DirectorySpool
from postgate.outbound.resolver import Resolver, load_anchors
from postgate.outbound.smtp_client import Timeouts
from postgate.outbound.tlsrptdb import TlsRptStore, collector
from postgate.policy import tlsrpt
from postgate.policy.tls import Level, Policy
from postgate.policy.tlsrpt import PolicyType, ResultType
from postgate.policy.vocab import Outcome

from fixtures.testnet import TestNet

SCHEMA = json.loads((Path(__file__).parent / "data" / "tlsrpt-report.schema.json").read_text())
FAST = Timeouts(connect=3, greeting=3, command=3, tls=3, data=5)

RECORDS = [
    ("v=TLSRPTv1; rua=mailto:reports@example.com", ("mailto:reports@example.com",), "§3 mailto"),
    ("v=TLSRPTv1;rua=https://reporting.example.com/v1/tlsrpt", ("https://reporting.example.com/v1/tlsrpt",),
     "§3 https"),
    ("v=TLSRPTv1; rua=mailto:a@example.com,https://r.example.com/x",
     ("mailto:a@example.com", "https://r.example.com/x"), "§3 several, comma separated"),
    ("v=TLSRPTv1; rua=ftp://x.example", None, "§3 only mailto: and https:"),
    ("v=TLSRPTv2; rua=mailto:a@example.com", None, "§3 version"),
    ("rua=mailto:a@example.com; v=TLSRPTv1", None, "§3 version first"),
]


@pytest.mark.parametrize(("txt", "rua", "rule"), RECORDS, ids=[r[2] for r in RECORDS])
def test_record(txt: str, rua: tuple[str, ...] | None, rule: str) -> None:
    rec = tlsrpt.select_record([txt])
    assert (rec.rua if rec else None) == rua


def test_record_selection_and_mailto_decoding() -> None:
    """RFC 8460 §3: records not beginning with "v=TLSRPTv1;" are discarded (v=TLSRPTv10 too), so one valid
    record remains; a mailto: URI's address is percent-decoded (RFC 6068 §2: "," and "!" must be encoded)."""
    rec = tlsrpt.select_record(["v=TLSRPTv1; rua=mailto:tls%2Brpt@example.com,https://r.example/x",
                                "v=TLSRPTv10; rua=mailto:other@example.com"])
    assert rec is not None and rec.mailto == ("tls+rpt@example.com",) and rec.https == ("https://r.example/x",)


def test_failure_text_is_a_failure_reason_code_and_the_mail_has_a_real_boundary_and_report_id() -> None:
    """RFC 8460 §4.4: a failure's explanation is "failure-reason-code" ("additional-information" is a URI);
    §5.3: the Subject's Report-ID is an RFC 5322 msg-id (dot-atom-text "@" ...), the multipart/report has a
    boundary of its own."""
    import email
    import re
    store_counts = [tlsrpt.PolicyCounts("example.com", tlsrpt.PolicyType.STS, "2026-12-01", ("version: STSv1",),
                                        ("mx.example.com",), 0,
                                        {("validation-failure", "192.0.2.1", "mx.example.com", "", "why"): 2})]
    settings = tlsrptsend.ReportSettings(submitter="client.test")
    report, gz, fname = tlsrptsend.build("2026-12-01", "example.com", store_counts, settings)
    [detail] = report["policies"][0]["failure-details"]  # type: ignore[index]
    assert detail["failure-reason-code"] == "why" and "additional-information" not in detail
    msg = tlsrptsend.message(report, gz, fname, "example.com", "rua@example.com", settings)
    m = email.message_from_bytes(msg)
    assert m.get_boundary() not in (None, "None") and msg.count(b"--" + m.get_boundary().encode()) == 3
    rid = re.search(r"Report-ID: <([^>]*)>", " ".join(str(m["Subject"]).split())).group(1)  # type: ignore[union-attr]
    atext = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
    assert re.fullmatch(rf"{atext}(?:\.{atext})*@{atext}(?:\.{atext})*", rid), rid


def test_report_names_and_subject() -> None:
    # RFC 8460 §5.1 file name, §5.3 subject
    assert tlsrpt.filename("mail.sender.example", "example.com", "2016-04-01") == \
        "mail.sender.example!example.com!1459468800!1459555199.json.gz"
    assert tlsrpt.subject("example.com", "mail.sender.example", "x@y") == \
        "Report Domain: example.com Submitter: mail.sender.example Report-ID: <x@y>"


class Clock:
    def __init__(self, t: float) -> None:
        self.now = t

    def __call__(self) -> float:
        return self.now


def _resolver(net: TestNet) -> Resolver:
    return Resolver([(net.resolver, 53)], load_anchors(net.anchor_file), timeout=3)


def _message(rcpt: str) -> bytes:
    token = secrets.token_hex(8)
    return (f"From: alice@client.test\r\nTo: {rcpt}\r\nSubject: {token}\r\nMessage-ID: <{token}@client.test>\r\n"
            f"\r\nHello {token}\r\n").encode()


def test_a_day_of_attempts_is_reported_and_parsed_by_parsedmarc(testnet: TestNet, tmp_path: Path) -> None:
    ca = str(testnet.state / "pki" / "root.crt")
    day = dt.datetime.now(dt.UTC).date() - dt.timedelta(days=3)
    clock = Clock(dt.datetime(day.year, day.month, day.day, 12, tzinfo=dt.UTC).timestamp())
    db = tmp_path / "tlsrpt.sqlite"
    sts = StsResolver(_resolver(testnet), StsSettings(ca_file=ca, fetch_timeout=5))
    # the attempts of the day: (recipient, how many)
    plan = [("bob@enforce.sts.test", 3), ("bob@testing.sts.test", 2), ("bob@mismatch.sts.test", 1)]

    async def attempts() -> None:
        store = TlsRptStore(db)
        d = Deliverer(sts.resolver, DeliveryConfig(helo="client.test", default_policy=Policy(Level.DANE),
                                                   timeouts=FAST, ca_file=ca, sts=sts,
                                                   tls_report=collector(store, clock)))
        try:
            for rcpt, n in plan:
                for _ in range(n):
                    clock.now += 60
                    await d.deliver("alice@client.test", [rcpt], _message(rcpt))
                    await d.close()  # a new session each time: one session, one count
        finally:
            await d.close()
            store.close()
    asyncio.run(attempts())

    # the next day, in a new process (the store survives): the reports go out through the queue, DKIM-signed
    clock.now += 86400
    keys = tmp_path / "dkim"
    dkim.generate(keys, "client.test", "rpt", "ed25519")
    signer = dkim.Signer(keys, "client.test")
    spool = DirectorySpool(tmp_path / "spool")
    settings = tlsrptsend.ReportSettings(organization="Postgate test", submitter="client.test",
                                         contact="postmaster@client.test", sender="tlsrpt@client.test",
                                         ca_file=ca)
    store = TlsRptStore(db)

    async def submit(sender: str, rcpts: list[str], content: bytes) -> None:
        body = signer.sign(content)
        await spool.enqueue(Envelope.new(sender, [Recipient(r) for r in rcpts], body, now=clock()), body)

    async def send() -> list[tuple[str, str, str]]:
        sent = await tlsrptsend.send_due(store, sts.resolver, settings, submit, now=clock())
        d = Deliverer(sts.resolver, DeliveryConfig(helo="client.test", timeouts=FAST, ca_file=ca))
        try:
            await Scheduler(spool, d, clock=clock).run_once()
        finally:
            await d.close()
        return sent
    sent = asyncio.run(send())
    dstr = day.isoformat()
    assert sorted(sent) == sorted([
        (dstr, "enforce.sts.test", "mailto:tlsrpt@reports.sts.test"),
        (dstr, "testing.sts.test", "mailto:tlsrpt@reports.sts.test"),
        (dstr, "testing.sts.test", "https://mta-sts.reports.sts.test/tlsrpt"),  # RFC 8460 §5.4 POST (nginx)
    ])  # mismatch.sts.test publishes no _smtp._tls record: no report
    assert asyncio.run(tlsrptsend.send_due(store, sts.resolver, settings, submit, now=clock())) == []  # once

    # what the report says, straight from the store: valid against the RFC 8460 §4.4 schema, counts = attempts
    want = {"enforce.sts.test": (3, 0, {}), "testing.sts.test": (0, 2, {"certificate-not-trusted": 2}),
            "mismatch.sts.test": (0, 1, {"validation-failure": 1})}
    for domain, (ok, failed, kinds) in want.items():
        report, gz, _ = tlsrptsend.build(dstr, domain, store.counts(dstr, domain), settings)
        jsonschema.validate(report, SCHEMA)
        jsonschema.validate(json.loads(gzip.decompress(gz)), SCHEMA)
        [pol] = report["policies"]  # type: ignore[index]
        assert pol["policy"]["policy-type"] == "sts" and pol["policy"]["policy-domain"] == domain
        assert pol["summary"] == {"total-successful-session-count": ok, "total-failure-session-count": failed}
        assert {f["result-type"]: f["failed-session-count"] for f in pol.get("failure-details", [])} == kinds
        for f in pol.get("failure-details", []):
            # RFC 8460 §4.4: a session that was opened names both ends; a host refused before any connection
            # (an MX the policy does not list) names neither
            if f["result-type"] == "certificate-not-trusted":
                assert ipaddress.ip_address(f["sending-mta-ip"]).is_loopback, f
                assert ipaddress.ip_address(f["receiving-ip"]).is_loopback, f
            else:
                assert "sending-mta-ip" not in f and "receiving-ip" not in f, f
    store.close()

    # the mailed reports, as the receiver stored them, read by parsedmarc
    parsed = {}
    for m in testnet.received("mx.reports.sts.test"):
        if "TLS-Report-Submitter: client.test" not in m["data"]:
            continue
        assert m["data"].startswith("DKIM-Signature:")  # RFC 8460 §5.3: signed by the submitter's domain
        assert 'report-type="tlsrpt"' in m["data"]
        out = parsedmarc.parse_report_email(m["data"], offline=True)
        assert out["report_type"] == "smtp_tls"
        rep = out["report"]
        if not rep["begin_date"].startswith(dstr):
            continue
        for pol in rep["policies"]:
            parsed[pol["policy_domain"]] = (pol["successful_session_count"], pol["failed_session_count"],
                                            {f["result_type"]: f["failed_session_count"]
                                             for f in pol.get("failure_details", [])})
    assert parsed == {k: v for k, v in want.items() if k != "mismatch.sts.test"}


def test_store_aggregates_per_domain_type_and_day(tmp_path: Path) -> None:
    store = TlsRptStore(tmp_path / "s.sqlite")
    t = dt.datetime(2026, 3, 1, 23, 59, 59, tzinfo=dt.UTC).timestamp()
    a = tlsrpt.Attempt("example.com", PolicyType.TLSA, None, "mx.example.com", when=t)
    store.add_sync(a)
    store.add_sync(a)
    store.add_sync(tlsrpt.Attempt("example.com", PolicyType.TLSA, ResultType.TLSA_INVALID, "mx.example.com",
                                  "192.0.2.1", when=t))
    store.add_sync(tlsrpt.Attempt("example.com", PolicyType.TLSA, None, when=t + 1))  # the next UTC day
    store.close()
    store = TlsRptStore(tmp_path / "s.sqlite")  # survives a restart
    [pc] = store.counts("2026-03-01", "example.com")
    assert (pc.successes, pc.failure_count) == (2, 1)
    assert store.unsent("2026-03-03") == [("2026-03-01", "example.com"), ("2026-03-02", "example.com")]
    store.mark_sent("2026-03-01", "example.com")
    assert store.unsent("2026-03-03") == [("2026-03-02", "example.com")]


def test_delivered_is_counted_once_per_session(testnet: TestNet, tmp_path: Path) -> None:
    store = TlsRptStore(tmp_path / "s.sqlite")
    d = Deliverer(_resolver(testnet), DeliveryConfig(helo="client.test", timeouts=FAST,
                                                     ca_file=str(testnet.state / "pki" / "root.crt"),
                                                     tls_report=collector(store)))

    async def go() -> None:
        try:
            for _ in range(2):  # the second message reuses the session
                [r] = await d.deliver("alice@client.test", ["bob@dane-ok.test"], _message("bob@dane-ok.test"))
                assert r.status == Outcome.DELIVERED
        finally:
            await d.close()
    asyncio.run(go())
    [pc] = store.counts(tlsrpt.day_of(__import__("time").time()), "dane-ok.test")
    assert pc.policy_type is PolicyType.TLSA and pc.successes == 1 and pc.policy_strings


def test_events_for_sys4_tlsrpt_reporter(testnet: TestNet, tmp_path: Path) -> None:
    import socket

    from postgate.outbound.tlsrpt_reporter import ReporterHook

    path = str(tmp_path / "collectd.sock")
    collectd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    collectd.bind(path)
    collectd.settimeout(5)
    ca = str(testnet.state / "pki" / "root.crt")
    r = _resolver(testnet)
    hook = ReporterHook(path, r)
    d = Deliverer(r, DeliveryConfig(helo="client.test", timeouts=FAST, ca_file=ca,
                                    sts=StsResolver(r, StsSettings(ca_file=ca, fetch_timeout=5)), tls_report=hook))

    async def go() -> None:
        try:
            for rcpt in ("bob@testing.sts.test", "bob@mismatch.sts.test", "bob@enforce.sts.test"):
                await d.deliver("alice@client.test", [rcpt], _message(rcpt))
        finally:
            await d.close()
            hook.close()
    asyncio.run(go())
    got = [json.loads(collectd.recv(65536)) for _ in range(2)]
    collectd.close()
    # libtlsrpt's datagram: policy type 2 = sts, code 203 = certificate-not-trusted; mismatch.sts.test has no
    # TLS-RPT record, so no event
    assert [(g["d"], g["pr"].startswith("v=TLSRPTv1"), g["policies"][0]["policy-type"], g["policies"][0]["f"],
             [x["c"] for x in g["policies"][0].get("failure-details", [])]) for g in got] == [
        ("testing.sts.test", True, 2, 1, [203]), ("enforce.sts.test", True, 2, 0, [])]
    assert got[1]["policies"][0]["mx-host"] == ["mx.enforce.sts.test"] and got[1]["policies"][0]["t"] == 0
