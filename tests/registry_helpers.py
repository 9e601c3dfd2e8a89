"""A registry on a fresh database: its schema created as ``fleetgate db upgrade`` creates it.

Opening a :class:`Registry` never creates or changes the schema, so a test that makes its own
database goes through here (the ``config`` fixture copies a session-wide upgraded file instead).
"""

from __future__ import annotations

from enrollment.registry import Registry
from enrollment.registry.schema import upgrade


def new_registry(url: str) -> Registry:
    """Upgrade the (empty or legacy) database at ``url`` to the current schema and open it."""
    upgrade(url)
    return Registry(url)
