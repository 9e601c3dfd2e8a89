"""What each read path for the fabric's retained messages costs (issue 12), to choose one.

On a fresh 3-node nats-server cluster (``firmware_sim/nats_cluster.py``) and an R3 stream shaped as
``FG_RETAINED`` (``max_msgs_per_subject = 1``), with N retained messages of 64 bytes on
``devices/<i>/status``, from one nats-py client (CPU is this process's, wall time is loopback):

- ``load``: what a node pays at start for the cache: an ordered consumer, last message per
  subject, until all N arrived (what :class:`broker.fabric.retained.FabricRetained` does);
- ``follow``: one write on another client until the following consumer has it (cache
  staleness across nodes);
- ``get``: read on subscribe, exact topic: one direct get of the subject's last message;
- ``scan``: read on subscribe, wildcard filter (``devices/+/status`` style, 1 match of 1/N
  of the subjects): an ephemeral ordered consumer per SUBSCRIBE, until it has delivered
  everything.

Run: ``python scripts/bench_fabric_retained.py [--messages 2000]``; last line key=value.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent

from benchlib import percentile  # noqa: E402

STREAM = "BENCH_RETAINED"


async def measure(url: str, other: str, count: int) -> dict[str, float]:
    import nats
    from nats.js.api import DeliverPolicy, StorageType, StreamConfig

    nc = await nats.connect(url)
    writer = await nats.connect(other)
    js, wjs = nc.jetstream(), writer.jetstream()
    await js.add_stream(
        StreamConfig(
            name=STREAM,
            subjects=["bench.r.>"],
            storage=StorageType.FILE,
            num_replicas=3,
            max_msgs_per_subject=1,
            allow_direct=True,
        )
    )
    acks = [wjs.publish(f"bench.r.devices.{i}.status", b"x" * 64) for i in range(count)]
    for start in range(0, count, 256):
        await asyncio.gather(*acks[start : start + 256])
    figures: dict[str, float] = {}

    # load: the cache at start
    done = asyncio.Event()
    seen = 0
    latest = asyncio.Queue[float]()

    async def on_record(msg: object) -> None:
        nonlocal seen
        seen += 1
        if seen == count:
            done.set()
        elif seen > count:
            await latest.put(time.perf_counter())

    cpu, wall = time.process_time(), time.perf_counter()
    await js.subscribe(
        "bench.r.>",
        cb=on_record,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
    )
    await done.wait()
    figures["load_s"] = time.perf_counter() - wall
    figures["load_cpu_us_per_msg"] = (time.process_time() - cpu) / count * 1e6

    # follow: a write elsewhere until this cache has it
    follow = []
    for i in range(200):
        sent = time.perf_counter()
        await wjs.publish(f"bench.r.devices.{i}.status", b"y" * 64)
        follow.append((await latest.get()) - sent)
    figures["follow_p50_ms"] = percentile(follow, 0.5) * 1000
    figures["follow_p99_ms"] = percentile(follow, 0.99) * 1000

    # get: read on subscribe, exact topic
    gets = []
    cpu = time.process_time()
    for i in range(500):
        started = time.perf_counter()
        await js.get_last_msg(STREAM, f"bench.r.devices.{i % count}.status", direct=True)
        gets.append(time.perf_counter() - started)
    figures["get_cpu_us"] = (time.process_time() - cpu) / 500 * 1e6
    figures["get_p50_ms"] = percentile(gets, 0.5) * 1000

    # scan: read on subscribe, wildcard: one ephemeral ordered consumer per SUBSCRIBE
    scans = []
    cpu = time.process_time()
    for i in range(50):
        got = asyncio.Event()

        async def on_match(msg: object, got: asyncio.Event = got) -> None:
            got.set()

        started = time.perf_counter()
        sub = await js.subscribe(
            f"bench.r.devices.{i}.*",
            cb=on_match,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        )
        await got.wait()
        scans.append(time.perf_counter() - started)
        await sub.unsubscribe()
    figures["scan_cpu_us"] = (time.process_time() - cpu) / 50 * 1e6
    figures["scan_p50_ms"] = percentile(scans, 0.5) * 1000
    await nc.close()
    await writer.close()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    from firmware_sim.nats_cluster import NatsCluster

    with (
        tempfile.TemporaryDirectory(prefix="bench-fabric-retained-") as scratch,
        NatsCluster(Path(scratch)) as cluster,
    ):
        figures = asyncio.run(measure(cluster.nodes[0].url, cluster.nodes[1].url, args.messages))
    print(" ".join(f"{key}={value:.3g}" for key, value in figures.items()))


if __name__ == "__main__":
    main()
