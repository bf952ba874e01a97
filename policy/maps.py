"""Lookup tables in Postfix's syntax: TLS policy maps and transport (relay) maps.

A Postfix table file has one ``key value`` entry per logical line; a line starting with white space
continues the previous one; blank lines and lines starting with ``#`` are ignored (postmap(1)). Keys are
case-insensitive. So an existing ``smtp_tls_policy_maps`` file loads as it is.

TLS policy lookup (Postfix TLS_README, "TLS policy table"): the key is the next-hop destination — a
domain (``example.com``), then its parent domains written with a leading dot (``.example.com`` matches
any subdomain), or for a bracketed destination ``[mx.example.com]:port`` (``[mx.example.com]`` when the
port is 25). The value is a security level followed by ``name=value`` attributes, each enforced as
Postfix does or refused at load (:func:`parse_attributes`): ``match``, ``protocols``, ``ciphers``,
``exclude``, ``servername``, ``connection_reuse``, ``tafile`` (``enable_rpk=yes`` is refused: raw public
keys are not supported).

Transport (relay) lookup: ``example.com  smtp:[relay.example.net]:587`` sends that domain's mail through a
smart host; the key ``*`` matches every domain.

A bad line is refused at load with ``file:line`` and the reason; :meth:`Table.reload_if_changed`
re-reads a file whose modification time or size changed, keeping the old table if the new one is bad.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Generic, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from postgate.policy.tls import ALL_PROTOCOLS, CIPHER_GRADES, TLS_VERSIONS, Level, Policy, TlsParams, tafile_anchor
from postgate.policy.vocab import Tlsa

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
        return parse_attributes(level, words[1:], where)

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


_LIST = re.compile(r"[\s,:]+")
_CIPHER_NAME = re.compile(r"^[A-Za-z0-9+_.=@-]+$")
_LABEL = r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"^(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?$")


def parse_protocols(text: str, where: str) -> tuple[str, ...]:
    """Postfix ``protocols=`` (postconf(5) smtp_tls_mandatory_protocols): names to include, ``!name`` to
    exclude, ``>=name``/``<=name`` bounds; separated by white space, commas or colons. What is left must
    include TLS 1.2 or 1.3: RFC 8996 deprecates everything older, and Postgate never negotiates it."""
    order = [p.lower() for p in ALL_PROTOCOLS]
    include: list[int] = []
    exclude: set[int] = set()
    low, high = 0, len(order) - 1
    for item in (i for i in _LIST.split(text) if i):
        op = ""
        for prefix in (">=", "<=", "!"):
            if item.startswith(prefix):
                op, item = prefix, item[len(prefix):]
                break
        if item.lower() not in order:
            raise MapError(f"{where}: protocols: unknown protocol {op + item!r} (one of {', '.join(ALL_PROTOCOLS)})")
        idx = order.index(item.lower())
        if op == ">=":
            low = max(low, idx)
        elif op == "<=":
            high = min(high, idx)
        elif op == "!":
            exclude.add(idx)
        else:
            include.append(idx)
    allowed = [i for i in (include or range(len(order))) if low <= i <= high and i not in exclude]
    versions = tuple(v for v in TLS_VERSIONS if order.index(v.lower()) in allowed)
    if not versions:
        raise MapError(f"{where}: protocols={text} leaves no protocol Postgate may use "
                       f"(only {' and '.join(TLS_VERSIONS)}: RFC 8996)")
    return versions


def load_tafile(path: str, where: str) -> tuple[Tlsa, ...]:
    """Postfix ``tafile=``: PEM trust-anchor certificates and/or public keys, each a synthetic DANE-TA
    record (Postfix tls_dane.c; RFC 7671 §5.2.2: a full certificate or key is its own anchor)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise MapError(f"{where}: tafile {path}: {e.strerror}") from e
    out: list[Tlsa] = []
    for m in re.finditer(rb"-----BEGIN ([A-Z ]+)-----.*?-----END \1-----", data, re.S):
        kind = m.group(1)
        try:
            if kind in (b"CERTIFICATE", b"TRUSTED CERTIFICATE"):
                cert = x509.load_pem_x509_certificate(m.group(0).replace(b"TRUSTED ", b""))
                out.append(tafile_anchor(cert.public_bytes(serialization.Encoding.DER), public_key=False))
            elif kind == b"PUBLIC KEY":
                key = serialization.load_pem_public_key(m.group(0))
                out.append(tafile_anchor(key.public_bytes(serialization.Encoding.DER,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo),
                                         public_key=True))
        except ValueError as e:
            raise MapError(f"{where}: tafile {path}: unreadable {kind.decode()}: {e}") from e
    if not out:
        raise MapError(f"{where}: tafile {path}: no PEM certificate or public key in it")
    return tuple(out)


def parse_attributes(level: Level, words: list[str], where: str) -> Policy:
    """A level's ``name=value`` attributes as a :class:`Policy`; anything Postgate cannot enforce as
    Postfix does is refused with ``where`` (file:line)."""
    match: list[str] = []
    attrs: dict[str, str] = {}
    for w in words:
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
    protocols = parse_protocols(attrs["protocols"], where) if "protocols" in attrs else TLS_VERSIONS
    grade = attrs.get("ciphers", "").lower()
    if grade and grade not in CIPHER_GRADES:
        raise MapError(f"{where}: ciphers: unknown grade {attrs['ciphers']!r} (one of {', '.join(CIPHER_GRADES)})")
    exclude = tuple(x for x in _LIST.split(attrs.get("exclude", "")) if x)
    for x in exclude:
        if not _CIPHER_NAME.match(x):
            raise MapError(f"{where}: exclude: {x!r} is not an OpenSSL cipher name")
    servername = attrs.get("servername", "")
    if servername and servername not in ("hostname", "nexthop") and not _HOSTNAME.match(servername):
        raise MapError(f"{where}: servername: {servername!r} is not hostname, nexthop or a host name")
    reuse: bool | None = None
    if "connection_reuse" in attrs:
        reuse = _boolean(attrs["connection_reuse"], "connection_reuse", where)
    if "enable_rpk" in attrs and _boolean(attrs["enable_rpk"], "enable_rpk", where):
        raise MapError(f"{where}: enable_rpk=yes: raw public keys (RFC 7250) are not supported")
    tafile: tuple[Tlsa, ...] = ()
    if "tafile" in attrs:
        # Postfix: trust anchors apply to the verify and secure levels (DANE has its own TLSA records)
        if level not in (Level.VERIFY, Level.SECURE):
            raise MapError(f"{where}: tafile= applies only to verify and secure")
        tafile = tuple(t for f in _LIST.split(attrs["tafile"].replace(":", " ")) if f
                       for t in load_tafile(f, where))
    return Policy(level, tuple(match), TlsParams(protocols, grade, exclude), servername.lower(), reuse, tafile,
                  where)


def _boolean(value: str, name: str, where: str) -> bool:
    v = value.lower()
    if v in ("yes", "true"):
        return True
    if v in ("no", "false"):
        return False
    raise MapError(f"{where}: {name}={value}: expected yes or no")


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
