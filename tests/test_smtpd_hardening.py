"""Issue 13, the smtpd side: every hostile-client finding as a byte-exact session against an in-process
SMTPServer on a real loopback socket (tests/smtpd_harness.py). Each test fails on the code before the fix."""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import re
import socket
import ssl
import time
import tracemalloc
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from postgate.inbound.filters import Action, Stage, StageContext, Verdict, split_message
from postgate.inbound.relay import RelayFilter, RelayPolicy
from postgate.inbound.smtpd import (
    HOPCOUNT_LIMIT,
    AuthThrottle,
    Limits,
    Session,
    _has_long_line,
    _rate_limit_accept_errors,
    hop_count,
    repair_header,
)
from postgate.outbound.queue import dsn
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.policy.maps import MapError, TransportMap
from postgate.policy.vocab import Reply

from postgate import config as configmod
from tests.smtpd_harness import HOST, Client, LogCollector, Recorder, code, serve, tls_context

# issue 20: every test that exercises TLS runs on both event loops ([server] event_loop)
LOOPS = pytest.mark.parametrize("event_loop", ["asyncio", "uvloop"])


def _session(port: int, source: str = HOST) -> Client:
    c = Client(port, source=source)
    assert code(c.reply()) == 220
    assert code(c.cmd(b"EHLO client.test")) == 250
    return c


def _mail(c: Client, *, mail: bytes = b"MAIL FROM:<a@client.test>", rcpt: bytes = b"RCPT TO:<b@x.test>") -> None:
    assert code(c.cmd(mail)) == 250
    assert code(c.cmd(rcpt)) == 250
    assert code(c.cmd(b"DATA")) == 354


# --- item 3: hop count ------------------------------------------------------------------------------------
def test_hop_count_limit_refuses_a_looping_message() -> None:
    """RFC 5321 §6.3: loop detection by counting Received: headers; Postfix hopcount_limit = 50 → 5.4.6."""
    with serve() as srv, _session(srv.port) as c:
        hops = b"".join(b"Received: from x by y; Thu, 1 Jan 2026 00:00:00 +0000\r\n" for _ in range(HOPCOUNT_LIMIT))
        _mail(c)
        reply = c.cmd(hops + b"Subject: loop\r\n\r\nbody\r\n.")
        assert code(reply) == 554 and b"5.4.6" in reply
        _mail(c)
        assert code(c.cmd(hops[hops.index(b"\r\n") + 2:] + b"Subject: ok\r\n\r\nbody\r\n.")) == 250   # 49 hops
    assert len(srv.handler.messages) == 1


# --- item 4: DSN header injection --------------------------------------------------------------------------
@pytest.mark.parametrize(("cmd", "ok"), [
    (b"MAIL FROM:<a@client.test> ENVID=x+0D+0AX-Injected:+20yes", False),
    (b"MAIL FROM:<a@client.test> ENVID=x+0Ay", False),
    (b"MAIL FROM:<a@client.test> ENVID=x+00", False),
    (b"MAIL FROM:<a@client.test> ENVID=x+C3+A9", False),           # decoded: not US-ASCII
    (b"MAIL FROM:<a@client.test> ENVID=QQ+2Bx1+20y", True),
    (b"RCPT TO:<b@x.test> ORCPT=rfc822;a+0D+0A+0D+0A<h1>", False),
    (b"RCPT TO:<b@x.test> ORCPT=rfc822;a+0Db@x.test", False),
    (b"RCPT TO:<b@x.test> ORCPT=rfc822;b+2Bx@x.test", True),
])
def test_envid_and_orcpt_must_decode_to_printable_ascii(cmd: bytes, ok: bool) -> None:
    """RFC 3461 §4: xtext, and the decoded ENVID/ORCPT printable US-ASCII: no CR/LF, even hex-encoded."""
    with serve() as srv, _session(srv.port) as c:
        if cmd.startswith(b"RCPT"):
            assert code(c.cmd(b"MAIL FROM:<a@client.test>")) == 250
        assert code(c.cmd(cmd)) == (250 if ok else 501)


def test_dsn_fields_never_carry_a_line_break() -> None:
    """RFC 3464 §2.2.1/§2.3.1: whatever an old queue file holds, a DSN field is one line."""
    env = Envelope.new("a@client.test", [Recipient("b@x.test", orcpt="rfc822;a\r\n\r\n<h1>x</h1>", notify=["FAILURE"])],
                       b"Subject: x\r\n\r\nbody\r\n", envid="x\r\nX-Injected: yes")
    env.recipients[0].reason = "550 5.1.1 no\r\nX-Evil: 1"
    out = dsn.build(env, b"Subject: x\r\n\r\nbody\r\n", env.recipients, action="failed", reporting_mta="mx.test")
    assert out is not None
    lines = out.split(b"\r\n")
    assert not [ln for ln in lines if ln.startswith((b"X-Injected", b"X-Evil", b"<h1>"))]
    assert b"Original-Envelope-Id: x+0D+0AX-Injected:+20yes" in lines
    assert b"Original-Recipient: rfc822;a+0D+0A+0D+0A<h1>x</h1>" in lines


# --- item 5: no header, a header line without a colon --------------------------------------------------------
@pytest.mark.parametrize(("raw", "expect"), [
    (b"just a body line\r\n", b"\r\njust a body line\r\n"),
    (b"Subject: x\r\nno colon here\r\nmore\r\n", b"Subject: x\r\n\r\nno colon here\r\nmore\r\n"),
    (b"Subject: x\r\n folded\r\n\r\nbody\r\n", b"Subject: x\r\n folded\r\n\r\nbody\r\n"),
    (b"Subject: x\r\n", b"Subject: x\r\n\r\n"),
    (b" starts folded\r\n", b"\r\n starts folded\r\n"),
    (b"Bad Name: x\r\n\r\n", b"\r\nBad Name: x\r\n\r\n"),
])
def test_header_repair_like_postfix_cleanup(raw: bytes, expect: bytes) -> None:
    assert repair_header(raw) == expect


