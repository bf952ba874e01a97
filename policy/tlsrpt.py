"""SMTP TLS Reporting (RFC 8460): telling a receiving domain what its senders saw when they tried TLS.

A domain publishes ``_smtp._tls.<domain> TXT "v=TLSRPTv1; rua=mailto:tlsrpt@example.net"`` (§3). Each
sender counts, per day (UTC) and per *policy* it applied to that domain — ``tlsa`` (DANE), ``sts``
(MTA-STS) or ``no-policy-found`` — the sessions that succeeded and those that failed, each failure with a
*result type* (§4.3) such as ``certificate-host-mismatch`` or ``tlsa-invalid``, the MX host and the
addresses involved. Once a day it sends one JSON report per domain (§4.4), gzip-compressed, to every
``rua`` address: by mail with the headers of §5.3, or by HTTPS POST (§5.4).

This module is the pure part: the TXT record, the result types, the aggregation key and the report JSON.
The store lives in ``outbound/tlsrptdb.py``, the sending in ``outbound/tlsrptsend.py``.
"""

from __future__ import annotations

import datetime as dt
import enum
import re
import urllib.parse
from dataclasses import dataclass

from postgate.policy.vocab import TlsOutcome

MEDIA_TYPE_GZIP = "application/tlsrpt+gzip"   # RFC 8460 §6.4
MEDIA_TYPE_JSON = "application/tlsrpt+json"   # RFC 8460 §6.4


class PolicyType(enum.Enum):
    """RFC 8460 §4.4 ``policy-type``."""

    TLSA = "tlsa"
    STS = "sts"
    NO_POLICY = "no-policy-found"


# RFC 8460 §4.3 result types: the shared vocabulary's TlsOutcome (policy/vocab.py) is the one enum; a
# report's ``result-type`` is a failed attempt's TlsOutcome (its success kinds never appear in a report)
ResultType = TlsOutcome


# RFC 8460 §3 tlsrpt-record = tlsrpt-version 1*(field-delim tlsrpt-field): "v=TLSRPTv1", blanks, ";"
_RPT_START = re.compile(r"^[ \t]*v=TLSRPTv1[ \t]*(?:;|$)")


class RecordError(ValueError):
    pass


@dataclass(frozen=True)
class Record:
    """The ``_smtp._tls`` TXT record (RFC 8460 §3): where reports go."""

    rua: tuple[str, ...]

    @property
    def mailto(self) -> tuple[str, ...]:
        # RFC 6068 §2 / RFC 8460 §3: the address of a mailto: URI is percent-encoded (",", "!" must be)
        return tuple(urllib.parse.unquote(u[7:].split("?", 1)[0]) for u in self.rua
                     if u.lower().startswith("mailto:"))

    @property
    def https(self) -> tuple[str, ...]:
        return tuple(u for u in self.rua if u.lower().startswith("https:"))


def parse_record(text: str) -> Record:
    """RFC 8460 §3: ``v=TLSRPTv1`` first, then ``rua=`` with comma-separated mailto: or https: URIs."""
    fields = [f.strip() for f in text.strip().split(";")]
    if fields and fields[-1] == "":
        fields.pop()
    if not fields or fields[0].replace(" ", "") != "v=TLSRPTv1":
        raise RecordError("record does not begin with v=TLSRPTv1")
    rua: list[str] = []
    for f in fields[1:]:
        key, eq, value = f.partition("=")
        if not eq:
            raise RecordError(f"malformed field {f!r}")
        if key.strip() == "rua":
            for uri in value.split(","):
                uri = uri.strip()
                # RFC 8460 §3: tlsrpt-uri is mailto: or https:; others are ignored
                if uri.lower().startswith(("mailto:", "https:")):
                    rua.append(uri)
        # RFC 8460 §3: unknown extension fields are ignored
    if not rua:
        raise RecordError("record has no usable rua URI")
    return Record(tuple(rua))


def select_record(txts: list[str]) -> Record | None:
    """RFC 8460 §3: records not starting with v=TLSRPTv1 are ignored; more than one: no reporting."""
    candidates = [t for t in txts if _RPT_START.match(t)]   # "v=TLSRPTv10" is not one
    if len(candidates) != 1:
        return None
    try:
        return parse_record(candidates[0])
    except RecordError:
        return None


