"""Runs a scenario: provisions (in-process) or connects (remote), drives the shards of devices,
the backend subscriber, the misbehaving devices and the faults, then checks the invariants.

The coordinator (this module) owns everything that is not an ordinary device: the services and
their faults, the impairment proxy, the backend that must receive every acknowledged message,
and the misbehaving devices with the answers they must get.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import itertools
import multiprocessing
import resource
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from broker.mqtt import Publish, QoS, ReasonCode
from device_sdk.est import client_context
from enrollment import profiles
from firmware_sim.deployment import LocalDeployment, Target
from firmware_sim.devices import (
    HEAD,
    Clock,
    Enroller,
    Shard,
    credentials_path,
    device_ids,
    payload_for,
    renewal_due,
    revoked_ids,
    run_shard_process,
    store_credentials,
    tls_reason,
)
from firmware_sim.fabric_deployment import deployment_for
from firmware_sim.fleet import BACKEND_ACL, BACKEND_GROUP
from firmware_sim.hardware_fleet import HardwareAccess, HardwareFleet, hardware_devices
from firmware_sim.impairment import Impairment, ImpairmentProxy
from firmware_sim.mqtt_client import Refused, SessionClosed, SimClient
from firmware_sim.observations import (
    SENT,
    FaultMark,
    Observations,
    Violation,
    check_invariants,
    recovery_time,
)
from firmware_sim.scenario import (
    DEPLOYMENT_FAULTS,
    EXPECTED_REFUSAL,
    FABRIC_FAULTS,
    Fault,
    FaultKind,
    KeyStore,
    Misbehaviour,
    MisbehaviourSpec,
    Scenario,
)
from firmware_sim.upstream import UPSTREAM_SUBSCRIBER
from fleetgate.ids import device_uri

TELEMETRY = "devices/+/telemetry"
SLOW_GROUP = "sim-slow-subscribers"
FLOOD_S = 3.0
OVERSIZE = 2 * 1024 * 1024  # above any sensible broker.max_packet_size (default 256 KiB)


@dataclass(frozen=True)
class Remote:
    """A running deployment: its EST URL, a station's credentials, its brokers, and (to check
    delivery) credentials of an identity allowed to subscribe to ``devices/+/telemetry``."""

    est_url: str
    brokers: tuple[tuple[str, int], ...]
    root: Path
    station_cert: Path
    station_key: Path
    id_prefix: str
    subscriber: Path | None = None  # key + certificate chain, PEM
    server_hostname: str = "localhost"


@dataclass
class Progress:
    """What the live line shows."""

    t: float = 0.0
    duration: float = 0.0
    connected: int = 0
    devices: int = 0
    delivered_per_s: float = 0.0
    refusals: int = 0
    stage: str = ""


@dataclass
class RunResult:
    scenario: Scenario
    obs: Observations
    violations: list[Violation]
    faults: list[FaultMark]
    checked_subscribers: tuple[str, ...]
    seconds: float
    mode: str
    notes: list[str] = field(default_factory=list)
    data_dir: Path | None = None
    hardware: dict[str, str] = field(default_factory=dict)  # key store -> what stood in for it


class Coordinator:
    def __init__(
        self,
        scenario: Scenario,
        *,
        remote: Remote | None = None,
        home: Path | None = None,
        procs: int = 1,
        keep: bool = False,
        progress: Callable[[Progress], None] = lambda p: None,
    ) -> None:
        if remote is not None:
            needs = scenario.needs_services()
            if needs:
                raise ValueError(
                    "against a running deployment the simulator cannot do "
                    f"{', '.join(needs)}: run it in-process (no --est-url) instead"
                )
        self.scenario = scenario
        self.remote = remote
        self.home = home
        self.procs = max(1, procs)
        self.keep = keep
        self.progress = progress
        self.run_id = f"sim-{dt.datetime.now(dt.UTC):%H%M%S}-{secrets.token_hex(2)}"
        self.obs = Observations()  # the coordinator's own: backend, misbehaviour, faults
        self.marks: list[FaultMark] = []
        self.notes: list[str] = []
        self.deployment: LocalDeployment | None = None
        self.hardware_fleet: HardwareFleet | None = None
        self.hardware: dict[str, HardwareAccess] = {}  # tpm/smartcard device id -> access
        self.proxies: list[ImpairmentProxy] = []
        self.shard_connected: dict[int, int] = {}
        self.shard_refusals: dict[int, int] = {}
        self.subscribers: list[str] = []
        self.delivered_total = 0
        self._stop = asyncio.Event()

    # -- the run ---------------------------------------------------------------------------------

    async def run(self) -> RunResult:
        started = time.perf_counter()
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # thousands of sockets; children
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # (services, shards) inherit it
        try:
            target, backend = await self._provision()
            direct = target
            if self.scenario.needs_proxy():
                target = await self._proxied(target)
            spawned = await self._spawn(target)
            self.clock = Clock(time.monotonic() + 0.2, time.time() + 0.2)
            tasks = [
                asyncio.create_task(self._subscriber(direct, *backend, ack_delay_s=0.0)),
                asyncio.create_task(self._faults()),
                asyncio.create_task(self._ticker()),
                *(asyncio.create_task(self._misbehave(direct, m)) for m in self._misbehaviour()),
            ]
            if self.deployment is not None and self.deployment.upstream is not None:
                upstream = replace(direct, brokers=(self.deployment.upstream.address,))
                subscriber = self._subscriber(
                    upstream, UPSTREAM_SUBSCRIBER, backend[1], ack_delay_s=0
                )
                tasks.append(asyncio.create_task(subscriber))
            shard_obs = await self._shards(target, spawned)
            await self._drain(shard_obs)
            self._stop.set()
            for task in tasks:
                task.cancel()
            for outcome in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(outcome, Exception):  # a fault or misbehaviour that failed
                    self.notes.append(f"{type(outcome).__name__}: {outcome}")
        finally:
            for proxy in self.proxies:
                await proxy.stop()
            if self.deployment is not None:
                self.deployment.close(keep=self.keep)
            if self.hardware_fleet is not None:
                self.hardware_fleet.close()
        obs = self.obs
        for other in shard_obs:
            obs.merge(other)
        checked = tuple(self.subscribers)
        violations = check_invariants(obs, checked_subscribers=checked)
        self.notes += pace_notes(self.scenario, obs)
        marks = [self._recovered(m) for m in self.marks]
        mode = (
            f"against {self.remote.est_url}"
            if self.remote is not None
            else "in-process, throw-away data directory"
            if self.home is None
            else f"in-process on {self.home}"
        )
        data_dir = self.deployment.home if self.deployment and self.keep else None
        fleet = self.hardware_fleet
        return RunResult(
            self.scenario,
            obs,
            violations,
            marks,
            checked,
            time.perf_counter() - started,
            mode,
            self.notes,
            data_dir,
            fleet.descriptions() if fleet is not None else {},
        )

    def _recovered(self, mark: FaultMark) -> FaultMark:
        """Recovery after a fault; after a revocation storm, to the fleet minus the revoked
        devices and their share of the traffic."""
        if mark.renewal:
            return mark
        scenario = self.scenario
        keep, keep_rate = 1.0, 1.0
        end = mark.end
        traffic = sum(g.devices * g.rate for g in scenario.groups) or 1.0
        for fault in scenario.faults:
            if fault.kind in FABRIC_FAULTS and fault.label == mark.label:
                end = mark.start  # the other nodes serve meanwhile: back before it restarts
            if fault.kind == FaultKind.REVOKE and fault.label == mark.label:
                group = scenario.group(fault.group)
                revoked = max(1, round(group.devices * fault.percent / 100))
                keep -= revoked / scenario.devices
                keep_rate -= revoked * group.rate / traffic
        recovery = recovery_time(self.obs, mark.start, end, keep=keep, keep_rate=keep_rate)
        return replace(mark, recovery_s=recovery)

    # -- provisioning ----------------------------------------------------------------------------

    async def _provision(self) -> tuple[Target, tuple[str, Path | None]]:
        """The target devices use, and the backend subscriber's id and credentials."""
        if self.remote is not None:
            remote = self.remote
            workdir = Path.home() / ".cache" / "fleetgate-sim" / self.run_id
            target = Target(
                remote.est_url,
                remote.brokers,
                remote.root,
                remote.station_cert,
                remote.station_key,
                workdir,
                remote.id_prefix,
                remote.server_hostname,
            )
            if remote.subscriber is None:
                self.notes.append("no --subscriber: deliveries were not checked")
                return target, ("", None)
            cert = x509.load_pem_x509_certificates(remote.subscriber.read_bytes())[0]
            name = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)[0].value
            return target, (str(name), remote.subscriber)
        deployment = self.deployment = deployment_for(self.scenario, self.home)
        await asyncio.to_thread(deployment.prepare)
        prefix = "" if self.home is None else f"{self.run_id}-"
        workdir = deployment.home / "sim" / self.run_id
        target = deployment.target(workdir, prefix)
        ids = device_ids(self.scenario, prefix)
        first = first_file_group(self.scenario)
        for group, members in ids.items():
            extra = self._misbehaving_ids(prefix) if group == first else []
            spec = self.scenario.group(group)
            acl = None
            if spec.acl_publish or spec.acl_subscribe:
                acl = {"publish": list(spec.acl_publish), "subscribe": list(spec.acl_subscribe)}
            await asyncio.to_thread(deployment.assign, group, members + extra, acl)
        self._manufacture(deployment, workdir, ids)
        backend = f"{prefix}backend"
        slow = [
            f"{prefix}slow-subscriber-{n}"
            for m in self.scenario.misbehaviour
            if m.kind == Misbehaviour.SLOW_SUBSCRIBER
            for n in range(m.count)
        ]
        await asyncio.to_thread(deployment.assign, BACKEND_GROUP, [backend], BACKEND_ACL)
        if slow:  # a group of their own, so a scenario can give them their own [broker] limits
            await asyncio.to_thread(deployment.assign, SLOW_GROUP, slow, BACKEND_ACL)
        await deployment.start()
        enroller = Enroller(target)
        for device_id in [backend, *slow, *self._misbehaving_ids(prefix)]:
            if "foreign-ca" not in device_id:
                await asyncio.to_thread(enroller.enroll, device_id)
        await asyncio.to_thread(self._backdate_renewal_groups, target, ids)
        return target, (backend, credentials_path(target, backend))

    def _manufacture(
        self, deployment: LocalDeployment, workdir: Path, ids: dict[str, list[str]]
    ) -> None:
        """A virtual TPM or card per device of a hardware group, each group requiring its key
        store, and the EST service trusting this run's manufacturers. On this (the main)
        thread, before the services start: card daemons die with the thread that made them."""
        wanted = hardware_devices(list(self.scenario.groups), ids)
        if not wanted:
            return
        assert deployment.service is not None
        for group in self.scenario.groups:
            if group.key_store != KeyStore.FILE:
                deployment.service.registry.set_group_policy(
                    group.name, str(group.key_store), actor="sim"
                )
        self.hardware_fleet = HardwareFleet(workdir)
        self.hardware = self.hardware_fleet.manufacture(wanted)
        enrollment = deployment.service_env.setdefault("enrollment", {})
        enrollment.update(self.hardware_fleet.service_env())

    def _misbehaving_ids(self, prefix: str) -> list[str]:
        return [
            f"{prefix}{m.kind}-{n}"
            for m in self.scenario.misbehaviour
            if m.kind != Misbehaviour.SLOW_SUBSCRIBER
            for n in range(m.count)
        ]

    def _backdate_renewal_groups(self, target: Target, ids: dict[str, list[str]]) -> None:
        """A renewal wave's devices hold certificates that expire during the run."""
        assert self.deployment is not None
        for group, (expires, _) in renewal_due(self.scenario).items():
            members = ids[group]
            estimate = 1.0 + 0.005 * len(members)  # until the run starts
            expires_at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=estimate + expires)
            for device_id in members:
                key = ec.generate_private_key(ec.SECP256R1())
                cert = self.deployment.backdated_enroll(device_id, key.public_key(), expires_at)
                store_credentials(
                    credentials_path(target, device_id), key, [cert.public_bytes(Encoding.PEM)]
                )
                self.obs.enrolled += 1

    async def _proxied(self, target: Target) -> Target:
        brokers = []
        for host, port in target.brokers:
            proxy = ImpairmentProxy(host, port, seed=self.scenario.seed)
            self.proxies.append(proxy)
            brokers.append(("127.0.0.1", await proxy.start()))
        return replace(target, brokers=tuple(brokers))

    # -- shards ----------------------------------------------------------------------------------

    async def _spawn(self, target: Target) -> list[tuple[BaseProcess, Connection]]:
        """With ``--procs N``, N shard processes, each waiting (imported, ready) for the run's
        clock: the clock starts only when all are ready, so a slow start costs no stage time."""
        if self.procs == 1:
            return []
        context = multiprocessing.get_context("spawn")
        spawned: list[tuple[BaseProcess, Connection]] = []
        for index in range(self.procs):
            mine, theirs = context.Pipe()
            process = context.Process(
                target=run_shard_process,
                args=(self.scenario, target, index, self.procs, theirs, self.hardware),
                daemon=True,
            )
            process.start()
            theirs.close()
            spawned.append((process, mine))
        for _, pipe in spawned:
            try:
                await asyncio.to_thread(pipe.recv)  # ("ready", index, None)
            except EOFError as exc:
                raise RuntimeError("a shard process died while starting") from exc
        return spawned

    async def _shards(
        self, target: Target, spawned: list[tuple[BaseProcess, Connection]]
    ) -> list[Observations]:
        if not spawned:

            def status(shard: Shard) -> None:
                self.shard_connected[0] = shard.connected
                self.shard_refusals[0] = shard.obs.refusal_total

            shard = Shard(self.scenario, target, self.clock, status=status, hardware=self.hardware)
            return [await shard.run()]
        for _, pipe in spawned:
            pipe.send(self.clock)
        results = await asyncio.gather(
            *(asyncio.to_thread(self._listen, pipe) for _, pipe in spawned)
        )
        for process, _ in spawned:
            process.join(10)
        return [r for r in results if r is not None]

    def _listen(self, pipe: Connection) -> Observations | None:
        while True:
            try:
                kind, index, value = pipe.recv()
            except EOFError:
                self.notes.append("a shard process ended without its observations")
                return None
            if kind == "status":
                self.shard_connected[index], self.shard_refusals[index] = value
            else:
                return value  # type: ignore[no-any-return]

    async def _drain(self, shard_obs: list[Observations]) -> None:
        """Wait for in-flight deliveries: until every subscriber could have every acknowledged
        message, nothing more arrives for a second, or ``drain_s`` passed."""
        acked = sum(o.total("acknowledged") for o in shard_obs) + self.obs.total("acknowledged")
        deadline = time.monotonic() + self.scenario.drain_s
        last, quiet_since = -1, time.monotonic()
        while time.monotonic() < deadline and self.subscribers:
            if self.delivered_total >= acked * len(self.subscribers):
                return
            if self.delivered_total != last:
                last, quiet_since = self.delivered_total, time.monotonic()
            elif time.monotonic() - quiet_since > 1.0:
                return
            await asyncio.sleep(0.05)

    # -- the backend (and slow) subscribers -------------------------------------------------------

    async def _subscriber(
        self, target: Target, client_id: str, credentials: Path | None, *, ack_delay_s: float
    ) -> None:
        """Subscribes to every device's telemetry and counts what arrives; reconnects (and
        resubscribes when the broker lost the session) for as long as the run goes on."""
        if credentials is None:
            return
        context = client_context(target.root, credentials)
        self.obs.subscribers[client_id] = (TELEMETRY,)
        brokers = itertools.cycle(target.brokers)  # on a fabric: the next node when one fails
        host, port = next(brokers)

        def received(message: Publish) -> None:
            seq, sent = HEAD.unpack_from(message.payload)
            self.obs.delivered(client_id, message.topic, seq, sent, self.clock.now())
            self.delivered_total += 1

        down_since: float | None = None  # when the last connection ended
        while not self._stop.is_set():
            try:
                client = await SimClient.connect(
                    host,
                    port,
                    client_id=client_id,
                    context=context,
                    server_hostname=target.server_hostname,
                    session_expiry_s=3600,
                    on_message=received,
                    ack_delay_s=ack_delay_s,
                )
            except (OSError, SessionClosed, Refused, TimeoutError) as exc:
                self.obs.errors[f"subscriber connect: {exc}"[:120]] += 1
                host, port = next(brokers)
                await asyncio.sleep(0.2)
                continue
            try:
                if not client.session_present:
                    granted = await client.subscribe(TELEMETRY, QoS.EXACTLY_ONCE)
                    if granted >= ReasonCode.UNSPECIFIED_ERROR:
                        raise RuntimeError(f"{client_id} may not subscribe: {granted.name}")
                    if client_id not in self.subscribers:
                        self.subscribers.append(client_id)
                        self.obs.subscribed_at[client_id] = self.clock.now()
                    elif down_since is not None:  # the broker lost the session (a restart)
                        gap = (down_since, self.clock.now())
                        self.obs.unsubscribed.setdefault(client_id, []).append(gap)
                await client.closed
            except SessionClosed:
                pass
            finally:
                down_since = self.clock.now()
                await client.disconnect()

    # -- misbehaviour ----------------------------------------------------------------------------

    def _misbehaviour(self) -> list[tuple[MisbehaviourSpec, str]]:
        prefix = "" if self.remote is None and self.home is None else f"{self.run_id}-"
        if self.remote is not None:
            prefix = self.remote.id_prefix
        return [
            (m, f"{prefix}{m.kind}-{n}") for m in self.scenario.misbehaviour for n in range(m.count)
        ]

    async def _misbehave(self, target: Target, job: tuple[MisbehaviourSpec, str]) -> None:
        spec, device_id = job
        await self.clock.until(spec.at_s)
        if spec.kind == Misbehaviour.SLOW_SUBSCRIBER:
            path = credentials_path(target, device_id)
            await self._subscriber(target, device_id, path, ack_delay_s=spec.ack_delay_s)
            return
        path = await asyncio.to_thread(self._misbehaving_credentials, target, spec, device_id)
        expected = EXPECTED_REFUSAL[spec.kind]
        answer = await self._misbehaving_session(target, spec, device_id, path)
        if answer != "served":
            self.obs.refused(answer, self.clock.now())
        what = (
            "subscribe to every device's telemetry"
            if spec.kind == Misbehaviour.ACL_PROBE
            else str(spec.kind)
        )
        self.obs.answered(device_id, what, answer, expected or ("served",))

    def _misbehaving_credentials(
        self, target: Target, spec: MisbehaviourSpec, device_id: str
    ) -> Path:
        path = credentials_path(target, device_id)
        if spec.kind == Misbehaviour.FOREIGN_CA:
            key, cert = foreign_certificate(device_id)
            store_credentials(path, key, [cert.public_bytes(Encoding.PEM)])
        elif spec.kind == Misbehaviour.EXPIRED_CERTIFICATE:
            assert self.deployment is not None and self.deployment.service is not None
            key = ec.generate_private_key(ec.SECP256R1())
            cert = self.deployment.service.ca.issue(
                profiles.DEVICE,
                profiles.Subject(common_name=device_id, uris=(device_uri(device_id),)),
                key.public_key(),
                dt.timedelta(days=1),
                now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
            )
            store_credentials(path, key, [cert.public_bytes(Encoding.PEM)])
        elif not path.exists():  # remote mode: enrolled now (its id must be in a batch)
            Enroller(target).enroll(device_id)
        return path

    async def _misbehaving_session(
        self, target: Target, spec: MisbehaviourSpec, device_id: str, path: Path
    ) -> str:
        """What the services answered this misbehaving device (``served``: no refusal)."""
        host, port = target.brokers[0]
        try:
            client = await SimClient.connect(
                host,
                port,
                client_id=device_id,
                context=client_context(target.root, path),
                server_hostname=target.server_hostname,
            )
        except ssl.SSLError as exc:
            return tls_reason(exc)
        except Refused as exc:
            return f"CONNACK {exc.reason_code.name}"
        except (OSError, SessionClosed, TimeoutError) as exc:
            return f"connection failed: {exc}"
        try:
            return await self._misbehave_on(client, spec, device_id)
        except SessionClosed as exc:
            return _disconnect_name(exc.reason)
        finally:
            await client.disconnect()

    async def _misbehave_on(self, client: SimClient, spec: MisbehaviourSpec, device_id: str) -> str:
        if spec.kind == Misbehaviour.ACL_PROBE:
            self.obs.subscribers[device_id] = (f"devices/{device_id}/commands/#",)
            client.on_message = lambda m: self.obs.delivered(
                device_id, m.topic, 0, 0.0, self.clock.now()
            )
            victim = f"devices/{device_id}-victim/telemetry"
            code = await client.publish(victim, b"probe", QoS.AT_LEAST_ONCE)
            self.obs.refused(f"PUBACK {code.name}", self.clock.now())
            self.obs.answered(
                device_id,
                "publish to another device's topic",
                f"PUBACK {code.name}",
                ("PUBACK NOT_AUTHORIZED",),
            )
            granted = await client.subscribe(TELEMETRY, QoS.AT_LEAST_ONCE)
            if granted < ReasonCode.UNSPECIFIED_ERROR:
                self.obs.subscribers[device_id] += (TELEMETRY,)
                await asyncio.sleep(1.0)  # long enough to overhear others, if the ACL lets it
            return f"SUBACK {granted.name}"
        if spec.kind == Misbehaviour.OVERSIZED_PACKET:
            topic = f"devices/{device_id}/telemetry"
            await client.publish(topic, b"\0" * OVERSIZE, QoS.AT_LEAST_ONCE)
            return "PUBACK SUCCESS (oversized packet accepted)"
        if spec.kind == Misbehaviour.FLOOD:
            return await self._flood(client, device_id, spec.rate)
        return "served"

    async def _flood(self, client: SimClient, device_id: str, rate: float) -> str:
        """Publish as fast as the broker reads (QoS 1, a window of 32) for FLOOD_S seconds;
        the broker must slow it to its group's publish_rate by not reading (no refusal)."""
        topic = f"devices/{device_id}/telemetry"
        end = time.monotonic() + FLOOD_S
        seq = [0]
        acked = [0]

        async def lane() -> None:
            while time.monotonic() < end:
                n = seq[0]
                seq[0] += 1
                sent = self.clock.now()
                code = await client.publish(topic, payload_for(n, 32, sent), QoS.AT_LEAST_ONCE)
                if code < ReasonCode.UNSPECIFIED_ERROR:
                    acked[0] += 1
                    self.obs.acknowledged(topic, n, self.clock.now(), sent=sent)
                if rate:
                    await asyncio.sleep(32 / rate)

        await asyncio.gather(*(lane() for _ in range(32)))
        limit = self._publish_limit()
        achieved = acked[0] / FLOOD_S
        if limit is not None and achieved > limit[0] * 1.2 + limit[1] / FLOOD_S:
            return f"not throttled ({achieved:.0f}/s against publish_rate {limit[0]:g}/s)"
        return "served"

    def _publish_limit(self) -> tuple[float, int] | None:
        if self.deployment is None:
            return None
        limits = self.deployment.config.broker.limits.for_group(first_file_group(self.scenario))
        return limits.publish_rate, limits.publish_burst

    # -- faults ----------------------------------------------------------------------------------

    async def _faults(self) -> None:
        await asyncio.gather(*(self._fault(f) for f in self.scenario.faults))

    async def _fault(self, fault: Fault) -> None:
        if fault.kind == FaultKind.RENEWAL_WAVE:  # no disruption: shown, not "recovered"
            end = fault.at_s + fault.duration_s
            self.marks.append(FaultMark(fault.label, fault.at_s, end, renewal=True))
            return
        await self.clock.until(fault.at_s)
        start = self.clock.now()
        if fault.kind in (FaultKind.BROKER_KILL, FaultKind.BROKER_RESTART):
            assert self.deployment is not None
            kill = fault.kind == FaultKind.BROKER_KILL
            await asyncio.to_thread(self.deployment.stop_service, "broker", kill=kill)
            await asyncio.sleep(fault.duration_s)
            await self.deployment.start_service("broker")
        elif fault.kind == FaultKind.IMPAIR:
            impairment = Impairment(
                fault.delay_ms / 1000,
                fault.jitter_ms / 1000,
                fault.loss,
                fault.bandwidth_kbps * 1000,
            )
            for proxy in self.proxies:
                proxy.impair(impairment)
            await asyncio.sleep(fault.duration_s)
            for proxy in self.proxies:
                proxy.impair(Impairment())
        elif fault.kind == FaultKind.PARTITION:
            for proxy in self.proxies:
                proxy.partition(True)
            await asyncio.sleep(fault.duration_s)
            for proxy in self.proxies:
                proxy.partition(False)
        elif fault.kind == FaultKind.RESET:
            for proxy in self.proxies:
                proxy.reset()
        elif fault.kind == FaultKind.REVOKE:
            await self._revoke(fault)
        elif fault.kind in DEPLOYMENT_FAULTS:
            assert self.deployment is not None
            await self.deployment.inject(fault)
        self.marks.append(FaultMark(fault.label, start, self.clock.now()))

    async def _revoke(self, fault: Fault) -> None:
        assert self.deployment is not None
        prefix = "" if self.home is None else f"{self.run_id}-"
        chosen = [d for d, at in revoked_ids(self.scenario, prefix).items() if at == fault.at_s]
        for device_id in chosen:
            try:
                await asyncio.to_thread(self.deployment.revoke, device_id)
            except Exception as exc:  # a device not enrolled yet cannot be revoked: noted
                self.notes.append(f"revoke {device_id}: {exc}")
                continue
            self.obs.revoked_at[device_id] = self.clock.now()

    # -- progress --------------------------------------------------------------------------------

    async def _ticker(self) -> None:
        last, last_t = 0, self.clock.now()
        while True:
            await asyncio.sleep(1.0)
            now = self.clock.now()
            rate = (self.delivered_total - last) / max(1e-3, now - last_t)
            last, last_t = self.delivered_total, now
            refusals = self.obs.refusal_total + sum(self.shard_refusals.values())
            self.progress(
                Progress(
                    t=now,
                    duration=self.scenario.duration_s,
                    connected=sum(self.shard_connected.values()),
                    devices=self.scenario.devices,
                    delivered_per_s=rate,
                    refusals=refusals,
                    stage=self.scenario.stage_at(now).name,
                )
            )


