"""One broker node on the fabric: its clients' messages go out over core NATS, and messages from
other nodes come in for its local subscribers (issue 12, first slice).

- **Out.** The node is the core's :class:`~broker.core.PublishGate`: every authorised client
  PUBLISH is handed to NATS on the subject nats-server's MQTT mapping gives its topic
  (:mod:`broker.fabric.subjects`), then routed locally as before. A topic with no subject is
  refused (``INVALID``: PUBACK/PUBREC 0x90). Messages are queued in order and written by one
  task per event-loop turn, so a burst costs one wake-up, not one task per message.
- **Stored.** A QoS 1/2 message is also written to the JetStream stream ``FG_MSGS``, and its
  PUBACK/PUBREC waits for the stream's answer (``HOLD``; :mod:`broker.fabric.durable`). Nothing
  reads the stream back yet: it is the durable copy later replay will use.
- **In.** The node holds one NATS subscription per distinct topic filter its sessions have
  (``a/#`` takes two: ``a.>`` and ``a``), and fans each message out with the core's own
  subscription tree. Interest is per node, not per device.
- **No echo.** The connection is opened with ``no_echo``: nats-server does not send a client
  the messages it published itself, so the origin node, which already routed the message
  locally, never sees it again. That costs nothing per message (a node-id header would cost
  bytes on every message and a wasted receive, 8.5-12 µs, at the origin), and messages from
  NATS-native publishers carry no fleetgate header at all.
- **Overlapping filters.** NATS sends one copy per matching subscription (``a/#`` and
  ``a/+`` both match ``a/b``); the core already delivers one copy per session for all its
  matching filters, so only the copy arriving on the *canonical* filter (the smallest of this
  node's active filters that match the topic) is routed, the others are dropped. Such a copy
  reaches ordinary subscribers only, never shared subscriptions.
- **Shared subscriptions** (:mod:`broker.shared`). Each ``$share/<group>/<filter>`` with a
  local member is one NATS *queue* subscription per subject of its filter, in a queue group
  named after the group and the filter (:func:`broker.shared.queue_name`), so NATS hands each
  message to one node of the cluster, which hands it to one local member. Those subscriptions
  live on a second connection, opened at the first shared subscription: with ``no_echo``,
  nats-server never picks the publishing connection's own queue subscription (measured), so
  a message from this node's clients could never reach this node's members. The core does not
  route shared subscriptions itself in fabric mode (``SharedSubscriptions.local``): the queue
  groups decide for local and remote publishers alike. A persistent session's shared
  subscriptions are in its fabric record, so a node that restores it joins the groups. A
  message no member here can take (its member's session ended unacknowledged, or the last
  member here just left) is handed on to the group's other nodes on
  ``$FG.share.<queue>.<subject>``, once (:meth:`FabricNode._hand_on`).

Core NATS is at-most-once: a message sent while the link is down, or before a new filter's
interest reached the other servers, is not delivered live (a QoS 1/2 one is still in the
stream). Replay, retained messages, sessions and wills are not in the fabric yet
(docs/architecture.md, "Fabric").
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from broker.core import BrokerCore, GateVerdict
from broker.fabric.connect import auth_options
from broker.fabric.durable import (
    DUPLICATE_WINDOW_S,
    STREAM,
    STREAM_PREFIX,
    Availability,
    DurableLedger,
    StreamRoom,
    refused_as_full,
)
from broker.fabric.kicks import KickRelay
from broker.fabric.retained import FabricRetained
from broker.fabric.retained import families as retained_families
from broker.fabric.sessions import SENDER_HEADER, SessionStore
from broker.fabric.subjects import (
    Unmappable,
    filter_to_subjects,
    refusal,
    subject_to_topic,
    topic_to_subject,
)
from broker.fabric.wills import WillKeeper
from broker.metrics import family_lines
from broker.mqtt import NO_PROPERTIES, QoS
from broker.mqtt._wire import Reader
from broker.mqtt.errors import ProtocolError
from broker.mqtt.packets import PacketType
from broker.mqtt.properties import decode_properties, encode_properties
from broker.routing import Message, SubscriptionOptions, SubscriptionTree
from broker.shared import queue_name
from enrollment.registry import DeviceChange
from fleetgate.config import Config, FabricSettings, node_name
from fleetgate.errors import FleetgateError
from fleetgate.topics import SHARE_PREFIX, InvalidTopic, validate_topic_name

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription

log = logging.getLogger("fleetgate.fabric")

MIN_SERVER_VERSION = (2, 10)
"""2.9 silently ignores a consumer's filter_subjects (a data leak) and maps no '.' in topics."""

