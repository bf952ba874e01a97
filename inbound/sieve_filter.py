"""Sieve at the SMTP stages: scripts' actions become stage-hook verdicts (``inbound/filters.py``).

Postgate runs a *global* script and then the *listener's* script (``[sieve]`` in docs/configuration.md) at
connect, ehlo, mail, rcpt and data. Each run sees what the stage has: the session (``environment``,
RFC 5183), the envelope (``envelope``, RFC 5228 §5.4: at rcpt the recipient being judged; at data the
script runs once per recipient and the results are combined, :func:`combine`) and at data the message.
Tests on data a stage does not have yet are *unknown* (three-valued, see the interpreter).
The actions map to one :class:`Verdict` (docs/sieve.md has the table):

- ``reject``/``ereject`` → REJECT in the session, before the 250 (RFC 5429 §2.1: refusing at the protocol
  level is the preferred form for an MTA), 550 5.7.1 (554 at connect) with the script's reason;
- ``defer`` → TEMPFAIL 451 (4.7.1 unless ``:status``), ``hold`` and ``fileinto "hold"`` → HOLD;
- ``discard`` (no keep, fileinto or redirect left) → DISCARD; ``redirect`` → recipients replaced (or added
  with ``:copy``/``keep``); ``fileinto`` another folder → an ``X-Postgate-Fileinto`` field for local delivery;
- ``addheader``/``deleteheader`` → header edits; ``tls_policy``, ``route``, ``dkim_sign``,
  ``queue_priority``, ``queue_lifetime`` → :class:`Route` entries;
- a run-time error or an exceeded limit → the configured default action (tempfail by default), with a log
  line naming the script and the reason.

The global script's final verdict (reject, tempfail, discard) ends the stage; otherwise the listener script
runs too and the two verdicts' modifications add up in that order. :class:`SieveScripts` holds the compiled
scripts; :meth:`SieveScripts.reload` (SIGHUP) recompiles them and keeps the old version of a script that
fails to compile, logging why.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from email.header import Header
from pathlib import Path

from postgate.inbound.filters import (
    Action,
    Filter,
    FilterSession,
    HeaderEdit,
    HeaderOp,
    Route,
    Stage,
    StageContext,
    Verdict,
    apply_header_edits,
)
from postgate.policy.sieve import Input, Kind, Limits, Result, Script, SieveError, compile_file, run
from postgate.policy.sieve.interp import REDIRECT_MARK
from postgate.policy.sieve.lists import MapLists
from postgate.policy.vocab import Reply

log = logging.getLogger("postgate.sieve")

VERSION = "0.1.0"
STAGE_NAMES = {Stage.CONNECT: "connect", Stage.HELO: "ehlo", Stage.MAIL: "mail", Stage.RCPT: "rcpt",
               Stage.DATA: "data"}
HOLD_FOLDERS = {"hold", "quarantine"}


@dataclass
class SieveSettings:
    """What the adapter needs from ``[sieve]`` (postgate/config.py builds it)."""

    script: str = ""
    listener_scripts: dict[str, str] = field(default_factory=dict)
    stages: tuple[str, ...] = ("connect", "ehlo", "mail", "rcpt", "data")
    default_action: Action = Action.TEMPFAIL
    limits: Limits = field(default_factory=Limits)
    lists: dict[str, str] = field(default_factory=dict)
    spam_header: str = "X-Spam-Score"
    spam_max: float = 15.0
    virus_header: str = "X-Virus-Status"
    hostname: str = ""
    domain: str = ""


class SieveScripts:
    """The compiled scripts, reloadable: the daemon keeps one and calls :meth:`reload` on SIGHUP."""

    def __init__(self, settings: SieveSettings) -> None:
        self.settings = settings
        self.scripts: dict[str, Script] = {}          # "" is the global script, else a listener name
        self.lists = MapLists(settings.lists) if settings.lists else None
        for key, path in self._paths().items():
            self.scripts[key] = compile_file(path)     # at start, a bad script is fatal (SieveError)

    def _paths(self) -> dict[str, str]:
        paths = {"": self.settings.script} if self.settings.script else {}
        paths.update(self.settings.listener_scripts)
        return paths

    def reload(self) -> list[str]:
        """Recompile every script; one that fails keeps its previous version. Returns the errors."""
        errors: list[str] = []
        for key, path in self._paths().items():
            try:
                self.scripts[key] = compile_file(path)
            except SieveError as e:
                errors.append(str(e))
                log.error("sieve: %s; keeping the previous version of %s", e, path)
        if self.lists is not None:
            for problem in self.lists.reload():
                errors.append(problem)
                log.error("sieve: list %s; keeping the previous version", problem)
        if not errors:
            log.info("sieve: scripts reloaded")
        return errors

    def for_listener(self, listener: str) -> list[tuple[str, Script]]:
        out = []
        if "" in self.scripts:
            out.append((self.settings.script, self.scripts[""]))
        if listener in self.scripts:
            out.append((self.settings.listener_scripts[listener], self.scripts[listener]))
        return out


class SieveFilter:
    """The stage-hook filter (``Filter`` protocol of inbound/filters.py)."""

    name = "sieve"

    def __init__(self, scripts: SieveScripts) -> None:
        self.scripts = scripts
        self.default_action = scripts.settings.default_action

    def session(self) -> FilterSession:
        return SieveSession(self.scripts)


class SieveSession:
    def __init__(self, scripts: SieveScripts) -> None:
        self.scripts = scripts

    async def on(self, ctx: StageContext) -> Verdict:
        if ctx.stage is Stage.DATA:
            # the message is parsed and searched: off the event loop, so other sessions go on meanwhile
            return await asyncio.to_thread(evaluate, self.scripts, ctx)
        return evaluate(self.scripts, ctx)

    async def reset(self) -> None:
        return None

    async def close(self) -> None:
        return None


class PassEdits:
    """A filter whose header and body edits the filters after it see (the daemon wraps the policy services
    and milters in front of Sieve with it): at DATA the verdict's edits are applied to ``ctx.message``, so a
    script's ``spamtest`` reads the score rspamd's milter has just added (RFC 5235 §3: the score comes from
    the filter that tested the message). The smtpd applies every filter's edits to its own copy of the
    message at the end, as before; only the later filters' view changes."""

    def __init__(self, inner: Filter) -> None:
        self.inner = inner
        self.name = inner.name
        self.default_action = inner.default_action

    def session(self) -> FilterSession:
        return _PassEditsSession(self.inner.session())


