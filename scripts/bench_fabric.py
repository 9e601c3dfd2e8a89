"""Fabric benchmark (issue 12): fleetgate broker nodes on a real 3-node NATS cluster beside the
embedded single node, same certificates, same load, same run.

``make bench-fabric`` runs this. It provisions a throw-away fleet exactly as
``scripts/bench_broker.py`` does (CA, station, devices enrolled in-process, a backend identity
allowed to subscribe to ``devices/+/telemetry``) and reuses that benchmark's load generator
(hand-rolled MQTT 5 PUBLISH bytes over TLS 1.3, closed loop: each publisher keeps at most W
messages in flight end to end).

Per round, for QoS 0 and then QoS 1, P publishers -> 1 subscriber for D seconds:

* **embedded**: one ``fleetgate serve broker`` without ``[fabric]``; publishers and subscriber
  on it.
* **fabric**: a 3-node nats-server 2.10 cluster on loopback (``firmware_sim/nats_cluster.py``:
  JetStream file storage, started and stopped by PID) and two ``fleetgate serve broker``
  nodes with ``[fabric]`` (``replicas`` 3): the publishers on node 1 (whose NATS server is
  n1), the subscriber on node 2 (n2). A QoS 1 message is stored R3 in ``FG_MSGS`` before its
  PUBACK and crosses to node 2 over core NATS.

Pinning: every fleetgate process on core 0 (the embedded broker, and both fabric nodes), the
generator and the three nats-servers on core 1. The ratios compare CPU, not throughput:
``fabric_qN_ratio`` = embedded broker CPU per delivered message / (node 1 + node 2 CPU per
delivered message). NATS servers' CPU is reported separately, as is the generator's (its
ceiling is 1 / its CPU per message) and how busy each core was. ``--rounds 2`` interleaves
embedded/fabric/embedded/fabric so both see the same noise; the ratio uses the medians.

Hooks (other parts of issue 12 plug in here): a module ``scripts/bench_fabric_sessions.py`` or
``scripts/bench_fabric_kick.py``, if present, is imported and its ``run(bench: FabricBench) ->
dict[str, float]`` called with the running cluster and a way to start nodes; the figures it
returns (``failover_s``, ``failover_lost``, ``session_kib``, ``takeover_ms``; ``kick_p99_ms``)
go into the last line. What no hook provides is printed as ``na``. The last line::

    fabric_q0_ratio=… fabric_q1_ratio=… failover_s=… failover_lost=… kick_p99_ms=… session_kib=…

Targets: fabric_q0_ratio >= 0.4, fabric_q1_ratio >= 0.3, failover_lost = 0, failover_s <= 15,
kick_p99_ms <= 250, session_kib <= 16.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]

import bench_broker as bb  # noqa: E402
from benchlib import cpu_seconds, fanin_options, free_port, percentile, run_options  # noqa: E402

from broker.mqtt import QoS  # noqa: E402
from firmware_sim.nats_cluster import NatsCluster, server_version  # noqa: E402

NATS_CORE = bb.GENERATOR_CORE
HOOKS = {
    # module in scripts/ -> the figures it is expected to return
    "bench_fabric_sessions": ("failover_s", "failover_lost", "session_kib", "takeover_ms"),
    "bench_fabric_kick": ("kick_p99_ms",),
}
LAST_LINE_KEYS = (
    "fabric_q0_ratio",
    "fabric_q1_ratio",
    "failover_s",
    "failover_lost",
    "kick_p99_ms",
    "session_kib",
)
TARGETS = {
    "fabric_q0_ratio": (">=", 0.4),
    "fabric_q1_ratio": (">=", 0.3),
    "failover_lost": ("<=", 0),
    "failover_s": ("<=", 15),
    "kick_p99_ms": ("<=", 250),
    "session_kib": ("<=", 16),
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    fanin_options(parser, publishers=50, duration=8.0, window=8)
    parser.add_argument("--rounds", type=int, default=1, help="embedded/fabric rounds (A/B)")
    parser.add_argument("--concurrency", type=int, default=32, help="connects in flight")
    parser.add_argument("--phase-timeout", type=float, default=30.0, help="bound on a connect")
    parser.add_argument("--no-hooks", action="store_true", help="skip the sessions/kick hooks")
    parser.add_argument("--qos", default="0,1", help="QoS levels to run, e.g. 1")
    run_options(parser, profile_top=25)
    args = parser.parse_args()
    if args.window < 2 or args.window * args.publishers > 900:
        parser.error("--window must be >= 2 and window * publishers <= 900")
    if args.payload < bb.STAMP.size or args.payload > 100:
        parser.error(f"--payload must be between {bb.STAMP.size} and 100 bytes")
    # What bench_broker.provision reads: one identity per publisher, one for the kick hook.
    args.idle, args.kicks = args.publishers, 1
    args.qos = [QoS(int(level)) for level in args.qos.split(",")]
    return args


# -- processes ------------------------------------------------------------------------------------


def start_node(
    tmp: Path,
    fleet: bb.Fleet,
    name: str,
    pin: bool,
    log_level: str,
    fabric: dict[str, str] | None = None,
    profile_out: Path | None = None,
    extra_env: dict[str, str] | None = None,
) -> bb.BrokerProcess:
    """``fleetgate serve broker`` on the fleet's data directory, pinned to the broker core; a
    node of the fabric when ``fabric`` gives its ``FLEETGATE_FABRIC_*`` settings."""
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(
        FLEETGATE_HOME=str(fleet.home),
        FLEETGATE_CA_PASSPHRASE=bb.PASSPHRASE,
        FLEETGATE_LOG_LEVEL=log_level,
        FLEETGATE_BROKER_HOST=bb.HOST,
        FLEETGATE_BROKER_PORT=str(port),
        FLEETGATE_BROKER_METRICS_PORT=str(metrics_port),
        FLEETGATE_BROKER_PLAINTEXT_PORT="0",
    )
    env.update({f"FLEETGATE_FABRIC_{key.upper()}": value for key, value in (fabric or {}).items()})
    env.update(extra_env or {})
    argv = [str(Path(sys.executable).with_name("fleetgate")), "serve", "broker"]
    if profile_out is not None:
        argv = [sys.executable, "-c", bb.PROFILED_BROKER.format(out=str(profile_out))]
    stderr = tmp / f"{name}.stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            bb.pinned(argv, pin),
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=bb.raise_nofile,
        )
    return bb.BrokerProcess(name, proc, port, stderr, metrics_port)


def pin_cluster(cluster: NatsCluster, pin: bool) -> None:
    if not pin:
        return
    for node in cluster.nodes:
        assert node.process is not None
        os.sched_setaffinity(node.process.pid, {NATS_CORE})


async def wait_serving(broker: bb.BrokerProcess, endpoint: bb.Endpoint) -> None:
    """Until the broker completes an MQTT CONNECT (or its process exits)."""
    deadline = time.monotonic() + 60
    while True:
        if broker.proc.poll() is not None:
            raise RuntimeError(f"{broker.name} exited: {broker.log.read_text()[-2000:]}")
        try:
            link = await endpoint.open(bb.BACKEND)
        except bb.LINK_ERRORS:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{broker.name} did not serve within 60 s") from None
            await asyncio.sleep(0.2)
            continue
        await bb.close_all([link])
        return


# -- measuring ------------------------------------------------------------------------------------


class GroupMeter:
    """CPU of process groups (fleetgate nodes, NATS servers), the generator and the cores."""

    def __init__(self, groups: dict[str, list[int]]) -> None:
        self.groups = groups
        self.wall = time.perf_counter()
        self.cpu = {name: sum(cpu_seconds(p) for p in pids) for name, pids in groups.items()}
        self.generator = time.process_time()
        self.cores = bb.core_ticks()
        self.ours = {p for pids in groups.values() for p in pids} | {os.getpid()}
        self.others = bb.others_cpu(self.ours)

    def stop(self) -> Measured:
        wall = time.perf_counter() - self.wall
        cpu = {
            name: sum(cpu_seconds(p) for p in pids) - self.cpu[name]
            for name, pids in self.groups.items()
        }
        busy = {}
        for core, (busy1, total1) in bb.core_ticks().items():
            busy0, total0 = self.cores.get(core, (busy1, total1))
            if total1 > total0:
                busy[core] = (busy1 - busy0) / (total1 - total0)
        others = bb.others_cpu(self.ours)
        foreign = sum(c - self.others.get(pid, 0.0) for pid, c in others.items())
        generator = time.process_time() - self.generator
        return Measured(wall, cpu.get("fleetgate", 0.0), generator, busy, max(0.0, foreign), cpu)


@dataclass
class Measured(bb.Usage):
    """bench_broker's Usage, with CPU per process group instead of one broker's."""

    cpu: dict[str, float] = field(default_factory=dict)


@dataclass
class Run:
    """One fan-in: which setup, which QoS, what was delivered and what it cost."""

    setup: str
    qos: int
    delivered: int = 0
    measured: Measured = field(default_factory=Measured)
    latencies: list[float] = field(default_factory=list)
    lost: int = 0
    stalls: int = 0
    refused: int = 0
    problems: dict[str, int] = field(default_factory=dict)

    @property
    def per_s(self) -> float:
        return self.delivered / self.measured.wall if self.measured.wall else math.nan

    def us_per_msg(self, group: str) -> float:
        if not self.delivered:
            return math.nan
        cpu = self.measured.generator_cpu if group == "generator" else self.measured.cpu[group]
        return cpu / self.delivered * 1e6


class SplitEndpoint(bb.Endpoint):
    """The subscriber on one node, the publishers on another: bench_broker's own fan-in
    (``fanin_phase``) then runs across the fabric unchanged."""

    def __init__(self, publish_to: bb.Endpoint, subscribe_to: bb.Endpoint) -> None:
        super().__init__(publish_to.port, publish_to.contexts, publish_to.timeout)
        self._publish_to, self._subscribe_to = publish_to, subscribe_to

    async def open(self, client_id: str, *, keep_alive: int = 60) -> bb.Link:
        target = self._subscribe_to if client_id == bb.BACKEND else self._publish_to
        return await target.open(client_id, keep_alive=keep_alive)


@contextlib.contextmanager
def metered(groups: dict[str, list[int]]) -> Iterator[None]:
    """``fanin_phase`` measures one broker's PID with ``bench_broker.Meter``; here it measures
    every process group instead (the name is looked up when the phase runs)."""
    original = bb.Meter
    bb.Meter = lambda pid: GroupMeter(groups)  # type: ignore[assignment,misc]
    try:
        yield
    finally:
        bb.Meter = original  # type: ignore[misc]


async def fanin(
    setup: str,
    endpoint: bb.Endpoint,
    groups: dict[str, list[int]],
    qos: QoS,
    publishers: list[str],
    args: argparse.Namespace,
) -> Run:
    """One timed fan-in (``bench_broker.fanin_phase``), CPU summed per process group."""
    failures = bb.Failures()
    with metered(groups):
        result = await bb.fanin_phase(
            endpoint, groups["fleetgate"][-1], qos, publishers, args, failures
        )
    if failures.count:
        raise RuntimeError(f"{failures.count} publishers did not connect: {failures.samples}")
    assert isinstance(result.usage, Measured)
    return Run(
        setup,
        result.qos,
        result.delivered,
        result.usage,
        result.latencies,
        result.lost,
        result.stalls,
        result.refused,
        dict(result.problems),
    )


# -- the hooks ------------------------------------------------------------------------------------


@dataclass
class FabricBench:
    """What a hook gets: the fleet, the running cluster, and how to start fleetgate nodes."""

    tmp: Path
    fleet: bb.Fleet
    cluster: NatsCluster
    pin: bool
    args: argparse.Namespace
    start_node: Callable[[str, int], bb.BrokerProcess]  # (name, NATS server index) -> node
    endpoint: Callable[[bb.BrokerProcess], bb.Endpoint]


def kick_hook(module: Any, bench: FabricBench) -> dict[str, float]:
    """``bench_fabric_kick.measure_kick_p99``: a node on NATS server 2, kicks announced through
    server 1, one device reconnecting after each kick (so its connect rate is raised)."""
    rate = {f"FLEETGATE_BROKER_LIMITS_CONNECT_{k}": "1000" for k in ("RATE", "BURST")}
    node = start_node(
        bench.tmp,
        bench.fleet,
        "kick-node",
        bench.pin,
        bench.args.log_level,
        {"servers": bench.cluster.nodes[1].url, "node_name": "kick-node", "replicas": "3"},
        extra_env=rate,
    )
    try:
        asyncio.run(wait_serving(node, bench.endpoint(node)))
        device = bench.fleet.kick_ids[0]
        figures = module.measure_kick_p99(
            bench.cluster.nodes[0].url, node.port, bench.fleet.contexts[device], device, kicks=200
        )
    finally:
        bb.stop_broker(node)
    return {"kick_p99_ms": float(figures.p99_ms)}


def run_hooks(bench: FabricBench) -> dict[str, float]:
    """Each hook module present in scripts/ adds its figures (``run(bench)``, or the kick
    module's ``measure_kick_p99`` through :func:`kick_hook`); a failing hook is reported."""
    figures: dict[str, float] = {}
    for module_name, keys in HOOKS.items():
        if not (REPO / "scripts" / f"{module_name}.py").exists():
            print(f"hook {module_name}: not present -> {', '.join(keys)} = na")
            continue
        try:
            module = importlib.import_module(module_name)
            if hasattr(module, "run"):
                got = module.run(bench)
            elif hasattr(module, "measure_kick_p99"):
                got = kick_hook(module, bench)
            else:
                print(f"hook {module_name}: no run(bench) -> {', '.join(keys)} = na")
                continue
        except Exception as exc:  # one hook's failure must not hide the other figures
            print(f"HOOK FAILED: {module_name}: {type(exc).__name__}: {exc}")
            continue
        print(f"hook {module_name}: {got}")
        figures.update({k: float(v) for k, v in got.items()})
    return figures


# -- one setup -------------------------------------------------------------------------------------


async def run_embedded(
    tmp: Path, fleet: bb.Fleet, args: argparse.Namespace, pin: bool, qos: QoS
) -> Run:
    broker = start_node(tmp, fleet, f"embedded-q{int(qos)}", pin, args.log_level)
    try:
        endpoint = bb.Endpoint(broker.port, fleet.contexts, args.phase_timeout)
        await wait_serving(broker, endpoint)
        await bb.wait_quiet(broker.pid)
        groups = {"fleetgate": [broker.pid]}
        return await fanin("embedded", endpoint, groups, qos, fleet.devices, args)
    finally:
        bb.stop_broker(broker)


async def run_fabric(
    tmp: Path,
    fleet: bb.Fleet,
    args: argparse.Namespace,
    pin: bool,
    cluster: NatsCluster,
    qos: QoS,
) -> Run:
    profiles = [tmp / f"node{i + 1}-q{int(qos)}.prof" for i in range(2)]
    nodes = [
        start_node(
            tmp,
            fleet,
            f"fabric-node{i + 1}-q{int(qos)}",
            pin,
            args.log_level,
            {"servers": cluster.nodes[i].url, "node_name": f"bench-{i + 1}", "replicas": "3"},
            profiles[i] if args.profile else None,
        )
        for i in range(2)
    ]
    try:
        endpoints = [bb.Endpoint(n.port, fleet.contexts, args.phase_timeout) for n in nodes]
        for node, endpoint in zip(nodes, endpoints, strict=True):
            await wait_serving(node, endpoint)
        for node in nodes:
            await bb.wait_quiet(node.pid)
        nats_pids = [n.process.pid for n in cluster.nodes if n.process is not None]
        groups = {"fleetgate": [n.pid for n in nodes], "nats": nats_pids}
        split = SplitEndpoint(endpoints[0], endpoints[1])
        return await fanin("fabric", split, groups, qos, fleet.devices, args)
    finally:
        for node in nodes:
            bb.stop_broker(node)
        if args.profile:
            for i, path in enumerate(profiles):
                print(f"-- profile of fabric node {i + 1} (QoS {int(qos)}) --")
                bb.print_profile(path, args.top)


# -- report ---------------------------------------------------------------------------------------


def median(values: list[float]) -> float:
    values = [v for v in values if not math.isnan(v)]
    return statistics.median(values) if values else math.nan


def describe(run: Run) -> str:
    m = run.measured
    lat = [v * 1000 for v in run.latencies]
    parts = [
        f"{run.setup:8} QoS {run.qos}: {run.per_s:8.0f} msg/s",
        f"fleetgate {run.us_per_msg('fleetgate'):6.1f} us/msg",
    ]
    if "nats" in m.cpu:
        parts.append(f"nats-servers {run.us_per_msg('nats'):5.1f} us/msg")
    gen = run.us_per_msg("generator")
    parts += [
        f"generator {gen:5.1f} us/msg (ceiling {1e6 / gen if gen else math.inf:.0f}/s)",
        f"p50 {percentile(lat, 0.5):.1f} ms p99 {percentile(lat, 0.99):.1f} ms",
        f"core0 {m.core_busy.get(0, math.nan):.0%} core1 {m.core_busy.get(1, math.nan):.0%}",
    ]
    if m.wall and m.others_cpu / m.wall >= 0.05:
        parts.append(f"OTHER PROCESSES {m.others_cpu / m.wall:.0%} of a core")
    return "; ".join(parts)


def problems_of(runs: list[Run]) -> list[str]:
    out = []
    for run in runs:
        if run.qos and (run.lost or run.refused or run.stalls):
            out.append(
                f"{run.setup} QoS 1: never delivered {run.lost}, refused {run.refused}, "
                f"{run.stalls} publisher stalls"
            )
        if run.problems:
            out.append(f"{run.setup} QoS {run.qos}: {run.problems}")
        if not run.delivered:
            out.append(f"{run.setup} QoS {run.qos}: nothing delivered")
    return out


def fmt(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "na"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"


def uptime() -> str:
    return Path("/proc/loadavg").read_text().split(" ", 3)[:3].__str__()


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    affinity = os.sched_getaffinity(0)
    pin = {bb.BROKER_CORE, bb.GENERATOR_CORE} <= affinity and shutil.which("taskset") is not None
    if not pin:
        print(f"warning: cannot pin to cores 0 and 1 (affinity {sorted(affinity)}); not pinning")
    bb.raise_nofile()
    signal.signal(signal.SIGTERM, _terminate)
    bb.check_fast_codec(args.payload)
    load_before = uptime()
    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-bench-fabric-"))
    fleet: bb.Fleet | None = None
    cluster: NatsCluster | None = None
    runs: list[Run] = []
    extra: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        fleet = bb.provision(tmp, args)
        print(
            f"set-up: CA and {len(fleet.devices) + 1} devices in {time.perf_counter() - t0:.1f} s"
        )
        cluster = NatsCluster(tmp / "nats").start()
        pin_cluster(cluster, pin)
        print(
            f"nats-server {'.'.join(map(str, cluster_version(cluster)))}, 3 nodes "
            f"(JetStream file store, R3 FG_MSGS); fleetgate on core {bb.BROKER_CORE}, generator "
            f"and nats-servers on core {NATS_CORE}: {'pinned' if pin else 'NOT pinned'}"
        )
        print(
            f"load: {args.publishers} publishers -> 1 subscriber, window {args.window}, "
            f"{args.payload}-byte payloads, {args.duration:.0f} s per run, {args.rounds} round(s); "
            f"load average before {load_before}",
            flush=True,
        )
        if pin:
            os.sched_setaffinity(0, {bb.GENERATOR_CORE})
        for _ in range(args.rounds):
            for qos in args.qos:
                for setup in ("embedded", "fabric"):
                    if setup == "embedded":
                        run = asyncio.run(run_embedded(tmp, fleet, args, pin, qos))
                    else:
                        run = asyncio.run(run_fabric(tmp, fleet, args, pin, cluster, qos))
                    runs.append(run)
                    print(describe(run), flush=True)
        if pin:
            os.sched_setaffinity(0, affinity)
        if not args.no_hooks:
            bench = FabricBench(
                tmp,
                fleet,
                cluster,
                pin,
                args,
                start_node=lambda name, server: start_node(
                    tmp,
                    fleet,
                    name,
                    pin,
                    args.log_level,
                    {"servers": cluster.nodes[server].url, "node_name": name, "replicas": "3"},
                ),
                endpoint=lambda node: bb.Endpoint(node.port, fleet.contexts, args.phase_timeout),
            )
            extra = run_hooks(bench)
    finally:
        if cluster is not None:
            cluster.stop()
        if fleet is not None:
            fleet.registry.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    figures: dict[str, float] = {}
    for level in (0, 1):

        def cost(setup: str, level: int = level) -> float:
            return median(
                [r.us_per_msg("fleetgate") for r in runs if (r.setup, r.qos) == (setup, level)]
            )

        embedded, fabric = cost("embedded"), cost("fabric")
        ratio = figures[f"fabric_q{level}_ratio"] = embedded / fabric if fabric else math.nan
        print(
            f"QoS {level}: fleetgate CPU/msg (median): embedded {embedded:.1f} us, "
            f"fabric (node 1 + node 2) {fabric:.1f} us -> ratio {ratio:.2f}"
        )
    figures.update(extra)
    print(f"load average after {uptime()} (before {load_before}); the machine is shared")
    for key, (op, target) in TARGETS.items():
        value = figures.get(key, math.nan)
        if math.isnan(value):
            verdict = "not measured"
        else:
            verdict = "met" if (value >= target if op == ">=" else value <= target) else "MISSED"
        print(f"target {key} {op} {target}: {fmt(value)} {verdict}")
    problems = problems_of(runs)
    for problem in problems:
        print(f"SANITY: {problem}")
    print(" ".join(f"{key}={fmt(figures.get(key))}" for key in LAST_LINE_KEYS))
    return 1 if problems else 0


def cluster_version(cluster: NatsCluster) -> tuple[int, int, int]:
    version: tuple[int, int, int] = server_version(cluster.binary)
    return version


if __name__ == "__main__":
    sys.exit(main())
