"""The enrollment service's blocking work (CSR checks, signing, registry round trips), off the loop.

The EST endpoint's event loop also runs every TLS handshake; a PostgreSQL round trip or a
signature made on it would stall them all. :class:`ServiceThreads` runs such calls on a small,
bounded pool and counts how many run at once (``in_flight``, ``peak_in_flight``), which is also
how tests prove that concurrent requests really overlap on the server.

How many threads (:func:`service_threads`):

* SQLite: one. Its writers serialize on the database lock whatever the thread count, and a
  writer that finds the lock taken does not queue: SQLite's busy handler sleeps 1, 2, 5, 10 ms...
  between retries. Measured with ``make bench-enroll`` (server pinned to one core, runs
  interleaved): four threads cost 1443-1505 us of server CPU per enrollment against one
  thread's 1238-1350 us, and tripled the database stage's wall time. (Their enrollments per
  second were similar only because four runnable threads got a larger share of the shared,
  busy core: 80-93 % against 62-81 %.) An in-memory SQLite registry shares one connection
  between threads: two would interleave their transactions on it.
* PostgreSQL: :data:`SERVICE_THREADS` (4), so round trips of several requests overlap, but no
  more than the engine's ``QueuePool`` keeps connections (``pool_size``, 5 by default; more
  threads would open and close overflow connections, or wait for one).

The audit writer and the enrollments' group commit (:mod:`enrollment.group_commit`) commit on
the same pool, so the service never holds more registry connections than it has threads.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from sqlalchemy.pool import QueuePool

from enrollment.registry import Registry

T = TypeVar("T")

_BATCH = 8  # calls a thread runs before it hands their results to the loop

SERVICE_THREADS = 4


def service_threads(registry: Registry, preferred: int = SERVICE_THREADS) -> int:
    """How many threads may call into ``registry`` at once (see the module docstring)."""
    if registry.engine.dialect.name == "sqlite":
        return 1
    pool = registry.engine.pool
    if isinstance(pool, QueuePool):
        return max(1, min(preferred, pool.size()))
    return max(1, preferred)


class ServiceThreads:
    """A fixed number of threads running blocking service calls, with a gauge of those running.

    Lighter than ``loop.run_in_executor``: a call is a tuple on a ``SimpleQueue`` and its result
    goes straight into an asyncio future (no ``concurrent.futures.Future`` with its condition
    variable, no chaining of one future to the other), which the enrollment benchmark's single
    server core notices. A call whose caller was cancelled still runs to its end: its result
    is dropped, never its side effects half-done.
    """

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self.in_flight = 0
        self.peak_in_flight = 0
        self._count = threading.Lock()
        self._calls: queue.SimpleQueue[_Call[Any] | None] = queue.SimpleQueue()
        self._workers = [
            threading.Thread(target=self._work, name=f"fleetgate-est-{n}", daemon=True)
            for n in range(threads)
        ]
        for worker in self._workers:
            worker.start()

    async def run(self, call: Callable[[], T], *, context: contextvars.Context | None = None) -> T:
        """``call()`` on a pool thread, in ``context`` (default: a copy of the caller's, so log
        lines keep their request id); pass a context to read back what the call set in it."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        ctx = context if context is not None else contextvars.copy_context()
        self._calls.put(_Call(call, ctx, loop, future))
        return await future

    def _work(self) -> None:
        while (item := self._calls.get()) is not None:
            # Run what is already queued (up to _BATCH calls) before waking the loop: the loop
            # then answers them in one turn instead of competing with this thread for the GIL
            # between every two calls (on one core each such switch costs a context switch).
            settled: list[tuple[_Call[Any], Any, BaseException | None]] = []
            while item is not None:
                settled.append((item, *self._run_one(item)))
                if len(settled) == _BATCH:
                    break
                try:
                    item = self._calls.get_nowait()
                except queue.Empty:
                    break
            self._deliver(settled)
            if item is None:  # shutdown, taken from the queue in the middle of a batch
                return

    def _run_one(self, item: _Call[Any]) -> tuple[Any, BaseException | None]:
        with self._count:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return item.context.run(item.call), None
        except BaseException as exc:  # handed to the awaiting coroutine, which re-raises it
            return None, exc
        finally:
            with self._count:
                self.in_flight -= 1

    @staticmethod
    def _deliver(settled: list[tuple[_Call[Any], Any, BaseException | None]]) -> None:
        loops = {id(item.loop): item.loop for item, _, _ in settled}
        for loop in loops.values():
            mine = [(i.future, result, exc) for i, result, exc in settled if i.loop is loop]
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody awaits them any more
                loop.call_soon_threadsafe(_settle, mine)

    def shutdown(self) -> None:
        """Let the calls already queued finish, then stop the threads."""
        for _ in self._workers:
            self._calls.put(None)
        for worker in self._workers:
            worker.join()


@dataclass(frozen=True)
class _Call(Generic[T]):
    call: Callable[[], T]
    context: contextvars.Context
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[T]


def _settle(settled: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, exc in settled:
        if future.cancelled():
            continue
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
