"""The bridges of one broker: the publish gate, the durable queue's group commit, the links.

Out: a device PUBLISH whose topic an out rule matches is routed locally at once, but its
PUBACK waits until the message is committed to the queue file (``GateVerdict.HOLD``). Whatever
arrives while one commit runs goes into the next, on one worker thread. In: a message from the
upstream is renamed by the first matching in rule, checked against the bridge's own local ACL
(group ``local_group``, ``%d`` = the bridge name) and published as the bridge; it is never
forwarded to another bridge. Loops: every message sent upstream carries this broker's origin id
in a ``fleetgate-via`` user property (MQTT 5); a message carrying it is never routed here again.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import sqlite3
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from sqlalchemy.exc import SQLAlchemyError

from broker.acl import DEFAULT_TEMPLATE, AclTemplate, DeviceAcl
from broker.bridge.link import BridgeLink, LinkOwner
from broker.bridge.plan import BridgePlan, plan_bridges
from broker.bridge.queue import OutQueue, Queued
from broker.bridge.status import (
    BridgeCounters,
    BridgeStatus,
    FullAlarm,
    LinkState,
    iso,
    render_metrics,
)
from broker.bridge.store import Acked, QueueStore, Row
from broker.bridge.topics import first_remap
from broker.core import BrokerCore, GateVerdict
from broker.metrics import family_lines
from broker.mqtt import NO_PROPERTIES, PacketType, Properties, Publish, QoS
from broker.mqtt.properties import check_properties, encode_properties
from broker.routing import Message
from device_sdk.errors import KeyStoreError
from device_sdk.est import client_context
from device_sdk.keystore import FileKeyStore, KeyStore, device_id_of
from enrollment.registry import AuditRecord, Registry
from fleetgate.config import Config

log = logging.getLogger("fleetgate.broker.bridge")

ORIGIN_PROPERTY = "fleetgate-via"
QUEUE_FILE = "bridge/queue.db"
COMMIT_BATCH = 4096
LOAD_BATCH = 2048
HOUSEKEEPING_S = 0.2
ROUTE_CACHE = 65536
PACE_MESSAGES = 1024
"""While a bridge is connected, a device's acknowledgement for a message committed for it is
held back (after the commit) as long as more than this many of its messages wait for the
upstream. Ingress then runs at the forwarding rate instead of filling the queue faster than
the link empties it (CPU spent receiving what cannot be forwarded, spilled to disk and read
back). While the link is down nothing is held back: the queue takes everything, up to its
bounds."""

_HOLD, _ROUTE = GateVerdict.HOLD, GateVerdict.ROUTE  # enum class reads cost ~0.15 µs each

_P = ParamSpec("_P")
_T = TypeVar("_T")


def queue_path(config: Config) -> Path:
    return config.home / QUEUE_FILE


def open_keystore(plan: BridgePlan) -> KeyStore:
    """The bridge's client identity. A file store today; a TPM store fits the same protocol."""
    if not (plan.keystore / "device.crt").exists():
        raise KeyStoreError(
            f"bridge {plan.name}: no certificate in key store {plan.keystore}: put the bridge's "
            "client certificate (device.crt), key (device.key) and the upstream's CA (ca.crt) there"
        )
    return FileKeyStore(plan.keystore)


def carries_origin(properties: Properties, origin: str) -> bool:
    """Whether this broker already forwarded the message (its id is in the origin marker)."""
    return any(k == ORIGIN_PROPERTY and v == origin for k, v in properties.user_properties)


class _Join:
    """Calls ``on_stored`` once every bridge the message goes to has committed it."""

    __slots__ = ("_left", "_ok", "_on_stored")

    def __init__(self, count: int, on_stored: Callable[[bool, float], None] | None) -> None:
        self._left = count
        self._ok = True
        self._on_stored = on_stored

    def finish(self, ok: bool, now: float) -> None:
        self._ok = self._ok and ok
        self._left -= 1
        if self._left == 0 and self._on_stored is not None:
            self._on_stored(self._ok, now)


