"""Comparators and match types (RFC 5228 §2.7, RFC 4790, RFC 5231, RFC 5229 §3.2).

A test compares *values* (from the message, the envelope, the session) with *keys* (from the script).
The *match type* says how — ``:is`` (equal), ``:contains`` (substring), ``:matches`` (wildcards ``*`` and
``?``, with ``\\`` quoting) — and the *comparator* what "equal" means: ``i;octet`` compares code points,
``i;ascii-casemap`` (the default, §2.7.3) folds ASCII letters, ``i;ascii-numeric`` (RFC 4790 §9.1) compares
the leading decimal digits as a number (no digits: positive infinity). Relational (RFC 5231) adds ``:value
"gt"`` (order each value against each key) and ``:count "ge"`` (order the number of values).

``:matches`` runs in time linear in the pattern times the text (no backtracking explosion): the classic
wildcard algorithm that only ever backtracks to the last ``*``. It records what each wildcard matched, so a
successful match sets the match variables ``${1}``… (RFC 5229 §3.2), each ``*`` as short as possible from
the left — Pigeonhole's behaviour too.
"""

from __future__ import annotations

from collections.abc import Callable

_UPPER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def casemap(s: str) -> str:
    """RFC 4790 §9.2: only ASCII letters are folded."""
    return s.translate(_UPPER)


def numeric(s: str) -> float:
    """RFC 4790 §9.1: the number of the leading digits; no leading digit is positive infinity."""
    i = 0
    while i < len(s) and "0" <= s[i] <= "9":
        i += 1
    return float("inf") if i == 0 else int(s[:i])


def _fold(comparator: str) -> Callable[[str], str]:
    return casemap if comparator == "i;ascii-casemap" else (lambda s: s)


def compile_glob(pattern: str) -> list[tuple[str, str]]:
    """``:matches`` pattern → tokens: ("*", ""), ("?", ""), ("c", char). ``\\x`` quotes x (RFC 5228 §2.7.1)."""
    out: list[tuple[str, str]] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\" and i + 1 < len(pattern):
            out.append(("c", pattern[i + 1]))
            i += 2
            continue
        if c == "*":
            out.append(("*", ""))
        elif c == "?":
            out.append(("?", ""))
        else:
            out.append(("c", c))
        i += 1
    return out


def glob(pattern: str, text: str, comparator: str) -> list[str] | None:
    """Match ``text`` against a ``:matches`` pattern; the wildcards' matches (``${1}``…) or None."""
    fold = _fold(comparator)
    toks = [(k, fold(v)) for k, v in compile_glob(pattern)]
    t = fold(text)
    n, m = len(t), len(toks)
    # spans[k] = (start, end) of what wildcard token k matched
    spans: dict[int, tuple[int, int]] = {}
    p = s = 0
    star_p, star_s = -1, -1
    while s < n or p < m:
        if p < m:
            kind, ch = toks[p]
            if kind == "*":
                star_p, star_s = p, s
                spans[p] = (s, s)
                p += 1
                continue
            if s < n and (kind == "?" or ch == t[s]):
                if kind == "?":
                    spans[p] = (s, s + 1)
                p += 1
                s += 1
                continue
        if star_p >= 0 and star_s < n:
            # extend the most recent '*' by one character and retry after it
            star_s += 1
            spans[star_p] = (spans[star_p][0], star_s)
            p, s = star_p + 1, star_s
            for k in [k for k in spans if k > star_p]:
                del spans[k]
            continue
        return None
    return [text[a:b] for _, (a, b) in sorted(spans.items())]


def order(a: str, b: str, comparator: str) -> int:
    """-1, 0, 1: ``a`` against ``b`` under the comparator's ordering (RFC 4790 §4.2)."""
    if comparator == "i;ascii-numeric":
        m, n = numeric(a), numeric(b)
        return (m > n) - (m < n)
    if comparator == "i;ascii-casemap":
        a, b = casemap(a), casemap(b)
    x, y = a.encode("utf-8", "surrogateescape"), b.encode("utf-8", "surrogateescape")
    return (x > y) - (x < y)


_REL: dict[str, Callable[[int], bool]] = {
    "gt": lambda c: c > 0, "ge": lambda c: c >= 0, "lt": lambda c: c < 0, "le": lambda c: c <= 0,
    "eq": lambda c: c == 0, "ne": lambda c: c != 0}


def relation(op: str, a: str, b: str, comparator: str) -> bool:
    """RFC 5231 §5: ``a OP b`` under the comparator."""
    return _REL[op.lower()](order(a, b, comparator))


def match_one(match: str, value: str, key: str, comparator: str, rel: str | None = None) -> list[str] | None:
    """One value against one key. Returns None (no match), or the match variables (``[]`` when there are
    none): ``${0}`` is the whole value, then each wildcard's match."""
    if match == "is":
        if comparator == "i;ascii-numeric":
            return [] if numeric(value) == numeric(key) else None
        f = _fold(comparator)
        return [] if f(value) == f(key) else None
    if match == "contains":
        f = _fold(comparator)
        return [] if f(key) in f(value) else None
    if match == "matches":
        caps = glob(key, value, comparator)
        return None if caps is None else [value, *caps]
    if match == "value":
        assert rel is not None
        return [] if relation(rel, value, key, comparator) else None
    raise ValueError(match)
