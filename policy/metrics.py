"""Metrics, declared where they are counted: a tiny protocol with a no-op default.

Every part of Postgate counts through this module (``metrics.inc("messages_received", listener="mx",
outcome="delivered")``) and never imports a metrics library: with nothing installed the calls do nothing,
so tests and the command line need no registry. ``postgate serve`` installs a Prometheus sink
(``postgate/metrics.py``) at start with :func:`install`. Each metric is declared once in :data:`METRICS`
with its kind, help text and label names, the way a Prometheus exposition needs them (counters end in
``_total`` on the wire; the sink adds the ``postgate_`` prefix).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Metric:
    kind: str                      # counter | histogram | gauge
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()


LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)

METRICS: dict[str, Metric] = {
    "messages_received": Metric("counter", "Messages accepted or refused after DATA, by listener and outcome "
                                "(delivered, queued, refused)", ("listener", "outcome")),
    "deliveries": Metric("counter", "Recipient delivery attempts by outcome (delivered, deferred, bounced)",
                         ("outcome",)),
    "suspected_attacks": Metric("counter", "Deferrals that suspect an attack, by kind (RFC 8460 result type)",
                                ("kind",)),
    "tls_outcomes": Metric("counter", "Outbound TLS outcome per delivery attempt (security level reached, "
                           "or the RFC 8460 failure result type)", ("result",)),
    "dnssec_verdicts": Metric("counter", "DNSSEC verdicts of next-hop resolutions (secure, insecure, bogus, "
                              "indeterminate)", ("verdict",)),
    "delivery_latency_seconds": Metric("histogram", "Time from arrival to final delivery or bounce of a "
                                       "recipient", ("outcome",), LATENCY_BUCKETS),
    "attempt_duration_seconds": Metric("histogram", "Duration of one delivery attempt to a destination",
                                       ("outcome",), LATENCY_BUCKETS),
    "smtpd_sessions": Metric("gauge", "SMTP sessions open now, by listener", ("listener",)),
    "smtpd_connections": Metric("counter", "SMTP connections accepted, by listener", ("listener",)),
    "smtpd_auth_failures": Metric("counter", "Failed SMTP AUTH attempts, by listener", ("listener",)),
    "smtpd_rejects": Metric("counter", "Commands refused by the smtpd, by stage and reason class",
                            ("stage", "reason")),
    "filter_verdicts": Metric("counter", "Stage filter verdicts, by filter, stage and action",
                              ("filter", "stage", "action")),
}


class Sink(Protocol):
    def inc(self, name: str, value: float, labels: dict[str, str]) -> None: ...
    def observe(self, name: str, value: float, labels: dict[str, str]) -> None: ...
    def add(self, name: str, value: float, labels: dict[str, str]) -> None: ...


class NoSink:
    """The default: counting costs a dictionary look-up and nothing else."""

    def inc(self, name: str, value: float, labels: dict[str, str]) -> None:
        pass

    def observe(self, name: str, value: float, labels: dict[str, str]) -> None:
        pass

    def add(self, name: str, value: float, labels: dict[str, str]) -> None:
        pass


_sink: Sink = NoSink()


def install(sink: Sink) -> None:
    global _sink
    _sink = sink


def _check(name: str, kind: str, labels: dict[str, str]) -> None:
    m = METRICS[name]  # KeyError: an undeclared metric is a bug
    if m.kind != kind or set(labels) != set(m.labels):
        raise ValueError(f"metric {name}: {kind} with labels {sorted(labels)}, declared {m.kind} {m.labels}")


def inc(name: str, value: float = 1, **labels: str) -> None:
    """Count ``value`` on counter ``name``."""
    _check(name, "counter", labels)
    _sink.inc(name, value, labels)


def observe(name: str, value: float, **labels: str) -> None:
    """Record one observation on histogram ``name``."""
    _check(name, "histogram", labels)
    _sink.observe(name, value, labels)


def add(name: str, value: float, **labels: str) -> None:
    """Move gauge ``name`` by ``value`` (+1 when a session opens, -1 when it closes)."""
    _check(name, "gauge", labels)
    _sink.add(name, value, labels)