# --- item 6: ASCII parsing, line length, AUTH edge cases, NUL ----------------------------------------------
def test_commands_are_ascii_only() -> None:
    with serve(tls=tls_context(Path(__import__("tempfile").mkdtemp()))) as srv, _session(srv.port) as c:
        assert code(c.cmd("ſTARTTLS".encode())) == 500      # str.upper() would make it STARTTLS
        assert code(c.cmd("QUıT".encode())) == 500          # ... and QUIT
        assert code(c.cmd("MAIL FROM:<a@client.test> SIZE=²".encode())) == 501
        assert code(c.cmd("MAIL FROM:<a@client.test> SIZE=٣".encode())) == 501
        assert code(c.cmd(b"MAIL FROM:<a@client.test> SIZE=3")) == 250
        assert code(c.cmd(b"NOOP \x00")) == 501
        assert code(c.cmd(b"NOOP \xff\xfe")) == 500
        assert code(c.cmd(b"QUIT")) == 221


def test_command_line_limit_is_512_octets() -> None:
    """RFC 5321 §4.5.3.1.4: 512 octets with the CRLF (more for MAIL/RCPT with extension parameters)."""
    with serve() as srv, _session(srv.port) as c:
        assert code(c.cmd(b"NOOP " + b"x" * 505)) == 250            # 512 with CRLF
        assert code(c.cmd(b"NOOP " + b"x" * 506)) == 500            # 513
        assert code(c.cmd(b"MAIL FROM:<a@client.test> ENVID=" + b"e" * 100 + b" RET=HDRS SIZE=1000")) == 250
        assert code(c.cmd(b"RCPT TO:<b@x.test> ORCPT=rfc822;" + b"b" * 480 + b" NOTIFY=FAILURE")) == 250
        assert code(c.cmd(b"NOOP")) == 250                          # the session goes on
        c.sock.sendall(b"NOOP " + b"y" * 20000 + b"\r\n")           # beyond what is buffered: closed
        assert code(c.reply()) == 500
        assert c.reply() == b""
    assert "Traceback" not in srv.log.text()


@LOOPS
def test_auth_login_disconnect_bare_lf_and_long_lines(tmp_path: Path, event_loop: str) -> None:
    ctx = tls_context(tmp_path)
    with serve(Limits(auth_delay=0), tls=ctx, auth=True, event_loop=event_loop) as srv:
        def authed() -> Client:
            c = _session(srv.port)
            assert code(c.cmd(b"STARTTLS")) == 220
            c.start_tls()
            assert code(c.cmd(b"EHLO client.test")) == 250
            assert code(c.cmd(b"AUTH LOGIN")) == 334
            return c
        with authed() as c:
            c.close()                                                  # disconnect after the challenge
        with authed() as c:
            c.sock.sendall(b"YWxpY2U=\n")                              # bare LF
            assert code(c.reply()) == 500
        with authed() as c:
            assert code(c.cmd(b"A" * 9000)) == 334                    # a 9,000-byte user name: answered
            assert code(c.cmd(b"B" * 9001)) == 501                    # 9,001 bytes: not base64
        with authed() as c:
            assert code(c.cmd(b"YWxpY2U=")) == 334
            assert code(c.cmd(b"d29uZGVybGFuZA==")) == 235
        time.sleep(0.2)
    assert "Traceback" not in srv.log.text() and "internal error" not in srv.log.text()


def test_nul_in_data_is_refused() -> None:
    with serve() as srv, _session(srv.port) as c:
        _mail(c)
        reply = c.cmd(b"Subject: x\r\n\r\n\x00.\r\n.")
        assert code(reply) == 554 and b"NUL" in reply
        assert code(c.cmd(b"NOOP")) == 250
    assert srv.handler.messages == []


def test_internal_error_after_data_is_a_4xx_not_a_dropped_connection() -> None:
    with serve() as srv, _session(srv.port) as c:
        srv.handler.fail = RuntimeError("boom")
        _mail(c)
        assert code(c.cmd(b"Subject: x\r\n\r\nbody\r\n.")) == 451
        assert code(c.cmd(b"QUIT")) == 221


# --- item 7: connections per client from accept, descriptors in reserve --------------------------------------
@LOOPS
def test_implicit_tls_connections_are_counted_before_the_handshake(tmp_path: Path, event_loop: str) -> None:
    ctx = tls_context(tmp_path)
    lim = Limits(max_sessions_per_client=3, tls_handshake_timeout=1.0)
    with serve(lim, tls=ctx, implicit_tls=True, event_loop=event_loop) as srv:
        half_open = [socket.create_connection((HOST, srv.port), timeout=10) for _ in range(3)]
        try:
            with socket.create_connection((HOST, srv.port), timeout=10) as extra:
                assert extra.recv(10) == b""           # refused at once, no handshake started
            for s in half_open:                        # the handshake has a time limit
                assert s.recv(10) == b""
            cctx = ssl.create_default_context()
            cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE
            with cctx.wrap_socket(socket.create_connection((HOST, srv.port), timeout=10),
                                  server_hostname="smtpd.test") as ok:
                assert ok.recv(100).startswith(b"220")
        finally:
            for s in half_open:
                s.close()


def test_descriptors_in_reserve_and_refusals_logged_once() -> None:
    with serve(Limits(descriptor_reserve=10)) as srv:
        srv.server.fd_limit = 12 + sum(srv.server.per_client.values())   # room for two sessions
        keep = [_session(srv.port) for _ in range(2)]
        try:
            refused = [Client(srv.port) for _ in range(20)]
            assert all(r.reply().startswith(b"421 4.7.0") for r in refused)
            for r in refused:
                r.close()
        finally:
            for k in keep:
                k.close()
    assert len([ln for ln in srv.log.lines if "refused a connection" in ln]) == 1


