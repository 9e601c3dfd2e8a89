"""Shared subscriptions (MQTT 5 section 4.8.2): ``$share/<group>/<filter>``; each message the
filter matches goes to one member of the group, not to each. Pure: who the members are, which
one takes a message, and which messages a member that leaves hands on.

A shared subscription is named by its *key*, ``<group>/<filter>`` (the filter without
``$share/``): ``$share/g/a/#`` and ``$share/g/a/+`` are two subscriptions, each of which gets
every matching message once (the spec's reading; Mosquitto's and EMQX's too).

**Which member.** Round-robin over the *ready* members: connected, socket writable, nothing
queued (a QoS 1/2 queue means its receive window is full). Round-robin costs O(1) while members
keep up and spreads evenly; skipping a member with a backlog keeps a slow consumer from piling
up messages the others could take at once (what least-loaded would buy, without scanning every
member per message). Only when no member is ready does the pick scan them all: the connected
member with the least queued and in flight, else (QoS 1/2 only) the away member with a
persistent session and the shortest queue. A QoS 0 message with no connected member is dropped.

**A member that leaves.** Its QoS 1/2 messages from shared subscriptions that it has not
acknowledged (queued behind its window, or sent and not yet PUBACKed/PUBRECed) go to another
member when its *session ends* (clean session, expiry, revocation, a takeover with clean start).
While a persistent session is merely disconnected they wait for it, as any session's do (the
spec's MAY wait). A QoS 2 message the leaver received but had not PUBRECed may so reach two
members: at least once, as the spec allows. In fabric mode a message no member on this node
can take is offered to the group's other nodes (``hand_on``); the messages live in the node's
memory only, so a node that dies loses them (docs/architecture.md, "QoS 1 across a member
leaving").
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from broker.mqtt import Publish, QoS
from broker.mqtt.packets import quick_init
from broker.routing import Message, SubscriptionOptions, SubscriptionTree
from broker.session import Delivery, Session
from fleetgate.topics import SHARE_PREFIX


def share_key(topic_filter: str) -> str | None:
    """``<group>/<filter>`` of a (validated) shared subscription; None for an ordinary one."""
    return topic_filter[len(SHARE_PREFIX) :] if topic_filter.startswith(SHARE_PREFIX) else None


def queue_name(key: str) -> str:
    """The NATS queue group of a shared subscription (fabric mode): one per group and filter.
    Hashed, as a share name may hold what a NATS queue name cannot (a space, say)."""
    return "fg-share-" + hashlib.sha256(key.encode()).hexdigest()[:32]


@quick_init
@dataclass(frozen=True, slots=True)
class SharedDelivery(Delivery):
    """A delivery through the shared subscription ``share`` (its key): handed on if unacked."""

    share: str = ""


class ShareGroup:
    """The members of one shared subscription, in the order they joined."""

    __slots__ = ("_cursor", "key", "members", "order")

    def __init__(self, key: str) -> None:
        self.key = key
        self.members: dict[str, SubscriptionOptions] = {}
        self.order: list[str] = []
        self._cursor = 0

    def choose(self, sessions: Mapping[str, Session], qos: QoS) -> Session | None:
        """The member to take a message of ``qos`` (module docstring), or None."""
        order = self.order
        count = len(order)
        for step in range(count):
            index = (self._cursor + step) % count
            session = sessions.get(order[index])
            if session is None:  # its session is ending: its subscriptions go next
                continue
            conn = session.connection
            if conn is not None and conn.writable and not session.queue:
                self._cursor = index + 1
                return session
        members = [s for client_id in order if (s := sessions.get(client_id)) is not None]
        connected = [s for s in members if s.connection is not None]
        if connected:
            return min(connected, key=lambda s: len(s.queue) + len(s.inflight))
        away = [s for s in members if s.expiry_interval]
        if away and qos != QoS.AT_MOST_ONCE:
            return min(away, key=lambda s: len(s.queue))
        return None


class SharedSubscriptions:
    """Every shared subscription of the broker, by key, and the messages members hold unacked.

    ``local`` is True in the embedded mode: :meth:`broker.core.BrokerCore.publish` routes each
    message to the matching groups itself. A fabric node sets it False and routes what its NATS
    queue subscriptions receive instead, one group at a time; ``on_first``/``on_last`` tell it
    when a key gains its first local member and loses its last.
    """

    def __init__(self) -> None:
        self._tree = SubscriptionTree()  # inner filter -> {key: options of no use}
        self.groups: dict[str, ShareGroup] = {}
        self.local = True
        self.on_first: Callable[[str], None] | None = None
        self.on_last: Callable[[str], None] | None = None
        # Fabric mode: offers a message no local member can take to the group's members on
        # other nodes (key, message); False if it could not be sent.
        self.hand_on: Callable[[str, Message], bool] | None = None
        self._sent: dict[str, dict[int, SharedDelivery]] = {}  # client id -> packet id -> sent

    def add(self, key: str, client_id: str, options: SubscriptionOptions) -> bool:
        """Join (or replace the options of) ``client_id``; True if it was not a member."""
        group = self.groups.get(key)
        if group is None:
            group = self.groups[key] = ShareGroup(key)
            self._tree.add(key.partition("/")[2], key, options)
            if self.on_first is not None:
                self.on_first(key)
        new = client_id not in group.members
        group.members[client_id] = options
        if new:
            group.order.append(client_id)
        return new

    def remove(self, key: str, client_id: str) -> bool:
        """Leave; False if ``client_id`` was no member."""
        group = self.groups.get(key)
        if group is None or group.members.pop(client_id, None) is None:
            return False
        group.order.remove(client_id)
        if not group.members:
            del self.groups[key]
            self._tree.remove(key.partition("/")[2], key)
            if self.on_last is not None:
                self.on_last(key)
        return True

    def matching(self, topic: str) -> list[ShareGroup]:
        """The groups whose filter matches ``topic``."""
        return [self.groups[key] for key, _ in self._tree.match(topic)]

    @staticmethod
    def delivery(group: ShareGroup, session: Session, message: Message) -> SharedDelivery:
        """What ``session``, picked in ``group``, gets of ``message`` (its QoS and flags as
        its own subscription grants them)."""
        options = group.members[session.client_id]
        return SharedDelivery(
            message,
            min(options.qos, message.qos),
            message.retain and options.retain_as_published,
            () if options.subscription_id is None else (options.subscription_id,),
            group.key,
        )

    def sent(self, session: Session, packet_id: int, delivery: SharedDelivery) -> None:
        """``delivery`` went out under ``packet_id``; kept until handed on or outdated (a
        packet id reused, the flow finished: pruned when the record outgrows what is in
        flight, so it stays bounded by the receive window)."""
        held = self._sent.setdefault(session.client_id, {})
        held[packet_id] = delivery
        if len(held) > 2 * len(session.inflight) + 64:
            self._sent[session.client_id] = {
                pid: d for pid, d in held.items() if _still_in_flight(session, pid, d)
            }

    def orphans(self, session: Session) -> list[SharedDelivery]:
        """The shared deliveries an ending ``session`` holds unacknowledged, oldest first:
        those in flight (not yet PUBACK/PUBREC), then those queued."""
        held = self._sent.pop(session.client_id, {})
        found = [d for pid, d in held.items() if _still_in_flight(session, pid, d)]
        found.extend(d for d in session.queue if type(d) is SharedDelivery)
        return found


def _still_in_flight(session: Session, packet_id: int, delivery: SharedDelivery) -> bool:
    """Whether ``packet_id`` still carries ``delivery``'s message unacknowledged (a PUBREL
    stage means the client has it; a reused id carries another message's payload object)."""
    pending = session.inflight.get(packet_id)
    message = delivery.message
    return (
        type(pending) is Publish
        and pending.payload is message.payload
        and pending.topic == message.topic
    )
