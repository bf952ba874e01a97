"""Issue 20: Postgate's own SMTP client wire (outbound/smtp_wire.py).

The reply parser (RFC 5321 §4.2) as a table and under hypothesis; the framing and failure cases against tiny
raw servers written here — they are the adversary (split replies, several replies in one segment, endless
lines, STARTTLS response injection, silence), not stand-ins for a real peer; and PIPELINING (RFC 2920)
against a real Postfix, with per-recipient results.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postgate.outbound import delivery, smtp_wire
from postgate.outbound.smtp_client import Session, SessionError, Timeouts, open_session
from postgate.outbound.smtp_wire import ProtocolError, ReplyParser
from postgate.policy.tls import Auth, Level, Policy, Requirement, TLSMode
from postgate.policy.vocab import Outcome, Reply

from fixtures.testnet import TestNet

from .smtpd_harness import tls_context
from .test_delivery import deliverer, message

T = TypeVar("T")

FAST = Timeouts(connect=3, greeting=3, command=3, tls=3, data=5)
PLAIN = Requirement(Level.NONE, TLSMode.NONE, Auth.NONE)

# --- the reply parser ------------------------------------------------------------------------------------

PARSE = [  # (wire, replies as (code, enhanced, text)) — RFC 5321 §4.2, RFC 2034 §4
    (b"220 mx.test ESMTP\r\n", [(220, "", "mx.test ESMTP")]),
    (b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 1000\r\n", [(250, "", "mx.test\nPIPELINING\nSIZE 1000")]),
    (b"550 5.1.1 no such user\r\n", [(550, "5.1.1", "no such user")]),
    (b"451-4.3.0 first\r\n451-4.3.0 second\r\n451 4.3.0 last\r\n", [(451, "4.3.0", "first\nsecond\nlast")]),
    (b"250\r\n", [(250, "", "")]),                                     # §4.2: the text is optional
    (b"250 ok\n", [(250, "", "ok")]),                                  # a bare LF is taken as the line end
    (b"250 2.1.0 ok\r\n550 5.1.1 no\r\n354 go\r\n", [(250, "2.1.0", "ok"), (550, "5.1.1", "no"), (354, "", "go")]),
    (b"550 4.1.1 wrong class\r\n", [(550, "", "4.1.1 wrong class")]),  # RFC 3463 §2: the class must match
    (b"250 ok\r\n250-par", [(250, "", "ok")]),                        # the rest waits for more bytes
]

BAD = [  # wire that is not SMTP, or too much of it
    b"hello\r\n",
    b"25 short\r\n",
    b"250xok\r\n",
    b"650 no such class\r\n",
    b"250-a\r\n251 b\r\n",                 # §4.2.1: the code changed within a multi-line reply
    b"250 " + b"x" * 5000 + b"\r\n",       # §4.5.3.1.5: a line far beyond 512 octets
    b"250 " + b"x" * 5000,                 # … even before its end arrives
    b"250-x\r\n" * 300,                    # too many lines
]


def _replies(parser: ReplyParser, wire: bytes) -> list[tuple[int, str, str]]:
    return [(r.code, r.enhanced, r.text) for r in parser.feed(wire)]


def test_parse_table() -> None:
    for wire, want in PARSE:
        assert _replies(ReplyParser(), wire) == want, wire
        p = ReplyParser()  # one byte at a time: the same replies
        got = [x for i in range(len(wire)) for x in _replies(p, wire[i:i + 1])]
        assert got == want, wire


def test_parse_errors() -> None:
    for wire in BAD:
        with pytest.raises(ProtocolError):
            ReplyParser().feed(wire)


codes = st.integers(200, 599).filter(lambda c: c // 10 % 10 <= 5)
texts = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(codes, st.lists(texts, min_size=1, max_size=5)), min_size=1, max_size=6),
       st.lists(st.integers(1, 40), min_size=1, max_size=30))
def test_fuzz_replies_survive_any_segmentation(replies: list[tuple[int, list[str]]], cuts: list[int]) -> None:
    """Replies written by Reply.line() come back whole and in order however the bytes are cut."""
    want = [smtp_wire.make_reply(c, [t.rstrip() if i else t for i, t in enumerate(lines)]) for c, lines in replies]
    wire = b"".join(Reply(r.code, r.enhanced, r.text).line() for r in want)
    p, got, pos, i = ReplyParser(), [], 0, 0
    while pos < len(wire):
        n = cuts[i % len(cuts)]
        got += p.feed(wire[pos:pos + n])
        pos, i = pos + n, i + 1
    assert [(r.code, r.text.split("\n")) for r in got] == [(r.code, r.text.split("\n")) for r in want]
    assert not p.pending


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 64))
def test_fuzz_hostile_bytes(wire: bytes, chunk: int) -> None:
    """Any bytes: replies or ProtocolError, nothing else, and the buffer stays bounded."""
    p = ReplyParser()
    try:
        for i in range(0, len(wire), chunk):
            for r in p.feed(wire[i:i + chunk]):
                assert 200 <= r.code <= 599
            assert len(p._rest) <= smtp_wire.MAX_LINE
    except ProtocolError:
        pass


@settings(max_examples=500, deadline=None)
@given(st.lists(st.sampled_from([b"a", b".", b"\r\n", b"\n", b"\r", b"\r\n.", b"\xff"]), max_size=30))
def test_bdat_content_is_data_content_without_transparency(parts: list[bytes]) -> None:
    """RFC 3030 §2 vs RFC 5321 §4.5.2: BDAT carries the canonical content; DATA the same, dot-stuffed, and the
    end-of-data line — so the server stores the same message either way."""
    from postgate.outbound import smtp_data
    c = smtp_data.canonical(b"".join(parts))
    assert c.endswith(b"\r\n") and smtp_data.crlf_only(c)
    stuffed = (b"." if c.startswith(b".") else b"") + c.replace(b"\r\n.", b"\r\n..")
    assert smtp_data.encode(b"".join(parts)) == stuffed + b".\r\n"


# --- raw adversary servers -------------------------------------------------------------------------------

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def _serve(handler: Handler) -> tuple[asyncio.Server, int]:
    async def guarded(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        try:
            await handler(r, w)
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
            pass
        finally:
            w.close()
    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def _lines(reader: asyncio.StreamReader) -> bytes:
    return await asyncio.wait_for(reader.readline(), 10)


async def _ehlo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, extensions: bytes) -> None:
    writer.write(b"220 adversary.test ESMTP\r\n")
    assert (await _lines(reader)).startswith(b"EHLO client.test")
    writer.write(b"250-adversary.test\r\n" + extensions)
    await writer.drain()


def _group_server(until: bytes, replies: bytes) -> Handler:
    """A PIPELINING server that reads a command group up to ``until`` and answers it with ``replies`` in one
    segment, then waits for the next line (QUIT)."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, b"250 PIPELINING\r\n")
        await asyncio.wait_for(reader.readuntil(until), 10)
        writer.write(replies)
        await writer.drain()
        await _lines(reader)
    return handler


