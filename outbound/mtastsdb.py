"""The MTA-STS policy cache (RFC 8461 §5.1): policies kept for their ``max_age``, surviving restarts.

A cached policy is what makes MTA-STS more than trust-on-every-use: once a sender has seen a domain's
policy, an attacker who later strips the TXT record or blocks the HTTPS fetch cannot make the sender
forget it before ``max_age`` runs out (RFC 8461 §3.3, §10.2). Entries are keyed by the policy domain and
hold the TXT record's ``id``, the policy text, when it was fetched and when it expires.

The store is one JSON file, replaced atomically (write, fsync, rename) from a worker thread, so the event
loop never blocks on the disk. Without a path it lives in memory only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from postgate.policy import mtasts

log = logging.getLogger("postgate.mtasts")


@dataclass(frozen=True)
class Entry:
    domain: str
    id: str
    text: str                # the policy file as fetched
    fetched: float           # POSIX time of the fetch
    expires: float           # fetched + max_age (RFC 8461 §3.2)

    @property
    def policy(self) -> mtasts.Policy:
        return mtasts.parse_policy(self.text)


class PolicyCache:
    def __init__(self, path: Path | None = None, clock: Callable[[], float] | None = None) -> None:
        import time

        self.path = path
        self.clock = clock or time.time
        self._entries: dict[str, Entry] = {}
        self._lock = asyncio.Lock()
        if path is not None and path.exists():
            try:
                raw = json.loads(path.read_text())
                for d in raw.get("policies", []):
                    e = Entry(**d)
                    e.policy  # noqa: B018 - refuse an entry that no longer parses
                    self._entries[e.domain] = e
            except (OSError, ValueError, TypeError, mtasts.StsError) as err:
                log.warning("MTA-STS cache %s unreadable, starting empty: %s", path, err)

    def get(self, domain: str, *, expired: bool = False) -> Entry | None:
        """The cached entry, or None; an expired one only with ``expired=True``."""
        e = self._entries.get(domain.lower().rstrip("."))
        if e is None or (not expired and e.expires <= self.clock()):
            return None
        return e

    def domains(self) -> list[str]:
        return sorted(self._entries)

    async def put(self, entry: Entry) -> None:
        self._entries[entry.domain] = entry
        await self._save()

    async def forget(self, domain: str) -> None:
        if self._entries.pop(domain, None) is not None:
            await self._save()

    async def _save(self) -> None:
        if self.path is None:
            return
        data = json.dumps({"policies": [asdict(e) for e in self._entries.values()]}, indent=1)
        async with self._lock:
            try:
                await asyncio.to_thread(_atomic_write, self.path, data)
            except OSError as e:  # the cache stays in this process; delivery goes on
                log.error("MTA-STS cache %s: cannot write: %s", self.path, e)


def _atomic_write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
