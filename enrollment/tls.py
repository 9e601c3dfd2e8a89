"""TLS for fleetgate's servers: secure contexts, and a server that sees its handshake failures.

asyncio's own TLS server swallows a failed handshake (it is logged only in debug mode), so a
client certificate from a foreign CA or an expired one would leave no trace. :func:`serve_tls`
accepts plain TCP, runs the handshake itself with ``loop.start_tls``, reports each failure with
the peer and OpenSSL's reason, and only then hands the TLS transport to the application protocol.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Literal

HandshakeRefused = Callable[[str, str], None]
"""Called as ``on_refused(peer, reason)`` for every failed TLS handshake."""

_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"


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
    return f"TLS handshake failed: {exc}"


class _HandshakeFirst(asyncio.Protocol):
    """Runs the TLS handshake on a fresh TCP connection, then becomes a pass-through."""

    def __init__(
        self,
        app_factory: Callable[[], asyncio.Protocol],
        context: ssl.SSLContext,
        timeout: float,
        on_refused: HandshakeRefused,
    ) -> None:
        self._app_factory = app_factory
        self._context = context
        self._timeout = timeout
        self._on_refused = on_refused
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
        loop = asyncio.get_running_loop()
        try:
            tls = await loop.start_tls(
                tcp, self, self._context, server_side=True, ssl_handshake_timeout=self._timeout
            )
        except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
            self._on_refused(self._peer, describe_handshake_error(exc))
            tcp.abort()
            return
        if tls is None:  # the peer went away during the handshake
            return
        self._app = self._app_factory()
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
) -> asyncio.Server:
    """Listen on ``host:port``; every accepted connection is TLS or is refused and reported."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(
        lambda: _HandshakeFirst(app_factory, context, handshake_timeout, on_refused),
        host,
        port,
        reuse_address=True,
        backlog=1024,
    )
