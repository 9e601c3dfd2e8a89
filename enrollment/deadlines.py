"""The EST server's header deadline: a request's headers must be in soon after its first byte.

aiohttp bounds a connection waiting for a request (``keepalive_timeout``, counted from the
connection's start or the last response, to the end of the next request's headers) and has no
deadline of its own for headers once they start. A client sending its headers at a byte a second
would hold a connection for the whole keep-alive time, so each connection's protocol is wrapped:
the first byte after an idle spell starts a timer, the application's middleware stops it when
aiohttp hands it the parsed request, and a timer that runs out closes the connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from aiohttp import web

from fleetgate.tls import LogThrottle

log = logging.getLogger("fleetgate.est")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class HeaderDeadline:
    """One per server: makes each connection's wrapped protocol, and the middleware."""

    def __init__(self, factory: Callable[[], asyncio.Protocol], timeout_s: float) -> None:
        self._factory = factory
        self.timeout_s = timeout_s
        self._connections: dict[asyncio.BaseProtocol, _Connection] = {}
        self.expired = LogThrottle(log, "connection closed: request headers too slow")

    def protocol(self) -> asyncio.Protocol:
        """The protocol factory for :func:`fleetgate.tls.serve_tls`."""
        return _Connection(self, self._factory())

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """The headers are in: stop the timer until the response is made."""
        connection = self._connections.get(request.protocol)
        if connection is not None:
            connection.busy = True
            connection.cancel()
        try:
            return await handler(request)
        finally:
            if connection is not None:
                connection.busy = False


class _Connection(asyncio.Protocol):
    """aiohttp's protocol for one connection, with the header timer in front of its input."""

    def __init__(self, owner: HeaderDeadline, app: asyncio.Protocol) -> None:
        self._owner = owner
        self._app = app
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self.busy = False  # a request is being handled: its body has a deadline of its own

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._owner._connections[self._app] = self
        self._app.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self.busy and self._timer is None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(self._owner.timeout_s, self._expire)
        self._app.data_received(data)

    def eof_received(self) -> bool | None:
        return self._app.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.cancel()
        self._owner._connections.pop(self._app, None)
        self._app.connection_lost(exc)

    def pause_writing(self) -> None:
        self._app.pause_writing()

    def resume_writing(self) -> None:
        self._app.resume_writing()

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self) -> None:
        self._timer = None
        if self.busy or self._transport is None:
            return
        peer = self._transport.get_extra_info("peername")
        self._owner.expired(peer=f"{peer[0]}:{peer[1]}" if peer else "unknown")
        self._transport.close()
