"""Overflow is never silent (issue 11): what a slow subscriber's full queue does, per policy.

Before: a slow QoS 1 subscriber's queue was capped and messages beyond it, already acknowledged
to their publishers, were dropped (1,860 of 5,000 in a 10 x 500 fan-in). Now the group's
``overflow_policy`` applies: ``backpressure`` (the default) holds the publishers whose messages
cannot be queued (acknowledgement kept, their PUBLISHes not read) until the subscriber drains,
``drop-new`` and ``drop-oldest`` drop; each is counted per client on ``/metrics`` and audited
once per episode. A hostile subscriber holds nobody longer than ``max_backpressure_s``, and
publishers to other topics never wait for it.

The slow subscriber is a raw MQTT 5 client that withholds its PUBACKs (a receive maximum of 5
makes its send window small), so what is in flight, queued and dropped is exact; the publishers
and the other subscribers are paho clients, on the plaintext test listener so that 50 of them
need no 50 certificates.

What a held publisher may have waiting is its Receive Maximum (the group's
``receive_maximum``, 20): granted in CONNACK, an MQTT 5 client beyond it while held is
disconnected (0x93), a 3.1.1 client is not read beyond it. That is what bounds the latency of a
saturated fan-in (``make bench-broker``'s ``fanin-q1-sat``): each publisher keeps at most that
many messages between itself and the broker.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from broker_helpers import V5, RawClient, RunningBroker, free_port, wait_for
from paho.mqtt.enums import CallbackAPIVersion

from broker.acl import DEFAULT_TEMPLATE
from broker.admission import Admitted, Identity
from broker.connection import Connection
from broker.core import BrokerCore, CoreSettings
from broker.limits import DeviceLimits, LimitSettings
from broker.metrics import Metrics
from broker.mqtt import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Properties,
    PubAck,
    Publish,
    QoS,
    ReasonCode,
    Subscribe,
    Subscription,
    encode,
)
from enrollment.registry import AuditRecord
from fleetgate.config import load_config
from fleetgate.errors import ConfigError

IDENTITY = "conformance"  # every plaintext client is this device (default group ACL)
SLOW = f"devices/{IDENTITY}/commands/slow"
FAST = f"devices/{IDENTITY}/commands/fast"
QUEUE = 10  # max_queued_messages in these tests
WINDOW = 5  # the slow subscriber's receive maximum


# -- clients ---------------------------------------------------------------------------------------


class PlainRaw(RawClient):
    """A raw MQTT 5 client on the plaintext listener, connected (``connack`` its CONNACK)."""

    def __init__(self, broker: RunningBroker, client_id: str, **connect: Any) -> None:
        self.sock = socket.create_connection(("127.0.0.1", broker.broker.ports.plaintext), 10)
        self.level = 5
        self.decoder = Decoder(protocol_level=5)
        self.connack = self.connect(client_id=client_id, keep_alive=0, **connect)


class SlowSubscriber(PlainRaw):
    """A raw MQTT 5 client on the plaintext listener that acknowledges only when told to."""

    def __init__(self, broker: RunningBroker, client_id: str = "slow-sub") -> None:
        super().__init__(broker, client_id, properties=Properties(receive_maximum=WINDOW))
        self.send(
            Subscribe(
                packet_id=1, subscriptions=(Subscription(topic_filter=SLOW, qos=QoS.AT_LEAST_ONCE),)
            )
        )
        self.receive()  # SUBACK

    def take(self, count: int) -> list[Publish]:
        """The next ``count`` PUBLISHes, unacknowledged."""
        out = []
        while len(out) < count:
            packet = self.receive()
            assert isinstance(packet, Publish), packet
            out.append(packet)
        return out

    def drain(self, count: int) -> list[bytes]:
        """Read and acknowledge ``count`` PUBLISHes (those in flight first): their payloads."""
        payloads = []
        while len(payloads) < count:
            packet = self.receive()
            assert isinstance(packet, Publish), packet
            payloads.append(packet.payload)
            assert packet.packet_id is not None
            self.send(PubAck(packet_id=packet.packet_id))
        return payloads


class PlainPaho:
    """paho-mqtt on the plaintext listener, counting acknowledgements and messages. paho does
    not read the Receive Maximum the broker grants (nor lets its window change once
    connected), so its window is set to the default grant, as the SDK's is."""

    def __init__(self, broker: RunningBroker, client_id: str) -> None:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V5)
        self.client.max_inflight_messages_set(DeviceLimits().receive_maximum)
        self.client.max_queued_messages_set(0)
        self.started = 0.0  # when a test began publishing
        self.acked: list[int] = []
        self.received: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        self.client.on_publish = self._on_publish
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.broker.ports.plaintext, keepalive=60)
        self.client.loop_start()
        wait_for(self.client.is_connected, what=f"{client_id} connected")

    def subscribe(self, topic: str) -> None:
        self.client.subscribe(topic, qos=1)

    def publish(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            self.acked.append(mid)

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, message.payload))


