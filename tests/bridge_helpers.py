"""Shared pieces of the bridge tests: a bridged fleetgate broker (in-process or as a
``fleetgate serve broker`` subprocess), Debian's Mosquitto as the upstream with client
certificates required, and paho clients that record what was acknowledged and what arrived.

Everything listens on loopback. The bridge's identity is an enrolled fleet device
(``bridge-<name>``) whose key store directory (device.crt, device.key, ca.crt) is the bridge's
``keystore``: Mosquitto verifies it against the fleet chain, a fleetgate upstream admits it as
a device in group ``bridges``.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from broker_helpers import Creds, ThreadedBroker, enroll, free_port, wait_for
from conftest import PASSPHRASE, Fleet
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties as PahoProperties
from sdk_helpers import Mosquitto

from enrollment.config import CONFIG_FILE, Config, load_config

BRIDGE_GROUP = "bridges"
SITE = "plant-7"
REPO = Path(__file__).resolve().parent.parent


def bridge_identity(fleet: Fleet, name: str) -> Path:
    """Enroll ``bridge-<name>`` in group ``bridges``; its directory is a FileKeyStore."""
    creds = enroll(fleet, f"bridge-{name}", group=BRIDGE_GROUP)
    shutil.copy(fleet.root, creds.cert.parent / "ca.crt")
    return creds.cert.parent


def allow_bridges(fleet: Fleet, publish: list[str], subscribe: list[str] | None = None) -> None:
    """The ACL of group ``bridges``: what bridges may publish locally (inbound) and, as a
    fleetgate upstream's client, what they may publish there."""
    fleet.registry.set_acl(BRIDGE_GROUP, publish=publish, subscribe=subscribe or [], actor="test")


def bridge_toml(
    name: str,
    *,
    port: int,
    keystore: Path,
    protocol: str = "5",
    out: tuple[tuple[str, str], ...] = (
        ("devices/+/telemetry", "sites/{site}/devices/+/telemetry"),
    ),
    inbound: tuple[tuple[str, str], ...] = (("sites/{site}/commands/+", "devices/+/commands"),),
    **settings: Any,
) -> str:
    """One ``[[bridge]]`` table, as an operator writes it in fleetgate.toml."""
    values = {
        "name": name,
        "host": "localhost",
        "port": port,
        "protocol": protocol,
        "keystore": str(keystore),
        "site": SITE,
        "backoff_initial_s": 0.2,
        "backoff_max_s": 1.0,
        "keepalive_s": 5,
        **settings,
    }
    lines = ["[[bridge]]", *(f"{key} = {json.dumps(value)}" for key, value in values.items())]
    for local, remote in out:
        lines += [
            "[[bridge.out]]",
            f"local = {json.dumps(local)}",
            f"remote = {json.dumps(remote)}",
        ]
    for remote, local in inbound:
        lines += ["[[bridge.in]]", f"remote = {json.dumps(remote)}", f"local = {json.dumps(local)}"]
    return "\n".join(lines) + "\n"


def configure(home: Path, *tables: str) -> Config:
    """Write the bridges into ``<home>/fleetgate.toml`` and load the configuration."""
    (home / CONFIG_FILE).write_text("".join(tables))
    return load_config(home, environ={})


def second_home(fleet: Fleet, directory: Path) -> Path:
    """Another broker's data directory: the same CA and registry, its own queue and origin."""
    home = directory / "fleet-data-2"
    shutil.copytree(fleet.config.ca_dir, home / "ca")
    (home / CONFIG_FILE).write_text(f"[database]\nurl = {json.dumps(fleet.config.database_url)}\n")
    return home


class InProcessBroker(ThreadedBroker):
    """A fleetgate broker built from ``config`` (a bridging one), with its bridge status."""

    @property
    def metrics_port(self) -> int:
        return self.broker.ports.metrics

    def status(self) -> dict[str, Any]:
        return bridge_status(self.metrics_port)


class SubprocessBroker:
    """``fleetgate serve broker`` on fixed ports, so it can be SIGKILLed and started again."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.port = free_port()
        self.metrics_port = free_port()
        self.log = home / "broker.stderr"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> SubprocessBroker:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
        env.update(
            FLEETGATE_HOME=str(self.home),
            FLEETGATE_CA_PASSPHRASE=PASSPHRASE,
            FLEETGATE_BROKER_PORT=str(self.port),
            FLEETGATE_BROKER_METRICS_PORT=str(self.metrics_port),
            FLEETGATE_LOG_LEVEL="INFO",
        )
        with self.log.open("ab") as err:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "from enrollment.cli import main; main()",
                    "serve",
                    "broker",
                ],
                env=env,
                cwd=REPO,
                stdout=subprocess.DEVNULL,
                stderr=err,
            )
        wait_for(self._answers, 30, "the broker subprocess to serve /bridges")
        return self

    def _answers(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"the broker exited: {self.log.read_text()[-3000:]}")
        try:
            self.status()
        except OSError:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL: no shutdown, no final commit, as in a crash."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        self.process = None

    def status(self) -> dict[str, Any]:
        return bridge_status(self.metrics_port)


def bridge_status(metrics_port: int) -> dict[str, Any]:
    """``GET /bridges``: what ``fleetgate bridge status --json`` shows."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/bridges", timeout=10) as resp:
        data: dict[str, Any] = json.loads(resp.read())
    return data