SETUP_TIMEOUT_S = 15.0
"""How long start-up may take to find or create each of its streams and buckets."""
HAND_ON_PREFIX = "$FG.share."
"""Shared-subscription messages a node hands on to the group's other nodes (one per group, in
its queue group); ``$FG.>`` is the nodes' own."""
QOS_HEADER = "Nmqtt-Pub"  # nats-server's MQTT listener reads and writes the QoS here
EXPIRY_HEADER = "Fg-Expiry"  # MQTT 5 message expiry, whole seconds left
PROPERTIES_HEADER = "Fg-Props"  # MQTT 5 message properties, encoded as on the wire, base64
RETAIN_HEADER = "Fg-Retain"
"""``1`` on a retained message's stream copy (and a retained QoS 0 message), for bridges to
forward it with RETAIN; absent otherwise, so an ordinary message carries nothing more."""

CANONICAL_CACHE = 65536
"""Topics whose routing filter the node remembers (cleared when full or when filters change)."""
_ANY = SubscriptionOptions(QoS.AT_MOST_ONCE)
_QOS = (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE, QoS.EXACTLY_ONCE)


class FabricUnavailable(FleetgateError):
    """The node cannot use the fabric it is configured for: it does not start."""

    code = "fabric_unavailable"


def check_server_version(version: str) -> None:
    """Refuse a nats-server older than 2.10 (``version`` as its INFO gives it, e.g. 2.10.27)."""
    try:
        major, minor = (int(part) for part in version.split(".")[:2])
    except ValueError:
        raise FabricUnavailable(f"nats-server reports an unreadable version {version!r}") from None
    if (major, minor) < MIN_SERVER_VERSION:
        raise FabricUnavailable(
            f"nats-server {version} is too old for the fabric: fleetgate needs 2.10 or newer "
            "(2.9 silently ignores a consumer's filter_subjects and delivers every subject)"
        )


_PLAIN_HEADERS: tuple[dict[str, str] | None, ...] = (
    None,
    {QOS_HEADER: "1"},
    {QOS_HEADER: "2"},
)
"""The headers of a message with neither properties nor expiry, by QoS: shared, never changed
(nats-py only reads them), so the common message builds no dict."""


def nats_headers(message: Message, now: float) -> dict[str, str] | None:
    """What a message carries besides topic and payload; None for a plain QoS 0 message, which
    then looks to NATS-native subscribers exactly like a NATS-native publish. The result may be
    shared between messages: callers copy it before changing it."""
    props = message.properties
    if props is NO_PROPERTIES and message.expires_at is None:
        return _PLAIN_HEADERS[message.qos]
    headers = {QOS_HEADER: str(int(message.qos))}
    if message.expires_at is not None:
        headers[EXPIRY_HEADER] = str(max(0, round(message.expires_at - now)))
    if props is not NO_PROPERTIES:
        headers[PROPERTIES_HEADER] = base64.b64encode(encode_properties(props)).decode()
    return headers


def message_from_nats(
    subject: str, payload: bytes, headers: dict[str, str] | None, now: float
) -> Message | None:
    """The MQTT message for a NATS message, or None if it cannot be one (a NATS-native subject
    whose topic has a wildcard, say, or headers that are not ours)."""
    topic = topic_of(subject)
    if topic is None:
        return None
    if not headers:  # QoS 0 without properties: the common message
        return Message(topic, payload, QoS.AT_MOST_ONCE, False, NO_PROPERTIES, "", None)
    if len(headers) == 1 and (plain := _QOS_BY_HEADER.get(headers.get(QOS_HEADER, ""))):
        return Message(topic, payload, plain, False, NO_PROPERTIES, "", None)
    qos, props, expires_at = QoS.AT_MOST_ONCE, NO_PROPERTIES, None
    try:
        qos = _QOS[int(headers.get(QOS_HEADER, "0"))]
        if (expiry := headers.get(EXPIRY_HEADER)) is not None:
            expires_at = now + int(expiry)
        if (encoded := headers.get(PROPERTIES_HEADER)) is not None:
            props = decode_properties(
                Reader(base64.b64decode(encoded, validate=True)), PacketType.PUBLISH
            )
    except (ValueError, IndexError, ProtocolError):
        return None
    return Message(topic, payload, qos, False, props, "", expires_at)


_QOS_BY_HEADER = {"1": QoS.AT_LEAST_ONCE, "2": QoS.EXACTLY_ONCE}
"""A lone QoS header's values that need no parsing (QoS 0 comes without headers)."""


