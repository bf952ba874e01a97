"""The retry schedule (outbound/queue/retry.py) as a table: Postfix's backoff doubling from
minimal_backoff_time to maximal_backoff_time, expiry at maximal_queue_lifetime (RFC 5321 §4.5.4.1: retry
for at least 4-5 days). Pure function: no clock, no network."""

from __future__ import annotations

import pytest
from postgate.outbound.queue.envelope import Envelope, Recipient
from postgate.outbound.queue.retry import Attempt, Expire, Retry, RetryPolicy, next_attempt

T0 = 1_800_000_000.0
DAY = 86400.0

# (attempts so far incl. this one, outcome, age of the message, expected: wait in seconds or "expire")
TABLE = [
    (1, Attempt.DEFERRED, 0.0, 300.0),
    (2, Attempt.DEFERRED, 600.0, 600.0),
    (3, Attempt.DEFERRED, 1200.0, 1200.0),
    (4, Attempt.DEFERRED, 3000.0, 2400.0),
    (5, Attempt.DEFERRED, 6000.0, 4000.0),            # capped at maximal_backoff_time
    (40, Attempt.DEFERRED, 2 * DAY, 4000.0),
    (10_000, Attempt.DEFERRED, 4 * DAY, 4000.0),      # no overflow however many attempts
    (1, Attempt.ERROR, 0.0, 300.0),                   # an internal error backs off like a 4xx, never a tight loop
    (3, Attempt.ERROR, 1200.0, 1200.0),
    (2, Attempt.NOT_TRIED, 60.0, 600.0),
    (0, Attempt.DEFERRED, 0.0, 300.0),                # no attempt recorded: the first backoff
    (30, Attempt.DEFERRED, 5 * DAY - 1, 4000.0),
    (30, Attempt.DEFERRED, 5 * DAY, "expire"),        # maximal_queue_lifetime reached
    (1, Attempt.ERROR, 6 * DAY, "expire"),
]


@pytest.mark.parametrize(("attempts", "outcome", "age", "expected"), TABLE)
def test_next_attempt(attempts: int, outcome: Attempt, age: float, expected: float | str) -> None:
    env = Envelope.new("a@x.test", [Recipient("b@y.test")], b"x", now=T0)
    env.attempts = [{"time": T0}] * attempts
    now = T0 + age
    got = next_attempt(env, outcome, now, RetryPolicy())
    if expected == "expire":
        assert got == Expire(age)
    else:
        assert got == Retry(now + float(expected))


def test_policy_is_taken_from_the_caller() -> None:
    env = Envelope.new("a@x.test", [Recipient("b@y.test")], b"x", now=T0)
    env.attempts = [{"time": T0}] * 3
    assert next_attempt(env, Attempt.DEFERRED, T0 + 10, RetryPolicy(10, 30, 100)) == Retry(T0 + 10 + 30)
    assert next_attempt(env, Attempt.DEFERRED, T0 + 100, RetryPolicy(10, 30, 100)) == Expire(100)
