"""The broker as operators run it: ``fleetgate serve broker``, its TLS policy, the plaintext test
listener (off unless asked for, loopback only), ``/metrics`` and the ``[broker]`` settings."""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from broker_helpers import (  # running_broker: the `broker` fixture
    V5,
    Paho,
    RunningBroker,
    enroll,
    free_port,
    running_broker,  # noqa: F401
    tls_context,
    wait_for,
)
from paho.mqtt.enums import CallbackAPIVersion

from broker import Broker
from enrollment.config import CONFIG_FILE, DEFAULT_CONFIG_TOML, load_config
from enrollment.errors import ConfigError

FLEETGATE = str(Path(sys.executable).with_name("fleetgate"))


# -- settings ------------------------------------------------------------------------------------


def test_broker_settings_default_to_mtls_on_8883_with_plaintext_off(tmp_path):
    (tmp_path / CONFIG_FILE).write_text(DEFAULT_CONFIG_TOML)
    settings = load_config(tmp_path, environ={}).broker
    assert (settings.port, settings.allow_tls12, settings.plaintext_port) == (8883, False, 0)
    assert settings.feed_poll_interval_s == 0.1
    env = {"FLEETGATE_BROKER_PORT": "18883", "FLEETGATE_BROKER_ALLOW_TLS12": "true"}
    overridden = load_config(tmp_path, environ=env).broker
    assert (overridden.port, overridden.allow_tls12) == (18883, True)


@pytest.mark.parametrize("host", ["0.0.0.0", "192.0.2.1", "::", "example.com"])
def test_plaintext_listener_refuses_a_non_loopback_address(fleet, host):
    broker_settings = dataclasses.replace(
        fleet.config.broker, plaintext_port=1884, plaintext_host=host, plaintext_identity="t"
    )
    with pytest.raises(ConfigError, match="not a loopback address"):
        Broker(dataclasses.replace(fleet.config, broker=broker_settings))


def test_plaintext_listener_needs_a_valid_test_identity(fleet):
    broker_settings = dataclasses.replace(fleet.config.broker, plaintext_port=1884)
    with pytest.raises(ConfigError, match="plaintext_identity"):
        Broker(dataclasses.replace(fleet.config, broker=broker_settings))


def test_plaintext_listener_is_off_by_default(broker):
    assert broker.broker.ports.plaintext == 0


# -- the plaintext test listener -------------------------------------------------------------------


def test_plaintext_listener_maps_every_client_to_the_test_identity_under_its_acl(fleet, caplog):
    caplog.set_level(logging.WARNING, logger="fleetgate.broker")
    running = RunningBroker(
        fleet, plaintext_port=free_port(), plaintext_identity="conformance"
    ).start()
    try:
        assert any("PLAINTEXT" in r.getMessage() for r in caplog.records)
        port = running.broker.ports.plaintext
        clients = []
        for client_id in ("suite-a", "suite-b"):  # many client ids, one identity, no takeover
            client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=V5)
            codes: list[int] = []
            client.on_publish = lambda c, u, mid, rc, p, codes=codes: codes.append(rc.value)
            client.connect("127.0.0.1", port)
            client.loop_start()
            clients.append((client, codes))
        for client, codes in clients:
            client.publish("devices/conformance/x", b"1", qos=1).wait_for_publish(5)
            client.publish("devices/other/x", b"1", qos=1).wait_for_publish(5)
            wait_for(lambda codes=codes: len(codes) == 2)
            assert codes == [0, 135]
            client.disconnect()
            client.loop_stop()
        # the audit writer stores in batches off the event loop: wait for it, then count
        wait_for(lambda: len(running.audit_events("conformance", action="mqtt.publish")) >= 2)
        assert len(running.audit_events("conformance", action="mqtt.publish")) == 2
        assert running.metric("connections_total", 'listener="plaintext"') == 2
    finally:
        running.stop()


# -- TLS policy ------------------------------------------------------------------------------------


def _handshake(broker: RunningBroker, creds, **context_settings) -> ssl.SSLSocket:
    context = tls_context(broker, creds)
    for name, value in context_settings.items():
        setattr(context, name, value)
    raw = socket.create_connection(("localhost", broker.port), timeout=10)
    return context.wrap_socket(raw, server_hostname="localhost")


