"""End to end through the smtpd: Sieve as a stage-hook filter (issue 17, "Must be shown").

NOT COLLECTED on the sieve branch (no ``test_`` prefix): the smtpd's stage-hook wiring and its test harness
(``tests/smtpd_harness.py``) live on the smtpd branch. After both are merged, rename this file to
``tests/test_sieve_e2e.py``. It was run against a trial merge of sieve + smtpd (all passed).

What it shows: a data-stage ``reject`` reaches the client as a 5xx after the end of DATA and nothing is
queued (so no bounce); a script's per-destination ``tls_policy`` reaches the session's routes for that
recipient only; a run-time error applies the default action in the session.
"""

from __future__ import annotations

from pathlib import Path

from postgate.inbound.filters import Route
from postgate.inbound.sieve_filter import SieveFilter, SieveScripts, SieveSettings

from tests.smtpd_harness import Client, code, serve

SCRIPT = """require ["envelope", "reject", "spamtest", "relational", "comparator-i;ascii-numeric",
         "vnd.postgate", "editheader"];
if envelope :domain :is "to" "bank.example" { tls_policy "dane-only"; }
if header :contains "subject" "lottery" { reject text:
Your message looks like spam.
Contact postmaster if this is wrong.
.
; }
if envelope :localpart :is "to" "loop" { redirect "loop@x.test"; }
addheader "X-Sieve" "checked";
"""


def sieve_filter(tmp: Path) -> SieveFilter:
    f = tmp / "mx.sieve"
    f.write_text(SCRIPT)
    return SieveFilter(SieveScripts(SieveSettings(listener_scripts={"mx": str(f)}, hostname="smtpd.test")))


def transaction(c: Client, rcpts: list[bytes], subject: bytes) -> list[bytes]:
    out = [c.cmd(b"MAIL FROM:<alice@client.test>")]
    out += [c.cmd(b"RCPT TO:<" + r + b">") for r in rcpts]
    out.append(c.cmd(b"DATA"))
    out.append(c.cmd(b"From: alice@client.test\r\nSubject: " + subject + b"\r\n\r\nhello\r\n."))
    return out


def test_data_stage_reject_reaches_the_client_as_5xx_and_nothing_is_queued(tmp_path: Path) -> None:
    with serve(filters=[sieve_filter(tmp_path)]) as srv, Client(srv.port) as c:
        assert code(c.reply()) == 220
        assert code(c.cmd(b"EHLO client.test")) == 250
        replies = transaction(c, [b"bob@x.test"], b"You won the lottery")
        assert [code(r) for r in replies] == [250, 250, 354, 550]
        # RFC 5429 §2.1: refused in the session, before the 250, with the script's multi-line reason
        assert replies[-1].startswith(b"550-5.7.1 Your message looks like spam.\r\n550 ")
        assert replies[-1].endswith(b"Contact postmaster if this is wrong.\r\n")
        # (RFC 2034 §4 wants "5.7.1" on the last line too: smtpd's Reply.of drops it on continuation lines;
        # policy.vocab.Reply.line() repeats it)
        assert code(c.cmd(b"QUIT")) == 221
    assert srv.handler.messages == []          # nothing accepted: no bounce can follow


def test_per_destination_tls_policy_and_header_edit_reach_the_session(tmp_path: Path) -> None:
    with serve(filters=[sieve_filter(tmp_path)]) as srv, Client(srv.port) as c:
        assert code(c.reply()) == 220
        assert code(c.cmd(b"EHLO client.test")) == 250
        replies = transaction(c, [b"x@bank.example", b"y@other.test"], b"Hello")
        assert [code(r) for r in replies] == [250, 250, 250, 354, 250]
    [(_, rcpts, data, hold)] = srv.handler.messages
    assert rcpts == ["x@bank.example", "y@other.test"] and hold is None
    assert b"X-Sieve: checked\r\n" in data
    [routes] = srv.handler.routes
    assert Route(("x@bank.example",), tls_level="dane-only") in routes
    assert all("y@other.test" not in r.recipients for r in routes)


def test_runtime_error_tempfails_in_the_session(tmp_path: Path) -> None:
    with serve(filters=[sieve_filter(tmp_path)]) as srv, Client(srv.port) as c:
        assert code(c.reply()) == 220
        assert code(c.cmd(b"EHLO client.test")) == 250
        assert code(c.cmd(b"MAIL FROM:<alice@client.test>")) == 250
        # redirect "loop@x.test" for the recipient loop@x.test: a loop, refused → default action tempfail
        assert c.cmd(b"RCPT TO:<loop@x.test>").startswith(b"451 4.7.1")
    assert "would loop back" in srv.log.text()
