"""Audit events from an event loop's hot path, written to the registry in batches off the loop.

A refused TLS handshake or ACL check must not wait for a database commit, and a flood of them
must not grow memory without bound: records go into a bounded queue; when it is full they are
dropped, counted and logged, never silently. The broker and the enrollment service share this.

While the registry is unreachable the queue holds what could not be written and the writer
retries with backoff (:data:`RETRY_FIRST_S` doubling to :data:`RETRY_MAX_S`), so the events of an
outage, such as the CONNECTs refused because of it, are stored once it returns. A batch the
database refuses (an integrity error) is retried record by record; only the refused records are
dropped, counted and logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from enrollment.registry import AuditRecord, Registry
from enrollment.registry.engine import failure_cause
from enrollment.registry.outage import RegistryOutage

log = logging.getLogger("fleetgate.audit")

BATCH = 500
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0

_T = TypeVar("_T")


class Offload(Protocol):
    """Runs a blocking call away from the event loop and awaits its result."""

    def __call__(self, call: Callable[[], _T], /) -> Awaitable[_T]: ...


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

    ``outage`` is shared with the other users of the registry so that an outage is logged once
    per process. The queue may exceed ``capacity`` by one batch (a batch put back while new
    records arrived).
    """

    def __init__(
        self,
        registry: Registry,
        counts: AuditCounts | None = None,
        *,
        capacity: int = 10_000,
        offload: Offload | None = None,
        outage: RegistryOutage | None = None,
    ) -> None:
        self._registry = registry
        self._outage = outage if outage is not None else RegistryOutage(registry.url, log)
        self.counts: AuditCounts = counts if counts is not None else AuditTally()
        self._capacity = capacity
        self._offload: Offload = offload if offload is not None else asyncio.to_thread
        self._queue: deque[AuditRecord] = deque()
        self._wake = asyncio.Event()
        self._drain: asyncio.Task[None] | None = None
        self._retry = asyncio.Event()  # set: retry an unreachable registry now
        self._final = False
        self._full_drops = 0  # dropped since the queue last had room (logged once per episode)

    def submit(self, record: AuditRecord) -> None:
        """Queue ``record``; never blocks."""
        if len(self._queue) >= self._capacity:
            self.counts.audit_dropped += 1
            if not self._full_drops:
                log.error(
                    "the audit queue is full (%d events): new events are dropped and counted "
                    "until it has room",
                    self._capacity,
                    extra={"action": record.action, "subject": record.subject},
                )
            self._full_drops += 1
            return
        self._queue.append(record)
        self._wake.set()

    async def run(self) -> None:
        """Commit queued records until cancelled (new records do not cut a retry's backoff)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            await self._drained()

    async def flush(self, *, final: bool = False) -> None:
        """Commit everything queued so far; returns once it is stored (or counted as dropped).

        An unreachable registry is retried at once, then with backoff until it answers; with
        ``final`` (shutting down) what it still cannot take is counted as dropped and logged.
        """
        self._final = self._final or final
        self._retry.set()
        await self._drained()

    async def _drained(self) -> None:
        if self._drain is None or self._drain.done():
            if not self._queue:
                return
            self._drain = asyncio.create_task(self._commit_queue())
        await asyncio.shield(self._drain)

    async def _commit_queue(self) -> None:
        delay = RETRY_FIRST_S
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(BATCH, len(self._queue)))]
            self._retry.clear()
            stored = await self._offload(functools.partial(self._write, batch))
            # Counted here, on the loop, so submit's counting never races a worker thread.
            if stored is not None:
                self.counts.audit_written += stored
                self.counts.audit_dropped += len(batch) - stored
                delay = RETRY_FIRST_S
                self._end_full_episode()
                continue
            self._queue.extendleft(reversed(batch))  # unreachable: keep it, in order
            if self._final:
                self._give_up()
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._retry.wait(), delay)
            delay = min(delay * 2, RETRY_MAX_S)

    def _end_full_episode(self) -> None:
        if self._full_drops and len(self._queue) < self._capacity:
            log.warning(
                "%d audit events were dropped while the audit queue was full", self._full_drops
            )
            self._full_drops = 0

    def _give_up(self) -> None:
        lost = len(self._queue)
        self.counts.audit_dropped += lost
        self._queue.clear()
        log.error(
            "%d audit events were not stored: %s is unreachable at shutdown",
            lost,
            self._outage.what,
        )

    def _write(self, batch: list[AuditRecord]) -> int | None:
        """Store ``batch``: how many records were stored, None if the registry is unreachable
        (nothing was; retry all of it)."""
        try:
            with self._registry.transaction() as session:
                for record in batch:
                    self._registry.audit(record, session)
        except SQLAlchemyError as exc:
            if self._outage.failed_with("an audit write", exc):
                return None
            if len(batch) > 1:  # find the refused record(s); keep the others
                return sum(self._write([record]) or 0 for record in batch)
            log.error(
                "an audit event was refused by the database and dropped: %s",
                failure_cause(exc),
                extra={"action": batch[0].action, "subject": batch[0].subject},
            )
            return 0
        self._outage.succeeded()
        return len(batch)
