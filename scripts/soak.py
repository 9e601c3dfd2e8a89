"""Soak and abuse benchmark: many well-behaved mTLS devices held for minutes while one device
attacks the broker with every defect issue 11 listed, in turn, over and over.

``make soak`` runs this (not in CI; ``make soak ARGS="--conns 2000 --minutes 2"`` for a short
run). It provisions a throw-away fleet with ``bench_broker.provision`` (CA, station, devices
enrolled in-process), starts ``fleetgate serve broker`` pinned to core 0, and from one asyncio
process pinned to core 1:

1. opens ``--conns`` mTLS connections (MQTT 5, TLS 1.3, P-256, keep-alive 60 s) and one backend
   subscriber on ``devices/+/telemetry``; TLS is :class:`fleetgate.tlspump.TLSPump` (the
   broker's own sans-IO layer) over plain TCP transports, not asyncio's TLS transport, to keep
   10,000 connections light on one core;
2. holds them ``--minutes``: each device publishes one QoS 1 message per ``--period`` (60 s)
   with a timestamp, and sends a PINGREQ half a period later; the backend's receive time gives
   the publish->deliver latency (one clock: ``time.monotonic``);
3. after a warm-up and a quiet window (the quiet latency and the baseline RSS, descriptors and
   registry size), starts the attacker: a child process of this script, ``SCHED_IDLE`` on core 1
   so the generator's own timing comes first, running each attack of :data:`ATTACKS` in turn
   (one device id, ``soak-attacker``; the slow-subscriber attack needs a second identity,
   ``soak-commander``, to publish the commands the attacker never reads) until the attack time
   is over; each attack reports the reason codes it got and whether the limit held (the last,
   a handshake flood without any certificate, is not in the issue's list: it checks that
   refused handshakes are audited through the refusal throttle);
4. after a quiet tail, takes the final figures.

Measured: well-behaved devices dropped (connection closed) or messages lost (never
delivered); the broker's RSS and descriptors after warm-up against the end (and the peak);
the registry's growth during the attacks (``PRAGMA page_count`` counts pages still in the
WAL) and the audit rows written meanwhile (``audit_mib`` is the larger of the two); the
p99 publish->deliver latency during the attacks against the quiet window's, also per attack.
The last line is::

    soak_conns=<held> minutes=<m> drops=<n> rss_growth_pct=<x> audit_mib=<x> \
attack_p99_ratio=<x>
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import math
import os
import resource
import shutil
import signal
import sqlite3
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench_broker import (
    BACKEND,
    BROKER_CORE,
    GENERATOR_CORE,
    HOST,
    SERVER_NAME,
    TELEMETRY_FILTER,
    BrokerProcess,
    Fleet,
    Meter,
    Usage,
    device_context,
    open_fds,
    provision,
    raise_nofile,
    rss_kib,
    start_fleetgate,
    stop_broker,
)
from benchlib import chosen_names, close_all, percentile, run_options

from broker.mqtt import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    PingReq,
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
    write_varint,
)
from fleetgate.tlspump import TLSPump

MQTT5 = 5
ATTACKER = "soak-attacker"
COMMANDER = "soak-commander"  # publishes what the slow subscriber never reads
COMMANDER_GROUP = "soak-commander"
STAMP = struct.Struct("<dI")  # time.monotonic() at send, device index
PAYLOAD = 64
DISCONNECT = encode(Disconnect(), MQTT5)
PINGREQ = encode(PingReq(), MQTT5)
SAMPLE_S = 5.0  # broker RSS and descriptors, every this often
ATTACKS = (
    "deep_filters",
    "many_subscriptions",
    "retained_spam",
    "audit_amplification",
    "publish_flood",
    "protocol_violations",
    "slow_subscriber",
    "reconnect_storm",
    "handshake_flood",
)
TARGETS = "drops 0, RSS growth <= 5 %, descriptor growth 0, audit <= 1 MiB, p99 ratio <= 2"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=10_000, help="well-behaved connections")
    parser.add_argument("--minutes", type=float, default=10.0, help="how long they are held")
    parser.add_argument("--period", type=float, default=60.0, help="s between one device's msgs")
    parser.add_argument(
        "--attack-scale",
        type=float,
        default=1.0,
        help="multiply each attack's volume and length (1 = the issue's figures)",
    )
    parser.add_argument("--concurrency", type=int, default=64, help="connects in flight")
    parser.add_argument(
        "--attacks",
        default=",".join(ATTACKS),
        help=f"comma-separated attacks to run in turn, of {','.join(ATTACKS)}",
    )
    run_options(parser)
    parser.add_argument(
        "--samples",
        type=Path,
        help="write each message's send time and latency, and each attack's window, to this "
        "CSV (time.monotonic() seconds: compare with the broker's own timestamps)",
    )
    parser.add_argument("--attacker-child", help=argparse.SUPPRESS)  # JSON: the child's brief
    args = parser.parse_args(argv)
    args.attacks = chosen_names(parser, "--attacks", args.attacks, ATTACKS)
    if args.attacker_child is None and (
        args.conns < 1 or args.minutes <= 0 or args.period <= 0 or args.attack_scale <= 0
    ):
        parser.error("--conns, --minutes, --period and --attack-scale must be positive")
    return args


# -- one client link: TLS by TLSPump over a plain TCP transport ----------------------------------


class Refused(ConnectionError):
    """CONNACK with a failure reason code."""

    def __init__(self, code: int) -> None:
        super().__init__(f"CONNACK 0x{code:02x}")
        self.code = code


class Link(asyncio.Protocol):
    """One MQTT 5 client: CONNECT goes out as soon as the handshake is done; packets after the
    CONNACK go to ``on_packet``; ``gone`` resolves (with the reason) when it ends."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        client_id: str,
        context: ssl.SSLContext,
        keep_alive: int,
    ) -> None:
        self.client_id = client_id
        self.context = context
        self.keep_alive = keep_alive
        self.tcp: asyncio.Transport | None = None
        self.pump: TLSPump | None = None
        self.decoder = Decoder(protocol_level=MQTT5)
        self.connack: asyncio.Future[ConnAck] = loop.create_future()
        self.gone: asyncio.Future[str] = loop.create_future()
        self.on_packet: Callable[[Packet], None] | None = None
        self.disconnect_code: int | None = None
        self.next_id = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.tcp = transport
        self.pump = TLSPump(self.context, server_side=False, server_hostname=SERVER_NAME)
        transport.write(self.pump.start())

    def data_received(self, data: bytes) -> None:
        pump, transport = self.pump, self.tcp
        assert pump is not None and transport is not None
        connecting = not pump.handshake_done
        try:
            plain = pump.receive(data)
        except ssl.SSLError as exc:
            self.ended(f"TLS {exc.reason or exc}")
            transport.abort()
            return
        if pump.has_output():
            transport.write(pump.outgoing())
        if connecting and pump.handshake_done:
            connect = Connect(client_id=self.client_id, keep_alive=self.keep_alive)
            self.send(encode(connect, MQTT5))
        if not plain:
            return
        self.decoder.feed(plain)
        try:
            while (packet := self.decoder.next_packet()) is not None:
                self.packet(packet)
        except ProtocolError as exc:
            self.ended(f"protocol error: {exc}")
            transport.abort()

    def packet(self, packet: Packet) -> None:
        if isinstance(packet, ConnAck) and not self.connack.done():
            self.connack.set_result(packet)
        elif isinstance(packet, Disconnect):
            self.disconnect_code = int(packet.reason_code)
            self.ended(f"DISCONNECT 0x{int(packet.reason_code):02x}")
        elif self.on_packet is not None:
            self.on_packet(packet)

    def connection_lost(self, exc: Exception | None) -> None:
        self.ended("closed" + (f" ({exc})" if exc else ""))

    def ended(self, reason: str) -> None:
        if not self.connack.done():
            self.connack.set_exception(ConnectionError(reason))
            self.connack.exception()  # retrieved: nobody may be waiting
        if not self.gone.done():
            self.gone.set_result(reason)

    def send(self, data: bytes) -> None:
        if self.tcp is not None and not self.tcp.is_closing():
            assert self.pump is not None
            self.tcp.write(self.pump.send(data))

    def packet_id(self) -> int:
        self.next_id = self.next_id % 65535 + 1
        return self.next_id

    def disconnect(self) -> None:
        self.send(DISCONNECT)
        if self.tcp is not None:
            self.tcp.close()

    def abort(self) -> None:
        if self.tcp is not None:
            self.tcp.abort()


