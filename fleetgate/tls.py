"""TLS for fleetgate's servers: secure contexts, and a server that sees its handshake failures.

asyncio's own TLS server swallows a failed handshake (it is logged only in debug mode) and
aborts the connection with OpenSSL's alert unsent, so a client certificate from a foreign CA or
an expired one would leave no trace, and the client would learn nothing but "connection reset".
:func:`serve_tls` accepts plain TCP and runs TLS itself, with the public ``ssl`` API (a
:class:`~fleetgate.tlspump.TLSPump` per connection: an ``ssl.SSLObject`` between memory BIOs).
It sends a refused client its alert, reports each failure with the peer and OpenSSL's reason,
and only then makes the application protocol, whose transport is the connection itself.

A listener may cap the connections it holds, in all and per source address
(:class:`ConnectionCaps`): one beyond a cap is reset as soon as it is accepted, before any TLS,
so a flood of idle connections cannot use up the process's file descriptors. Should the process
run out anyway, asyncio's accept errors are logged at most once a second with their count
(asyncio itself stops accepting for a second after one).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import logging
import ssl
import time
import weakref
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from fleetgate.tlspump import TLSPump

log = logging.getLogger("fleetgate.tls")

HandshakeRefused = Callable[[str, str], None]
"""Called as ``on_refused(peer, reason)`` for every failed TLS handshake."""

_TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
OP_PRIORITIZE_CHACHA = 0x00200000
"""OpenSSL's SSL_OP_PRIORITIZE_CHACHA, which Python 3.11's ``ssl`` does not name: the server
picks ChaCha20-Poly1305 when the client lists it first (a client without AES instructions)."""
_ACCEPT_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
_LINGER_S = 2.0  # how long a closed or refused peer gets to read our last bytes and hang up
_RECEIVE_SIZE = 64 * 1024  # one receive buffer per listener, shared by its connections


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
    # Server preference stays (AES-256 over AES-128), but a client that lists ChaCha20 first
    # (no AES instructions: AES-GCM in software is ~5x slower there) gets it.
    ctx.options |= OP_PRIORITIZE_CHACHA
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


class LogThrottle:
    """Logs an event at most once per ``interval_s``, with how many happened since the last line:
    a client can make a refusal or an accept error happen thousands of times a second, and one
    line each would fill the disk (issue 11 saw 54 MB of tracebacks in 40 s)."""

    def __init__(self, logger: logging.Logger, message: str, interval_s: float = 1.0) -> None:
        self._logger = logger
        self._message = message
        self._interval_s = interval_s
        self._last = -interval_s
        self._pending = 0
        self.total = 0

    def __call__(self, **extra: Any) -> None:
        self.total += 1
        self._pending += 1
        now = time.monotonic()
        if now - self._last >= self._interval_s:
            self._logger.warning(self._message, extra={"count": self._pending, **extra})
            self._last = now
            self._pending = 0


@dataclass(frozen=True)
class ConnectionCaps:
    """How many connections one listener holds at once, in all and from one source address."""

    total: int
    per_address: int


class _Admission:
    """The connections a capped listener holds, by source address."""

    def __init__(self, caps: ConnectionCaps) -> None:
        self.caps = caps
        self.open = 0
        self.by_address: Counter[str] = Counter()
        self.refused = LogThrottle(log, "connection refused: over the connection cap")

    def admit(self, address: str) -> bool:
        if self.open >= self.caps.total:
            self.refused(peer=address, cap="total", limit=self.caps.total)
            return False
        if self.by_address[address] >= self.caps.per_address:
            self.refused(peer=address, cap="per_address", limit=self.caps.per_address)
            return False
        self.open += 1
        self.by_address[address] += 1
        return True

    def release(self, address: str) -> None:
        self.open -= 1
        self.by_address[address] -= 1
        if not self.by_address[address]:
            del self.by_address[address]


@dataclass(frozen=True)
class _Listener:
    """What every connection of one TLS listener shares, its receive buffer included."""

    loop: asyncio.AbstractEventLoop
    app_factory: Callable[[], asyncio.Protocol]
    context: ssl.SSLContext
    handshake_timeout: float
    on_refused: HandshakeRefused
    admission: _Admission | None
    buffer: memoryview = field(default_factory=lambda: memoryview(bytearray(_RECEIVE_SIZE)))


class _State(enum.Enum):
    HANDSHAKE = enum.auto()
    OPEN = enum.auto()
    CLOSING = enum.auto()  # our alert or close_notify is sent: draining until the peer hangs up


_HANDSHAKE, _OPEN, _CLOSING = _State.HANDSHAKE, _State.OPEN, _State.CLOSING


class _TLSConnection(asyncio.BufferedProtocol, asyncio.Transport):
    """One accepted socket: the protocol of its TCP transport, and the application's transport.

    The socket is read into the listener's one receive buffer (the event loop hands each read to
    :meth:`buffer_updated` at once, and the bytes go straight on into the :class:`TLSPump`), so
    an idle connection keeps no read buffer of its own. The application protocol is made only
    once the handshake succeeded, and told ``connection_lost`` once, when the socket is gone.
    """

    __slots__ = ("_address", "_app", "_listener", "_pump", "_state", "_tcp", "_timer")

    def __init__(self, listener: _Listener) -> None:  # no Transport.__init__: no _extra dict
        self._listener = listener
        self._pump = TLSPump(listener.context, server_side=True)
        self._state = _HANDSHAKE
        self._app: asyncio.Protocol | None = None
        self._tcp: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._address: str | None = None  # the source address, while the admission counts it

    # -- the socket's side (asyncio.BufferedProtocol) ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._tcp = transport
        listener = self._listener
        if listener.admission is not None:
            peer = transport.get_extra_info("peername")
            address = str(peer[0]) if peer else "unknown"
            if not listener.admission.admit(address):
                self._state = _CLOSING
                transport.abort()  # a reset frees the descriptor now; no TLS, no audit
                return
            self._address = address
        self._timer = listener.loop.call_later(listener.handshake_timeout, self._timed_out)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._listener.buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self._listener.buffer[:nbytes]
        if self._state is _OPEN:
            self._receive(data)
        elif self._state is _HANDSHAKE:
            self._handshake(data)
        # _CLOSING: what the peer still sends is read only so that closing sends no reset

    def eof_received(self) -> bool | None:
        if self._state is _HANDSHAKE:
            self._refuse(describe_handshake_error(ConnectionResetError()), linger=False)
        elif self._state is _OPEN and self._app_keeps_open():
            return True  # half-open: the application closes when it is done
        return None  # the socket closes, once what is buffered is written

    def connection_lost(self, exc: Exception | None) -> None:
        if self._state is _HANDSHAKE:
            self._refuse(describe_handshake_error(exc or ConnectionResetError()), linger=False)
        self._state = _CLOSING
        self._cancel_timer()
        if self._address is not None and self._listener.admission is not None:
            self._listener.admission.release(self._address)
            self._address = None
        app, self._app = self._app, None  # the application and this transport refer to each other
        if app is not None:
            app.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._state is _OPEN and self._app is not None:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._state is _OPEN and self._app is not None:
            self._app.resume_writing()

    # -- the application's side (asyncio.Transport) --------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._state is _OPEN and data:
            self._send(self._pump.send(data))

    def close(self) -> None:
        """Our close_notify, then the socket's write side; the peer's close is not awaited
        longer than ``_LINGER_S``."""
        if self._state is _OPEN:
            self._state = _CLOSING
            self._linger(self._pump.close())

    def abort(self) -> None:
        self._state = _CLOSING
        if self._tcp is not None:
            self._tcp.abort()

    def is_closing(self) -> bool:
        return self._state is not _OPEN

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        """``ssl_object``, ``peercert`` (decoded only when asked for: prefer
        ``ssl_object.getpeercert(binary_form=True)``), ``cipher``, ``compression``,
        ``sslcontext``; anything else from the socket's transport (``peername``, ``socket``)."""
        tls = self._pump.ssl_object
        if name == "ssl_object":
            return tls
        if name == "peercert":
            return tls.getpeercert() if self._pump.handshake_done else default
        if name == "cipher":
            return tls.cipher()
        if name == "compression":
            return tls.compression()
        if name == "sslcontext":
            return self._listener.context
        return self._tcp.get_extra_info(name, default) if self._tcp is not None else default

    def pause_reading(self) -> None:
        if self._state is _OPEN and self._tcp is not None:
            self._tcp.pause_reading()

    def resume_reading(self) -> None:
        if self._state is _OPEN and self._tcp is not None:
            self._tcp.resume_reading()

    def is_reading(self) -> bool:
        return self._tcp is not None and self._tcp.is_reading()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._tcp is not None:
            self._tcp.set_write_buffer_limits(high, low)

    def get_write_buffer_size(self) -> int:
        return self._tcp.get_write_buffer_size() if self._tcp is not None else 0

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._tcp.get_write_buffer_limits() if self._tcp is not None else (0, 0)

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("a TLS connection is closed as a whole: call close()")

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        assert isinstance(protocol, asyncio.Protocol)
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        assert self._app is not None
        return self._app

    # -- between the two -----------------------------------------------------------------------

    def _handshake(self, data: memoryview) -> None:
        pump = self._pump
        try:
            plaintext = pump.receive(data)
        except ssl.SSLError as exc:
            self._refuse(describe_handshake_error(exc), linger=True)
            return
        if pump.has_output():
            self._send(pump.outgoing())
        if not pump.handshake_done:
            return
        self._cancel_timer()
        self._state = _OPEN
        self._app = self._listener.app_factory()
        self._app.connection_made(self)
        self._deliver(plaintext)  # what the client sent right after its Finished: its CONNECT

    def _receive(self, data: memoryview) -> None:
        pump = self._pump
        try:
            plaintext = pump.receive(data)
        except ssl.SSLError as exc:  # a bad record: the peer is broken or hostile
            log.info("TLS connection failed", extra={"peer": self._peer(), "reason": str(exc)})
            self._state = _CLOSING
            self._linger(pump.outgoing())
            return
        if pump.has_output():  # the answer to a key update
            self._send(pump.outgoing())
        self._deliver(plaintext)

    def _deliver(self, plaintext: bytes) -> None:
        if plaintext and self._state is _OPEN and self._app is not None:
            self._app.data_received(plaintext)
        if self._pump.closed_by_peer and self._state is _OPEN and not self._app_keeps_open():
            assert self._tcp is not None
            self._tcp.close()  # the peer's close_notify came before its FIN: no need to wait

    def _app_keeps_open(self) -> bool:
        """The peer is done sending: ask the application, and close unless it keeps writing."""
        assert self._app is not None
        if self._app.eof_received():
            return True
        self._state = _CLOSING
        self._send(self._pump.close())
        return False

    def _refuse(self, reason: str, *, linger: bool) -> None:
        """Report a failed handshake; with ``linger``, let the client read the alert first."""
        self._state = _CLOSING
        self._cancel_timer()
        self._listener.on_refused(self._peer(), reason)
        if linger:
            self._linger(self._pump.outgoing())

    def _timed_out(self) -> None:
        self._timer = None
        if self._state is _HANDSHAKE:
            self._refuse(describe_handshake_error(TimeoutError()), linger=False)
            if self._tcp is not None:
                self._tcp.abort()

    def _linger(self, last: bytes) -> None:
        """Send ``last`` (an alert, a close_notify), close the write side, and drop what the peer
        still sends until it hangs up (at most ``_LINGER_S``). Closing at once would leave the
        peer's last bytes unread, and the kernel would answer them with a reset that destroys
        what was sent in flight."""
        tcp = self._tcp
        if tcp is None or tcp.is_closing():
            return
        if last:
            tcp.write(last)
        if tcp.can_write_eof():
            with contextlib.suppress(OSError):  # the peer may be gone already
                tcp.write_eof()
        tcp.resume_reading()
        self._cancel_timer()
        self._timer = self._listener.loop.call_later(_LINGER_S, tcp.abort)

    def _send(self, data: bytes) -> None:
        if data and self._tcp is not None:
            self._tcp.write(data)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _peer(self) -> str:
        peer = self._tcp.get_extra_info("peername") if self._tcp is not None else None
        return f"{peer[0]}:{peer[1]}" if peer else "unknown"