# The client runs on the daemon's loop: asyncio's or uvloop's (the default since issue 20), whose transports
# are not asyncio.Transport subclasses. The tests against real peers run on both.
LOOPS = pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])


def _run(coro: Awaitable[T], event_loop: str = "asyncio") -> T:
    if event_loop == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)  # type: ignore[arg-type]
    return asyncio.run(coro)  # type: ignore[arg-type]


async def _open(port: int, req: Requirement = PLAIN, timeouts: Timeouts = FAST) -> Session:
    return await open_session("127.0.0.1", port, "adversary.test", req, helo="client.test", timeouts=timeouts)


@LOOPS
def test_split_replies_and_several_in_one_segment(event_loop: str) -> None:
    """The greeting and EHLO reply arrive one byte per segment; the five pipelined replies in one segment.
    The client sent MAIL, both RCPTs and DATA in one write (RFC 2920 §3.1), the content after the 354 in one."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in b"220-adversary.test\r\n220 slow ESMTP\r\n":
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.002)
        assert (await _lines(reader)).startswith(b"EHLO")
        for b in b"250-adversary.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n":
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.002)
        group = await asyncio.wait_for(reader.read(65536), 10)
        seen.append(group)
        writer.write(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n550 5.1.1 no such user\r\n451 4.3.0 later\r\n354 go\r\n")
        body = b""
        while not body.endswith(b"\r\n.\r\n"):
            body += await asyncio.wait_for(reader.read(65536), 10)
        seen.append(body)
        writer.write(b"250 2.0.0 queued as X\r\n")
        await writer.drain()
        await _lines(reader)  # QUIT
        writer.write(b"221 bye\r\n")

    async def go() -> list[delivery.RecipientResult]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            assert s.supports("PIPELINING") and s.supports("8bitmime")
            try:
                return await delivery._transaction(s, "a@client.test", ["ok@x.test", "no@x.test", "later@x.test"],
                                                   b"Subject: t\r\n\r\n.dot\r\n", [])
            finally:
                await s.close()
    results = _run(go(), event_loop)
    assert [(r.status, r.dsn) for r in results] == [
        (Outcome.DELIVERED, "2.0.0"), (Outcome.BOUNCED, "5.1.1"), (Outcome.DEFERRED, "4.3.0")]
    assert seen[0] == (b"MAIL FROM:<a@client.test>\r\nRCPT TO:<ok@x.test>\r\nRCPT TO:<no@x.test>\r\n"
                       b"RCPT TO:<later@x.test>\r\nDATA\r\n")
    assert seen[1] == b"Subject: t\r\n\r\n..dot\r\n.\r\n"


def test_all_recipients_refused_but_data_354() -> None:
    """RFC 2920 §3.1: DATA accepted although no RCPT was: the client sends the end-of-data dot alone and
    reports each recipient's own refusal; the connection stays usable (RSET first on reuse)."""
    after_354: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, b"250 PIPELINING\r\n")
        group = b""
        while not group.endswith(b"DATA\r\n"):
            group += await asyncio.wait_for(reader.read(65536), 10)
        writer.write(b"250 ok\r\n550 5.1.1 no\r\n452 4.2.2 full\r\n354 send it anyway\r\n")
        after_354.append(await _lines(reader))
        writer.write(b"554 5.5.1 no valid recipients\r\n")
        group = b""
        while not group.endswith(b"DATA\r\n"):
            group += await asyncio.wait_for(reader.read(65536), 10)
        assert group.startswith(b"RSET\r\nMAIL FROM:<>")
        writer.write(b"250 reset\r\n250 ok\r\n250 ok\r\n354 go\r\n")
        after_354.append(await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 10))
        writer.write(b"250 2.0.0 queued\r\n")
        await writer.drain()
        await _lines(reader)

    async def go() -> tuple[list[delivery.RecipientResult], list[delivery.RecipientResult]]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            try:
                first = await delivery._transaction(s, "a@client.test", ["no@x.test", "full@x.test"], b"m\r\n", [])
                assert s.alive
                s.messages += 1
                second = await delivery._transaction(s, "", ["yes@x.test"], b"m\r\n", [])
                return first, second
            finally:
                await s.close()
    first, second = asyncio.run(go())
    assert [(r.status, r.dsn, r.reply and r.reply.code) for r in first] == [
        (Outcome.BOUNCED, "5.1.1", 550), (Outcome.DEFERRED, "4.2.2", 452)]
    assert [(r.status, r.dsn) for r in second] == [(Outcome.DELIVERED, "2.0.0")]
    assert after_354 == [b".\r\n", b"m\r\n.\r\n"]