class _PassEditsSession:
    def __init__(self, inner: FilterSession) -> None:
        self.inner = inner

    async def on(self, ctx: StageContext) -> Verdict:
        v = await self.inner.on(ctx)
        if ctx.stage is Stage.DATA and ctx.message is not None and (v.headers or v.new_body is not None) \
                and v.action not in (Action.REJECT, Action.TEMPFAIL, Action.DISCARD):
            ctx.message = apply_header_edits(ctx.message, v.headers, v.new_body)
            ctx.size = len(ctx.message)
        return v

    async def reset(self) -> None:
        await self.inner.reset()

    async def close(self) -> None:
        await self.inner.close()


def environment(ctx: StageContext, s: SieveSettings) -> dict[str, str]:
    """RFC 5183 §4.1 items, and Postgate's ``vnd.postgate.*`` items (docs/sieve.md)."""
    env = {
        "phase": "pre",                  # §4.1: before final delivery
        "location": "MTA",               # §4.1: evaluated by a message transfer agent
        "name": "Postgate",
        "version": VERSION,
        "host": s.hostname or ctx.hostname,
        "domain": s.domain or (s.hostname or ctx.hostname).partition(".")[2],
        "remote-ip": ctx.client_address,
        "vnd.postgate.stage": STAGE_NAMES[ctx.stage],
        "vnd.postgate.listener": ctx.listener,
        "vnd.postgate.helo": ctx.helo,
        "vnd.postgate.esmtp": "yes" if ctx.esmtp else "no",
        "vnd.postgate.local-ip": ctx.local_address,
        "vnd.postgate.local-port": str(ctx.local_port),
        "vnd.postgate.remote-port": str(ctx.client_port),
        "vnd.postgate.reverse-host": ctx.reverse_client_name,
        "vnd.postgate.queue-id": ctx.queue_id,
        "vnd.postgate.tls": "yes" if ctx.tls_version else "no",
    }
    if ctx.client_name and ctx.client_name != "unknown":
        env["remote-host"] = ctx.client_name      # §4.1: only when known (forward-confirmed)
    optional = {"vnd.postgate.tls.version": ctx.tls_version, "vnd.postgate.tls.cipher": ctx.tls_cipher,
                "vnd.postgate.tls.bits": None if ctx.tls_bits is None else str(ctx.tls_bits),
                "vnd.postgate.tls.cert-subject": ctx.client_cert_subject,
                "vnd.postgate.tls.cert-issuer": ctx.client_cert_issuer,
                "vnd.postgate.tls.cert-fingerprint": ctx.client_cert_fingerprint,
                "vnd.postgate.auth": ctx.auth_user, "vnd.postgate.auth.method": ctx.auth_method}
    env.update({k: v for k, v in optional.items() if v is not None})
    return env


