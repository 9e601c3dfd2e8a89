"""The simulated devices of one shard: enroll over EST, connect over mutual TLS, publish at the
stage's rate, churn, get kicked, renew; every observation into an :class:`Observations`.

One shard runs on one event loop. ``--procs N`` runs N shards in N processes
(:func:`run_shard_process`); the coordinator (:mod:`firmware_sim.engine`) merges what they saw.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import os
import random
import ssl
import struct
import threading
import time
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker.mqtt import Publish, QoS, ReasonCode
from device_sdk.est import EstClient, EstError, client_context, device_csr
from firmware_sim.deployment import Target
from firmware_sim.est_link import EstLink
from firmware_sim.hardware_fleet import HardwareAccess, HardwareClient, HardwareLink
from firmware_sim.mqtt_client import MQTT5, MQTT311, Refused, SessionClosed, SimClient, Unacked
from firmware_sim.observations import (
    CONNECTS,
    DISCONNECTS,
    RESENT,
    RESUMED,
    SENT,
    Observations,
    Renewal,
)
from firmware_sim.scenario import FaultKind, Group, Scenario

HEAD = struct.Struct("!qd")  # seq, monotonic send time; the rest of a payload is padding
SESSION_EXPIRY_S = 3600
KEEP_ALIVE_S = 60  # PINGREQ after 30 s of silence: 10,000 idle devices, 333 a second
TICK_S = 0.1
SEND_SLOT_S = 0.05  # telemetry goes out on a 20 Hz grid (see Shard._wait_slot)
BACKOFF_BASE_S = 0.5
CONNECTING = 128  # per shard: enrollments + handshakes in flight at once (a line's stations)
EST_CONNECTIONS = 4  # per shard: the station's kept-alive EST connections (requests in flight)
KICK = "DISCONNECT ADMINISTRATIVE_ACTION"
REVOKED_CONNECT = "CONNACK NOT_AUTHORIZED"
SHUTDOWN = "DISCONNECT SERVER_SHUTTING_DOWN"  # not a refusal: counted with network errors


def device_ids(scenario: Scenario, prefix: str) -> dict[str, list[str]]:
    """Every group's device ids, in order."""
    return {
        g.name: [f"{prefix}{g.name}-{n:05d}" for n in range(g.devices)] for g in scenario.groups
    }


def revoked_ids(scenario: Scenario, prefix: str) -> dict[str, float]:
    """Which devices the scenario's revocation storms revoke, and when (deterministic)."""
    ids = device_ids(scenario, prefix)
    chosen: dict[str, float] = {}
    rng = random.Random(scenario.seed)  # noqa: S311 - a reproducible choice, not a secret
    for fault in scenario.faults:
        if fault.kind == FaultKind.REVOKE:
            members = ids[fault.group]
            count = max(1, round(len(members) * fault.percent / 100))
            for device_id in rng.sample(members, count):
                chosen.setdefault(device_id, fault.at_s)
    return chosen


def renewal_due(scenario: Scenario) -> dict[str, tuple[float, float]]:
    """group -> (expires at, renewal window start), in run seconds, of each renewal wave."""
    return {
        f.group: (f.at_s + f.duration_s, f.at_s)
        for f in scenario.faults
        if f.kind == FaultKind.RENEWAL_WAVE
    }


def credentials_path(target: Target, device_id: str) -> Path:
    return target.workdir / "devices" / f"{device_id}.pem"


def store_credentials(path: Path, key: ec.EllipticCurvePrivateKey, chain: list[bytes]) -> None:
    """Key and chain in one 0600 file (``ssl`` loads keys from files only). Not fsynced, unlike
    fleetgate's real key files: a simulated device's key lives as long as the run, and 10,000
    fsyncs would bound the enrollment wave."""
    pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as file:
        file.write(pem + b"".join(chain))


def save_credentials(
    target: Target, device_id: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
) -> Path:
    """A newly enrolled device's key and certificate where its connects will load them."""
    path = credentials_path(target, device_id)
    store_credentials(path, key, [cert.public_bytes(Encoding.PEM)])
    return path


