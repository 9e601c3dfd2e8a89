"""Scenario files: what a simulated fleet does over time, parsed into frozen data.

Pure: TOML text (or a parsed table) in, a :class:`Scenario` out, or a :class:`ScenarioError`
that names the file, the table and the key. The runner (:mod:`firmware_sim.engine`) does the
I/O. The format is documented in docs/simulation.md; examples/scenarios/ has worked examples.
"""

from __future__ import annotations

import enum
import math
import tomllib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

MAX_HARDWARE_DEVICES = 20  # per tpm/smartcard group: one swtpm or virtual card per device
MAX_HARDWARE_TOTAL = 40  # in a scenario: each is its daemons and a Python process


class ScenarioError(ValueError):
    """A scenario file that cannot run; the message names where and what to change."""


class KeyStore(enum.StrEnum):
    FILE = "file"
    TPM = "tpm"
    SMARTCARD = "smartcard"


class Misbehaviour(enum.StrEnum):
    """What a misbehaving device does, and (see :data:`EXPECTED_REFUSAL`) how it must be told."""

    ACL_PROBE = "acl-probe"
    FOREIGN_CA = "foreign-ca"
    EXPIRED_CERTIFICATE = "expired-certificate"
    OVERSIZED_PACKET = "oversized-packet"
    FLOOD = "flood"
    SLOW_SUBSCRIBER = "slow-subscriber"


# The one answer each misbehaviour must get; any other answer breaks the "expected reason"
# invariant. A flood is slowed by TCP backpressure (no refusal), a slow subscriber is served.
EXPECTED_REFUSAL: dict[Misbehaviour, tuple[str, ...]] = {
    Misbehaviour.ACL_PROBE: ("SUBACK NOT_AUTHORIZED",),  # and PUBACK NOT_AUTHORIZED before
    Misbehaviour.FOREIGN_CA: ("TLS unknown ca",),
    Misbehaviour.EXPIRED_CERTIFICATE: ("TLS certificate expired",),
    Misbehaviour.OVERSIZED_PACKET: ("DISCONNECT PACKET_TOO_LARGE",),
    Misbehaviour.FLOOD: (),
    Misbehaviour.SLOW_SUBSCRIBER: (),
}


class FaultKind(enum.StrEnum):
    BROKER_KILL = "broker-kill"  # SIGKILL, started again after duration_s
    BROKER_RESTART = "broker-restart"  # SIGTERM (graceful), started again after duration_s
    IMPAIR = "impair"  # delay / jitter / loss / bandwidth through the impairment proxy
    PARTITION = "partition"  # blackhole: nothing passes the proxy for duration_s
    RESET = "reset"  # every proxied connection reset at at_s
    REVOKE = "revoke"  # revoke percent % of group
    RENEWAL_WAVE = "renewal-wave"  # group's certificates expire at at_s + duration_s
    UPSTREAM_OUTAGE = "upstream-outage"  # [bridge]: the upstream stopped for duration_s
    NODE_KILL = "node-kill"  # fabric: SIGKILL broker node ``node``, started again after duration_s
    NODE_RESTART = "node-restart"  # fabric: SIGTERM broker node ``node``, started again
    NATS_KILL = "nats-kill"  # fabric: SIGKILL nats-server ``node``, started again after duration_s
    NATS_RESTART = "nats-restart"  # fabric: SIGTERM nats-server ``node``, started again


FABRIC_FAULTS = frozenset(
    {FaultKind.NODE_KILL, FaultKind.NODE_RESTART, FaultKind.NATS_KILL, FaultKind.NATS_RESTART}
)
NEEDS_SERVICES = (
    frozenset(
        {FaultKind.BROKER_KILL, FaultKind.BROKER_RESTART, FaultKind.REVOKE, FaultKind.RENEWAL_WAVE}
    )
    | FABRIC_FAULTS
)
NEEDS_PROXY = frozenset({FaultKind.IMPAIR, FaultKind.PARTITION, FaultKind.RESET})
DEPLOYMENT_FAULTS = FABRIC_FAULTS | {FaultKind.UPSTREAM_OUTAGE}  # done by the deployment
UPSTREAMS = ("mosquitto",)
# [[bridge]] settings the simulator sets itself; a scenario's [bridge] may set the others
BRIDGE_OWN = frozenset({"name", "host", "port", "keystore", "ca_file", "server_name", "out", "in"})