@contextmanager
def overflowing(fleet, **limits: object) -> Iterator[RunningBroker]:
    """A broker with a plaintext listener and a queue of ``QUEUE`` messages per session."""
    limits.setdefault("max_queued_messages", QUEUE)
    settings = LimitSettings(dataclasses.replace(DeviceLimits(), **limits))  # type: ignore[arg-type]
    broker = RunningBroker(
        fleet, limits=settings, plaintext_port=free_port(), plaintext_identity=IDENTITY
    ).start()
    try:
        yield broker
    finally:
        broker.stop()


def overflow_rows(broker: RunningBroker, outcome: str, at_least: int = 1) -> list[Any]:
    def stored() -> list[Any]:
        rows = broker.audit_events(IDENTITY, action="mqtt.queue_overflow", outcome=outcome)
        return rows if len(rows) >= at_least else []

    return list(wait_for(stored, what=f"{at_least} queue_overflow row(s) {outcome}"))


def payloads(count: int) -> list[bytes]:
    return [b"%d" % n for n in range(count)]


# -- each policy, real clients ---------------------------------------------------------------------


@contextmanager
def flooded(
    fleet, count: int, **limits: object
) -> Iterator[tuple[RunningBroker, SlowSubscriber, PlainPaho]]:
    """:func:`overflowing`, the slow subscriber, and a publisher that has just sent it
    ``count`` QoS 1 messages (without waiting for their acknowledgements)."""
    with overflowing(fleet, **limits) as broker:
        slow = SlowSubscriber(broker)
        publisher = PlainPaho(broker, "pub")
        try:
            publisher.started = time.monotonic()
            for payload in payloads(count):
                publisher.publish(SLOW, payload)
            yield broker, slow, publisher
        finally:
            publisher.close()
            slow.close()


def test_drop_new_keeps_the_oldest_and_drops_the_rest_counted_and_audited_once(fleet):
    with flooded(fleet, 30, overflow_policy="drop-new") as (broker, slow, publisher):
        wait_for(lambda: len(publisher.acked) == 30, what="every PUBLISH acknowledged")
        assert slow.drain(WINDOW + QUEUE) == payloads(WINDOW + QUEUE)
        slow.nothing(0.3)
        dropped = 30 - WINDOW - QUEUE
        assert broker.metric("session_queue_dropped_total", 'client_id="slow-sub"') == dropped
        assert broker.metric("messages_dropped_total", 'reason="queue_full"') == dropped
        rows = overflow_rows(broker, "dropped")
        assert len(rows) == 1 and "drop-new" in rows[0].reason


def test_drop_oldest_keeps_the_newest_queued(fleet):
    with flooded(fleet, 30, overflow_policy="drop-oldest") as (broker, slow, publisher):
        wait_for(lambda: len(publisher.acked) == 30, what="every PUBLISH acknowledged")
        # the window's five were sent before the queue filled; the queue kept the last ten
        assert slow.drain(WINDOW + QUEUE) == payloads(WINDOW) + payloads(30)[-QUEUE:]
        assert broker.metric("session_queue_dropped_total", 'client_id="slow-sub"') == 15
        rows = overflow_rows(broker, "dropped")
        assert len(rows) == 1 and "oldest" in rows[0].reason


