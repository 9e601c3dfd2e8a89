"""Who gets in: only a device holding its current certificate from the fleet CA, as itself.

Each refusal is checked three ways: what the real client sees (a TLS alert, or the CONNACK code
of its protocol version), the audit event naming the device (or peer) and the reason, and the
``/metrics`` counter for that reason.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest
from amqtt.client import ConnectError, MQTTClient
from broker_helpers import (  # running_broker: the `broker` fixture
    V5,
    V311,
    Creds,
    Paho,
    RunningBroker,
    craft,
    enroll,
    foreign_ca_device,
    mosquitto,
    running_broker,  # noqa: F401
    wait_for,
)
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from broker.acl import DEFAULT_TEMPLATE, AclTemplate
from broker.admission import (
    Admitted,
    CertificateIdentities,
    Identity,
    Refused,
    Unidentified,
    decide_admission,
    read_admission_facts,
)
from broker.mqtt import ReasonCode
from enrollment import profiles
from enrollment.registry import (
    AdmissionFacts,
    CertificateFacts,
    CertStatus,
    DeviceState,
    Registry,
    SubjectKind,
)
from fleetgate.keyfiles import load_certificates

VERSIONS = [("mqttv311", 5), ("mqttv5", 135)]  # mosquitto's -V, and the CONNACK code expected
PAHO_NOT_AUTHORIZED = 135  # paho 2 reports 3.1.1's return code 5 as reason code 135 too
NOW = dt.datetime.now(dt.UTC)


def handshake_refused(broker: RunningBroker, creds: Creds | None, alert: str) -> None:
    """mosquitto_pub is turned away by a TLS alert, never reaching MQTT."""
    result = mosquitto("mosquitto_pub", broker, creds, "-t", "devices/x/t", "-m", "1")
    assert result.returncode != 0
    assert alert in result.stdout + result.stderr
    assert "received CONNACK" not in result.stdout


def audited_handshake(broker: RunningBroker, reason: str) -> None:
    """The client may see the alert a moment before the broker has reported the refusal."""

    def found() -> bool:
        events = broker.audit_events(None, action="mqtt.tls_handshake", outcome="refused")
        return any(reason in e.reason for e in events)

    wait_for(found, what=f"a refused handshake audited with {reason!r}")


def audited_connect(broker: RunningBroker, subject: str | None, reason: str) -> None:
    def found() -> bool:
        events = broker.audit_events(subject, action="mqtt.connect", outcome="refused")
        return any(reason in e.reason for e in events)

    wait_for(found, what=f"an mqtt.connect refusal audited with {reason!r}")


def connack_refused(broker: RunningBroker, creds: Creds, *args: str) -> None:
    """mosquitto_pub, both protocol versions, gets a refusing CONNACK with that version's code."""
    for version, code in VERSIONS:
        result = mosquitto(
            "mosquitto_pub",
            broker,
            creds,
            "-t",
            f"devices/{creds.device_id}/t",
            "-m",
            "1",
            *args,
            version=version,
        )
        assert f"received CONNACK ({code})" in result.stdout, result.stdout + result.stderr
        assert result.returncode != 0


# -- refused during the TLS handshake --------------------------------------------------------------


def test_connection_without_client_certificate_is_refused_with_certificate_required_alert(
    broker,
):
    handshake_refused(broker, None, "alert certificate required")
    audited_handshake(broker, "client presented no certificate")
    assert broker.metric("tls_handshake_failures_total", 'reason="no_client_certificate"') == 1


def test_certificate_from_a_foreign_ca_is_refused_with_unknown_ca_alert(fleet, broker):
    handshake_refused(broker, foreign_ca_device(fleet, "alien-1"), "alert unknown ca")
    audited_handshake(broker, "unable to get local issuer certificate")
    assert broker.metric("tls_handshake_failures_total", 'reason="unknown_ca"') == 1


def test_expired_device_certificate_is_refused_with_certificate_expired_alert(fleet, broker):
    expired = craft(
        fleet,
        "old-1",
        profiles.DEVICE,
        uris=("urn:fleetgate:device:old-1",),
        now=NOW - dt.timedelta(days=60),
    )
    handshake_refused(broker, expired, "alert certificate expired")
    audited_handshake(broker, "certificate has expired")
    assert broker.metric("tls_handshake_failures_total", 'reason="certificate_expired"') == 1


def test_not_yet_valid_device_certificate_is_refused_with_bad_certificate_alert(fleet, broker):
    future = craft(
        fleet,
        "future-1",
        profiles.DEVICE,
        uris=("urn:fleetgate:device:future-1",),
        now=NOW + dt.timedelta(days=2),
    )
    handshake_refused(broker, future, "alert bad certificate")
    audited_handshake(broker, "certificate is not yet valid")
    assert broker.metric("tls_handshake_failures_total", 'reason="certificate_not_yet_valid"') == 1