@dataclass(frozen=True)
class Deployment:
    """``[deployment]``: what the in-process mode runs. ``fabric = N`` (N >= 1) runs N broker
    nodes sharing a ``nats_nodes``-server NATS JetStream cluster on loopback (durable sessions,
    cross-node routing) instead of one broker with everything in memory (``fabric = 0``)."""

    fabric: int = 0
    nats_nodes: int = 3


@dataclass(frozen=True)
class Group:
    """Devices that share a registry group, a key store and a traffic shape."""

    name: str
    devices: int
    key_store: KeyStore = KeyStore.FILE
    rate: float = 1.0  # telemetry messages per second per device (stages may override)
    payload_bytes: int = 64
    qos: int = 1
    mqtt: int = 5  # 5 or 3 (3.1.1)
    persistent: bool = True  # clean_start false with a session expiry: queued QoS 1/2 survives
    reconnect_max_s: float = 30.0  # the cap of the devices' jittered exponential backoff
    # The group's ACL template (in-process only); empty: the registry's built-in default
    acl_publish: tuple[str, ...] = ()
    acl_subscribe: tuple[str, ...] = ()


@dataclass(frozen=True)
class Stage:
    """One period of the run. Devices come online at ``connect_rate``/s until ``online`` of
    each group is connected (devices enroll over EST just before their first connect); a lower
    ``online`` than before disconnects the surplus. ``churn`` is the share of connected devices
    that disconnect and reconnect each second."""

    name: str
    duration_s: float
    connect_rate: float = 100.0
    online: float = 1.0
    rate: float | None = None  # overrides every group's rate for this stage
    churn: float = 0.0
    groups: tuple[str, ...] = ()  # empty: every group

    def rate_for(self, group: Group) -> float:
        return group.rate if self.rate is None else self.rate


@dataclass(frozen=True)
class MisbehaviourSpec:
    kind: Misbehaviour
    count: int = 1
    at_s: float = 0.0
    ack_delay_s: float = 0.05  # slow-subscriber: how long it sits on each message
    rate: float = 0.0  # flood: attempted messages/s (0: as fast as the broker lets it)


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    at_s: float
    duration_s: float = 0.0
    group: str = ""
    percent: float = 0.0  # revoke
    delay_ms: float = 0.0  # impair
    jitter_ms: float = 0.0
    loss: float = 0.0  # share of chunks held back one retransmission timeout
    bandwidth_kbps: float = 0.0  # per direction, shared by every connection; 0: unlimited
    node: int = 1  # node-*, nats-*: which broker node or nats-server (1-based)

    @property
    def label(self) -> str:
        if self.kind in (FaultKind.NODE_KILL, FaultKind.NODE_RESTART):
            return f"{self.kind} broker-{self.node}"
        if self.kind in (FaultKind.NATS_KILL, FaultKind.NATS_RESTART):
            return f"{self.kind} n{self.node}"
        if self.kind == FaultKind.REVOKE:
            return f"revoke {self.percent:g}% of {self.group}"
        if self.kind == FaultKind.IMPAIR:
            parts = [
                f"{self.delay_ms:g}±{self.jitter_ms:g} ms" if self.delay_ms else "",
                f"loss {self.loss:.0%}" if self.loss else "",
                f"{self.bandwidth_kbps:g} kbit/s" if self.bandwidth_kbps else "",
            ]
            return "impair " + ", ".join(p for p in parts if p)
        if self.kind == FaultKind.RENEWAL_WAVE:
            return f"renewal wave {self.group}"
        return str(self.kind)


