"""End to end through the smtpd: Sieve as a stage-hook filter (issue 17, "Must be shown").

In-process (``tests/smtpd_harness.py``, the real SMTPServer on a loopback socket): a data-stage ``reject``
reaches the client as a 5xx after the end of DATA and nothing is queued (so no bounce); a script's
per-destination ``tls_policy`` reaches the session's routes for that recipient only; a run-time error
applies the default action in the session.

The real daemon on the test network (``postgate serve`` with a ``[sieve]`` section): the same reject
reaches an SMTP client as a 550 and the queue holds no bounce, while other mail is delivered with the
script's header edit; SIGHUP reloads the script, a broken new version keeps the old one running.
"""

from __future__ import annotations

import json
import secrets
import signal
import smtplib
import subprocess
import sys
import time
from pathlib import Path

import pytest
from postgate.inbound.filters import Route
from postgate.inbound.sieve_filter import SieveFilter, SieveScripts, SieveSettings

from fixtures.pgserve import TRUSTED, PostgateServer
from fixtures.testnet import TestNet
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
        # RFC 2034 §4: the enhanced status code on every line
        assert replies[-1].startswith(b"550-5.7.1 Your message looks like spam.\r\n550 5.7.1 ")
        assert replies[-1].endswith(b"Contact postmaster if this is wrong.\r\n")
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


# --- the real daemon on the test network -----------------------------------------------------------------

PG_ADDRESS = "127.0.2.17"     # this module's own postgate serve
DAEMON_SCRIPT = """require ["reject", "editheader", "envelope", "vnd.postgate"];
if header :contains "subject" "lottery" { reject "Lottery mail is not accepted here"; }
if envelope :domain :is "to" "dane-ok.test" { tls_policy "dane-only"; }
if header :contains "subject" "sign-s2" { dkim_sign :selector "s2" "own.test"; }
if header :contains "subject" "sign-nokey" { dkim_sign "nokey.test"; }
addheader "X-Sieve" "v1";
"""


@pytest.fixture(scope="module")
def pg(testnet: TestNet, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    d = tmp_path_factory.mktemp("pgsieve")
    (d / "global.sieve").write_text(DAEMON_SCRIPT)
    srv = PostgateServer(testnet, d, address=PG_ADDRESS, sieve={"script": str(d / "global.sieve")})
    with srv:
        yield srv


def send(subject: str, rcpt: str) -> tuple[int, str]:
    token = secrets.token_hex(8)
    body = (f"From: a@client.test\r\nSubject: {subject} {token}\r\nMessage-ID: <{token}@client.test>\r\n\r\n"
            f"hi {token}\r\n").encode()
    with smtplib.SMTP(PG_ADDRESS, 25, timeout=30, source_address=(TRUSTED, 0)) as s:
        s.ehlo("client.test")
        s.mail("a@client.test")
        s.rcpt(rcpt)
        code_, text = s.data(body)
    return code_, f"{text.decode()} {token}"


def queued(pg: PostgateServer) -> list[dict]:  # type: ignore[type-arg]
    out = subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(pg.spool), "list",
                          "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
    return list(json.loads(out))


def test_daemon_data_stage_reject_is_a_5xx_and_no_bounce(pg: PostgateServer, testnet: TestNet) -> None:
    code_, text = send("You won the lottery", "bob@dane-ok.test")
    token = text.split()[-1]
    assert code_ == 550 and text.startswith("5.7.1 Lottery mail is not accepted here")
    assert [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]] == []
    # nothing was accepted, so nothing can bounce: no DSN (null sender) and no copy in the queue
    assert not [m for m in queued(pg) if m.get("sender") == "" or token in json.dumps(m)]
    assert "sieve" in pg.log() and "reject: Lottery mail" in pg.log()


def test_daemon_other_mail_flows_with_the_header_edit(pg: PostgateServer, testnet: TestNet) -> None:
    code_, text = send("Quarterly report", "bob@dane-ok.test")
    token = text.split()[-1]
    assert code_ == 250, text
    [m] = [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]]
    assert "X-Sieve: v1\r\n" in m["data"]


def wait_for(pg: PostgateServer, needle: str, offset: int) -> None:
    deadline = time.monotonic() + 20
    while needle not in pg.log()[offset:]:
        assert time.monotonic() < deadline, f"no {needle!r} in the log: {pg.log()[offset:][-2000:]}"
        time.sleep(0.05)


