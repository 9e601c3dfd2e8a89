"""MQTT topic <-> NATS subject mapping (broker/fabric/subjects.py): the rules exhaustively on small
alphabets, the values nats-server 2.10.27 was seen to produce, and a live check against a real
nats-server's own MQTT listener."""

from __future__ import annotations

import asyncio
import itertools
import queue
import threading
from pathlib import Path

import nats
import paho.mqtt.client as mqtt
import pytest
from nats_cluster import NatsCluster
from paho.mqtt.enums import CallbackAPIVersion

from broker.fabric.subjects import (
    Unmappable,
    filter_to_subjects,
    refusal,
    subject_to_topic,
    topic_to_subject,
)
from fleetgate.topics import InvalidTopic, topic_matches, validate_topic_filter

# Observed on the wire with nats-server 2.10.27 (../shared/fabric/recipes/results-2.10.27.txt).
OBSERVED_TOPICS = {
    "foo/bar": "foo.bar",
    "foo": "foo",
    "/foo": "/.foo",
    "foo/": "foo./",
    "/": "/./",
    "//": "/././",
    "foo//bar": "foo./.bar",
    "foo///bar": "foo././.bar",
    "/foo/": "/.foo./",
    "a//": "a././",
    "foo.bar": "foo//bar",
    "foo/bar.baz": "foo.bar//baz",
    "./a": "//.a",
    "a.": "a//",
    "a/./b": "a.//.b",
    "$SYS/x": "$SYS.x",
    "$share/g/t": "$share.g.t",
    "ümlaut/ü": "ümlaut.ü",
    "devices/dev-1/telemetry": "devices.dev-1.telemetry",
}
OBSERVED_FILTERS = {
    "foo/+": ("foo.*",),
    "foo/#": ("foo.>", "foo"),
    "#": (">",),
    "+": ("*",),
    "+/x": ("*.x",),
    "/#": ("/.>", "/"),
    "foo//+": ("foo./.*",),
    "a.b/#": ("a//b.>", "a//b"),
    "devices/+/telemetry": ("devices.*.telemetry",),
}
OBSERVED_SUBJECTS = {
    "foo.bar": "foo/bar",
    "foo./.bar": "foo//bar",
    "/.foo": "/foo",
    "foo./": "foo/",
    "foo//bar": "foo.bar",
    "a.b/c": "a/bc",
    "devices.dev-1.telemetry": "devices/dev-1/telemetry",
    "x//": "x.",
}


@pytest.mark.parametrize(("topic", "subject"), OBSERVED_TOPICS.items())
def test_topics_map_as_nats_server_does(topic: str, subject: str) -> None:
    assert topic_to_subject(topic) == subject


@pytest.mark.parametrize(("topic_filter", "subjects"), OBSERVED_FILTERS.items())
def test_filters_map_as_nats_server_does(topic_filter: str, subjects: tuple[str, ...]) -> None:
    assert filter_to_subjects(topic_filter) == subjects


@pytest.mark.parametrize(("subject", "topic"), OBSERVED_SUBJECTS.items())
def test_subjects_map_back_as_nats_server_does(subject: str, topic: str) -> None:
    assert subject_to_topic(subject) == topic


@pytest.mark.parametrize(
    "text",
    ["with space", "tab\there", "cr\r", "lf\nx", "ff\f", "del\x7f", "a/*/b", "a/>", "x*y", "a>b"],
)
def test_unmappable_characters_are_refused(text: str) -> None:
    assert refusal(text) is not None
    with pytest.raises(Unmappable):
        topic_to_subject(text)
    with pytest.raises(Unmappable):
        filter_to_subjects(text)


def test_refusal_names_the_character() -> None:
    assert refusal("a/*/b") == "'a/*/b' contains '*', which has no NATS subject"
    assert refusal("tab\there") is not None and "a tab" in refusal("tab\there")  # type: ignore[operator]
    assert refusal("devices/dev-1/telemetry") is None


def _strings(alphabet: str, longest: int) -> list[str]:
    return [
        "".join(chars)
        for length in range(1, longest + 1)
        for chars in itertools.product(alphabet, repeat=length)
    ]


def test_every_small_topic_maps_back_to_itself() -> None:
    """Injective: two topics never share a subject, and the subject names the topic."""
    topics = _strings("a/.", 7)
    subjects = {topic_to_subject(topic) for topic in topics}
    assert len(subjects) == len(topics)
    for topic in topics:
        assert subject_to_topic(topic_to_subject(topic)) == topic


def _nats_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: tokens split on '.', '*' one token, '>' one or more at the end."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">":
            return len(have) > i
        if i >= len(have) or (token != "*" and token != have[i]):
            return False
    return len(want) == len(have)


