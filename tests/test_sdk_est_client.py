"""EstClient after its connection ended in ``ssl.SSLEOFError``.

A busy server (or a load balancer in front of it) that drops a connection during the TLS
handshake makes the request end in ``ssl.SSLEOFError``. The client must then start over on a
fresh connection, not leave ``http.client`` half-way through a request, which answers every later
request with ``CannotSendRequest``. The server here is a real TLS 1.3 server.
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from collections.abc import Iterator

import pytest
from conftest import Fleet
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7

from device_sdk.est import EstClient, client_context
from enrollment.ca import enrollment_server_credentials, ensure_server_certificate
from fleetgate.tls import server_context


class DroppingServer:
    """Drops its first connection in the middle of the TLS handshake, serves later ones."""

    def __init__(self, context: ssl.SSLContext, body: bytes) -> None:
        self._context = context
        self._body = body
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.connections = 0
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                raw, _ = self._listener.accept()
            except OSError:
                return
            self.connections += 1
            if self.connections == 1:
                with raw:  # read the ClientHello, then a clean TCP close: EOF, no alert
                    raw.recv(4096)
                    raw.shutdown(socket.SHUT_RDWR)
                continue
            with raw, self._context.wrap_socket(raw, server_side=True) as tls:
                request = b""
                while b"\r\n\r\n" not in request:
                    request += tls.recv(4096)
                tls.sendall(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/pkcs7-mime\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(self._body), self._body)
                )
                tls.recv(4096)

    def close(self) -> None:
        self._listener.close()
        self._thread.join(5)


@pytest.fixture
def dropping(fleet: Fleet) -> Iterator[DroppingServer]:
    credentials = ensure_server_certificate(
        fleet.config, enrollment_server_credentials(fleet.config), ca=fleet.service.ca
    )
    context = server_context(
        cert_chain=credentials.cert,
        key=credentials.key,
        client_ca=fleet.chain,
        client_cert="optional",
    )
    root = fleet.service.ca.anchors.root
    body = base64.encodebytes(pkcs7.serialize_certificates([root], Encoding.DER))
    server = DroppingServer(context, body)
    yield server
    server.close()


def test_a_connection_dropped_in_the_handshake_is_replaced_by_a_fresh_one(
    fleet: Fleet, dropping: DroppingServer
) -> None:
    with EstClient(f"https://localhost:{dropping.port}", client_context(fleet.root)) as est:
        with pytest.raises(ssl.SSLEOFError):
            est.cacerts()
        assert est.cacerts()[0] == fleet.service.ca.anchors.root  # not CannotSendRequest
    assert dropping.connections == 2