def test_daemon_sighup_reloads_and_a_broken_script_keeps_the_old_one(pg: PostgateServer, testnet: TestNet) -> None:
    script = pg.dir / "global.sieve"
    assert pg.proc is not None
    offset = len(pg.log())
    script.write_text('require "reject";\nif header :contains "subject" "v2" { reject "v2 says no" }\n')  # no ';'
    pg.proc.send_signal(signal.SIGHUP)
    # a reload re-reads the whole TOML file (issue 19) and its check compiles the script, so the broken script
    # refuses the reload as a whole: the line names the script and says the previous version keeps running
    wait_for(pg, f"the Sieve script {script} does not compile, its previous version keeps running", offset)
    assert f"{script}:2:" in pg.log()[offset:]
    code_, text = send("lottery v2", "bob@dane-ok.test")
    assert code_ == 550 and "Lottery mail" in text          # the old script still runs
    code_, text = send("v2 only", "bob@dane-ok.test")
    assert code_ == 250, text                               # … and not the broken one
    [m] = [m for m in testnet.received("mx.dane-ok.test") if text.split()[-1] in m["data"]]
    assert "X-Sieve: v1\r\n" in m["data"]                   # the old script's header edit
    offset = len(pg.log())
    script.write_text('require "reject";\nif header :contains "subject" "v2" { reject "v2 says no"; }\n')
    pg.proc.send_signal(signal.SIGHUP)
    wait_for(pg, "sieve: scripts reloaded", offset)
    code_, text = send("lottery v2", "bob@dane-ok.test")
    assert code_ == 550 and text.startswith("5.7.1 v2 says no")
    script.write_text(DAEMON_SCRIPT)
    offset = len(pg.log())
    pg.proc.send_signal(signal.SIGHUP)
    wait_for(pg, "sieve: scripts reloaded", offset)


# --- spamtest on rspamd's score (RFC 5235), through the real rspamd milter ----------------------------

SPAM_SCRIPT = """require ["spamtest", "relational", "comparator-i;ascii-numeric", "vnd.postgate"];
if spamtest :value "eq" :comparator "i;ascii-numeric" "0" { hold "not scored"; }
elsif spamtest :value "ge" :comparator "i;ascii-numeric" "1" { hold "scored by rspamd"; }
"""


async def _data_verdict(filters: list[object], msg: bytes) -> object:
    from postgate.inbound.filters import FilterChain, Stage, StageContext
    chain = FilterChain(filters)  # type: ignore[arg-type]
    ctx = StageContext(Stage.CONNECT, "mx", "192.0.2.10", hostname="mx.own.test", local_address="127.0.2.1",
                       local_port=25)
    try:
        for stage in (Stage.CONNECT, Stage.HELO, Stage.MAIL, Stage.RCPT):
            ctx.stage = stage
            if stage is Stage.HELO:
                ctx.helo, ctx.esmtp = "client.example", True
            if stage is Stage.MAIL:
                ctx.sender, ctx.queue_id = "alice@own.test", "4F1A2B3C4E"
            if stage is Stage.RCPT:
                ctx.recipient = "bob@dane-ok.test"
            assert not (await chain.on(ctx)).verdict.final
        ctx.recipients, ctx.recipient = ["bob@dane-ok.test"], None
        ctx.stage, ctx.message, ctx.size = Stage.DATA, msg, len(msg)
        out = await chain.on(ctx)
        assert not out.verdict.final, out.verdict
        return out.hold
    finally:
        await chain.close()


def test_spamtest_reads_the_score_rspamd_just_added(testnet: TestNet, tmp_path: Path) -> None:
    """RFC 5235 §3.1 with the score of the filter that tested the message: rspamd (milter) adds
    X-Spamd-Result before Sieve runs; PassEdits (the daemon wraps the milters with it) lets the script see it."""
    import asyncio

    from postgate.inbound.filters import Action
    from postgate.inbound.milter import MilterFilter, MilterSettings
    from postgate.inbound.sieve_filter import PassEdits

    from fixtures.filterd import Rspamd

    f = tmp_path / "spam.sieve"
    f.write_text(SPAM_SCRIPT)
    sieve = SieveFilter(SieveScripts(SieveSettings(script=str(f), spam_header="X-Spamd-Result")))
    msg = (b"From: Alice <alice@own.test>\r\nTo: Bob <bob@dane-ok.test>\r\nSubject: lunch\r\n"
           b"Date: Wed, 02 Dec 2026 00:00:00 +0000\r\nMessage-ID: <lunch1@own.test>\r\n\r\nlunch at noon?\r\n")
    d = Rspamd().start()
    try:
        def rspamd() -> MilterFilter:
            return MilterFilter(MilterSettings("rspamd", d.address, connect_timeout=20, command_timeout=20,
                                               content_timeout=20, default_action=Action.TEMPFAIL))
        v = asyncio.run(_data_verdict([PassEdits(rspamd()), sieve], msg))
        assert v is not None and v.filter == "sieve" and v.quarantine_reason == "scored by rspamd", v  # type: ignore[attr-defined]
        # without passing the milter's edits on, the script sees the message as received: untested (0)
        v = asyncio.run(_data_verdict([rspamd(), sieve], msg))
        assert v is not None and v.quarantine_reason == "not scored", v  # type: ignore[attr-defined]
    finally:
        d.stop()


