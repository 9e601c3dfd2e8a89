"""Per-device limits (issue 11): one device with a valid certificate cannot exhaust the broker.

Each promise here is a defect an independent test found on the broker before these limits: deep
and long filters and unbounded subscriptions (1 GB of RSS from one device), unbounded retained
messages, audit rows that stored whole 64 KiB filters without a rate limit, refusals that were
never audited, a publisher that could not be slowed and a queue that overflowed silently. Real
clients against a real broker, plus the pure pieces of :mod:`broker.limits` on their own.
"""

from __future__ import annotations

import dataclasses
import queue
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from broker_helpers import (  # running_broker: the `broker` fixture
    V5,
    V311,
    Creds,
    Paho,
    RawClient,
    RunningBroker,
    enroll,
    mosquitto,
    wait_for,
)

from broker.acl import DEFAULT_TEMPLATE
from broker.admission import Admitted, Identity
from broker.connection import Connection
from broker.core import BrokerCore, CoreSettings
from broker.limits import (
    PACE_S,
    AuditThrottle,
    DeviceLimits,
    Limit,
    LimitSettings,
    RateLimiter,
    TokenBucket,
    audit_text,
    retained_excess,
    topic_excess,
)
from broker.metrics import Metrics
from broker.mqtt import (
    Connect,
    Disconnect,
    Properties,
    Publish,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    encode,
)
from broker.routing import Message, RetainedMessages
from enrollment.registry import AuditEvent, AuditRecord, DeviceState
from fleetgate.config import load_config
from fleetgate.errors import ConfigError

QUOTA = ReasonCode.QUOTA_EXCEEDED.value  # 0x97


@contextmanager
def limited(fleet, **limits: object) -> Iterator[RunningBroker]:
    """A broker whose every device has these limits (the rest default)."""
    settings = LimitSettings(dataclasses.replace(DeviceLimits(), **limits))  # type: ignore[arg-type]
    broker = RunningBroker(fleet, limits=settings).start()
    try:
        yield broker
    finally:
        broker.stop()


@contextmanager
def limited_client(
    fleet, creds: Creds, version: int = V5, **limits: object
) -> Iterator[tuple[RunningBroker, Paho]]:
    """:func:`limited`, and ``creds`` connected to it with paho."""
    with limited(fleet, **limits) as broker:
        client = Paho(broker, creds, version=version)
        try:
            assert client.connect()[0] == 0
            yield broker, client
        finally:
            client.close()


def refusals(
    broker: RunningBroker, action: str | None, *, at_least: int = 1, outcome: str = "refused"
) -> list[AuditEvent]:
    """sensor-1's audited refusals, once there are ``at_least``: the writer may be committing
    a batch that ``audit_events``' flush does not wait for."""

    def stored() -> list[AuditEvent]:
        match = {"outcome": outcome} | ({"action": action} if action else {})
        events = broker.audit_events("sensor-1", **match)
        return events if len(events) >= at_least else []

    return list(wait_for(stored, what=f"{at_least} {action} row(s) audited"))


def audit_size(events: list[AuditEvent]) -> int:
    """What the rows hold in text: roughly their size in registry.db."""
    return sum(
        len(e.actor) + len(e.action) + len(e.outcome) + len(e.subject or "") + len(e.reason)
        for e in events
    )


# -- pure pieces -------------------------------------------------------------------------------


def test_token_bucket_gives_its_burst_then_one_token_per_interval():
    bucket = TokenBucket(rate=10.0, burst=3, now=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.1)
    assert bucket.take(0.05) == pytest.approx(0.05)  # nothing taken while waiting
    assert bucket.take(0.1) == 0.0
    assert bucket.take(100.0) == 0.0  # saved up to the burst, no more
    assert [bucket.take(100.0) for _ in range(3)][-1] == pytest.approx(0.1)


