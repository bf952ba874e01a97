"""The shared vocabulary: the named values every part of Postgate speaks in.

Policy is the bottom layer, so the words that DNS, DANE, delivery, the queue and the smtpd exchange live
here, as enums and frozen dataclasses, never as strings to grep. A DNSSEC verdict is a :class:`Security`
(RFC 4035 §4.3: secure, insecure, bogus, indeterminate); a TLSA record is a :class:`Tlsa` (RFC 6698 §2.1:
certificate usage, selector, matching type, association data).

What happened to a recipient is an :class:`Outcome` (delivered, deferred, bounced; RFC 3464 §2.3.3's
actions); what a delivery attempt's TLS came to is a :class:`TlsOutcome` — a success kind, or one of
RFC 8460 §4.3's result types, the same value logged, counted and (later) reported in TLS-RPT. A server's
answer is a :class:`Reply`, parsed once where it arrives (:meth:`Reply.parse`). A suspected attack is a
``suspected_attack`` boolean carried beside these, never a phrase in a text. Queue ids are
:data:`QueueId` (:func:`new_queue_id`), and :func:`domain_of` is the one way to take an address's domain.
"""

from __future__ import annotations

import enum
import re
import secrets
import time
from dataclasses import dataclass
from typing import NewType


class Outcome(enum.StrEnum):
    """A recipient's state. A delivery attempt ends DELIVERED, DEFERRED (4xx or no usable host: retried)
    or BOUNCED (5xx or null MX: returned to the sender, RFC 3464 §2.3.3 "failed"). PENDING is queue state
    only: not attempted yet."""

    PENDING = "pending"
    DELIVERED = "delivered"
    DEFERRED = "deferred"
    BOUNCED = "bounced"

    @property
    def final(self) -> bool:
        return self in (Outcome.DELIVERED, Outcome.BOUNCED)


class TlsOutcome(enum.StrEnum):
    """One attempt's TLS result. The first four are successes (the session's security); the rest are
    RFC 8460 §4.3 result types of a failed attempt, by their registered names."""

    CLEARTEXT = "cleartext"                         # no TLS (policy none/may, or no STARTTLS under may)
    UNAUTHENTICATED = "tls-unauthenticated"         # TLS, certificate not checked
    VERIFIED = "verified"                           # PKIX or fingerprint match
    DANE_VERIFIED = "dane-verified"                 # RFC 7672 §3: a usable TLSA record matched
    # RFC 8460 §4.3.1: negotiation failures
    STARTTLS_NOT_SUPPORTED = "starttls-not-supported"
    CERTIFICATE_HOST_MISMATCH = "certificate-host-mismatch"
    CERTIFICATE_EXPIRED = "certificate-expired"
    CERTIFICATE_NOT_TRUSTED = "certificate-not-trusted"
    VALIDATION_FAILURE = "validation-failure"
    # RFC 8460 §4.3.2.1: DANE policy failures
    TLSA_INVALID = "tlsa-invalid"
    DNSSEC_INVALID = "dnssec-invalid"
    DANE_REQUIRED = "dane-required"
    # RFC 8460 §4.3.2.2: MTA-STS policy failures
    STS_POLICY_FETCH_ERROR = "sts-policy-fetch-error"
    STS_POLICY_INVALID = "sts-policy-invalid"
    STS_WEBPKI_INVALID = "sts-webpki-invalid"

    @property
    def success(self) -> bool:
        return self in (TlsOutcome.CLEARTEXT, TlsOutcome.UNAUTHENTICATED, TlsOutcome.VERIFIED,
                        TlsOutcome.DANE_VERIFIED)


QueueId = NewType("QueueId", str)


_SHARE = (0, 1)   # this process's share k of n of the local queue (see queue_id_share)


def queue_id_share(k: int, n: int) -> None:
    """The queue ids this process makes fall in share ``k`` of ``n`` (their 24 random bits mod n = k): where
    n processes each run a share of one local queue (``[queue] run_in_workers``), the process that accepts a
    message is the one that delivers it, handed over in memory, instead of a sibling that would only find
    it at its next scan of the spool (outbound/queue/spool.SpoolFiles.mine)."""
    global _SHARE
    if not 0 <= k < n:
        raise ValueError(f"share {k} of {n}")
    _SHARE = (k, n)


def share_of(qid: str, n: int) -> int:
    """Which of ``n`` shares of the local queue ``qid`` is in: its last 24 bits (the random ones) mod n."""
    try:
        return int(qid[-6:], 16) % n
    except ValueError:
        return 0


