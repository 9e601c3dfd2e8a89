"""The broker as operators run it: ``fleetgate serve broker``, its TLS policy, the plaintext test
listener (off unless asked for, loopback only), ``/metrics`` and the ``[broker]`` settings."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import types
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
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from paho.mqtt.enums import CallbackAPIVersion
from registry_helpers import new_registry

from broker import Broker
from enrollment import profiles
from enrollment.ca import is_initialised
from enrollment.registry import DeviceState
from fleetgate.config import CONFIG_FILE, DEFAULT_CONFIG_TOML, load_config
from fleetgate.errors import ConfigError
from fleetgate.keyfiles import write_certificates, write_private_key

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


def test_tls_connections_use_tcp_nodelay(fleet, broker):
    creds = enroll(fleet, "sensor-1")
    client = Paho(broker, creds)
    client.connect()

    def nodelay() -> list[int]:
        found = []
        for protocol in broker.broker._protocols.values():
            sock = protocol.transport.get_extra_info("socket")
            found.append(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        return found

    assert broker.call(nodelay) == [1]
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


# -- the connect path: handshake reports, admission off the loop, the broker's own certificate -----


def test_a_client_that_hangs_up_during_the_handshake_is_reported_without_an_asyncio_error(
    broker, caplog
):
    caplog.set_level(logging.INFO)
    with socket.create_connection(("127.0.0.1", broker.port), timeout=5) as raw:
        raw.shutdown(socket.SHUT_WR)  # a port probe: connect, then EOF before any ClientHello
        assert raw.recv(100) == b""  # the broker closes its side too
    assert broker.metric("tls_handshake_failures_total", 'reason="other"') == 1
    # The audit writer commits in a thread: wait for the row, not for time to pass.
    refused = wait_for(
        lambda: broker.audit_events(action="mqtt.tls_handshake", outcome="refused"),
        what="the refused handshake's audit event",
    )
    assert [e.reason for e in refused] == [
        "connection closed before the TLS handshake finished (a port probe or health check?) "
        f"[node {broker.broker.node_name}]"
    ]
    assert not [r for r in caplog.records if r.name == "asyncio" and r.levelno >= logging.ERROR]
    # The listener still serves the next client normally.
    client = Paho(broker, enroll(broker.fleet, "sensor-1"))
    assert client.connect()[0] == 0
    client.close()


def test_a_handshake_that_never_starts_times_out_and_is_reported(fleet):
    running = RunningBroker(fleet, tls_handshake_timeout_s=0.3).start()
    try:
        with socket.create_connection(("127.0.0.1", running.port), timeout=5) as raw:
            assert raw.recv(100) == b""  # closed by the broker after 0.3 s of silence
        assert running.metric("tls_handshake_failures_total", 'reason="timeout"') == 1
        refused = wait_for(
            lambda: running.audit_events(action="mqtt.tls_handshake", outcome="refused"),
            what="the timed-out handshake's audit event",
        )
        node = running.broker.node_name
        assert [e.reason for e in refused] == [f"TLS handshake timed out [node {node}]"]
    finally:
        running.stop()


def test_admission_in_a_thread_as_for_postgresql_gives_the_same_verdicts(fleet):
    """SQLite is read on the event loop; a remote database in a thread, with the connection's
    reading paused meanwhile. Both paths read the registry at every CONNECT."""
    running = RunningBroker(fleet)
    assert running.broker._admit_inline  # the fleet's registry is SQLite
    running.broker._admit_inline = False
    running.start()
    try:
        creds = enroll(fleet, "sensor-1")
        client = Paho(running, creds)
        assert client.connect()[0] == 0
        client.close()
        fleet.service.change_device("sensor-1", DeviceState.SUSPENDED, reason="test", actor="test")
        refused = Paho(running, creds)
        assert refused.connect()[0] == 0x87  # the current registry state, not a cached verdict
        refused.close()
    finally:
        running.stop()


def _short_lived_broker_certificate(fleet, ca_dir: Path, names: tuple[str, ...]) -> int:
    """Swap in a broker certificate 10 days from expiry, as if the broker had run for months."""
    key = ec.generate_private_key(ec.SECP256R1())
    short = fleet.service.ca.issue(
        profiles.SERVER, profiles.server_subject(names), key.public_key(), dt.timedelta(days=10)
    )
    write_private_key(ca_dir / "broker.key", key)
    write_certificates(ca_dir / "broker.crt", [short, fleet.service.ca.anchors.issuing])
    return int(short.serial_number)


def _served_serial(port: int, root: Path) -> int:
    context = ssl.create_default_context(cafile=str(root))
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # the server's certificate is all this looks at
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        context.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
        assert der is not None
        return int(x509.load_der_x509_certificate(der).serial_number)


def _on_disk_serial(path: Path) -> int:
    return int(x509.load_pem_x509_certificates(path.read_bytes())[0].serial_number)


def test_a_running_broker_renews_its_own_certificate_when_due(fleet):
    running = RunningBroker(fleet)
    running.broker.certificate_check_interval_s = 0.1
    running.start()
    try:
        ca_dir = fleet.config.ca_dir
        short = _short_lived_broker_certificate(fleet, ca_dir, running.config.broker.server_names)
        renewed = wait_for(
            lambda: (serial := _on_disk_serial(ca_dir / "broker.crt")) != short and serial,
            what="the due broker certificate to be renewed",
        )
        cert = x509.load_pem_x509_certificates((ca_dir / "broker.crt").read_bytes())[0]
        assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > dt.timedelta(days=300)
        wait_for(lambda: _served_serial(running.port, fleet.root) == renewed, what="the reload")
    finally:
        running.stop()


def test_a_broker_host_without_the_ca_logs_once_that_its_certificate_is_due(
    fleet, tmp_path, caplog
):
    # A broker host as `fleetgate ca server-cert` sets one up: public CA files, its certificate
    # and key, no issuing key.
    RunningBroker(fleet).start().stop()  # issues ca/broker.crt on the CA host
    remote = load_config(tmp_path / "broker-host", environ={})
    remote.ca_dir.mkdir(parents=True)
    for name in ("broker.crt", "broker.key", "chain.pem", "root.crt"):
        shutil.copy(fleet.config.ca_dir / name, remote.ca_dir / name)
    assert not is_initialised(remote)
    new_registry(remote.database_url).close()  # its own registry, as `fleetgate db upgrade` makes
    caplog.set_level(logging.WARNING, logger="fleetgate.broker")
    running = RunningBroker(types.SimpleNamespace(config=remote, root=fleet.root))
    running.broker.certificate_check_interval_s = 0.05
    running.start()
    try:
        short = _short_lived_broker_certificate(
            fleet, remote.ca_dir, running.config.broker.server_names
        )

        def due_warnings() -> list[logging.LogRecord]:
            return [r for r in caplog.records if "due for renewal" in r.getMessage()]

        wait_for(due_warnings, what="the warning")
        time.sleep(0.3)  # several more checks
        assert len(due_warnings()) == 1
        message = due_warnings()[0].getMessage()
        assert "fleetgate ca server-cert" in message and str(remote.ca_dir) in message
        assert _on_disk_serial(remote.ca_dir / "broker.crt") == short  # nothing was issued
        assert _served_serial(running.port, fleet.root) != short  # still the one it started with
    finally:
        running.stop()
