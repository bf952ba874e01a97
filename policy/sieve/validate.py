"""Which commands and tests exist, the arguments each takes, and the capability that enables it.

RFC 5228 §3.2: a script names the extensions it uses with ``require``; using a command, test, tag or
comparator of an extension that was not required is an error at compile time (§2.10.5), as are unknown
commands, wrong argument counts and conflicting tags (§8.2). The compiled form (:class:`Node`) has its tagged
arguments sorted into groups (match type, comparator, address part, …) so the interpreter never re-parses.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from postgate.policy.sieve.grammar import Command, Number, Pos, SieveError, StringList, Tag, Test

# The capabilities this interpreter implements (RFC 5228 §3.2 ``require`` names).
CAPABILITIES = frozenset({
    "envelope", "fileinto", "reject", "ereject", "variables", "relational", "subaddress", "editheader",
    "environment", "body", "date", "index", "spamtest", "spamtestplus", "virustest", "extlists", "copy",
    "comparator-i;octet", "comparator-i;ascii-casemap", "comparator-i;ascii-numeric", "vnd.postgate",
})
COMPARATORS = {"i;octet": None, "i;ascii-casemap": None, "i;ascii-numeric": "comparator-i;ascii-numeric"}
RELATIONS = {"gt", "ge", "lt", "le", "eq", "ne"}                  # RFC 5231 §5
DATE_PARTS = {"year", "month", "day", "date", "julian", "hour", "minute", "second", "time", "iso8601",
              "std11", "zone", "weekday"}                       # RFC 5260 §4.2
SET_MODIFIERS = {"lower": 40, "upper": 40, "lowerfirst": 30, "upperfirst": 30, "quotewildcard": 20,
                 "length": 10}                                  # RFC 5229 §4.1: precedence
TLS_LEVELS = ("none", "may", "encrypt", "dane", "dane-only", "fingerprint", "verify", "secure",
              "caps-required")


@dataclass(frozen=True)
class TagSpec:
    group: str
    arg: str | None = None           # "string", "strings", "number" or None
    capability: str | None = None


_MATCH = {"is": TagSpec("match"), "contains": TagSpec("match"), "matches": TagSpec("match"),
          "value": TagSpec("match", "string", "relational"), "count": TagSpec("match", "string", "relational"),
          "list": TagSpec("match", None, "extlists")}
_COMP = {"comparator": TagSpec("comparator", "string")}
_ADDR = {"localpart": TagSpec("addrpart"), "domain": TagSpec("addrpart"), "all": TagSpec("addrpart"),
         "user": TagSpec("addrpart", None, "subaddress"), "detail": TagSpec("addrpart", None, "subaddress")}
_INDEX = {"index": TagSpec("index", "number", "index"), "last": TagSpec("last", None, "index")}
_ZONE = {"zone": TagSpec("zone", "string"), "originalzone": TagSpec("zone")}
_RECIPS = {"recipients": TagSpec("recipients", "strings")}


@dataclass(frozen=True)
class Spec:
    capability: str | None
    positional: tuple[str, ...] = ()        # "string", "strings", "number"
    optional: int = 0                       # how many trailing positionals may be left out
    tags: dict[str, TagSpec] = field(default_factory=dict)
    tests: str = "none"                     # none | one | list
    block: bool = False


COMMANDS: dict[str, Spec] = {
    # RFC 5228 §3 control, §4 actions
    "require": Spec(None, ("strings",)),
    "if": Spec(None, (), 0, {}, "one", True),
    "elsif": Spec(None, (), 0, {}, "one", True),
    "else": Spec(None, (), 0, {}, "none", True),
    "stop": Spec(None),
    "keep": Spec(None),
    "discard": Spec(None),
    "redirect": Spec(None, ("string",), 0, {"copy": TagSpec("copy", None, "copy")}),
    "fileinto": Spec("fileinto", ("string",), 0, {"copy": TagSpec("copy", None, "copy")}),
    "reject": Spec("reject", ("string",)),                              # RFC 5429 §2.2
    "ereject": Spec("ereject", ("string",)),                            # RFC 5429 §2.1
    "set": Spec("variables", ("string", "string"), 0,                   # RFC 5229 §4
                {m: TagSpec("mod:" + m) for m in SET_MODIFIERS}),
    "addheader": Spec("editheader", ("string", "string"), 0, {"last": TagSpec("addlast")}),  # RFC 5293 §4
    "deleteheader": Spec("editheader", ("string", "strings"), 1,                              # RFC 5293 §5
                         {**_MATCH, **_COMP, "index": TagSpec("index", "number"), "last": TagSpec("last")}),
    # vnd.postgate (docs/sieve.md)
    "tls_policy": Spec("vnd.postgate", ("string",), 0, _RECIPS),
    "route": Spec("vnd.postgate", ("string",), 0, _RECIPS),
    "hold": Spec("vnd.postgate", ("string",), 1),
    "defer": Spec("vnd.postgate", ("string",), 0, {"status": TagSpec("status", "string")}),
    "dkim_sign": Spec("vnd.postgate", ("string",), 0, {"selector": TagSpec("selector", "string")}),
    "queue_priority": Spec("vnd.postgate", ("number",), 0, _RECIPS),
    "queue_lifetime": Spec("vnd.postgate", ("number",), 0, _RECIPS),
}

TESTS: dict[str, Spec] = {
    # RFC 5228 §5
    "address": Spec(None, ("strings", "strings"), 0, {**_MATCH, **_COMP, **_ADDR, **_INDEX}),
    "envelope": Spec("envelope", ("strings", "strings"), 0, {**_MATCH, **_COMP, **_ADDR}),
    "header": Spec(None, ("strings", "strings"), 0, {**_MATCH, **_COMP, **_INDEX}),
    "exists": Spec(None, ("strings",)),
    "size": Spec(None, ("number",), 0, {"over": TagSpec("size"), "under": TagSpec("size")}),
    "allof": Spec(None, (), 0, {}, "list"),
    "anyof": Spec(None, (), 0, {}, "list"),
    "not": Spec(None, (), 0, {}, "one"),
    "true": Spec(None),
    "false": Spec(None),
    "string": Spec("variables", ("strings", "strings"), 0, {**_MATCH, **_COMP}),          # RFC 5229 §5
    "environment": Spec("environment", ("string", "strings"), 0, {**_MATCH, **_COMP}),    # RFC 5183 §4
    "body": Spec("body", ("strings",), 0, {**_MATCH, **_COMP, "raw": TagSpec("transform"),  # RFC 5173 §5
                                           "text": TagSpec("transform"),
                                           "content": TagSpec("transform", "strings")}),
    "date": Spec("date", ("string", "string", "strings"), 0, {**_MATCH, **_COMP, **_ZONE, **_INDEX}),
    "currentdate": Spec("date", ("string", "strings"), 0,
                        {**_MATCH, **_COMP, "zone": TagSpec("zone", "string")}),
    "spamtest": Spec("spamtest", ("string",), 0,                                           # RFC 5235 §3
                     {**_MATCH, **_COMP, "percent": TagSpec("percent", None, "spamtestplus")}),
    "virustest": Spec("virustest", ("string",), 0, {**_MATCH, **_COMP}),
    "valid_ext_list": Spec("extlists", ("strings",)),                                    # RFC 6134 §2.5
}


@dataclass
class Node:
    """A checked command or test."""

    name: str
    pos: Pos
    tags: dict[str, tuple[str, Any]] = field(default_factory=dict)   # group -> (tag name, its argument)
    args: list[Any] = field(default_factory=list)                    # str, list[str] or int
    tests: list[Node] = field(default_factory=list)
    block: list[Node] | None = None
    branches: list[tuple[Node | None, list[Node]]] = field(default_factory=list)   # if/elsif/else chain

    def tag(self, group: str) -> str | None:
        t = self.tags.get(group)
        return t[0] if t else None

    def tag_arg(self, group: str) -> Any:
        t = self.tags.get(group)
        return t[1] if t else None


@dataclass
class Script:
    """A compiled script: its commands and the capabilities it required."""

    source: str
    commands: list[Node]
    capabilities: frozenset[str]


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source
        self.caps: set[str] = set()

    def err(self, pos: Pos, msg: str) -> SieveError:
        return SieveError(self.source, pos.line, pos.col, msg)

    def need(self, cap: str | None, pos: Pos, what: str) -> None:
        if cap and cap not in self.caps and not (cap == "spamtest" and "spamtestplus" in self.caps):
            raise self.err(pos, f"{what} needs require \"{cap}\" (RFC 5228 §3.2)")

    def block(self, cmds: list[Command], top: bool) -> list[Node]:
        out: list[Node] = []
        seen_other = False
        i = 0
        while i < len(cmds):
            c = cmds[i]
            if c.name == "require":
                # RFC 5228 §3.2: require only at the start of the script
                if not top or seen_other:
                    raise self.err(c.pos, "require is allowed only at the start of the script")
                node = self.node(c, COMMANDS["require"], "command")
                for cap in node.args[0]:
                    if cap not in CAPABILITIES:
                        raise self.err(c.args[0].pos, f"unsupported capability {cap!r}")  # §3.2
                    self.caps.add(cap)
                    if cap == "spamtestplus":
                        self.caps.add("spamtest")
                i += 1
                continue
            seen_other = True
            if c.name in ("elsif", "else"):
                raise self.err(c.pos, f"{c.name} without a preceding if")   # §3.1
            if c.name == "if":
                chain = Node("if", c.pos)
                first = self.node(c, COMMANDS["if"], "command")
                chain.branches.append((first.tests[0], first.block or []))
                i += 1
                while i < len(cmds) and cmds[i].name in ("elsif", "else"):
                    n = self.node(cmds[i], COMMANDS[cmds[i].name], "command")
                    chain.branches.append((n.tests[0] if n.tests else None, n.block or []))
                    i += 1
                    if cmds[i - 1].name == "else":
                        break
                out.append(chain)
                continue
            spec = COMMANDS.get(c.name)
            if spec is None:
                raise self.err(c.pos, f"unknown command {c.name!r}")       # §8.2
            out.append(self.node(c, spec, "command"))
            i += 1
        return out

    def node(self, c: Command | Test, spec: Spec, kind: str) -> Node:
        self.need(spec.capability, c.pos, f"{kind} {c.name}")
        node = Node(c.name, c.pos)
        positional: list[Any] = []
        args = c.args
        j = 0
        while j < len(args):
            a = args[j]
            if isinstance(a, Tag):
                if positional:
                    raise self.err(a.pos, f"tagged argument :{a.name} after positional arguments (§2.6.2)")
                ts = spec.tags.get(a.name)
                if ts is None:
                    raise self.err(a.pos, f"unknown tagged argument :{a.name} for {kind} {c.name}")
                self.need(ts.capability, a.pos, f":{a.name}")
                if ts.group in node.tags:
                    raise self.err(a.pos, f":{a.name} conflicts with :{node.tags[ts.group][0]} (§2.6.2)")
                value: Any = None
                if ts.arg:
                    j += 1
                    if j >= len(args):
                        raise self.err(a.pos, f":{a.name} needs an argument")
                    value = self.value(args[j], ts.arg, f":{a.name}")
                node.tags[ts.group] = (a.name, value)
            else:
                positional.append(self.value(a, "any", c.name))
            j += 1
        need = len(spec.positional)
        if not need - spec.optional <= len(positional) <= need:
            raise self.err(c.pos, f"{kind} {c.name} takes {need} positional argument(s), got {len(positional)}")
        pos_args = [x for x in _positional(args, spec)]
        for want, a in zip(spec.positional, pos_args, strict=False):
            node.args.append(self.value(a, want, c.name))
        if spec.tests == "none" and c.tests:
            raise self.err(c.tests[0].pos, f"{c.name} takes no test")
        if spec.tests == "one" and len(c.tests) != 1:
            raise self.err(c.pos, f"{c.name} takes exactly one test")
        if spec.tests == "list" and not c.tests:
            raise self.err(c.pos, f"{c.name} needs a list of tests")
        for t in c.tests:
            tspec = TESTS.get(t.name)
            if tspec is None:
                raise self.err(t.pos, f"unknown test {t.name!r}")
            node.tests.append(self.node(t, tspec, "test"))
        if isinstance(c, Command):
            if spec.block and c.block is None:
                raise self.err(c.pos, f"{c.name} needs a block {{ … }}")
            if not spec.block and c.block is not None:
                raise self.err(c.pos, f"{c.name} takes no block")
            if c.block is not None:
                node.block = self.block(c.block, False)
        self.semantics(node)
        return node

    def value(self, a: Any, want: str, what: str) -> Any:
        if want == "any":
            return a
        if want == "number":
            if not isinstance(a, Number):
                raise self.err(a.pos, f"{what}: expected a number")
            return a.value
        if not isinstance(a, StringList):
            raise self.err(a.pos, f"{what}: expected a string{' list' if want == 'strings' else ''}")
        if want == "string":
            if not a.single and len(a.values) != 1:
                raise self.err(a.pos, f"{what}: expected a single string, not a list")
            return a.values[0]
        return list(a.values)

    def semantics(self, n: Node) -> None:
        comp = n.tag_arg("comparator")
        if comp is not None:
            if comp not in COMPARATORS:
                raise self.err(n.pos, f"unknown comparator {comp!r} (RFC 5228 §2.7.3)")
            self.need(COMPARATORS[comp], n.pos, f"comparator {comp}")
            if comp == "i;ascii-numeric" and n.tag("match") in ("contains", "matches"):
                # RFC 4790 §9.1: i;ascii-numeric offers equality and ordering, not substring
                raise self.err(n.pos, f"comparator i;ascii-numeric does not support :{n.tag('match')}")
        if n.tag("match") in ("value", "count") and str(n.tag_arg("match")).lower() not in RELATIONS:
            raise self.err(n.pos, f"relational operator {n.tag_arg('match')!r} is not one of "
                           f"{', '.join(sorted(RELATIONS))} (RFC 5231 §5)")
        if "last" in n.tags and "index" not in n.tags:
            raise self.err(n.pos, ":last needs :index (RFC 5260 §6)")
        if "index" in n.tags and n.tag_arg("index") < 1:
            raise self.err(n.pos, ":index must be at least 1")
        if n.name == "size" and "size" not in n.tags:
            raise self.err(n.pos, "size needs :over or :under (RFC 5228 §5.9)")
        if n.name in ("date", "currentdate"):
            part = n.args[-2] if n.name == "currentdate" else n.args[1]
            if part.lower() not in DATE_PARTS and "$" not in part:
                raise self.err(n.pos, f"unknown date part {part!r} (RFC 5260 §4.2)")
        if n.name == "envelope":
            for part in n.args[0]:
                if part.lower() not in ("from", "to") and "$" not in part:
                    raise self.err(n.pos, f"envelope part {part!r} is not from or to (RFC 5228 §5.4)")
        if n.name == "tls_policy" and n.args[0].lower() not in TLS_LEVELS and "$" not in n.args[0]:
            raise self.err(n.pos, f"unknown TLS level {n.args[0]!r} (one of {', '.join(TLS_LEVELS)})")
        if n.name == "set":
            prec: dict[int, str] = {}
            for g in n.tags:
                m = g[4:]
                p = SET_MODIFIERS[m]
                if p in prec:
                    # RFC 5229 §4.1: two modifiers of the same precedence are an error
                    raise self.err(n.pos, f":{m} and :{prec[p]} cannot be used together")
                prec[p] = m
            if not _valid_var_name(n.args[0]):
                raise self.err(n.pos, f"invalid variable name {n.args[0]!r} (RFC 5229 §3)")
        if n.name in ("addheader", "deleteheader"):
            name = n.args[0]
            if "$" not in name and not valid_field_name(name):
                raise self.err(n.pos, f"invalid header field name {name!r} (RFC 5322 §3.6.8)")
        if n.name == "route" and "$" not in n.args[0]:
            from postgate.policy.maps import MapError, parse_relay
            try:
                parse_relay(n.args[0], "route")
            except MapError as e:
                raise self.err(n.pos, f"{e} (transport-map syntax: smtp:[host]:port)") from e
        if n.name == "defer":
            st = n.tag_arg("status")
            if st is not None and not _valid_status(st, "4"):
                raise self.err(n.pos, f"defer :status {st!r} is not a 4.x.y enhanced status code")
        if n.name in ("queue_priority",) and not 0 <= n.args[0] <= 9:
            raise self.err(n.pos, "queue_priority is 0 (lowest) to 9 (highest)")
        if n.name == "queue_lifetime" and not 60 <= n.args[0] <= 30 * 86400:
            raise self.err(n.pos, "queue_lifetime is between 60 seconds and 30 days")


def _positional(args: list[Any], spec: Spec) -> list[Any]:
    out: list[Any] = []
    j = 0
    while j < len(args):
        a = args[j]
        if isinstance(a, Tag):
            ts = spec.tags.get(a.name)
            j += 2 if ts and ts.arg else 1
            continue
        out.append(a)
        j += 1
    return out


def _valid_var_name(name: str) -> bool:
    return bool(name) and name.isascii() and all(p and (p[0].isalpha() or p[0] == "_") and all(ch.isascii() and
                              (ch.isalnum() or ch == "_") for ch in p) for p in name.split("."))


def valid_field_name(name: str) -> bool:
    return bool(name) and all(33 <= ord(ch) <= 126 and ch != ":" for ch in name)


def _valid_status(st: str, cls: str) -> bool:
    parts = st.split(".")
    return len(parts) == 3 and parts[0] == cls and all(p.isascii() and p.isdigit() and len(p) <= 3 for p in parts[1:])


def check(commands: list[Command], source: str) -> Script:
    c = _Checker(source)
    nodes = c.block(commands, True)
    return Script(source, nodes, frozenset(c.caps))