# --- item 8: write timeout, DATA deadline ------------------------------------------------------------------
def test_client_that_never_reads_is_disconnected() -> None:
    with serve(Limits(command_timeout=1.0)) as srv:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect((HOST, srv.port))
        sock.setblocking(False)
        burst = b"EHLO client.test\r\n" * 2000
        deadline = time.time() + 60
        sent = 0
        while time.time() < deadline and srv.server.sessions == 0:
            time.sleep(0.01)
        while time.time() < deadline and srv.server.sessions:
            try:
                sent += sock.send(burst)
            except BlockingIOError:
                time.sleep(0.05)
            except OSError:
                break
        assert srv.server.sessions == 0 and sent > 0
        sock.close()


def test_data_has_an_overall_deadline() -> None:
    """One byte every 0.2 s never trips a per-read timeout of 1 s; the DATA deadline ends it."""
    with serve(Limits(data_timeout=1.0, min_data_rate=500)) as srv, _session(srv.port) as c:
        _mail(c)
        c.sock.settimeout(0.2)
        got = b""
        for _ in range(100):
            try:
                c.sock.sendall(b"x")
                got += c.sock.recv(100)
                if got:
                    break
            except TimeoutError:
                continue
            except OSError:
                break
        assert got.startswith(b"421 4.4.2")


# --- item 9: memory per session ------------------------------------------------------------------------------
def test_data_is_spilled_to_disk_so_memory_per_session_is_bounded() -> None:
    lim = Limits(spill_threshold=65536, max_message_size=64 * 1024 * 1024)
    line = b"x" * 78 + b"\r\n"
    with serve(lim) as srv, _session(srv.port) as c:
        _mail(c)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(100):
                c.sock.sendall(line * 1000)                   # 8 MB, not terminated yet
            c.sock.sendall(b"NOOP-is-data\r\n")
            time.sleep(0.5)
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        assert grown < 2 * 1024 * 1024, grown
        assert code(c.cmd(b".")) == 250
    [(_, _, data, _)] = srv.handler.messages
    assert len(data) == 100 * 1000 * len(line) + len(b"NOOP-is-data\r\n") + 2   # and the empty header line


# --- item 10: AUTH brute force -------------------------------------------------------------------------------
# fail2ban filter.d/postfix.conf (Debian 12's 1.0), mdre-auth, without the syslog prefix. Since the ops work
# (issue 19) the line is Postfix's own "…authentication failed: authentication failure, sasl_username=…",
# which fail2ban ≥ 0.10 matches (no end anchor); the older anchored filter this test first copied did not.
FAIL2BAN_POSTFIX_SASL = re.compile(
    r"warning: [^\[]*\[(?P<host>[^\]]+)\]: SASL ((?i:LOGIN|PLAIN|(?:CRAM|DIGEST)-MD5)) authentication failed:"
    r"(?! Connection lost to authentication server| Invalid authentication mechanism)")


def test_auth_throttle_delays_double_per_client_and_account_and_expire() -> None:
    """The throttle's arithmetic on a clock the test sets (no wall-clock time involved)."""
    t = AuthThrottle(base=1.0, cap=8.0, window=900.0)
    assert [t.failed("192.0.2.1", "alice", now) for now in (0.0, 1.0, 2.0, 3.0)] == [1.0, 2.0, 4.0, 8.0]
    assert t.failed("192.0.2.1", "alice", 4.0) == 8.0                  # capped
    assert t.failed("192.0.2.9", "ALICE", 5.0) == 8.0                   # the account's 6th failure, other client
    assert t.failed("192.0.2.1", "bob", 6.0) == 8.0                     # the client's count, for another account
    assert t.failed("192.0.2.7", "carol", 7.0) == 1.0                   # a new client and account: the base
    assert t.failed("192.0.2.7", "carol", 7.0 + 900.0) == 1.0           # the earlier failure is forgotten
    t.succeeded("192.0.2.1", "alice")
    assert t.failed("192.0.2.1", "alice", 10.0) == 1.0                  # a success clears client and account
    assert AuthThrottle(base=0.0, cap=0.0, window=900.0).failed("192.0.2.1", "alice", 0.0) == 0.0   # off


@LOOPS
def test_auth_failures_slow_down_per_client_and_per_account(tmp_path: Path, event_loop: str) -> None:
    ctx = tls_context(tmp_path)
    with serve(Limits(auth_delay=0.05, auth_max_delay=0.3), tls=ctx, auth=True, event_loop=event_loop) as srv:
        for source in ("127.0.0.1", "127.0.0.1", "127.0.0.1", "127.0.0.3", "127.0.0.4"):
            with _session(srv.port, source=source) as c:
                assert code(c.cmd(b"STARTTLS")) == 220
                c.start_tls()
                assert code(c.cmd(b"EHLO client.test")) == 250
                assert code(c.cmd(b"AUTH PLAIN AGFsaWNlAHdyb25n")) == 535        # alice / wrong
    delays = [float(m.group(1)) for m in re.finditer(r"reply delayed ([0-9.]+)s", srv.log.text())]
    assert delays == [0.05, 0.1, 0.2, 0.3, 0.3]   # growing per client, and per account from other clients
    hits = [m for ln in srv.log.lines if (m := FAIL2BAN_POSTFIX_SASL.search(ln))]
    assert [m.group("host") for m in hits] == ["127.0.0.1"] * 3 + ["127.0.0.3", "127.0.0.4"]


