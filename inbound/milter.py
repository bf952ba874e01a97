"""Milter client: the Sendmail/Postfix mail filter protocol, version 6, as a stage-hook filter.

A *milter* is a content filter (rspamd, OpenDKIM, clamav-milter, …) that an MTA talks to over a socket while
the SMTP session runs, so its verdict becomes the reply to the client. The MTA is the client: it opens one
connection per SMTP session, negotiates options, then replays the session as commands — connect, HELO, MAIL,
each RCPT, DATA, every header field, end of header, the body in chunks, end of message — and the milter
answers each with continue, accept, reject, tempfail, discard, a custom reply code, or (at end of message)
a list of modifications: header edits, sender/recipient changes, a new body, a quarantine.

Wire format (libmilter's ``mfdef.h``, Postfix's ``src/milter/milter8.c``, the "Sendmail Milter protocol"
write-up in the ``pymilter``/``ppymilter`` projects): every packet is a 4-octet big-endian length, one
command octet, then data; the length counts the command octet. Strings are NUL-terminated.

Option negotiation (``SMFIC_OPTNEG``): the MTA offers protocol version, the *actions* it allows (which
modifications) and the *protocol steps* it can leave out; the milter answers with its version, the actions it
wants and the steps it does not want (``SMFIP_NO*``: do not send that command; ``SMFIP_NR_*``: send it but do
not wait for a reply), and in version 6 optionally the macros it wants per stage (``SMFIR_SETSYMLIST``).

Macros (``SMFIC_MACRO``) carry the MTA's knowledge before each command: the queue id ``i``, our host name
``j``, ``{client_addr}``, ``{auth_authen}``, ``{tls_version}`` … — the names Postfix sends
(MILTER_README "Macros").

Failures (cannot connect, timeout, a closed socket, a packet that makes no sense) raise :class:`MilterError`;
the :class:`~postgate.inbound.filters.FilterChain` then applies the milter's ``default_action`` and logs
why, as Postfix's ``milter_default_action``. Every read and write has a deadline, like Postfix's
``milter_connect_timeout``, ``milter_command_timeout`` and ``milter_content_timeout``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import struct
from collections.abc import Iterable
from dataclasses import dataclass

from postgate.inbound.filters import (
    CONTINUE,
    Action,
    HeaderEdit,
    HeaderOp,
    Stage,
    StageContext,
    Verdict,
    default_reply,
)
from postgate.policy.vocab import Reply

log = logging.getLogger("postgate.milter")

# mfdef.h: the protocol version we speak (6: SMFIR_SETSYMLIST, SMFIP_NR_*, SMFIP_SKIP)
VERSION = 6

# mfdef.h: commands, MTA → milter
SMFIC_ABORT = b"A"
SMFIC_BODY = b"B"
SMFIC_CONNECT = b"C"
SMFIC_MACRO = b"D"
SMFIC_BODYEOB = b"E"
SMFIC_HELO = b"H"
SMFIC_QUIT_NC = b"K"
SMFIC_HEADER = b"L"
SMFIC_MAIL = b"M"
SMFIC_EOH = b"N"
SMFIC_OPTNEG = b"O"
SMFIC_QUIT = b"Q"
SMFIC_RCPT = b"R"
SMFIC_DATA = b"T"
SMFIC_UNKNOWN = b"U"

# mfdef.h: replies, milter → MTA
SMFIR_ADDRCPT = b"+"
SMFIR_DELRCPT = b"-"
SMFIR_ADDRCPT_PAR = b"2"
SMFIR_SHUTDOWN = b"4"
SMFIR_ACCEPT = b"a"
SMFIR_REPLBODY = b"b"
SMFIR_CONTINUE = b"c"
SMFIR_DISCARD = b"d"
SMFIR_CHGFROM = b"e"
SMFIR_CONN_FAIL = b"f"
SMFIR_ADDHEADER = b"h"
SMFIR_INSHEADER = b"i"
SMFIR_SETSYMLIST = b"l"
SMFIR_CHGHEADER = b"m"
SMFIR_PROGRESS = b"p"
SMFIR_QUARANTINE = b"q"
SMFIR_REJECT = b"r"
SMFIR_SKIP = b"s"
SMFIR_TEMPFAIL = b"t"
SMFIR_REPLYCODE = b"y"

# mfapi.h: actions (modifications) the MTA allows
SMFIF_ADDHDRS = 0x01
SMFIF_CHGBODY = 0x02
SMFIF_ADDRCPT = 0x04
SMFIF_DELRCPT = 0x08
SMFIF_CHGHDRS = 0x10
SMFIF_QUARANTINE = 0x20
SMFIF_CHGFROM = 0x40
SMFIF_ADDRCPT_PAR = 0x80
SMFIF_SETSYMLIST = 0x100
ACTIONS_OFFERED = 0x1FF

# mfdef.h: protocol steps the milter may switch off (NO*) or not answer (NR_*)
SMFIP_NOCONNECT = 0x1
SMFIP_NOHELO = 0x2
SMFIP_NOMAIL = 0x4
SMFIP_NORCPT = 0x8
SMFIP_NOBODY = 0x10
SMFIP_NOHDRS = 0x20
SMFIP_NOEOH = 0x40
SMFIP_NR_HDR = 0x80
SMFIP_NOUNKNOWN = 0x100
SMFIP_NODATA = 0x200
SMFIP_SKIP = 0x400
SMFIP_RCPT_REJ = 0x800
SMFIP_NR_CONN = 0x1000
SMFIP_NR_HELO = 0x2000
SMFIP_NR_MAIL = 0x4000
SMFIP_NR_RCPT = 0x8000
SMFIP_NR_DATA = 0x10000
SMFIP_NR_UNKN = 0x20000
SMFIP_NR_EOH = 0x40000
SMFIP_NR_BODY = 0x80000
SMFIP_HDR_LEADSPC = 0x100000
# We never send rejected recipients (SMFIP_RCPT_REJ) nor unknown commands, nor bodies over 64 KiB a chunk
# (SMFIP_MDS_*): everything else may be switched off or left unanswered.
PROTOCOL_OFFERED = 0x1FFFFF & ~SMFIP_RCPT_REJ

# mfdef.h: the stages of SMFIR_SETSYMLIST / the command a SMFIC_MACRO belongs to
SMFIM_CONNECT, SMFIM_HELO, SMFIM_ENVFROM, SMFIM_ENVRCPT, SMFIM_DATA, SMFIM_EOM, SMFIM_EOH = range(7)
MACRO_STAGE_CMD = {SMFIM_CONNECT: SMFIC_CONNECT, SMFIM_HELO: SMFIC_HELO, SMFIM_ENVFROM: SMFIC_MAIL,
                   SMFIM_ENVRCPT: SMFIC_RCPT, SMFIM_DATA: SMFIC_DATA, SMFIM_EOM: SMFIC_BODYEOB,
                   SMFIM_EOH: SMFIC_EOH}

# Postfix's defaults (postconf(5) milter_*_macros): what is sent before each command unless the milter
# asked for its own list with SMFIR_SETSYMLIST.
DEFAULT_MACROS: dict[bytes, tuple[str, ...]] = {
    SMFIC_CONNECT: ("j", "{daemon_name}", "{daemon_addr}", "v", "_", "{client_addr}", "{client_name}",
                    "{client_port}", "{client_ptr}"),
    SMFIC_HELO: ("{tls_version}", "{cipher}", "{cipher_bits}", "{cert_subject}", "{cert_issuer}"),
    SMFIC_MAIL: ("i", "{auth_type}", "{auth_authen}", "{auth_author}", "{mail_addr}", "{mail_host}",
                 "{mail_mailer}"),
    SMFIC_RCPT: ("{rcpt_addr}", "{rcpt_host}", "{rcpt_mailer}"),
    SMFIC_DATA: ("i",),
    SMFIC_EOH: ("i",),
    SMFIC_BODYEOB: ("i",),
}

CHUNK = 65535                  # milter8.c MILTER_CHUNK_SIZE: the largest body chunk of protocol version 6
MAX_PACKET = 4 * 1024 * 1024   # a reply longer than this is garbage, not a milter


class MilterError(Exception):
    """The milter could not be asked: connection, timeout or protocol error (→ its default_action)."""


@dataclass(frozen=True)
class MilterSettings:
    name: str
    address: str                          # inet:HOST:PORT, inet:PORT@HOST, inet6:…, unix:/path
    connect_timeout: float = 30.0         # Postfix milter_connect_timeout
    command_timeout: float = 30.0         # Postfix milter_command_timeout
    content_timeout: float = 300.0        # Postfix milter_content_timeout: DATA, headers, body, end of message
    default_action: Action = Action.TEMPFAIL  # Postfix milter_default_action = tempfail


def parse_address(address: str) -> tuple[str, str, int]:
    """``inet:host:port``, ``inet:[v6]:port``, ``inet:port@host`` (Sendmail style), ``inet6:…`` or
    ``unix:/path`` (also ``local:``) → (kind, host or path, port). Raises ValueError."""
    kind, sep, rest = address.partition(":")
    if not sep:
        raise ValueError(f"{address!r}: expected inet:HOST:PORT or unix:/PATH")
    kind = kind.lower()
    if kind in ("unix", "local"):
        if not rest.startswith("/"):
            raise ValueError(f"{address!r}: a unix socket needs an absolute path")
        return "unix", rest, 0
    if kind not in ("inet", "inet6"):
        raise ValueError(f"{address!r}: unknown socket type {kind!r} (inet, inet6 or unix)")
    if "@" in rest:
        port_s, _, host = rest.partition("@")
    else:
        host, _, port_s = rest.rpartition(":")
    host = host.strip("[]")
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"{address!r}: {port_s!r} is not a port number") from None
    if not host or not 0 < port < 65536:
        raise ValueError(f"{address!r}: expected inet:HOST:PORT")
    return "inet", host, port


def _z(s: str) -> bytes:
    """A NUL-terminated string (mfdef.h: every string argument)."""
    return s.encode("utf-8", "surrogateescape").replace(b"\0", b"") + b"\0"


def _strings(data: bytes) -> list[str]:
    parts = data.split(b"\0")
    if parts and parts[-1] == b"":
        parts.pop()
    return [p.decode("utf-8", "surrogateescape") for p in parts]


def _bare(addr: str) -> str:
    a = addr.strip()
    return a[1:-1] if a.startswith("<") and a.endswith(">") else a


def _crlf(value: str) -> str:
    """A header value from a milter folds with LF (Postfix and Sendmail's internal form): make it CRLF."""
    return value.replace("\r\n", "\n").replace("\n", "\r\n")


def parse_replycode(text: str) -> Reply:
    """SMFIR_REPLYCODE: ``"550 5.7.1 text"``, multi-line as ``"550-5.7.1 one\\r\\n550 5.7.1 two"``
    (smfi_setmlreply). RFC 5321 §4.2: three digits, then SP or '-'; RFC 3463 enhanced code optional."""
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln]
    if not lines:
        raise MilterError("empty SMFIR_REPLYCODE")
    code_s = lines[0][:3]
    if not (code_s.isdigit() and code_s[0] in "45"):
        raise MilterError(f"SMFIR_REPLYCODE {lines[0][:40]!r} is not a 4xx/5xx reply")
    enhanced = ""
    texts = []
    for ln in lines:
        if ln[:3] != code_s:
            raise MilterError(f"SMFIR_REPLYCODE line {ln[:40]!r} changes the reply code")
        rest = ln[4:]
        first, _, after = rest.partition(" ")
        if first.count(".") == 2 and first[:1] == code_s[0] and all(p.isdigit() for p in first.split(".")):
            enhanced = enhanced or first
            rest = after
        texts.append(rest)
    return Reply(int(code_s), enhanced, "\n".join(texts))