def test_server_certificate_without_client_auth_eku_is_refused_with_unsupported_certificate(
    fleet, broker
):
    server_cert = craft(
        fleet, "srv-1", profiles.SERVER, uris=("urn:fleetgate:device:srv-1",), dns_names=("x",)
    )
    handshake_refused(broker, server_cert, "alert unsupported certificate")
    audited_handshake(broker, "unsuitable certificate purpose")
    assert broker.metric("tls_handshake_failures_total", 'reason="wrong_purpose"') == 1


def test_paho_without_client_certificate_is_dropped_before_any_connack(broker):
    client = Paho(broker, None, client_id="sensor-1")
    client.start()  # TLS 1.3: the client's side of the handshake ends before the server's check
    code, _ = client.disconnect_code()
    assert code != 0
    assert client.events.connack.empty()
    client.close()
    audited_handshake(broker, "client presented no certificate")


# -- refused at CONNECT, after a valid handshake ---------------------------------------------------


def test_station_certificate_is_refused_with_connack_not_authorized(fleet, broker):
    station = fleet.add_station("line-9")
    creds = Creds("line-9", station.cert, station.key)
    connack_refused(broker, creds)
    audited_connect(broker, None, "a station certificate (line-9) cannot connect")
    assert broker.metric("connect_refusals_total", 'reason="identity"') == 2


def test_certificate_without_any_eku_is_refused_by_identify_client(fleet, broker):
    no_eku = profiles.Profile("no-eku", is_ca=False, digital_signature=True)
    creds = craft(fleet, "bare-1", no_eku, uris=("urn:fleetgate:device:bare-1",))
    connack_refused(broker, creds)
    audited_connect(broker, None, "lacks the clientAuth extended key usage")


@pytest.mark.parametrize("bad_id", ["sensor+1", "sensor#1", "+", "#"])
def test_identity_with_mqtt_wildcard_is_refused(fleet, broker, bad_id):
    creds = craft(fleet, "wild", profiles.DEVICE, uris=(f"urn:fleetgate:device:{bad_id}",))
    result = mosquitto("mosquitto_pub", broker, creds, "-t", "devices/x/t", "-m", "1", "-i", "w")
    assert "received CONNACK (135)" in result.stdout
    audited_connect(broker, None, "names an invalid device")


@pytest.mark.parametrize("version", [V311, V5])
def test_revoked_device_is_refused_at_connect(fleet, broker, version):
    creds = enroll(fleet, "sensor-1")
    fleet.service.change_device("sensor-1", DeviceState.REVOKED, reason="keyCompromise", actor="t")
    client = Paho(broker, creds, version=version)
    code, _, props = client.connect()
    assert code == PAHO_NOT_AUTHORIZED
    if version == V5:
        assert props.ReasonString == "device sensor-1 is revoked"
    audited_connect(broker, "sensor-1", "device sensor-1 is revoked")
    assert broker.metric("connect_refusals_total", 'reason="admission"') == 1
    client.close()


def test_suspended_device_is_refused_at_connect_by_all_three_clients(fleet, broker):
    creds = enroll(fleet, "sensor-1")
    fleet.service.change_device("sensor-1", DeviceState.SUSPENDED, reason="hold", actor="t")
    connack_refused(broker, creds)
    client = Paho(broker, creds, version=V5)
    assert client.connect()[0] == 135
    client.close()
    with pytest.raises(ConnectError):
        asyncio.run(amqtt_connect(broker, creds))
    audited_connect(broker, "sensor-1", "device sensor-1 is suspended")
    wait_for(lambda: broker.metric("connect_refusals_total", 'reason="admission"') == 4)


def test_superseded_certificate_is_refused_after_renewal(fleet, broker):
    creds = enroll(fleet, "sensor-1")
    old_serial = fleet.registry.certificates_of("device", "sensor-1")[0].serial
    from enrollment.registry.models import Certificate, CertStatus

    with fleet.registry.transaction() as s:
        row = s.get(Certificate, old_serial)
        row.status = CertStatus.SUPERSEDED
    connack_refused(broker, creds)
    audited_connect(broker, "sensor-1", "superseded")