# --- item 12: configuration ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("section", "key", "value"), [
    ("limits", "command_timeout", "-1300"), ("limits", "max_sessions", "-1"), ("limits", "max_sessions", "0"),
    ("limits", "max_sessions_per_client", "0"), ("limits", "data_timeout", "0"), ("limits", "max_recipients", "0"),
    ("limits", "data_timeout", "inf"), ("limits", "command_timeout", "nan"), ("limits", "spill_threshold", "10"),
    ("limits", "auth_delay", "-1"), ("queue", "max_backoff", "inf"), ("queue", "max_lifetime", "inf"),
    ("queue", "min_backoff", "nan"), ("queue", "delay_warning", "inf"), ("prequeue", "grace", "inf"),
])
def test_limits_and_lifetimes_are_checked(tmp_path: Path, section: str, key: str, value: str) -> None:
    p = tmp_path / "postgate.toml"
    p.write_text(f'[server]\nhostname = "x.test"\n\n[{section}]\n{key} = {value}\n')
    with pytest.raises(configmod.ConfigError, match=rf"^{re.escape(str(p))}:5: \[{section}\] {key}"):
        configmod.load(p)


def test_transport_map_port_must_be_ascii_digits(tmp_path: Path) -> None:
    p = tmp_path / "transport"
    p.write_text("example.com smtp:[relay.test]:25\nexample.net smtp:[relay.test]:5²87\n")
    with pytest.raises(MapError, match=rf"^{re.escape(str(p))}:2: .*bad port"):
        TransportMap(p)
    p.write_text("example.net relay.test:٣\n")
    with pytest.raises(MapError, match=rf"^{re.escape(str(p))}:1: "):
        TransportMap(p)


def test_listener_port_must_be_ascii_digits(tmp_path: Path) -> None:
    p = tmp_path / "postgate.toml"
    p.write_text('[server]\nhostname = "x.test"\n\n[[listener]]\nname = "mx"\naddress = "127.0.0.1:٢٥"\ntls = "none"\n')
    with pytest.raises(configmod.ConfigError, match=rf"^{re.escape(str(p))}:6: \[\[listener\]\] #1 address"):
        configmod.load(p)


def test_finite_defaults_still_load() -> None:
    cfg = configmod.load(None)
    assert math.isfinite(cfg.limits.data_timeout) and cfg.limits.min_data_rate == 500


def test_accept_errors_are_logged_at_most_once_per_interval() -> None:
    """At the descriptor limit asyncio reports every failed accept(); 125,000 lines in 10 s became one."""
    loop = asyncio.new_event_loop()
    try:
        collector = LogCollector()
        logging.getLogger("postgate").addHandler(collector)
        try:
            _rate_limit_accept_errors(loop)
            for _ in range(1000):
                loop.call_exception_handler({"message": "socket.accept() out of system resource",
                                             "exception": OSError(24, "Too many open files")})
        finally:
            logging.getLogger("postgate").removeHandler(collector)
    finally:
        loop.close()
    assert len([ln for ln in collector.lines if ln.startswith("accept failed")]) == 1


@LOOPS
def test_tls_handshake_survives_an_early_client_hello(tmp_path: Path, event_loop: str) -> None:
    """The ClientHello arrives before the session task runs (a busy server): on port 465 it must not be read
    into a plaintext buffer and lost (the handshake would hang until its timeout). The TLS layer is put on the
    accepted socket before anything is read; before that (start_tls in the session, reading paused) uvloop
    completed 0 of 30 handshakes. 30 implicit-TLS clients at once, each handshake must complete; and the same
    for 30 STARTTLS clients whose ClientHello follows the 220 at once."""
    from postgate.inbound.smtpd import Listener, SMTPServer

    sctx = tls_context(tmp_path)
    cctx = ssl.create_default_context()
    cctx.check_hostname, cctx.verify_mode = False, ssl.CERT_NONE

    class Nothing:
        async def check_rcpt(self, *a: object) -> None:
            return None

        async def message(self, *a: object) -> None:
            raise AssertionError

    class Loaded(SMTPServer):
        async def _session(self, *a: object) -> None:   # type: ignore[override]
            await asyncio.sleep(0.05)      # a busy server: the session task runs after the ClientHello came
            await super()._session(*a)     # type: ignore[arg-type]

    async def implicit(port: int) -> bool:
        try:
            async with asyncio.timeout(8):
                r, w = await asyncio.open_connection("127.0.0.1", port, ssl=cctx)
                line = await r.readline()
                w.close()
                return line.startswith(b"220 ")
        except (TimeoutError, OSError):
            return False

    async def starttls(port: int) -> bool:
        try:
            async with asyncio.timeout(8):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                await r.readline()
                w.write(b"EHLO c.test\r\n")
                while (await r.readline())[3:4] == b"-":
                    pass
                w.write(b"STARTTLS\r\n")
                assert (await r.readline()).startswith(b"220 ")
                await w.start_tls(cctx)
                w.write(b"EHLO c.test\r\n")
                line = await r.readline()
                w.close()
                return line.startswith(b"250")
        except (TimeoutError, OSError):
            return False

    async def run(implicit_tls: bool) -> int:
        srv = Loaded(Listener("submissions", "127.0.0.1", 0, tls=sctx, implicit_tls=implicit_tls), Nothing(),  # type: ignore[arg-type]
                     hostname="mx.test")
        await srv.start()
        assert srv.server is not None
        port = srv.server.sockets[0].getsockname()[1]
        ok = sum(await asyncio.gather(*((implicit if implicit_tls else starttls)(port) for _ in range(30))))
        await srv.stop_accepting()
        await asyncio.gather(*srv.tasks, return_exceptions=True)
        return ok

    def on_loop(implicit_tls: bool) -> int:
        if event_loop == "uvloop":
            import uvloop
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(run(implicit_tls))
        return asyncio.run(run(implicit_tls))

    assert on_loop(True) == 30
    assert on_loop(False) == 30


