"""Kick latency across fabric nodes (issue 12): from the moment a node announces a revocation or
suspension on ``$FG.kick`` to the moment the device's connection on *another* node receives
its DISCONNECT (0x98).

:func:`measure_kick_p99` is the measurement, for ``make bench-fabric`` to call with its own
cluster and nodes. Each round: the device connects (mTLS, MQTT 5) to the broker node under
test and waits for its CONNACK; then a NATS client on another NATS server publishes exactly
what a node whose change feed read the change publishes (:func:`broker.fabric.kicks.encode_change`,
state ``suspended`` so the device may connect again next round; the registry is not touched);
the time runs from just before that publish to the DISCONNECT's arrival at the device's
socket. What it covers: one core-NATS hop between servers, the node's receive, ``core.kick``,
the DISCONNECT's TLS write. What it leaves out: the feed poll of the first node that reads
the change (at most ``[broker] feed_poll_interval_s``, 0.1 s by default, of the fastest node).

Run standalone (``python scripts/bench_fabric_kick.py [--kicks 200]``): a 3-node nats-server
cluster from ``firmware_sim/nats_cluster.py``, one ``fleetgate serve broker`` node process on NATS
server 2 (pinned to core 0 with ``--pin``), the announcer on server 1 and the device client in
this process. Last line: ``kick_p50_ms=... kick_p99_ms=... kick_max_ms=... kicks=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from benchlib import HOST, free_port, percentile  # noqa: E402

from broker.fabric.kicks import SUBJECT, encode_change  # noqa: E402
from broker.mqtt import ConnAck, Connect, Decoder, Disconnect, encode  # noqa: E402
from enrollment.registry import DeviceChange, DeviceState  # noqa: E402


@dataclass(frozen=True)
class KickFigures:
    """Kick latencies in milliseconds."""

    p50_ms: float
    p99_ms: float
    max_ms: float
    kicks: int
    reason_codes: frozenset[int]


def _connect(port: int, context: ssl.SSLContext, device_id: str) -> tuple[ssl.SSLSocket, Decoder]:
    raw = socket.create_connection((HOST, port), timeout=10)
    sock = context.wrap_socket(raw, server_hostname="localhost")
    decoder = Decoder(protocol_level=5)
    sock.sendall(encode(Connect(client_id=device_id, keep_alive=60), 5))
    packet = _next(sock, decoder)
    if not isinstance(packet, ConnAck) or packet.reason_code != 0:
        raise RuntimeError(f"{device_id} was not admitted: {packet}")
    return sock, decoder


def _next(sock: ssl.SSLSocket, decoder: Decoder) -> object:
    """The next packet from the broker; None once it closed the connection."""
    while (packet := decoder.next_packet()) is None:
        data = sock.recv(65536)
        if not data:
            return None
        decoder.feed(data)
    return packet


async def _rounds(
    nats_url: str, port: int, context: ssl.SSLContext, device_id: str, kicks: int
) -> tuple[list[float], set[int]]:
    import nats

    nc = await nats.connect(nats_url, name="bench-kick-announcer")
    base = time.time_ns() // 1000  # change ids no real feed hands out
    latencies: list[float] = []
    codes: set[int] = set()
    try:
        for n in range(kicks):
            sock, decoder = await asyncio.to_thread(_connect, port, context, device_id)
            change = DeviceChange(
                id=base + n, device_id=device_id, state=DeviceState.SUSPENDED, reason="bench"
            )
            data = encode_change(change, "bench-announcer")
            started = time.perf_counter()
            await nc.publish(SUBJECT, data)
            await nc.flush()
            packet = await asyncio.to_thread(_next, sock, decoder)
            latencies.append((time.perf_counter() - started) * 1000)
            codes.add(packet.reason_code if isinstance(packet, Disconnect) else -1)
            sock.close()
    finally:
        await nc.close()
    return latencies, codes


def measure_kick_p99(
    nats_url: str, port: int, context: ssl.SSLContext, device_id: str, *, kicks: int = 200
) -> KickFigures:
    """Kick ``device_id`` ``kicks`` times on the broker node listening on ``port``, announced
        through the NATS server at ``nats_url`` (another server than the node's); ``context`` is
        the device's TLS client context. The device reconnects after each kick: the node's
    per-device connect rate (``[broker.limits] connect_rate``/``connect_burst``) must allow
    ``kicks`` connects. Blocking; runs its own event loop."""
    latencies, codes = asyncio.run(_rounds(nats_url, port, context, device_id, kicks))
    return KickFigures(
        percentile(latencies, 0.5),
        percentile(latencies, 0.99),
        max(latencies),
        len(latencies),
        frozenset(codes),
    )


# -- standalone ------------------------------------------------------------------------------------


def start_node(
    home: Path,
    servers: str,
    name: str,
    out: Path,
    *,
    pin: bool = False,
    settings: dict[str, str] | None = None,
) -> tuple[subprocess.Popen[bytes], int]:
    """``fleetgate serve broker`` as a fabric node in its own process (to be killed by PID);
    returns once its listeners are up, with its MQTT port."""
    port, metrics_port = free_port(), free_port()
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("FLEETGATE_") or k == "FLEETGATE_CA_PASSPHRASE"
    }
    env |= {
        "FLEETGATE_HOME": str(home),
        "FLEETGATE_LOG_LEVEL": "WARNING",
        "FLEETGATE_BROKER_PORT": str(port),
        "FLEETGATE_BROKER_METRICS_PORT": str(metrics_port),
        "FLEETGATE_BROKER_NODE_NAME": name,
        "FLEETGATE_FABRIC_SERVERS": servers,
        **(settings or {}),
    }
    argv = [str(Path(sys.executable).with_name("fleetgate")), "serve", "broker"]
    if pin:
        argv = ["taskset", "-c", "0", *argv]
    with out.open("wb") as err:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 60
    while True:  # until /metrics answers: the fabric and the listeners are up
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=1).read()
            return proc, port
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the broker node did not start:\n{out.read_text()}") from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kicks", type=int, default=200)
    parser.add_argument("--pin", action="store_true", help="pin the broker node to core 0")
    args = parser.parse_args()
    from bench_broker import provision

    from firmware_sim.nats_cluster import NatsCluster

    with tempfile.TemporaryDirectory(prefix="bench-fabric-kick-") as scratch:
        tmp = Path(scratch)
        fleet = provision(tmp, argparse.Namespace(idle=0, kicks=1))
        device_id = fleet.kick_ids[0]
        with NatsCluster(tmp / "nats") as cluster:
            servers = cluster.nodes[1].url
            # One device reconnects after every kick: above the per-device connect rate.
            rate = {f"FLEETGATE_BROKER_LIMITS_CONNECT_{k}": "1000" for k in ("RATE", "BURST")}
            proc, port = start_node(
                fleet.home, servers, "kick-node", tmp / "node.stderr", pin=args.pin, settings=rate
            )
            try:
                load = os.getloadavg()[0]
                figures = measure_kick_p99(
                    cluster.nodes[0].url,
                    port,
                    fleet.contexts[device_id],
                    device_id,
                    kicks=args.kicks,
                )
                load_after = os.getloadavg()[0]
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(30)
    print(
        f"# {figures.kicks} kicks across NATS servers, reason codes "
        f"{sorted(figures.reason_codes)}; load average {load:.2f} -> {load_after:.2f}"
    )
    print(
        f"kick_p50_ms={figures.p50_ms:.2f} kick_p99_ms={figures.p99_ms:.2f} "
        f"kick_max_ms={figures.max_ms:.2f} kicks={figures.kicks}"
    )


if __name__ == "__main__":
    main()