def first_file_group(scenario: Scenario) -> str:
    """Where the misbehaving devices go: a software-key group (a hardware group's policy
    would refuse their software keys at enrollment)."""
    files = [g.name for g in scenario.groups if g.key_store == KeyStore.FILE]
    return (files or [scenario.groups[0].name])[0]


def pace_notes(scenario: Scenario, obs: Observations) -> list[str]:
    """Stages in which the devices published less than 90 % of what the connected devices
    were asked to: the run's figures then describe a lighter load than the scenario's."""
    notes = []
    start = 0.0
    for stage in scenario.stages:
        end = start + stage.duration_s
        rate = sum(g.devices * stage.rate_for(g) for g in scenario.groups) / scenario.devices
        seconds = range(int(start) + 1, int(end))
        asked = sum(obs.connected[s] for s in seconds) * rate
        sent = sum(obs.counts[SENT][s] for s in seconds)
        if asked >= 10 and sent < 0.9 * asked:
            notes.append(
                f"stage {stage.name}: the devices published {sent / asked:.0%} of the asked "
                f"rate ({sent / len(seconds):.0f} of {asked / len(seconds):.0f} msg/s): "
                "acknowledgements held back by a fault, or a simulator short of CPU "
                "(try --procs, or a less loaded machine)"
            )
        start = end
    return notes


def _disconnect_name(reason: str) -> str:
    """``DISCONNECT PACKET_TOO_LARGE (0x95)`` -> ``DISCONNECT PACKET_TOO_LARGE``."""
    return reason.split(" (")[0]


def foreign_certificate(device_id: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A device certificate from a CA the fleet has never heard of."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    root = profiles.build_certificate(
        profiles.ROOT,
        subject=profiles.Subject(common_name="impostor root"),
        public_key=root_key.public_key(),
        issuer=profiles.Issuer(root_key, None),
        validity=dt.timedelta(days=1),
        now=now,
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = profiles.build_certificate(
        profiles.DEVICE,
        subject=profiles.Subject(common_name=device_id, uris=(device_uri(device_id),)),
        public_key=key.public_key(),
        issuer=profiles.Issuer(root_key, root),
        validity=dt.timedelta(days=1),
        now=now,
    )
    return key, cert


__all__ = ["Coordinator", "Progress", "Remote", "RunResult"]
