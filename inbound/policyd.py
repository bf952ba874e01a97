"""Postfix policy delegation client (``check_policy_service``), as a stage-hook filter.

Postfix's SMTPD_POLICY_README defines a tiny protocol that many tools speak (postgrey,
postfix-policyd-spf-python, policyd-rate-limit, …): the MTA sends one request as ``name=value`` lines
ending with an empty line, over TCP or a UNIX socket, and the policy server answers one ``action=…`` line
and an empty line. The connection stays open for the next request. The request carries what the smtpd knows
at that stage (``protocol_state`` = CONNECT, EHLO, MAIL, RCPT, DATA, END-OF-MESSAGE); the action is anything an
access(5) table may return: ``OK``, ``DUNNO``, ``REJECT text``, ``DEFER text``, ``DEFER_IF_PERMIT``,
``DEFER_IF_REJECT``, ``4NN text``/``5NN text``, ``PREPEND header: value``, ``HOLD``, ``DISCARD``,
``FILTER transport:destination``, ``REDIRECT address``, ``BCC address``, ``WARN text``, ``INFO text``.

How the actions become :class:`~postgate.inbound.filters.Verdict`\\ s (the chain has no restriction *lists*,
so the two conditional actions are resolved here, conservatively):

- ``OK`` and ``DUNNO``: no objection (the next filters are still asked, as after a Postfix ``OK`` the next
  restriction *list* is).
- ``DEFER_IF_PERMIT``: 450 (the chain would otherwise go on to accept; postgrey answers this way).
- ``DEFER_IF_REJECT``: no objection, logged (a reject later in the chain stays a reject).
- ``REJECT``: 554 5.7.1, ``DEFER``: 450 4.7.1 (Postfix's ``access_map_reject_code``/``defer_code``).

Connections are pooled per policy service, like Postfix's ``smtpd_policy_service_max_idle``, ``max_ttl``
and ``request_limit``; each request has ``smtpd_policy_service_timeout`` and is tried
``smtpd_policy_service_try_limit`` times; when the service cannot be asked, the request gets
``smtpd_policy_service_default_action`` (by default ``451 4.3.5 Server configuration problem``) and a log
line — per request, so a service that comes back is used again at once.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field

from postgate.inbound.filters import CONTINUE, Action, HeaderEdit, HeaderOp, Route, Stage, StageContext, Verdict
from postgate.inbound.milter import parse_address
from postgate.policy.vocab import Reply

log = logging.getLogger("postgate.policyd")

# SMTPD_POLICY_README "Protocol description": protocol_state for each stage
STATE = {Stage.CONNECT: "CONNECT", Stage.HELO: "EHLO", Stage.MAIL: "MAIL", Stage.RCPT: "RCPT",
         Stage.DATA: "END-OF-MESSAGE"}
STAGE_NAMES = {s.value: s for s in Stage}
MAX_LINE = 8192        # a reply line longer than this is garbage (Postfix: line_length_limit 2048 per attr)


class PolicyError(Exception):
    pass


@dataclass(frozen=True)
class PolicySettings:
    name: str
    address: str                          # inet:HOST:PORT or unix:/path
    stages: tuple[Stage, ...] = (Stage.RCPT,)
    timeout: float = 100.0                # smtpd_policy_service_timeout
    max_idle: float = 300.0               # smtpd_policy_service_max_idle
    max_ttl: float = 1000.0               # smtpd_policy_service_max_ttl
    request_limit: int = 0                # smtpd_policy_service_request_limit (0: no limit)
    try_limit: int = 2                    # smtpd_policy_service_try_limit
    retry_delay: float = 1.0              # smtpd_policy_service_retry_delay
    default_action: str = "451 4.3.5 Server configuration problem"  # smtpd_policy_service_default_action
    policy_context: str = ""              # smtpd_policy_service_policy_context


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    born: float
    used: float
    requests: int = 0


def parse_action(text: str, ctx: StageContext | None = None) -> Verdict:
    """One access(5) action → a Verdict. Unknown actions are a configuration problem (Postfix: 451 4.3.5)."""
    t = text.strip()
    word, _, rest = t.partition(" ")
    rest = rest.strip()
    w = word.upper()
    if w in ("OK", "DUNNO", "PERMIT") or (w.isdigit() and w.startswith("2")):
        return Verdict(reason=f"policy {w}")
    if len(w) == 3 and w.isdigit() and w[0] in "45":
        # access(5) "4NN text", "5NN text"; RFC 3463 enhanced code optional at the start of the text
        code = int(w)
        enh, _, after = rest.partition(" ")
        if enh.count(".") == 2 and enh[:1] == w[0] and all(p.isdigit() for p in enh.split(".")):
            reply = Reply(code, enh, after or ("Access denied" if code >= 500 else "Try again later"))
        else:
            reply = Reply(code, "5.7.1" if code >= 500 else "4.7.1", rest or "Access denied")
        return Verdict(Action.REJECT if code >= 500 else Action.TEMPFAIL, reply, reason=f"policy {t[:200]}")
    if w in ("REJECT", "DEFER", "DEFER_IF_PERMIT"):
        # access(5): REJECT → access_map_reject_code 554, DEFER/DEFER_IF_PERMIT → 450 4.7.1
        enh, _, after = rest.partition(" ")
        has_enh = enh.count(".") == 2 and all(p.isdigit() for p in enh.split("."))
        if w == "REJECT":
            reply = Reply(554, enh if has_enh and enh[0] == "5" else "5.7.1",
                          (after if has_enh and enh[0] == "5" else rest) or "Access denied")
            return Verdict(Action.REJECT, reply, reason=f"policy {t[:200]}")
        reply = Reply(450, enh if has_enh and enh[0] == "4" else "4.7.1",
                      (after if has_enh and enh[0] == "4" else rest) or "Try again later")
        return Verdict(Action.TEMPFAIL, reply, reason=f"policy {t[:200]}")
    if w == "DEFER_IF_REJECT":
        log.info("policy DEFER_IF_REJECT %s: no later reject to defer", rest)
        return Verdict(reason=f"policy {t[:200]}")
    if w == "PREPEND":
        # access(5) PREPEND headername: headervalue — prepended to the message header
        name, colon, value = rest.partition(":")
        if not colon or not name.strip() or " " in name.strip():
            raise PolicyError(f"PREPEND without a header field: {rest[:80]!r}")
        return Verdict(headers=(HeaderEdit(HeaderOp.INSERT, name.strip(), value.strip(), 0),),
                       reason=f"policy PREPEND {name.strip()}")
    if w == "HOLD":
        return Verdict(Action.HOLD, reason=f"policy HOLD {rest}".strip(), quarantine_reason=rest or "policy HOLD")
    if w == "DISCARD":
        return Verdict(Action.DISCARD, reason=f"policy DISCARD {rest}".strip())
    if w == "FILTER":
        if ":" not in rest:
            raise PolicyError(f"FILTER needs transport:destination, got {rest[:80]!r}")
        return Verdict(routes=(Route(transport=rest),), reason=f"policy FILTER {rest}")
    if w in ("REDIRECT", "BCC"):
        if "@" not in rest:
            raise PolicyError(f"{w} needs an address, got {rest[:80]!r}")
        drop: tuple[str, ...] = ()
        if w == "REDIRECT" and ctx is not None:
            # access(5) REDIRECT: the message goes to this address instead of the intended recipients
            drop = tuple([*ctx.recipients, *([ctx.recipient] if ctx.recipient else [])])
        return Verdict(add_recipients=(rest,), remove_recipients=drop, reason=f"policy {w} {rest}")
    if w in ("WARN", "INFO"):
        (log.warning if w == "WARN" else log.info)("policy %s: %s", w, rest)
        return Verdict(reason=f"policy {w} {rest}")
    raise PolicyError(f"unknown action {t[:80]!r}")


class PolicyService:
    """One configured policy service: a pool of connections shared by the SMTP sessions of a process."""

    def __init__(self, settings: PolicySettings) -> None:
        parse_address(settings.address)
        parse_action(settings.default_action)
        self.settings = settings
        self.name = settings.name
        # For the FilterChain: failures are answered here with the service's default action per request;
        # this only covers a bug in this module.
        self.default_action = Action.TEMPFAIL
        self.idle: list[_Conn] = []
        self.loop: asyncio.AbstractEventLoop | None = None    # the pool belongs to one event loop
        self.counter = 0

    def session(self) -> PolicySession:
        return PolicySession(self)

    async def _connect(self) -> _Conn:
        kind, host, port = parse_address(self.settings.address)
        t = self.settings.timeout
        try:
            if kind == "unix":
                r, w = await asyncio.wait_for(asyncio.open_unix_connection(host, limit=MAX_LINE * 2), t)
            else:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port, limit=MAX_LINE * 2), t)
        except TimeoutError:
            raise PolicyError(f"connect to {self.settings.address}: timed out") from None
        except OSError as e:
            raise PolicyError(f"connect to {self.settings.address}: {e.strerror or e}") from None
        now = time.monotonic()
        return _Conn(r, w, now, now)

    def _take(self) -> _Conn | None:
        s = self.settings
        now = time.monotonic()
        loop = asyncio.get_running_loop()
        if self.loop is not loop:
            self.idle.clear()    # streams of another (finished) event loop cannot be used here
            self.loop = loop
        while self.idle:
            c = self.idle.pop()
            # smtpd_policy_service_max_idle / max_ttl: an old connection is closed, not reused
            if now - c.used > s.max_idle or now - c.born > s.max_ttl or c.reader.at_eof():
                c.writer.close()
                continue
            return c
        return None

    def _give(self, c: _Conn) -> None:
        s = self.settings
        c.used = time.monotonic()
        if (s.request_limit and c.requests >= s.request_limit) or c.used - c.born > s.max_ttl:
            c.writer.close()
            return
        self.idle.append(c)

    async def query(self, attrs: dict[str, str]) -> str:
        """One request (SMTPD_POLICY_README: name=value lines, an empty line), its action's text."""
        s = self.settings
        data = "".join(f"{k}={v.replace(chr(10), ' ').replace(chr(13), ' ')}\n" for k, v in attrs.items())
        payload = (data + "\n").encode("utf-8", "surrogateescape")
        last: Exception = PolicyError("not tried")
        for attempt in range(max(1, s.try_limit)):
            if attempt:
                await asyncio.sleep(s.retry_delay)   # smtpd_policy_service_retry_delay
            c = self._take()
            try:
                if c is None:
                    c = await self._connect()
                c.writer.write(payload)
                await asyncio.wait_for(c.writer.drain(), s.timeout)
                action = None
                while True:
                    line = await asyncio.wait_for(c.reader.readline(), s.timeout)
                    if not line:
                        raise PolicyError("connection closed by the policy service")
                    if not line.endswith(b"\n"):
                        raise PolicyError("garbage: reply line too long or cut")
                    text = line.decode("utf-8", "replace").rstrip("\r\n")
                    if text == "":
                        break
                    k, eq, v = text.partition("=")
                    if not eq:
                        raise PolicyError(f"garbage: {text[:80]!r} is not name=value")
                    if k.strip().lower() == "action":
                        action = v.strip()
                if action is None:
                    raise PolicyError("reply without an action")
                c.requests += 1
                self._give(c)
                return action
            except (PolicyError, OSError, TimeoutError, ValueError, asyncio.LimitOverrunError) as e:
                if c is not None:
                    c.writer.close()
                if isinstance(e, TimeoutError):
                    e = PolicyError(f"no reply within {s.timeout:g}s")
                last = e
        raise last

    async def probe(self) -> None:
        c = await self._connect()
        c.writer.close()

    def close_idle(self) -> None:
        for c in self.idle:
            c.writer.close()
        self.idle.clear()


