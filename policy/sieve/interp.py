"""Running a compiled script against one SMTP stage: RFC 5228 §2.10 and the extensions' semantics.

The interpreter is a pure function of the script and an :class:`Input` (the stage, envelope, header fields,
body, session environment, spam/virus results and list lookups); it returns a :class:`Result`: the actions in
script order, whether the implicit keep (§2.10.2) still holds, or the run-time error that stopped it.

Safety (issue 17): each evaluation has an instruction budget and a deadline (checked at every command, test
and comparison), variables are bounded (RFC 5229 §6), the number of actions and redirects is bounded
(RFC 5228 §2.10.4, §4.2), there is no recursion in the language (no ``include``) and the interpreter itself
walks at most :data:`~postgate.policy.sieve.grammar.MAX_NESTING` levels. Every limit that is hit becomes
a :class:`RuntimeFailure` in the result — never an exception out of :func:`run`.
"""

from __future__ import annotations

import email
import email.policy
import enum
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from email.header import decode_header, make_header
from email.utils import getaddresses, parsedate_tz
from typing import Any, Protocol

from postgate.policy.maps import MapError, parse_relay
from postgate.policy.sieve.match import casemap, match_one, numeric, relation
from postgate.policy.sieve.validate import Node, Script, valid_field_name


class Kind(enum.Enum):
    KEEP = "keep"
    DISCARD = "discard"
    REDIRECT = "redirect"
    FILEINTO = "fileinto"
    REJECT = "reject"
    EREJECT = "ereject"
    ADDHEADER = "addheader"
    DELETEHEADER = "deleteheader"
    TLS_POLICY = "tls_policy"
    ROUTE = "route"
    HOLD = "hold"
    DEFER = "defer"
    DKIM_SIGN = "dkim_sign"
    PRIORITY = "queue_priority"
    LIFETIME = "queue_lifetime"


@dataclass(frozen=True)
class SieveAction:
    kind: Kind
    arg: str = ""                          # address, folder, reason, level, transport, domain …
    copy: bool = False                     # :copy (RFC 3894)
    name: str = ""                         # editheader: field name
    index: int = 0                         # addheader: 0 = first, -1 = last; deleteheader: occurrence
    recipients: tuple[str, ...] = ()       # vnd.postgate :recipients
    option: str = ""                       # defer :status, dkim_sign :selector
    number: int = 0                        # queue_priority / queue_lifetime


@dataclass(frozen=True)
class Result:
    actions: tuple[SieveAction, ...]
    implicit_keep: bool
    error: str | None = None               # a run-time failure: the caller applies its default action
    instructions: int = 0

    def describe(self) -> list[str]:
        """One line per action, like Pigeonhole's sieve-test ``Performed actions``."""
        out = []
        for a in self.actions:
            extra = " :copy" if a.copy else ""
            if a.kind in (Kind.ADDHEADER, Kind.DELETEHEADER):
                out.append(f"{a.kind.value} {a.name}: {a.arg}" if a.kind is Kind.ADDHEADER
                           else f"deleteheader {a.name} #{a.index}")
            elif a.kind in (Kind.PRIORITY, Kind.LIFETIME):
                out.append(f"{a.kind.value} {a.number}" + _recips(a))
            else:
                arg = a.arg.rstrip("\r\n").replace("\r\n", "\\n").replace("\n", "\\n")
                out.append(f"{a.kind.value}{extra} {arg}".rstrip() + (f" {a.option}" if a.option else "")
                           + _recips(a))
        if self.implicit_keep and not self.error:
            out.append("implicit keep")
        if self.error:
            out.append(f"error: {self.error}")
        return out


def _recips(a: SieveAction) -> str:
    return f" for {', '.join(a.recipients)}" if a.recipients else ""


class ListLookup(Protocol):
    """RFC 6134 external lists: ``contains`` answers ``:list`` matches, ``exists`` ``valid_ext_list``."""

    def exists(self, name: str) -> bool: ...
    def contains(self, name: str, value: str) -> bool: ...


