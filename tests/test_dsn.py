"""Delivery status notifications (outbound/queue/dsn.py) and who sends them (the scheduler, the pre-queue
path): the DSN audit's items, each with the case that showed it.

1. a "relayed" report that cannot be queued never keeps the "failed" report from being queued (RFC 5321 §6.1)
2. every DSN has a Message-ID of its own, two written in one second too (RFC 5322 §3.6.4)
3. no line longer than 998 octets (RFC 5322 §2.1.1): folded delivery-status fields (RFC 3464 §2.1), wrapped text
4. 7-bit: no "§"; UTF-8 text in quoted-printable; US-ASCII delivery-status fields; RFC 6533 §3 utf-8 addresses
5. delay and success reports return the headers only (RFC 3461 §4.3); failed ones honour RET
6. a late pre-queue result relayed to a server without DSN gets its "relayed" report (RFC 3461 §5.2.2)
"""

from __future__ import annotations

import asyncio
import email
import email.message
import email.policy
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from postgate.outbound.delivery import RecipientResult
from postgate.outbound.queue import dsn
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.scheduler import Scheduler, SchedulerConfig
from postgate.outbound.queue.spool import DirectorySpool
from postgate.policy.vocab import Outcome, Reply

CONTENT = b"From: a@client.test\r\nSubject: t\r\nMessage-ID: <t@client.test>\r\n\r\nbody\r\n"


class Clock:
    def __init__(self) -> None:
        self.t = 1_800_000_000.0

    def __call__(self) -> float:
        return self.t


def _result(rcpt: str, kind: str) -> RecipientResult:
    if kind == "550":
        return RecipientResult(rcpt, Outcome.BOUNCED, "5.1.1", "", reply=Reply(550, "5.1.1", "no such user"),
                               mx="mx.x.test")
    if kind == "451":
        return RecipientResult(rcpt, Outcome.DEFERRED, "4.2.0", "", reply=Reply(451, "4.2.0", "later"),
                               mx="mx.x.test")
    assert kind == "relayed"
    return RecipientResult(rcpt, Outcome.DELIVERED, "2.0.0", "", reply=Reply(250, "2.0.0", "ok"), mx="mx.x.test",
                           relayed_without_dsn=True)


class FakeDeliverer:
    def __init__(self, table: dict[str, str], delay: float = 0.0) -> None:
        self.table, self.delay = table, delay

    async def deliver(self, sender: str, recipients: Sequence[str], data: bytes, **kw: Any) -> list[RecipientResult]:
        if self.delay:
            await asyncio.sleep(self.delay)
        return [_result(r, self.table[r]) for r in recipients]

    async def close(self) -> None:
        pass


def _reports(spool: DirectorySpool) -> list[Any]:
    out = []
    for e in spool.files.entries():
        if e.envelope is not None and e.envelope.is_bounce:
            out.append(email.message_from_bytes(spool.files.content(e.id), policy=email.policy.default))
    return out


def _actions(reports: list[Any]) -> list[tuple[str, str]]:
    out = []
    for m in reports:
        blocks = list(m.iter_parts())[1].get_payload()
        out += [(str(b["Final-Recipient"]), str(b["Action"])) for b in blocks[1:]]
    return sorted(out)


def _scheduler(tmp_path: Path, rcpts: list[Recipient], table: dict[str, str], age: float = 10.0,
               fail: str | None = None) -> tuple[Scheduler, DirectorySpool, Clock, Envelope]:
    """A message queued ``age`` seconds ago, due now; ``fail``: the Subject of the report whose enqueue fails
    once with ENOSPC."""
    spool = DirectorySpool(tmp_path / "spool", fsync=False)
    clock = Clock()
    env = Envelope.new("alice@client.test", rcpts, CONTENT, now=clock.t - age)
    env.next_attempt = clock.t
    spool.files.enqueue(env, CONTENT)
    if fail is not None:
        orig = spool.enqueue
        failed: list[str] = []

        async def enqueue(e: Envelope, content: bytes, **kw: Any) -> str:
            if e.is_bounce and not failed and f"Subject: {fail}".encode() in content:
                failed.append(e.id)
                raise OSError(28, "No space left on device")
            return await orig(e, content, **kw)
        spool.enqueue = enqueue  # type: ignore[method-assign,assignment]
    s = Scheduler(spool, FakeDeliverer(table), SchedulerConfig(reporting_mta="q.test"), clock=clock)
    return s, spool, clock, env


