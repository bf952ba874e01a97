"""Coroutines started at once, so work that need not wait costs no turn of the event loop (issue 20).

``asyncio.gather`` and ``create_task`` wrap each coroutine in a Task whose first step runs on a *later turn*
of the loop, and the coroutine that awaits them is woken on yet another turn (the Task's done callback, then
the awaiting Task's wake-up). A turn is cheap on an idle server; under load it waits behind every other
session's ready work — with 100 busy sessions on two shared cores, 10–40 ms per turn. The route of a
pre-queue delivery took about ten such turns when every DNS answer was cached (nested gathers in the next-hop
resolution: MX hosts, then A/AAAA and the MTA-capability record; one in the route; the MTA-STS lookup's task
and shield), and at the start of a load, with a hundred sessions reaching DATA at once, those were a thousand
tasks in a few turns. Now a cached route takes none (tests/test_latency.py).

Python 3.12 has this as the *eager task factory*; Postgate runs on 3.11 (Debian 12), so this module does the
same for the places that need it:

- :func:`task`: run the coroutine's first step now, in the caller's turn but as the new Task's (so
  ``asyncio.current_task`` and ``asyncio.timeout`` see that Task); if it finished, a done future, else the
  Task goes on from where the first step stopped (``yield from`` semantics: the Task waits on the future
  the coroutine yielded, cancellation and exceptions are thrown into it as they would be).
- :func:`gather`: :func:`task` for each coroutine but the last, which is awaited in place; when all finish in
  their first step (every answer came from a cache) the results come back without suspending at all.

Semantics are asyncio's: results in argument order, the first exception propagates and the other coroutines
keep running, cancelling the caller cancels the ones still running. The first step runs in a copy of the
caller's context, which the Task then keeps (as an eager task does).
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any, TypeVar

T = TypeVar("T")

# futures of coroutines left running after a sibling's exception ended a gather: kept until done
_orphans: set[asyncio.Future[Any]] = set()


class _Continued(Coroutine[Any, T, T]):
    """What the Task of an eagerly started coroutine runs: its first ``send`` hands the Task the future the
    eager step was waiting on (or ends at once, the eager step having finished the coroutine); from then on
    every ``send`` and ``throw`` goes to the coroutine itself, as ``yield from`` would. A cancellation before
    the Task's first step is thrown into the coroutine where it waits."""

    __slots__ = ("coro", "finished", "started", "yielded")

    def __init__(self, coro: Coroutine[Any, Any, T]) -> None:
        self.coro = coro
        self.started = False
        self.finished = False
        self.yielded: Any = None

    def send(self, value: Any) -> Any:
        if not self.started:
            self.started = True
            if self.finished:
                raise StopIteration(None)
            return self.yielded
        return self.coro.send(value)

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> Any:
        if not self.started:
            self.started = True
            if self.finished:
                raise typ if val is None else val
        return self.coro.throw(typ) if val is None else self.coro.throw(typ, val, tb)

    def close(self) -> None:
        self.coro.close()

    def __await__(self) -> Generator[Any, None, T]:
        raise TypeError("run by its Task only")


def task(coro: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """``asyncio.create_task(coro)``, except that the first step runs now, as the new Task's (so
    ``asyncio.current_task()`` — and with it ``asyncio.timeout`` — sees that Task, as in 3.12's eager tasks): a
    coroutine that does not suspend is done on return (a done future carries its result or exception), one
    that does goes on in the Task."""
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    cont = _Continued(coro)
    t = loop.create_task(cont, context=ctx)
    caller = asyncio.current_task(loop)
    if caller is not None:
        asyncio.tasks._leave_task(loop, caller)
    asyncio.tasks._enter_task(loop, t)
    try:
        cont.yielded = ctx.run(coro.send, None)
        return t
    except StopIteration as stop:
        cont.finished = True
        fut: asyncio.Future[T] = loop.create_future()
        fut.set_result(stop.value)
        return fut
    except BaseException as e:
        cont.finished = True
        if isinstance(e, KeyboardInterrupt | SystemExit):
            raise
        fut = loop.create_future()
        fut.set_exception(e)
        return fut
    finally:
        asyncio.tasks._leave_task(loop, t)
        if caller is not None:
            asyncio.tasks._enter_task(loop, caller)


async def gather(*coros: Coroutine[Any, Any, Any]) -> list[Any]:
    """``asyncio.gather(*coros)`` without turns of the loop it does not need: every coroutine but the last is
    started at once (:func:`task`), the last one is awaited in place (it needs no task of its own), and one
    that is still running afterwards is awaited directly (one wake-up: its Task's; asyncio.gather's own
    future would add a second). When every coroutine finishes without suspending (every answer came from a
    cache) the results come back without suspending at all."""
    if not coros:
        return []
    futs = [task(c) for c in coros[:-1]]
    if any(_error(f) is not None for f in futs):
        futs.append(task(coros[-1]))   # it must start too (asyncio.gather starts them all)
        _fail(futs)
    try:
        last = await coros[-1]
    except asyncio.CancelledError:
        for f in futs:   # as asyncio.gather: cancelling the caller cancels the children
            f.cancel()
        raise
    except Exception:
        _fail(futs, raising=False)
        raise
    pending = [f for f in futs if not f.done()]
    try:
        if len(pending) == 1:
            await pending[0]
        elif pending:
            await asyncio.gather(*pending)
    except Exception:
        _fail(futs, raising=False)
        raise
    _fail(futs)
    return [f.result() for f in futs] + [last]


def _fail(futs: list[asyncio.Future[Any]], raising: bool = True) -> None:
    """Retrieve every exception (as asyncio.gather does), leave the coroutines still running to finish (kept
    referenced, their errors not logged again), and raise the first exception in argument order."""
    first: BaseException | None = None
    for f in futs:
        if f.done():
            first = first or _error(f)
        else:
            _orphans.add(f)
            f.add_done_callback(_retrieved)
    if raising and first is not None:
        raise first


def _error(f: asyncio.Future[Any]) -> BaseException | None:
    """The exception of a done future (CancelledError for a cancelled one), None while running or on success."""
    if not f.done():
        return None
    if f.cancelled():
        return asyncio.CancelledError()
    return f.exception()


def _retrieved(f: asyncio.Future[Any]) -> None:
    _orphans.discard(f)
    if not f.cancelled():
        f.exception()


__all__ = ["gather", "task"]