def certificate_of(path: Path) -> x509.Certificate:
    """The device certificate in a key + chain PEM file."""
    pem = path.read_bytes()
    return x509.load_pem_x509_certificate(pem[pem.index(b"-----BEGIN CERTIFICATE-----") :])


def tls_reason(exc: ssl.SSLError) -> str:
    """An alert as people say it: ``TLSV1_ALERT_UNKNOWN_CA`` -> ``TLS unknown ca``."""
    reason = (exc.reason or str(exc)).lower()
    for prefix in ("tlsv13_alert_", "tlsv1_alert_", "sslv3_alert_"):
        reason = reason.removeprefix(prefix)
    return "TLS " + reason.replace("_", " ")


def payload_for(seq: int, size: int, sent: float) -> bytes:
    """A telemetry payload: its sequence number, its send time (run seconds), padding."""
    head = HEAD.pack(seq, sent)
    return head + b"\0" * max(0, size - len(head))


@dataclass
class Clock:
    """Run seconds on the monotonic clock every process shares, and the wall time at zero."""

    t0: float
    wall0: float

    def now(self) -> float:
        return time.monotonic() - self.t0

    def run_seconds(self, when: dt.datetime) -> float:
        return when.timestamp() - self.wall0

    async def until(self, t: float) -> None:
        wait = t - self.now()
        if wait > 0:
            await asyncio.sleep(wait)


class Enroller:
    """Blocking EST calls on a few threads, each with its own kept-alive connection."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._local = threading.local()
        self._station: ssl.SSLContext | None = None

    def _client(self) -> EstClient:
        client = getattr(self._local, "client", None)
        if client is None:
            if self._station is None:
                self._station = client_context(
                    self.target.root, self.target.station_cert, self.target.station_key
                )
            client = self._local.client = EstClient(self.target.est_url, self._station)
        return client

    def enroll(self, device_id: str) -> Path:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._client().simpleenroll(device_csr(device_id, key))
        return save_credentials(self.target, device_id, key, cert)

    def renew(self, device_id: str, path: Path) -> x509.Certificate:
        """simplereenroll authenticated by the device's current certificate, new key."""
        context = client_context(self.target.root, path)
        key = ec.generate_private_key(ec.SECP256R1())
        with EstClient(self.target.est_url, context) as est:
            cert = est.simplereenroll(device_csr(device_id, key))
        store_credentials(path, key, [cert.public_bytes(Encoding.PEM)])
        return cert


@dataclass
class Device:
    device_id: str
    group: Group
    seq: int = 0
    client: SimClient | HardwareClient | None = None
    task: asyncio.Task[None] | None = None
    credentials: Path | None = None
    context: ssl.SSLContext | None = None
    wanted: bool = False  # the scheduler wants it online
    bounce: bool = False  # churn: disconnect once, then come back
    revoked: bool = False
    renew_at: float | None = None
    not_after: float | None = None
    broker: int = 0
    session_broker: int = -1  # where its session was last open (a resume elsewhere counts)
    unacked: tuple[int, float, Unacked] | None = None  # seq, send time, what to send again
    link: HardwareLink | None = None  # a tpm/smartcard device: its process
    connected_once: bool = False


