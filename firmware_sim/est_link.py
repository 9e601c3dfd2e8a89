"""A shard's EST link: the station's ``simpleenroll`` requests over a few kept-alive HTTPS
connections on the shard's own event loop.

The SDK's :class:`~device_sdk.est.EstClient` (``http.client``, blocking) suits one station on a
line. A shard enrolling thousands of devices ran it on the event loop's thread pool: a thread
hop per device, ``http.client``'s header parsing, the GIL passed back and forth. Here a request
is one write and one read on an asyncio stream, and each of the station's few connections does
its TLS handshake once for the whole wave (the server keeps an idle one ``idle_timeout_s``;
one it closed meanwhile is opened again).
"""

from __future__ import annotations

import asyncio
import base64
import ssl
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.hazmat.primitives.serialization import pkcs7

from device_sdk.est import EST_PREFIX, EstError

Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]
TIMEOUT_S = 30.0


class EstLink:
    """``simpleenroll`` with the station's credentials over at most ``connections`` kept-alive
    connections; callers beyond that wait for one to be free."""

    def __init__(self, base_url: str, context: ssl.SSLContext, *, connections: int = 4) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"EST needs an https:// URL, not {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 443
        self.context = context
        self._idle: asyncio.Queue[Stream | None] = asyncio.Queue()
        for _ in range(connections):
            self._idle.put_nowait(None)  # a free slot, not connected yet
        self.handshakes = 0

    async def simpleenroll(self, csr_der: bytes) -> x509.Certificate:
        body = base64.encodebytes(csr_der)
        head = (
            f"POST {EST_PREFIX}/simpleenroll HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
            f"Content-Type: application/pkcs10\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        status, answer = await self._exchange(head.encode() + body)
        if status != 200:
            raise EstError(status, answer.decode(errors="replace").strip())
        return pkcs7.load_der_pkcs7_certificates(base64.b64decode(answer))[0]

    async def _exchange(self, request: bytes) -> tuple[int, bytes]:
        """One request and its response on a free connection. A kept-alive connection the
        server closed while idle fails before any byte of an answer: then once more on a
        fresh one."""
        stream = await self._idle.get()
        try:
            reused = stream is not None
            if stream is None:
                stream = await self._open()
            try:
                status, answer, keep = await _roundtrip(stream, request)
            except (asyncio.IncompleteReadError, ConnectionError) as exc:
                _close(stream)
                stream = None
                partial = isinstance(exc, asyncio.IncompleteReadError) and exc.partial
                if not reused or partial:
                    raise
                stream = await self._open()
                status, answer, keep = await _roundtrip(stream, request)
            if not keep:
                _close(stream)
                stream = None
            return status, answer
        except BaseException:
            if stream is not None:
                _close(stream)
                stream = None
            raise
        finally:
            self._idle.put_nowait(stream)

    async def _open(self) -> Stream:
        self.handshakes += 1
        async with asyncio.timeout(TIMEOUT_S):
            return await asyncio.open_connection(
                self.host, self.port, ssl=self.context, server_hostname=self.host
            )

    async def close(self) -> None:
        while not self._idle.empty():
            stream = self._idle.get_nowait()
            if stream is not None:
                _close(stream)


async def _roundtrip(stream: Stream, request: bytes) -> tuple[int, bytes, bool]:
    """(status, body, whether the connection stays open) for one HTTP/1.1 request."""
    async with asyncio.timeout(TIMEOUT_S):
        return await _answer(stream, request)


async def _answer(stream: Stream, request: bytes) -> tuple[int, bytes, bool]:
    reader, writer = stream
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, keep = None, True
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "connection" and value.strip().lower() == "close":
            keep = False
        elif name == "transfer-encoding":
            raise EstError(status, f"unexpected Transfer-Encoding {value.strip()!r}")
    if length is None:
        return status, await reader.read(), False
    return status, await reader.readexactly(length), keep


def _close(stream: Stream) -> None:
    stream[1].close()


__all__ = ["EstLink"]
