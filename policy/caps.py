"""The MTA-capability record: what a receiving MTA promises, and whether a session keeps the promise.

A receiving server publishes, at ``_mta-caps.<MX host name>``, a TXT record such as::

    v=MTACAPS1; starttls; dane; tls-min=1.3; requiretls; smtputf8; size=52428800

When the record is DNSSEC-secure, a sender may treat every listed capability as guaranteed: a session
that does not show one (no STARTTLS in EHLO, TLS 1.2 where 1.3 was promised, REQUIRETLS missing after
STARTTLS) is being interfered with, and the sender defers instead of downgrading. The full specification
is ``docs/mta-caps.md``; this module is its parser and its comparison, both pure.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

VERSION = "MTACAPS1"
FLAGS = ("starttls", "dane", "requiretls", "smtputf8", "8bitmime", "pipelining", "chunking")
VALUED = ("tls-min", "size")
TLS_VERSIONS = {"1.2": (1, 2), "1.3": (1, 3)}
MAX_RECORD = 1024
_TAG = re.compile(r"^[a-z0-9][a-z0-9-]{0,31}$")


class CapsError(ValueError):
    """The record is not a valid MTACAPS1 record; the message says where and why."""


@dataclass(frozen=True)
class Caps:
    starttls: bool = False
    dane: bool = False
    tls_min: str | None = None
    requiretls: bool = False
    smtputf8: bool = False
    eightbitmime: bool = False
    pipelining: bool = False
    chunking: bool = False
    size: int | None = None
    unknown: tuple[str, ...] = field(default=())

    def text(self) -> str:
        items = [f"v={VERSION}"]
        for flag, on in (("starttls", self.starttls), ("dane", self.dane)):
            if on:
                items.append(flag)
        if self.tls_min:
            items.append(f"tls-min={self.tls_min}")
        for flag, on in (("requiretls", self.requiretls), ("smtputf8", self.smtputf8),
                         ("8bitmime", self.eightbitmime), ("pipelining", self.pipelining),
                         ("chunking", self.chunking)):
            if on:
                items.append(flag)
        if self.size is not None:
            items.append(f"size={self.size}")
        return "; ".join(items)

    @property
    def needs_tls(self) -> bool:
        """Every capability beyond the transport ones is checked after STARTTLS, so TLS is implied
        by ``starttls``, ``dane`` and ``tls-min``."""
        return self.starttls or self.dane or self.tls_min is not None


def is_caps_record(text: str) -> bool:
    """Does this TXT string claim to be an MTA-capability record (of any version)?"""
    return text.lstrip().lower().startswith("v=mtacaps")


def parse(text: str) -> Caps:
    """Strictly parse one record. Raises :class:`CapsError` and nothing else."""
    if not isinstance(text, str):
        raise CapsError("record is not text")
    if len(text) > MAX_RECORD:
        raise CapsError(f"record longer than {MAX_RECORD} characters")
    if any(ord(c) < 0x20 or ord(c) > 0x7E for c in text):
        raise CapsError("record contains non-printable or non-ASCII characters")
    items = [i.strip() for i in text.split(";")]
    if items and items[-1] == "":
        items.pop()  # a trailing ';' is allowed
    if not items or not items[0].lower().startswith("v="):
        raise CapsError("record must start with 'v=MTACAPS1;'")
    version = items[0][2:].strip()
    if version.upper() != VERSION:
        raise CapsError(f"unsupported version {version!r} (expected {VERSION})")
    values: dict[str, str | None] = {}
    unknown: list[str] = []
    for pos, item in enumerate(items[1:], 2):
        if not item:
            raise CapsError(f"item {pos}: empty item")
        tag, eq, value = item.partition("=")
        tag = tag.strip().lower()
        value = value.strip()
        if not _TAG.match(tag):
            raise CapsError(f"item {pos}: {tag!r} is not a valid tag")
        if tag in values:
            raise CapsError(f"item {pos}: {tag!r} appears twice")
        if tag in FLAGS:
            if eq:
                raise CapsError(f"item {pos}: {tag!r} takes no value")
        elif tag in VALUED:
            if not eq or not value:
                raise CapsError(f"item {pos}: {tag!r} needs a value")
            if tag == "tls-min" and value not in TLS_VERSIONS:
                raise CapsError(f"item {pos}: tls-min must be 1.2 or 1.3, not {value!r}")
            if tag == "size" and (not value.isdigit() or len(value) > 15):
                raise CapsError(f"item {pos}: size must be a number of octets, not {value!r}")
        else:
            unknown.append(tag)  # forward compatibility: unknown tags are ignored (docs/mta-caps.md §4)
        values[tag] = value if eq else None
    size = values.get("size")
    return Caps(starttls="starttls" in values, dane="dane" in values, tls_min=values.get("tls-min"),
                requiretls="requiretls" in values, smtputf8="smtputf8" in values,
                eightbitmime="8bitmime" in values, pipelining="pipelining" in values,
                chunking="chunking" in values, size=int(size) if size else None, unknown=tuple(unknown))


@dataclass(frozen=True)
class Selection:
    """Outcome of reading all TXT strings at the owner name."""

    caps: Caps | None
    problem: str = ""


def select(txts: Iterable[str]) -> Selection:
    """Pick the record among the TXT RRset (docs/mta-caps.md §3): exactly one MTACAPS1 record counts;
    other TXT records are ignored; several MTACAPS1 records, or an invalid one, count as none."""
    candidates = [t for t in txts if is_caps_record(t)]
    current = [t for t in candidates if t.lstrip()[2:].split(";")[0].strip().upper() == VERSION]
    if not current:
        if candidates:
            return Selection(None, "only records of unknown versions: ignored")
        return Selection(None)
    if len(current) > 1:
        return Selection(None, f"{len(current)} MTACAPS1 records: ignored")
    try:
        return Selection(parse(current[0]))
    except CapsError as e:
        return Selection(None, f"invalid record ignored: {e}")


@dataclass(frozen=True)
class Observed:
    """What one session showed."""

    starttls_offered: bool
    tls_version: str | None = None           # "TLSv1.3" as Python's ssl names it
    dane_verified: bool = False
    ehlo_after_tls: frozenset[str] = frozenset()   # upper-case keywords
    size: int | None = None


def _tls_tuple(version: str | None) -> tuple[int, int] | None:
    if not version:
        return None
    m = re.match(r"TLSv(\d)\.(\d)", version)
    return (int(m.group(1)), int(m.group(2))) if m else None


def broken_before_tls(caps: Caps, starttls_offered: bool) -> list[str]:
    return ["starttls"] if caps.needs_tls and not starttls_offered else []


def broken(caps: Caps, seen: Observed) -> list[str]:
    """The promised capabilities the session did not show, by tag name."""
    out = broken_before_tls(caps, seen.starttls_offered)
    if out:
        return out
    if caps.tls_min is not None:
        got = _tls_tuple(seen.tls_version)
        if got is None or got < TLS_VERSIONS[caps.tls_min]:
            out.append("tls-min")
    if caps.dane and not seen.dane_verified:
        out.append("dane")
    for tag, on, kw in (("requiretls", caps.requiretls, "REQUIRETLS"), ("smtputf8", caps.smtputf8, "SMTPUTF8"),
                        ("8bitmime", caps.eightbitmime, "8BITMIME"), ("pipelining", caps.pipelining, "PIPELINING"),
                        ("chunking", caps.chunking, "CHUNKING")):
        if on and kw not in seen.ehlo_after_tls:
            out.append(tag)
    if caps.size is not None:
        if "SIZE" not in seen.ehlo_after_tls or (seen.size not in (None, 0) and seen.size < caps.size):
            out.append("size")
    return out


def record_for(*, starttls: bool, dane: bool, tls_min: str | None, requiretls: bool, smtputf8: bool,
               eightbitmime: bool, pipelining: bool, chunking: bool, size: int | None) -> Caps:
    """The record a server with these settings can honestly publish: every capability that depends on
    TLS is only promised when STARTTLS is."""
    return Caps(starttls=starttls, dane=dane and starttls, tls_min=tls_min if starttls else None,
                requiretls=requiretls and starttls, smtputf8=smtputf8, eightbitmime=eightbitmime,
                pipelining=pipelining, chunking=chunking, size=size)