async def open_link(
    port: int, client_id: str, context: ssl.SSLContext, *, keep_alive: int = 60, timeout: float = 10
) -> Link:
    """TLS handshake, CONNECT, CONNACK; raises :class:`Refused` or an OSError (link closed)."""
    loop = asyncio.get_running_loop()
    _, link = await asyncio.wait_for(
        loop.create_connection(lambda: Link(loop, client_id, context, keep_alive), HOST, port),
        timeout,
    )
    try:
        ack = await asyncio.wait_for(asyncio.shield(link.connack), timeout)
    except BaseException:
        link.abort()
        raise
    if ack.reason_code != ReasonCode.SUCCESS:
        link.abort()
        raise Refused(int(ack.reason_code))
    return link


LINK_ERRORS = (OSError, TimeoutError)  # ssl.SSLError, ConnectionError and Refused included


# -- the well-behaved fleet ----------------------------------------------------------------------


@dataclass
class Hold:
    """The well-behaved devices and the backend: what was sent, delivered, dropped."""

    ids: list[str]
    period: float
    links: list[Link] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    delivered: list[int] = field(default_factory=list)
    acked: int = 0
    refused_acks: int = 0
    pings: int = 0
    pongs: int = 0
    samples: list[tuple[float, float]] = field(default_factory=list)  # (sent at, latency s)
    drops: list[str] = field(default_factory=list)
    holding: bool = False
    backend: Link | None = None

    def __post_init__(self) -> None:
        self.sent = [0] * len(self.ids)
        self.delivered = [0] * len(self.ids)

    def add(self, index: int, link: Link) -> None:
        self.links.append(link)
        link.on_packet = self.device_packet
        link.gone.add_done_callback(lambda gone: self.lost(index, gone.result()))

    def lost(self, index: int, reason: str) -> None:
        if self.holding:
            self.drops.append(f"{self.ids[index]}: {reason}")

    def device_packet(self, packet: Packet) -> None:
        if isinstance(packet, PubAck):
            self.acked += 1
            self.refused_acks += packet.reason_code >= 0x80
        elif isinstance(packet, PingResp):
            self.pongs += 1

    def backend_packet(self, packet: Packet) -> None:
        if isinstance(packet, Publish):
            now = time.monotonic()
            stamp, index = STAMP.unpack_from(packet.payload)
            self.delivered[index] += 1
            self.samples.append((stamp, now - stamp))
            if packet.packet_id is not None and self.backend is not None:
                self.backend.send(encode(PubAck(packet_id=packet.packet_id), MQTT5, validate=False))

    def publish(self, index: int) -> None:
        link = self.links[index]
        payload = STAMP.pack(time.monotonic(), index) + b"x" * (PAYLOAD - STAMP.size)
        packet = Publish(
            topic=f"devices/{link.client_id}/telemetry",
            payload=payload,
            qos=QoS.AT_LEAST_ONCE,
            packet_id=link.packet_id(),
        )
        link.send(encode(packet, MQTT5, validate=False))
        self.sent[index] += 1

    def ping(self, index: int) -> None:
        self.links[index].send(PINGREQ)
        self.pings += 1

    async def drive(self, start: float, stop: float) -> None:
        """Each device publishes once a period at its own phase, and pings half a period
        later: one loop over a sorted schedule, not a timer per device."""
        n = len(self.links)
        step = self.period / n
        half = n // 2
        slot = 0
        while True:
            now = time.monotonic()
            while (due := start + slot * step) <= now and due < stop:
                index = slot % n
                self.publish(index)
                self.ping((index + half) % n)
                slot += 1
            if due >= stop:
                return
            await asyncio.sleep(min(0.02, max(0.0, due - now)))

    def undelivered(self) -> int:
        return sum(s - d for s, d in zip(self.sent, self.delivered, strict=True) if s > d)