@dataclass
class Negotiated:
    version: int
    actions: int
    protocol: int
    macros: dict[bytes, tuple[str, ...]]     # per command, what SMFIR_SETSYMLIST asked for


class MilterFilter:
    """One configured milter: a factory of per-SMTP-session connections (:class:`MilterSession`)."""

    def __init__(self, settings: MilterSettings) -> None:
        parse_address(settings.address)
        self.settings = settings
        self.name = settings.name
        self.default_action = settings.default_action

    def session(self) -> MilterSession:
        return MilterSession(self.settings)

    async def probe(self) -> None:
        """Connect and negotiate, then quit: for ``postgate check``. Raises MilterError."""
        s = MilterSession(self.settings)
        try:
            await s.open()
        finally:
            await s.close()


class MilterSession:
    """One milter connection for one SMTP session (Postfix opens one per session too)."""

    def __init__(self, settings: MilterSettings) -> None:
        self.s = settings
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.neg: Negotiated | None = None
        self.session_done = False       # accepted/rejected at connect or HELO: nothing more this session
        self.in_transaction = False     # MAIL sent, end of message not yet
        self.macros: dict[str, str] = {}

    # --- wire -----------------------------------------------------------------------------------------
    async def open(self) -> Negotiated:
        kind, host, port = parse_address(self.s.address)
        try:
            if kind == "unix":
                conn = asyncio.open_unix_connection(host)
            else:
                conn = asyncio.open_connection(host, port)
            self.reader, self.writer = await asyncio.wait_for(conn, self.s.connect_timeout)
        except TimeoutError:
            raise MilterError(f"connect to {self.s.address}: timed out after {self.s.connect_timeout:g}s") \
                from None
        except OSError as e:
            raise MilterError(f"connect to {self.s.address}: {e.strerror or e}") from None
        # mfdef.h SMFIC_OPTNEG: version, actions, protocol, each a 32-bit network-order integer
        await self._send(SMFIC_OPTNEG, struct.pack("!III", VERSION, ACTIONS_OFFERED, PROTOCOL_OFFERED))
        cmd, data = await self._read(self.s.connect_timeout)
        if cmd != SMFIC_OPTNEG or len(data) < 12:
            raise MilterError(f"bad option negotiation reply {cmd!r} ({len(data)} octets)")
        version, actions, protocol = struct.unpack("!III", data[:12])
        if version < 2:
            raise MilterError(f"milter protocol version {version} is too old")
        if actions & ~ACTIONS_OFFERED or protocol & ~PROTOCOL_OFFERED:
            # milter8.c: a milter that wants what the MTA did not offer cannot be served
            raise MilterError(f"milter asks for actions 0x{actions:x} / protocol 0x{protocol:x} "
                              f"beyond the offered 0x{ACTIONS_OFFERED:x} / 0x{PROTOCOL_OFFERED:x}")
        macros: dict[bytes, tuple[str, ...]] = {}
        rest = data[12:]
        # version 6: optional macro lists, (stage uint32, "name name …\0") each
        while len(rest) >= 5:
            (stage,) = struct.unpack("!I", rest[:4])
            end = rest.find(b"\0", 4)
            names = rest[4:end if end >= 0 else len(rest)].decode("ascii", "replace")
            rest = rest[end + 1:] if end >= 0 else b""
            if stage in MACRO_STAGE_CMD:
                macros[MACRO_STAGE_CMD[stage]] = tuple(n.strip() for n in names.replace(",", " ").split())
        self.neg = Negotiated(min(version, VERSION), actions, protocol, macros)
        return self.neg

    async def _send(self, cmd: bytes, data: bytes = b"") -> None:
        if self.writer is None:
            raise MilterError("not connected")
        # mfdef.h: uint32 length of command + data, network order
        self.writer.write(struct.pack("!I", len(data) + 1) + cmd + data)
        try:
            await asyncio.wait_for(self.writer.drain(), self.s.command_timeout)
        except TimeoutError:
            raise MilterError(f"write timed out after {self.s.command_timeout:g}s") from None
        except OSError as e:
            raise MilterError(f"write: {e.strerror or e}") from None

    async def _read(self, timeout: float) -> tuple[bytes, bytes]:
        if self.reader is None:
            raise MilterError("not connected")
        try:
            head = await asyncio.wait_for(self.reader.readexactly(4), timeout)
            (n,) = struct.unpack("!I", head)
            if n < 1 or n > MAX_PACKET:
                raise MilterError(f"garbage from milter: packet length {n}")
            body = await asyncio.wait_for(self.reader.readexactly(n), timeout)
        except TimeoutError:
            raise MilterError(f"no reply within {timeout:g}s") from None
        except asyncio.IncompleteReadError:
            raise MilterError("milter closed the connection") from None
        except OSError as e:
            raise MilterError(f"read: {e.strerror or e}") from None
        return body[:1], body[1:]

    # --- macros ---------------------------------------------------------------------------------------
    def _macro_values(self, ctx: StageContext) -> dict[str, str]:
        """Postfix's macro names (MILTER_README "Macros"), from what the smtpd knows at this stage."""
        name = ctx.client_name if ctx.client_name and ctx.client_name != "unknown" else ""
        v: dict[str, str] = {
            "j": ctx.hostname, "{daemon_name}": ctx.listener, "{daemon_addr}": ctx.local_address,
            "{daemon_port}": str(ctx.local_port) if ctx.local_port else "", "v": "Postgate",
            "_": f"{name or 'unknown'} [{ctx.client_address}]", "{client_addr}": ctx.client_address,
            "{client_name}": name or f"[{ctx.client_address}]",
            "{client_port}": str(ctx.client_port) if ctx.client_port else "",
            "{client_ptr}": ctx.reverse_client_name, "{client_resolve}": "OK" if name else "FAIL",
            "i": ctx.queue_id, "{tls_version}": ctx.tls_version or "", "{cipher}": ctx.tls_cipher or "",
            "{cipher_bits}": str(ctx.tls_bits) if ctx.tls_bits else "",
            "{cert_subject}": ctx.client_cert_subject or "", "{cert_issuer}": ctx.client_cert_issuer or "",
            "{auth_type}": ctx.auth_method or "", "{auth_authen}": ctx.auth_user or "",
            "{auth_author}": "",
        }
        if ctx.sender is not None:
            v["{mail_addr}"] = ctx.sender
            v["{mail_host}"] = ctx.sender.rpartition("@")[2] if "@" in ctx.sender else ""
            v["{mail_mailer}"] = "smtp"
        if ctx.recipient is not None:
            v["{rcpt_addr}"] = ctx.recipient
            v["{rcpt_host}"] = ctx.recipient.rpartition("@")[2] if "@" in ctx.recipient else ""
            v["{rcpt_mailer}"] = "smtp"
        return v

    async def _macros(self, cmd: bytes, ctx: StageContext) -> None:
        assert self.neg is not None
        names: Iterable[str] = self.neg.macros.get(cmd, DEFAULT_MACROS.get(cmd, ()))
        values = self._macro_values(ctx)
        data = b"".join(_z(n) + _z(values[n]) for n in names if values.get(n))
        if data:
            # mfdef.h SMFIC_MACRO: the command the macros belong to, then name\0value\0 pairs; no reply
            await self._send(SMFIC_MACRO, cmd + data)

    # --- one command, one reply -----------------------------------------------------------------------
    async def _ask(self, cmd: bytes, data: bytes, no_reply_flag: int, timeout: float,
                   stage: Stage, mods: list[tuple[bytes, bytes]] | None = None) -> tuple[bytes, bytes]:
        """Send a command and wait for its final reply (skipping SMFIR_PROGRESS); with ``mods`` (end of
        message) collect modification packets until then. Returns (reply command, data); CONTINUE if the
        milter negotiated not to answer this command (SMFIP_NR_*)."""
        assert self.neg is not None
        await self._send(cmd, data)
        if self.neg.protocol & no_reply_flag:
            return SMFIR_CONTINUE, b""
        while True:
            rc, rd = await self._read(timeout)
            if rc == SMFIR_PROGRESS:
                continue         # mfdef.h: "still working", the timeout starts again
            if rc in (SMFIR_ADDRCPT, SMFIR_DELRCPT, SMFIR_ADDRCPT_PAR, SMFIR_REPLBODY, SMFIR_CHGFROM,
                      SMFIR_ADDHEADER, SMFIR_INSHEADER, SMFIR_CHGHEADER, SMFIR_QUARANTINE):
                if mods is None:
                    # milter8.c: modification requests are only allowed at end of message
                    raise MilterError(f"modification {rc!r} at {stage.value}, before end of message")
                mods.append((rc, rd))
                continue
            if rc in (SMFIR_ACCEPT, SMFIR_CONTINUE, SMFIR_REJECT, SMFIR_TEMPFAIL, SMFIR_DISCARD,
                      SMFIR_REPLYCODE, SMFIR_SKIP, SMFIR_CONN_FAIL, SMFIR_SHUTDOWN):
                return rc, rd
            raise MilterError(f"garbage from milter: unknown reply {rc!r} at {stage.value}")

    def _verdict(self, rc: bytes, rd: bytes, stage: Stage) -> Verdict:
        if rc in (SMFIR_CONTINUE, SMFIR_SKIP):
            return CONTINUE
        if rc == SMFIR_ACCEPT:
            return Verdict(Action.ACCEPT, reason="milter accept")
        if rc == SMFIR_REJECT:
            return Verdict(Action.REJECT, default_reply(Action.REJECT, stage), reason="milter reject")
        if rc == SMFIR_TEMPFAIL:
            return Verdict(Action.TEMPFAIL, default_reply(Action.TEMPFAIL, stage), reason="milter tempfail")
        if rc == SMFIR_DISCARD:
            return Verdict(Action.DISCARD, reason="milter discard")
        if rc == SMFIR_REPLYCODE:
            text = _strings(rd)
            reply = parse_replycode(text[0] if text else "")
            return Verdict(Action.TEMPFAIL if reply.transient else Action.REJECT, reply,
                           reason=f"milter reply {reply.code}")
        if rc == SMFIR_CONN_FAIL:
            return Verdict(Action.TEMPFAIL, Reply(421, "4.7.0", "Service unavailable - try again later"),
                           reason="milter connection failure")
        raise MilterError("milter is shutting down (SMFIR_SHUTDOWN)")

    # --- FilterSession --------------------------------------------------------------------------------
    async def on(self, ctx: StageContext) -> Verdict:
        v = await self._on(ctx)
        if v.action is not Action.CONTINUE:
            # one line per verdict, queue id first (Postfix: "milter-reject: END-OF-MESSAGE from …")
            log.info("%s: milter %s: %s at %s from %s%s", ctx.queue_id or "NOQUEUE", self.s.name, v.action.value,
                     ctx.stage.value, ctx.client_address, f": {v.reply}" if v.reply else
                     (f": {v.quarantine_reason}" if v.quarantine_reason else ""))
        return v

    async def _on(self, ctx: StageContext) -> Verdict:
        if self.neg is None and not self.session_done:
            await self.open()
            await self._connect(ctx)
            if ctx.stage is Stage.CONNECT:
                return self._session_verdict
        if self.session_done:
            # libmilter: a verdict at connect or HELO is for the whole session; a reject stays a reject
            v = self._session_verdict
            return v if v.final or (ctx.stage in (Stage.CONNECT, Stage.HELO) and v.action is Action.ACCEPT) \
                else CONTINUE
        assert self.neg is not None
        p = self.neg.protocol
        t = self.s.command_timeout
        if ctx.stage is Stage.CONNECT:
            return CONTINUE
        if ctx.stage is Stage.HELO:
            if p & SMFIP_NOHELO:
                return CONTINUE
            await self._macros(SMFIC_HELO, ctx)
            rc, rd = await self._ask(SMFIC_HELO, _z(ctx.helo), SMFIP_NR_HELO, t, ctx.stage)
            v = self._verdict(rc, rd, ctx.stage)
            if v.action in (Action.ACCEPT, Action.REJECT, Action.TEMPFAIL):
                self.session_done = True    # accept/reject at HELO: the milter is done with this session
                self._session_verdict = v
            return v
        if ctx.stage is Stage.MAIL:
            if self.in_transaction:
                await self.reset()
            self.in_transaction = True
            if p & SMFIP_NOMAIL:
                return CONTINUE
            await self._macros(SMFIC_MAIL, ctx)
            args = [f"<{ctx.sender or ''}>", *(f"{k}={v}" if v else k for k, v in ctx.mail_params.items())]
            rc, rd = await self._ask(SMFIC_MAIL, b"".join(_z(a) for a in args), SMFIP_NR_MAIL, t, ctx.stage)
            return self._verdict(rc, rd, ctx.stage)
        if ctx.stage is Stage.RCPT:
            if p & SMFIP_NORCPT:
                return CONTINUE
            await self._macros(SMFIC_RCPT, ctx)
            args = [f"<{ctx.recipient or ''}>",
                    *(f"{k}={v}" if v else k for k, v in ctx.rcpt_params.items())]
            rc, rd = await self._ask(SMFIC_RCPT, b"".join(_z(a) for a in args), SMFIP_NR_RCPT, t, ctx.stage)
            return self._verdict(rc, rd, ctx.stage)
        return await self._message(ctx)

    _session_verdict: Verdict = CONTINUE

    async def _connect(self, ctx: StageContext) -> None:
        assert self.neg is not None
        if self.neg.protocol & SMFIP_NOCONNECT:
            return
        await self._macros(SMFIC_CONNECT, ctx)
        name = ctx.client_name if ctx.client_name and ctx.client_name != "unknown" else \
            f"[{ctx.client_address}]"
        # mfdef.h SMFIC_CONNECT: hostname\0, family ('4', '6', 'L' unix, 'U' unknown), port, address\0
        try:
            ip = ipaddress.ip_address(ctx.client_address)
            data = _z(name) + (b"4" if ip.version == 4 else b"6") + struct.pack("!H", ctx.client_port) + \
                _z(ctx.client_address)
        except ValueError:
            data = _z(name) + b"U"
        rc, rd = await self._ask(SMFIC_CONNECT, data, SMFIP_NR_CONN, self.s.command_timeout, Stage.CONNECT)
        v = self._verdict(rc, rd, Stage.CONNECT)
        if v.action is not Action.CONTINUE:
            # libmilter: accept or reject at connect ends the milter's part in the whole session
            self.session_done = True
        self._session_verdict = v

    async def _message(self, ctx: StageContext) -> Verdict:
        """DATA, header fields, end of header, body chunks, end of message; then the modifications."""
        assert self.neg is not None
        p = self.neg.protocol
        t = self.s.content_timeout
        stage = Stage.DATA
        self.in_transaction = True
        if not p & SMFIP_NODATA:
            await self._macros(SMFIC_DATA, ctx)
            rc, rd = await self._ask(SMFIC_DATA, b"", SMFIP_NR_DATA, t, stage)
            if rc not in (SMFIR_CONTINUE,):
                return self._end(self._verdict(rc, rd, stage))
        headers, body = ctx.split()
        if not p & SMFIP_NOHDRS:
            for hname, hvalue in headers:
                value = hvalue.replace("\r\n", "\n")
                if not p & SMFIP_HDR_LEADSPC:
                    value = value.lstrip(" \t")   # milter8.c: without HDR_LEADSPC the leading space goes
                rc, rd = await self._ask(SMFIC_HEADER, _z(hname) + _z(value), SMFIP_NR_HDR, t, stage)
                if rc not in (SMFIR_CONTINUE,):
                    return self._end(self._verdict(rc, rd, stage))
        if not p & SMFIP_NOEOH:
            await self._macros(SMFIC_EOH, ctx)
            rc, rd = await self._ask(SMFIC_EOH, b"", SMFIP_NR_EOH, t, stage)
            if rc not in (SMFIR_CONTINUE,):
                return self._end(self._verdict(rc, rd, stage))
        if not p & SMFIP_NOBODY:
            for off in range(0, len(body), CHUNK):
                rc, rd = await self._ask(SMFIC_BODY, body[off:off + CHUNK], SMFIP_NR_BODY, t, stage)
                if rc == SMFIR_SKIP:
                    break        # SMFIP_SKIP: the milter has seen enough of the body
                if rc != SMFIR_CONTINUE:
                    return self._end(self._verdict(rc, rd, stage))
        await self._macros(SMFIC_BODYEOB, ctx)
        mods: list[tuple[bytes, bytes]] = []
        rc, rd = await self._ask(SMFIC_BODYEOB, b"", 0, t, stage, mods)
        self.in_transaction = False     # libmilter resets its message state after end of message
        return self._apply_mods(self._verdict(rc, rd, stage), mods)

    def _end(self, v: Verdict) -> Verdict:
        # A final reply before the end of message leaves the transaction open: reset() sends SMFIC_ABORT.
        return v

    def _apply_mods(self, v: Verdict, mods: list[tuple[bytes, bytes]]) -> Verdict:
        assert self.neg is not None
        a = self.neg.actions
        headers: list[HeaderEdit] = []
        add_rcpt: list[str] = []
        del_rcpt: list[str] = []
        new_sender: str | None = None
        body: bytearray | None = None
        quarantine = ""
        for cmd, data in mods:
            if cmd == SMFIR_REPLBODY:
                if not a & SMFIF_CHGBODY:
                    raise MilterError("body replacement without SMFIF_CHGBODY")
                body = (body or bytearray()) + data     # smfi_replacebody: several packets, concatenated
                continue
            if cmd in (SMFIR_CHGHEADER, SMFIR_INSHEADER):
                if len(data) < 4:
                    raise MilterError(f"garbage from milter: short {cmd!r}")
                (index,) = struct.unpack("!I", data[:4])
                s = _strings(data[4:]) + ["", ""]
                if cmd == SMFIR_INSHEADER:
                    if not a & SMFIF_ADDHDRS:
                        raise MilterError("header insert without SMFIF_ADDHDRS")
                    headers.append(HeaderEdit(HeaderOp.INSERT, s[0], _crlf(s[1]), index))
                else:
                    if not a & SMFIF_CHGHDRS:
                        raise MilterError("header change without SMFIF_CHGHDRS")
                    # smfi_chgheader: index 1-based per name (0 treated as 1); an empty value deletes
                    headers.append(HeaderEdit(HeaderOp.CHANGE if s[1] else HeaderOp.DELETE, s[0],
                                              _crlf(s[1]), max(index, 1)))
                continue
            s = _strings(data) + ["", ""]
            if cmd == SMFIR_ADDHEADER:
                if not a & SMFIF_ADDHDRS:
                    raise MilterError("header add without SMFIF_ADDHDRS")
                headers.append(HeaderEdit(HeaderOp.ADD, s[0], _crlf(s[1])))
            elif cmd in (SMFIR_ADDRCPT, SMFIR_ADDRCPT_PAR):
                if not a & (SMFIF_ADDRCPT | SMFIF_ADDRCPT_PAR):
                    raise MilterError("recipient add without SMFIF_ADDRCPT")
                add_rcpt.append(_bare(s[0]))
            elif cmd == SMFIR_DELRCPT:
                if not a & SMFIF_DELRCPT:
                    raise MilterError("recipient delete without SMFIF_DELRCPT")
                del_rcpt.append(_bare(s[0]))
            elif cmd == SMFIR_CHGFROM:
                if not a & SMFIF_CHGFROM:
                    raise MilterError("sender change without SMFIF_CHGFROM")
                new_sender = _bare(s[0])
            elif cmd == SMFIR_QUARANTINE:
                quarantine = s[0] or "quarantined by milter"
        if any(h.name == "" or ":" in h.name for h in headers):
            raise MilterError("garbage from milter: a header edit without a valid field name")
        action = v.action
        if quarantine and action in (Action.CONTINUE, Action.ACCEPT):
            action = Action.HOLD     # smfi_quarantine: the message goes to the hold queue
        return Verdict(action, v.reply, v.reason if not quarantine else f"milter quarantine: {quarantine}",
                       headers=tuple(headers), add_recipients=tuple(add_rcpt),
                       remove_recipients=tuple(del_rcpt), new_sender=new_sender,
                       new_body=bytes(body) if body is not None else None, quarantine_reason=quarantine)

    async def reset(self) -> None:
        """End of a transaction: SMFIC_ABORT if a message was begun and not finished (mfdef.h: no reply)."""
        if self.in_transaction and self.writer is not None and not self.session_done:
            await self._send(SMFIC_ABORT)
        self.in_transaction = False

    async def close(self) -> None:
        if self.writer is None:
            return
        w, self.writer, self.reader = self.writer, None, None
        try:
            w.write(struct.pack("!I", 1) + SMFIC_QUIT)
            await asyncio.wait_for(w.drain(), 2.0)
        except (OSError, TimeoutError):
            pass
        w.close()
        try:
            await asyncio.wait_for(w.wait_closed(), 2.0)
        except (OSError, TimeoutError):
            pass