async def serve_tls(
    app_factory: Callable[[], asyncio.Protocol],
    *,
    host: str,
    port: int,
    context: ssl.SSLContext,
    on_refused: HandshakeRefused,
    handshake_timeout: float = 10.0,
    caps: ConnectionCaps | None = None,
    reuse_port: bool = False,
) -> asyncio.Server:
    """Listen on ``host:port``; every accepted connection is TLS or is refused and reported.

    Without ``caps`` the listener holds as many connections as the process has descriptors.
    ``reuse_port`` (SO_REUSEPORT) lets several processes listen on one port, the kernel
    spreading connections among them (``serve broker --workers``).
    """
    loop = asyncio.get_running_loop()
    _throttle_accept_errors(loop)
    admission = _Admission(caps) if caps is not None else None
    listener = _Listener(loop, app_factory, context, handshake_timeout, on_refused, admission)
    return await loop.create_server(
        lambda: _TLSConnection(listener),
        host,
        port,
        reuse_address=True,
        reuse_port=reuse_port or None,
        backlog=1024,
    )


_THROTTLED_LOOPS: weakref.WeakSet[asyncio.AbstractEventLoop] = weakref.WeakSet()


def _throttle_accept_errors(loop: asyncio.AbstractEventLoop) -> None:
    """Out of descriptors, asyncio reports every failed ``accept()`` to the loop's exception
    handler with a traceback (up to the backlog's worth per attempt, once a second): let through
    at most one line a second, with the count. Other reports go where they went before."""
    if loop in _THROTTLED_LOOPS:
        return
    _THROTTLED_LOOPS.add(loop)
    previous = loop.get_exception_handler()
    throttle = LogThrottle(log, "accept failed: out of descriptors or memory")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        accept = "accept" in str(context.get("message", ""))
        if accept and isinstance(exc, OSError) and exc.errno in _ACCEPT_ERRNOS:
            throttle(reason=exc.strerror or str(exc))
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