def test_a_token_bucket_at_a_high_rate_makes_its_caller_wait_for_a_slice_of_tokens():
    """At 1,000/s an empty bucket asks for 5 ms (PACE_S) worth, not 1 ms: a device publishing
    at its rate is paused and resumed 200 times a second, not 1,000; the rate is the same."""
    bucket = TokenBucket(rate=1000.0, burst=1000, now=0.0)
    assert all(bucket.take(0.0) == 0.0 for _ in range(1000))
    assert bucket.take(0.0) == pytest.approx(PACE_S)
    assert [bucket.take(PACE_S) for _ in range(6)] == [0.0] * 5 + [pytest.approx(PACE_S)]


def test_rate_limiter_keeps_one_bucket_per_recent_key_and_no_more():
    limiter = RateLimiter(rate=1.0, burst=1, capacity=100)
    assert limiter.take("sensor-1", 0.0) == 0.0
    assert limiter.take("sensor-1", 0.0) == pytest.approx(1.0)
    for n in range(1000):
        limiter.take(f"other-{n}", 0.0)
    assert len(limiter) == 100


def test_audit_throttle_admits_one_row_per_kind_per_interval_and_counts_the_rest():
    throttle = AuditThrottle(interval=60.0, capacity=10)
    assert throttle.record("sensor-1", "subscriptions", 0.0) == 0
    assert [throttle.record("sensor-1", "subscriptions", t) for t in (1.0, 2.0, 59.0)] == [None] * 3
    assert throttle.record("sensor-1", "topic_bytes", 1.0) == 0  # another kind: its own row
    assert throttle.record("sensor-2", "subscriptions", 1.0) == 0  # another client too
    assert throttle.record("sensor-1", "subscriptions", 61.0) == 3
    for n in range(100):
        throttle.record(f"flood-{n}", "x", 62.0)
    assert len(throttle) == 10


def test_audit_text_keeps_short_text_and_bounds_long_text_with_its_hash():
    assert audit_text("devices/sensor-1/commands/#") == "devices/sensor-1/commands/#"
    long = "devices/sensor-1/commands/" + "+/" * 30000 + "#"
    kept = audit_text(long)
    assert len(kept) < 400
    assert kept.startswith(long[:256])
    assert "sha256 " in kept and str(len(long)) in kept
    assert audit_text(long) != audit_text(long[:-1] + "x")


def test_every_count_and_size_limit_names_its_setting():
    """``Connection`` reports a refusal with the setting ``max_<limit>``."""
    for limit in (
        Limit.SUBSCRIPTIONS,
        Limit.TOPIC_BYTES,
        Limit.TOPIC_LEVELS,
        Limit.RETAINED_MESSAGES,
        Limit.RETAINED_BYTES,
        Limit.QUEUED_MESSAGES,
        Limit.QUEUED_BYTES,
    ):
        assert isinstance(getattr(DeviceLimits(), f"max_{limit}"), int)


def test_a_connection_held_back_by_its_publish_rate_is_not_timed_out_as_silent():
    limits = LimitSettings(DeviceLimits(publish_rate=0.01, publish_burst=1))
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda r: None, limits=limits)
    conn = connected(core, "sensor-1", keep_alive=10)
    two = encode(Publish(topic="devices/sensor-1/t", payload=b"1"), 5) * 2
    conn.receive_data(two, 1.0)
    assert conn.resume_at == pytest.approx(101.0)
    core.tick(50.0)  # 49 s without reading it, keep-alive 10 s
    assert conn.state.value == "connected"
    conn.resume(101.0)
    core.tick(101.0 + 14.9)
    assert conn.state.value == "connected"
    core.tick(101.0 + 15.1)  # read again since 101 s, and silent for 1.5 x keep-alive
    assert conn.state.value == "closed"


def test_topic_limits_count_utf8_bytes_and_levels():
    limits = DeviceLimits(max_topic_bytes=16, max_topic_levels=3)
    assert topic_excess("a/b/c", limits) is None
    assert topic_excess("a/b/c/d", limits) == Limit.TOPIC_LEVELS
    assert topic_excess("ä" * 8, limits) is None  # 16 bytes
    assert topic_excess("ä" * 9, limits) == Limit.TOPIC_BYTES  # 9 characters, 18 bytes


