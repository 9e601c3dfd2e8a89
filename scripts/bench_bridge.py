"""Bridge benchmark: device publish -> upstream delivery through fleetgate's bridge, beside
devices publishing straight to the same upstream Mosquitto, and the catch-up after an outage.

``make bench-bridge`` runs this. It provisions a throw-away fleet with ``bench_broker.provision``
(CA, station, devices and a backend identity enrolled in-process), enrolls a ``bench-bridge``
identity into a key store directory, and starts Debian's Mosquitto 2.0.11 as the upstream with
``bench_broker``'s configuration (client certificates required, TLS 1.3, no persistence,
``max_queued_messages 0``). Then, loopback only:

1. direct: P publishers -> Mosquitto ``devices/<id>/telemetry``; one subscriber on Mosquitto.
2. bridged: P publishers -> ``fleetgate serve broker`` with one ``[[bridge]]`` (MQTT 5, out
   ``devices/+/telemetry`` -> ``sites/bench/devices/+/telemetry``) -> Mosquitto; the same
   subscriber counts ``sites/bench/#``.
3. outage: the bridged set-up again; Mosquitto is frozen (SIGSTOP) for 30 s while devices keep
   publishing (the bridge's keep-alive notices; the messages pile up in its SQLite queue), then
   resumed (SIGCONT). Catch-up rate = messages queued / time from resume until the subscriber
   has them all; ``outage_lost`` = device-acknowledged messages that never arrived.

Messages/s are counted at the upstream subscriber over a timed window, in a closed loop: each
publisher keeps W messages in flight (sent, not yet PUBACKed by the broker it talks to). The
broker under test (Mosquitto for direct, fleetgate for bridged) and the upstream Mosquitto are
pinned to core 0, the load generator (publishers and subscriber, one asyncio process on the
broker's own sans-I/O codec) to core 1; the generator's ceiling is 1 / its CPU per message,
measured in the direct run. Each timed run also prints how busy each core was and how much of
that was not the benchmark's own processes (the machine is shared: a run with much "not ours"
CPU was disturbed). The last line is::

    bridged_ratio=<bridged/direct> outage_lost=<n> catchup_msgs_per_s=<x>
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench_broker import (
    BACKEND,
    BROKER_CORE,
    GENERATOR_CORE,
    HOST,
    SERVER_NAME,
    Fleet,
    core_ticks,
    provision,
    start_fleetgate,
    start_mosquitto,
    stop_broker,
)
from benchlib import cpu_seconds, fanin_options
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from broker.mqtt import (
    Connect,
    Disconnect,
    ProtocolLevel,
    QoS,
    Subscribe,
    Subscription,
    decode_varint,
    encode,
)
from device_sdk.est import device_csr
from firmware_sim.mqtt_client import SimClient
from firmware_sim.station import provision_station
from fleetgate.keyfiles import write_certificates, write_private_key

SITE = "bench"
BRIDGE_ID = "bench-bridge"
BRIDGE_STATION = "bench-bridge-line"
MQTT5 = ProtocolLevel.MQTT_5


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fanin_options(parser, publishers=20, duration=10.0, window=16)
    parser.add_argument("--outage", type=float, default=30.0, help="upstream outage, seconds")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument(
        "--no-outage", action="store_true", help="skip the outage run (quicker profiling rounds)"
    )
    parser.add_argument(
        "--py-spy",
        metavar="OUT",
        help="record fleetgate with py-spy (--native, speedscope JSON) during the bridged run",
    )
    return parser.parse_args()


def enroll_bridge(fleet: Fleet, tmp: Path) -> Path:
    """A key store directory (device.crt, device.key, ca.crt) for the bridge identity."""
    *_, station_cert = provision_station(fleet.service, BRIDGE_STATION, tmp, actor="bench")
    fleet.registry.add_batch(
        BRIDGE_STATION, [BRIDGE_ID], group="bridges", label="bench", actor="bench"
    )
    key = ec.generate_private_key(ec.SECP256R1())
    body = base64.b64encode(device_csr(BRIDGE_ID, key).public_bytes(Encoding.DER))
    cert = fleet.service.enroll(station_cert, body)
    store = tmp / "bridge-keystore"
    write_private_key(store / "device.key", key)
    write_certificates(store / "device.crt", [cert, fleet.service.ca.anchors.issuing])
    shutil.copy(fleet.root, store / "ca.crt")
    return store


def write_bridge_config(fleet: Fleet, store: Path, upstream_port: int) -> None:
    (fleet.home / "fleetgate.toml").write_text(
        f"""[[bridge]]
