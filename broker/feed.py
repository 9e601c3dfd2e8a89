"""The registry's change feed, as a broker reads it: revocations and policy changes.

``fleetgate device revoke|suspend`` commits a ``DeviceChange`` row in the same transaction as the
state change; ``fleetgate acl set`` and ``device move`` commit one with the group whose ACL now
applies. Every broker sharing the registry polls ``changes_since(cursor)``: it closes a revoked
device's live sessions (``on_change``) and reapplies a changed policy to them (``on_policy``,
with the group's template read in the same poll). The registry is the only channel, so the CLI,
the enrollment service and any number of brokers (on any host that reaches the database) need
no other link, and a policy change reaches sessions within the same latency as a revocation.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError

from broker.metrics import Metrics
from enrollment.registry import AclPatterns, DeviceChange, DeviceState, Registry
from enrollment.registry.outage import RegistryOutage

log = logging.getLogger("fleetgate.broker.feed")

CHANGES_PER_POLL = 1000
REREAD = 32
"""How many ids behind the cursor each poll reads again. PostgreSQL hands out ids before commit,
so two concurrent revocations may commit in the opposite order; a change whose id is below the
cursor when it becomes visible is still read, and ids already seen are skipped."""


@dataclass(frozen=True)
class PolicyChange:
    """A policy change as the feed hands it on: the ACL of ``group`` changed (``device_id`` is
    None) or ``device_id`` moved to ``group``. ``acl`` is that group's template as read in the
    poll that saw the change (None: the group stores none, the broker's default applies); a
    later change is handed on after this one, so a broker converges on the newest."""

    id: int
    device_id: str | None
    group: str
    acl: AclPatterns | None


class RevocationFeed:
    """Polls the registry every ``interval`` seconds and reports each change once."""

    def __init__(
        self,
        registry: Registry,
        metrics: Metrics,
        *,
        interval: float,
        on_change: Callable[[DeviceChange], None],
        on_policy: Callable[[PolicyChange], None] | None = None,
        outage: RegistryOutage | None = None,
    ) -> None:
        self._registry = registry
        self._outage = outage if outage is not None else RegistryOutage(registry.url, log)
        self._metrics = metrics
        self._interval = interval
        self._on_change = on_change
        self._on_policy = on_policy
        self._latest: dict[str, tuple[int, DeviceState]] = {}
        self._policy_ids: dict[str, int] = {}  # "group:G" or "device:D": the latest change's id
        self._seen: set[int] = set()
        self.cursor = 0
        self.last_read = 0.0

    async def start(self) -> None:
        """Begin after the changes already committed: admission covers those."""
        self.cursor = await asyncio.to_thread(self._registry.last_change_id)
        already = await asyncio.to_thread(self._registry.changes_since, self._floor())
        self._seen = {change.id for change in already if change.id is not None}
        self.last_read = asyncio.get_running_loop().time()

    def _floor(self) -> int:
        return max(0, self.cursor - REREAD)

    async def run(self) -> None:
        """Poll until cancelled; a failed poll is counted and retried at the next interval.

        An unreachable registry is logged as an outage (a line when it starts, ends, and once a
        minute), not once per poll."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                read, fresh, acls = await self._read()
            except (SQLAlchemyError, sqlite3.Error) as exc:
                self._metrics.feed_errors += 1
                if not self._outage.failed_with("the change feed poll", exc):
                    log.exception("the registry's change feed could not be read")
                read, fresh, acls = 0, [], {}
            else:
                self._outage.succeeded()
                self.last_read = loop.time()
            for change in fresh:
                assert change.id is not None
                self._seen.add(change.id)
                self.cursor = max(self.cursor, change.id)
                self._hand_on(change, acls)
            self._seen = {i for i in self._seen if i > self._floor()}
            if read < CHANGES_PER_POLL:
                await asyncio.sleep(self._interval)

    def _hand_on(self, change: DeviceChange, acls: dict[str, AclPatterns | None]) -> None:
        assert change.id is not None
        if change.group is not None:
            key = f"device:{change.device_id}" if change.device_id else f"group:{change.group}"
            self._policy_ids[key] = change.id
            if self._on_policy is not None:
                policy = PolicyChange(change.id, change.device_id, change.group, acls[change.group])
                self._on_policy(policy)
        elif change.device_id is not None and change.state is not None:
            self._latest[change.device_id] = (change.id, change.state)
            self._on_change(change)

    async def _read(self) -> tuple[int, list[DeviceChange], dict[str, AclPatterns | None]]:
        """One poll: on the loop from a local SQLite file (~0.05 ms; in a thread the hop cost
        more than the read, ~1.7 % of a core for an idle broker), else in a thread."""
        if self._registry.reads_locally:
            return self._poll()
        return await asyncio.to_thread(self._poll)

    def _poll(self) -> tuple[int, list[DeviceChange], dict[str, AclPatterns | None]]:
        """(rows read, the unseen ones, the template of each group an unseen policy change
        names); the templates are read after the rows, so each is at least as new as its
        change. Blocking."""
        changes = self._registry.changes_since(self._floor(), limit=CHANGES_PER_POLL)
        fresh = [c for c in changes if c.id is not None and c.id not in self._seen]
        groups = {c.group for c in fresh if c.group is not None}
        return len(changes), fresh, {g: self._registry.acl_patterns(g) for g in groups}

    def barred_since(self, device_id: str, cursor: int) -> bool:
        """Whether the feed saw ``device_id`` leave the active state after ``cursor``.

        Closes the race where a revoke commits while that device's admission is being checked:
        the check read the registry before the change, and the kick found no session yet.
        """
        latest = self._latest.get(device_id)
        return latest is not None and latest[0] > cursor and latest[1] != DeviceState.ACTIVE

    def policy_changed_since(self, device_id: str, group: str, cursor: int) -> bool:
        """Whether the feed handed on a policy change for ``device_id`` or ``group`` after
        ``cursor``: an admission read that overlapped it may hold the old ACL, and the change
        found no session to apply to yet, so the admission reads again."""
        return any(
            self._policy_ids.get(key, 0) > cursor
            for key in (f"device:{device_id}", f"group:{group}")
        )