def test_backpressure_holds_the_publisher_until_the_subscriber_drains_and_loses_nothing(fleet):
    with flooded(fleet, 40) as (broker, slow, publisher):  # backpressure is the default
        assert broker.broker.core.limits.default.overflow_policy == "backpressure"
        in_flight = slow.take(WINDOW)  # the window, unacknowledged
        # the queue's ten, and the eleventh queued over the limit, are acknowledged...
        wait_for(lambda: len(publisher.acked) == WINDOW + QUEUE, what="acks up to the hold")
        time.sleep(0.3)
        assert len(publisher.acked) == WINDOW + QUEUE  # ... the eleventh's is held
        assert broker.metric("publishers_held") == 1
        for packet in in_flight:
            assert packet.packet_id is not None
            slow.send(PubAck(packet_id=packet.packet_id))
        received = [p.payload for p in in_flight] + slow.drain(40 - WINDOW)
        assert received == payloads(40)  # nothing lost, in order
        wait_for(lambda: len(publisher.acked) == 40, what="every PUBLISH acknowledged")
        assert broker.metric("publishers_held") == 0
        assert broker.metric("session_queue_dropped_total", 'client_id="slow-sub"') == 0
        assert broker.metric("session_queue_held_total", 'client_id="slow-sub"') >= 1
        rows = overflow_rows(broker, "held")
        assert len(rows) == 1 and "held" in rows[0].reason


def test_a_subscriber_that_never_drains_holds_publishers_for_max_backpressure_s_only(fleet):
    with flooded(fleet, 40, max_backpressure_s=1.0) as (broker, slow, publisher):
        wait_for(lambda: len(publisher.acked) == 40, what="the publisher let go")
        assert 0.9 <= time.monotonic() - publisher.started <= 3.0
        assert broker.metric("backpressure_timeouts_total") == 1
        # queued: window + limit + the one held; the rest dropped, counted and audited
        dropped = 40 - WINDOW - QUEUE - 1
        assert broker.metric("session_queue_dropped_total", 'client_id="slow-sub"') == dropped
        rows = overflow_rows(broker, "dropped")
        assert len(rows) == 1 and "max_backpressure_s" in rows[0].reason
        assert slow.drain(WINDOW + QUEUE + 1) == payloads(WINDOW + QUEUE + 1)


def test_a_held_publisher_is_released_when_the_subscriber_goes_away(fleet):
    with flooded(fleet, 40, max_backpressure_s=60.0) as (broker, slow, publisher):
        wait_for(lambda: broker.metric("publishers_held") == 1, what="the publisher held")
        slow.close()  # its session (clean, no expiry) is discarded with the connection
        wait_for(lambda: len(publisher.acked) == 40, what="the publisher let go")
        assert broker.metric("publishers_held") == 0


def test_a_held_publisher_beyond_its_receive_maximum_is_disconnected_0x93_and_loses_nothing(fleet):
    """A raw MQTT 5 publisher that ignores the Receive Maximum in its CONNACK: once held, the
    PUBLISH beyond it ends the connection (0x93). Every message it saw acknowledged, and the one
    whose acknowledgement was held, reach the subscriber; the rest were never acknowledged, so
    the publisher still has them to send again."""
    with overflowing(fleet, max_backpressure_s=60.0) as broker:
        slow = SlowSubscriber(broker)
        pub = PlainRaw(broker, "raw-pub")
        granted = pub.connack.properties.receive_maximum
        assert granted == DeviceLimits().receive_maximum == 20
        taken = WINDOW + QUEUE + 1  # the last of these finds the queue full: held
        count = taken + granted  # the held one and the next 19 are its 20 unacknowledged
        pub.send(
            *(
                Publish(topic=SLOW, payload=payload, qos=QoS.AT_LEAST_ONCE, packet_id=n)
                for n, payload in enumerate(payloads(count), 1)
            )
        )
        acked: list[int] = []
        while (packet := pub.receive()) is not None and not isinstance(packet, Disconnect):
            assert isinstance(packet, PubAck), packet
            acked.append(packet.packet_id)
        assert isinstance(packet, Disconnect)
        assert packet.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
        assert pub.receive() is None  # closed
        assert acked == list(range(1, taken))
        assert broker.metric("protocol_refusals_total", 'reason="receive_maximum_exceeded"') == 1
        assert slow.drain(taken) == payloads(taken)
        slow.nothing(0.3)


# -- backpressure stalls nobody else ---------------------------------------------------------------