def test_nats_subscriptions_of_a_filter_receive_exactly_what_it_matches() -> None:
    """For every small filter and topic: the filter's subjects match the topic's subject iff the
    MQTT filter matches the topic (no '$' topics here: the node's own tree applies 4.7.2)."""
    topics = _strings("a/.", 5)
    filters = []
    for candidate in _strings("a/.+#", 5):
        try:
            validate_topic_filter(candidate)
        except InvalidTopic:
            continue
        filters.append(candidate)
    assert len(filters) > 300
    for topic_filter in filters:
        subjects = filter_to_subjects(topic_filter)
        for topic in topics:
            by_nats = any(_nats_matches(s, topic_to_subject(topic)) for s in subjects)
            assert by_nats == topic_matches(topic_filter, topic), (topic_filter, topic, subjects)


# -- against a real nats-server's MQTT listener ---------------------------------------------------

LIVE_TOPICS = [t for t in OBSERVED_TOPICS if not t.startswith("$")] + ["a/b.c/", "x/./.y"]
LIVE_FILTERS = [*OBSERVED_FILTERS, "a//#", "+/+/#"]
LIVE_SUBJECTS = [s for s in OBSERVED_SUBJECTS if s != "a.b/c"] + ["p.q//r./"]


@pytest.fixture(scope="module")
def mqtt_cluster(tmp_path_factory: pytest.TempPathFactory) -> NatsCluster:  # type: ignore[misc]
    with NatsCluster(tmp_path_factory.mktemp("nats"), size=1, mqtt=True) as cluster:
        yield cluster


class _MqttClient:
    """A paho client on nats-server's plaintext MQTT 3.1.1 listener."""

    def __init__(self, port: int, client_id: str) -> None:
        self.messages: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.subscribed = threading.Event()
        connected = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_connect = lambda *_: connected.set()
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.put((m.topic, m.payload))
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        # The first CONNACK on a fresh cluster waits for the MQTT streams (~3 s measured).
        assert connected.wait(30), "no CONNACK from nats-server's MQTT listener"

    def subscribe(self, topic_filter: str) -> None:
        self.subscribed.clear()
        self.client.subscribe(topic_filter)
        assert self.subscribed.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_mapping_matches_a_real_nats_server(mqtt_cluster: NatsCluster) -> None:
    """Topics published by an MQTT client arrive on the subjects we compute; filters become the
    subscriptions we compute; published subjects reach an MQTT '#' subscriber as the topics we
    compute. All on one node: interest crosses routes asynchronously, and routing is not what
    this checks."""
    n1 = mqtt_cluster.nodes[0]

    async def run() -> None:
        nc = await nats.connect(n1.url)
        seen: dict[bytes, str] = {}
        all_seen = asyncio.Event()

        tags = {f"t{index}".encode() for index in range(len(LIVE_TOPICS))}

        async def on_message(msg: nats.aio.msg.Msg) -> None:
            if msg.data not in tags:  # the server's own $MQTT/$JS traffic
                return
            seen[msg.data] = msg.subject
            if len(seen) == len(tags):
                all_seen.set()

        await nc.subscribe(">", cb=on_message)
        await nc.flush()
        publisher = _MqttClient(n1.mqtt_port, "map-pub")
        for index, topic in enumerate(LIVE_TOPICS):
            publisher.client.publish(topic, f"t{index}".encode())
        await asyncio.wait_for(all_seen.wait(), 15)
        publisher.close()
        for index, topic in enumerate(LIVE_TOPICS):
            assert seen[f"t{index}".encode()] == topic_to_subject(topic), topic

        for index, topic_filter in enumerate(LIVE_FILTERS):
            client_id = f"map-sub-{index}"
            subscriber = _MqttClient(n1.mqtt_port, client_id)
            subscriber.subscribe(topic_filter)
            connz = n1.http_json(f"/connz?subs=detail&mqtt_client={client_id}")
            (conn,) = [c for c in connz["connections"] if c.get("mqtt_client") == client_id]
            subs = sorted(s["subject"] for s in conn["subscriptions_list_detail"])
            subscriber.close()
            assert subs == sorted(filter_to_subjects(topic_filter)), topic_filter

        everything = _MqttClient(n1.mqtt_port, "map-hash")
        everything.subscribe("#")
        for subject in LIVE_SUBJECTS:
            await nc.publish(subject, subject.encode())
        await nc.flush()
        got: dict[bytes, str] = {}
        while len(got) < len(LIVE_SUBJECTS):
            topic, payload = await asyncio.to_thread(everything.messages.get, True, 10)
            got[payload] = topic
        everything.close()
        for subject in LIVE_SUBJECTS:
            assert got[subject.encode()] == subject_to_topic(subject), subject
        await nc.close()

    asyncio.run(run())


def test_harness_stops_every_server_it_started(tmp_path: Path) -> None:
    with NatsCluster(tmp_path) as cluster:
        processes = [node.process for node in cluster.nodes]
        assert all(p is not None and p.poll() is None for p in processes)
    assert all(p is not None and p.poll() is not None for p in processes)
