"""Stage hooks: filters that judge an SMTP session at each stage, before the server answers.

A receiving MTA answers at five points of a session (RFC 5321 §3): the greeting after the **connect**, the
reply to **HELO/EHLO**, to **MAIL**, to each **RCPT** and, after the end of **DATA**, to the message. At each
one a chain of filters may have an opinion: relay control, Milter (the Sendmail/Postfix milter protocol),
Postfix policy delegation and Sieve all plug in here, in the order the listener's configuration lists them.

A filter is a factory of per-session state (a milter keeps one connection per SMTP session):
:meth:`Filter.session` is called at connect; the :class:`FilterSession` sees each stage through
:meth:`FilterSession.on` and returns a :class:`Verdict`; :meth:`FilterSession.reset` ends a transaction
(RSET, or the end of a message) and :meth:`FilterSession.close` the session.

How verdicts compose (:class:`FilterChain`), like Postfix's smtpd restrictions and milters:

- ``CONTINUE``: no opinion; the next filter is asked.
- ``ACCEPT``: this filter accepts; the next filters are still asked (one filter's accept is no excuse for
  another's reject), but this filter is not asked again for this transaction (milter ``SMFIR_ACCEPT``).
- ``REJECT`` / ``TEMPFAIL``: the stage is refused with the verdict's reply (a default 5xx/4xx if none); the
  chain stops there. At RCPT only that recipient is refused.
- ``DISCARD``: the message is accepted (250) and silently dropped, with a log line; the chain stops.
- ``HOLD``: the message is accepted into the hold queue (milter quarantine, access(5) ``HOLD``); the other
  filters are still asked.
- Modifications (headers, recipients, sender, body) and routing choices accumulate over the chain in its
  order; they take effect only if the message is accepted.

A filter that fails (timeout, crash, garbage) is not a verdict: the chain applies that filter's
``default_action`` and logs why, as Postfix's ``milter_default_action`` does: ``accept`` goes on as if the
filter were not there, ``tempfail``/``reject`` refuse this and every further stage of the session.

Pure data and composition only: the I/O of each filter lives in its own module.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from postgate.policy import metrics
from postgate.policy.vocab import Reply

log = logging.getLogger("postgate.filters")


class Stage(enum.Enum):
    """RFC 5321 §3: the points of a session at which the server answers."""

    CONNECT = "connect"
    HELO = "helo"
    MAIL = "mail"
    RCPT = "rcpt"
    DATA = "data"     # after the end of data: the whole message, headers and body


class Action(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    REJECT = "reject"
    TEMPFAIL = "tempfail"
    DISCARD = "discard"
    HOLD = "hold"


class HeaderOp(enum.Enum):
    ADD = "add"          # append at the end of the header (milter SMFIR_ADDHEADER)
    INSERT = "insert"    # insert at position ``index`` (0 = first; milter SMFIR_INSHEADER)
    CHANGE = "change"    # replace the ``index``-th (1-based) occurrence of ``name`` (SMFIR_CHGHEADER)
    DELETE = "delete"    # delete the ``index``-th (1-based) occurrence of ``name`` (CHGHEADER, empty value)


@dataclass(frozen=True)
class HeaderEdit:
    op: HeaderOp
    name: str
    value: str = ""
    index: int = 1


@dataclass(frozen=True)
class Route:
    """Delivery choices a filter (Sieve's ``vnd.postgate``) may make for the message or some recipients.

    ``None`` leaves the configured behaviour. ``tls_level`` is a Postfix/Postgate TLS level name
    (``policy.tls.Level`` values); ``transport`` a transport-map next hop (``smtp:[relay.example]:587``).
    """

    recipients: tuple[str, ...] = ()       # empty: every recipient of the message
    tls_level: str | None = None
    transport: str | None = None
    dkim_domain: str | None = None
    dkim_selector: str | None = None
    priority: int | None = None
    lifetime: float | None = None          # seconds in the queue before a bounce


@dataclass(frozen=True)
class Verdict:
    action: Action = Action.CONTINUE
    reply: Reply | None = None
    reason: str = ""                                  # for the log line
    filter: str = ""                                  # which filter said it (set by the chain)
    headers: tuple[HeaderEdit, ...] = ()
    add_recipients: tuple[str, ...] = ()
    remove_recipients: tuple[str, ...] = ()
    new_sender: str | None = None
    new_body: bytes | None = None                     # replaces the body (after the header's empty line)
    routes: tuple[Route, ...] = ()
    quarantine_reason: str = ""                       # with HOLD

    @property
    def final(self) -> bool:
        """Stops the chain for this stage."""
        return self.action in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD)


CONTINUE = Verdict()


def default_reply(action: Action, stage: Stage) -> Reply:
    """The reply for a REJECT or TEMPFAIL that brought none (Postfix's defaults)."""
    if action is Action.TEMPFAIL:
        return Reply(451, "4.7.1", "Service unavailable - try again later")
    return Reply(550, "5.7.1", "Command rejected" if stage is not Stage.DATA else "Message content rejected")


@dataclass
class StageContext:
    """What a filter may look at. The smtpd fills what the stage has; later stages keep the earlier data."""

    stage: Stage
    listener: str                                     # mx, submission, …
    client_address: str
    client_port: int = 0
    client_name: str = "unknown"                      # verified reverse name (Postfix client_name)
    reverse_client_name: str = "unknown"              # PTR name, not forward-confirmed
    local_address: str = ""
    local_port: int = 0
    hostname: str = ""                                # our own name (milter macro j)
    helo: str = ""
    esmtp: bool = False
    tls_version: str | None = None
    tls_cipher: str | None = None
    tls_bits: int | None = None
    client_cert_subject: str | None = None
    client_cert_issuer: str | None = None
    client_cert_fingerprint: str | None = None
    auth_user: str | None = None
    auth_method: str | None = None
    queue_id: str = ""
    sender: str | None = None
    mail_params: dict[str, str] = field(default_factory=dict)
    recipients: list[str] = field(default_factory=list)       # accepted so far
    recipient: str | None = None                              # the one being judged at RCPT
    rcpt_params: dict[str, str] = field(default_factory=dict)
    message: bytes | None = None                              # DATA: the whole message, CRLF line ends
    size: int = 0

    def split(self) -> tuple[list[tuple[str, str]], bytes]:
        """The message's header fields as (name, raw value without the colon, unfolded lines kept with
        their CRLF between them) and the body after the empty line (RFC 5322 §2.1)."""
        return split_message(self.message or b"")


def split_message(msg: bytes) -> tuple[list[tuple[str, str]], bytes]:
    """RFC 5322 §2.1-§2.2: header fields up to the first empty line, then the body.

    A line starting with white space continues the previous field (folding, §2.2.3). A line without a
    colon ends the header (it is treated as the start of the body, as Postfix does)."""
    headers: list[tuple[str, str]] = []
    pos = 0
    n = len(msg)
    while pos < n:
        end = msg.find(b"\r\n", pos)
        line_end = n if end < 0 else end
        line = msg[pos:line_end]
        nxt = n if end < 0 else end + 2
        if not line:
            return headers, msg[nxt:]
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + "\r\n" + line.decode("utf-8", "surrogateescape"))
        else:
            colon = line.find(b":")
            if colon <= 0:
                return headers, msg[pos:]
            headers.append((line[:colon].decode("ascii", "replace").strip(),
                            line[colon + 1:].decode("utf-8", "surrogateescape")))
        pos = nxt
    return headers, b""


def join_message(headers: Sequence[tuple[str, str]], body: bytes) -> bytes:
    out = b"".join(f"{name}:{value}\r\n".encode("utf-8", "surrogateescape") for name, value in headers)
    return out + b"\r\n" + body


def apply_header_edits(msg: bytes, edits: Sequence[HeaderEdit], new_body: bytes | None = None) -> bytes:
    """Apply a verdict's header edits (milter semantics, Sendmail's libmilter documentation: smfi_addheader,
    smfi_insheader, smfi_chgheader) and body replacement to a message."""
    if not edits and new_body is None:
        return msg
    headers, body = split_message(msg)
    for e in edits:
        value = e.value if e.value[:1] in (" ", "\t") or not e.value else " " + e.value
        if e.op is HeaderOp.ADD:
            headers.append((e.name, value))
        elif e.op is HeaderOp.INSERT:
            headers.insert(max(0, min(e.index, len(headers))), (e.name, value))
        else:
            seen = 0
            for i, (name, _) in enumerate(headers):
                if name.lower() == e.name.lower():
                    seen += 1
                    if seen == e.index:
                        if e.op is HeaderOp.DELETE or not e.value:
                            del headers[i]
                        else:
                            headers[i] = (name, value)
                        break
            else:
                # smfi_chgheader: changing an occurrence that does not exist adds the field
                if e.op is HeaderOp.CHANGE and e.value:
                    headers.append((e.name, value))
    return join_message(headers, body if new_body is None else new_body)


class FilterSession(Protocol):
    async def on(self, ctx: StageContext) -> Verdict: ...
    async def reset(self) -> None: ...      # end of a transaction: RSET, a new MAIL, or the end of a message
    async def close(self) -> None: ...      # end of the SMTP session


class Filter(Protocol):
    name: str
    default_action: Action                  # on failure: ACCEPT (= continue), TEMPFAIL or REJECT

    def session(self) -> FilterSession: ...


@dataclass
class Outcome:
    """The chain's combined verdict for one stage."""

    verdict: Verdict
    hold: Verdict | None = None                       # the first HOLD, if any
    edits: list[Verdict] = field(default_factory=list)  # verdicts with modifications, in chain order


class FilterChain:
    """One SMTP session's filters, asked in order at each stage (see the module docstring)."""

    # one per SMTP session, idle ones too (issue 20: 100,000 sessions): no __dict__, and a bit mask for ACCEPT
    __slots__ = ("accepted", "failed", "filters", "sessions")

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = list(filters)
        self.sessions: list[FilterSession | None] = [None] * len(self.filters)
        self.accepted = 0                    # bit i: filter i said ACCEPT in this transaction
        self.failed: dict[int, Verdict] = {}  # filters that failed: their default action, for the session

    async def on(self, ctx: StageContext) -> Outcome:
        out = Outcome(CONTINUE)
        for i, f in enumerate(self.filters):
            if self.accepted >> i & 1:
                continue
            if i in self.failed:
                v = self.failed[i]
                if v.action is Action.CONTINUE:
                    continue
                out.verdict = replace(v, reply=v.reply or default_reply(v.action, ctx.stage))
                return out
            try:
                if self.sessions[i] is None:
                    self.sessions[i] = f.session()
                fs = self.sessions[i]
                assert fs is not None
                v = await fs.on(ctx)
            except Exception as e:
                log.warning("filter %s failed at %s from %s: %s; default action %s", f.name, ctx.stage.value,
                            ctx.client_address, e or type(e).__name__, f.default_action.value)
                v = Verdict(f.default_action if f.default_action is not Action.ACCEPT else Action.CONTINUE,
                            reason=f"filter {f.name} failed: {e or type(e).__name__}")
                self.failed[i] = v
                await self._drop(i)
            metrics.inc("filter_verdicts", filter=f.name, stage=ctx.stage.value, action=v.action.value)
            if v.action is Action.ACCEPT:
                self.accepted |= 1 << i
            edits = bool(v.headers or v.add_recipients or v.remove_recipients or v.new_sender is not None
                         or v.new_body is not None or v.routes)
            if not (edits or v.action is Action.HOLD or v.final):
                continue   # nothing of this verdict is kept: no copy naming its filter (issue 20: every stage)
            v = replace(v, filter=f.name)
            if edits:
                out.edits.append(v)
            if v.action is Action.HOLD and out.hold is None:
                out.hold = v
            if v.final:
                if v.action in (Action.REJECT, Action.TEMPFAIL) and v.reply is None:
                    v = replace(v, reply=default_reply(v.action, ctx.stage))
                out.verdict = v
                return out
        return out

    async def _drop(self, i: int) -> None:
        fs, self.sessions[i] = self.sessions[i], None
        if fs is not None:
            try:
                await fs.close()
            except Exception:
                pass

    async def reset(self) -> None:
        self.accepted = 0
        for i, fs in enumerate(self.sessions):
            if fs is not None:
                try:
                    await fs.reset()
                except Exception as e:
                    log.warning("filter %s failed at reset: %s", self.filters[i].name, e)
                    self.failed[i] = Verdict(self.filters[i].default_action if self.filters[i].default_action
                                             is not Action.ACCEPT else Action.CONTINUE,
                                             reason=f"filter {self.filters[i].name} failed: {e}")
                    await self._drop(i)

    async def close(self) -> None:
        for i, fs in enumerate(self.sessions):
            if fs is not None:
                try:
                    await fs.close()
                except Exception as e:
                    log.warning("filter %s failed at close: %s", self.filters[i].name, e)
        self.sessions = [None] * len(self.filters)