@dataclass(frozen=True)
class Attempt:
    """One delivery attempt's TLS outcome, as TLS-RPT counts it (one *session*, RFC 8460 §4.1)."""

    policy_domain: str
    policy_type: PolicyType
    result: TlsOutcome | None            # None (or a success kind): the session succeeded
    mx_host: str = ""
    receiving_ip: str = ""
    sending_ip: str = ""
    policy_strings: tuple[str, ...] = ()  # the policy applied (STS lines, or TLSA records)
    mx_patterns: tuple[str, ...] = ()     # STS mx patterns (RFC 8460 §4.4 mx-host)
    detail: str = ""                      # failure-reason-code (RFC 8460 §4.4)
    when: float = 0.0                     # POSIX time of the attempt


def day_of(when: float) -> str:
    """The UTC day an attempt belongs to (RFC 8460 §4.1: reports cover a UTC day)."""
    return dt.datetime.fromtimestamp(when, dt.UTC).strftime("%Y-%m-%d")


@dataclass
class PolicyCounts:
    """Aggregated sessions for one (policy domain, policy type, day)."""

    policy_domain: str
    policy_type: PolicyType
    day: str
    policy_strings: tuple[str, ...] = ()
    mx_patterns: tuple[str, ...] = ()
    successes: int = 0
    failures: dict[tuple[str, str, str, str, str], int] | None = None  # (type, send-ip, mx, rcv-ip, info)

    def add(self, a: Attempt) -> None:
        if a.policy_strings:
            self.policy_strings = a.policy_strings
        if a.mx_patterns:
            self.mx_patterns = a.mx_patterns
        if a.result is None or a.result.success:  # a success kind (cleartext … dane-verified) is no failure
            self.successes += 1
            return
        if self.failures is None:
            self.failures = {}
        key = (a.result.value, a.sending_ip, a.mx_host, a.receiving_ip, a.detail[:200])
        self.failures[key] = self.failures.get(key, 0) + 1

    @property
    def failure_count(self) -> int:
        return sum((self.failures or {}).values())


def report(day: str, policies: list[PolicyCounts], *, organization: str, contact: str,
           report_id: str) -> dict[str, object]:
    """The RFC 8460 §4.4 JSON report for one policy domain and one UTC day."""
    start = dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1) - dt.timedelta(seconds=1)
    out_policies: list[dict[str, object]] = []
    for p in policies:
        pol: dict[str, object] = {"policy-type": p.policy_type.value, "policy-domain": p.policy_domain}
        if p.policy_strings:
            pol["policy-string"] = list(p.policy_strings)
        if p.mx_patterns:
            pol["mx-host"] = list(p.mx_patterns)
        entry: dict[str, object] = {
            "policy": pol,
            "summary": {"total-successful-session-count": p.successes,
                        "total-failure-session-count": p.failure_count},
        }
        details: list[dict[str, object]] = []
        for (rtype, sip, mx, rip, info), n in sorted((p.failures or {}).items()):
            d: dict[str, object] = {"result-type": rtype, "failed-session-count": n}
            if sip:
                d["sending-mta-ip"] = sip
            if mx:
                d["receiving-mx-hostname"] = mx
            if rip:
                d["receiving-ip"] = rip
            if info:
                # RFC 8460 §4.4: "additional-information" is a URI; a text explaining the failure goes in
                # "failure-reason-code"
                d["failure-reason-code"] = info
            details.append(d)
        if details:
            entry["failure-details"] = details
        out_policies.append(entry)
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
                       "end-datetime": end.strftime("%Y-%m-%dT%H:%M:%SZ")},
        "contact-info": contact,
        "report-id": report_id,
        "policies": out_policies,
    }


def filename(submitter: str, policy_domain: str, day: str, unique: str = "") -> str:
    """RFC 8460 §5.1: ``sender!policy-domain!begin-timestamp!end-timestamp[!unique-id].json.gz``."""
    start = int(dt.datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=dt.UTC).timestamp())
    end = start + 86400 - 1
    return f"{submitter}!{policy_domain}!{start}!{end}" + (f"!{unique}" if unique else "") + ".json.gz"


def subject(policy_domain: str, submitter: str, report_id: str) -> str:
    """RFC 8460 §5.3: ``Report Domain: <domain> Submitter: <submitter> Report-ID: <id>``."""
    return f"Report Domain: {policy_domain} Submitter: {submitter} Report-ID: <{report_id}>"
