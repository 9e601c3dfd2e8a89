"""One bridge's upstream connection on asyncio: TLS 1.3, reconnects with backoff, the send
window, keep-alive. The MQTT rules are in :mod:`broker.bridge.protocol`; this module moves its
bytes and decides when to try again."""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import NoReturn, Protocol

from broker.bridge.plan import BridgePlan
from broker.bridge.protocol import (
    Accepted,
    AckedMany,
    Acknowledged,
    ConnectRefused,
    Event,
    Received,
    ServerClosed,
    Subscribed,
    UpstreamSession,
)
from broker.bridge.queue import OutQueue, Queued
from broker.bridge.status import BridgeCounters, LinkState
from broker.mqtt import ProtocolError, Publish, ReasonCode
from device_sdk.backoff import Backoff
from device_sdk.errors import KeyStoreError

log = logging.getLogger("fleetgate.broker.bridge")

SUBSCRIBE_PACKET_ID = 1
"""SUBSCRIBE goes out before any PUBLISH of a connection, so its id cannot clash with one."""


def cause(exc: BaseException) -> str:
    """What went wrong, never empty: some exceptions (a bare ``TimeoutError``, a reset
    connection) carry no message, and ``cannot reach host:port: `` tells an operator nothing."""
    return str(exc) or type(exc).__name__


class LinkDown(Exception):
    """Why an upstream connection ended or could not start; ``failure`` grows the backoff."""

    def __init__(self, reason: str, *, failure: bool = True) -> None:
        super().__init__(reason)
        self.reason = reason
        self.failure = failure


class LinkOwner(Protocol):
    """What a link asks of the broker's bridge manager."""

    async def connected(self, name: str) -> None: ...

    def inbound(self, name: str, publish: Publish, settle: Callable[[bool], None]) -> None:
        """A message from the upstream; ``settle(True)`` once it may be acknowledged upstream
        (now or later), ``settle(False)`` if it was not taken (the link reconnects, so the
        upstream sends it again)."""

    def acked(self, name: str, items: list[Queued]) -> None: ...

    def sent(self, name: str, seq: int) -> None: ...

    def disconnected(self, name: str) -> None: ...

    def want_more(self, name: str) -> None: ...


def _no_ack(ok: bool) -> None:
    """A QoS 0 message from the upstream: nothing to acknowledge."""


class InboundAcks:
    """The QoS 1 messages of one upstream connection not yet acknowledged (no I/O). A PUBACK
    goes out once its message is settled and every one before it is (MQTT acknowledges QoS 1
    in the order the PUBLISHes came); a message not taken marks the connection ``failed``.
    Settling after the connection ended does nothing: the upstream resends on reconnect.
    ``ready`` is set when something is settled outside a read (``reading`` off)."""

    def __init__(self, puback: Callable[[int], bytes]) -> None:
        self._puback = puback
        self.ready = asyncio.Event()
        self.reading = False
        self._order: deque[tuple[int, int]] = deque()  # (number, packet id), arrival order
        self._settled: set[int] = set()
        self._count = 0
        self.out: list[bytes] = []  # PUBACKs ready to write
        self.failed = False
        self.closed = False

    def expect(self, packet_id: int) -> Callable[[bool], None]:
        """The ``settle`` of the next QoS 1 message."""
        self._count += 1
        number = self._count
        self._order.append((number, packet_id))
        return lambda ok: self._settle(number, ok)

    def _settle(self, number: int, ok: bool) -> None:
        if self.closed:
            return
        if not ok:
            self.failed = True
        else:
            self._settled.add(number)
            order, settled = self._order, self._settled
            while order and order[0][0] in settled:
                done, packet_id = order.popleft()
                settled.discard(done)
                self.out.append(self._puback(packet_id))
        if not self.reading:
            self.ready.set()

    def take(self) -> bytes:
        """The PUBACKs to write now."""
        out, self.out = b"".join(self.out), []
        return out