def test_backpressure_on_one_slow_subscriber_does_not_stall_unrelated_publishers(fleet):
    """A subscriber that never acknowledges (held for up to a minute); 50 publishers to other
    topics, read by a fast subscriber that also publishes to the slow one (so it is held
    itself); a publisher to both. The 50 and the fast subscriber keep flowing; only the
    publisher to both waits, its messages to the other topic kept in order behind the held
    one, until the slow subscriber goes."""
    count = 20
    with overflowing(fleet, max_backpressure_s=60.0) as broker:
        slow = SlowSubscriber(broker)
        fast = PlainPaho(broker, "fast-sub")
        fast.subscribe(f"{FAST}/#")
        time.sleep(0.2)  # the SUBACK
        both = PlainPaho(broker, "both")
        publishers = [PlainPaho(broker, f"pub-{n}") for n in range(50)]
        try:
            for payload in payloads(40):  # the slow subscriber's window and queue fill up
                both.publish(SLOW, payload)
            wait_for(lambda: broker.metric("publishers_held") == 1, what="'both' held")
            both.publish(f"{FAST}/both", b"after the hold")
            fast.publish(SLOW, b"from the fast subscriber")  # held too
            wait_for(lambda: broker.metric("publishers_held") == 2, what="'fast-sub' held")
            started = time.monotonic()
            for n, publisher in enumerate(publishers):
                for payload in payloads(count):
                    publisher.publish(f"{FAST}/{n}", payload)
            unrelated = 50 * count
            wait_for(
                lambda: sum(t != f"{FAST}/both" for t, _ in fast.received) == unrelated,
                what="every unrelated message at the fast subscriber",
            )
            took = time.monotonic() - started
            wait_for(lambda: all(len(p.acked) == count for p in publishers), what="unrelated acks")
            assert took < 10.0, took  # far from max_backpressure_s: nobody waited for it
            assert (f"{FAST}/both", b"after the hold") not in fast.received
            assert broker.metric("publishers_held") == 2
            slow.close()
            wait_for(
                lambda: (f"{FAST}/both", b"after the hold") in fast.received,
                what="'both' released",
            )
            wait_for(lambda: len(both.acked) == 41 and len(fast.acked) == 1, what="all acks")
        finally:
            for client in (*publishers, both, fast):
                client.close()


# -- the pure core: the policies on bytes and a clock ----------------------------------------------


def _connected(core: BrokerCore, client_id: str, level: int = 5, **connect: object) -> Connection:
    identity = Identity(IDENTITY, None, client_id_bound=False)
    conn = Connection(core, peer="test:1", identity=identity, listener="plaintext", now=0)
    packet = Connect(client_id=client_id, **connect)  # type: ignore[arg-type]
    assert conn.receive_data(encode(packet, level), 0) is not None
    conn.admission_done(Admitted("default", DEFAULT_TEMPLATE.for_device(IDENTITY)), 0)
    conn.take_output()
    return conn


def _core(**limits: object) -> tuple[BrokerCore, list[AuditRecord]]:
    audit: list[AuditRecord] = []
    settings = LimitSettings(dataclasses.replace(DeviceLimits(max_queued_messages=4), **limits))  # type: ignore[arg-type]
    return BrokerCore(CoreSettings(), metrics=Metrics(), audit=audit.append, limits=settings), audit


def _subscribe(conn: Connection, topic_filter: str) -> None:
    packet = Subscribe(
        packet_id=1, subscriptions=(Subscription(topic_filter=topic_filter, qos=QoS.AT_LEAST_ONCE),)
    )
    conn.receive_data(encode(packet, 5), 0)
    conn.take_output()


def _publishes(topic: str, first_id: int, count: int, level: int = 5) -> bytes:
    return b"".join(
        encode(Publish(topic=topic, payload=b"%d" % n, qos=QoS.AT_LEAST_ONCE, packet_id=n), level)
        for n in range(first_id, first_id + count)
    )


