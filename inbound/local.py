"""Local delivery for Postgate's own domains: to an LMTP server (Dovecot's, over a Unix or TCP socket,
RFC 2033) with one result per recipient, or, without one, into Maildirs.

LMTP differs from SMTP in one rule that matters here (RFC 2033 §4.2): after the final dot the server
sends one reply **per recipient it accepted at RCPT**, in RCPT order, so one mailbox can take the message
while another is over quota. Each reply becomes that recipient's :class:`LocalResult`: 2xx delivered,
4xx deferred (the queue retries only that recipient), 5xx bounced. A recipient refused at RCPT gets the
RCPT reply; a failure of the whole session (connection, greeting, LHLO, MAIL, DATA) applies to every
recipient still without a result, as a temporary failure when the server said nothing better.
Every result is logged like Postfix's lmtp/virtual delivery agents:
``QUEUEID: to=<bob@example.org>, relay=lmtp[/run/dovecot/lmtp], delay=…, delays=…, dsn=2.0.0, status=sent (250 …)``.

Maildir (the qmail/Dovecot layout): ``<root>/<domain>/<local part>/{tmp,new,cur}``; a message is written
to ``tmp/``, fsync'd, then renamed into ``new/`` and the directory fsync'd, so it is never seen half
written and survives a crash once acknowledged. Writing into a Maildir is *final delivery* (RFC 5321
§4.4): the message gets a ``Return-Path:`` line with the envelope sender first (the one place the
reverse-path survives: replies by machines and mailbox filters read it), after any ``Return-Path:`` fields
the message already had are removed (a client's own would be a forgery), and ``Delivered-To:`` with the
recipient (RFC 9228, as Postfix's local and virtual agents write it). An LMTP server (Dovecot) does this
itself.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from postgate.outbound.queue.spool import fsync_dir
from postgate.policy.logline import delays

log = logging.getLogger("postgate.local")

_SAFE = re.compile(r"^[A-Za-z0-9!#$%&'*+/=?^_`{|}~.-]+$")


@dataclass(frozen=True)
class LocalResult:
    recipient: str
    code: int
    text: str

    @property
    def ok(self) -> bool:
        return 200 <= self.code < 300

    @property
    def status(self) -> str:
        """Postfix's word for the outcome: sent, deferred (4xx) or bounced (5xx)."""
        return "sent" if self.ok else ("bounced" if self.code >= 500 else "deferred")

    @property
    def dsn(self) -> str:
        """The enhanced status code of the reply (RFC 3463), or one made from the basic code."""
        first = self.text.split(" ", 1)[0]
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(self.code)[0]:
            return first
        return f"{str(self.code)[0]}.0.0"


def _log(queue_id: str, relay: str, start: float, results: list[LocalResult]) -> None:
    end = time.time()
    for r in results:
        (log.info if r.ok else log.warning)(
            "%s: to=<%s>, relay=%s, %s, dsn=%s, status=%s (%d %s)", queue_id or "NOQUEUE", r.recipient, relay,
            delays(queue_id, start, end), r.dsn, r.status, r.code, r.text)


# RFC 5322 §3.6.7 trace field "Return-Path:" with its continuation lines, in the header section
_RETURN_PATH = re.compile(rb"(?im)^return-path[ \t]*:.*\r?\n(?:[ \t].*\r?\n)*")


def final_delivery_fields(sender: str, recipient: str, data: bytes) -> bytes:
    """``data`` as final delivery stores it (RFC 5321 §4.4): ``Return-Path: <sender>`` and ``Delivered-To:
    recipient`` (RFC 9228 §4) in front, and the Return-Path fields of the header section removed ("SMTP
    servers making final delivery MAY remove Return-path header fields before adding their own"). The
    header section is everything before the first empty line (RFC 5322 §2.1); the body is not looked at."""
    end = data.find(b"\r\n\r\n")
    head, body = (data[:end + 2], data[end + 2:]) if end >= 0 else (data, b"")   # no body: all header
    if data.startswith(b"\r\n"):
        head, body = b"", data
    if head and _RETURN_PATH.search(head):
        head = _RETURN_PATH.sub(b"", head)
    # RFC 5321 §4.4 return-path-line = "Return-Path:" FWS reverse-path <CRLF>: "<>" for the null sender
    fields = f"Return-Path: <{sender}>\r\nDelivered-To: {recipient}\r\n".encode()
    return b"".join((fields, head, body))