_SCORE = re.compile(r"(-?\d+(?:\.\d+)?)(?:\s*/\s*(\d+(?:\.\d+)?))?")


def _spam(headers: list[tuple[str, str]] | None, s: SieveSettings) -> tuple[float | None, float]:
    """The score of ``spam_header`` (``7.5``, ``7.5 / 15``, rspamd's ``default: False [7.50 / 15.00]``).
    The *last* occurrence counts: a milter appends its field, a sender's forged copy comes before it."""
    for name, value in reversed(headers or []):
        if name.lower() == s.spam_header.lower():
            m = _SCORE.search(value)
            if m:
                return float(m.group(1)), float(m.group(2)) if m.group(2) else s.spam_max
    return None, s.spam_max


def _virus(headers: list[tuple[str, str]] | None, s: SieveSettings) -> int | None:
    """RFC 5235 §3.2: 1 clean … 5 infected, from e.g. ClamAV's ``X-Virus-Status: Clean|Infected`` (the
    last occurrence, as for the spam score)."""
    for name, value in reversed(headers or []):
        if name.lower() == s.virus_header.lower():
            v = value.strip().lower()
            if v.startswith("clean"):
                return 1
            if v.startswith("infected"):
                return 5
            if v[:1].isdigit():
                return max(1, min(5, int(v[0])))
    return None


def make_input(ctx: StageContext, s: SieveSettings, lists: MapLists | None) -> Input:
    headers: list[tuple[str, str]] | None = None
    body: bytes | None = None
    if ctx.stage is Stage.DATA and ctx.message is not None:
        headers, body = ctx.split()
    rcpts: Sequence[str] | None
    if ctx.stage is Stage.RCPT:
        rcpts = [ctx.recipient] if ctx.recipient is not None else []
    elif ctx.stage is Stage.DATA:
        rcpts = list(ctx.recipients)
    else:
        rcpts = None                                    # unknown before RCPT
    score, smax = _spam(headers, s)
    size: int | None = None
    if ctx.message is not None:
        size = ctx.size or len(ctx.message)
    elif ctx.mail_params.get("SIZE", "").isascii() and ctx.mail_params.get("SIZE", "").isdigit():
        size = int(ctx.mail_params["SIZE"])             # RFC 1870: the client's announced size
    return Input(STAGE_NAMES[ctx.stage], ctx.sender, rcpts, headers, body, size, environment(ctx, s),
                 score, smax, _virus(headers, s), lists, protected_recipients=list(ctx.recipients))


