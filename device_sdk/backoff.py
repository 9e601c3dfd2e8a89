"""Reconnect delays with full jitter: :class:`Backoff`.

Its own module, importing only the standard library, because the broker's bridge reconnects
with it too and must not load paho (which :mod:`device_sdk.client` needs) to do so.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Backoff"]


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: exponential bound capped at ``maximum``, with full jitter.

    Each delay is drawn uniformly between zero and the bound, so a fleet that lost its broker at
    the same moment does not come back at the same moment.
    """

    initial: float = 0.5
    maximum: float = 60.0
    multiplier: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.initial <= self.maximum or self.multiplier < 1:
            raise ValueError(
                f"backoff needs 0 < initial <= maximum and multiplier >= 1, not {self}"
            )

    def bound(self, attempt: int) -> float:
        """The longest wait before retry number ``attempt`` (0-based)."""
        return min(self.maximum, self.initial * self.multiplier ** min(attempt, 64))

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        return self.bound(attempt) * rand()
