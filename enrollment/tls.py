"""TLS for fleetgate's servers: secure contexts, and a server that sees its handshake failures.

asyncio's own TLS server swallows a failed handshake (it is logged only in debug mode), so a
client certificate from a foreign CA or an expired one would leave no trace. :func:`serve_tls`
accepts plain TCP, runs the handshake itself (``loop.start_tls``, made to send the refused
client its TLS alert), reports each failure with the peer and OpenSSL's reason, and only then
hands the TLS transport to the application protocol.
"""

from __future__ import annotations

import asyncio
import ssl
from asyncio import sslproto
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

HandshakeRefused = Callable[[str, str], None]
"""Called as ``on_refused(peer, reason)`` for every failed TLS handshake."""

_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
_LINGER_S = 2.0  # how long a refused client gets to read the alert before the socket goes


def server_context(
    *,
    cert_chain: Path,
    key: Path,
    client_ca: Path,
    client_cert: Literal["required", "optional"],
    allow_tls12: bool = False,
) -> ssl.SSLContext:
    """TLS 1.3 (1.2 only if allowed, ECDHE + AEAD), client certs verified against ``client_ca``."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2 if allow_tls12 else ssl.TLSVersion.TLSv1_3
    ctx.set_ciphers(_TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE
    # No session tickets: fleetgate's clients do not resume (a resumption would also skip the
    # client-certificate check), and issuing two per handshake costs a third of its CPU.
    ctx.num_tickets = 0
    ctx.load_cert_chain(cert_chain, key)
    ctx.load_verify_locations(cafile=client_ca)
    ctx.verify_mode = ssl.CERT_REQUIRED if client_cert == "required" else ssl.CERT_OPTIONAL
    return ctx


def describe_handshake_error(exc: BaseException) -> str:
    """A short reason a person can act on, from whatever the handshake raised."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"client certificate rejected: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        if "peer did not return a certificate" in reason:
            return "client presented no certificate (mutual TLS is required)"
        return f"TLS handshake failed: {reason}"
    if isinstance(exc, TimeoutError | asyncio.TimeoutError):
        return "TLS handshake timed out"
    if isinstance(exc, ConnectionError) or not str(exc):
        return "connection closed before the TLS handshake finished (a port probe or health check?)"
    return f"TLS handshake failed: {exc}"


class _Linger(asyncio.Protocol):
    """Takes over a connection whose handshake failed so the client can read why.

    Sends the TLS alert, closes the write side, and drops whatever the client still sends until
    it hangs up (at most ``_LINGER_S``). Closing at once would leave the client's first request
    unread, and the kernel would answer with a reset that destroys the alert in flight.
    """

    def __init__(self, tcp: asyncio.Transport, alert: bytes) -> None:
        self._timer = asyncio.get_running_loop().call_later(_LINGER_S, tcp.abort)
        tcp.set_protocol(self)
        if alert:
            tcp.write(alert)
        if tcp.can_write_eof():
            tcp.write_eof()
        tcp.resume_reading()

    def data_received(self, data: bytes) -> None:
        """The refused client's request: nobody will answer it."""

    def eof_received(self) -> bool | None:
        return None  # the client hung up: the transport closes itself, cleanly

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


class _AlertingSSLProtocol(sslproto.SSLProtocol):
    """asyncio's server-side TLS, except that a refused handshake still sends its alert.

    On a failed handshake asyncio aborts the connection with OpenSSL's alert (unknown CA,
    certificate expired, ...) unsent, so the client learns nothing but "connection reset".
    """

    def __init__(self, *args: Any, read_buffer_size: int | None, **kwargs: Any) -> None:
        if read_buffer_size is not None:
            # asyncio allocates max_size (256 KiB) per connection for decrypted reads; an
            # instance value set before __init__ sizes that buffer, so idle connections stay small.
            self.max_size = read_buffer_size  # type: ignore[misc]  # a ClassVar in typeshed
        super().__init__(*args, **kwargs)

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        tcp = self._transport
        if handshake_exc is not None and isinstance(tcp, asyncio.Transport):
            alert = self._outgoing.read()  # type: ignore[attr-defined]  # asyncio internals
            self._transport = None  # so asyncio does not abort it: _Linger closes it
            _Linger(tcp, alert)
        super()._on_handshake_complete(handshake_exc)


