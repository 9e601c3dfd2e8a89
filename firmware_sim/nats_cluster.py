"""A real nats-server cluster on loopback: the simulator's fabric deployment, and (through
``tests/nats_cluster.py``) the fabric tests, the demo and the benchmarks.

Three nodes (or any number) with JetStream file storage in a scratch directory, on free ports,
started as plain processes and stopped (or SIGKILLed, for a fault) by their PIDs. The binary is
nats-server >= 2.10: ``FLEETGATE_NATS_SERVER`` if set, else the copy ``scripts/get-nats-server.sh``
puts in ``.tools/nats``, else ``nats-server`` on PATH. Optionally each node also runs
nats-server's own MQTT listener, to check fleetgate's subject mapping against the server's.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from broker.fabric.local import find_binary
from broker.fabric.node import FabricUnavailable
from firmware_sim.deployment import free_port
from fleetgate.config import FabricSettings

BINARY_ENV = "FLEETGATE_NATS_SERVER"


def nats_server_binary() -> Path:
    """The nats-server to run; a RuntimeError saying what to do if none is recent enough."""
    try:
        return find_binary(FabricSettings(local_binary=os.environ.get(BINARY_ENV, "")))
    except FabricUnavailable as exc:
        raise RuntimeError(
            f"{exc} (or set {BINARY_ENV}; `make bootstrap-test` runs the script)"
        ) from exc


def server_version(binary: str | Path) -> tuple[int, int, int]:
    """The (major, minor, patch) a nats-server binary says it is."""
    argv = [str(binary), "--version"]
    out = subprocess.run(argv, capture_output=True, text=True, check=True).stdout  # noqa: S603
    found = re.search(r"v(\d+)\.(\d+)\.(\d+)", out)
    if found is None:
        raise RuntimeError(f"{binary} --version said {out!r}")
    major, minor, patch = (int(part) for part in found.groups())
    return major, minor, patch


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

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
    """``with NatsCluster(directory) as cluster:`` runs a healthy cluster for the block."""

    def __init__(
        self, directory: Path, *, size: int = 3, mqtt: bool = False, extra: str = ""
    ) -> None:
        self.binary = nats_server_binary()
        self.directory = directory
        self.mqtt = mqtt
        self.extra = extra  # more server configuration (accounts, TLS)
        self.nodes = [
            NatsNode(
                f"n{i + 1}",
                directory / f"n{i + 1}",
                client_port=free_port(),
                route_port=free_port(),
                http_port=free_port(),
                mqtt_port=free_port(),
            )
            for i in range(size)
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
            node.process = subprocess.Popen(  # noqa: S603 - a nats-server, fixed arguments
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


__all__ = ["NatsCluster", "NatsNode", "healthy_cluster", "nats_server_binary"]
