"""Shared fixtures: a fresh data directory with a CA, stations, and a live EST server.

The EST server is the real one (aiohttp behind fleetgate's TLS gate) on a loopback port, run on
its own event loop in a thread so tests can drive it with real clients: the SDK's EST client,
httpx, curl and openssl.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from registry_helpers import new_registry

from device_sdk.est import EstClient, client_context
from enrollment.ca import init_ca, load_ca
from enrollment.registry import Registry
from enrollment.server import EnrollmentServer
from enrollment.service import EnrollmentService
from firmware_sim.station import provision_station
from fleetgate.config import Config, load_config
from fleetgate.keyfiles import write_certificates, write_private_key

# Fixtures of hardware stand-ins, loaded once so their session-scoped processes are shared.
pytest_plugins = ["tpm_helpers"]

PASSPHRASE = "test-passphrase-0123"


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Under CI a skipped test is a failure: nothing may silently not run."""
    if os.environ.get("CI", "").lower() not in {"1", "true", "yes"}:
        return
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    skipped = reporter.stats.get("skipped", []) if reporter else []
    if skipped:
        reporter.write_line(f"CI: {len(skipped)} test(s) skipped; skips count as failures here")
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty data directory, selected through the environment as a user would."""
    data = tmp_path / "fleet-data"
    monkeypatch.setenv("FLEETGATE_HOME", str(data))
    monkeypatch.setenv("FLEETGATE_CA_PASSPHRASE", PASSPHRASE)
    for key in list(os.environ):
        if key.startswith("FLEETGATE_") and key not in {
            "FLEETGATE_HOME",
            "FLEETGATE_CA_PASSPHRASE",
        }:
            monkeypatch.delenv(key)
    return data


@pytest.fixture(scope="session")
def _ca_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One CA and one empty registry made per session (scrypt-stretched keys take ~0.1 s each
    to write, the schema's upgrade ~0.05 s); ``config`` copies them."""
    template = tmp_path_factory.mktemp("ca-template") / "fleet-data"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FLEETGATE_CA_PASSPHRASE", PASSPHRASE)
        cfg = load_config(template, environ={})
        init_ca(cfg)
        new_registry(cfg.database_url).close()
    return template / "ca"


@pytest.fixture
def config(home: Path, _ca_template: Path) -> Config:
    """A data directory with an initialised CA and registry (copies of the session's)."""
    cfg = load_config(home)
    shutil.copytree(_ca_template, cfg.ca_dir)
    shutil.copy2(_ca_template.parent / "registry.db", cfg.home / "registry.db")
    return cfg


@dataclass(frozen=True)
class StationCredentials:
    name: str
    cert: Path
    key: Path


class Fleet:
    """Test-side handle on a data directory: the service, the registry and credential files."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.registry = Registry(config.database_url)
        self.service = EnrollmentService(load_ca(config), self.registry)
        self.root = config.ca_dir / "root.crt"
        self.chain = config.ca_dir / "chain.pem"

    def add_station(self, name: str = "line-1") -> StationCredentials:
        directory = self.config.home / "stations" / name
        cert, key, _ = provision_station(self.service, name, directory, actor="test")
        return StationCredentials(name, cert, key)

    def batch(self, station: str, *device_ids: str, group: str = "default") -> None:
        self.registry.add_batch(station, list(device_ids), group=group, label="test", actor="test")

    def write_device(
        self, device_id: str, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate
    ) -> tuple[Path, Path]:
        directory = self.config.home / "devices" / device_id
        write_private_key(directory / "device.key", key)
        write_certificates(directory / "device.crt", [cert, self.service.ca.anchors.issuing])
        return directory / "device.crt", directory / "device.key"


@pytest.fixture
def fleet(config: Config) -> Iterator[Fleet]:
    handle = Fleet(config)
    yield handle
    handle.registry.close()


class RunningServer:
    """An :class:`EnrollmentServer` on its own loop in a thread, on an ephemeral loopback port."""

    def __init__(self, config: Config, *, threads: int | None = None) -> None:
        self._server = EnrollmentServer(config, port=0, threads=threads)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.port = 0

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self.port = self._loop.run_until_complete(self._server.start())
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> RunningServer:
        self._thread.start()
        if not self._ready.wait(15):
            raise RuntimeError("the enrollment server did not start within 15 s")
        return self

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._server.stop(), self._loop).result(15)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(15)

    @property
    def server(self) -> EnrollmentServer:
        """The server itself: its service and the gauges of its thread pool."""
        return self._server

    @property
    def url(self) -> str:
        return f"https://localhost:{self.port}"

    def client(self, trust: Path, cert: Path | None = None, key: Path | None = None) -> EstClient:
        return EstClient(self.url, client_context(trust, cert, key))


@pytest.fixture
def est_server(fleet: Fleet) -> Iterator[RunningServer]:
    server = RunningServer(fleet.config).start()
    yield server
    server.stop()
