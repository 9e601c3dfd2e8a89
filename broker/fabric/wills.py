"""Wills that outlive their node (issue 12): a device's will is published even when the broker
node it was connected to is killed, by exactly one surviving node.

A will whose node is alive needs nothing from here: the core publishes it (now, or after its
delay) and the fabric carries it to every node like any message (``BrokerCore.will_gate``).

- **Liveness.** Every node writes its key in the KV bucket ``FG_NODES`` every
  :data:`HEARTBEAT_S` (value: the process's random epoch), and watches the bucket. A node
  whose key has not changed for :data:`DEAD_AFTER_S` is dead; so is any node *process* whose
  name now heartbeats with another epoch (it was restarted: its old connections are gone).
  The bucket's TTL drops keys of nodes gone for good.
- **Pending wills.** Each node keeps one record per will it holds in the KV bucket
  ``FG_WILLS``, keyed by the client id (base64url): the will, its delay, the device, and the
  owner (``<node>.<epoch>``). Written when a client connects with a will, rewritten with a
  wall-clock due time when it drops and the will waits for its delay, deleted when the will is
  published, cancelled (clean DISCONNECT, a kick, a resumption) or replaced. A delete is a
  compare-and-swap on the revision this node wrote, so a stale delete cannot remove the record
  another node wrote after the device moved there. A client that connects without a will
  deletes any record left for its id (a reconnection cancels the will, MQTT 3.1.2.5).
- **Claim.** Every node watches ``FG_WILLS`` (an index of key -> owner and revision). Once a
  record's owner is dead, each survivor tries ``update(key, claimed, last=revision)``: the
  compare-and-swap lets exactly one win; it publishes the will when it is due (the will delay
  counts from the claim for a device that was still connected when its node died), through
  the core, so retained wills and the fabric gate work as for any will, then deletes the
  record.
- **Will and session together** (MQTT 5 3.1.2.5: the will goes when its delay elapses or its
  session ends, whichever is first; a resumption before then cancels it). The reference from
  a will to its session is the client id plus the session expiry the record carries
  (``expiry``; 0: a clean session, ended with its connection): a will with ``expiry > 0``
  belongs to the ``FG_SESSIONS`` record :func:`broker.fabric.records.record_key` names. Not
  a revision: the session record is rewritten every checkpoint, and what the will needs from
  it is only when the session ends (away since + expiry) or whether it lives elsewhere. The
  claiming survivor reads it (:meth:`WillKeeper._due`): still marked connected on the dead
  node, it is marked away from the claim, so expiry and delay count from one instant; gone,
  the session ended. A resumption anywhere rewrites or deletes the will record, which
  cancels a claim waiting for its time; the claim's last step is a compare-and-swap delete,
  so a resumption that got there first wins. A session that ends instead (swept as expired,
  or replaced by a new session: :meth:`WillKeeper.session_ended`, called by
  :mod:`broker.fabric.sessions`) publishes a claimed will at once; a dead node's will not yet
  claimed goes to whichever node's compare-and-swap delete wins (``END``). Exactly once:
  every publication follows a won compare-and-swap, or is the live holder's own.

Costs: one KV write per connect with a will and one per disconnect (batched up to
:data:`BATCH` in flight), one heartbeat per node per second, and on every node an index entry
(~150 bytes) per pending will in the fleet. A will is found within DEAD_AFTER_S + HEARTBEAT_S
of its node's death; a will in the 1-2 ms between a CONNECT and its record's write is lost
with its node, and so is one whose client starts a new session elsewhere before any survivor
has found the node dead (the new connection replaces the record unclaimed).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from broker.fabric.records import SessionRecord, record_key
from broker.mqtt import NO_PROPERTIES, QoS, Will
from broker.mqtt._wire import Reader
from broker.mqtt.errors import ProtocolError
from broker.mqtt.properties import WILL, decode_properties, encode_properties
from broker.session import Session

if TYPE_CHECKING:
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

    from broker.core import BrokerCore

log = logging.getLogger("fleetgate.fabric.wills")

NODES_BUCKET = "FG_NODES"
WILLS_BUCKET = "FG_WILLS"
HEARTBEAT_S = 1.0
DEAD_AFTER_S = 5.0
NODES_TTL_S = 24 * 3600.0
BATCH = 64
DROP = b"drop"
CANCEL = b"cancel"
END = b"end"


def will_key(client_id: str) -> str:
    """A KV key for any client id (KV keys allow only ``[-/_=.A-Za-z0-9]``)."""
    return (
        base64.urlsafe_b64encode(client_id.encode("utf-8", "surrogatepass")).decode().rstrip("=")
        or "="
    )


def encode_record(
    owner: str, client_id: str, device_id: str, will: Will, due: float | None, expiry: int = 0
) -> bytes:
    """A pending will as ``FG_WILLS`` holds it; ``due`` is wall-clock (None: still connected),
    ``expiry`` the session expiry interval of the session it belongs to (0: a clean session,
    which ends with its connection)."""
    props = will.properties
    return json.dumps(
        {
            "owner": owner,
            "client": client_id,
            "device": device_id,
            "topic": will.topic,
            "payload": base64.b64encode(will.payload).decode(),
            "qos": int(will.qos),
            "retain": will.retain,
            "props": base64.b64encode(encode_properties(props)).decode()
            if props is not NO_PROPERTIES
            else "",
            "delay": props.will_delay_interval or 0,
            "due": due,
            "expiry": expiry,
        }
    ).encode()


def client_from_key(key: str) -> str | None:
    """The client id :func:`will_key` made ``key`` from."""
    if key == "=":
        return ""
    try:
        raw = base64.urlsafe_b64decode(key + "=" * (-len(key) % 4))
        return raw.decode("utf-8", "surrogatepass")
    except ValueError:
        return None


@dataclass(frozen=True)
class Record:
    owner: str
    client_id: str
    device_id: str
    will: Will
    delay: int
    due: float | None
    expiry: int = 0

    def session_key(self) -> str | None:
        """The ``FG_SESSIONS`` key of the session this will belongs to (None: a clean one)."""
        return record_key(self.client_id) if self.expiry else None


def decode_record(data: bytes) -> Record | None:
    try:
        body = json.loads(data)
        props = NO_PROPERTIES
        if body["props"]:
            raw = base64.b64decode(body["props"], validate=True)
            props = decode_properties(Reader(raw), WILL)
        will = Will(
            topic=str(body["topic"]),
            payload=base64.b64decode(body["payload"], validate=True),
            qos=QoS(int(body["qos"])),
            retain=bool(body["retain"]),
            properties=props,
        )
        due = body.get("due")
        return Record(
            str(body["owner"]),
            str(body["client"]),
            str(body["device"]),
            will,
            int(body["delay"]),
            None if due is None else float(due),
            int(body.get("expiry", 0)),
        )
    except (ValueError, KeyError, TypeError, ProtocolError):
        return None


class WillKeeper:
    """This node's pending wills in ``FG_WILLS``, and the dead nodes' wills it claims."""

    def __init__(
        self,
        node: str,
        core: BrokerCore,
        *,
        wake: Callable[[], None],
        clock: Callable[[], float],
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.node = node
        self.owner = f"{node}.{secrets.token_hex(6)}"
        self._core = core
        self._wake = wake
        self._clock = clock
        self._wall = wall
        # (key, record): put it; (key, DROP): delete this node's record (a compare-and-swap on
        # the revision it wrote); (key, CANCEL): delete another node's record as it stands;
        # (key, END): the session ended, publish a dead node's will now if still there.
        self._ops: deque[tuple[str, bytes]] = deque()
        self._ops_ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._mine: set[str] = set()  # keys whose will this node holds
        self._revisions: dict[str, int] = {}  # key -> revision of this node's last write
        self._index: dict[str, tuple[str, int]] = {}  # every record: key -> (owner, revision)
        self._seen: dict[str, tuple[str, float]] = {}  # node name -> (epoch owner, last change)
        self._claiming: set[str] = set()
        # Claimed wills waiting for their time: key -> (record, the claim's revision, wake-up).
        self._waiting: dict[str, tuple[Record, int, asyncio.Event]] = {}
        self.sessions_kv: KeyValue | None = None  # FG_SESSIONS, once the session store runs
        self._publishing: Session | None = None  # the claimed will the core is publishing
        self._tasks: list[asyncio.Task[None]] = []
        self._watchers: list[Any] = []
        self._kv: KeyValue | None = None
        self.dead_after_s = DEAD_AFTER_S
        self.claimed = 0
        self.wills_published = 0

    # -- the core's side -------------------------------------------------------------------------

    def connected(self, session: Session, will: Will | None) -> None:
        """A client connected (with ``will``, or without one, which cancels any left)."""
        key = will_key(session.client_id)
        if will is not None:
            record = encode_record(
                self.owner,
                session.client_id,
                session.device_id,
                will,
                None,
                session.expiry_interval,
            )
            self._queue(key, record)
        elif key in self._mine:
            self._queue(key, DROP)
        elif key in self._index:
            self._queue(key, CANCEL)

    def waiting(self, session: Session) -> None:
        """The client is gone: its will waits for its delay, or there is none to keep."""
        key = will_key(session.client_id)
        pending = session.pending_will
        if pending is None:
            if key in self._mine:
                self._queue(key, DROP)
            return
        due = self._wall() + (pending.due - self._clock())
        record = encode_record(
            self.owner,
            session.client_id,
            session.device_id,
            pending.will,
            due,
            session.expiry_interval,
        )
        self._queue(key, record)

    def will_published(self, session: Session) -> None:
        """The core published the session's will: nothing left to keep (a claimed will's
        record is already gone: :meth:`_claim` deleted it first)."""
        key = will_key(session.client_id)
        if key in self._mine and session is not self._publishing:
            self._queue(key, DROP)

    def _queue(self, key: str, op: bytes) -> None:
        if op is DROP or op is CANCEL:
            self._mine.discard(key)
        elif op is not END:
            self._mine.add(key)
        self._ops.append((key, op))
        self._idle.clear()
        self._ops_ready.set()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self, js: JetStreamContext, replicas: int, timeout: float) -> None:
        from broker.fabric.streams import ensure_bucket, until

        nodes = await ensure_bucket(js, NODES_BUCKET, replicas, NODES_TTL_S, timeout)
        self._kv = await ensure_bucket(js, WILLS_BUCKET, replicas, None, timeout)
        # A bucket just made by another node may have no leader yet (no responders).
        await until(
            f"KV bucket {NODES_BUCKET}", lambda: nodes.put(self.node, self.owner.encode()), timeout
        )
        for kv, follow in ((nodes, self._follow_nodes), (self._kv, self._follow_wills)):
            watcher = await kv.watchall()
            self._watchers.append(watcher)
            self._tasks.append(asyncio.get_running_loop().create_task(follow(watcher)))
        loop = asyncio.get_running_loop()
        self._tasks += [
            loop.create_task(self._heartbeat(nodes)),
            loop.create_task(self._write()),
        ]

    async def stop(self, timeout: float) -> None:
        """Write what is queued (bounded: the records of a clean stop's closed sessions go),
        then stop."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for watcher in self._watchers:
            with contextlib.suppress(Exception):
                await watcher.stop()

    # -- writing this node's records -------------------------------------------------------------

    async def _write(self) -> None:
        """Apply the queued puts and deletes in order; up to BATCH distinct keys at once."""
        while True:
            await self._ops_ready.wait()
            self._ops_ready.clear()
            while self._ops:
                batch: dict[str, bytes] = {}
                while self._ops and self._ops[0][0] not in batch and len(batch) < BATCH:
                    key, op = self._ops.popleft()
                    batch[key] = op
                await asyncio.gather(*(self._apply(k, op) for k, op in batch.items()))
            self._idle.set()

    async def _apply(self, key: str, op: bytes) -> None:
        assert self._kv is not None
        try:
            if op is END:
                await self._end(key)
            elif op is CANCEL:
                await self._kv.delete(key)
            elif op is DROP:
                revision = self._revisions.pop(key, None)
                if revision is not None:  # else its write failed: nothing of ours to delete
                    await self._kv.delete(key, last=revision)
            else:
                self._revisions[key] = await self._kv.put(key, op)
        except Exception as exc:  # a newer record of another node, or the link is down
            log.debug("will record %s not changed: %s", key, exc)

    async def _heartbeat(self, nodes: KeyValue) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            try:
                await nodes.put(self.node, self.owner.encode())
            except Exception as exc:
                log.warning("fabric heartbeat failed: %s", exc, extra={"node": self.node})
            self._claim_orphans()

    # -- following the buckets -------------------------------------------------------------------

    async def _follow_nodes(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None or entry.value is None or entry.operation is not None:
                continue
            self._seen[entry.key] = (entry.value.decode(), self._clock())

    async def _follow_wills(self, watcher: Any) -> None:
        async for entry in watcher:
            if entry is None:
                continue
            key = entry.key
            record = None
            if entry.operation is None and entry.value:  # else deleted or purged
                record = decode_record(entry.value)
            if record is None:
                self._index.pop(key, None)
            else:
                self._index[key] = (record.owner, entry.revision or 0)
            if key in self._revisions and (record is None or record.owner != self.owner):
                # Another node took the client over (or cancelled the will): not ours now.
                self._mine.discard(key)
                self._revisions.pop(key, None)
                self._cancel_waiting(key)
                if (claimed := self._waiting.pop(key, None)) is not None:  # cancelled
                    claimed[2].set()

    def _cancel_waiting(self, key: str) -> None:
        """The client reconnected on another node while its will waited for its delay here:
        the resumption cancels it (MQTT 3.1.3.2.2), as on one node."""
        client_id = client_from_key(key)
        session = self._core.sessions.get(client_id) if client_id is not None else None
        if session is not None and session.connection is None:
            session.pending_will = None

    def _alive(self, owner: str) -> bool:
        """Whether ``owner`` (``<node>.<epoch>``) is a node process that still heartbeats."""
        if owner == self.owner:
            return True
        name = owner.rsplit(".", 1)[0]
        now = self._clock()
        seen = self._seen.get(name)
        if seen is None:  # never heard of since this node started: give it time to show up
            self._seen[name] = (owner, now)
            return True
        current, at = seen
        return current == owner and now - at < self.dead_after_s

    def _claim_orphans(self) -> None:
        for key, (owner, revision) in list(self._index.items()):
            if key in self._claiming or key in self._mine or self._alive(owner):
                continue
            self._claiming.add(key)
            asyncio.get_running_loop().create_task(self._claim(key, revision))

    async def _claim(self, key: str, revision: int) -> None:
        """Race the other survivors for the record; the winner publishes the will when due:
        at its delay or at its session's end, the sooner (:meth:`_due`)."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(key, revision)
            record = decode_record(entry.value or b"")
            if record is None:
                return
            due = await self._due(record)
            if due is None:  # its session resumed on another node: that cancels the will
                await self._kv.delete(key, last=revision)
                return
            claim = encode_record(
                self.owner,
                record.client_id,
                record.device_id,
                record.will,
                due,
                record.expiry,
            )
            won = await self._kv.update(key, claim, last=revision)
        except Exception as exc:  # another survivor won, or the record changed
            log.debug("will %s not claimed: %s", key, exc)
            return
        finally:
            self._claiming.discard(key)
        self.claimed += 1
        self._mine.add(key)
        self._revisions[key] = won
        log.warning(
            "claimed the will of a client whose node is gone",
            extra={"node": self.node, "client": record.client_id, "from": record.owner},
        )
        wake = asyncio.Event()
        self._waiting[key] = (record, won, wake)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(wake.wait(), max(0.0, due - self._wall()))
        if self._waiting.pop(key, None) is None or self._revisions.get(key) != won:
            return  # the client came back (cancelled), or its session ended (published)
        self._mine.discard(key)
        self._revisions.pop(key, None)
        try:  # exactly once: a resumption that rewrote the record since wins
            await self._kv.delete(key, last=won)
        except Exception as exc:
            log.debug("will %s not published: %s", key, exc)
            return
        self._publish(record, mine=False)

    def _publish(self, record: Record, *, mine: bool) -> None:
        """Publish a claimed will through the core; ``mine``: its record is still this
        node's to delete (DROP), else it is gone already."""
        self.wills_published += 1
        session = Session(record.client_id, record.device_id)
        if not mine:
            self._publishing = session
        try:
            self._core.publish_will(session, record.will, self._clock())
        finally:
            self._publishing = None
        self._wake()

    async def _end(self, key: str) -> None:
        """The session of a dead node's will ended before a survivor claimed it: whichever
        node deletes the record (compare-and-swap) publishes the will, once."""
        assert self._kv is not None
        entry = await self._kv.get(key)
        record = decode_record(entry.value or b"")
        if record is None or self._alive(record.owner) or key in self._mine:
            return
        await self._kv.delete(key, last=entry.revision)
        self.claimed += 1
        self._publish(record, mine=False)

    async def _due(self, record: Record) -> float | None:
        """Wall-clock time a claimed will is due: its delay (from the claim, for a client that
        was connected when its node died) or its session's end, the sooner; None if the
        session is live on another node (it resumed: the will is not this node's to settle).

        The session's end is read from its ``FG_SESSIONS`` record (:meth:`Record.session_key`):
        away since + expiry. A record still marked connected on the dead node is marked away
        from now (compare-and-swap, as the session sweep does), so the session's expiry and
        the will count from the same instant; a record gone means the session ended (the
        sweep removed it): due now. A clean session ended with its node: due now."""
        import nats.js.errors

        now = self._wall()
        due = now + record.delay if record.due is None else record.due
        key = record.session_key()
        if key is None:
            return min(due, now)
        kv = self.sessions_kv
        if kv is None:  # no session store (it failed to start): the will's own delay
            return min(due, now + record.expiry)
        try:
            entry = await kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return now
        session = SessionRecord.decode(entry.value or b"")
        if session is None:
            return due
        dead = record.owner.rsplit(".", 1)[0]
        if session.away_since is None:
            if session.node != dead:
                return None
            seen = self._seen.get(dead)
            if seen is not None and seen[0] != record.owner:
                # Restarted under its name: it may hold the session again (the sweep asks it).
                return min(due, now + record.expiry)
            session.away_since = now
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await kv.update(key, session.encode(), last=entry.revision)
        ends = session.ends_at()
        return due if ends is None else min(due, ends)

    def session_ended(self, client_id: str) -> None:
        """A session ended in the fabric (the sweep deleted its expired record, or its client
        started a new one): a will of a dead node's client still waiting for it is due now
        (MQTT 5 3.1.2.5). A live node holding the session settles its will itself.

        Claimed here: published at once, its record deleted by the ordered writes (before a
        new connection's record of the same client). Not claimed yet: an ``END`` write, in
        the same order, races the other nodes by compare-and-swap."""
        key = will_key(client_id)
        waiting = self._waiting.pop(key, None)
        if waiting is not None:
            record, _, wake = waiting
            wake.set()
            self._publish(record, mine=True)  # the core's will_published queues the DROP
            return
        entry = self._index.get(key)
        if entry is not None and not self._alive(entry[0]):
            self._queue(key, END)
