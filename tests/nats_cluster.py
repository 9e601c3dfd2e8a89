"""A real nats-server cluster on loopback for the fabric tests, the demo and the benchmark.

Three nodes (or any number) with JetStream file storage in a scratch directory, on free ports,
started as plain processes and stopped by their PIDs. The binary is nats-server >= 2.10, as
``scripts/get-nats-server.sh`` provides it in ``.tools/nats`` (``make bootstrap-test``);
``FLEETGATE_NATS_SERVER`` names another one. Optionally each node also runs nats-server's own
MQTT listener, to check fleetgate's subject mapping against the server's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from broker_helpers import free_port

ROOT = Path(__file__).resolve().parent.parent
LOCAL_BINARY = ROOT / ".tools" / "nats" / "usr" / "sbin" / "nats-server"
MIN_VERSION = (2, 10)


def server_version(binary: str | Path) -> tuple[int, int, int]:
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=True).stdout
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"{binary} --version said {out!r}")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


def nats_server_binary() -> Path:
    """The nats-server to run; fails with what to do if there is none recent enough."""
    named = os.environ.get("FLEETGATE_NATS_SERVER")
    candidates = [Path(named)] if named else [LOCAL_BINARY]
    if not named and (on_path := shutil.which("nats-server")):
        candidates.append(Path(on_path))
    for candidate in candidates:
        if candidate.exists() and server_version(candidate)[:2] >= MIN_VERSION:
            return candidate
    raise RuntimeError(
        f"no nats-server >= 2.10 among {[str(c) for c in candidates]}: run "
        "`make bootstrap-test` (scripts/get-nats-server.sh) or set FLEETGATE_NATS_SERVER"
    )


@dataclass
class NatsNode:
    """One server: its ports, its directory and, while it runs, its process."""

    name: str
    directory: Path
    client_port: int
    route_port: int
    http_port: int
    mqtt_port: int
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.client_port}"

    def http_json(self, path: str) -> Any:
        """A monitoring endpoint's answer (/varz, /healthz, /connz...), or None if it is down."""
        url = f"http://127.0.0.1:{self.http_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=1) as response:
                return json.loads(response.read())
        except (OSError, ValueError):
            return None

    def healthy(self) -> bool:
        health = self.http_json("/healthz")
        return bool(health) and health.get("status") == "ok"

    def current_peers(self) -> int:
        """As the JetStream meta leader: how many other servers are current (0 elsewhere)."""
        meta = (self.http_json("/jsz") or {}).get("meta_cluster") or {}
        return sum(bool(peer.get("current")) for peer in meta.get("replicas") or [])


