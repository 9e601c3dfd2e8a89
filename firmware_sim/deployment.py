"""Where a simulation runs: a throw-away data directory with its own services, or a running
deployment it is pointed at.

In-process mode (the default) makes a fresh data directory (CA, registry, a station, the
scenario's ``[broker]`` settings), runs ``fleetgate serve enrollment`` and ``fleetgate serve
broker`` on it as child processes on free loopback ports (so the broker can be SIGKILLed and
started again), and keeps an :class:`EnrollmentService` in this process for what only the
operator side can do: batches, revocations, back-dated certificates. Nothing of the user's data
directory is touched unless ``--home-registry`` asks for it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from enrollment import profiles
from enrollment.ca import init_ca, load_ca
from enrollment.registry import AuditRecord, DeviceState, Registry
from enrollment.registry.schema import upgrade
from enrollment.service import EnrollmentService
from firmware_sim.fleet import retire_station
from firmware_sim.scenario import Fault, FaultKind
from firmware_sim.station import provision_station
from fleetgate.config import CONFIG_FILE, PASSPHRASE_ENV, Config, load_config
from fleetgate.ids import device_uri

if TYPE_CHECKING:
    from firmware_sim.upstream import Upstream

FLEETGATE = Path(sys.executable).with_name("fleetgate")
HOST = "127.0.0.1"
STATION = "sim-station"
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Target:
    """What devices need to reach the services; picklable for worker processes."""

    est_url: str
    brokers: tuple[tuple[str, int], ...]
    root: Path  # the fleet's root certificate
    station_cert: Path
    station_key: Path
    workdir: Path  # device keys (0600) go under here
    id_prefix: str = "sim-"
    server_hostname: str = "localhost"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def toml_text(table: Mapping[str, Any], prefix: str = "") -> str:
    """A nested table of scalars and lists as TOML (enough for fleetgate.toml settings)."""
    scalars, tables = [], []
    for key, value in table.items():
        if isinstance(value, Mapping):
            tables.append((key, value))
        else:
            scalars.append(f"{key} = {_toml_value(value)}")
    text = "\n".join(scalars) + ("\n" if scalars else "")
    for key, value in tables:
        name = f"{prefix}.{key}" if prefix else key
        text += f"\n[{name}]\n" + toml_text(value, name)
    return text


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


class LocalDeployment:
    """A data directory with its enrollment service and broker as child processes."""

    def __init__(self, home: Path | None, broker_config: Mapping[str, Any]) -> None:
        self.throwaway = home is None
        self.home = Path(tempfile.mkdtemp(prefix="fleetgate-sim-")) if home is None else home
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
        if self.throwaway:
            self.env[PASSPHRASE_ENV] = secrets.token_urlsafe(24)
            (self.home / CONFIG_FILE).write_text(
                toml_text({"broker": dict(broker_config), "log": {"level": "WARNING"}})
            )
        else:
            if broker_config:
                raise ValueError(
                    "a scenario's [broker] settings apply only to a throw-away data directory"
                )
            self.env.update({k: v for k, v in os.environ.items() if k == PASSPHRASE_ENV})
        self.env["FLEETGATE_HOME"] = str(self.home)
        self.ports = {"enrollment": free_port(), "broker": free_port()}
        self.env.update(
            FLEETGATE_ENROLLMENT_HOST=HOST,
            FLEETGATE_ENROLLMENT_PORT=str(self.ports["enrollment"]),
            FLEETGATE_BROKER_HOST=HOST,
            FLEETGATE_BROKER_PORT=str(self.ports["broker"]),
            FLEETGATE_BROKER_METRICS_PORT="0",
            FLEETGATE_BROKER_PLAINTEXT_PORT="0",
        )
        self.config: Config = load_config(self.home, environ=self.env)
        self.brokers = ["broker"]  # the services devices connect to
        self.upstream: Upstream | None = None  # a bridge's upstream, set before start()
        self.service_env: dict[str, dict[str, str]] = {}  # per service, over ``env``
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.service: EnrollmentService | None = None
        self.station_id = ""
        self.broker_kills = 0

    # -- life cycle ----------------------------------------------------------------------------

    def prepare(self) -> EnrollmentService:
        """CA and schema for a throw-away directory; the in-process service either way."""
        passphrase = self.env.get(PASSPHRASE_ENV)
        if passphrase:
            os.environ[PASSPHRASE_ENV] = passphrase  # this process unlocks the CA too
        if self.throwaway:
            init_ca(self.config)
            upgrade(self.config.database_url)
        self.service = EnrollmentService(load_ca(self.config), Registry(self.config.database_url))
        return self.service

    async def start(self) -> None:
        await self.start_service("enrollment")
        if self.upstream is not None:
            await asyncio.to_thread(self.start_upstream, self.upstream)
        await self.start_service("broker")

    def start_upstream(self, upstream: Upstream) -> None:
        """The bridge's identity (enrolled as this run's station's device, group ``bridges``),
        its ``[[bridge]]`` in the throw-away fleetgate.toml, and the upstream itself."""
        if not self.throwaway:
            raise ValueError("a scenario's [bridge] applies only to a throw-away data directory")
        device_id = f"{self.station_id}-bridge"
        self.assign("bridges", [device_id], None)
        key = ec.generate_private_key(ec.SECP256R1())
        validity = dt.timedelta(days=self.config.ca.device_validity_days)
        cert = self.backdated_enroll(
            device_id, key.public_key(), dt.datetime.now(dt.UTC) + validity
        )
        assert self.service is not None
        root = self.config.ca_dir / "root.crt"
        upstream.write_identity(key, [cert, self.service.ca.anchors.issuing], root)
        config = self.home / CONFIG_FILE
        config.write_text(config.read_text() + upstream.bridge_table())
        upstream.start()

    async def start_service(self, name: str) -> None:
        log = (self.home / f"sim-{name}.log").open("ab")
        process = subprocess.Popen(  # noqa: S603 - our own CLI, fixed arguments
            [str(FLEETGATE), "serve", name.split("-")[0]],
            env={**self.env, **self.service_env.get(name, {})},
            stdout=log,
            stderr=log,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(
                    f"fleetgate serve {name} exited ({process.returncode}); see "
                    f"{self.home}/sim-{name}.log"
                )
            try:
                _, writer = await asyncio.open_connection(HOST, self.ports[name])
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise RuntimeError(f"fleetgate serve {name} did not listen within {START_TIMEOUT_S} s")

    def stop_service(self, name: str, *, kill: bool = False) -> None:
        process = self.processes.pop(name, None)
        if process is None or process.poll() is not None:
            return
        if kill:
            self.broker_kills += 1
            process.send_signal(signal.SIGKILL)
        else:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    def close(self, *, keep: bool = False) -> None:
        for name in list(self.processes):
            self.stop_service(name)
        if self.service is not None:
            if not self.throwaway and self.station_id:
                retire_station(self.service, self.station_id)  # its key stays on disk
            self.service.registry.close()
        self.close_extra()
        if self.throwaway and not keep:
            shutil.rmtree(self.home, ignore_errors=True)

    def close_extra(self) -> None:
        """What a deployment with more than the two services stops after them."""
        if self.upstream is not None:
            self.upstream.stop()

    async def inject(self, fault: Fault) -> None:
        """A fault the engine leaves to the deployment: a bridge's upstream outage here, a
        node's failure on the fabric."""
        if fault.kind == FaultKind.UPSTREAM_OUTAGE and self.upstream is not None:
            await self.upstream.outage(fault.duration_s)
            return
        raise ValueError(f"{fault.kind} needs a fabric deployment ([deployment] fabric = 2)")

    # -- what the operator side does -------------------------------------------------------------

    def station(self, workdir: Path) -> tuple[Path, Path]:
        assert self.service is not None
        station_id = f"{STATION}-{secrets.token_hex(3)}"
        cert_path, key_path, _ = provision_station(self.service, station_id, workdir, actor="sim")
        self.station_id = station_id
        return cert_path, key_path

    def assign(self, group: str, device_ids: list[str], acl: dict[str, list[str]] | None) -> None:
        assert self.service is not None
        registry = self.service.registry
        for start in range(0, len(device_ids), 1000):
            registry.add_batch(
                self.station_id,
                device_ids[start : start + 1000],
                group=group,
                label="sim",
                actor="sim",
            )
        if acl is not None:
            registry.set_acl(group, actor="sim", **acl)

    def revoke(self, device_id: str) -> None:
        assert self.service is not None
        self.service.change_device(
            device_id, DeviceState.REVOKED, reason="keyCompromise", actor="sim"
        )

    def backdated_enroll(
        self, device_id: str, public_key: ec.EllipticCurvePublicKey, expires_at: dt.datetime
    ) -> x509.Certificate:
        """A renewal wave's first certificate: issued as the EST service would, but dated so
        that it expires at ``expires_at`` (EST issues ``device_validity_days``, never less),
        and recorded as this run's station's enrollment."""
        assert self.service is not None
        validity = dt.timedelta(days=self.config.ca.device_validity_days)
        cert = self.service.ca.issue(
            profiles.DEVICE,
            profiles.Subject(common_name=device_id, uris=(device_uri(device_id),)),
            public_key,
            validity,
            now=expires_at - validity,
        )
        audit = AuditRecord("sim", "enroll", "ok", device_id, f"serial {cert.serial_number:x}")
        self.service.registry.record_enrollment(self.station_id, device_id, cert, audit)
        return cert

    def station_certificate(self, path: Path) -> x509.Certificate:
        return x509.load_pem_x509_certificates(path.read_bytes())[0]

    def target(self, workdir: Path, id_prefix: str) -> Target:
        cert, key = self.station(workdir)
        return Target(
            est_url=f"https://localhost:{self.ports['enrollment']}",
            brokers=tuple((HOST, self.ports[name]) for name in self.brokers),
            root=self.config.ca_dir / "root.crt",
            station_cert=cert,
            station_key=key,
            workdir=workdir,
            id_prefix=id_prefix,
        )


__all__ = ["LocalDeployment", "Target", "free_port", "toml_text"]