@dataclass(frozen=True)
class Scenario:
    name: str
    groups: tuple[Group, ...]
    stages: tuple[Stage, ...]
    description: str = ""
    seed: int = 1
    misbehaviour: tuple[MisbehaviourSpec, ...] = ()
    faults: tuple[Fault, ...] = ()
    drain_s: float = 5.0  # after the last stage: wait this long for deliveries to arrive
    broker_config: Mapping[str, Any] = field(default_factory=dict)  # [broker] for in-process
    deployment: Deployment = Deployment()
    # [bridge]: fleetgate's [[bridge]] settings (beyond what the simulator sets) for a bridge
    # of every device's telemetry to an upstream the simulator starts; None: no bridge
    bridge: Mapping[str, Any] | None = None

    @property
    def duration_s(self) -> float:
        return sum(stage.duration_s for stage in self.stages)

    @property
    def devices(self) -> int:
        return sum(group.devices for group in self.groups)

    def group(self, name: str) -> Group:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def stage_at(self, t: float) -> Stage:
        """The stage running at ``t`` seconds after the start (the last one after the end)."""
        return self._stage_span(t)[0]

    def stage_end(self, t: float) -> float:
        """When the stage running at ``t`` ends (the run's end after it)."""
        return self._stage_span(t)[1]

    def _stage_span(self, t: float) -> tuple[Stage, float]:
        end = 0.0
        for stage in self.stages:
            end += stage.duration_s
            if t < end:
                return stage, end
        return self.stages[-1], end
        return end

    def needs_services(self) -> list[str]:
        """What in this scenario only the in-process mode (its own CA and broker) can do."""
        found = [f"fault {f.kind}" for f in self.faults if f.kind in NEEDS_SERVICES]
        found += [
            f"misbehaviour {m.kind}"
            for m in self.misbehaviour
            if m.kind == Misbehaviour.EXPIRED_CERTIFICATE
        ]
        if self.broker_config:
            found.append("[broker] settings")
        if self.deployment.fabric:
            found.append("[deployment] fabric")
        if self.bridge is not None:
            found.append("[bridge]")
        found += [f"group {g.name}'s ACL" for g in self.groups if g.acl_publish or g.acl_subscribe]
        found += [
            f"group {g.name}'s key_store {g.key_store}"
            for g in self.groups
            if g.key_store != KeyStore.FILE
        ]
        return found

    def needs_proxy(self) -> bool:
        return any(f.kind in NEEDS_PROXY for f in self.faults)


DEFAULT = Scenario(
    name="default",
    description="100 devices come online at 50/s, publish 1 msg/s for 20 s with a little churn "
    "and three misbehaving devices; then 5 % of them are revoked.",
    groups=(Group("sensors", 100, rate=1.0),),
    stages=(
        Stage("ramp", 4.0, connect_rate=50.0),
        Stage("steady", 16.0, churn=0.01),
    ),
    misbehaviour=(
        MisbehaviourSpec(Misbehaviour.ACL_PROBE, at_s=3.0),
        MisbehaviourSpec(Misbehaviour.FOREIGN_CA, at_s=3.0),
        MisbehaviourSpec(Misbehaviour.EXPIRED_CERTIFICATE, at_s=3.0),
    ),
    faults=(Fault(FaultKind.REVOKE, at_s=12.0, group="sensors", percent=5.0),),
)


def resized(scenario: Scenario, devices: int) -> Scenario:
    """The same scenario with ``devices`` devices, shared among the file-key groups in
    proportion; tpm and smartcard groups keep their (small) size."""
    if devices < len(scenario.groups):
        raise ScenarioError(f"--devices {devices}: at least one per group is needed")
    files = [n for n, g in enumerate(scenario.groups) if g.key_store == KeyStore.FILE]
    hardware = scenario.devices - sum(scenario.groups[n].devices for n in files)
    if not files or devices - hardware < len(files):
        raise ScenarioError(
            f"--devices {devices}: the tpm/smartcard groups keep their {hardware} devices; "
            "the file-key groups need at least one each"
        )
    total = scenario.devices - hardware
    wanted = devices - hardware
    groups = [
        replace(g, devices=max(1, round(g.devices * wanted / total))) if n in files else g
        for n, g in enumerate(scenario.groups)
    ]
    first = files[0]
    groups[first] = replace(
        groups[first],
        devices=max(1, groups[first].devices + devices - sum(g.devices for g in groups)),
    )
    resized = replace(scenario, groups=tuple(groups))
    check_scenario(resized)
    return resized


