"""A client's session: the state MQTT keeps across network connections (spec section 4.1).

Subscriptions, outgoing QoS 1/2 messages not yet acknowledged (resent with DUP on resume),
messages queued while the client is away or its receive window is full, and the QoS 2 packet
ids received but not yet released. Pure data; :mod:`broker.core` decides when it changes.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from broker.limits import DeviceLimits
from broker.mqtt import Publish, PubRel, QoS, Will
from broker.mqtt.packets import quick_init
from broker.routing import Message, SubscriptionOptions, weight

if TYPE_CHECKING:
    from broker.connection import Connection

NEVER_EXPIRES = 0xFFFFFFFF
"""Session Expiry Interval meaning "keep the session for ever" (MQTT 5 section 3.1.2.11.2)."""


@quick_init
@dataclass(frozen=True, slots=True)
class Delivery:
    """A message on its way to one session, with the QoS and flags its subscriptions grant."""

    message: Message
    qos: QoS
    retain: bool
    subscription_ids: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class PendingWill:
    """A will waiting for its delay (or the end of the session, whichever comes first)."""

    due: float
    will: Will


class SessionFeedHook(Protocol):
    """What a connection tells the fabric about a persistent session's deliveries."""

    def sent(self, packet_id: int, delivery: Delivery) -> None: ...

    def write_ahead(self, received: int | None = None) -> int:
        """Ask for a record write covering the session as it is now; its number."""
        ...


class Session:
    """One client id's session; ``connection`` is ``None`` while the client is away."""

    __slots__ = (
        "_next_packet_id",
        "client_id",
        "connection",
        "device_id",
        "expires_at",
        "expiry_interval",
        "fabric",
        "held",
        "held_since",
        "incoming_qos2",
        "inflight",
        "limits",
        "overflowing",
        "pending_will",
        "queue",
        "queue_dropped",
        "queue_held",
        "queued_bytes",
        "shedding",
        "subscriptions",
    )

    def __init__(
        self, client_id: str, device_id: str, limits: DeviceLimits = DeviceLimits()
    ) -> None:
        self.client_id = client_id
        self.device_id = device_id
        self.limits = limits  # its group's, as of its latest connection
        self.subscriptions: dict[str, SubscriptionOptions] = {}
        # Outgoing QoS 1/2 in send order: the PUBLISH until PUBACK/PUBREC, then PUBREL (QoS 2).
        self.inflight: dict[int, Publish | PubRel] = {}
        self.queue: deque[Delivery] = deque()
        self.queued_bytes = 0
        self.queue_dropped = 0  # messages the full queue refused, for /metrics
        self.queue_held = 0  # publishes whose acknowledgement its full queue held, for /metrics
        self.overflowing = False  # from the first refused message until the queue empties
        # Backpressure (broker.core.BrokerCore.enqueue): the publishers its full queue holds,
        # since when, and whether it gave up holding them (max_backpressure_s) and drops new
        # messages until it has drained to half its limits.
        self.held: dict[Connection, None] = {}
        self.held_since: float | None = None
        self.shedding = False
        self.incoming_qos2: set[int] = set()
        self.expiry_interval = 0
        self.connection: Connection | None = None
        self.expires_at: float | None = None
        self.pending_will: PendingWill | None = None
        self._next_packet_id = 1
        # Fabric mode, persistent session (broker.fabric.sessions.SessionFeed): QoS 1/2 come
        # from the stream, and packet ids given to them are reported to it.
        self.fabric: SessionFeedHook | None = None

    def push(self, delivery: Delivery) -> None:
        self.queue.append(delivery)
        self.queued_bytes += weight(delivery.message)

    def pop(self) -> Delivery:
        """The oldest queued delivery; an empty queue ends an overflow episode."""
        delivery = self.queue.popleft()
        self.queued_bytes -= weight(delivery.message)
        if not self.queue:
            self.overflowing = False
        return delivery

    def clear_queue(self) -> None:
        self.queue.clear()
        self.queued_bytes = 0
        self.overflowing = False
        self.shedding = False

    def next_packet_id(self) -> int:
        """A packet id not in flight; the window is capped well below 65535, so one exists."""
        while True:
            packet_id = self._next_packet_id
            self._next_packet_id = packet_id % 0xFFFF + 1
            if packet_id not in self.inflight:
                return packet_id
