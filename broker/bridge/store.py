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
from dataclasses import dataclass
from pathlib import Path

from broker.bridge.queue import Queued
from broker.mqtt import NO_PROPERTIES, PacketType, Properties
from broker.mqtt._wire import Reader
from broker.mqtt.properties import decode_properties

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS outbox (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        bridge TEXT NOT NULL,
        topic TEXT NOT NULL,
        payload BLOB NOT NULL,
        retain INTEGER NOT NULL,
        properties BLOB NOT NULL,
        enqueued_at REAL NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS outbox_by_bridge ON outbox (bridge, seq)",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
)
_INSERT = (
    "INSERT INTO outbox (bridge, topic, payload, retain, properties, enqueued_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(frozen=True, slots=True)
class NewMessage:
    """A message to store for ``bridge``; the store assigns its sequence number."""

    bridge: str
    topic: str
    payload: bytes
    retain: bool
    properties: bytes  # encode_properties() output
    enqueued_at: float


@dataclass(frozen=True, slots=True)
class Backlog:
    """What the store holds for one bridge at start-up."""

    messages: int
    size: int
    last_seq: int
    oldest: float | None
    sent_to: int


def message_size(message: NewMessage) -> int:
    """What a message counts against ``queue_max_bytes``: topic, payload and properties."""
    return len(message.topic.encode()) + len(message.payload) + len(message.properties)


class QueueStore:
    """The SQLite file; every method blocks, so the broker calls them from one worker thread."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
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
        self, messages: list[NewMessage], done: list[int], sent_to: dict[str, int]
    ) -> list[int]:
        """One transaction: insert ``messages`` (their sequence numbers are returned, in
        order), delete the acknowledged sequence numbers ``done``, record ``sent_to``."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            seqs: list[int] = []
            if messages:
                db.executemany(
                    _INSERT,
                    [
                        (m.bridge, m.topic, m.payload, int(m.retain), m.properties, m.enqueued_at)
                        for m in messages
                    ],
                )
                row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'outbox'").fetchone()
                last = int(row[0])  # one writer: this transaction's rows are consecutive
                seqs = list(range(last - len(messages) + 1, last + 1))
            if done:
                db.executemany("DELETE FROM outbox WHERE seq = ?", [(seq,) for seq in done])
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
        return seqs

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
            "WHERE bridge = ? AND seq > ? ORDER BY seq LIMIT ?",
            (bridge, after, limit),
        ).fetchall()
        return [
            Queued(
                seq=seq,
                topic=topic,
                payload=bytes(payload),
                retain=bool(retain),
                properties=_decode(bytes(props)),
                enqueued_at=enqueued_at,
                size=len(topic.encode()) + len(payload) + len(props),
                sent=seq <= sent_to,
            )
            for seq, topic, payload, retain, props, enqueued_at in rows
        ]


def _decode(blob: bytes) -> Properties:
    if blob == b"\x00":
        return NO_PROPERTIES
    return decode_properties(Reader(blob), PacketType.PUBLISH)
