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
    """The loop ``choice`` ("auto", "uvloop", "asyncio") stands for on this host. ``auto`` is asyncio's own
    loop: with uvloop a TLS handshake on an implicit-TLS port (465) can hang when the ClientHello arrives before
    the session's start_tls (uvloop's start_tls does not resume a paused transport; inbound/smtpd.py
    _hold_for_tls). uvloop stays available for measurements and for set-ups without port 465."""
    if choice == "auto":
        return "asyncio"
    return choice


def run(main: Coroutine[Any, Any, T], choice: str = "auto") -> T:
    """``asyncio.run(main)`` on the chosen loop."""
    if resolve(choice) == "uvloop":
        import uvloop
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(main)
    return asyncio.run(main)
