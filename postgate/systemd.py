"""sd_notify(3): telling systemd how the service is doing, without libsystemd.

A unit with ``Type=notify`` starts the daemon with ``$NOTIFY_SOCKET``, the path of a Unix datagram socket
(a leading ``@`` means the abstract namespace). The daemon sends newline-separated ``KEY=VALUE`` states
in datagrams: ``READY=1`` once it accepts connections (systemd then considers the start done),
``RELOADING=1`` with ``MONOTONIC_USEC=`` at the start of a reload and ``READY=1`` at its end,
``STOPPING=1`` when it begins to shut down, ``STATUS=`` free text for ``systemctl status``, and
``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds when the unit sets ``WatchdogSec=`` —
systemd kills and restarts a daemon that stops sending it. ``$WATCHDOG_PID``, when set, names the one
process the watchdog is meant for. Without ``$NOTIFY_SOCKET`` every call does nothing.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``states`` (``"READY=1"``, …) to systemd; False when not run by systemd or on error."""
    path = os.environ.get("NOTIFY_SOCKET", "")
    if not path:
        return False
    if path.startswith("@"):
        path = "\0" + path[1:]   # abstract namespace socket
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(path)
            s.sendall("\n".join(states).encode())
        return True
    except OSError:
        return False


def ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def reloading() -> bool:
    # systemd.service(5) Type=notify-reload: RELOADING=1 with the CLOCK_MONOTONIC time in microseconds
    return notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings (half of $WATCHDOG_USEC, as sd_watchdog_enabled(3) advises), or
    None when no watchdog is asked for this process."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0 or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2_000_000


async def watchdog(stop: asyncio.Event) -> None:
    """Ping the watchdog from the event loop until ``stop``: a blocked loop stops the pings."""
    interval = watchdog_interval()
    if interval is None:
        return
    while not stop.is_set():
        notify("WATCHDOG=1")
        try:
            await asyncio.wait_for(stop.wait(), interval)
        except TimeoutError:
            pass