@lru_cache(maxsize=65536)
def topic_of(subject: str) -> str | None:
    """The valid MQTT topic a subject shows as, or None (a NATS-native subject whose topic has a
    wildcard, say). Cached: messages come on the same subjects over and over."""
    topic = subject_to_topic(subject)
    try:
        validate_topic_name(topic)
    except InvalidTopic:
        return None
    return topic


class InterestTree(SubscriptionTree):
    """The core's subscription tree, telling the node when a filter gets its first local
    subscriber and when it loses its last one."""

    def __init__(self, on_first: Callable[[str], None], on_last: Callable[[str], None]) -> None:
        super().__init__()
        self._on_first = on_first
        self._on_last = on_last
        self._counts: dict[str, int] = {}

    def has(self, topic_filter: str) -> bool:
        """Whether some local session subscribes to exactly this filter."""
        return topic_filter in self._counts

    def add(self, topic_filter: str, client_id: str, options: SubscriptionOptions) -> bool:
        new = super().add(topic_filter, client_id, options)
        if new:
            count = self._counts.get(topic_filter, 0) + 1
            self._counts[topic_filter] = count
            if count == 1:
                self._on_first(topic_filter)
        return new

    def remove(self, topic_filter: str, client_id: str) -> bool:
        removed = super().remove(topic_filter, client_id)
        if removed:
            count = self._counts[topic_filter] - 1
            if count:
                self._counts[topic_filter] = count
            else:
                del self._counts[topic_filter]
                self._on_last(topic_filter)
        return removed


