"""The local-directory spool: one implementation of the :class:`~postgate.outbound.queue.protocol.Spool`
interface, Postfix-style, on one local file system.

Layout of a spool directory::

    messages/<id>     the envelope as accepted (first line) and the content, written once; it never moves
    incoming/<id>     envelope of a new message (a hard link to messages/<id>) \\
    deferred/<id>     envelope waiting for its next attempt | the envelope moves between these by
    active/<id>       envelope leased for delivery         | one atomic rename
    hold/<id>         envelope held by the operator        |
    corrupt/<id>      envelope or content that failed checks, kept for the operator /
    requests/         operator requests (hold, delete, flush ...) for the process holding the lock
    tmp/              files being written
    lock              flock'd by the process that owns the spool (the daemon, or a CLI when none runs)

**Durability, with group commit.** A message is acknowledged only once it is on disk. New messages are
written in *batches*: every message that arrives while the previous batch is being made durable joins the
next one (a committer thread per process), and one batch costs one journal commit, whatever its size::

    write each message to messages/<id>: "POSTGATE-ENVELOPE " and its envelope as accepted (one JSON
                                                          line), then the content
    fsync those files, then messages/                    (one journal commit: see below)
    -- acknowledgement point: every message of the batch may get its 250 --
    link each message file into incoming/<id>            (its index: no fsync, recovery can rebuild it;
                                                          a link, so no second file is created)

instead of two fsync'd files and two directory fsyncs per message (``scripts/bench queue`` compares).
The writeback of each file starts as it is written (Linux ``sync_file_range``), so the fsyncs that
follow, one after the other in the committer thread, cost about one journal commit for the batch without
a thread per file. Readers of an index read only its first line when it is a link to the message file;
every later change of an envelope writes a new file and renames it over the index (never in place).

**New mail handed over.** In the process that runs the queue (:meth:`DirectorySpool.hand_over`), a new
message is leased to the runner as it is queued: its index is linked into active/ instead of incoming/,
with the lease registered first, and the runner takes it from memory (:meth:`DirectorySpool.lease_fresh`:
no directory scan, no envelope or content read, no thread). What does not fit (more than ``FRESH_MAX``
waiting, or another runner's share) goes to incoming/ for the scan; a crash returns active/ to incoming/.
A crash before the acknowledgement point leaves a torn or complete message file without an envelope:
complete ones are restored and delivered (RFC 5321 §6.1 prefers a duplicate to a loss), torn ones
removed. Every later envelope change (results, hold, reschedule) is a new file renamed over the old one,
then fsync'd, so recipients already delivered stay recorded across a crash.

**Delivery results, with group commit too.** The results of delivery attempts (``record``: new
per-recipient results, lease kept; ``release``: back to deferred/; ``finish``: removed) are collected by a
second committer thread and written several per round of fsyncs (:meth:`SpoolFiles.results_batch`). A bounce
is queued durably before its message's removal is submitted; a removal lost in a crash delivers the message
once more (RFC 5321 §6.1: a duplicate, never a loss).

**Several queue runners** (``[queue] run_in_workers``): each of n processes leases, delivers and takes back
only its *share* of the messages (the random bits of the queue id, mod n), so a lease in active/ always
has exactly one runner that may take it back; a rename is the lease, and every state change of a message
holds ``state.lock`` (flock) besides the thread lock, so two processes never lease the same message and an
operator request never crosses a lease. The main process adopts the share of a runner that died.

**What recovery calls corrupt.** Removing a message unlinks its message file first, then its
envelope (neither fsync'd: a removal undone by a power loss costs a duplicate, RFC 5321 §6.1); so an
envelope without its message file is what a delivered or deleted message leaves after a kill, and is
cleaned silently, like a torn message file of an unacknowledged batch. An envelope or message
file that does not parse, or a content that does not match its envelope's size and SHA-256, cannot come
from a crash: that is corruption, moved to ``corrupt/`` with a ``status=corrupt`` log line, never
delivered and never deleted.

**The event loop never waits for the disk**: every method of :class:`DirectorySpool` runs its file work
in a worker thread (:class:`SpoolFiles` holds the synchronous code).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import heapq
import itertools
import logging
import os
import queue
import secrets
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Generic, TypeVar, cast

from postgate.outbound.crash import crashpoint
from postgate.outbound.queue.envelope import Envelope, EnvelopeError
from postgate.outbound.queue.protocol import (
    WAITING,
    Entry,
    Lease,
    LeaseLost,
    Spool,
    SpoolError,
    SpoolUnavailable,
    State,
    Summary,
    destination_of,
)
from postgate.policy.vocab import share_of, valid_queue_id

log = logging.getLogger("postgate.queue")

STATES = tuple(s.value for s in State)
MAGIC = b"POSTGATE-ENVELOPE "   # starts a message file's first line: the envelope as accepted
T = TypeVar("T")
Item = TypeVar("Item")
# one delivery result for the results committer: ("record" | "release" | "finish", lease, new envelope)
Result = tuple[str, Lease, Envelope | None]


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _read_index(path: Path | str) -> tuple[bytes, int]:
    """The envelope of an index file, and its inode. An index is an envelope file (written by a result or
    an operator action), or, for new mail, a hard link to the message file: then only its first line (the
    envelope as accepted) is read, not the content."""
    fd = os.open(path, os.O_RDONLY)
    try:
        inode = os.fstat(fd).st_ino
        data = os.read(fd, 1 << 16)
        if data.startswith(MAGIC):
            while (end := data.find(b"\n", len(MAGIC))) < 0:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    raise EnvelopeError(f"{path}: message file without a complete envelope line")
                data += chunk
            return data[len(MAGIC):end], inode
        while chunk := os.read(fd, 1 << 16):
            data += chunk
        return data, inode
    finally:
        os.close(fd)


def _find_sync_file_range() -> Callable[[int, int, int, int], object] | None:
    """Linux's sync_file_range(2), to start a file's writeback without waiting: os.sync_file_range where
    Python was built with it, else the C library's through ctypes (it releases the GIL); None elsewhere."""
    fn = getattr(os, "sync_file_range", None)
    if fn is not None:
        return cast(Callable[[int, int, int, int], object], fn)
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        c_fn = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    c_fn.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    c_fn.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], object], c_fn)


