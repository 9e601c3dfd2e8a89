"""TLS as bytes in, bytes out: one connection's ``ssl.SSLObject`` between two memory BIOs.

No sockets and no event loop (h11's shape): :meth:`TLSPump.receive` takes what the peer sent and
returns the plaintext it carried, :meth:`TLSPump.send` returns the records to send for some
plaintext, :meth:`TLSPump.outgoing` whatever else TLS has to say (handshake flights, alerts,
close_notify). :mod:`fleetgate.tls` moves these bytes between a socket and an application.

Memory is the point of owning this layer. OpenSSL keeps a memory BIO's buffer at the largest
amount it ever held, for the life of the connection, so :meth:`receive` feeds the incoming BIO
at most :data:`FEED_SIZE` bytes at a time (OpenSSL moves them on into its own record buffer,
which ``SSL_MODE_RELEASE_BUFFERS`` -- set by CPython on every context -- frees once a record is
read). The plaintext is read into fresh ``bytes``; nothing is kept between calls.
"""

from __future__ import annotations

import contextlib
import ssl

READ_SIZE = 16 * 1024
"""The most plaintext one TLS record carries: one read takes a whole record."""

FEED_SIZE = 1024
"""The most ciphertext written into the incoming BIO at once, so its buffer stays this small
(a client's certificate flight is about this size; larger input is fed in slices)."""


class TLSPump:
    """One TLS session, client or server side, driven by the bytes the caller moves."""

    __slots__ = ("_incoming", "_outgoing", "_tls", "closed_by_peer", "handshake_done")

    def __init__(
        self, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(
            self._incoming, self._outgoing, server_side=server_side, server_hostname=server_hostname
        )
        self.handshake_done = False
        """True once the handshake succeeded (the peer's certificate is then verified)."""
        self.closed_by_peer = False
        """True once the peer sent close_notify: it will send nothing more."""

    @property
    def ssl_object(self) -> ssl.SSLObject:
        """The session: ``getpeercert(binary_form=True)``, ``cipher()``, ``version()``."""
        return self._tls

    def start(self) -> bytes:
        """A client's first flight (its ClientHello); a server answers :meth:`receive` only."""
        self._step_handshake()
        return self._outgoing.read()

    def receive(self, data: bytes | bytearray | memoryview) -> bytes:
        """Take ``data`` from the peer; return the plaintext it completed (``b""`` if none yet).

        Raises :class:`ssl.SSLError` if the handshake fails or a record is bad; the alert for
        the peer is then in :meth:`outgoing`. Check :meth:`has_output` afterwards: a handshake
        flight or a reply to a key update may be waiting.
        """
        if len(data) <= FEED_SIZE:
            self._incoming.write(data)
            return self._advance()
        view = memoryview(data)
        chunks = []
        for start in range(0, len(view), FEED_SIZE):
            self._incoming.write(view[start : start + FEED_SIZE])
            chunk = self._advance()
            if chunk:
                chunks.append(chunk)
        return b"".join(chunks)

    def send(self, data: bytes | bytearray | memoryview) -> bytes:
        """The records that carry ``data`` (plus anything TLS had pending before them)."""
        if data:
            self._tls.write(data)
        return self._outgoing.read()

    def has_output(self) -> bool:
        return self._outgoing.pending > 0

    def outgoing(self) -> bytes:
        """Pending bytes for the peer: a handshake flight, an alert, a close_notify."""
        return self._outgoing.read()

    def close(self) -> bytes:
        """Our close_notify (after anything still pending); the peer's is not waited for."""
        # SSLWantReadError: the peer's close_notify has not come (yet); an SSLError: the
        # session failed already, and there is nothing to close politely.
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        return self._outgoing.read()

    def _step_handshake(self) -> bool:
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.handshake_done = True
        return True

    def _advance(self) -> bytes:
        """Run the handshake or read records from what the incoming BIO holds now."""
        if not self.handshake_done and not self._step_handshake():
            return b""
        if self.closed_by_peer:
            return b""
        tls = self._tls
        try:
            data = tls.read(READ_SIZE)
        except ssl.SSLWantReadError:
            return b""
        if not data:
            self.closed_by_peer = True
            return b""
        if not self._incoming.pending:  # the usual case: one record per read from the socket
            return data
        chunks = [data]
        while True:
            try:
                data = tls.read(READ_SIZE)
            except ssl.SSLWantReadError:
                break
            if not data:
                self.closed_by_peer = True
                break
            chunks.append(data)
        return b"".join(chunks)
