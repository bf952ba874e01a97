"""The event loop ``postgate serve`` runs on: ``[server] event_loop`` (issue 20).

``uvloop`` (libuv, MIT/Apache-2.0) implements asyncio's loop, transports and TLS in Cython; every part of
Postgate only uses the asyncio API, so both loops run the same code. ``auto`` takes uvloop when it is
installed and asyncio's own loop otherwise; bench/README.md measures both.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHOICES = ("auto", "uvloop", "asyncio")


def uvloop_available() -> bool:
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


def resolve(choice: str) -> str:
    """The loop ``choice`` ("auto", "uvloop", "asyncio") stands for on this host: ``auto`` is uvloop when it
    can be imported (CPU per relayed message 2.98 → 2.45 ms at 2 KB, bench/README.md), asyncio's own loop
    otherwise. The smtpd never pauses a transport before a TLS handshake, which uvloop's start_tls would not
    undo: port 465 gets its TLS layer on the accepted socket, STARTTLS switches without a turn of the loop
    (inbound/smtpd.py), so every TLS test runs on both loops."""
    if choice == "auto":
        return "uvloop" if uvloop_available() else "asyncio"
    return choice


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    if resolve(choice) == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
