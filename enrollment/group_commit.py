"""Group commit: the work of concurrent requests committed together, each answered after it.

A request that has done everything but its commit hands its item to :class:`GroupCommit` and
awaits the outcome. One commit runs at a time, off the loop; the items that arrive meanwhile
go into the next one, so under load one transaction (one WAL append of the pages they share,
one ``COMMIT``) carries many requests, and when idle a request waits for nobody.

``commit`` takes the items of one batch and returns one outcome per item: a result, or an
exception for that item alone (the others are unaffected). An exception raised by ``commit``
itself means nothing of the batch was committed: every request of the batch gets it.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections import deque
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

from enrollment.audit_writer import Offload

Item = TypeVar("Item")
Result = TypeVar("Result")

MAX_BATCH = 64
"""Items per commit at most, so one transaction never holds the write lock for long."""


class GroupCommit(Generic[Item, Result]):
    """Batches items from concurrent callers into calls of ``commit`` run through ``offload``.

    A caller that is cancelled while it waits does not take its item back: the item is
    committed with its batch (as a service call started on the threads runs to its end), only
    its outcome is dropped.
    """

    def __init__(
        self,
        commit: Callable[[Sequence[Item]], Sequence[Result | BaseException]],
        offload: Offload,
        *,
        max_batch: int = MAX_BATCH,
    ) -> None:
        self._commit = commit
        self._offload = offload
        self._max_batch = max_batch
        self._queue: deque[tuple[Item, asyncio.Future[Result]]] = deque()
        self._drain: asyncio.Task[None] | None = None
        self.batches = 0  # commits run, and items they carried (the benchmark reports both)
        self.items = 0

    async def submit(self, item: Item) -> Result:
        """Commit ``item`` with whatever else is waiting; its result, or its exception."""
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        self._queue.append((item, future))
        if self._drain is None or self._drain.done():
            # Its own empty context: the batch's log lines belong to no single request.
            self._drain = asyncio.create_task(self._commit_queue(), context=contextvars.Context())
        return await future

    async def _commit_queue(self) -> None:
        while self._queue:
            batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
            items = [item for item, _ in batch]
            self.batches += 1
            self.items += len(items)
            try:
                outcomes = await self._offload(functools.partial(self._commit, items))
            except asyncio.CancelledError:  # the loop is shutting down: nobody gets an answer
                for _, future in batch:
                    future.cancel()
                raise
            except Exception as exc:  # nothing of the batch was committed
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            for (_, future), outcome in zip(batch, outcomes, strict=True):
                if future.done():  # its caller was cancelled
                    continue
                if isinstance(outcome, BaseException):
                    future.set_exception(outcome)
                else:
                    future.set_result(outcome)
