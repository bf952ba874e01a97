"""MTA-STS (RFC 8461): a domain's promise, published over HTTPS, that its MX hosts speak authenticated TLS.

A domain that cannot sign its DNS can still say "my mail servers always do TLS with a certificate from a
public CA": it publishes a TXT record ``_mta-sts.<domain>`` (``v=STSv1; id=20240101``, §3.1) and a policy
file at ``https://mta-sts.<domain>/.well-known/mta-sts.txt`` (§3.2), fetched with ordinary Web-PKI
validation (§3.3). The policy names a *mode* and the MX hosts allowed:

=============  ==========================================================================================
``enforce``    a sending MTA must use TLS with a certificate valid under the Web PKI for the MX host name,
               and may only deliver to MX hosts that match one of the policy's ``mx`` patterns; a failure
               means: do not deliver to that host (defer, never cleartext, §5)
``testing``    failures are only reported (TLS-RPT, RFC 8460); delivery proceeds as without the policy
``none``       the domain withdraws its policy (§8.3)
=============  ==========================================================================================

A policy is cached for ``max_age`` seconds (§3.2, at most one year); the TXT record's ``id`` changes when
the policy does, so a new id means "fetch again" (§5.1), and a cached policy survives failures to refresh
it — that is what protects the *first* delivery after an attacker strips the TXT record (§3.3, §10.2).

Where DANE applies (secure TLSA records for the MX host), DANE decides and MTA-STS is not consulted for
that host (§2: "senders who implement MTA-STS and DANE SHOULD validate with DANE first"). Everything here
is pure: parsing and matching; what a policy demands of one MX host is part of the one TLS decision,
``policy.tls.decide(…, sts=policy.sts())``; the fetch and the cache live in ``outbound/mtasts*.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from postgate.policy import tls

MAX_AGE_LIMIT = 31_557_600          # RFC 8461 §3.2: max_age at most 31557600 seconds (about one year)
MAX_POLICY_BYTES = 64 * 1024        # RFC 8461 §3.3: "senders MAY limit the maximum size": 64 KiB
WELL_KNOWN = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
MEDIA_TYPE = "text/plain"           # RFC 8461 §3.2: the policy is served as text/plain

_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # RFC 8461 §3.1: sts-id = 1*32(ALPHA / DIGIT)
# RFC 8461 §3.1 sts-text-record = sts-version sts-sep ...: "v=STSv1", optional blanks, then ";" (or the end)
_STS_START = re.compile(r"^[ \t]*v=STSv1[ \t]*(?:;|$)")


# RFC 8461 §5: the policy modes; one enum with the TLS decision's (policy/tls.py), which takes the policy
Mode = tls.StsMode


class StsError(ValueError):
    """A TXT record or policy file that does not follow RFC 8461; ``str()`` says where and why."""


@dataclass(frozen=True)
class Record:
    """The ``_mta-sts`` TXT record (RFC 8461 §3.1)."""

    id: str
    extensions: tuple[tuple[str, str], ...] = ()


def parse_record(text: str) -> Record:
    """Parse one TXT record value (its strings already joined, §3.1: "concatenated")."""
    fields = [f.strip() for f in text.strip().split(";")]
    if fields and fields[-1] == "":
        fields.pop()  # a trailing ';' is allowed
    if not fields or fields[0].replace(" ", "") != "v=STSv1":
        # RFC 8461 §3.1: the version field MUST be first, exactly "v=STSv1"
        raise StsError("record does not begin with v=STSv1")
    rid = ""
    ext: list[tuple[str, str]] = []
    for f in fields[1:]:
        key, eq, value = f.partition("=")
        key, value = key.strip(), value.strip()
        if not eq or not key:
            raise StsError(f"malformed field {f!r}")
        if key == "id":
            if rid:
                continue   # RFC 8461 §3.1 (as §3.2 for the policy): a duplicated field, only the first counts
            if not _ID.fullmatch(value):
                raise StsError(f"id {value!r} is not 1 to 32 letters and digits")
            rid = value
        else:
            ext.append((key, value))  # RFC 8461 §3.1: unknown extension fields are ignored
    if not rid:
        raise StsError("record has no id field")
    return Record(rid, tuple(ext))


def select_record(txts: list[str]) -> Record | None:
    """From all TXT strings at ``_mta-sts.<domain>``: the one STS record, or None.

    RFC 8461 §3.1: records not starting with ``v=STSv1;`` are discarded (``v=STSv10`` too); if more than one
    remains, or
    the one is malformed, the domain has no usable record (treated as "no policy")."""
    candidates = [t for t in txts if _STS_START.match(t)]
    if len(candidates) != 1:
        return None
    try:
        return parse_record(candidates[0])
    except StsError:
        return None


@dataclass(frozen=True)
class Policy:
    """A parsed policy file (RFC 8461 §3.2)."""

    mode: Mode
    max_age: int
    mx: tuple[str, ...]
    text: str = ""

    def lines(self) -> list[str]:
        """The policy as RFC 8460 §4.4 ``policy-string``: one string per line."""
        return [ln for ln in self.text.replace("\r\n", "\n").split("\n") if ln.strip()]

    def matches(self, mx_host: str) -> bool:
        return self.sts().allows(mx_host)

    def sts(self) -> tls.Sts:
        """The policy as the TLS decision's input (``policy.tls.decide(…, sts=)``)."""
        return tls.Sts(self.mode, self.mx)