@dataclass
class Input:
    stage: str                                       # connect, helo, mail, rcpt, data
    sender: str | None = None                        # None: before MAIL; "": the null reverse-path
    recipients: Sequence[str] | None = ()            # envelope "to" (at rcpt: the one being judged); None
                                                     # before RCPT (unknown)
    headers: list[tuple[str, str]] | None = None     # (name, raw value) in message order; None before DATA
    body: bytes | None = None
    size: int | None = 0                             # None: unknown (before DATA without SIZE=)
    environment: dict[str, str] = field(default_factory=dict)
    spam_score: float | None = None                  # e.g. rspamd's score; None: not tested
    spam_max: float = 15.0                           # the score that means "certainly spam"
    virus: int | None = None                         # RFC 5235 §3.2 virustest value 1-5; None: not tested
    lists: ListLookup | None = None
    now: datetime | None = None
    protected_recipients: Sequence[str] = ()         # redirect targets refused as loops
    cache: dict[str, Any] = field(default_factory=dict)   # shared by evaluations of one message (MIME parts)


@dataclass(frozen=True)
class Limits:
    max_instructions: int = 100_000                  # commands, tests and single comparisons
    max_seconds: float = 0.5
    max_actions: int = 64
    max_redirects: int = 4                           # RFC 5228 §4.2: implementations limit redirects
    max_variable_size: int = 4096                    # RFC 5229 §6
    max_variables: int = 256
    max_header_edits: int = 64
    max_body_bytes: int = 4 << 20                    # body tests look at the first 4 MiB of the body


class RuntimeFailure(Exception):
    """A run-time error or an exceeded limit (RFC 5228 §2.10.6)."""


class _Stop(Exception):
    pass


REDIRECT_MARK = "X-Postgate-Redirected"              # added to redirected mail: loop detection across hops
MAX_REDIRECT_HOPS = 8
# RFC 5293 §7: Received and Auto-Submitted (Pigeonhole protects the same two), and our own loop marker
PROTECTED_HEADERS = {"received", "auto-submitted", REDIRECT_MARK.lower()}
_VAR = re.compile(r"\$\{([^{}]*)\}")


def _decode(raw: str) -> str:
    """Unfold (RFC 5322 §2.2.3), decode RFC 2047 encoded words, trim (as Pigeonhole does)."""
    value = raw.replace("\r\n", "").replace("\n", "").strip()
    if "=?" not in value:
        return value
    try:
        return str(make_header(decode_header(value))).strip()
    except Exception:
        return value


