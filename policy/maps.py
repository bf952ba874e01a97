"""Lookup tables in Postfix's syntax: TLS policy maps and transport (relay) maps.

A Postfix table file has one ``key value`` entry per logical line; a line starting with white space
continues the previous one; blank lines and lines starting with ``#`` are ignored (postmap(1)). Keys are
case-insensitive. So an existing ``smtp_tls_policy_maps`` file loads as it is.

TLS policy lookup (Postfix TLS_README, "TLS policy table"): the key is the next-hop destination — a
domain (``example.com``), then its parent domains written with a leading dot (``.example.com`` matches
any subdomain), or for a bracketed destination ``[mx.example.com]:port`` (``[mx.example.com]`` when the
port is 25). The value is a security level followed by ``name=value`` attributes.

Transport (relay) lookup: ``example.com  smtp:[relay.example.net]:587`` sends that domain's mail through a
smart host; the key ``*`` matches every domain.

A bad line is refused at load with ``file:line`` and the reason; :meth:`Table.reload_if_changed`
re-reads a file whose modification time or size changed, keeping the old table if the new one is bad.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from postgate.policy.tls import Level, Policy

V = TypeVar("V")

ATTRIBUTES = {"match", "protocols", "ciphers", "exclude", "tafile", "connection_reuse", "servername",
              "enable_rpk"}


class MapError(ValueError):
    """A table problem phrased as ``file:line: reason``."""


def logical_lines(text: str, source: str) -> list[tuple[int, str, str]]:
    """(line number, key, value) of each entry, with continuation lines joined (postmap(1) rules)."""
    out: list[tuple[int, str, str]] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if raw[0] in " \t":
            if not out:
                raise MapError(f"{source}:{lineno}: continuation line without an entry before it")
            n, k, v = out[-1]
            out[-1] = (n, k, f"{v} {stripped}".strip())
            continue
        parts = stripped.split(None, 1)
        out.append((lineno, parts[0].lower(), parts[1] if len(parts) > 1 else ""))
    return out


class Table(Generic[V]):
    """A Postfix-syntax table file whose values are parsed by :meth:`parse_value`."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.entries: dict[str, V] = {}
        self._stamp: tuple[float, int] | None = None
        self.load()

    def parse_value(self, key: str, value: str, where: str) -> V:
        raise NotImplementedError

    def check_key(self, key: str, where: str) -> None:
        if not key:
            raise MapError(f"{where}: empty key")

    def load(self) -> None:
        try:
            st = self.path.stat()
            text = self.path.read_text()
        except OSError as e:
            raise MapError(f"{self.path}: cannot read table: {e.strerror}") from e
        entries: dict[str, V] = {}
        for lineno, key, value in logical_lines(text, str(self.path)):
            where = f"{self.path}:{lineno}"
            self.check_key(key, where)
            if not value:
                raise MapError(f"{where}: key {key!r} has no value")
            if key in entries:
                raise MapError(f"{where}: duplicate key {key!r}")
            entries[key] = self.parse_value(key, value, where)
        self.entries = entries
        self._stamp = (st.st_mtime, st.st_size)

    def reload_if_changed(self) -> bool:
        """Re-read the file if it changed; a bad new version raises MapError and the old table stays."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise MapError(f"{self.path}: cannot read table: {e.strerror}") from e
        if self._stamp == (st.st_mtime, st.st_size):
            return False
        self.load()
        return True


def _domain_keys(domain: str) -> list[str]:
    d = domain.rstrip(".").lower()
    keys = [d]
    labels = d.split(".")
    for i in range(1, len(labels)):
        keys.append("." + ".".join(labels[i:]))
    return keys


class TlsPolicyMap(Table[Policy]):
    """``smtp_tls_policy_maps``: destination -> level and attributes."""

    def check_key(self, key: str, where: str) -> None:
        if key.startswith("["):
            host, sep, rest = key[1:].partition("]")
            if not sep or not host or (rest and not (rest.startswith(":") and rest[1:].isdigit())):
                raise MapError(f"{where}: bad key {key!r}: expected [host] or [host]:port")
        elif not all(c.isalnum() or c in "-._" for c in key) or ".." in key:
            raise MapError(f"{where}: bad key {key!r}: expected a domain, .domain or [host]:port")

    def parse_value(self, key: str, value: str, where: str) -> Policy:
        words = value.split()
        try:
            level = Level(words[0].lower())
        except ValueError:
            names = ", ".join(lv.value for lv in Level)
            raise MapError(f"{where}: unknown security level {words[0]!r} (one of {names})") from None
        match: list[str] = []
        attrs: dict[str, str] = {}
        for w in words[1:]:
            name, eq, val = w.partition("=")
            name = name.lower()
            if not eq or not val:
                raise MapError(f"{where}: attribute {w!r} must be name=value")
            if name not in ATTRIBUTES:
                known = ", ".join(sorted(ATTRIBUTES))
                raise MapError(f"{where}: unknown attribute {name!r} (one of {known})")
            if name == "match":
                # Postfix: fingerprints are separated by '|', names by ':'
                sep = "|" if level is Level.FINGERPRINT else ":"
                match += [m for m in val.split(sep) if m]
            else:
                attrs[name] = val
        if match and level not in (Level.FINGERPRINT, Level.VERIFY, Level.SECURE):
            raise MapError(f"{where}: match= applies only to fingerprint, verify and secure")
        if level is Level.FINGERPRINT:
            for fp in match:
                hexed = fp.replace(":", "")
                if len(hexed) not in (64, 128) or any(c not in "0123456789abcdefABCDEF" for c in hexed):
                    raise MapError(f"{where}: fingerprint {fp!r} is not a SHA-256 or SHA-512 digest")
            if not match:
                raise MapError(f"{where}: fingerprint level needs match= fingerprints")
        return Policy(level, tuple(match), attrs.get("protocols", ""), attrs.get("ciphers", ""), where)

    def lookup(self, destination: str, port: int = 25, bracketed: bool = False) -> Policy | None:
        if bracketed:
            host = destination.rstrip(".").lower()
            for k in ([f"[{host}]:{port}", f"[{host}]"] if port == 25 else [f"[{host}]:{port}"]):
                if k in self.entries:
                    return self.entries[k]
            return None
        for k in _domain_keys(destination):
            if k in self.entries:
                return self.entries[k]
        return None


@dataclass(frozen=True)
class Relay:
    """A smart host: ``[host]:port`` (no MX lookup) or ``host:port`` (MX lookup)."""

    host: str
    port: int = 25
    mx: bool = False

    def text(self) -> str:
        return f"{self.host}:{self.port}" if self.mx else f"[{self.host}]:{self.port}"


def parse_relay(spec: str, where: str = "relay") -> Relay:
    s = spec.strip()
    if s.startswith("smtp:"):
        s = s[5:]
    if s.startswith("["):
        host, sep, rest = s[1:].partition("]")
        if not sep or not host:
            raise MapError(f"{where}: bad relay {spec!r}: expected [host]:port")
        port = rest[1:] if rest.startswith(":") else ("25" if not rest else "x")
        if not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:  # "5²87" is no port
            raise MapError(f"{where}: bad port in relay {spec!r}")
        return Relay(host.lower().rstrip("."), int(port), mx=False)
    host, _, port = s.partition(":")
    if not host or (port and not (port.isascii() and port.isdigit() and 0 < int(port) < 65536)):
        raise MapError(f"{where}: bad relay {spec!r}: expected [host]:port or host:port")
    return Relay(host.lower().rstrip("."), int(port or 25), mx=True)


class TransportMap(Table[Relay]):
    """Per-domain smart hosts: ``example.com smtp:[relay.example.net]:587``; ``*`` for every domain."""

    def parse_value(self, key: str, value: str, where: str) -> Relay:
        return parse_relay(value.split()[0], where)

    def lookup(self, domain: str) -> Relay | None:
        for k in [*_domain_keys(domain), "*"]:
            if k in self.entries:
                return self.entries[k]
        return None


class SaslPasswordMap(Table[tuple[str, str]]):
    """Postfix ``smtp_sasl_password_maps``: ``[relay.example.net]:587  username:password``.

    The file must not be readable by group or others: it holds passwords."""

    def load(self) -> None:
        try:
            mode = self.path.stat().st_mode
        except OSError as e:
            raise MapError(f"{self.path}: cannot read table: {e.strerror}") from e
        if mode & 0o077:
            raise MapError(f"{self.path}: holds passwords but is readable by group or others "
                           f"(mode {mode & 0o777:o}); chmod 600 it")
        super().load()

    def parse_value(self, key: str, value: str, where: str) -> tuple[str, str]:
        user, sep, password = value.partition(":")
        if not sep or not user:
            raise MapError(f"{where}: expected username:password")
        return user, password

    def lookup(self, relay: Relay) -> tuple[str, str] | None:
        for k in (relay.text(), f"[{relay.host}]", relay.host):
            if k in self.entries:
                return self.entries[k]
        return None