name = "central"
host = "{SERVER_NAME}"
port = {upstream_port}
protocol = "5"
keystore = "{store}"
site = "{SITE}"
keepalive_s = 4
backoff_initial_s = 0.2
backoff_max_s = 1.0
queue_max_messages = 10000000
queue_max_bytes = 4000000000
[[bridge.out]]
local = "devices/+/telemetry"
remote = "sites/{{site}}/devices/+/telemetry"
"""
    )


def pin_generator() -> None:
    with contextlib.suppress(OSError):
        os.sched_setaffinity(0, {GENERATOR_CORE})


# -- the load ---------------------------------------------------------------------------------


@dataclass
class Load:
    acked: set[bytes]
    received: set[bytes]
    received_count: int = 0
    acked_count: int = 0


async def connect(port: int, fleet: Fleet, client_id: str) -> SimClient:
    context: ssl.SSLContext = fleet.contexts[client_id]
    return await SimClient.connect(
        HOST, port, client_id=client_id, context=context, server_hostname=SERVER_NAME, keep_alive=0
    )


class CountingSubscriber(asyncio.Protocol):
    """The upstream subscriber's hot path, hand-rolled: it finds each PUBLISH's payload and
    packet id in the bytes and acknowledges it (QoS 1), without decoding its properties.

    The bridged messages carry the origin marker (a user property) and a longer topic; the
    codec's full decode of that user property costs the generator ~25 us per message more than
    the direct run's plain messages, on the generator's own (saturated) core. Parsing the same
    way in both runs keeps the load generator's cost per message the same for both paths, so
    the ratio compares the brokers' paths, not the measuring instrument's."""

    def __init__(self, load: Load) -> None:
        self.load = load
        self.buffer = bytearray()
        self.transport: asyncio.BaseTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"subscriber connection lost: {exc}"))

    def data_received(self, data: bytes) -> None:
        buf = self.buffer
        buf += data
        at, end, acks = 0, len(buf), bytearray()
        load, received = self.load, self.load.received
        while at + 2 <= end:
            length = decode_varint(buf, at + 1, end)
            if length is None:
                break
            size, body = length
            if body + size > end:
                break
            kind = buf[at] >> 4
            if kind == 3:  # PUBLISH
                topic_end = body + 2 + int.from_bytes(buf[body : body + 2], "big")
                qos = (buf[at] >> 1) & 3
                props = topic_end + (2 if qos else 0)
                if qos:
                    acks += b"\x40\x02" + buf[topic_end:props]
                prop_len = decode_varint(buf, props, end)
                assert prop_len is not None
                received.add(bytes(buf[prop_len[1] + prop_len[0] : body + size]))
                load.received_count += 1
            elif kind == 9 and not self.ready.done():  # SUBACK
                self.ready.set_result(None)
            at = body + size
        del buf[:at]
        if acks:
            assert isinstance(self.transport, asyncio.WriteTransport)
            self.transport.write(bytes(acks))


async def subscriber(
    port: int, fleet: Fleet, topic_filter: str, load: Load
) -> asyncio.WriteTransport:
    loop = asyncio.get_running_loop()
    protocol = CountingSubscriber(load)
    transport, _ = await loop.create_connection(
        lambda: protocol, HOST, port, ssl=fleet.contexts[BACKEND], server_hostname=SERVER_NAME
    )
    assert isinstance(transport, asyncio.WriteTransport)
    transport.write(encode(Connect(client_id=BACKEND, keep_alive=0), MQTT5))
    subscription = Subscription(topic_filter=topic_filter, qos=QoS.AT_LEAST_ONCE)
    transport.write(encode(Subscribe(packet_id=1, subscriptions=(subscription,)), MQTT5))
    await asyncio.wait_for(protocol.ready, 10)  # CONNACK (skipped: a refusal closes) + SUBACK
    return transport


def close_subscriber(transport: asyncio.WriteTransport) -> None:
    transport.write(encode(Disconnect(), MQTT5))
    transport.close()


async def publishers(
    port: int, fleet: Fleet, args: argparse.Namespace, load: Load, stop: asyncio.Event
) -> list[SimClient]:
    clients = [await connect(port, fleet, device) for device in fleet.devices[: args.publishers]]

    async def lane(client: SimClient, device: str, lane_no: int) -> None:
        n = 0
        topic = f"devices/{device}/telemetry"
        while not stop.is_set():
            payload = f"{device}:{lane_no}:{n}".encode().ljust(args.payload, b".")
            try:
                code = await client.publish(topic, payload, QoS.AT_LEAST_ONCE)
            except ConnectionError:
                return
            if code == 0:
                load.acked.add(payload)
                load.acked_count += 1
            n += 1

    for client, device in zip(clients, fleet.devices, strict=False):
        for lane_no in range(args.window):
            asyncio.get_running_loop().create_task(lane(client, device, lane_no))
    return clients


@dataclass
class Timed:
    """One timed run: messages/s at the subscriber and PUBACKed to the publishers, CPU per
    message received at the subscriber (generator, and the broker under test)."""

    received_per_s: float
    acked_per_s: float
    generator_cpu: float
    broker_cpu: list[float]  # per process in ``broker_pids``
    core_busy: dict[int, float]  # share of each core busy (irq and softirq included), 0..1
    not_ours: dict[int, float]  # ... of which not the brokers' (core 0) or generator's (core 1)

    def interference(self) -> str:
        """How busy both cores were and how much of that was not this benchmark's processes
        (loopback softirq outside them, or other work on the machine: a shared machine's
        noise shows here, not in the per-message figures' names)."""
        return "; ".join(
            f"core {core} {self.core_busy.get(core, float('nan')):.0%} busy, "
            f"{self.not_ours.get(core, float('nan')):.0%} not ours"
            for core in (BROKER_CORE, GENERATOR_CORE)
        )


async def timed(
    port: int,
    sub_port: int,
    fleet: Fleet,
    args: argparse.Namespace,
    topic_filter: str,
    broker_pids: tuple[int, ...] = (),
    profile_pid: int | None = None,
) -> Timed:
    """Messages/s at the subscriber over ``duration`` after a 2 s warm-up; CPU per message."""
    load = Load(set(), set())
    sub = await subscriber(sub_port, fleet, topic_filter, load)
    stop = asyncio.Event()
    pubs = await publishers(port, fleet, args, load, stop)
    await asyncio.sleep(2.0)
    start_count, start_acked = load.received_count, load.acked_count
    start_cpu, started = cpu_seconds(os.getpid()), time.time()
    start_broker = [cpu_seconds(pid) for pid in broker_pids]
    start_cores = core_ticks()
    spy = None
    if profile_pid is not None and args.py_spy:
        spy = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("py-spy")),
                "record",
                "--native",
                "-r",
                "100",
                "-f",
                "speedscope",
                "-d",
                str(int(args.duration)),
                "-p",
                str(profile_pid),
                "-o",
                args.py_spy,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    await asyncio.sleep(args.duration)
    count = load.received_count - start_count
    acked = load.acked_count - start_acked
    cpu = cpu_seconds(os.getpid()) - start_cpu
    broker = [cpu_seconds(pid) - s for pid, s in zip(broker_pids, start_broker, strict=True)]
    elapsed = time.time() - started
    busy, not_ours = {}, {}
    ours = {BROKER_CORE: sum(broker), GENERATOR_CORE: cpu}
    for core, (busy1, total1) in core_ticks().items():
        busy0, total0 = start_cores.get(core, (busy1, total1))
        if total1 > total0 and core in ours:
            busy[core] = (busy1 - busy0) / (total1 - total0)
            not_ours[core] = max(0.0, busy[core] - ours[core] / elapsed)
    stop.set()
    await asyncio.sleep(0.5)
    for client in pubs:
        await client.disconnect()
    close_subscriber(sub)
    if spy is not None:
        await asyncio.to_thread(spy.wait)
    per = max(count, 1)
    return Timed(
        count / elapsed, acked / elapsed, cpu / per, [b / per for b in broker], busy, not_ours
    )


