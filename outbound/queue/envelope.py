"""A queued message's envelope: sender, recipients with their individual state, DSN parameters
(RFC 3461: NOTIFY, ORCPT, RET, ENVID), REQUIRETLS (RFC 8689), arrival time and attempt history.

It is stored as JSON beside the immutable message content; every change is written to a new file and
renamed into place, so a reader sees the old or the new version, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from typing import Any

from postgate.policy.vocab import Outcome, new_queue_id, valid_queue_id

FORMAT = 1

# a filter's queue priority (Sieve vnd.postgate ``queue_priority``): 0 lowest … 9 highest; due messages are
# handed out highest first. Envelopes stored before the field existed read as the default, the middle.
DEFAULT_PRIORITY = 5


class EnvelopeError(ValueError):
    """The stored envelope cannot be trusted: unparseable, incomplete or inconsistent."""


@dataclass
class Recipient:
    address: str
    orcpt: str | None = None              # RFC 3461 §4.2 ORCPT, "type;address"
    notify: list[str] | None = None       # RFC 3461 §4.1: NEVER, or SUCCESS/FAILURE/DELAY
    status: Outcome = Outcome.PENDING
    dsn: str = ""
    reason: str = ""
    remote: str = ""                      # the MX that gave the reply
    time: float = 0.0
    suspected_attack: bool = False        # the last attempt was deferred as a suspected attack
    # an inbound filter's route (Sieve vnd.postgate, inbound/filters.Route): None = the configured maps
    tls_level: str | None = None          # a policy/tls.Level value, in place of the policy map's
    transport: str | None = None          # smtp:[host]:port, in place of the transport map's
    # RFC 3464 §2.3.6: the diagnostic-type of ``reason``: "smtp" when it is the remote server's own reply,
    # "X-Postgate" when Postgate wrote it; None for envelopes stored before this field existed
    diagnostic_type: str | None = None

    def __post_init__(self) -> None:
        self.status = Outcome(self.status)  # as stored: the enum's value

    @property
    def final(self) -> bool:
        return self.status.final

    def record(self, result: Any, when: float | None = None) -> None:
        """Take a delivery attempt's outcome (an outbound.delivery.RecipientResult)."""
        self.status = result.status if result.status.final else Outcome.DEFERRED
        self.dsn = result.dsn
        self.reason = str(result.reply) if result.reply else result.reason
        self.diagnostic_type = "smtp" if result.reply else "X-Postgate"
        self.remote = result.mx or ""
        self.suspected_attack = result.suspected_attack
        self.time = time.time() if when is None else when

    def explain(self, text: str) -> None:
        """A reason Postgate writes itself (not a server's reply): RFC 3464 §2.3.6 type X-Postgate."""
        self.reason, self.diagnostic_type = text, "X-Postgate"

    def wants(self, kind: str) -> bool:
        """RFC 3461 §4.1: NOTIFY absent means FAILURE (and DELAY at the MTA's discretion)."""
        if self.notify is None:
            return kind in ("FAILURE", "DELAY")
        return kind in self.notify


@dataclass
class Envelope:
    id: str
    sender: str
    recipients: list[Recipient]
    arrival: float
    size: int
    sha256: str
    envid: str | None = None
    ret: str | None = None                # FULL or HDRS
    requiretls: bool = False
    smtputf8: bool = False
    body: str = ""                        # 7BIT / 8BITMIME
    attempts: list[dict[str, Any]] = field(default_factory=list)
    next_attempt: float = 0.0
    delay_warned: bool = False
    is_bounce: bool = False
    lifetime: float | None = None         # seconds in the queue before a bounce; None: [queue] max_lifetime
    priority: int = DEFAULT_PRIORITY      # 0 … 9: due messages are leased highest first (a filter's choice)

    @classmethod
    def new(cls, sender: str, recipients: list[Recipient], content: bytes, now: float | None = None,
            **kw: Any) -> Envelope:
        t = time.time() if now is None else now
        # the digest is taken when the message is stored (seal): a pre-queue delivery that is never queued
        # needs none (0.9 ms per MB here), and the spool's commit thread hashes without holding the GIL
        return cls(new_queue_id(t), sender, recipients, t, len(content), "", next_attempt=t, **kw)

    def seal(self, content: bytes) -> None:
        """Take the content's SHA-256 for the stored envelope (every spool's enqueue does, before the
        envelope is written), so a truncated or altered copy is found when it is read back."""
        if not self.sha256:
            self.sha256 = hashlib.sha256(content).hexdigest()

    @property
    def pending(self) -> list[Recipient]:
        return [r for r in self.recipients if not r.final]

    def to_bytes(self) -> bytes:
        # the fields as they are (dataclasses.asdict deep-copies everything: 15 times slower, same JSON)
        d = dict(vars(self))
        d["recipients"] = [dict(vars(r)) for r in self.recipients]
        d["format"] = FORMAT
        return json.dumps(d, sort_keys=True).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Envelope:
        try:
            d = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise EnvelopeError(f"unparseable envelope: {e}") from e
        if not isinstance(d, dict) or d.pop("format", None) != FORMAT:
            raise EnvelopeError("not a Postgate envelope (format)")
        try:
            rcpts = [Recipient(**r) for r in d.pop("recipients")]
            env = cls(recipients=rcpts, **d)
        except (TypeError, KeyError, ValueError) as e:
            raise EnvelopeError(f"incomplete envelope: {e}") from e
        if not valid_queue_id(env.id) or not rcpts or not isinstance(env.sender, str):
            raise EnvelopeError("inconsistent envelope")
        if type(env.priority) is not int or not 0 <= env.priority <= 9:
            raise EnvelopeError(f"inconsistent envelope: priority {env.priority!r}")
        return env

    def check_content(self, content: bytes) -> None:
        # an envelope without a digest (never stored by a spool) is checked by its size alone
        if len(content) != self.size or (self.sha256 and hashlib.sha256(content).hexdigest() != self.sha256):
            raise EnvelopeError(f"content of {self.id} does not match its envelope (truncated or altered)")