class BridgeLink:
    """Keeps one bridge connected, forwarding its queue and receiving its in rules."""

    def __init__(
        self,
        plan: BridgePlan,
        queue: OutQueue,
        counters: BridgeCounters,
        state: LinkState,
        owner: LinkOwner,
        context: Callable[[], ssl.SSLContext],
        client_id: Callable[[], str],
    ) -> None:
        self.plan = plan
        self.queue = queue
        self.counters = counters
        self.state = state
        self._owner = owner
        self._context = context
        self._client_id = client_id
        self._wake = asyncio.Event()
        self._last_received = 0.0
        self._out: tuple[asyncio.StreamWriter, UpstreamSession, int] | None = None
        settings = plan.settings
        self._backoff = Backoff(initial=settings.backoff_initial_s, maximum=settings.backoff_max_s)

    def wake(self) -> None:
        """New messages (or a free window): sent at once if the window has room."""
        if self._out is None or not self._fill():
            self._wake.set()

    def _fill(self) -> bool:
        """Write as many queued messages as the window takes, now (no round trip through the
        event loop); False when there was nothing to send."""
        assert self._out is not None
        writer, session, window = self._out
        batch = self.queue.take(window - self.queue.in_flight)
        if not batch:
            return False
        publish = session.publish
        data = []
        for item in batch:
            if item.sent:
                self.counters.duplicates_out += 1
            data.append(publish(item))
            item.sent = True
        writer.write(b"".join(data))
        self._owner.sent(self.plan.name, batch[-1].seq)
        return True

    async def run(self) -> None:
        """Connect, forward, reconnect; until cancelled. Each failed attempt is logged once,
        with its reason, and the next one waits longer (full jitter, capped)."""
        failures = 0
        name = self.plan.name
        while True:
            try:
                await self._session()
            except LinkDown as exc:
                down = exc
            self.queue.rewind()
            self.state.down(down.reason, time.time())
            self._owner.disconnected(name)
            failures = failures + 1 if down.failure else 0
            if down.failure:
                self.counters.connect_failures += 1
            delay = self._backoff.delay(failures)
            log.warning(
                "bridge %s: %s; retrying in %.1f s",
                name,
                down.reason,
                delay,
                extra={"bridge": name, "reason": down.reason, "attempt": failures},
            )
            await asyncio.sleep(delay)

    async def _session(self) -> NoReturn:
        settings = self.plan.settings
        upstream = f"{settings.host}:{settings.port}"
        try:
            context = self._context()
            client_id = self._client_id()
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(
                    settings.host,
                    settings.port,
                    ssl=context,
                    server_hostname=self.plan.server_name,
                    ssl_handshake_timeout=settings.connect_timeout_s,
                ),
                settings.connect_timeout_s,
            )
        except KeyStoreError as exc:
            raise LinkDown(exc.message) from None
        except ssl.SSLError as exc:
            raise LinkDown(f"TLS with {upstream} failed: {exc.reason or cause(exc)}") from None
        except TimeoutError:  # before OSError, of which it is one
            raise LinkDown(
                f"cannot reach {upstream}: timed out after {settings.connect_timeout_s:g} s"
            ) from None
        except OSError as exc:
            raise LinkDown(f"cannot reach {upstream}: {cause(exc)}") from None
        session = UpstreamSession(
            self.plan.level,
            client_id=client_id,
            keep_alive=settings.keepalive_s,
            session_expiry=settings.session_expiry_s,
            receive_maximum=0xFFFF,
        )
        try:
            await self._converse(reader, writer, session, upstream)
        finally:
            writer.close()

    async def _converse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: UpstreamSession,
        upstream: str,
    ) -> NoReturn:
        settings = self.plan.settings
        writer.write(session.connect())
        try:
            accepted, early = await asyncio.wait_for(
                self._handshake(reader, session, upstream), settings.connect_timeout_s
            )
        except TimeoutError:
            raise LinkDown(
                f"no CONNACK from {upstream} within {settings.connect_timeout_s} s"
            ) from None
        await self._owner.connected(self.plan.name)
        self.state.up(time.time())
        log.info(
            "bridge %s connected to %s", self.plan.name, upstream, extra={"bridge": self.plan.name}
        )
        filters = tuple(rule.source for rule in self.plan.inbound)
        if filters:
            writer.write(session.subscribe(SUBSCRIBE_PACKET_ID, filters))
        window = min(settings.max_inflight, accepted.receive_maximum)
        acks = InboundAcks(session.puback)
        tasks = [
            asyncio.create_task(
                self._read(reader, writer, session, acks, upstream, filters, early)
            ),
            asyncio.create_task(self._send(writer, session, window)),
            asyncio.create_task(self._ack_late(writer, acks)),
        ]
        if settings.keepalive_s:
            tasks.append(asyncio.create_task(self._keep_alive(writer, session)))
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            self._out = None
            acks.closed = True
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for task in done:
            exc = task.exception()
            if isinstance(exc, LinkDown):
                raise exc
            if isinstance(exc, ssl.SSLError | OSError):
                raise LinkDown(f"connection to {upstream} lost: {cause(exc)}", failure=False)
            if exc is not None:
                raise exc
        raise LinkDown(f"connection to {upstream} ended", failure=False)

    async def _handshake(
        self, reader: asyncio.StreamReader, session: UpstreamSession, upstream: str
    ) -> tuple[Accepted, list[Event]]:
        """CONNACK, and what came in the same read after it: an upstream resuming the
        bridge's session sends its queued messages at once, often in the same TCP segment
        (dropping them left them unacknowledged until the next reconnect)."""
        while True:
            try:
                data = await reader.read(65536)
            except ssl.SSLError as exc:  # TLS 1.3: a refused client certificate shows up here
                raise LinkDown(
                    f"{upstream} refused the TLS session: {exc.reason or cause(exc)}"
                ) from None
            except OSError as exc:
                raise LinkDown(f"{upstream} closed the connection: {cause(exc)}") from None
            if not data:
                raise LinkDown(f"{upstream} closed the connection before CONNACK")
            try:
                events = session.receive(data)
            except ProtocolError as exc:
                raise LinkDown(f"{upstream} broke the protocol: {exc.message}") from None
            for event in events:
                if isinstance(event, ConnectRefused):
                    raise LinkDown(f"{upstream} refused CONNECT: 0x{event.code:02x} {event.reason}")
                if isinstance(event, Accepted):
                    return event, events[events.index(event) + 1 :]
                raise LinkDown(f"{upstream} sent {type(event).__name__} before CONNACK")

    async def _read(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        session: UpstreamSession,
        acks: InboundAcks,
        upstream: str,
        filters: tuple[str, ...],
        events: list[Event],
    ) -> None:
        """Handle ``events`` (what came with CONNACK), then each read's."""
        name = self.plan.name
        while True:
            done: list[Queued] = []
            acks.reading = True
            for event in events:
                match event:
                    case AckedMany(packet_ids=packet_ids):
                        done += self.queue.acked_many(packet_ids)
                    case Acknowledged(packet_id=packet_id, code=code, reason=reason):
                        if code >= 0x80:
                            raise LinkDown(
                                f"{upstream} refused a forwarded message: 0x{code:02x} "
                                f"{reason or ReasonCode(code).name.lower()} (kept in the queue; "
                                "check the bridge identity's ACL upstream)"
                            )
                        item = self.queue.acked(packet_id)
                        if item is not None:
                            done.append(item)
                    case Received(publish=publish):
                        pid = publish.packet_id
                        settle = _no_ack if pid is None else acks.expect(pid)
                        self._owner.inbound(name, publish, settle)
                    case Subscribed(codes=codes):
                        refused = [f for f, c in zip(filters, codes, strict=False) if c >= 0x80]
                        if refused:
                            self.state.last_error = f"{upstream} refused subscriptions {refused}"
                            log.error(
                                "bridge %s: %s refused subscriptions %s: commands will not "
                                "arrive; check the bridge identity's ACL upstream",
                                name,
                                upstream,
                                refused,
                                extra={"bridge": name},
                            )
                    case ServerClosed(code=code, reason=reason):
                        raise LinkDown(
                            f"{upstream} sent DISCONNECT 0x{code:02x} {reason}".rstrip(),
                            failure=code >= 0x80,
                        )
            acks.reading = False
            if done:
                self.counters.forwarded += len(done)
                self._owner.acked(name, done)
            self._write_acks(writer, acks)
            if done and self._out is not None and not self._fill():
                self._wake.set()  # the sender asks for more from disk
            data = await reader.read(65536)
            if not data:
                raise LinkDown(f"{upstream} closed the connection", failure=False)
            self._last_received = asyncio.get_running_loop().time()
            try:
                events = session.receive(data)
            except ProtocolError as exc:
                raise LinkDown(f"{upstream} broke the protocol: {exc.message}") from None

    def _write_acks(self, writer: asyncio.StreamWriter, acks: InboundAcks) -> None:
        """PUBACKs whose messages were taken; a message not taken ends the connection."""
        if acks.out:
            writer.write(acks.take())
        if acks.failed:
            raise LinkDown(
                "an inbound message was not stored; reconnecting so that the upstream sends "
                "it again",
                failure=True,
            )

    async def _ack_late(self, writer: asyncio.StreamWriter, acks: InboundAcks) -> None:
        """PUBACKs for messages the owner settled after :meth:`_read` handed them over (the
        fabric stores them first)."""
        while True:
            await acks.ready.wait()
            acks.ready.clear()
            self._write_acks(writer, acks)

    async def _send(
        self, writer: asyncio.StreamWriter, session: UpstreamSession, window: int
    ) -> None:
        """Sends when woken; PUBACKs and commits also send directly (:meth:`_fill`)."""
        self._out = (writer, session, window)
        while True:
            self._wake.clear()
            if not self._fill():
                self._owner.want_more(self.plan.name)
                await self._wake.wait()
                continue
            await writer.drain()

    async def _keep_alive(self, writer: asyncio.StreamWriter, session: UpstreamSession) -> None:
        interval = self.plan.settings.keepalive_s
        loop = asyncio.get_running_loop()
        self._last_received = loop.time()
        while True:
            await asyncio.sleep(interval / 2)
            if loop.time() - self._last_received > 1.5 * interval:
                raise LinkDown(f"no answer from the upstream for {1.5 * interval:.0f} s")
            writer.write(session.ping())