def test_a_held_publisher_keeps_reading_acknowledgements_and_resumes_in_order():
    core, audit = _core()
    sub = _connected(core, "sub", properties=Properties(receive_maximum=1))
    _subscribe(sub, SLOW)
    pub = _connected(core, "pub")
    pub.receive_data(_publishes(SLOW, 1, 8), 1.0)  # 1 in flight, 4 queued, the 6th held
    out = pub.take_output()
    assert out.count(b"\x40\x02") == 5  # five PUBACKs; the sixth and later wait
    assert core.publishers_held() == 1 and pub.held_back is False
    assert core.metrics.messages_received[1] == 6  # the 7th and 8th wait unread
    pub.receive_data(encode(Disconnect(), 5), 1.0)  # waits behind them, in order
    assert pub.state.value == "connected"
    for packet_id in (1, 2, 3):  # the subscriber drains to half of four
        sub.receive_data(encode(PubAck(packet_id=packet_id), 5), 2.0)
    assert list(core.released) == [pub] and core.publishers_held() == 0
    core.released.clear()
    pub.resume_publishing(2.0)
    assert core.metrics.messages_received[1] == 8
    assert pub.state.value == "closed"  # the DISCONNECT, after the PUBLISHes it followed
    assert [r.outcome for r in audit] == ["held"]


def _qos0(topic: str, count: int) -> bytes:
    return encode(Publish(topic=topic, payload=b"0", qos=QoS.AT_MOST_ONCE), 5) * count


def _held_publisher(core: BrokerCore, level: int = 5) -> Connection:
    """A publisher held by the slow subscriber's full queue (receive maximum 1, queue of 4):
    one PUBLISH in flight, four queued, the sixth's PUBACK held."""
    sub = _connected(core, "sub", properties=Properties(receive_maximum=1))
    _subscribe(sub, SLOW)
    pub = _connected(core, "pub", level=level)
    pub.receive_data(_publishes(SLOW, 1, 6, level), 1.0)
    assert core.publishers_held() == 1
    pub.take_output()  # five PUBACKs
    return pub


def test_a_held_publisher_stops_being_read_after_max_deferred_packets():
    core, _ = _core()
    pub = _held_publisher(core)
    pub.receive_data(_qos0(SLOW, 31), 1.0)  # QoS 0: no acknowledgement, no Receive Maximum
    assert not pub.held_back
    pub.receive_data(_qos0(SLOW, 1), 1.0)
    assert pub.held_back  # 32 waiting: the I/O layer pauses reading
    core.tick(1.0 + DeviceLimits().max_backpressure_s)
    assert core.metrics.backpressure_timeouts == 1 and list(core.released) == [pub]


def test_connack_grants_the_groups_receive_maximum_capped_by_the_brokers():
    for limit, ceiling, granted in ((20, 64, 20), (5, 64, 5), (100, 64, 64)):
        settings = LimitSettings(DeviceLimits(receive_maximum=limit))
        core = BrokerCore(
            CoreSettings(receive_maximum=ceiling),
            metrics=Metrics(),
            audit=[].append,
            limits=settings,
        )
        conn = Connection(
            core,
            peer="test:1",
            identity=Identity(IDENTITY, None, client_id_bound=False),
            listener="plaintext",
            now=0,
        )
        conn.receive_data(encode(Connect(client_id="pub"), 5), 0)
        conn.admission_done(Admitted("default", DEFAULT_TEMPLATE.for_device(IDENTITY)), 0)
        decoder = Decoder(protocol_level=5)
        decoder.feed(conn.take_output())
        connack = decoder.next_packet()
        assert isinstance(connack, ConnAck)
        assert connack.properties.receive_maximum == granted


def test_a_held_mqtt5_publisher_may_have_its_receive_maximum_waiting_and_no_more():
    core, _ = _core(receive_maximum=8)
    pub = _held_publisher(core)
    pub.receive_data(_publishes(SLOW, 7, 7), 1.0)  # the held one and 7 more: 8 unacknowledged
    assert pub.state.value == "connected" and not pub.held_back  # still read: its acks go on
    pub.receive_data(_publishes(SLOW, 14, 1), 1.0)
    assert pub.state.value == "closed"
    out = Decoder(protocol_level=5)
    out.feed(pub.take_output())
    disconnect = out.next_packet()
    assert isinstance(disconnect, Disconnect)
    assert disconnect.reason_code == ReasonCode.RECEIVE_MAXIMUM_EXCEEDED
    assert "Receive Maximum of 8" in (disconnect.properties.reason_string or "")
    assert core.metrics.protocol_refusals["receive_maximum_exceeded"] == 1