def test_tls12_is_refused_unless_configured(fleet, broker):
    creds = enroll(fleet, "sensor-1")
    with pytest.raises(ssl.SSLError, match=r"PROTOCOL_VERSION|protocol version"):
        _handshake(broker, creds, maximum_version=ssl.TLSVersion.TLSv1_2)
    wait_for(lambda: broker.metric("tls_handshake_failures_total", 'reason="protocol_version"'))
    legacy = RunningBroker(fleet, allow_tls12=True).start()
    try:
        tls = _handshake(legacy, creds, maximum_version=ssl.TLSVersion.TLSv1_2)
        name, version, _ = tls.cipher()
        assert version == "TLSv1.2"
        assert name.startswith("ECDHE-ECDSA-") and ("GCM" in name or "CHACHA20" in name)
        tls.close()
    finally:
        legacy.stop()


@pytest.mark.parametrize(
    ("suites", "expected"),
    [
        ("TLS_CHACHA20_POLY1305_SHA256:TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"),
        ("TLS_AES_256_GCM_SHA384:TLS_CHACHA20_POLY1305_SHA256", "TLS_AES_256_GCM_SHA384"),
    ],
)
def test_a_client_preferring_chacha20_gets_it(fleet, broker, suites, expected):
    creds = enroll(fleet, "sensor-1")
    result = subprocess.run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"localhost:{broker.port}",
            "-brief",
            "-ciphersuites",
            suites,
            "-CAfile",
            str(fleet.root),
            "-cert",
            str(creds.cert),
            "-key",
            str(creds.key),
        ],
        input="",
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert f"Ciphersuite: {expected}" in result.stderr, result.stderr
    assert "Protocol version: TLSv1.3" in result.stderr


def test_tls_connections_use_a_small_read_buffer_and_tcp_nodelay(fleet, broker):
    creds = enroll(fleet, "sensor-1")
    client = Paho(broker, creds)
    client.connect()

    def inspect() -> list[tuple[int, int]]:
        found = []
        for protocol in broker.broker._protocols.values():
            transport = protocol.transport
            sock = transport.get_extra_info("socket")
            nodelay = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            found.append((transport._ssl_protocol.max_size, nodelay))
        return found

    assert broker.call(inspect) == [(4096, 1)]
    client.close()


# -- /metrics --------------------------------------------------------------------------------------


def test_metrics_are_served_in_prometheus_text_format_on_loopback(broker):
    url = f"http://127.0.0.1:{broker.broker.ports.metrics}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        text = response.read().decode()
    assert "# TYPE fleetgate_broker_connections gauge" in text
    assert 'fleetgate_broker_messages_received_total{qos="2"} 0' in text


# -- fleetgate serve broker ------------------------------------------------------------------------


def test_serve_broker_runs_as_its_own_process_kicks_on_revoke_and_stops_on_sigterm(fleet, tmp_path):
    creds = enroll(fleet, "sensor-1")
    port, metrics_port = free_port(), free_port()
    env = {
        **os.environ,
        "FLEETGATE_BROKER_PORT": str(port),
        "FLEETGATE_BROKER_METRICS_PORT": str(metrics_port),
    }
    log = (tmp_path / "broker.log").open("w")
    process = subprocess.Popen(
        [FLEETGATE, "serve", "broker"], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_for(lambda: _listening(port), timeout=30, what="the broker to listen")
        target = _PortOnly(fleet, port)
        device = Paho(target, creds)
        assert device.connect()[0] == 0
        revoke = subprocess.run(
            [FLEETGATE, "device", "revoke", "sensor-1"], env=env, capture_output=True, timeout=60
        )
        assert revoke.returncode == 0
        assert device.disconnect_code(timeout=5)[0] == 0x98
        device.close()
        other = Paho(target, enroll(fleet, "sensor-2"))
        assert other.connect()[0] == 0
        process.send_signal(signal.SIGTERM)
        assert other.disconnect_code(timeout=10)[0] == 0x8B  # server shutting down
        assert process.wait(15) == 0
        other.close()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()
    assert '"msg": "broker stopped"' in (tmp_path / "broker.log").read_text()


class _PortOnly:
    """Enough of :class:`RunningBroker` for :class:`Paho` to reach a broker in a subprocess."""

    def __init__(self, fleet, port: int) -> None:
        self.fleet = fleet
        self.port = port


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def test_broker_stops_promptly_with_clients_connected(fleet):
    running = RunningBroker(fleet).start()
    client = Paho(running, enroll(fleet, "sensor-1"))
    client.connect()
    started = time.monotonic()
    running.stop()
    assert time.monotonic() - started < 3
    assert client.disconnect_code(timeout=5)[0] == 0x8B
    client.close()
