"""The broker's shared state and rules, without I/O: sessions, routing, retained messages, wills.

Connections (:mod:`broker.connection`) call in here when a packet needs the rest of the broker;
packets for other clients land in those clients' output buffers, and the connections with new
output are collected in :attr:`BrokerCore.dirty` for the I/O layer to write once per loop turn.
The clock is a number passed in (the event loop's monotonic time), so tests can drive it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from enum import Enum
from typing import TYPE_CHECKING, Protocol

from broker.acl import bind_acl
from broker.limits import (
    BACKPRESSURE,
    DROP_NEW,
    DROP_OLDEST,
    AuditThrottle,
    DeviceLimits,
    Limit,
    LimitSettings,
    RateLimiter,
    audit_text,
    retained_excess,
)
from broker.metrics import Metrics
from broker.mqtt import NO_PROPERTIES, QoS, Will
from broker.routing import (
    Message,
    RetainedMessages,
    SubscriptionOptions,
    SubscriptionTree,
    weight,
)
from broker.session import NEVER_EXPIRES, Delivery, PendingWill, Session
from broker.shared import SharedDelivery, SharedSubscriptions, share_key
from broker.timers import Deadlines
from enrollment.registry import AclPatterns, AuditRecord, DeviceState

if TYPE_CHECKING:
    from broker.connection import Connection

AuditSink = Callable[[AuditRecord], None]
AUDIT_REASON_CHARS = 1024
"""The longest reason a refusal's audit row keeps (its topic already bounded within it)."""


class GateVerdict(Enum):
    """What a :class:`PublishGate` says about a client's PUBLISH."""

    ROUTE = "route"  # not for a bridge: route it and acknowledge it now
    HOLD = "hold"  # route it now; acknowledge once the gate calls back (durably stored)
    LOOP = "loop"  # it came back from a bridge: acknowledge it, do not route it again
    FULL = "full"  # the bridge's queue is full: refuse it
    INVALID = "invalid"  # fabric mode: the topic has no NATS subject; refuse it (0x90)


class SessionHooks(Protocol):
    """Fabric mode (:mod:`broker.fabric.sessions`): persistent sessions kept in the fabric
    hear of every change the core makes to them."""

    def attached(self, session: Session, now: float) -> None: ...
    def detached(self, session: Session, now: float) -> None: ...
    def ended(self, session: Session, now: float) -> None: ...
    def subscribed(
        self, session: Session, topic_filter: str, options: SubscriptionOptions
    ) -> None: ...
    def unsubscribed(self, session: Session, topic_filter: str) -> None: ...


class PublishGate(Protocol):
    """Sees every authorised client PUBLISH before it is routed: the bridges (issue 5).

    For ``HOLD``, ``on_stored(True, now)`` comes later from the event loop once the message is
    committed, or ``on_stored(False, now)`` if it could not be.
    """

    def offer(
        self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]
    ) -> GateVerdict: ...


class WillKeeper(Protocol):
    """Fabric mode: keeps each session's will where a surviving node finds it if this node
    dies (:mod:`broker.fabric.wills`)."""

    def connected(self, session: Session, will: Will | None) -> None: ...

    def waiting(self, session: Session) -> None: ...

    def will_published(self, session: Session) -> None: ...


@dataclass(frozen=True)
class CoreSettings:
    """Limits of the protocol core; ``receive_maximum`` caps QoS 1/2 in flight each way,
    ``topic_alias_maximum`` the topic aliases each way, ``max_keep_alive_s`` (0: none) the
    keep-alive an MQTT 5 client gets (Server Keep Alive)."""

    max_packet_size: int = 256 * 1024
    max_queued_messages: int = 1000
    receive_maximum: int = 64
    topic_alias_maximum: int = 64
    max_keep_alive_s: int = 600
    connect_timeout_s: float = 10.0


