"""One client's network connection as a state machine: bytes and time in, bytes and actions out.

No sockets and no event loop here (the h11 shape): the I/O layer feeds :meth:`receive_data`, asks
the registry when it returns an :class:`AdmissionRequest` and answers with :meth:`admission_done`,
writes :meth:`take_output` and closes the transport once :attr:`closing` is set. Everything the
MQTT 3.1.1 and 5.0 specifications ask of a server's side of one connection lives here; what
connections share (routing, sessions, retained messages) is :class:`broker.core.BrokerCore`.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, replace
from enum import Enum

from broker.acl import DeviceAcl, outgrown
from broker.admission import Admitted, Identity, Refused, Unidentified
from broker.core import BrokerCore, CoreSettings, GateVerdict
from broker.limits import (
    DeviceLimits,
    Limit,
    TokenBucket,
    audit_text,
    granted_receive_maximum,
    topic_excess,
)
from broker.mqtt import (
    NO_PROPERTIES,
    Auth,
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    PlainPublish,
    Properties,
    ProtocolError,
    ProtocolLevel,
    PubAck,
    PubComp,
    Publish,
    PublishResponse,
    PubRec,
    PubRel,
    QoS,
    ReasonCode,
    RetainHandling,
    SubAck,
    Subscribe,
    UnsubAck,
    Unsubscribe,
    UnsupportedProtocolVersion,
    Will,
    encode,
    encode_publish,
    parse_shared_subscription,
)
from broker.routing import Message, SubscriptionOptions
from broker.session import NEVER_EXPIRES, Delivery, Session
from broker.shared import SharedDelivery
from enrollment.registry import AuditRecord, DeviceState

_V3 = ProtocolLevel.MQTT_3_1_1
_V5 = ProtocolLevel.MQTT_5
_R = ReasonCode
_ACL_MEMORY = 64
_PUBACK_HEAD = b"\x40\x02"
KEEP_ALIVE_GRACE = 1.5
"""A client silent for 1.5 times its keep-alive is gone (MQTT-3.1.2-24)."""
LINGER_QUIET_S = 1.0
LINGER_MAX_S = 5.0
"""A 3.1.1 connection closed for a full bridge queue, once its last acknowledgement is out,
stays open, reading and discarding, until its client has been quiet for ``LINGER_QUIET_S``
(checked at each tick; longer than a slow link's round trip) or for at most ``LINGER_MAX_S``.
A socket closed while its client's bytes are still arriving is reset by the kernel, and a reset
client loses the acknowledgements it had not read yet: a paho client busy resending thousands
of messages reads none until it has written them all (measured: 10,000 messages took 59,549
commits, six per message, when the close came as soon as the acknowledgements were out)."""
POLL_S = 0.5
"""How often a connection in a state without a fixed deadline is checked (the tick's period
before deadlines were kept in a heap)."""
MAX_REASON_STRING = 256
"""Reason strings quote what the client sent (a topic, a client id, up to 64 KiB and longer once
quoted): cut to this many characters, a UTF-8 string field holds only 65,535 bytes."""


def _reason_string(reason: str) -> Properties:
    if len(reason) > MAX_REASON_STRING:
        reason = reason[: MAX_REASON_STRING - 3] + "..."
    return Properties(reason_string=reason)


_CONNACKS: dict[tuple[ProtocolLevel, bool, CoreSettings, bool, int], bytes] = {}


def _connack_success(
    level: ProtocolLevel,
    present: bool,
    settings: CoreSettings,
    assigned: str | None,
    capped: bool = False,
    receive_maximum: int = 0,
) -> bytes:
    """The accepting CONNACK: the same few bytes for every client of a broker, so encoded (and
    checked by the codec) once per level, session-present flag, Receive Maximum granted (its
    group's) and whether it carries Server Keep Alive (``capped``: always the broker's
    ``max_keep_alive_s``), unless an id was assigned."""
    key = (level, present, settings, capped, receive_maximum)
    if assigned is None and (cached := _CONNACKS.get(key)) is not None:
        return cached
    properties = NO_PROPERTIES
    if level is _V5:
        properties = Properties(
            receive_maximum=receive_maximum or settings.receive_maximum,
            maximum_packet_size=settings.max_packet_size,
            topic_alias_maximum=settings.topic_alias_maximum,
            shared_subscription_available=True,
            assigned_client_identifier=assigned,
            server_keep_alive=settings.max_keep_alive_s if capped else None,
        )
    data = encode(ConnAck(session_present=present, properties=properties), level)
    if assigned is None:
        _CONNACKS[key] = data
    return data


class State(Enum):
    AWAITING_CONNECT = "awaiting CONNECT"
    ADMITTING = "admitting"  # CONNECT read; the registry is being asked
    CONNECTED = "connected"
    DRAINING = "closing after its held acknowledgements"  # reads nothing more but PINGREQ
    CLOSED = "closed"


# Module constants for the per-message path: reading a member off an enum class costs about
# 0.15 µs in Python 3.11, several times per message.
_CONNECTED = State.CONNECTED
_DRAINING = State.DRAINING
_LIVE = (State.AWAITING_CONNECT, State.CONNECTED)
_QOS0 = QoS.AT_MOST_ONCE
_QOS1 = QoS.AT_LEAST_ONCE
_QOS2 = QoS.EXACTLY_ONCE
_SUCCESS = ReasonCode.SUCCESS
_HOLD = GateVerdict.HOLD
_ROUTE = GateVerdict.ROUTE
_LOOP = GateVerdict.LOOP
_NOT_HELD = frozenset({PubAck, PubRec, PubRel, PubComp, PingReq})
MAX_DEFERRED = 32
"""Packets a client held by a full queue may send meanwhile (besides acknowledgements and
pings, which are processed) before the broker stops reading it: at most this many packets of
``max_packet_size`` each are buffered per held client. Its QoS 1/2 PUBLISHes are bounded sooner,
by its Receive Maximum (:func:`broker.limits.granted_receive_maximum`)."""


def _qos_of(item: Packet | PlainPublish) -> int:
    """The QoS of a PUBLISH as the decoder gives it (a plain one's fields, or a Publish); 0 for
    any other packet."""
    if isinstance(item, tuple):
        return item[2]
    if isinstance(item, Publish):
        return item.qos
    return 0


class _HeldAck:
    """A PUBACK/PUBREC held until the bridge's queue has the message on disk; later
    acknowledgements wait behind it, so the client sees them in the order it published."""

    __slots__ = ("conn", "packet", "ready")

    def __init__(
        self, conn: Connection, packet: PubAck | PubRec | bytes | None = None, ready: bool = False
    ) -> None:
        self.conn = conn
        self.packet = packet
        self.ready = ready

    def stored(self, ok: bool, now: float) -> None:
        self.conn._ack_stored(self, ok, now)


@dataclass(frozen=True, slots=True)
class AdmissionRequest:
    """Ask the registry whether this identity may connect, then call ``admission_done``."""

    identity: Identity
    will_topic: str | None


class Connection:
    """The server side of one MQTT connection."""

    __slots__ = (
        "_ahead",
        "_aliases",
        "_allowed",
        "_connect",
        "_created",
        "_decoder",
        "_deferred",
        "_deferred_publishes",
        "_drained_at",
        "_held",
        "_holders",
        "_out",
        "_out_alias_limit",
        "_out_aliases",
        "_pressure_ack",
        "_publish_rate",
        "_receive_maximum",
        "_send_window",
        "_stalled",
        "_will",
        "acl",
        "client_id",
        "closing",
        "core",
        "group",
        "identity",
        "keep_alive",
        "last_received",
        "level",
        "limits",
        "listener",
        "max_send_size",
        "peer",
        "resume_at",
        "session",
        "state",
        "writable",
    )

    def __init__(
        self,
        core: BrokerCore,
        *,
        peer: str,
        identity: Identity | Unidentified,
        listener: str,
        now: float,
    ) -> None:
        self.core = core
        self.peer = peer
        self.identity = identity
        self.listener = listener
        self.state = State.AWAITING_CONNECT
        self.level: ProtocolLevel = _V3  # until CONNECT says otherwise
        self.client_id = ""
        self.group = ""
        self.acl: DeviceAcl | None = None
        self.session: Session | None = None
        self.keep_alive = 0
        self.last_received = now
        self.closing = False
        self.writable = True
        self.max_send_size: int | None = None
        self._created = now
        self._decoder = Decoder(max_packet_size=core.settings.max_packet_size)
        self._out: list[bytes] = []
        self._connect: Connect | None = None
        self._will: Will | None = None
        self._aliases: dict[int, str] = {}
        self._out_aliases: dict[str, int] | None = None  # set if the client takes aliases
        self._out_alias_limit = 0
        self._allowed: dict[str, ReasonCode] = {}
        self._send_window = core.settings.receive_maximum
        self._held: deque[_HeldAck] = deque()
        # Fabric mode, persistent session: QoS 2 packets held until the session record names
        # them (number of the record write, bytes), in order (:meth:`recorded`).
        self._ahead: deque[tuple[int, bytes]] = deque()
        self.limits: DeviceLimits = core.limits.default  # its group's once admitted
        self._publish_rate = TokenBucket(self.limits.publish_rate, self.limits.publish_burst, now)
        self._stalled: Packet | PlainPublish | None = None
        self.resume_at: float | None = None
        """Set while a PUBLISH waits for the publish rate: read nothing until then, and call
        :meth:`resume`."""
        self._drained_at: float | None = None  # draining: when the last held ack went out
        # Backpressure: the sessions whose full queue holds this publisher, the acknowledgement
        # held for them, and the packets read meanwhile that wait (all but acks and pings).
        self._holders: set[Session] = set()
        self._pressure_ack: _HeldAck | None = None
        self._deferred: deque[Packet | PlainPublish] = deque()
        self._deferred_publishes = 0  # QoS 1/2 PUBLISHes among them
        self._receive_maximum = granted_receive_maximum(
            self.limits, core.settings.receive_maximum
        )  # its group's once admitted
        core.connections.add(self)
        core.recheck(self, now)

    @property
    def device_id(self) -> str:
        return self.identity.device_id if isinstance(self.identity, Identity) else ""

    # -- the I/O layer's side ------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> AdmissionRequest | None:
        """Bytes from the client; returns a request when CONNECT needs the registry's verdict."""
        if self.state is State.CLOSED:
            return None
        self.last_received = now
        self._decoder.feed(data)
        if self.state is _DRAINING:
            self._ignore(now)
            return None
        if self.resume_at is not None:  # bytes read before the transport paused: kept
            return None
        return self._process(now)

    def resume(self, now: float) -> None:
        """The time :attr:`resume_at` named has come: go on with the buffered packets (which
        may stall again)."""
        if self.resume_at is not None:
            self.resume_at = None
            self.last_received = now  # the keep-alive counts from when reading resumed
            self._process(now)

    @property
    def held_back(self) -> bool:
        """Held by a full queue with :data:`MAX_DEFERRED` packets waiting (MQTT 3.1.1: or its
        Receive Maximum of PUBLISHes unacknowledged): read nothing more until
        :meth:`resume_publishing` (TCP backpressure)."""
        return bool(self._holders) and self._read_paused()

    def _read_paused(self) -> bool:
        """While held: whether nothing more may be read. An MQTT 5 client is read on up to
        :data:`MAX_DEFERRED` packets, so its acknowledgements go on and a PUBLISH beyond its
        Receive Maximum is seen (and refused, :meth:`_defer`); a 3.1.1 client was granted no
        Receive Maximum, so it is not read once that many of its PUBLISHes wait."""
        return len(self._deferred) >= MAX_DEFERRED or (
            self.level is _V3 and self._unacknowledged() >= self._receive_maximum
        )

    def _unacknowledged(self) -> int:
        """QoS 1/2 PUBLISHes received and not yet acknowledged (PUBACK, or PUBCOMP for QoS 2),
        as the Receive Maximum counts them: the one whose PUBACK a full queue holds, those
        deferred behind it, and QoS 2 flows before their PUBREL. PUBACKs a bridge holds until
        its disk write are not counted (:func:`broker.limits.granted_receive_maximum`)."""
        assert self.session is not None
        count = self._deferred_publishes + len(self.session.incoming_qos2)
        held = self._pressure_ack
        if held is not None and held.packet is not None and type(held.packet) is not PubRec:
            count += 1  # a PUBREC's flow is in incoming_qos2 already
        return count

    def hold_for(self, session: Session) -> None:
        """``session``'s full queue took this client's PUBLISH over its limit: keep that
        PUBLISH's acknowledgement and process no more of its PUBLISHes until released."""
        self._holders.add(session)

    def release_from(self, session: Session, now: float) -> None:
        """``session`` no longer holds this client; once none does, its acknowledgement goes
        out and :attr:`BrokerCore.released` asks the I/O layer for :meth:`resume_publishing`."""
        self._holders.discard(session)
        if self._holders:
            return
        held, self._pressure_ack = self._pressure_ack, None
        if held is not None and held.packet is not None and not held.ready:
            held.stored(True, now)
        self.core.released[self] = None

    def resume_publishing(self, now: float, budget: int = -1) -> bool:
        """Go on with the packets that waited while the client was held (it may be held
        again), at most ``budget`` of them (-1: all, then what is buffered after them); True
        if deferred packets remain for another call."""
        if self._holders or self.state is not _CONNECTED:
            return False
        self._process(now, budget)
        return bool(self._deferred) and not self._holders and self.resume_at is None

    def admission_done(self, result: Admitted | Refused, now: float) -> None:
        """The verdict on the CONNECT (:func:`broker.admission.decide_admission`); a connection
        closed meanwhile ignores it."""
        if self.state is not State.ADMITTING:
            return
        assert self._connect is not None
        if isinstance(result, Refused):
            if result.label == "will":
                self.core.metrics.acl_denials["will"] += 1
            self._refuse(result.code, result.reason, result.label)
            return
        self.group, self.acl = result.group, result.acl
        self.limits = limits = self.core.limits.for_group(result.group)
        self._publish_rate = TokenBucket(limits.publish_rate, limits.publish_burst, now)
        self._accept(self._connect, now)
        self._process(now)  # packets the client sent before its CONNACK (MQTT 5 section 3.1.4)

    def requested_session(self) -> tuple[str, bool, int]:
        """While admitting: (client id, clean start, session expiry interval) of the CONNECT,
        for the fabric to claim the session before the CONNACK."""
        assert self._connect is not None
        packet = self._connect
        if self.level is _V5:
            expiry = packet.properties.session_expiry_interval or 0
        else:
            expiry = 0 if packet.clean_start else NEVER_EXPIRES
        return self.client_id, packet.clean_start, expiry

    def recorded(self, number: int) -> None:
        """Fabric mode: the session record as of write ``number`` is stored, so the packets
        held for it (:meth:`_write_ahead`) go out, in the order they were made."""
        ahead = self._ahead
        while ahead and ahead[0][0] <= number:
            self._emit(ahead.popleft()[1])

    def _write_flow(self, packet: PubRec | PubRel, received: int | None = None) -> None:
        """A QoS 2 PUBREC or PUBREL: at once, or for a fabric session once the record names
        its packet id and stage (``received``: the id of a stored incoming message, for
        ``qos2_in``)."""
        session = self.session
        if session is None or session.fabric is None:
            self._write(packet)
        else:
            self._write_ahead(encode(packet, self.level, validate=False), received)

    def _write_ahead(self, data: bytes, received: int | None = None) -> None:
        """Hold a QoS 2 packet of a fabric session until the record naming its packet id and
        stage is written: a node killed meanwhile leaves a record the client's state agrees
        with (broker.fabric.sessions, "Exactly once")."""
        assert self.session is not None and self.session.fabric is not None
        self._ahead.append((self.session.fabric.write_ahead(received), data))

    def take_output(self) -> bytes:
        data = b"".join(self._out)
        self._out.clear()
        return data

    def connection_lost(self, now: float) -> None:
        """The transport is gone: an unexpected close publishes the will."""
        if self.state is not State.CLOSED:
            self._close(now, publish_will=True)

    def check_timeouts(self, now: float) -> None:
        if self.state is State.AWAITING_CONNECT:
            if now - self._created > self.core.settings.connect_timeout_s:
                self._close(now, publish_will=False)
        elif self.state is _DRAINING:
            drained = self._drained_at
            if drained is not None and (
                now - max(drained, self.last_received) >= LINGER_QUIET_S
                or now - drained >= LINGER_MAX_S
            ):
                self._close(now, publish_will=False)
        elif (
            self.state is State.CONNECTED
            and self.keep_alive
            and self.resume_at is None  # not read by choice (publish rate): not silent
            and not self._holders  # nor while held by a full queue
            and now - self.last_received > KEEP_ALIVE_GRACE * self.keep_alive
        ):
            self._disconnect(_R.KEEP_ALIVE_TIMEOUT, "keep-alive timeout", now, publish_will=True)

    def next_check(self, now: float) -> float | None:
        """When :meth:`check_timeouts` next has something to decide (its deadlines, sooner
        rather than later); None: nothing until the connection's state changes, which
        reschedules it (:meth:`BrokerCore.recheck`). A state without a fixed deadline (draining
        before its acks are out, paced or held) is polled every ``POLL_S``."""
        state = self.state
        if state is State.AWAITING_CONNECT:
            return self._created + self.core.settings.connect_timeout_s
        if state is State.CLOSED:
            return None
        if state is _DRAINING:
            drained = self._drained_at
            if drained is None:
                return now + POLL_S
            return min(max(drained, self.last_received) + LINGER_QUIET_S, drained + LINGER_MAX_S)
        if self.resume_at is not None or self._holders:
            return now + POLL_S
        if not self.keep_alive:
            return None
        return self.last_received + KEEP_ALIVE_GRACE * self.keep_alive

    def take_over(self, now: float) -> None:
        """Another connection claimed this client id (MQTT-3.1.4-3)."""
        self._disconnect(_R.SESSION_TAKEN_OVER, "session taken over", now, publish_will=True)

    def kick(self, state: DeviceState, reason: str, now: float) -> bool:
        """The device was revoked or suspended: close its session without its will.

        Only a connected session is kicked; True if it was. A connection still before its
        CONNACK is left to admission, which reads the new state (or, if it read the registry
        just before the change, is stopped by the feed's ``barred_since``), so the client is
        told why with a refusing CONNACK instead of losing the connection unexplained.
        """
        if self.state is not State.CONNECTED:
            return False
        self.core.audit(
            AuditRecord(
                self._actor(), "mqtt.kick", "ok", self.device_id, f"device {state}: {reason}"
            )
        )
        self.core.metrics.kicks[state.value] += 1
        self._disconnect(_R.ADMINISTRATIVE_ACTION, f"device {state}", now, publish_will=False)
        return True

    def apply_policy(self, group: str, acl: DeviceAcl, now: float) -> bool | None:
        """The device's group or its group's ACL changed while it is connected: True if the
        session was closed, False if it goes on, None if it is not connected (an admission
        under way reads the registry again, ``Broker._admit_in_thread``).

        From now on its PUBLISHes and SUBSCRIBEs are judged by ``acl`` (the remembered publish
        verdicts are forgotten). A session holding a subscription or a will the new ACL
        refuses (:func:`broker.acl.outgrown`) is closed without its will, its device told why
        (MQTT 5: DISCONNECT 0x87 with the reason; 3.1.1 has no server DISCONNECT: the
        connection closes), and the session is discarded: messages queued for it may have come
        through a filter it may no longer hold. Limits stay those of the group it connected
        under until it reconnects.
        """
        if self.state is not State.CONNECTED:
            return None
        session = self.session
        assert session is not None
        refused = outgrown(acl, session.subscriptions, self._will.topic if self._will else None)
        self.group, self.acl = group, acl
        self._allowed.clear()
        if refused is None:
            return False
        reason = refused.describe(group)
        self.core.audit(
            AuditRecord(self._actor(), "mqtt.policy_kick", "ok", self.device_id, reason)
        )
        self._disconnect(_R.NOT_AUTHORIZED, reason, now, publish_will=False)
        self.core.end_session(session, now)
        return True

    def shut_down(self, now: float) -> None:
        self._disconnect(_R.SERVER_SHUTTING_DOWN, "server shutting down", now, publish_will=False)

    # -- packets in ------------------------------------------------------------------------------

    def _process(self, now: float, budget: int = -1) -> AdmissionRequest | None:
        """Consume packets until none is complete, the client is stalled or held, or ``budget``
        deferred ones were (-1: no bound)."""
        decoder = self._decoder
        deferred = self._deferred
        while self.state in _LIVE:
            item = self._stalled
            if item is None:
                if deferred and not self._holders:
                    if not budget:
                        return None
                    budget -= 1
                    item = deferred.popleft()
                    if _qos_of(item):
                        self._deferred_publishes -= 1
                else:
                    if self._holders and self._read_paused():
                        return None  # held: read nothing more (held_back)
                    try:
                        item = decoder.next_item()
                    except ProtocolError as exc:
                        self._protocol_error(exc, now)
                        return None
                    if item is None:
                        return None
            else:
                self._stalled = None
            kind = type(item)
            # Held by a full queue: acknowledgements and pings go on (a held client that also
            # subscribes keeps draining its own queue), the rest waits in order.
            if self._holders and kind not in _NOT_HELD:
                if not self._defer(item, now):
                    return None
                continue
            # Over the publish rate: stop here, and let TCP slow the device down.
            if (kind is tuple or kind is Publish) and (wait := self._publish_rate.take(now)):
                self._stall(item, now, wait)
                return None
            if kind is tuple:  # the hot path: a plain PUBLISH's fields, without a Publish
                topic, payload, qos, retain, dup, packet_id = item  # type: ignore[misc]
                self._on_publish(topic, payload, qos, retain, dup, packet_id, NO_PROPERTIES, now)
            elif kind is Connect:
                return self._on_connect(item, now)  # type: ignore[arg-type]
            else:
                self._on_packet(item, now)  # type: ignore[arg-type]
        return None

    def _defer(self, item: Packet | PlainPublish, now: float) -> bool:
        """Keep ``item`` until the full queue holding this client lets it go; False if it is a
        PUBLISH beyond the client's Receive Maximum: an MQTT 5 client is then disconnected
        (0x93). A 3.1.1 client is not read that far (:meth:`_read_paused`)."""
        if _qos_of(item):
            if self._unacknowledged() >= self._receive_maximum:
                self._violation(
                    _R.RECEIVE_MAXIMUM_EXCEEDED,
                    f"more than the Receive Maximum of {self._receive_maximum} QoS 1/2 "
                    f"PUBLISHes unacknowledged (group {self.group})",
                    now,
                )
                return False
            self._deferred_publishes += 1
        self._deferred.append(item)
        return True

    def _stall(self, item: Packet | PlainPublish, now: float, wait: float) -> None:
        """Keep ``item`` for :meth:`resume`; the I/O layer stops reading for ``wait`` s."""
        if self.resume_at is None and self._stalled is None:
            self.core.metrics.publish_pauses += 1
            self._refused(
                "mqtt.limit",
                Limit.PUBLISH_RATE,
                f"publishes faster than the {self.limits.publish_rate:g}/s of group "
                f"{self.group}: not read for a while (TCP backpressure)",
                now,
            )
        self._stalled = item
        self.resume_at = now + wait

    def _on_packet(self, packet: Packet, now: float) -> None:
        match packet:
            case Publish():
                self._on_publish(
                    packet.topic,
                    packet.payload,
                    packet.qos,
                    packet.retain,
                    packet.dup,
                    packet.packet_id,
                    packet.properties,
                    now,
                )
            case PubAck():
                self._finish(packet.packet_id, now, released=False, qos=QoS.AT_LEAST_ONCE)
            case PubComp():
                self._finish(packet.packet_id, now, released=True, qos=QoS.EXACTLY_ONCE)
            case PubRec():
                self._on_pubrec(packet, now)
            case PubRel():
                self._on_pubrel(packet)
            case Subscribe():
                self._on_subscribe(packet, now)
            case Unsubscribe():
                self._on_unsubscribe(packet)
            case PingReq():
                self._write(PingResp())
            case Disconnect():
                self._on_disconnect(packet, now)
            case Auth():
                self._violation(_R.PROTOCOL_ERROR, "AUTH without an authentication method", now)
            case _:
                name = type(packet).__name__.upper()
                self._violation(_R.PROTOCOL_ERROR, f"a client may not send {name}", now)

    def _on_connect(self, packet: Connect, now: float) -> AdmissionRequest | None:
        level = self._decoder.protocol_level
        assert level is not None
        self.level = level
        identity = self.identity
        if isinstance(identity, Unidentified):
            self._refuse(_R.NOT_AUTHORIZED, identity.reason, "identity")
            return None
        if packet.properties.authentication_method is not None:
            self._refuse(
                _R.BAD_AUTHENTICATION_METHOD, "enhanced authentication is not supported", "auth"
            )
            return None
        client_id = packet.client_id
        if identity.client_id_bound:
            if client_id and client_id != identity.device_id:
                self._refuse(
                    _R.CLIENT_IDENTIFIER_NOT_VALID,
                    f"client id {client_id!r} is not the certificate's device id "
                    f"{identity.device_id!r}; use that id or an empty one",
                    "client_id",
                )
                return None
            client_id = identity.device_id
            # Before the registry is asked: a reconnect loop costs a handshake, not a query.
            if self.core.connect_rate.take(identity.device_id, now):
                self.core.metrics.limit_refusals[Limit.CONNECT_RATE] += 1
                self._refuse(
                    _R.CONNECTION_RATE_EXCEEDED if level is _V5 else _R.SERVER_UNAVAILABLE,
                    f"device {identity.device_id} connects more often than "
                    f"{self.core.limits.default.connect_rate:g}/s; retry later",
                    "connect_rate",
                )
                return None
        elif not client_id:
            if level is _V3 and not packet.clean_start:
                self._refuse(
                    _R.CLIENT_IDENTIFIER_NOT_VALID,
                    "an empty client id needs clean session (MQTT-3.1.3-8)",
                    "client_id",
                )
                return None
            client_id = self.core.assign_client_id()
        self.client_id = client_id
        self._connect = packet
        self.state = State.ADMITTING
        return AdmissionRequest(identity, packet.will.topic if packet.will else None)

    def _accept(self, packet: Connect, now: float) -> None:
        expiry = self.requested_session()[2]
        self._receive_maximum = granted_receive_maximum(
            self.limits, self.core.settings.receive_maximum
        )
        if self.level is _V5:
            self._send_window = min(
                packet.properties.receive_maximum or 0xFFFF,
                self.core.settings.receive_maximum,
                self.limits.max_inflight,
            )
            self.max_send_size = packet.properties.maximum_packet_size
            self._out_alias_limit = min(
                packet.properties.topic_alias_maximum or 0, self.core.settings.topic_alias_maximum
            )
            if self._out_alias_limit:
                self._out_aliases = {}
        else:
            self._send_window = min(self._send_window, self.limits.max_inflight)
        self.keep_alive = packet.keep_alive
        cap = self.core.settings.max_keep_alive_s
        # MQTT 5 only: a 3.1.1 client cannot be told a shorter keep-alive, and a broker that
        # enforced one would drop a client that pings exactly as it said it would.
        capped = self.level is _V5 and cap > 0 and not 0 < packet.keep_alive <= cap
        if capped:
            self.keep_alive = cap
        self._will = packet.will
        self._connect = None
        session, present = self.core.attach(
            self,
            self.client_id,
            clean_start=packet.clean_start or self._stored_session_outgrown(),
            expiry=expiry,
            now=now,
            limits=self.limits,
            will=packet.will,
        )
        self.session = session
        self.state = State.CONNECTED
        self.core.recheck(self, now)  # its keep-alive deadline from now on
        self.core.metrics.connections_total[self.listener] += 1
        assigned = self.client_id if self.client_id != packet.client_id else None
        self._emit(
            _connack_success(
                self.level, present, self.core.settings, assigned, capped, self._receive_maximum
            )
        )
        for packet_id, pending in list(session.inflight.items()):  # resume (MQTT-4.4.0-1)
            if isinstance(pending, Publish):
                self._write_publish(replace(pending, dup=True), packet_id)
            else:
                self._write(pending)
        self._drain(now)

    def _stored_session_outgrown(self) -> bool:
        """Whether the stored session this CONNECT would resume holds a subscription the ACL
        just admitted refuses (the policy changed while the device was away): it is then
        discarded, as :meth:`apply_policy` does for a live one, and the device starts clean
        (session present 0)."""
        stored = self.core.sessions.get(self.client_id)
        assert self.acl is not None
        refused = None if stored is None else outgrown(self.acl, stored.subscriptions, None)
        if refused is None:
            return False
        reason = f"stored session {self.client_id!r} discarded: {refused.describe(self.group)}"
        record = AuditRecord(self._actor(), "mqtt.policy_discard", "ok", self.device_id, reason)
        self.core.audit(record)
        return True

    def _on_publish(
        self,
        topic: str,
        payload: bytes,
        qos: QoS,
        retain: bool,
        dup: bool,
        packet_id: int | None,
        props: Properties,
        now: float,
    ) -> None:
        """A PUBLISH, as its fields: the common one comes from the decoder as a tuple."""
        assert self.session is not None and self.acl is not None
        alias = None if props is NO_PROPERTIES else props.topic_alias
        if alias is not None:
            if alias > self.core.settings.topic_alias_maximum:
                self._violation(_R.TOPIC_ALIAS_INVALID, f"topic alias {alias} is too large", now)
                return
            if topic:
                self._aliases[alias] = topic
            elif (known := self._aliases.get(alias)) is not None:
                topic = known
            else:
                self._violation(_R.PROTOCOL_ERROR, f"topic alias {alias} is not set", now)
                return
        self.core.metrics.messages_received[qos] += 1
        if qos == _QOS2:
            assert packet_id is not None
            if packet_id in self.session.incoming_qos2:
                if dup or self.session.fabric is None:  # a resend: delivered once already
                    self._write_flow(PubRec(packet_id=packet_id))
                    return
                # Not a resend (DUP 0): an id the record still listed after its PUBCOMP
                # (a node killed before the next checkpoint), taken again by the client.
                self.session.incoming_qos2.discard(packet_id)
            if self.level is _V5 and len(self.session.incoming_qos2) >= self._receive_maximum:
                self._violation(
                    _R.RECEIVE_MAXIMUM_EXCEEDED,
                    f"more than the Receive Maximum of {self._receive_maximum} QoS 2 "
                    f"PUBLISHes before their PUBREL (group {self.group})",
                    now,
                )
                return
        access = self._allowed.get(topic)
        if access is None:
            access = self._may_publish(topic)
        if access is not _SUCCESS:
            if access is _R.NOT_AUTHORIZED:
                self._deny("publish", topic, now)
            else:
                excess = topic_excess(topic, self.limits)
                assert excess is not None
                self._over_limit(excess, f"topic {audit_text(topic)!r}", now)
            self._answer_publish(packet_id, qos, access)
            return
        expires_at = None
        if props is not NO_PROPERTIES:
            expiry = props.message_expiry_interval
            if expiry is not None:
                expires_at = now + expiry
            if alias is not None or expiry is not None or props.subscription_identifiers:
                props = replace(
                    props,
                    topic_alias=None,
                    subscription_identifiers=(),
                    message_expiry_interval=None,
                )
        message = Message(topic, payload, qos, retain, props, self.client_id, expires_at)
        core = self.core
        owner = ""
        if retain:  # on the account of the device (the client id on the plaintext listener)
            owner = self.device_id or self.client_id
            if excess := core.retain_excess(owner, message, self.limits):
                self._over_limit(excess, f"retained message on {audit_text(topic)!r}", now)
                self._answer_publish(packet_id, qos, _R.QUOTA_EXCEEDED)
                return
        held: _HeldAck | None = None
        if core.gate is not None:
            held = _HeldAck(self)
            verdict = core.gate.offer(message, dup, held.stored)
            if verdict is not _HOLD:
                if verdict is _LOOP:  # an echo of a message this broker forwarded
                    self._answer_publish(packet_id, qos, _SUCCESS)
                    return
                if verdict is GateVerdict.INVALID:  # fabric mode: no NATS subject for it
                    self._unmappable("publish", topic, now)
                    self._answer_publish(packet_id, qos, _R.TOPIC_NAME_INVALID)
                    return
                if verdict is not _ROUTE:  # FULL
                    self._queue_full(packet_id, qos, now)
                    return
                held = None
        core.publish(message, now, owner=owner, publisher=self)
        if self._holders and held is None:  # a full queue took it: hold its acknowledgement
            held = self._pressure_ack = _HeldAck(self)
        self._answer_publish(packet_id, qos, _SUCCESS, held)

    def _queue_full(self, packet_id: int | None, qos: QoS, now: float) -> None:
        """A bridge's queue is full: MQTT 5 gets PUBACK/PUBREC 0x97; 3.1.1 cannot refuse a
        message, so the connection is closed without acknowledging it (the client keeps it
        and resends it on reconnect), after acknowledging those queued before it
        (:meth:`_close_after_acks`). QoS 0 is dropped (the gate counted it)."""
        if qos == _QOS0:
            return
        if self.level is _V5:
            self._answer_publish(packet_id, qos, _R.QUOTA_EXCEEDED)
        else:
            self._close_after_acks(now)

    def _may_publish(self, topic: str) -> ReasonCode:
        """Whether ``topic`` is within the group's topic limits and the ACL (success, quota
        exceeded, not authorized), for a topic not in ``_allowed`` yet, remembered there: a
        device publishes to a handful of topics, over and over; a policy change forgets them
        (:meth:`apply_policy`)."""
        assert self.acl is not None
        if topic_excess(topic, self.limits) is not None:
            access = _R.QUOTA_EXCEEDED
        else:
            access = _SUCCESS if self.acl.may_publish(topic) else _R.NOT_AUTHORIZED
        if len(self._allowed) >= _ACL_MEMORY:
            self._allowed.clear()
        self._allowed[topic] = access
        return access

    def _answer_publish(
        self, packet_id: int | None, qos: QoS, code: ReasonCode, held: _HeldAck | None = None
    ) -> None:
        """PUBACK/PUBREC with ``code`` on MQTT 5; 3.1.1 has no refusal, so a refused message is
        acknowledged as if delivered, as Mosquitto does, and the client is not left waiting.
        ``held`` keeps the acknowledgement until the bridge stored the message."""
        assert self.session is not None
        if packet_id is None:
            return
        if self.level is _V3:
            code = _SUCCESS
        ack: PubAck | PubRec | bytes
        if qos == _QOS1:
            if code == _SUCCESS:
                # PUBACK, success, no properties: the same bytes at either level.
                ack = _PUBACK_HEAD + packet_id.to_bytes(2, "big")
                if held is None and not self._held:
                    self._emit(ack)
                    return
            else:
                ack = PubAck(packet_id=packet_id, reason_code=code)
        else:
            if code == _SUCCESS:
                self.session.incoming_qos2.add(packet_id)
            ack = PubRec(packet_id=packet_id, reason_code=code)
        if held is not None:
            held.packet = ack
            self._held.append(held)
        elif self._held:
            self._held.append(_HeldAck(self, ack, True))
        elif isinstance(ack, bytes):
            self._emit(ack)
        else:
            self._write(ack)

    def _ack_stored(self, held: _HeldAck, ok: bool, now: float) -> None:
        """The bridge's write for ``held`` finished: release it and those queued behind it."""
        state = self.state
        if (state is not _CONNECTED and state is not _DRAINING) or held.packet is None:
            return
        if not ok:
            if self.level is _V3:  # no way to say "not stored": the client resends on reconnect
                self._disconnect(_R.UNSPECIFIED_ERROR, "bridge queue write failed", now)
                return
            error = _R.IMPLEMENTATION_SPECIFIC_ERROR
            if isinstance(held.packet, bytes):  # a success PUBACK's bytes: id in the last two
                held.packet = PubAck(packet_id=int.from_bytes(held.packet[2:4]), reason_code=error)
            else:
                held.packet = replace(held.packet, reason_code=error)
                if type(held.packet) is PubRec and self.session is not None:
                    # The flow ends with the refusal: the id is free again (not a resend).
                    self.session.incoming_qos2.discard(held.packet.packet_id)
        held.ready = True
        queue = self._held
        while queue and queue[0].ready:
            packet = queue.popleft().packet
            if type(packet) is bytes:  # a success PUBACK, the hot path: its four bytes as is
                self._emit(packet)
            elif type(packet) is PubRec and packet.reason_code == _SUCCESS:
                self._write_flow(packet, received=packet.packet_id)  # the message is stored
            else:
                assert packet is not None and not isinstance(packet, bytes)
                self._write(packet)
        if state is _DRAINING and not queue:
            self._drained_at = now  # closed once the client is quiet (LINGER_QUIET_S)
            self.core.recheck(self, now)

    def _on_pubrel(self, packet: PubRel) -> None:
        assert self.session is not None
        known = packet.packet_id in self.session.incoming_qos2
        self.session.incoming_qos2.discard(packet.packet_id)
        code = _R.SUCCESS if known or self.level is _V3 else _R.PACKET_IDENTIFIER_NOT_FOUND
        self._write(PubComp(packet_id=packet.packet_id, reason_code=code))

    def _on_pubrec(self, packet: PubRec, now: float) -> None:
        assert self.session is not None
        if packet.reason_code >= 0x80:  # the client refused the message: the flow ends here
            self._finish(packet.packet_id, now, released=False, qos=QoS.EXACTLY_ONCE)
            return
        pending = self.session.inflight.get(packet.packet_id)
        if isinstance(pending, Publish) and pending.qos == QoS.EXACTLY_ONCE:
            pending = PubRel(packet_id=packet.packet_id)
            self.session.inflight[packet.packet_id] = pending
        if isinstance(pending, PubRel):  # fabric: once the record says "PUBREL sent"
            self._write_flow(pending)
        elif pending is None:
            code = _R.SUCCESS if self.level is _V3 else _R.PACKET_IDENTIFIER_NOT_FOUND
            self._write(PubRel(packet_id=packet.packet_id, reason_code=code))

    def _finish(self, packet_id: int, now: float, *, released: bool, qos: QoS) -> None:
        """PUBACK ends QoS 1, PUBCOMP (or a refusing PUBREC) ends QoS 2; the window moves on.
        An acknowledgement that matches no flow in that stage is ignored."""
        assert self.session is not None
        pending = self.session.inflight.get(packet_id)
        if pending is None or isinstance(pending, PubRel) != released:
            return
        if isinstance(pending, Publish) and pending.qos != qos:
            return
        del self.session.inflight[packet_id]
        self._drain(now)

    def _on_subscribe(self, packet: Subscribe, now: float) -> None:
        assert self.session is not None and self.acl is not None
        ids = packet.properties.subscription_identifiers
        subscription_id = ids[0] if ids else None
        codes: list[ReasonCode] = []
        retained: list[Delivery] = []
        v5 = self.level is _V5
        for sub in packet.subscriptions:
            topic_filter = sub.topic_filter
            # $share/<group>/<filter> (its form checked by the codec): the limits, the fabric's
            # mapping and the ACL judge <filter>; the share name counts against the length.
            shared = parse_shared_subscription(topic_filter)
            inner = topic_filter if shared is None else shared.topic_filter
            # Before the ACL: checking a 64 KiB filter against it would cost the CPU it bounds.
            excess = topic_excess(inner, self.limits)
            if excess is None and shared is not None:
                excess = topic_excess(shared.share_name, self.limits)  # one level: bytes only
            if excess is None and (
                len(self.session.subscriptions) >= self.limits.max_subscriptions
                and topic_filter not in self.session.subscriptions
            ):
                excess = Limit.SUBSCRIPTIONS
            if excess is not None:
                self._over_limit(excess, f"filter {audit_text(topic_filter)!r}", now)
                codes.append(_R.QUOTA_EXCEEDED if v5 else _R.UNSPECIFIED_ERROR)
                continue
            refusal = self.core.filter_refusal
            if refusal is not None and refusal(inner) is not None:  # fabric mode
                self._unmappable("subscribe", topic_filter, now)
                codes.append(_R.TOPIC_FILTER_INVALID if v5 else _R.UNSPECIFIED_ERROR)
                continue
            if not self.acl.may_subscribe(topic_filter):
                self._deny("subscribe", topic_filter, now)
                codes.append(_R.NOT_AUTHORIZED if v5 else _R.UNSPECIFIED_ERROR)
                continue
            options = SubscriptionOptions(
                qos=sub.qos,
                no_local=sub.no_local,
                retain_as_published=sub.retain_as_published,
                subscription_id=subscription_id,
            )
            new = self.core.subscribe(self.session, topic_filter, options)
            codes.append(_R(sub.qos))
            handling = sub.retain_handling
            if shared is None and (  # no retained messages on a shared one (MQTT 5 4.8.2)
                handling == RetainHandling.SEND_ON_SUBSCRIBE
                or (handling == RetainHandling.SEND_IF_NEW_SUBSCRIPTION and new)
            ):
                sub_ids = () if subscription_id is None else (subscription_id,)
                retained.extend(
                    Delivery(message, min(message.qos, sub.qos), True, sub_ids)
                    for message in self.core.retained.matching(topic_filter)
                )
        self._write(SubAck(packet_id=packet.packet_id, reason_codes=tuple(codes)))
        for delivery in retained:
            self.send(delivery, now)

    def _on_unsubscribe(self, packet: Unsubscribe) -> None:
        assert self.session is not None
        codes = tuple(
            _R.SUCCESS if self.core.unsubscribe(self.session, f) else _R.NO_SUBSCRIPTION_EXISTED
            for f in packet.topic_filters
        )
        self._write(
            UnsubAck(packet_id=packet.packet_id, reason_codes=codes if self.level is _V5 else ())
        )

    def _on_disconnect(self, packet: Disconnect, now: float) -> None:
        assert self.session is not None
        expiry = packet.properties.session_expiry_interval
        if expiry is not None:
            if self.session.expiry_interval == 0 and expiry != 0:
                self._violation(
                    _R.PROTOCOL_ERROR, "session expiry set on DISCONNECT after 0 on CONNECT", now
                )
                return
            self.session.expiry_interval = expiry
        with_will = packet.reason_code == _R.DISCONNECT_WITH_WILL_MESSAGE
        self._close(now, publish_will=with_will)

    # -- packets out -----------------------------------------------------------------------------

    def send(self, delivery: Delivery, now: float) -> None:
        """Deliver to this client: QoS 0 at once (dropped while its socket is backed up), QoS 1/2
        within its receive window, else behind the session's queue."""
        session = self.session
        if session is None or self.state is not _CONNECTED:
            return
        if delivery.qos == _QOS0:
            if self.writable:
                self._send_publish(delivery, None, now)
            else:
                self.core.metrics.dropped["slow_consumer"] += 1
        elif session.queue or len(session.inflight) >= self._send_window:
            self.core.enqueue(session, delivery, now)
        else:
            self._send_publish(delivery, session.next_packet_id(), now)

    def _drain(self, now: float) -> None:
        session = self.session
        assert session is not None
        while session.queue and len(session.inflight) < self._send_window:
            delivery = session.pop()
            self._send_publish(delivery, session.next_packet_id(), now)
        if session.held or session.shedding:
            self.core.drained(session, now)

    def _send_publish(self, delivery: Delivery, packet_id: int | None, now: float) -> None:
        message = delivery.message
        props = message.properties
        level = self.level
        if level is _V3:
            props = NO_PROPERTIES
        else:
            if message.expires_at is not None:
                remaining = message.expires_at - now
                if remaining <= 0:
                    self.core.metrics.dropped["expired"] += 1
                    return
                props = replace(props, message_expiry_interval=math.ceil(remaining))
            if delivery.subscription_ids:
                props = replace(props, subscription_identifiers=delivery.subscription_ids)
        # Built from a validated message: encoded without the codec's checks or a Publish.
        aliases = self._out_aliases
        if aliases is None:
            data = encode_publish(
                message.topic,
                message.payload,
                delivery.qos,
                delivery.retain,
                packet_id,
                props,
                level,
            )
        else:
            data = self._encode_aliased(aliases, delivery, packet_id, props)
        if not self._fits(data, packet_id):
            return
        self.core.metrics.messages_sent[delivery.qos] += 1
        if packet_id is None:
            self._emit(data)
            return
        session = self.session
        assert session is not None
        session.inflight[packet_id] = Publish(
            topic=message.topic,
            payload=message.payload,
            qos=delivery.qos,
            retain=delivery.retain,
            packet_id=packet_id,
            properties=props,
        )
        fabric = session.fabric
        if fabric is None:
            self._emit(data)
        else:
            fabric.sent(packet_id, delivery)
            if delivery.qos == _QOS2:
                self._write_ahead(data)
            else:
                self._emit(data)
        if type(delivery) is SharedDelivery:  # handed on if its session ends unacked
            self.core.shared.sent(session, packet_id, delivery)

    def _encode_aliased(
        self, aliases: dict[str, int], delivery: Delivery, packet_id: int | None, props: Properties
    ) -> bytes:
        """PUBLISH bytes for a client that takes topic aliases (MQTT 5 section 3.3.2.3.4): a
        topic with an alias goes as the alias and an empty name; a topic without one takes the
        next free alias, sent with its name, while fewer than the client's (and the broker's)
        maximum are in use. First come, kept for the connection: a device reads a handful of
        topics over and over, a hit costs one dict lookup, and a mapping never changes, so no
        later PUBLISH can reach the client before the one that set its alias. (LRU replacement
        would help only a client reading more topics than its maximum, at the price of resending
        names it evicts.) The alias is only kept once the packet fits the client's Maximum
        Packet Size: a dropped packet must not leave the client without the mapping."""
        message = delivery.message
        topic = message.topic
        alias = aliases.get(topic)
        if alias is not None:
            topic = ""
        elif len(aliases) < self._out_alias_limit:
            alias = len(aliases) + 1
        data = encode_publish(
            topic,
            message.payload,
            delivery.qos,
            delivery.retain,
            packet_id,
            props,
            _V5,
            topic_alias=alias,
        )
        fits = self.max_send_size is None or len(data) <= self.max_send_size
        if topic and alias is not None and fits:
            aliases[topic] = alias
        return data

    def _fits(self, data: bytes, packet_id: int | None) -> bool:
        """False if the packet exceeds the client's Maximum Packet Size: it is then dropped, as
        if delivered (MQTT-3.1.2-25)."""
        if self.max_send_size is not None and len(data) > self.max_send_size:
            self.core.metrics.dropped["too_large"] += 1
            if packet_id is not None and self.session is not None:
                self.session.inflight.pop(packet_id, None)
            return False
        return True

    def _write_publish(self, packet: Publish, packet_id: int | None) -> bool:
        """A stored PUBLISH again (resent with DUP on resume); False if it is too large."""
        data = encode(packet, self.level, validate=False)  # built from a validated message
        if not self._fits(data, packet_id):
            return False
        self.core.metrics.messages_sent[packet.qos] += 1
        self._emit(data)
        return True

    def _write(self, packet: Packet) -> None:
        # Acknowledgements are the per-message hot path and carry nothing but checked ids/codes.
        self._emit(encode(packet, self.level, validate=not isinstance(packet, PublishResponse)))

    def _emit(self, data: bytes) -> None:
        self._out.append(data)
        self.core.dirty.add(self)

    # -- refusals and closing ----------------------------------------------------------------------

    def _actor(self) -> str:
        return f"device:{self.device_id}" if self.device_id else f"peer:{self.peer}"

    def _refused(self, action: str, kind: str, reason: str, now: float) -> None:
        """Audit a refusal: collapsed per client and kind, bounded (:meth:`BrokerCore.refused`).
        Before CONNECT names a client, the certificate's device id or the peer's address and
        port stand for it."""
        client = self.client_id or self.device_id or self.peer
        record = AuditRecord(self._actor(), action, "refused", self.device_id or None, reason)
        self.core.refused(client, kind, record, now)

    def _deny(self, action: str, topic: str, now: float) -> None:
        self.core.metrics.acl_denials[action] += 1
        self._refused(
            f"mqtt.{action}",
            f"acl.{action}",
            f"topic {audit_text(topic)!r} is outside the ACL of group {self.group}",
            now,
        )

    def _unmappable(self, action: str, topic: str, now: float) -> None:
        """Fabric mode: a topic or filter with a character NATS cannot carry."""
        self._refused(
            f"mqtt.{action}",
            "fabric",
            f"topic {audit_text(topic)!r} has a character the fabric cannot carry "
            "(space, DEL, * >)",
            now,
        )

    def _over_limit(self, limit: str, what: str, now: float) -> None:
        """A request over one of the group's limits (:class:`broker.limits.Limit`)."""
        self.core.metrics.limit_refusals[limit] += 1
        value = getattr(self.limits, f"max_{limit}")  # each count or size limit's setting
        self._refused(
            "mqtt.limit",
            limit,
            f"{what}: over the {limit} limit ({value}) of group {self.group}",
            now,
        )

    def _violation(self, code: ReasonCode, reason: str, now: float) -> None:
        """The client broke the protocol after CONNECT: audited, counted, disconnected."""
        self.core.metrics.protocol_refusals[code.name.lower()] += 1
        self._refused("mqtt.protocol", code.name.lower(), reason, now)
        self._disconnect(code, audit_text(reason), now)

    def _refuse(self, code: ReasonCode | None, reason: str, label: str) -> None:
        """CONNACK with ``code`` (3.1.1: its return code; ``None``: no CONNACK), audited, close."""
        self.core.metrics.connect_refusals[label] += 1
        self._refused("mqtt.connect", f"connect.{label}", reason, self.last_received)
        reason = audit_text(reason)
        if code is not None:
            properties = _reason_string(reason) if self.level is _V5 else NO_PROPERTIES
            self._write(ConnAck(reason_code=code, properties=properties))
        self.core.dirty.add(self)
        self.state = State.CLOSED
        self.closing = True
        self.core.connections.discard(self)
        self.core.connection_deadlines.cancel(self)

    def _protocol_error(self, exc: ProtocolError, now: float) -> None:
        if self.state is State.AWAITING_CONNECT:
            level = self._decoder.protocol_level
            if isinstance(exc, UnsupportedProtocolVersion):  # MQTT-3.1.2-2
                self.level = _V5 if level is _V5 else _V3
                self._refuse(exc.reason_code, exc.message, "protocol")
            elif level is _V5:
                self.level = _V5
                self._refuse(exc.reason_code, exc.message, "protocol")
            else:  # a 3.1.1 server closes without CONNACK (MQTT-3.1.4-1)
                self._refuse(None, exc.message, "protocol")
            return
        self._violation(exc.reason_code, exc.message, now)

    def _disconnect(
        self, code: ReasonCode, reason: str, now: float, *, publish_will: bool = True
    ) -> None:
        """Close from the server side, telling an MQTT 5 client why (section 4.13)."""
        if self.state is State.CONNECTED and self.level is _V5:
            data = encode(Disconnect(reason_code=code, properties=_reason_string(reason)), _V5)
            if self.max_send_size is not None and len(data) > self.max_send_size:
                data = encode(Disconnect(reason_code=code), _V5)  # no reason (MQTT-3.14.2-3)
            self._emit(data)
        self._close(now, publish_will=publish_will)

    def _close_after_acks(self, now: float) -> None:
        """MQTT 3.1.1 cannot refuse one message, so the connection closes without acknowledging
        it; but the messages before it that the bridge committed (or is committing) are
        acknowledged first, each as its commit lands, and the close waits for the client to
        read them (``LINGER_QUIET_S``). Otherwise the client would resend them all on
        reconnect, to be committed and forwarded again, and lose their acknowledgements again
        at the next full queue: a resend storm that never ends (issue 11). Nothing more from
        the client is processed but PINGREQ; the session ends now, as on any close."""
        self.state = _DRAINING
        self.core.recheck(self, now)
        session, self.session = self.session, None
        if session is not None:
            self.core.detach(session, self._will, now)
        self._will = None
        if not self._held:
            self._drained_at = now

    def _ignore(self, now: float) -> None:
        """While draining: answer PINGREQ, so a client waiting for its acknowledgements keeps
        the connection, end on DISCONNECT or a protocol error, drop everything else unanswered
        (the client resends it on its next connection)."""
        decoder = self._decoder
        while self.state is _DRAINING:
            try:
                item = decoder.next_item()
            except ProtocolError:
                self._close(now, publish_will=False)
                return
            if item is None:
                return
            if type(item) is PingReq:
                self._write(PingResp())
            elif type(item) is Disconnect:
                self._close(now, publish_will=False)

    def _close(self, now: float, *, publish_will: bool) -> None:
        self._held.clear()  # never sent: the client resends those messages
        self._ahead.clear()  # never sent: the record (written at detach) has their stage
        if self._holders:
            self.core.forget_publisher(self, self._holders)
            self._holders.clear()
        self._pressure_ack = None
        self._deferred.clear()
        self._deferred_publishes = 0
        self.state = State.CLOSED
        self.closing = True
        self.core.dirty.add(self)
        self.core.connections.discard(self)
        self.core.connection_deadlines.cancel(self)
        session, self.session = self.session, None
        if session is not None:
            self.core.detach(session, self._will if publish_will else None, now)
        self._will = None
