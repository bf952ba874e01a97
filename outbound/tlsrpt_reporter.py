"""Handing TLS-RPT events to sys4's ``tlsrpt-reporter`` instead of Postgate's own store and sender.

``tlsrpt-reporter`` is the reporting suite Postfix 3.10 uses: the MTA sends one JSON datagram per delivery
request to ``tlsrpt-collectd`` over a Unix datagram socket (through sys4's libtlsrpt), ``tlsrpt-fetcher``
and ``tlsrpt-reportd`` aggregate and send the RFC 8460 reports. The datagram, as libtlsrpt writes it::

    {"d": "<recipient domain>", "pr": "<the _smtp._tls TXT record>",
     "policies": [{"policy-type": 1|2|9, "policy-domain": "...", "policy-string": [...], "mx-host": [...],
                   "failure-details": [{"c": <code>, "s": ..., "n": ..., "h": ..., "r": ..., "a": ..., "f": ...}],
                   "t": <number of failure details>, "f": 0 (success) | 1 (failure)}]}

with libtlsrpt's numeric codes for the policy types (``tlsa`` 1, ``sts`` 2, ``no-policy-found`` 9) and the
RFC 8460 §4.3 result types (201-205, 301-306). Like Postfix, Postgate sends an event only for a domain
that publishes a TLS-RPT record (``pr``). Sending never blocks: a full or missing socket loses the event,
logged, and delivery goes on.

Choose it with ``[tlsrpt] reporter = "tlsrpt-reporter"`` and ``reporter_socket``.
"""

from __future__ import annotations

import json
import logging
import socket

import dns.rdatatype
from postgate.outbound.resolver import ResolverProtocol
from postgate.policy import tlsrpt
from postgate.policy.tlsrpt import PolicyType, ResultType

log = logging.getLogger("postgate.tlsrpt")

POLICY_CODES = {PolicyType.TLSA: 1, PolicyType.STS: 2, PolicyType.NO_POLICY: 9}
RESULT_CODES = {
    ResultType.STARTTLS_NOT_SUPPORTED: 201, ResultType.CERTIFICATE_HOST_MISMATCH: 202,
    ResultType.CERTIFICATE_NOT_TRUSTED: 203, ResultType.CERTIFICATE_EXPIRED: 204,
    ResultType.VALIDATION_FAILURE: 205, ResultType.STS_POLICY_FETCH_ERROR: 301,
    ResultType.STS_POLICY_INVALID: 302, ResultType.STS_WEBPKI_INVALID: 303, ResultType.TLSA_INVALID: 304,
    ResultType.DNSSEC_INVALID: 305, ResultType.DANE_REQUIRED: 306,
}


def datagram(a: tlsrpt.Attempt, record: str) -> bytes:
    """One delivery request with one policy, in libtlsrpt's format."""
    pol: dict[str, object] = {"policy-type": POLICY_CODES[a.policy_type], "policy-domain": a.policy_domain}
    if a.policy_strings:
        pol["policy-string"] = list(a.policy_strings)
    if a.mx_patterns:
        pol["mx-host"] = list(a.mx_patterns)
    details = []
    if a.result is not None:
        d: dict[str, object] = {"c": RESULT_CODES[a.result]}
        for key, value in (("s", a.sending_ip), ("n", a.mx_host), ("r", a.receiving_ip), ("a", a.detail)):
            if value:
                d[key] = value
        details.append(d)
        pol["failure-details"] = details
    pol["t"] = len(details)
    pol["f"] = 0 if a.result is None else 1
    return json.dumps({"d": a.policy_domain, "pr": record, "policies": [pol]}).encode()


class ReporterHook:
    """``DeliveryConfig.tls_report`` that sends each attempt to ``tlsrpt-collectd``."""

    def __init__(self, socket_path: str, resolver: ResolverProtocol) -> None:
        self.socket_path = socket_path
        self.resolver = resolver
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.lost = 0

    async def __call__(self, a: tlsrpt.Attempt) -> None:
        ans = await self.resolver.resolve(f"_smtp._tls.{a.policy_domain}", dns.rdatatype.TXT)
        txts = [b"".join(r.strings).decode("utf-8", "replace") for r in ans.records()] if ans.ok else []
        records = [t for t in txts if t.strip().startswith("v=TLSRPTv1")]
        if tlsrpt.select_record(records) is None:
            return  # RFC 8460 §3: no reporting address, nothing to report
        try:
            self.sock.sendto(datagram(a, records[0]), self.socket_path)
        except OSError as e:
            self.lost += 1
            log.warning("tlsrpt-reporter socket %s: %s (event lost)", self.socket_path, e)

    def close(self) -> None:
        self.sock.close()
