"""Retained messages shared by every node (issue 12): one per topic in the stream
``FG_RETAINED``, and a copy of the whole set in each node's memory.

- **Store.** ``FG_RETAINED`` holds subjects ``$FG.r.<subject of the topic>`` with
  ``max_msgs_per_subject = 1``, file storage, the ``[fabric]`` replica count: the last write of
  a topic replaces the one before. An empty payload is written too (a tombstone of ~100 bytes
  that deletes the topic everywhere); nothing else expires from the stream.
- **Read path: a cache in every node, kept current by an ordered consumer on the stream**
  (deliver the last message per subject at start, then every new one, in stream order). A
  SUBSCRIBE then costs what it costs in the embedded broker (a walk of the local trie, no I/O),
  and a filter with wildcards needs no server-side search. Reading on subscribe instead would
  cost a JetStream request per SUBSCRIBE (~300 µs of nats-py CPU and ~1 ms on R3 for a direct
  get, measured in ../shared/fabric/NOTES.md §4) and, for ``#`` or ``+`` filters, a consumer
  per SUBSCRIBE (an ephemeral consumer: several ms); a fleet reconnecting after an outage
  subscribes once per device. The cache costs memory on every node (the trie, the same as
  the embedded broker's) and one consumer receive per retained write (8.5-20 µs), both bounded
  by the per-device retained limits. Measured here: see docs/architecture.md "Fabric".
- **Write.** A local retained PUBLISH (or retained will) updates the local trie at once, then
  goes to the stream (JetStream publish with acknowledgement, resent with the same
  ``Nats-Msg-Id`` until stored or 30 s passed). The consumer brings every write back in stream
  order, this node's own included, so all caches converge on the stream's order. The device's
  PUBACK waits for ``FG_MSGS`` (:mod:`broker.fabric.durable`), not for ``FG_RETAINED``: a node
  killed in the millisecond between them loses that retained update.
- **Limits.** Each record names its owner (the device that set it) and the retained limits
  (:func:`broker.limits.retained_excess`) count from the cache, so they are **cluster-wide**:
  a device's retained messages on every node count against one quota. Two nodes accepting
  writes of one device at the same instant can each pass the check (the caches converge a
  millisecond later); the excess is then at most one message per node.
- **Expiry.** The MQTT 5 message expiry travels as a wall-clock deadline (``Fg-Expires-At``,
  Unix seconds), so a node that loads the message later (after a restart) gives it only the
  time that is left; an expired message is not loaded.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from broker.fabric.subjects import Unmappable, topic_to_subject
from broker.routing import Message, RetainedMessages

if TYPE_CHECKING:
    from nats.aio.msg import Msg
    from nats.js.client import JetStreamContext

log = logging.getLogger("fleetgate.fabric.retained")

STREAM = "FG_RETAINED"
PREFIX = "$FG.r."
OWNER_HEADER = "Fg-Owner"
EXPIRES_AT_HEADER = "Fg-Expires-At"
GIVE_UP_S = 30.0


def retained_headers(
    message: Message, owner: str, now: float, wall: float, base: dict[str, str] | None
) -> dict[str, str]:
    """What a stored record carries besides the payload: ``base`` (the QoS and properties, as
    on core NATS) without the relative expiry, the owner, and the wall-clock expiry."""
    headers = {k: v for k, v in (base or {}).items() if k != "Fg-Expiry"}
    headers[OWNER_HEADER] = owner
    if message.expires_at is not None:
        headers[EXPIRES_AT_HEADER] = f"{wall + (message.expires_at - now):.3f}"
    return headers


class FabricRetained(RetainedMessages):
    """The core's retained store in fabric mode: what the core stores also goes to the
    stream; what the stream says (:meth:`apply`) is what every node ends up holding."""

    def __init__(
        self,
        node: str,
        *,
        clock: Callable[[], float],
        headers: Callable[[Message, float], dict[str, str] | None],
        decode: Callable[[str, bytes, dict[str, str] | None, float], Message | None],
        wall: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        self.node = node
        self._clock = clock
        self._wall = wall
        self._headers = headers
        self._decode = decode
        self._writes: deque[tuple[str, bytes, dict[str, str]]] = deque()
        self._ready = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._loaded = asyncio.Event()
        self._follow: Any = None  # the ordered consumer's subscription
        self._load_until = 0
        self._written = 0
        self._epoch = secrets.token_hex(6)  # ids stay unique across restarts
        self.stored = 0
        self.applied = 0
        self.not_stored = 0

    # -- the core's side -------------------------------------------------------------------------

    def store(self, message: Message, owner: str = "") -> None:
        """Keep it here now, and in the stream for every node."""
        super().store(message, owner)
        try:
            subject = PREFIX + topic_to_subject(message.topic)
        except Unmappable:  # refused before it got here (fabric mode); never stored remotely
            return
        now = self._clock()
        headers = retained_headers(message, owner, now, self._wall(), self._headers(message, now))
        self._written += 1
        headers["Nats-Msg-Id"] = f"{self.node}.r.{self._epoch}.{self._written}"
        self._writes.append((subject, message.payload, headers))
        self._idle.clear()
        self._ready.set()

    # -- the stream's side -----------------------------------------------------------------------

    def apply(self, subject: str, payload: bytes, headers: dict[str, str] | None) -> None:
        """One record of the stream, in stream order: the topic's message now."""
        self.applied += 1
        now = self._clock()
        fields = dict(headers or {})
        owner = fields.pop(OWNER_HEADER, "")
        expires_at = fields.pop(EXPIRES_AT_HEADER, None)
        message = self._decode(subject[len(PREFIX) :], payload, fields, now)
        if message is None:
            return
        message = replace(message, retain=True)
        if expires_at is not None:
            try:
                left = float(expires_at) - self._wall()
            except ValueError:
                return
            message = replace(message, expires_at=now + left)
            if left <= 0:  # expired while stored: as good as deleted
                message = replace(message, payload=b"")
        RetainedMessages.store(self, message, owner)

    async def start(self, js: JetStreamContext, replicas: int, timeout: float) -> None:
        """Create the stream if needed, load what it holds, then keep following it."""
        from nats.js.api import DeliverPolicy, StorageType, StreamConfig

        from broker.fabric.streams import ensure_stream

        info = await ensure_stream(
            js,
            StreamConfig(
                name=STREAM,
                subjects=[PREFIX + ">"],
                storage=StorageType.FILE,
                num_replicas=replicas,
                max_msgs_per_subject=1,
                allow_direct=True,
            ),
            timeout,
        )
        self._load_until = info.state.last_seq
        if info.state.messages == 0:
            self._loaded.set()
        self._follow = await js.subscribe(
            PREFIX + ">",
            cb=self._on_record,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        await asyncio.wait_for(self._loaded.wait(), timeout)

    async def _on_record(self, msg: Msg) -> None:
        self.apply(msg.subject, msg.data, msg.headers)
        if msg.metadata.sequence.stream >= self._load_until:
            self._loaded.set()

    async def write(self, js: JetStreamContext) -> None:
        """Send the queued writes in order, each until the stream has it (or gives up)."""
        while True:
            await self._ready.wait()
            self._ready.clear()
            while self._writes:
                subject, payload, headers = self._writes[0]
                if await self._publish(js, subject, payload, headers):
                    self.stored += 1
                else:
                    self.not_stored += 1
                    log.error(
                        "retained message on %s not stored in %s within %.0f s",
                        subject,
                        STREAM,
                        GIVE_UP_S,
                        extra={"node": self.node},
                    )
                self._writes.popleft()
            self._idle.set()

    async def _publish(
        self, js: JetStreamContext, subject: str, payload: bytes, headers: dict[str, str]
    ) -> bool:
        deadline = self._clock() + GIVE_UP_S
        while True:
            try:
                await js.publish(subject, payload, headers=headers, timeout=1.0)
                return True
            except Exception as exc:  # no leader yet, link down: same Nats-Msg-Id again
                if self._clock() >= deadline:
                    log.debug("retained write failed: %s", exc)
                    return False
                await asyncio.sleep(0.2)

    async def stop(self, timeout: float) -> None:
        """Wait (bounded) until the queued writes are in the stream, then stop following it."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), timeout)
        if self._follow is not None:
            with contextlib.suppress(Exception):  # a link already down has nothing to undo
                await self._follow.unsubscribe()


def families(retained: FabricRetained | None) -> list[tuple[str, str, str, Any]]:
    """The retained figures for the node's /metrics."""
    if retained is None:
        return []
    return [
        (
            "fabric_retained_stored_total",
            "counter",
            f"Retained writes {STREAM} acknowledged.",
            retained.stored,
        ),
        (
            "fabric_retained_not_stored_total",
            "counter",
            f"Retained writes given up on ({STREAM} unreachable for {GIVE_UP_S:.0f} s).",
            retained.not_stored,
        ),
        (
            "fabric_retained_applied_total",
            "counter",
            f"Records of {STREAM} applied to this node's retained set.",
            retained.applied,
        ),
    ]