def test_a_held_311_publisher_is_not_read_beyond_its_receive_maximum():
    """3.1.1 has no Receive Maximum to grant: the broker stops reading instead (TCP
    backpressure), and reads on once released, losing nothing."""
    core, _ = _core(receive_maximum=8)
    pub = _held_publisher(core, level=4)
    pub.receive_data(_publishes(SLOW, 7, 6, 4), 1.0)
    assert not pub.held_back
    pub.receive_data(_publishes(SLOW, 13, 4, 4), 1.0)  # one makes 8 waiting; three stay unread
    assert pub.held_back and pub.state.value == "connected"
    assert core.metrics.messages_received[1] == 6
    core.tick(1.0 + DeviceLimits().max_backpressure_s)  # let go: the rest is read
    assert list(core.released) == [pub]
    pub.resume_publishing(11.0)
    assert core.metrics.messages_received[1] == 16 and pub.state.value == "connected"


def test_qos2_flows_before_their_pubrel_count_against_the_receive_maximum():
    core, _ = _core(receive_maximum=3)
    pub = _connected(core, "pub")
    packets = [
        encode(Publish(topic=SLOW, payload=b"2", qos=QoS.EXACTLY_ONCE, packet_id=n), 5)
        for n in range(1, 5)
    ]
    pub.receive_data(b"".join(packets[:3]), 1.0)
    assert pub.state.value == "connected"
    pub.receive_data(packets[3], 1.0)
    assert core.metrics.protocol_refusals["receive_maximum_exceeded"] == 1
    assert pub.state.value == "closed"


def test_backpressure_never_holds_a_client_on_its_own_queue_nor_for_an_away_session():
    core, _ = _core()
    loop = _connected(core, "loop", properties=Properties(receive_maximum=1))
    _subscribe(loop, SLOW)
    loop.receive_data(_publishes(SLOW, 1, 10), 1.0)  # to itself: drop-new beyond the queue
    assert core.publishers_held() == 0 and core.sessions["loop"].queue_dropped == 5
    away = _connected(core, "away", properties=Properties(session_expiry_interval=60))
    _subscribe(away, f"{FAST}/#")
    away.receive_data(encode(Disconnect(), 5), 1.0)
    pub = _connected(core, "pub")
    pub.receive_data(_publishes(f"{FAST}/x", 1, 10), 1.0)
    assert core.publishers_held() == 0 and core.sessions["away"].queue_dropped == 6


@pytest.mark.parametrize(
    ("key", "default", "group", "bad", "refusal"),
    [
        ("overflow_policy", "drop-oldest", "backpressure", "drop-all", "must be one of"),
        ("receive_maximum", 8, 64, 0, "must be above 0"),
    ],
)
def test_overflow_policy_and_receive_maximum_are_read_per_group_and_checked(
    tmp_path, key, default, group, bad, refusal
):
    path = tmp_path / "fleetgate.toml"
    path.write_text(
        f"[broker.limits]\n{key} = {json.dumps(default)}\n"
        f"[broker.limits.groups.backend]\n{key} = {json.dumps(group)}\n"
    )
    limits = load_config(tmp_path, {}).broker.limits
    assert (getattr(limits.default, key), getattr(limits.for_group("backend"), key)) == (
        default,
        group,
    )
    path.write_text(f"[broker.limits]\n{key} = {json.dumps(bad)}\n")
    with pytest.raises(ConfigError, match=f"{key} {refusal}"):
        load_config(tmp_path, {})


def test_a_released_publisher_resumes_one_deferred_packet_at_a_time_when_asked():
    """The I/O layer resumes released publishers round robin (``Broker._resume_released``):
    ``resume_publishing(now, 1)`` processes one deferred packet and says whether more wait."""
    core, _ = _core()
    sub = _connected(core, "sub", properties=Properties(receive_maximum=1))
    _subscribe(sub, SLOW)
    pub = _connected(core, "pub")
    pub.receive_data(_publishes(SLOW, 1, 8), 1.0)  # 1 in flight, 4 queued, the 6th held
    assert core.metrics.messages_received[1] == 6
    for packet_id in (1, 2, 3):
        sub.receive_data(encode(PubAck(packet_id=packet_id), 5), 2.0)
    assert list(core.released) == [pub]
    assert pub.resume_publishing(2.0, 1) is True
    assert core.metrics.messages_received[1] == 7
    assert pub.resume_publishing(2.0, 1) is False  # the last one
    assert core.metrics.messages_received[1] == 8