def one_bridge(status: dict[str, Any], name: str) -> dict[str, Any]:
    (found,) = [b for b in status["bridges"] if b["name"] == name]
    return found


def metric(metrics_port: int, name: str, labels: str = "") -> float:
    url = f"http://127.0.0.1:{metrics_port}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    wanted = f"fleetgate_broker_{name}{{{labels}}}" if labels else f"fleetgate_broker_{name}"
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no sample {wanted} in /metrics")


def upstream_mosquitto(fleet: Fleet, directory: Path, *, save_often: bool = True) -> Mosquitto:
    """Mosquitto with the fleet's server certificate and ``require_certificate true``.

    ``max_queued_messages 0``: Mosquitto's default (1,000 per client) would drop messages for
    the test's subscriber while the bridge catches up after an outage, and that loss would be
    Mosquitto's, not the bridge's. ``save_often=False`` for a Mosquitto that is never restarted:
    saving its persistence file after every change makes it take a few hundred messages a
    second once thousands wait for a persistent subscriber.
    """
    extra = ("max_queued_messages 0",)
    if not save_often:
        extra += ("autosave_on_changes false", "autosave_interval 3600")
    return Mosquitto(
        directory,
        cafile=fleet.chain,
        certfile=fleet.config.ca_dir / "server.crt",
        keyfile=fleet.config.ca_dir / "server.key",
        extra=extra,
    )


# -- clients ------------------------------------------------------------------------------------


def client_context(root: Path, creds: Creds) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(root))
    context.load_cert_chain(creds.cert, creds.key)
    return context