@LOOPS
def test_starttls_command_injection_is_refused(tmp_path: Path, event_loop: str) -> None:
    """CVE-2011-0411 / RFC 3207 §4.2: a command sent together with STARTTLS (before our 220) is never executed
    inside the TLS session: the session ends with a 554 instead, on both loops."""
    with serve(tls=tls_context(tmp_path), event_loop=event_loop) as srv, _session(srv.port) as c:
        c.sock.sendall(b"STARTTLS\r\nMAIL FROM:<injected@evil.test>\r\n")
        assert c.reply().startswith(b"554 5.5.1")
        assert c.reply() == b""
    assert srv.handler.messages == []


@LOOPS
def test_idle_sessions_hold_no_task_and_little_memory(event_loop: str) -> None:
    """Issue 20 (100,000 sessions under 1 GiB): a session waiting for its next command holds no task and no
    coroutine frames, only its protocol object, its conversation and one timer. 300 idle sessions: no task
    runs, and the heap of the test process (smtpd and clients) grew by less than 6 KiB per session (about 4.5
    KiB here; bench/session_memory.py, the smtpd alone: 7.6 KiB per session with a task, StreamReader and
    StreamWriter, 3.2 KiB without)."""
    n = 300
    with serve(Limits(max_sessions_per_client=n + 30), event_loop=event_loop) as srv:
        socks: list[socket.socket] = []

        def read_reply(s: socket.socket) -> bytes:
            buf = b""
            while not re.search(rb"(^|\r\n)\d{3} [^\r\n]*\r\n$", buf):
                chunk = s.recv(4096)
                assert chunk, buf
                buf += chunk
            return buf

        def idle() -> None:
            s = socket.create_connection((HOST, srv.port), timeout=10)
            socks.append(s)
            assert read_reply(s).startswith(b"220")
            s.sendall(b"EHLO client.test\r\n")
            assert read_reply(s).startswith(b"250-smtpd.test")
        for _ in range(20):        # first allocations of every kind
            idle()
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for _ in range(n):
                idle()
            time.sleep(0.2)
            grown = tracemalloc.get_traced_memory()[0] - base
        finally:
            tracemalloc.stop()
        try:
            assert len(srv.server.conversations) == n + 20 and all(c.idle for c in srv.server.conversations)
            assert not srv.server.tasks
            assert grown / n < 6 * 1024, f"{grown / n:.0f} bytes per idle session"
            socks[0].sendall(b"NOOP\r\n")              # an idle session wakes up for its next command
            assert read_reply(socks[0]).startswith(b"250")
        finally:
            for s in socks:
                s.close()


# --- issue 20: the line-length limit without splitting the body into lines -----------------------------------
@settings(max_examples=2000, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 1100), st.sampled_from([997, 998, 999, 1000])), max_size=12),
       st.booleans())
def test_long_line_scan_equals_splitting(lengths: list[int], final_crlf: bool) -> None:
    """RFC 5321 §4.5.3.1.6: 1000 octets with the CRLF; the scan finds exactly the lines ``split`` would."""
    block = b"\r\n".join(b"x" * n for n in lengths) + (b"\r\n" if final_crlf else b"")
    assert _has_long_line(block) == (max(map(len, block.split(b"\r\n"))) > 998)


@pytest.mark.parametrize(("at", "length", "ok"), [
    (0, 998, True), (0, 999, False),                         # the first body line
    (65_000, 998, True), (65_000, 999, False),               # across the server's 64 KiB reads
    (600_000, 998, True), (600_000, 1500, False),            # past the spill threshold (on disk)
    (999_000, 998, True), (999_000, 999, False),             # the last line
])
def test_line_limit_anywhere_in_a_large_message(at: int, length: int, ok: bool) -> None:
    """A 998-octet line is taken and a longer one refused wherever it sits, and the session goes on; an
    accepted message reaches the handler unchanged (dot-stuffing undone)."""
    line = b".x" * 20 + b"\r\n"
    body = line * (at // len(line)) + b"y" * length + b"\r\n" + line * ((1_000_000 - at) // len(line))
    message = b"Subject: big\r\n\r\n" + body
    with serve(Limits(max_message_size=4_000_000)) as srv, _session(srv.port) as c:
        _mail(c)
        reply = c.cmd(message.replace(b"\r\n.", b"\r\n..") + b".")
        assert code(reply) == (250 if ok else 554), reply
        assert ok or b"998" in reply
        assert code(c.cmd(b"NOOP")) == 250
    assert [m[2] for m in srv.handler.messages] == ([message] if ok else [])


def test_a_leading_period_is_removed_from_every_line_stuffed_or_not() -> None:
    """RFC 5321 §4.5.2: "If the first character is a period and there are other characters on the line, the
    first character is deleted". A client that does not stuff ".unstuffed" delivers "unstuffed" (as to
    Postfix, Dovecot and aiosmtpd), a stuffed "..x" delivers ".x"; also on the first body line and on lines
    that start a new 64 KiB read of the server."""
    filler = b"f" * 78 + b"\r\n"
    sent_lines = [b"Subject: dots", b"", b".first", b"..stuffed", b"...", b". space", b"plain.", b"a..b"]
    sent_lines += [filler[:-2]] * 900 + [b".after many", b"..again"] + [filler[:-2]] * 900 + [b".last"]
    wire = b"\r\n".join(sent_lines) + b"\r\n"
    want = b"\r\n".join(ln[1:] if ln.startswith(b".") else ln for ln in sent_lines) + b"\r\n"
    with serve(Limits(max_message_size=4_000_000)) as srv, _session(srv.port) as c:
        _mail(c)
        assert code(c.cmd(wire + b".")) == 250
        assert code(c.cmd(b"NOOP")) == 250
    [got] = [m[2] for m in srv.handler.messages]
    assert got == want
    assert b"\r\nfirst\r\n.stuffed\r\n..\r\n space\r\nplain.\r\na..b\r\n" in got


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"Received: x", b"received:y", b" folded", b"", b"no colon", b"Subject: s",
                                 b"Received: in\r\n\tfold"]), max_size=12))
