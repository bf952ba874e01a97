"""The retry schedule, as one pure function: when is a message tried again, or is it time to give up?

Postfix's defaults, which operators know: after the first failed attempt wait ``minimal_backoff_time``
(300 s), then double the wait at each further attempt up to ``maximal_backoff_time`` (4000 s); a message
still undelivered ``maximal_queue_lifetime`` (5 days) after its arrival is returned to its sender
(RFC 5321 §4.5.4.1: retries "should continue for at least 4-5 days"). An attempt that failed inside
Postgate (a bug, a full disk) is a temporary failure like any other: it waits the same backoff, so a
message that trips a bug is neither stranded nor retried in a tight loop.

No clock, no I/O: the scheduler, the pre-queue path and any queue backend call it with ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from postgate.outbound.queue.envelope import Envelope


class Attempt(Enum):
    """How a delivery attempt ended for the recipients still pending after it."""

    DEFERRED = "deferred"      # a temporary failure reported by delivery (4xx, no MX reachable, …)
    ERROR = "error"            # the attempt failed inside Postgate (an unexpected exception, I/O error)
    NOT_TRIED = "not-tried"    # the destination is backing off: nothing was sent


@dataclass(frozen=True)
class RetryPolicy:
    min_backoff: float = 300.0
    max_backoff: float = 4000.0
    max_lifetime: float = 5 * 86400.0


@dataclass(frozen=True)
class Retry:
    at: float                  # next attempt, epoch seconds


@dataclass(frozen=True)
class Expire:
    """Give up: the pending recipients bounce (RFC 3464 ``failed``, status 4.4.7)."""

    age: float


def backoff(attempts: int, policy: RetryPolicy) -> float:
    """The wait after the ``attempts``-th failed attempt: min_backoff, doubling, at most max_backoff."""
    n = max(0, attempts - 1)
    if n > 64:  # 2**n overflows nothing in Python, but the cap is reached long before
        return policy.max_backoff
    return float(min(policy.max_backoff, policy.min_backoff * 2 ** n))


def next_attempt(env: Envelope, outcome: Attempt, now: float, policy: RetryPolicy = RetryPolicy()) -> Retry | Expire:
    """Decide what follows an attempt that left recipients pending. ``env.attempts`` already holds it.
    Every outcome waits the same backoff today (as in Postfix); the outcome is in the signature so that a
    rule per outcome stays a change to this function alone."""
    del outcome
    age = now - env.arrival
    if age >= (env.lifetime if env.lifetime is not None else policy.max_lifetime):  # a filter's queue_lifetime
        return Expire(age)
    wait = backoff(max(1, len(env.attempts)), policy)
    return Retry(now + wait)


__all__ = ["Attempt", "Expire", "Retry", "RetryPolicy", "backoff", "next_attempt"]
