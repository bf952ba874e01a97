"""The SMTP client's wire: replies parsed as they arrive, commands written in as few writes as allowed.

**Replies** (RFC 5321 §4.2). Every reply is one or more lines of a three-digit code and text; a line whose
code is followed by ``-`` says more lines follow, a code followed by a space (or by the end of the line) is
the last line. Every line of one reply carries the same code (§4.2.1). The text may begin with an enhanced
status code (RFC 3463 ``class.subject.detail``, carried on every line per RFC 2034 §4); it is split off
whenever it is well formed and of the reply's class — as Postfix does, since servers (aiosmtpd among them)
send the codes without announcing ENHANCEDSTATUSCODES. A reply line may be at most 512 octets
(§4.5.3.1.5); this parser accepts up to :data:`MAX_LINE` and :data:`MAX_LINES` lines per reply, and anything
longer is a :class:`ProtocolError`, never unbounded memory.

**Buffering.** :class:`_Wire` is an ``asyncio.Protocol``: every byte the server sends is fed to the parser
in ``data_received`` and every complete reply lands in a deque, so a reply that arrives before anyone asks
for it (several in one segment, as pipelining produces) is never lost. A read takes the oldest reply and is
bounded by ``asyncio.timeout`` (no task per read).

**PIPELINING** (RFC 2920). Where the server offers it, a mail transaction is one write: [RSET] MAIL FROM,
every RCPT TO and DATA — DATA may only be the last command of a group (§3.1) because its reply changes what
the client sends next. The replies are then read in order. The content follows only a 354; a client that
pipelines must check every reply (§3.1): if DATA was accepted although no recipient was, the client sends
the end-of-data dot alone, so the server ends the transaction without a message. Without PIPELINING, one
command, one reply.

**CHUNKING** (RFC 3030). Where the server offers it as well, a content up to :data:`BODY_CHUNK` goes as
``BDAT <n> LAST`` and its n octets (CRLF line ends, no dot-stuffing, no end-of-data line) in the same
write as MAIL and RCPT: one write and one round trip per message. A larger content waits for DATA's 354,
so refused recipients never cost a large body sent in vain.

**STARTTLS** (RFC 3207). After the server's 220 the next bytes on the connection must be the TLS
handshake. A byte that the server sent after its 220 but before the handshake would be read as if it came
over TLS — the "STARTTLS command injection" family of attacks (CVE-2011-0411 on the server side; on the
client side, response injection: "NO STARTTLS", Poddebniak et al., USENIX Security 2021). Such a byte ends
the session: :class:`InjectionError`. After the handshake, everything learned before it is forgotten
(RFC 3207 §4.2) and EHLO is sent again.
"""

from __future__ import annotations

import asyncio
import base64
import re
import socket
import ssl
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

from postgate.outbound import smtp_data
from postgate.policy.vocab import Reply

MAX_LINE = 4096   # RFC 5321 §4.5.3.1.5: 512 octets; a generous, bounded allowance
MAX_LINES = 200   # lines of one reply (an EHLO reply has a few dozen at most)
CRLF = b"\r\n"
_QUICKACK: int | None = getattr(socket, "TCP_QUICKACK", None)   # Linux only (tcp(7)); elsewhere no-op
BODY_CHUNK = 256 * 1024  # the message content goes to the transport in pieces of this size (flow control)
STALL_LATE = 2.0   # a reply's timer that runs this late means this process was stalled, not the server slow
STALL_GRACE = 1.0  # then one more look for a reply that came during the stall, before giving up
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")  # RFC 3463 §2: class.subject.detail


class WireError(Exception):
    """The connection cannot go on: closed, not SMTP, or an attack sign."""


class ProtocolError(WireError):
    """The server sent something that is not an SMTP reply (RFC 5321 §4.2), or one too long."""


class ConnectionLost(WireError):
    """The server closed the connection (or it broke) before the reply we wait for."""


class InjectionError(WireError):
    """Bytes followed the 220 reply to STARTTLS before the handshake (RFC 3207 §4: response injection)."""