def test_hop_count_reads_only_the_header(lines: list[bytes]) -> None:
    """RFC 5321 §6.3: Received fields of the header only (one in the body is not a hop), counted without
    copying the body: the same count as from the whole message."""
    data = b"\r\n".join(lines) + b"\r\n\r\nReceived: in the body\r\n"
    assert hop_count(data) == sum(1 for n, _ in split_message(data)[0] if n.lower() == "received")


# --- RFC conformance audit (items numbered as in the audit) ----------------------------------------------------
@dataclass
class _Sessions(Recorder):
    """A Recorder that also keeps each message's HELO name and recipients with their parameters."""

    seen: list[tuple[str, list[tuple[str, dict[str, str]]]]] = field(default_factory=list)

    async def message(self, s: Session, data: bytes) -> Reply:
        self.seen.append((s.helo, [(r, dict(p)) for r, p in s.recipients]))
        return await super().message(s, data)


def _authed(port: int) -> Client:
    """A session after STARTTLS and a second EHLO: AUTH is offered."""
    c = _session(port)
    assert code(c.cmd(b"STARTTLS")) == 220
    c.start_tls()
    assert code(c.cmd(b"EHLO client.test")) == 250
    return c


def test_helo_name_is_stored_neutered_as_postfix_does() -> None:
    """RFC 5321 §4.4: the Received "from" clause is an Extended-Domain; a HELO name with spaces, <, >, (, ),
    \\, ", ; or @ (or anything but printable ASCII) cannot forge trace clauses: each such character is '?'."""
    handler = _Sessions()
    with serve(handler=handler) as srv, Client(srv.port) as c:
        assert code(c.reply()) == 220
        assert code(c.cmd(b"EHLO trusted.example by mx.example with ESMTPSA id FAKE for <ceo@victim.example>")) == 250
        _mail(c)
        assert code(c.cmd(b"Subject: x\r\n\r\nbody\r\n.")) == 250
        assert code(c.cmd(b'HELO a(b)c\\d"e;f\tg')) == 250
        _mail(c)
        assert code(c.cmd(b"Subject: x\r\n\r\nbody\r\n.")) == 250
    assert [helo for helo, _ in handler.seen] == [
        "trusted.example?by?mx.example?with?ESMTPSA?id?FAKE?for??ceo?victim.example?", "a?b?c?d?e?f?g"]
    from postgate.inbound.smtpd import neuter_helo
    assert neuter_helo("[192.0.2.1]") == "[192.0.2.1]" and neuter_helo("é.test") == "?.test"


def test_a_duplicate_recipient_is_answered_250_and_kept_once() -> None:
    """Postfix's cleanup removes duplicate recipients: the domain compared case-insensitively, the local part
    exactly; the first one's parameters are kept, and a duplicate does not count against max_recipients."""
    handler = _Sessions()
    with serve(Limits(max_recipients=2), handler=handler) as srv, _session(srv.port) as c:
        assert code(c.cmd(b"MAIL FROM:<a@client.test>")) == 250
        assert code(c.cmd(b"RCPT TO:<bob@x.test> NOTIFY=FAILURE")) == 250
        assert code(c.cmd(b"RCPT TO:<bob@x.test>")) == 250
        assert code(c.cmd(b"RCPT TO:<bob@X.TEST> NOTIFY=NEVER")) == 250
        assert code(c.cmd(b"RCPT TO:<Bob@x.test>")) == 250                # another local part: another recipient
        assert code(c.cmd(b"RCPT TO:<bob@x.test>")) == 250                # a duplicate: not "too many"
        assert code(c.cmd(b"RCPT TO:<carol@x.test>")) == 452
        assert code(c.cmd(b"DATA")) == 354
        assert code(c.cmd(b"Subject: x\r\n\r\nbody\r\n.")) == 250
    assert handler.seen == [("client.test", [("bob@x.test", {"NOTIFY": "FAILURE"}), ("Bob@x.test", {})])]


def _codes(c: Client, lines: list[bytes]) -> list[int]:
    """The reply code to each line, sent one after the other."""
    return [code(c.cmd(line)) for line in lines]


def test_postmaster_without_domain_passes_relay_control() -> None:
    """RFC 5321 §4.5.1: RCPT TO:<Postmaster> MUST be accepted. It becomes postmaster@<hostname>, which relay
    control accepts from any client although the hostname is no local domain; postmaster@ another domain
    that is not ours is still refused."""
    relay = RelayFilter(RelayPolicy.build([], ["local.test"]))
    with serve(filters=[relay]) as srv, _session(srv.port) as c:
        assert _codes(c, [b"MAIL FROM:<a@client.test>", b"RCPT TO:<postmaster>", b"RCPT TO:<Postmaster>",
                          b"RCPT TO:<postmaster@other.test>", b"RCPT TO:<someone@smtpd.test>",
                          b"RCPT TO:<postmaster@local.test>", b"DATA", b"Subject: x\r\n\r\nbody\r\n."]) == \
            [250, 250, 250, 554, 554, 250, 354, 250]
    assert srv.handler.messages[0][1] == ["postmaster@smtpd.test", "postmaster@local.test"]
    policy = RelayPolicy.build([], ["local.test"])
    assert policy.decide("192.0.2.9", None, "postmaster@mx.test", "mx.test") is None
    assert policy.decide("192.0.2.9", None, "postmaster@other.test", "mx.test") is not None
    assert policy.decide("192.0.2.9", None, "postmaster@mx.test") is not None        # without the hostname


