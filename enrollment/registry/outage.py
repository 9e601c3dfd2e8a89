"""The registry's outages, logged as a few lines each (see :mod:`fleetgate.outage`).

One :class:`RegistryOutage` per process and registry, shared by everything that reads or writes
it (the broker's change feed, its admission reads, the audit writer), so an outage is announced
once, not once per caller.
"""

from __future__ import annotations

import logging

from enrollment.registry.engine import display_url, failure_cause, unreachable
from fleetgate.outage import REPORT_INTERVAL_S, OutageLog


class RegistryOutage(OutageLog):
    def __init__(
        self, url: str, log: logging.Logger, *, interval: float = REPORT_INTERVAL_S
    ) -> None:
        super().__init__(log, f"the registry at {display_url(url)}", interval=interval)

    def failed_with(self, operation: str, exc: BaseException) -> bool:
        """Count ``exc`` towards the outage if it means the registry is unreachable; False for
        any other failure (a refused statement), which the caller reports itself."""
        if not unreachable(exc):
            return False
        self.failed(operation, failure_cause(exc))
        return True