class ReplyError(WireError):
    """A reply the exchange cannot go on from (e.g. a refused RSET or STARTTLS)."""

    def __init__(self, command: str, reply: Reply) -> None:
        super().__init__(f"{command}: {reply}")
        self.reply = reply


class ReplyParser:
    """Incremental RFC 5321 §4.2 reply parser: :meth:`feed` bytes as they come, get whole replies."""

    def __init__(self) -> None:
        self._rest = b""
        self._code = 0
        self._lines: list[str] = []

    @property
    def pending(self) -> bool:
        """Bytes of an unfinished reply are buffered."""
        return bool(self._rest) or bool(self._lines)

    def feed(self, data: bytes) -> list[Reply]:
        if self._rest:
            data = self._rest + data
        *lines, rest = data.split(b"\n")
        if len(rest) > MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} octets (RFC 5321 §4.5.3.1.5)")
        self._rest = rest
        out: list[Reply] = []
        for line in lines:
            reply = self._line(line[:-1] if line.endswith(b"\r") else line)
            if reply is not None:
                out.append(reply)
        return out

    def _line(self, line: bytes) -> Reply | None:
        if len(line) > MAX_LINE:
            raise ProtocolError(f"reply line longer than {MAX_LINE} octets (RFC 5321 §4.5.3.1.5)")
        head, sep = line[:3], line[3:4]
        # RFC 5321 §4.2: Reply-code = %x32-35 %x30-35 %x30-39, then "-" (more lines), SP or the end
        if len(head) != 3 or head[0] not in b"2345" or head[1] not in b"012345" or head[2] not in b"0123456789" \
                or sep not in (b"", b" ", b"-"):
            raise ProtocolError(f"not an SMTP reply line: {line[:80]!r}")
        code = int(head)
        if self._lines and code != self._code:
            # RFC 5321 §4.2.1: the lines of one multi-line reply share one code
            raise ProtocolError(f"reply code changed from {self._code} to {code} within a multi-line reply")
        if len(self._lines) >= MAX_LINES:
            raise ProtocolError(f"reply of more than {MAX_LINES} lines")
        self._code = code
        self._lines.append(line[4:].decode("utf-8", "replace"))  # RFC 6531 §3.7.4: UTF-8 text may occur
        if sep == b"-":
            return None
        lines, self._lines = self._lines, []
        return make_reply(code, lines)


def make_reply(code: int, lines: Sequence[str]) -> Reply:
    """A parsed reply: the enhanced code of the first line split off (RFC 3463, RFC 2034 §4) and removed
    from the following lines that repeat it."""
    first, _, rest = lines[0].partition(" ")
    if _ENHANCED.fullmatch(first) and first[0] == str(code)[0]:
        enhanced = first
        texts = [rest] + [ln[len(first) + 1:] if ln.startswith(first + " ") else
                          ("" if ln == first else ln) for ln in lines[1:]]
        return Reply(code, enhanced, "\n".join(texts))
    return Reply(code, "", "\n".join(lines))


class _Tls:
    """TLS over two memory BIOs: records from the socket go in, records for the socket come out. Postgate
    runs TLS itself rather than through ``loop.start_tls`` because only ``wrap_bio`` takes a session to
    resume (RFC 8446 §2.2, RFC 5077), and so that one write of plaintext becomes one write of records."""

    def __init__(self, context: ssl.SSLContext, server_hostname: str | None, session: ssl.SSLSession | None,
                 ) -> None:
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=False,
                                    server_hostname=server_hostname, session=session)
        self.done = False
        self.handshake: asyncio.Future[None] = asyncio.get_running_loop().create_future()


