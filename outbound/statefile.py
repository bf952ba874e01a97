"""Small JSON state files that must survive a restart: the MTA-STS policy cache and the downgrade memory.

Each is one JSON document ``{key: [record, …]}``, replaced atomically: written to ``NAME.tmp``, fsync'd,
renamed over the old file, and the directory fsync'd so the rename itself survives a power loss. The
writes run in a worker thread, so the event loop never waits on the disk, and one at a time (a lock), so
a slower older snapshot can never land after a newer one. A file that cannot be read or written is logged
and the state lives on in the process: delivery never stops because a cache file is broken.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from pathlib import Path
from typing import Any


class JsonStateFile:
    def __init__(self, path: Path | None, key: str, what: str, log: logging.Logger) -> None:
        self.path, self.key, self.what, self.log = path, key, what, log
        self._lock = asyncio.Lock()

    def load(self) -> list[dict[str, Any]]:
        """The stored records; none when there is no file, or (logged) when it cannot be read."""
        if self.path is None or not self.path.exists():
            return []
        try:
            records = json.loads(self.path.read_text()).get(self.key, [])
            if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
                raise ValueError(f"{self.key!r} is not a list of objects")
            return records
        except (OSError, ValueError, AttributeError) as e:
            self.log.warning("%s %s unreadable, starting empty: %s", self.what, self.path, e)
            return []

    async def save(self, records: list[dict[str, Any]]) -> None:
        if self.path is None:
            return
        data = json.dumps({self.key: records}, indent=1)
        async with self._lock:
            try:
                await asyncio.to_thread(atomic_write, self.path, data)
            except OSError as e:  # the state stays in this process; delivery goes on
                self.log.error("%s %s: cannot write: %s", self.what, self.path, e)


def atomic_write(path: Path, data: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
