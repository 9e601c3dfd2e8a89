"""Audit events from an event loop's hot path, written to the registry in batches off the loop.

A refused TLS handshake or ACL check must not wait for a database commit, and a flood of them
must not grow memory without bound: records go into a bounded queue; when it is full they are
dropped, counted and logged, never silently. The broker and the enrollment service share this.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from sqlalchemy.exc import SQLAlchemyError

from enrollment.registry import AuditRecord, Registry

log = logging.getLogger("fleetgate.audit")

BATCH = 500

Offload = Callable[[Callable[[], bool]], Awaitable[bool]]
"""Runs a blocking call away from the event loop and awaits its result."""


class AuditCounts(Protocol):
    """Where a writer counts what it stored and what it lost (the broker's ``Metrics`` is one)."""

    audit_written: int
    audit_dropped: int


@dataclass
class AuditTally:
    """The counts of a writer that reports to nobody else."""

    audit_written: int = 0
    audit_dropped: int = 0


class AuditWriter:
    """A bounded queue of audit records and the task that commits them.

    ``offload`` runs each commit off the loop (default: ``asyncio.to_thread``); a server that
    bounds its registry connections passes its own pool. Batches are committed one at a time, in
    order, by a drain task that cancelling :meth:`run` or a :meth:`flush` does not interrupt: a
    batch handed over is never lost to a cancellation (an executor drops work that has not
    started when its future is cancelled).
    """

    def __init__(
        self,
        registry: Registry,
        counts: AuditCounts | None = None,
        *,
        capacity: int = 10_000,
        offload: Offload | None = None,
    ) -> None:
        self._registry = registry
        self.counts: AuditCounts = counts if counts is not None else AuditTally()
        self._capacity = capacity
        self._offload: Offload = offload if offload is not None else asyncio.to_thread
        self._queue: deque[AuditRecord] = deque()
        self._wake = asyncio.Event()
        self._drain: asyncio.Task[None] | None = None

    def submit(self, record: AuditRecord) -> None:
        """Queue ``record``; never blocks."""
        if len(self._queue) >= self._capacity:
            self.counts.audit_dropped += 1
            log.warning(
                "audit queue full: event dropped",
                extra={"action": record.action, "subject": record.subject},
            )
            return
        self._queue.append(record)
        self._wake.set()

    async def run(self) -> None:
        """Commit queued records until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self.flush()

    async def flush(self) -> None:
        """Commit everything queued so far; returns once it is stored (or counted as dropped)."""
        if self._drain is None or self._drain.done():
            if not self._queue:
                return
            self._drain = asyncio.create_task(self._commit_queue())
        await asyncio.shield(self._drain)

    async def _commit_queue(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            stored = await self._offload(functools.partial(self._write, batch))
            # Counted here, on the loop, so submit's counting never races a worker thread.
            if stored:
                self.counts.audit_written += len(batch)
            else:
                self.counts.audit_dropped += len(batch)

    def _write(self, batch: list[AuditRecord]) -> bool:
        try:
            with self._registry.transaction() as session:
                for record in batch:
                    self._registry.audit(record, session)
        except SQLAlchemyError:
            log.exception("audit events could not be stored", extra={"count": len(batch)})
            return False
        return True