def test_retained_check_lets_a_replacement_through_where_a_new_topic_is_over():
    limits = DeviceLimits(max_retained_messages=2, max_retained_bytes=100)
    assert retained_excess((1, 40), None, 40, limits) is None
    assert retained_excess((2, 80), None, 10, limits) == Limit.RETAINED_MESSAGES
    assert retained_excess((2, 80), 40, 40, limits) is None  # replaces its own message
    assert retained_excess((1, 40), None, 61, limits) == Limit.RETAINED_BYTES


def test_retained_messages_are_accounted_to_their_owner_through_replace_and_delete():
    retained = RetainedMessages()

    def message(topic: str, payload: bytes) -> Message:
        return Message(topic, payload, QoS.AT_MOST_ONCE, True, Properties(), "x")

    retained.store(message("devices/a/x", b"12345"), "a")
    retained.store(message("devices/a/y", b"1"), "a")
    assert retained.held("a") == (2, 5 + 11 + 1 + 11)
    retained.store(message("devices/a/x", b"1"), "a")  # replaced: one message still
    assert retained.held("a") == (2, 24)
    retained.store(message("devices/a/y", b"22"), "b")  # replaced by another owner
    assert (retained.held("a"), retained.held("b")) == ((1, 12), (1, 13))
    retained.store(message("devices/a/y", b""), "a")  # deleted, whoever deletes it
    assert (retained.held("a"), retained.held("b"), retained.count) == ((1, 12), (0, 0), 1)


def test_limits_are_read_from_broker_limits_with_group_overrides(tmp_path):
    (tmp_path / "fleetgate.toml").write_text(
        "[broker.limits]\nmax_subscriptions = 10\npublish_rate = 5.0\n"
        "[broker.limits.groups.controllers]\nmax_subscriptions = 500\n"
    )
    limits = load_config(tmp_path, environ={}).broker.limits
    assert limits.default.max_subscriptions == 10
    assert limits.for_group("controllers").max_subscriptions == 500
    assert limits.for_group("controllers").publish_rate == 5.0  # inherited from the defaults
    assert limits.for_group("sensors") == limits.default
    env = {"FLEETGATE_BROKER_LIMITS_MAX_TOPIC_LEVELS": "4"}
    assert load_config(tmp_path, environ=env).broker.limits.default.max_topic_levels == 4


@pytest.mark.parametrize(
    "text",
    [
        "[broker.limits]\nmax_subscriptions = 0\n",
        "[broker.limits]\nmax_subscribers = 5\n",
        "[broker.limits.groups.x]\npublish_rate = -1.0\n",
        "[broker.limits]\ngroups = 3\n",
    ],
)
def test_limit_settings_that_would_lock_devices_out_or_are_unknown_are_refused(tmp_path, text):
    (tmp_path / "fleetgate.toml").write_text(text)
    with pytest.raises(ConfigError):
        load_config(tmp_path, environ={})


# -- the sans-I/O core: the publish rate and the queue, on a clock the test turns -------------


def connected(core: BrokerCore, device_id: str, now: float = 0.0, **connect: object) -> Connection:
    conn = Connection(core, peer="test:1", identity=Identity(device_id, 1), listener="tls", now=now)
    assert conn.receive_data(encode(Connect(client_id=device_id, **connect), 5), now) is not None  # type: ignore[arg-type]
    conn.admission_done(Admitted("default", DEFAULT_TEMPLATE.for_device(device_id)), now)
    conn.take_output()
    return conn