def parse_policy(text: str) -> Policy:
    """Parse a policy body (UTF-8 text, lines ``key: value``, CRLF or LF, §3.2)."""
    version = ""
    mode: Mode | None = None
    max_age: int | None = None
    mx: list[str] = []
    seen: set[str] = set()
    for n, raw in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not colon:
            raise StsError(f"line {n}: expected 'key: value'")
        if key in seen:
            # RFC 8461 §3.2: "If any non-repeated field -- i.e., all fields excepting "mx" -- is duplicated, all
            # entries except for the first SHALL be ignored" (a later "mode: none" cannot undo "enforce")
            continue
        if key in ("version", "mode", "max_age"):
            seen.add(key)
        if key == "version":
            version = value
        elif key == "mode":
            try:
                mode = Mode(value)
            except ValueError:
                raise StsError(f"line {n}: unknown mode {value!r}") from None
        elif key == "max_age":
            # RFC 8461 §3.2: max-age-value = 1*10(DIGIT), at most 31557600
            if not value.isdigit() or len(value) > 10:
                raise StsError(f"line {n}: max_age {value!r} is not a number of seconds")
            max_age = min(int(value), MAX_AGE_LIMIT)
        elif key == "mx":
            if not _valid_pattern(value):
                raise StsError(f"line {n}: invalid mx pattern {value!r}")
            mx.append(value.lower().rstrip("."))
        # RFC 8461 §3.2: unknown keys are ignored (extension fields)
    if version != "STSv1":
        raise StsError(f"version is {version!r}, expected STSv1")
    if mode is None:
        raise StsError("no mode")
    if max_age is None:
        raise StsError("no max_age")
    if not mx and mode is not Mode.NONE:
        # RFC 8461 §3.2: "mx" is required for "enforce" and "testing"
        raise StsError(f"mode {mode.value} without any mx pattern")
    return Policy(mode, max_age, tuple(mx), text)


def _valid_pattern(p: str) -> bool:
    labels = p.rstrip(".").split(".")
    if labels[0] == "*":
        labels = labels[1:]  # RFC 8461 §3.2: a leading "*." wildcard
    return len(labels) >= 1 and all(re.fullmatch(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?", x)
                                     for x in labels)


def mx_matches(pattern: str, mx_host: str) -> bool:
    """RFC 8461 §4.1: an MX name matches a pattern literally, or ``*.`` matches exactly one leftmost label
    (``*.example.com`` matches ``mx1.example.com``, not ``example.com`` nor ``a.b.example.com``).
    Case-insensitive, trailing dots ignored. The one matcher is ``policy.tls.Sts.allows``."""
    return tls.Sts(Mode.ENFORCE, (pattern,)).allows(mx_host)


def policy_url(domain: str) -> str:
    """RFC 8461 §3.3: ``https://mta-sts.<domain>/.well-known/mta-sts.txt``."""
    return f"https://mta-sts.{domain.rstrip('.').lower()}{WELL_KNOWN}"
