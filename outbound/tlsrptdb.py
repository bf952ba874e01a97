"""The TLS-RPT store (RFC 8460 §4.1): session counts per policy domain, policy type and UTC day.

Every delivery attempt adds one session — a success, or a failure with its result type — to the row of
its (policy domain, policy type, day); failures are kept apart by result type, sending and receiving
addresses and MX host, as the report's ``failure-details`` lists them (§4.4). The counts live in SQLite
(WAL mode, one UPSERT per attempt), so they survive a restart and several Postgate processes sharing one
queue can add to the same file. Writes run in a worker thread; the event loop never waits on the disk.

A day's rows stay until its report was sent (``mark_sent``) and are pruned after ``keep_days``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from postgate.policy import tlsrpt

log = logging.getLogger("postgate.tlsrpt")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    day TEXT NOT NULL, domain TEXT NOT NULL, ptype TEXT NOT NULL,
    result TEXT NOT NULL,                  -- '' for a successful session
    sending_ip TEXT NOT NULL, mx TEXT NOT NULL, receiving_ip TEXT NOT NULL, info TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (day, domain, ptype, result, sending_ip, mx, receiving_ip, info)
);
CREATE TABLE IF NOT EXISTS policies (
    day TEXT NOT NULL, domain TEXT NOT NULL, ptype TEXT NOT NULL,
    strings TEXT NOT NULL, mx_patterns TEXT NOT NULL,
    PRIMARY KEY (day, domain, ptype)
);
CREATE TABLE IF NOT EXISTS sent (day TEXT NOT NULL, domain TEXT NOT NULL, PRIMARY KEY (day, domain));
"""


class TlsRptStore:
    def __init__(self, path: Path | str) -> None:
        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, timeout=30, isolation_level=None)
        if self.path != ":memory:":
            self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # --- writing -------------------------------------------------------------------------------------
    def add_sync(self, a: tlsrpt.Attempt) -> None:
        day = tlsrpt.day_of(a.when)
        key = (day, a.policy_domain, a.policy_type.value)
        fail = a.result is not None
        row = (*key, a.result.value if a.result else "", a.sending_ip if fail else "", a.mx_host if fail else "",
               a.receiving_ip if fail else "", a.detail[:200] if fail else "")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute("INSERT INTO sessions VALUES (?,?,?,?,?,?,?,?,1) ON CONFLICT DO UPDATE "
                                 "SET count = count + 1", row)
                if a.policy_strings or a.mx_patterns:
                    self._db.execute("INSERT OR REPLACE INTO policies VALUES (?,?,?,?,?)",
                                     (*key, json.dumps(list(a.policy_strings)), json.dumps(list(a.mx_patterns))))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    async def add(self, a: tlsrpt.Attempt) -> None:
        await asyncio.to_thread(self.add_sync, a)

    def mark_sent(self, day: str, domain: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR IGNORE INTO sent VALUES (?, ?)", (day, domain))

    def prune(self, before_day: str) -> None:
        """Forget days before ``before_day`` (YYYY-MM-DD)."""
        with self._lock:
            for table in ("sessions", "policies", "sent"):
                self._db.execute(f"DELETE FROM {table} WHERE day < ?", (before_day,))

    # --- reading -------------------------------------------------------------------------------------
    def unsent(self, before_day: str) -> list[tuple[str, str]]:
        """(day, policy domain) pairs before ``before_day`` with sessions and no report sent yet."""
        with self._lock:
            rows = self._db.execute(
                "SELECT DISTINCT s.day, s.domain FROM sessions s LEFT JOIN sent t ON s.day = t.day "
                "AND s.domain = t.domain WHERE t.day IS NULL AND s.day < ? ORDER BY s.day, s.domain",
                (before_day,)).fetchall()
        return [(d, dom) for d, dom in rows]

    def counts(self, day: str, domain: str) -> list[tlsrpt.PolicyCounts]:
        """The aggregated sessions of one policy domain on one day, one entry per policy type."""
        out: dict[str, tlsrpt.PolicyCounts] = {}
        with self._lock:
            rows = self._db.execute("SELECT ptype, result, sending_ip, mx, receiving_ip, info, count FROM "
                                    "sessions WHERE day = ? AND domain = ?", (day, domain)).fetchall()
            pols = self._db.execute("SELECT ptype, strings, mx_patterns FROM policies WHERE day = ? AND "
                                    "domain = ?", (day, domain)).fetchall()
        for ptype, result, sip, mx, rip, info, n in rows:
            pc = out.setdefault(ptype, tlsrpt.PolicyCounts(domain, tlsrpt.PolicyType(ptype), day))
            if not result:
                pc.successes += n
            else:
                if pc.failures is None:
                    pc.failures = {}
                pc.failures[(result, sip, mx, rip, info)] = n
        for ptype, strings, patterns in pols:
            if ptype in out:
                out[ptype].policy_strings = tuple(json.loads(strings))
                out[ptype].mx_patterns = tuple(json.loads(patterns))
        return [out[k] for k in sorted(out)]


class Collector:
    """The delivery agent's TLS-RPT hook (``DeliveryConfig.tls_report``): stamp and store each attempt."""

    def __init__(self, store: TlsRptStore, clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.clock = clock

    async def __call__(self, a: tlsrpt.Attempt) -> None:
        if not a.when:
            a = replace(a, when=self.clock())
        try:
            await self.store.add(a)
        except sqlite3.Error as e:  # reporting must never hold up delivery
            log.error("TLS-RPT store %s: %s", self.store.path, e)


def collector(store: TlsRptStore, clock: Callable[[], float] = time.time) -> Collector:
    return Collector(store, clock)