class _Wire(asyncio.Protocol):
    """The connection's protocol object: replies into a deque, the first error kept for the reader."""

    def __init__(self) -> None:
        self.parser = ReplyParser()
        self.replies: deque[Reply] = deque()
        self.transport: asyncio.Transport | None = None
        self.tls: _Tls | None = None
        self.error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        self.paused = False   # the transport's buffer is above its high-water mark
        self._drain: asyncio.Future[None] | None = None
        self.plan: _Lockstep | None = None   # a lockstep transaction: its next command is sent as a reply comes
        self._sock: Any = None

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        d = self._drain
        if d is not None and not d.done():
            d.set_result(None)

    async def drained(self) -> None:
        """Until the transport's buffer is below its low-water mark again (or the connection failed)."""
        while self.paused and self.error is None:
            self._drain = asyncio.get_running_loop().create_future()
            try:
                await self._drain
            finally:
                self._drain = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # a stream transport; uvloop's does not derive from asyncio.Transport, so no isinstance check here
        self.transport = cast(asyncio.Transport, transport)
        extra = getattr(transport, "get_extra_info", None)   # a test's stand-in transport may have none
        self._sock = extra("socket") if extra is not None else None

    def data_received(self, data: bytes) -> None:
        if self.error is not None:
            return
        if _QUICKACK is not None and self._sock is not None:
            # acknowledge what came at once. A server without TCP_NODELAY (Postfix's smtpd) that flushed its
            # MAIL/RCPT replies before it read the BDAT chunk holds its last reply (Nagle, RFC 896) until the
            # first ones are acknowledged, and a delayed ACK (RFC 1122 §4.2.3.2) waits 40 ms here: every
            # 100 KB delivery to Postfix took 40 ms (bench/README.md). Linux leaves quick-ACK mode on its
            # own, so it is asked for again at every read (one setsockopt, ~1 µs)
            try:
                self._sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                self._sock = None   # not a TCP socket that allows it: not asked again at every read
        tls = self.tls
        if tls is not None:
            tls.incoming.write(data)
            try:
                if not tls.done:
                    self._handshake(tls)
                data = self._decrypt(tls) if tls.done else b""
            except (ssl.SSLError, ValueError) as e:
                self._abort(e)
                return
            finally:
                self._flush()
            if not data:
                return
        try:
            got = self.parser.feed(data)
        except ProtocolError as e:
            self._abort(e)
            return
        if got:
            self.replies.extend(got)
            if self.plan is not None:
                self._follow(got)
            self._wake()

    def _follow(self, got: list[Reply]) -> None:
        """A lockstep transaction's next command, written as the reply to the one before is read (here,
        not a turn of the event loop later in the waiting coroutine)."""
        for r in got:
            plan = self.plan
            if plan is None:
                return
            try:
                nxt = plan.after(r)
            except Exception as e:   # before_content's fault injection: the coroutine raises it
                plan.error, plan.finished, self.plan = e, True, None
                return
            if nxt is None:
                if plan.finished:
                    self.plan = None
                continue
            try:
                self.write(nxt)
            except ConnectionLost:
                self.plan = None   # the reader sees the failure
                return
            plan.sent()

    def _handshake(self, tls: _Tls) -> None:
        try:
            tls.obj.do_handshake()
        except ssl.SSLWantReadError:
            return
        tls.done = True
        if not tls.handshake.done():
            tls.handshake.set_result(None)

    @staticmethod
    def _decrypt(tls: _Tls) -> bytes:
        chunks = []
        while True:
            try:
                chunk = tls.obj.read(65536)
            except (ssl.SSLWantReadError, ssl.SSLZeroReturnError):
                break  # no whole record yet; or the server's close_notify (the socket's EOF follows)
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _flush(self) -> None:
        tls, t = self.tls, self.transport
        if tls is not None and t is not None and tls.outgoing.pending:
            t.write(tls.outgoing.read())

    def write(self, data: bytes | memoryview) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.error is not None:
            raise ConnectionLost("connection closed")
        tls = self.tls
        if tls is None:
            t.write(data)
            return
        try:
            tls.obj.write(data)
        except ssl.SSLError as e:
            self._abort(e)
            raise ConnectionLost(f"TLS write failed: {e}") from e
        self._flush()

    def start_tls(self, context: ssl.SSLContext, server_hostname: str | None,
                  session: ssl.SSLSession | None) -> asyncio.Future[None]:
        """Switch to TLS now (synchronously: every later byte from the server is a TLS record) and send
        the ClientHello; the future completes with the handshake."""
        tls = _Tls(context, server_hostname, session)
        self.tls = tls
        self.parser = ReplyParser()
        try:
            self._handshake(tls)
        except ssl.SSLError as e:
            self._abort(e)
        self._flush()
        return tls.handshake

    def close(self) -> None:
        """close_notify when TLS is up (RFC 8446 §6.1), then close the socket."""
        tls = self.tls
        if tls is not None and tls.done and self.error is None:
            try:
                tls.obj.unwrap()
            except (ssl.SSLError, ValueError):
                pass  # the server's close_notify is not waited for
            self._flush()
        if self.transport is not None:
            self.transport.close()

    def _abort(self, e: BaseException) -> None:
        self._fail(e)
        if self.transport is not None:
            self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(ConnectionLost(f"connection lost: {exc}" if exc else "connection closed by the server"))

    def _fail(self, e: BaseException) -> None:
        if self.error is None:
            self.error = e
        tls = self.tls
        if tls is not None and not tls.handshake.done():
            tls.handshake.set_exception(e)
        self._wake()

    def _wake(self) -> None:
        for w in (self._waiter, self._drain):
            if w is not None and not w.done():
                w.set_result(None)

    async def next_reply(self) -> Reply:
        while not self.replies:
            e = self.error
            if e is not None:  # replies that came before the error are still delivered (a 221 then close)
                raise type(e)(*e.args) if isinstance(e, WireError) else ConnectionLost(str(e))
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self.replies.popleft()


