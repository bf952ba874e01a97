"""The MTA-STS policy cache (RFC 8461 §5.1): policies kept for their ``max_age``, surviving restarts.

A cached policy is what makes MTA-STS more than trust-on-every-use: once a sender has seen a domain's
policy, an attacker who later strips the TXT record or blocks the HTTPS fetch cannot make the sender
forget it before ``max_age`` runs out (RFC 8461 §3.3, §10.2). Entries are keyed by the policy domain and
hold the TXT record's ``id``, the policy text, when it was fetched and when it expires.

The store is one JSON file, replaced atomically (write, fsync, rename) from a worker thread, so the event
loop never blocks on the disk. Without a path it lives in memory only.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from postgate.outbound.statefile import JsonStateFile
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
        self._file = JsonStateFile(path, "policies", "MTA-STS cache", log)
        try:
            for d in self._file.load():
                e = Entry(**d)
                e.policy  # noqa: B018 - refuse an entry that no longer parses
                self._entries[e.domain] = e
        except (ValueError, TypeError, mtasts.StsError) as err:
            self._entries.clear()
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
        await self._file.save([asdict(e) for e in self._entries.values()])