# -- parsing -------------------------------------------------------------------------------------


def load_scenario(path: Path) -> Scenario:
    """Read and check a scenario file."""
    try:
        table = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read it ({exc.strerror})") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from exc
    try:
        return parse_scenario(table, default_name=path.stem)
    except ScenarioError as exc:
        raise ScenarioError(f"{path}: {exc}") from exc


def parse_scenario(table: Mapping[str, Any], *, default_name: str = "scenario") -> Scenario:
    top = _Table("the top level", table)
    groups = tuple(
        _build(
            Group,
            f"[[groups]] #{n + 1}",
            item,
            {"key_store": KeyStore, "acl_publish": tuple, "acl_subscribe": tuple},
        )
        for n, item in enumerate(top.list_of_tables("groups", required=True))
    )
    stages = tuple(
        _build(Stage, f"[[stages]] #{n + 1}", item, {"groups": tuple})
        for n, item in enumerate(top.list_of_tables("stages", required=True))
    )
    misbehaviour = tuple(
        _build(MisbehaviourSpec, f"[[misbehaviour]] #{n + 1}", item, {"kind": Misbehaviour})
        for n, item in enumerate(top.list_of_tables("misbehaviour"))
    )
    faults = tuple(
        _build(Fault, f"[[faults]] #{n + 1}", item, {"kind": FaultKind})
        for n, item in enumerate(top.list_of_tables("faults"))
    )
    broker = top.pop("broker", {})
    if not isinstance(broker, dict):
        raise ScenarioError("[broker] must be a table (fleetgate.toml's [broker] settings)")
    deployment = top.pop("deployment", {})
    if not isinstance(deployment, dict):
        raise ScenarioError("[deployment] must be a table (fabric = 2)")
    scenario = Scenario(
        name=str(top.pop("name", default_name)),
        description=str(top.pop("description", "")),
        seed=int(top.pop("seed", 1)),
        drain_s=float(top.pop("drain_s", 5.0)),
        groups=groups,
        stages=stages,
        misbehaviour=misbehaviour,
        faults=faults,
        broker_config=broker,
        deployment=_build(Deployment, "[deployment]", deployment, {}),
        bridge=_bridge(top.pop("bridge", None)),
    )
    top.done()
    check_scenario(scenario)
    return scenario


def _bridge(table: Any) -> dict[str, Any] | None:
    if table is None:
        return None
    if not isinstance(table, dict):
        raise ScenarioError('[bridge] must be a table (upstream = "mosquitto")')
    settings = dict(table)
    upstream = settings.pop("upstream", UPSTREAMS[0])
    if upstream not in UPSTREAMS:
        raise ScenarioError(f"[bridge] upstream = {upstream!r}: expected one of {list(UPSTREAMS)}")
    own = sorted(BRIDGE_OWN & set(settings))
    if own:
        raise ScenarioError(f"[bridge]: the simulator sets {', '.join(own)} itself")
    return settings


