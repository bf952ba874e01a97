"""Postfix's delivery log vocabulary as pure functions: ``delay=`` and ``delays=a/b/c/d``.

Postfix logs for every delivery attempt ``delay=`` (seconds since the message arrived, not since this
attempt began) and ``delays=a/b/c/d``: a = before the queue manager (arrival to this attempt), b = in the
queue manager, c = connection set-up (DNS, connect, greeting, HELO, TLS), d = message transmission. The
delivery agents (outbound/) format their lines with these; the log handler lives in ``postgate/logfmt.py``.
"""

from __future__ import annotations


def arrival_of(queue_id: str) -> float | None:
    """The arrival time encoded in a Postgate queue id (microseconds since the epoch, 14 hex digits first),
    or None for an id of another form."""
    try:
        return int(queue_id[:14], 16) / 1_000_000 if len(queue_id) >= 14 else None
    except ValueError:
        return None


def delays(queue_id: str, attempt_start: float, attempt_end: float, connected: float | None = None) -> str:
    """Postfix's ``delay=total, delays=a/b/c/d``: total is the time since arrival; a = before the queue
    manager (arrival to this attempt), b = in the queue manager (0: Postgate's scheduler hands over at
    once), c = connection set-up (DNS, connect, greeting, HELO, TLS), d = transmission."""
    arrival = arrival_of(queue_id)
    if arrival is None or arrival > attempt_start:
        arrival = attempt_start
    c_end = connected if connected is not None else attempt_end
    a, b, c, d = attempt_start - arrival, 0.0, c_end - attempt_start, attempt_end - c_end
    return f"delay={_d(attempt_end - arrival)}, delays={_d(a)}/{_d(b)}/{_d(c)}/{_d(d)}"


def _d(x: float) -> str:
    # like Postfix: 0 for nothing, two decimals for short times, whole seconds for long ones
    if x < 0.005:
        return "0"
    return f"{x:.2f}" if x < 10 else (f"{x:.1f}" if x < 100 else f"{x:.0f}")