def test_a_connection_over_its_publish_rate_stops_consuming_until_resume_at():
    audit: list[AuditRecord] = []
    limits = LimitSettings(DeviceLimits(publish_rate=10.0, publish_burst=3))
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=audit.append, limits=limits)
    conn = connected(core, "sensor-1")
    burst = b"".join(
        encode(Publish(topic="devices/sensor-1/t", payload=b"%d" % n), 5) for n in range(6)
    )
    conn.receive_data(burst, 1.0)
    assert core.metrics.messages_received[0] == 3
    assert conn.resume_at == pytest.approx(1.1)
    conn.receive_data(encode(Publish(topic="devices/sensor-1/t", payload=b"late"), 5), 1.05)
    assert core.metrics.messages_received[0] == 3  # buffered, not read, while stalled
    conn.resume(1.1)
    assert core.metrics.messages_received[0] == 4 and conn.resume_at == pytest.approx(1.2)
    conn.resume(2.0)
    assert core.metrics.messages_received[0] == 7 and conn.resume_at is None
    assert conn.state.value == "connected"
    assert core.metrics.publish_pauses == 2
    assert [r.action for r in audit] == ["mqtt.limit"]  # the second pause collapsed


def test_queue_overflow_is_counted_per_session_and_audited_once_per_episode():
    audit: list[AuditRecord] = []
    limits = LimitSettings(DeviceLimits(max_queued_messages=3, max_queued_bytes=10_000))
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=audit.append, limits=limits)
    sub = connected(core, "sensor-1", properties=Properties(session_expiry_interval=60))
    sub.receive_data(
        encode(
            Subscribe(
                packet_id=1,
                subscriptions=(
                    Subscription(topic_filter="devices/sensor-1/commands/#", qos=QoS.AT_LEAST_ONCE),
                ),
            ),
            5,
        ),
        0.0,
    )
    sub.receive_data(encode(Disconnect(), 5), 0.0)
    message = Message(
        "devices/sensor-1/commands/x", b"payload", QoS.AT_LEAST_ONCE, False, Properties(), "ops"
    )
    for _ in range(10):
        core.publish(message, 1.0)
    assert core.queue_drops() == [("sensor-1", 7)]
    assert [r.action for r in audit] == ["mqtt.queue_overflow"]
    again = connected(  # drains the queue (into the send window): the episode is over
        core, "sensor-1", clean_start=False, properties=Properties(session_expiry_interval=60)
    )
    assert not core.sessions["sensor-1"].queue and not core.sessions["sensor-1"].overflowing
    again.receive_data(encode(Disconnect(), 5), 2.0)
    for _ in range(5):
        core.publish(message, 3.0)
    assert core.queue_drops() == [("sensor-1", 9)]
    assert [r.action for r in audit] == ["mqtt.queue_overflow"]  # a new episode, same minute
    core.sessions["sensor-1"].pop()  # empties below the cap, not empty: the episode goes on
    core.publish(message, 70.0)
    core.publish(message, 70.0)
    assert [r.action for r in audit] == ["mqtt.queue_overflow"]
    core.sessions["sensor-1"].clear_queue()
    for _ in range(4):
        core.publish(message, 80.0)  # a new episode a minute later: audited, with the count
    assert [r.action for r in audit] == ["mqtt.queue_overflow"] * 2
    assert "1 more" in audit[-1].reason
    big = dataclasses.replace(message, payload=b"x" * 20_000)
    core.sessions["sensor-1"].clear_queue()
    core.publish(big, 4.0)  # over max_queued_bytes alone
    assert core.metrics.limit_refusals[Limit.QUEUED_BYTES] == 1


def test_the_send_window_is_capped_by_the_groups_max_inflight():
    limits = LimitSettings(DeviceLimits(max_inflight=2))
    core = BrokerCore(CoreSettings(), metrics=Metrics(), audit=lambda r: None, limits=limits)
    sub = connected(core, "sensor-1", properties=Properties(receive_maximum=10))
    sub.receive_data(
        encode(
            Subscribe(
                packet_id=1,
                subscriptions=(
                    Subscription(topic_filter="devices/sensor-1/commands/#", qos=QoS.AT_LEAST_ONCE),
                ),
            ),
            5,
        ),
        0.0,
    )
    message = Message(
        "devices/sensor-1/commands/x", b"1", QoS.AT_LEAST_ONCE, False, Properties(), "ops"
    )
    for _ in range(5):
        core.publish(message, 1.0)
    session = core.sessions["sensor-1"]
    assert (len(session.inflight), len(session.queue)) == (2, 3)


# -- a real broker, real clients ------------------------------------------------------------