@dataclass(frozen=True)
class Extensions:
    """What an EHLO reply offered (RFC 5321 §4.1.1.1): keywords in lower case with their parameters."""

    keywords: dict[str, str]
    auth: tuple[str, ...] = ()   # RFC 4954 §3: the SASL mechanisms, upper case

    @classmethod
    def parse(cls, reply: Reply) -> Extensions:
        kw: dict[str, str] = {}
        auth: list[str] = []
        for line in reply.text.split("\n")[1:]:  # the first line is the server's name
            line = line.strip()
            if not line:
                continue
            word, _, params = line.partition(" ")
            if word.upper().startswith("AUTH="):  # the pre-RFC 2554 form some servers still send
                word, params = "AUTH", word[5:] + (" " + params if params else "")
            kw[word.lower()] = params  # RFC 5321 §2.4: keywords are case-insensitive
            if word.lower() == "auth":
                auth += [m.upper() for m in params.split()]
        return cls(kw, tuple(dict.fromkeys(auth)))

    @property
    def size(self) -> int | None:
        """RFC 1870: the SIZE limit, if one was announced."""
        v = self.keywords.get("size", "")
        return int(v) if v.isdigit() else None


NO_EXTENSIONS = Extensions({})


class Connection:
    """One SMTP connection from the client side: read replies, write commands, switch to TLS."""

    def __init__(self, proto: _Wire) -> None:
        self._proto = proto
        self.extensions = NO_EXTENSIONS
        self._closing = False   # a 421 was read, or the connection was closed

    @classmethod
    async def open(cls, host: str, port: int, timeout: float) -> Connection:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, proto = await loop.create_connection(_Wire, host, port)
        return cls(proto)

    @property
    def local_address(self) -> str:
        """The IP address this end of the connection is bound to ("" once closed)."""
        transport = self._proto.transport
        sock = transport.get_extra_info("sockname") if transport is not None else None
        return str(sock[0]) if sock else ""

    # --- reading and writing ---------------------------------------------------------------------------
    async def read(self, timeout: float) -> Reply:
        """The next reply, waiting at most ``timeout`` seconds; a timeout leaves the exchange out of step,
        so it also aborts the connection.

        A timer that runs STALL_LATE seconds after it was due means this process was stalled (SIGSTOP, a VM
        freeze), not that the server was slow: the reply may have come meanwhile and be waiting unread (a
        turn of uvloop's loop runs the overdue timers before it reads the sockets). Then the wait gets one
        more look of STALL_GRACE seconds, so a message the server accepted during the stall is not given up
        (and later delivered twice) for our own pause."""
        replies = self._proto.replies
        if replies:   # already read (the rest of a pipelined group): no timer to arm
            return self._got(replies.popleft())
        try:
            try:
                async with asyncio.timeout(timeout) as deadline:
                    reply = await self._proto.next_reply()
            except TimeoutError:
                due = deadline.when()
                if due is None or asyncio.get_running_loop().time() - due < STALL_LATE:
                    raise
                async with asyncio.timeout(STALL_GRACE):
                    reply = await self._proto.next_reply()
        except TimeoutError:
            self.abort()
            raise
        return self._got(reply)

    def _got(self, reply: Reply) -> Reply:
        if reply.code == 421:  # RFC 5321 §3.8: the server is closing the transmission channel
            self._closing = True
        return reply

    def write(self, data: bytes) -> None:
        self._proto.write(data)

    async def write_body(self, data: bytes, timeout: float) -> None:
        """A large write in pieces, each after the transport drained below its high-water mark: the
        transport never holds the whole body (whose buffer would be copied and shifted per send)."""
        if len(data) <= BODY_CHUNK:
            self.write(data)
            return
        view = memoryview(data)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout) as deadline:
                for i in range(0, len(view), BODY_CHUNK):
                    self._proto.write(view[i:i + BODY_CHUNK])
                    if self._proto.paused:
                        # RFC 5321 §4.5.3.2.5: the data block timeout is "while awaiting the completion of each
                        # TCP SEND call", not of the whole body: a slow but steady receiver is not cut off
                        deadline.reschedule(loop.time() + timeout)
                        await self._proto.drained()
        except TimeoutError:
            self.abort()
            raise

    def follow(self, plan: _Lockstep | None) -> None:
        """Start a lockstep transaction (its first command now, the rest as the replies come), or stop one."""
        self._proto.plan = plan
        if plan is not None:
            self.write(plan.first())
            plan.sent()

    async def command(self, line: bytes, timeout: float) -> Reply:
        self.write(line + CRLF)
        return await self.read(timeout)

    @property
    def alive(self) -> bool:
        """Usable for another transaction: open, no 421 seen, and no unread bytes (an idle connection has
        none; a reply nobody asked for, such as a timeout's 421, means it is out of step)."""
        t, p = self._proto.transport, self._proto
        return (not self._closing and p.error is None and t is not None and not t.is_closing()
                and not p.replies and not p.parser.pending)

    def supports(self, keyword: str) -> bool:
        return keyword.lower() in self.extensions.keywords

    @property
    def ssl_object(self) -> ssl.SSLObject | None:
        tls = self._proto.tls
        return tls.obj if tls is not None and tls.done else None

    def abort(self) -> None:
        self._closing = True
        if self._proto.transport is not None:
            self._proto.transport.abort()

    def close(self) -> None:
        self._closing = True
        self._proto.close()

    async def quit(self, timeout: float) -> None:
        """QUIT (RFC 5321 §4.1.1.10), waiting at most ``timeout`` for the 221, then close."""
        try:
            if self.alive:
                await self.command(b"QUIT", timeout)
        except (WireError, OSError, TimeoutError):
            pass
        finally:
            self.close()

    # --- session set-up --------------------------------------------------------------------------------
    async def ehlo(self, name: str, timeout: float, *, helo_fallback: bool = False) -> Reply:
        """EHLO, and the extensions it offers. ``helo_fallback``: a 5xx to EHLO is answered with HELO
        (RFC 5321 §3.2, §4.1.4: a server without extensions; Postfix does the same); then none are known.
        Returns the reply that ended it (a non-250 means refused)."""
        self.extensions = NO_EXTENSIONS
        r = await self.command(b"EHLO " + name.encode("ascii"), timeout)
        if r.code == 250:
            self.extensions = Extensions.parse(r)
            return r
        if helo_fallback and 500 <= r.code < 600:
            return await self.command(b"HELO " + name.encode("ascii"), timeout)
        return r

    async def starttls(self, context: ssl.SSLContext, server_hostname: str | None, timeout: float,
                       session: ssl.SSLSession | None = None) -> None:
        """STARTTLS (RFC 3207) and the handshake, resuming ``session`` if the server agrees; raises
        ReplyError, InjectionError, ssl.SSLError, OSError or TimeoutError (and the connection is gone)."""
        r = await self.command(b"STARTTLS", timeout)
        if r.code != 220:
            raise ReplyError("STARTTLS", r)
        if self._proto.replies or self._proto.parser.pending:
            # RFC 3207 §4 (response injection): bytes the server sent after its 220, before the handshake
            self.abort()
            raise InjectionError("bytes after the 220 reply to STARTTLS, before the TLS handshake "
                                 "(response injection)")
        try:
            # from here every byte from the server is a TLS record (the switch is synchronous)
            handshake = self._proto.start_tls(context, server_hostname, session)
            async with asyncio.timeout(timeout):
                await handshake
        except BaseException:
            self.abort()
            raise
        self.extensions = NO_EXTENSIONS  # RFC 3207 §4.2: forget what was learned before TLS

    async def auth(self, user: str, password: str, timeout: float) -> Reply:
        """SMTP AUTH (RFC 4954): PLAIN (RFC 4616, one round trip) when offered, else LOGIN. Returns the final
        reply (235 on success)."""
        def b64(s: str) -> bytes:
            return base64.b64encode(s.encode("utf-8"))
        if "PLAIN" in self.extensions.auth:
            return await self.command(b"AUTH PLAIN " + b64(f"\0{user}\0{password}"), timeout)
        r = await self.command(b"AUTH LOGIN", timeout)
        for secret in (user, password):
            if r.code != 334:  # RFC 4954 §4: a 334 challenge asks for the next response
                return r
            r = await self.command(b64(secret), timeout)
        return r