def check_scenario(scenario: Scenario) -> None:
    """Every value in range and every reference resolved; raises :class:`ScenarioError`."""
    names = [g.name for g in scenario.groups]
    if len(set(names)) != len(names):
        raise ScenarioError(f"group names must be unique: {names}")
    for group in scenario.groups:
        where = f"group {group.name!r}"
        _require(group.devices >= 1, f"{where}: devices must be at least 1")
        _require(group.qos in (0, 1, 2), f"{where}: qos must be 0, 1 or 2")
        _require(group.mqtt in (3, 5), f"{where}: mqtt must be 5 or 3 (3.1.1)")
        _require(group.rate >= 0, f"{where}: rate must not be negative")
        _require(group.reconnect_max_s >= 0.5, f"{where}: reconnect_max_s must be >= 0.5")
        _require(0 <= group.payload_bytes <= 1 << 20, f"{where}: payload_bytes 0 .. 1 MiB")
        if group.key_store != KeyStore.FILE:
            _check_hardware_group(group, where)
    hardware = sum(g.devices for g in scenario.groups if g.key_store != KeyStore.FILE)
    _require(
        hardware <= MAX_HARDWARE_TOTAL,
        f"{hardware} tpm/smartcard devices: at most {MAX_HARDWARE_TOTAL} in a scenario "
        "(each is a virtual TPM or card with its daemons, and a process)",
    )
    _require(
        not scenario.misbehaviour or any(g.key_store == KeyStore.FILE for g in scenario.groups),
        '[[misbehaviour]] needs a group with key_store = "file" (misbehaving devices hold '
        "software keys, which a tpm or smartcard group refuses)",
    )
    for stage in scenario.stages:
        where = f"stage {stage.name!r}"
        _require(stage.duration_s > 0, f"{where}: duration_s must be positive")
        _require(stage.connect_rate > 0, f"{where}: connect_rate must be positive")
        _require(0 <= stage.online <= 1, f"{where}: online is a share, 0 .. 1")
        _require(0 <= stage.churn <= 1, f"{where}: churn is a share per second, 0 .. 1")
        _require(stage.rate is None or stage.rate >= 0, f"{where}: rate must not be negative")
        for name in stage.groups:
            _require(name in names, f"{where}: no group {name!r} (groups: {names})")
    for spec in scenario.misbehaviour:
        _require(spec.count >= 1, f"misbehaviour {spec.kind}: count must be at least 1")
        _require(
            0 <= spec.at_s < scenario.duration_s,
            f"misbehaviour {spec.kind}: at_s must fall inside the run "
            f"(0 .. {scenario.duration_s:g} s)",
        )
    fabric = scenario.deployment
    _require(0 <= fabric.fabric <= 8, "[deployment] fabric: 0 (one broker) .. 8 broker nodes")
    _require(1 <= fabric.nats_nodes <= 5, "[deployment] nats_nodes: 1 .. 5 nats-servers")
    for fault in scenario.faults:
        _check_fault(scenario, fault, names)


def _check_hardware_group(group: Group, where: str) -> None:
    """A tpm/smartcard group: small, and only what the device SDK on the hardware does."""
    kind = group.key_store
    _require(
        group.devices <= MAX_HARDWARE_DEVICES,
        f"{where}: a {kind} line has at most {MAX_HARDWARE_DEVICES} devices (each gets its "
        f'own virtual {kind}); use key_store = "file" for large groups',
    )
    _require(
        group.qos in (0, 1),
        f"{where}: qos 0 or 1 with key_store {kind} (the device SDK does not publish QoS 2)",
    )


def _check_fault(scenario: Scenario, fault: Fault, names: list[str]) -> None:
    where = f"fault {fault.kind} at {fault.at_s:g} s"
    if fault.kind == FaultKind.UPSTREAM_OUTAGE:
        _require(scenario.bridge is not None, f"{where}: needs a [bridge] (its upstream)")
        _require(fault.duration_s > 0, f"{where}: duration_s must be positive")
    _require(
        0 <= fault.at_s < scenario.duration_s,
        f"{where}: at_s must fall inside the run (0 .. {scenario.duration_s:g} s)",
    )
    _require(fault.duration_s >= 0, f"{where}: duration_s must not be negative")
    if fault.kind in (FaultKind.REVOKE, FaultKind.RENEWAL_WAVE):
        _require(fault.group in names, f"{where}: group must name a group (groups: {names})")
    if fault.kind == FaultKind.REVOKE:
        _require(0 < fault.percent <= 100, f"{where}: percent must be in 0 .. 100")
    if fault.kind == FaultKind.RENEWAL_WAVE:
        _require(fault.duration_s >= 5, f"{where}: duration_s (the renewal window) >= 5 s")
        _require(
            scenario.group(fault.group).key_store == KeyStore.FILE,
            f"{where}: renews software keys only (group {fault.group!r} is key_store "
            f"{scenario.group(fault.group).key_store})",
        )
    if fault.kind in (FaultKind.IMPAIR, FaultKind.PARTITION):
        _require(fault.duration_s > 0, f"{where}: duration_s must be positive")
    if fault.kind in FABRIC_FAULTS:
        nodes = scenario.deployment.fabric
        if fault.kind in (FaultKind.NATS_KILL, FaultKind.NATS_RESTART):
            nodes = scenario.deployment.nats_nodes if nodes else 0
        _require(
            scenario.deployment.fabric,
            f"{where}: needs a fabric deployment ([deployment] fabric = 2)",
        )
        _require(1 <= fault.node <= nodes, f"{where}: node must be 1 .. {nodes}")
    if fault.kind == FaultKind.IMPAIR:
        _require(0 <= fault.loss < 1, f"{where}: loss is a share, 0 .. 1")
        _require(fault.jitter_ms <= fault.delay_ms, f"{where}: jitter_ms must be <= delay_ms")
        _require(
            fault.delay_ms or fault.loss or fault.bandwidth_kbps,
            f"{where}: say delay_ms, loss or bandwidth_kbps",
        )


