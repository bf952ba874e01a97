"""The shared vocabulary (policy/vocab.py): one domain_of, one queue id, replies parsed once."""

from __future__ import annotations

import subprocess
import sys

import pytest
from postgate.policy.vocab import Outcome, Reply, TlsOutcome, domain_of, new_queue_id, valid_queue_id


@pytest.mark.parametrize(("address", "domain"), [
    ("bob@Example.COM", "example.com"),
    ("bob@example.com.", "example.com"),          # RFC 5321 §2.3.5: the same domain, with its final dot
    ("a@b@example.com", "example.com"),
    ("postmaster", ""),
    ("", ""),
])
def test_domain_of(address: str, domain: str) -> None:
    assert domain_of(address) == domain


def test_queue_ids_sort_by_arrival_and_validate() -> None:
    a, b = new_queue_id(1_000_000.0), new_queue_id(1_000_000.5)
    assert a < b and valid_queue_id(a) and valid_queue_id(b)
    assert not valid_queue_id("../etc/passwd") and not valid_queue_id(a.lower())


@pytest.mark.parametrize(("k", "n"), [(0, 1), (0, 2), (1, 2), (2, 3), (6, 7)])
def test_queue_ids_fall_in_this_process_share(k: int, n: int) -> None:
    """A process that runs share k of n of the local queue makes ids in that share (the spool's ``mine``),
    with random bits still spread over the share (no two processes make the same id)."""
    from postgate.outbound.queue.spool import SpoolFiles
    from postgate.policy import vocab
    try:
        vocab.queue_id_share(k, n)
        ids = [new_queue_id(1_000_000.0) for _ in range(2000)]
        assert all(valid_queue_id(q) and int(q[-6:], 16) % n == k for q in ids)
        assert len(set(ids)) > 1990 and max(int(q[-6:], 16) for q in ids) > 0xE00000
        spool = SpoolFiles.__new__(SpoolFiles)
        spool.nparts, spool.partitions = n, {k}
        assert all(spool.mine(q) for q in ids)
        assert n == 1 or not any(spool.mine(q[:-6] + f"{(int(q[-6:], 16) + 1) % (1 << 24):06X}") for q in ids
                                 if int(q[-6:], 16) + 1 < (1 << 24) and n > 1)
        with pytest.raises(ValueError):
            vocab.queue_id_share(n, n)
    finally:
        vocab.queue_id_share(0, 1)


@pytest.mark.parametrize(("code", "message", "reply", "status"), [
    (250, "2.0.0 Ok: queued as X", Reply(250, "2.0.0", "Ok: queued as X"), "2.0.0"),
    (550, "5.1.1 <a@b>: user unknown", Reply(550, "5.1.1", "<a@b>: user unknown"), "5.1.1"),
    (451, "try again later", Reply(451, "", "try again later"), "4.0.0"),       # RFC 3463 §3.1: class
    (550, "4.1.1 inconsistent", Reply(550, "", "4.1.1 inconsistent"), "5.0.0"),  # enhanced must match
    (554, "", Reply(554, "", ""), "5.0.0"),
])
def test_reply_parsed_once(code: int, message: str, reply: Reply, status: str) -> None:
    got = Reply.parse(code, message)
    assert got == reply and got.status == status


def test_outcomes_are_enums_with_the_rfc_8460_names() -> None:
    assert [o.value for o in Outcome] == ["pending", "delivered", "deferred", "bounced"]
    failures = {t.value for t in TlsOutcome if not t.success}
    assert failures == {"starttls-not-supported", "certificate-host-mismatch", "certificate-expired",
                        "certificate-not-trusted", "validation-failure", "tlsa-invalid", "dnssec-invalid",
                        "dane-required", "sts-policy-fetch-error", "sts-policy-invalid", "sts-webpki-invalid"}


