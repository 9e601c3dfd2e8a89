"""TLS for fleetgate's servers: secure contexts, and a server that sees its handshake failures.

asyncio's own TLS server swallows a failed handshake (it is logged only in debug mode), so a
client certificate from a foreign CA or an expired one would leave no trace. :func:`serve_tls`
accepts plain TCP, runs the handshake itself (asyncio's TLS protocol, made to send the refused
client its TLS alert), reports each failure with the peer and OpenSSL's reason, and only then
makes the application protocol and hands it the TLS transport.
"""

from __future__ import annotations

import asyncio
import contextlib
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
            # The client may be gone already: its EOF can be what ended the handshake.
            with contextlib.suppress(OSError):
                tcp.write_eof()
        tcp.resume_reading()

    def data_received(self, data: bytes) -> None:
        """The refused client's request: nobody will answer it."""

    def eof_received(self) -> bool | None:
        return None  # the client hung up: the transport closes itself, cleanly

    def connection_lost(self, exc: Exception | None) -> None:
        self._timer.cancel()


@dataclass(frozen=True)
class _Listener:
    """What every connection of one TLS listener shares."""

    app_factory: Callable[[], asyncio.Protocol]
    context: ssl.SSLContext
    handshake_timeout: float
    on_refused: HandshakeRefused
    read_buffer_size: int | None


_NO_APP_YET = asyncio.Protocol()
"""Stands in for the application protocol until the handshake succeeds (it is made only then)."""


class _ServerTLS(sslproto.SSLProtocol):
    """asyncio's server-side TLS as the accepted socket's own protocol, reporting its handshake.

    What differs from ``loop.create_server(ssl=...)``: a refused handshake still sends its alert
    (asyncio aborts the connection with OpenSSL's alert -- unknown CA, certificate expired, ...
    -- unsent, so the client learns nothing but "connection reset"), every failure is reported
    with the peer and the reason, and the application protocol is made only once the handshake
    succeeded. The handshake runs from the socket's callbacks: no task, no waiter future, no
    pass-through protocol between the TLS layer and the application (each of those cost the
    broker CPU on every connection, and the pass-through on every packet).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, listener: _Listener) -> None:
        if listener.read_buffer_size is not None:
            # asyncio allocates max_size (256 KiB) per connection for decrypted reads; an
            # instance value set before __init__ sizes that buffer, so idle connections stay small.
            self.max_size = listener.read_buffer_size  # type: ignore[misc]  # a ClassVar in typeshed
        super().__init__(
            loop,
            _NO_APP_YET,
            listener.context,
            None,  # type: ignore[arg-type]  # no waiter: _wakeup_waiter reports the outcome
            server_side=True,
            ssl_handshake_timeout=listener.handshake_timeout,  # type: ignore[arg-type]
        )
        self._listener = listener
        self._peer = "unknown"
        self._handshaking = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        if peer:
            self._peer = f"{peer[0]}:{peer[1]}"
        super().connection_made(transport)  # starts the handshake (and its timeout)

    def _on_handshake_complete(self, handshake_exc: BaseException | None) -> None:
        if handshake_exc is not None:
            tcp = self._transport
            if isinstance(tcp, asyncio.Transport):
                alert = self._outgoing.read()  # type: ignore[attr-defined]  # asyncio internals
                self._transport = None  # so asyncio does not abort it: _Linger closes it
                _Linger(tcp, alert)
            super()._on_handshake_complete(handshake_exc)  # reports it through _wakeup_waiter
            return
        # asyncio's success path (Python 3.11-3.13), except that the application protocol is
        # made here, and the peer certificate is not decoded into the text form of
        # get_extra_info("peercert") for every connection: use ssl_object.getpeercert().
        tls: Any = self  # asyncio internals, which typeshed does not describe
        if tls._handshake_timeout_handle is not None:
            tls._handshake_timeout_handle.cancel()
            tls._handshake_timeout_handle = None
        tls._set_state(sslproto.SSLProtocolState.WRAPPED)
        sslobj = tls._sslobj
        tls._extra.update(
            cipher=sslobj.cipher(), compression=sslobj.compression(), ssl_object=sslobj
        )
        self._handshaking = False
        app = self._listener.app_factory()
        tls._set_app_protocol(app)
        tls._app_state = sslproto.AppProtocolState.STATE_CON_MADE
        app.connection_made(tls._get_app_transport())
        tls._do_read()  # what the client sent right after its Finished: its CONNECT, say

    def _check_handshake_timeout(self) -> None:
        if self._handshaking:  # reported as a timeout, not as the abort asyncio follows it with
            self._wakeup_waiter(TimeoutError())
        super()._check_handshake_timeout()

    def _wakeup_waiter(self, exc: BaseException | type[BaseException] | None = None) -> None:
        """asyncio's end of the handshake (or of the connection during it): report a failure."""
        if not self._handshaking:
            return
        self._handshaking = False
        if exc is None:  # the peer went away cleanly during the handshake
            return
        if isinstance(exc, type):  # asyncio passes ConnectionResetError itself on an early EOF
            exc = exc()
        self._listener.on_refused(self._peer, describe_handshake_error(exc))


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
        lambda: _ServerTLS(loop, listener),
        host,
        port,
        reuse_address=True,
        backlog=1024,
    )