def test_data_refused_after_pipelined_recipients() -> None:
    """DATA refused (554): the accepted recipient takes DATA's reply, the refused one keeps its own."""
    handler = _group_server(b"DATA\r\n", b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n554 5.7.1 content refused before it came\r\n")

    async def go() -> list[delivery.RecipientResult]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            try:
                return await delivery._transaction(s, "a@client.test", ["yes@x.test", "no@x.test"], b"m\r\n", [])
            finally:
                await s.close()
    assert [(r.status, r.dsn) for r in asyncio.run(go())] == [(Outcome.BOUNCED, "5.7.1"), (Outcome.BOUNCED, "5.1.1")]


def test_ehlo_refused_falls_back_to_helo_and_lockstep() -> None:
    """RFC 5321 §3.2: a server that refuses EHLO with 5xx gets HELO; then no extensions, so no pipelining:
    one command, one reply."""
    commands: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"220 old.test SMTP\r\n")
        while True:
            line = await _lines(reader)
            if not line:
                return
            commands.append(line.split(b" ")[0].strip())
            if line.startswith(b"EHLO"):
                writer.write(b"502 5.5.2 what?\r\n")
            elif line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await reader.readuntil(b"\r\n.\r\n")
                writer.write(b"250 ok\r\n")
            elif line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                return
            else:
                writer.write(b"250 ok\r\n")
            await writer.drain()

    async def go() -> list[delivery.RecipientResult]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            assert not s.supports("pipelining")
            try:
                return await delivery._transaction(s, "a@client.test", ["x@x.test", "y@x.test"], b"m\r\n", [])
            finally:
                await s.close()
    assert [r.status for r in asyncio.run(go())] == [Outcome.DELIVERED, Outcome.DELIVERED]
    assert commands == [b"EHLO", b"HELO", b"MAIL", b"RCPT", b"RCPT", b"DATA", b"QUIT"]


@pytest.mark.parametrize("greeting", [
    b"220 " + b"x" * 100_000,                    # a line that never ends
    b"220 " + b"x" * 8000 + b"\r\n",             # far beyond RFC 5321 §4.5.3.1.5
    b"220-x\r\n" * 1000,                         # lines without end
])
def test_overlong_reply_is_a_temporary_failure(greeting: bytes) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await asyncio.sleep(30)

    async def go() -> SessionError:
        server, port = await _serve(handler)
        async with server:
            with pytest.raises(SessionError) as e:
                await _open(port, timeouts=Timeouts(connect=3, greeting=20, command=20))
            return e.value
    e = asyncio.run(go())
    assert e.temporary and "ProtocolError" in e.reason, e.reason  # not the 20 s timeout


def test_silent_server_times_out() -> None:
    """No greeting at all, and a server that stops answering in the middle of a pipelined group."""
    async def mute(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def stops(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, b"250 PIPELINING\r\n")
        await asyncio.wait_for(reader.readuntil(b"DATA\r\n"), 10)
        writer.write(b"250 ok\r\n")  # MAIL's reply, then nothing
        await writer.drain()
        await asyncio.sleep(30)

    async def go() -> tuple[SessionError, SessionError]:
        short = Timeouts(connect=3, greeting=0.5, command=0.5, tls=1, data=0.5)
        server, port = await _serve(mute)
        async with server:
            with pytest.raises(SessionError) as e1:
                await _open(port, timeouts=short)
        server, port = await _serve(stops)
        async with server:
            s = await _open(port, timeouts=short)
            with pytest.raises(SessionError) as e2:
                await delivery._transaction(s, "a@client.test", ["x@x.test"], b"m\r\n", [])
            assert not s.alive  # out of step: dropped, never reused
        return e1.value, e2.value
    e1, e2 = asyncio.run(go())
    assert e1.temporary and "TimeoutError" in e1.reason, e1.reason
    assert e2.temporary and "TimeoutError" in e2.reason, e2.reason


@pytest.mark.parametrize("inject", [b"", b"250 injected\r\n", b"250-PIPELI"])
@pytest.mark.parametrize("auth", [Auth.NONE, Auth.DANE])
@LOOPS
def test_starttls_response_injection(tmp_path: Path, inject: bytes, auth: Auth, event_loop: str) -> None:
    """RFC 3207 §4: bytes after the 220 to STARTTLS, before the handshake, end the session as a TLS failure —
    a suspected attack where DANE required TLS, and never a cleartext retry. Without them the same server
    completes the handshake and the second EHLO (RFC 3207 §4.2)."""
    ctx = tls_context(tmp_path)
    ehlos: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, b"250 STARTTLS\r\n")
        assert await _lines(reader) == b"STARTTLS\r\n"
        writer.write(b"220 2.0.0 go ahead\r\n" + inject)  # one segment
        await writer.drain()
        await writer.start_tls(ctx)
        ehlos.append(await _lines(reader))
        writer.write(b"250-adversary.test\r\n250 PIPELINING\r\n")
        await writer.drain()
        await _lines(reader)

    async def go() -> Session | SessionError:
        server, port = await _serve(handler)
        async with server:
            req = Requirement(Level.DANE if auth is Auth.DANE else Level.ENCRYPT, TLSMode.REQUIRED, auth)
            try:
                s = await _open(port, req)
            except SessionError as e:
                return e
            await s.close()
            return s
    got = _run(go(), event_loop)
    if not inject:
        assert isinstance(got, Session) and got.tls.version is not None and ehlos == [b"EHLO client.test\r\n"]
        return
    assert isinstance(got, SessionError) and "InjectionError" in got.reason, got
    assert got.temporary and not got.cleartext_retry and got.suspected_attack is (auth is Auth.DANE)
    assert ehlos == []


