"""Real MQTT clients on two broker nodes of one NATS cluster (issue 12): publish on one node,
subscribe on the other, at QoS 0, 1 and 2 on MQTT 3.1.1 and 5.0, with paho-mqtt and with
mosquitto_pub/mosquitto_sub; and a server that announces a version older than 2.10 refused
at connect."""

# ruff: noqa: F811 - the tests take fixtures imported from other test modules

from __future__ import annotations

import queue
import re
import socket
import threading

import pytest
from broker_helpers import V5, V311, Creds, MosquittoSub, free_port, mosquitto
from conftest import Fleet
from test_broker_delivery import connected, pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_node import FabricBroker, await_route, nodes, paho_route  # noqa: F401 (nodes)
from test_fabric_sessions import cluster  # noqa: F401 (one healthy cluster per module)

from broker.fabric.node import FabricUnavailable

TOPIC = "devices/sensor-1/telemetry/interop"


@pytest.mark.parametrize("version", [V311, V5])
def test_paho_across_nodes_at_every_qos(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], version: int
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    ops = connected(b, ops_creds, version=version)
    assert ops.subscribe("devices/+/telemetry/#", qos=2) == [2]
    sensor = connected(a, sensor_creds, version=version)
    paho_route(sensor, TOPIC, ops)
    for qos in (0, 1, 2):
        while not sensor.events.published.empty():  # the QoS 0 publishes' events
            sensor.events.published.get()
        assert sensor.publish(TOPIC, f"qos{qos}".encode(), qos=qos) == 0
        got = ops.message()
        assert (got.topic, got.payload, got.qos) == (TOPIC, f"qos{qos}".encode(), qos)
    ops.no_message()
    sensor.close()
    ops.close()


_PUBLISH = re.compile(r"received PUBLISH \(d\d, q(\d), r\d, m\d+, '([^']*)'")


@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
def test_mosquitto_clients_across_nodes_at_every_qos(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds], version: str
) -> None:
    """mosquitto_sub on node B (QoS 2), mosquitto_pub on node A at QoS 0, 1 and 2; each
    message arrives once at the QoS it was published with."""
    a, b = nodes
    sensor_creds, ops_creds = pair
    sub = MosquittoSub(b, ops_creds, "-t", "devices/+/telemetry/#", "-q", "2", version=version)
    try:
        sub.wait_line(lambda line: "received SUBACK" in line)

        def publish(payload: str, qos: int = 0) -> None:
            done = mosquitto(
                "mosquitto_pub", a, sensor_creds, "-t", TOPIC, "-q", str(qos), "-m", payload,
                version=version,
            )  # fmt: skip
            assert done.returncode == 0, done.stdout + done.stderr

        def received(timeout: float) -> bytes:
            try:
                sub.wait_line(lambda line: "received PUBLISH" in line, timeout)
            except AssertionError:
                raise queue.Empty from None
            return sub.wait_line(lambda line: not line.startswith("Client "), timeout).encode()

        await_route(lambda payload: publish(payload.decode()), received)
        for qos in (0, 1, 2):
            publish(f"mosq-qos{qos}", qos)
            header = sub.wait_line(lambda line: "received PUBLISH" in line)
            found = _PUBLISH.search(header)
            assert found is not None, header
            assert (int(found.group(1)), found.group(2)) == (qos, TOPIC)
            assert sub.wait_line(lambda line: not line.startswith("Client ")) == f"mosq-qos{qos}"
    finally:
        sub.stop()


def test_mosquitto_pub_to_a_paho_subscriber_on_another_node(
    nodes: tuple[FabricBroker, FabricBroker], pair: tuple[Creds, Creds]
) -> None:
    a, b = nodes
    sensor_creds, ops_creds = pair
    ops = connected(b, ops_creds, version=V5)
    assert ops.subscribe("devices/+/telemetry/#", qos=1) == [1]

    def publish(payload: bytes) -> None:
        done = mosquitto("mosquitto_pub", a, sensor_creds, "-t", TOPIC, "-m", payload.decode())
        assert done.returncode == 0, done.stdout + done.stderr

    await_route(publish, lambda timeout: ops.message(timeout).payload)
    done = mosquitto(
        "mosquitto_pub", a, sensor_creds, "-t", TOPIC, "-q", "1", "-m", "from-mosquitto",
        version="mqttv311",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    got = ops.message()
    assert (got.topic, got.payload, got.qos) == (TOPIC, b"from-mosquitto", 1)
    ops.close()


def test_a_server_announcing_a_version_older_than_2_10_is_refused(fleet: Fleet) -> None:
    """A stand-in for Debian 12's nats-server 2.9.10: it speaks the NATS handshake (INFO,
    then PONG to the client's PING) announcing 2.9.10. A fake, because a real 2.9 binary is not
    part of the test packages; the refusal is decided by the INFO line alone."""
    port = free_port()
    listener = socket.create_server(("127.0.0.1", port))
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.sendall(
                    b'INFO {"server_id":"OLD","server_name":"old","version":"2.9.10",'
                    b'"proto":1,"go":"go1.19.8","host":"127.0.0.1","port":%d,'
                    b'"headers":true,"max_payload":1048576}\r\n' % port
                )
                conn.settimeout(5)
                buffered = b""
                try:
                    while b"PING\r\n" not in buffered:
                        chunk = conn.recv(4096)
                        if not chunk:
                            break
                        buffered += chunk
                    conn.sendall(b"PONG\r\n")
                    while conn.recv(4096):
                        pass
                except OSError:
                    pass

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    node = FabricBroker(fleet, [f"nats://127.0.0.1:{port}"], "old-server")
    try:
        with pytest.raises(FabricUnavailable, match=r"nats-server 2\.9\.10 is too old"):
            node.start()
    finally:
        node.stop()
        stop.set()
        server.join(5)
        listener.close()