@pytest.fixture
def sensor(fleet) -> Creds:
    return enroll(fleet, "sensor-1")


@pytest.mark.parametrize(("version", "code"), [(V5, QUOTA), (V311, 0x80)])
def test_deep_and_long_filters_in_the_devices_own_subtree_are_refused(fleet, sensor, version, code):
    with limited_client(fleet, sensor, version) as (broker, client):
        own = "devices/sensor-1/commands/"
        assert client.subscribe(own + "x" * 2000, 1) == [code]  # 2 KB > 1 KiB
        assert client.subscribe(own + "/".join("+" * 20), 1) == [code]  # 23 levels > 16
        assert client.subscribe(own + "#", 1) == [1]
        assert broker.metric("limit_refusals_total", 'limit="topic_bytes"') == 1
        assert broker.metric("limit_refusals_total", 'limit="topic_levels"') == 1
        events = wait_for(
            lambda: refusals(broker, "mqtt.limit", at_least=2), what="both refusals audited"
        )
        assert {("topic_bytes" in e.reason, "topic_levels" in e.reason) for e in events} == {
            (True, False),
            (False, True),
        }


def test_a_session_holds_at_most_max_subscriptions(fleet, sensor):
    with limited_client(fleet, sensor, max_subscriptions=3) as (broker, client):
        for n in range(3):
            assert client.subscribe(f"devices/sensor-1/commands/{n}", 1) == [1]
        assert client.subscribe("devices/sensor-1/commands/3", 1) == [QUOTA]
        assert client.subscribe("devices/sensor-1/commands/0", 0) == [0]  # a replacement is fine
        client.client.unsubscribe("devices/sensor-1/commands/1")
        wait_for(
            lambda: broker.call(
                lambda: len(broker.broker.core.sessions["sensor-1"].subscriptions) == 2
            )
        )
        assert client.subscribe("devices/sensor-1/commands/3", 1) == [1]
        assert broker.metric("limit_refusals_total", 'limit="subscriptions"') == 1


def test_a_publish_topic_over_the_limits_is_refused_0x97(fleet, sensor):
    with limited_client(fleet, sensor, max_topic_levels=5) as (broker, client):
        assert client.publish("devices/sensor-1/a/b/c/d", b"1", qos=1) == QUOTA
        assert client.publish("devices/sensor-1/a/b/c", b"1", qos=1) == 0
        assert broker.metric("limit_refusals_total", 'limit="topic_levels"') == 1


def retained_topics(broker: RunningBroker, creds: Creds) -> set[str]:
    """What a new subscriber to the device's subtree is given as retained."""
    fresh = Paho(broker, creds, version=V5, client_id="sensor-1")
    try:
        fresh.connect()
        fresh.subscribe("devices/sensor-1/commands/#", 1)
        seen: set[str] = set()
        while True:
            try:
                seen.add(fresh.message(timeout=0.5).topic)
            except queue.Empty:
                return seen
    finally:
        fresh.close()


def test_retained_messages_per_device_are_capped_by_count(fleet, sensor):
    base = "devices/sensor-1/commands/"
    with limited_client(fleet, sensor, max_retained_messages=3) as (broker, client):
        assert [client.publish(f"{base}{n}", b"on", 1, retain=True) for n in range(4)] == [
            0,
            0,
            0,
            QUOTA,
        ]
        assert client.publish(f"{base}0", b"replaced", 1, retain=True) == 0
        assert client.publish(f"{base}1", b"", 1, retain=True) == 0  # deleted: room for one
        assert client.publish(f"{base}3", b"on", 1, retain=True) == 0
        assert client.publish(f"{base}4", b"on", 1, retain=True) == QUOTA
        assert retained_topics(broker, sensor) == {f"{base}0", f"{base}2", f"{base}3"}
        assert broker.metric("limit_refusals_total", 'limit="retained_messages"') == 2
        assert refusals(broker, "mqtt.limit")