def test_starttls_injection_under_opportunistic_tls_is_no_cleartext_retry(tmp_path: Path) -> None:
    ctx = tls_context(tmp_path)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, b"250 STARTTLS\r\n")
        await _lines(reader)
        writer.write(b"220 go ahead\r\n250 injected\r\n")
        await writer.drain()
        await writer.start_tls(ctx)

    async def go() -> SessionError:
        server, port = await _serve(handler)
        async with server:
            with pytest.raises(SessionError) as e:
                await _open(port, Requirement(Level.MAY, TLSMode.OPTIONAL, Auth.NONE))
            return e.value
    e = asyncio.run(go())
    assert "InjectionError" in e.reason and not e.cleartext_retry


# --- a real pipelining server: Postfix -------------------------------------------------------------------

@LOOPS
def test_pipelined_transaction_with_postfix(testnet: TestNet, monkeypatch: pytest.MonkeyPatch,
                                           event_loop: str) -> None:
    """Against Postfix (which offers PIPELINING and CHUNKING), over DANE-verified TLS: one write carries MAIL,
    every RCPT and BDAT LAST with the content; accepted, refused (5xx) and deferred (4xx) recipients each get their own outcome; a second
    message reuses the connection (RSET in the group); a message whose recipients are all refused is
    answered by Postfix's refusal of DATA."""
    from fixtures.postfix import Postfix

    assert testnet.pki is not None
    chain, key = testnet.pki.paths("mx.bench.test")
    writes: list[bytes] = []
    real_write = smtp_wire._Wire.write

    def spy(self: smtp_wire._Wire, data: bytes | memoryview) -> None:
        writes.append(bytes(data))
        real_write(self, data)
    monkeypatch.setattr(smtp_wire._Wire, "write", spy)
    sink = Postfix("127.0.1.60", myhostname="mx.bench.test", mydestination="bench.test", local_recipient_maps="",
                   smtpd_tls_cert_file=str(chain), smtpd_tls_key_file=str(key), smtpd_tls_security_level="may",
                   local_transport="discard:",
                   smtpd_recipient_restrictions="check_recipient_access inline:{{no1@bench.test=REJECT no such user},"
                   " {no2@bench.test=REJECT gone}, {later@bench.test=DEFER try later}}, permit_mynetworks, reject")
    token = secrets.token_hex(6)
    with sink:
        d = deliverer(testnet, Policy())

        async def go() -> tuple[list[delivery.RecipientResult], ...]:
            try:
                a = await d.deliver("alice@client.test", ["yes1@bench.test", "no1@bench.test", "later@bench.test",
                                                          "yes2@bench.test"], message(token))
                b = await d.deliver("alice@client.test", ["no1@bench.test", "no2@bench.test"], message(token))
                c = await d.deliver("alice@client.test", ["yes3@bench.test"], message(token))
                return a, b, c
            finally:
                await d.close()
        first, refused, third = _run(go(), event_loop)
        log = sink.log()
    sink.cleanup()
    assert [(r.recipient, r.status, r.dsn[:1]) for r in first] == [
        ("yes1@bench.test", Outcome.DELIVERED, "2"), ("no1@bench.test", Outcome.BOUNCED, "5"),
        ("later@bench.test", Outcome.DEFERRED, "4"), ("yes2@bench.test", Outcome.DELIVERED, "2")]
    assert first[0].security == "dane-verified" and first[0].reply and first[0].reply.code == 250
    assert "no such user" in first[1].text and "try later" in first[2].text
    # Postfix's access_map_reject_code is 554; each recipient keeps its own text, not DATA's refusal
    assert [(r.status, r.reply and r.reply.code) for r in refused] == [(Outcome.BOUNCED, 554)] * 2
    assert "no such user" in refused[0].text and "gone" in refused[1].text
    assert third[0].status is Outcome.DELIVERED
    # RFC 3030: Postfix offers CHUNKING too, so BDAT LAST and the content close each group
    groups = [w for w in writes if b"MAIL FROM:" in w]
    assert len(groups) == 3 and all(b"\r\nBDAT " in w and w.endswith(message(token)) for w in groups), groups
    assert groups[0].count(b"RCPT TO:") == 4 and not groups[0].startswith(b"RSET")
    assert groups[1].startswith(b"RSET\r\nMAIL FROM:") and groups[2].startswith(b"RSET\r\n")
    assert log.count("]: connect from") == 2, log  # the fixture's probe, then one connection for all three



