"""The bridges' durable queue: one SQLite file in the data directory (blocking; one thread).

A message is inserted and committed before the device's PUBACK is sent, and deleted only
after the upstream's PUBACK. Commits are grouped: whatever arrived while the previous commit
ran goes into the next transaction, so a burst costs one fsync, not one per message. WAL with
``synchronous=FULL``: a committed message survives a killed process and a power cut (as far as
the disk honours fsync).

Schema::

    outbox(seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- global order, never reused
           bridge, topic, payload, retain, properties, enqueued_at)
    meta(key PRIMARY KEY, value)  -- origin: this broker's loop-prevention id;
                                  -- sent:<bridge>: highest seq written to that upstream
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import NamedTuple

from broker.bridge.queue import Queued

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        bridge TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        retain INTEGER NOT NULL,
        properties BLOB NOT NULL,
        enqueued_at REAL NOT NULL)""",
    # Rows are found by seq ranges (the primary key) and filtered by bridge; a (bridge, seq)
    # index (earlier versions) cost a second B-tree insert and delete per message.
    "DROP INDEX IF EXISTS outbox_by_bridge",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_INSERT_CHUNK = 128
"""Rows per INSERT statement. One statement for many rows is one sqlite3_step: the queue
thread gives up and takes back the GIL once per statement, not once per row, and while the
event loop is busy each take can wait up to the interpreter's switch interval (5 ms)."""


_INSERTS = [
    "INSERT INTO outbox (bridge, topic, payload, retain, properties, enqueued_at) VALUES "  # noqa: S608 (placeholders only)
    + ", ".join(["(?, ?, ?, ?, ?, ?)"] * rows)
    for rows in range(_INSERT_CHUNK + 1)
]
_DELETE_RANGE = "DELETE FROM outbox WHERE seq >= ? AND seq < ? AND bridge = ?"

Row = tuple[str, str, bytes, int, bytes, float]
"""bridge, topic, payload, retain, properties (MQTT 5 encoding), enqueued_at: one outbox row.
``retain`` is 0 or 1: sqlite3 binds an ``int`` directly, while for a ``bool`` it first looks for
an adapter and raises (and clears) an AttributeError, about 0.4 µs per row."""


class NewMessage(NamedTuple):
    """A message to store for ``bridge``; the store assigns its sequence number."""

    bridge: str
    topic: str
    payload: bytes
    retain: int  # 0 or 1, as in Row
    properties: bytes  # encode_properties() output
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class Acked:
    """Acknowledged messages of one bridge to delete: every one of its rows with
    ``start <= seq < below``, and the sequence numbers ``single`` (acknowledged out of order,
    above an unacknowledged one)."""

    bridge: str
    start: int
    below: int
    single: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the store holds for one bridge at start-up."""

    messages: int
    size: int
    last_seq: int
    oldest: float | None
    sent_to: int


def message_size(message: Row) -> int:
    """What a message counts against ``queue_max_bytes``: topic, payload and properties."""
    return len(message[1].encode()) + len(message[2]) + len(message[4])


class QueueStore:
    """The SQLite file; every method blocks, so the broker calls them from one worker thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, cached_statements=256
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        for statement in _SCHEMA:
            self._db.execute(statement)
        self.origin = self._origin()

    def _origin(self) -> str:
        """This broker's id in origin markers: random, made once, kept with the queue."""
        row = self._db.execute("SELECT value FROM meta WHERE key = 'origin'").fetchone()
        if row is not None:
            return str(row[0])
        origin = uuid.uuid4().hex[:16]
        self._db.execute("INSERT INTO meta (key, value) VALUES ('origin', ?)", (origin,))
        return origin

    def close(self) -> None:
        self._db.close()

    def write(
        self, messages: Sequence[Row], acked: Sequence[Acked], sent_to: dict[str, int]
    ) -> int:
        """One transaction: insert ``messages``, delete the ``acked`` rows, record
        ``sent_to``. Returns the sequence number of the first message inserted (the others
        follow it, consecutively, in order); 0 when there were none."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            first = 0
            for at in range(0, len(messages), _INSERT_CHUNK):
                chunk = messages[at : at + _INSERT_CHUNK]
                cursor = db.execute(_INSERTS[len(chunk)], list(chain.from_iterable(chunk)))
                if not first:  # one writer: this transaction's rows are consecutive
                    assert cursor.lastrowid is not None
                    first = cursor.lastrowid - len(chunk) + 1
            for done in acked:
                if done.below > done.start:
                    db.execute(_DELETE_RANGE, (done.start, done.below, done.bridge))
                if done.single:
                    db.executemany(
                        "DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in done.single]
                    )
            for bridge, seq in sent_to.items():
                db.execute(
                    "INSERT INTO meta (key, value) VALUES (?, ?) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (f"sent:{bridge}", str(seq)),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        return first

    def backlog(self, bridge: str) -> Backlog:
        row = self._db.execute(
            "SELECT count(*), coalesce(sum(length(CAST(topic AS BLOB)) + length(payload) "
            "+ length(properties)), 0), coalesce(max(seq), 0), min(enqueued_at) "
            "FROM outbox WHERE bridge = ?",
            (bridge,),
        ).fetchone()
        sent = self._db.execute(
            "SELECT value FROM meta WHERE key = ?", (f"sent:{bridge}",)
        ).fetchone()
        return Backlog(int(row[0]), int(row[1]), int(row[2]), row[3], int(sent[0]) if sent else 0)

    def load(self, bridge: str, after: int, limit: int, sent_to: int) -> list[Queued]:
        """Up to ``limit`` messages of ``bridge`` after sequence number ``after``, in order;
        those at or below ``sent_to`` were written upstream before and count as resends."""
        rows = self._db.execute(
            "SELECT seq, topic, payload, retain, properties, enqueued_at FROM outbox "
            "WHERE seq > ? AND bridge = ? ORDER BY seq LIMIT ?",
            (after, bridge, limit),
        ).fetchall()
        return [
            Queued(
                seq,
                topic,
                payload,
                bool(retain),
                props,
                enqueued_at,
                len(topic.encode()) + len(payload) + len(props),
                seq <= sent_to,
            )
            for seq, topic, payload, retain, props, enqueued_at in rows
        ]
