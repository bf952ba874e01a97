"""The shared vocabulary: the named values every part of Postgate speaks in.

Policy is the bottom layer, so the words that DNS, DANE, delivery, the queue and the smtpd exchange live
here, as enums and frozen dataclasses, never as strings to grep. A DNSSEC verdict is a :class:`Security`
(RFC 4035 §4.3: secure, insecure, bogus, indeterminate); a TLSA record is a :class:`Tlsa` (RFC 6698 §2.1:
certificate usage, selector, matching type, association data).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: RFC 5321 §4.2 code, RFC 3463 enhanced status code (may be empty), text.

    ``text`` may span several lines (``\n``); :meth:`line` gives the wire form, multi-line replies with
    ``code-`` continuation lines and the enhanced code repeated on each (RFC 2034 §4)."""

    code: int
    enhanced: str = ""
    text: str = ""

    def line(self) -> bytes:
        lines = self.text.split("\n")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = [f"{self.code}-{prefix}{ln}" for ln in lines[:-1]] + [f"{self.code} {prefix}{lines[-1]}"]
        return ("\r\n".join(out) + "\r\n").encode()

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}"

    @property
    def permanent(self) -> bool:
        return self.code >= 500

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500


class Security(enum.Enum):
    """RFC 4035 §4.3: the four states of a validated answer."""

    SECURE = "secure"
    INSECURE = "insecure"
    BOGUS = "bogus"
    INDETERMINATE = "indeterminate"

    def __str__(self) -> str:
        return self.value


# RFC 6698 §2.1.1-§2.1.3 (with RFC 7218's acronyms): certificate usages, selectors, matching types
PKIX_TA, PKIX_EE, DANE_TA, DANE_EE = 0, 1, 2, 3
CERT, SPKI = 0, 1
FULL, SHA256, SHA512 = 0, 1, 2
MTYPE_PREFERENCE = {SHA512: 2, SHA256: 1, FULL: 0}  # RFC 7671 §9: digests ranked; Full is no digest


@dataclass(frozen=True)
class Tlsa:
    """One TLSA record (RFC 6698 §2.1)."""

    usage: int
    selector: int
    mtype: int
    data: bytes

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"

    @property
    def usable(self) -> bool:
        """RFC 7672 §3.1.3 and RFC 7671 §4: only DANE-TA/DANE-EE with known selector and type; RFC 7671 §9
        and RFC 6698 §2.1: a record whose data does not fit its matching type is unusable."""
        return (self.usage in (DANE_TA, DANE_EE) and self.selector in (CERT, SPKI)
                and self.mtype in MTYPE_PREFERENCE and self.well_formed)

    @property
    def well_formed(self) -> bool:
        """RFC 6698 §2.1.3: SHA2-256 data is 32 octets, SHA2-512 64; Full data is not empty."""
        return len(self.data) == {SHA256: 32, SHA512: 64}.get(self.mtype, len(self.data) or -1)

    @classmethod
    def from_rdata(cls, rd: object) -> Tlsa:
        return cls(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))  # type: ignore[attr-defined]