class FabricNode:
    """This broker process as a node of the fabric; ``start`` before the listeners open."""

    def __init__(
        self,
        config: Config,
        core: BrokerCore,
        *,
        wake: Callable[[], None],
        clock: Callable[[], float],
    ) -> None:
        assert config.fabric is not None
        self.settings: FabricSettings = config.fabric
        self.name = node_name(config)
        self._config = config
        self._core = core
        self._wake = wake
        self._clock = clock
        self._nc: NatsClient | None = None
        self._outbox: deque[tuple[str, bytes, dict[str, str] | None]] = deque()
        self.ledger = DurableLedger(self.name, secrets.token_hex(6))
        self.availability = Availability()
        self.room = StreamRoom(self.settings.stream_max_bytes)  # FG_MSGS at its byte cap
        self._probe: asyncio.Task[None] | None = None
        self._room_probe: asyncio.Task[None] | None = None
        self.sessions: SessionStore | None = None
        self._stored_outbox: deque[int] = deque()  # ledger numbers to send to the stream
        self._outbox_ready = asyncio.Event()
        self._interest: deque[tuple[str, bool]] = deque()
        self._interest_ready = asyncio.Event()
        # Shared-subscription messages handed on to other nodes (_hand_on): sent in the order
        # of the interest changes, so a group this node just left cannot pick it again.
        self._handing: deque[tuple[str, bytes, dict[str, str] | None]] = deque()
        self._nats_subs: dict[str, list[Subscription]] = {}
        self._options: dict[str, Any] = {}
        self._share_nc: NatsClient | None = None  # queue subscriptions (module docstring)
        self._active = SubscriptionTree()  # filters whose NATS subscriptions the server has
        self._canonical: dict[str, str] = {}  # topic -> the active filter that routes it
        self._tree: InterestTree | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._last_error: str = ""
        self._stopping = False
        self.forwarded = 0
        self.stored = 0
        self.resent = 0
        self.not_stored = 0
        self.received = 0
        self.handed_on = 0
        self.dropped = 0
        self.kicks = KickRelay(self.name, self._kick)
        self.retained: FabricRetained | None = None
        self.wills = WillKeeper(self.name, core, wake=wake, clock=clock)

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """Connect (or raise :class:`FabricUnavailable` with the reason), then take over the
        core's publish gate and subscription tree."""
        import nats  # only in fabric mode

        settings = self.settings
        options: dict[str, Any] = {
            "servers": list(settings.servers),
            "name": f"fleetgate-{self.name}",
            "no_echo": True,
            # Replies (JetStream API) on a '$' subject: MQTT '#' subscribers never see them.
            "inbox_prefix": "$FG.inbox",
            # Every subject is built here from refused-if-unmappable topics (no whitespace, no
            # CR/LF) and checked node names: nats-py's per-publish regex would only cost time.
            "skip_subject_validation": True,
            "connect_timeout": settings.connect_timeout_s,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
        }
        options.update(auth_options(self._config))  # TLS and credentials: never logged
        self._options = options
        try:
            self._nc = await asyncio.wait_for(nats.connect(**options), settings.connect_timeout_s)
        except (TimeoutError, OSError, nats.errors.Error) as exc:
            reason = self._last_error or str(exc) or type(exc).__name__
            raise FabricUnavailable(
                f"cannot reach the fabric at {', '.join(settings.servers)}: {reason}"
            ) from exc
        try:
            check_server_version(_server_version(self._nc))
        except FabricUnavailable:
            await self._nc.close()
            raise
        # A loaded or just-started cluster may take seconds to place replicated assets.
        setup_s = max(settings.connect_timeout_s, SETUP_TIMEOUT_S)
        await self._ensure_stream(setup_s)
        await self._nc.subscribe(self.ledger.ack_prefix + "*", cb=self._on_ack)
        await self.kicks.start(self._nc)
        core = self._core
        if core.subscriptions.match("#") or core.sessions:
            raise RuntimeError("the fabric must be started before any client connects")
        js = self._nc.jetstream(timeout=setup_s)
        self.retained = FabricRetained(
            self.name, clock=self._clock, headers=nats_headers, decode=message_from_nats
        )
        self.sessions = SessionStore(
            self.name,
            core,
            self._nc,
            replicas=settings.replicas,
            clock=self._clock,
            wake=self._wake,
        )
        try:  # every bucket and stream the node needs, or no node: the link is closed
            await self.retained.start(js, settings.replicas, setup_s)
            await self.wills.start(js, settings.replicas, setup_s)
            await self.sessions.start(setup_s)
            # A will and its session settle together (broker.fabric.wills, "Sessions").
            self.wills.sessions_kv = self.sessions.kv
            self.sessions.on_ended = self.wills.session_ended
        except (FabricUnavailable, TimeoutError, nats.errors.Error) as exc:
            await self._abort_start()
            raise FabricUnavailable(
                f"the fabric's retained messages, wills or sessions: {exc}"
            ) from exc
        core.retained = self.retained
        core.will_keeper = self.wills
        core.session_hooks = self.sessions
        core.assigned_prefix = f"auto-{self.name}-"
        core.gate = core.will_gate = self
        core.filter_refusal = refusal
        core.shared.local = False
        # As "$share/<key>": no ordinary filter starts so (the core routes those to shared).
        core.shared.on_first = lambda key: self._interest_gained(SHARE_PREFIX + key)
        core.shared.on_last = lambda key: self._interest_lost(SHARE_PREFIX + key)
        core.shared.hand_on = self._hand_on
        self._tree = core.subscriptions = InterestTree(self._interest_gained, self._interest_lost)
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(job)
            for job in (
                self._send(),
                self._follow_interest(),
                self._watch_stored(),
                self.retained.write(js),
            )
        ]
        log.info(
            "fabric connected",
            extra={"node": self.name, "server": self._nc.connected_url.netloc},  # type: ignore[union-attr]
        )

    async def _abort_start(self) -> None:
        """Undo a start that failed half-way: what did start stops, the link closes."""
        assert self._nc is not None
        with contextlib.suppress(Exception):
            if self.sessions is not None:
                await self.sessions.stop()
            await self.wills.stop(0.0)
            if self.retained is not None:
                await self.retained.stop(0.0)
        self.sessions = None
        await self._nc.close()

    async def claim_session(
        self, device_id: str, client_id: str, clean_start: bool, expiry: int
    ) -> None:
        """Before the CONNACK: make this node the holder of the client's session
        (:meth:`SessionStore.claim`)."""
        assert self.sessions is not None
        await self.sessions.claim(client_id, device_id, clean_start, expiry)

    def abandon_session(self, client_id: str) -> None:
        """The client left before its CONNACK: the claim is not taken up."""
        assert self.sessions is not None
        self.sessions.abandon(client_id)

    async def stop(self) -> None:
        self._stopping = True
        if self.sessions is not None:
            await self.sessions.stop()
        if self.retained is not None:  # the last retained writes, before the link goes
            await self.retained.stop(5.0)
        await self.wills.stop(5.0)
        self._tasks.extend(task for task in (self._probe, self._room_probe) if task is not None)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._share_nc is not None and not self._share_nc.is_closed:
            await self._share_nc.drain()
        if self._nc is not None and not self._nc.is_closed:
            if self._nc.is_connected:
                await self._nc.drain()
            else:  # the fabric is down: nothing to drain towards
                await self._nc.close()

    def render_metrics(self) -> str:
        """The node's fabric figures for /metrics, labelled with its name."""
        label = f'{{node="{self.name}"}}'
        connected = self._nc is not None and self._nc.is_connected
        families = [
            ("fabric_connected", "gauge", "1 while the NATS link is up.", float(connected)),
            (
                "fabric_forwarded_total",
                "counter",
                "Client messages handed to core NATS for other nodes.",
                self.forwarded,
            ),
            (
                "fabric_received_total",
                "counter",
                "Messages from other nodes or NATS clients routed to local subscribers.",
                self.received,
            ),
            (
                "fabric_dropped_total",
                "counter",
                "Messages not sent to NATS, or received ones that are no MQTT message.",
                self.dropped,
            ),
            (
                "fabric_stored_total",
                "counter",
                "QoS 1/2 messages FG_MSGS acknowledged (the client's acknowledgement followed).",
                self.stored,
            ),
            ("fabric_resent_total", "counter", "Resends to FG_MSGS without answer.", self.resent),
            (
                "fabric_not_stored_total",
                "counter",
                "QoS 1/2 messages given up on: the client got 0x83 or a close.",
                self.not_stored,
            ),
            (
                "fabric_available",
                "gauge",
                "1 while FG_MSGS takes QoS 1/2 messages; 0 while they are refused.",
                float(not self.availability.down),
            ),
            (
                "fabric_state_changes_total",
                "counter",
                "Times the fabric went down or came back.",
                self.availability.changes,
            ),
            (
                "fabric_refused_total",
                "counter",
                "QoS 1/2 messages refused at once while the fabric was down (0x97 or a close).",
                self.availability.refused,
            ),
            ("fabric_kicks_sent_total", "counter", "Feed changes announced.", self.kicks.sent),
            (
                "fabric_kicks_received_total",
                "counter",
                "Kicks other nodes announced.",
                self.kicks.received,
            ),
            (
                "fabric_pending_stored",
                "gauge",
                "QoS 1/2 messages waiting for FG_MSGS.",
                len(self.ledger.pending),
            ),
            *self.room.metric_families(),
            *retained_families(self.retained),
            (
                "fabric_shared_handed_on_total",
                "counter",
                "Shared-subscription messages no member here could take, offered to other nodes.",
                self.handed_on,
            ),
            (
                "fabric_wills_claimed_total",
                "counter",
                "Wills of clients of dead nodes this node won and published (or cancelled).",
                self.wills.claimed,
            ),
        ]
        if self.sessions is not None:
            families.extend(self.sessions.metric_families())
        lines = [
            line
            for name, kind, text, value in families
            for line in family_lines(name, kind, text, [(label, float(value))])
        ]
        return "\n".join(lines) + "\n"

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = str(exc) or type(exc).__name__

    async def _on_disconnected(self) -> None:
        if self._stopping:
            return
        log.warning("fabric disconnected", extra={"node": self.name, "reason": self._last_error})

    async def _on_reconnected(self) -> None:
        assert self._nc is not None
        version = _server_version(self._nc)
        try:
            check_server_version(version)
        except FabricUnavailable as exc:
            log.error("fabric reconnected to a server that is too old: %s", exc.message)
            return
        log.info("fabric reconnected", extra={"node": self.name, "server_version": version})

    def _kick(self, change: DeviceChange) -> int:
        """Another node announced a revocation: close the device's sessions here now."""
        if change.device_id is None or change.state is None:  # policy rows are never announced
            return 0
        kicked = self._core.kick(change.device_id, change.state, change.reason, self._clock())
        self._wake()
        return kicked

    # -- out: the publish gate ---------------------------------------------------------------------

    def offer(
        self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]
    ) -> GateVerdict:
        """Queue the message for NATS and let the core route it locally (at most once)."""
        try:
            subject = topic_to_subject(message.topic)
        except Unmappable:
            return GateVerdict.INVALID
        if message.qos != QoS.AT_MOST_ONCE and self.availability.down:
            self.availability.refused += 1
            return GateVerdict.FULL  # 0x97 (MQTT 5) or a close without acknowledgement
        now = self._clock()
        if message.qos != QoS.AT_MOST_ONCE and self.room.full:
            self._refuse_full(message, now)
            return GateVerdict.FULL
        headers = nats_headers(message, now)
        if message.retain and message.qos == QoS.AT_MOST_ONCE:  # a copy: headers are shared
            headers = {**(headers or {}), RETAIN_HEADER: "1"}
        self._outbox.append((subject, message.payload, headers))
        self._outbox_ready.set()
        if message.qos == QoS.AT_MOST_ONCE:
            return GateVerdict.ROUTE
        # The sender is for no-local, and the retain flag for bridges: on the stored copy only.
        extra = {SENDER_HEADER: message.sender}
        if message.retain:
            extra[RETAIN_HEADER] = "1"
        ledger = self.ledger
        number = ledger.add(subject, message.payload, headers, on_stored, now, extra)
        if not ledger.holding:  # else it waits behind the oldest unstored one (durable.py)
            self._stored_outbox.append(number)
        return GateVerdict.HOLD

    async def _send(self) -> None:
        """Write what ``admit`` queued; one wake-up per event-loop turn with messages."""
        assert self._nc is not None
        nc, outbox = self._nc, self._outbox
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            sent = 0
            while outbox:
                subject, payload, headers = outbox.popleft()
                try:
                    await nc.publish(subject, payload, headers=headers)
                except Exception as exc:  # at most once: count it, go on
                    self.dropped += 1
                    self._last_error = str(exc) or type(exc).__name__
                else:
                    sent += 1
            self.forwarded += sent
            now = self._clock()
            while self._stored_outbox:
                number = self._stored_outbox.popleft()
                item = self.ledger.pending.get(number)
                if item is None:
                    continue
                item.last_sent = now
                try:
                    await nc.publish(
                        item.subject,
                        item.payload,
                        reply=self.ledger.reply_subject(number),
                        headers=item.headers,
                    )
                except Exception as exc:  # resent when its acknowledgement is overdue
                    self._last_error = str(exc) or type(exc).__name__

    async def _ensure_stream(self, timeout: float) -> None:
        """Create ``FG_MSGS`` unless it exists (every node tries; the first one wins), trying
        again until ``timeout``: a cluster that just started, or a stream another node has
        just made, may not answer yet (one attempt within the connect timeout was not enough
        for a busy machine's fresh cluster)."""
        from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig

        from broker.fabric.streams import ensure_stream

        assert self._nc is not None
        js = self._nc.jetstream(timeout=self.settings.connect_timeout_s)
        config = StreamConfig(
            name=STREAM,
            subjects=[STREAM_PREFIX + ">"],
            retention=RetentionPolicy.LIMITS,
            storage=StorageType.FILE,
            num_replicas=self.settings.replicas,
            max_age=self.settings.stream_max_age_s,
            max_bytes=self.settings.stream_max_bytes,
            discard=DiscardPolicy.NEW,  # full: refuse new ones, never drop acknowledged ones
            duplicate_window=DUPLICATE_WINDOW_S,
        )
        try:
            limits = ("max_age", "max_bytes", "discard")
            info = await ensure_stream(js, config, timeout, limits=limits)
        except FabricUnavailable:
            await self._nc.close()
            raise
        if info.config.num_replicas != self.settings.replicas:
            log.warning(
                "stream %s has %s replicas, [fabric] replicas says %s",
                STREAM,
                info.config.num_replicas,
                self.settings.replicas,
            )

    async def _on_ack(self, msg: Msg) -> None:
        """The stream's answer to one of this node's messages."""
        status = msg.headers.get("Status") if msg.headers else None
        number = self.ledger.answered(msg.subject, msg.data, status)
        if number is None:  # an error or a 503: resent when overdue, unless the stream is full
            if status is None and refused_as_full(msg.data):
                self._stream_full(msg.subject)
            return
        item = self.ledger.pending.pop(number)
        self.stored += 1
        now = self._clock()
        item.on_stored(True, now)
        self._answered(now)
        self._wake()
        if self.ledger.holding:  # the oldest one stored? then the rest follow, in order
            self._send_again(self.ledger.release())

    def _send_again(self, numbers: list[int]) -> None:
        """Queue ledger messages to be sent to the stream again, in the order given."""
        if numbers:
            self.resent += len(numbers)
            for number in numbers:
                self.ledger.pending[number].last_sent = None  # not overdue while queued
            self._stored_outbox.extend(numbers)
            self._outbox_ready.set()

    def _answered(self, now: float) -> None:
        if self.availability.answered(now):
            log.warning(
                "fabric available again: QoS 1/2 publishes are taken",
                extra={"node": self.name, "stream": STREAM},
            )

    async def _probe_stream(self) -> None:
        """While down and linked: does the stream's leader answer again?"""
        assert self._nc is not None
        try:
            await self._nc.jetstream(timeout=1.0).stream_info(STREAM)
        except Exception as exc:
            self._last_error = str(exc) or type(exc).__name__
            await asyncio.sleep(0.5)  # one probe a second at most
        else:
            self._answered(self._clock())

    def _check_availability(self, now: float) -> None:
        """Declare the fabric down (refusing QoS 1/2 at once, giving up what waits), or probe
        it while it is."""
        assert self._nc is not None
        available = self.availability
        if available.check(self._nc.is_connected, self.ledger.oldest(), now):
            log.error(
                "fabric down: QoS 1/2 publishes refused until %s answers (%s)",
                STREAM,
                available.reason,
                extra={"node": self.name, "reason": self._last_error},
            )
            self._give_up(list(self.ledger.pending), now)
        if available.down and self._nc.is_connected and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._probe_stream())

    def _stream_full(self, reply_subject: str) -> None:
        """FG_MSGS refused a message for its cap: that one is given up (0x83 or a close, as
        any store error), and new QoS 1/2 ones are refused at once until it has room."""
        number, now = self.ledger.number(reply_subject), self._clock()
        item = self.ledger.pending.get(number) if number is not None else None
        if number is not None and item is not None:
            self._give_up([number], now)
        self._answered(now)  # the stream's leader answers: the fabric is up
        if self.room.filled(item.stored_size() if item is not None else 0):
            log.error(
                "fabric: %s is full (stream_max_bytes %d): QoS 1/2 publishes refused until it "
                "has room",
                STREAM,
                self.room.max_bytes,
                extra={"node": self.name, "stream": STREAM},
            )

    def _refuse_full(self, message: Message, now: float) -> None:
        self.room.refused += 1
        session = self._core.sessions.get(message.sender)
        device = session.device_id if session is not None else None
        record = self.room.refusal(device, message.topic, int(message.qos))
        self._core.refused(message.sender, "fabric.stream_full", record, now)

    async def _probe_room(self) -> None:
        """While FG_MSGS is full: has it room again (aged out, purged, a higher cap)?"""
        assert self._nc is not None
        try:
            info = await self._nc.jetstream(timeout=1.0).stream_info(STREAM)
        except Exception as exc:
            self._last_error = str(exc) or type(exc).__name__
        else:
            cap = info.config.max_bytes or -1
            if self.room.measured(info.state.bytes, cap):
                log.warning(
                    "fabric: %s has room again (%d of %d bytes): QoS 1/2 publishes are taken",
                    STREAM,
                    info.state.bytes,
                    cap,
                    extra={"node": self.name, "stream": STREAM},
                )
        await asyncio.sleep(1.0)  # one probe a second at most

    def _give_up(self, numbers: list[int], now: float) -> None:
        for number in numbers:
            self.ledger.pending.pop(number).on_stored(False, now)
        self.not_stored += len(numbers)
        if numbers:
            self._wake()
            if self.ledger.holding:  # the oldest given up (a full stream): the rest go on
                self._send_again(self.ledger.release())

    async def _watch_stored(self) -> None:
        """Resend overdue messages (same Nats-Msg-Id) one at a time, oldest first, holding
        the rest so none overtakes it (:meth:`DurableLedger.due`); give up on the hopeless."""
        ledger = self.ledger
        while True:
            await asyncio.sleep(min(0.25, ledger.ack_timeout_s / 4))
            now = self._clock()
            self._check_availability(now)
            if self.room.full and (self._room_probe is None or self._room_probe.done()):
                self._room_probe = asyncio.get_running_loop().create_task(self._probe_room())
            resend, failed = ledger.due(now)
            self._give_up(failed, now)
            if failed:
                log.error(
                    "fabric: %d message(s) not stored in %s within %.0f s",
                    len(failed),
                    STREAM,
                    ledger.give_up_s,
                    extra={"node": self.name, "reason": self._last_error},
                )
            if ledger.holding:  # queued ones not sent yet wait behind the oldest
                self._stored_outbox.clear()
            self._send_again(resend)

    # -- in: interest and delivery ---------------------------------------------------------------

    def _interest_gained(self, topic_filter: str) -> None:
        """A filter (or a shared subscription's key) got its first local subscriber."""
        self._interest.append((topic_filter, True))
        self._interest_ready.set()

    def _interest_lost(self, topic_filter: str) -> None:
        # At once: messages still arriving on its subscriptions are no longer routed.
        self._active.remove(topic_filter, topic_filter)
        self._canonical.clear()
        self._interest.append((topic_filter, False))
        self._interest_ready.set()

    async def _follow_interest(self) -> None:
        """Subscribe and unsubscribe in the order the core's filters changed."""
        assert self._nc is not None
        nc = self._nc
        while True:
            await self._interest_ready.wait()
            self._interest_ready.clear()
            while self._interest:
                f, wanted = self._interest.popleft()
                try:
                    if wanted and f not in self._nats_subs:
                        await self._subscribe(nc, f)
                    elif not wanted and f in self._nats_subs:
                        for sub in self._nats_subs[f]:
                            await sub.unsubscribe()
                        if f.startswith(SHARE_PREFIX) and self._share_nc is not None:
                            # The server has the UNSUB before anything else is published here:
                            # it stops picking this node for a group it has no member of.
                            await self._share_nc.flush()
                        del self._nats_subs[f]
                except Exception:
                    log.exception("fabric subscription change failed", extra={"filter": f})
            while self._handing:  # after the UNSUBs above: never back to this node's group
                subject, payload, headers = self._handing.popleft()
                try:
                    await nc.publish(subject, payload, headers=headers)
                except Exception as exc:  # at most once: count it, go on
                    self.dropped += 1
                    self._last_error = str(exc) or type(exc).__name__

    async def _subscribe(self, nc: NatsClient, topic_filter: str) -> None:
        if topic_filter.startswith(SHARE_PREFIX):
            await self._subscribe_shared(topic_filter)
            return

        async def on_message(msg: Msg) -> None:
            self._on_message(topic_filter, msg)

        self._nats_subs[topic_filter] = [
            await nc.subscribe(subject, cb=on_message)
            for subject in filter_to_subjects(topic_filter)
        ]
        await nc.flush()  # the server has the subscriptions: only now may this filter route
        assert self._tree is not None
        if self._tree.has(topic_filter):  # still wanted once the server had it
            self._active.add(topic_filter, topic_filter, _ANY)
            self._canonical.clear()

    async def _subscribe_shared(self, topic_filter: str) -> None:
        """Queue subscriptions for the shared subscription ``$share/<group>/<filter>``."""
        import nats

        key = topic_filter[len(SHARE_PREFIX) :]
        if self._share_nc is None:
            options = dict(self._options, no_echo=False, name=f"fleetgate-{self.name}-shared")
            self._share_nc = await nats.connect(**options)
        nc, queue = self._share_nc, queue_name(key)

        async def on_message(msg: Msg) -> None:
            self._on_message(key, msg, shared=True)

        async def on_handed(msg: Msg) -> None:
            self._on_handed(key, msg)

        subs = [
            await nc.subscribe(subject, queue=queue, cb=on_message)
            for subject in filter_to_subjects(key.partition("/")[2])
        ]
        subs.append(await nc.subscribe(f"{HAND_ON_PREFIX}{queue}.>", queue=queue, cb=on_handed))
        self._nats_subs[topic_filter] = subs
        await nc.flush()

    def _on_message(self, topic_filter: str, msg: Msg, *, shared: bool = False) -> None:
        """A message from another node (or a NATS-native publisher) for this node's clients;
        ``shared``: NATS picked this node for it in the queue group of the shared subscription
        ``topic_filter`` (its key), and one local member gets it."""
        now = self._clock()
        message = message_from_nats(msg.subject, msg.data, msg.headers, now)
        if message is None:
            self.dropped += 1
            return
        if shared:
            self._core.publish_shared(topic_filter, message, now)
        else:
            if self._canonical_filter(message.topic) != topic_filter:
                return  # another of this node's filters routes this copy
            self._core.publish(message, now)
        self.received += 1
        self._wake()

    def _hand_on(self, key: str, message: Message) -> bool:
        """A message for the shared subscription ``key`` that no member on this node can take
        (its session ended with it unacknowledged, or its last member here just left): to one
        other node of the group, on ``$FG.share.<queue>.<subject>`` in the same queue group.
        Core NATS: at most once, and dropped there if that node cannot place it either."""
        try:
            subject = topic_to_subject(message.topic)
        except Unmappable:
            return False
        headers = nats_headers(message, self._clock())
        self._handing.append(
            (f"{HAND_ON_PREFIX}{queue_name(key)}.{subject}", message.payload, headers)
        )
        self._interest_ready.set()
        self.handed_on += 1
        return True

    def _on_handed(self, key: str, msg: Msg) -> None:
        """A message another node handed on to the group ``key``: to a member here, or none."""
        subject = msg.subject.split(".", 3)[3]  # $FG.share.<queue>.<subject>
        now = self._clock()
        message = message_from_nats(subject, msg.data, msg.headers, now)
        if message is None:
            self.dropped += 1
            return
        self._core.publish_shared(key, message, now, hand_on=False)
        self._wake()

    def _canonical_filter(self, topic: str) -> str:
        """The smallest active filter matching ``topic`` ("" if none), the one whose copy of a
        message is routed. Cached per topic until the active filters change."""
        found = self._canonical.get(topic)
        if found is None:
            matching = self._active.match(topic)
            found = min(f for f, _ in matching) if matching else ""
            if len(self._canonical) >= CANONICAL_CACHE:
                self._canonical.clear()
            self._canonical[topic] = found
        return found


def _server_version(nc: NatsClient) -> str:
    version = nc.connected_server_version
    return f"{version.major}.{version.minor}.{version.patch}"
