"""Postgate's SMTP server protocol: one asyncio task per session, strict about what it accepts.

Why not aiosmtpd's protocol, which the test receivers use: it reads DATA line by line (about 50 µs per
KB), passes bare LF inside lines through, and refuses the DSN and REQUIRETLS parameters. This server reads
DATA in bulk, refuses any bare LF or CR in commands and data (RFC 5321 §2.3.8, so SMTP smuggling payloads
cannot end a message early or start a second one), and implements:

PIPELINING (RFC 2920), SIZE (RFC 1870), 8BITMIME (RFC 6152), SMTPUTF8 (RFC 6531), ENHANCEDSTATUSCODES
(RFC 2034), STARTTLS (RFC 3207), AUTH PLAIN and LOGIN (RFC 4954, only over TLS), DSN (RFC 3461) and
REQUIRETLS (RFC 8689, only after STARTTLS).

What to do with a message is the :class:`Handler`'s business (``inbound/prequeue.py``): relay checks at
RCPT, delivery or queueing after DATA. Every read has a timeout; sessions, recipients, line lengths and
message size are limited.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import re
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

log = logging.getLogger("postgate.smtpd")

MAX_COMMAND = 2048          # RFC 5321 §4.5.3.1.4 says 512; extensions (DSN, SMTPUTF8) need more
MAX_DATA_LINE = 1000        # RFC 5321 §4.5.3.1.6, including CRLF
_ADDR = re.compile(r"^<([^<>\s]*)>(.*)$")
_XTEXT_OK = re.compile(r"^([!-*,-<>-~]|\+[0-9A-F]{2})*$")  # RFC 3461 §4: xtext


@dataclass
class Listener:
    name: str                          # mx, submission, submissions
    host: str
    port: int
    tls: ssl.SSLContext | None = None  # for STARTTLS (or implicit TLS when implicit_tls)
    implicit_tls: bool = False
    auth: bool = False                 # offer AUTH (after TLS)
    auth_required: bool = False        # MAIL refused without AUTH (submission)


@dataclass
class Limits:
    max_message_size: int = 52428800
    max_recipients: int = 100
    max_errors: int = 10
    command_timeout: float = 300.0     # RFC 5321 §4.5.3.2.7: the server waits at least 5 minutes
    data_timeout: float = 600.0
    max_sessions: int = 10000
    max_sessions_per_client: int = 50


@dataclass
class Session:
    listener: Listener
    peer: tuple[str, int]
    helo: str = ""
    esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    user: str | None = None            # authenticated user
    errors: int = 0
    sender: str | None = None
    mail_params: dict[str, str] = field(default_factory=dict)
    recipients: list[tuple[str, dict[str, str]]] = field(default_factory=list)

    @property
    def tls(self) -> bool:
        return self.tls_version is not None

    def reset(self) -> None:
        self.sender = None
        self.mail_params = {}
        self.recipients = []


@dataclass(frozen=True)
class Reply:
    code: int
    text: str

    def line(self) -> bytes:
        lines = self.text.split("\n")
        out = [f"{self.code}-{ln}" for ln in lines[:-1]] + [f"{self.code} {lines[-1]}"]
        return ("\r\n".join(out) + "\r\n").encode()


class Handler(Protocol):
    async def check_rcpt(self, s: Session, rcpt: str, params: dict[str, str]) -> Reply | None: ...
    async def message(self, s: Session, data: bytes) -> Reply: ...


Authenticator = Callable[[str, str], Awaitable[bool]]


class BareLineEnding(Exception):
    pass


def xtext_decode(s: str) -> str:
    """RFC 3461 §4: +XX is a hex-encoded octet."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), s)


