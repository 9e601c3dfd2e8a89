"""A small production line of virtual hardware devices: ``fleetgate sim --key-store tpm|smartcard``.

End to end on the real stacks: each device gets its own virtual TPM (swtpm + tpm2-abrmd) or
smartcard (pcscd + vpcd + the PIV applet), made by a manufacturer CA that exists only for this
run. The station and its batch sit in a group that *requires* that protection; every device is
enrolled through the EST attestation endpoints by the SDK, then connects with ``DeviceClient``
and its hardware key store, publishes, and takes a command. One device is then revoked: the
line measures how long the broker takes to kick it and checks its reconnect is refused. One
deliberate misbehaviour: a software key tries to enroll into the hardware-only group.

Everything touching the hardware runs in per-device processes (:mod:`firmware_sim.hardware_device`):
the hardware stacks are bound to a process. The line itself holds only software keys (station,
backend subscriber), and so does the in-process EST server and broker it talks to. Every process
started here is stopped by its PID when the run ends, also on errors and Ctrl-C.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from device_sdk.est import EstClient, EstError, client_context, device_csr
from enrollment.registry import DeviceState
from enrollment.service import EnrollmentService
from firmware_sim.fleet import BACKEND_ACL, BACKEND_GROUP, Endpoints, retire_station
from firmware_sim.mqtt_client import Refused, SimClient
from firmware_sim.report import FleetReport
from firmware_sim.station import provision_station
from firmware_sim.vcard import CardManufacturer, PcscDaemon, VirtualCard, VirtualCardError
from firmware_sim.vtpm import DbusSession, TpmManufacturer, VirtualTpm, VirtualTpmError
from fleetgate.config import Config
from fleetgate.errors import FleetgateError
from fleetgate.keyfiles import write_secret

__all__ = [
    "MAX_DEVICES",
    "HardwareKind",
    "HardwareLine",
    "HardwareLineError",
    "LinePlan",
    "identity_args",
    "install_manufacturer",
    "parse_kind",
    "trust_dir",
]

HardwareKind = Literal["tpm", "smartcard"]
MAX_DEVICES = 20  # each device is its hardware's daemons (swtpm + abrmd, pcscd + applet) + a Python
ENROLL_TIMEOUT_S = 60.0
EVENT_TIMEOUT_S = 30.0
DRAIN_TIMEOUT_S = 5.0
CARD_PIN = "123456"
REVOKE_REASON = "keyCompromise"


class HardwareLineError(FleetgateError):
    """The virtual hardware line could not run; the message says what to fix."""

    code = "sim_hardware"


def parse_kind(text: str) -> HardwareKind:
    """``--key-store``'s value as a hardware kind ("file" is the software fleet's, not ours)."""
    kinds: dict[str, HardwareKind] = {"tpm": "tpm", "smartcard": "smartcard"}
    if text not in kinds:
        raise HardwareLineError(f"--key-store is file, tpm or smartcard, not {text!r}")
    return kinds[text]


def trust_dir(workdir: Path, kind: str) -> Path:
    """A run's attestation trust store for one kind of hardware (its manufacturer only)."""
    return workdir / "trust" / kind


def install_manufacturer(workdir: Path, kind: str, root: Path) -> None:
    """Put the run's manufacturer CA for ``kind`` in that kind's trust store."""
    store = trust_dir(workdir, kind)
    store.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root, store / "sim-manufacturer.pem")


def identity_args(kind: str, directory: Path, device_id: str, access: tuple[str, ...]) -> list[str]:
    """The arguments that name a hardware device to ``hardware_device.py``."""
    return ["--key-store", kind, "--dir", str(directory), "--device-id", device_id, *access]


@dataclass(frozen=True)
class LinePlan:
    kind: HardwareKind
    devices: int
    messages: int = 5

    def __post_init__(self) -> None:
        if not 1 <= self.devices <= MAX_DEVICES:
            raise HardwareLineError(
                f"--key-store {self.kind} gives every device its own virtual hardware and "
                f"processes, so it takes 1 to {MAX_DEVICES} devices, not {self.devices}; use "
                "--key-store file for large fleets"
            )


@dataclass
class _Unit:
    """One device on the line: its hardware's environment and how the SDK reaches it."""

    device_id: str
    directory: Path
    env: dict[str, str]
    access: list[str]  # --tcti ... or --pin ...
    enroll_extra: list[str] = field(default_factory=list)
    enrolled: bool = False


