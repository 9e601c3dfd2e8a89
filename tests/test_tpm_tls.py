"""Mutual TLS 1.3 with a TPM key: stdlib ``ssl`` + tpm2-openssl, to the fleetgate broker.

Each device runs in a fresh Python process (the tpm2-openssl provider is process-wide; the
broker and the EST server here sign with software keys) that uses ``ssl`` *before* the
TpmKeyStore loads the provider, as a long-running agent would.
"""

from __future__ import annotations

import pytest
from broker_helpers import RunningBroker
from conftest import Fleet, StationCredentials
from cryptography import x509
from sdk_helpers import MASK_AES_NI
from tpm_helpers import ek_chain, run_device, trust_manufacturer

from device_sdk import FileKeyStore
from device_sdk.provisioning import enroll
from device_sdk.tpm_keystore import TpmKeyStore
from device_sdk.tpm_provisioning import enroll_tpm
from enrollment.profiles import key_protection_of

HANDSHAKES = 20

DEVICE_SCRIPT = """
import json, socket, ssl, sys, time
from pathlib import Path
ssl.create_default_context()  # ssl is in use before the TPM provider is loaded
from device_sdk import DeviceClient, FileKeyStore
from device_sdk.tls import device_context
from device_sdk.tpm_keystore import TpmKeyStore
kind, directory, device_id, port, policy, tcti, est_url, action = sys.argv[1:9]
if kind == "file":
    store = FileKeyStore(Path(directory))
else:
    store = TpmKeyStore(Path(directory), tcti=tcti, renewal=kind.partition("-")[2] or "reuse")
client = DeviceClient(store, device_id, port=int(port), cipher_policy=policy, est_url=est_url)
with client:
    client.wait_connected(10)
    client.publish(f"devices/{device_id}/telemetry", b"hello", qos=1).wait(10)
    result = {"version": client.tls_socket.version(), "cipher": client.tls_socket.cipher()[0],
              "serial": client.connection.certificate_serial}
    if action == "renew":
        renewed = client.renew()
        deadline = time.monotonic() + 10
        while (client.connection is None or client.connection.certificate_serial
               != renewed.serial_number) and time.monotonic() < deadline:
            time.sleep(0.02)
        client.publish(f"devices/{device_id}/telemetry", b"renewed", qos=1).wait(10)
        result["renewed_serial"] = client.connection.certificate_serial
if action == "time":
    context = device_context(store, policy)
    start = time.perf_counter()
    for _ in range(int(sys.argv[9])):
        with socket.create_connection(("127.0.0.1", int(port))) as raw:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # no delayed-ACK stall
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                tls.sendall(bytes([0xE0, 0]))  # DISCONNECT: the broker read our Finished
                tls.recv(1)
    result["handshake_ms"] = (time.perf_counter() - start) * 1000 / int(sys.argv[9])
print(json.dumps(result))
"""


@pytest.fixture
def station(fleet: Fleet, tpm_maker) -> StationCredentials:
    trust_manufacturer(fleet, tpm_maker)
    return fleet.add_station("line-1")


@pytest.fixture
def broker(fleet: Fleet):
    running = RunningBroker(fleet).start()
    yield running
    running.stop()


def tpm_device(fleet, est_server, station, vtpm, tpm_maker, device_id, renewal="reuse"):
    fleet.batch("line-1", device_id)
    store = TpmKeyStore(fleet.config.home / "devices" / device_id, tcti=vtpm.tcti, renewal=renewal)
    store.set_trust_anchors(x509.load_pem_x509_certificates(fleet.root.read_bytes()))
    enroll_tpm(
        store,
        device_id,
        est_url=est_server.url,
        station_cert=station.cert,
        station_key=station.key,
        ek_chain=ek_chain(tpm_maker),
    )
    return store