# --- item 1 --------------------------------------------------------------------------------------------------
def test_failed_report_is_queued_when_the_relayed_report_cannot_be(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    """a@ relayed to a server without DSN (NOTIFY=SUCCESS), b@ refused 550, c@ 451: the "relayed" report
    hits a full disk; b@'s bounce is queued anyway, in the same attempt, and the attempt is no internal
    error (it used to be, with b@ stored bounced and never reported)."""
    s, spool, _clock, env = _scheduler(
        tmp_path, [Recipient("a@x.test", notify=["SUCCESS", "FAILURE"]), Recipient("b@x.test"), Recipient("c@x.test")],
        {"a@x.test": "relayed", "b@x.test": "550", "c@x.test": "451"}, fail="Successful Mail Delivery Report")
    with caplog.at_level(logging.INFO, logger="postgate.queue"):
        asyncio.run(s.run_once())
    assert _actions(_reports(spool)) == [("rfc822; b@x.test", "failed")]
    assert "internal error" not in caplog.text and s.counters.values["attempt_error"] == 0
    assert s.counters.values["notify_error"] == 1 and "cannot queue the success report" in caplog.text
    _, back = asyncio.run(spool.get(env.id)) or (None, None)
    assert back is not None and [(r.address, r.status) for r in back.recipients] == [
        ("a@x.test", Outcome.DELIVERED), ("b@x.test", Outcome.BOUNCED), ("c@x.test", Outcome.DEFERRED)]


def test_failed_report_that_cannot_be_queued_keeps_its_recipient_deferred(tmp_path: Path) -> None:
    """The other way round: the "relayed" report is queued; b@, whose bounce could not be, stays deferred and
    the next attempt bounces it (the existing rule: never a silent loss)."""
    s, spool, clock, env = _scheduler(
        tmp_path, [Recipient("a@x.test", notify=["SUCCESS", "FAILURE"]), Recipient("b@x.test")],
        {"a@x.test": "relayed", "b@x.test": "550"}, fail="Undelivered Mail Returned to Sender")
    asyncio.run(s.run_once())
    assert _actions(_reports(spool)) == [("rfc822; a@x.test", "relayed")]
    _, back = asyncio.run(spool.get(env.id)) or (None, None)
    assert back is not None and back.recipients[1].status is Outcome.DEFERRED
    clock.t = back.next_attempt
    asyncio.run(s.run_once())
    assert _actions(_reports(spool)) == [("rfc822; a@x.test", "relayed"), ("rfc822; b@x.test", "failed")]
    assert asyncio.run(spool.get(env.id)) is None


# --- item 2 --------------------------------------------------------------------------------------------------
def test_reports_written_in_one_pass_have_their_own_message_ids(tmp_path: Path) -> None:
    """failed + delay warning in one pass (same second), and two reports built at the same instant."""
    s, spool, _, _ = _scheduler(tmp_path, [Recipient("a@x.test"), Recipient("b@x.test")],
                                {"a@x.test": "550", "b@x.test": "451"}, age=5 * 3600)
    asyncio.run(s.run_once())
    reports = _reports(spool)
    assert sorted(str(m["Subject"]) for m in reports) == ["Delayed Mail (still being retried)",
                                                          "Undelivered Mail Returned to Sender"]
    ids = [str(m["Message-ID"]) for m in reports]
    assert len(set(ids)) == 2
    e = Envelope.new("alice@client.test", [Recipient("a@x.test", notify=["SUCCESS", "FAILURE"])], CONTENT)
    built = [dsn.build(e, CONTENT, e.recipients, action=a, reporting_mta="mx.test", now=1e9)
             for a in ("relayed", "failed", "failed")]
    ids = [email.message_from_bytes(b)["Message-ID"] for b in built if b]
    assert len(ids) == 3 and len(set(ids)) == 3
    assert all(re.fullmatch(r"<[^<>@\s]+@mx\.test>", i) for i in ids)


# --- item 3 --------------------------------------------------------------------------------------------------
EIGHT_MX = "; ".join(f"host mx{i}.example.net[192.0.2.{i}] refused to talk to me: 554 5.7.1 "
                     f"Service unavailable; client host [198.51.100.7] blocked using zen.example.org; "
                     f"see https://www.example.org/query/ip/198.51.100.7 for the reason, attempt {i}"
                     for i in range(1, 9))
LONG_REPLY = Reply(550, "5.1.1", " ".join(f"word{i:04d}" for i in range(220)))          # 2000+ characters
LONG_LINES = Reply(550, "5.1.1", "\n".join("the recipient's mailbox is unavailable " * 12 for _ in range(5)))
ONE_WORD = Reply(550, "5.1.1", "x" * 2000)                                               # no space to fold at


def _lines(out: bytes) -> list[bytes]:
    assert b"\n" not in out.replace(b"\r\n", b"")   # CRLF only
    return out.split(b"\r\n")


@pytest.mark.parametrize("case", ["eight-mx", "long-reply", "long-lines", "one-word"])
@pytest.mark.parametrize("action", ["failed", "delayed"])
def test_no_line_of_a_dsn_exceeds_998_octets(case: str, action: str) -> None:
    """Postgate's own smtpd refuses longer lines (554), and a DSN's loss is silent (null sender). The
    delivery-status fields fold at white space (RFC 3464 §2.1): unfolded, the text is the server's."""
    env = Envelope.new("alice@client.test", [Recipient("bob@example.net")], CONTENT)
    r = env.recipients[0]
    if case == "eight-mx":
        r.record(RecipientResult("bob@example.net", Outcome.DEFERRED, "4.7.1", EIGHT_MX))
        r.explain("message expired after 5 days in queue: " + r.reason)
        text = r.reason
    else:
        rep = {"long-reply": LONG_REPLY, "long-lines": LONG_LINES, "one-word": ONE_WORD}[case]
        r.record(RecipientResult("bob@example.net", Outcome.BOUNCED, rep.status, "", reply=rep, mx="mx.example.net"))
        text = str(rep).replace("\n", " ").rstrip()
    assert len(text) >= 1000
    out = dsn.build(env, CONTENT, env.recipients, action=action, reporting_mta="mx.test", now=1e9)
    assert out is not None
    lines = _lines(out)
    assert max(len(ln) for ln in lines) <= 998
    if case != "one-word":      # words of normal length: every line within RFC 5322's 78
        assert max(len(ln) for ln in lines) <= 78, max(lines, key=len)
    m = email.message_from_bytes(out, policy=email.policy.compat32)
    human, status = list(m.get_payload())[:2]
    block = status.get_payload()[1]
    diag = re.sub(r"\r?\n", "", block["Diagnostic-Code"])       # RFC 5322 §2.2.3 unfolding
    if case == "one-word":      # cut where there is no white space: nothing lost but the cut
        assert diag.replace(" ", "") == f"smtp;{text}".replace(" ", "")
    else:
        assert diag == f"{'X-Postgate' if case == 'eight-mx' else 'smtp'}; {text}"
        words = human.get_payload(decode=True).decode().split()
        assert " ".join(words[-len(text.split()):]) == " ".join(text.split())


# --- item 4 --------------------------------------------------------------------------------------------------
def _parts(out: bytes) -> list[Any]:
    return list(email.message_from_bytes(out, policy=email.policy.compat32).get_payload())


def test_relayed_report_is_7bit_without_section_sign() -> None:
    env = Envelope.new("alice@client.test", [Recipient("bob@example.net", notify=["SUCCESS"])], CONTENT)
    env.recipients[0].record(RecipientResult("bob@example.net", Outcome.DELIVERED, "2.0.0", "",
                                             reply=Reply(250, "2.0.0", "ok"), mx="mx.example.net"))
    out = dsn.build(env, CONTENT, env.recipients, action="relayed", reporting_mta="mx.test", now=1e9)
    assert out is not None and out.isascii()
    human = _parts(out)[0]
    assert human.get_content_charset() == "us-ascii" and "RFC 3461 section 5.2.2" in " ".join(
        human.get_payload().split())


def test_utf8_reply_goes_in_quoted_printable_and_as_question_marks_in_the_status_part() -> None:
    """RFC 6531 §3.7.4: a server may answer in UTF-8. The explanation carries it (charset=utf-8, quoted-
    printable); the message/delivery-status part is US-ASCII (RFC 3464 §2.1): "?" in its place."""
    reply = Reply(550, "5.1.1", "Ungültiger Empfänger — ça n'existe pas")
    env = Envelope.new("alice@client.test", [Recipient("bob@example.net")], CONTENT)
    env.recipients[0].record(RecipientResult("bob@example.net", Outcome.BOUNCED, "5.1.1", "", reply=reply,
                                             mx="mx.example.net"))
    out = dsn.build(env, CONTENT, env.recipients, action="failed", reporting_mta="mx.test", now=1e9)
    assert out is not None and out.isascii()
    human, status = _parts(out)[:2]
    assert human.get_content_charset() == "utf-8"
    assert human["Content-Transfer-Encoding"] == "quoted-printable"
    assert str(reply) in " ".join(human.get_payload(decode=True).decode("utf-8").split())
    assert status.get_payload()[1]["Diagnostic-Code"] == "smtp; 550 5.1.1 Ung?ltiger Empf?nger ? ?a n'existe pas"


@pytest.mark.parametrize(("address", "field"), [
    ("bob@example.net", "rfc822; bob@example.net"),
    ('"bob smith"@example.net', 'rfc822; "bob smith"@example.net'),    # ASCII: rfc822, the space as it is
    ('"a;b"@example.net', 'rfc822; "a;b"@example.net'),                # a ";" is no address type
    ("jörg@example.net", "utf-8; j\\x{F6}rg@example.net"),              # RFC 6533 §3: 2-digit form below 0x100
    ("δοκιμή@παράδειγμα.δοκιμή",
     "utf-8; \\x{3B4}\\x{3BF}\\x{3BA}\\x{3B9}\\x{3BC}\\x{3AE}@\\x{3C0}\\x{3B1}\\x{3C1}\\x{3AC}\\x{3B4}\\x{3B5}"
     "\\x{3B9}\\x{3B3}\\x{3BC}\\x{3B1}.\\x{3B4}\\x{3BF}\\x{3BA}\\x{3B9}\\x{3BC}\\x{3AE}"),
    ('"a+b=c\\\\d é"@x.test', 'utf-8; "a\\x{2B}b\\x{3D}c\\x{5C}\\x{5C}d\\x{20}\\x{E9}"@x.test'),
    ("😀@x.test", "utf-8; \\x{1F600}@x.test"),
])
def test_final_recipient_address_type(address: str, field: str) -> None:
    """RFC 3464 §2.3.2 and RFC 6533 §3: an ASCII address is rfc822; a non-ASCII one is utf-8 in the 7-bit
    utf-8-addr-xtext form (QCHAR, else \\x{HEXPOINT}), as a message/delivery-status part needs."""
    env = Envelope.new("alice@client.test", [Recipient(address)], CONTENT, smtputf8=not address.isascii())
    env.recipients[0].record(RecipientResult(address, Outcome.BOUNCED, "5.1.1", "",
                                             reply=Reply(550, "5.1.1", "no such user"), mx="mx"))
    out = dsn.build(env, CONTENT, env.recipients, action="failed", reporting_mta="mx.test", now=1e9)
    assert out is not None and out.isascii()
    block = _parts(out)[1].get_payload()[1]
    assert re.sub(r"\r?\n", "", block["Final-Recipient"]) == field
    human = _parts(out)[0].get_payload(decode=True).decode("utf-8")
    assert f"<{address}>" in human
    if not address.isascii():
        addr = field.split("; ", 1)[1]   # HEXPOINT: no leading zero but the 2-digit forms, upper case
        assert all(re.fullmatch(r"[2-7][0-9A-F]|5C|[89A-F][0-9A-F]|[1-9A-F][0-9A-F]{2,3}|[1-9A-F][0-9A-F]{4}|10[0-9A-F]{4}", h)
                   for h in re.findall(r"\\x\{([^}]*)\}", addr))


def test_non_ascii_original_recipient_is_utf8_type() -> None:
    """An ORCPT read back with non-ASCII (an older queue file): RFC 6533 §3's utf-8 type, not xtext octets
    under rfc822; an ASCII one stays as the sender gave it."""
    env = Envelope.new("alice@client.test", [Recipient("j@x.test", orcpt="rfc822;jörg@x.test"),
                                             Recipient("k@x.test", orcpt="rfc822;k@x.test")], CONTENT)
    for r in env.recipients:
        r.record(RecipientResult(r.address, Outcome.BOUNCED, "5.1.1", "", reply=Reply(550, "5.1.1", "no"), mx="mx"))
    out = dsn.build(env, CONTENT, env.recipients, action="failed", reporting_mta="mx.test", now=1e9)
    assert out is not None and out.isascii()
    blocks = _parts(out)[1].get_payload()
    assert blocks[1]["Original-Recipient"] == "utf-8;j\\x{F6}rg@x.test"
    assert blocks[2]["Original-Recipient"] == "rfc822;k@x.test"


# --- item 5 --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("action", "ret", "returned"), [
    ("delayed", None, "text/rfc822-headers"),
    ("delayed", "FULL", "text/rfc822-headers"),
    ("relayed", None, "text/rfc822-headers"),
    ("relayed", "FULL", "text/rfc822-headers"),
    ("delivered", "FULL", "text/rfc822-headers"),
    ("failed", None, "message/rfc822"),
    ("failed", "FULL", "message/rfc822"),
    ("failed", "HDRS", "text/rfc822-headers"),
])
def test_ret_applies_to_failed_reports_only(action: str, ret: str | None, returned: str) -> None:
    """RFC 3461 §4.3: RET concerns failure reports; delay and success reports carry the headers only
    (as Postfix's do)."""
    env = Envelope.new("alice@client.test", [Recipient("bob@example.net", notify=["SUCCESS", "DELAY", "FAILURE"])],
                       CONTENT, ret=ret)
    out = dsn.build(env, CONTENT, env.recipients, action=action, reporting_mta="mx.test", now=1e9,
                    retry_until=1e9 + 86400)
    assert out is not None
    part = _parts(out)[2]
    assert part.get_content_type() == returned
    if returned == "text/rfc822-headers":
        assert b"\r\n\r\nbody\r\n" not in out.split(b"Content-Type: text/rfc822-headers", 1)[1]