def test_retained_bytes_per_device_are_capped_and_311_is_acked_but_not_stored(fleet, sensor):
    base = "devices/sensor-1/commands/"
    with limited_client(fleet, sensor, V311, max_retained_bytes=1000) as (broker, client):
        assert client.publish(f"{base}a", b"x" * 400, 1, retain=True) == 0
        assert client.publish(f"{base}b", b"x" * 400, 1, retain=True) == 0
        assert client.publish(f"{base}c", b"x" * 400, 1, retain=True) == 0  # 3.1.1 cannot say no
        assert retained_topics(broker, sensor) == {f"{base}a", f"{base}b"}
        assert broker.metric("limit_refusals_total", 'limit="retained_bytes"') == 1


def test_300_refused_64k_filters_write_one_short_audit_row(fleet, sensor):
    """Before: 300 such SUBSCRIBEs wrote 56 MB of audit rows in 4 s."""
    with limited(fleet) as broker:
        elapsed, events = refuse_300_long_filters(broker, sensor)
        size = audit_size(events)
        print(f"300 refused 65 KB filters in {elapsed:.2f} s: {len(events)} row(s), {size} bytes")
        assert len(events) == 1 and size < 1024
        assert broker.metric("limit_refusals_total", 'limit="topic_bytes"') == 300
        assert broker.metric("audit_refusals_suppressed_total") == 299


def refuse_300_long_filters(broker: RunningBroker, creds: Creds) -> tuple[float, list[AuditEvent]]:
    """300 SUBSCRIBEs of one refused 65 KB filter each, sent at once; the audit rows after."""
    raw = RawClient(broker, creds)
    try:
        raw.connect(client_id="sensor-1")
        refused = "devices/sensor-2/commands/" + "x" * 65_000
        subscribe = encode(
            Subscribe(
                packet_id=1,
                subscriptions=(Subscription(topic_filter=refused, qos=QoS.AT_LEAST_ONCE),),
            ),
            5,
        )
        started = time.monotonic()
        raw.sock.sendall(subscribe * 300)
        for _ in range(300):
            suback = raw.receive()
            assert isinstance(suback, SubAck) and suback.reason_codes == (
                ReasonCode.QUOTA_EXCEEDED,
            )
        elapsed = time.monotonic() - started
    finally:
        raw.close()
    return elapsed, refusals(broker, None)


def raw_publish(topic: bytes, level: int = 5) -> bytes:
    """A QoS 0 PUBLISH built by hand: the codec refuses to encode these topics."""
    body = len(topic).to_bytes(2, "big") + topic + (b"\x00" if level == 5 else b"") + b"1"
    assert len(body) < 128
    return bytes([0x30, len(body)]) + body


@pytest.mark.parametrize(
    ("topic", "code", "said"),
    [
        (b"devices/sensor-1/+", ReasonCode.TOPIC_NAME_INVALID, "wildcard"),
        (b"devices/sensor-1/a\x00b", ReasonCode.MALFORMED_PACKET, "U+0000"),
        (b"devices/sensor-1/\xff", ReasonCode.MALFORMED_PACKET, "UTF-8"),
    ],
)
@pytest.mark.parametrize("level", [5, 4])
def test_protocol_refusals_are_audited(fleet, sensor, topic, code, said, level):
    with limited(fleet) as broker:
        raw = RawClient(broker, sensor, level=level)
        try:
            raw.connect(client_id="sensor-1")
            raw.sock.sendall(raw_publish(topic, level))
            closing = raw.receive()
            if level == 5:
                assert isinstance(closing, Disconnect) and closing.reason_code == code
            else:
                assert closing is None  # 3.1.1 has no DISCONNECT from the server: closed
        finally:
            raw.close()
        events = refusals(broker, "mqtt.protocol")
        assert said in events[0].reason
        assert broker.metric("protocol_refusals_total", f'reason="{code.name.lower()}"') == 1