_sync_file_range = _find_sync_file_range()
_WRITE = 2   # SYNC_FILE_RANGE_WRITE (linux/fs.h)
_HAVE_WRITEBACK = _sync_file_range is not None


def _start_writeback(fd: int) -> None:
    """Start writing a file's data to disk now, without waiting (its fsync comes later)."""
    if _sync_file_range is not None:
        try:
            _sync_file_range(fd, 0, 0, _WRITE)   # a failure (-1 from the C call) is left to the fsync
        except OSError:
            pass


def _write_all(fd: int, data: bytes, *more: bytes) -> None:
    """Write ``data`` and then ``more`` in full: several parts in one writev (no copy to join them)."""
    parts = [memoryview(p) for p in (data, *more) if p]
    while parts:
        n = os.writev(fd, parts) if len(parts) > 1 else os.write(fd, parts[0])
        while parts and n >= len(parts[0]):
            n -= len(parts[0])
            parts.pop(0)
        if parts and n:
            parts[0] = parts[0][n:]


def _unlink_quietly(path: Path | str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class SpoolFiles:
    """The synchronous file work of the directory spool. Thread-safe: state changes of one message are
    serialized by a lock, so a lease, an operator request and a late pre-queue result never cross."""

    def __init__(self, root: Path | str, *, fsync: bool = True, partition: tuple[int, int] = (0, 1)) -> None:
        self.root = Path(root)
        self._root = str(self.root)
        self.fsync = fsync
        # several queue runners on one spool (``[queue] run_in_workers``): runner k of n leases and reclaims
        # only the messages of its share (module docstring); it adopts a dead runner's share
        self.partitions: set[int] = {partition[0]}
        self.nparts = partition[1]
        self._state_fd: int | None = None
        self._depth = 0
        self._not_due: dict[str, tuple[int, float]] = {}   # qid -> (inode, next_attempt) of a waiting envelope
        self._dest_of: dict[str, tuple[int, str]] = {}     # qid -> (inode, destination) of an envelope read
        self._prio_of: dict[str, tuple[int, int]] = {}     # qid -> (inode, queue priority) of an envelope read
        self.init_error: OSError | None = None
        try:
            for d in ("messages", "tmp", "requests", *STATES):
                (self.root / d).mkdir(parents=True, exist_ok=True)
        except OSError as e:  # reported by check(); reading (``postgate queue list``) may still work
            self.init_error = e
        self._lock_fd: int | None = None
        self._mutex = threading.RLock()
        self._leases: dict[str, Lease] = {}
        self._tokens = itertools.count(1)
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        # the hand-over of new mail to this process's runner (:meth:`take_fresh`): on (the runner's owner
        # name and lease time) only while it runs the queue; what does not fit is left to lease_due's scan
        self.handover: tuple[str, float] | None = None
        # leased at enqueue: a heap of (-queue priority, arrival order, lease, envelope as written), so the
        # runner takes the highest priority first (a filter's queue_priority), in arrival order within one
        self._fresh: list[tuple[int, int, Lease, bytes]] = []
        self._fresh_order = itertools.count()
        self._contents: dict[str, bytes] = {}    # content of a message handed over, until content() takes it
        self._kept = 0                           # bytes in _contents

    # --- ownership -----------------------------------------------------------------------------------
    def check(self) -> None:
        """Refuse a spool mail cannot be queued in: missing directories, read-only, not writable."""
        if self.init_error is not None:
            e = self.init_error
            raise SpoolUnavailable(f"{self.root}: cannot create the spool directories: "
                                   f"{e.strerror or e} ({getattr(e, 'filename', '') or self.root})")
        probe = self.root / "tmp" / f".probe-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, b"x")
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.unlink(probe)
        except OSError as e:
            _unlink_quietly(probe)
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                # full, not broken: start anyway, so the queue can deliver (and free space); new mail
                # gets 451 until there is room again
                log.warning("%s: the spool's file system is full; new mail is refused (451) until space "
                            "returns", self.root)
                return
            why = "read-only file system" if e.errno == errno.EROFS else e.strerror or str(e)
            raise SpoolUnavailable(f"{self.root}: the spool is not writable ({why})") from e

    def try_lock(self) -> bool:
        """Become the owner (daemon, or a CLI applying requests when no daemon runs)."""
        try:
            fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as e:
            raise SpoolUnavailable(f"{self.root}/lock: cannot open the spool lock: {e.strerror}") from e
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

    # --- several runners ----------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Serialize state changes of messages: between threads (a lock), and with several runners also
        between processes (flock on ``state.lock``), so a lease, an operator request and a late result
        never cross, whichever process makes them."""
        with self._mutex:
            outer = self._depth == 0
            self._depth += 1
            fd = None
            try:
                if outer and self.nparts > 1:
                    if self._state_fd is None:
                        self._state_fd = os.open(self.root / "state.lock", os.O_RDWR | os.O_CREAT, 0o600)
                    fd = self._state_fd
                    fcntl.flock(fd, fcntl.LOCK_EX)
                yield
            finally:
                self._depth -= 1
                if fd is not None:
                    fcntl.flock(fd, fcntl.LOCK_UN)

    def mine(self, qid: str) -> bool:
        """Whether this runner leases and reclaims ``qid``: share = the queue id's random bits mod n."""
        return self.nparts <= 1 or share_of(qid, self.nparts) in self.partitions

    def adopt(self, share: int) -> None:
        """Take over the share of a runner that died: its leases (files in active/ no lease of ours covers)
        are taken back at the next ``reclaim``, and its messages are leased here from then on."""
        with self._mutex:
            self.partitions.add(share)

    # --- low level -------------------------------------------------------------------------------------
    def _write(self, target: Path, data: bytes, durable: bool = True) -> None:
        """Write ``data`` to ``target`` atomically and (unless told otherwise) durably; on failure nothing
        is left in tmp/."""
        self._not_due.pop(target.name, None)   # a rewritten envelope is read again by lease_due
        tmp = self.root / "tmp" / f"{target.name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, data)
                crashpoint("spool-write-before-fsync")
                if self.fsync and durable:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, target)
        except BaseException:
            _unlink_quietly(tmp)
            raise
        crashpoint("spool-write-after-rename")
        if self.fsync and durable:
            fsync_dir(target.parent)

    def path(self, state: str, qid: str) -> Path:
        return self.root / state / qid

    def _at(self, state: str, qid: str) -> str:
        """``path`` as a string, for the per-message hot paths (a pathlib join costs ~2 us, this 0.1)."""
        return f"{self._root}/{state}/{qid}"

    def state_of(self, qid: str) -> State | None:
        for s in State:
            if self.path(s, qid).exists():
                return s
        return None

    def _move(self, qid: str, src: str, dst: str, durable: bool = True) -> None:
        """Move an envelope between states. ``durable=False`` skips the directory fsyncs where losing the
        move in a crash is harmless: a lease (active/) or its release (deferred/) that did not reach the
        disk leaves the envelope where recovery returns it anyway (incoming/), to be tried again."""
        os.rename(self.path(src, qid), self.path(dst, qid))
        if self.fsync and durable:
            fsync_dir(self.root / dst)
            fsync_dir(self.root / src)

    def read_envelope(self, state: str, qid: str) -> Envelope:
        return Envelope.from_bytes(_read_index(self.path(state, qid))[0])

    # --- acceptance: group commit ----------------------------------------------------------------------
    def enqueue_batch(self, items: Sequence[tuple[Envelope, bytes] | tuple[Envelope, bytes, bool]]
                      ) -> list[BaseException | None]:
        """Durably store several new messages with one round of fsyncs (see the module docstring). Returns,
        per message, None (stored: it may be acknowledged) or the error (nothing of it is left). An item's
        third field, if true, queues the message on hold (its index is written to hold/)."""
        errors: list[BaseException | None] = [None] * len(items)
        written: list[int] = []
        heads: list[bytes] = []
        fds: dict[int, int] = {}   # kept open until synced (no second open to fsync it)
        messages = str(self.root / "messages")
        try:
            for i, (env, content, *_hold) in enumerate(items):
                path = f"{messages}/{env.id}"
                env.seal(content)         # here, in the commit thread: hashlib lets the loop run meanwhile
                head = env.to_bytes()     # encoded once: the message file's first line and the index
                heads.append(head)
                try:
                    # the first line holds the envelope as accepted (JSON has no raw newline), then the content
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    try:
                        _write_all(fd, MAGIC + head + b"\n", content)   # the content not copied
                        if self.fsync:
                            _start_writeback(fd)
                    except BaseException:
                        os.close(fd)
                        raise
                    fds[i] = fd
                except OSError as e:  # ENOSPC, EDQUOT, EIO: this message is refused, and leaves nothing
                    _unlink_quietly(path)
                    errors[i] = e
                    continue
                written.append(i)
            crashpoint("spool-batch-written")
            if self.fsync and written:
                # one journal commit for the whole batch: the files and the directory entries together
                failed = self._sync_fds({i: fds.pop(i) for i in written}, Path(messages))
                for i in failed:
                    errors[i] = OSError(errno.EIO, f"fsync failed for {items[i][0].id}")
                    _unlink_quietly(f"{messages}/{items[i][0].id}")
                written = [i for i in written if errors[i] is None]
        finally:
            for fd in fds.values():
                os.close(fd)
        crashpoint("spool-batch-synced")
        # the acknowledgement point is passed: every message of the batch is durable in messages/. Its
        # index in incoming/ is a hard link to the message file (whose first line is the envelope): no
        # second file to create, and nothing to fsync (recovery rebuilds a lost index from messages/)
        handover = self.handover
        with self._locked() if handover is not None else contextlib.nullcontext():
            for i in written:
                env, content, *hold = items[i]
                lease = None
                if handover is not None and not (hold and hold[0]) and len(self._fresh) < self.FRESH_MAX \
                        and not env.attempts and env.next_attempt <= env.arrival and self.mine(env.id):
                    # handed over to this process's runner: leased now (the index goes straight to active/,
                    # the lease registered first, so reclaim never finds it uncovered). Only mail due as it
                    # arrives: one queued after a pre-queue attempt, or with a later first attempt, waits
                    # for its time in incoming/
                    lease = Lease(env.id, handover[0], time.time() + handover[1], next(self._tokens),
                                  destination_of(env))
                    self._leases[env.id] = lease
                state = "active" if lease is not None else "hold" if hold and hold[0] else "incoming"
                try:
                    os.link(f"{messages}/{env.id}", self._at(state, env.id))
                    crashpoint("spool-index-linked")
                except OSError as e:  # not acknowledged after all (a crash now would deliver it: no loss)
                    if lease is not None:
                        self._leases.pop(env.id, None)
                    _unlink_quietly(f"{messages}/{env.id}")
                    errors[i] = e
                    continue
                if lease is not None:
                    heapq.heappush(self._fresh, (-env.priority, next(self._fresh_order), lease, heads[i]))
                    if self._kept + len(content) <= self.KEPT_BYTES:
                        self._contents[env.id] = content
                        self._kept += len(content)
        crashpoint("spool-enqueued")
        return errors

    # --- the hand-over of new mail to the runner -----------------------------------------------------------
    FRESH_MAX = 5000               # messages waiting in the hand-over at most
    KEPT_BYTES = 64 * 1024 * 1024  # contents kept in memory at most (the others are read back from disk)

    def take_fresh(self, now: float, duration: float, limit: int) -> list[tuple[Lease, Envelope]]:
        """The messages handed over since the last call (up to ``limit``), leased when they were queued:
        no scan of the spool, no envelope or content read, no thread (memory only). A lease taken back
        meanwhile (expired, reclaimed) is skipped; the lease's time runs from ``now`` (the runner's clock)."""
        out: list[tuple[Lease, Envelope]] = []
        with self._mutex:
            for _ in range(min(limit, len(self._fresh))):
                _, _, lease, head = heapq.heappop(self._fresh)
                if self._held(lease) is None:
                    self._forget_content(lease.id)
                    continue
                try:
                    env = Envelope.from_bytes(head)
                except EnvelopeError:   # cannot happen (we wrote it): reclaim returns it to the scan
                    continue
                lease = dataclasses.replace(lease, until=now + duration)
                self._leases[lease.id] = lease
                crashpoint("spool-leased-fresh")
                out.append((lease, env))
        return out

    def _forget_content(self, qid: str) -> bytes | None:
        """Drop (and return) the content of a handed-over message kept in memory."""
        content = self._contents.pop(qid, None)
        if content is not None:
            self._kept -= len(content)
        return content

    def _sync_fds(self, fds: dict[int, int], directory: Path | None) -> set[int]:
        """fsync the open files ``fds`` (key -> descriptor; each closed here) and then ``directory``;
        returns the keys whose data may not be durable (all of them if the directory's fsync failed).

        Where the writeback of each file was started as it was written (Linux ``sync_file_range``), the
        fsyncs run one after the other in this thread: the first one's journal commit carries the others'
        block allocations, so the rest only wait for their own writes, and a batch costs about one journal
        commit without a thread per file. Elsewhere they run at once in a pool (one commit for all)."""
        failed: set[int] = set()
        if _HAVE_WRITEBACK or len(fds) <= 1:
            for key, fd in fds.items():
                try:
                    os.fsync(fd)
                except OSError:
                    failed.add(key)
                finally:
                    os.close(fd)
            if directory is not None:
                try:
                    fsync_dir(directory)
                except OSError:
                    failed = set(fds)
            return failed
        def one(item: tuple[int, int]) -> int | None:
            try:
                os.fsync(item[1])
            except OSError:
                return item[0]
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(64, thread_name_prefix="spool-fsync")
        try:
            dir_sync = self._pool.submit(fsync_dir, directory) if directory is not None else None
            failed = {k for k in self._pool.map(one, fds.items()) if k is not None}
            if dir_sync is not None and dir_sync.exception() is not None:
                failed = set(fds)
        finally:
            for fd in fds.values():
                os.close(fd)
        return failed

    def enqueue(self, env: Envelope, content: bytes) -> str:
        """One message alone (a batch of one)."""
        [err] = self.enqueue_batch([(env, content)])
        if err is not None:
            raise err
        return env.id

    def content(self, qid: str) -> bytes:
        content = self.take_content(qid)
        return content if content is not None else self._message(qid)[1]

    def take_content(self, qid: str) -> bytes | None:
        """The content of a handed-over message, from memory (once), or None."""
        with self._mutex:
            return self._forget_content(qid)

    def _message(self, qid: str) -> tuple[bytes | None, bytes]:
        """The envelope as accepted (first line) and the content of a message file. A file without the
        envelope line was written by a Postgate before group commit: all of it is content."""
        data = (self.root / "messages" / qid).read_bytes()
        if not data.startswith(MAGIC):
            return None, data
        head, sep, content = data[len(MAGIC):].partition(b"\n")
        if not sep:
            raise EnvelopeError(f"message file of {qid} has no complete envelope line (truncated)")
        return head, content

    # --- delivery ----------------------------------------------------------------------------------------
    def lease_due(self, now: float, owner: str, duration: float, limit: int,
                  per_destination: int = 0) -> list[tuple[Lease, Envelope]]:
        """Move due messages to active/ (one rename each: the lease) and return them; with
        ``per_destination``, at most that many leases per destination at once (this process's leases: the
        directory has one owner). An envelope read once and found not due is not read again until it is due
        or rewritten (a new file: a new inode), so a large deferred queue costs a directory listing per call,
        not a read of every envelope. When more messages may be due than asked for, the highest queue
        priority goes first (:meth:`_by_priority`)."""
        out: list[tuple[Lease, Envelope]] = []
        with self._mutex:
            busy = Counter(lease.destination for lease in self._leases.values())
        names: list[tuple[str, str, int]] = []
        for waiting in WAITING:
            with os.scandir(self.root / waiting) as it:
                for qid, inode in sorted((e.name, e.inode()) for e in it):
                    known = self._not_due.get(qid)
                    if self.mine(qid) and not (known is not None and known[0] == inode and known[1] > now):
                        names.append((waiting.value, qid, inode))
        if len(names) > limit:
            names = self._by_priority(names, now)
        for state, qid, inode in names:
            if len(out) >= limit:
                return out
            if per_destination:   # a destination at its limit: its messages are not read again
                dest_known = self._dest_of.get(qid)
                if dest_known is not None and dest_known[0] == inode and busy[dest_known[1]] >= per_destination:
                    continue
            with self._locked():
                try:
                    data, inode = _read_index(self.path(state, qid))
                    env = Envelope.from_bytes(data)
                except FileNotFoundError:
                    continue  # taken by a concurrent operation
                except (EnvelopeError, OSError) as e:
                    self.quarantine(qid, state, str(e))
                    continue
                if env.next_attempt > now:
                    self._note_not_due(qid, inode, env.next_attempt)
                    continue
                self._not_due.pop(qid, None)
                dest = destination_of(env)
                if len(self._dest_of) >= 1_000_000:
                    self._dest_of.clear()
                self._dest_of[qid] = (inode, dest)
                if per_destination and busy[dest] >= per_destination:
                    continue
                try:
                    self._move(qid, state, "active", durable=False)
                except FileNotFoundError:
                    continue
                lease = Lease(qid, owner, now + duration, next(self._tokens), dest)
                self._leases[qid] = lease
                busy[dest] += 1
            out.append((lease, env))
        return out

    def _note_not_due(self, qid: str, inode: int, due: float) -> None:
        if len(self._not_due) >= 1_000_000:
            self._not_due.clear()
        self._not_due[qid] = (inode, due)

    def _by_priority(self, names: list[tuple[str, str, int]], now: float) -> list[tuple[str, str, int]]:
        """More candidates than asked for: the highest queue priority first (a filter's ``queue_priority``),
        in the listing's order within one priority. An envelope's priority is read once per file (its
        inode: every change is a new file), so a backlog costs one extra read per message; with no more
        candidates than asked for every due one is leased anyway and nothing extra is read."""
        out = []
        for state, qid, inode in names:
            known = self._prio_of.get(qid)
            if known is None or known[0] != inode:
                try:
                    env = Envelope.from_bytes(_read_index(self.path(state, qid))[0])
                except (OSError, EnvelopeError):
                    out.append((9, state, qid, inode))   # gone or corrupt: the lease loop finds out at once
                    continue
                if len(self._prio_of) >= 1_000_000:
                    self._prio_of.clear()
                known = self._prio_of[qid] = (inode, env.priority)
                if env.next_attempt > now:
                    self._note_not_due(qid, inode, env.next_attempt)
                    continue
            out.append((known[1], state, qid, inode))
        out.sort(key=lambda c: -c[0])   # stable: incoming before deferred, then by name, within a priority
        return [(state, qid, inode) for _, state, qid, inode in out]

    def _held(self, lease: Lease) -> Lease | None:
        """The lease as this process holds it now, if ``lease`` is still it: the token (unique in this
        process) and the owner fence it; ``until`` moves with renew()."""
        held = self._leases.get(lease.id)
        return held if held is not None and held.token == lease.token and held.owner == lease.owner else None

    def _check_lease(self, lease: Lease) -> None:
        if self._held(lease) is None:
            raise LeaseLost(f"{lease.id}: the lease was taken back (expired); the result is not recorded")

    def renew(self, leases: Sequence[Lease], now: float, duration: float) -> list[Lease]:
        """Extend the leases this process still holds (same token and owner, the envelope still in active/):
        a lease is in memory here, so renewing writes nothing; one the runner took back or the operator
        removed is not in the answer."""
        out = []
        with self._locked():
            for lease in leases:
                held = self._held(lease)
                if held is None or not os.path.exists(self._at("active", lease.id)):
                    continue
                held = dataclasses.replace(held, until=max(held.until, now + duration))
                self._leases[lease.id] = held
                out.append(held)
        return out

    def record(self, lease: Lease, env: Envelope) -> None:
        """Durably record per-recipient results of the message being delivered."""
        self._one(("record", lease, env))

    def release(self, lease: Lease, env: Envelope) -> None:
        """End the lease; the message waits in deferred/ for ``env.next_attempt``."""
        self._one(("release", lease, env))

    def finish(self, lease: Lease) -> None:
        """Every recipient is final: remove the message."""
        self._one(("finish", lease, None))

    def _one(self, op: Result) -> None:
        [err] = self.results_batch([op])
        if err is not None:
            raise err

    def results_batch(self, ops: list[Result]) -> list[BaseException | None]:
        """Write the results of several delivery attempts with one round of fsyncs (group commit, as for
        new mail): ``record`` (new envelope, lease kept), ``release`` (new envelope, to deferred/) and
        ``finish`` (message removed). Returns, per result, None (written) or the error (nothing of it
        written: the lease and the old envelope stay)::

            write each new envelope to tmp/; unlink each finished message's messages/<id>
            fsync those tmp files, all at once                        (one journal commit)
            rename each envelope over active/<id> (release: on to deferred/); unlink finished envelopes
            fsync active/                                             (record: the results are durable)

        A removal is not fsync'd (nor is it in Postfix): a kill cannot undo an unlink, and one that a power
        loss undoes leaves the message, or its envelope without the message file, which recovery delivers
        once more or cleans — a duplicate at worst, never a loss.

        A crash anywhere leaves the old envelope or the new one, never half of one; a removal or a
        result that did not reach the disk costs at worst one more delivery of the same message (RFC 5321
        §6.1: a duplicate, never a loss). A bounce is queued (durably, by ``enqueue``) before its message's
        ``finish`` is submitted, so no removal can overtake its report."""
        errors: list[BaseException | None] = [None] * len(ops)
        staged: list[tuple[int, str, Lease, Path | None]] = []
        fds: dict[int, int] = {}   # the new envelopes' files, open until synced (no second open to fsync)
        try:
            self._stage_results(ops, errors, staged, fds)
        except BaseException:
            for fd in fds.values():
                os.close(fd)
            raise
        crashpoint("spool-results-written")
        # the fsyncs hold no lock: other runners lease and write meanwhile
        if self.fsync:   # as new mail: writeback started as each was written, then one fsync after another
            failed = self._sync_fds(fds, None)   # closes them
        else:
            failed = set()
            for fd in fds.values():
                os.close(fd)
        for i, _kind, _lease, tmp in staged:
            if tmp is not None and i in failed:
                errors[i] = OSError(errno.EIO, f"fsync failed for {tmp.name}")
                _unlink_quietly(tmp)
        staged = [st for st in staged if errors[st[0]] is None]
        crashpoint("spool-results-synced")
        return self._apply_results(staged, errors)

    def _stage_results(self, ops: list[Result], errors: list[BaseException | None],
                       staged: list[tuple[int, str, Lease, Path | None]], fds: dict[int, int]) -> None:
        """Under the lock: unlink each finished message's file, write each new envelope to tmp/."""
        with self._locked():
            for i, (kind, lease, env) in enumerate(ops):
                try:
                    self._check_lease(lease)
                    if kind == "finish":
                        # the message file goes first: an envelope left without it by a crash is recognised
                        # as a removed message's leftover (module docstring)
                        try:
                            os.unlink(self._at("messages", lease.id))
                        except FileNotFoundError:
                            pass
                        staged.append((i, kind, lease, None))
                    else:
                        assert env is not None
                        written, fds[i] = self._write_tmp(lease.id, env.to_bytes())
                        staged.append((i, kind, lease, written))
                except BaseException as e:  # ENOSPC: this result is not written; the others go on
                    errors[i] = e

    def _apply_results(self, staged: list[tuple[int, str, Lease, Path | None]],
                       errors: list[BaseException | None]) -> list[BaseException | None]:
        """Under the lock: each synced envelope renamed over its index, each finished one unlinked."""
        with self._locked():
            renamed = False
            for i, kind, lease, tmp in staged:
                try:
                    if tmp is None:
                        crashpoint("spool-deleted-message")
                        # the message file is gone: its envelope is a leftover wherever it is (a lease taken
                        # back meanwhile moved it to deferred/)
                        for st in ("active", "deferred", "incoming"):
                            try:
                                os.unlink(self._at(st, lease.id))
                                break
                            except OSError:
                                continue
                    else:
                        # the lease is still ours and nobody removed the message meanwhile (an operator's
                        # delete in another process): else the result is dropped, never resurrecting it
                        self._check_lease(lease)
                        if not os.path.exists(self._at("active", lease.id)):
                            raise LeaseLost(f"{lease.id}: removed while being delivered; result not recorded")
                        os.rename(tmp, self._at("active", lease.id))
                        renamed = True
                        if kind == "release":
                            self._move(lease.id, "active", "deferred", durable=False)
                    if kind != "record":
                        self._leases.pop(lease.id, None)
                        with self._mutex:
                            self._forget_content(lease.id)
                except BaseException as e:
                    if tmp is not None:
                        _unlink_quietly(tmp)
                    errors[i] = e
        if self.fsync and renamed:
            fsync_dir(self.root / "active")
        return errors

    def _write_tmp(self, name: str, data: bytes) -> tuple[Path, int]:
        """Write ``data`` to a new file in tmp/, its writeback started but not fsync'd; returns the path and
        the open descriptor (the caller syncs and closes it). On failure nothing is left."""
        tmp = self.root / "tmp" / f"{name}.{secrets.token_hex(4)}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                _write_all(fd, data)
                if self.fsync:
                    _start_writeback(fd)
            except BaseException:
                os.close(fd)
                raise
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp, fd

    def reclaim(self, now: float) -> list[str]:
        """Take back expired leases, and any envelope in active/ that no lease of this process covers (a
        result that could not be written, a disk that was full): back to deferred/, due as they were."""
        done = []
        with self._locked():
            for qid in os.listdir(self.root / "active"):
                if not self.mine(qid):
                    continue   # another runner's lease
                lease = self._leases.get(qid)
                if lease is not None and lease.until > now:
                    continue
                try:
                    self._move(qid, "active", "deferred", durable=False)
                except FileNotFoundError:
                    pass
                self._leases.pop(qid, None)
                self._forget_content(qid)
                done.append(qid)
            for qid in [q for q, lease in self._leases.items() if lease.until <= now]:
                del self._leases[qid]  # its file is gone (deleted by the operator)
                self._forget_content(qid)
        return done

    # --- operator actions (called by the lock owner) -----------------------------------------------------
    def delete(self, qid: str, state: str | None = None) -> bool:
        with self._locked():
            state = state or self.state_of(qid)
            if state is None or not self.path(state, qid).exists():
                return False
            # the message file goes first, durably: an envelope left without it by a crash is recognised
            # as a removed message's leftover (a message file alone would be restored and delivered)
            try:
                os.unlink(self.root / "messages" / qid)
            except FileNotFoundError:
                pass
            if self.fsync:
                fsync_dir(self.root / "messages")
            crashpoint("spool-deleted-message")
            _unlink_quietly(self.path(state, qid))
            self._leases.pop(qid, None)
            return True

    def hold(self, qid: str) -> bool:
        with self._locked():
            state = self.state_of(qid)
            if state in WAITING:
                self._move(qid, state, "hold")
                return True
            return False

    def release_hold(self, qid: str, now: float) -> bool:
        with self._locked():
            if self.state_of(qid) != "hold":
                return False
            env = self.read_envelope("hold", qid)
            env.next_attempt = now
            self._write(self.path("hold", qid), env.to_bytes())
            self._move(qid, "hold", "deferred")
            return True

    def reschedule(self, qid: str, when: float) -> bool:
        with self._locked():
            state = self.state_of(qid)
            if state not in WAITING:
                return False
            env = self.read_envelope(state, qid)
            env.next_attempt = when
            self._write(self.path(state, qid), env.to_bytes())
            return True

    def update(self, qid: str, state: str, env: Envelope) -> bool:
        """Rewrite the envelope of a message that is not leased, if it is still in ``state``."""
        with self._locked():
            if not self.path(state, qid).exists():
                return False
            self._write(self.path(state, qid), env.to_bytes())
            return True

    def quarantine(self, qid: str, state: str, why: str) -> None:
        """Move a bad envelope (and its content) to corrupt/, never deleting it."""
        with self._locked():
            try:
                os.rename(self.path(state, qid), self.path("corrupt", qid))
            except FileNotFoundError:
                pass
            msg = self.root / "messages" / qid
            if msg.exists():
                os.rename(msg, self.root / "corrupt" / f"{qid}.content")
            self._leases.pop(qid, None)
        log.error("%s: status=corrupt (%s) moved to %s", qid, why, self.root / "corrupt")

    def recover(self) -> list[str]:
        """At start, as owner: leases of a dead process go back to incoming/; what an interrupted write or
        removal left is cleaned or restored; real corruption moves to corrupt/. Returns what it did."""
        done = []
        for qid in os.listdir(self.root / "active"):
            self._move(qid, "active", "incoming")
            done.append(f"{qid}: lease of a previous run returned to incoming")
        for name in os.listdir(self.root / "tmp"):
            # a write that never completed: an envelope update whose old version is still in place
            _unlink_quietly(self.root / "tmp" / name)
            done.append(f"{name}: unfinished write of a previous run removed")
        for state in ("incoming", "deferred", "hold"):
            for qid in os.listdir(self.root / state):
                if not valid_queue_id(qid):
                    self.quarantine(qid, state, "not a queue file name")
                    continue
                if not (self.root / "messages" / qid).exists():
                    # the message file is removed first: this is a delivered or deleted message's leftover
                    _unlink_quietly(self.path(state, qid))
                    done.append(f"{qid}: leftover envelope of a removed message cleaned")
                    continue
                try:
                    env = self.read_envelope(state, qid)
                except (EnvelopeError, OSError) as e:
                    if state == "incoming" and self._restore(qid):
                        done.append(f"{qid}: envelope restored from the message file")
                        continue
                    self.quarantine(qid, state, str(e))
                    done.append(f"{qid}: corrupt")
                    continue
                try:
                    env.check_content(self.content(qid))
                except (EnvelopeError, OSError) as e:
                    self.quarantine(qid, state, str(e))
                    done.append(f"{qid}: corrupt")
        known = {q for s in ("incoming", "deferred", "hold", "corrupt") for q in os.listdir(self.root / s)}
        for qid in os.listdir(self.root / "messages"):
            if qid not in known:
                # accepted (or being accepted) when the process died, before its envelope index was written
                if self._restore(qid):
                    done.append(f"{qid}: envelope restored from the message file")
                else:
                    # torn: the batch it belonged to never reached its acknowledgement point
                    _unlink_quietly(self.root / "messages" / qid)
                    done.append(f"{qid}: unfinished write of a never acknowledged message removed")
        if self.fsync:
            for d in ("tmp", "messages", "incoming", "deferred", "hold"):
                fsync_dir(self.root / d)
        return done

    def _restore(self, qid: str) -> bool:
        """Rebuild incoming/<id> from the envelope line of a complete message file."""
        try:
            head, content = self._message(qid)
            if head is None:  # the layout before group commit removed the envelope first: a leftover
                return False
            env = Envelope.from_bytes(head)
            env.check_content(content)
        except (EnvelopeError, OSError):
            return False
        if env.id != qid:
            return False
        self._write(self.path("incoming", qid), env.to_bytes())
        return True

    # --- listing ----------------------------------------------------------------------------------------
    def entries(self) -> Iterator[Entry]:
        """Every message, oldest first (unreadable envelopes with ``envelope=None``)."""
        items = [(qid, s) for s in State for qid in os.listdir(self.root / s) if s != "corrupt" or
                 valid_queue_id(qid)]
        for qid, s in sorted(items):
            try:
                yield Entry(s, qid, self.read_envelope(s, qid), self._leases.get(qid))
            except (EnvelopeError, OSError):
                yield Entry(s, qid, None)

    def get(self, qid: str) -> tuple[State, Envelope] | None:
        for s in State:
            try:
                return s, self.read_envelope(s, qid)
            except FileNotFoundError:
                continue
        return None

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

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
        if self._state_fd is not None:
            os.close(self._state_fd)
            self._state_fd = None