# --- item 6 --------------------------------------------------------------------------------------------------
def test_late_prequeue_result_relayed_without_dsn_gets_its_relayed_report(tmp_path: Path) -> None:
    """The pre-queue budget runs out, the message is queued, and the results come late: a@ relayed to a
    server without DSN (NOTIFY=SUCCESS) gets its "relayed" report, b@ (550) its bounce."""
    from postgate.inbound.prequeue import PreQueue, PreQueueConfig
    from postgate.inbound.relay import RelayPolicy
    from postgate.inbound.smtpd import Listener, Session
    from postgate.outbound.queue.protocol import State

    spool = DirectorySpool(tmp_path / "spool", fsync=False)
    deliverer = FakeDeliverer({"a@x.test": "relayed", "b@x.test": "550", "c@x.test": "451"}, delay=0.3)
    pq = PreQueue(PreQueueConfig(hostname="mx.test", budget=0.05), RelayPolicy.build([], []), deliverer,
                  spool, Scheduler(spool, deliverer, SchedulerConfig(reporting_mta="mx.test")))
    qid = "0000000000000AABBCC1"
    s = Session(Listener("mx", "127.0.0.1", 25), ("192.0.2.1", 1234), helo="client.test", sender="alice@client.test",
                recipients=[("a@x.test", {"NOTIFY": "SUCCESS,FAILURE"}), ("b@x.test", {}), ("c@x.test", {})],
                queue_id=qid, user="alice")

    async def run() -> None:
        reply = await pq.message(s, CONTENT)
        assert reply.code == 250 and "queued" in reply.text
        while pq.late:
            await asyncio.gather(*pq.late)
    asyncio.run(run())
    assert _actions(_reports(spool)) == [("rfc822; a@x.test", "relayed"), ("rfc822; b@x.test", "failed")]
    found = asyncio.run(spool.get(qid))
    assert found is not None and found[0] == State.INCOMING
    assert [r.status for r in found[1].recipients] == [Outcome.DELIVERED, Outcome.BOUNCED, Outcome.DEFERRED]
