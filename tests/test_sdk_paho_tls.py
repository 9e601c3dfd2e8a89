"""paho takes a key store's own TLS context through its public ``tls_set_context``.

The smartcard's context (M2Crypto) is not an ``ssl.SSLContext``; it offers the client side of one
(:class:`device_sdk.client.ClientTlsContext`). Here a stdlib context is narrowed to exactly that
surface, and a connection made through it, against Mosquitto, with no card stack: if a paho
release starts using anything else of the context or of the socket it wraps, this fails with the
missing name, before a device with a smartcard would.
"""

from __future__ import annotations

import socket
import ssl
from pathlib import Path

import pytest
from conftest import Fleet
from sdk_helpers import (  # noqa: F401  (fixtures)
    Devices,
    Inbox,
    Mosquitto,
    broker_fixture,
    devices_fixture,
    impostor_server_cert,
    wait_for,
)

from device_sdk import FileKeyStore
from device_sdk.ciphers import CipherPolicy
from device_sdk.tls import device_context


class NarrowConnection:
    """An ``ssl.SSLSocket`` showing only the calls ``ClientTlsContext`` promises."""

    def __init__(self, sock: ssl.SSLSocket) -> None:
        self._sock = sock

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def do_handshake(self) -> None:
        self._sock.do_handshake()

    def recv(self, size: int) -> bytes:
        return self._sock.recv(size)

    def send(self, data: bytes | bytearray) -> int:
        return self._sock.send(data)

    def pending(self) -> int:
        return self._sock.pending()

    def fileno(self) -> int:
        return self._sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self._sock.setblocking(flag)

    def close(self) -> None:
        self._sock.close()

    def version(self) -> str | None:
        return self._sock.version()

    def cipher(self) -> tuple[str, str, int] | None:
        return self._sock.cipher()


class NarrowContext:
    """A stdlib context showing only ``ClientTlsContext``'s surface."""

    check_hostname = True

    def __init__(self, context: ssl.SSLContext) -> None:
        self._context = context
        self.wrapped: list[NarrowConnection] = []

    def wrap_socket(
        self,
        sock: socket.socket,
        *,
        server_hostname: str | None = None,
        do_handshake_on_connect: bool = True,
    ) -> NarrowConnection:
        tls = NarrowConnection(
            self._context.wrap_socket(
                sock,
                server_hostname=server_hostname,
                do_handshake_on_connect=do_handshake_on_connect,
            )
        )
        self.wrapped.append(tls)
        return tls


class ContextStore(FileKeyStore):
    """A file key store that hands DeviceClient a context instead of filling one."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.contexts: list[NarrowContext] = []

    def tls_context(self, cipher_policy: CipherPolicy) -> NarrowContext:
        context = NarrowContext(device_context(FileKeyStore(self.directory), cipher_policy))
        self.contexts.append(context)
        return context


@pytest.mark.parametrize("mqtt_version", ["5", "3.1.1"])
def test_paho_connects_through_a_context_offering_only_the_client_tls_surface(
    broker: Mosquitto, devices: Devices, mqtt_version: str
) -> None:
    devices.enroll("sensor-1")
    store = ContextStore(devices.store("sensor-1").directory)
    client = devices.client(store, "sensor-1", broker, mqtt_version=mqtt_version).start()
    info = client.wait_connected(10)
    assert info.tls_version == "TLSv1.3"
    assert [len(c.wrapped) for c in store.contexts] == [1]  # paho wrapped through it, once
    assert client.tls_socket is None  # not an ssl.SSLSocket: paho holds the narrow one
    inbox = Inbox()
    client.subscribe("devices/sensor-1/commands/#", inbox).wait(10)
    client.publish("devices/sensor-1/commands/ping", b"narrow").wait(10)
    wait_for(lambda: inbox.payloads == [b"narrow"], 10, "the message coming back")


def test_paho_leaves_the_name_check_to_the_context_and_the_context_refuses(
    fleet: Fleet, devices: Devices, tmp_path: Path
) -> None:
    """With ``check_hostname`` true paho does not check the name itself: the context must."""
    devices.enroll("sensor-1")
    store = ContextStore(devices.store("sensor-1").directory)
    certfile, keyfile = impostor_server_cert(fleet, tmp_path, "fleet CA, other host")
    impostor = Mosquitto(
        tmp_path / "impostor", cafile=fleet.chain, certfile=certfile, keyfile=keyfile
    ).start()
    try:
        client = devices.client(store, "sensor-1", impostor).start()
        wait_for(lambda: client.last_error is not None, 10, "a refused attempt")
        assert "Hostname mismatch" in (client.last_error or "")
        assert client.connection is None
        assert "New client connected" not in impostor.log_text()
    finally:
        impostor.stop()