def test_importing_the_dkim_signer_leaves_dkimpy_alone() -> None:
    """outbound/dkim.py swaps its speed-ups into dkimpy only while it signs (issue 12)."""
    code = ("import dkim; a = dkim.RSASSA_PKCS1_v1_5_sign, dkim.CanonicalizationPolicy.canonicalize_body\n"
            "import postgate.outbound.dkim as d\n"
            "assert (dkim.RSASSA_PKCS1_v1_5_sign, dkim.CanonicalizationPolicy.canonicalize_body) == a\n"
            "with d._fast_dkim():\n    assert dkim.RSASSA_PKCS1_v1_5_sign is d._openssl_rsassa_sign\n"
            "assert (dkim.RSASSA_PKCS1_v1_5_sign, dkim.CanonicalizationPolicy.canonicalize_body) == a\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_suspected_attack_is_data_from_result_to_envelope_to_dsn() -> None:
    """RecipientResult → envelope (stored and read back) → DSN, with no text to grep (issue 12)."""
    from postgate.outbound.delivery import RecipientResult
    from postgate.outbound.queue import dsn
    from postgate.outbound.queue.envelope import Envelope, Recipient
    from postgate.policy.vocab import TlsOutcome
    env = Envelope.new("alice@client.test", [Recipient("bob@example.net"), Recipient("carol@example.net")],
                       b"Subject: x\r\n\r\nhi\r\n")
    res = RecipientResult("bob@example.net", Outcome.DEFERRED, "4.7.5", "TLSA record mismatch",
                          suspected_attack=True, tls_result=TlsOutcome.TLSA_INVALID)
    env.recipients[0].record(res)
    env.recipients[1].record(RecipientResult("carol@example.net", Outcome.BOUNCED, "5.1.1", "",
                                             reply=Reply(550, "5.1.1", "no such user")))
    back = Envelope.from_bytes(env.to_bytes())
    assert [(r.status, r.suspected_attack) for r in back.recipients] == [(Outcome.DEFERRED, True),
                                                                        (Outcome.BOUNCED, False)]
    assert back.recipients[1].reason == "550 5.1.1 no such user"
    report = dsn.build(back, b"Subject: x\r\n\r\nhi\r\n", back.recipients, action="delayed",
                       reporting_mta="mx.test").decode()
    block = report.split("Final-Recipient: rfc822; bob@example.net", 1)[1].split("\r\n\r\n", 1)[0]
    assert "X-Postgate-Suspected-Attack: yes" in block
    other = report.split("Final-Recipient: rfc822; carol@example.net", 1)[1].split("\r\n\r\n", 1)[0]
    assert "Suspected-Attack" not in other


def test_diagnostic_code_type_is_recorded_not_guessed_from_the_text() -> None:
    """RFC 3464 §2.3.6: "smtp" only for the server's own reply; a reason Postgate wrote is X-Postgate even
    when it starts with digits, and an expiry that quotes a server's reply is Postgate's text (issue 12)."""
    from postgate.outbound.delivery import RecipientResult
    from postgate.outbound.queue import dsn
    from postgate.outbound.queue.envelope import Envelope, Recipient
    env = Envelope.new("alice@client.test", [Recipient("a@example.net"), Recipient("b@example.net"),
                                             Recipient("c@example.net")], b"Subject: x\r\n\r\nhi\r\n")
    a, b, c = env.recipients
    a.record(RecipientResult("a@example.net", Outcome.DEFERRED, "4.4.1", "421 connections refused by 3 hosts"))
    b.record(RecipientResult("b@example.net", Outcome.BOUNCED, "5.1.1", "", reply=Reply(550, "5.1.1", "no")))
    c.record(RecipientResult("c@example.net", Outcome.DEFERRED, "4.2.0", "", reply=Reply(451, "4.2.0", "later")))
    c.explain("message expired after 5 days in queue: " + c.reason)
    back = Envelope.from_bytes(env.to_bytes())
    report = dsn.build(back, b"Subject: x\r\n\r\nhi\r\n", back.recipients, action="failed",
                       reporting_mta="mx.test").decode()
    # RFC 3464 §2.1: fields may be folded (RFC 5322 §2.2.3 unfolding: the CRLF before white space removed)
    codes = [line for line in report.replace("\r\n ", " ").split("\r\n") if line.startswith("Diagnostic-Code:")]
    assert codes == ["Diagnostic-Code: X-Postgate; 421 connections refused by 3 hosts",
                     "Diagnostic-Code: smtp; 550 5.1.1 no",
                     "Diagnostic-Code: X-Postgate; message expired after 5 days in queue: 451 4.2.0 later"]
    # an envelope stored before the field existed: the old rule (a reply starts with its code)
    legacy = Recipient("d@example.net", status=Outcome.BOUNCED, dsn="5.1.1", reason="550 5.1.1 no such user")
    assert legacy.diagnostic_type is None
    old = dsn.build(back, b"Subject: x\r\n\r\nhi\r\n", [legacy], action="failed", reporting_mta="mx.test").decode()
    assert "Diagnostic-Code: smtp; 550 5.1.1 no such user" in old
