"""The enrollment service's blocking work (CSR checks, signing, registry round trips), off the loop.

The EST endpoint's event loop also runs every TLS handshake; a PostgreSQL round trip or a
signature made on it would stall them all. :class:`ServiceThreads` runs such calls on a small,
bounded pool and counts how many run at once (``in_flight``, ``peak_in_flight``), which is also
how tests prove that concurrent requests really overlap on the server.

How many threads (:func:`service_threads`):

* SQLite: one. Its writers serialize on the database lock whatever the thread count, and a
  writer that finds the lock taken does not queue: SQLite's busy handler sleeps 1, 2, 5, 10 ms...
  between retries. Measured with ``make bench-enroll`` (server pinned to one core): two threads
  doubled the database stage's wall time and cost 60-100 us more CPU per enrollment than one,
  four cost 130-230 us more, and both enrolled fewer devices per second. The CPU-bound parts
  (CSR checks, signing) hold the GIL, so they gain nothing from more threads either. (An
  in-memory SQLite registry shares one connection between threads: two would interleave their
  transactions on it.)
* PostgreSQL: :data:`SERVICE_THREADS` (4), so round trips of several requests overlap, but no
  more than the engine's ``QueuePool`` keeps connections (``pool_size``, 5 by default; more
  threads would open and close overflow connections, or wait for one).

The audit writer commits on the same pool, so the service never holds more registry
connections than it has threads.
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TypeVar

from sqlalchemy.pool import QueuePool

from enrollment.registry import Registry

T = TypeVar("T")

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
    """A bounded thread pool for blocking service calls, with a gauge of those running."""

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="fleetgate-est")
        self._lock = threading.Lock()
        self.in_flight = 0
        self.peak_in_flight = 0

    @property
    def executor(self) -> Executor:
        return self._pool

    async def run(self, call: Callable[[], T], *, context: contextvars.Context | None = None) -> T:
        """``call()`` on the pool, in ``context`` (default: a copy of the caller's, so log lines
        keep their request id); pass a context to read back what the call set in it."""
        ctx = context if context is not None else contextvars.copy_context()
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, ctx.run, self._counted, call)

    def _counted(self, call: Callable[[], T]) -> T:
        with self._lock:
            self.in_flight += 1
            self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return call()
        finally:
            with self._lock:
                self.in_flight -= 1

    def shutdown(self) -> None:
        """Wait for the calls already submitted, then stop the threads."""
        self._pool.shutdown(wait=True)
