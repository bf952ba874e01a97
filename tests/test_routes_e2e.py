"""A filter's route reaches delivery (issue 17 with issue 12's stage hooks): a Sieve script that requires DANE
for one destination (``tls_policy "dane-only"``, vnd.postgate) defers mail to it when its TLSA records are
missing, while other mail — to other destinations, and to the same one without the rule — flows.

nodane.test is DNSSEC-signed without TLSA records: at the default level ``dane`` it gets opportunistic TLS,
at ``dane-only`` it must not be used (RFC 7672 §2.2: no usable TLSA records, DANE mandatory)."""

from __future__ import annotations

import json
import secrets
import smtplib
import subprocess
import sys
from pathlib import Path

from fixtures.pgserve import TRUSTED, PostgateServer
from fixtures.testnet import TestNet

ADDRESS = "127.0.2.18"
SCRIPT = """require ["envelope", "vnd.postgate"];
if allof (envelope :domain :is "to" "nodane.test", header :contains "subject" "strict") {
    tls_policy "dane-only";
}
"""


def send(subject: str, rcpts: list[str]) -> tuple[int, str, str]:
    token = secrets.token_hex(8)
    body = (f"From: a@client.test\r\nSubject: {subject} {token}\r\nMessage-ID: <{token}@client.test>\r\n\r\n"
            f"hi {token}\r\n").encode()
    with smtplib.SMTP(ADDRESS, 25, timeout=60, source_address=(TRUSTED, 0)) as s:
        s.ehlo("client.test")
        s.mail("a@client.test")
        for r in rcpts:
            s.rcpt(r)
        code, text = s.data(body)
    return code, text.decode(), token


def test_sieve_requires_dane_for_one_destination(testnet: TestNet, tmp_path: Path) -> None:
    (tmp_path / "policy.sieve").write_text(SCRIPT)
    with PostgateServer(testnet, tmp_path, address=ADDRESS, sieve={"script": str(tmp_path / "policy.sieve")}) as pg:
        code, text, strict = send("strict", ["bob@nodane.test", "bob@dane-ok.test"])
        assert code == 250 and "queued" in text, text        # one recipient waits: queued, not refused
        code, text, normal = send("normal", ["bob@nodane.test"])
        assert code == 250 and "delivered" in text, text     # the same destination without the rule

        nodane = [m["data"] for m in testnet.received("mx.nodane.test")]
        assert not any(strict in d for d in nodane), "sent without DANE although the script required it"
        assert any(normal in d for d in nodane)
        assert any(strict in m["data"] for m in testnet.received("mx.dane-ok.test"))   # other mail flows

        out = subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(pg.spool), "list",
                              "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
        [msg] = json.loads(out)
        [waiting] = [r for r in msg["recipients"] if r["address"] == "bob@nodane.test"]
        assert waiting["status"] == "deferred" and "dane-only" in waiting["reason"], waiting
        assert "route tls_level=dane-only" in pg.log()


def test_routes_are_stored_per_recipient_and_survive_the_spool() -> None:
    """Chain order: a later filter's choice wins; the envelope keeps the routes across a write and a read,
    and a queue lifetime set by a filter bounds the retries (vnd.postgate queue_lifetime)."""
    from postgate.inbound.filters import Route
    from postgate.inbound.prequeue import apply_routes
    from postgate.outbound.delivery import RecipientRoute
    from postgate.outbound.queue.envelope import Envelope, Recipient
    from postgate.outbound.queue.retry import Attempt, Expire, Retry, next_attempt
    from postgate.outbound.queue.scheduler import routes_of
    from postgate.policy.maps import Relay
    from postgate.policy.tls import Level

    env = Envelope.new("a@x.test", [Recipient("b@bank.test"), Recipient("c@other.test")], b"x", now=1000.0)
    apply_routes(env, [Route(("b@bank.test",), tls_level="dane-only"),
                       Route(("B@bank.test",), tls_level="caps-required", transport="smtp:[relay.test]:587"),
                       Route((), lifetime=3600.0)])
    again = Envelope.from_bytes(env.to_bytes())
    assert routes_of(again.recipients) == {
        "b@bank.test": RecipientRoute(Level.CAPS_REQUIRED, Relay("relay.test", 587, mx=False))}
    assert again.lifetime == 3600.0
    again.attempts.append({"time": 1000.0})
    assert isinstance(next_attempt(again, Attempt.DEFERRED, 1000.0 + 3599), Retry)
    assert isinstance(next_attempt(again, Attempt.DEFERRED, 1000.0 + 3600), Expire)