def _signatures(data: str) -> list[tuple[str, str, str]]:
    """(d=, s=, a=) of each DKIM-Signature field of a received message, in order."""
    import email
    import email.policy
    msg = email.message_from_string(data, policy=email.policy.compat32)
    out = []
    for field in msg.get_all("DKIM-Signature") or []:
        tags = dict(t.strip().split("=", 1) for t in "".join(field.split()).split(";") if "=" in t)
        out.append((tags["d"], tags["s"], tags["a"]))
    return out


def test_daemon_dkim_sign_chooses_the_key(pg: PostgateServer, testnet: TestNet) -> None:
    """Sieve ``dkim_sign :selector "s2" "own.test"`` signs with that key only (and it verifies); without a
    choice both of own.test's keys sign; a domain with no key is logged and signed as usual (docs/sieve.md)."""
    import dkim
    got = {}
    for subject in ("sign-s2", "plain", "sign-nokey"):
        code_, text = send(subject, "bob@dane-ok.test")
        assert code_ == 250, text
        token = text.split()[-1]
        [m] = [m for m in testnet.received("mx.dane-ok.test") if token in m["data"]]
        got[subject] = m["data"]
    assert _signatures(got["sign-s2"]) == [("own.test", "s2", "ed25519-sha256")]
    assert dkim.verify(got["sign-s2"].encode())
    both = [("own.test", "s1", "rsa-sha256"), ("own.test", "s2", "ed25519-sha256")]
    assert _signatures(got["plain"]) == both
    assert _signatures(got["sign-nokey"]) == both
    assert "dkim_sign: no key for nokey.test" in pg.log()


PRIORITY_SCRIPT = """require ["vnd.postgate"];
if header :contains "subject" "urgent" { queue_priority 9; }
elsif header :contains "subject" "newsletter" { queue_priority 1; }
"""


def test_queue_priority_reaches_the_queue_and_is_leased_first(tmp_path: Path) -> None:
    """``queue_priority`` (vnd.postgate) end to end: the smtpd runs the script at the end of DATA, its route
    is stored on the queued envelope (prequeue.apply_routes, as the queue-first path does), and a
    backlog of low-priority newsletters due before it does not hold back the urgent message: the spool
    leases it first."""
    import asyncio

    from postgate.inbound.prequeue import apply_routes
    from postgate.outbound.queue.envelope import Envelope, Recipient
    from postgate.outbound.queue.spool import DirectorySpool

    f = tmp_path / "prio.sieve"
    f.write_text(PRIORITY_SCRIPT)
    sieve = SieveFilter(SieveScripts(SieveSettings(listener_scripts={"mx": str(f)}, hostname="smtpd.test")))
    subjects = [b"newsletter 1", b"newsletter 2", b"newsletter 3", b"hello", b"urgent: server down"]
    with serve(filters=[sieve]) as srv, Client(srv.port) as c:
        assert code(c.reply()) == 220
        assert code(c.cmd(b"EHLO client.test")) == 250
        for subject in subjects:
            assert [code(r) for r in transaction(c, [b"ops@example.net"], subject)] == [250, 250, 354, 250]
    spool = DirectorySpool(tmp_path / "spool")
    queued = []

    async def run() -> list[Envelope]:
        for n, ((sender, rcpts, data, _), routes) in enumerate(zip(srv.handler.messages, srv.handler.routes,
                                                                   strict=True)):
            env = Envelope.new(sender, [Recipient(r) for r in rcpts], data, now=1_800_000_000.0 + n)
            apply_routes(env, routes)
            await spool.enqueue(env, data)
            queued.append(env)
        try:
            return [env for _, env in await spool.lease_due(1_800_000_100.0, "n", 60, 1)]
        finally:
            await spool.unlock()
    [first] = asyncio.run(run())
    assert [e.priority for e in queued] == [1, 1, 1, 5, 9]
    assert first.id == queued[-1].id and first.priority == 9
    # the operator sees it (postgate queue list)
    out = subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(tmp_path / "spool"), "list",
                          "--json"], capture_output=True, text=True, timeout=60, check=True).stdout
    assert {m["id"]: m["priority"] for m in json.loads(out)} == {e.id: e.priority for e in queued}
    text = subprocess.run([sys.executable, "-m", "postgate.cli", "queue", "--spool", str(tmp_path / "spool"), "list"],
                          capture_output=True, text=True, timeout=60, check=True).stdout
    assert text.count("priority 1") == 3 and text.count("priority 9") == 1 and "priority 5" not in text
