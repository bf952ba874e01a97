"""The queue as an interface: what the SMTP server, the scheduler and the ``postgate queue`` command need of
a place where accepted mail waits for delivery.

A message is *accepted* (the SMTP server may answer 250) once :meth:`Spool.enqueue` returned: from then on
the spool owns it until every recipient is final (delivered or bounced) or the operator deletes it. Each
message is in one :class:`State` at a time:

==========  ======================================================================================
incoming    newly accepted, due at ``Envelope.next_attempt`` (usually at once)
deferred    waiting for its next attempt after a temporary failure
active      leased: one delivery attempt runs on it, by the lease's owner, until the lease expires
hold        kept back by the operator (Postfix ``postsuper -h``); never delivered until released
corrupt     failed an integrity check; kept for the operator, never delivered, never deleted
==========  ======================================================================================

Delivery works with *leases* (:class:`Lease`): :meth:`Spool.lease_due` hands out due messages, each leased
to one owner until ``until``. The owner ends the lease with :meth:`Spool.release` (a temporary failure:
back to deferred with the envelope's new ``next_attempt``), :meth:`Spool.finish` (every recipient final:
gone) or records progress meanwhile with :meth:`Spool.record`. A lease that is not ended in time (its
owner died, or the result could not be written) is taken back by :meth:`Spool.reclaim`, so no message is
ever stranded in ``active``. A shared spool (PostgreSQL) gives such messages to another node and uses
``Lease.token`` as a fencing token: a result written under a lease that was taken back is refused
(:class:`LeaseLost`).

Everything is ``async``: an implementation may block (files and fsync in worker threads, a database over
the network), the event loop never does. Implementations: ``outbound/queue/spool.py``
(:class:`~postgate.outbound.queue.spool.DirectorySpool`, a local directory, Postfix-style, with group
commit).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from postgate.outbound.queue.envelope import Envelope


class State(StrEnum):
    INCOMING = "incoming"
    DEFERRED = "deferred"
    ACTIVE = "active"
    HOLD = "hold"
    CORRUPT = "corrupt"


WAITING = (State.INCOMING, State.DEFERRED)   # the states a due message is leased from


@dataclass(frozen=True)
class Lease:
    """The right to deliver one message until ``until`` (epoch seconds). ``token`` fences a shared backend:
    it changes every time the message is leased, so a former owner's late write can be told apart."""

    id: str
    owner: str
    until: float
    token: int = 0


@dataclass(frozen=True)
class Entry:
    """One queued message as the operator sees it (``postgate queue list``)."""

    state: State
    id: str
    envelope: Envelope | None        # None: the stored envelope is unreadable (corrupt)
    lease: Lease | None = None       # who delivers it now (state ``active``)


class SpoolError(Exception):
    """The spool cannot do what was asked (I/O error, disk full, database down). For ``enqueue``: the
    message was NOT accepted and nothing of it is left behind; the SMTP server answers 451."""


class SpoolUnavailable(SpoolError):
    """The spool cannot be used at all (missing, read-only, not writable, wrong schema). ``postgate serve``
    refuses to start with this message (exit 78, EX_CONFIG)."""


class LeaseLost(SpoolError):
    """A result was written under a lease that had been taken back (expired, given to another owner)."""


class Spool(Protocol):
    """Every operation callers use. All may raise :class:`SpoolError` (or ``OSError``) on I/O failure."""

    # --- ownership and start-up --------------------------------------------------------------------------
    async def check(self) -> None:
        """Raise :class:`SpoolUnavailable` with a clear reason if mail cannot be queued here."""

    async def try_lock(self) -> bool:
        """Become the process that runs the queue (False: another one does). A shared spool lets every node
        run it, and may always return True."""

    async def unlock(self) -> None: ...

    async def recover(self) -> list[str]:
        """As owner, at start: take back the leases of a dead run, clean what an interrupted write left,
        quarantine what fails its checks. Returns one line per action, for the log."""

    # --- acceptance ------------------------------------------------------------------------------------
    async def enqueue(self, env: Envelope, content: bytes) -> str:
        """Durably store a new message; once this returns the message may be acknowledged (250). On failure
        it raises and nothing of the message remains."""

    # --- delivery ---------------------------------------------------------------------------------------
    async def lease_due(self, now: float, owner: str, duration: float, limit: int) -> list[tuple[Lease, Envelope]]:
        """Lease up to ``limit`` messages due at ``now`` (incoming/deferred with ``next_attempt <= now``)."""

    async def content(self, qid: str) -> bytes: ...

    async def record(self, lease: Lease, env: Envelope) -> None:
        """Durably record per-recipient results under a lease that is kept."""

    async def release(self, lease: Lease, env: Envelope) -> None:
        """End the lease; the message waits (deferred) until ``env.next_attempt``."""

    async def finish(self, lease: Lease) -> None:
        """End the lease: every recipient is final, the message is removed."""

    async def reclaim(self, now: float) -> list[str]:
        """While running: take back leases expired at ``now`` (their messages become due again, nothing
        stays in ``active``). Returns the queue ids taken back."""

    async def quarantine(self, qid: str, state: State, why: str) -> None:
        """Move a message that failed its checks to ``corrupt`` (logged), never deleting it."""

    # --- reading ------------------------------------------------------------------------------------------
    async def get(self, qid: str) -> tuple[State, Envelope] | None:
        """The message's state and envelope, or None if it is not queued."""

    async def entries(self) -> list[Entry]:
        """Every message, oldest first."""

    # --- changes by the owner (operator requests, late pre-queue results) ---------------------------------
    async def update(self, qid: str, state: State, env: Envelope) -> bool:
        """Rewrite the envelope of a message that is not leased, only if it is still in ``state``."""

    async def delete(self, qid: str, state: State | None = None) -> bool:
        """Remove a message (only if in ``state``, when given). False: not there."""

    async def hold(self, qid: str) -> bool: ...

    async def release_hold(self, qid: str, now: float) -> bool: ...

    async def reschedule(self, qid: str, when: float) -> bool:
        """Set ``next_attempt`` of a waiting (incoming/deferred) message."""

    # --- requests from other processes (``postgate queue hold …`` while a daemon runs) --------------------
    async def request(self, action: str, arg: str = "") -> None: ...

    async def take_requests(self) -> list[tuple[str, str]]: ...


__all__ = ["WAITING", "Entry", "Lease", "LeaseLost", "Spool", "SpoolError", "SpoolUnavailable", "State"]
