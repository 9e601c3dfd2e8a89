"""The audit trail's hash chain, without I/O: how a row is hashed and how a run of rows is checked.

Each row commits to the one before it: ``row_hash`` is SHA-256 over a canonical JSON encoding of
the row's fields and ``prev_hash``. Changing, removing or reordering a row breaks every later
link, so a reader who knows the head hash (or finds the links broken) can tell. The encoding is
part of the stored data (registry rows, archive files): it must never change.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

GENESIS = "0" * 64
"""The ``prev_hash`` of the first row a registry ever wrote."""

FIELDS = ("id", "at", "actor", "action", "subject", "outcome", "reason", "request_id")
"""The columns a row's hash covers, besides ``prev_hash``."""


def canonical_time(value: dt.datetime | str) -> str:
    """One spelling of a UTC instant, microseconds included (naive values are UTC)."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def row_hash(row: Mapping[Any, Any], prev_hash: str) -> str:
    """The hash a row with these fields must carry after ``prev_hash``."""
    fields = {name: row[name] for name in FIELDS}
    fields["at"] = canonical_time(row["at"])
    fields["prev_hash"] = prev_hash
    encoded = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    """What walking a run of rows found."""

    checked: int
    """Rows whose links held."""
    head: str
    """The last good row's hash (the starting hash when none was)."""
    broken_id: int | None = None
    problem: str = ""

    @property
    def ok(self) -> bool:
        return self.broken_id is None


def walk(rows: Iterable[Mapping[Any, Any]], start_hash: str) -> ChainCheck:
    """Check ``rows`` (in id order) continue the chain whose last hash is ``start_hash``.

    Stops at the first row that does not follow (a wrong ``prev_hash``: a row before it is
    missing or was changed; or a ``row_hash`` its own fields do not produce) and names it.
    """
    head, checked = start_hash, 0
    for row in rows:
        problem = ""
        if row["prev_hash"] != head:
            problem = "does not link to the row before it"
        elif row["row_hash"] != row_hash(row, head):
            problem = "does not match its hash: it was changed after it was written"
        if problem:
            return ChainCheck(checked, head, row["id"], problem)
        head, checked = row["row_hash"], checked + 1
    return ChainCheck(checked, head)