def evaluate(scripts: SieveScripts, ctx: StageContext) -> Verdict:
    """Run the global then the listener script for this stage; one combined verdict.

    At DATA each script runs once per recipient, with that recipient as the envelope "to" — the RFC 5228
    §5.4 view of one delivery — and the results are combined (:func:`combine`): a rule such as
    ``if envelope :domain "to" "bank.example" { tls_policy "dane-only"; }`` then routes only the bank's
    recipients, while the message-level outcome (reject, defer, hold) holds for the whole message, since
    SMTP has one reply after DATA."""
    s = scripts.settings
    if STAGE_NAMES[ctx.stage] not in s.stages:
        return Verdict()
    base = make_input(ctx, s, scripts.lists)
    combined = Verdict()
    for path, script in scripts.for_listener(ctx.listener):
        if ctx.stage is Stage.DATA and len(ctx.recipients) > 0:
            deadline = time.monotonic() + s.limits.max_seconds      # one time budget for the stage
            results = []
            for rcpt in ctx.recipients:
                inp = replace(base, recipients=[rcpt], environment=dict(base.environment))
                results.append((rcpt, run(script, inp, s.limits, deadline=deadline)))
            v = combine(results, ctx, s.default_action, path)
        else:
            v = to_verdict(run(script, base, s.limits), ctx, s.default_action, path)
        combined = _merge(combined, v)
        if combined.final:
            break
    return combined


def combine(results: list[tuple[str, Result]], ctx: StageContext, default: Action, script: str) -> Verdict:
    """The per-recipient results of one script at DATA → one verdict: the first error, reject or defer
    (in recipient order) decides for the message; a recipient whose run discarded or redirected the message
    is removed; holds, header edits and routes add up (identical edits once)."""
    verdicts = [(rcpt, to_verdict(r, ctx, default, script, rcpt)) for rcpt, r in results]
    for _, v in verdicts:
        if v.action in (Action.REJECT, Action.TEMPFAIL):
            return v
    headers: list[HeaderEdit] = []
    adds: list[str] = []
    removes: list[str] = []
    routes: list[Route] = []
    hold: Verdict | None = None
    reasons: list[str] = []
    for rcpt, v in verdicts:
        headers += [h for h in v.headers if h not in headers]
        adds += [a for a in v.add_recipients if a not in adds]
        if v.action is Action.DISCARD:
            removes.append(rcpt)
        removes += [r for r in v.remove_recipients if r not in removes]
        routes += [r for r in v.routes if r not in routes]
        if v.action is Action.HOLD and hold is None:
            hold = v
        if v.reason and v.reason not in reasons:
            reasons.append(v.reason)
    everyone = set(ctx.recipients)
    joined = [replace(r, recipients=()) if set(r.recipients) == everyone else r for r in _join_routes(routes)]
    out = Verdict(Action.CONTINUE, None, "; ".join(reasons), "", tuple(headers), tuple(adds), tuple(removes),
                  None, None, tuple(joined))
    if not adds and set(removes) >= set(ctx.recipients):
        return replace(out, action=Action.DISCARD, remove_recipients=(), reason="sieve discard")
    if hold is not None:
        return replace(out, action=Action.HOLD, quarantine_reason=hold.quarantine_reason)
    return out


def _join_routes(routes: list[Route]) -> list[Route]:
    """Routes that differ only in their recipients become one route for all of them."""
    out: list[Route] = []
    for r in routes:
        for i, o in enumerate(out):
            if replace(o, recipients=()) == replace(r, recipients=()) and o.recipients and r.recipients:
                out[i] = replace(o, recipients=o.recipients + tuple(x for x in r.recipients
                                                                    if x not in o.recipients))
                break
        else:
            out.append(r)
    return out