class Subscriber:
    """A paho client that records every message on ``topic_filter``; with ``persistent``, a
    session that the broker keeps (and a client that reconnects) across an outage."""

    def __init__(
        self,
        port: int,
        root: Path,
        creds: Creds,
        topic_filter: str,
        *,
        version: int = mqtt.MQTTv5,
        persistent: bool = False,
    ) -> None:
        self.received: list[tuple[str, bytes]] = []
        self.properties: list[Any] = []
        self.redelivered: list[bool] = []  # DUP from this subscriber's own broker
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._filter = topic_filter
        kwargs: dict[str, Any] = {"protocol": version}
        if version == mqtt.MQTTv311:
            kwargs["clean_session"] = not persistent
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=creds.device_id, **kwargs)
        self.client.tls_set_context(client_context(root, creds))
        self.client.reconnect_delay_set(0.1, 0.5)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        connect: dict[str, Any] = {}
        if version == mqtt.MQTTv5:
            connect["clean_start"] = not persistent
            if persistent:
                props = PahoProperties(mqtt.PacketTypes.CONNECT)
                props.SessionExpiryInterval = 600
                connect["properties"] = props
        self.client.connect("localhost", port, keepalive=10, **connect)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError(f"{creds.device_id} was not granted {topic_filter} in time")

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self._filter, qos=1)

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, codes: Any, props: Any) -> None:
        """SUBACK: the broker has the subscription (and, if persistent, will keep it)."""
        if all(not code.is_failure for code in codes):
            self._subscribed.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.received.append((message.topic, message.payload))
            self.properties.append(getattr(message, "properties", None))
            self.redelivered.append(bool(message.dup))

    def payloads(self, topic: str | None = None) -> list[bytes]:
        with self._lock:
            return [p for t, p in self.received if topic is None or t == topic]

    def repeats_not_redelivered(self) -> int:
        """Payloads seen before that the subscriber's broker did not mark as its own resend:
        repeats that reached that broker more than once (a bridge's duplicates)."""
        seen: set[tuple[str, bytes]] = set()
        repeats = 0
        with self._lock:
            for message, dup in zip(self.received, self.redelivered, strict=True):
                if message in seen and not dup:
                    repeats += 1
                seen.add(message)
        return repeats

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class Publisher:
    """A device publishing QoS 1 messages one after another; ``acked`` holds the payloads the
    broker acknowledged with success, ``codes`` every PUBACK reason code."""

    def __init__(self, port: int, root: Path, creds: Creds, *, version: int = mqtt.MQTTv5) -> None:
        self.creds = creds
        self.acked: list[bytes] = []
        self.codes: list[int] = []
        self._acks: queue.Queue[tuple[int, int]] = queue.Queue()
        self._closed = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=creds.device_id,
            protocol=version,
            reconnect_on_failure=False,
        )
        self.client.tls_set_context(client_context(root, creds))
        self.client.on_publish = lambda c, u, mid, reason, props: self._acks.put(
            (mid, _code(reason))
        )
        self.client.on_disconnect = lambda *args: self._closed.set()
        connected = threading.Event()
        self.client.on_connect = lambda *args: connected.set()
        self.client.connect("localhost", port, keepalive=30)
        self.client.loop_start()
        if not connected.wait(10):
            raise AssertionError(f"{creds.device_id} did not connect")

    @property
    def topic(self) -> str:
        return f"devices/{self.creds.device_id}/telemetry"

    def publish(
        self, payload: bytes, topic: str | None = None, timeout: float = 10.0
    ) -> int | None:
        """Publish and wait for the PUBACK: its reason code, or ``None`` if the connection
        ended first (the message then counts as not acknowledged)."""
        info = self.client.publish(topic or self.topic, payload, qos=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                mid, code = self._acks.get(timeout=0.05)
            except queue.Empty:
                if self._closed.is_set():
                    return None
                continue
            if mid == info.mid:
                self.codes.append(code)
                if code == 0:
                    self.acked.append(payload)
                return code
        return None

    def run(self, count: int, prefix: str, interval: float = 0.0) -> None:
        """Publish ``prefix-0`` ... until ``count`` or until the connection ends."""
        for n in range(count):
            if self.publish(f"{prefix}-{n:05d}".encode()) is None:
                return
            if interval:
                time.sleep(interval)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class BacklogPublisher:
    """A device with thousands of QoS 1 messages in flight at once, as paho sends them when
    nothing limits its window (``max_inflight_messages 0``): on every reconnect paho resends
    all that are unacknowledged. paho reconnects by itself; :meth:`republish_refused` (MQTT 5)
    publishes again what the broker refused with a reason code, as an application would.
    ``acked`` holds the payloads acknowledged with success."""

    def __init__(self, port: int, root: Path, creds: Creds, *, version: int) -> None:
        self.creds = creds
        self.acked: set[bytes] = set()
        self.acks = 0  # success PUBACKs (paho reports each message's once)
        self.refusals = 0
        self.connects = 0
        self._pending: dict[int, bytes] = {}
        self._early: dict[int, int] = {}
        self._refused: list[bytes] = []
        self._lock = threading.Lock()
        self._first = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=creds.device_id, protocol=version
        )
        self.client.tls_set_context(client_context(root, creds))
        self.client.max_inflight_messages_set(0)
        self.client.reconnect_delay_set(0.2, 1)
        self.client.on_connect = self._on_connect
        self.client.on_publish = self._on_publish
        self.client.connect("localhost", port, keepalive=60)
        self.client.loop_start()
        if not self._first.wait(10):
            raise AssertionError(f"{creds.device_id} did not connect")

    @property
    def topic(self) -> str:
        return f"devices/{self.creds.device_id}/telemetry"

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            with self._lock:
                self.connects += 1
            self._first.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._lock:
            payload = self._pending.pop(mid, None)
            if payload is None:  # acknowledged before publish_all recorded its mid
                self._early[mid] = _code(reason)
            else:
                self._settle(payload, _code(reason))

    def _settle(self, payload: bytes, code: int) -> None:
        if code == 0:
            self.acks += 1
            self.acked.add(payload)
        else:
            self.refusals += 1
            self._refused.append(payload)

    def publish_all(self, payloads: list[bytes]) -> None:
        for payload in payloads:
            # not under the lock: paho holds its own while it calls on_publish, which takes it
            mid = self.client.publish(self.topic, payload, qos=1).mid
            with self._lock:
                code = self._early.pop(mid, None)
                if code is None:
                    self._pending[mid] = payload
                else:
                    self._settle(payload, code)

    def republish_refused(self) -> int:
        """Publish again what was refused since the last call; how many."""
        with self._lock:
            refused, self._refused = self._refused, []
        self.publish_all(refused)
        return len(refused)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _code(reason: Any) -> int:
    return int(reason.value) if hasattr(reason, "value") else int(reason)


def in_order_without_gaps(sent: list[bytes], arrived: list[bytes]) -> bool:
    """Whether every sent payload arrived and the first arrivals keep the sending order."""
    first: list[bytes] = []
    seen: set[bytes] = set()
    for payload in arrived:
        if payload not in seen:
            seen.add(payload)
            first.append(payload)
    wanted = set(sent)
    return [p for p in first if p in wanted] == sent


def threads(*jobs: Callable[[], None]) -> Iterator[threading.Thread]:
    for job in jobs:
        thread = threading.Thread(target=job, daemon=True)
        thread.start()
        yield thread
