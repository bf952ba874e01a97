"""An in-process SMTPServer (inbound/smtpd.py) on a real loopback socket, for byte-exact session tests.

The server runs in its own event loop in a thread; the handler records what it is given; the server's
log lines are collected (so a test can assert no traceback and see the fail2ban lines).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from postgate.inbound.filters import Filter, Route
from postgate.inbound.smtpd import Limits, Listener, Session, SMTPServer
from postgate.policy.vocab import Reply

from fixtures.pki import PKI

HOST = "127.0.0.1"


@dataclass
class Recorder:
    """A Handler that accepts every recipient and records each message."""

    messages: list[tuple[str, list[str], bytes, str | None]] = field(default_factory=list)
    routes: list[tuple[Route, ...]] = field(default_factory=list)
    fail: Exception | None = None

    async def check_rcpt(self, s: Session, rcpt: str, params: dict[str, str]) -> Reply | None:
        return Reply(550, "5.1.1", "unknown") if rcpt.startswith("unknown@") else None

    async def message(self, s: Session, data: bytes) -> Reply:
        if self.fail is not None:
            raise self.fail
        assert s.sender is not None
        self.messages.append((s.sender, [r for r, _ in s.recipients], data, s.hold))
        self.routes.append(s.routes)
        return Reply(250, "2.0.0", f"Ok: queued as {s.queue_id}")


class LogCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\nTraceback " + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)

    def text(self) -> str:
        return "\n".join(self.lines)


@dataclass
class Running:
    port: int
    handler: Recorder
    log: LogCollector
    server: SMTPServer
    loop: asyncio.AbstractEventLoop


def tls_context(directory: Path) -> ssl.SSLContext:
    pki = PKI(directory)
    pki.issue("smtpd.test", "chain")
    chain, key = pki.paths("smtpd.test")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(chain, key)
    return ctx


async def _check(user: str, password: str) -> bool:
    return user == "alice" and password == "wonderland"


@contextmanager
def serve(limits: Limits | None = None, *, tls: ssl.SSLContext | None = None, implicit_tls: bool = False,
          auth: bool = False, filters: list[Filter] | None = None, handler: Recorder | None = None,
          event_loop: str = "asyncio", **kw: Any) -> Iterator[Running]:
    h = handler or Recorder()
    collector = LogCollector()
    logger = logging.getLogger("postgate")
    logger.addHandler(collector)
    old_level = logger.level
    logger.setLevel(logging.DEBUG)
    if event_loop == "uvloop":   # issue 20: the smtpd runs on both loops ([server] event_loop)
        import uvloop
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    listener = Listener("mx", HOST, 0, tls=tls, implicit_tls=implicit_tls, auth=auth, filters=filters or [])
    srv = SMTPServer(listener, h, hostname="smtpd.test", limits=limits or Limits(),
                     authenticator=_check if auth else None, **kw)
    ready = threading.Event()

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(srv.start())
        ready.set()
        loop.run_forever()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    assert ready.wait(10)
    assert srv.server is not None
    port = srv.server.sockets[0].getsockname()[1]
    try:
        yield Running(port, h, collector, srv, loop)
    finally:
        async def stop() -> None:
            await srv.stop_accepting()
            tasks = list(srv.tasks)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        t.join(10)
        loop.close()
        logger.removeHandler(collector)
        logger.setLevel(old_level)


class Client:
    """A raw SMTP client: send bytes, read one (possibly multi-line) reply."""

    def __init__(self, port: int, *, timeout: float = 10, source: str = HOST) -> None:
        self.sock = socket.create_connection((HOST, port), timeout=timeout, source_address=(source, 0))
        self.f = self.sock.makefile("rb")

    def reply(self) -> bytes:
        lines = []
        while True:
            try:
                line = self.f.readline()
            except ConnectionResetError:
                line = b""
            if not line:
                return b"".join(lines)   # closed
            lines.append(line)
            if line[3:4] != b"-":
                return b"".join(lines)

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def start_tls(self) -> None:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        self.sock = ctx.wrap_socket(self.sock, server_hostname="smtpd.test")
        self.f = self.sock.makefile("rb")

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def code(reply: bytes) -> int:
    return int(reply[:3]) if reply[:3].isdigit() else 0