class NatsCluster:
    """``with NatsCluster(tmp_path) as cluster:`` runs a healthy cluster for the block."""

    def __init__(
        self, directory: Path, *, size: int = 3, mqtt: bool = False, extra: str = ""
    ) -> None:
        self.binary = nats_server_binary()
        self.directory = directory
        self.mqtt = mqtt
        self.extra = extra  # more server configuration: accounts_block(), tls_block()
        ports = [[free_port() for _ in range(4)] for _ in range(size)]
        self.nodes = [
            NatsNode(f"n{i + 1}", directory / f"n{i + 1}", *node_ports)
            for i, node_ports in enumerate(ports)
        ]

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def _config(self, node: NatsNode) -> Path:
        routes = "\n".join(f"    nats-route://127.0.0.1:{n.route_port}" for n in self.nodes)
        mqtt = f"mqtt {{ listen: 127.0.0.1:{node.mqtt_port} }}" if self.mqtt else ""
        cluster = f"""cluster {{
  name: fleetgate-test
  listen: 127.0.0.1:{node.route_port}
  routes: [
{routes}
  ]
}}"""
        if len(self.nodes) == 1:  # a lone server: JetStream would wait for peers in a cluster
            cluster = ""
        text = f"""
server_name: {node.name}
listen: 127.0.0.1:{node.client_port}
http: 127.0.0.1:{node.http_port}
jetstream {{
  store_dir: "{node.directory / "js"}"
  max_memory_store: 64MB
  max_file_store: 1GB
}}
{cluster}
{mqtt}
{self.extra}
"""
        node.directory.mkdir(parents=True, exist_ok=True)
        path = node.directory / "node.conf"
        path.write_text(text)
        return path

    def start_node(self, node: NatsNode) -> None:
        config = self._config(node)
        with open(node.directory / "server.log", "ab") as log:
            node.process = subprocess.Popen(
                [self.binary, "-c", str(config)],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )

    def start(self, timeout: float = 60.0) -> Self:
        for node in self.nodes:
            self.start_node(node)
        self.wait_healthy(self.nodes, timeout)
        return self

    def wait_healthy(self, nodes: list[NatsNode], timeout: float = 60.0) -> None:
        """Until every node answers /healthz ok and the meta leader sees all the others as
        current: a fresh cluster is healthy before it can place a replicated stream."""
        deadline = time.monotonic() + timeout
        while not (
            all(node.healthy() for node in nodes)
            and any(node.current_peers() == len(self.nodes) - 1 for node in self.nodes)
        ):
            for node in nodes:
                if node.process is not None and node.process.poll() is not None:
                    log = (node.directory / "server.log").read_text(errors="replace")
                    raise RuntimeError(f"nats-server {node.name} exited:\n{log[-2000:]}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"nats cluster not healthy after {timeout} s:\n{self._state()}")
            time.sleep(0.05)

    def _state(self) -> str:
        """What each node says, for a cluster that does not become healthy."""
        lines = []
        for node in self.nodes:
            log = node.directory / "server.log"
            tail = log.read_text(errors="replace")[-600:] if log.exists() else "(no log)"
            lines.append(
                f"{node.name}: healthz={node.http_json('/healthz')} "
                f"current_peers={node.current_peers()}\n{tail}"
            )
        return "\n".join(lines)

    def kill(self, node: NatsNode, sig: int = signal.SIGKILL) -> None:
        """Signal one node by its PID and reap it."""
        if node.process is None:
            return
        if node.process.poll() is None:
            os.kill(node.process.pid, sig)
            try:
                node.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.kill(node.process.pid, signal.SIGKILL)
                node.process.wait()
        node.process = None

    def restart(self, node: NatsNode, timeout: float = 60.0) -> None:
        """Start a stopped or killed node again on its data, and wait for the cluster."""
        self.start_node(node)
        self.wait_healthy(self.nodes, timeout)

    def stop(self) -> None:
        for node in self.nodes:
            self.kill(node, signal.SIGTERM)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def healthy_cluster(
    directory: Path, *, attempts: int = 3, timeout: float = 30.0, **options: Any
) -> Iterator[NatsCluster]:
    """A running cluster, started again on fresh ports and directories if one start does not
    become healthy in ``timeout`` (seen on the loaded CI machine: the meta leader kept one
    peer not current for over a minute; a fresh start was healthy in under a second)."""
    for attempt in range(1, attempts + 1):
        cluster = NatsCluster(directory / f"start-{attempt}", **options)
        try:
            cluster.start(timeout)
        except TimeoutError:
            cluster.stop()
            if attempt == attempts:
                raise
            continue
        try:
            yield cluster
        finally:
            cluster.stop()
        return


# -- accounts, permissions and TLS (issue 12, "no way around the gate") ----------------------------


@dataclass(frozen=True)
class FabricUsers:
    """The NATS users of the fleet's account, with the passwords a test made up."""

    fleetgate: str
    telemetry: str
    commands: str


def accounts_block(users: FabricUsers) -> str:
    """The account and users docs/operations.md describes: fleetgate's nodes may use every
    subject of the FLEET account (device topics are arbitrary MQTT topics, each checked against
    the device's ACL before it reaches NATS); a telemetry reader may only subscribe to device
    telemetry; a command writer may only publish device commands. No user, no entry."""
    return f"""
accounts {{
  FLEET {{
    jetstream: enabled
    users: [
      {{ user: fleetgate, password: "{users.fleetgate}" }}
      {{ user: telemetry, password: "{users.telemetry}",
         permissions: {{
           publish: {{ deny: [">"] }}
           subscribe: {{ allow: ["devices.*.telemetry", "devices.*.telemetry.>"] }}
         }} }}
      {{ user: commands, password: "{users.commands}",
         permissions: {{
           publish: {{ allow: ["devices.*.commands", "devices.*.commands.>"] }}
           subscribe: {{ deny: [">"] }}
         }} }}
    ]
  }}
}}
"""


def tls_block(cert: Path, key: Path, ca: Path) -> str:
    """Client connections over TLS 1.3 only, each with a certificate from ``ca``."""
    return f"""
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{ca}"
  verify: true
  min_version: "1.3"
  timeout: 2
}}
"""
