"""How the long-running broker keeps the cyclic garbage collector from stopping its event loop.

A full (generation 2) collection walks every tracked object; with 10,000 connections' state
that took 140-234 ms, the event loop stopped meanwhile (issue 11, ``make soak``). The policy:

- What has lived through a settling period is moved out of the collector's sight
  (``gc.freeze``) every ``settle_s``, after a young collection (``gc.collect(1)``) so garbage
  just made is freed first. Full collections then walk only what came since the last freeze.
- Freezing is not free of cost: frozen objects are still freed by reference counting when
  they die, but frozen *cycles* are not until unfrozen. So when what was frozen since the last
  full collection reaches ``regrowth`` of the frozen set's size after it (connections churned
  away while new ones came), it is unfrozen, collected in full once and frozen again: memory
  held by dead frozen cycles stays within that fraction of the live state, at the price of one
  full pause per that much churn. What each settle freezes is counted as it is frozen (those
  objects may die since, so the count errs towards collecting early), because counting the
  frozen set itself walks all of it.
- Every collection's pause is timed (``gc.callbacks``): the worst per generation and a count
  per generation are exported on ``/metrics`` so an operator sees what the collector costs.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from typing import Any

GENERATIONS = (0, 1, 2)


@dataclass
class GcPauses:
    """Collections and their worst pause, per generation, since the process started."""

    count: dict[int, int] = field(default_factory=lambda: dict.fromkeys(GENERATIONS, 0))
    worst_s: dict[int, float] = field(default_factory=lambda: dict.fromkeys(GENERATIONS, 0.0))
    total_s: dict[int, float] = field(default_factory=lambda: dict.fromkeys(GENERATIONS, 0.0))
    refreezes: int = 0
    _started: float | None = None

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        """A ``gc.callbacks`` entry: ``start`` and ``stop`` of each collection."""
        if phase == "start":
            self._started = time.perf_counter()
            return
        if self._started is None:
            return
        pause = time.perf_counter() - self._started
        self._started = None
        generation = int(info.get("generation", 2))
        self.count[generation] += 1
        self.total_s[generation] += pause
        if pause > self.worst_s[generation]:
            self.worst_s[generation] = pause


class GcPolicy:
    """Installed once by the broker process; :meth:`settle` runs from its periodic tick."""

    def __init__(self, *, settle_s: float = 30.0, regrowth: float = 0.5) -> None:
        self.settle_s = settle_s
        self.regrowth = regrowth
        self.pauses = GcPauses()
        self._next_settle: float | None = None
        self._frozen_after_full = 0
        self._frozen_since_full = 0

    def install(self) -> None:
        """Start timing collections; freeze what start-up built (it lives as long as the
        process)."""
        if self.pauses not in gc.callbacks:
            gc.callbacks.append(self.pauses)
        gc.collect()
        gc.freeze()
        self._frozen_after_full = gc.get_freeze_count()

    def uninstall(self) -> None:
        if self.pauses in gc.callbacks:
            gc.callbacks.remove(self.pauses)

    def settle(self, now: float) -> None:
        """Every ``settle_s``: freeze what survived; once the frozen set regrew by
        ``regrowth``, free its dead cycles with one full collection first."""
        if self._next_settle is None or now < self._next_settle:
            if self._next_settle is None:
                self._next_settle = now + self.settle_s
            return
        self._next_settle = now + self.settle_s
        gc.collect(1)
        # Only the oldest generation holds anything after a young collection; counting it is
        # cheap, unlike gc.get_freeze_count(), which walks every frozen object (tens of ms
        # with 10,000 connections' state: a pause in itself, once per settle).
        self._frozen_since_full += len(gc.get_objects(generation=2))
        gc.freeze()
        if self._frozen_since_full > self._frozen_after_full * self.regrowth:
            gc.unfreeze()
            gc.collect()
            gc.freeze()
            self.pauses.refreezes += 1
            self._frozen_after_full = gc.get_freeze_count()
            self._frozen_since_full = 0
