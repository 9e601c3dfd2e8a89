"""Audit events from the hot path, written to the registry in batches off the event loop.

An ACL refusal must not wait for a database commit, and a flood of them must not grow memory
without bound: records go into a bounded queue; when it is full they are dropped, counted in
``/metrics`` and logged, never silently.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque

from sqlalchemy.exc import SQLAlchemyError

from broker.metrics import Metrics
from enrollment.registry import AuditRecord, Registry

log = logging.getLogger("fleetgate.broker.audit")

BATCH = 500


class AuditWriter:
    """A bounded queue of audit records and the task that commits them."""

    def __init__(self, registry: Registry, metrics: Metrics, *, capacity: int = 10_000) -> None:
        self._registry = registry
        self._metrics = metrics
        self._capacity = capacity
        self._queue: deque[AuditRecord] = deque()
        self._wake = asyncio.Event()
        self._writing = asyncio.Lock()  # a flush returns only after the writes in flight commit

    def submit(self, record: AuditRecord) -> None:
        """Queue ``record``; never blocks."""
        if len(self._queue) >= self._capacity:
            self._metrics.audit_dropped += 1
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
        """Commit everything queued so far, including what another flush is writing now."""
        async with self._writing:
            while self._queue:
                batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
                await asyncio.to_thread(self._write, batch)

    def _write(self, batch: list[AuditRecord]) -> None:
        try:
            with self._registry.transaction() as session:
                for record in batch:
                    self._registry.audit(record, session)
        except SQLAlchemyError:
            self._metrics.audit_dropped += len(batch)
            log.exception("audit events could not be stored", extra={"count": len(batch)})
        else:
            self._metrics.audit_written += len(batch)