def test_client_id_other_than_the_certificates_device_id_is_refused(fleet, broker):
    """3.1.1 "identifier rejected" (2) and 5.0 "client identifier not valid" (0x85): the client
    learns that its id, not its certificate, is what is wrong."""
    creds = enroll(fleet, "sensor-1")
    for version, code in [("mqttv311", 2), ("mqttv5", 133)]:
        result = mosquitto(
            "mosquitto_pub",
            broker,
            creds,
            "-i",
            "sensor-2",
            "-t",
            "devices/sensor-1/t",
            "-m",
            "1",
            version=version,
        )
        assert f"received CONNACK ({code})" in result.stdout
    client = Paho(broker, creds, version=V5, client_id="sensor-2")
    assert client.connect()[0] == 133
    client.close()
    audited_connect(broker, "sensor-1", "client id 'sensor-2' is not the certificate's device id")
    assert broker.metric("connect_refusals_total", 'reason="client_id"') == 3


@pytest.mark.parametrize("version", [V311, V5])
def test_empty_client_id_gets_the_device_id(fleet, broker, version):
    creds = enroll(fleet, "sensor-1")
    client = Paho(broker, creds, version=version, client_id="")
    code, present, props = client.connect()
    assert (code, present) == (0, False)
    if version == V5:
        assert props.AssignedClientIdentifier == "sensor-1"
    assert broker.call(lambda: sorted(broker.broker.core.sessions)) == ["sensor-1"]
    client.close()


def test_amqtt_client_with_its_device_certificate_is_admitted(fleet, broker):
    creds = enroll(fleet, "sensor-1")
    assert asyncio.run(amqtt_connect(broker, creds)) == 0


async def amqtt_connect(broker: RunningBroker, creds: Creds) -> int:
    client = MQTTClient(
        client_id=creds.device_id,
        config={
            "auto_reconnect": False,
            "connection": {"certfile": str(creds.cert), "keyfile": str(creds.key)},
        },
    )
    code = await client.connect(f"mqtts://localhost:{broker.port}/", cafile=str(broker.fleet.root))
    await client.disconnect()
    return code


def admit(registry, identity, *, barred=False, will_topic=None):
    """The broker's CONNECT verdict: the registry's facts, then the one decision."""
    facts = read_admission_facts(registry, identity)
    return decide_admission(facts, identity, barred=barred, will_topic=will_topic)


def test_merged_admission_read_gives_the_registrys_facts_and_the_verdicts(fleet):
    """read_admission_facts reads device, certificate and ACL in one statement: the facts equal
    the ORM path's, each verdict and reason is the expected one, the ACL equals a separate
    acl_patterns read, and an ACL or state change shows at the next CONNECT (nothing cached)."""
    from enrollment.registry.models import Certificate, CertStatus

    registry = fleet.registry
    creds = {name: enroll(fleet, name) for name in ("sensor-1", "sensor-2", "sensor-3")}
    enroll(fleet, "pump-1", group="pumps")
    serial = {
        name: int(registry.certificates_of("device", name)[0].serial, 16)
        for name in (*creds, "pump-1")
    }
    station_serial = int(registry.certificates_of("station", "line-1")[0].serial, 16)
    registry.change_device_state("sensor-2", DeviceState.SUSPENDED, reason="t", actor="test")
    registry.change_device_state("sensor-3", DeviceState.REVOKED, reason="t", actor="test")
    not_issued = "was not issued to sensor-1"
    cases = [
        (Identity("sensor-1", serial["sensor-1"]), None),
        (Identity("sensor-1", serial["sensor-2"]), not_issued),  # another device's certificate
        (Identity("sensor-1", station_serial), not_issued),  # a station's certificate
        (Identity("sensor-1", 12345), not_issued),  # no such certificate
        (Identity("sensor-2", serial["sensor-2"]), "device sensor-2 is suspended"),
        (Identity("sensor-3", serial["sensor-3"]), "device sensor-3 is revoked"),
        (Identity("ghost-1", serial["sensor-1"]), "device ghost-1 is not in the registry"),
        (Identity("pump-1", serial["pump-1"]), None),  # a group with its own ACL (none yet)
    ]

    # The same registry file read through SQLAlchemy rather than plain sqlite3 (the fast read).
    orm_reads = Registry(registry.url)
    orm_reads._fast_reads = None
    assert registry._fast_reads is not None

    def same() -> None:
        for identity, refusal in cases:
            facts = read_admission_facts(registry, identity)
            assert facts == read_admission_facts(orm_reads, identity)
            verdict = admit(registry, identity)
            if refusal is not None and not isinstance(verdict, Refused):
                raise AssertionError(f"{identity} admitted; expected {refusal!r}")
            if isinstance(verdict, Refused):
                assert refusal is not None and refusal in verdict.reason, (identity, verdict)
                continue
            patterns = registry.acl_patterns(verdict.group)
            template = (
                AclTemplate(patterns.publish, patterns.subscribe) if patterns else DEFAULT_TEMPLATE
            )
            assert verdict.acl == template.for_device(identity.device_id)

    same()
    assert admit(registry, cases[0][0]) == Admitted(
        "default", DEFAULT_TEMPLATE.for_device("sensor-1")
    )
    registry.set_acl("pumps", publish=["pumps/%d/#", "a/b"], subscribe=["pumps/#"], actor="t")
    registry.set_acl("default", publish=["devices/%d/up"], subscribe=[], actor="t")
    same()
    pump = admit(registry, cases[-1][0])
    assert isinstance(pump, Admitted)
    assert pump.acl.publish == ("a/b", "pumps/pump-1/#")
    with registry.transaction() as s:
        s.get(Certificate, format(serial["sensor-1"], "x")).status = CertStatus.SUPERSEDED
    cases[0] = (cases[0][0], "is superseded: connect with the renewed certificate")
    same()
    registry.change_device_state("sensor-2", DeviceState.ACTIVE, reason="t", actor="test")
    cases[4] = (cases[4][0], None)
    same()
    orm_reads.close()


