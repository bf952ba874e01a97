"""The spool: where a message lives from the moment Postgate answers 250 until it is delivered or
bounced. The :class:`Spool` interface is what the scheduler uses; :class:`DirectorySpool` keeps it in a
local directory, Postfix-style.

Layout of a spool directory::

    messages/<id>     the content, written once (temporary name, fsync, rename, directory fsync)
    incoming/<id>     envelope of a new message           \\
    deferred/<id>     envelope waiting for its next attempt | the envelope moves between these by
    active/<id>       envelope leased for delivery         | one atomic rename; its content never
    hold/<id>         envelope held by the operator        | moves
    corrupt/<id>      envelope or content that failed checks, kept for the operator /
    requests/         operator requests (hold, delete, flush ...) for the process holding the lock
    tmp/              files being written
    lock              flock'd by the process that owns the spool (the daemon, or a CLI when none runs)

Durability: a message is acknowledged only after its content and envelope files and their directories
are fsync'd. Every envelope change is a new file renamed over the old one, then fsync'd, so recipients
already delivered stay recorded across a crash. Files that are half written, truncated or unparseable
are never delivered and never deleted silently: they move to ``corrupt/`` with a log line.
"""

from __future__ import annotations

import fcntl
import logging
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from postgate.outbound.crash import crashpoint
from postgate.outbound.queue.envelope import Envelope, EnvelopeError
from postgate.policy.vocab import valid_queue_id

log = logging.getLogger("postgate.queue")

STATES = ("incoming", "deferred", "active", "hold", "corrupt")


@dataclass(frozen=True)
class Lease:
    """The right to deliver one message until ``until``; a shared backend gives a dead node's
    messages to another node once their lease expired."""

    id: str
    owner: str
    until: float


