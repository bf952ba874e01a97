"""Postgate's SMTP server protocol: strict about what it accepts, and small while a session is idle.

Why not aiosmtpd's protocol, which the test receivers use: it reads DATA line by line (about 50 µs per
KB), passes bare LF inside lines through, and refuses the DSN and REQUIRETLS parameters. This server reads
DATA in bulk, refuses any bare LF or CR in commands and data (RFC 5321 §2.3.8, so SMTP smuggling payloads
cannot end a message early or start a second one), and implements:

PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES
(RFC 2034), STARTTLS (RFC 3207), AUTH PLAIN and LOGIN (RFC 4954, only over TLS), DSN (RFC 3461) and
REQUIRETLS (RFC 8689, only after STARTTLS).

At each point where it answers (connect, HELO/EHLO, MAIL, RCPT, end of DATA) the session asks the
listener's filter chain (``inbound/filters.py``: relay control first, then Milter, policy delegation,
Sieve …) and applies the verdict: a reject or tempfail becomes the reply (at RCPT for that recipient only),
a discard is answered 250 and dropped, a hold sends the message to the hold queue, header/body/sender/
recipient edits are applied before the :class:`Handler` (``inbound/prequeue.py``) delivers or queues it.

A session is one asyncio Protocol object (:class:`_Stream`) and its :class:`_Conversation`; the conversation
runs in a task only while it works on a command, and holds none while it waits for the next one (most of an
idle session's life): about 3 KiB per idle session instead of 7 (issue 20: 100,000 sessions under 1 GiB).
Implicit TLS (port 465, RFC 8314 §3.3) is accepted by an own loop that counts the connection, then puts the TLS
layer on the socket before anything is read; STARTTLS (RFC 3207) switches right after its 220, without a turn
of the loop in between. Neither pauses reading before a handshake, so both run the same on asyncio's loop and
uvloop (whose start_tls would not resume a paused transport).

Every client is bounded in what it can cost: connections are counted per client address from the accept
(before a TLS handshake, which has its own time limit), descriptors are kept in reserve, every read and
write has a timeout and DATA an overall deadline, a message body is spilled to a temporary file above a
small threshold while it is received, and failed AUTH attempts are slowed down per client and per account.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import logging
import re
import resource
import socket
import ssl
import tempfile
import time
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import IO, Any, Protocol

from postgate.inbound.filters import (
    Action,
    Filter,
    FilterChain,
    Route,
    Stage,
    StageContext,
    Verdict,
    apply_header_edits,
    split_message,
)
from postgate.policy import metrics
from postgate.policy.vocab import Reply, new_queue_id

log = logging.getLogger("postgate.smtpd")

# RFC 5321 §4.5.3.1.4: a command line is at most 512 octets with its CRLF. Extensions raise it for the
# commands they extend: RFC 1870 §3 (SIZE) by 26 for MAIL, RFC 3461 §4 by 100 (ENVID) + 9 (RET) for MAIL and
# by 500 (ORCPT) + 30 (NOTIFY) for RCPT, RFC 4954 §3 (from RFC 2554 §5) by 500 for MAIL's AUTH= parameter,
# RFC 4954 §4 allows AUTH lines (and SASL responses) of 12,288 octets.
MAX_COMMAND = 512
MAX_MAIL = 512 + 26 + 100 + 9 + 500 + 40   # + SMTPUTF8, BODY=8BITMIME, REQUIRETLS: some room
MAX_RCPT = 512 + 500 + 30
MAX_AUTH = 12288
MAX_DATA_LINE = 1000        # RFC 5321 §4.5.3.1.6, including CRLF
# RFC 5321 §4.1.2: Local-part = Dot-string / Quoted-string; Quoted-string = DQUOTE *QcontentSMTP DQUOTE,
# qtextSMTP = %d32-33 / %d35-91 / %d93-126 (RFC 6531 §3.3: / UTF8-non-ascii), quoted-pairSMTP = "\" %d32-126.
# A path is either a quoted local part "@" a domain (optionally after a source route, which is ignored), or
# (as before) anything without angle brackets and white space; the address is kept as written, quotes and all
_QUOTED_LOCAL = r'"(?:[ !#-\[\]-~]|[^\x00-\x7f]|\\[ -~])*"'
_ADDR = re.compile(rf'^<((?:@[^<>\s":]*:)?{_QUOTED_LOCAL}@[^<>\s"@]+|[^<>\s]*)>(.*)$')
_XTEXT_OK = re.compile(r"^([!-*,-<>-~]|\+[0-9A-F]{2})*$")  # RFC 3461 §4: xtext
_VERB = re.compile(r"^[A-Za-z]{1,12}$")                     # RFC 5321 §4.1.1: ASCII letters only
# Searches of the DATA stream for short literals: the regular-expression engine's literal-prefix scan is
# about twice as fast as bytes.find for these (25 against 43-57 µs per 100 KB here: find's two-way
# search restarts at every CR, one per line), and most messages have neither a dot-stuffed line nor "."
# alone on a line before their end
_END_OF_DATA = re.compile(rb"\r\n\.\r\n")   # RFC 5321 §4.1.1.4: "." alone on a line ends the data
_STUFFED = re.compile(rb"\r\n\.")          # RFC 5321 §4.5.2: a line that starts with a period


@dataclass
class Listener:
    name: str                          # mx, submission, submissions
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # for STARTTLS (or implicit TLS when implicit_tls)
    implicit_tls: bool = False
    auth: bool = False                 # offer AUTH (after TLS)
    auth_required: bool = False        # MAIL refused without AUTH (submission)
    # the filter chain of this listener, in order (inbound/filters.py): the daemon puts relay control first,
    # then whatever [[listener]] configures (Milter, policy delegation, Sieve)
    filters: Sequence[Filter] = ()


@dataclass
class Limits:
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_errors: int = 20               # Postfix's smtpd_hard_error_limit: a sender with a few stale
                                       # recipients is not cut off (its soft limit, 10, only slows)
    command_timeout: float = 300.0     # RFC 5321 §4.5.3.2.7: the server waits at least 5 minutes
    data_timeout: float = 600.0        # per read inside DATA, and the base of the DATA deadline
    min_data_rate: int = 500           # octets/s: the DATA deadline grows by received/min_data_rate (Postfix)
    tls_handshake_timeout: float = 30.0
    max_sessions: int = 10000
    max_sessions_per_client: int = 50
    spill_threshold: int = 262144      # message octets kept in memory while receiving; the rest on disk
    auth_delay: float = 1.0            # seconds before the reply to the first failed AUTH; doubles each time
    auth_max_delay: float = 30.0
    auth_window: float = 900.0         # failures older than this are forgotten
    client_name_timeout: float = 5.0   # reverse DNS of the client (Postfix client_name)
    descriptor_reserve: int = 100      # descriptors never used for client sessions


@dataclass(slots=True)   # one per session, idle ones too: no __dict__ (issue 20)
class Session:
    listener: Listener
    peer: tuple[str, int]
    helo: str = ""
    esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None
    user: str | None = None            # authenticated user
    auth_method: str | None = None
    client_name: str = "unknown"       # forward-confirmed reverse name (Postfix client_name)
    reverse_client_name: str = "unknown"
    local: tuple[str, int] = ("", 0)
    errors: int = 0
    sender: str | None = None
    mail_params: dict[str, str] = field(default_factory=dict)
    recipients: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    recipient_keys: set[str] = field(default_factory=set)   # of the RCPTs accepted: duplicates are kept once
    queue_id: str = ""                 # given at MAIL, as Postfix does
    hold: str | None = None            # a filter put the message on hold: why
    discard: Verdict | None = None     # a filter discarded the message
    edits: list[Verdict] = field(default_factory=list)   # modifications of the filters, in order
    routes: tuple[Route, ...] = ()     # delivery choices of the filters (see PreQueue)

    @property
    def tls(self) -> bool:
        return self.tls_version is not None

    def reset(self) -> None:
        self.sender = None
        self.mail_params = {}
        self.recipients = []
        self.recipient_keys = set()
        self.queue_id = ""
        self.hold = None
        self.discard = None
        self.edits = []
        self.routes = ()

    def context(self, stage: Stage, hostname: str) -> StageContext:
        """What the filters see at ``stage``."""
        return StageContext(
            stage, self.listener.name, self.peer[0], self.peer[1], client_name=self.client_name,
            reverse_client_name=self.reverse_client_name, local_address=self.local[0], local_port=self.local[1],
            hostname=hostname, helo=self.helo, esmtp=self.esmtp, tls_version=self.tls_version,
            tls_cipher=self.tls_cipher, tls_bits=self.tls_bits, auth_user=self.user,
            auth_method=self.auth_method, queue_id=self.queue_id, sender=self.sender,
            mail_params=dict(self.mail_params), recipients=[r for r, _ in self.recipients],
            # RFC 1870: the announced SIZE until the message is there (Postfix policy attribute "size")
            size=int(self.mail_params["SIZE"]) if self.mail_params.get("SIZE", "").isdigit() else 0)


class Handler(Protocol):
    async def check_rcpt(self, s: Session, rcpt: str, params: dict[str, str]) -> Reply | None: ...
    async def message(self, s: Session, data: bytes) -> Reply: ...


Authenticator = Callable[[str, str], Awaitable[bool]]
# the client's names from its address: (forward-confirmed name or "unknown", PTR name or "unknown")
ClientNames = Callable[[str], Awaitable[tuple[str, str]]]


class BareLineEnding(Exception):
    pass


class _Close(Exception):
    """End the session, after ``reply`` if there is one."""

    def __init__(self, reply: Reply | None = None) -> None:
        super().__init__(reply.text if reply else "")
        self.reply = reply


def xtext_decode(s: str) -> str:
    """RFC 3461 §4: +XX is a hex-encoded octet."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), s)


