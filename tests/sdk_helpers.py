"""Shared parts of the device SDK tests: Debian's Mosquitto as the broker, and enrolled devices.

Mosquitto runs as a subprocess with a generated configuration: TLS 1.3 only on a free loopback
port, the fleet's server certificate, client certificates required and verified against the
fleet CA chain, the certificate's CN as user name. Devices are enrolled through the real EST
server fixture with station credentials, exactly as on the production line.

Test modules import the fixture functions (``from sdk_helpers import broker_fixture``); pytest
registers them under their ``name=``.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from broker_helpers import free_port
from conftest import Fleet, RunningServer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from device_sdk import Backoff, DeviceClient, FileKeyStore, Message
from enrollment import profiles
from firmware_sim.mosquitto import Mosquitto
from fleetgate.keyfiles import write_certificates, write_private_key

MASK_AES_NI = "~0x200000200000000:~0x0"  # AES-NI and PCLMUL off, nothing else (NOTES §5)
REPO = Path(__file__).resolve().parent.parent


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` until it holds; fail the test naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.02)


@pytest.fixture(name="broker")
def broker_fixture(fleet: Fleet, tmp_path: Path) -> Iterator[Mosquitto]:
    """Mosquitto with the fleet's server certificate, admitting fleet device certificates."""
    ca_dir = fleet.config.ca_dir
    server = Mosquitto(
        tmp_path / "mosquitto",
        cafile=fleet.chain,
        certfile=ca_dir / "server.crt",
        keyfile=ca_dir / "server.key",
    ).start()
    yield server
    server.stop()


def impostor_server_cert(fleet: Fleet, directory: Path, case: str) -> tuple[Path, Path]:
    """A broker certificate the device must refuse: foreign CA, or the fleet CA's for elsewhere."""
    now = dt.datetime.now(dt.UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    if case == "foreign CA":
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = profiles.build_certificate(
            profiles.ROOT,
            subject=profiles.Subject(common_name="impostor root"),
            public_key=root_key.public_key(),
            issuer=profiles.Issuer(key=root_key, certificate=None),
            validity=dt.timedelta(days=1),
            now=now,
        )
        chain = [
            profiles.build_certificate(
                profiles.SERVER,
                subject=profiles.server_subject(["localhost", "127.0.0.1"]),
                public_key=key.public_key(),
                issuer=profiles.Issuer(key=root_key, certificate=root),
                validity=dt.timedelta(days=1),
                now=now,
            )
        ]
    else:
        cert = fleet.service.ca.issue(
            profiles.SERVER,
            profiles.server_subject(["broker.elsewhere.test"]),
            key.public_key(),
            dt.timedelta(days=1),
        )
        chain = [cert, fleet.service.ca.anchors.issuing]
    write_private_key(directory / "impostor.key", key)
    write_certificates(directory / "impostor.crt", chain)
    return directory / "impostor.crt", directory / "impostor.key"


class Devices:
    """Enrolls devices through the EST fixture as station ``line-1`` and builds their clients."""

    def __init__(self, fleet: Fleet, est: RunningServer, root: Path) -> None:
        self.fleet = fleet
        self.est = est
        self.root = root
        self.station = fleet.add_station("line-1")
        self._clients: list[DeviceClient] = []

    def store(self, device_id: str) -> FileKeyStore:
        """A key store provisioned with the fleet root, not yet enrolled."""
        store = FileKeyStore(self.root / device_id)
        store.set_trust_anchors(x509.load_pem_x509_certificates(self.fleet.root.read_bytes()))
        return store

    def enroll(self, device_id: str) -> FileKeyStore:
        self.fleet.batch("line-1", device_id)
        store = self.store(device_id)
        self.client(store, device_id).enroll(
            station_cert=self.station.cert, station_key=self.station.key
        )
        return store

    def client(
        self,
        store: FileKeyStore,
        device_id: str,
        broker: Mosquitto | None = None,
        **options: Any,
    ) -> DeviceClient:
        """A client of ``broker`` (or of a port nobody listens on) with quick reconnects.

        It knows the EST server, and is closed at the end of the test.
        """
        options.setdefault("backoff", Backoff(initial=0.05, maximum=0.5))
        options.setdefault("connect_timeout", 5.0)
        options.setdefault("est_url", self.est.url)
        port = broker.port if broker is not None else free_port()
        client = DeviceClient(store, device_id, host="localhost", port=port, **options)
        self._clients.append(client)
        return client

    def close(self) -> None:
        for client in self._clients:
            client.close()


@pytest.fixture(name="devices")
def devices_fixture(fleet: Fleet, est_server: RunningServer, tmp_path: Path) -> Iterator[Devices]:
    handle = Devices(fleet, est_server, tmp_path / "devices")
    yield handle
    handle.close()


class Inbox:
    """Collects received messages; a subscription handler."""

    def __init__(self) -> None:
        self.messages: list[Message] = []

    def __call__(self, message: Message) -> None:
        self.messages.append(message)

    @property
    def payloads(self) -> list[bytes]:
        return [m.payload for m in self.messages]


_PROBE = """
import json, sys
from pathlib import Path
from device_sdk import DeviceClient, FileKeyStore
from device_sdk.ciphers import local_hardware_aes
store_dir, device_id, port, policy = sys.argv[1:5]
store = FileKeyStore(Path(store_dir))
versions, ciphers, info_ciphers = [], [], []
for _ in range(3):  # three handshakes, each with a fresh context
    with DeviceClient(store, device_id, port=int(port), cipher_policy=policy) as client:
        info = client.wait_connected(10)
        sock = client.tls_socket
        versions.append(sock.version())
        ciphers.append(sock.cipher()[0])
        info_ciphers.append(info.cipher)
print(json.dumps({
    "versions": versions,
    "ciphers": ciphers,
    "info_ciphers": info_ciphers,
    "hardware_aes": local_hardware_aes(),
}))
"""


def probe_cipher(
    store: FileKeyStore, device_id: str, broker: Mosquitto, policy: str, *, mask: str | None
) -> dict[str, Any]:
    """Connect three times from a fresh Python process (OpenSSL reads OPENSSL_ia32cap at load)."""
    env = {k: v for k, v in os.environ.items() if k != "OPENSSL_ia32cap"}
    if mask is not None:
        env["OPENSSL_ia32cap"] = mask
    result = subprocess.run(
        [sys.executable, "-c", _PROBE, str(store.directory), device_id, str(broker.port), policy],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    probe: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return probe