class Maildir:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def _folder(self, recipient: str) -> Path | None:
        local, _, domain = recipient.rpartition("@")
        local = local.split("+", 1)[0].lower()  # address extension: user+tag goes to user
        domain = domain.lower().rstrip(".")
        if not _SAFE.match(local) or local.startswith(".") or ".." in local or not _SAFE.match(domain):
            return None
        return self.root / domain / local

    def _write(self, recipient: str, data: bytes, sender: str | None = None) -> LocalResult:
        folder = self._folder(recipient)
        if folder is None:
            return LocalResult(recipient, 550, "5.1.3 unsafe mailbox name")
        for sub in ("tmp", "new", "cur"):
            (folder / sub).mkdir(parents=True, exist_ok=True)
        name = f"{int(time.time())}.P{os.getpid()}R{secrets.token_hex(6)}.{socket.gethostname()}"
        tmp = folder / "tmp" / name
        if sender is not None:
            data = final_delivery_fields(sender, recipient, data)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                view = memoryview(data)
                while view:   # a short write (a signal, a full disk's last blocks) is not the whole message
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, folder / "new" / name)
        except BaseException:
            tmp.unlink(missing_ok=True)   # ENOSPC, EIO: no partial file left in tmp/
            raise
        fsync_dir(folder / "new")
        return LocalResult(recipient, 250, f"2.0.0 delivered to maildir as {name}")

    async def deliver(self, sender: str, recipients: list[str], data: bytes, *,
                      queue_id: str = "") -> list[LocalResult]:
        loop = asyncio.get_running_loop()
        start = time.time()
        out = []
        for r in recipients:
            try:
                out.append(await loop.run_in_executor(None, self._write, r, data, sender))
            except OSError as e:
                out.append(LocalResult(r, 451, f"4.3.0 maildir write failed: {e.strerror}"))
        _log(queue_id, "maildir", start, out)
        return out


def _refused(recipient: str, command: str, code: int, text: str) -> LocalResult:
    """The result for a recipient whose transaction stopped at ``command``: the server's refusal; any other
    code (a 2xx where 250/251/354 was due, a 3xx) is a protocol error, deferred - never taken for a delivery
    of a message that was not sent (RFC 5321 §4.1.1.4, §4.2.1)."""
    if code >= 400:
        return LocalResult(recipient, code, text)
    return LocalResult(recipient, 451, f"4.5.0 protocol error: {code} {text} in reply to {command}")


class LMTPClient:
    """``unix:/path`` or ``host:port``."""

    def __init__(self, target: str, timeout: float = 60.0, lhlo: str = "localhost") -> None:
        self.target, self.timeout, self.lhlo = target, timeout, lhlo

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        if self.target.startswith("unix:"):
            return await asyncio.open_unix_connection(self.target[5:])
        host, _, port = self.target.rpartition(":")
        return await asyncio.open_connection(host.strip("[]"), int(port))

    @property
    def relay(self) -> str:
        """``relay=`` as Postfix's lmtp logs it: name[address]:port, or lmtp[socket path]."""
        if self.target.startswith("unix:"):
            return f"lmtp[{self.target[5:]}]"
        host, _, port = self.target.rpartition(":")
        host = host.strip("[]")
        return f"{host}[{host}]:{port}"

    async def deliver(self, sender: str, recipients: list[str], data: bytes, *,
                      queue_id: str = "") -> list[LocalResult]:
        start = time.time()
        try:
            out = await asyncio.wait_for(self._deliver(sender, recipients, data), self.timeout)
        except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError) as e:
            out = [LocalResult(r, 451, f"4.4.1 LMTP {self.target}: {type(e).__name__}: {e}") for r in recipients]
        _log(queue_id, self.relay, start, out)
        return out

    async def _deliver(self, sender: str, recipients: list[str], data: bytes) -> list[LocalResult]:
        r, w = await self._open()

        async def reply() -> tuple[int, str]:
            lines = []
            while True:
                line = (await r.readline()).decode("utf-8", "replace")
                if not line:
                    raise ConnectionError("LMTP server closed the connection")
                lines.append(line[4:].strip())
                if line[3:4] != "-":
                    return int(line[:3]), " ".join(lines)

        async def cmd(text: str) -> tuple[int, str]:
            w.write(text.encode() + b"\r\n")
            await w.drain()
            return await reply()

        try:
            code, text = await reply()
            if code != 220:
                raise ConnectionError(f"greeting {code} {text}")
            code, text = await cmd(f"LHLO {self.lhlo}")
            if code != 250:
                raise ConnectionError(f"LHLO {code} {text}")
            code, text = await cmd(f"MAIL FROM:<{sender}>")
            if code != 250:
                return [_refused(rc, "MAIL", code, text) for rc in recipients]
            results: dict[str, LocalResult] = {}
            accepted = []
            for rc in recipients:
                code, text = await cmd(f"RCPT TO:<{rc}>")
                if code in (250, 251):   # RFC 5321 §4.1.1.3 (RFC 2033 §4.2): accepted
                    accepted.append(rc)
                else:
                    results[rc] = _refused(rc, "RCPT", code, text)
            if accepted:
                code, text = await cmd("DATA")
                if code != 354:   # RFC 5321 §4.1.1.4: only 354 lets the content go; nothing was delivered
                    for rc in accepted:
                        results[rc] = _refused(rc, "DATA", code, text)
                else:
                    body = data if data.endswith(b"\r\n") else data + b"\r\n"
                    body = re.sub(rb"(?m)^\.", b"..", body)  # RFC 5321 §4.5.2 dot-stuffing
                    w.write(body + b".\r\n")
                    await w.drain()
                    for rc in accepted:  # RFC 2033 §4.2: one reply per accepted recipient
                        code, text = await reply()
                        results[rc] = LocalResult(rc, code, text)
            try:
                await cmd("QUIT")
            except (OSError, ConnectionError, asyncio.IncompleteReadError):
                pass  # every recipient has its reply: a lost QUIT changes nothing (never deliver twice)
            return [results[rc] for rc in recipients]
        finally:
            w.close()