@LOOPS
def test_tls_session_resumption_with_postfix(testnet: TestNet, event_loop: str) -> None:
    """RFC 8446 §2.2 on the outbound leg, against Postfix over DANE: the second connection under the same
    requirement resumes the session and inherits the first one's verdict (dane-verified, the matched TLSA
    record) and carries mail; a different requirement never resumes it; a failed authentication is never
    kept."""
    from postgate.outbound.smtp_client import TlsSessionCache
    from postgate.policy.vocab import TlsOutcome

    from fixtures.postfix import Postfix

    assert testnet.pki is not None
    chain, key = testnet.pki.paths("mx.bench.test")
    sink = Postfix("127.0.1.60", myhostname="mx.bench.test", mydestination="bench.test", local_recipient_maps="",
                   smtpd_tls_cert_file=str(chain), smtpd_tls_key_file=str(key), smtpd_tls_security_level="may",
                   local_transport="discard:")
    cache = TlsSessionCache()

    async def go() -> list[Session | SessionError]:
        d = deliverer(testnet, Policy())
        rt = await d.route("bench.test")
        [host] = rt.nexthop.hosts
        req = d.decide(rt, host)
        assert isinstance(req, Requirement) and req.auth is Auth.DANE
        out: list[Session | SessionError] = []
        for r in (req, req, Requirement(Level.ENCRYPT, TLSMode.REQUIRED, Auth.NONE),
                  Requirement(Level.FINGERPRINT, TLSMode.REQUIRED, Auth.FINGERPRINT, fingerprints=("00" * 32,))):
            try:
                s = await open_session("127.0.1.60", 25, "mx.bench.test", r, helo="client.test", timeouts=FAST,
                                       sessions=cache)
            except SessionError as e:
                out.append(e)
                continue
            if len(out) == 1:  # the resumed session carries a message
                [res] = await delivery._transaction(s, "a@client.test", ["r@bench.test"], b"s: r\r\n\r\nr\r\n", [])
                assert res.status is Outcome.DELIVERED, res.text
            await s.close()
            out.append(s)
        return out
    with sink:
        full, resumed, other, refused = _run(go(), event_loop)
    sink.cleanup()
    assert isinstance(full, Session) and isinstance(resumed, Session) and isinstance(other, Session)
    assert not full.tls.resumed and full.tls.security is TlsOutcome.DANE_VERIFIED and full.tls.chain
    assert resumed.tls.resumed and resumed.tls.security is TlsOutcome.DANE_VERIFIED
    assert resumed.tls.tlsa_matched == full.tls.tlsa_matched is not None
    assert not other.tls.resumed and other.tls.security is TlsOutcome.UNAUTHENTICATED
    assert isinstance(refused, SessionError) and "fingerprint" in refused.reason
    assert len(cache) == 2  # the DANE and the encrypt requirement; never the refused one


def test_large_body_to_a_slow_reader_is_flow_controlled(monkeypatch: pytest.MonkeyPatch) -> None:
    """A 2 MB content to a server that reads slowly: handed to the transport in pieces of at most
    BODY_CHUNK, each after the transport drained (never the whole body at once, whose buffer asyncio would
    copy and shift per send), and it arrives byte for byte, dot-stuffed."""
    body = b"".join(b"." * (i % 2) + b"line %d\r\n" % i for i in range(200_000))
    got: list[bytes] = []
    sizes: list[int] = []
    real_write = smtp_wire._Wire.write

    def spy(self: smtp_wire._Wire, data: bytes | memoryview) -> None:
        assert not self.paused  # flow control: nothing is written while the transport is above high water
        sizes.append(len(data))
        real_write(self, data)
    monkeypatch.setattr(smtp_wire._Wire, "write", spy)

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, b"250 PIPELINING\r\n")
        await asyncio.wait_for(reader.readuntil(b"DATA\r\n"), 10)
        writer.write(b"250 ok\r\n250 ok\r\n354 go\r\n")
        data = b""
        while not data.endswith(b"\r\n.\r\n"):
            data += await asyncio.wait_for(reader.read(16384), 10)
            await asyncio.sleep(0.0005)
        got.append(data)
        writer.write(b"250 2.0.0 ok\r\n")
        await writer.drain()
        await _lines(reader)

    async def go() -> list[delivery.RecipientResult]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port, timeouts=Timeouts(connect=3, greeting=3, command=10, data=60))
            try:
                return await delivery._transaction(s, "a@client.test", ["x@x.test"], body, [])
            finally:
                await s.close()
    [res] = asyncio.run(go())
    assert res.status is Outcome.DELIVERED
    assert got == [body.replace(b"\r\n.", b"\r\n..") + b".\r\n"]
    assert max(sizes) <= smtp_wire.BODY_CHUNK and sum(sizes) > len(body), sizes


def test_bdat_with_chunking_server() -> None:
    """RFC 3030: to a server offering CHUNKING, MAIL, RCPT and ``BDAT n LAST`` with exactly n octets — line
    ends made CRLF, no dot-stuffing, no end-of-data line — in one write; a refused recipient keeps its reply."""
    seen: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, b"250-PIPELINING\r\n250 CHUNKING\r\n")
        head = await asyncio.wait_for(reader.readuntil(b" LAST\r\n"), 10)
        size = int(head.rsplit(b"BDAT ", 1)[1].split()[0])
        seen.extend([head, await asyncio.wait_for(reader.readexactly(size), 10)])
        writer.write(b"250 ok\r\n250 ok\r\n550 5.1.1 no\r\n250 2.0.0 queued\r\n")
        await writer.drain()
        await _lines(reader)

    async def go() -> list[delivery.RecipientResult]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            try:
                return await delivery._transaction(s, "a@client.test", ["y@x.test", "n@x.test"],
                                                   b"Subject: b\n\n.dot\n..two\r\n.\nend", [])
            finally:
                await s.close()
    results = asyncio.run(go())
    assert [(r.status, r.dsn) for r in results] == [(Outcome.DELIVERED, "2.0.0"), (Outcome.BOUNCED, "5.1.1")]
    want = b"Subject: b\r\n\r\n.dot\r\n..two\r\n.\r\nend\r\n"
    assert seen == [b"MAIL FROM:<a@client.test>\r\nRCPT TO:<y@x.test>\r\nRCPT TO:<n@x.test>\r\n"
                    b"BDAT %d LAST\r\n" % len(want), want]


