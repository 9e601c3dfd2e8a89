"""The TLS layer of fleetgate's servers: :class:`TLSPump` on bytes alone, then
:func:`serve_tls` over real sockets (alerts reach refused clients, close sends close_notify)."""

from __future__ import annotations

import asyncio
import datetime as dt
import socket
import ssl
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fleetgate.tls import serve_tls, server_context
from fleetgate.tlspump import FEED_SIZE, TLSPump


@dataclass(frozen=True)
class Pki:
    root: Path
    server_cert: Path
    server_key: Path
    client: Path  # key + certificate, signed by root
    stranger: Path  # key + certificate from another CA


def _issue(
    name: str, issuer: tuple[ec.EllipticCurvePrivateKey, x509.Certificate] | None, *, server=False
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[1].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=issuer is None, path_length=None), critical=True)
    )
    if issuer is not None:
        usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False
        )
    return key, builder.sign(issuer[0] if issuer else key, hashes.SHA256())


def _pem(key: ec.EllipticCurvePrivateKey | None, cert: x509.Certificate) -> bytes:
    out = cert.public_bytes(serialization.Encoding.PEM)
    if key is not None:
        pkcs8 = serialization.PrivateFormat.PKCS8
        out = (
            key.private_bytes(serialization.Encoding.PEM, pkcs8, serialization.NoEncryption()) + out
        )
    return out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    root = _issue("test root", None)
    server = _issue("localhost", root, server=True)
    files = {
        "root.pem": _pem(None, root[1]),
        "server.pem": _pem(None, server[1]),
        "server.key": _pem(server[0], server[1]).split(b"-----BEGIN CERTIFICATE")[0],
        "client.pem": _pem(*_issue("device", root)),
        "stranger.pem": _pem(*_issue("device", _issue("other root", None))),
    }
    for name, data in files.items():
        (d / name).write_bytes(data)
    return Pki(*(d / n for n in ("root.pem", "server.pem", "server.key")), d / "client.pem",
               d / "stranger.pem")  # fmt: skip


def _server_context(pki: Pki) -> ssl.SSLContext:
    return server_context(
        cert_chain=pki.server_cert, key=pki.server_key, client_ca=pki.root, client_cert="required"
    )


def _client_context(pki: Pki, credentials: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(pki.root))
    context.load_cert_chain(credentials)
    return context


def _pumps(pki: Pki, credentials: Path) -> tuple[TLSPump, TLSPump]:
    client = TLSPump(
        _client_context(pki, credentials), server_side=False, server_hostname="localhost"
    )
    return client, TLSPump(_server_context(pki), server_side=True)


def _shuttle(client: TLSPump, server: TLSPump) -> None:
    """Run the handshake by moving each side's output to the other."""
    flight = client.start()
    while flight:
        server.receive(flight)
        reply = server.outgoing()
        client.receive(reply)
        flight = client.outgoing()


# -- the pump on bytes alone ----------------------------------------------------------------------


def test_two_pumps_complete_a_mutual_tls_handshake_and_carry_data_both_ways(pki):
    client, server = _pumps(pki, pki.client)
    _shuttle(client, server)
    assert client.handshake_done and server.handshake_done
    assert server.ssl_object.version() == "TLSv1.3"
    peer = x509.load_der_x509_certificate(server.ssl_object.getpeercert(binary_form=True))
    assert peer.subject.rfc4514_string() == "CN=device"
    assert server.receive(client.send(b"CONNECT")) == b"CONNECT"
    assert client.receive(server.send(b"CONNACK")) == b"CONNACK"
    assert not server.has_output()


def test_a_client_certificate_from_another_ca_fails_with_an_alert_for_the_client(pki):
    client, server = _pumps(pki, pki.stranger)
    server.receive(client.start())
    client.receive(server.outgoing())  # TLS 1.3: the client is done before the server decides
    with pytest.raises(ssl.SSLCertVerificationError, match="unable to get local issuer"):
        server.receive(client.outgoing())
    alert = server.outgoing()
    assert alert, "the refusal has an alert to send"
    with pytest.raises(ssl.SSLError, match=r"UNKNOWN_CA|unknown ca"):
        client.receive(alert)