class BrokerCore:
    """Everything connections share; single-threaded, driven by the event loop."""

    def __init__(
        self,
        settings: CoreSettings,
        *,
        metrics: Metrics,
        audit: AuditSink,
        limits: LimitSettings = LimitSettings(),
    ) -> None:
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self.limits = limits
        self.connect_rate = RateLimiter(limits.default.connect_rate, limits.default.connect_burst)
        self.refusals = AuditThrottle()
        self.sessions: dict[str, Session] = {}
        self.connections: set[Connection] = set()
        self.subscriptions = SubscriptionTree()
        self.shared = SharedSubscriptions()  # $share/<group>/<filter> (broker.shared)
        self.retained = RetainedMessages()
        self.dirty: set[Connection] = set()
        # What :meth:`tick` looks at: connections at their next keep-alive / CONNECT / linger
        # deadline (:meth:`Connection.next_check`), away sessions at their will or expiry.
        self.connection_deadlines: Deadlines[Connection] = Deadlines()
        self.session_deadlines: Deadlines[Session] = Deadlines()
        # Backpressure: sessions whose full queue holds publishers, the publisher of the message
        # being routed, and publishers let go that the I/O layer has to read again.
        self.pressured: set[Session] = set()
        # In the order they were held: the first held goes on first (no publisher starves).
        self.released: dict[Connection, None] = {}
        self._publisher: Connection | None = None
        self.gate: PublishGate | None = None
        # Fabric mode: wills go to the other nodes too (a bridge's gate sees client messages only).
        self.will_gate: PublishGate | None = None
        self.will_keeper: WillKeeper | None = None
        # Fabric mode (broker.fabric): why a topic filter cannot be subscribed to, or None.
        self.filter_refusal: Callable[[str], str | None] | None = None
        self.session_hooks: SessionHooks | None = None
        self.assigned_prefix = "auto-"  # fabric mode: unique across nodes (it names the node)
        self._assigned_ids = itertools.count(1)

    # -- sessions ------------------------------------------------------------------------------

    def assign_client_id(self) -> str:
        """An id for a plaintext client that sent none (MQTT 5 Assigned Client Identifier)."""
        while True:
            client_id = f"{self.assigned_prefix}{next(self._assigned_ids)}"
            if client_id not in self.sessions:
                return client_id

    def attach(
        self,
        conn: Connection,
        client_id: str,
        *,
        clean_start: bool,
        expiry: int,
        now: float,
        limits: DeviceLimits | None = None,
        will: Will | None = None,
    ) -> tuple[Session, bool]:
        """Give ``conn`` the session of ``client_id``; True if an existing session was resumed.

        A live connection holding that session is taken over first (MQTT-3.1.4-3); its will
        then follows the usual rules, so a delayed will is cancelled by this resumption.
        """
        existing = self.sessions.get(client_id)
        if existing is not None and existing.connection is not None:
            existing.connection.take_over(now)
            existing = self.sessions.get(client_id)
        if existing is not None and clean_start:
            self.end_session(existing, now)
            existing = None
        if existing is None:
            session = Session(client_id, conn.device_id)
            self.sessions[client_id] = session
        else:
            session = existing
            session.pending_will = None  # reconnected before the will delay passed
        session.connection = conn
        session.limits = limits or self.limits.default
        session.expires_at = None
        session.expiry_interval = expiry
        self.session_deadlines.cancel(session)
        if self.will_keeper is not None:
            self.will_keeper.connected(session, will)
        if self.session_hooks is not None:
            self.session_hooks.attached(session, now)
        return session, existing is not None

    def detach(self, session: Session, will: Will | None, now: float) -> None:
        """The session's connection is gone; ``will`` is published now, later or with the end.
        Publishers its queue held go on (an away session's full queue drops new messages)."""
        session.connection = None
        if session.held:
            self.release(session, now)
        self._settle_will(session, will, now)
        if self.will_keeper is not None:
            self.will_keeper.waiting(session)

    def _settle_will(self, session: Session, will: Will | None, now: float) -> None:
        if session.expiry_interval == 0:
            self.end_session(session, now)
            if will is not None:
                self.publish_will(session, will, now)
            return
        if session.expiry_interval != NEVER_EXPIRES:
            session.expires_at = now + session.expiry_interval
            self._schedule_session(session)
        if session.fabric is not None and self.session_hooks is not None:
            self.session_hooks.detached(session, now)
        if will is None:
            return
        delay = will.properties.will_delay_interval or 0
        if delay == 0:
            self.publish_will(session, will, now)
        else:
            session.pending_will = PendingWill(now + min(delay, session.expiry_interval), will)
        self._schedule_session(session)

    def _schedule_session(self, session: Session) -> None:
        """An away session is looked at again at its will delay or its expiry, the sooner."""
        times = [session.expires_at] if session.expires_at is not None else []
        if session.pending_will is not None:
            times.append(session.pending_will.due)
        if times:
            self.session_deadlines.schedule(session, min(times))
        else:
            self.session_deadlines.cancel(session)

    def end_session(self, session: Session, now: float) -> None:
        """Forget the session; a will still waiting for its delay is published now."""
        if self.sessions.get(session.client_id) is session:
            del self.sessions[session.client_id]
        self.session_deadlines.cancel(session)
        if session.fabric is not None and self.session_hooks is not None:
            self.session_hooks.ended(session, now)
        for topic_filter in session.subscriptions:
            self._forget(session.client_id, topic_filter)
        session.subscriptions.clear()
        orphans = self.shared.orphans(session)  # handed on to other members (broker.shared)
        session.clear_queue()
        if session.held:
            self.release(session, now)
        for orphan in orphans:
            self.publish_shared(orphan.share, orphan.message, now)
        if session.pending_will is not None:
            will, session.pending_will = session.pending_will.will, None
            self.publish_will(session, will, now)

    # -- subscriptions -------------------------------------------------------------------------

    def subscribe(self, session: Session, topic_filter: str, options: SubscriptionOptions) -> bool:
        """Add or replace a subscription; True if the session did not have this filter."""
        session.subscriptions[topic_filter] = options
        if session.fabric is not None and self.session_hooks is not None:
            self.session_hooks.subscribed(session, topic_filter, options)
        key = share_key(topic_filter)
        if key is not None:
            return self.shared.add(key, session.client_id, options)
        return self.subscriptions.add(topic_filter, session.client_id, options)

    def unsubscribe(self, session: Session, topic_filter: str) -> bool:
        if session.subscriptions.pop(topic_filter, None) is None:
            return False
        if session.fabric is not None and self.session_hooks is not None:
            self.session_hooks.unsubscribed(session, topic_filter)
        return self._forget(session.client_id, topic_filter)

    def _forget(self, client_id: str, topic_filter: str) -> bool:
        key = share_key(topic_filter)
        if key is not None:
            return self.shared.remove(key, client_id)
        return self.subscriptions.remove(topic_filter, client_id)

    # -- messages ------------------------------------------------------------------------------

    def publish(
        self, message: Message, now: float, *, owner: str = "", publisher: Connection | None = None
    ) -> None:
        """An authorised message enters the broker: retain it if asked (on ``owner``'s account,
        see :meth:`retain_excess`), deliver it. A full queue may hold ``publisher``
        (backpressure: it then has sessions in :meth:`Connection.hold_for`)."""
        self._publisher = publisher
        try:
            self._route(message, now, owner)
        finally:
            self._publisher = None

    def _route(self, message: Message, now: float, owner: str) -> None:
        if message.retain:
            self.retained.store(message, owner)
        shared = self.shared
        if shared.groups and shared.local:  # fabric mode: the node's queue groups route
            for group in shared.matching(message.topic):
                self.publish_shared(group.key, message, now)
        # One copy per subscribed session (MQTT-3.3.4-2): the highest QoS of its matching
        # subscriptions, and all their subscription identifiers.
        found = self.subscriptions.match(message.topic)
        if not found:  # nobody here subscribed (a bridged topic, say)
            return
        matches = [
            (client_id, options)
            for client_id, options in found
            if not (options.no_local and client_id == message.sender)
        ]
        if len(matches) == 1:  # the common case, without the merging below
            client_id, options = matches[0]
            delivery = Delivery(
                message,
                min(options.qos, message.qos),
                message.retain and options.retain_as_published,
                () if options.subscription_id is None else (options.subscription_id,),
            )
            self.deliver(self.sessions[client_id], delivery, now)
            return
        grants: dict[str, tuple[QoS, bool, list[int]]] = {}
        for client_id, options in matches:
            qos, as_published, ids = grants.get(client_id, (QoS.AT_MOST_ONCE, False, []))
            if options.subscription_id is not None:
                ids.append(options.subscription_id)
            grants[client_id] = (
                max(qos, options.qos),
                as_published or options.retain_as_published,
                ids,
            )
        for client_id, (qos, as_published, ids) in grants.items():
            delivery = Delivery(
                message,
                min(qos, message.qos),
                message.retain and as_published,
                tuple(sorted(ids)),
            )
            self.deliver(self.sessions[client_id], delivery, now)

    def publish_shared(
        self, key: str, message: Message, now: float, *, hand_on: bool = True
    ) -> None:
        """One copy of ``message`` to one member of the shared subscription ``key``
        (:meth:`broker.shared.ShareGroup.choose`); with no member here that can take it,
        offered to the group's other nodes (fabric mode, once: not ``hand_on`` for a message
        handed on already), else dropped."""
        group = self.shared.groups.get(key)
        session = None if group is None else group.choose(self.sessions, message.qos)
        if group is None or session is None:
            offer = self.shared.hand_on
            if not (hand_on and offer is not None and offer(key, message)):
                self.metrics.dropped["shared_no_member"] += 1
            return
        self.deliver(session, self.shared.delivery(group, session, message), now)

    def retain_excess(self, owner: str, message: Message, limits: DeviceLimits) -> str | None:
        """Which retained limit of ``owner`` storing ``message`` would break, or ``None``
        (deleting a retained message never does)."""
        if not message.payload:
            return None
        replaced = self.retained.replaced(message.topic, owner)
        return retained_excess(self.retained.held(owner), replaced, weight(message), limits)

    def publish_will(self, session: Session, will: Will, now: float) -> None:
        """The will's ACL was checked when the client connected; a retained will beyond the
        device's retained limits is delivered but not retained."""
        props = will.properties
        expiry = props.message_expiry_interval
        message_props = (
            NO_PROPERTIES
            if props == NO_PROPERTIES
            else replace(props, will_delay_interval=None, message_expiry_interval=None)
        )
        message = Message(
            topic=will.topic,
            payload=will.payload,
            qos=will.qos,
            retain=will.retain,
            properties=message_props,
            sender=session.client_id,
            expires_at=None if expiry is None else now + expiry,
        )
        if message.retain and (
            excess := self.retain_excess(session.device_id, message, session.limits)
        ):
            self.metrics.limit_refusals[excess] += 1
            message = replace(message, retain=False)
        if self.will_keeper is not None:
            self.will_keeper.will_published(session)
        if self.will_gate is not None:  # nothing acknowledges a will: the outcome is not needed
            self.will_gate.offer(message, False, _no_acknowledgement)
        self.publish(message, now, owner=session.device_id)

    def deliver(self, session: Session, delivery: Delivery, now: float) -> None:
        """Send now if the client is connected; keep QoS 1/2 for it while it is away. A
        persistent session in the fabric gets QoS 1/2 from the stream, not from here, except
        through a shared subscription (its queue group's copy is the only one it gets)."""
        if (
            session.fabric is not None
            and delivery.qos != QoS.AT_MOST_ONCE
            and type(delivery) is not SharedDelivery
        ):
            return
        if session.connection is not None:
            session.connection.send(delivery, now)
        elif delivery.qos != QoS.AT_MOST_ONCE:
            self.enqueue(session, delivery, now)

    def enqueue(self, session: Session, delivery: Delivery, now: float) -> None:
        """Queue behind the receive window, bounded in messages and bytes by the session's
        group; a full queue applies the group's ``overflow_policy`` (:meth:`_overflow`)."""
        excess = self._queue_excess(session, weight(delivery.message))
        if excess is None:
            session.push(delivery)
        else:
            self._overflow(session, delivery, excess, now)

    def _queue_excess(self, session: Session, size: int) -> str | None:
        """Which queue limit one more message of ``size`` bytes breaks, or ``None``."""
        limits = session.limits
        if len(session.queue) >= min(self.settings.max_queued_messages, limits.max_queued_messages):
            return Limit.QUEUED_MESSAGES
        if session.queued_bytes + size > limits.max_queued_bytes:
            return Limit.QUEUED_BYTES
        return None

    def _overflow(self, session: Session, delivery: Delivery, excess: str, now: float) -> None:
        """The queue is full. ``backpressure``: the message is queued anyway (over the limit by
        at most one message per held publisher) and its publisher held (its acknowledgement
        kept, its PUBLISHes not read) until the queue drains to half its limits, so nothing
        acknowledged is lost; a session that is away, or gave up holding (:meth:`tick`), or a
        message with no publisher to hold (a will, a bridge's), drops the new message instead.
        ``drop-oldest`` evicts from the head until the message fits; ``drop-new`` drops it.
        Every drop and hold is counted (per session too, on ``/metrics``); the first of an
        overflow episode (until the queue empties again) is audited, at most once a minute."""
        policy = session.limits.overflow_policy
        publisher = self._publisher
        if policy == BACKPRESSURE:
            if (
                publisher is not None
                and session.connection is not None
                and not session.shedding
                and publisher.session is not session  # never hold a client on its own queue
            ):
                session.push(delivery)
                self._hold(session, publisher, excess, now)
                return
            policy = DROP_NEW
        dropped = 1
        if policy == DROP_OLDEST:
            size = weight(delivery.message)
            dropped = 0
            while session.queue and self._queue_excess(session, size) is not None:
                session.pop()
                dropped += 1
            if self._queue_excess(session, size) is None:
                session.push(delivery)
            else:  # larger than the byte limit on its own
                dropped += 1
        self.metrics.dropped["queue_full"] += dropped
        self.metrics.limit_refusals[excess] += dropped
        session.queue_dropped += dropped
        self._overflow_episode(session, excess, policy, now)

    def _hold(self, session: Session, publisher: Connection, excess: str, now: float) -> None:
        if publisher not in session.held:
            session.held[publisher] = None
            publisher.hold_for(session)
        if session.held_since is None:
            session.held_since = now
            self.pressured.add(session)
        session.queue_held += 1
        self.metrics.backpressure_holds += 1
        self._overflow_episode(session, excess, BACKPRESSURE, now)

    def _overflow_episode(self, session: Session, excess: str, policy: str, now: float) -> None:
        """Audit the first overflow of an episode (until the queue empties), throttled."""
        if session.overflowing:
            return
        session.overflowing = True
        if policy == BACKPRESSURE:
            outcome = "held"
            then = (
                "its publishers are held (acknowledgement kept, not read) until it drains to "
                "half; fleetgate_broker_session_queue_held_total counts them"
            )
        else:
            which = "oldest queued" if policy == DROP_OLDEST else "new"
            outcome = "dropped"
            then = (
                f"{which} messages for it are dropped ({policy}) until it empties; "
                "fleetgate_broker_session_queue_dropped_total counts them"
            )
        self.refused(
            session.client_id,
            "queue_overflow",
            AuditRecord(
                f"device:{session.device_id}" if session.device_id else "broker",
                "mqtt.queue_overflow",
                outcome,
                session.device_id or None,
                f"the queue of session {session.client_id!r} is full ({len(session.queue)} "
                f"messages, {session.queued_bytes} bytes; limit {excess}): {then}",
            ),
            now,
        )

    def drained(self, session: Session, now: float) -> None:
        """The session's queue shrank: at half its limits, its held publishers go on and a
        session that gave up holding them stops dropping."""
        limits = session.limits
        cap = min(self.settings.max_queued_messages, limits.max_queued_messages)
        if len(session.queue) * 2 <= cap and session.queued_bytes * 2 <= limits.max_queued_bytes:
            session.shedding = False
            self.release(session, now)

    def release(self, session: Session, now: float) -> None:
        """Let every publisher held on ``session``'s queue go on (:attr:`released` tells the
        I/O layer to read them again)."""
        self.pressured.discard(session)
        session.held_since = None
        held, session.held = session.held, {}
        for publisher in held:
            publisher.release_from(session, now)

    def forget_publisher(self, publisher: Connection, sessions: Iterable[Session]) -> None:
        """A held publisher's connection closed: no session holds it any more."""
        for session in sessions:
            session.held.pop(publisher, None)
            if not session.held:
                session.held_since = None
                self.pressured.discard(session)

    def refused(self, client: str, kind: str, record: AuditRecord, now: float) -> None:
        """Audit a refusal of ``client``'s request, at most once per kind per interval
        (:class:`AuditThrottle`), with its reason bounded (:func:`audit_text`)."""
        suppressed = self.refusals.record(client, kind, now)
        if suppressed is None:
            self.metrics.audit_suppressed += 1
            return
        reason = audit_text(record.reason, AUDIT_REASON_CHARS)
        if suppressed:
            reason += f" [{suppressed} more refusal(s) of this kind since the last row]"
        self.audit(replace(record, reason=reason))

    def queue_drops(self) -> list[tuple[str, int]]:
        """(client id, messages dropped) of each session whose queue overflowed."""
        return [(s.client_id, s.queue_dropped) for s in self.sessions.values() if s.queue_dropped]

    def queue_holds(self) -> list[tuple[str, int]]:
        """(client id, publishes held) of each session whose full queue held publishers."""
        return [(s.client_id, s.queue_held) for s in self.sessions.values() if s.queue_held]

    def publishers_held(self) -> int:
        return sum(len(session.held) for session in self.pressured)

    def queued(self) -> int:
        return sum(len(session.queue) for session in self.sessions.values())

    # -- time and administration -----------------------------------------------------------------

    def recheck(self, conn: Connection, now: float) -> None:
        """``conn``'s state changed: :meth:`tick` looks at it again at its next deadline."""
        when = conn.next_check(now)
        if when is None:
            self.connection_deadlines.cancel(conn)
        else:
            self.connection_deadlines.schedule(conn, when)

    def tick(self, now: float) -> None:
        """Keep-alive and CONNECT timeouts, delayed wills, expired sessions: only the
        connections and sessions whose deadline came (a heap each), not all of them."""
        for conn in self.connection_deadlines.due(now):
            conn.check_timeouts(now)
            self.recheck(conn, now)
        for session in list(self.pressured):
            assert session.held_since is not None
            if now - session.held_since >= session.limits.max_backpressure_s:
                self._give_up_holding(session, now)
        for session in self.session_deadlines.due(now):
            if (
                session.connection is not None
                or self.sessions.get(session.client_id) is not session
            ):
                continue  # came back, or already ended
            if session.expires_at is not None and now >= session.expires_at:
                self.end_session(session, now)
                continue
            if session.pending_will is not None and now >= session.pending_will.due:
                will, session.pending_will = session.pending_will.will, None
                self.publish_will(session, will, now)
            self._schedule_session(session)

    def _give_up_holding(self, session: Session, now: float) -> None:
        """A full queue held its publishers for ``max_backpressure_s``: a subscriber too slow
        (or unwilling) to drain may not hold them longer. Its publishers go on, and new
        messages for it are dropped until it drains to half (counted, audited)."""
        self.metrics.backpressure_timeouts += 1
        session.shedding = True
        self.refused(
            session.client_id,
            "queue_backpressure_timeout",
            AuditRecord(
                f"device:{session.device_id}" if session.device_id else "broker",
                "mqtt.queue_overflow",
                "dropped",
                session.device_id or None,
                f"the queue of session {session.client_id!r} held {len(session.held)} "
                f"publisher(s) for {session.limits.max_backpressure_s:g} s "
                "(max_backpressure_s): they go on, and new messages for it are dropped until "
                "it drains to half; fleetgate_broker_session_queue_dropped_total counts them",
            ),
            now,
        )
        self.release(session, now)

    def kick(self, device_id: str, state: DeviceState, reason: str, now: float) -> int:
        """Close every live connection of a device that was revoked or suspended.

        Its will is not published (the certificate is no longer trusted to speak); a revoked
        device's sessions are discarded, a suspended one's keep their queue for a reinstate.
        """
        kicked = 0
        for conn in list(self.connections):
            if conn.device_id == device_id and conn.kick(state, reason, now):
                kicked += 1
        if state == DeviceState.REVOKED:
            for session in list(self.sessions.values()):
                if session.device_id == device_id:
                    session.pending_will = None
                    self.end_session(session, now)
        return kicked

    def apply_policy(
        self, device_id: str | None, group: str, acl: AclPatterns | None, now: float
    ) -> tuple[int, int]:
        """The ACL of ``group`` changed (``device_id`` None: every live session in that group)
        or ``device_id`` moved to ``group``; ``acl`` is that group's template. Each live
        session goes on under it or is closed (:meth:`Connection.apply_policy`); (sessions
        reached, sessions closed). One audit row says so when a session was reached.

        Stored sessions of absent devices are judged when they resume (``Connection._accept``):
        a session does not record its group.
        """
        reached = closed = 0
        for conn in list(self.connections):
            if conn.acl is None or (
                conn.device_id != device_id if device_id is not None else conn.group != group
            ):
                continue
            outcome = conn.apply_policy(group, bind_acl(acl, conn.device_id), now)
            if outcome is not None:
                reached += 1
                closed += outcome
        if reached:
            what = f"device {device_id} moved to group {group}" if device_id else f"ACL of {group}"
            self.audit(
                AuditRecord(
                    "broker",
                    "mqtt.policy",
                    "ok",
                    device_id or group,
                    f"{what} applied to {reached} live session(s): {closed} closed, "
                    f"{reached - closed} kept",
                )
            )
        return reached, closed

    def shutdown(self, now: float) -> None:
        for conn in list(self.connections):
            conn.shut_down(now)


def _no_acknowledgement(stored: bool, now: float) -> None:
    """A will's publish gate callback: no client waits for it."""