async def open_fleet(
    port: int, fleet: Fleet, hold: Hold, concurrency: int
) -> tuple[list[str], float]:
    """All devices connected (each retried twice); returns failures and the wall time."""
    failures: list[str] = []
    pending = iter(enumerate(hold.ids))
    slots: list[Link | None] = [None] * len(hold.ids)

    async def worker() -> None:
        for index, client_id in pending:
            for attempt in range(3):
                try:
                    slots[index] = await open_link(port, client_id, fleet.contexts[client_id])
                    break
                except LINK_ERRORS as exc:
                    if attempt == 2:
                        failures.append(f"{client_id}: {type(exc).__name__} {exc}")
                    await asyncio.sleep(0.5)

    started = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    wall = time.monotonic() - started
    kept = [(i, link) for i, link in enumerate(slots) if link is not None]
    hold.ids = [hold.ids[i] for i, _ in kept]
    hold.sent, hold.delivered = [0] * len(kept), [0] * len(kept)
    for index, (_, link) in enumerate(kept):
        hold.add(index, link)
    return failures, wall


# -- the attacker (a child process) --------------------------------------------------------------


@dataclass
class Brief:
    """What the attacker child is told on its command line (JSON)."""

    port: int
    metrics_port: int
    root: str
    attacker_pem: str
    commander_pem: str
    stop: float  # time.monotonic(): start no attack after it (one full round at least)
    scale: float
    attacks: list[str]


