"""Crash and fault points for the crash-safety tests.

``POSTGATE_CRASH_AT=name[:n]`` makes the process kill itself with SIGKILL the n-th time (default first)
execution passes ``crashpoint(name)``. ``POSTGATE_FAULT_AT=name[:ERRNO]`` makes ``crashpoint(name)`` raise
``OSError(ERRNO)`` (e.g. ``ENOSPC``; default ``EIO``) every time instead, and :func:`inject` does the same
in-process with any exception. Unset, a crash point costs two dictionary look-ups.
"""

from __future__ import annotations

import errno
import os
import signal

_TARGET = os.environ.get("POSTGATE_CRASH_AT", "")
_NAME, _, _COUNT = _TARGET.partition(":")
_seen = 0
_faults: dict[str, BaseException] = {}

_fault_name, _, _fault_errno = os.environ.get("POSTGATE_FAULT_AT", "").partition(":")
if _fault_name:
    _code = getattr(errno, _fault_errno or "EIO", errno.EIO)
    _faults[_fault_name] = OSError(_code, os.strerror(_code))


def inject(name: str, exc: BaseException | None) -> None:
    """Make ``crashpoint(name)`` raise ``exc`` from now on (None: stop)."""
    if exc is None:
        _faults.pop(name, None)
    else:
        _faults[name] = exc


def crashpoint(name: str) -> None:
    global _seen
    if _faults and name in _faults:
        raise _faults[name]
    if not _TARGET or name != _NAME:
        return
    _seen += 1
    if _seen >= int(_COUNT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
