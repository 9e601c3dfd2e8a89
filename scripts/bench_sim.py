"""``make bench-sim``: 10,000 software-key devices from nothing to connected, a steady stage,
and a broker SIGKILL, on this machine, through ``fleetgate sim``'s own engine.

Phases (one scenario, in-process mode: a throw-away data directory, ``fleetgate serve
enrollment`` and ``fleetgate serve broker`` as child processes):

1. online: every device enrolls over EST (its key made on the "device", the station's
   certificate on the request) and connects over mutual TLS 1.3, MQTT 5, at up to
   ``--connect-rate`` devices/s. No telemetry yet. ``online_s`` is the time until all are
   connected.
2. steady: ``--steady`` s at 1 msg/s per device, QoS 1, persistent sessions. The backend
   subscriber (QoS 2 on ``devices/+/telemetry``) must receive every acknowledged message:
   ``delivered_ratio`` and ``lost`` count the messages sent in this stage.
3. outage: the broker is SIGKILLed ``--kill-after`` s into this stage and started again
   ``--down`` s later; ``recovery_s`` is the time from the kill until the fleet is back to its
   connected count and message rate (both within 5 %, for two seconds running). Messages lost
   at the kill are printed apart (``kill_lost``): the broker keeps sessions in memory.

While it runs, the CPU of each process (the simulator's coordinator and shards, the EST
service, the broker) is sampled from ``/proc`` every second, so each phase's figure comes with
what bounded it: a process at a full core, or the machine (both cores busy, with other
processes' share shown). Load is recorded before and after. The last line is::

    sim_devices=<n> online_s=<s> delivered_ratio=<x> lost=<n> recovery_s=<s>
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from firmware_sim.engine import Coordinator, Progress
from firmware_sim.fleet import BACKEND_GROUP
from firmware_sim.observations import (
    DELIVERED,
    RECOVERY_WINDOW_S,
    FaultMark,
    Observations,
    within,
)
from firmware_sim.progress import LiveLine
from firmware_sim.scenario import Fault, FaultKind, Group, Scenario, Stage

TICKS = os.sysconf("SC_CLK_TCK")
BACKEND_QUEUE = 500_000
SHARDS = "simulator (device shards)"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--procs", type=int, default=2, help="device shard processes")
    parser.add_argument("--connect-rate", type=float, default=400.0, help="devices/s, at most")
    parser.add_argument("--online-limit", type=float, default=90.0, help="s for phase 1")
    parser.add_argument("--steady", type=float, default=60.0, help="s of steady traffic")
    parser.add_argument("--kill-after", type=float, default=5.0)
    parser.add_argument("--down", type=float, default=2.0)
    parser.add_argument("--outage", type=float, default=60.0, help="s of the outage stage")
    parser.add_argument("--keep", action="store_true", help="keep the data directory and logs")
    parser.add_argument("--timeline", type=Path, help="write each second's counts here (CSV)")
    return parser.parse_args()


def scenario(args: argparse.Namespace) -> Scenario:
    steady_from = args.online_limit
    outage_from = steady_from + args.steady
    return Scenario(
        name="bench-sim",
        description=f"{args.devices} devices online over EST + mTLS, {args.steady:g} s at "
        "1 msg/s QoS 1, then a broker SIGKILL.",
        groups=(Group("fleet", args.devices, rate=1.0, qos=1, payload_bytes=64),),
        stages=(
            Stage("online", args.online_limit, connect_rate=args.connect_rate, rate=0.0),
            Stage("steady", args.steady),
            Stage("outage", args.outage),
        ),
        faults=(
            Fault(FaultKind.BROKER_KILL, at_s=outage_from + args.kill_after, duration_s=args.down),
        ),
        drain_s=15.0,
        # The backend subscriber takes the whole fleet's 10,000 msg/s: a deployment gives such
        # a consumer a deep queue and a wide window, or a hiccup of 0.1 s overflows the
        # default 1,000-message queue and the broker drops what it acknowledged.
        broker_config={
            "max_queued_messages": BACKEND_QUEUE,
            "limits": {
                "groups": {
                    BACKEND_GROUP: {
                        "max_queued_messages": BACKEND_QUEUE,
                        "max_queued_bytes": 256 * 1024 * 1024,
                        "max_inflight": 1024,
                    }
                }
            },
        },
    )


# -- CPU per process -------------------------------------------------------------------------------


def cpu_s(pid: int) -> float | None:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS


def machine_busy() -> tuple[float, float]:
    """(busy, total) jiffies over all cores, irq and softirq counted busy."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return sum(values) - idle, sum(values)