def new_queue_id(now: float | None = None) -> QueueId:
    """Unique and sortable by arrival: microseconds since the epoch (14 hex digits) + 24 random bits, in
    the spirit of Postfix's long queue ids; the random bits are uniform within this process's share."""
    t = time.time() if now is None else now
    k, n = _SHARE
    rand = secrets.randbelow((1 << 24) // n) * n + k    # at most (2**24 // n) * n - 1 < 2**24
    return QueueId(f"{int(t * 1_000_000):014X}{rand:06X}")


def valid_queue_id(qid: str) -> bool:
    return len(qid) == 20 and all(c in "0123456789ABCDEF" for c in qid)


def domain_of(address: str) -> str:
    """The domain of ``local@domain``, lower case, without a trailing dot (RFC 5321 §2.3.5: an FQDN written
    with or without its final dot is the same domain); "" when there is none (``postmaster``, ``<>``)."""
    return address.rsplit("@", 1)[-1].lower().rstrip(".") if "@" in address else ""


_CONTROL = re.compile(r"[^\n\t\x20-\x7e\x80-\U0010ffff]")   # control characters but LF (a line break) and HT


@dataclass(frozen=True)
class Reply:
    """An SMTP reply: RFC 5321 §4.2 code, RFC 3463 enhanced status code (may be empty), text.

    ``text`` may span several lines (``\n``); :meth:`line` gives the wire form, multi-line replies with
    ``code-`` continuation lines and the enhanced code repeated on each (RFC 2034 §4)."""

    code: int
    enhanced: str = ""
    text: str = ""

    def line(self) -> bytes:
        text = self.text
        if not text.isprintable():   # RFC 5321 §4.2: textstring is HT / printable; a CR (e.g. in a remote
            text = _CONTROL.sub("?", text)   # server's reply passed on) must not end a line on the wire
        lines = text.split("\n")
        prefix = f"{self.enhanced} " if self.enhanced else ""
        out = [f"{self.code}-{prefix}{ln}" for ln in lines[:-1]] + [f"{self.code} {prefix}{lines[-1]}"]
        # RFC 5321 §4.2: textstring is printable US-ASCII (%d9 / %d32-126): any other character goes out as '?'
        return ("\r\n".join(out) + "\r\n").encode("ascii", "replace")

    def __str__(self) -> str:
        return f"{self.code} {self.enhanced + ' ' if self.enhanced else ''}{self.text}"

    @classmethod
    def parse(cls, code: int, message: str) -> Reply:
        """A reply as it arrives (code, then text that may start with an RFC 3463 enhanced code, RFC 2034
        §4): the enhanced code split off, else derived from the basic code's class (RFC 3463 §3.1)."""
        first, _, rest = message.partition(" ")
        parts = first.split(".")
        if len(parts) == 3 and all(p.isdigit() for p in parts) and parts[0] == str(code)[:1] and parts[0] in "245":
            return cls(code, first, rest)
        return cls(code, "", message)

    @property
    def status(self) -> str:
        """The enhanced status code, or the generic one of the reply's class (RFC 3463 §3.1: X.0.0)."""
        if self.enhanced:
            return self.enhanced
        return {2: "2.0.0", 4: "4.0.0", 5: "5.0.0"}.get(self.code // 100, "4.0.0")

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


def _der_sequence(data: bytes) -> bool:
    """Whether ``data`` is exactly one DER SEQUENCE: tag 0x30, a definite length (ITU-T X.690 §8.1.3, short
    or long form without leading zero octets) that covers the rest of the data."""
    if len(data) < 2 or data[0] != 0x30:
        return False
    n = data[1]
    if n < 0x80:
        return len(data) == 2 + n
    k = n & 0x7F
    if not 1 <= k <= 4 or len(data) < 2 + k or data[2] == 0 or (k == 1 and data[2] < 0x80):
        return False   # X.690 §10.1: DER lengths in the fewest octets (a length under 128 in short form)
    return len(data) == 2 + k + int.from_bytes(data[2:2 + k], "big")


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
        """RFC 6698 §2.1.3: SHA2-256 data is 32 octets, SHA2-512 64; Full data is the DER certificate
        (selector 0) or SubjectPublicKeyInfo (selector 1), both one DER SEQUENCE (ITU-T X.690 §8.9) filling
        the data exactly. Anything else is unusable, as OpenSSL (and so Postfix) refuses to load it."""
        if self.mtype == FULL:
            return _der_sequence(self.data)
        return len(self.data) == {SHA256: 32, SHA512: 64}.get(self.mtype, len(self.data) or -1)

    @classmethod
    def from_rdata(cls, rd: object) -> Tlsa:
        return cls(int(rd.usage), int(rd.selector), int(rd.mtype), bytes(rd.cert))  # type: ignore[attr-defined]