def run(
    kind, store, device_id, broker, vtpm, est_server, action="publish", *, policy="aes", env=None
):
    port = str(broker.broker.config.broker.port)
    extra = [str(HANDSHAKES)] if action == "time" else []
    arguments = [kind, str(store.directory), device_id, port, policy, vtpm.tcti, est_server.url]
    return run_device(DEVICE_SCRIPT, *arguments, action, *extra, env=env)


def test_a_tpm_key_does_mutual_tls_13_with_the_broker_and_publishes(
    fleet, est_server, station, vtpm, tpm_maker, broker
):
    store = tpm_device(fleet, est_server, station, vtpm, tpm_maker, "tpm-tls-1")
    result = run("tpm", store, "tpm-tls-1", broker, vtpm, est_server)
    assert result["version"] == "TLSv1.3"
    assert result["serial"] == store.certificates()[0].serial_number


def test_the_chacha20_policy_holds_with_a_tpm_key_on_a_cpu_without_aes(
    fleet, est_server, station, vtpm, tpm_maker, broker
):
    store = tpm_device(fleet, est_server, station, vtpm, tpm_maker, "tpm-tls-2")
    masked = run(
        "tpm", store, "tpm-tls-2", broker, vtpm, est_server, policy="auto",
        env={"OPENSSL_ia32cap": MASK_AES_NI},
    )  # fmt: skip
    assert masked["cipher"] == "TLS_CHACHA20_POLY1305_SHA256"
    native = run("tpm", store, "tpm-tls-2", broker, vtpm, est_server, policy="aes")
    assert native["cipher"] != "TLS_CHACHA20_POLY1305_SHA256"


@pytest.mark.parametrize("renewal", ["reuse", "rotate"])
def test_renewal_reuses_or_rotates_the_tpm_key_by_policy(
    fleet, est_server, station, vtpm, tpm_maker, broker, renewal
):
    device_id = f"tpm-renew-{renewal}"
    store = tpm_device(fleet, est_server, station, vtpm, tpm_maker, device_id, renewal)
    key_before = store.tpm_key()
    result = run(f"tpm-{renewal}", store, device_id, broker, vtpm, est_server, "renew")
    renewed = store.certificates()[0]
    assert result["renewed_serial"] == renewed.serial_number != result["serial"]
    assert key_protection_of(renewed) == "tpm"
    assert (store.tpm_key() == key_before) is (renewal == "reuse")
    assert renewed.public_key() == store.tpm_key().public_key()
    events = [e for e in fleet.registry.audit_events(subject=device_id) if e.outcome == "ok"]
    latest = max(events, key=lambda e: e.id or 0)
    assert latest.action == ("tpm.enroll" if renewal == "rotate" else "reenroll")
    assert latest.actor == f"device:{device_id}"


def test_tpm_handshakes_cost_a_few_milliseconds_more_than_file_key_ones(
    fleet, est_server, station, vtpm, tpm_maker, broker, record_property
):
    store = tpm_device(fleet, est_server, station, vtpm, tpm_maker, "tpm-timing")
    tpm_ms = run("tpm", store, "tpm-timing", broker, vtpm, est_server, "time")["handshake_ms"]
    fleet.batch("line-1", "file-timing")
    files = FileKeyStore(fleet.config.home / "devices" / "file-timing")
    files.set_trust_anchors(x509.load_pem_x509_certificates(fleet.root.read_bytes()))
    enroll(
        files,
        "file-timing",
        est_url=est_server.url,
        station_cert=station.cert,
        station_key=station.key,
    )
    file_ms = run("file", files, "file-timing", broker, vtpm, est_server, "time")["handshake_ms"]
    record_property("tpm_handshake_ms", round(tpm_ms, 2))
    record_property("file_handshake_ms", round(file_ms, 2))
    print(f"mTLS handshake to the broker: TPM key {tpm_ms:.1f} ms, file key {file_ms:.1f} ms")
    assert file_ms < tpm_ms < 500  # the TPM signs; swtpm is far faster than real TPMs