@dataclass
class Sampler:
    """Each second: CPU seconds used by each role, and the machine's busy share."""

    coordinator: Coordinator
    samples: list[tuple[float, dict[str, float], float]] = field(default_factory=list)
    shard_cpu: dict[int, float] = field(default_factory=dict)  # pid -> CPU seconds, last seen

    def roles(self) -> dict[str, list[int]]:
        roles: dict[str, list[int]] = defaultdict(list)
        roles["simulator (coordinator)"].append(os.getpid())
        for child in multiprocessing.active_children():
            if child.pid is not None:
                roles[SHARDS].append(child.pid)
        deployment = self.coordinator.deployment
        if deployment is not None:
            for name, process in deployment.processes.items():
                roles[f"{name} service"].append(process.pid)
        return roles

    async def run(self) -> None:
        last: dict[int, float] = {}
        last_busy = machine_busy()
        while True:
            await asyncio.sleep(1.0)
            used: dict[str, float] = defaultdict(float)
            for role, pids in self.roles().items():
                for pid in pids:
                    now = cpu_s(pid)
                    if now is None:
                        continue
                    used[role] += now - last.get(pid, now)
                    last[pid] = now
                    if role == SHARDS:
                        self.shard_cpu[pid] = now
            busy = machine_busy()
            share = (busy[0] - last_busy[0]) / max(1, busy[1] - last_busy[1])
            last_busy = busy
            clock = getattr(self.coordinator, "clock", None)
            t = clock.now() if clock is not None else -1.0
            self.samples.append((t, dict(used), share * os.cpu_count()))  # type: ignore[operator]

    def phase(self, start: float, end: float) -> tuple[dict[str, float], float, float]:
        """Mean cores used by each role, by the machine, and by others, in [start, end)."""
        chosen = [s for s in self.samples if start <= s[0] < end]
        if not chosen:
            return {}, 0.0, 0.0
        roles: dict[str, float] = defaultdict(float)
        for _, used, _ in chosen:
            for role, seconds in used.items():
                roles[role] += seconds / len(chosen)
        machine = sum(s[2] for s in chosen) / len(chosen)
        return dict(roles), machine, max(0.0, machine - sum(roles.values()))


def bound(roles: dict[str, float], machine: float, others: float) -> str:
    if not roles:
        return "no samples"
    top = max(roles, key=lambda r: roles[r])
    cores = os.cpu_count() or 1
    parts = ", ".join(f"{r} {v:.2f}" for r, v in sorted(roles.items(), key=lambda kv: -kv[1]))
    verdict = (
        f"the machine ({machine:.2f} of {cores} cores busy)"
        if machine >= cores * 0.9
        else f"{top} ({roles[top]:.2f} cores)"
        if roles[top] >= 0.9
        else "neither a process nor the machine at its limit: the scenario's pace"
    )
    return f"bound by {verdict}; cores used: {parts}; other processes {others:.2f}"


# -- figures -------------------------------------------------------------------------------------


def online_s(obs: Observations, devices: int) -> float | None:
    for second in sorted(obs.connected):
        if obs.connected[second] >= devices:
            return float(second)
    return None


def back_at(per_s: Counter[int], start: float, level: float) -> float | None:
    """Seconds after ``start`` until ``per_s`` is at ``level`` or above, two seconds running."""
    first = int(start) + 1
    last = max(per_s, default=0)
    for second in range(first, last):
        if per_s[second] >= level and per_s[second + 1] >= level:
            return second - start
    return None


def window_loss(obs: Observations, subscriber: str, start: float, end: float) -> tuple[int, int]:
    """(acknowledged, lost) for messages sent in [start, end) that ``subscriber`` was due."""
    acked = lost = 0
    gaps = obs.unsubscribed.get(subscriber, [])  # due to no one: the broker lost its session
    for topic, seqs in obs.acked.items():
        got = set(obs.arrivals.get((subscriber, topic), ()))
        for seq, sent in zip(seqs, obs.acked_sent[topic], strict=True):
            if start <= sent < end and not within(sent, gaps):
                acked += 1
                lost += seq not in got
    return acked, lost