def _merge(a: Verdict, b: Verdict) -> Verdict:
    action = b.action if b.action is not Action.CONTINUE else a.action
    if a.action is Action.HOLD and b.action is Action.CONTINUE:
        action = Action.HOLD
    return Verdict(action, b.reply or a.reply if b.action is not Action.CONTINUE else a.reply,
                   "; ".join(x for x in (a.reason, b.reason) if x), "", a.headers + b.headers,
                   a.add_recipients + b.add_recipients, a.remove_recipients + b.remove_recipients,
                   None, None, a.routes + b.routes, b.quarantine_reason or a.quarantine_reason)


def _clean(text: str) -> str:
    """A reason as SMTP reply text: printable, lines joined with \\n (Reply makes them continuation lines)."""
    lines = [re.sub(r"[^\x20-\x7e]", "?", ln).strip() for ln in text.replace("\r\n", "\n").split("\n")]
    lines = [ln[:400] for ln in lines if ln][:10]
    return "\n".join(lines) or "Rejected by policy"


def _recipients(patterns: tuple[str, ...], ctx: StageContext, rcpt: str | None = None) -> tuple[str, ...] | None:
    """``:recipients`` (addresses or domains, ``.example.com`` for subdomains) → the recipients they name
    among those this evaluation is about (``rcpt`` at DATA, the one being judged at RCPT); None if the stage
    has no recipients yet. Without ``:recipients``: those recipients."""
    if rcpt is not None:
        known = [rcpt]
    elif ctx.stage is Stage.RCPT:
        known = [ctx.recipient] if ctx.recipient else []
    else:
        known = list(ctx.recipients)
    if not patterns:
        return tuple(known) if ctx.stage in (Stage.RCPT, Stage.DATA) and known else ()
    if not known:
        return None
    out = []
    for r in known:
        domain = r.rpartition("@")[2].lower()
        for p in patterns:
            p = p.lower().strip("<>")
            if (("@" in p and not p.startswith("@") and r.lower() == p) or (p.startswith(".") and domain.endswith(p))
                    or (p.startswith("@") and domain == p[1:]) or domain == p):
                out.append(r)
                break
    return tuple(out)