def bridge_status(metrics_port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{metrics_port}/bridges"
    with urllib.request.urlopen(url, timeout=10) as response:
        data: dict[str, Any] = json.loads(response.read())
    return data


async def outage(
    broker_port: int,
    metrics_port: int,
    upstream_pid: int,
    upstream_port: int,
    fleet: Fleet,
    args: argparse.Namespace,
) -> tuple[int, float, int]:
    """(messages lost, catch-up msgs/s, messages queued at resume)."""
    load = Load(set(), set())
    sub = await subscriber(upstream_port, fleet, f"sites/{SITE}/#", load)
    stop = asyncio.Event()
    pubs = await publishers(broker_port, fleet, args, load, stop)
    await asyncio.sleep(2.0)
    os.kill(upstream_pid, signal.SIGSTOP)
    await asyncio.sleep(args.outage)
    stop.set()
    await asyncio.sleep(1.0)  # the last PUBACKs
    queued = int(bridge_status(metrics_port)["bridges"][0]["queue_messages"])
    missing_before = len(load.acked - load.received)
    os.kill(upstream_pid, signal.SIGCONT)
    resumed = time.time()
    deadline = resumed + 300
    while load.acked - load.received and time.time() < deadline:
        await asyncio.sleep(0.05)
    caught_up = time.time() - resumed
    lost = len(load.acked - load.received)
    for client in pubs:
        with contextlib.suppress(Exception):
            await client.disconnect()
    close_subscriber(sub)
    return lost, missing_before / caught_up if caught_up else 0.0, queued


def main() -> int:
    args = parse_args()
    pin_generator()
    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-bench-bridge-"))
    brokers = []
    try:
        setup = argparse.Namespace(idle=args.publishers, kicks=0)
        print(f"provisioning {args.publishers} devices in {tmp} ...", flush=True)
        fleet = provision(tmp, setup)
        store = enroll_bridge(fleet, tmp)
        fleet.registry.set_acl("bridges", publish=[], subscribe=[], actor="bench")
        upstream = start_mosquitto(tmp, fleet, pin=True)
        brokers.append(upstream)
        time.sleep(0.5)
        direct = asyncio.run(
            timed(upstream.port, upstream.port, fleet, args, "devices/+/telemetry", (upstream.pid,))
        )
        print(
            f"direct   P={args.publishers} W={args.window}: {direct.received_per_s:9.0f} msgs/s "
            f"at the subscriber ({direct.acked_per_s:.0f}/s acknowledged to the publishers)"
        )
        ceiling = 1 / direct.generator_cpu if direct.generator_cpu else float("nan")
        print(
            f"         generator CPU {direct.generator_cpu * 1e6:.1f} us/msg -> ceiling "
            f"~{ceiling:,.0f} msgs/s; Mosquitto CPU {direct.broker_cpu[0] * 1e6:.1f} us/msg"
        )
        print(f"         {direct.interference()}")

        write_bridge_config(fleet, store, upstream.port)
        fleetgate = start_fleetgate(tmp, fleet, True, "WARNING", None)
        brokers.append(fleetgate)
        deadline = time.time() + 30
        while time.time() < deadline:
            try:
                if bridge_status(fleetgate.metrics_port)["bridges"][0]["connected"]:
                    break
            except OSError:
                pass
            time.sleep(0.2)
        bridged = asyncio.run(
            timed(
                fleetgate.port,
                upstream.port,
                fleet,
                args,
                f"sites/{SITE}/#",
                (fleetgate.pid, upstream.pid),
                fleetgate.pid,
            )
        )
        print(
            f"bridged  P={args.publishers} W={args.window}: {bridged.received_per_s:9.0f} msgs/s "
            f"at the subscriber ({bridged.acked_per_s:.0f}/s acknowledged to the publishers)"
        )
        print(
            f"         generator CPU {bridged.generator_cpu * 1e6:.1f} us/msg; fleetgate CPU "
            f"{bridged.broker_cpu[0] * 1e6:.1f} us/msg (receive, queue, forward); upstream "
            f"Mosquitto {bridged.broker_cpu[1] * 1e6:.1f} us/msg"
        )
        print(f"         {bridged.interference()}")

        if args.no_outage:
            ratio = bridged.received_per_s / direct.received_per_s if direct.received_per_s else 0
            print(f"bridged_ratio={ratio:.2f} (no outage run)")
            return 0
        lost, catchup, queued = asyncio.run(
            outage(fleetgate.port, fleetgate.metrics_port, upstream.pid, upstream.port, fleet, args)
        )
        print(
            f"outage   {args.outage:.0f} s upstream frozen: {queued} queued, {lost} lost, "
            f"catch-up {catchup:,.0f} msgs/s"
        )
        ratio = bridged.received_per_s / direct.received_per_s if direct.received_per_s else 0.0
        print(f"bridged_ratio={ratio:.2f} outage_lost={lost} catchup_msgs_per_s={catchup:.0f}")
        return 0
    finally:
        for broker in reversed(brokers):
            with contextlib.suppress(ProcessLookupError):
                os.kill(broker.pid, signal.SIGCONT)
            stop_broker(broker)
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
