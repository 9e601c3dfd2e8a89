"""A small asyncio MQTT 5 / 3.1.1 client on fleetgate's sans-I/O codec, for simulated devices.

The device SDK (paho, one thread per client) suits one real device; a simulator running
thousands of devices on two cores needs one event loop and no threads, so it speaks MQTT
through :mod:`broker.mqtt` directly. Only what the simulator needs: connect (clean or with a
persistent session), subscribe, QoS 0/1/2 publish with acknowledgement, receive (optionally
acknowledging slowly, as a slow subscriber does), disconnect.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace

from broker.mqtt import (
    ConnAck,
    ConnackReturnCodeV3,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
    PingResp,
    Properties,
    ProtocolError,
    PubAck,
    PubComp,
    Publish,
    PubRec,
    PubRel,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    encode,
)
from fleetgate.tlspump import TLSPump

MQTT5 = 5
MQTT311 = 4
PINGREQ = encode(PingReq(), MQTT5)  # the same two bytes at both protocol levels
V3_REFUSALS = {
    ConnackReturnCodeV3.UNACCEPTABLE_PROTOCOL_VERSION: ReasonCode.UNSUPPORTED_PROTOCOL_VERSION,
    ConnackReturnCodeV3.IDENTIFIER_REJECTED: ReasonCode.CLIENT_IDENTIFIER_NOT_VALID,
    ConnackReturnCodeV3.SERVER_UNAVAILABLE: ReasonCode.SERVER_UNAVAILABLE,
    ConnackReturnCodeV3.BAD_USER_NAME_OR_PASSWORD: ReasonCode.BAD_USER_NAME_OR_PASSWORD,
    ConnackReturnCodeV3.NOT_AUTHORIZED: ReasonCode.NOT_AUTHORIZED,
}
Answer = PubAck | SubAck | PubRec | PubComp


@dataclass(frozen=True)
class Unacked:
    """A QoS 1/2 publish whose acknowledgement the connection's end cut short; ``released``:
    QoS 2 with PUBREC received and PUBREL sent, so only PUBREL is to be sent again."""

    packet: Publish
    released: bool = False


class SessionClosed(ConnectionError):
    """The broker closed the session; ``reason`` says why (a DISCONNECT reason or the socket).
    Raised by :meth:`SimClient.publish`, ``unacked`` is the message to send again."""

    def __init__(self, reason: str, unacked: Unacked | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.unacked = unacked


@dataclass(frozen=True)
class Refused(Exception):
    """The broker answered CONNECT with a failure reason code."""

    reason_code: ReasonCode

    def __str__(self) -> str:
        return f"CONNACK {self.reason_code.name} (0x{int(self.reason_code):02x})"


_RECEIVE_SIZE = 64 * 1024
_per_thread = threading.local()


def _receive_buffer() -> memoryview:
    """One receive buffer for every client on this thread's event loop: a read is handed on at
    once (into the TLS pump or the decoder), so no connection keeps a buffer of its own."""
    buffer: memoryview | None = getattr(_per_thread, "buffer", None)
    if buffer is None:
        buffer = _per_thread.buffer = memoryview(bytearray(_RECEIVE_SIZE))
    return buffer


class SimClient(asyncio.BufferedProtocol):
    """One MQTT 5 session over one (TLS) connection.

    The protocol of a plain TCP socket, with TLS in a :class:`~fleetgate.tlspump.TLSPump` and
    packets decoded as the bytes arrive: asyncio's own TLS transport and a stream reader gave
    each connection a 256 KiB buffer of its own and each record three more layers of Python,
    which thousands of simulated devices paid for in CPU and memory."""

    def __init__(
        self,
        pump: TLSPump | None,
        *,
        protocol: int = MQTT5,
        on_message: Callable[[Publish], None] | None = None,
        ack_delay_s: float = 0.0,
    ) -> None:
        self._pump = pump
        self.protocol = protocol
        self._decoder = Decoder(protocol_level=protocol)
        self._ids = itertools.cycle(range(1, 65536))
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self.messages: asyncio.Queue[Publish] = asyncio.Queue()
        self.on_message = on_message  # instead of the queue, when set
        self.ack_delay_s = ack_delay_s  # a slow subscriber sits on each message this long
        loop = asyncio.get_running_loop()
        self.closed: asyncio.Future[str] = loop.create_future()
        self._connack: asyncio.Future[Packet] = loop.create_future()
        self._hello = b""  # CONNECT, sent with the client's last handshake flight
        self._held: list[bytes] | None = None  # acknowledgements of the read being decoded
        self.session_present = False
        self._tcp: asyncio.Transport | None = None
        self._buffer = _receive_buffer()
        self._ping: asyncio.TimerHandle | None = None
        self._last_sent = 0.0

    @classmethod
    async def connect(
        cls,
        host: str,
        port: int,
        *,
        client_id: str,
        context: ssl.SSLContext | None,
        server_hostname: str | None = None,
        keep_alive: int = 60,
        timeout: float = 10.0,
        protocol: int = MQTT5,
        session_expiry_s: int = 0,
        on_message: Callable[[Publish], None] | None = None,
        ack_delay_s: float = 0.0,
    ) -> SimClient:
        """Open the connection and complete CONNECT/CONNACK; raises :class:`Refused`, or the
        :class:`ssl.SSLError` of a handshake the broker refused (its alert).

        ``session_expiry_s`` > 0 asks for a persistent session (clean start off): the broker
        keeps subscriptions and queued QoS 1/2 messages while the client is away."""
        persistent = session_expiry_s > 0
        properties = Properties(
            session_expiry_interval=session_expiry_s if persistent and protocol == MQTT5 else None
        )
        connect = Connect(
            client_id=client_id,
            keep_alive=keep_alive,
            clean_start=not persistent,
            properties=properties,
        )
        pump = None
        if context is not None:
            name = server_hostname or host  # as asyncio's own TLS would check
            pump = TLSPump(context, server_side=False, server_hostname=name)
        client = cls(pump, protocol=protocol, on_message=on_message, ack_delay_s=ack_delay_s)
        client._hello = encode(connect, protocol)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: client, host, port)
                connack = await client._connack
        except BaseException:
            client._drop_link()
            raise
        if not isinstance(connack, ConnAck):
            client._finish(f"expected CONNACK, got {type(connack).__name__}")
            raise SessionClosed(f"expected CONNACK, got {type(connack).__name__}")
        if connack.reason_code != ReasonCode.SUCCESS:
            client._finish("refused")
            code = connack.reason_code
            if isinstance(code, ConnackReturnCodeV3):
                raise Refused(V3_REFUSALS.get(code, ReasonCode.UNSPECIFIED_ERROR))
            raise Refused(ReasonCode(int(code)))
        client.session_present = connack.session_present
        granted = connack.properties.server_keep_alive if protocol == MQTT5 else None
        client._keep_alive(granted if granted is not None else keep_alive)
        return client

    # -- the socket's side (asyncio.BufferedProtocol) ------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._tcp = transport
        if self._pump is None:
            self._write(self._hello)
        else:
            transport.write(self._pump.start())  # ClientHello; CONNECT follows the handshake

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        data = self._buffer[:nbytes]
        pump = self._pump
        if pump is None:
            self._feed(bytes(data))
            return
        shaking = not pump.handshake_done
        try:
            plaintext = pump.receive(data)
        except ssl.SSLError as exc:  # the broker's alert, or a certificate we refuse
            if pump.has_output():
                self._tcp_write(pump.outgoing())  # our alert, if we refused
            self._fail(exc, exc.reason or str(exc))
            return
        if shaking and pump.handshake_done:
            self._write(self._hello)  # with our Certificate, CertificateVerify and Finished
        elif pump.has_output():
            self._tcp_write(pump.outgoing())
        if plaintext:
            self._feed(plaintext)

    def eof_received(self) -> bool | None:
        return None  # close: the broker is done sending

    def connection_lost(self, exc: Exception | None) -> None:
        self._tcp = None
        reason = "connection closed by the broker"
        self._fail(SessionClosed(reason), reason)

    # -- packets ---------------------------------------------------------------------------------

    def _feed(self, data: bytes) -> None:
        """Decode and act on every packet in ``data``. The acknowledgements they call for go
        out together, in one TLS record and one ``send``: a backend subscriber taking the
        whole fleet's telemetry would otherwise cost the broker a record to read per message."""
        decoder = self._decoder
        decoder.feed(data)
        self._held = []
        try:
            while (packet := decoder.next_packet()) is not None:
                if not self._connack.done():
                    self._connack.set_result(packet)
                    continue
                reason = self._dispatch(packet)
                if reason:
                    self._finish(reason)
                    return
        except ProtocolError as exc:
            self._fail(exc, str(exc))
        finally:
            held, self._held = self._held, None
            if held and not self.closed.done():
                self._write(b"".join(held))

    def _dispatch(self, packet: Packet) -> str:
        """Act on one packet after CONNACK; a reason to end the session, or ``""``."""
        if isinstance(packet, PubAck | SubAck | PubRec | PubComp):
            future = self._pending.pop(packet.packet_id, None)
            if future is not None and not future.done():
                future.set_result(packet)
        elif isinstance(packet, Publish):
            self._received(packet)
        elif isinstance(packet, PubRel):
            self._send(PubComp(packet_id=packet.packet_id))
        elif isinstance(packet, Disconnect):
            return f"DISCONNECT {packet.reason_code.name} (0x{int(packet.reason_code):02x})"
        elif not isinstance(packet, PingResp):
            return f"unexpected {type(packet).__name__}"
        return ""

    def _fail(self, exc: Exception, reason: str) -> None:
        """The connection failed: a connect still waiting gets ``exc``, a session ends."""
        if not self._connack.done():
            self._connack.set_exception(exc)
        self._finish(reason)

    def _keep_alive(self, seconds: int) -> None:
        """PINGREQ whenever nothing was sent for half the keep-alive (one timer per client)."""
        if seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        half = seconds / 2

        def tick() -> None:
            if self.closed.done():
                return
            if loop.time() - self._last_sent >= half:
                self._write(PINGREQ)
            self._ping = loop.call_later(half, tick)

        self._ping = loop.call_later(half, tick)

    def _write(self, data: bytes) -> None:
        self._last_sent = asyncio.get_running_loop().time()
        self._tcp_write(data if self._pump is None else self._pump.send(data))

    def _tcp_write(self, data: bytes) -> None:
        if self._tcp is not None and data:
            self._tcp.write(data)

    def _received(self, packet: Publish) -> None:
        if packet.packet_id is not None:
            answer = PubAck if packet.qos == QoS.AT_LEAST_ONCE else PubRec
            response = answer(packet_id=packet.packet_id)
            if self.ack_delay_s:
                asyncio.get_running_loop().call_later(self.ack_delay_s, self._send, response)
            else:
                self._send(response)
        if self.on_message is not None:
            self.on_message(packet)
        else:
            self.messages.put_nowait(packet)

    def _send(self, packet: PubAck | PubRec | PubRel | PubComp) -> None:
        if self.closed.done():
            return
        if self._held is not None:  # while a read is decoded: sent together at its end
            self._held.append(encode(packet, self.protocol))
        else:
            self._write(encode(packet, self.protocol))

    def _finish(self, reason: str) -> None:
        if self._ping is not None:
            self._ping.cancel()
        if not self.closed.done():
            self.closed.set_result(reason)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SessionClosed(reason))
        self._pending.clear()
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            if self._pump is not None and self._pump.handshake_done:
                with contextlib.suppress(ssl.SSLError):
                    tcp.write(self._pump.close())  # close_notify
            tcp.close()  # after what is buffered is written

    def _drop_link(self) -> None:
        """A connect that failed or timed out: reset, nothing more to say."""
        if self._connack.done() and not self._connack.cancelled():
            self._connack.exception()  # retrieved: not "never retrieved" at collection
        tcp, self._tcp = self._tcp, None
        if tcp is not None:
            tcp.abort()
        self._finish("connect failed")

    async def _request(self, packet_id: int, packet: Publish | Subscribe | PubRel) -> Answer:
        if self.closed.done():
            raise SessionClosed(self.closed.result())
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        self._write(encode(packet, self.protocol))
        return await future

    async def subscribe(self, topic_filter: str, qos: QoS = QoS.AT_LEAST_ONCE) -> ReasonCode:
        """Subscribe; returns the granted QoS or the refusal reason code."""
        packet_id = self._free_id()
        subscription = Subscription(topic_filter=topic_filter, qos=qos)
        ack = await self._request(
            packet_id, Subscribe(packet_id=packet_id, subscriptions=(subscription,))
        )
        assert isinstance(ack, SubAck)
        return ReasonCode(int(ack.reason_codes[0]))

    async def publish(self, topic: str, payload: bytes, qos: QoS = QoS.AT_LEAST_ONCE) -> ReasonCode:
        """Publish; for QoS 1 waits for PUBACK, for QoS 2 for PUBREC and PUBCOMP, and returns
        the broker's reason code (PUBREC's when it refused)."""
        if qos == QoS.AT_MOST_ONCE:
            if self.closed.done():
                raise SessionClosed(self.closed.result())
            self._write(encode(Publish(topic=topic, payload=payload), self.protocol))
            return ReasonCode.SUCCESS
        packet_id = self._free_id()
        packet = Publish(topic=topic, payload=payload, qos=qos, packet_id=packet_id)
        return await self._deliver(Unacked(packet))

    async def resend(self, unacked: Unacked) -> ReasonCode:
        """Send again what a dropped connection left unacknowledged, as a real client does.
        With the session still there: the original packet id and DUP set, or PUBREL alone
        when PUBREC had come (MQTT 5.0 section 4.4); without it, as a new message."""
        packet = unacked.packet
        if self.session_present:
            return await self._deliver(Unacked(replace(packet, dup=True), unacked.released))
        fresh = replace(packet, dup=False, packet_id=self._free_id())
        return await self._deliver(Unacked(fresh))

    async def _deliver(self, unacked: Unacked) -> ReasonCode:
        packet = unacked.packet
        packet_id = packet.packet_id
        assert packet_id is not None
        try:
            if not unacked.released:
                ack = await self._request(packet_id, packet)
                assert not isinstance(ack, SubAck)
                code = ReasonCode(int(ack.reason_code))
                if packet.qos != QoS.EXACTLY_ONCE or code >= ReasonCode.UNSPECIFIED_ERROR:
                    return code
                unacked = Unacked(packet, released=True)
            done = await self._request(packet_id, PubRel(packet_id=packet_id))
        except SessionClosed as exc:
            raise SessionClosed(exc.reason, unacked) from exc
        assert not isinstance(done, SubAck)
        return ReasonCode(int(done.reason_code))

    def _free_id(self) -> int:
        """The next packet id not in flight (a resent message keeps its own)."""
        while (packet_id := next(self._ids)) in self._pending:
            pass
        return packet_id

    async def disconnect(self) -> None:
        """DISCONNECT, then close_notify and the socket (once what is buffered is written)."""
        if not self.closed.done():
            self._write(encode(Disconnect(), self.protocol))
        self._finish("disconnected by the client")