def test_reply_text_is_us_ascii() -> None:
    """RFC 5321 §4.2: a reply's textstring is printable US-ASCII: "section", never "§", and Reply.line puts
    '?' for any character outside US-ASCII."""
    with serve() as srv, _session(srv.port) as c:
        c.sock.sendall(b"NOOP\n")
        reply = c.reply()
        assert code(reply) == 500 and reply.isascii() and b"RFC 5321 section 2.3.8" in reply
    assert Reply(550, "5.7.1", "nicht zulässig (RFC 5321 §4.2)\nzweite Zeile ✓").line() == \
        b"550-5.7.1 nicht zul?ssig (RFC 5321 ?4.2)\r\n550 5.7.1 zweite Zeile ?\r\n"
    # a control character (a bare CR in a remote server's reply passed on) never ends a line on the wire
    assert Reply(451, "4.3.0", "remote said: ok\rMAIL FROM:<x>\x00\tend").line() == \
        b"451 4.3.0 remote said: ok?MAIL FROM:<x>?\tend\r\n"


def test_mail_line_may_grow_by_500_for_auth() -> None:
    """RFC 4954 §3 (RFC 2554 §5): AUTH= adds 500 characters to MAIL's line limit: a 705-octet MAIL with a
    256-octet path, SIZE, RET, ENVID of 100 and AUTH= of 300 is taken; a much longer line is still refused."""
    path = b"<" + b"l" * 64 + b"@" + b"d" * 184 + b".test>"
    line = b"MAIL FROM:" + path + b" SIZE=000001000 RET=HDRS ENVID=" + b"e" * 100 + b" AUTH=" + b"a" * 300
    assert len(path) == 256 and len(line) + 2 == 705
    with serve() as srv, _session(srv.port) as c:
        assert code(c.cmd(line)) == 250
        assert code(c.cmd(b"RSET")) == 250
        assert code(c.cmd(line + b"a" * 1300)) == 500


@pytest.mark.parametrize("first", [False, True])
def test_the_stuffing_dot_is_not_counted_in_the_line_limit(first: bool) -> None:
    """RFC 5321 §4.5.3.1.6: 1000 octets with the CRLF "not counting the leading dot duplicated for
    transparency": a 998-octet line that starts with a period is 999 octets on the wire, and is taken; a
    999-octet one is not. Also as the very first line of the data."""
    head = b"" if first else b"Subject: t\r\n\r\n"
    ok = head + b"." + b"x" * 997 + b"\r\nend\r\n"
    long = head + b"." + b"x" * 998 + b"\r\nend\r\n"

    def stuffed(message: bytes) -> bytes:
        return (b"." if first else b"") + message.replace(b"\r\n.", b"\r\n..") + b"."
    with serve() as srv, _session(srv.port) as c:
        _mail(c)
        assert code(c.cmd(stuffed(ok))) == 250
        _mail(c)
        assert code(c.cmd(stuffed(long))) == 554
    assert [m[2] for m in srv.handler.messages] == [b"\r\n" + ok if first else ok]


def test_message_size_excludes_the_stuffing_dots() -> None:
    """RFC 1870 §3/§6: the size is the message's, without the dots added for transparency: with a limit of
    86 octets, an 86-octet message of dot-stuffed lines (96 octets on the wire) is taken, 87 octets are not."""
    content = b"Subject: dots\r\n\r\n" + b".dot\r\n" * 10 + b"x" * 7 + b"\r\n"
    assert len(content) == 86
    with serve(Limits(max_message_size=86)) as srv, _session(srv.port) as c:
        _mail(c)
        assert code(c.cmd(content.replace(b"\r\n.", b"\r\n..") + b".")) == 250
        _mail(c)
        assert code(c.cmd(b"x" + content.replace(b"\r\n.", b"\r\n..") + b".")) == 552
    assert [m[2] for m in srv.handler.messages] == [content]