# --- one mail transaction ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Exchange:
    """The server's replies to one mail transaction."""

    mail: Reply
    rcpts: tuple[Reply, ...]      # one per RCPT, in order (none when MAIL was refused without pipelining)
    data: Reply | None = None     # the reply to DATA; None: not sent (BDAT, or no recipient accepted)
    final: Reply | None = None    # the reply after the content (or to BDAT LAST); None: no content sent

    @property
    def end(self) -> Reply | None:
        """The reply that ends the transaction for the accepted recipients: after the content, else the
        refusal of DATA."""
        return self.final if self.final is not None else self.data

    @property
    def accepted(self) -> list[int]:
        """Indices of the recipients the server accepted (RFC 5321 §4.1.1.3: 250 or 251)."""
        if self.mail.code != 250:
            return []
        return [i for i, r in enumerate(self.rcpts) if r.code in (250, 251)]


async def transaction(conn: Connection, mail: bytes, rcpts: Sequence[bytes], content: bytes, *, reset: bool,
                      command_timeout: float, data_timeout: float,
                      before_content: Callable[[], None] = lambda: None) -> Exchange:
    """MAIL, RCPT each, DATA and the content (``smtp_data.encode`` of ``content``) — pipelined where the
    server offers PIPELINING (RFC 2920). ``mail`` and ``rcpts`` are the command lines without CRLF. Raises
    ReplyError for a refused RSET, WireError/OSError/TimeoutError when the connection fails; on any
    exception the connection is aborted (it is out of step)."""
    try:
        if conn.supports("pipelining"):
            return await _pipelined(conn, mail, rcpts, content, reset, command_timeout, data_timeout,
                                    before_content)
        return await _lockstep(conn, mail, rcpts, content, reset, command_timeout, data_timeout, before_content)
    except BaseException:
        conn.abort()
        raise