def test_a_421_in_a_pipelined_group_ends_the_connection_s_reuse() -> None:
    """RFC 5321 §3.8: a 421 closes the channel. One that came in the same segment as the reply before it
    (read from what is already there, without waiting) still marks the connection as closing: it is not
    kept for another message."""
    handler = _group_server(b"NOOP\r\nNOOP\r\n", b"250 2.0.0 ok\r\n421 4.3.2 shutting down\r\n")

    async def go() -> tuple[int, bool, int, bool]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            try:
                s.conn.write(b"NOOP\r\nNOOP\r\n")
                first = await s.conn.read(5)
                alive_between = s.alive is False   # the 421 is read but not taken yet: out of step
                second = await s.conn.read(5)
                return first.code, alive_between, second.code, s.alive
            finally:
                await s.close()
    assert asyncio.run(go()) == (250, True, 421, False)


def _unacked(sock: socket.socket) -> int:
    """tcp_info.tcpi_unacked (linux/tcp.h: eight octets of flags, then rto, ato, snd_mss, rcv_mss, unacked)."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    return int.from_bytes(info[24:28], sys.byteorder)


@LOOPS
def test_replies_are_acknowledged_at_once_for_a_server_that_delays_its_small_writes(event_loop: str) -> None:
    """A server without TCP_NODELAY (Postfix's smtpd) that answers MAIL and RCPT in one segment and BDAT in a
    later one holds that later reply (Nagle, RFC 896) until its first one is acknowledged; a client that
    delays its ACK (RFC 1122 §4.2.3.2, 40 ms on Linux) stalls every such transaction for that long. This was
    the relay bench's 100 KB cell at C=10 (0.5x Postfix, 40 ms per delivery). The client acknowledges what
    it reads at once (TCP_QUICKACK): the server sees its replies acknowledged before it sends the next."""
    unacked: list[int] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)   # as Postfix's smtpd: Nagle on
        await _ehlo(reader, writer, b"250-PIPELINING\r\n250 CHUNKING\r\n")
        while (line := await _lines(reader)).startswith(b"MAIL"):
            assert (await _lines(reader)).startswith(b"RCPT")
            bdat = await _lines(reader)
            await asyncio.wait_for(reader.readexactly(int(bdat.split()[1])), 10)
            writer.write(b"250 ok\r\n250 ok\r\n")   # flushed before the chunk is processed, as Postfix does
            await writer.drain()
            await asyncio.sleep(0.01)                  # a prompt ACK is here by now; a delayed one is not
            unacked.append(_unacked(sock))
            writer.write(b"250 2.0.0 queued\r\n")
            await writer.drain()
        assert line.startswith(b"QUIT")
        writer.write(b"221 bye\r\n")

    async def go() -> None:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            try:
                for _ in range(30):   # past the quick ACKs a fresh Linux connection starts with
                    [res] = await delivery._transaction(s, "a@client.test", ["y@x.test"], b"Subject: q\r\n\r\nx\r\n", [])
                    assert res.status is Outcome.DELIVERED
            finally:
                await s.close()
    _run(go(), event_loop)
    assert len(unacked) == 30 and sum(unacked) == 0, unacked


def test_a_large_content_goes_as_one_bdat_after_the_rcpt_replies() -> None:
    """RFC 3030 §2: past BODY_CHUNK, to a server offering CHUNKING, MAIL and RCPT go first and, once a
    recipient is accepted, ``BDAT n LAST`` with the content as it is: no DATA, no 354 round trip, no
    dot-stuffing, no end-of-data line. With every recipient refused no octet of the content is sent."""
    body = b"".join(b"." * (i % 2) + b"line %d\r\n" % i for i in range(60_000))
    assert len(body) > smtp_wire.BODY_CHUNK
    seen: list[bytes] = []

    def handler_for(accept: bool) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await _ehlo(reader, writer, b"250-PIPELINING\r\n250 CHUNKING\r\n")
            group = await asyncio.wait_for(reader.readuntil(b"RCPT TO:<y@x.test>\r\n"), 10)
            seen.append(group)
            writer.write(b"250 ok\r\n" + (b"250 ok\r\n" if accept else b"550 5.1.1 no\r\n"))
            await writer.drain()
            if accept:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n"), 10)
                size = int(head.split()[1])
                seen.extend([head, await asyncio.wait_for(reader.readexactly(size), 30)])
                writer.write(b"250 2.0.0 queued\r\n")
                await writer.drain()
            seen.append(await _lines(reader))   # what follows the transaction: QUIT at the close
        return handler

    async def go(accept: bool) -> list[delivery.RecipientResult]:
        server, port = await _serve(handler_for(accept))
        async with server:
            s = await _open(port, timeouts=Timeouts(connect=3, greeting=3, command=10, data=60))
            try:
                return await delivery._transaction(s, "a@client.test", ["y@x.test"], body, [])
            finally:
                await s.close()
    [res] = asyncio.run(go(True))
    assert res.status is Outcome.DELIVERED and res.dsn == "2.0.0"
    assert seen[0] == b"MAIL FROM:<a@client.test>\r\nRCPT TO:<y@x.test>\r\n"
    assert seen[1] == b"BDAT %d LAST\r\n" % len(body) and seen[2] == body
    assert b"DATA" not in seen[3]
    seen.clear()
    [res] = asyncio.run(go(False))
    assert res.status is Outcome.BOUNCED and res.dsn == "5.1.1"
    assert b"BDAT" not in b"".join(seen) and b"line 1" not in b"".join(seen)


@LOOPS
def test_bdat_body_arrives_unchanged_through_postfix(testnet: TestNet, monkeypatch: pytest.MonkeyPatch,
                                                     event_loop: str) -> None:
    """A 100 KB and a 330 KB content with leading dots, lone dots and tabs, sent with BDAT to Postfix (the
    larger one after the RCPT replies, RFC 3030 §2), are stored byte for byte (Postfix's hold queue keeps
    them for postcat)."""
    import subprocess

    from fixtures.postfix import Postfix

    assert testnet.pki is not None
    chain, key = testnet.pki.paths("mx.bench.test")
    writes: list[bytes] = []
    real_write = smtp_wire._Wire.write

    def spy(self: smtp_wire._Wire, data: bytes | memoryview) -> None:
        writes.append(bytes(data))
        real_write(self, data)
    monkeypatch.setattr(smtp_wire._Wire, "write", spy)
    sink = Postfix("127.0.1.60", myhostname="mx.bench.test", mydestination="bench.test", local_recipient_maps="",
                   smtpd_tls_cert_file=str(chain), smtpd_tls_key_file=str(key), smtpd_tls_security_level="may",
                   local_transport="discard:",
                   smtpd_recipient_restrictions="check_recipient_access inline:{{held@bench.test=HOLD}}, "
                   "permit_mynetworks, reject")
    # one content in the MAIL/RCPT group (BDAT in the same write), one past BODY_CHUNK (BDAT after the replies)
    with sink:
        for lines in (3000, 12000):
            token = secrets.token_hex(6)
            body = b"".join(b"." * (i % 3) + b"line %d\t of the body \r\n" % i for i in range(lines)) + b".\r\n"
            assert (len(body) > smtp_wire.BODY_CHUNK) == (lines > 3000)
            data = f"From: a@client.test\r\nSubject: {token}\r\n\r\n".encode() + body
            writes.clear()
            d = deliverer(testnet, Policy())

            async def go(d: delivery.Deliverer = d, data: bytes = data) -> list[delivery.RecipientResult]:
                try:
                    return await d.deliver("a@client.test", ["held@bench.test"], data)
                finally:
                    await d.close()
            [res] = _run(go(), event_loop)
            assert res.status is Outcome.DELIVERED, res.text
            held = subprocess.run(["postqueue", "-c", str(sink.dir), "-j"], capture_output=True, text=True).stdout
            [qid] = [ln.split('"queue_id": "')[1].split('"')[0] for ln in held.splitlines() if '"hold"' in ln]
            got = subprocess.run(["postcat", "-c", str(sink.dir), "-b", "-q", qid], capture_output=True).stdout
            subprocess.run(["postsuper", "-c", str(sink.dir), "-d", qid], capture_output=True, check=False)
            sent = b"".join(writes)
            assert b"\r\nBDAT " in sent and b"\r\nDATA\r\n" not in sent and body in sent   # no dot-stuffing
            assert got.split(b"*** MESSAGE CONTENTS", 1)[-1].split(b"\n", 1)[1].replace(b"\n", b"\r\n") == body
    sink.cleanup()


@pytest.mark.parametrize("extensions", [b"250 PIPELINING\r\n", b"250 8BITMIME\r\n"], ids=["pipelined", "lockstep"])
def test_a_2xx_reply_to_data_is_no_delivery(extensions: bytes) -> None:
    """RFC 5321 §4.1.1.4, §4.3.2: DATA is answered 354 before the content, and only the reply after the
    content accepts the message. A server that answers DATA with 250 has received nothing: the recipient is
    deferred as a protocol error (4.5.0), never recorded as delivered (the message would be lost)."""
    received: list[bytes] = []

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, extensions)
        while True:
            line = await _lines(reader)
            if not line or line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                return
            if line.startswith(b"DATA"):
                writer.write(b"250 2.0.0 ok whatever\r\n")
            elif line.startswith((b"MAIL", b"RCPT", b"RSET")):
                writer.write(b"250 ok\r\n")
            else:
                received.append(line)
                writer.write(b"500 what\r\n")

    async def go() -> list[delivery.RecipientResult]:
        server, port = await _serve(handler)
        async with server:
            s = await _open(port)
            try:
                return await delivery._transaction(s, "a@client.test", ["b@x.test"], b"Subject: s\r\n\r\nhi\r\n", [])
            finally:
                await s.close()
    [res] = asyncio.run(go())
    assert (res.status, res.dsn) == (Outcome.DEFERRED, "4.5.0"), res
    assert "not 354" in res.reason and received == []


def test_a_5xx_greeting_is_a_temporary_failure_of_that_host_only() -> None:
    """RFC 5321 §5.1: the next MX host is tried when one cannot take the mail. A host that greets with 554
    is skipped as a temporary failure (Postfix's smtp_skip_5xx_greeting, default yes), with the server's own
    enhanced code made temporary: the backup MX gets the mail instead of the sender a bounce."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"554 5.7.1 mx1.example.test no service here\r\n")
        await writer.drain()
        await _lines(reader)

    async def go() -> SessionError:
        server, port = await _serve(handler)
        async with server:
            with pytest.raises(SessionError) as info:
                await _open(port)
            return info.value
    err = asyncio.run(go())
    assert err.temporary and err.code == 554 and err.dsn == "4.7.1" and "no service here" in err.reason


def _capturing_server(extensions: bytes, seen: list[bytes]) -> Handler:
    """A lockstep server that records each command line and accepts everything."""
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _ehlo(reader, writer, extensions)
        while True:
            line = await _lines(reader)
            seen.append(line)
            if not line or line.startswith(b"QUIT"):
                writer.write(b"221 bye\r\n")
                return
            if line.startswith(b"DATA"):
                writer.write(b"354 go\r\n")
                await asyncio.wait_for(reader.readuntil(b"\r\n.\r\n"), 10)
                writer.write(b"250 2.0.0 queued\r\n")
            else:
                writer.write(b"250 ok\r\n")
    return handler


@pytest.mark.parametrize(("limit", "content", "mail", "outcome"), [
    (b"1000", b"Subject: s\r\n\r\n" + b"x" * 5000 + b"\r\n", None, (Outcome.BOUNCED, "5.3.4")),
    (b"100000", b"Subject: s\r\n\r\nhi\r\n", b"MAIL FROM:<a@client.test> SIZE=18\r\n", (Outcome.DELIVERED, "2.0.0")),
    (b"0", b"Subject: s\r\n\r\nhi\r\n", b"MAIL FROM:<a@client.test> SIZE=18\r\n", (Outcome.DELIVERED, "2.0.0")),
], ids=["over-the-limit", "declared", "no-fixed-limit"])
def test_size_is_declared_and_a_message_over_the_server_s_limit_is_not_sent(
        limit: bytes, content: bytes, mail: bytes | None, outcome: tuple[Outcome, str]) -> None:
    """RFC 1870 §6.1: the client declares the message's size on MAIL where the server offers SIZE, and does
    not send a message larger than the server's announced fixed limit (a permanent failure, 5.3.4, as
    Postfix); SIZE 0 announces no fixed limit."""
    seen: list[bytes] = []

    async def go() -> list[delivery.RecipientResult]:
        server, port = await _serve(_capturing_server(b"250 SIZE " + limit + b"\r\n", seen))
        async with server:
            s = await _open(port)
            try:
                return await delivery._transaction(s, "a@client.test", ["b@x.test"], content, [])
            finally:
                await s.close()
    [res] = asyncio.run(go())
    assert (res.status, res.dsn) == outcome, res
    mails = [ln for ln in seen if ln.startswith(b"MAIL")]
    assert mails == ([mail] if mail else [])


@pytest.mark.parametrize(("content", "body"), [(b"Subject: s\r\n\r\n\xc3\xa9t\xc3\xa9\r\n", b" BODY=8BITMIME"),
                                               (b"Subject: s\r\n\r\nete\r\n", b"")], ids=["8bit", "7bit"])
def test_8bit_content_is_declared_body_8bitmime(content: bytes, body: bytes) -> None:
    """RFC 6152 §2-§3: to a server offering 8BITMIME, a content with octets above 127 goes with
    BODY=8BITMIME on MAIL; a 7-bit content without it."""
    seen: list[bytes] = []

    async def go() -> None:
        server, port = await _serve(_capturing_server(b"250 8BITMIME\r\n", seen))
        async with server:
            s = await _open(port)
            try:
                [res] = await delivery._transaction(s, "a@client.test", ["b@x.test"], content, [])
                assert res.status is Outcome.DELIVERED
            finally:
                await s.close()
    asyncio.run(go())
    assert [ln for ln in seen if ln.startswith(b"MAIL")] == [b"MAIL FROM:<a@client.test>" + body + b"\r\n"]


def test_the_data_timeout_runs_per_send_not_for_the_whole_body() -> None:
    """RFC 5321 §4.5.3.2.5: the data block timeout is "while awaiting the completion of each TCP SEND call":
    a receiver that takes each piece in less than the timeout but the whole body in more is not cut off;
    one that stops taking pieces is."""
    class SlowProto:
        paused = True

        def __init__(self, wait: float) -> None:
            self.wait, self.pieces = wait, 0

        def write(self, data: bytes | memoryview) -> None:
            self.pieces += 1

        async def drained(self) -> None:
            await asyncio.sleep(self.wait)

    def conn_with(proto: SlowProto) -> smtp_wire.Connection:
        conn = smtp_wire.Connection.__new__(smtp_wire.Connection)
        conn._proto = proto  # type: ignore[assignment]
        conn.abort = lambda: None  # type: ignore[method-assign]
        return conn
    body = b"x" * (smtp_wire.BODY_CHUNK * 8)
    steady = SlowProto(0.1)          # 8 pieces, 0.8 s in all, each 0.1 s: within a 0.3 s timeout per send
    asyncio.run(conn_with(steady).write_body(body, 0.3))
    assert steady.pieces == 8
    with pytest.raises(TimeoutError):  # a piece that takes longer than the timeout
        asyncio.run(conn_with(SlowProto(0.5)).write_body(body, 0.3))