class _Run:
    def __init__(self, script: Script, inp: Input, limits: Limits, clock: Callable[[], float]) -> None:
        self.s, self.inp, self.lim, self.clock = script, inp, limits, clock
        self.deadline = clock() + limits.max_seconds
        self.count = 0
        self.vars: dict[str, str] = {}
        self.matchvars: list[str] = []
        self.actions: list[SieveAction] = []
        self.keep_cancelled = False
        self.headers = list(inp.headers) if inp.headers is not None else None
        self.redirects = 0
        self.edits = 0
        self._parts: list[tuple[str, str]] | None = None
        self.variables = "variables" in script.capabilities

    # -- budget ------------------------------------------------------------------------------------
    def tick(self, n: int = 1) -> None:
        self.count += n
        if self.count > self.lim.max_instructions:
            raise RuntimeFailure(f"instruction limit of {self.lim.max_instructions} exceeded")
        if self.clock() > self.deadline:
            raise RuntimeFailure(f"time limit of {self.lim.max_seconds}s exceeded")

    # -- strings -----------------------------------------------------------------------------------
    def expand(self, s: str) -> str:
        """RFC 5229 §3: ``${name}`` and ``${N}`` in strings; unknown variables are empty."""
        if not self.variables or "${" not in s:
            return s

        def sub(m: re.Match[str]) -> str:
            name = m.group(1)
            if re.fullmatch(r"[0-9]+", name):
                k = int(name)
                return self.matchvars[k] if k < len(self.matchvars) else ""
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*", name):
                return m.group(0)        # not a variable reference: left as it is (§3)
            return self.vars.get(name.lower(), "")

        out = _VAR.sub(sub, s)
        if len(out) > self.lim.max_variable_size * 16:
            raise RuntimeFailure("expanded string too long")
        return out

    def strs(self, xs: list[str]) -> list[str]:
        return [self.expand(x) for x in xs]

    # -- commands ----------------------------------------------------------------------------------
    def block(self, nodes: list[Node]) -> None:
        for n in nodes:
            self.command(n)

    def command(self, n: Node) -> None:
        self.tick()
        name = n.name
        if name == "if":
            # RFC 5228 §3.1: the first branch whose test is true runs. A test on data this SMTP stage does
            # not have yet is *unknown*: the whole chain is left undecided (no branch runs, not even else)
            for test, body in n.branches:
                r = True if test is None else self.test(test)
                if r is None:
                    return
                if r:
                    self.block(body)
                    return
            return
        if name == "stop":
            raise _Stop                                               # §3.3
        if name == "keep":
            self.add(SieveAction(Kind.KEEP))                          # §4.3
            self.keep_cancelled = True
            return
        if name == "discard":
            self.keep_cancelled = True                                # §4.4
            self.add(SieveAction(Kind.DISCARD))
            return
        if name == "redirect":
            self.redirect(n)
            return
        if name == "fileinto":
            copy = n.tag("copy") is not None
            self.add(SieveAction(Kind.FILEINTO, self.expand(n.args[0]), copy))
            if not copy:
                self.keep_cancelled = True                            # RFC 5228 §4.1, RFC 3894 §3
            return
        if name in ("reject", "ereject"):
            # RFC 5429 §2.1/§2.2: cancels the implicit keep; conflicts with keep, fileinto and redirect
            # (with :copy too, as Pigeonhole), and a second reject is an error
            for a in self.actions:
                if a.kind in (Kind.REJECT, Kind.EREJECT, Kind.KEEP, Kind.FILEINTO, Kind.REDIRECT):
                    raise RuntimeFailure(f"{name} conflicts with the earlier {a.kind.value} (RFC 5429 §2.2)")
            self.keep_cancelled = True
            self.add(SieveAction(Kind.REJECT if name == "reject" else Kind.EREJECT, self.expand(n.args[0])))
            return
        if name == "set":
            self.set(n)
            return
        if name == "addheader":
            self.addheader(n)
            return
        if name == "deleteheader":
            self.deleteheader(n)
            return
        self.postgate(n)

    def add(self, a: SieveAction) -> None:
        if a.kind in (Kind.KEEP, Kind.FILEINTO, Kind.REDIRECT, Kind.DISCARD):
            for b in self.actions:
                # RFC 5228 §2.10.3: a repeated keep, fileinto or redirect to the same target happens once
                if b.kind is a.kind and b.arg == a.arg:
                    if a.kind is Kind.KEEP or a.kind is Kind.DISCARD or (a.copy or not b.copy):
                        return
            if any(b.kind in (Kind.REJECT, Kind.EREJECT) for b in self.actions) and a.kind is not Kind.DISCARD:
                raise RuntimeFailure(f"{a.kind.value} conflicts with the earlier reject (RFC 5429 §2.2)")
        if len(self.actions) >= self.lim.max_actions:
            raise RuntimeFailure(f"more than {self.lim.max_actions} actions")
        self.actions.append(a)

    def redirect(self, n: Node) -> None:
        target = self.expand(n.args[0]).strip()
        addrs = [a for _, a in getaddresses([target]) if a]
        # RFC 5228 §4.2: the argument must be a valid address (RFC 5322 addr-spec)
        if len(addrs) != 1 or "@" not in addrs[0] or " " in addrs[0]:
            raise RuntimeFailure(f"redirect: {target!r} is not a valid address (RFC 5228 §4.2)")
        addr = addrs[0]
        lowered = casemap(addr)
        # redirect loops: back to a recipient of this very message, or to its sender
        loops = {casemap(r) for r in self.inp.protected_recipients} | {casemap(r) for r in self.inp.recipients or []}
        if self.inp.sender:
            loops.add(casemap(self.inp.sender))
        if lowered in loops:
            raise RuntimeFailure(f"redirect to {addr} refused: it would loop back to this message's envelope")
        # RFC 5228 §4.2: loop control across hops, by the marks earlier redirects left in the header
        marks = [casemap(_decode(v)) for h, v in self.inp.headers or [] if casemap(h) == casemap(REDIRECT_MARK)]
        if any(lowered in m.replace("<", " ").replace(">", " ").replace(";", " ").split() for m in marks):
            raise RuntimeFailure(f"redirect to {addr} refused: this message was redirected there before (loop)")
        if len(marks) >= MAX_REDIRECT_HOPS:
            raise RuntimeFailure(f"redirect refused: the message was already redirected {len(marks)} times")
        if not any(a.kind is Kind.REDIRECT and casemap(a.arg) == lowered for a in self.actions):
            self.redirects += 1
            if self.redirects > self.lim.max_redirects:
                raise RuntimeFailure(f"more than {self.lim.max_redirects} redirects (RFC 5228 §4.2)")
        copy = n.tag("copy") is not None
        self.add(SieveAction(Kind.REDIRECT, addr, copy))
        if not copy:
            self.keep_cancelled = True

    def set(self, n: Node) -> None:
        name = n.args[0].lower()
        value = self.expand(n.args[1])
        mods = sorted((g[4:] for g in n.tags), key=lambda m: -_PREC[m])
        for m in mods:                     # RFC 5229 §4.1: highest precedence first
            if m == "lower":
                value = value.lower()
            elif m == "upper":
                value = value.upper()
            elif m == "lowerfirst":
                value = value[:1].lower() + value[1:]
            elif m == "upperfirst":
                value = value[:1].upper() + value[1:]
            elif m == "quotewildcard":
                value = value.replace("\\", "\\\\").replace("*", "\\*").replace("?", "\\?")
            elif m == "length":
                value = str(len(value))
        if name not in self.vars and len(self.vars) >= self.lim.max_variables:
            raise RuntimeFailure(f"more than {self.lim.max_variables} variables")
        self.vars[name] = value[: self.lim.max_variable_size]     # RFC 5229 §6: truncate

    def addheader(self, n: Node) -> None:
        name = self.expand(n.args[0])
        if not valid_field_name(name):
            raise RuntimeFailure(f"addheader: {name!r} is not a header field name (RFC 5322 §3.6.8)")
        # no line breaks of the script's own in a field: they would inject fields (RFC 5293 §4)
        value = re.sub(r"[\r\n]+[ \t]*", " ", self.expand(n.args[1]))
        if name.lower() in PROTECTED_HEADERS or self.headers is None:
            return                           # RFC 5293 §7; nothing to edit before DATA
        self.edit_budget()
        last = n.tag("addlast") is not None
        # RFC 5293 §4: at the beginning of the header unless :last
        if last:
            self.headers.append((name, " " + value))
        else:
            self.headers.insert(0, (name, " " + value))
        self.add(SieveAction(Kind.ADDHEADER, value, name=name, index=-1 if last else 0))

    def edit_budget(self) -> None:
        self.edits += 1
        if self.edits > self.lim.max_header_edits:
            raise RuntimeFailure(f"more than {self.lim.max_header_edits} header edits")

    def deleteheader(self, n: Node) -> None:
        name = self.expand(n.args[0])
        if name.lower() in PROTECTED_HEADERS or self.headers is None:
            return
        patterns = self.strs(n.args[1]) if len(n.args) > 1 else None
        occ = [i for i, (h, _) in enumerate(self.headers) if h.lower() == name.lower()]
        chosen = list(range(len(occ)))
        if n.tag("index") is not None:
            k = n.tag_arg("index")
            if k > len(occ):
                return
            chosen = [len(occ) - k if n.tag("last") else k - 1]
        doomed: list[int] = []
        for j in chosen:
            if patterns is not None:
                value = _decode(self.headers[occ[j]][1])
                if not self.match_values(n, [value], patterns, set_vars=False):
                    continue
            doomed.append(j)
        for j in sorted(doomed, reverse=True):   # highest first, so the occurrence numbers stay valid
            self.edit_budget()
            del self.headers[occ[j]]
            self.add(SieveAction(Kind.DELETEHEADER, name=name, index=j + 1))

    def postgate(self, n: Node) -> None:
        name = n.name
        recips = tuple(self.strs(n.tag_arg("recipients") or []))
        if name == "tls_policy":
            from postgate.policy.sieve.validate import TLS_LEVELS
            level = self.expand(n.args[0]).lower()
            if level not in TLS_LEVELS:
                raise RuntimeFailure(f"tls_policy: unknown level {level!r}")
            self.add(SieveAction(Kind.TLS_POLICY, level, recipients=recips))
        elif name == "route":
            spec = self.expand(n.args[0]).strip()
            try:
                parse_relay(spec, "route")               # transport-map syntax, as policy.maps reads it
            except MapError as e:
                raise RuntimeFailure(str(e)) from e
            self.add(SieveAction(Kind.ROUTE, spec, recipients=recips))
        elif name == "hold":
            self.add(SieveAction(Kind.HOLD, self.expand(n.args[0]) if n.args else ""))
        elif name == "defer":
            self.add(SieveAction(Kind.DEFER, self.expand(n.args[0]), option=n.tag_arg("status") or ""))
        elif name == "dkim_sign":
            domain = self.expand(n.args[0]).lower().rstrip(".")
            if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)+", domain):
                raise RuntimeFailure(f"dkim_sign: {domain!r} is not a domain name")
            self.add(SieveAction(Kind.DKIM_SIGN, domain,
                                 option=self.expand(n.tag_arg("selector") or "")))
        elif name == "queue_priority":
            self.add(SieveAction(Kind.PRIORITY, number=n.args[0], recipients=recips))
        elif name == "queue_lifetime":
            self.add(SieveAction(Kind.LIFETIME, number=n.args[0], recipients=recips))
        else:  # pragma: no cover - the validator knows every command
            raise RuntimeFailure(f"unknown command {name}")

    # -- tests -------------------------------------------------------------------------------------
    def test(self, n: Node) -> bool | None:
        """True, False, or None: *unknown* — the test needs data this SMTP stage does not have yet (the
        message before DATA, the sender before MAIL, recipients before RCPT). Unknown propagates as in
        Kleene's three-valued logic, so ``not exists "Date"`` is not true at connect."""
        self.tick()
        name = n.name
        if name == "true":
            return True
        if name == "false":
            return False
        if name == "not":
            r = self.test(n.tests[0])
            return None if r is None else not r
        if name == "allof":                                # §5.2: short-circuit, left to right
            unknown = False
            for t in n.tests:
                r = self.test(t)
                if r is False:
                    return False
                unknown = unknown or r is None
            return None if unknown else True
        if name == "anyof":                                # §5.3
            unknown = False
            for t in n.tests:
                r = self.test(t)
                if r is True:
                    return True
                unknown = unknown or r is None
            return None if unknown else False
        if name in ("header", "address", "exists", "body", "date") and self.headers is None:
            return None                                    # no message before DATA
        if name in ("spamtest", "virustest") and self.inp.stage != "data":
            return None                                    # no filter has scored the message yet
        if name == "envelope":
            parts = {p.lower() for p in self.strs(n.args[0])}
            if ("from" in parts and self.inp.sender is None) or ("to" in parts and self.inp.recipients is None):
                return None                                # before MAIL / before RCPT
        if name == "exists":                               # §5.5: every named field must exist
            names = {casemap(x) for x in self.strs(n.args[0])}
            present = {casemap(h) for h, _ in self.headers or []}
            return names <= present
        if name == "size":                                 # §5.9
            size = self.inp.size
            if size is None:
                return None                                # before DATA without a SIZE= parameter
            limit = int(n.args[0])
            return size > limit if n.tag("size") == "over" else size < limit
        if name == "header":
            return self.match_values(n, self.header_values(n, self.strs(n.args[0])), self.strs(n.args[1]))
        if name == "address":
            return self.match_values(n, self.address_values(n), self.strs(n.args[1]))
        if name == "envelope":
            return self.match_values(n, self.envelope_values(n), self.strs(n.args[1]))
        if name == "string":                               # RFC 5229 §5
            values = [v for v in self.strs(n.args[0])]
            if n.tag("match") == "count":
                values = [v for v in values if v != ""]    # §5: empty strings are not counted
            return self.match_values(n, values, self.strs(n.args[1]))
        if name == "environment":                          # RFC 5183 §4
            item = self.expand(n.args[0]).lower()
            if item not in self.inp.environment:
                return False
            return self.match_values(n, [self.inp.environment[item]], self.strs(n.args[1]))
        if name == "body":
            return self.match_values(n, self.body_values(n), self.strs(n.args[0]))
        if name == "date":
            return self.date_test(n)
        if name == "currentdate":
            now = self.inp.now or datetime.now(UTC)
            zone = n.tag_arg("zone")
            dt = _in_zone(now, self.expand(zone) if zone else None)
            if dt is None:
                return False
            return self.match_values(n, [_date_part(dt, self.expand(n.args[0]))], self.strs(n.args[1]))
        if name == "spamtest":                             # RFC 5235 §3.1
            return self.match_values(n, [self.spam_value(n.tag("percent") is not None)],
                                     [self.expand(n.args[0])])
        if name == "virustest":                            # RFC 5235 §3.2
            v = "0" if self.inp.virus is None else str(max(1, min(5, self.inp.virus)))
            return self.match_values(n, [v], [self.expand(n.args[0])])
        if name == "valid_ext_list":                       # RFC 6134 §2.5
            lists = self.inp.lists
            return lists is not None and all(lists.exists(x) for x in self.strs(n.args[0]))
        raise RuntimeFailure(f"unknown test {name}")       # pragma: no cover

    def spam_value(self, percent: bool) -> str:
        s = self.inp.spam_score
        if s is None:
            return "0"                                     # RFC 5235 §3.1: not tested
        frac = max(0.0, min(1.0, s / self.inp.spam_max)) if self.inp.spam_max > 0 else 1.0
        if percent:
            return str(round(frac * 100))                  # RFC 5235 §3.2 (spamtestplus)
        return str(1 + round(frac * 9))                    # 1: certainly not spam … 10: certainly spam

    def match_values(self, n: Node, values: list[str], keys: list[str], set_vars: bool = True) -> bool:
        match: str = n.tag("match") or "is"                # RFC 5228 §2.7.1: :is by default
        comparator = n.tag_arg("comparator") or "i;ascii-casemap"
        if match == "count":                               # RFC 5231 §4.2
            op = str(n.tag_arg("match"))
            self.tick()
            return any(relation(op, str(len(values)), k, comparator) for k in keys)
        if match == "list":                                # RFC 6134 §2.2
            lists = self.inp.lists
            for v in values:
                for k in keys:
                    self.tick()
                    if lists is not None and lists.exists(k) and lists.contains(k, v):
                        return True
            return False
        rel = str(n.tag_arg("match")) if match == "value" else None
        for v in values:
            for k in keys:
                self.tick()
                caps = match_one(match, v, k, comparator, rel)
                if caps is not None:
                    if match == "matches" and set_vars and self.variables:
                        # RFC 5229 §3.2: a successful :matches sets ${0}…${9}
                        self.matchvars = [c[: self.lim.max_variable_size] for c in caps[:10]]
                    return True
        return False

    # -- values ------------------------------------------------------------------------------------
    def header_values(self, n: Node, names: list[str], raw: bool = False) -> list[str]:
        wanted = {casemap(x) for x in names}
        found = [v for h, v in self.headers or [] if casemap(h) in wanted]
        if n.tag("index") is not None:                     # RFC 5260 §6
            k = n.tag_arg("index")
            if k > len(found):
                return []
            found = [found[len(found) - k if n.tag("last") else k - 1]]
        return found if raw else [_decode(v) for v in found]

    def address_values(self, n: Node) -> list[str]:
        part = n.tag("addrpart") or "all"                  # RFC 5228 §2.7.4: :all by default
        out: list[str] = []
        for raw in self.header_values(n, self.strs(n.args[0])):
            for _, addr in getaddresses([raw]):
                if addr:
                    p = _address_part(addr, part)
                    if p is not None:
                        out.append(p)
        return out

    def envelope_values(self, n: Node) -> list[str]:
        part = n.tag("addrpart") or "all"
        out: list[str] = []
        for which in self.strs(n.args[0]):
            which = which.lower()
            if which == "from":
                addrs = [] if self.inp.sender is None else [self.inp.sender]
            elif which == "to":
                addrs = list(self.inp.recipients or [])
            else:
                raise RuntimeFailure(f"envelope part {which!r} is not from or to")
            for a in addrs:
                if a == "":
                    # RFC 5228 §5.4: the null reverse-path is the empty string in every part
                    if part not in ("user", "detail"):
                        out.append("")
                    continue
                p = _address_part(a, part)
                if p is not None:
                    out.append(p)
        return out

    def body_values(self, n: Node) -> list[str]:
        if self.headers is None or self.inp.body is None:
            return []
        body = self.inp.body[: self.lim.max_body_bytes]     # bounded work per evaluation (docs/sieve.md)
        transform = n.tag("transform") or "text"           # RFC 5173 §5: :text by default
        if transform == "raw":
            return [body.decode("utf-8", "replace")]
        types = [t.lower() for t in n.tag_arg("transform") or []] if transform == "content" else ["text"]
        out: list[str] = []
        for ctype, text in self.body_parts(body):
            main = ctype.split("/")[0]
            # RFC 5173 §5.2: "" matches every type, "text" every text/ subtype, "text/html" exactly
            if any(t == "" or t == ctype or ("/" not in t and t == main) for t in types):
                out.append(text)
        return out

    def body_parts(self, body: bytes) -> list[tuple[str, str]]:
        """The leaf MIME parts (content type, decoded text), parsed once per evaluation (RFC 5173 §5)."""
        if self._parts is None and "parts" in self.inp.cache:
            self._parts = self.inp.cache["parts"]
        if self._parts is None:
            head = "".join(f"{h}:{v}\r\n" for h, v in self.inp.headers or [])
            msg = email.message_from_bytes(head.encode("utf-8", "surrogateescape") + b"\r\n" + body,
                                           policy=email.policy.compat32)
            parts: list[tuple[str, str]] = []
            for part in msg.walk():
                if part.is_multipart():
                    continue
                self.tick()
                payload = part.get_payload(decode=True)
                if not isinstance(payload, bytes):
                    continue
                charset = part.get_content_charset() or "us-ascii"
                try:
                    text = payload.decode(charset, "replace")
                except LookupError:
                    text = payload.decode("utf-8", "replace")
                parts.append((part.get_content_type().lower(), text))
            self._parts = parts
            self.inp.cache["parts"] = parts
        return self._parts

    def date_test(self, n: Node) -> bool:
        field_name = self.expand(n.args[0])
        values = self.header_values(n, [field_name])
        if field_name.lower() == "received":
            # RFC 5260 §4: a Received field's date is what follows its last semicolon
            values = [v.rpartition(";")[2] for v in values]
        part = self.expand(n.args[1])
        out: list[str] = []
        for v in values:
            dt = _parse_date(v)
            if dt is None:
                continue                                   # RFC 5260 §4: an unparsable date never matches
            if n.tag("zone") == "originalzone":
                pass                                       # §4.1.2: keep the field's own zone
            else:
                z = n.tag_arg("zone")
                dt2 = _in_zone(dt, self.expand(z) if z is not None else None)   # §4.1.1
                if dt2 is None:
                    continue
                dt = dt2
            out.append(_date_part(dt, part))
        return self.match_values(n, out, self.strs(n.args[2]))