# -- the hardware -------------------------------------------------------------------------------


class TpmBench:
    """One private D-Bus session, a sim-only TPM manufacturer, and one swtpm + abrmd per device."""

    description = "virtual TPM 2.0 (swtpm + tpm2-abrmd), EK certificates from a sim-only CA"

    def __init__(self, workdir: Path, sockets: Path) -> None:
        self.workdir = workdir
        self.sockets = sockets
        self.maker = TpmManufacturer(workdir / "tpm-manufacturer")
        self.bus: DbusSession | None = None
        self.tpms: list[VirtualTpm] = []

    def make(self, index: int) -> tuple[dict[str, str], list[str], list[str]]:
        if self.bus is None:
            self.bus = DbusSession(self.sockets / "dbus").start()
        tpm = VirtualTpm.manufacture(
            self.workdir / f"tpm-{index:02d}",
            manufacturer=self.maker,
            bus=self.bus,
            name=f"{self.workdir.name.replace('-', '_')}_{index}",  # the run id: D-Bus letters
        )
        self.tpms.append(tpm)
        return (
            tpm.environment,
            ["--tcti", tpm.tcti],
            ["--ek-chain", str(self.maker.issuer_certificate)],
        )

    @property
    def root(self) -> Path:
        return self.maker.ca_certificate

    def stop(self) -> None:
        for tpm in self.tpms:
            tpm.stop()
        if self.bus is not None:
            self.bus.stop()


class CardBench:
    """A sim-only card manufacturer, and one private pcscd with one card per device.

    A pcscd each, because libpcsclite binds a process to one pcscd socket and vpcd gives a pcscd
    one reader: the cards then sit in their readers side by side, as on a real line.
    """

    description = "virtual PIV smartcard (pcscd + vpcd + PIV applet), attested by a sim-only CA"

    def __init__(self, workdir: Path, sockets: Path) -> None:
        self.workdir = workdir
        self.sockets = sockets
        self.maker = CardManufacturer.create(
            workdir / "card-manufacturer", name="fleetgate sim card maker"
        )
        self.daemons: list[PcscDaemon] = []
        self.cards: list[VirtualCard] = []

    def make(self, index: int) -> tuple[dict[str, str], list[str], list[str]]:
        daemon = PcscDaemon(self.sockets / f"pcscd-{index:02d}")
        self.daemons.append(daemon.start())
        state = self.maker.manufacture(
            self.workdir / f"card-{index:02d}.json", serial=1000 + index, pin=CARD_PIN
        )
        card = VirtualCard(daemon, state)
        self.cards.append(card)
        card.insert()
        return daemon.env(), ["--pin", CARD_PIN], []

    @property
    def root(self) -> Path:
        return self.maker.cert_path

    def stop(self) -> None:
        for card in self.cards:
            card.remove()
        for daemon in self.daemons:
            daemon.stop()


# -- a device process ---------------------------------------------------------------------------


class _DeviceProcess:
    """A running ``hardware_device run``: its JSON events, in order, and its stderr log."""

    def __init__(self, unit: _Unit, process: asyncio.subprocess.Process, log: Path) -> None:
        self.unit = unit
        self.process = process
        self.log = log
        self.stray: list[dict[str, Any]] = []  # events that came while waiting for others

    async def expect(self, *names: str, timeout: float = EVENT_TIMEOUT_S) -> dict[str, Any]:
        """The next event named in ``names`` (or "refused"); others are kept in :attr:`stray`."""
        assert self.process.stdout is not None
        for kept in self.stray:
            if kept["event"] in names:
                self.stray.remove(kept)
                return kept
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = await asyncio.wait_for(
                    self.process.stdout.readline(), deadline - time.monotonic()
                )
            except TimeoutError:
                raise HardwareLineError(
                    f"{self.unit.device_id} sent no {'/'.join(names)} within {timeout} s; "
                    f"see {self.log}"
                ) from None
            if not line:
                await self.process.wait()
                raise HardwareLineError(
                    f"{self.unit.device_id}'s process exited ({self.process.returncode}) before "
                    f"{'/'.join(names)}: {_tail(self.log)}"
                )
            event: dict[str, Any] = json.loads(line)
            if event["event"] in (*names, "refused"):
                return event
            self.stray.append(event)

    async def finish(self) -> None:
        """Close stdin (the device's cue to disconnect) and wait for the process to exit."""
        if self.process.stdin is not None and not self.process.stdin.is_closing():
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), 15)
        except TimeoutError:
            self.kill()
            await self.process.wait()

    def kill(self) -> None:
        if self.process.returncode is None:
            self.process.kill()  # by its PID


