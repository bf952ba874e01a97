"""Sieve's grammar (RFC 5228 §8): lexer and parser with file:line:col positions.

A Sieve script is a list of *commands*. A command is an identifier, then arguments, then either ``;`` or a
block ``{ … }``. Arguments are strings (``"quoted"`` or ``text:`` multi-line), string lists
(``["a", "b"]``), numbers (with an optional ``K``/``M``/``G`` multiplier, §2.4.1) and tagged arguments
(``:is``); after them may come one *test* or a parenthesised list of tests. A test has the same shape as a
command without the block. Comments are ``#`` to the end of the line or ``/* … */`` (§2.3).

Why not PyPI ``sievelib`` (MIT): its parser reports errors as ``line N`` only (no column, and the line
of the lexer's position rather than of the offending token), and its command table is fixed in the
library, so ``vnd.postgate``, editheader, extlists and friends would need patching it. A hand-written
recursive-descent parser of §8's small grammar is shorter than that adaptation and gives exact positions.

This module only builds the tree; which commands exist and which arguments they take is checked by
:mod:`postgate.policy.sieve.validate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_NESTING = 32          # RFC 5228 §2.10.6: implementations may limit nesting; deep trees are refused
MAX_SCRIPT_SIZE = 1 << 20


class SieveError(Exception):
    """A compile error at ``file:line:col``."""

    def __init__(self, source: str, line: int, col: int, message: str) -> None:
        super().__init__(f"{source}:{line}:{col}: {message}")
        self.source, self.line, self.col, self.message = source, line, col, message


@dataclass(frozen=True)
class Pos:
    line: int
    col: int


@dataclass
class Tag:
    name: str             # lower-case, without the colon
    pos: Pos


@dataclass
class Number:
    value: int
    pos: Pos


@dataclass
class StringList:
    values: list[str]
    pos: Pos
    single: bool          # written as one string, not a bracketed list


Arg = Tag | Number | StringList


@dataclass
class Test:
    name: str
    args: list[Arg]
    tests: list[Test]
    pos: Pos


@dataclass
class Command:
    name: str
    args: list[Arg]
    tests: list[Test]
    block: list[Command] | None
    pos: Pos


@dataclass
class _Tok:
    kind: str             # ident tag number string [ ] ( ) { } , ; eof
    value: str | int
    pos: Pos
    extra: dict[str, object] = field(default_factory=dict)


_MULT = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def _lex(text: str, source: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i, n, line, lstart = 0, len(text), 1, 0

    def err(msg: str, at: int | None = None, ln: int | None = None, ls: int | None = None) -> SieveError:
        p = i if at is None else at
        return SieveError(source, ln or line, p - (lstart if ls is None else ls) + 1, msg)

    while i < n:
        c = text[i]
        if c == "\n":
            i += 1
            line, lstart = line + 1, i
            continue
        if c in " \t\r":
            i += 1
            continue
        pos = Pos(line, i - lstart + 1)
        if c == "#":                                  # §8.1 hash-comment
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        if text.startswith("/*", i):                  # §8.1 bracket-comment
            j = text.find("*/", i + 2)
            if j < 0:
                raise err("unterminated /* comment")
            for k in range(i, j):
                if text[k] == "\n":
                    line, lstart = line + 1, k + 1
            i = j + 2
            continue
        if c.isascii() and (c.isalpha() or c == "_"):
            j = i + 1
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            if word.lower() == "text" and j < n and text[j] == ":":   # §2.4.2 multi-line string
                k = j + 1
                while k < n and text[k] in " \t":
                    k += 1
                if text.startswith("#", k):
                    e = text.find("\n", k)
                    k = n if e < 0 else e
                if text.startswith("\r\n", k):
                    k += 1
                if k >= n or text[k] != "\n":
                    raise err("text: must be followed by a line break")
                k += 1
                line, lstart = line + 1, k
                lines: list[str] = []
                while True:
                    if k >= n:
                        raise SieveError(source, pos.line, pos.col, "unterminated text: string (no '.' line)")
                    e = text.find("\n", k)
                    raw = text[k:n if e < 0 else e].rstrip("\r")
                    k = n if e < 0 else e + 1
                    line, lstart = line + 1, k
                    if raw == ".":
                        break
                    if raw.startswith(".."):          # §2.4.2: dot-stuffing
                        raw = raw[1:]
                    lines.append(raw + "\r\n")
                toks.append(_Tok("string", "".join(lines), pos))
                i = k
                continue
            toks.append(_Tok("ident", word.lower(), pos))
            i = j
            continue
        if c == ":":
            j = i + 1
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            if j == i + 1 or "0" <= text[i + 1] <= "9":
                raise err("':' must be followed by a tag name")
            toks.append(_Tok("tag", text[i + 1:j].lower(), pos))
            i = j
            continue
        if "0" <= c <= "9":
            j = i
            while j < n and "0" <= text[j] <= "9":
                j += 1
            value = int(text[i:j])
            if j < n and text[j].lower() in _MULT:    # §2.4.1 quantifiers
                value *= _MULT[text[j].lower()]
                j += 1
            if value >= 1 << 63:
                raise err("number too large")
            toks.append(_Tok("number", value, pos))
            i = j
            continue
        if c == '"':                                  # §2.4.2 quoted string
            j = i + 1
            out: list[str] = []
            sline, slstart = line, lstart
            while True:
                if j >= n:
                    raise SieveError(source, pos.line, pos.col, "unterminated string")
                ch = text[j]
                if ch == '"':
                    break
                if ch == "\\" and j + 1 < n:
                    # §2.4.2: \" and \\ are the escapes; any other escaped character stands for itself
                    out.append(text[j + 1])
                    if text[j + 1] == "\n":
                        line, lstart = line + 1, j + 2
                    j += 2
                    continue
                if ch == "\n":
                    line, lstart = line + 1, j + 1
                    # §2.4.2: a quoted string may span lines; bare LF is taken as CRLF
                    if not out or out[-1] != "\r":
                        out.append("\r")
                out.append(ch)
                j += 1
            del sline, slstart
            toks.append(_Tok("string", "".join(out), pos))
            i = j + 1
            continue
        if c in "[](){},;":
            toks.append(_Tok(c, c, pos))
            i += 1
            continue
        raise err(f"unexpected character {c!r}")
    toks.append(_Tok("eof", "", Pos(line, i - lstart + 1)))
    return toks


class _Parser:
    def __init__(self, toks: list[_Tok], source: str) -> None:
        self.toks, self.i, self.source = toks, 0, source

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def err(self, tok: _Tok, msg: str) -> SieveError:
        return SieveError(self.source, tok.pos.line, tok.pos.col, msg)

    def expect(self, kind: str, what: str) -> _Tok:
        t = self.take()
        if t.kind != kind:
            shown = "end of script" if t.kind == "eof" else repr(t.value)
            raise self.err(t, f"expected {what}, found {shown}")
        return t

    def commands(self, depth: int, closing: str, opened: Pos | None = None) -> list[Command]:
        out: list[Command] = []
        while self.peek().kind != closing:
            if self.peek().kind == "eof" and opened is not None:
                raise self.err(self.peek(), f"missing '}}' for the block opened at line {opened.line} "
                               f"column {opened.col}")
            out.append(self.command(depth))
        return out

    def command(self, depth: int) -> Command:
        t = self.expect("ident", "a command")
        if depth > MAX_NESTING:
            raise self.err(t, f"blocks nested more than {MAX_NESTING} deep")
        args, tests = self.arguments(depth)
        nxt = self.take()
        if nxt.kind == ";":
            return Command(str(t.value), args, tests, None, t.pos)
        if nxt.kind == "{":
            block = self.commands(depth + 1, "}", nxt.pos)
            self.expect("}", "'}'")
            return Command(str(t.value), args, tests, block, t.pos)
        shown = "end of script" if nxt.kind == "eof" else repr(nxt.value)
        raise self.err(nxt, f"expected ';' or '{{' after command {t.value}, found {shown}")

    def arguments(self, depth: int) -> tuple[list[Arg], list[Test]]:
        args: list[Arg] = []
        while True:
            t = self.peek()
            if t.kind == "tag":
                self.take()
                args.append(Tag(str(t.value), t.pos))
            elif t.kind == "number":
                self.take()
                args.append(Number(int(t.value), t.pos))
            elif t.kind == "string":
                self.take()
                args.append(StringList([str(t.value)], t.pos, True))
            elif t.kind == "[":
                self.take()
                values = [str(self.expect("string", "a string").value)]
                while self.peek().kind == ",":
                    self.take()
                    values.append(str(self.expect("string", "a string").value))
                self.expect("]", "',' or ']'")
                args.append(StringList(values, t.pos, False))
            else:
                break
        tests: list[Test] = []
        t = self.peek()
        if t.kind == "(":
            self.take()
            tests.append(self.test(depth + 1))
            while self.peek().kind == ",":
                self.take()
                tests.append(self.test(depth + 1))
            self.expect(")", "',' or ')'")
        elif t.kind == "ident":
            tests.append(self.test(depth + 1))
        return args, tests

    def test(self, depth: int) -> Test:
        t = self.expect("ident", "a test")
        if depth > MAX_NESTING:
            raise self.err(t, f"tests nested more than {MAX_NESTING} deep")
        args, tests = self.arguments(depth)
        return Test(str(t.value), args, tests, t.pos)


def parse(text: str, source: str = "<script>") -> list[Command]:
    """Parse a script into commands; raises :class:`SieveError` with file:line:col."""
    if len(text) > MAX_SCRIPT_SIZE:
        raise SieveError(source, 1, 1, f"script larger than {MAX_SCRIPT_SIZE} characters")
    p = _Parser(_lex(text, source), source)
    cmds = p.commands(0, "eof")
    return cmds
