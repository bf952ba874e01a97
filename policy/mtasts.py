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
is pure: parsing, matching and the decision; the fetch and the cache live in ``outbound/mtasts*.py``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from postgate.policy import tls

MAX_AGE_LIMIT = 31_557_600          # RFC 8461 §3.2: max_age at most 31557600 seconds (about one year)
MAX_POLICY_BYTES = 64 * 1024        # RFC 8461 §3.3: "senders MAY limit the maximum size": 64 KiB
WELL_KNOWN = "/.well-known/mta-sts.txt"  # RFC 8461 §3.3
MEDIA_TYPE = "text/plain"           # RFC 8461 §3.2: the policy is served as text/plain

_ID = re.compile(r"[A-Za-z0-9]{1,32}")  # RFC 8461 §3.1: sts-id = 1*32(ALPHA / DIGIT)


class Mode(enum.Enum):
    ENFORCE = "enforce"
    TESTING = "testing"
    NONE = "none"


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

    RFC 8461 §3.1: records not starting with ``v=STSv1`` are discarded; if more than one remains, or
    the one is malformed, the domain has no usable record (treated as "no policy")."""
    candidates = [t for t in txts if t.strip().startswith("v=STSv1")]
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
        return any(mx_matches(p, mx_host) for p in self.mx)


def parse_policy(text: str) -> Policy:
    """Parse a policy body (UTF-8 text, lines ``key: value``, CRLF or LF, §3.2)."""
    version = ""
    mode: Mode | None = None
    max_age: int | None = None
    mx: list[str] = []
    for n, raw in enumerate(text.replace("\r\n", "\n").split("\n"), 1):
        line = raw.strip()
        if not line:
            continue
        key, colon, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if not colon:
            raise StsError(f"line {n}: expected 'key: value'")
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
    Case-insensitive, trailing dots ignored."""
    p = pattern.lower().rstrip(".")
    h = mx_host.lower().rstrip(".")
    if p.startswith("*."):
        first, dot, rest = h.partition(".")
        return bool(first) and bool(dot) and rest == p[2:]
    return h == p


class Action(enum.Enum):
    """What MTA-STS demands of one MX host."""

    NONE = "none"              # no policy, mode none, or DANE applies to this host: STS says nothing
    REPORT = "report"          # testing mode: deliver as usual, report what enforce would have refused
    VERIFY = "verify"          # enforce, MX matches: TLS with Web-PKI validation of the MX name
    REFUSE = "refuse"          # enforce, MX does not match: do not use this host


@dataclass(frozen=True)
class Decision:
    action: Action
    reason: str = ""
    matched: bool = True       # the MX host matched the policy (for testing-mode reports)


def decide(policy: Policy | None, mx_host: str, *, dane: bool) -> Decision:
    """What the policy in force requires for ``mx_host``.

    ``dane``: secure usable TLSA records apply to this host, so DANE decides (RFC 8461 §2)."""
    if policy is None or policy.mode is Mode.NONE:
        return Decision(Action.NONE)
    if dane:
        return Decision(Action.NONE, "DANE applies (RFC 8461 §2)")
    matched = policy.matches(mx_host)
    if policy.mode is Mode.TESTING:
        return Decision(Action.REPORT, "" if matched else f"{mx_host} matches no mx of the policy (testing)",
                        matched)
    if not matched:
        # RFC 8461 §4.1/§5: a host not among the policy's mx patterns must not be used
        return Decision(Action.REFUSE, f"MTA-STS: {mx_host} matches no mx pattern of the enforced policy "
                        f"({', '.join(policy.mx)})", False)
    return Decision(Action.VERIFY, "MTA-STS enforce")


def policy_url(domain: str) -> str:
    """RFC 8461 §3.3: ``https://mta-sts.<domain>/.well-known/mta-sts.txt``."""
    return f"https://mta-sts.{domain.rstrip('.').lower()}{WELL_KNOWN}"


def tighten(policy: Policy | None, req: tls.Requirement, mx_host: str,
            level: tls.Level) -> tuple[tls.Requirement, str]:
    """The MTA-STS input to the TLS decision: ``req`` as the policy in force changes it, and a reason to
    refuse the host ("" if usable). DANE (``req.auth`` DANE), an explicit authenticated level and the level
    ``none`` are left alone (RFC 8461 §2); MTA-STS tightens only unauthenticated, opportunistic levels."""
    if policy is None or req.auth is not tls.Auth.NONE or level is tls.Level.NONE:
        return req, ""
    d = decide(policy, mx_host, dane=False)
    if d.action is Action.REFUSE:
        return req, f"{mx_host}: {d.reason}"
    if d.action is Action.VERIFY:  # RFC 8461 §4.2: TLS with a Web-PKI certificate for the MX host name
        return tls.Requirement(req.level, tls.TLSMode.REQUIRED, tls.Auth.PKIX, names=(mx_host.rstrip(".").lower(),),
                               caps_required=req.caps_required, notes=("MTA-STS enforce",)), ""
    return req, ""