def _tail(log: Path, size: int = 2000) -> str:
    try:
        return log.read_text(errors="replace")[-size:].strip() or "(no output)"
    except OSError:
        return "(no log)"


# -- the line -----------------------------------------------------------------------------------


class HardwareLine:
    """Manufactures, enrolls, connects and revokes a small line of virtual hardware devices.

    Call :meth:`manufacture` (from the main thread: pcscd and the card applets are bound to the
    thread that starts them), serve EST and the broker on :meth:`trusting`'s configuration, then
    :meth:`run`; :meth:`close` stops every process, whatever happened.
    """

    def __init__(
        self,
        config: Config,
        plan: LinePlan,
        *,
        progress: Callable[[str, int], None] = lambda stage, n: None,
    ) -> None:
        self.plan = plan
        self.progress = progress
        self.run_id = f"sim-{dt.datetime.now(dt.UTC):%H%M%S}-{secrets.token_hex(2)}"
        self.workdir = (config.home / "sim" / self.run_id).resolve()
        self.fleet_root = config.ca_dir / "root.crt"
        self.group = f"{self.run_id}-{plan.kind}"
        self.report = FleetReport(devices=plan.devices, key_store=plan.kind)
        self.units = [
            _Unit(f"{self.run_id}-{n:02d}", self.workdir / "devices" / f"{n:02d}", {}, [])
            for n in range(plan.devices)
        ]
        self._started = time.perf_counter()  # "took" includes making the hardware
        self._bench: TpmBench | CardBench | None = None
        # Unix sockets (D-Bus, pcscd) live here: their paths must stay under 108 bytes, which a
        # data directory's sim/<run id>/... path can exceed.
        self._sockets: Path | None = None
        self._processes: list[_DeviceProcess] = []

    # -- hardware and trust ------------------------------------------------------------------

    def manufacture(self) -> None:
        """One virtual TPM or card per device, from a manufacturer CA made for this run only."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._sockets = Path(tempfile.mkdtemp(prefix=f"fleetgate-{self.run_id}-"))
        try:
            bench = TpmBench if self.plan.kind == "tpm" else CardBench
            self._bench = bench(self.workdir, self._sockets)
            for index, unit in enumerate(self.units):
                unit.env, unit.access, unit.enroll_extra = self._bench.make(index)
                self.progress("manufactured", 1)
        except (VirtualTpmError, VirtualCardError) as exc:
            raise HardwareLineError(
                f"cannot make the virtual {self.plan.kind} hardware: {exc}"
            ) from exc
        self.report.hardware = self._bench.description
        install_manufacturer(self.workdir, self.plan.kind, self._bench.root)

    def trusting(self, config: Config) -> Config:
        """``config`` whose attestation trust stores are this run's, and only this run's: the
        sim's manufacturer never enters the data directory's real trust stores."""
        return replace(
            config,
            attestation=replace(
                config.attestation,
                tpm_manufacturer_cas=str(trust_dir(self.workdir, "tpm")),
                card_manufacturer_cas=str(trust_dir(self.workdir, "smartcard")),
            ),
        )

    def close(self) -> None:
        """Stop every device process and every hardware process, by PID."""
        for process in self._processes:
            process.kill()
        if self._bench is not None:
            self._bench.stop()
        if self._sockets is not None:
            shutil.rmtree(self._sockets, ignore_errors=True)

    # -- the run -----------------------------------------------------------------------------

    async def run(self, service: EnrollmentService, endpoints: Endpoints) -> FleetReport:
        """Provision, enroll, connect, publish, revoke; returns the filled report."""
        station = await asyncio.to_thread(self._provision, service, endpoints)
        await self._enroll_all(endpoints, *station)
        await asyncio.to_thread(self._misbehave, endpoints, *station)
        await asyncio.to_thread(retire_station, service, f"{self.run_id}-station")
        self._record_identities(service)
        backend = await self._connect_backend(endpoints)
        receiver = asyncio.create_task(self._receive(backend))
        try:
            connected = await self._run_devices(endpoints, backend)
            await self._drain()
            if connected:
                await self._revoke(service, connected[0])
        finally:
            receiver.cancel()
            await asyncio.gather(*(p.finish() for p in self._processes))
            await backend.disconnect()
        self.report.seconds = time.perf_counter() - self._started
        return self.report

    def _provision(self, service: EnrollmentService, endpoints: Endpoints) -> tuple[Path, Path]:
        """Station, a batch in a group that requires the hardware, the backend identity."""
        station_id = f"{self.run_id}-station"
        station_cert, station_key, _ = provision_station(
            service, station_id, self.workdir, actor="sim"
        )
        registry = service.registry
        registry.set_group_policy(self.group, self.plan.kind, actor="sim")
        ids = [u.device_id for u in self.units] + [self._software_id]
        registry.add_batch(station_id, ids, group=self.group, label=self.run_id, actor="sim")
        registry.add_batch(
            station_id, [self._backend_id], group=BACKEND_GROUP, label=self.run_id, actor="sim"
        )
        registry.set_acl(BACKEND_GROUP, actor="sim", **BACKEND_ACL)
        backend_key = ec.generate_private_key(ec.SECP256R1())
        context = client_context(self.fleet_root, station_cert, station_key)
        with EstClient(endpoints.est_url, context) as est:
            backend_cert = est.simpleenroll(device_csr(self._backend_id, backend_key))
        key_pem = backend_key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
        write_secret(self._backend_credentials, key_pem + backend_cert.public_bytes(Encoding.PEM))
        return station_cert, station_key

    @property
    def _software_id(self) -> str:
        return f"{self.run_id}-softkey"

    @property
    def _backend_id(self) -> str:
        return f"{self.run_id}-backend"

    @property
    def _backend_credentials(self) -> Path:
        return self.workdir / "backend.pem"

    def _identity_args(self, unit: _Unit) -> list[str]:
        return identity_args(self.plan.kind, unit.directory, unit.device_id, tuple(unit.access))

    async def _spawn(self, unit: _Unit, arguments: list[str], log: Path) -> _DeviceProcess:
        """``python -m firmware_sim.hardware_device ...`` in the unit's hardware environment."""
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as errors:
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "firmware_sim.hardware_device",
                *arguments,
                *self._identity_args(unit),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=errors,
                env={**os.environ, **unit.env},
            )
        device = _DeviceProcess(unit, process, log)
        self._processes.append(device)
        return device

    async def _enroll_all(
        self, endpoints: Endpoints, station_cert: Path, station_key: Path
    ) -> None:
        gate = asyncio.Semaphore(max(2, os.cpu_count() or 2))
        arguments = [
            "enroll",
            "--est-url",
            endpoints.est_url,
            "--fleet-root",
            str(self.fleet_root),
            "--station-cert",
            str(station_cert),
            "--station-key",
            str(station_key),
        ]

        async def one(unit: _Unit) -> None:
            async with gate:
                log = self.workdir / "devices" / f"{unit.device_id}.enroll.log"
                process = await self._spawn(unit, [*arguments, *unit.enroll_extra], log)
                event = await process.expect("enrolled", timeout=ENROLL_TIMEOUT_S)
                await process.finish()
            if event["event"] == "enrolled":
                unit.enrolled = True
                self.report.enrolled += 1
                self.report.enroll_ms.append(event["ms"])
            else:
                self.report.refused[f"attested enrollment: {event['reason']}"] += 1
            self.progress("enrolled", 1)

        await asyncio.gather(*(one(u) for u in self.units))

    def _misbehave(self, endpoints: Endpoints, station_cert: Path, station_key: Path) -> None:
        """A software key tries to enroll into the hardware-only group: it must be refused."""
        what = f"software-key enrollment into the {self.plan.kind}-only group"
        self.report.misbehaved[what] += 1
        key = ec.generate_private_key(ec.SECP256R1())
        context = client_context(self.fleet_root, station_cert, station_key)
        try:
            with EstClient(endpoints.est_url, context) as est:
                est.simpleenroll(device_csr(self._software_id, key))
        except EstError as exc:
            self.report.refused[f"{what}: {exc.message}"] += 1
            return
        self.report.refused[f"{what}: ISSUED (policy hole!)"] += 1

    def _record_identities(self, service: EnrollmentService) -> None:
        """What the registry now says of each enrolled device's key and hardware binding."""
        for unit in self.units:
            if unit.enrolled:
                device = service.registry.device(unit.device_id)
                self.report.identities.append(
                    {
                        "device_id": unit.device_id,
                        "key_protection": device.key_protection,
                        "hardware_binding": device.hardware_binding or "",
                        "attestation": device.attestation,
                    }
                )

    async def _connect_backend(self, endpoints: Endpoints) -> SimClient:
        """The subscriber behind "delivered": a software identity allowed all telemetry."""
        try:
            client = await SimClient.connect(
                endpoints.broker_host,
                endpoints.broker_port,
                client_id=self._backend_id,
                context=client_context(self.fleet_root, self._backend_credentials),
                server_hostname=endpoints.server_hostname,
            )
        except (Refused, OSError) as exc:
            raise HardwareLineError(
                f"the line's backend subscriber could not connect to the broker: {exc}"
            ) from exc
        await client.subscribe("devices/+/telemetry")
        return client

    async def _receive(self, backend: SimClient) -> None:
        while True:
            message = await backend.messages.get()
            self.report.delivered += 1
            sent = json.loads(message.payload).get("t")
            if isinstance(sent, float):
                self.report.delivery_ms.append((time.time() - sent) * 1000)

    async def _run_devices(self, endpoints: Endpoints, backend: SimClient) -> list[_DeviceProcess]:
        """Every enrolled device connects from its own process; returns those that connected."""
        arguments = [
            "run",
            "--port",
            str(endpoints.broker_port),
            "--messages",
            str(self.plan.messages),
        ]
        processes = [
            await self._spawn(u, arguments, self.workdir / "devices" / f"{u.device_id}.log")
            for u in self.units
            if u.enrolled
        ]
        connected = await asyncio.gather(*(self._session(p, backend) for p in processes))
        return [p for p, ok in zip(processes, connected, strict=True) if ok]

    async def _session(self, process: _DeviceProcess, backend: SimClient) -> bool:
        device_id = process.unit.device_id
        ready = await process.expect("ready")
        if ready["event"] == "refused":
            self.report.refused[ready["reason"]] += 1
            self.progress("ran", 1)
            return False
        self.report.connected += 1
        self.report.connect_ms.append(ready["connect_ms"])
        await backend.publish(f"devices/{device_id}/commands/ping", b"ping")
        done = await process.expect("published", timeout=EVENT_TIMEOUT_S + 10 * self.plan.messages)
        self.report.sent += self.plan.messages
        self.report.acknowledged += len(done["ack_ms"])
        self.report.ack_ms.extend(done["ack_ms"])
        for reason in done["refused"]:
            self.report.refused[reason] += 1
        if done["command"]:
            self.report.commands_delivered += 1
        else:
            self.report.refused["command not delivered within the timeout"] += 1
        self.progress("ran", 1)
        return True

    async def _drain(self) -> None:
        """Give in-flight deliveries to the backend a moment."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.report.delivered < self.report.acknowledged and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    async def _revoke(self, service: EnrollmentService, process: _DeviceProcess) -> None:
        """Revoke a connected device: time until the broker kicks it, and its reconnect's fate."""
        started = time.time()
        await asyncio.to_thread(
            service.change_device,
            process.unit.device_id,
            DeviceState.REVOKED,
            reason=REVOKE_REASON,
            actor="sim",
        )
        self.report.revoked += 1
        closed = await process.expect("session_closed")
        self.report.kicked += 1
        self.report.revoke_kick_ms.append((closed["at"] - started) * 1000)
        self.report.refused[f"revoked device's session: {_first_clause(closed['reason'])}"] += 1
        again = await process.expect("reconnect_failed", "reconnected")
        outcome = (
            _first_clause(again["reason"])
            if again["event"] == "reconnect_failed"
            else "ADMITTED (revocation hole!)"
        )
        self.report.refused[f"revoked device's reconnect: {outcome}"] += 1


def _first_clause(text: str | None) -> str:
    """The SDK's error up to its advice: "the broker refused ...: Not authorized (0x87)"."""
    return (text or "no reason given").split("; ")[0]