def test_input_larger_than_the_feed_size_and_many_records_come_out_whole(pki):
    client, server = _pumps(pki, pki.client)
    _shuttle(client, server)
    messages = [bytes([n]) * 700 for n in range(40)] + [b"x" * 50_000]
    wire = b"".join(client.send(m) for m in messages)
    assert len(wire) > 10 * FEED_SIZE
    assert server.receive(wire) == b"".join(messages)
    # a record split across reads is completed by the next one
    record = client.send(b"split")
    assert server.receive(record[:3]) == b""
    assert server.receive(record[3:]) == b"split"


def test_close_sends_close_notify_which_the_peer_reads_as_the_end(pki):
    client, server = _pumps(pki, pki.client)
    _shuttle(client, server)
    assert client.receive(server.send(b"last") + server.close()) == b"last"
    assert client.closed_by_peer
    assert client.receive(b"") == b""  # nothing more is read after close_notify


# -- serve_tls over sockets -----------------------------------------------------------------------


@dataclass
class _App(asyncio.Protocol):
    """Echoes; closes on b"bye"; records what asyncio told it."""

    events: list[str] = field(default_factory=list)
    transport: asyncio.Transport | None = None
    gone: asyncio.Event = field(default_factory=asyncio.Event)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.events.append("made")

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        if data == b"bye":
            self.transport.write(b"bye")
            self.transport.close()
        else:
            self.transport.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self.events.append("lost")
        self.gone.set()


async def _serve(pki: Pki, **settings):
    apps: list[_App] = []
    refused: list[tuple[str, str]] = []
    refused_event = asyncio.Event()

    def on_refused(peer: str, reason: str) -> None:
        refused.append((peer, reason))
        refused_event.set()

    def factory() -> _App:
        apps.append(_App())
        return apps[-1]

    server = await serve_tls(
        factory,
        host="127.0.0.1",
        port=0,
        context=_server_context(pki),
        on_refused=on_refused,
        **settings,
    )
    return server, server.sockets[0].getsockname()[1], apps, refused, refused_event


def _client_pump_over_socket(
    pki: Pki, port: int, credentials: Path
) -> tuple[socket.socket, TLSPump]:
    """A blocking socket driven by a client TLSPump (the test's own view of the bytes)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    pump = TLSPump(
        _client_context(pki, credentials), server_side=False, server_hostname="localhost"
    )
    sock.sendall(pump.start())
    while not pump.handshake_done:
        pump.receive(sock.recv(65536))
        sock.sendall(pump.outgoing())
    return sock, pump


def test_serve_tls_echoes_then_closes_with_close_notify_and_tells_the_app_once(pki):
    async def scenario() -> None:
        server, port, apps, refused, _ = await _serve(pki)

        def client() -> None:
            sock, pump = _client_pump_over_socket(pki, port, pki.client)
            with sock:
                sock.sendall(pump.send(b"ping"))
                received = b""
                while received != b"ping":
                    received += pump.receive(sock.recv(65536))
                sock.sendall(pump.send(b"bye"))
                received = b""
                while not pump.closed_by_peer:
                    data = sock.recv(65536)
                    assert data, "the server closed without close_notify"
                    received += pump.receive(data)
                assert received == b"bye"
                assert sock.recv(100) == b""  # and then its FIN

        await asyncio.to_thread(client)
        await apps[0].gone.wait()
        assert apps[0].events == ["made", "lost"]
        assert apps[0].transport is not None and apps[0].transport.is_closing()
        assert refused == []
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())


def test_a_refused_client_reads_the_alert_and_the_refusal_is_reported(pki):
    async def scenario() -> None:
        server, port, apps, refused, refused_event = await _serve(pki)

        def client() -> str:
            context = _client_context(pki, pki.stranger)
            with (
                socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname="localhost") as tls,
            ):
                tls.sendall(b"CONNECT")  # TLS 1.3: the client is done before the server decides
                with pytest.raises(ssl.SSLError) as failure:
                    tls.recv(100)
                return str(failure.value)

        seen = await asyncio.to_thread(client)
        assert "unknown ca" in seen.lower()  # the alert, not "connection reset"
        await refused_event.wait()
        assert [reason for _, reason in refused] == [
            "client certificate rejected: unable to get local issuer certificate"
        ]
        assert refused[0][0].startswith("127.0.0.1:")
        assert apps == []  # no application protocol for a refused handshake
        server.close()
        await server.wait_closed()

    asyncio.run(scenario())