async def main(args: argparse.Namespace) -> int:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    print(f"load before: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}", flush=True)
    plan = scenario(args)
    line = LiveLine(sys.stderr, every_s=5.0)

    def progress(p: Progress) -> None:
        line.update(p)

    coordinator = Coordinator(plan, procs=args.procs, keep=args.keep, progress=progress)
    sampler = Sampler(coordinator)
    sampling = asyncio.create_task(sampler.run())
    started = time.perf_counter()
    result = await coordinator.run()
    sampling.cancel()
    line.close()
    print(f"load after: {os.getloadavg()[0]:.2f} {os.getloadavg()[1]:.2f}")
    obs = result.obs
    backend = result.checked_subscribers[0] if result.checked_subscribers else ""
    online = online_s(obs, args.devices)
    steady_from, outage_from = args.online_limit, args.online_limit + args.steady
    acked, lost = window_loss(obs, backend, steady_from, outage_from)
    kill_acked, kill_lost = window_loss(obs, backend, outage_from, outage_from + args.outage)
    kill: FaultMark | None = next(iter(result.faults), None)
    recovery = None if kill is None else kill.recovery_s
    ratio = 1 - lost / acked if acked else float("nan")
    print(f"took {time.perf_counter() - started:.0f} s; {obs.enrolled} enrolled")
    if result.data_dir is not None:
        print(f"data directory (kept): {result.data_dir}")
    print(
        f"online: {online if online is not None else 'never'} s to {args.devices} connected "
        f"(enroll p50/p99 {pct(obs.enroll_ms, 0.5)}/{pct(obs.enroll_ms, 0.99)} ms, connect "
        f"p50/p99 {pct(obs.connect_ms, 0.5)}/{pct(obs.connect_ms, 0.99)} ms)"
    )
    print("  " + bound(*sampler.phase(0, online if online is not None else steady_from)))
    asked = args.devices * args.steady
    print(
        f"steady: {acked} acknowledged ({acked / args.steady:.0f} msg/s of the "
        f"{asked / args.steady:.0f} asked), {lost} lost, delivered ratio {ratio:.6f}"
    )
    print("  " + bound(*sampler.phase(steady_from + 2, outage_from)))
    recovered = "not recovered" if recovery is None else f"{recovery:.1f} s"
    print(
        f"outage: broker SIGKILLed at {outage_from + args.kill_after:g} s, started again after "
        f"{args.down:g} s; recovery {recovered}; {kill_lost} of {kill_acked} acknowledged "
        "messages lost at the kill"
    )
    if kill is not None:
        print("  " + back_text(obs, kill.start))
    print("  " + bound(*sampler.phase(outage_from + args.kill_after, outage_from + args.outage)))
    if sampler.shard_cpu:
        spread = ", ".join(f"{cpu:.1f}" for cpu in sampler.shard_cpu.values())
        print(f"CPU seconds of each device shard ({args.procs} processes): {spread}")
    for violation in result.violations:
        print(f"invariant broken: {violation.line()}")
    for note in result.notes[:5]:
        print(f"note: {note}")
    errors = obs.errors.most_common(5)
    if errors:
        print("network errors: " + "; ".join(f"{n} x {e}" for e, n in errors))
    if args.timeline is not None:
        write_timeline(args.timeline, obs)
    print(
        f"sim_devices={args.devices} online_s={fmt(online)} delivered_ratio={ratio:.6f} "
        f"lost={lost} recovery_s={fmt(recovery)}"
    )
    return 0


def back_text(obs: Observations, killed: float) -> str:
    """When each half of the recovery criterion came back (connected count, delivered rate),
    so the figure says which of the two bounded it."""
    before = range(int(killed) - RECOVERY_WINDOW_S, int(killed))
    connected = sum(obs.connected[s] for s in before) / len(before)
    rate = sum(obs.counts[DELIVERED][s] for s in before) / len(before)
    parts = []
    for name, per_s, level in (
        ("connected count", obs.connected, connected),
        ("delivered rate", obs.counts[DELIVERED], rate),
    ):
        at = back_at(per_s, killed, 0.95 * level)
        when = "never" if at is None else f"{at:.0f} s after the kill"
        parts.append(f"{name} back to 95 % of {level:,.0f}: {when}")
    return "; ".join(parts)


def write_timeline(path: Path, obs: Observations) -> None:
    """second, connected, then each per-second counter: to see a phase second by second."""
    names = sorted(obs.counts)
    rows = [",".join(["second", "connected", *names])]
    for second in range(obs.seconds()):
        values = [obs.connected[second], *(obs.counts[n][second] for n in names)]
        rows.append(",".join(str(v) for v in [second, *values]))
    path.write_text("\n".join(rows) + "\n")


def pct(samples: list[float], fraction: float) -> str:
    if not samples:
        return "-"
    ordered = sorted(samples)
    return f"{ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]:.0f}"


def fmt(value: float | None) -> str:
    return "nan" if value is None else f"{value:.1f}"


if __name__ == "__main__":
    sys.exit(asyncio.run(main(parse_args())))
