"""Downgrade memory: remembering how well a destination was protected, to notice when that is taken away.

DANE protects a domain only as long as the chain of DS records from the root reaches it. An attacker who
can make the parent zone drop the domain's DS (a registrar account, a compromised parent) turns the
domain *insecure*; every MTA then sees no TLSA records, by the rules, and falls back to opportunistic
TLS — silently. MTA-STS has a similar gap when a policy disappears before its ``max_age``. No standard
says to remember; an operator would want to know.

So Postgate keeps, per destination domain, the best protection it has seen and when: ``dane`` (secure,
usable TLSA records for an MX host), ``sts`` (an MTA-STS policy in enforce mode), ``tls`` (a TLS session
completed). When a destination remembered as ``dane`` (within ``remember`` seconds) shows up without
DANE, or its MTA-STS TXT record vanishes while a cached policy is still valid, that is a *suspected
downgrade*: logged with both states, counted, and — with ``downgrade = defer`` — its mail waits for
``defer_window`` seconds from the first sighting so an operator can look (``postgate resolve`` shows the
memory). When the protection comes back, delivery resumes at once and the flag is cleared; when the
window is over, mail flows as the current DNS says and the memory takes the new state.

``tls`` memory also stops the cleartext fallback of ``may`` (see ``outbound/delivery.py``): a destination
that has done TLS recently does not get plaintext after a failed handshake.

The memory is one JSON file, replaced atomically from a worker thread.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from postgate.outbound.statefile import JsonStateFile

log = logging.getLogger("postgate.downgrade")


class Protection(enum.IntEnum):
    NONE = 0
    TLS = 1
    STS = 2
    DANE = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Action(enum.Enum):
    LOG = "log"
    DEFER = "defer"


@dataclass(frozen=True)
class Settings:
    action: Action = Action.LOG
    remember: float = 30 * 86400        # how long a protection seen is remembered
    defer_window: float = 86400         # with defer: how long mail waits after the first sighting
    file: str | None = None
    per_domain: tuple[tuple[str, Action], ...] = ()  # overrides of ``action`` by destination domain

    def action_for(self, domain: str) -> Action:
        for d, a in self.per_domain:
            if d == domain:
                return a
        return self.action


@dataclass(frozen=True)
class Memory:
    domain: str
    best: int = 0              # Protection
    best_seen: float = 0.0     # last time ``best`` was observed
    tls_seen: float = 0.0      # last time a TLS session completed
    flagged: float = 0.0       # first sighting of the current suspected downgrade (0: none)
    flagged_state: str = ""    # what was seen then

    def describe(self) -> str:
        def ts(t: float) -> str:
            return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else "never"
        out = f"best={Protection(self.best).label} seen {ts(self.best_seen)}, tls seen {ts(self.tls_seen)}"
        if self.flagged:
            out += f", SUSPECTED DOWNGRADE since {ts(self.flagged)} ({self.flagged_state})"
        return out


@dataclass(frozen=True)
class Verdict:
    suspected: bool = False
    defer: bool = False
    reason: str = ""


class DowngradeMemory:
    def __init__(self, settings: Settings | None = None, clock: Callable[[], float] | None = None) -> None:
        self.settings = settings or Settings()
        self.clock = clock or time.time
        self.path = Path(self.settings.file) if self.settings.file else None
        self._mem: dict[str, Memory] = {}
        self.counters: dict[str, int] = {}
        self._file = JsonStateFile(self.path, "destinations", "downgrade memory", log)
        try:
            for d in self._file.load():
                m = Memory(**d)
                self._mem[m.domain] = m
        except (ValueError, TypeError) as e:
            self._mem.clear()
            log.warning("downgrade memory %s unreadable, starting empty: %s", self.path, e)

    def get(self, domain: str) -> Memory | None:
        return self._mem.get(domain.lower().rstrip("."))

    def tls_recent(self, domain: str) -> bool:
        """A TLS session with ``domain`` completed within the ``remember`` window."""
        m = self.get(domain)
        return m is not None and m.tls_seen > 0 and self.clock() - m.tls_seen < self.settings.remember

    async def note_tls(self, domain: str) -> None:
        now = self.clock()
        m = self.get(domain) or Memory(domain.lower().rstrip("."))
        if now - m.tls_seen > 3600:  # one write an hour per destination is plenty
            await self._put(replace(m, tls_seen=now))

    async def observe(self, domain: str, current: Protection, *, sts_vanished: bool = False) -> Verdict:
        """Compare what a delivery sees now with what is remembered; update the memory."""
        domain = domain.lower().rstrip(".")
        now = self.clock()
        known = self.get(domain)
        if known is None and current is Protection.NONE:
            return Verdict()  # nothing to remember, nothing to lose: no entry for unprotected destinations
        m = known or Memory(domain)
        remembered = Protection(m.best)
        fresh = now - m.best_seen < self.settings.remember
        lost_dane = remembered is Protection.DANE and current < Protection.DANE and fresh
        if lost_dane or sts_vanished:
            what = ("was dane, now " + current.label) if lost_dane else \
                "MTA-STS TXT record gone while the cached policy is still valid"
            first = m.flagged or now
            if not m.flagged:
                self.counters["downgrade_suspected"] = self.counters.get("downgrade_suspected", 0) + 1
                await self._put(replace(m, flagged=first, flagged_state=what))
            action = self.settings.action_for(domain)
            waiting = action is Action.DEFER and now - first < self.settings.defer_window
            reason = (f"suspected downgrade of {domain}: {what} (best seen "
                      f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(m.best_seen))})")
            log.warning("%s%s", reason, " — deferring" if waiting else "")
            if waiting:
                return Verdict(True, True, reason + " — deferred, see 'postgate resolve'")
            if lost_dane:  # the window is over: accept the new state
                await self._put(replace(self.get(domain) or m, best=int(current), best_seen=now, flagged=0,
                                        flagged_state=""))
            return Verdict(True, False, reason)
        if current >= remembered or not fresh:
            if m.flagged or current != remembered or now - m.best_seen > 3600:
                await self._put(replace(m, best=int(current), best_seen=now, flagged=0, flagged_state=""))
        return Verdict()

    async def _put(self, m: Memory) -> None:
        self._mem[m.domain] = m
        await self._file.save([asdict(x) for x in self._mem.values()])