class Batcher(Generic[Item]):
    """Collects the work items that arrive while a batch is being made durable into the next batch: one
    thread, so the batch grows exactly as fast as the disk is slow (no timer, no added latency when idle).
    ``commit`` does one batch and returns, per item, None (done) or the item's error."""

    def __init__(self, commit: Callable[[list[Item]], list[BaseException | None]], max_batch: int = 256,
                 name: str = "spool-commit") -> None:
        self.commit = commit
        self.max_batch = max_batch
        self.name = name
        self._queue: queue.SimpleQueue[tuple[Item, concurrent.futures.Future[None]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.batches = 0
        self.messages = 0

    def submit_item(self, item: Item) -> concurrent.futures.Future[None]:
        fut: concurrent.futures.Future[None] = concurrent.futures.Future()
        with self._start:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((item, fut))
        return fut

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    self._queue.put(None)  # stop after this batch
                    break
                batch.append(item)
            try:
                errors = self.commit([it for it, _ in batch])
            except BaseException as e:  # every waiter must get an answer
                errors = [e] * len(batch)
            self.batches += 1
            self.messages += len(batch)
            for (_it, fut), err in zip(batch, errors, strict=True):
                if err is None:
                    fut.set_result(None)
                else:
                    fut.set_exception(err)

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join(10)


class GroupCommitter(Batcher[tuple[Envelope, bytes, bool]]):
    """New messages, several per fsync (:meth:`SpoolFiles.enqueue_batch`)."""

    def __init__(self, files: SpoolFiles, max_batch: int = 256) -> None:
        super().__init__(files.enqueue_batch, max_batch, "spool-commit")
        self.files = files

    def submit(self, env: Envelope, content: bytes, hold: bool = False) -> concurrent.futures.Future[None]:
        return self.submit_item((env, content, hold))


class DirectorySpool:
    """The :class:`Spool` on a local directory. One process at a time owns it (``lock``); other processes
    (the extra listener workers, the ``postgate queue`` command) enqueue and write requests."""

    shared = False   # one owner: its runner's per-destination window is the limit

    def __init__(self, root: Path | str, *, fsync: bool = True, max_batch: int = 256,
                 partition: tuple[int, int] = (0, 1)) -> None:
        self.files = SpoolFiles(root, fsync=fsync, partition=partition)
        self.root = self.files.root
        self.committer = GroupCommitter(self.files, max_batch)
        # delivery results (record, release, finish), several per fsync too
        self.results = Batcher[Result](self.files.results_batch, max_batch, "spool-results")
        self._dead: dict[str, float] = {}     # destination -> end of its backoff
        self._recovered = threading.Event()   # closed by expect_recovery() until recover() is done
        self._recovered.set()

    def expect_recovery(self) -> None:
        """The owner will recover this spool: new mail waits until :meth:`recover` is done, so recovery never
        takes an enqueue under way for a previous run's leftover (the listeners accept before it runs)."""
        self._recovered.clear()

    async def _io(self, fn: Callable[..., T], *args: object) -> T:
        return await asyncio.to_thread(fn, *args)

    async def check(self) -> None:
        await self._io(self.files.check)

    def adopt(self, share: int) -> None:
        """Deliver the share of a queue runner that died, too (:meth:`SpoolFiles.adopt`)."""
        self.files.adopt(share)

    async def try_lock(self) -> bool:
        return await self._io(self.files.try_lock)

    async def unlock(self) -> None:
        self.committer.stop()
        self.results.stop()
        self.files.unlock()
        self.files.close()

    async def recover(self) -> list[str]:
        try:
            return await self._io(self.files.recover)
        finally:
            self._recovered.set()

    async def enqueue(self, env: Envelope, content: bytes, *, hold: bool = False) -> str:
        while not self._recovered.is_set():   # polled: no worker thread is held (recovery needs them)
            await asyncio.sleep(0.05)
        try:
            await asyncio.wrap_future(self.committer.submit(env, content, hold))
            return env.id
        except OSError as e:
            raise SpoolError(f"{env.id}: cannot queue: {e.strerror or e}") from e

    async def lease_due(self, now: float, owner: str, duration: float, limit: int,
                        per_destination: int = 0) -> list[tuple[Lease, Envelope]]:
        out = await self._take_fresh(now, duration, limit)   # handed over (already leased) first
        if len(out) < limit:
            out += await self._io(self.files.lease_due, now, owner, duration, limit - len(out), per_destination)
        return out

    async def lease_fresh(self, now: float, owner: str, duration: float, limit: int,
                          per_destination: int = 0) -> list[tuple[Lease, Envelope]]:
        # one owner: per_destination is the runner's own window, not the spool's business (lease_due)
        return await self._take_fresh(now, duration, limit)

    async def _take_fresh(self, now: float, duration: float, limit: int) -> list[tuple[Lease, Envelope]]:
        if not self.files._fresh:
            return []
        return await self._in_memory(self.files.take_fresh, now, duration, limit)

    def _if_free(self, fn: Callable[..., T], *args: object) -> tuple[bool, T | None]:
        """``fn(*args)`` here on the loop if the spool's lock is free right now: (True, its result); else
        (False, None) at once — the loop never waits for a file operation that holds the lock."""
        if not self.files._mutex.acquire(blocking=False):
            return False, None
        try:
            return True, fn(*args)
        finally:
            self.files._mutex.release()

    async def _in_memory(self, fn: Callable[..., T], *args: object) -> T:
        """A call that only touches memory (under the spool's lock): on the loop, no thread; but where a
        file operation holds that lock right now, in a worker thread."""
        done, result = self._if_free(fn, *args)
        return result if done else await self._io(fn, *args)  # type: ignore[return-value]

    def hand_over(self, owner: str | None, duration: float = 0.0) -> None:
        """``owner`` runs the queue in this process: new mail queued here is leased to it as it is queued
        and handed over (:meth:`lease_fresh`); None: no more (what was handed over stays leased until
        taken with lease_fresh, or reclaimed when its lease ends)."""
        self.files.handover = None if owner is None else (owner, duration)

    async def renew(self, leases: Sequence[Lease], now: float, duration: float) -> list[Lease]:
        return await self._io(self.files.renew, leases, now, duration)

    async def _handed_over(self, qid: str) -> bytes | None:
        """The content of a handed-over message, from memory (once), or None."""
        if qid not in self.files._contents:
            return None
        return await self._in_memory(self.files.take_content, qid)

    async def content(self, qid: str) -> bytes:
        content = await self._handed_over(qid)
        return content if content is not None else await self._io(self.files.content, qid)

    async def checked_content(self, env: Envelope) -> bytes:
        content = await self._handed_over(env.id)
        if content is not None:
            # the very object the commit thread sealed, never written back: its size is checked, it is not
            # hashed a second time
            if len(content) != env.size:
                raise EnvelopeError(f"content of {env.id} does not match its envelope (size)")
            return content
        content = await self._io(self.files.content, env.id)
        env.check_content(content)
        return content

    async def record(self, lease: Lease, env: Envelope) -> None:
        await asyncio.wrap_future(self.results.submit_item(("record", lease, env)))

    async def release(self, lease: Lease, env: Envelope) -> None:
        await asyncio.wrap_future(self.results.submit_item(("release", lease, env)))

    async def finish(self, lease: Lease) -> None:
        # a removal is two unlinks and no fsync (results_batch): done here on the loop when the spool's lock
        # is free and no other process shares it, which costs less than the hand-off to the committer thread
        # and back (two thread switches per delivered message); else, and with several runners, there
        op: Result = ("finish", lease, None)
        if self.files.nparts <= 1:
            done, errors = self._if_free(self.files.results_batch, [op])
            if done:
                assert errors is not None
                if errors[0] is not None:
                    raise errors[0]
                return
        await asyncio.wrap_future(self.results.submit_item(op))

    async def reclaim(self, now: float) -> list[str]:
        return await self._io(self.files.reclaim, now)

    async def quarantine(self, qid: str, state: State, why: str) -> None:
        await self._io(self.files.quarantine, qid, state, why)

    # destination backoff: in this process (one process owns a directory spool), lost at a restart
    async def backing_off(self, dests: Sequence[str], now: float, probe_for: float) -> dict[str, float]:
        out = {}
        for d in dests:
            until = self._dead.get(d)
            if until is None:
                continue
            if until <= now:
                self._dead[d] = now + probe_for     # the caller probes; the others wait for its result
            else:
                out[d] = until
        return out

    async def note_destination(self, dest: str, until: float | None) -> None:
        if until is None:
            self._dead.pop(dest, None)
        else:
            self._dead[dest] = until

    async def forget_destinations(self, dest: str | None = None) -> None:
        if dest is None:
            self._dead.clear()
        else:
            self._dead.pop(dest, None)

    async def get(self, qid: str) -> tuple[State, Envelope] | None:
        return await self._io(self.files.get, qid)

    async def entries(self) -> list[Entry]:
        return await self._io(lambda: list(self.files.entries()))

    async def summary(self) -> Summary:
        counts: dict[State, int] = {}
        oldest = None
        for e in await self.entries():
            counts[e.state] = counts.get(e.state, 0) + 1
            if e.envelope is not None and (oldest is None or e.envelope.arrival < oldest):
                oldest = e.envelope.arrival
        return Summary(counts, oldest)

    async def update(self, qid: str, state: State, env: Envelope) -> bool:
        return await self._io(self.files.update, qid, state, env)

    async def delete(self, qid: str, state: State | None = None) -> bool:
        return await self._io(self.files.delete, qid, state)

    async def hold(self, qid: str) -> bool:
        return await self._io(self.files.hold, qid)

    async def release_hold(self, qid: str, now: float) -> bool:
        return await self._io(self.files.release_hold, qid, now)

    async def reschedule(self, qid: str, when: float) -> bool:
        return await self._io(self.files.reschedule, qid, when)

    async def request(self, action: str, arg: str = "") -> None:
        await self._io(self.files.request, action, arg)

    async def take_requests(self) -> list[tuple[str, str]]:
        return await self._io(self.files.take_requests)


def _conforms(s: DirectorySpool) -> Spool:  # mypy checks that DirectorySpool implements every method
    return s


__all__ = ["STATES", "Batcher", "DirectorySpool", "GroupCommitter", "Lease", "Spool", "SpoolError", "SpoolFiles",
           "SpoolUnavailable", "State", "fsync_dir"]
