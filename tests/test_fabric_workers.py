"""``fleetgate serve broker --workers N`` (issue 12, "several cores on one machine"): N broker
processes on one port (SO_REUSEPORT), each a node of the fabric with its own name and metrics
port; connections spread over them, a message published through one reaches a subscriber on
another, a dead worker is started again, and without ``[fabric]`` the command refuses."""

# ruff: noqa: F811 - the tests take the `pair` fixture imported from test_broker_delivery

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import socket
import urllib.request

from broker_helpers import Creds, Paho, free_port, wait_for
from conftest import Fleet
from test_broker_delivery import pair  # noqa: F401 (pair: sensor-1, ops-1)
from test_fabric_local import ServeBroker, alive, local_fabric
from test_fabric_node import paho_route


def two_free_ports() -> int:
    """A port whose successor is free too (worker i serves /metrics on base + i)."""
    while True:
        base = free_port()
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", base + 1)) != 0:
                try:
                    probe.close()
                    with socket.create_server(("127.0.0.1", base + 1)):
                        return base
                except OSError:
                    continue


def connections(metrics_port: int) -> tuple[str, int]:
    """(the node label, open MQTT connections) from one worker's /metrics."""
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    count = node = None
    for line in text.splitlines():
        if line.startswith("fleetgate_broker_connections "):
            count = int(float(line.split()[1]))
        if line.startswith("fleetgate_broker_fabric_connected{"):
            node = line.split('node="')[1].split('"')[0]
    assert count is not None and node is not None, text
    return node, count


def worker_pids(served: ServeBroker) -> dict[int, int]:
    pids = {}
    for line in served.text().splitlines():
        if '"broker worker started"' in line:
            record = json.loads(line)
            pids[record["worker"]] = record["pid"]
    return pids


def test_two_workers_share_one_port_and_route_through_the_fabric(
    fleet: Fleet, pair: tuple[Creds, Creds]
) -> None:
    sensor_creds, ops_creds = pair
    local_fabric(fleet, node_name="gate")
    metrics = two_free_ports()
    served = ServeBroker(fleet, "--workers", "2", metrics_port=metrics)
    clients: list[Paho] = []
    try:
        served.wait_logged("broker listening", count=2)
        assert [connections(metrics + i)[0] for i in range(2)] == ["gate-w0", "gate-w1"]

        sensor = Paho(served, sensor_creds)
        clients.append(sensor)
        assert sensor.connect()[0] == 0
        home = next(i for i in range(2) if connections(metrics + i)[1] == 1)
        # New connections until one lands on the other worker: the kernel spreads them.
        landed = []
        for _ in range(40):
            ops = Paho(served, ops_creds)
            assert ops.connect()[0] == 0
            worker = next(i for i in range(2) if connections(metrics + i)[1] == (i == home) + 1)
            landed.append(worker)
            if worker != home:
                break
            ops.close()
            wait_for(lambda: connections(metrics + home)[1] == 1, 10)
        assert landed[-1] != home, f"40 connections all went to worker {home}"
        clients.append(ops)

        assert sensor.subscribe("devices/sensor-1/commands/#", 1) == [1]
        paho_route(ops, "devices/sensor-1/commands/probe", sensor)
        with contextlib.suppress(queue.Empty):  # the probes' (QoS 0) publish callbacks
            while True:
                ops.events.published.get_nowait()
        assert ops.publish("devices/sensor-1/commands/go", b"across", qos=1) == 0
        message = sensor.message()
        assert (message.topic, message.payload, message.qos) == (
            "devices/sensor-1/commands/go",
            b"across",
            1,
        )

        # A worker that dies is started again.
        pids = worker_pids(served)
        os.kill(pids[1], signal.SIGKILL)
        served.wait_logged("broker worker exited: restarting")
        served.wait_logged("broker listening", count=3)
        assert worker_pids(served)[1] != pids[1]
    finally:
        for client in clients:
            client.close()
        code = served.stop()
    assert code == 0, served.text()[-3000:]
    for pid in worker_pids(served).values():
        assert not alive(pid)


def test_workers_without_a_fabric_are_refused(fleet: Fleet) -> None:
    served = ServeBroker(fleet, "--workers", "2")
    assert served.process.wait(30) != 0
    assert "--workers 2 needs [fabric]" in served.text()


def test_a_worker_that_cannot_start_stops_the_command(fleet: Fleet) -> None:
    """Every worker needs the fabric: unreachable, the first one's failure ends it all."""
    (fleet.config.home / "fleetgate.toml").write_text(
        f'[fabric]\nservers = ["nats://127.0.0.1:{free_port()}"]\nconnect_timeout_s = 1\n'
    )
    served = ServeBroker(fleet, "--workers", "2")
    assert served.process.wait(60) == 1
    text = served.text()
    assert "cannot reach the fabric" in text
    assert "exited at start" in text