_PREC = {"lower": 40, "upper": 40, "lowerfirst": 30, "upperfirst": 30, "quotewildcard": 20, "length": 10}


def _address_part(addr: str, part: str) -> str | None:
    local, at, domain = addr.rpartition("@")
    if not at:
        local, domain = addr, ""
    if part == "all":
        return addr
    if part == "localpart":
        return local
    if part == "domain":
        return domain
    # RFC 5233 §4: user and detail split at the first "+"; without one, :detail does not exist
    user, sep, detail = local.partition("+")
    if part == "user":
        return user
    return detail if sep else None


def _parse_date(value: str) -> datetime | None:
    t = parsedate_tz(value)
    if t is None:
        return None
    try:
        offset = t[9] or 0
        return datetime(t[0], t[1], t[2], t[3], t[4], min(t[5], 59),
                        tzinfo=timezone(timedelta(seconds=offset)))
    except (ValueError, OverflowError):
        return None


def _in_zone(dt: datetime, zone: str | None) -> datetime | None:
    if zone is None:
        return dt.astimezone()                             # RFC 5260 §4.1: the local time zone
    m = re.fullmatch(r"([+-])(\d\d)(\d\d)", zone)
    if not m:
        return None                                        # §4.1.1: an invalid zone never matches
    sign = 1 if m.group(1) == "+" else -1
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    if int(m.group(3)) > 59 or minutes > 24 * 60:
        return None
    return dt.astimezone(timezone(timedelta(minutes=sign * minutes)))