async def _start_tls(
    tcp: asyncio.Transport,
    app: asyncio.Protocol,
    context: ssl.SSLContext,
    timeout: float,
    read_buffer_size: int | None,
) -> asyncio.Transport:
    """``loop.start_tls(server_side=True)``, with :class:`_AlertingSSLProtocol`.

    On failure the connection is closed (by :class:`_Linger` after a refused handshake, here
    otherwise) and the handshake's exception is raised.
    """
    loop = asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()
    tls = _AlertingSSLProtocol(
        loop,
        app,
        context,
        waiter,
        server_side=True,
        call_connection_made=False,
        ssl_handshake_timeout=timeout,
        read_buffer_size=read_buffer_size,
    )
    tcp.pause_reading()
    tcp.set_protocol(tls)
    loop.call_soon(tls.connection_made, tcp)
    loop.call_soon(tcp.resume_reading)
    try:
        await waiter
    except BaseException:
        if not isinstance(tcp.get_protocol(), _Linger):
            tcp.abort()
        raise
    return tls._app_transport


@dataclass(frozen=True)
class _Listener:
    """What every connection of one TLS listener shares."""

    app_factory: Callable[[], asyncio.Protocol]
    context: ssl.SSLContext
    handshake_timeout: float
    on_refused: HandshakeRefused
    read_buffer_size: int | None


class _HandshakeFirst(asyncio.Protocol):
    """Runs the TLS handshake on a fresh TCP connection, then becomes a pass-through."""

    def __init__(self, listener: _Listener) -> None:
        self._listener = listener
        self._app: asyncio.Protocol | None = None
        self._early: list[bytes] = []
        self._peer = "unknown"
        self._task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = f"{peer[0]}:{peer[1]}"
        assert isinstance(transport, asyncio.Transport)
        self._task = asyncio.get_running_loop().create_task(self._handshake(transport))

    async def _handshake(self, tcp: asyncio.Transport) -> None:
        listener = self._listener
        try:
            tls = await _start_tls(
                tcp, self, listener.context, listener.handshake_timeout, listener.read_buffer_size
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            listener.on_refused(self._peer, describe_handshake_error(exc))
            return
        finally:
            self._task = None
        if tls is None:  # the peer went away during the handshake
            return
        self._app = listener.app_factory()
        self._app.connection_made(tls)
        for chunk in self._early:
            self._app.data_received(chunk)
        self._early.clear()

    def data_received(self, data: bytes) -> None:
        if self._app is None:
            self._early.append(data)
        else:
            self._app.data_received(data)

    def eof_received(self) -> bool | None:
        return self._app.eof_received() if self._app is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._app is not None:
            self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._app is not None:
            self._app.resume_writing()


async def serve_tls(
    app_factory: Callable[[], asyncio.Protocol],
    *,
    host: str,
    port: int,
    context: ssl.SSLContext,
    on_refused: HandshakeRefused,
    handshake_timeout: float = 10.0,
    read_buffer_size: int | None = None,
) -> asyncio.Server:
    """Listen on ``host:port``; every accepted connection is TLS or is refused and reported.

    ``read_buffer_size`` replaces asyncio's 256 KiB per-connection read buffer (a server with
    thousands of idle connections wants one TLS record's worth or less).
    """
    loop = asyncio.get_running_loop()
    listener = _Listener(app_factory, context, handshake_timeout, on_refused, read_buffer_size)
    return await loop.create_server(
        lambda: _HandshakeFirst(listener),
        host,
        port,
        reuse_address=True,
        backlog=1024,
    )