async def _pipelined(conn: Connection, mail: bytes, rcpts: Sequence[bytes], content: bytes, reset: bool,
                     ct: float, dt: float, before_content: Callable[[], None]) -> Exchange:
    group = [b"RSET"] if reset else []
    if conn.supports("chunking") and len(content) <= BODY_CHUNK:
        # RFC 3030 §2, §4.2: BDAT with its octets may follow MAIL and RCPT in the same group; one chunk,
        # LAST, no transparency. The server consumes the octets even if it refuses the chunk (§2), so a
        # refused recipient costs at most BODY_CHUNK octets sent in vain; larger contents wait for DATA's 354.
        body = smtp_data.canonical(content)
        before_content()
        conn.write(CRLF.join([*group, mail, *rcpts, b"BDAT %d LAST" % len(body), b""]) + body)
        m, replies = await _group_replies(conn, len(rcpts), reset, ct)
        return Exchange(m, replies, None, await conn.read(dt))
    if conn.supports("chunking"):
        # RFC 3030 §2: a larger content goes as one BDAT LAST chunk once the RCPT replies are in (so a refused
        # recipient costs no octets sent in vain): no 354 round trip, and no dot-stuffing pass over the whole
        # content nor end-of-data line appended to it (a copy) — 1-2 ms per MB here. Without an accepted
        # recipient nothing follows: the transaction stays open until the next one's RSET (or QUIT).
        conn.write(CRLF.join([*group, mail, *rcpts, b""]))
        m, replies = await _group_replies(conn, len(rcpts), reset, ct)
        ex = Exchange(m, replies)
        if not ex.accepted:
            return ex
        body = smtp_data.canonical(content)
        before_content()
        conn.write(b"BDAT %d LAST" % len(body) + CRLF)
        await conn.write_body(body, dt)   # in flow-controlled pieces
        return Exchange(m, replies, None, await conn.read(dt))
    # RFC 2920 §3.1: RSET, MAIL and RCPT anywhere in a group, DATA only last: one write
    conn.write(CRLF.join([*group, mail, *rcpts, b"DATA", b""]))
    m, replies = await _group_replies(conn, len(rcpts), reset, ct)
    d = await conn.read(dt)
    ex = Exchange(m, replies, d)
    if d.code != 354:  # RFC 5321 §4.1.1.4: the content follows only a 354
        return ex
    if not ex.accepted:
        # RFC 2920 §3.1: DATA accepted with no recipient: a single dot ends it without a message
        conn.write(smtp_data.END_OF_DATA)
        await conn.read(dt)
        return ex
    before_content()
    await conn.write_body(smtp_data.encode(content), dt)  # one write (in flow-controlled pieces past 256 KB)
    return Exchange(m, replies, d, await conn.read(dt))