def test_auth_plain_with_another_authorization_identity_fails(tmp_path: Path) -> None:
    """RFC 4616 §2: a non-empty authzid that is not the authcid asks to act as someone else; Postgate has no
    proxy authorization, so it fails (535 5.7.8) even with the right password. Empty or equal: as before."""
    with serve(Limits(auth_delay=0), tls=tls_context(tmp_path), auth=True) as srv:
        with _authed(srv.port) as c:
            reply = c.cmd(b"AUTH PLAIN " + base64.b64encode(b"postmaster\x00alice\x00wonderland"))
            assert code(reply) == 535 and b"5.7.8" in reply
            assert code(c.cmd(b"MAIL FROM:<a@client.test>")) == 250 and code(c.cmd(b"RSET")) == 250
            assert code(c.cmd(b"AUTH PLAIN " + base64.b64encode(b"alice\x00alice\x00wonderland"))) == 235
        with _authed(srv.port) as c:
            assert code(c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00wonderland"))) == 235


def test_data_after_every_recipient_was_refused_is_554() -> None:
    """RFC 5321 §3.3: DATA in a transaction without an accepted recipient is answered "no valid recipients"
    (554 5.5.1), as Postfix does; DATA without MAIL stays out of sequence (503)."""
    with serve() as srv, _session(srv.port) as c:
        assert code(c.cmd(b"DATA")) == 503
        assert code(c.cmd(b"MAIL FROM:<a@client.test>")) == 250
        assert code(c.cmd(b"RCPT TO:<unknown@x.test>")) == 550
        reply = c.cmd(b"DATA")
        assert code(reply) == 554 and b"5.5.1 no valid recipients" in reply
        assert code(c.cmd(b"RCPT TO:<b@x.test>")) == 250               # the transaction goes on
        assert code(c.cmd(b"DATA")) == 354
        assert code(c.cmd(b"Subject: x\r\n\r\nbody\r\n.")) == 250
    assert len(srv.handler.messages) == 1


def test_starttls_without_tls_is_not_implemented() -> None:
    """STARTTLS is not advertised on a listener without TLS: the command is not implemented (502 5.5.1,
    RFC 5321 §4.2.4), not a temporary failure (454)."""
    with serve() as srv, _session(srv.port) as c:
        reply = c.cmd(b"STARTTLS")
        assert code(reply) == 502 and b"5.5.1" in reply
        assert code(c.cmd(b"NOOP")) == 250


def test_vrfy_rset_and_auth_syntax(tmp_path: Path) -> None:
    """RFC 5321 §4.1.1.6: VRFY needs an argument; §4.1.1.5: RSET takes none; RFC 4954 §4: AUTH needs a
    mechanism. Each a 501 5.5.4 syntax reply."""
    with serve(Limits(auth_delay=0), tls=tls_context(tmp_path), auth=True) as srv:
        with _session(srv.port) as c:
            assert c.cmd(b"VRFY").startswith(b"501 5.5.4 Syntax: VRFY address")
            assert code(c.cmd(b"VRFY bob")) == 252
            assert code(c.cmd(b"MAIL FROM:<a@client.test>")) == 250
            assert c.cmd(b"RSET x").startswith(b"501 5.5.4 Syntax: RSET")
            assert code(c.cmd(b"MAIL FROM:<a@client.test>")) == 503       # the RSET x did not reset
            assert code(c.cmd(b"RSET")) == 250
        with _authed(srv.port) as c:
            assert c.cmd(b"AUTH").startswith(b"501 5.5.4 Syntax: AUTH mechanism")
            assert code(c.cmd(b"AUTH PLAIN " + base64.b64encode(b"\x00alice\x00wonderland"))) == 235


class _TempfailAtConnect:
    name = "policy"
    default_action = Action.TEMPFAIL

    def session(self) -> _TempfailAtConnect:
        return self

    async def on(self, ctx: StageContext) -> Verdict:
        if ctx.stage is Stage.CONNECT:
            return Verdict(Action.TEMPFAIL, Reply(451, "4.7.1", "try later"))
        return Verdict()

    async def reset(self) -> None:
        pass

    async def close(self) -> None:
        pass


def test_every_421_names_the_server_first(tmp_path: Path) -> None:
    """RFC 5321 §4.2.3/§3.8: "421 <domain> Service not available, closing transmission channel": the idle,
    AUTH and DATA timeouts, too many errors, shutdown, and a filter's tempfail at connect."""
    lim = Limits(command_timeout=0.5, data_timeout=0.5, max_errors=2, auth_delay=0)
    with serve(lim, tls=tls_context(tmp_path), auth=True) as srv:
        with _session(srv.port) as c:                                 # idle
            assert c.reply().startswith(b"421 4.4.2 smtpd.test timeout")
        with _authed(srv.port) as c:                                  # inside AUTH
            assert code(c.cmd(b"AUTH LOGIN")) == 334
            assert c.reply().startswith(b"421 4.4.2 smtpd.test timeout")
        with _session(srv.port) as c:                                 # inside DATA
            _mail(c)
            assert c.reply().startswith(b"421 4.4.2 smtpd.test timeout exceeded during DATA")
        with _session(srv.port) as c:                                 # errors
            assert code(c.cmd(b"BOGUS")) == 500
            assert code(c.cmd(b"BOGUS")) == 500
            assert c.reply().startswith(b"421 4.7.0 smtpd.test too many errors")
        c = _session(srv.port)                                        # shutdown
        asyncio.run_coroutine_threadsafe(srv.server.stop_accepting(), srv.loop).result(10)
        assert c.reply().startswith(b"421 4.3.2 smtpd.test service shutting down")
        c.close()
    with serve(filters=[_TempfailAtConnect()]) as srv, Client(srv.port) as c:
        assert c.reply().startswith(b"421 4.7.1 smtpd.test try later")


def test_quoted_local_parts_are_accepted_and_carried_as_written() -> None:
    """RFC 5321 §4.1.2: Local-part = Dot-string / Quoted-string (qtextSMTP, quoted-pairSMTP): such an address
    is taken and reaches the handler as written, quotes and all; the other address checks stay."""
    with serve() as srv, _session(srv.port) as c:
        assert _codes(c, [b'MAIL FROM:<"a>b"@x.test> SIZE=100', b'RCPT TO:<"john doe"@x.test>',
                          b'RCPT TO:<"q\\"uote\\\\d"@x.test> NOTIFY=NEVER', b'RCPT TO:<@relay.test:"routed one"@x.test>',
                          b'RCPT TO:<"no domain">', b'RCPT TO:<"unterminated local@x.test>',
                          'RCPT TO:<"é"@x.test>'.encode(),   # non-ASCII without SMTPUTF8: 553
                          b"DATA", b"Subject: x\r\n\r\nbody\r\n."]) == [250, 250, 250, 250, 501, 501, 553, 354, 250]
    assert srv.handler.messages[0][:2] == ('"a>b"@x.test', ['"john doe"@x.test', '"q\\"uote\\\\d"@x.test',
                                                            '"routed one"@x.test'])


def test_a_session_ends_after_twenty_errors_as_postfix_s_hard_error_limit() -> None:
    """Postfix's smtpd_hard_error_limit (20): a client whose errors reach it gets 421 and is disconnected;
    before that (a sender with a dozen stale recipients, each refused) the session goes on."""
    with serve() as srv, _session(srv.port) as c:
        assert _codes(c, [b"FOO"] * 15 + [b"NOOP"]) == [500] * 15 + [250]
        assert _codes(c, [b"FOO"] * 4) == [500] * 4
        assert c.cmd(b"FOO").startswith(b"500")
        assert c.reply().startswith(b"421 4.7.0 smtpd.test too many errors")
