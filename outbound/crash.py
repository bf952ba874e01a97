"""Crash points for the crash-safety tests: ``POSTGATE_CRASH_AT=name[:n]`` makes the process kill itself
with SIGKILL the n-th time (default first) execution passes ``crashpoint(name)``. Unset, it costs one
dictionary look-up."""

from __future__ import annotations

import os
import signal

_TARGET = os.environ.get("POSTGATE_CRASH_AT", "")
_NAME, _, _COUNT = _TARGET.partition(":")
_seen = 0


def crashpoint(name: str) -> None:
    global _seen
    if not _TARGET or name != _NAME:
        return
    _seen += 1
    if _seen >= int(_COUNT or 1):
        os.kill(os.getpid(), signal.SIGKILL)
