"""DeviceClient against Debian's Mosquitto over mutual TLS 1.3, with devices enrolled over EST.

Every test uses the real parts: the EST server fixture issues the device certificates, mosquitto
(a subprocess with the fleet's server certificate, client certificates required) is the broker,
and the SDK connects through paho-mqtt.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import Fleet, RunningServer
from sdk_helpers import (  # noqa: F401  (fixtures)
    Devices,
    Inbox,
    Mosquitto,
    broker_fixture,
    devices_fixture,
    impostor_server_cert,
    wait_for,
)

from device_sdk import (
    Backoff,
    ClientClosed,
    EnrollmentError,
    KeyStoreError,
    Message,
    NotConnected,
    QueueFull,
    RenewalPolicy,
)
from enrollment.config import load_config
from enrollment.registry import CertStatus, DeviceState, SubjectKind

TOPIC = "devices/sensor-1/telemetry"


def numbered(count: int, start: int = 0) -> list[bytes]:
    return [f"reading-{i}".encode() for i in range(start, start + count)]


# -- connecting --------------------------------------------------------------------------------


def test_enrolled_device_connects_with_mtls_and_its_device_id_as_client_id(
    broker: Mosquitto, devices: Devices
) -> None:
    store = devices.enroll("sensor-1")
    assert (store.key_path.stat().st_mode & 0o777) == 0o600
    client = devices.client(store, "sensor-1", broker).start()
    info = client.wait_connected(10)
    assert info.tls_version == "TLSv1.3"
    assert info.mqtt_version == "5"
    assert info.certificate_serial == store.certificates()[0].serial_number
    # Mosquitto took the user name from the certificate's CN and the client id from the SDK.
    wait_for(lambda: "as sensor-1 (p5" in broker.log_text(), 5, "mosquitto logging the client")
    assert "u'sensor-1'" in broker.log_text()


def test_enrollment_refused_by_the_est_server_says_why_and_installs_nothing(
    devices: Devices,
) -> None:
    store = devices.store("sensor-9")  # never put in line-1's batch
    client = devices.client(store, "sensor-9")
    with pytest.raises(EnrollmentError) as refused:
        client.enroll(station_cert=devices.station.cert, station_key=devices.station.key)
    assert "refused to enroll sensor-9" in refused.value.message
    assert "add it with `fleetgate batch add line-1 sensor-9`" in refused.value.message
    with pytest.raises(KeyStoreError, match="enroll the device first"):
        store.certificates()
    assert sorted(p.name for p in store.directory.iterdir()) == ["ca.crt"]


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("foreign CA", "unable to get local issuer certificate"),
        ("fleet CA, other host", "Hostname mismatch"),
    ],
)
def test_broker_certificate_must_come_from_the_fleet_ca_and_name_the_host(
    fleet: Fleet, devices: Devices, tmp_path: Path, case: str, reason: str
) -> None:
    store = devices.enroll("sensor-1")
    certfile, keyfile = impostor_server_cert(fleet, tmp_path, case)
    impostor = Mosquitto(
        tmp_path / "impostor", cafile=fleet.chain, certfile=certfile, keyfile=keyfile
    ).start()
    try:
        client = devices.client(store, "sensor-1", impostor).start()
        wait_for(lambda: client.last_error is not None, 5, "a refused attempt")
        with pytest.raises(NotConnected) as refused:
            client.wait_connected(0.1)
        assert refused.value.last_error is not None
        assert "failed verification" in refused.value.last_error
        assert reason in refused.value.last_error
        assert "New client connected" not in impostor.log_text()
    finally:
        impostor.stop()


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
def test_a_refused_connect_names_the_brokers_reason(
    fleet: Fleet, devices: Devices, tmp_path: Path, mqtt_version: str
) -> None:
    store = devices.enroll("sensor-1")
    picky = Mosquitto(
        tmp_path / "picky",
        cafile=fleet.chain,
        certfile=fleet.config.ca_dir / "server.crt",
        keyfile=fleet.config.ca_dir / "server.key",
        extra=("clientid_prefixes gateway-",),  # refuses every sensor-* client id
    ).start()
    try:
        client = devices.client(store, "sensor-1", picky, mqtt_version=mqtt_version).start()
        wait_for(lambda: client.last_error is not None, 5, "a refused attempt")
        with pytest.raises(NotConnected) as refused:
            client.wait_connected(0.1)
        assert "the broker refused the connection: Not authorized (0x87)" in str(refused.value)
        assert "does not admit this device" in str(refused.value)
    finally:
        picky.stop()


# -- messages ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("mqtt_version", "logged"), [("5", "p5"), ("3.1.1", "p2")])
def test_qos0_and_qos1_messages_round_trip_between_two_devices(
    broker: Mosquitto, devices: Devices, mqtt_version: str, logged: str
) -> None:
    sender = devices.client(
        devices.enroll("sensor-1"), "sensor-1", broker, mqtt_version=mqtt_version
    )
    receiver = devices.client(
        devices.enroll("sensor-2"), "sensor-2", broker, mqtt_version=mqtt_version
    )
    inbox = Inbox()
    subscribed = receiver.subscribe("devices/+/telemetry", inbox, qos=1)
    receiver.start().wait_connected(10)
    subscribed.wait(5)
    sender.start().wait_connected(10)

    sender.publish(TOPIC, b"qos1-a", qos=1).wait(5)
    assert sender.publish(TOPIC, "qos0-b", qos=0).done
    sender.publish(TOPIC, b"qos1-c", qos=1).wait(5)
    wait_for(lambda: len(inbox.messages) == 3, 5, "three messages delivered")
    assert inbox.payloads == [b"qos1-a", b"qos0-b", b"qos1-c"]
    assert [m.qos for m in inbox.messages] == [1, 0, 1]
    assert {m.topic for m in inbox.messages} == {TOPIC}
    assert f"as sensor-1 ({logged}" in broker.log_text()


def test_handlers_may_publish_and_block_without_stalling_the_session(
    broker: Mosquitto, devices: Devices
) -> None:
    """A command handler answers by publishing and waiting for the PUBACK, on its own thread."""
    device = devices.client(devices.enroll("sensor-1"), "sensor-1", broker)
    operator = devices.client(devices.enroll("sensor-2"), "sensor-2", broker)
    replies = Inbox()

    def on_command(message: Message) -> None:
        device.publish("devices/sensor-1/replies", b"done").wait(5)  # blocks on the PUBACK

    commands = device.subscribe("devices/sensor-1/commands/#", on_command)
    subscribed = operator.subscribe("devices/sensor-1/replies", replies)
    device.start()
    operator.start()
    commands.wait(10)
    subscribed.wait(10)
    operator.publish("devices/sensor-1/commands/reboot", b"now").wait(5)
    wait_for(lambda: replies.payloads == [b"done"], 10, "the reply")


def test_qos0_while_offline_is_refused_and_qos1_is_queued_up_to_the_bound(
    broker: Mosquitto, devices: Devices
) -> None:
    sender = devices.client(devices.enroll("sensor-1"), "sensor-1", broker, max_queued=3)
    receiver = devices.client(devices.enroll("sensor-2"), "sensor-2", broker)
    inbox = Inbox()

    with pytest.raises(NotConnected, match="use qos=1 to queue"):
        sender.publish(TOPIC, b"lost", qos=0)
    acks = [sender.publish(TOPIC, payload) for payload in numbered(3)]
    with pytest.raises(QueueFull) as full:
        sender.publish(TOPIC, b"one too many")
    assert full.value.bound == 3
    assert "max_queued" in full.value.message
    assert sender.queued == 3

    subscribed = receiver.subscribe("devices/+/telemetry", inbox)
    receiver.start()
    subscribed.wait(10)
    sender.start()
    for ack in acks:
        ack.wait(10)
    assert sender.queued == 0
    sender.publish(TOPIC, b"room again").wait(5)
    wait_for(lambda: len(inbox.messages) == 4, 5, "four messages delivered")
    assert inbox.payloads == [*numbered(3), b"room again"]


def test_close_fails_what_is_still_queued_with_client_closed(devices: Devices) -> None:
    store = devices.enroll("sensor-1")
    client = devices.client(store, "sensor-1").start()  # nothing listens on its port
    ack = client.publish(TOPIC, b"never sent")
    client.close()
    with pytest.raises(ClientClosed):
        ack.wait(1)
    with pytest.raises(ClientClosed):
        client.publish(TOPIC, b"after close")


# -- reconnecting ------------------------------------------------------------------------------


@pytest.mark.parametrize("signal", ["SIGTERM", "SIGKILL"])
def test_qos1_messages_published_while_the_broker_is_down_arrive_in_order_after_restart(
    broker: Mosquitto, devices: Devices, signal: str
) -> None:
    backoff = Backoff(initial=0.1, maximum=0.8)
    sender = devices.client(
        devices.enroll("sensor-1"), "sensor-1", broker, backoff=backoff, max_queued=100
    )
    receiver = devices.client(devices.enroll("sensor-2"), "sensor-2", broker, session_expiry=600)
    inbox = Inbox()
    subscribed = receiver.subscribe("devices/sensor-1/#", inbox)
    receiver.start()
    subscribed.wait(10)
    sender.start().wait_connected(10)
    for payload in numbered(5):
        sender.publish(TOPIC, payload)
    sender.flush(5)
    wait_for(lambda: len(inbox.messages) == 5, 5, "the first five delivered")

    broker.stop() if signal == "SIGTERM" else broker.kill()
    wait_for(lambda: sender.connection is None, 5, "the sender noticing")
    for payload in numbered(95, start=5):
        sender.publish(TOPIC, payload)
    assert sender.queued == 95
    time.sleep(1.5)  # several refused reconnects
    delays = list(sender.reconnect_delays)
    assert len(delays) >= 3
    assert all(0 <= d <= backoff.bound(i) for i, d in enumerate(delays)), delays
    assert "is the broker running?" in (sender.last_error or "")
    assert len(inbox.messages) == 5

    broker.start()
    sender.flush(20)
    wait_for(lambda: numbered(1, start=99)[0] in inbox.payloads, 20, "the last message")
    # The broker may deliver the first five to the resumed session again (their PUBACKs can
    # be lost with the broker); the sender's queue must arrive in order, none lost, none twice.
    after_restart = [p for p in inbox.payloads[5:] if p not in numbered(5)]
    assert after_restart == numbered(95, start=5)
    receiver_session = receiver.wait_connected(5)
    assert receiver_session.session_present  # mosquitto kept the subscription on disk


# -- renewal -----------------------------------------------------------------------------------


@pytest.fixture
def short_lived_est(
    fleet: Fleet, home: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[RunningServer]:
    """An EST server issuing device certificates valid for one day."""
    monkeypatch.setenv("FLEETGATE_CA_DEVICE_VALIDITY_DAYS", "1")
    server = RunningServer(load_config(home)).start()
    yield server
    server.stop()


def test_certificate_is_renewed_after_two_thirds_of_its_validity_without_losing_messages(
    fleet: Fleet, broker: Mosquitto, short_lived_est: RunningServer, tmp_path: Path
) -> None:
    devices = Devices(fleet, short_lived_est, tmp_path / "devices")
    try:
        store = devices.enroll("sensor-1")
        first = store.certificates()[0]
        assert first.not_valid_after_utc - first.not_valid_before_utc < dt.timedelta(
            days=1, hours=1
        )
        due = threading.Event()

        def clock() -> dt.datetime:
            """Seventeen hours on (past two thirds of a day) once due, until renewed."""
            now = dt.datetime.now(dt.UTC)
            renewed = store.certificates()[0].serial_number != first.serial_number
            return now + dt.timedelta(hours=17) if due.is_set() and not renewed else now

        sender = devices.client(
            store,
            "sensor-1",
            broker,
            est_url=short_lived_est.url,
            renewal=RenewalPolicy(check_interval=0.05, clock=clock),
        )
        receiver = devices.client(devices.enroll("sensor-2"), "sensor-2", broker)
        inbox = Inbox()
        subscribed = receiver.subscribe("devices/sensor-1/#", inbox)
        receiver.start()
        subscribed.wait(10)
        assert sender.start().wait_connected(10).certificate_serial == first.serial_number
        for payload in numbered(10):
            sender.publish(TOPIC, payload)
        sender.flush(5)

        due.set()
        sent, while_switching = 10, 0
        deadline = time.monotonic() + 15
        while (info := sender.connection) is None or info.certificate_serial == first.serial_number:
            assert time.monotonic() < deadline, f"no renewal: {sender.last_error}"
            sender.publish(TOPIC, numbered(1, start=sent)[0])
            sent += 1
            while_switching += info is None  # queued while no session was up
            time.sleep(0.0005)
        assert while_switching > 0  # the switch was exercised with messages waiting
        for payload in numbered(10, start=sent):
            sender.publish(TOPIC, payload)
        sent += 10
        sender.flush(10)

        renewed = store.certificates()[0]
        assert renewed.serial_number != first.serial_number
        assert renewed.public_key() != first.public_key()  # a new key, too
        assert info.certificate_serial == renewed.serial_number
        assert (store.key_path.stat().st_mode & 0o777) == 0o600
        assert not list(store.directory.glob("*.new"))
        rows = {
            r.serial: r.status
            for r in fleet.registry.certificates_of(SubjectKind.DEVICE, "sensor-1")
        }
        assert rows == {
            f"{first.serial_number:x}": CertStatus.SUPERSEDED,
            f"{renewed.serial_number:x}": CertStatus.ACTIVE,
        }
        wait_for(lambda: len(inbox.messages) >= sent, 10, f"all {sent} messages delivered")
        assert inbox.payloads == numbered(sent)  # in order, none lost, none twice
        assert broker.log_text().count("as sensor-1 (p5") == 2  # reconnected once, with it
    finally:
        devices.close()


def test_refused_renewal_leaves_the_working_identity_in_place(
    fleet: Fleet, devices: Devices
) -> None:
    store = devices.enroll("sensor-1")
    before = store.certificates()
    fleet.service.change_device("sensor-1", DeviceState.SUSPENDED, reason="lost", actor="test")
    with pytest.raises(EnrollmentError) as refused:
        devices.client(store, "sensor-1").renew()
    assert "refused to reenroll sensor-1" in refused.value.message
    assert "suspended" in refused.value.message
    assert store.certificates() == before
    assert sorted(p.name for p in store.directory.iterdir()) == [
        "ca.crt",
        "device.crt",
        "device.key",
    ]