async def _group_replies(conn: Connection, n_rcpts: int, reset: bool, ct: float) -> tuple[Reply, tuple[Reply, ...]]:
    """The replies to a pipelined group, in order (RFC 2920 §3.1): RSET's (a refusal ends the session),
    MAIL's, and one per RCPT."""
    if reset:
        r = await conn.read(ct)
        if r.code != 250:
            raise ReplyError("RSET", r)
    m = await conn.read(ct)
    return m, tuple([await conn.read(ct) for _ in range(n_rcpts)])


class _Lockstep:
    """A transaction without PIPELINING: one command at a time, each after the reply to the one before (RFC
    5321 §4.1.1, §3.3). Which command follows a reply is decided here, and the protocol sends it from
    ``data_received`` as that reply arrives; the waiting coroutine only collects the replies (issue 20: each
    command waited for a turn of the event loop after its predecessor's reply, and under load a turn waits
    behind every other session's work — a lockstep transaction on a reused connection has five of them). The
    commands, their order and their conditions are those of a coroutine sending them one by one:

    - RSET first on a reused connection (as Postfix checks that a cached session still works); anything but
      250 ends the exchange (ReplyError);
    - MAIL; anything but 250 ends the transaction (no RCPT without a reverse-path, RFC 5321 §4.1.1.2);
    - every RCPT, whatever the ones before got (each recipient has its own reply, §4.1.1.3);
    - DATA if a recipient got 250 or 251, else RSET to abandon the transaction (§4.1.1.5);
    - the content after a 354 (§4.1.1.4): in one write up to BODY_CHUNK, a larger one by the coroutine under
      the transport's flow control."""

    __slots__ = ("accepted", "before_content", "body", "commands", "content", "ct", "dt", "error", "finished", "i",
                 "mail", "rcpts", "stage", "timeouts")

    def __init__(self, mail: bytes, rcpts: Sequence[bytes], content: bytes, reset: bool, ct: float, dt: float,
                 before_content: Callable[[], None]) -> None:
        self.mail, self.rcpts, self.content, self.ct, self.dt = mail, rcpts, content, ct, dt
        self.before_content = before_content
        self.stage = "rset" if reset else "mail"
        self.i = 0
        self.accepted = False
        self.finished = False      # no command follows any more
        self.body: bytes | None = None   # a content too large for one write: the coroutine sends it
        self.commands = 0          # commands (and content) written so far: the replies owed
        self.timeouts: list[float] = []  # the timeout for each of those replies
        self.error: Exception | None = None   # raised by before_content

    def first(self) -> bytes:
        return b"RSET" + CRLF if self.stage == "rset" else self.mail + CRLF

    def sent(self) -> None:
        self.commands += 1
        # RFC 5321 §4.5.3.2: the DATA initiation and the end of the data have their own (longer) timeouts
        self.timeouts.append(self.dt if self.stage in ("data", "content") else self.ct)

    def after(self, r: Reply) -> bytes | None:
        """What to send after reply ``r``: the next command or the content; None when the exchange is over
        (or the coroutine writes a large content)."""
        st = self.stage
        if st == "rset":
            if r.code != 250:
                return self._end()
            self.stage = "mail"
            return self.mail + CRLF
        if st == "mail":
            if r.code != 250:
                return self._end()
            self.stage = "rcpt"
            return self.rcpts[0] + CRLF
        if st == "rcpt":
            self.accepted |= r.code in (250, 251)
            self.i += 1
            if self.i < len(self.rcpts):
                return self.rcpts[self.i] + CRLF
            if not self.accepted:
                self.stage = "abandon"
                return b"RSET" + CRLF
            self.before_content()
            self.stage = "data"
            return b"DATA" + CRLF
        if st == "data":
            if r.code != 354:
                return self._end()
            self.stage = "content"
            body = smtp_data.encode(self.content)
            if len(body) > BODY_CHUNK:
                self.body = body
                return self._end()
            return body
        return self._end()

    def _end(self) -> bytes | None:
        self.finished = True
        return None