def xtext_value_ok(s: str) -> bool:
    """RFC 3461 §4: xtext whose decoded value is printable US-ASCII (RFC 3461 §4.4: ENVID "consists of
    printable (graphic and white space) characters from the US-ASCII repertoire"; §4.2: ORCPT likewise):
    no CR, LF or other control characters, even when hex-encoded, so nothing can reach a DSN's header."""
    if not _XTEXT_OK.match(s):
        return False
    return all(" " <= c <= "~" for c in xtext_decode(s))


# Postfix smtpd's NEUTER_CHARACTERS: what could end or fake a clause of a Received: field
_NEUTER = frozenset(' <>()\\";@')


def neuter_helo(name: str) -> str:
    """The HELO/EHLO name as stored and written into Received: (RFC 5321 §4.4: the "from" clause is an
    Extended-Domain, no free text): printable US-ASCII only, and each of space < > ( ) \\ " ; @ replaced by
    '?', as Postfix's smtpd does (printable() then neuter()), so ``EHLO a by b with ESMTPSA id X for <c>``
    cannot forge trace clauses."""
    return "".join("?" if c in _NEUTER or not "!" <= c <= "~" else c for c in name)


def _recipient_key(addr: str) -> str:
    """What makes two recipient addresses the same: the local part exactly, the domain lower-cased."""
    local, at, domain = addr.rpartition("@")
    return f"{local}{at}{domain.lower()}"


def hop_count(data: bytes) -> int:
    """RFC 5321 §6.3: the number of ``Received:`` trace fields in the header (loop detection)."""
    end = data.find(b"\r\n\r\n")   # only the header section: split_message returns a copy of the body
    headers, _ = split_message(data if end < 0 else data[:end + 4])
    return sum(1 for name, _ in headers if name.lower() == "received")


HOPCOUNT_LIMIT = 50   # Postfix hopcount_limit


def _prefix(buf: bytearray, n: int) -> bytes:
    """The first ``n`` octets of ``buf`` as bytes, copied once (``bytes(buf[:n])`` copies twice); the view is
    released at once, so ``buf`` can be resized after."""
    with memoryview(buf) as view:
        return view[:n].tobytes()


def _has_long_line(block: bytes) -> bool:
    """RFC 5321 §4.5.3.1.6: a text line is at most 1000 octets with its CRLF. True when a line of ``block``
    (CR and LF only as CRLF pairs) is longer, without splitting it into lines: from a line start ``p``, the
    last CRLF that begins within the next 999 octets ends a run of lines that are all short enough, so the
    scan jumps by almost a line limit at a time (one ``rfind`` per ~1000 octets, C speed)."""
    n = len(block)
    p = 0
    while n - p > MAX_DATA_LINE - 2:          # what is left could hold a line of 999 octets
        q = block.rfind(b"\r\n", p, p + MAX_DATA_LINE)
        if q < 0:
            return True                       # no line end within 998 octets of a line start
        p = q + 2
    return False


def repair_header(data: bytes) -> bytes:
    """RFC 5322 §2.1-§2.2: a header is field lines ("name: value", or continuation lines starting with white
    space) up to an empty line. A message whose first line is not a field (no header at all), or whose
    header holds a line without a colon, gets the empty line inserted before that line: what follows is
    body, as Postfix's cleanup treats it. Then every DKIM signer and parser sees a well-formed message."""
    pos = 0
    n = len(data)
    while pos < n:
        end = data.find(b"\r\n", pos)
        line = data[pos:n if end < 0 else end]
        if not line:
            return data                     # the empty line: the header is well formed
        if line[:1] in (b" ", b"\t") and pos > 0:
            pass                            # RFC 5322 §2.2.3: folded continuation
        else:
            colon = line.find(b":")
            name = line[:colon] if colon > 0 else b""
            # RFC 5322 §3.6.8: field-name = 1*ftext, printable US-ASCII except colon
            if not name or not all(33 <= c <= 126 for c in name):
                return data[:pos] + b"\r\n" + data[pos:]
        if end < 0:
            return data + b"\r\n\r\n"       # header only, no CRLF at the end
        pos = end + 2
    return data + b"\r\n"                   # only header lines: the empty line ends them


class AuthThrottle:
    """Failed AUTH attempts slow the next reply down, per client address and per account (user name), so a
    guesser gets fewer tries per second the more it fails: delay = base × 2^(failures − 1), capped; a
    failure is forgotten after ``window`` seconds, and a success clears the account's and client's count."""

    def __init__(self, base: float, cap: float, window: float) -> None:
        self.base, self.cap, self.window = base, cap, window
        self.fails: dict[str, list[float]] = {}

    def _count(self, key: str, now: float) -> int:
        times = [t for t in self.fails.get(key, []) if now - t < self.window]
        if times:
            self.fails[key] = times
        else:
            self.fails.pop(key, None)
        return len(times)

    def failed(self, ip: str, user: str, now: float) -> float:
        """Record a failure; the delay before the 535 reply."""
        if len(self.fails) > 100000:            # bounded memory under a distributed attack
            self.fails.clear()
        for key in (f"ip:{ip}", f"user:{user.lower()}"):
            self.fails.setdefault(key, []).append(now)
        n = max(self._count(f"ip:{ip}", now), self._count(f"user:{user.lower()}", now))
        return min(self.cap, self.base * 2 ** (n - 1)) if self.base > 0 else 0.0

    def succeeded(self, ip: str, user: str) -> None:
        self.fails.pop(f"ip:{ip}", None)
        self.fails.pop(f"user:{user.lower()}", None)


class _RateLimitedLog:
    """One log line per ``interval`` for a recurring condition, with the count of the suppressed ones."""

    def __init__(self, interval: float = 10.0) -> None:
        self.interval, self.last, self.suppressed = interval, 0.0, 0

    def __call__(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self.last < self.interval:
            self.suppressed += 1
            return
        extra = f" ({self.suppressed} more like this suppressed)" if self.suppressed else ""
        self.last, self.suppressed = now, 0
        log.warning(msg + extra, *args)


_open_connections = 0   # client connections of every listener of this process (for the descriptor reserve)


def descriptor_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as most daemons do) and return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