def _require(condition: object, message: str) -> None:
    if not condition:
        raise ScenarioError(message)


class _Table:
    """A table whose keys are taken one by one, so that unknown keys can be named."""

    def __init__(self, where: str, table: Mapping[str, Any]) -> None:
        self.where = where
        self.rest = dict(table)

    def pop(self, key: str, default: Any) -> Any:
        return self.rest.pop(key, default)

    def list_of_tables(self, key: str, *, required: bool = False) -> list[Mapping[str, Any]]:
        value = self.rest.pop(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise ScenarioError(f"{key} must be an array of tables ([[{key}]])")
        if required and not value:
            raise ScenarioError(f"at least one [[{key}]] is needed")
        return value

    def done(self) -> None:
        if self.rest:
            raise ScenarioError(f"unknown key(s) at {self.where}: {', '.join(sorted(self.rest))}")


def _build(cls: type[Any], where: str, table: Mapping[str, Any], convert: dict[str, Any]) -> Any:
    """One dataclass from one TOML table: unknown keys, missing keys and wrong types named."""
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ScenarioError(
            f"{where}: unknown key(s) {', '.join(unknown)} (known: {sorted(known)})"
        )
    values: dict[str, Any] = {}
    for name, value in table.items():
        try:
            values[name] = _coerce(name, value, str(known[name].type), convert.get(name))
        except (TypeError, ValueError) as exc:
            raise ScenarioError(f"{where}: {name} = {value!r}: {exc}") from exc
    try:
        return cls(**values)
    except TypeError as exc:
        missing = [n for n, f in known.items() if n not in values and _required(f)]
        raise ScenarioError(f"{where}: missing {', '.join(missing) or exc}") from exc


def _required(f: Any) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def _coerce(name: str, value: Any, annotation: str, convert: Any) -> Any:
    if convert is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise TypeError("expected a list of strings")
        return tuple(value)
    if convert is not None:
        if not isinstance(value, str):
            raise TypeError(f"expected one of {[m.value for m in convert]}")
        try:
            return convert(value)
        except ValueError:
            raise ValueError(f"expected one of {[m.value for m in convert]}") from None
    if isinstance(value, bool) or annotation == "bool":
        if not isinstance(value, bool) or annotation != "bool":
            raise TypeError(f"expected a {annotation.split(' ')[0]}")
        return value
    if annotation == "str":
        if not isinstance(value, str):
            raise TypeError("expected a string")
        return value
    if annotation == "int":
        if not isinstance(value, int):
            raise TypeError("expected a whole number")
        return value
    if annotation.startswith("float"):
        if not isinstance(value, int | float) or not math.isfinite(value):
            raise TypeError("expected a number")
        return float(value)
    raise TypeError(f"cannot set {name} from a scenario file")


__all__ = [
    "DEFAULT",
    "DEPLOYMENT_FAULTS",
    "EXPECTED_REFUSAL",
    "FABRIC_FAULTS",
    "MAX_HARDWARE_DEVICES",
    "MAX_HARDWARE_TOTAL",
    "Deployment",
    "Fault",
    "FaultKind",
    "Group",
    "KeyStore",
    "Misbehaviour",
    "MisbehaviourSpec",
    "Scenario",
    "ScenarioError",
    "Stage",
    "load_scenario",
    "parse_scenario",
    "resized",
]