@dataclass
class _Bridge:
    """One bridge at run time."""

    plan: BridgePlan
    queue: OutQueue
    counters: BridgeCounters = field(default_factory=BridgeCounters)
    state: LinkState = field(default_factory=LinkState)
    acl: DeviceAcl = field(default_factory=lambda: DEFAULT_TEMPLATE.for_device("-"))
    group_has_acl: bool = False
    link: BridgeLink | None = None
    sent_to: int = 0  # highest seq written upstream
    sent_saved: int = 0  # ... as last committed to the store
    sent_at_start: int = 0
    loading: bool = False
    alarm: FullAlarm = field(default_factory=FullAlarm)
    denied_topics: set[str] = field(default_factory=set)
    acked_out_of_order: list[int] = field(default_factory=list)
    deleted_to: int = 0  # every acknowledged row below this seq is deleted from the store
    paced: list[Callable[[bool, float], None]] = field(default_factory=list)  # held back acks

    def congested(self) -> bool:
        """Connected, with more than ``PACE_MESSAGES`` waiting for the upstream."""
        return self.state.connected and self.queue.messages > PACE_MESSAGES


_Pending = tuple["_Bridge", Row, int, Callable[[bool, float], None] | None]
"""A message waiting for the next commit: its bridge, its row, its size, and what to call
once it is stored (the publisher's held PUBACK, through a :class:`_Join` when several bridges
take it; ``None`` for QoS 0)."""


def _strip_length(block: bytes) -> bytes:
    """The properties of an MQTT 5 property block, without its length prefix."""
    skip = 1
    while block[skip - 1] & 0x80:
        skip += 1
    return block[skip:]


def _property_block(inner: bytes) -> bytes:
    """Length prefix (a variable byte integer) and properties."""
    n, out = len(inner), bytearray()
    while True:
        n, digit = divmod(n, 0x80)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out) + inner


def new_queue(plan: BridgePlan) -> OutQueue:
    return OutQueue(
        max_messages=plan.settings.queue_max_messages, max_bytes=plan.settings.queue_max_bytes
    )


