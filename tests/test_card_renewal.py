"""A smartcard device renews its certificate with the same card key, over card-key mutual TLS.

The device runs in its own process (the pkcs11 engine's view of the card is per process, and
each test has a new card), with :class:`DeviceClient`'s automatic renewal and an injected clock,
or calling :meth:`SmartcardKeyStore.renew` for the refusals. ``simplereenroll`` goes to the
real EST service over TLS signed by the card (pkcs11 engine -> OpenSC -> pcscd -> applet); the
new certificate must land on the card, in the store and in the registry, and the MQTT session
must move to it.
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
    opensc_tool,
    pcsc_fixture,
    trust_card_maker,
)
from conftest import Fleet, RunningServer
from cryptography import x509

from device_sdk.keystore import _public_der
from device_sdk.piv_provisioning import enroll_smartcard
from device_sdk.smartcard_keystore import SmartcardKeyStore
from enrollment.profiles import key_protection_of
from enrollment.registry.models import CertStatus, DeviceState

__all__ = ["card_fixture", "card_maker_fixture", "pcsc_fixture", "running_broker"]

DEVICE = "card-renew-01"
REPO = Path(__file__).resolve().parent.parent

_DEVICE_PROCESS = """
import datetime as dt, json, queue, sys, threading, time
from pathlib import Path
from device_sdk import DeviceClient
from device_sdk.provisioning import RenewalPolicy
from device_sdk.smartcard_keystore import SmartcardKeyStore
store_dir, device_id, port, est_url, pin, action = sys.argv[1:7]
store = SmartcardKeyStore(Path(store_dir), pin=pin)
first = store.certificates()[0]
if action == "renew":
    try:
        store.renew(device_id, est_url=est_url)
    except Exception as exc:
        print(json.dumps({"error": type(exc).__name__, "message": str(exc)}))
    sys.exit()
due = threading.Event()

def clock():
    # Past two thirds of the validity once due, until the certificate in the store changes.
    now = dt.datetime.now(dt.UTC)
    renewed = store.certificates()[0].serial_number != first.serial_number
    late = first.not_valid_after_utc - dt.timedelta(minutes=1)
    return late if due.is_set() and not renewed else now

inbox = queue.Queue()
policy = RenewalPolicy(check_interval=0.05, clock=clock)
out = {}
with DeviceClient(store, device_id, port=int(port), est_url=est_url, renewal=policy) as client:
    out["serial"] = client.wait_connected(15).certificate_serial
    client.subscribe(f"devices/{device_id}/commands/#", inbox.put).wait(10)
    due.set()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        info = client.connection
        if info is not None and info.certificate_serial != first.serial_number:
            break
        time.sleep(0.02)
    info = client.wait_connected(10)
    out.update(renewed_serial=info.certificate_serial, tls=info.tls_version)
    client.publish(f"devices/{device_id}/commands/ping", b"after renewal").wait(10)
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


def run_device(
    store: SmartcardKeyStore, est: RunningServer, broker_port: int = 0, action: str = "auto"
) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", _DEVICE_PROCESS, str(store.directory), DEVICE,
         str(broker_port), est.url, PIN, action],
        capture_output=True, text=True, cwd=REPO, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "not on the card yet" not in result.stderr
    outcome: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return outcome


def test_card_device_renews_with_its_card_key_and_reconnects_with_the_new_certificate(
    fleet: Fleet,
    est_server: RunningServer,
    card: CardHandle,
    card_store: SmartcardKeyStore,
    broker: RunningBroker,
) -> None:
    old = card_store.certificates()[0]
    outcome = run_device(card_store, est_server, broker.port)

    new = card_store.certificates()[0]
    assert outcome["serial"] == old.serial_number
    assert outcome["renewed_serial"] == new.serial_number != old.serial_number
    assert outcome["tls"] == "TLSv1.3"
    assert outcome["received"] == [f"devices/{DEVICE}/commands/ping", "after renewal"]
    assert _public_der(new.public_key()) == _public_der(old.public_key())  # same card key
    assert key_protection_of(new) == "smartcard"  # the policy OID is kept

    with card.open() as piv:
        assert piv.certificate() == new  # PUT DATA reached the card
    pem = opensc_tool("pkcs15-tool", "--read-certificate", "01")
    assert x509.load_pem_x509_certificate(pem.encode()) == new  # and OpenSC sees it

    old_record = fleet.registry.certificate(old.serial_number)
    new_record = fleet.registry.certificate(new.serial_number)
    assert old_record is not None and old_record.status == CertStatus.SUPERSEDED
    assert new_record is not None and new_record.status == CertStatus.ACTIVE
    assert fleet.registry.device(DEVICE).key_protection == "smartcard"
    events = [e for e in fleet.registry.audit_events(subject=DEVICE) if e.outcome == "ok"]
    latest = max(events, key=lambda e: e.id or 0)
    assert (latest.action, latest.actor) == ("reenroll", f"device:{DEVICE}")


def test_renewal_refused_by_the_service_changes_neither_store_nor_card(
    fleet: Fleet, est_server: RunningServer, card: CardHandle, card_store: SmartcardKeyStore
) -> None:
    old = card_store.certificates()[0]
    fleet.service.change_device(DEVICE, DeviceState.SUSPENDED, reason="hold", actor="t")
    outcome = run_device(card_store, est_server, action="renew")
    assert outcome["error"] == "EnrollmentError"
    assert f"refused to renew {DEVICE}" in outcome["message"]
    assert card_store.certificates()[0] == old
    with card.open() as piv:
        assert piv.certificate() == old


def test_renewal_after_the_card_was_rekeyed_says_to_enroll_again(
    est_server: RunningServer, card: CardHandle, card_store: SmartcardKeyStore
) -> None:
    old = card_store.certificates()[0]
    with card.open() as piv:
        piv.verify_pin(PIN)
        piv.generate_key()  # someone re-keyed slot 9A (its certificate goes with the old key)
        piv.put_certificate(old)  # ... and put the old certificate back
    outcome = run_device(card_store, est_server, action="renew")
    assert outcome["error"] == "KeyStoreError"  # the CSR's signature gives it away
    assert "no longer matches" in outcome["message"]
    assert "enroll the device again" in outcome["message"]
    assert card_store.certificates()[0] == old