@dataclass
class Shard:
    """Runs this shard's devices for the scenario's length; ``obs`` holds what they saw."""

    scenario: Scenario
    target: Target
    clock: Clock
    index: int = 0
    shards: int = 1
    obs: Observations = field(default_factory=Observations)
    status: Callable[[Shard], None] = lambda shard: None
    hardware: Mapping[str, HardwareAccess] = field(default_factory=dict)  # tpm/smartcard devices

    def __post_init__(self) -> None:
        self.rng = random.Random(self.scenario.seed * 1000 + self.index)  # noqa: S311 - timing
        self.enroller = Enroller(self.target)  # renewals (rare): blocking, on a thread
        target = self.target
        station = client_context(target.root, target.station_cert, target.station_key)
        self.est = EstLink(target.est_url, station, connections=EST_CONNECTIONS)
        self.revocations = revoked_ids(self.scenario, self.target.id_prefix)
        due = renewal_due(self.scenario)
        self.devices: dict[str, list[Device]] = {}
        for group_name, ids in device_ids(self.scenario, self.target.id_prefix).items():
            group = self.scenario.group(group_name)
            mine = [Device(d, group) for n, d in enumerate(ids) if n % self.shards == self.index]
            for device in mine:
                device.broker = self.rng.randrange(len(self.target.brokers))
                access = self.hardware.get(device.device_id)
                if access is not None:
                    device.link = HardwareLink(device.device_id, access, self.target)
                if group_name in due:
                    expires, window = due[group_name]
                    path = credentials_path(self.target, device.device_id)
                    device.credentials = path  # pre-enrolled by the coordinator, back-dated
                    device.not_after = self.clock.run_seconds(
                        certificate_of(path).not_valid_after_utc
                    )
                    device.renew_at = window + self.rng.uniform(0, (expires - window) / 2)
            self.devices[group_name] = mine
        self.connected = 0
        self.stopping = False
        self.connecting = asyncio.Semaphore(CONNECTING)
        self._pokes: set[asyncio.Task[None]] = set()

    # -- scheduling ------------------------------------------------------------------------------

    async def run(self) -> Observations:
        end = self.scenario.duration_s
        credit: dict[str, float] = {g: 0.0 for g in self.devices}
        next_sample = math.floor(self.clock.now()) + 1
        while (now := self.clock.now()) < end:
            stage = self.scenario.stage_at(now)
            for name, devices in self.devices.items():
                if stage.groups and name not in stage.groups:
                    target = 0
                else:
                    target = round(len(devices) * stage.online)
                share = stage.connect_rate * TICK_S / self.shards
                credit[name] = min(credit[name] + share, max(1.0, share) + 1)
                wanted = [d for d in devices if d.wanted]
                for device in wanted[target:]:
                    device.wanted = False
                    self._poke(device)
                for device in devices[len(wanted) : target]:
                    if credit[name] < 1:
                        break
                    if not device.wanted and not device.revoked:
                        credit[name] -= 1
                        device.wanted = True
                        self._start(device)
                if stage.churn:
                    online = [d for d in wanted if d.client is not None]
                    bounce = stage.churn * TICK_S * len(online)
                    count = int(bounce) + (self.rng.random() < bounce % 1)
                    for device in self.rng.sample(online, min(count, len(online))):
                        device.bounce = True
                        self._poke(device)
            if now >= next_sample:
                # every second up to now: a tick late by more than a second (a busy loop in a
                # reconnect storm) must not leave a second at 0 connected, which would read as
                # half the fleet gone once shards are merged
                for second in range(next_sample, int(now) + 1):
                    self.obs.connected[second] = self.connected
                next_sample = math.floor(now) + 1
                self.status(self)
            await asyncio.sleep(TICK_S)
        await self.stop()
        return self.obs

    async def stop(self) -> None:
        self.stopping = True
        tasks = []
        for devices in self.devices.values():
            for device in devices:
                device.wanted = False
                self._poke(device)
                if device.task is not None:
                    tasks.append(device.task)
        if tasks:
            await asyncio.wait(tasks, timeout=15)
            for task in tasks:
                task.cancel()
        await self.est.close()
        links = [d.link for ds in self.devices.values() for d in ds if d.link is not None]
        await asyncio.gather(*(link.close() for link in links))

    def _start(self, device: Device) -> None:
        if device.task is None or device.task.done():
            device.task = asyncio.create_task(self._life(device))

    def _poke(self, device: Device) -> None:
        """Make a device's publish loop notice that it should go (disconnect it)."""
        client = device.client
        if client is not None:
            task = asyncio.create_task(client.disconnect())
            self._pokes.add(task)
            task.add_done_callback(self._pokes.discard)

    # -- one device ------------------------------------------------------------------------------

    async def _life(self, device: Device) -> None:
        attempt = 0
        while device.wanted and not self.stopping:
            async with self.connecting:
                enrolled = device.credentials is not None or await self._enroll(device)
                if enrolled and device.renew_at is not None and self.clock.now() >= device.renew_at:
                    await self._renew(device)
                client = await self._connect(device) if enrolled else None
            if client is None:
                if device.revoked:
                    return
                await self._backoff(device, attempt)
                attempt += 1
                continue
            attempt = 0
            await self._session(device, client)
            if device.bounce:
                device.bounce = False
                await asyncio.sleep(self.rng.uniform(0.5, 2.0))

    def _revoked_by_now(self, device: Device) -> bool:
        at = self.revocations.get(device.device_id)
        return at is not None and self.clock.now() >= at

    async def _backoff(self, device: Device, attempt: int) -> None:
        """Exponential with full jitter, capped by the group's ``reconnect_max_s``: thousands
        of devices that lost the broker at once must not all come back in the same second."""
        cap = min(device.group.reconnect_max_s, BACKOFF_BASE_S * 2 ** min(attempt, 16))
        await asyncio.sleep(self.rng.uniform(0.1, 1.0) * cap)

    async def _enroll(self, device: Device) -> bool:
        if device.link is not None:
            return await self._enroll_hardware(device, device.link)
        started = time.perf_counter()
        try:
            key = ec.generate_private_key(ec.SECP256R1())
            csr = device_csr(device.device_id, key).public_bytes(Encoding.DER)
            cert = await self.est.simpleenroll(csr)
            # on a thread: creating a file waits for the journal while the enrollment
            # service commits, ~1 ms that would stall every device on this loop
            device.credentials = await asyncio.to_thread(
                save_credentials, self.target, device.device_id, key, cert
            )
        except EstError as exc:
            if exc.status == 409 and self._revoked_by_now(device):
                # revoked before it ever enrolled: refused for good, as it must be
                answer = "EST 409 (revoked)"
                self.obs.refused(answer, self.clock.now())
                self.obs.answered(device.device_id, "enroll", answer, (answer,))
                device.revoked = True
                device.wanted = False
            else:
                self.obs.errors[f"enroll: {exc}"[:160]] += 1
            return False
        except Exception as exc:  # OSError, http.client errors: the run goes on
            self.obs.errors[f"enroll: {type(exc).__name__}: {exc}"[:160]] += 1
            return False
        self._enrolled(device, (time.perf_counter() - started) * 1000)
        return True

    def _enrolled(self, device: Device, ms: float) -> None:
        key_store = device.group.key_store
        self.obs.enroll_ms.append(ms)
        self.obs.enrolled += 1
        self.obs.by_key_store[key_store]["enrolled"] += 1
        self.obs.key_store_ms[f"{key_store} enroll"].append(ms)

    async def _enroll_hardware(self, device: Device, link: HardwareLink) -> bool:
        """Key made in the device's TPM or card and attested over EST, by its own process."""
        enrolled, reason, ms = await link.enroll()
        if not enrolled:
            self.obs.errors[f"{device.group.key_store} enroll: {reason}"[:160]] += 1
            return False
        device.credentials = link.access.directory  # the key store, certificate installed
        try:
            await link.start()  # now, so that its start is not counted as its first connect's
        except OSError as exc:  # tried again at the connect
            self.obs.errors[f"{device.group.key_store} device process: {exc}"[:160]] += 1
        self.obs.hardware[device.device_id] = device.group.key_store
        self._enrolled(device, ms)
        return True

    async def _renew(self, device: Device) -> None:
        assert device.credentials is not None and device.not_after is not None
        renewal = Renewal(device.device_id, device.not_after)
        self.obs.renewals.append(renewal)
        try:
            cert = await asyncio.to_thread(
                self.enroller.renew, device.device_id, device.credentials
            )
        except Exception as exc:  # recorded; the invariant reports it
            renewal.error = f"{type(exc).__name__}: {exc}"[:160]
            device.renew_at = self.clock.now() + 1.0
            return
        renewal.done_at = self.clock.now()
        device.renew_at = None
        device.not_after = self.clock.run_seconds(cert.not_valid_after_utc)
        device.context = None

    def _context(self, device: Device) -> ssl.SSLContext:
        if device.context is None:
            assert device.credentials is not None
            device.context = client_context(self.target.root, device.credentials)
        return device.context

    async def _connect(self, device: Device) -> SimClient | HardwareClient | None:
        host, port = self.target.brokers[device.broker]
        group = device.group
        started = time.perf_counter()
        answer = ""
        expiry = SESSION_EXPIRY_S if group.persistent else 0
        client: SimClient | HardwareClient
        try:
            if device.link is not None:
                client = await device.link.connect(
                    host, port, group, session_expiry=expiry, keepalive=KEEP_ALIVE_S
                )
            else:
                client = await SimClient.connect(
                    host,
                    port,
                    client_id=device.device_id,
                    context=self._context(device),
                    server_hostname=self.target.server_hostname,
                    keep_alive=KEEP_ALIVE_S,
                    protocol=MQTT5 if group.mqtt == 5 else MQTT311,
                    session_expiry_s=expiry,
                )
        except ssl.SSLError as exc:
            answer = tls_reason(exc)
        except Refused as exc:
            answer = f"CONNACK {exc.reason_code.name}"
        except (SessionClosed, OSError, TimeoutError) as exc:
            self.obs.errors[f"connect: {type(exc).__name__} {exc}".strip()[:120]] += 1
            device.broker = (device.broker + 1) % len(self.target.brokers)
            return None
        now = self.clock.now()
        if answer:
            self.obs.refused(answer, now)
            revoked = self._revoked_by_now(device)
            expected = (REVOKED_CONNECT,) if revoked else ()
            self.obs.answered(device.device_id, "connect", answer, expected)
            if revoked:
                device.revoked = True
                device.wanted = False
            return None
        if device.device_id in self.revocations and now >= self.revocations[device.device_id] + 2:
            # admitted although revoked: say so, and let it talk (the invariant catches it)
            self.obs.answered(device.device_id, "connect", "CONNACK SUCCESS", (REVOKED_CONNECT,))
        ms = (time.perf_counter() - started) * 1000
        self.obs.connect_ms.append(ms)
        self.obs.count(CONNECTS, now)
        counts = self.obs.by_key_store[group.key_store]
        counts["connects"] += 1
        self.obs.key_store_ms[f"{group.key_store} connect"].append(ms)
        if not device.connected_once:
            device.connected_once = True
            counts["connected"] += 1
        return client

    async def _session(self, device: Device, client: SimClient | HardwareClient) -> None:
        device.client = client
        self.connected += 1
        group = device.group
        try:
            topic = f"devices/{device.device_id}/commands/#"
            self.obs.subscribers.setdefault(device.device_id, (topic,))
            client.on_message = lambda message: self._received(device, message)
            if not client.session_present or device.link is not None:
                # (a hardware device's SDK client is new each session: its handler too)
                await client.subscribe(topic, QoS(min(group.qos, 1)))
            if client.session_present and device.broker != device.session_broker:
                self.obs.count(RESUMED, self.clock.now())  # on a fabric: taken over
            device.session_broker = device.broker
            if device.unacked is not None:
                seq, sent, unacked = device.unacked
                self.obs.count(RESENT, self.clock.now())
                await self._send(device, seq, sent, client.resend(unacked))
            await self._publish_loop(device, client)
        except SessionClosed:
            pass
        finally:
            self.connected -= 1
            device.client = None
            now = self.clock.now()
            self.obs.count(DISCONNECTS, now)
            await client.disconnect()
            reason = client.closed.result().split(" (")[0] if client.closed.done() else ""
            if reason == SHUTDOWN:  # a graceful restart (broker-restart, node-restart)
                self.obs.errors[f"session: {reason}"] += 1
            elif reason.startswith("DISCONNECT") and "NORMAL" not in reason:
                self.obs.refused(reason, now)
                revoked = device.device_id in self.revocations
                expected = (KICK,) if revoked else ()
                self.obs.answered(device.device_id, "session", reason, expected)
                if revoked and KICK in reason:
                    self.obs.kicked[device.device_id] = now

    async def _publish_loop(self, device: Device, client: SimClient | HardwareClient) -> None:
        group = device.group
        topic = f"devices/{device.device_id}/telemetry"
        qos = QoS(group.qos)
        next_at = self.clock.now() + self.rng.uniform(0, 1.0)
        while device.wanted and not device.bounce and not self.stopping:
            if device.renew_at is not None and self.clock.now() >= device.renew_at:
                return  # renew, then reconnect with the new certificate
            now = self.clock.now()
            rate = self.scenario.stage_at(now).rate_for(group)
            if rate <= 0:
                await self._idle(device, client, now)
                if client.closed.done():
                    return
                next_at = self.clock.now() + self.rng.uniform(0, 1.0)
                continue
            await self._wait_slot(next_at)
            if client.closed.done() or not device.wanted or device.bounce or self.stopping:
                return
            next_at = max(next_at + 1 / rate, self.clock.now() - 1.0)
            seq = device.seq
            device.seq += 1
            sent = self.clock.now()
            self.obs.count(SENT, sent)
            self.obs.by_key_store[group.key_store]["sent"] += 1
            payload = payload_for(seq, group.payload_bytes, sent)
            await self._send(device, seq, sent, client.publish(topic, payload, qos))

    async def _send(
        self, device: Device, seq: int, sent: float, sending: Coroutine[Any, Any, ReasonCode]
    ) -> None:
        """Await one publish (or its resend) and record the broker's answer. Cut short by the
        connection's end, the message is kept to be sent again after the reconnect."""
        device.unacked = None
        try:
            code = await sending
        except SessionClosed as exc:
            if exc.unacked is not None:
                device.unacked = (seq, sent, exc.unacked)
            raise
        now = self.clock.now()
        topic = f"devices/{device.device_id}/telemetry"
        if code >= ReasonCode.UNSPECIFIED_ERROR:
            answer = f"PUBACK {code.name}"
            self.obs.refused(answer, now)
            self.obs.answered(device.device_id, "publish own telemetry", answer, ())
        elif device.group.qos != QoS.AT_MOST_ONCE:
            self.obs.acknowledged(topic, seq, now, sent=sent)
            self.obs.by_key_store[device.group.key_store]["acknowledged"] += 1

    async def _idle(self, device: Device, client: SimClient | HardwareClient, now: float) -> None:
        """A silent device waits for the next stage, its renewal or its session's end, not in
        ticks: 10,000 connected devices polling every 0.1 s cost the shard a core."""
        until = self.scenario.stage_end(now)
        if device.renew_at is not None:
            until = min(until, device.renew_at)
        await asyncio.wait((client.closed,), timeout=max(0.0, until - now) + 0.001)

    async def _wait_slot(self, at: float) -> None:
        """Sleep until the first send slot at or after ``at``. Devices that send in the same
        slot are handled in one turn of the event loop, and the broker reads their messages in
        one wake-up: the same load spread evenly over the second cost the simulator 2.5 times
        the CPU per message. A plain sleep: a closed session shows at the next publish."""
        wait = math.ceil(at / SEND_SLOT_S) * SEND_SLOT_S - self.clock.now()
        if wait > 0:
            await asyncio.sleep(wait)

    def _received(self, device: Device, message: Publish) -> None:
        """A device hears only its own commands; anything else is an ACL crossing."""
        seq, sent = HEAD.unpack_from(message.payload) if len(message.payload) >= 16 else (0, 0.0)
        self.obs.delivered(device.device_id, message.topic, seq, sent, self.clock.now())


def run_shard_process(
    scenario: Scenario,
    target: Target,
    index: int,
    shards: int,
    pipe: Connection,
    hardware: Mapping[str, HardwareAccess],
) -> None:
    """A worker process: says it is ready, receives the run's clock, runs one shard on its own
    event loop; status each second, then the observations, through ``pipe``."""
    pipe.send(("ready", index, None))
    clock = pipe.recv()

    def status(shard: Shard) -> None:
        pipe.send(("status", index, (shard.connected, shard.obs.refusal_total)))

    async def main() -> Observations:
        shard = Shard(scenario, target, clock, index, shards, status=status, hardware=hardware)
        return await shard.run()

    observations = asyncio.run(main())
    pipe.send(("done", index, observations))
    pipe.close()


__all__ = [
    "Clock",
    "Enroller",
    "Shard",
    "device_ids",
    "payload_for",
    "renewal_due",
    "revoked_ids",
    "run_shard_process",
    "tls_reason",
]
