"""A small EST (RFC 7030) client on the standard library: ``http.client`` over mutual TLS 1.3.

Stations use it with their station certificate for ``simpleenroll``; devices use it with their
own certificate for ``simplereenroll``. One connection is kept alive across requests. A key that
Python's ``ssl`` cannot sign with (a smartcard's) brings its own TLS as a
:data:`ConnectionFactory`; the EST protocol above it stays the same.
"""

from __future__ import annotations

import base64
import http.client
import json
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from cryptography.x509.oid import NameOID

from device_sdk.errors import DeviceSdkError

EST_PREFIX = "/.well-known/est"

ConnectionFactory = Callable[[str, int, float], http.client.HTTPConnection]
"""``(host, port, timeout)`` to an unopened HTTP connection that speaks TLS itself."""


class EstError(DeviceSdkError):
    """The EST server refused a request; ``message`` is its one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"EST server answered {status}: {message}")
        self.status = status
        self.message = message


def device_csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """The CSR a fleetgate device sends: CN and URI SAN name the device, signed with its key."""
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(f"urn:fleetgate:device:{device_id}")]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )


def station_csr(station_id: str, key: ec.EllipticCurvePrivateKey) -> x509.CertificateSigningRequest:
    """The CSR a station sends for its own key: the CN names it; the CA writes its URI SAN."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, station_id)])
    return x509.CertificateSigningRequestBuilder().subject_name(name).sign(key, hashes.SHA256())


def client_context(
    trust: Path, cert: Path | None = None, key: Path | None = None
) -> ssl.SSLContext:
    """TLS 1.3 with server verification against the fleet root, and a client cert if given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(trust))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    if cert is not None:
        ctx.load_cert_chain(cert, key)
    return ctx


class EstClient:
    """EST operations against one server, over one kept-alive HTTPS connection.

    ``transport`` is the ``ssl.SSLContext`` to connect with, or a :data:`ConnectionFactory`.
    """

    def __init__(
        self,
        base_url: str,
        transport: ssl.SSLContext | ConnectionFactory,
        *,
        timeout: float = 30.0,
    ) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"EST needs an https:// URL, not {base_url!r}")
        host, port = parts.hostname, parts.port or 443
        self._conn: http.client.HTTPConnection
        if isinstance(transport, ssl.SSLContext):
            self._conn = http.client.HTTPSConnection(host, port, context=transport, timeout=timeout)
        else:
            self._conn = transport(host, port, timeout)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> EstClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def cacerts(self) -> list[x509.Certificate]:
        return _certificates(self._request("GET", "cacerts"))

    def simpleenroll(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        return _certificates(self._request("POST", "simpleenroll", csr))[0]

    def simplereenroll(self, csr: x509.CertificateSigningRequest) -> x509.Certificate:
        return _certificates(self._request("POST", "simplereenroll", csr))[0]

    def station_enroll(
        self, csr: x509.CertificateSigningRequest, station_id: str, code: str
    ) -> x509.Certificate:
        """A station's first certificate, authenticated by its one-time bootstrap code."""
        body = base64.encodebytes(csr.public_bytes(Encoding.DER))
        login = base64.b64encode(f"{station_id}:{code}".encode()).decode()
        headers = {"Content-Type": "application/pkcs10", "Authorization": f"Basic {login}"}
        return _certificates(self._send("POST", "station/simpleenroll", body, headers))[0]

    def attestation_json(self, operation: str, payload: dict[str, Any]) -> dict[str, Any]:
        """A fleetgate attestation step (``fleetgate/tpm/challenge``): JSON in, JSON out."""
        answer = json.loads(self._post_json(operation, payload))
        if not isinstance(answer, dict):
            raise EstError(200, f"{operation} answered {type(answer).__name__}, not an object")
        return answer

    def attested_enroll(self, operation: str, payload: dict[str, Any]) -> x509.Certificate:
        """An attested enrollment (``fleetgate/tpm/enroll``, ``fleetgate/piv/enroll``).

        The answer is the same certs-only PKCS#7 as ``simpleenroll``.
        """
        return _certificates(self._post_json(operation, payload))[0]

    def _post_json(self, operation: str, payload: dict[str, Any]) -> bytes:
        body = json.dumps(payload).encode()
        return self._send("POST", operation, body, {"Content-Type": "application/json"})

    def _request(
        self, method: str, operation: str, csr: x509.CertificateSigningRequest | None = None
    ) -> bytes:
        body = base64.encodebytes(csr.public_bytes(Encoding.DER)) if csr is not None else None
        headers = {"Content-Type": "application/pkcs10"} if body is not None else {}
        return self._send(method, operation, body, headers)

    def _send(
        self, method: str, operation: str, body: bytes | None, headers: dict[str, str]
    ) -> bytes:
        try:
            self._conn.request(method, f"{EST_PREFIX}/{operation}", body=body, headers=headers)
            response = self._conn.getresponse()
            data = response.read()
        except (http.client.HTTPException, OSError):
            # OSError, not just ConnectionError: a server that drops the connection in the TLS
            # handshake shows as ssl.SSLEOFError, and a connection left half-way through a
            # request fails every later one with CannotSendRequest. A fresh connection next time.
            self._conn.close()
            raise
        if response.status != 200:
            raise EstError(response.status, data.decode(errors="replace").strip())
        return data


def _certificates(body: bytes) -> list[x509.Certificate]:
    return pkcs7.load_der_pkcs7_certificates(base64.b64decode(body))