class Attacker:
    """Runs :data:`ATTACKS` in turn; every attack prints one JSON line: its window, what the
    broker answered, whether the limit held."""

    def __init__(self, brief: Brief) -> None:
        self.brief = brief
        self.context = device_context(Path(brief.root), Path(brief.attacker_pem))
        self.commander_context = device_context(Path(brief.root), Path(brief.commander_pem))
        self.rate_waits = 0

    def n(self, count: int) -> int:
        return max(1, round(count * self.brief.scale))

    def seconds(self, full: float) -> float:
        return max(1.0, full * self.brief.scale)

    async def connect(self, *, commander: bool = False) -> Link:
        """The attacker's own connection; a connect-rate refusal (0x9F) is waited out: the
        attacks themselves spend the budget."""
        client_id, context = (
            (COMMANDER, self.commander_context) if commander else (ATTACKER, self.context)
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                return await open_link(self.brief.port, client_id, context)
            except Refused as exc:
                if exc.code != ReasonCode.CONNECTION_RATE_EXCEEDED or time.monotonic() > deadline:
                    raise
                self.rate_waits += 1
                await asyncio.sleep(1.1)

    async def run(self) -> None:
        rounds = 0
        while rounds == 0 or time.monotonic() < self.brief.stop:
            for name in self.brief.attacks:
                if rounds and time.monotonic() >= self.brief.stop:
                    break
                attack: Callable[[], Awaitable[dict[str, Any]]] = getattr(self, name)
                started = time.monotonic()
                try:
                    result = await asyncio.wait_for(attack(), 300)
                except (*LINK_ERRORS, RuntimeError) as exc:
                    result = {"held": False, "error": f"{type(exc).__name__}: {exc}"}
                cooldown = result.pop("cooldown", 0.0)
                result.update(attack=name, start=started, end=time.monotonic(), round=rounds)
                print(json.dumps(result), flush=True)
                await asyncio.sleep(cooldown)
            rounds += 1

    # -- the attacks ------------------------------------------------------------------------

    async def subscribe_all(
        self, link: Link, batches: list[list[str]], qos: QoS = QoS.AT_MOST_ONCE
    ) -> Counter[str]:
        """One SUBSCRIBE per batch, all sent at once; the SUBACK reason codes, counted."""
        codes: Counter[str] = Counter()
        waiting: dict[int, asyncio.Future[SubAck]] = {}
        loop = asyncio.get_running_loop()

        def on_packet(packet: Packet) -> None:
            if isinstance(packet, SubAck) and packet.packet_id in waiting:
                waiting.pop(packet.packet_id).set_result(packet)

        link.on_packet = on_packet
        futures = []
        for batch in batches:
            packet_id = link.packet_id()
            waiting[packet_id] = future = loop.create_future()
            futures.append(future)
            subs = tuple(Subscription(topic_filter=f, qos=qos) for f in batch)
            link.send(encode(Subscribe(packet_id=packet_id, subscriptions=subs), MQTT5))
        for future in futures:
            ack = await asyncio.wait_for(future, 60)
            codes.update(f"0x{int(code):02x}" for code in ack.reason_codes)
        return codes

    async def deep_filters(self) -> dict[str, Any]:
        """40 SUBSCRIBEs, each with three 65,535-byte ``+/+/+…`` filters in its own subtree."""
        link = await self.connect()
        batches = []
        for n in range(self.n(40)):
            batch = []
            for k in range(3):
                head = f"devices/{ATTACKER}/commands/{n}/{k}/"
                batch.append(head + "+/" * ((65535 - len(head)) // 2 - 1) + "+")
            batches.append(batch)
        return await self.all_refused(link, batches)

    async def all_refused(self, link: Link, batches: list[list[str]]) -> dict[str, Any]:
        """SUBSCRIBE every batch; the limit held if every filter got 0x97 (quota exceeded)."""
        codes = await self.subscribe_all(link, batches)
        link.disconnect()
        return {
            "sent": f"{len(batches)} SUBSCRIBEs",
            "codes": codes,
            "held": set(codes) == {"0x97"},
        }

    async def many_subscriptions(self) -> dict[str, Any]:
        """300 filters of its own (cap 100): the first 100 granted, the rest 0x97."""
        link = await self.connect()
        filters = [f"devices/{ATTACKER}/commands/s/{n}" for n in range(max(120, self.n(300)))]
        batches = [filters[i : i + 10] for i in range(0, len(filters), 10)]
        codes = await self.subscribe_all(link, batches)
        link.disconnect()
        return {"sent": f"{len(filters)} filters", "codes": codes, "held": codes["0x00"] <= 100}

    async def window(
        self, link: Link, packets: list[bytes], timeout: float, window: int = 32
    ) -> Counter[str]:
        """QoS 1 PUBLISHes (packet ids 1.. in order) with ``window`` in flight; PUBACK codes."""
        codes: Counter[str] = Counter()
        room = asyncio.Event()
        acked = 0

        def on_packet(packet: Packet) -> None:
            nonlocal acked
            if isinstance(packet, PubAck):
                acked += 1
                codes[f"0x{int(packet.reason_code):02x}"] += 1
                room.set()

        link.on_packet = on_packet
        deadline = time.monotonic() + timeout
        for sent, data in enumerate(packets):
            while sent - acked >= window:
                room.clear()
                await asyncio.wait_for(room.wait(), max(0.1, deadline - time.monotonic()))
            link.send(data)
        while acked < len(packets) and time.monotonic() < deadline:
            room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(room.wait(), 1.0)
        return codes

    @staticmethod
    def retained(link: Link, topics: range, payload: bytes) -> list[bytes]:
        """QoS 1 retained PUBLISHes on ``devices/<attacker>/state/<n>`` for n in ``topics``."""
        return [
            encode(
                Publish(
                    topic=f"devices/{ATTACKER}/state/{n}",
                    payload=payload,
                    qos=QoS.AT_LEAST_ONCE,
                    retain=True,
                    packet_id=link.packet_id(),
                ),
                MQTT5,
            )
            for n in topics
        ]

    async def retained_spam(self) -> dict[str, Any]:
        """1,500 retained messages of 200 KB: ~5 fit the 1 MiB a device may retain."""
        link = await self.connect()
        count = self.n(1500)
        payload = os.urandom(200_000)
        codes: Counter[str] = Counter()
        for start in range(0, count, 100):  # encoded 100 at a time: 20 MB, not 300 MB at once
            chunk = self.retained(link, range(start, min(start + 100, count)), payload)
            codes += await self.window(link, chunk, 120)
        link.disconnect()
        accepted = codes["0x00"]
        return {
            "sent": count,
            "codes": codes,
            "held": accepted <= 6 and sum(codes.values()) == count,
        }

    async def audit_amplification(self) -> dict[str, Any]:
        """300 SUBSCRIBEs, each with one refused 65 KB filter: one audit row, not 300."""
        link = await self.connect()
        head = f"devices/{ATTACKER}/commands/"
        batches = [[head + f"{n:05d}" + "x" * (65_000 - len(head))] for n in range(self.n(300))]
        return await self.all_refused(link, batches)

    async def publish_flood(self) -> dict[str, Any]:
        """QoS 1 as fast as the broker acknowledges, 64 in flight (its receive maximum): the
        publish rate (1,000/s, burst 1,000) must hold the acknowledged rate."""
        link = await self.connect()
        seconds = self.seconds(20)
        codes: Counter[str] = Counter()
        room = asyncio.Event()
        sent = acked = 0

        def on_packet(packet: Packet) -> None:
            nonlocal acked
            if isinstance(packet, PubAck):
                acked += 1
                codes[f"0x{int(packet.reason_code):02x}"] += 1
                room.set()

        link.on_packet = on_packet
        body = b"f" * 64
        topic = f"devices/{ATTACKER}/flood"
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds and not link.gone.done():
            if sent - acked >= 64:
                room.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(room.wait(), 0.5)
                continue
            burst = [
                encode(
                    Publish(
                        topic=topic, payload=body, qos=QoS.AT_LEAST_ONCE, packet_id=link.packet_id()
                    ),
                    MQTT5,
                    validate=False,
                )
                for _ in range(64 - (sent - acked))
            ]
            link.send(b"".join(burst))
            sent += len(burst)
        link.disconnect()
        ceiling = 1000 * elapsed + 1000 + 64
        return {
            "seconds": round(elapsed, 1),
            "acked": acked,
            "acked_per_s": round(acked / elapsed),
            "codes": codes,
            "held": acked <= ceiling,
        }

    async def violation(self, data: bytes, expect: int) -> str:
        """Connect, send ``data``; the DISCONNECT code the broker answered with."""
        link = await self.connect()
        link.send(data)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(link.gone), 10)
        link.abort()
        got = link.disconnect_code
        return "ok" if got == expect else f"0x{got:02x}" if got is not None else "no DISCONNECT"

    async def protocol_violations(self) -> dict[str, Any]:
        """Wildcard in a PUBLISH topic (0x90), NUL and invalid UTF-8 (0x81), a shared
        subscription to another device's commands (SUBACK 0x87: the ACL judges the inner
        filter), an oversized PUBLISH (0x95); each needs a new connection."""
        outcomes: dict[str, Counter[str]] = {}
        base = f"devices/{ATTACKER}/".encode()
        cases = (
            ("wildcard_0x90", raw_publish(base + b"+", b"w"), 0x90),
            ("nul_0x81", raw_publish(base + b"a\x00b", b"n"), 0x81),
            ("bad_utf8_0x81", raw_publish(base + b"\xff\xfe", b"u"), 0x81),
            ("oversized_0x95", raw_publish(base + b"big", b"o" * 300_000), 0x95),
        )
        for _ in range(self.n(3)):
            link = await self.connect()
            foreign = f"$share/g/devices/not-{ATTACKER}/commands/#"
            codes = await self.subscribe_all(link, [[foreign]])
            link.disconnect()
            outcomes.setdefault("share_foreign_0x87", Counter())[
                "ok" if set(codes) == {"0x87"} else str(codes)
            ] += 1
            for name, data, code in cases:
                outcomes.setdefault(name, Counter())[await self.violation(data, code)] += 1
        held = all(set(c) == {"ok"} for c in outcomes.values())
        return {"outcomes": outcomes, "held": held}

    async def slow_subscriber(self) -> dict[str, Any]:
        """The attacker subscribes to its commands (QoS 1) and never reads; the commander sends
        it 64 KB commands for a while. The session's queue must stay within its caps."""
        link = await self.connect()
        await self.subscribe_all(link, [[f"devices/{ATTACKER}/commands/#"]], QoS.AT_LEAST_ONCE)
        assert link.tcp is not None
        link.tcp.pause_reading()
        commander = await self.connect(commander=True)
        seconds = self.seconds(20)
        payload = os.urandom(64 * 1024)
        topic = f"devices/{ATTACKER}/commands/slow"
        codes: Counter[str] = Counter()
        started = time.monotonic()
        sent = 0
        while time.monotonic() - started < seconds and not commander.gone.done():
            batch = [
                encode(
                    Publish(
                        topic=topic,
                        payload=payload,
                        qos=QoS.AT_LEAST_ONCE,
                        packet_id=commander.packet_id(),
                    ),
                    MQTT5,
                    validate=False,
                )
                for _ in range(20)
            ]
            codes += await self.window(commander, batch, 30)
            sent += len(batch)
            await asyncio.sleep(0.05)  # ~400 commands/s, ~25 MB/s offered
        drops = await asyncio.to_thread(queue_drops, self.brief.metrics_port, ATTACKER)
        commander_ok = not commander.gone.done()
        commander.disconnect()
        link.abort()
        return {
            "commands": sent,
            "offered_mb": round(sent * len(payload) / 1e6),
            "codes": codes,
            "queue_dropped": drops,
            "held": commander_ok and drops > 0,
        }

    async def reconnect_storm(self) -> dict[str, Any]:
        """One device id reconnecting in a tight loop (each a full mTLS handshake): beyond the
        connect burst (20) and rate (1/s) every CONNECT is refused 0x9F before the registry."""
        seconds = self.seconds(20)
        codes: Counter[str] = Counter()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            try:
                link = await open_link(self.brief.port, ATTACKER, self.context)
            except Refused as exc:
                codes[f"0x{exc.code:02x}"] += 1
                continue
            except LINK_ERRORS as exc:
                codes[type(exc).__name__] += 1
                continue
            codes["0x00"] += 1
            link.disconnect()
        accepted = codes["0x00"]
        return {
            "cooldown": min(20.0, self.seconds(20)),  # the connect burst refills for the next
            "seconds": round(elapsed, 1),
            "connects_per_s": round(sum(codes.values()) / elapsed),
            "codes": codes,
            "held": accepted <= 20 + elapsed + 1,
        }

    async def handshake_flood(self) -> dict[str, Any]:
        """Handshakes without a client certificate in a loop, one at a time (no certificate
        needed at all): counted, but audited once per address and kind a minute."""
        context = ssl.create_default_context(cafile=self.brief.root)
        context.minimum_version = ssl.TLSVersion.TLSv1_3
        seconds = self.seconds(20)
        outcomes: Counter[str] = Counter()
        started = time.monotonic()
        while (elapsed := time.monotonic() - started) < seconds:
            try:
                link = await open_link(self.brief.port, ATTACKER, context, timeout=5)
            except LINK_ERRORS as exc:
                outcomes[type(exc).__name__] += 1
                continue
            outcomes["admitted"] += 1
            link.abort()
        return {
            "seconds": round(elapsed, 1),
            "handshakes_per_s": round(sum(outcomes.values()) / elapsed),
            "outcomes": outcomes,
            "held": not outcomes["admitted"],
        }


def raw_publish(topic: bytes, payload: bytes) -> bytes:
    """A QoS 0 PUBLISH (MQTT 5, no properties) with any topic bytes: the codec refuses to
    encode the invalid ones this is for."""
    body = len(topic).to_bytes(2, "big") + topic + b"\x00" + payload
    return b"\x30" + write_varint(len(body)) + body


def queue_drops(metrics_port: int, client_id: str) -> int:
    """``session_queue_dropped_total`` of one session from the broker's /metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    for line in text.splitlines():
        if "session_queue_dropped_total{" in line and f'"{client_id}"' in line:
            return int(float(line.split()[-1]))
    return 0


def attacker_main(brief_json: str) -> int:
    brief = Brief(**json.loads(brief_json))
    # The generator's timing first: on the shared core the attacker runs only when the
    # generator is idle (SCHED_IDLE; nice 19 still took slices from it).
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        with contextlib.suppress(OSError):
            os.nice(19)
    asyncio.run(Attacker(brief).run())
    return 0


# -- the run -------------------------------------------------------------------------------------


@dataclass
class Figures:
    conns: int = 0
    minutes: float = 0.0
    drops: int = 0
    lost: int = 0
    rss_base_kib: int = 0
    rss_end_kib: int = 0
    rss_peak_kib: int = 0
    fds_base: int = 0
    fds_end: int = 0
    audit_rows: int = 0
    audit_row_bytes: int = 0
    db_growth_bytes: int = 0
    quiet_p99_ms: float = math.nan
    attack_p99_ms: float = math.nan

    @property
    def rss_growth_pct(self) -> float:
        return 100.0 * (self.rss_end_kib - self.rss_base_kib) / self.rss_base_kib

    @property
    def peak_growth_pct(self) -> float:
        return 100.0 * (self.rss_peak_kib - self.rss_base_kib) / self.rss_base_kib

    @property
    def audit_mib(self) -> float:
        return max(self.db_growth_bytes, self.audit_row_bytes) / 2**20

    @property
    def p99_ratio(self) -> float:
        return self.attack_p99_ms / self.quiet_p99_ms if self.quiet_p99_ms else math.nan

    def last_line(self) -> str:
        return (
            f"soak_conns={self.conns} minutes={self.minutes:.1f} drops={self.drops}"
            f" rss_growth_pct={self.rss_growth_pct:.1f} audit_mib={self.audit_mib:.3f}"
            f" attack_p99_ratio={self.p99_ratio:.2f}"
        )

    def missed(self) -> list[str]:
        checks = [
            (self.drops == 0 and self.lost == 0, f"drops {self.drops}, lost {self.lost}"),
            (self.rss_growth_pct <= 5.0, f"RSS growth {self.rss_growth_pct:.1f} %"),
            (self.fds_end <= self.fds_base, f"descriptors {self.fds_base} -> {self.fds_end}"),
            (self.audit_mib <= 1.0, f"audit {self.audit_mib:.3f} MiB"),
            (self.p99_ratio <= 2.0, f"p99 ratio {self.p99_ratio:.2f}"),
        ]
        return [what for ok, what in checks if not ok]


def registry_path(fleet: Fleet) -> Path:
    return Path(fleet.config.database_url.removeprefix("sqlite:///"))


def registry_size(path: Path) -> tuple[int, int]:
    """(bytes the database takes, WAL included, by ``page_count``; the last audit row's id)."""
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        pages = db.execute("PRAGMA page_count").fetchone()[0]
        size = db.execute("PRAGMA page_size").fetchone()[0]
        last = db.execute("SELECT coalesce(max(id), 0) FROM auditevent").fetchone()[0]
    return pages * size, last


def audit_since(path: Path, after: int) -> list[tuple[str, str, int, int]]:
    """(actor, action, rows, bytes of their text) of the audit rows after id ``after``."""
    query = (
        "SELECT actor, action, count(*), sum(length(actor) + length(action) + "
        "coalesce(length(subject), 0) + length(outcome) + length(reason) + "
        "coalesce(length(request_id), 0) + length(prev_hash) + length(row_hash) + 26) "
        "FROM auditevent WHERE id > ? GROUP BY actor, action ORDER BY 4 DESC"
    )
    with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as db:
        return [tuple(row) for row in db.execute(query, (after,))]


@dataclass
class Phases:
    warm: float
    quiet: float
    tail: float
    hold: float


def phases(args: argparse.Namespace) -> Phases:
    """Warm-up (every device has published and pinged), a quiet window, the attacks, a tail."""
    hold = args.minutes * 60
    warm = min(1.5 * args.period, 0.25 * hold)
    quiet = min(max(args.period, 0.15 * hold), 0.25 * hold)
    return Phases(warm, quiet, 0.1 * hold, hold)


async def sample(pid: int, series: list[tuple[float, int, int]]) -> None:
    while True:
        with contextlib.suppress(OSError):
            series.append((time.monotonic(), rss_kib(pid), open_fds(pid)))
        await asyncio.sleep(SAMPLE_S)


def chosen(samples: list[tuple[float, float]], windows: list[tuple[float, float]]) -> list[float]:
    """The latencies of the messages sent within one of ``windows``."""
    return [lat for at, lat in samples if any(a <= at < b for a, b in windows)]


def p99_ms(
    samples: list[tuple[float, float]], windows: list[tuple[float, float]]
) -> tuple[float, int]:
    latencies = chosen(samples, windows)
    return percentile(latencies, 0.99) * 1e3, len(latencies)


async def soak(
    args: argparse.Namespace, fleet: Fleet, broker: BrokerProcess, tmp: Path, pin: bool
) -> tuple[Figures, list[dict[str, Any]], list[str]]:
    figures = Figures()
    notes: list[str] = []
    pid = broker.pid
    db = registry_path(fleet)
    await wait_serving(broker, fleet)
    hold = Hold(list(fleet.devices), args.period)
    backend = await open_link(broker.port, BACKEND, fleet.contexts[BACKEND])
    hold.backend = backend
    backend.on_packet = hold.backend_packet
    backend.send(
        encode(
            Subscribe(
                packet_id=backend.packet_id(),
                subscriptions=(Subscription(topic_filter=TELEMETRY_FILTER, qos=QoS.AT_LEAST_ONCE),),
            ),
            MQTT5,
        )
    )
    meter = Meter(pid)
    failures, ramp_s = await open_fleet(broker.port, fleet, hold, args.concurrency)
    ramp = meter.stop()
    figures.conns = len(hold.links)
    gc.collect()
    gc.freeze()  # 10,000 links' objects: a full collection would stall the generator's timing
    per_connect = ramp.generator_cpu / max(1, figures.conns)
    print(
        f"ramp: {figures.conns} of {len(fleet.devices)} connected in {ramp_s:.1f} s "
        f"({figures.conns / ramp_s:.0f}/s); generator {per_connect * 1e3:.2f} ms CPU per connect "
        f"(its ceiling {1 / max(per_connect, 1e-9):.0f}/s), broker "
        f"{ramp.broker_cpu / max(1, figures.conns) * 1e3:.2f} ms; {cpu_note(ramp)}",
        flush=True,
    )
    for failure in failures[:5]:
        notes.append(f"connect failed: {failure}")
    plan = phases(args)
    start = time.monotonic()
    end = start + plan.hold
    hold.holding = True
    series: list[tuple[float, int, int]] = []
    driver = asyncio.create_task(hold.drive(start, end + 3600))
    sampler = asyncio.create_task(sample(pid, series))
    results: list[dict[str, Any]] = []
    try:
        await asyncio.sleep(plan.warm)
        figures.rss_base_kib, figures.fds_base = rss_kib(pid), open_fds(pid)
        db_base, audit_base = registry_size(db)
        quiet_start = time.monotonic()
        print(
            f"warm-up done: broker RSS {figures.rss_base_kib / 1024:.0f} MiB, "
            f"{figures.fds_base} descriptors; quiet window {plan.quiet:.0f} s",
            flush=True,
        )
        quiet_meter = Meter(pid)
        await asyncio.sleep(plan.quiet)
        quiet_window = (quiet_start, time.monotonic())
        print(f"quiet window: {cpu_note(quiet_meter.stop())}", flush=True)
        hold_meter = Meter(pid)
        msgs_before = sum(hold.sent) + hold.pings + sum(hold.delivered)
        child = await start_attacker(args, fleet, broker, tmp, pin, stop=end - plan.tail)
        assert child.stdout is not None
        async for line in child.stdout:
            result = json.loads(line)
            results.append(result)
            print(
                f"  attack {result['attack']} (round {result['round']}): {summary(result, start)}",
                flush=True,
            )
        await child.wait()
        attack_end = time.monotonic()
        after_meter = Meter(pid)
        await asyncio.sleep(max(plan.tail, end - attack_end))
        after_window = (attack_end + 1.0, time.monotonic())
        print(f"quiet again after the attacks: {cpu_note(after_meter.stop())}", flush=True)
        usage = hold_meter.stop()
        msgs = sum(hold.sent) + hold.pings + sum(hold.delivered) - msgs_before
        figures.minutes = (time.monotonic() - start) / 60
        figures.rss_end_kib, figures.fds_end = rss_kib(pid), open_fds(pid)
        await asyncio.sleep(2.0)  # the audit writer's last batch
        db_end, _ = registry_size(db)
        figures.db_growth_bytes = db_end - db_base
        rows = audit_since(db, audit_base)
        figures.audit_rows = sum(r[2] for r in rows)
        figures.audit_row_bytes = sum(r[3] for r in rows)
        for actor, action, count, size in rows[:8]:
            notes.append(f"audit during the attacks: {actor} {action}: {count} rows, {size} bytes")
        ceiling = msgs / max(usage.generator_cpu, 1e-9)
        print(
            f"hold from the attacks on: {msgs / usage.wall:.0f} packets/s sent and received by "
            f"the generator (its ceiling {ceiling:.0f}/s); {cpu_note(usage)} (the attacker "
            "child is one of the others)",
            flush=True,
        )
    finally:
        hold.holding = False
        driver.cancel()
        sampler.cancel()
    grace = time.monotonic() + 5
    while hold.undelivered() and time.monotonic() < grace:
        await asyncio.sleep(0.1)
    figures.drops = len(hold.drops)
    figures.lost = hold.undelivered()
    notes.extend(f"DROPPED {d}" for d in hold.drops[:5])
    if args.samples is not None:
        write_samples(args.samples, hold.samples, results)
    figures.rss_peak_kib = max((rss for at, rss, _ in series if at >= quiet_window[0]), default=0)
    figures.quiet_p99_ms, quiet_n = p99_ms(hold.samples, [quiet_window])
    windows = [(r["start"], r["end"]) for r in results]
    figures.attack_p99_ms, attack_n = p99_ms(hold.samples, windows)
    after_ms, after_n = p99_ms(hold.samples, [after_window])
    print(
        f"latency publish->deliver: quiet p99 {figures.quiet_p99_ms:.2f} ms ({quiet_n} msgs), "
        f"during the attacks p99 {figures.attack_p99_ms:.2f} ms ({attack_n} msgs), quiet again "
        f"after them p99 {after_ms:.2f} ms ({after_n} msgs)"
    )
    for name in args.attacks:
        spans = [(r["start"], r["end"]) for r in results if r["attack"] == name]
        ms = sorted(x * 1e3 for x in chosen(hold.samples, spans))
        print(
            f"  while {name}: {len(ms)} msgs, p50 {percentile(ms, 0.5):.2f} ms, p99 "
            f"{percentile(ms, 0.99):.2f} ms, max {max(ms, default=math.nan):.2f} ms, "
            f"{sum(1 for x in ms if x > 4 * figures.quiet_p99_ms)} over 4x the quiet p99"
        )
    print(
        f"sent {sum(hold.sent)}, delivered {sum(hold.delivered)}, PUBACK refusals "
        f"{hold.refused_acks}, pings {hold.pings} -> {hold.pongs} PINGRESP"
    )
    if hold.pongs < hold.pings - figures.conns:
        notes.append(f"PINGRESP missing: {hold.pings - hold.pongs}")
    with contextlib.suppress(OSError):
        notes.extend(await asyncio.to_thread(metrics_lines, broker.metrics_port))
    await close_all([*hold.links, backend])
    return figures, results, notes


def write_samples(
    path: Path, samples: list[tuple[float, float]], results: list[dict[str, Any]]
) -> None:
    lines = ["kind,at,value"]
    lines += [f"latency_ms,{at:.4f},{lat * 1e3:.3f}" for at, lat in samples]
    lines += [f"attack_{r['attack']},{r['start']:.4f},{r['end']:.4f}" for r in results]
    path.write_text("\n".join(lines) + "\n")


def cpu_note(usage: Usage) -> str:
    """How busy the broker, the generator and everything else were over ``usage``."""
    wall = max(usage.wall, 1e-9)
    return (
        f"broker {usage.broker_cpu / wall:.0%} of core {BROKER_CORE}, generator "
        f"{usage.generator_cpu / wall:.0%} of core {GENERATOR_CORE}, other processes "
        f"{usage.others_cpu / wall:.0%} of a core"
    )


def summary(result: dict[str, Any], start: float) -> str:
    shown = {k: v for k, v in result.items() if k not in ("attack", "start", "end", "round")}
    return (
        f"+{result['start'] - start:.0f} s for {result['end'] - result['start']:.1f} s "
        + json.dumps(shown)
    )


async def wait_serving(broker: BrokerProcess, fleet: Fleet) -> None:
    deadline = time.monotonic() + 30
    while True:
        if broker.proc.poll() is not None:
            raise RuntimeError(f"the broker exited with {broker.proc.returncode}")
        try:
            probe = await open_link(broker.port, BACKEND, fleet.contexts[BACKEND])
        except LINK_ERRORS:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
            continue
        await close_all([probe])
        return


async def start_attacker(
    args: argparse.Namespace, fleet: Fleet, broker: BrokerProcess, tmp: Path, pin: bool, stop: float
) -> asyncio.subprocess.Process:
    devices = tmp / "devices"
    brief = Brief(
        port=broker.port,
        metrics_port=broker.metrics_port,
        root=str(fleet.root),
        attacker_pem=str(devices / f"{ATTACKER}.pem"),
        commander_pem=str(devices / f"{COMMANDER}.pem"),
        stop=stop,
        scale=args.attack_scale,
        attacks=args.attacks,
    )
    argv = [sys.executable, __file__, "--attacker-child", json.dumps(asdict(brief))]
    if pin:
        argv = ["taskset", "-c", str(GENERATOR_CORE), *argv]
    with (tmp / "attacker.stderr").open("wb") as err:
        return await asyncio.create_subprocess_exec(*argv, stdout=subprocess.PIPE, stderr=err)


def metrics_lines(port: int) -> list[str]:
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    keep = (
        "limit_refusals",
        "refusals_suppressed",
        "audit_",
        "protocol_refusals",
        "dropped",
        "pauses",
        "gc_",
    )
    return [
        f"metrics: {line}"
        for line in text.splitlines()
        if line
        and not line.startswith("#")
        and any(k in line for k in keep)
        and not line.endswith(" 0")
    ]


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.attacker_child is not None:
        return attacker_main(args.attacker_child)
    affinity = os.sched_getaffinity(0)
    pin = {BROKER_CORE, GENERATOR_CORE} <= affinity and shutil.which("taskset") is not None
    raise_nofile()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < args.conns + 500:
        print(f"error: RLIMIT_NOFILE is {nofile}; --conns {args.conns} needs more", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    load_before = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-soak-"))
    broker: BrokerProcess | None = None
    fleet: Fleet | None = None
    try:
        t0 = time.monotonic()
        setup = argparse.Namespace(idle=args.conns, kicks=0)
        extra = {ATTACKER: "default", COMMANDER: COMMANDER_GROUP}
        fleet = provision(tmp, setup, extra)
        fleet.registry.set_acl(
            COMMANDER_GROUP, publish=["devices/+/commands/#"], subscribe=[], actor="soak"
        )
        print(
            f"set-up: {args.conns + 3} identities enrolled in-process in "
            f"{time.monotonic() - t0:.1f} s ({tmp}); nofile {nofile}; "
            f"broker on core {BROKER_CORE}, generator on core {GENERATOR_CORE}: "
            f"{'pinned' if pin else 'NOT pinned'}; load average {load_before[0]:.2f}",
            flush=True,
        )
        broker = start_fleetgate(tmp, fleet, pin, args.log_level, None)
        if pin:
            os.sched_setaffinity(0, {GENERATOR_CORE})
        figures, results, notes = asyncio.run(soak(args, fleet, broker, tmp, pin))
        print("\nattacks (each in turn; held = the broker answered as its limit says):")
        by_name: dict[str, list[dict[str, Any]]] = {}
        for result in results:
            by_name.setdefault(result["attack"], []).append(result)
        for name in args.attacks:
            runs = by_name.get(name, [])
            held = sum(1 for r in runs if r.get("held"))
            seconds = sum(r["end"] - r["start"] for r in runs)
            print(f"  {name:<22} runs {len(runs)}, held {held}, {seconds:.0f} s in all")
        print(
            f"broker RSS {figures.rss_base_kib / 1024:.1f} MiB after warm-up -> "
            f"{figures.rss_end_kib / 1024:.1f} MiB at the end ({figures.rss_growth_pct:+.1f} %), "
            f"peak {figures.rss_peak_kib / 1024:.1f} MiB ({figures.peak_growth_pct:+.1f} %); "
            f"descriptors {figures.fds_base} -> {figures.fds_end}"
        )
        print(
            f"registry growth during the attacks {figures.db_growth_bytes} bytes; audit rows "
            f"{figures.audit_rows} ({figures.audit_row_bytes} bytes of text)"
        )
        print(f"drops {figures.drops}, messages never delivered {figures.lost}")
        for note in notes:
            print(note)
        load_after = os.getloadavg()
        print(
            f"load average before {load_before[0]:.2f} / {load_before[1]:.2f}, after "
            f"{load_after[0]:.2f} / {load_after[1]:.2f} (the machine is shared: other helpers' "
            "tests run on it)"
        )
        missed = figures.missed()
        unheld = [r["attack"] for r in results if not r.get("held")]
        if not runs_all(results, args.attacks):
            missed.append("not every attack ran")
        if unheld:
            missed.append(f"limits not held in: {sorted(set(unheld))}")
        print(f"targets ({TARGETS}): " + ("met" if not missed else "MISSED: " + "; ".join(missed)))
        print(figures.last_line())
        return 1 if missed else 0
    finally:
        if broker is not None:
            stop_broker(broker)
            log = broker.log.read_text(errors="replace").strip().splitlines()
            for line in [x for x in log if "Traceback" in x or '"ERROR"' in x][:5]:
                print(f"broker log: {line[:300]}")
        if fleet is not None:
            fleet.registry.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def runs_all(results: list[dict[str, Any]], attacks: list[str]) -> bool:
    return {r["attack"] for r in results} == set(attacks)


if __name__ == "__main__":
    sys.exit(main())
