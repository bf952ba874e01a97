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
gone) or records progress meanwhile with :meth:`Spool.record`. While an attempt runs, its owner extends
the lease (:meth:`Spool.renew`, a heartbeat: every lease under way in one call, every third of the lease
time), so an attempt may take longer than the lease time and a lease only expires when its owner stopped
renewing it (died, paused, cut off). A lease that is not ended in time (its owner died, or the result could
not be written) is taken back by :meth:`Spool.reclaim`, so no message is ever stranded in ``active``. A
shared spool (PostgreSQL) gives such messages to another node and uses ``Lease.token`` as a fencing token: a
result written under a lease that was taken back is refused (:class:`LeaseLost`).

*Destinations* (the domain of a message's first pending recipient, :func:`destination_of`) are the unit of
politeness towards remote sites, and a shared spool shares it between nodes: ``lease_due(…,
per_destination=N)`` never lets more than N messages of one destination be leased at once, counting every
owner's leases; after a destination-wide failure one node notes it (:meth:`Spool.note_destination`) and
every node leaves the destination alone until its backoff ends (:meth:`Spool.backing_off`), when exactly one
caller is given the destination to probe.

Everything is ``async``: an implementation may block (files and fsync in worker threads, a database over
the network), the event loop never does. Implementations: ``outbound/queue/spool.py``
(:class:`~postgate.outbound.queue.spool.DirectorySpool`, a local directory, Postfix-style, with group
commit) and ``outbound/queue/pgspool.py`` (:class:`~postgate.outbound.queue.pgspool.PostgresSpool`, shared
by several nodes). ``tests/test_spool_contract.py`` runs one table of behaviours against both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from postgate.outbound.queue.envelope import Envelope
from postgate.policy.vocab import domain_of


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
    destination: str = ""            # destination_of(envelope) when leased: what per_destination counts


def destination_of(env: Envelope) -> str:
    """The destination a message counts against: the domain of its first pending recipient ("" if none)."""
    return domain_of(env.pending[0].address) if env.pending else ""   # the scheduler groups by the same key


@dataclass(frozen=True)
class Entry:
    """One queued message as the operator sees it (``postgate queue list``)."""

    state: State
    id: str
    envelope: Envelope | None        # None: the stored envelope is unreadable (corrupt)
    lease: Lease | None = None       # who delivers it now (state ``active``)


@dataclass(frozen=True)
class Summary:
    """The queue's size at a glance (the ``/metrics`` gauges): messages per state and the oldest arrival."""

    counts: dict[State, int]
    oldest: float | None             # arrival (epoch seconds) of the oldest message; None: empty


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

    # several nodes deliver from it: per-destination limits must be kept by the spool (lease_due's
    # per_destination), not only by each runner in memory
    shared: bool

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
    async def enqueue(self, env: Envelope, content: bytes, *, hold: bool = False) -> str:
        """Durably store a new message; once this returns the message may be acknowledged (250). On failure
        it raises and nothing of the message remains. ``hold``: stored on hold (a filter's HOLD), never
        leasable before the operator releases it."""

    # --- delivery ---------------------------------------------------------------------------------------
    async def lease_due(self, now: float, owner: str, duration: float, limit: int,
                        per_destination: int = 0) -> list[tuple[Lease, Envelope]]:
        """Lease up to ``limit`` messages due at ``now`` (incoming/deferred with ``next_attempt <= now``).
        ``per_destination`` > 0: never more than that many messages of one destination (:func:`destination_of`)
        leased at once, counting the leases every owner holds (those already held included)."""

    async def lease_fresh(self, now: float, owner: str, duration: float, limit: int,
                          per_destination: int = 0) -> list[tuple[Lease, Envelope]]:
        """Lease new mail this process queued since the last call, cheaply (the runner calls it when new mail
        wakes it, and :meth:`lease_due` at its poll). May lease due mail of other origins too, or nothing:
        what it leaves is found by the next :meth:`lease_due`."""

    def hand_over(self, owner: str | None, duration: float = 0.0) -> None:
        """``owner`` runs the queue in this process with leases of ``duration`` (None: it stopped): the spool
        may lease new mail queued here to it at once and keep it in memory for :meth:`lease_fresh`."""

    async def renew(self, leases: Sequence[Lease], now: float, duration: float) -> list[Lease]:
        """Extend each of ``leases`` still held by its owner under its token to ``now + duration`` (never
        shortened), all in one call. Returns the leases still held, with their new ``until``; a lease
        missing from the answer was lost (taken back, leased by another owner, the message deleted or
        quarantined) and is never extended: its owner's results will be refused (:class:`LeaseLost`). A
        lease past its ``until`` that nobody took back yet is still held and is extended. Raises
        :class:`SpoolError` when the spool cannot tell (unreachable): nothing is known to be lost."""

    async def content(self, qid: str) -> bytes: ...

    async def checked_content(self, env: Envelope) -> bytes:
        """The content of ``env``'s message, checked against the envelope's size and SHA-256
        (:meth:`Envelope.check_content`: :class:`EnvelopeError` when it does not match). A spool may skip the
        digest for a content that never left its memory since it was sealed (the very object hashed)."""

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

    # --- destinations: backoff after a destination-wide failure, shared by every node of a shared spool -----
    async def backing_off(self, dests: Sequence[str], now: float, probe_for: float) -> dict[str, float]:
        """Of ``dests``, those to leave alone at ``now``, each with the end of its backoff. A destination whose
        backoff has ended is handed to this caller to probe: it is not in the answer, and every other caller
        sees it backing off for ``probe_for`` seconds more (until the probe's result is noted), so one
        delivery, not every node's, tests whether the site is back."""

    async def note_destination(self, dest: str, until: float | None) -> None:
        """``until``: the destination failed as a whole (no server answered); leave it alone until then.
        None: it answered; its backoff (if any) ends."""

    async def forget_destinations(self, dest: str | None = None) -> None:
        """End the backoff of ``dest``, or of every destination (operator flush)."""

    # --- reading ------------------------------------------------------------------------------------------
    async def get(self, qid: str) -> tuple[State, Envelope] | None:
        """The message's state and envelope, or None if it is not queued."""

    async def entries(self) -> list[Entry]:
        """Every message, oldest first."""

    async def summary(self) -> Summary:
        """Messages per state and the oldest arrival; a shared spool answers with one aggregate query, not
        a listing (``/metrics`` asks at every scrape)."""

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


__all__ = ["WAITING", "Entry", "Lease", "LeaseLost", "Spool", "SpoolError", "SpoolUnavailable", "State", "Summary",
           "destination_of"]
