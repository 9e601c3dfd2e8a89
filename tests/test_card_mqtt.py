"""A smartcard device on the fleet broker: mutual TLS 1.3 signed by the card, through DeviceClient.

The card key is reached as OpenSSL -> pkcs11 engine -> OpenSC PKCS#11 -> pcscd -> the applet; the
broker is fleetgate's own, verifying the device certificate against the fleet CA. The device
runs in its own process, as on a device: the pkcs11 engine keeps its view of the card for the
life of a process, and each test here has a new card.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import RunningBroker, running_broker
from card_helpers import (
    PIN,
    CardHandle,
    card_fixture,
    card_maker_fixture,
    pcsc_fixture,
    trust_card_maker,
)
from conftest import Fleet, RunningServer
from cryptography import x509

from device_sdk.ciphers import AES_GCM_SUITES, CHACHA20_SUITES
from device_sdk.piv_provisioning import enroll_smartcard
from device_sdk.smartcard_keystore import SmartcardKeyStore
from firmware_sim.vcard import CardManufacturer

__all__ = ["card_fixture", "card_maker_fixture", "pcsc_fixture", "running_broker"]

DEVICE = "card-sensor-02"
REPO = Path(__file__).resolve().parent.parent

_DEVICE_PROCESS = """
import json, queue, socket, ssl, sys, time
from pathlib import Path
from device_sdk import DeviceClient, KeyStoreError
from device_sdk.smartcard_keystore import CardTlsContext, CardTlsError, SmartcardKeyStore
store_dir, device_id, port, policy, pin, foreign_ca = sys.argv[1:7]
store = SmartcardKeyStore(Path(store_dir), pin=pin)
out = {}
try:
    store.load_identity(ssl.create_default_context())
except KeyStoreError as exc:
    out["stdlib_ssl"] = str(exc)
context = store.tls_context(policy)
impostor_trust = CardTlsContext(  # as if the broker were not the fleet's
    certificate_path=store.certificate_path,
    trust_anchors_path=Path(foreign_ca),
    pin=pin,
    suites=context.suites,
)
def handshake(ctx, name="localhost"):
    tcp = socket.create_connection(("localhost", int(port)), 5)
    return ctx.wrap_socket(tcp, server_hostname=name)
for key, ctx, name in [("foreign_broker", impostor_trust, "localhost"),
                       ("other_name", context, "broker.elsewhere.test")]:
    try:
        handshake(ctx, name)
    except CardTlsError as exc:
        out[key] = str(exc)
times = []
for _ in range(5):
    start = time.perf_counter()
    handshake(context).close()
    times.append(1000 * (time.perf_counter() - start))
out["handshake_ms"] = sorted(times)[2]
inbox = queue.Queue()
with DeviceClient(store, device_id, port=int(port), cipher_policy=policy) as client:
    info = client.wait_connected(15)
    out.update(tls=info.tls_version, cipher=info.cipher, serial=info.certificate_serial)
    client.subscribe(f"devices/{device_id}/commands/#", inbox.put).wait(10)
    client.publish(f"devices/{device_id}/commands/ping", b"from the card").wait(10)
    message = inbox.get(timeout=10)
    out["received"] = [message.topic, message.payload.decode()]
print(json.dumps(out))
"""


@pytest.fixture(name="card_store")
def card_store_fixture(
    fleet: Fleet, est_server: RunningServer, card: CardHandle, tmp_path: Path
) -> SmartcardKeyStore:
    """An enrolled smartcard device (through the real EST service)."""
    trust_card_maker(fleet, card.maker)
    station = fleet.add_station("line-1")
    fleet.batch("line-1", DEVICE)
    store = SmartcardKeyStore(tmp_path / "device", pin=PIN)
    store.set_trust_anchors(x509.load_pem_x509_certificates(fleet.root.read_bytes()))
    enroll_smartcard(
        store, DEVICE, est_url=est_server.url, station_cert=station.cert, station_key=station.key
    )
    store.close()  # the device process opens the card itself
    return store


def run_device(store: SmartcardKeyStore, broker: RunningBroker, policy: str) -> dict[str, Any]:
    foreign = CardManufacturer.create(store.directory.parent / "foreign-ca", name="not the fleet")
    result = subprocess.run(
        [sys.executable, "-c", _DEVICE_PROCESS, str(store.directory), DEVICE,
         str(broker.port), policy, PIN, str(foreign.cert_path)],
        capture_output=True, text=True, cwd=REPO, timeout=90, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


@pytest.mark.parametrize(
    ("policy", "suites"), [("chacha20", CHACHA20_SUITES), ("aes", AES_GCM_SUITES)]
)
def test_card_device_connects_with_mutual_tls_and_publishes(
    card_store: SmartcardKeyStore, broker: RunningBroker, policy: str, suites: tuple[str, ...]
) -> None:
    outcome = run_device(card_store, broker, policy)
    assert outcome["tls"] == "TLSv1.3"
    assert outcome["cipher"] in suites  # the SDK's cipher policy holds on the M2Crypto route
    assert outcome["serial"] == card_store.certificates()[0].serial_number
    assert outcome["received"] == [f"devices/{DEVICE}/commands/ping", "from the card"]
    assert "cannot be loaded into Python's ssl" in outcome["stdlib_ssl"]
    refusal = outcome["foreign_broker"]
    assert "unable to get local issuer certificate" in refusal
    assert "must chain to the fleet CA" in refusal
    assert "hostname mismatch" in outcome["other_name"]  # OpenSSL checks the name, not paho
