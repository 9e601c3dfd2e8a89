"""Saying a dependency is down once, not once per failed call.

A broker polls the registry ten times a second and asks it at every CONNECT: logging each
failure during a database outage buried the logs in tracebacks (85 in 10 s). :class:`Outage` is
the pure state (time is passed in) deciding what to say: one line when the outage starts, at
most one per ``interval`` while it lasts (with the count of failures), one when it ends.
:class:`OutageLog` is the thin, thread-safe logging shell around it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

REPORT_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class Started:
    """The first failure of an outage."""


@dataclass(frozen=True, slots=True)
class Ongoing:
    seconds: float
    failures: int


@dataclass(frozen=True, slots=True)
class Ended:
    seconds: float
    failures: int


class Outage:
    """Whether a dependency is down, since when and how many calls failed since then."""

    def __init__(self, interval: float = REPORT_INTERVAL_S) -> None:
        self.interval = interval
        self.since: float | None = None
        self.failures = 0
        self._reported = 0.0

    @property
    def down(self) -> bool:
        return self.since is not None

    def failed(self, now: float) -> Started | Ongoing | None:
        """A call failed at ``now``: what to report, if anything."""
        self.failures += 1
        if self.since is None:
            self.since = self._reported = now
            return Started()
        if now - self._reported >= self.interval:
            self._reported = now
            return Ongoing(now - self.since, self.failures)
        return None

    def succeeded(self, now: float) -> Ended | None:
        """A call succeeded at ``now``: the end of the outage, if there was one."""
        if self.since is None:
            return None
        ended = Ended(now - self.since, self.failures)
        self.since = None
        self.failures = 0
        return ended


class OutageLog:
    """Logs the outages of ``what`` (e.g. "the registry at postgresql://fleet@db/fleet").

    Callers report every call's outcome, from any thread; the log gets a few lines per outage.
    """

    def __init__(
        self,
        log: logging.Logger,
        what: str,
        *,
        interval: float = REPORT_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._log = log
        self.what = what
        self._clock = clock
        self._state = Outage(interval)
        self._lock = threading.Lock()

    @property
    def down(self) -> bool:
        return self._state.down

    def failed(self, operation: str, cause: str) -> None:
        """``operation`` (e.g. "the change feed poll") failed because ``cause``."""
        with self._lock:
            report = self._state.failed(self._clock())
        if isinstance(report, Started):
            self._log.error(
                "%s is unreachable: %s (%s failed)",
                self.what,
                cause,
                operation,
                extra={"outage": "started"},
            )
        elif isinstance(report, Ongoing):
            self._log.error(
                "%s is still unreachable after %.0f s: %d failed operations, the latest: %s",
                self.what,
                report.seconds,
                report.failures,
                cause,
                extra={"outage": "ongoing"},
            )

    def succeeded(self) -> None:
        if not self._state.down:  # the common case: no lock on the hot path
            return
        with self._lock:
            report = self._state.succeeded(self._clock())
        if report is not None:
            self._log.warning(
                "%s is reachable again after %.0f s, %d failed operations",
                self.what,
                report.seconds,
                report.failures,
                extra={"outage": "ended"},
            )