FACTS = AdmissionFacts(
    DeviceState.ACTIVE,
    "default",
    CertificateFacts("1f", SubjectKind.DEVICE, "d1", CertStatus.ACTIVE),
    None,
)


def test_the_feed_the_will_and_an_unreadable_registry_are_part_of_the_one_decision():
    d1 = Identity("d1", 0x1F)
    assert decide_admission(FACTS, d1, barred=False, will_topic="devices/d1/status") == Admitted(
        "default", DEFAULT_TEMPLATE.for_device("d1")
    )
    barred = decide_admission(FACTS, d1, barred=True, will_topic=None)
    assert barred == Refused("device d1 was barred while connecting")
    will = decide_admission(FACTS, d1, barred=False, will_topic="devices/d2/status")
    assert isinstance(will, Refused) and will.label == "will"
    assert will.code == ReasonCode.NOT_AUTHORIZED and "devices/d2/status" in will.reason
    down = decide_admission(None, d1, barred=False, will_topic=None)
    assert down == Refused("the registry is unavailable", ReasonCode.SERVER_UNAVAILABLE)


def test_the_plaintext_test_identity_needs_no_registry_entry_but_an_existing_one_must_be_active():
    tester = Identity("tester", None, client_id_bound=False)
    unknown = AdmissionFacts(None, "default", None, None)
    assert isinstance(decide_admission(unknown, tester, barred=False, will_topic=None), Admitted)
    suspended = AdmissionFacts(DeviceState.SUSPENDED, "default", None, None)
    refused = decide_admission(suspended, tester, barred=False, will_topic=None)
    assert refused == Refused("test identity tester is suspended")


# -- what a certificate names, remembered per certificate ----------------------------------------


def der_of(creds: Creds) -> bytes:
    return load_certificates(creds.cert)[0].public_bytes(Encoding.DER)


def load_serial(creds: Creds) -> int:
    return load_certificates(creds.cert)[0].serial_number


def load_serial_der(der: bytes) -> int:
    return x509.load_der_x509_certificate(der).serial_number


def test_a_remembered_certificate_is_still_checked_against_the_clock(fleet):
    identities = CertificateIdentities()
    creds = craft(fleet, "clock-1", profiles.DEVICE, uris=("urn:fleetgate:device:clock-1",))
    der = der_of(creds)
    assert identities.identify(der, now=NOW) == Identity("clock-1", load_serial(creds))
    later = identities.identify(der, now=NOW + dt.timedelta(days=31))
    assert isinstance(later, Unidentified)
    assert "outside its validity" in later.reason
    earlier = identities.identify(der, now=NOW - dt.timedelta(days=1))
    assert isinstance(earlier, Unidentified)
    assert len(identities) == 1


def test_a_refused_certificate_is_refused_again_with_the_same_reason(fleet):
    identities = CertificateIdentities()
    no_eku = profiles.Profile("no-eku", is_ca=False, digital_signature=True)
    der = der_of(craft(fleet, "bare-2", no_eku, uris=("urn:fleetgate:device:bare-2",)))
    first, second = identities.identify(der, now=NOW), identities.identify(der, now=NOW)
    assert (
        first
        == second
        == Unidentified("the client certificate lacks the clientAuth extended key usage")
    )


def test_at_most_capacity_certificates_are_remembered_oldest_forgotten_first(fleet):
    identities = CertificateIdentities(capacity=2)
    ders = [
        der_of(craft(fleet, f"cap-{n}", profiles.DEVICE, uris=(f"urn:fleetgate:device:cap-{n}",)))
        for n in range(3)
    ]
    for der in ders:
        identities.identify(der, now=NOW)
    assert len(identities) == 2
    for n, der in enumerate(ders):  # each still identified, whether remembered or read again
        assert identities.identify(der, now=NOW) == Identity(f"cap-{n}", load_serial_der(der))