async def _lockstep(conn: Connection, mail: bytes, rcpts: Sequence[bytes], content: bytes, reset: bool,
                    ct: float, dt: float, before_content: Callable[[], None]) -> Exchange:
    plan = _Lockstep(mail, rcpts, content, reset, ct, dt, before_content)
    replies: list[Reply] = []
    try:
        conn.follow(plan)
        while len(replies) < plan.commands:   # the plan sent the next command as each reply came
            replies.append(await conn.read(plan.timeouts[len(replies)]))
        if plan.error is not None:
            raise plan.error
        if plan.body is not None:
            await conn.write_body(plan.body, dt)
            replies.append(await conn.read(dt))
    finally:
        conn.follow(None)
    it = iter(replies)
    if reset:
        r = next(it)
        if r.code != 250:
            raise ReplyError("RSET", r)
    m = next(it)
    if m.code != 250:
        return Exchange(m, ())
    rc = tuple(next(it) for _ in rcpts)
    ex = Exchange(m, rc)
    if not ex.accepted:
        r = next(it)  # RFC 5321 §4.1.1.5: the transaction abandoned
        if r.code != 250:
            raise ReplyError("RSET", r)
        return ex
    d = next(it)
    if d.code != 354:
        return Exchange(m, rc, d)
    return Exchange(m, rc, d, next(it))