class Spool(Protocol):
    def enqueue(self, env: Envelope, content: bytes) -> str: ...
    def lease_due(self, now: float, owner: str, duration: float, limit: int) -> list[tuple[Lease, Envelope]]: ...
    def content(self, qid: str) -> bytes: ...
    def record(self, lease: Lease, env: Envelope) -> None: ...
    def release(self, lease: Lease, env: Envelope) -> None: ...
    def finish(self, lease: Lease) -> None: ...


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class DirectorySpool:
    """The local-directory spool. One process at a time owns it (``lock``)."""

    def __init__(self, root: Path | str, *, fsync: bool = True) -> None:
        self.root = Path(root)
        self.fsync = fsync
        for d in ("messages", "tmp", "requests", *STATES):
            (self.root / d).mkdir(parents=True, exist_ok=True)
        self._lock_fd: int | None = None

    # --- ownership -----------------------------------------------------------------------------------
    def try_lock(self) -> bool:
        """Become the owner (daemon, or a CLI applying requests when no daemon runs)."""
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # --- low level -------------------------------------------------------------------------------------
    def _write(self, target: Path, data: bytes) -> None:
        """Write ``data`` to ``target`` atomically and durably."""
        tmp = self.root / "tmp" / f"{target.name}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            view = memoryview(data)
            while view:
                n = os.write(fd, view)
                view = view[n:]
            crashpoint("spool-before-fsync")
            if self.fsync:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, target)
        crashpoint("spool-after-rename")
        if self.fsync:
            fsync_dir(target.parent)

    def _path(self, state: str, qid: str) -> Path:
        return self.root / state / qid

    def state_of(self, qid: str) -> str | None:
        for s in STATES:
            if self._path(s, qid).exists():
                return s
        return None

    def _move(self, qid: str, src: str, dst: str, durable: bool = True) -> None:
        """Move an envelope between states. ``durable=False`` skips the directory fsyncs where losing the
        move in a crash is harmless: a lease (active/) or its release (deferred/) that did not reach the
        disk leaves the envelope where recovery returns it anyway (incoming/), to be tried again."""
        os.rename(self._path(src, qid), self._path(dst, qid))
        if self.fsync and durable:
            fsync_dir(self.root / dst)
            fsync_dir(self.root / src)

    def read_envelope(self, state: str, qid: str) -> Envelope:
        return Envelope.from_bytes(self._path(state, qid).read_bytes())

    # --- the Spool interface ----------------------------------------------------------------------------
    def enqueue(self, env: Envelope, content: bytes) -> str:
        """Durably store a new message; when this returns, the message may be acknowledged."""
        self._write(self.root / "messages" / env.id, content)
        self._write(self._path("incoming", env.id), env.to_bytes())
        crashpoint("spool-enqueued")
        return env.id

    def content(self, qid: str) -> bytes:
        return (self.root / "messages" / qid).read_bytes()

    def lease_due(self, now: float, owner: str, duration: float, limit: int) -> list[tuple[Lease, Envelope]]:
        """Move due messages to active/ (one rename each: the lease) and return them."""
        out: list[tuple[Lease, Envelope]] = []
        for state in ("incoming", "deferred"):
            for qid in sorted(os.listdir(self.root / state)):
                if len(out) >= limit:
                    return out
                try:
                    env = self.read_envelope(state, qid)
                except FileNotFoundError:
                    continue  # taken by a concurrent operation
                except (EnvelopeError, OSError) as e:
                    self.quarantine(qid, state, str(e))
                    continue
                if env.next_attempt > now:
                    continue
                try:
                    self._move(qid, state, "active", durable=False)
                except FileNotFoundError:
                    continue
                out.append((Lease(qid, owner, now + duration), env))
        return out

    def record(self, lease: Lease, env: Envelope) -> None:
        """Durably record per-recipient results of the message being delivered."""
        self._write(self._path("active", lease.id), env.to_bytes())

    def release(self, lease: Lease, env: Envelope) -> None:
        """End the lease; the message waits in deferred/ for ``env.next_attempt``."""
        self._write(self._path("active", lease.id), env.to_bytes())
        self._move(lease.id, "active", "deferred", durable=False)

    def finish(self, lease: Lease) -> None:
        """Every recipient is final: remove the message."""
        self.delete(lease.id, "active")

    # --- operator actions (called by the lock owner) -----------------------------------------------------
    def delete(self, qid: str, state: str | None = None) -> bool:
        state = state or self.state_of(qid)
        if state is None:
            return False
        os.unlink(self._path(state, qid))
        if self.fsync:
            fsync_dir(self.root / state)
        try:
            os.unlink(self.root / "messages" / qid)
        except FileNotFoundError:
            pass
        return True

    def hold(self, qid: str) -> bool:
        state = self.state_of(qid)
        if state in ("incoming", "deferred"):
            self._move(qid, state, "hold")
            return True
        return False

    def release_hold(self, qid: str, now: float) -> bool:
        if self.state_of(qid) != "hold":
            return False
        env = self.read_envelope("hold", qid)
        env.next_attempt = now
        self._write(self._path("hold", qid), env.to_bytes())
        self._move(qid, "hold", "deferred")
        return True

    def reschedule(self, qid: str, when: float) -> bool:
        state = self.state_of(qid)
        if state not in ("incoming", "deferred"):
            return False
        env = self.read_envelope(state, qid)
        env.next_attempt = when
        self._write(self._path(state, qid), env.to_bytes())
        return True

    def update(self, qid: str, state: str, env: Envelope) -> None:
        """Rewrite the envelope of a message that is not leased (the owner only)."""
        self._write(self._path(state, qid), env.to_bytes())

    def quarantine(self, qid: str, state: str, why: str) -> None:
        """Move a bad envelope (and its content) to corrupt/, never deleting it."""
        try:
            os.rename(self._path(state, qid), self._path("corrupt", qid))
        except FileNotFoundError:
            pass
        msg = self.root / "messages" / qid
        if msg.exists():
            os.rename(msg, self.root / "corrupt" / f"{qid}.content")
        log.error("%s: status=corrupt (%s) moved to %s", qid, why, self.root / "corrupt")

    def recover(self) -> list[str]:
        """At start, as owner: leases of a dead process go back to incoming/; partial writes and orphans
        move to corrupt/. Returns what it did, one line each."""
        done = []
        for qid in os.listdir(self.root / "active"):
            self._move(qid, "active", "incoming")
            done.append(f"{qid}: lease of a previous run returned to incoming")
        for name in os.listdir(self.root / "tmp"):
            os.rename(self.root / "tmp" / name, self.root / "corrupt" / f"partial-{name}")
            log.error("%s: status=corrupt (partial write from a previous run) moved to corrupt", name)
            done.append(f"{name}: partial write moved to corrupt")
        known = {q for s in ("incoming", "deferred", "hold") for q in os.listdir(self.root / s)}
        for qid in os.listdir(self.root / "messages"):
            if qid not in known:
                os.rename(self.root / "messages" / qid, self.root / "corrupt" / f"{qid}.orphan")
                log.error("%s: status=corrupt (content without envelope: never acknowledged) moved to corrupt",
                          qid)
                done.append(f"{qid}: orphan content moved to corrupt")
        for state in ("incoming", "deferred", "hold"):
            for qid in os.listdir(self.root / state):
                if not valid_queue_id(qid):
                    self.quarantine(qid, state, "not a queue file name")
                    continue
                try:
                    env = self.read_envelope(state, qid)
                    env.check_content(self.content(qid))
                except (EnvelopeError, OSError) as e:
                    self.quarantine(qid, state, str(e))
                    done.append(f"{qid}: corrupt")
        return done

    # --- listing ----------------------------------------------------------------------------------------
    def entries(self) -> Iterator[tuple[str, str, Envelope | None]]:
        """(state, id, envelope or None if unreadable) for every message, oldest first."""
        items = [(qid, s) for s in STATES for qid in os.listdir(self.root / s) if s != "corrupt" or
                 valid_queue_id(qid)]
        for qid, s in sorted(items):
            try:
                yield s, qid, self.read_envelope(s, qid)
            except (EnvelopeError, OSError):
                yield s, qid, None

    # --- requests from other processes -------------------------------------------------------------------
    def request(self, action: str, arg: str = "") -> None:
        """Ask the owner to do something (``hold``, ``release``, ``delete``, ``flush``, ``flush-domain``,
        ``requeue``). Written atomically; applied in order of arrival."""
        name = f"{time.time_ns():020d}-{secrets.token_hex(3)}"
        self._write(self.root / "requests" / name, f"{action}\n{arg}\n".encode())

    def take_requests(self) -> list[tuple[str, str]]:
        out = []
        for name in sorted(os.listdir(self.root / "requests")):
            p = self.root / "requests" / name
            try:
                action, arg = (p.read_text().split("\n") + ["", ""])[:2]
                out.append((action, arg))
            finally:
                p.unlink(missing_ok=True)
        return out