def to_verdict(result: Result, ctx: StageContext, default: Action, script: str,
               rcpt: str | None = None) -> Verdict:
    """One script's result → a stage verdict (the table in docs/sieve.md). ``rcpt``: the recipient this
    evaluation was for (DATA, one run per recipient)."""
    where = f"sieve {script} at {STAGE_NAMES[ctx.stage]} from {ctx.client_address}"
    if result.error is not None:
        log.warning("%s: %s; default action %s", where, result.error, default.value)
        if default is Action.ACCEPT:
            return Verdict(reason=f"sieve error: {result.error}")
        reply = (Reply(451, "4.7.1", "Policy script failed, try again later") if default is Action.TEMPFAIL
                 else Reply(550, "5.7.1", "Policy script failed"))
        return Verdict(default, reply, f"sieve error: {result.error}")
    stage = ctx.stage
    headers: list[HeaderEdit] = []
    routes: list[Route] = []
    adds: list[str] = []
    kept = result.implicit_keep
    hold: str | None = None
    discard = False
    for a in result.actions:
        k = a.kind
        if k in (Kind.REJECT, Kind.EREJECT):
            # RFC 5429 §2.1: in the SMTP session, before the 250 (554 at connect: RFC 5321 §3.1)
            code = 554 if stage is Stage.CONNECT else 550
            log.info("%s: reject: %s", where, a.arg)
            return Verdict(Action.REJECT, Reply(code, "5.7.1", _clean(a.arg)), f"sieve reject: {a.arg}")
        if k is Kind.DEFER:
            log.info("%s: defer: %s", where, a.arg)
            return Verdict(Action.TEMPFAIL, Reply(451, a.option or "4.7.1", _clean(a.arg)),
                           f"sieve defer: {a.arg}")
        if k is Kind.KEEP:
            kept = True
        elif k is Kind.DISCARD:
            discard = True
        elif k is Kind.HOLD:
            hold = a.arg or "held by Sieve"
        elif k is Kind.FILEINTO:
            if a.arg.lower() in HOLD_FOLDERS:
                hold = f"fileinto {a.arg}"
            else:
                folder = re.sub(r"[\x00-\x1f]+", " ", a.arg)
                headers.append(HeaderEdit(HeaderOp.ADD, "X-Postgate-Fileinto",
                                          folder if folder.isascii() else Header(folder, "utf-8").encode()))
                kept = True                 # the message is still delivered, to that folder
        elif k is Kind.REDIRECT:
            adds.append(a.arg)
            # loop control (RFC 5228 §4.2): the mark a later hop's redirect checks
            headers.append(HeaderEdit(HeaderOp.INSERT, REDIRECT_MARK,
                                      f"<{a.arg}>; by={ctx.hostname or 'postgate'}", 0))
        elif k is Kind.ADDHEADER:
            # RFC 5293 §4: at the top unless :last; non-ASCII text as RFC 2047 encoded words
            value = a.arg if a.arg.isascii() else Header(a.arg, "utf-8").encode()
            headers.append(HeaderEdit(HeaderOp.ADD, a.name, value) if a.index == -1
                           else HeaderEdit(HeaderOp.INSERT, a.name, value, 0))
        elif k is Kind.DELETEHEADER:
            headers.append(HeaderEdit(HeaderOp.DELETE, a.name, "", a.index))
        else:
            if k is Kind.DKIM_SIGN:              # a signature is per message, not per recipient
                routes.append(Route((), dkim_domain=a.arg, dkim_selector=a.option or None))
                continue
            rcpts = _recipients(a.recipients, ctx, rcpt)
            if rcpts is None or (a.recipients and not rcpts):
                if rcpt is not None:
                    continue                         # DATA: not about this recipient
                log.info("%s: %s for %s: no such recipient at this stage; ignored", where, k.value,
                         ", ".join(a.recipients))
                continue
            if k is Kind.TLS_POLICY:
                routes.append(Route(rcpts, tls_level=a.arg))
            elif k is Kind.ROUTE:
                routes.append(Route(rcpts, transport=a.arg))
            elif k is Kind.PRIORITY:
                routes.append(Route(rcpts, priority=a.number))
            elif k is Kind.LIFETIME:
                routes.append(Route(rcpts, lifetime=float(a.number)))
    removes: list[str] = []
    redirected = [a for a in result.actions if a.kind is Kind.REDIRECT and not a.copy]
    if redirected and not kept and stage in (Stage.RCPT, Stage.DATA):
        if rcpt is not None:
            removes = [rcpt]
        else:
            removes = [ctx.recipient] if stage is Stage.RCPT and ctx.recipient else list(ctx.recipients)
    if stage not in (Stage.RCPT, Stage.DATA):
        if adds:
            log.info("%s: redirect before RCPT ignored (no recipients yet)", where)
        adds, removes = [], []               # no recipients to replace before RCPT
        headers = [h for h in headers if h.name != REDIRECT_MARK]
    reason = "; ".join(a.kind.value + (f" {a.arg}" if a.arg else "") for a in result.actions)
    v = Verdict(Action.CONTINUE, None, f"sieve: {reason}" if reason else "", "", tuple(headers), tuple(adds),
                tuple(removes), None, None, tuple(routes))
    if discard and not kept and not adds:
        log.info("%s: discard", where)
        return replace(v, action=Action.DISCARD, reason="sieve discard")
    if hold is not None:
        return replace(v, action=Action.HOLD, quarantine_reason=hold)
    return v


def load(settings: SieveSettings) -> SieveScripts | None:
    """The holder for the configured scripts, or None when no script is configured."""
    if not settings.script and not settings.listener_scripts:
        return None
    for p in [settings.script, *settings.listener_scripts.values()]:
        if p and not Path(p).is_file():
            raise SieveError(p, 0, 0, "no such script")
    return SieveScripts(settings)