class SMTPServer:
    def __init__(self, listener: Listener, handler: Handler, *, hostname: str, limits: Limits | None = None,
                 authenticator: Authenticator | None = None, client_names: ClientNames | None = None) -> None:
        self.listener = listener
        self.handler = handler
        self.hostname = hostname
        self.limits = limits or Limits()
        self.authenticator = authenticator
        self.client_names = client_names
        self.sessions = 0
        self.per_client: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()    # sessions running a command (or starting)
        self.conversations: set[_Conversation] = set()  # every session, idle ones too (they hold no task)
        self.stopping = False
        self.server: asyncio.AbstractServer | _AcceptLoop | None = None
        self.throttle = AuthThrottle(self.limits.auth_delay, self.limits.auth_max_delay, self.limits.auth_window)
        self.fd_limit = 1 << 20
        self._refuse_log = _RateLimitedLog()
        self.sock: socket.socket | None = None   # a listening socket bound by the daemon (shared with workers)

    async def start(self) -> None:
        # implicit TLS (RFC 8314 §3.3): the connection is counted for its client when it is accepted, then the
        # TLS layer is put on the socket before one byte is read (connect_accepted_socket, under the handshake's
        # time limit): no ClientHello can land in a plaintext buffer, on asyncio's loop or uvloop
        self.fd_limit = descriptor_limit()
        loop = asyncio.get_running_loop()
        _rate_limit_accept_errors(loop)
        if self.listener.implicit_tls:
            socks = [self.sock] if self.sock is not None else _bind(self.listener.host, self.listener.port)
            self.server = _AcceptLoop(self, socks)
            return
        # no SO_REUSEPORT: a port in use by anyone else is an error; Postgate's own workers share the
        # daemon's listening socket (self.sock, inherited) instead
        if self.sock is not None:
            self.server = await loop.create_server(lambda: _Stream(self), sock=self.sock, backlog=1024)
        else:
            self.server = await loop.create_server(lambda: _Stream(self), self.listener.host, self.listener.port,
                                                   backlog=1024)

    async def stop_accepting(self) -> None:
        """No new connections; idle sessions are ended with 421 now (RFC 5321 §3.8), the others after the
        command they are running (the daemon waits for ``tasks`` up to ``[limits] shutdown_timeout``)."""
        self.stopping = True
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for conv in list(self.conversations):
            if conv.idle:
                conv.resume(_SHUTDOWN)

    def _admit(self, ip: str) -> bool:
        """Count a new connection from ``ip`` (from its accept, before any TLS handshake), or refuse it:
        ``[limits] max_sessions``, ``max_sessions_per_client`` and the descriptor reserve."""
        busy = self.sessions >= self.limits.max_sessions or \
            self.per_client.get(ip, 0) >= self.limits.max_sessions_per_client
        reserve = _open_connections > self.fd_limit - self.limits.descriptor_reserve
        if busy or reserve:
            self._refuse_log("%s: refused a connection from %s: %s", self.listener.name, ip,
                             "descriptors in reserve" if reserve and not busy else "too many connections")
            return False
        self.sessions += 1
        self.per_client[ip] = self.per_client.get(ip, 0) + 1
        metrics.inc("smtpd_connections", listener=self.listener.name)
        metrics.add("smtpd_sessions", 1, listener=self.listener.name)
        return True

    def _release(self, ip: str) -> None:
        global _open_connections
        _open_connections -= 1
        self.sessions -= 1
        self.per_client[ip] -= 1
        if not self.per_client[ip]:
            del self.per_client[ip]
        metrics.add("smtpd_sessions", -1, listener=self.listener.name)

    def _accepted(self, stream: _Stream) -> None:
        """A plain connection (port 25, 587) is there: refuse it with a 421 at once, or start its session."""
        global _open_connections
        peer = stream.transport.get_extra_info("peername") or ("?", 0)
        _open_connections += 1
        if not self._admit(peer[0]):
            _open_connections -= 1
            stream.transport.write(Reply(421, "4.7.0", f"{self.hostname} too many connections, try again later").line())
            stream.transport.close()   # sends what is buffered first
            return
        self._spawn(self._session(stream, None, peer[0], peer[1]))

    def _accepted_tls(self, conn: socket.socket, peer: tuple[str, int]) -> None:
        """An implicit-TLS connection (port 465): counted before its handshake; refused without a word (a reply in
        cleartext means nothing to a client that speaks TLS)."""
        global _open_connections
        _open_connections += 1
        if not self._admit(peer[0]):
            _open_connections -= 1
            conn.close()
            return
        self._spawn(self._session(None, conn, peer[0], peer[1]))

    def _spawn(self, coro: Coroutine[object, object, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def _session(self, stream: _Stream | None, conn: socket.socket | None, ip: str, port: int) -> None:
        """The start of one counted session; ``conn`` (implicit TLS) gets its TLS layer here, with a time limit.
        From the greeting on the :class:`_Conversation` runs it, and ends it (releasing its count)."""
        try:
            if stream is None:
                assert conn is not None and self.listener.tls is not None
                stream = _Stream(None)
                async with asyncio.timeout(self.limits.tls_handshake_timeout + 1):
                    await asyncio.get_running_loop().connect_accepted_socket(
                        lambda: stream, conn, ssl=self.listener.tls,
                        ssl_handshake_timeout=self.limits.tls_handshake_timeout)
                conn = None
            sock = stream.transport.get_extra_info("sockname") or ("", 0)
            conv = _Conversation(self, stream, Session(self.listener, (ip, port), local=(str(sock[0]), int(sock[1]))))
        except BaseException as e:
            self._release(ip)
            if conn is not None:
                conn.close()
            if stream is not None and stream.transport is not None:
                stream.transport.close()
            if isinstance(e, (ConnectionError, ssl.SSLError, OSError, TimeoutError)):
                return
            if isinstance(e, Exception):
                log.exception("%s: session with %s ended by an internal error", self.listener.name, ip)
                return
            raise
        self.conversations.add(conv)
        await conv.drive(_START)

    def _ended(self, conv: _Conversation) -> None:
        self.conversations.discard(conv)
        self._release(conv.s.peer[0])
        conv.r.transport.close()


class _AcceptLoop:
    """The listening sockets of an implicit-TLS listener and the tasks accepting on them (what asyncio's Server
    is for the others): each connection is counted first, then gets its TLS layer (SMTPServer._session)."""

    def __init__(self, srv: SMTPServer, socks: list[socket.socket]) -> None:
        self.sockets = socks
        loop = asyncio.get_running_loop()
        self.tasks = [loop.create_task(self._accept(srv, s)) for s in socks]

    @staticmethod
    async def _accept(srv: SMTPServer, lsock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        lsock.setblocking(False)
        while True:
            try:
                conn, peer = await loop.sock_accept(lsock)
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                continue
            except OSError as e:
                # EMFILE, ENFILE, ENOBUFS, ENOMEM: wait a moment, as asyncio's own accept loop does
                srv._refuse_log("accept failed: %s: %s", srv.listener.name, e)
                await asyncio.sleep(1.0)
                continue
            srv._accepted_tls(conn, (str(peer[0]), int(peer[1])))

    def close(self) -> None:
        for t in self.tasks:
            t.cancel()
        for s in self.sockets:
            s.close()

    async def wait_closed(self) -> None:
        await asyncio.gather(*self.tasks, return_exceptions=True)


def _bind(host: str, port: int) -> list[socket.socket]:
    """Listening sockets for ``host``:``port`` (every address it has), as asyncio's create_server binds them."""
    socks: list[socket.socket] = []
    seen = set()
    for family, kind, proto, _, addr in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                           flags=socket.AI_PASSIVE):
        if (family, addr) in seen:
            continue
        seen.add((family, addr))
        s = socket.socket(family, kind, proto)
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            s.bind(addr)
            s.listen(1024)
        except OSError:
            s.close()
            for o in socks:
                o.close()
            raise
        socks.append(s)
    return socks


class _Stream(asyncio.Protocol):
    """One session's connection: what asyncio's StreamReader, StreamReaderProtocol and StreamWriter do for it,
    in one object with ``__slots__`` (those are three objects with a ``__dict__`` each, plus weak references:
    about 2 KiB per idle session; issue 20, 100,000 sessions). Reads wait on one future at a time; reading
    pauses while more than two command lines' worth is buffered (flow control, as StreamReader's limit)."""

    __slots__ = ("_buffer", "_drain", "_eof", "_exc", "_lost", "_paused", "_tls", "_waiter", "conv", "srv",
                 "transport")

    LIMIT = MAX_AUTH + 64      # the longest line readuntil() returns (an AUTH line, RFC 4954 §4)

    def __init__(self, srv: SMTPServer | None) -> None:
        self.srv = srv         # starts the session when the connection is there (not for implicit TLS)
        self.conv: _Conversation | None = None   # the session, once it runs
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self._buffer = bytearray()
        self._waiter: asyncio.Future[None] | None = None
        self._eof = False
        self._lost = False
        self._exc: BaseException | None = None
        self._paused = False
        self._drain: asyncio.Future[None] | None = None
        self._tls = False

    # --- protocol side (called by the loop) ------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self._tls = transport.get_extra_info("sslcontext") is not None
        if self.srv is not None:
            self.srv._accepted(self)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None:
            self._wake()
        elif self.conv is not None and self.conv.idle and (b"\n" in data or len(self._buffer) > self.LIMIT):
            self.conv.resume()     # a command line is there (or a line too long): run it
        if len(self._buffer) > 2 * self.LIMIT and not self._paused:
            self._paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        self._eof = True
        self._wake()
        if self.conv is not None and self.conv.idle:
            self.conv.resume()
        return not self._tls   # plain TCP: keep the transport open, the final reply can still be sent

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = self._lost = True
        if exc is not None:
            self._exc = exc
        self._wake()
        if self.conv is not None and self.conv.idle:
            self.conv.resume()
        if self._drain is not None and not self._drain.done():
            self._drain.set_exception(ConnectionResetError("Connection lost"))
        self._drain = None

    def pause_writing(self) -> None:
        if self._drain is None:
            self._drain = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._drain is not None and not self._drain.done():
            self._drain.set_result(None)
        self._drain = None

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    # --- reader side -------------------------------------------------------------------------------------------
    async def _wait(self) -> None:
        if self._exc is not None:
            raise self._exc
        if self._paused and len(self._buffer) <= self.LIMIT:
            self._paused = False
            self.transport.resume_reading()
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def _consumed(self) -> None:
        if self._paused and len(self._buffer) <= self.LIMIT:
            self._paused = False
            self.transport.resume_reading()

    def take_line(self) -> bytes | None:
        """A complete line (with its LF) from the buffer, None when there is none yet; ``_Close`` when the
        client went away, or its line is longer than LIMIT."""
        if self._exc is not None:
            raise _Close()
        i = self._buffer.find(b"\n")
        if i < 0:
            if len(self._buffer) > self.LIMIT:
                raise _Close(Reply(500, "5.5.6", "line too long, closing connection"))
            if self._eof:
                raise _Close()
            return None
        if i >= self.LIMIT:
            raise _Close(Reply(500, "5.5.6", "line too long, closing connection"))
        line = bytes(self._buffer[:i + 1])
        del self._buffer[:i + 1]
        self._consumed()
        return line

    async def read(self, n: int) -> bytes:
        """As StreamReader.read: up to ``n`` octets, b"" at the end of the stream."""
        while not self._buffer:
            if self._eof:
                if self._exc is not None:
                    raise self._exc
                return b""
            await self._wait()
        data = bytes(self._buffer[:n])
        del self._buffer[:n]
        self._consumed()
        return data

    # --- writer side -------------------------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        self.transport.write(data)

    def must_drain(self) -> bool:
        """Whether :meth:`drain` has anything to do (wait for the peer, or report the connection's end)."""
        return self._drain is not None or self._exc is not None or self._lost or self.transport.is_closing()

    async def drain(self) -> None:
        if self._exc is not None:
            raise self._exc
        if self.transport.is_closing():
            await asyncio.sleep(0)   # let connection_lost run, as StreamWriter.drain does
        if self._lost:
            raise ConnectionResetError("Connection lost")
        if self._drain is not None:
            await asyncio.shield(self._drain)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def write_eof(self) -> None:
        self.transport.write_eof()

    def close(self) -> None:
        self.transport.close()

    async def start_tls(self, ctx: ssl.SSLContext, timeout: float) -> None:
        """RFC 3207: TLS on this connection from the next byte on. The caller has checked that nothing is
        buffered and has not given the loop a turn since its 220 (so the ClientHello, which follows the 220,
        cannot have been read in cleartext); reading is never paused here, which uvloop's start_tls would not
        undo."""
        self.transport = await asyncio.get_running_loop().start_tls(  # type: ignore[assignment]
            self.transport, self, ctx, server_side=True, ssl_handshake_timeout=timeout)
        self._tls = True


def _checked(line: bytes) -> bytes:
    """A command line without its CRLF, after the line-ending check."""
    if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
        # RFC 5321 §2.3.8: only CRLF ends a line; a bare LF or CR is refused and the session ends,
        # so no smuggled command or message can follow
        # RFC 5321 §4.2: reply text is printable US-ASCII, so "section", not "§"
        raise _Close(Reply(500, "5.5.2", "bare LF or CR in command refused (RFC 5321 section 2.3.8)"))
    return line[:-2]


def _rate_limit_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """asyncio reports every failed accept() (EMFILE at the descriptor limit) through the loop's exception
    handler, once per retry per listener: at most one line per 10 s here, with the count."""
    if getattr(loop, "_postgate_accept_log", False):
        return
    previous = loop.get_exception_handler()
    limited = _RateLimitedLog()

    def handler(lp: asyncio.AbstractEventLoop, context: dict[str, object]) -> None:
        if "out of system resource" in str(context.get("message", "")):
            limited("accept failed: %s: %s", context.get("message"), context.get("exception"))
            return
        if previous is not None:
            previous(lp, context)
        else:
            lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
    loop._postgate_accept_log = True  # type: ignore[attr-defined]


_START, _RESUME, _TIMEOUT, _SHUTDOWN = range(4)   # why _Conversation.drive runs
_NO_CONTEXT = contextvars.Context()   # for the idle timers: no copy of the context per session


class _Conversation:
    """One session from its greeting on. It holds a task only while it works: when it waits for the client's
    next command (idle, most of a session's life) the session is this object, its :class:`Session` and its
    stream, and one timer for ``command_timeout``; the stream calls :meth:`resume` when a line is there. An idle
    session costs about 3 KiB instead of about 7 (a task and six coroutine frames; issue 20)."""

    __slots__ = ("chain", "ended", "idle", "idle_since", "limits", "opened", "r", "refused", "refused_by", "s",
                 "srv", "timer", "w")

    def __init__(self, srv: SMTPServer, stream: _Stream, s: Session) -> None:
        self.srv, self.r, self.w, self.s = srv, stream, stream, s
        self.limits = srv.limits
        self.chain = FilterChain(s.listener.filters)
        self.refused: Reply | None = None   # a filter refused the connection: only QUIT is accepted
        self.refused_by = ""                # which filter refused the last RCPT (for the one NOQUEUE line)
        self.idle = False                   # waiting for the next command, without a task
        self.idle_since = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.opened = False                 # "connect from" was logged
        self.ended = False
        stream.conv = self
        self._tls_info()

    def _tls_info(self) -> None:
        obj = self.w.get_extra_info("ssl_object")
        if obj is not None:
            cipher = obj.cipher()
            self.s.tls_version, self.s.tls_cipher, self.s.tls_bits = obj.version(), cipher[0], cipher[2]

    @property
    def who(self) -> str:
        return f"{self.s.client_name}[{self.s.peer[0]}]"

    async def send(self, reply: Reply) -> bool | None:
        if reply.code == 421 and not reply.text.startswith(f"{self.srv.hostname} "):
            # RFC 5321 §4.2.3 / §3.8: "421 <domain> Service not available, closing transmission channel": a
            # 421 from a filter (Milter, policy service) gets the server's name first too
            reply = Reply(421, reply.enhanced, f"{self.srv.hostname} {reply.text}")
        self.w.write(reply.line())
        if not self.w.must_drain():   # the common case: written, nothing to wait for (no timer armed)
            return None
        try:
            # a client that does not read its replies is not kept for ever (Postfix smtpd_timeout)
            async with asyncio.timeout(self.limits.command_timeout):
                await self.w.drain()
        except TimeoutError:
            self.w.transport.abort()
            raise _Close() from None
        return None

    async def readline(self, limit: int = MAX_COMMAND) -> bytes:
        """The next line inside a command (AUTH's responses), waiting up to ``command_timeout``."""
        try:
            async with asyncio.timeout(self.limits.command_timeout):  # no task per read, unlike wait_for
                while (line := self.r.take_line()) is None:
                    await self.r._wait()
        except TimeoutError:   # RFC 5321 §4.2.3/§3.8: "421 <domain> ...", the server's name first
            raise _Close(Reply(421, "4.4.2", f"{self.srv.hostname} timeout exceeded, closing connection")) from None
        except ConnectionError:
            raise _Close() from None
        return _checked(line)

    async def drive(self, why: int = _RESUME) -> None:
        """Run the session until it waits for the client's next command (then it goes idle: no task) or ends.
        ``why``: the first run (connect, greeting), a line that came, the idle timeout, or shutdown."""
        done = True
        try:
            try:
                if why == _START:
                    await self._open()
                elif why == _TIMEOUT:   # RFC 5321 §4.5.3.2.7; §4.2.3: "421 <domain> ..."
                    raise _Close(Reply(421, "4.4.2", f"{self.srv.hostname} timeout exceeded, closing connection"))
                elif why == _SHUTDOWN:
                    # RFC 5321 §3.8: a server that must shut down answers 421 and closes
                    raise _Close(Reply(421, "4.3.2", f"{self.srv.hostname} service shutting down, closing connection"))
                done = not await self._commands()
                if not done and self.srv.stopping:
                    raise _Close(Reply(421, "4.3.2", f"{self.srv.hostname} service shutting down, closing connection"))
            except _Close as c:
                done = True
                if c.reply is not None and not self.w.transport.is_closing():
                    try:
                        await self.send(c.reply)
                        await self._linger()
                    except (_Close, ConnectionError, OSError):
                        pass
        except (ConnectionError, ssl.SSLError, OSError, TimeoutError):
            done = True
        except Exception:
            done = True
            log.exception("%s: session with %s ended by an internal error", self.s.listener.name, self.s.peer[0])
        finally:
            if done:
                await self._end()
            else:
                self._go_idle()

    def resume(self, why: int = _RESUME) -> None:
        """Leave idle: run the session in a task again (the stream calls this when a line is there)."""
        self.idle = False
        self.srv._spawn(self.drive(why)).add_done_callback(self._after)

    def _after(self, task: asyncio.Task[None]) -> None:
        """A task cancelled before it ran (at shutdown) never reached drive's cleanup: end the session here."""
        if self.ended or not task.cancelled():
            return
        self._ending()
        self.srv._ended(self)
        if any(fs is not None for fs in self.chain.sessions):
            asyncio.get_running_loop().create_task(self.chain.close())

    def _go_idle(self) -> None:
        self.idle = True
        loop = asyncio.get_running_loop()
        self.idle_since = loop.time()
        if self.timer is None:     # one timer, moved on lazily: not one per command
            self.timer = loop.call_at(self.idle_since + self.limits.command_timeout, self._idle_timer,
                                      context=_NO_CONTEXT)

    def _idle_timer(self) -> None:
        self.timer = None
        if not self.idle:
            return                 # a command runs (under its own timeouts); set again when idle
        due = self.idle_since + self.limits.command_timeout
        if asyncio.get_running_loop().time() >= due:
            self.resume(_TIMEOUT)  # RFC 5321 §4.5.3.2.7: the server's timeout for the next command
        else:
            self.timer = asyncio.get_running_loop().call_at(due, self._idle_timer, context=_NO_CONTEXT)

    def _ending(self) -> None:
        self.idle, self.ended = False, True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.opened:
            log.info("disconnect from %s", self.who)

    async def _end(self) -> None:
        self._ending()
        try:
            await self.chain.close()
        finally:
            self.srv._ended(self)

    async def _linger(self, seconds: float = 2.0, limit: int = 1 << 20) -> None:
        """Close politely after a final reply: FIN first, then read what the client still sends (a pipelined
        rest) for a moment, so the kernel does not answer it with a RST that would destroy our reply."""
        if self.w.can_write_eof() and not self.w.transport.is_closing():
            self.w.write_eof()
        try:
            async with asyncio.timeout(seconds):
                while limit > 0 and (chunk := await self.r.read(65536)):
                    limit -= len(chunk)
        except (TimeoutError, ConnectionError, OSError):
            pass

    async def _open(self) -> None:
        if self.srv.client_names is not None:
            try:
                async with asyncio.timeout(self.limits.client_name_timeout):
                    self.s.client_name, self.s.reverse_client_name = await self.srv.client_names(self.s.peer[0])
            except Exception:   # a failed or slow lookup: the client stays "unknown" (Postfix does the same)
                pass
        log.info("connect from %s", self.who)
        self.opened = True
        v = await self._ask(Stage.CONNECT)
        if v is not None:
            if v.code < 500:
                # RFC 5321 §3.1: 421 and close; RFC 3463 §3.1: the enhanced code's class is the reply's
                raise _Close(Reply(421, "4" + v.enhanced[1:] if v.enhanced else "", v.text))
            # RFC 5321 §3.1/§4.3.1: 554 instead of the greeting; the server then waits for QUIT
            self.refused = v
            await self.send(v)
        else:
            await self.send(Reply(220, text=f"{self.srv.hostname} ESMTP Postgate"))

    async def _commands(self) -> bool:
        """Run the commands that are buffered (RFC 2920: pipelined ones one after the other); True when the
        client's next line must be waited for, False when the session ends."""
        while True:
            raw = self.r.take_line()
            if raw is None:
                return True
            line = _checked(raw)
            # RFC 5321 §2.4: commands are US-ASCII (RFC 6531 §3.3: UTF-8 only in MAIL/RCPT addresses);
            # §4.1.1: the verb is ASCII letters only (no "ſTARTTLS" taken for STARTTLS by str.upper())
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = "\ufffd"
            verb, _, arg = text.partition(" ")
            if not _VERB.match(verb):
                verb = ""
            verb = verb.upper()
            handler = getattr(self, f"cmd_{verb}", None) if verb else None
            limit = {"MAIL": MAX_MAIL, "RCPT": MAX_RCPT, "AUTH": MAX_AUTH}.get(verb, MAX_COMMAND)
            if len(line) + 2 > limit:
                await self.error(Reply(500, "5.5.2",
                                       f"command line longer than {limit} octets (RFC 5321 section 4.5.3.1.4)"))
            elif handler is None:
                await self.error(Reply(500, "5.5.2", "command not recognized"))
            elif self.refused is not None and verb not in ("QUIT", "NOOP", "RSET"):
                await self.error(Reply(503, "5.5.1", "connection refused: " + self.refused.text))
            elif (verb not in ("MAIL", "RCPT") and not line.isascii()) or "\ufffd" in text:
                await self.error(Reply(501, "5.5.4", "non-ASCII or invalid characters in command"))
            elif any((c < 32 and c != 9) or c == 127 for c in line):
                await self.error(Reply(501, "5.5.2", "control character in command"))
            else:
                keep_going = await handler(arg.strip())
                if keep_going is False:
                    return False
            if self.s.errors >= self.limits.max_errors:
                raise _Close(Reply(421, "4.7.0", f"{self.srv.hostname} too many errors, closing connection"))

    async def error(self, reply: Reply) -> bool | None:
        """Send an error reply and count it (sessions with too many errors are ended)."""
        self.s.errors += 1
        return await self.send(reply)

    # --- filters --------------------------------------------------------------------------------------------
    async def _ask(self, stage: Stage, **fields: object) -> Reply | None:
        """Ask the chain at ``stage``; the reply to give instead of the normal one, or None to go on.
        HOLD, DISCARD and modifications are remembered for the transaction."""
        if not self.chain.filters:
            return None
        ctx = self.s.context(stage, self.srv.hostname)
        for k, v in fields.items():
            setattr(ctx, k, v)
        out = await self.chain.on(ctx)
        v = out.verdict
        if out.hold is not None and self.s.hold is None:
            self.s.hold = f"{out.hold.filter}: {out.hold.quarantine_reason or out.hold.reason or 'held'}"
        self.s.edits += out.edits
        if v.action in (Action.REJECT, Action.TEMPFAIL):
            assert v.reply is not None
            if v.reply.code == 421:
                # RFC 5321 §3.8, §4.2.3: 421 is "closing transmission channel": a filter's 421 (a milter's,
                # a policy service's) ends the session after the reply, as Postfix does
                log.info("%s: %s: %s from %s: %s; filter=%s%s; closing the session", self.s.queue_id or "NOQUEUE",
                         "tempfail", stage.value.upper(), self.who, v.reply, v.filter,
                         f" ({v.reason})" if v.reason else "")
                raise _Close(v.reply)
            if stage is Stage.RCPT:   # cmd_RCPT logs Postfix's one "NOQUEUE: reject: RCPT from …" line
                self.refused_by = f" filter={v.filter}" + (f" ({v.reason})" if v.reason else "")
                return v.reply
            log.info("%s: %s: %s from %s: %s; filter=%s%s", self.s.queue_id or "NOQUEUE",
                     "reject" if v.action is Action.REJECT else "tempfail", stage.value.upper(), self.who, v.reply,
                     v.filter, f" ({v.reason})" if v.reason else "")
            return v.reply
        if v.action is Action.DISCARD and self.s.discard is None:
            self.s.discard = v
        return None

    async def _reset(self) -> None:
        self.s.reset()
        if self.chain.filters:
            await self.chain.reset()

    # --- commands -------------------------------------------------------------------------------------------
    async def cmd_HELO(self, arg: str) -> bool | None:
        return await self._helo(arg, False)

    async def cmd_EHLO(self, arg: str) -> bool | None:
        return await self._helo(arg, True)

    async def _helo(self, arg: str, esmtp: bool) -> bool | None:
        if not arg:
            return await self.error(Reply(501, "5.5.4", f"{'EHLO' if esmtp else 'HELO'} needs a host name"))
        await self._reset()
        helo = neuter_helo(arg)   # RFC 5321 §4.4: what goes into Received: (and logs, filters) as Postfix does
        refusal = await self._ask(Stage.HELO, helo=helo, esmtp=esmtp)
        if refusal is not None:
            return await self.error(refusal)
        self.s.helo, self.s.esmtp = helo, esmtp
        if not esmtp:
            return await self.send(Reply(250, text=self.srv.hostname))
        lst = self.s.listener
        lines = [self.srv.hostname, "PIPELINING", f"SIZE {self.limits.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES", "DSN"]
        if lst.tls is not None and not self.s.tls:
            lines.append("STARTTLS")
        if lst.auth and self.s.tls and self.srv.authenticator is not None:
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954 §4: only offered once TLS protects it
        if self.s.tls:
            lines.append("REQUIRETLS")  # RFC 8689 §4: offered only over TLS
        return await self.send(Reply(250, text="\n".join(lines)))

    async def cmd_STARTTLS(self, arg: str) -> bool | None:
        if arg:
            return await self.error(Reply(501, "5.5.4", "STARTTLS takes no parameters"))
        if self.s.listener.tls is None:
            # RFC 3207 §4: STARTTLS is not advertised on a listener without TLS; RFC 5321 §4.2.4: a command that
            # is not implemented is answered 502 (not 454, a temporary failure)
            return await self.error(Reply(502, "5.5.1", "STARTTLS not implemented"))
        if self.s.tls:
            return await self.error(Reply(503, "5.5.1", "TLS already active"))
        if len(self.r._buffer):
            # RFC 3207 §4.2 / CVE-2011-0411: commands pipelined after STARTTLS would be injected into the
            # TLS session; refuse them and end the session
            await self.send(Reply(554, "5.5.1", "commands pipelined after STARTTLS refused"))
            return False
        # the client's ClientHello follows our 220 at once: the 220 is written and start_tls called without
        # giving the loop a turn in between (no drain, no task switch), so not one byte of it can be read into
        # the plaintext buffer (it would be lost to the TLS layer and the handshake would hang). Reading is
        # not paused either: uvloop's start_tls does not resume a transport its protocol paused.
        self.w.write(Reply(220, "2.0.0", "Ready to start TLS").line())
        try:
            async with asyncio.timeout(self.limits.tls_handshake_timeout + 1):
                await self.w.start_tls(self.s.listener.tls, self.limits.tls_handshake_timeout)
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError):
            return False
        self._tls_info()
        self.s.helo, self.s.esmtp = "", False  # RFC 3207 §4.2: forget everything learned before TLS
        await self._reset()
        return None

    async def cmd_AUTH(self, arg: str) -> bool | None:
        lst = self.s.listener
        if not lst.auth or self.srv.authenticator is None:
            return await self.error(Reply(502, "5.5.1", "AUTH not available"))
        if not self.s.tls:
            return await self.error(Reply(538, "5.7.11", "encryption required for authentication (RFC 4954 section 6)"))
        if self.s.user is not None:
            return await self.error(Reply(503, "5.5.1", "already authenticated"))
        if self.s.sender is not None:
            return await self.error(Reply(503, "5.5.1", "AUTH not permitted during a mail transaction"))
        if not arg:   # RFC 4954 §4: auth-command = "AUTH" SP sasl-mech [SP initial-response]
            return await self.error(Reply(501, "5.5.4", "Syntax: AUTH mechanism"))
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        user = authzid = ""
        try:
            if mech == "PLAIN":
                resp = initial if initial else await self._challenge("")
                if resp is None:
                    return None
                parts = base64.b64decode(resp, validate=True).split(b"\x00")
                if len(parts) != 3:
                    raise ValueError
                authzid, user, password = parts[0].decode(), parts[1].decode(), parts[2].decode()
            elif mech == "LOGIN":
                u = initial if initial else await self._challenge("VXNlcm5hbWU6")
                if u is None:
                    return None
                user = base64.b64decode(u, validate=True).decode()
                p = await self._challenge("UGFzc3dvcmQ6")
                if p is None:
                    return None
                password = base64.b64decode(p, validate=True).decode()
            else:
                return await self.error(Reply(504, "5.5.4", "unrecognized authentication type"))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return await self.error(Reply(501, "5.5.2", "cannot decode the response"))
        if "\x00" in user or "\x00" in password:
            return await self.error(Reply(501, "5.5.2", "cannot decode the response"))
        # RFC 4616 §2: an authorization identity that is not empty and differs from the authentication identity
        # asks to act as another user; Postgate has no proxy authorization, so that authentication fails (535,
        # the password is not even checked)
        if (not authzid or authzid == user) and await self.srv.authenticator(user, password):
            self.s.user, self.s.auth_method = user, mech
            self.srv.throttle.succeeded(self.s.peer[0], user)
            log.info("%s: sasl_method=%s, sasl_username=%s", self.who, mech, user)
            await self.send(Reply(235, "2.7.0", "authentication successful"))
            return None
        delay = self.srv.throttle.failed(self.s.peer[0], user, time.monotonic())
        # Postfix's words, the line fail2ban's postfix filter (postfix-sasl, aggressive) matches
        log.warning("warning: %s: SASL %s authentication failed: authentication failure, sasl_username=%s",
                    self.who, mech, user.encode("unicode_escape").decode()[:64])
        log.info("%s: SASL %s authentication failed%s, reply delayed %.2fs", self.who, mech,
                 " (authorization identity not the authentication identity)" if authzid and authzid != user else "",
                 delay)
        metrics.inc("smtpd_auth_failures", listener=self.s.listener.name)
        await asyncio.sleep(delay)   # RFC 4954 §4: a server may delay its reply after a failure
        await self.error(Reply(535, "5.7.8", "authentication credentials invalid"))
        return None

    async def _challenge(self, text: str) -> str | None:
        await self.send(Reply(334, text=text))
        line = (await self.readline(MAX_AUTH)).decode("ascii", "replace")
        if line == "*":
            await self.error(Reply(501, "5.0.0", "authentication cancelled"))
            return None
        return line

    async def cmd_MAIL(self, arg: str) -> bool | None:
        if not self.s.helo:
            return await self.error(Reply(503, "5.5.1", "send EHLO first"))
        if self.s.sender is not None:
            return await self.error(Reply(503, "5.5.1", "nested MAIL command"))
        if self.s.listener.auth_required and self.s.user is None:
            return await self.error(Reply(530, "5.7.0", "authentication required"))
        if not arg.upper().startswith("FROM:"):
            return await self.error(Reply(501, "5.5.4", "syntax: MAIL FROM:<address>"))
        parsed = self._address(arg[5:].lstrip())
        if parsed is None:
            return await self.error(Reply(501, "5.1.7", "bad sender address syntax"))
        addr, params = parsed
        if params is None:
            return await self.error(Reply(501, "5.5.4", "bad MAIL parameters"))
        for k, v in params.items():
            if k == "SIZE":  # RFC 1870 §3: size-value ::= 1*20DIGIT, ASCII digits
                if not (v.isascii() and v.isdigit()) or len(v) > 20:
                    return await self.error(Reply(501, "5.5.4", "bad SIZE"))
                if int(v) > self.limits.max_message_size:
                    return await self.error(Reply(552, "5.3.4", "message size exceeds fixed limit"))
            elif k == "BODY":
                if v.upper() not in ("7BIT", "8BITMIME"):
                    return await self.error(Reply(501, "5.5.4", "BODY is 7BIT or 8BITMIME"))
            elif k == "SMTPUTF8":
                if v:
                    return await self.error(Reply(501, "5.5.4", "SMTPUTF8 takes no value"))
            elif k == "RET":  # RFC 3461 §4.3
                if v.upper() not in ("FULL", "HDRS"):
                    return await self.error(Reply(501, "5.5.4", "RET is FULL or HDRS"))
            elif k == "ENVID":  # RFC 3461 §4.4: xtext, at most 100 characters, printable US-ASCII decoded
                if not v or len(v) > 100 or not xtext_value_ok(v):
                    return await self.error(Reply(501, "5.5.4", "bad ENVID"))
            elif k == "REQUIRETLS":  # RFC 8689 §4.1: only over TLS
                if v or not self.s.tls:
                    return await self.error(Reply(530, "5.7.10", "REQUIRETLS needs TLS"))
            elif k == "AUTH":  # RFC 4954 §5: accepted and ignored
                pass
            else:
                return await self.error(Reply(555, "5.5.4", f"unsupported MAIL parameter {k}"))
        if not params.get("SMTPUTF8", None) == "" and not addr.isascii():
            return await self.error(Reply(553, "5.6.7", "non-ASCII address needs SMTPUTF8"))
        if any(ord(c) < 32 or ord(c) == 127 for c in addr):   # RFC 5321 §4.1.2: no control characters
            return await self.error(Reply(553, "5.1.7", "bad sender address syntax"))
        if self.chain.filters:
            await self.chain.reset()   # a new transaction for the filters
        self.s.queue_id = new_queue_id()
        refusal = await self._ask(Stage.MAIL, sender=addr, mail_params=dict(params),
                                  size=int(params["SIZE"]) if "SIZE" in params else 0)
        if refusal is not None:
            self.s.queue_id = ""
            return await self.error(refusal) if refusal.code >= 500 else await self.send(refusal)
        self.s.sender, self.s.mail_params = addr, params
        return await self.send(Reply(250, "2.1.0", "Ok"))

    async def cmd_RCPT(self, arg: str) -> bool | None:
        if self.s.sender is None:
            return await self.error(Reply(503, "5.5.1", "need MAIL first"))
        if not arg.upper().startswith("TO:"):
            return await self.error(Reply(501, "5.5.4", "syntax: RCPT TO:<address>"))
        parsed = self._address(arg[3:].lstrip())
        if parsed is not None and parsed[0].lower() == "postmaster":
            # RFC 5321 §4.5.1: "postmaster" without a domain must be accepted: it is ours
            parsed = (f"postmaster@{self.srv.hostname}", parsed[1])
        if parsed is None or not parsed[0] or "@" not in parsed[0] or \
                any(ord(c) < 32 or ord(c) == 127 for c in parsed[0]):
            return await self.error(Reply(501, "5.1.3", "bad recipient address syntax"))
        addr, params = parsed
        if params is None:
            return await self.error(Reply(501, "5.5.4", "bad RCPT parameters"))
        for k, v in params.items():
            if k == "NOTIFY":  # RFC 3461 §4.1
                vals = v.upper().split(",")
                if not vals or any(x not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for x in vals) or \
                        ("NEVER" in vals and len(vals) > 1):
                    return await self.error(Reply(501, "5.5.4", "bad NOTIFY"))
            elif k == "ORCPT":  # RFC 3461 §4.2: addr-type ";" xtext, printable US-ASCII once decoded
                t, sep, x = v.partition(";")
                if not sep or not t or not re.fullmatch(r"[A-Za-z0-9-]+", t) or not x or not xtext_value_ok(x) \
                        or len(x) > 500:
                    return await self.error(Reply(501, "5.5.4", "bad ORCPT"))
            else:
                return await self.error(Reply(555, "5.5.4", f"unsupported RCPT parameter {k}"))
        if not addr.isascii() and "SMTPUTF8" not in self.s.mail_params:
            return await self.error(Reply(553, "5.6.7", "non-ASCII address needs SMTPUTF8"))
        # a recipient given twice (RFC 5321 §2.4: the domain is case-insensitive, the local part is not) is
        # answered 250 and kept once, with its first parameters, as Postfix's cleanup removes duplicates: one
        # delivery, not two
        key = _recipient_key(addr)
        if key in self.s.recipient_keys:
            log.info("%s: duplicate recipient <%s> from %s ignored", self.s.queue_id, addr, self.who)
            return await self.send(Reply(250, "2.1.5", "Ok"))
        if len(self.s.recipients) >= self.limits.max_recipients:
            return await self.send(Reply(452, "4.5.3", "too many recipients"))
        self.refused_by = ""
        refusal = await self._ask(Stage.RCPT, recipient=addr, rcpt_params=dict(params))
        if refusal is None:
            refusal = await self.srv.handler.check_rcpt(self.s, addr, params)
        if refusal is not None:
            # one line per refused recipient, Postfix's (pflogsumm and fail2ban count them), then the filter
            log.info("NOQUEUE: reject: RCPT from %s[%s]: %s; from=<%s> to=<%s> proto=%s helo=<%s>%s",
                     self.s.client_name, self.s.peer[0], refusal, self.s.sender, addr,
                     "ESMTP" if self.s.esmtp else "SMTP", self.s.helo, self.refused_by)
            metrics.inc("smtpd_rejects", stage="rcpt", reason=str(refusal.code))
            return await self.error(refusal) if refusal.code >= 500 else await self.send(refusal)
        self.s.recipients.append((addr, params))
        self.s.recipient_keys.add(key)
        return await self.send(Reply(250, "2.1.5", "Ok"))

    async def cmd_DATA(self, arg: str) -> bool | None:
        if arg:
            return await self.error(Reply(501, "5.5.4", "DATA takes no parameters"))
        if self.s.sender is None:
            return await self.error(Reply(503, "5.5.1", "need MAIL first"))
        if not self.s.recipients:
            # RFC 5321 §3.3: DATA after every RCPT was refused (or none given) may be answered "no valid
            # recipients" (554) rather than out of sequence; Postfix does so within a transaction
            return await self.error(Reply(554, "5.5.1", "no valid recipients"))
        await self.send(Reply(354, text="End data with <CR><LF>.<CR><LF>"))
        try:
            data, problem = await self._read_data()
        except TimeoutError:
            # RFC 5321 §4.2.3/§3.8: "421 <domain> ...", the server's name first
            text = f"{self.srv.hostname} timeout exceeded during DATA, closing connection"
            raise _Close(Reply(421, "4.4.2", text)) from None
        except (asyncio.IncompleteReadError, ConnectionError):
            return False  # the client went away mid-DATA: no reply, nothing accepted
        if problem is None:
            problem = self._check_message(data)
        if problem is not None:
            await self._reset()
            await self.error(problem)
            return None
        try:
            reply = await self._message(repair_header(data))
        except _Close:
            raise
        except Exception as e:
            # never a dropped connection after DATA: the client gets a reply, and retries a 4xx
            log.error("%s: internal error after DATA from %s: %s: %s", self.s.queue_id, self.who,
                      type(e).__name__, e)
            reply = Reply(451, "4.3.0", "internal error, try again later")
        metrics.inc("messages_received", listener=self.s.listener.name,
                    outcome="accepted" if reply.code < 400 else ("tempfailed" if reply.code < 500 else "refused"))
        await self._reset()
        if reply.code == 421:   # RFC 5321 §3.8: a 421 after DATA closes the session too
            raise _Close(reply)
        await self.send(reply)
        return None

    def _check_message(self, data: bytes) -> Reply | None:
        # RFC 5321 §6.3: a message that has passed too many relays is in a loop; Postfix counts the Received:
        # fields against hopcount_limit (50) and refuses with 5.4.6
        hops = hop_count(data)
        if hops >= HOPCOUNT_LIMIT:
            log.info("%s: reject: DATA from %s: %d Received: headers, mail forwarding loop", self.s.queue_id,
                     self.who, hops)
            return Reply(554, "5.4.6", f"too many hops ({hops} Received: headers): mail forwarding loop")
        return None

    async def _message(self, data: bytes) -> Reply:
        """End of DATA: the filters' last word (pre-queue, before the answer), their edits, then the handler."""
        if self.chain.filters:
            refusal = await self._ask(Stage.DATA, message=data, size=len(data))
            if refusal is not None:
                return refusal
        if self.s.discard is not None:
            v = self.s.discard
            log.info("%s: discard: END-OF-MESSAGE from %s: filter=%s%s; from=<%s> nrcpt=%d", self.s.queue_id,
                     self.who, v.filter, f" ({v.reason})" if v.reason else "", self.s.sender, len(self.s.recipients))
            return Reply(250, "2.0.0", f"Ok: queued as {self.s.queue_id}")
        data = self._apply_edits(data)
        if not self.s.recipients:
            log.info("%s: discard: the filters removed every recipient", self.s.queue_id)
            return Reply(250, "2.0.0", f"Ok: queued as {self.s.queue_id}")
        return await self.srv.handler.message(self.s, data)

    def _apply_edits(self, data: bytes) -> bytes:
        """Apply the filters' modifications in chain order (milter semantics: headers, body, sender, recipients)."""
        routes: list[Route] = []
        for v in self.s.edits:
            if v.headers or v.new_body is not None:
                data = apply_header_edits(data, v.headers, v.new_body)
            if v.new_sender is not None:
                log.info("%s: filter %s: sender <%s> changed to <%s>", self.s.queue_id, v.filter, self.s.sender,
                         v.new_sender)
                self.s.sender = v.new_sender
            for r in v.remove_recipients:
                self.s.recipients = [x for x in self.s.recipients if x[0].lower() != r.lower()]
            for r in v.add_recipients:
                if r.lower() not in (x[0].lower() for x in self.s.recipients):
                    self.s.recipients.append((r, {}))
            if v.add_recipients or v.remove_recipients:
                log.info("%s: filter %s: recipients +%s -%s", self.s.queue_id, v.filter, list(v.add_recipients),
                         list(v.remove_recipients))
            routes += v.routes
        self.s.routes = tuple(routes)
        return data

    async def _read_data(self) -> tuple[bytes, Reply | None]:
        """Read up to CRLF.CRLF in bulk; return the unstuffed content, or a refusal (the data is always
        read to its end, so what follows is a command, never the rest of a message).

        Memory is bounded: complete lines are checked and moved to a temporary file that stays in memory up
        to ``spill_threshold`` octets and goes to disk above it; only a partial line (at most one line
        length plus a read) is held otherwise. The whole DATA phase has a deadline that grows with the data
        received (``data_timeout`` + received / ``min_data_rate``), so a client trickling a byte at a time
        cannot hold the session for ever."""
        lim = self.limits
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=lim.spill_threshold)
        try:
            buf = bytearray()          # unprocessed data, starting at the beginning of a line unless mid_line
            mid_line = False
            size = 0
            problem: Reply | None = None
            start = time.monotonic()
            while True:
                # the terminator: "." alone on a line (RFC 5321 §4.1.1.4)
                if not mid_line and buf.startswith(b".\r\n"):
                    end, after = 0, 3
                else:
                    # a one-octet find first (memchr, ~20x the regex scan): a block without "." (base64,
                    # most large mail) holds neither the terminator nor a line to unstuff
                    m = _END_OF_DATA.search(buf) if buf.find(b".") >= 0 else None
                    end, after = (m.start() + 2, m.start() + 5) if m is not None else (-1, -1)
                if end >= 0:
                    size, problem = self._data_block(_prefix(buf, end), mid_line, size, problem, spool)
                    rest = bytes(buf[after:])
                    break
                cut = buf.rfind(b"\r\n")
                if cut >= 0:
                    size, problem = self._data_block(_prefix(buf, cut + 2), mid_line, size, problem, spool)
                    del buf[:cut + 2]
                    mid_line = False
                if len(buf) > MAX_DATA_LINE + 65536:
                    # no line end in sight: that line is too long; keep a last CR, which may start a CRLF
                    if problem is None:
                        problem = Reply(554, "5.5.2",
                                        "message refused: line longer than 998 octets (RFC 5322 section 2.1.1)")
                    del buf[:-1]
                    mid_line = True
                remaining = start + lim.data_timeout + size / max(1, lim.min_data_rate) - time.monotonic()
                async with asyncio.timeout(max(0.0, min(lim.data_timeout, remaining))):
                    chunk = await self.r.read(65536)
                if not chunk:
                    raise asyncio.IncompleteReadError(bytes(buf), None)
                buf += chunk
            if rest:  # pipelined commands after DATA: put them back
                self.r._buffer[0:0] = rest
            if problem is not None:
                return b"", problem
            spool.seek(0)
            return spool.read(), None
        finally:
            spool.close()

    def _data_block(self, block: bytes, mid_line: bool, size: int, problem: Reply | None,
                    spool: IO[bytes]) -> tuple[int, Reply | None]:
        """Check whole lines of DATA and write them, unstuffed, to ``spool``; the new size (of the unstuffed
        message, as far as it is checked) and problem."""
        if problem is not None or not block:
            return size + len(block), problem
        # RFC 5321 §2.3.8: CR and LF only as CRLF. Anything else is refused, whole: no second message
        # (every CRLF pair blanked out in one pass, then two memchr scans: 40% less than three counts)
        paired = block.replace(b"\r\n", b"  ")
        if b"\r" in paired or b"\n" in paired:
            return size + len(block), Reply(554, "5.5.2",
                                            "message refused: bare LF or CR in message data (RFC 5321 section 2.3.8)")
        # RFC 5321 §4.5.2 / RFC 5322 §2.1 (no NUL in a message; Postfix strips it, we refuse it whole)
        if b"\x00" in block:
            log.info("%s: reject: DATA from %s: NUL character in message data", self.s.queue_id, self.who)
            return size + len(block), Reply(554, "5.6.0", "message refused: NUL character in message data")
        # RFC 5321 §4.5.2: "If the first character is a period and there are other characters on the line,
        # the first character is deleted" - whatever follows it (a client that did not stuff a line loses
        # its period, as with Postfix, Dovecot and aiosmtpd; the "." line alone never reaches here)
        if not mid_line and block.startswith(b"."):
            block = block[1:]
        if block.find(b".") >= 0 and _STUFFED.search(block):
            block = block.replace(b"\r\n.", b"\r\n")
        # the limits apply to the unstuffed lines: RFC 1870 §3/§6, the message size excludes the transparency
        # dots; RFC 5321 §4.5.3.1.6, the 1000-octet text line is counted "not counting the leading dot
        # duplicated for transparency"
        size += len(block)
        if size > self.limits.max_message_size:
            return size, Reply(552, "5.3.4", "message size exceeds fixed limit")
        if _has_long_line(block):
            return size, Reply(554, "5.5.2", "message refused: line longer than 998 octets (RFC 5322 section 2.1.1)")
        spool.write(block)
        return size, None

    async def cmd_RSET(self, arg: str) -> bool | None:
        if arg:   # RFC 5321 §4.1.1.5: rset = "RSET" CRLF, no parameters
            return await self.error(Reply(501, "5.5.4", "Syntax: RSET"))
        await self._reset()
        return await self.send(Reply(250, "2.0.0", "Ok"))

    async def cmd_NOOP(self, arg: str) -> bool | None:
        return await self.send(Reply(250, "2.0.0", "Ok"))

    async def cmd_VRFY(self, arg: str) -> bool | None:
        if not arg:   # RFC 5321 §4.1.1.6: vrfy = "VRFY" SP String CRLF
            return await self.error(Reply(501, "5.5.4", "Syntax: VRFY address"))
        return await self.send(Reply(252, "2.1.5", "send some mail, I'll try my best"))

    async def cmd_HELP(self, arg: str) -> bool | None:
        return await self.send(Reply(214, "2.0.0", "see RFC 5321"))

    async def cmd_QUIT(self, arg: str) -> bool:
        await self.send(Reply(221, "2.0.0", "Bye"))
        return False

    def _address(self, text: str) -> tuple[str, dict[str, str] | None] | None:
        m = _ADDR.match(text)
        if m is None:
            return None
        addr = m.group(1)
        if addr.startswith("@") and ":" in addr:  # RFC 5321 §4.1.2: source routes are ignored
            addr = addr.split(":", 1)[1]
        params: dict[str, str] | None = {}
        for word in m.group(2).split():
            k, eq, v = word.partition("=")
            # RFC 5321 §4.1.2: esmtp-keyword = (ALPHA / DIGIT) *(ALPHA / DIGIT / "-"), ASCII
            if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9-]*", k) or k.upper() in params:  # type: ignore[operator]
                params = None
                break
            params[k.upper()] = v if eq else ""  # type: ignore[index]
        return addr, params


__all__ = ["Authenticator", "ClientNames", "Handler", "Limits", "Listener", "Reply", "SMTPServer", "Session",
           "hop_count", "neuter_helo", "repair_header", "xtext_decode", "xtext_value_ok"]
