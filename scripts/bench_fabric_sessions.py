"""Persistent sessions in the fabric, measured (issue 12): failover, takeover, memory.

Each function starts what it needs (a 3-node nats-server cluster from
``firmware_sim/nats_cluster.py``, a throw-away data directory, ``fleetgate serve broker``
nodes as processes with the plaintext test listener, every client the one identity
``bench``) and returns numbers:

* :func:`measure_failover`: ``sessions`` persistent sessions (MQTT 3.1.1, clean session 0, one
  QoS 1 subscription each) connected to node K, ``queued`` QoS 1 messages each sent from node S
  and left unacknowledged (in flight), one checkpoint interval, then SIGKILL of node K. Every
  client reconnects to node S (``reconnecting`` at a time; 256 from the command line) while
  one more message per session is published there; the time from the kill until every
  session has all its messages again is ``failover_s``, the messages never seen again
  ``failover_lost``.
* :func:`measure_takeover`: one client id connected on node A, then on node B: time from the
  CONNECT on B to its CONNACK (session present), and until A's connection is closed.
* :func:`measure_session_kib`: ``sessions`` persistent sessions made and left (away: no
  consumer); the nats-servers' RSS growth per session per server and the KV stream's stored
  bytes per session (one replica).

The load generator is a small asyncio MQTT 3.1.1 client (hand-rolled packets) in this
process; it is not pinned. ``python scripts/bench_fabric_sessions.py`` prints a figures line
per measurement and, last, ``failover_s=… failover_lost=… takeover_p50_ms=… takeover_p99_ms=…
session_kib=…``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

ROOT = Path(__file__).resolve().parent.parent

from benchlib import cpu_seconds, free_port, percentile  # noqa: E402

from firmware_sim.nats_cluster import NatsCluster, healthy_cluster  # noqa: E402

PASSPHRASE = "bench-fabric-sessions-passphrase"
IDENTITY = "bench"
TOPIC = "devices/bench/commands/{}"
T = TypeVar("T")


# -- a minimal MQTT 3.1.1 client -------------------------------------------------------------------


def _string(text: str) -> bytes:
    data = text.encode()
    return struct.pack("!H", len(data)) + data


def _packet(head: int, body: bytes) -> bytes:
    out = bytearray([head])
    length = len(body)
    while True:
        byte = length % 128
        length //= 128
        out.append(byte | (0x80 if length else 0))
        if not length:
            return bytes(out) + body


@dataclass
class Client:
    """One MQTT 3.1.1 client: records the payloads it receives (acknowledging them or not)."""

    client_id: str
    ack: bool = True
    payloads: set[bytes] = field(default_factory=set)
    dups: int = 0
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    connack: asyncio.Future[bool] | None = None
    suback: asyncio.Event = field(default_factory=asyncio.Event)
    puback: asyncio.Event = field(default_factory=asyncio.Event)
    acked: int = 0
    closed: asyncio.Event = field(default_factory=asyncio.Event)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None

    async def connect(self, port: int, clean: bool = False) -> bool:
        """Connect; the CONNACK's session-present flag."""
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        self.connack = asyncio.get_running_loop().create_future()
        self.closed = asyncio.Event()
        flags = 0x02 if clean else 0x00
        body = _string("MQTT") + bytes([4, flags]) + struct.pack("!H", 300)
        self.writer.write(_packet(0x10, body + _string(self.client_id)))
        self.task = asyncio.get_running_loop().create_task(self._read())
        return await asyncio.wait_for(self.connack, 30)

    async def subscribe(self, topic_filter: str) -> None:
        assert self.writer is not None
        self.suback.clear()
        body = struct.pack("!H", 1) + _string(topic_filter) + b"\x01"
        self.writer.write(_packet(0x82, body))
        await asyncio.wait_for(self.suback.wait(), 30)

    async def publish(self, topic: str, payload: bytes, packet_id: int) -> None:
        """QoS 1, waiting for its PUBACK."""
        assert self.writer is not None
        self.puback.clear()
        self.writer.write(_packet(0x32, _string(topic) + struct.pack("!H", packet_id) + payload))
        await asyncio.wait_for(self.puback.wait(), 30)

    async def publish_many(self, topic: str, count: int, window: int = 32) -> None:
        """``count`` QoS 1 messages with up to ``window`` unacknowledged."""
        assert self.writer is not None
        start = self.acked
        for n in range(count):
            while n - (self.acked - start) >= window:
                self.puback.clear()
                await asyncio.wait_for(self.puback.wait(), 30)
            head = _string(topic) + struct.pack("!H", n % 60000 + 1)
            self.writer.write(_packet(0x32, head + f"{n:08d}".encode()))
        while self.acked - start < count:
            self.puback.clear()
            await asyncio.wait_for(self.puback.wait(), 30)

    async def disconnect(self) -> None:
        if self.writer is not None:
            self.writer.write(b"\xe0\x00")
            with contextlib.suppress(OSError):
                await self.writer.drain()
            self.writer.close()
        if self.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.closed.wait(), 5)

    def abandon(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.task is not None:
            self.task.cancel()

    async def _read(self) -> None:
        assert self.reader is not None and self.writer is not None
        reader, writer = self.reader, self.writer
        try:
            while True:
                head = (await reader.readexactly(1))[0]
                length, shift = 0, 0
                while True:
                    byte = (await reader.readexactly(1))[0]
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if not byte & 0x80:
                        break
                body = await reader.readexactly(length)
                kind = head >> 4
                if kind == 2 and self.connack is not None and not self.connack.done():
                    self.connack.set_result(bool(body[0] & 1))
                elif kind == 9:
                    self.suback.set()
                elif kind == 4:
                    self.acked += 1
                    self.puback.set()
                elif kind == 3:
                    size = struct.unpack("!H", body[:2])[0]
                    rest = body[2 + size :]
                    qos = (head >> 1) & 3
                    if qos:
                        packet_id, payload = rest[:2], rest[2:]
                        if self.ack:
                            writer.write(b"\x40\x02" + packet_id)
                    else:
                        payload = rest
                    self.dups += bool(head & 0x08)
                    self.payloads.add(payload)
                    self.changed.set()
        except (asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self.closed.set()


async def bounded(jobs: list[Coroutine[Any, Any, T]], limit: int) -> list[T]:
    """Run ``jobs`` with at most ``limit`` at a time."""
    gate = asyncio.Semaphore(limit)

    async def run(job: Coroutine[Any, Any, T]) -> T:
        async with gate:
            return await job

    return await asyncio.gather(*(run(job) for job in jobs))


# -- nodes ---------------------------------------------------------------------------------------


def provision(home: Path) -> None:
    """A data directory with a CA and an empty registry (the broker's certificate is made by
    the first node that starts)."""
    from enrollment.ca import init_ca
    from enrollment.registry.schema import upgrade
    from fleetgate.config import load_config

    os.environ["FLEETGATE_CA_PASSPHRASE"] = PASSPHRASE
    config = load_config(home, environ={})
    init_ca(config)
    upgrade(config.database_url)


@dataclass
class Node:
    name: str
    process: subprocess.Popen[bytes]
    port: int

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(15)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


def start_node(home: Path, servers: list[str], name: str) -> Node:
    port = free_port()
    env = dict(os.environ)
    env.update(
        FLEETGATE_HOME=str(home),
        FLEETGATE_CA_PASSPHRASE=PASSPHRASE,
        FLEETGATE_FABRIC_SERVERS=",".join(servers),
        FLEETGATE_FABRIC_NODE_NAME=name,
        FLEETGATE_BROKER_PORT=str(free_port()),
        FLEETGATE_BROKER_PLAINTEXT_PORT=str(port),
        FLEETGATE_BROKER_PLAINTEXT_IDENTITY=IDENTITY,
        FLEETGATE_BROKER_METRICS_PORT="0",
        FLEETGATE_BROKER_MAX_QUEUED_MESSAGES="1000",
    )
    with open(home / f"{name}.log", "ab") as log:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "fleetgate"), "serve", "broker"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    node = Node(name, process, port)
    deadline = time.monotonic() + 60
    import socket

    while True:
        if process.poll() is not None:
            raise RuntimeError((home / f"{name}.log").read_text()[-3000:])
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return node
        if time.monotonic() > deadline:
            raise TimeoutError(f"node {name} not listening after 60 s")
        time.sleep(0.1)


@contextlib.contextmanager
def fabric(nodes: int) -> Iterator[tuple[NatsCluster, list[Node], Path]]:
    """A fresh cluster, data directory and ``nodes`` broker nodes, all stopped afterwards."""
    with tempfile.TemporaryDirectory(prefix="bench-fabric-sessions-") as tmp:
        home = Path(tmp) / "fleet-data"
        provision(home)
        started: list[Node] = []
        with healthy_cluster(Path(tmp) / "nats") as cluster:
            try:
                for index in range(nodes):
                    url = cluster.nodes[index % len(cluster.nodes)].url
                    started.append(start_node(home, [url], f"node-{index + 1}"))
                yield cluster, started, home
            finally:
                for node in started:
                    node.stop()


# -- measurements ----------------------------------------------------------------------------------


async def _publish_each(port: int, sessions: int, tag: str) -> None:
    """One QoS 1 message to each session's topic, from one client, acknowledged one by one."""
    sender = Client(f"pub-{tag}-{time.monotonic_ns()}")
    await sender.connect(port, clean=True)
    for n in range(sessions):
        await sender.publish(TOPIC.format(n), f"{tag}-{n}".encode(), n % 60000 + 1)
    await sender.disconnect()


def measure_failover(
    sessions: int = 1000, queued: int = 2, reconnecting: int = 64
) -> dict[str, float]:
    """Seconds from SIGKILL of the node holding ``sessions`` persistent sessions until every
    one has resumed on another node with all its messages (``reconnecting`` clients at a
    time); messages lost."""
    with fabric(2) as (_, (victim, survivor), _):
        return asyncio.run(_failover(victim, survivor, sessions, queued, reconnecting))


async def _failover(
    victim: Node, survivor: Node, sessions: int, queued: int, reconnecting: int
) -> dict[str, float]:
    clients = [Client(f"s{n}", ack=False) for n in range(sessions)]

    async def setup(client: Client, n: int) -> None:
        await client.connect(victim.port)
        await client.subscribe(TOPIC.format(n))

    await bounded([setup(c, n) for n, c in enumerate(clients)], 64)
    await asyncio.sleep(1.5)  # past SINCE_MARGIN_S: the messages below are for the new filters
    for round_ in range(queued):
        await _publish_each(survivor.port, sessions, f"q{round_}")
    expected = {f"q{r}-{n}".encode() for r in range(queued) for n in range(sessions)}
    await asyncio.sleep(2.0)  # a checkpoint of what is in flight
    in_flight = sum(len(c.payloads) for c in clients)
    killed = time.monotonic()
    cpu_before = cpu_seconds(survivor.process.pid)
    victim.kill()
    for client in clients:
        client.abandon()
    finished: list[float] = []
    connacked: list[float] = []
    resumed = 0

    async def resume(client: Client, n: int) -> None:
        nonlocal resumed
        client.payloads = set()
        client.ack = True
        client.changed = asyncio.Event()
        present = await client.connect(survivor.port)
        connacked.append(time.monotonic())
        resumed += present
        want = {p for p in expected if p.endswith(f"-{n}".encode())} | {f"dead-{n}".encode()}
        deadline = time.monotonic() + 60
        while not want <= client.payloads and time.monotonic() < deadline:
            client.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(client.changed.wait(), 1)
        finished.append(time.monotonic())

    async def publish_dead() -> float:
        await _publish_each(survivor.port, sessions, "dead")
        return time.monotonic()

    # The devices come back while one more message each is published (their node is dead).
    published, _ = await asyncio.gather(
        publish_dead(),
        bounded([resume(c, n) for n, c in enumerate(clients)], reconnecting),
    )
    survivor_cpu = cpu_seconds(survivor.process.pid) - cpu_before
    lost = 0
    for n, client in enumerate(clients):
        want = {p for p in expected if p.endswith(f"-{n}".encode())} | {f"dead-{n}".encode()}
        lost += len(want - client.payloads)
    dups = sum(c.dups for c in clients)
    await bounded([c.disconnect() for c in clients], 64)
    return {
        "failover_s": max(finished) - killed,
        # What bounds it: the last CONNACK, and the one publisher's last PUBACK (sequential).
        "connacked_s": max(connacked) - killed,
        "published_s": published - killed,
        "failover_lost": float(lost),
        "sessions": float(sessions),
        "resumed_present": float(resumed),
        "in_flight_at_kill": float(in_flight),
        "redelivered_dup": float(dups),
        "survivor_cpu_s": survivor_cpu,
    }


def measure_takeover(rounds: int = 50) -> dict[str, float]:
    """Milliseconds from a CONNECT on node B, for a session live on node A, to its CONNACK,
    and to the close of A's connection (p50, p99)."""
    with fabric(2) as (_, (a, b), _):
        return asyncio.run(_takeover(a, b, rounds))


async def _takeover(a: Node, b: Node, rounds: int) -> dict[str, float]:
    connack, closed = [], []
    for n in range(rounds):
        old = Client(f"t{n}")
        await old.connect(a.port)
        await old.subscribe(TOPIC.format(f"t{n}"))
        new = Client(f"t{n}")
        started = time.perf_counter()
        present = await new.connect(b.port)
        connack.append((time.perf_counter() - started) * 1000)
        await asyncio.wait_for(old.closed.wait(), 10)
        closed.append((time.perf_counter() - started) * 1000)
        assert present
        await new.disconnect()
    return {
        "takeover_p50_ms": statistics.median(connack),
        "takeover_p99_ms": percentile(connack, 0.99),
        "old_closed_p50_ms": statistics.median(closed),
        "rounds": float(rounds),
    }


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def measure_session_kib(sessions: int = 1000) -> dict[str, float]:
    """KiB per persistent session in NATS: RSS growth per server, and stored bytes per replica,
    with the sessions away (no consumer)."""
    with fabric(1) as (cluster, (node,), _):
        return asyncio.run(_session_kib(cluster, node, sessions))


async def _session_kib(cluster: NatsCluster, node: Node, sessions: int) -> dict[str, float]:
    import nats

    pids = [n.process.pid for n in cluster.nodes if n.process is not None]
    await asyncio.sleep(2)
    before = [_rss_kib(pid) for pid in pids]

    async def make(n: int) -> None:
        client = Client(f"m{n}")
        await client.connect(node.port)
        await client.subscribe(TOPIC.format(n))
        await client.disconnect()

    await bounded([make(n) for n in range(sessions)], 64)
    await asyncio.sleep(3)  # last writes, then the servers settle
    after = [_rss_kib(pid) for pid in pids]
    nc = await nats.connect(cluster.nodes[0].url)
    info = await nc.jetstream().stream_info("KV_FG_SESSIONS")
    await nc.close()
    rss_per_server = statistics.mean(b - a for a, b in zip(before, after, strict=True)) / sessions
    stored = info.state.bytes / sessions / 1024
    return {
        "session_kib": max(rss_per_server, stored),
        "rss_kib_per_session_per_server": rss_per_server,
        "stored_kib_per_session": stored,
        "records": float(info.state.messages),
    }


def measure_delivery_cpu(messages: int = 5000) -> dict[str, float]:
    """The subscriber node's CPU per QoS 1 message from another node, for a persistent session
    (from the stream, through its consumer) and a clean one (the live core-NATS copy)."""
    with fabric(2) as (_, (publisher_node, subscriber_node), _):
        return asyncio.run(_delivery_cpu(publisher_node, subscriber_node, messages))


async def _delivery_cpu(pub_node: Node, sub_node: Node, messages: int) -> dict[str, float]:
    result = {}
    for kind, clean in (("persistent", False), ("clean", True), ("persistent2", False)):
        subscriber = Client(f"cpu-{kind}")
        await subscriber.connect(sub_node.port, clean=clean)
        topic = TOPIC.format(f"cpu-{kind}")
        await subscriber.subscribe(topic)
        publisher = Client(f"cpu-pub-{kind}")
        await publisher.connect(pub_node.port, clean=True)
        await asyncio.sleep(1.5)  # the node's NATS interest reaches the other servers
        await publisher.publish_many(topic, 50)  # warm-up
        while len(subscriber.payloads) < 50:
            subscriber.changed.clear()
            await asyncio.wait_for(subscriber.changed.wait(), 10)
        subscriber.payloads.clear()
        before = cpu_seconds(sub_node.process.pid)
        started = time.monotonic()
        await publisher.publish_many(topic, messages)
        while len(subscriber.payloads) < messages:
            subscriber.changed.clear()
            await asyncio.wait_for(subscriber.changed.wait(), 30)
        elapsed = time.monotonic() - started
        used = cpu_seconds(sub_node.process.pid) - before
        result[f"{kind}_us_per_msg"] = used / messages * 1e6
        result[f"{kind}_msgs_per_s"] = messages / elapsed
        await publisher.disconnect()
        await subscriber.disconnect()
    return result


def run(bench: object) -> dict[str, float]:
    """The hook ``make bench-fabric`` calls: each figure on clusters and nodes of its own
    (``bench``'s cluster carries the fan-in phases' state), at this script's defaults."""
    del bench
    failover = measure_failover(1000, 2, 256)
    takeover = measure_takeover(50)
    memory = measure_session_kib(1000)
    return {
        "failover_s": failover["failover_s"],
        "failover_lost": failover["failover_lost"],
        "session_kib": memory["session_kib"],
        "takeover_ms": takeover["takeover_p99_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--queued", type=int, default=2)
    parser.add_argument("--takeovers", type=int, default=50)
    parser.add_argument("--messages", type=int, default=5000)
    parser.add_argument("--reconnecting", type=int, default=256, help="clients resuming at once")
    args = parser.parse_args()
    print(f"load before: {os.getloadavg()}", flush=True)
    failover = measure_failover(args.sessions, args.queued, args.reconnecting)
    print("failover:", " ".join(f"{k}={v:g}" for k, v in failover.items()), flush=True)
    takeover = measure_takeover(args.takeovers)
    print("takeover:", " ".join(f"{k}={v:.2f}" for k, v in takeover.items()), flush=True)
    cpu = measure_delivery_cpu(args.messages)
    print("delivery cpu:", " ".join(f"{k}={v:.1f}" for k, v in cpu.items()), flush=True)
    memory = measure_session_kib(args.sessions)
    print("memory:", " ".join(f"{k}={v:.2f}" for k, v in memory.items()), flush=True)
    print(f"load after: {os.getloadavg()}", flush=True)
    print(
        f"failover_s={failover['failover_s']:.2f} failover_lost={failover['failover_lost']:.0f} "
        f"takeover_p50_ms={takeover['takeover_p50_ms']:.1f} "
        f"takeover_p99_ms={takeover['takeover_p99_ms']:.1f} "
        f"session_kib={memory['session_kib']:.2f}"
    )


if __name__ == "__main__":
    main()