class BridgeRuntime:
    """What every kind of bridge source shares: the configured bridges, the origin marker, the
    identity, the local ACL, inbound messages and the figures. :class:`BridgeManager` adds the
    queue file; :class:`broker.fabric.bridge.FabricBridges` reads the fabric's stream."""

    def __init__(
        self,
        config: Config,
        core: BrokerCore,
        registry: Registry,
        *,
        wake: Callable[[], None],
    ) -> None:
        self._config = config
        self._core = core
        self._registry = registry
        self._wake_broker = wake
        self._bridges = {plan.name: _Bridge(plan, new_queue(plan)) for plan in plan_bridges(config)}
        self.origin = ""
        self.loops = 0  # echoes refused at ingress: published here, forwarded, come back
        self._origin_property = b""  # the origin marker, encoded as one MQTT 5 property
        self._origin_block = b"\x00"  # ... as the whole property block of a plain message
        self._tasks: set[asyncio.Task[Any]] = set()
        self._runners: list[asyncio.Task[Any]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._routes: dict[str, list[tuple[_Bridge, str, int]]] = {}

    async def start(self) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        raise NotImplementedError

    def _set_origin(self, origin: str) -> None:
        self.origin = origin
        marker = Properties(user_properties=((ORIGIN_PROPERTY, origin),))
        check_properties(marker, PacketType.PUBLISH)
        self._origin_block = encode_properties(marker)
        self._origin_property = _strip_length(self._origin_block)

    def _came_back(self, props: Properties) -> bool:
        """A client publish carrying this broker's own origin marker: counted, not routed."""
        if carries_origin(props, self.origin):
            self.loops += 1
            return True
        return False

    def _looped(self, bridge: _Bridge, props: Properties) -> bool:
        """A message on ``bridge`` carrying this broker's own origin marker (it went upstream
        from here and came back): counted on that bridge, not forwarded."""
        if props.user_properties and carries_origin(props, self.origin):
            bridge.counters.loops += 1
            return True
        return False

    def _routes_for(self, topic: str) -> list[tuple[_Bridge, str, int]]:
        """The bridges a topic goes to, with its upstream name and that name's size."""
        routes = self._routes.get(topic)
        if routes is None:
            if len(self._routes) >= ROUTE_CACHE:
                self._routes.clear()
            routes = []
            for bridge in self._bridges.values():
                remote = first_remap(bridge.plan.out, topic)
                if remote is not None:
                    routes.append((bridge, remote, len(remote.encode())))
            self._routes[topic] = routes
        return routes

    def _marked(self, props: Properties) -> bytes:
        """The property block of a message going upstream: its properties and the marker."""
        if props is NO_PROPERTIES:
            return self._origin_block
        # user properties are the last PUBLISH property: the marker goes at the end
        return _property_block(_strip_length(encode_properties(props)) + self._origin_property)

    def _new_link(self, bridge: _Bridge, owner: LinkOwner) -> BridgeLink:
        bridge.link = BridgeLink(
            bridge.plan,
            bridge.queue,
            bridge.counters,
            bridge.state,
            owner,
            context=functools.partial(self._tls_context, bridge.plan),
            client_id=functools.partial(self._client_id, bridge.plan),
        )
        return bridge.link

    def _spawn(self, job: Any) -> asyncio.Task[Any]:
        assert self._loop is not None
        task = self._loop.create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("bridge task failed", exc_info=task.exception())

    # -- identity and ACL ------------------------------------------------------------------------

    def _tls_context(self, plan: BridgePlan) -> ssl.SSLContext:
        keystore = open_keystore(plan)
        trust = plan.ca_file or keystore.trust_anchors_path
        if not trust.exists():
            raise KeyStoreError(
                f"bridge {plan.name}: no CA file {trust} to verify the upstream's certificate"
            )
        context = client_context(trust)
        keystore.load_identity(context)
        return context

    def _client_id(self, plan: BridgePlan) -> str:
        """The configured id, else the certificate's device id (fleetgate upstreams bind the
        client id to it), else ``fleetgate-bridge-<name>``."""
        if plan.settings.client_id:
            return plan.settings.client_id
        try:
            return device_id_of(open_keystore(plan).certificates()[0])
        except KeyStoreError:
            return f"fleetgate-bridge-{plan.name}"

    async def _load_acl(self, bridge: _Bridge) -> None:
        group = bridge.plan.settings.local_group
        try:
            patterns = await asyncio.to_thread(self._registry.acl_patterns, group)
        except SQLAlchemyError:
            log.exception("bridge %s: ACL of group %s not read; keeping the last one", group)
            return
        template = AclTemplate(patterns.publish, patterns.subscribe) if patterns else None
        bridge.group_has_acl = template is not None
        bridge.acl = (template or DEFAULT_TEMPLATE).for_device(bridge.plan.name)

    # -- inbound -----------------------------------------------------------------------------------

    async def connected(self, name: str) -> None:
        """Re-read the local ACL on every connection: the operator may have changed it."""
        await self._load_acl(self._bridges[name])

    def inbound(self, name: str, publish: Publish, settle: Callable[[bool], None]) -> None:
        """A message from the upstream: renamed, checked, published locally as the bridge;
        ``settle`` says when the upstream may have its acknowledgement."""
        bridge = self._bridges[name]
        props = publish.properties
        if self._looped(bridge, props):
            settle(True)
            return
        topic = first_remap(bridge.plan.inbound, publish.topic)
        if topic is None:
            settle(True)
            return  # an upstream sent a topic no in rule asked for
        if not bridge.acl.may_publish(topic):
            self._deny_inbound(bridge, topic)
            settle(True)
            return
        if publish.dup:
            bridge.counters.duplicates_in += 1
        assert self._loop is not None
        now = self._loop.time()
        expiry = props.message_expiry_interval
        if props is not NO_PROPERTIES:
            props = replace(
                props, topic_alias=None, subscription_identifiers=(), message_expiry_interval=None
            )
        self._publish_inbound(
            Message(
                topic=topic,
                payload=publish.payload,
                qos=min(publish.qos, QoS.AT_LEAST_ONCE),
                retain=publish.retain,
                properties=props,
                sender=f"bridge:{name}",
                expires_at=None if expiry is None else now + expiry,
            ),
            now,
            settle,
        )
        bridge.counters.received += 1
        self._wake_broker()

    def _deny_inbound(self, bridge: _Bridge, topic: str) -> None:
        name, group = bridge.plan.name, bridge.plan.settings.local_group
        bridge.counters.inbound_denied += 1
        reason = f"topic {topic!r} is outside the ACL of group {group} (bridge {name})"
        self._core.audit(AuditRecord(f"bridge:{name}", "mqtt.publish", "refused", None, reason))
        if topic not in bridge.denied_topics and len(bridge.denied_topics) < 1000:
            bridge.denied_topics.add(topic)  # logged once per topic; counted and audited always
            hint = "" if bridge.group_has_acl else f"; group {group} has no ACL: set one"
            log.warning("bridge %s: inbound %s%s", name, reason, hint, extra={"bridge": name})

    def _publish_inbound(
        self, message: Message, now: float, settle: Callable[[bool], None]
    ) -> None:
        """Deliver an inbound message to this broker's subscribers (taken at once: a message
        from the upstream is not kept through a restart here, as a device's QoS 1 is not)."""
        self._core.publish(message, now)
        settle(True)

    # -- figures -------------------------------------------------------------------------------

    def statuses(self) -> list[BridgeStatus]:
        now = time.time()
        out = []
        for bridge in self._bridges.values():
            settings, queue = bridge.plan.settings, bridge.queue
            oldest = queue.oldest()
            out.append(
                BridgeStatus(
                    name=bridge.plan.name,
                    upstream=f"{settings.host}:{settings.port}",
                    protocol=settings.protocol,
                    connected=bridge.state.connected,
                    since=iso(bridge.state.since),
                    last_error=bridge.state.last_error,
                    queue_messages=self._waiting(bridge),
                    queue_bytes=queue.bytes,
                    queue_full=bridge.alarm.raised,
                    oldest_age_s=None if oldest is None else round(max(0.0, now - oldest), 3),
                    counters=replace(bridge.counters),
                    owner=self._owner_of(bridge),
                )
            )
        return out

    def _waiting(self, bridge: _Bridge) -> int:
        """Messages not yet acknowledged by the bridge's upstream."""
        return bridge.queue.messages

    def _owner_of(self, bridge: _Bridge) -> str | None:
        """The node that runs the bridge's link (fabric mode); None: this broker, alone."""
        return None

    def status_json(self) -> dict[str, Any]:
        """What ``GET /bridges`` answers and ``fleetgate bridge status`` prints."""
        return {
            "origin": self.origin,
            "loops_dropped": self.loops,
            "bridges": [status.to_json() for status in self.statuses()],
        }

    def render_metrics(self) -> str:
        since = [bridge.state.since for bridge in self._bridges.values()]
        text = render_metrics(self.statuses(), since)
        loops = family_lines(
            "bridge_ingress_loops_dropped_total",
            "counter",
            "Client publishes that carried this broker's own origin marker, not routed.",
            [("", self.loops)],
        )
        return text + "\n".join(loops) + "\n"


class BridgeManager(BridgeRuntime):
    """Every ``[[bridge]]`` of one broker; :class:`broker.core.PublishGate` for its core."""

    def __init__(
        self,
        config: Config,
        core: BrokerCore,
        registry: Registry,
        *,
        wake: Callable[[], None],
    ) -> None:
        super().__init__(config, core, registry, wake=wake)
        self._store: QueueStore | None = None
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bridge-queue")
        self._pending: list[_Pending] = []
        self._writing = False

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the queue, recover its backlog, load the bridges' ACLs, start the links."""
        self._loop = asyncio.get_running_loop()
        path = queue_path(self._config)
        try:
            self._store = store = await self._db(QueueStore, path)
        except sqlite3.Error as exc:
            raise OSError(f"the bridge queue {path} cannot be opened: {exc}") from exc
        self._set_origin(store.origin)
        for name, bridge in self._bridges.items():
            backlog = await self._db(store.backlog, name)
            bridge.queue.recovered(
                messages=backlog.messages,
                size=backlog.size,
                last_seq=backlog.last_seq,
                oldest=backlog.oldest,
            )
            bridge.sent_to = bridge.sent_saved = bridge.sent_at_start = backlog.sent_to
            await self._load_acl(bridge)
            bridge.state.down("not connected yet", time.time())
            link = self._new_link(bridge, self)
            if backlog.messages:
                log.info(
                    "bridge %s: %d message(s) queued from before the restart",
                    name,
                    backlog.messages,
                    extra={"bridge": name},
                )
            self._runners.append(self._spawn(link.run()))
        self._runners.append(self._spawn(self._housekeeping()))
        self._core.gate = self

    async def stop(self) -> None:
        """Stop the links, then commit what is pending (acknowledgements included)."""
        self._core.gate = None
        for task in self._runners:
            task.cancel()
        while self._tasks:  # writes and reads in progress finish; links and timers end
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._pending or any(self._deletable(b) for b in self._bridges.values()):
            await self._write()
        for bridge in self._bridges.values():  # committed: their publishers may have them
            self._release(bridge)
        if self._store is not None:
            await self._db(self._store.close)
        self._thread.shutdown(wait=True)

    async def _db(self, function: Callable[_P, _T], *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run a store call on the queue's own thread (SQLite wants one writer)."""
        assert self._loop is not None
        return await self._loop.run_in_executor(self._thread, lambda: function(*args, **kwargs))

    # -- LinkOwner -------------------------------------------------------------------------------

    def acked(self, name: str, items: list[Queued]) -> None:
        bridge = self._bridges[name]
        floor = bridge.queue.floor()  # every stored row below it is acknowledged now
        # those behind one still unacknowledged are deleted by themselves
        bridge.acked_out_of_order.extend(i.seq for i in items if i.seq > floor)
        if bridge.paced and bridge.queue.messages <= PACE_MESSAGES:
            self._release(bridge)

    def disconnected(self, name: str) -> None:
        """The link is down: the queue takes everything again."""
        self._release(self._bridges[name])

    def _release(self, bridge: _Bridge) -> None:
        """Send the acknowledgements held back for ``bridge`` (see ``PACE_MESSAGES``)."""
        paced, bridge.paced = bridge.paced, []
        if not paced:
            return
        assert self._loop is not None
        now = self._loop.time()
        for callback in paced:
            callback(True, now)
        self._wake_broker()

    def sent(self, name: str, seq: int) -> None:
        bridge = self._bridges[name]
        bridge.sent_to = max(bridge.sent_to, seq)

    def want_more(self, name: str) -> None:
        """The link has nothing in memory to send: read the next messages from disk."""
        bridge = self._bridges[name]
        after = bridge.queue.load_from()
        if after is None or bridge.loading or self._store is None:
            return
        bridge.loading = True
        self._spawn(self._load(bridge, after))

    async def _load(self, bridge: _Bridge, after: int) -> None:
        assert self._store is not None
        try:
            items = await self._db(
                self._store.load, bridge.plan.name, after, LOAD_BATCH, bridge.sent_at_start
            )
        finally:
            bridge.loading = False
        bridge.queue.loaded(items)
        if bridge.link is not None:
            bridge.link.wake()

    # -- the gate ------------------------------------------------------------------------------

    def offer(
        self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]
    ) -> GateVerdict:
        """Route-and-hold a bridged message until it is on disk; refuse it when a queue is full."""
        props = message.properties
        if props.user_properties and self._came_back(props):
            return GateVerdict.LOOP
        routes = self._routes.get(message.topic)
        if routes is None:
            routes = self._routes_for(message.topic)
        if not routes:
            return _ROUTE
        block = self._marked(props)
        payload, now = message.payload, time.time()
        retain = 1 if message.retain else 0  # a bool costs sqlite3 a failed adapter lookup
        extra = len(payload) + len(block)
        callback = on_stored if message.qos else None
        if len(routes) == 1:
            ((bridge, topic, topic_size),) = routes
            size = topic_size + extra
            if not bridge.queue.reserve(size, now):
                self._refuse_full(bridge, message.qos)
                return GateVerdict.FULL
            if dup:
                bridge.counters.duplicates_in += 1
            row: Row = (bridge.plan.name, topic, payload, retain, block, now)
            self._pending.append((bridge, row, size, callback))
        else:
            reserved: list[tuple[_Bridge, int]] = []
            for bridge, _, topic_size in routes:
                if not bridge.queue.reserve(topic_size + extra, now):
                    for done, done_size in reserved:
                        done.queue.unreserve(done_size)
                    self._refuse_full(bridge, message.qos)
                    return GateVerdict.FULL
                reserved.append((bridge, topic_size + extra))
            if callback is not None:
                callback = _Join(len(routes), callback).finish
            for bridge, topic, topic_size in routes:
                if dup:
                    bridge.counters.duplicates_in += 1
                row = (bridge.plan.name, topic, payload, retain, block, now)
                self._pending.append((bridge, row, topic_size + extra, callback))
        if not self._writing:
            self._writing = True
            self._spawn(self._write_all())
        return _HOLD

    def _refuse_full(self, bridge: _Bridge, qos: int) -> None:
        if qos:
            bridge.counters.refused_full += 1
        else:
            bridge.counters.dropped_qos0_full += 1
        if bridge.alarm.refusal(time.monotonic()):
            queue = bridge.queue
            log.error(
                "bridge %s: queue FULL (%d/%d messages, %d/%d bytes): refusing bridged "
                "publishes (MQTT 5: PUBACK 0x97; 3.1.1: connection closed after acknowledging "
                "what was queued) until the upstream catches up",
                bridge.plan.name,
                queue.messages,
                queue.max_messages,
                queue.bytes,
                queue.max_bytes,
                extra={"bridge": bridge.plan.name},
            )

    def _settle_alarm(self, bridge: _Bridge) -> None:
        """End a full-queue episode once the queue has had room for a while (``FULL_QUIET_S``)."""
        queue, alarm, now = bridge.queue, bridge.alarm, time.monotonic()
        room = queue.messages < 0.9 * queue.max_messages and queue.bytes < 0.9 * queue.max_bytes
        if alarm.settle(now, room=room):
            log.warning(
                "bridge %s: queue below 90%%, accepting bridged publishes again (%d refused "
                "in %.0f s)",
                bridge.plan.name,
                alarm.refused,
                alarm.last_at - alarm.first_at,
                extra={"bridge": bridge.plan.name},
            )

    # -- group commit ----------------------------------------------------------------------------

    async def _write_all(self) -> None:
        try:
            while self._pending:
                if not await self._write():
                    break
        finally:
            self._writing = False

    def _deletable(self, bridge: _Bridge) -> bool:
        return bool(bridge.acked_out_of_order) or bridge.queue.floor() > bridge.deleted_to

    async def _write(self) -> bool:
        """One transaction: the next pending messages, the acknowledged deletes, the send
        marks. False if it failed (the messages' publishers get an error)."""
        assert self._store is not None and self._loop is not None
        batch = self._pending
        if len(batch) > COMMIT_BATCH:
            batch, self._pending = batch[:COMMIT_BATCH], batch[COMMIT_BATCH:]
        else:
            self._pending = []
        acked: list[Acked] = []
        for name, bridge in self._bridges.items():
            floor = bridge.queue.floor()
            if floor > bridge.deleted_to or bridge.acked_out_of_order:
                single = tuple(s for s in bridge.acked_out_of_order if s >= floor)
                acked.append(Acked(name, bridge.deleted_to, floor, single))
                bridge.acked_out_of_order = []
        sent = {n: b.sent_to for n, b in self._bridges.items() if b.sent_to > b.sent_saved}
        try:
            first = await self._db(self._store.write, [p[1] for p in batch], acked, sent)
        except sqlite3.Error as exc:
            log.error("bridge queue write failed: %s", exc, extra={"count": len(batch)})
            for done in acked:  # deleted with a later commit
                self._bridges[done.bridge].acked_out_of_order[:0] = done.single
            now = self._loop.time()
            for bridge, _, size, callback in batch:
                bridge.queue.unreserve(size)
                bridge.counters.store_errors += 1
                if callback is not None:
                    callback(False, now)
            self._wake_broker()
            return False
        for done in acked:
            bridge = self._bridges[done.bridge]
            bridge.deleted_to = max(bridge.deleted_to, done.below)
        for name, seq in sent.items():
            self._bridges[name].sent_saved = seq
        now = self._loop.time()
        # Whether a bridge's acknowledgements are held back (pacing) is decided once per
        # commit: nothing in this loop changes a queue's count or a link's state, and once one
        # is held the later ones are held behind it anyway.
        held: dict[str, list[Callable[[bool, float], None]] | None] = {}
        for seq, (bridge, row, size, callback) in enumerate(batch, first):
            name, topic, payload, retain, block, enqueued_at = row
            queued = Queued(seq, topic, payload, retain == 1, block, enqueued_at, size)
            bridge.queue.stored(queued)
            if name not in held:
                held[name] = bridge.paced if bridge.paced or bridge.congested() else None
            if callback is not None:
                paced = held[name]
                if paced is not None:
                    paced.append(callback)
                else:
                    callback(True, now)
        for name in held:
            link = self._bridges[name].link
            if link is not None:
                link.wake()
        self._wake_broker()
        return True

    async def _housekeeping(self) -> None:
        """Delete acknowledged messages and record send marks in the background; read more
        of a spilled queue from disk."""
        while True:
            await asyncio.sleep(HOUSEKEEPING_S)
            if not self._writing and any(
                b.sent_to > b.sent_saved or self._deletable(b) for b in self._bridges.values()
            ):
                self._writing = True
                try:
                    await self._write()
                finally:
                    self._writing = False
                    if self._pending:
                        self._writing = True
                        self._spawn(self._write_all())
            for name, bridge in self._bridges.items():
                if bridge.paced and not bridge.congested():
                    self._release(bridge)
                if bridge.alarm.raised:
                    self._settle_alarm(bridge)
                self.want_more(name)