def _zone(dt: datetime) -> str:
    off = dt.utcoffset() or timedelta(0)
    mins = int(off.total_seconds()) // 60
    sign = "-" if mins < 0 else "+"
    mins = abs(mins)
    return f"{sign}{mins // 60:02d}{mins % 60:02d}"


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _date_part(dt: datetime, part: str) -> str:
    """RFC 5260 §4.2: the named part of a date."""
    p = part.lower()
    if p == "year":
        return f"{dt.year:04d}"
    if p == "month":
        return f"{dt.month:02d}"
    if p == "day":
        return f"{dt.day:02d}"
    if p == "date":
        return f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}"
    if p == "julian":                                      # Modified Julian Day: days since 1858-11-17
        return str((dt.date() - datetime(1858, 11, 17).date()).days)
    if p == "hour":
        return f"{dt.hour:02d}"
    if p == "minute":
        return f"{dt.minute:02d}"
    if p == "second":
        return f"{dt.second:02d}"
    if p == "time":
        return f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d}"
    if p == "iso8601":
        z = _zone(dt)
        return dt.strftime("%Y-%m-%dT%H:%M:%S") + f"{z[:3]}:{z[3:]}"
    if p == "std11":
        return (f"{_DAYS[dt.weekday()]}, {dt.day:02d} {_MONTHS[dt.month - 1]} {dt.year:04d} "
                f"{dt.hour:02d}:{dt.minute:02d}:{dt.second:02d} {_zone(dt)}")
    if p == "zone":
        return _zone(dt)
    if p == "weekday":
        return str((dt.weekday() + 1) % 7)                 # 0 = Sunday
    raise RuntimeFailure(f"unknown date part {part!r} (RFC 5260 §4.2)")


def run(script: Script, inp: Input, limits: Limits | None = None,
        clock: Callable[[], float] = time.monotonic, deadline: float | None = None) -> Result:
    """Evaluate ``script`` for one stage. Never raises: failures are ``Result.error``. ``deadline`` (on
    ``clock``) shares one time budget between several evaluations (one per recipient)."""
    r = _Run(script, inp, limits or Limits(), clock)
    if deadline is not None:
        r.deadline = min(r.deadline, deadline)
    try:
        r.block(script.commands)
    except _Stop:
        pass
    except RuntimeFailure as e:
        return Result(tuple(r.actions), False, str(e), r.count)
    except RecursionError:
        return Result(tuple(r.actions), False, "script nested too deeply", r.count)
    except Exception as e:  # a bug must not take the server down: report it as a run-time failure
        return Result(tuple(r.actions), False, f"internal error: {type(e).__name__}: {e}", r.count)
    return Result(tuple(r.actions), not r.keep_cancelled, None, r.count)



__all__ = ["Input", "Kind", "Limits", "ListLookup", "Result", "SieveAction", "numeric", "run"]
