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
from collections.abc import Callable
from dataclasses import dataclass

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


class SessionClosed(ConnectionError):
    """The broker closed the session; ``reason`` says why (a DISCONNECT reason or the socket)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Refused(Exception):
    """The broker answered CONNECT with a failure reason code."""

    reason_code: ReasonCode

    def __str__(self) -> str:
        return f"CONNACK {self.reason_code.name} (0x{int(self.reason_code):02x})"


class SimClient:
    """One MQTT 5 session over one (TLS) connection."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        protocol: int = MQTT5,
        on_message: Callable[[Publish], None] | None = None,
        ack_delay_s: float = 0.0,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self.protocol = protocol
        self._decoder = Decoder(protocol_level=protocol)
        self._ids = itertools.cycle(range(1, 65536))
        self._pending: dict[int, asyncio.Future[Answer]] = {}
        self.messages: asyncio.Queue[Publish] = asyncio.Queue()
        self.on_message = on_message  # instead of the queue, when set
        self.ack_delay_s = ack_delay_s  # a slow subscriber sits on each message this long
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.session_present = False
        self._reader_task: asyncio.Task[None] | None = None
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
        """Open the connection and complete CONNECT/CONNACK; raises :class:`Refused`.

        ``session_expiry_s`` > 0 asks for a persistent session (clean start off): the broker
        keeps subscriptions and queued QoS 1/2 messages while the client is away."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=context, server_hostname=server_hostname if context else None
            ),
            timeout,
        )
        client = cls(
            reader, writer, protocol=protocol, on_message=on_message, ack_delay_s=ack_delay_s
        )
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
        writer.write(encode(connect, protocol))
        try:
            connack = await asyncio.wait_for(client._read_packet(), timeout)
        except BaseException:
            writer.transport.abort()
            raise
        if not isinstance(connack, ConnAck):
            writer.close()
            raise SessionClosed(f"expected CONNACK, got {type(connack).__name__}")
        if connack.reason_code != ReasonCode.SUCCESS:
            writer.close()
            code = connack.reason_code
            if isinstance(code, ConnackReturnCodeV3):
                raise Refused(V3_REFUSALS.get(code, ReasonCode.UNSPECIFIED_ERROR))
            raise Refused(ReasonCode(int(code)))
        client.session_present = connack.session_present
        client._reader_task = asyncio.create_task(client._read_loop())
        granted = connack.properties.server_keep_alive if protocol == MQTT5 else None
        client._keep_alive(granted if granted is not None else keep_alive)
        return client

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
        self._writer.write(data)

    async def _read_packet(self) -> Packet:
        while (packet := self._decoder.next_packet()) is None:
            data = await self._reader.read(65536)
            if not data:
                raise SessionClosed("connection closed by the broker")
            self._decoder.feed(data)
        return packet

    async def _read_loop(self) -> None:
        reason = "connection closed by the broker"
        try:
            while True:
                packet = await self._read_packet()
                if isinstance(packet, PubAck | SubAck | PubRec | PubComp):
                    future = self._pending.pop(packet.packet_id, None)
                    if future is not None and not future.done():
                        future.set_result(packet)
                elif isinstance(packet, Publish):
                    self._received(packet)
                elif isinstance(packet, PubRel):
                    self._send(PubComp(packet_id=packet.packet_id))
                elif isinstance(packet, Disconnect):
                    reason = (
                        f"DISCONNECT {packet.reason_code.name} (0x{int(packet.reason_code):02x})"
                    )
                    break
                elif not isinstance(packet, PingResp):
                    reason = f"unexpected {type(packet).__name__}"
                    break
        except (SessionClosed, ConnectionError, ProtocolError, ssl.SSLError) as exc:
            reason = getattr(exc, "reason", None) or str(exc) or reason
        finally:
            self._finish(reason)

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
        if not self.closed.done():
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
        self._writer.close()

    async def _request(self, packet_id: int, packet: Publish | Subscribe | PubRel) -> Answer:
        if self.closed.done():
            raise SessionClosed(self.closed.result())
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        self._write(encode(packet, self.protocol))
        return await future

    async def subscribe(self, topic_filter: str, qos: QoS = QoS.AT_LEAST_ONCE) -> ReasonCode:
        """Subscribe; returns the granted QoS or the refusal reason code."""
        packet_id = next(self._ids)
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
        packet_id = next(self._ids)
        packet = Publish(topic=topic, payload=payload, qos=qos, packet_id=packet_id)
        ack = await self._request(packet_id, packet)
        assert not isinstance(ack, SubAck)
        code = ReasonCode(int(ack.reason_code))
        if qos == QoS.EXACTLY_ONCE and code < ReasonCode.UNSPECIFIED_ERROR:
            done = await self._request(packet_id, PubRel(packet_id=packet_id))
            assert not isinstance(done, SubAck)
            code = ReasonCode(int(done.reason_code))
        return code

    async def disconnect(self) -> None:
        if not self.closed.done():
            self._writer.write(encode(Disconnect(), self.protocol))
            with contextlib.suppress(ConnectionError, OSError):
                await self._writer.drain()
        self._finish("disconnected by the client")
        if self._reader_task is not None:
            self._reader_task.cancel()
