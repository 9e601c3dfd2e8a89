"""A simulated fleet: devices enroll through the station API, connect, publish, misbehave.

Every device is real to the services: its key is generated "on the device", its certificate
comes from the EST endpoint over mutual TLS with a station certificate, and it speaks MQTT 5
over mutual TLS to the broker. A backend identity subscribes to all telemetry (so "delivered"
means received by a subscriber, not merely acknowledged) and sends each device one command.
Some devices misbehave on purpose; the report says how the services refused them.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import enum
import json
import secrets
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker.mqtt import ReasonCode
from device_sdk.est import EstClient, client_context, device_csr
from enrollment import profiles
from enrollment.service import EnrollmentService
from firmware_sim.mqtt_client import Refused, SessionClosed, SimClient
from firmware_sim.report import FleetReport
from firmware_sim.station import provision_station
from fleetgate.ids import device_uri
from fleetgate.keyfiles import write_secret

BACKEND_GROUP = "sim-backend"
BACKEND_ACL = {"publish": ["devices/+/commands/#"], "subscribe": ["devices/+/telemetry"]}


def retire_station(service: EnrollmentService, station_id: str) -> None:
    """Revoke a simulation's station once its devices are enrolled: its key sits on disk under
    ``<home>/sim/``, so it must not outlive the run as an active enrollment credential."""
    service.revoke_station(station_id, reason="cessationOfOperation", actor="sim")


class Behaviour(enum.StrEnum):
    """What a simulated device does; all but NORMAL are refusals the services must produce."""

    NORMAL = "normal"
    OTHER_TOPIC = "publishes to another device's topic"
    EXPIRED_CERT = "connects with an expired certificate"
    FOREIGN_CA = "connects with a certificate from a foreign CA"


MISBEHAVIOURS = (Behaviour.OTHER_TOPIC, Behaviour.EXPIRED_CERT, Behaviour.FOREIGN_CA)


@dataclass(frozen=True)
class Endpoints:
    """Where the services under test listen."""

    est_url: str
    broker_host: str
    broker_port: int
    server_hostname: str = "localhost"


@dataclass
class SimDevice:
    device_id: str
    behaviour: Behaviour
    credentials: Path | None = None  # key + certificate chain, PEM, 0600


@dataclass(frozen=True)
class FleetPlan:
    devices: int
    messages: int = 5
    misbehaving: int = 3
    interval_s: float = 0.0
    concurrency: int = 200
    command_timeout_s: float = 10.0


class FleetSimulation:
    """Provisions and runs one simulated fleet against running services."""

    def __init__(
        self,
        service: EnrollmentService,
        endpoints: Endpoints,
        plan: FleetPlan,
        *,
        progress: Callable[[str, int], None] = lambda stage, n: None,
    ) -> None:
        self.service = service
        self.endpoints = endpoints
        self.plan = plan
        self.progress = progress
        self.run_id = f"sim-{dt.datetime.now(dt.UTC):%H%M%S}-{secrets.token_hex(2)}"
        self.workdir = service.config.home / "sim" / self.run_id
        self.root = service.config.ca_dir / "root.crt"
        self.report = FleetReport(devices=plan.devices)
        self.devices = [
            SimDevice(f"{self.run_id}-{n:05d}", self._behaviour(n)) for n in range(plan.devices)
        ]
        self.backend = SimDevice(f"{self.run_id}-backend", Behaviour.NORMAL)

    def _behaviour(self, n: int) -> Behaviour:
        if n < min(self.plan.misbehaving, self.plan.devices):
            return MISBEHAVIOURS[n % len(MISBEHAVIOURS)]
        return Behaviour.NORMAL

    # -- provisioning ----------------------------------------------------------------------

    def provision(self) -> None:
        """A station and its batch, then every device enrolled over EST (the factory line)."""
        station_id = f"{self.run_id}-station"
        station_cert, station_key, _ = provision_station(
            self.service, station_id, self.workdir, actor="sim"
        )
        registry = self.service.registry
        enrolling = [d for d in self.devices if d.behaviour != Behaviour.FOREIGN_CA]
        registry.add_batch(
            station_id,
            [d.device_id for d in enrolling],
            group="sim",
            label=self.run_id,
            actor="sim",
        )
        registry.add_batch(
            station_id,
            [self.backend.device_id],
            group=BACKEND_GROUP,
            label=self.run_id,
            actor="sim",
        )
        registry.set_acl(BACKEND_GROUP, actor="sim", **BACKEND_ACL)
        context = client_context(self.root, station_cert, station_key)
        with EstClient(self.endpoints.est_url, context) as est:
            for device in [self.backend, *self.devices]:
                if device.behaviour == Behaviour.FOREIGN_CA:
                    device.credentials = self._foreign_credentials(device.device_id)
                    continue
                key = ec.generate_private_key(ec.SECP256R1())
                cert = est.simpleenroll(device_csr(device.device_id, key))
                if device is not self.backend:
                    self.report.enrolled += 1
                    self.progress("enrolled", 1)
                if device.behaviour == Behaviour.EXPIRED_CERT:
                    cert = self._expired_certificate(device.device_id, key)
                device.credentials = self._store(device.device_id, key, cert)
        retire_station(self.service, station_id)

    def _store(
        self, device_id: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> Path:
        path = self.workdir / "devices" / f"{device_id}.pem"
        pem = key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        write_secret(path, pem + cert.public_bytes(Encoding.PEM))
        return path

    def _expired_certificate(
        self, device_id: str, key: ec.EllipticCurvePrivateKey
    ) -> x509.Certificate:
        """A genuine fleet certificate for this device whose validity ended yesterday."""
        return self.service.ca.issue(
            profiles.DEVICE,
            profiles.Subject(common_name=device_id, uris=(device_uri(device_id),)),
            key.public_key(),
            dt.timedelta(days=1),
            now=dt.datetime.now(dt.UTC) - dt.timedelta(days=2),
        )

    def _foreign_credentials(self, device_id: str) -> Path:
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
        return self._store(device_id, key, cert)

    # -- running ---------------------------------------------------------------------------

    def _context(self, device: SimDevice) -> ssl.SSLContext:
        assert device.credentials is not None
        return client_context(self.root, device.credentials)

    async def run(self) -> FleetReport:
        """Connect every device, publish, exchange commands; returns the filled report."""
        started = time.perf_counter()
        backend = await self._connect(self.backend)
        if backend is None:
            raise RuntimeError("the simulation's backend identity could not connect; see refusals")
        await backend.subscribe("devices/+/telemetry")
        receiver = asyncio.create_task(self._receive_telemetry(backend))
        gate = asyncio.Semaphore(self.plan.concurrency)
        await asyncio.gather(*(self._run_device(d, backend, gate) for d in self.devices))
        await self._drain(receiver)
        await backend.disconnect()
        self.report.seconds = time.perf_counter() - started
        return self.report

    async def _connect(self, device: SimDevice) -> SimClient | None:
        started = time.perf_counter()
        try:
            client = await SimClient.connect(
                self.endpoints.broker_host,
                self.endpoints.broker_port,
                client_id=device.device_id,
                context=self._context(device),
                server_hostname=self.endpoints.server_hostname,
            )
        except ssl.SSLError as exc:
            self.report.refused[f"TLS handshake: {(exc.reason or str(exc)).lower()}"] += 1
            return None
        except Refused as exc:
            self.report.refused[f"connect: {exc}"] += 1
            return None
        except (SessionClosed, OSError, TimeoutError) as exc:
            self.report.refused[f"connect: {exc}"] += 1
            return None
        if device is not self.backend:
            self.report.connected += 1
            self.report.connect_ms.append((time.perf_counter() - started) * 1000)
        return client

    async def _run_device(
        self, device: SimDevice, backend: SimClient, gate: asyncio.Semaphore
    ) -> None:
        if device.behaviour != Behaviour.NORMAL:
            self.report.misbehaved[device.behaviour.value] += 1
        async with gate:
            client = await self._connect(device)
            if client is not None:
                try:
                    await self._session(device, client, backend)
                except SessionClosed as exc:
                    self.report.refused[f"session closed: {exc.reason}"] += 1
                finally:
                    await client.disconnect()
        self.progress("ran", 1)

    async def _session(self, device: SimDevice, client: SimClient, backend: SimClient) -> None:
        granted = await client.subscribe(f"devices/{device.device_id}/commands/#")
        if granted >= ReasonCode.UNSPECIFIED_ERROR:
            self.report.refused[f"subscribe: {granted.name}"] += 1
        if device.behaviour == Behaviour.OTHER_TOPIC:
            victim = self.devices[-1].device_id
            answer = await client.publish(f"devices/{victim}/telemetry", b"{}")
            outcome = (
                answer.name if answer >= ReasonCode.UNSPECIFIED_ERROR else "ACCEPTED (ACL hole!)"
            )
            self.report.refused[f"publish to another device's topic: {outcome}"] += 1
        await backend.publish(f"devices/{device.device_id}/commands/ping", b"ping")
        for seq in range(self.plan.messages):
            payload = json.dumps({"t": time.perf_counter(), "seq": seq}).encode()
            sent = time.perf_counter()
            self.report.sent += 1
            answer = await client.publish(f"devices/{device.device_id}/telemetry", payload)
            if answer < ReasonCode.UNSPECIFIED_ERROR:
                self.report.acknowledged += 1
                self.report.ack_ms.append((time.perf_counter() - sent) * 1000)
            else:
                self.report.refused[f"publish own telemetry: {answer.name}"] += 1
            if self.plan.interval_s:
                await asyncio.sleep(self.plan.interval_s)
        try:
            await asyncio.wait_for(client.messages.get(), self.plan.command_timeout_s)
            self.report.commands_delivered += 1
        except TimeoutError:
            self.report.refused["command not delivered within the timeout"] += 1

    async def _receive_telemetry(self, backend: SimClient) -> None:
        while True:
            message = await backend.messages.get()
            self.report.delivered += 1
            sent = json.loads(message.payload).get("t")
            if isinstance(sent, float):
                self.report.delivery_ms.append((time.perf_counter() - sent) * 1000)

    async def _drain(self, receiver: asyncio.Task[None], timeout_s: float = 5.0) -> None:
        """Give in-flight deliveries to the backend a moment, then stop receiving."""
        deadline = time.perf_counter() + timeout_s
        while self.report.delivered < self.report.acknowledged and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        receiver.cancel()


__all__ = ["Behaviour", "Endpoints", "FleetPlan", "FleetSimulation"]
