"""The resolver's caches: an LRU of values with expiry times, bounded in entries.

Upstream messages, validated answers and trusted keys are each kept in one, with the TTL the caller
computed (capped by RRSIG original TTL and expiry, RFC 4035 §5.3.3; negative answers by the SOA minimum,
RFC 2308 §5; failures briefly, RFC 9520 §3.2). Concurrent misses for one key share one computation, so
fifty identical questions send one upstream query.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class TTLCache:
    """LRU cache of (value, expiry) bounded in entries; concurrent misses for one key share one task."""

    def __init__(self, max_entries: int, clock: Callable[[], float]) -> None:
        self.max = max_entries
        self.clock = clock
        self.data: OrderedDict[Any, tuple[Any, float]] = OrderedDict()
        self.inflight: dict[Any, asyncio.Future[Any]] = {}
        self.hits = 0
        self.misses = 0

    def peek(self, key: Any) -> Any:
        """The cached value, or None, without waiting (the hot path of a cached lookup)."""
        hit = self.data.get(key)
        if hit is not None and hit[1] > self.clock():
            self.data.move_to_end(key)
            self.hits += 1
            return hit[0]
        return None

    async def get(self, key: Any, make: Callable[[], Awaitable[tuple[T, int]]]) -> T:
        hit = self.data.get(key)
        if hit is not None and hit[1] > self.clock():
            self.data.move_to_end(key)
            self.hits += 1
            return hit[0]  # type: ignore[no-any-return]
        fut = self.inflight.get(key)
        if fut is not None:
            return await asyncio.shield(fut)
        self.misses += 1
        fut = asyncio.get_running_loop().create_future()
        self.inflight[key] = fut
        try:
            value, ttl = await make()
        except BaseException as e:
            self.inflight.pop(key, None)
            if not fut.done():
                fut.set_exception(e)
                fut.exception()  # mark retrieved: waiters re-raise it themselves
            raise
        self.inflight.pop(key, None)
        if ttl > 0:
            self.data[key] = (value, self.clock() + ttl)
            self.data.move_to_end(key)
            while len(self.data) > self.max:
                self.data.popitem(last=False)
        fut.set_result(value)
        return value
