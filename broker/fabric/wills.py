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

Costs: one KV write per connect with a will and one per disconnect (batched up to
:data:`BATCH` in flight), one heartbeat per node per second, and on every node an index entry
(~150 bytes) per pending will in the fleet. A will is found within DEAD_AFTER_S + HEARTBEAT_S
of its node's death; a will in the 1-2 ms between a CONNECT and its record's write is lost
with its node.
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


def will_key(client_id: str) -> str:
    """A KV key for any client id (KV keys allow only ``[-/_=.A-Za-z0-9]``)."""
    return (
        base64.urlsafe_b64encode(client_id.encode("utf-8", "surrogatepass")).decode().rstrip("=")
        or "="
    )


def encode_record(
    owner: str, client_id: str, device_id: str, will: Will, due: float | None
) -> bytes:
    """A pending will as ``FG_WILLS`` holds it; ``due`` is wall-clock (None: still connected)."""
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
        # the revision it wrote); (key, CANCEL): delete another node's record as it stands.
        self._ops: deque[tuple[str, bytes]] = deque()
        self._ops_ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._mine: set[str] = set()  # keys whose will this node holds
        self._revisions: dict[str, int] = {}  # key -> revision of this node's last write
        self._index: dict[str, tuple[str, int]] = {}  # every record: key -> (owner, revision)
        self._seen: dict[str, tuple[str, float]] = {}  # node name -> (epoch owner, last change)
        self._claiming: set[str] = set()
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
            record = encode_record(self.owner, session.client_id, session.device_id, will, None)
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
        record = encode_record(self.owner, session.client_id, session.device_id, pending.will, due)
        self._queue(key, record)

    def will_published(self, session: Session) -> None:
        """The core published the session's will: nothing left to keep."""
        key = will_key(session.client_id)
        if key in self._mine:
            self._queue(key, DROP)

    def _queue(self, key: str, op: bytes) -> None:
        if op is DROP or op is CANCEL:
            self._mine.discard(key)
        else:
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
            if op is CANCEL:
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
        """Race the other survivors for the record; the winner publishes the will when due."""
        assert self._kv is not None
        try:
            entry = await self._kv.get(key, revision)
            record = decode_record(entry.value or b"")
            if record is None:
                return
            due = self._wall() + record.delay if record.due is None else record.due
            claim = encode_record(self.owner, record.client_id, record.device_id, record.will, due)
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
        await asyncio.sleep(max(0.0, due - self._wall()))
        if self._revisions.get(key) != won:  # the client came back meanwhile: cancelled
            return
        self.wills_published += 1
        session = Session(record.client_id, record.device_id)
        self._core.publish_will(session, record.will, self._clock())  # drops the record
        self._wake()
