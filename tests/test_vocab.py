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
