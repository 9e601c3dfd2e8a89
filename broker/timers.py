"""Deadlines kept in a heap, so the broker's periodic work costs O(items due), not O(items).

Sans-IO like the core: time is a number passed in. Each key has at most one live deadline;
rescheduling a key pushes a new entry and leaves the old one in the heap, skipped when it
surfaces (lazy deletion: no O(n) removal). Dead entries, and the keys they keep alive, are
bounded: the heap is rebuilt from the live deadlines once dead entries outnumber a quarter of
the live ones (amortised O(1) per call) or ``_REBUILD_FLOOR``, whichever is more.
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

_REBUILD_FLOOR = 1024
"""Up to this many dead entries a heap is never rebuilt (cheap either way)."""


class Deadlines(Generic[K]):
    """The next instant each key wants attention; :meth:`due` hands back those whose came."""

    def __init__(self) -> None:
        self._when: dict[K, float] = {}
        self._heap: list[tuple[float, int, K]] = []
        self._order = (
            itertools.count()
        )  # ties in time: first scheduled, first due; keys never compared

    def __len__(self) -> int:
        return len(self._when)

    def __contains__(self, key: object) -> bool:
        return key in self._when

    def schedule(self, key: K, when: float) -> None:
        """``key`` is due at ``when`` (replacing any earlier or later deadline of it)."""
        if self._when.get(key) == when:
            return
        self._when[key] = when
        heapq.heappush(self._heap, (when, next(self._order), key))
        live = len(self._when)
        if len(self._heap) - live > max(_REBUILD_FLOOR, live // 4):
            self._heap = [(w, next(self._order), k) for k, w in self._when.items()]
            heapq.heapify(self._heap)

    def cancel(self, key: K) -> None:
        self._when.pop(key, None)

    def next_deadline(self) -> float | None:
        """The earliest live deadline, or None if nothing is scheduled."""
        heap = self._heap
        while heap and self._when.get(heap[0][2]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def due(self, now: float) -> list[K]:
        """The keys whose deadline is at or before ``now``, earliest first; they are no longer
        scheduled (the caller schedules again any that still want attention)."""
        heap, when = self._heap, self._when
        found: list[K] = []
        while heap and heap[0][0] <= now:
            at, _, key = heapq.heappop(heap)
            if when.get(key) == at:
                del when[key]
                found.append(key)
        return found