def test_a_fast_publisher_is_slowed_to_its_rate_without_being_disconnected(fleet, sensor):
    fleet.registry.set_acl(
        "chatty", publish=["devices/%d/#"], subscribe=["devices/%d/#"], actor="t"
    )
    fast_creds = enroll(fleet, "fast-1", group="chatty")
    limits = LimitSettings(
        DeviceLimits(), (("chatty", DeviceLimits(publish_rate=50.0, publish_burst=10)),)
    )
    broker = RunningBroker(fleet, limits=limits).start()
    fast, calm = Paho(broker, fast_creds, version=V5), Paho(broker, sensor, version=V5)
    try:
        for client, own in ((fast, "devices/fast-1/#"), (calm, "devices/sensor-1/commands/#")):
            client.connect()
            client.subscribe(own, 0)
        started = time.monotonic()
        for n in range(160):
            fast.client.publish("devices/fast-1/t", b"%d" % n)
        # Meanwhile a device of another group publishes at once: its messages are not held up.
        calm_started = time.monotonic()
        for n in range(50):
            calm.client.publish("devices/sensor-1/commands/t", b"%d" % n)
        for _ in range(50):
            calm.message()
        calm_elapsed = time.monotonic() - calm_started
        for _ in range(160):
            fast.message()
        elapsed = time.monotonic() - started
        print(
            f"160 messages at 50/s (burst 10): {elapsed:.2f} s; 50 others in {calm_elapsed:.2f} s"
        )
        assert 0.8 * 150 / 50 <= elapsed <= 3 * 150 / 50
        assert calm_elapsed < 1.5
        assert fast.events.disconnects.empty() and calm.events.disconnects.empty()
        assert broker.metric("publish_pauses_total") >= 1
    finally:
        fast.close()
        calm.close()
        broker.stop()


def test_connects_beyond_the_rate_are_refused_0x9f_and_rc3_before_the_registry(fleet, sensor):
    with limited(fleet, connect_rate=0.01, connect_burst=2) as broker:
        for _ in range(2):
            client = Paho(broker, sensor, version=V5)
            assert client.connect()[0] == 0
            client.close()
        # Revoked now: a CONNECT that reached the registry would be refused 0x87, not 0x9F.
        fleet.service.change_device(
            "sensor-1", DeviceState.REVOKED, reason="keyCompromise", actor="t"
        )
        client = Paho(broker, sensor, version=V5)
        assert client.connect()[0] == ReasonCode.CONNECTION_RATE_EXCEEDED.value
        client.close()
        result = mosquitto(
            "mosquitto_pub",
            broker,
            sensor,
            "-t",
            "devices/sensor-1/t",
            "-m",
            "1",
            version="mqttv311",
        )
        assert "received CONNACK (3)" in result.stdout
        assert broker.metric("connect_refusals_total", 'reason="connect_rate"') == 2
        assert broker.metric("connect_refusals_total", 'reason="admission"') == 0
        assert broker.metric("limit_refusals_total", 'limit="connect_rate"') == 2
        events = refusals(broker, "mqtt.connect")
        assert len(events) == 1 and "connects more often" in events[0].reason


def test_queue_overflow_is_on_metrics_per_client_and_audited_once(fleet, sensor):
    """Before: messages beyond the queue were dropped after being acknowledged to their
    publishers, and nothing said for whom."""
    fleet.registry.set_acl(
        "controllers", publish=["devices/+/commands/#"], subscribe=[], actor="test"
    )
    ops = enroll(fleet, "ops-1", group="controllers")
    with limited(fleet, max_queued_messages=3) as broker:
        away = Paho(broker, sensor, version=V5, session_expiry=300)
        away.connect()
        away.subscribe("devices/sensor-1/commands/#", 1)
        away.close()
        sender = Paho(broker, ops, version=V5)
        try:
            sender.connect()
            for n in range(10):
                assert sender.publish("devices/sensor-1/commands/x", b"%d" % n, 1) == 0
        finally:
            sender.close()
        assert broker.metric("session_queue_dropped_total", 'client_id="sensor-1"') == 7
        assert broker.metric("limit_refusals_total", 'limit="queued_messages"') == 7
        events = refusals(broker, "mqtt.queue_overflow", outcome="dropped")
        assert len(events) == 1 and "full" in events[0].reason
