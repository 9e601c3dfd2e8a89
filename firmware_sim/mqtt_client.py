"""A small asyncio MQTT 5 client on fleetgate's sans-I/O codec, for simulated devices.

The device SDK (paho, one thread per client) suits one real device; a simulator running
thousands of devices on two cores needs one event loop and no threads, so it speaks MQTT
through :mod:`broker.mqtt` directly. Only what the simulator needs: connect, subscribe, QoS 0/1
publish with acknowledgement, receive, disconnect.
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
from dataclasses import dataclass

from broker.mqtt import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingResp,
    ProtocolError,
    PubAck,
    Publish,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    encode,
)

MQTT5 = 5


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

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._decoder = Decoder(protocol_level=MQTT5)
        self._ids = itertools.cycle(range(1, 65536))
        self._pending: dict[int, asyncio.Future[PubAck | SubAck]] = {}
        self.messages: asyncio.Queue[Publish] = asyncio.Queue()
        self.closed: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._reader_task: asyncio.Task[None] | None = None

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
    ) -> SimClient:
        """Open the connection and complete CONNECT/CONNACK; raises :class:`Refused`."""
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                host, port, ssl=context, server_hostname=server_hostname if context else None
            ),
            timeout,
        )
        client = cls(reader, writer)
        writer.write(encode(Connect(client_id=client_id, keep_alive=keep_alive), MQTT5))
        connack = await asyncio.wait_for(client._read_packet(), timeout)
        if not isinstance(connack, ConnAck):
            writer.close()
            raise SessionClosed(f"expected CONNACK, got {type(connack).__name__}")
        if connack.reason_code != ReasonCode.SUCCESS:
            writer.close()
            raise Refused(ReasonCode(int(connack.reason_code)))
        client._reader_task = asyncio.create_task(client._read_loop())
        return client

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
                if isinstance(packet, PubAck | SubAck):
                    future = self._pending.pop(packet.packet_id, None)
                    if future is not None and not future.done():
                        future.set_result(packet)
                elif isinstance(packet, Publish):
                    if packet.qos == QoS.AT_LEAST_ONCE and packet.packet_id is not None:
                        self._writer.write(encode(PubAck(packet_id=packet.packet_id), MQTT5))
                    self.messages.put_nowait(packet)
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

    def _finish(self, reason: str) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        for future in self._pending.values():
            if not future.done():
                future.set_exception(SessionClosed(reason))
        self._pending.clear()
        self._writer.close()

    async def _request(self, packet_id: int, packet: Publish | Subscribe) -> PubAck | SubAck:
        if self.closed.done():
            raise SessionClosed(self.closed.result())
        future: asyncio.Future[PubAck | SubAck] = asyncio.get_running_loop().create_future()
        self._pending[packet_id] = future
        self._writer.write(encode(packet, MQTT5))
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
        """Publish; for QoS 1 waits for PUBACK and returns its reason code."""
        if qos == QoS.AT_MOST_ONCE:
            self._writer.write(encode(Publish(topic=topic, payload=payload), MQTT5))
            return ReasonCode.SUCCESS
        packet_id = next(self._ids)
        packet = Publish(topic=topic, payload=payload, qos=qos, packet_id=packet_id)
        ack = await self._request(packet_id, packet)
        return ReasonCode(int(ack.reason_code))  # type: ignore[union-attr]

    async def disconnect(self) -> None:
        if not self.closed.done():
            self._writer.write(encode(Disconnect(), MQTT5))
            await self._writer.drain()
        self._finish("disconnected by the client")
        if self._reader_task is not None:
            self._reader_task.cancel()