@dataclass
class PolicySession:
    service: PolicyService
    instance: str = ""
    counter: int = field(default=0)

    def attributes(self, ctx: StageContext) -> dict[str, str]:
        """SMTPD_POLICY_README "Protocol description": every attribute Postfix 3.x sends."""
        s = self.service.settings
        if not self.instance:
            self.service.counter += 1
            # Postfix: a value unique per message (the same for all its RCPT requests)
            self.instance = f"{os.getpid():x}.{int(time.time()):x}.{self.service.counter}"
        helo_state = "EHLO" if ctx.esmtp else "HELO"
        state = helo_state if ctx.stage is Stage.HELO else STATE[ctx.stage]
        a = {
            "request": "smtpd_access_policy",
            "protocol_state": state,
            "protocol_name": "ESMTP" if ctx.esmtp else "SMTP",
            "helo_name": ctx.helo,
            "queue_id": ctx.queue_id,
            "sender": ctx.sender or "",
            "recipient": ctx.recipient or "",
            "recipient_count": str(len(ctx.recipients)) if ctx.stage is Stage.DATA else "0",
            "client_address": ctx.client_address,
            "client_name": ctx.client_name,
            "client_port": str(ctx.client_port) if ctx.client_port else "",
            "reverse_client_name": ctx.reverse_client_name,
            "server_address": ctx.local_address,
            "server_port": str(ctx.local_port) if ctx.local_port else "",
            "instance": self.instance,
            "sasl_method": ctx.auth_method or "",
            "sasl_username": ctx.auth_user or "",
            "sasl_sender": "",
            "size": str(ctx.size or ctx.mail_params.get("SIZE", "0") if ctx.stage is not Stage.DATA
                        else len(ctx.message or b"")),
            "ccert_subject": ctx.client_cert_subject or "",
            "ccert_issuer": ctx.client_cert_issuer or "",
            "ccert_fingerprint": ctx.client_cert_fingerprint or "",
            "ccert_pubkey_fingerprint": "",
            "encryption_protocol": ctx.tls_version or "",
            "encryption_cipher": ctx.tls_cipher or "",
            "encryption_keysize": str(ctx.tls_bits) if ctx.tls_bits else "0",
            "etrn_domain": "",
            "stress": "",
            "policy_context": s.policy_context,
            "compatibility_level": "3.6",
            "mail_version": "postgate",
        }
        return a

    async def on(self, ctx: StageContext) -> Verdict:
        s = self.service.settings
        if ctx.stage not in s.stages:
            return CONTINUE
        try:
            text = await self.service.query(self.attributes(ctx))
            v = parse_action(text, ctx)
        except PolicyError as e:
            v = parse_action(s.default_action)
            log.warning("%s: policy service %s (%s) failed at %s from %s: %s; default action %s",
                        ctx.queue_id or "NOQUEUE", s.name, s.address, ctx.stage.value, ctx.client_address, e,
                        s.default_action)
            return Verdict(v.action, v.reply, reason=f"policy service {s.name} failed: {e}")
        if v.action is not Action.CONTINUE or v.headers:
            log.info("%s: policy %s at %s from %s: %s", ctx.queue_id or "NOQUEUE", s.name, ctx.stage.value,
                     ctx.client_address, text[:200])
        return v

    async def reset(self) -> None:
        self.instance = ""

    async def close(self) -> None:
        self.instance = ""