class SMTPServer:
    def __init__(self, listener: Listener, handler: Handler, *, hostname: str, limits: Limits | None = None,
                 authenticator: Authenticator | None = None) -> None:
        self.listener = listener
        self.handler = handler
        self.hostname = hostname
        self.limits = limits or Limits()
        self.authenticator = authenticator
        self.sessions = 0
        self.per_client: dict[str, int] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        ssl_ctx = self.listener.tls if self.listener.implicit_tls else None
        # SO_REUSEPORT: several worker processes may share the port; the kernel spreads connections
        self.server = await asyncio.start_server(self._accept, self.listener.host, self.listener.port, ssl=ssl_ctx,
                                                 limit=MAX_COMMAND * 2, backlog=1024, reuse_port=True,
                                                 ssl_handshake_timeout=30 if ssl_ctx else None)

    async def stop_accepting(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = writer.get_extra_info("peername") or ("?", 0)
        ip = peer[0]
        try:
            if self.sessions >= self.limits.max_sessions or \
                    self.per_client.get(ip, 0) >= self.limits.max_sessions_per_client:
                writer.write(Reply(421, f"4.7.0 {self.hostname} too many connections, try again later").line())
                await writer.drain()
                return
            self.sessions += 1
            self.per_client[ip] = self.per_client.get(ip, 0) + 1
            try:
                await _Conversation(self, reader, writer, Session(self.listener, (ip, peer[1]))).run()
            finally:
                self.sessions -= 1
                self.per_client[ip] -= 1
                if not self.per_client[ip]:
                    del self.per_client[ip]
        except (ConnectionError, ssl.SSLError, OSError):
            pass
        finally:
            self.tasks.discard(task)
            writer.close()


class _Conversation:
    def __init__(self, srv: SMTPServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 s: Session) -> None:
        self.srv, self.r, self.w, self.s = srv, reader, writer, s
        self.limits = srv.limits
        obj = writer.get_extra_info("ssl_object")
        if obj is not None:
            s.tls_version, s.tls_cipher = obj.version(), obj.cipher()[0]

    async def send(self, reply: Reply) -> bool | None:
        self.w.write(reply.line())
        await self.w.drain()
        return None

    async def readline(self) -> bytes:
        async with asyncio.timeout(self.limits.command_timeout):  # no task per read, unlike wait_for
            line = await self.r.readuntil(b"\n")
        if not line.endswith(b"\r\n") or b"\r" in line[:-2] or b"\n" in line[:-2]:
            raise BareLineEnding
        return line[:-2]

    async def run(self) -> None:
        await self.send(Reply(220, f"{self.srv.hostname} ESMTP Postgate"))
        while True:
            try:
                line = await self.readline()
            except TimeoutError:
                await self.send(Reply(421, "4.4.2 timeout exceeded, closing connection"))
                return
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            except asyncio.LimitOverrunError:
                await self.send(Reply(500, "5.5.6 command line too long"))
                return
            except BareLineEnding:
                # RFC 5321 §2.3.8: only CRLF ends a line; a bare LF or CR is refused and the session ends,
                # so no smuggled command or message can follow
                await self.send(Reply(500, "5.5.2 bare LF or CR in command refused (RFC 5321 §2.3.8)"))
                return
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError:
                text = ""
            verb, _, arg = text.partition(" ")
            verb = verb.upper()
            handler = getattr(self, f"cmd_{verb}", None) if verb.isalpha() else None
            if handler is None:
                await self.error(Reply(500, "5.5.2 command not recognized"))
            else:
                keep_going = await handler(arg.strip())
                if keep_going is False:
                    return
            if self.s.errors >= self.limits.max_errors:
                await self.send(Reply(421, "4.7.0 too many errors, closing connection"))
                return

    async def error(self, reply: Reply) -> bool | None:
        """Send an error reply and count it (sessions with too many errors are ended)."""
        self.s.errors += 1
        return await self.send(reply)

    # --- commands -------------------------------------------------------------------------------------------
    async def cmd_HELO(self, arg: str) -> bool | None:
        if not arg:
            return await self.error(Reply(501, "5.5.4 HELO needs a host name"))
        self.s.helo, self.s.esmtp = arg, False
        self.s.reset()
        return await self.send(Reply(250, self.srv.hostname))

    async def cmd_EHLO(self, arg: str) -> bool | None:
        if not arg:
            return await self.error(Reply(501, "5.5.4 EHLO needs a host name"))
        self.s.helo, self.s.esmtp = arg, True
        self.s.reset()
        lst = self.s.listener
        lines = [self.srv.hostname, "PIPELINING", f"SIZE {self.limits.max_message_size}", "8BITMIME", "SMTPUTF8",
                 "ENHANCEDSTATUSCODES", "DSN"]
        if lst.tls is not None and not self.s.tls:
            lines.append("STARTTLS")
        if lst.auth and self.s.tls and self.srv.authenticator is not None:
            lines.append("AUTH PLAIN LOGIN")  # RFC 4954 §4: only offered once TLS protects it
        if self.s.tls:
            lines.append("REQUIRETLS")  # RFC 8689 §4: offered only over TLS
        return await self.send(Reply(250, "\n".join(lines)))

    async def cmd_STARTTLS(self, arg: str) -> bool | None:
        if arg:
            return await self.error(Reply(501, "5.5.4 STARTTLS takes no parameters"))
        if self.s.listener.tls is None:
            return await self.error(Reply(454, "4.7.0 TLS not available"))
        if self.s.tls:
            return await self.error(Reply(503, "5.5.1 TLS already active"))
        if len(self.r._buffer):  # type: ignore[attr-defined]
            # RFC 3207 §4.2 / CVE-2011-0411: commands pipelined after STARTTLS would be injected into the
            # TLS session; refuse them and end the session
            await self.send(Reply(554, "5.5.1 commands pipelined after STARTTLS refused"))
            return False
        await self.send(Reply(220, "2.0.0 Ready to start TLS"))
        try:
            # no task in between (wait_for would make one): the loop must not read the ClientHello into the
            # plaintext stream before start_tls pauses reading, or the handshake hangs (seen with uvloop)
            async with asyncio.timeout(60):
                await self.w.start_tls(self.s.listener.tls)
        except (ssl.SSLError, TimeoutError, ConnectionError, OSError):
            return False
        obj = self.w.get_extra_info("ssl_object")
        self.s.tls_version, self.s.tls_cipher = obj.version(), obj.cipher()[0]
        self.s.helo, self.s.esmtp = "", False  # RFC 3207 §4.2: forget everything learned before TLS
        self.s.reset()
        return None

    async def cmd_AUTH(self, arg: str) -> bool | None:
        lst = self.s.listener
        if not lst.auth or self.srv.authenticator is None:
            return await self.error(Reply(502, "5.5.1 AUTH not available"))
        if not self.s.tls:
            return await self.error(Reply(538, "5.7.11 encryption required for authentication (RFC 4954 §6)"))
        if self.s.user is not None:
            return await self.error(Reply(503, "5.5.1 already authenticated"))
        if self.s.sender is not None:
            return await self.error(Reply(503, "5.5.1 AUTH not permitted during a mail transaction"))
        mech, _, initial = arg.partition(" ")
        mech = mech.upper()
        try:
            if mech == "PLAIN":
                resp = initial if initial else await self._challenge("")
                if resp is None:
                    return None
                parts = base64.b64decode(resp, validate=True).split(b"\x00")
                if len(parts) != 3:
                    raise ValueError
                user, password = parts[1].decode(), parts[2].decode()
            elif mech == "LOGIN":
                u = initial if initial else await self._challenge("VXNlcm5hbWU6")
                if u is None:
                    return None
                p = await self._challenge("UGFzc3dvcmQ6")
                if p is None:
                    return None
                user = base64.b64decode(u, validate=True).decode()
                password = base64.b64decode(p, validate=True).decode()
            else:
                return await self.error(Reply(504, "5.5.4 unrecognized authentication type"))
        except (binascii.Error, ValueError, UnicodeDecodeError):
            return await self.error(Reply(501, "5.5.2 cannot decode the response"))
        if await self.srv.authenticator(user, password):
            self.s.user = user
            log.info("%s[%s]: sasl_method=%s, sasl_username=%s", self.s.helo, self.s.peer[0], mech, user)
            await self.send(Reply(235, "2.7.0 authentication successful"))
            return None
        log.warning("%s[%s]: SASL %s authentication failed for %s", self.s.helo, self.s.peer[0], mech, user)
        await self.error(Reply(535, "5.7.8 authentication credentials invalid"))
        return None

    async def _challenge(self, text: str) -> str | None:
        await self.send(Reply(334, text))
        line = (await self.readline()).decode("ascii", "replace")
        if line == "*":
            await self.error(Reply(501, "5.0.0 authentication cancelled"))
            return None
        return line

    async def cmd_MAIL(self, arg: str) -> bool | None:
        if not self.s.helo:
            return await self.error(Reply(503, "5.5.1 send EHLO first"))
        if self.s.sender is not None:
            return await self.error(Reply(503, "5.5.1 nested MAIL command"))
        if self.s.listener.auth_required and self.s.user is None:
            return await self.error(Reply(530, "5.7.0 authentication required"))
        if not arg.upper().startswith("FROM:"):
            return await self.error(Reply(501, "5.5.4 syntax: MAIL FROM:<address>"))
        parsed = self._address(arg[5:].lstrip())
        if parsed is None:
            return await self.error(Reply(501, "5.1.7 bad sender address syntax"))
        addr, params = parsed
        if params is None:
            return await self.error(Reply(501, "5.5.4 bad MAIL parameters"))
        for k, v in params.items():
            if k == "SIZE":
                if not v.isdigit():
                    return await self.error(Reply(501, "5.5.4 bad SIZE"))
                if int(v) > self.limits.max_message_size:
                    return await self.error(Reply(552, "5.3.4 message size exceeds fixed limit"))
            elif k == "BODY":
                if v.upper() not in ("7BIT", "8BITMIME"):
                    return await self.error(Reply(501, "5.5.4 BODY is 7BIT or 8BITMIME"))
            elif k == "SMTPUTF8":
                if v:
                    return await self.error(Reply(501, "5.5.4 SMTPUTF8 takes no value"))
            elif k == "RET":  # RFC 3461 §4.3
                if v.upper() not in ("FULL", "HDRS"):
                    return await self.error(Reply(501, "5.5.4 RET is FULL or HDRS"))
            elif k == "ENVID":  # RFC 3461 §4.4: xtext, at most 100 characters
                if not v or len(v) > 100 or not _XTEXT_OK.match(v):
                    return await self.error(Reply(501, "5.5.4 bad ENVID"))
            elif k == "REQUIRETLS":  # RFC 8689 §4.1: only over TLS
                if v or not self.s.tls:
                    return await self.error(Reply(530, "5.7.10 REQUIRETLS needs TLS"))
            elif k == "AUTH":  # RFC 4954 §5: accepted and ignored
                pass
            else:
                return await self.error(Reply(555, f"5.5.4 unsupported MAIL parameter {k}"))
        if not params.get("SMTPUTF8", None) == "" and any(ord(c) > 127 for c in addr):
            return await self.error(Reply(553, "5.6.7 non-ASCII address needs SMTPUTF8"))
        self.s.sender, self.s.mail_params = addr, params
        return await self.send(Reply(250, "2.1.0 Ok"))

    async def cmd_RCPT(self, arg: str) -> bool | None:
        if self.s.sender is None:
            return await self.error(Reply(503, "5.5.1 need MAIL first"))
        if not arg.upper().startswith("TO:"):
            return await self.error(Reply(501, "5.5.4 syntax: RCPT TO:<address>"))
        parsed = self._address(arg[3:].lstrip())
        if parsed is not None and parsed[0].lower() == "postmaster":
            # RFC 5321 §4.5.1: "postmaster" without a domain must be accepted: it is ours
            parsed = (f"postmaster@{self.srv.hostname}", parsed[1])
        if parsed is None or not parsed[0] or "@" not in parsed[0]:
            return await self.error(Reply(501, "5.1.3 bad recipient address syntax"))
        addr, params = parsed
        if params is None:
            return await self.error(Reply(501, "5.5.4 bad RCPT parameters"))
        for k, v in params.items():
            if k == "NOTIFY":  # RFC 3461 §4.1
                vals = v.upper().split(",")
                if not vals or any(x not in ("NEVER", "SUCCESS", "FAILURE", "DELAY") for x in vals) or \
                        ("NEVER" in vals and len(vals) > 1):
                    return await self.error(Reply(501, "5.5.4 bad NOTIFY"))
            elif k == "ORCPT":  # RFC 3461 §4.2: addr-type ";" xtext
                t, sep, x = v.partition(";")
                if not sep or not t or not _XTEXT_OK.match(x):
                    return await self.error(Reply(501, "5.5.4 bad ORCPT"))
            else:
                return await self.error(Reply(555, f"5.5.4 unsupported RCPT parameter {k}"))
        if any(ord(c) > 127 for c in addr) and "SMTPUTF8" not in self.s.mail_params:
            return await self.error(Reply(553, "5.6.7 non-ASCII address needs SMTPUTF8"))
        if len(self.s.recipients) >= self.limits.max_recipients:
            return await self.send(Reply(452, "4.5.3 too many recipients"))
        refusal = await self.srv.handler.check_rcpt(self.s, addr, params)
        if refusal is not None:
            log.info("%s[%s]: reject: RCPT from <%s> to <%s>: %d %s", self.s.helo, self.s.peer[0], self.s.sender,
                     addr, refusal.code, refusal.text)
            return await self.error(refusal) if refusal.code >= 500 else await self.send(refusal)
        self.s.recipients.append((addr, params))
        return await self.send(Reply(250, "2.1.5 Ok"))

    async def cmd_DATA(self, arg: str) -> bool | None:
        if arg:
            return await self.error(Reply(501, "5.5.4 DATA takes no parameters"))
        if self.s.sender is None or not self.s.recipients:
            return await self.error(Reply(503, "5.5.1 need RCPT first"))
        await self.send(Reply(354, "End data with <CR><LF>.<CR><LF>"))
        try:
            data, problem = await self._read_data()
        except TimeoutError:
            await self.send(Reply(421, "4.4.2 timeout exceeded during DATA, closing connection"))
            return False
        except (asyncio.IncompleteReadError, ConnectionError):
            return False  # the client went away mid-DATA: no reply, nothing accepted
        if problem is not None:
            self.s.reset()
            await self.error(problem)
            return None
        reply = await self.srv.handler.message(self.s, data)
        self.s.reset()
        await self.send(reply)
        return None

    async def _read_data(self) -> tuple[bytes, Reply | None]:
        """Read up to CRLF.CRLF in bulk; return the unstuffed content, or a refusal (the data is always
        read to its end, so what follows is a command, never the rest of a message)."""
        buf = bytearray(b"\r\n")  # so a terminator at the very start is found too
        limit = self.limits.max_message_size
        too_big = False
        while True:
            end = buf.find(b"\r\n.\r\n", max(0, len(buf) - 65536 - 5))
            if end >= 0:
                break
            async with asyncio.timeout(self.limits.data_timeout):
                chunk = await self.r.read(65536)
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(buf), None)
            buf += chunk
            if len(buf) > limit + 65536 and not too_big:
                too_big = True
            if too_big and len(buf) > 4 * 65536:
                keep = buf[-8:]
                buf = bytearray(b"\r\n") + keep  # drop what we will refuse anyway, keep looking for the end
        rest = bytes(buf[end + 5:])
        if rest:  # pipelined commands after DATA: put them back
            self.r._buffer[0:0] = rest  # type: ignore[attr-defined]
        if too_big:
            return b"", Reply(552, "5.3.4 message size exceeds fixed limit")
        body = bytes(buf[2:end + 2])  # the content with its final CRLF
        # RFC 5321 §2.3.8: CR and LF only as CRLF. Anything else is refused, whole: no second message
        crlf = body.count(b"\r\n")
        if body.count(b"\n") != crlf or body.count(b"\r") != crlf:
            return b"", Reply(554, "5.5.2 message refused: bare LF or CR in message data (RFC 5321 §2.3.8)")
        if len(body) > limit:
            return b"", Reply(552, "5.3.4 message size exceeds fixed limit")
        if any(len(line) > MAX_DATA_LINE - 2 for line in body.split(b"\r\n")):
            return b"", Reply(554, "5.5.2 message refused: line longer than 998 octets (RFC 5322 §2.1.1)")
        # RFC 5321 §4.5.2: remove dot-stuffing
        if body.startswith(b".."):
            body = body[1:]
        body = body.replace(b"\r\n..", b"\r\n.")
        return body, None

    async def cmd_RSET(self, arg: str) -> bool | None:
        self.s.reset()
        return await self.send(Reply(250, "2.0.0 Ok"))

    async def cmd_NOOP(self, arg: str) -> bool | None:
        return await self.send(Reply(250, "2.0.0 Ok"))

    async def cmd_VRFY(self, arg: str) -> bool | None:
        return await self.send(Reply(252, "2.1.5 send some mail, I'll try my best"))

    async def cmd_HELP(self, arg: str) -> bool | None:
        return await self.send(Reply(214, "2.0.0 see RFC 5321"))

    async def cmd_QUIT(self, arg: str) -> bool:
        await self.send(Reply(221, "2.0.0 Bye"))
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
            if not k or k.upper() in params:  # type: ignore[operator]
                params = None
                break
            params[k.upper()] = v if eq else ""  # type: ignore[index]
        return addr, params
