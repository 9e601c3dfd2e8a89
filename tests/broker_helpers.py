"""Shared pieces of the broker tests: a live broker on loopback, enrolled devices, crafted
certificates, and the three real clients (Mosquitto's command-line tools, paho-mqtt, amqtt).

The broker runs in-process on its own event loop in a thread, with real TLS on ports below
32768 picked free at run time; the clients run as they would for a user (subprocesses for
``mosquitto_pub``/``mosquitto_sub``, paho's network thread, amqtt on its own event loop).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import datetime as dt
import queue
import random
import socket
import ssl
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as mqtt
import pytest
from conftest import Fleet
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.reasoncodes import ReasonCode as PahoReasonCode

from broker import Broker
from broker.mqtt import ConnAck, Connect, Decoder, Packet, encode
from device_sdk.est import device_csr
from enrollment import profiles
from enrollment.registry import AuditEvent
from fleetgate.config import Config
from fleetgate.keyfiles import load_certificates, write_certificates, write_private_key

V311 = mqtt.MQTTv311
V5 = mqtt.MQTTv5
WAIT_S = 10.0


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A loopback port below 32768 (outside Linux's ephemeral range) that is free right now and
    that this process has not handed out before: a caller may take several ports before binding
    any (a NATS cluster takes twelve), and two of them must never be the same."""
    for _ in range(200):
        port = random.randint(20000, 32767)
        if port in _HANDED_OUT:
            continue
        _HANDED_OUT.add(port)
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free loopback port below 32768")


def wait_for(predicate: Callable[[], Any], timeout: float = WAIT_S, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


# -- credentials ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Creds:
    """A certificate (with the issuing CA) and its key on disk, and the id it names."""

    device_id: str
    cert: Path
    key: Path


def enroll(
    fleet: Fleet, device_id: str, *, group: str = "default", station: str = "line-1"
) -> Creds:
    """Enroll ``device_id`` through the station API, as the production line would."""
    stations = {s.id for s in fleet.registry.stations()}
    if station not in stations:
        fleet.add_station(station)
    fleet.batch(station, device_id, group=group)
    station_cert = load_certificates(fleet.config.home / "stations" / station / "station.crt")[0]
    key = ec.generate_private_key(ec.SECP256R1())
    body = base64.encodebytes(device_csr(device_id, key).public_bytes(Encoding.DER))
    cert = fleet.service.enroll(station_cert, body)
    cert_path, key_path = fleet.write_device(device_id, key, cert)
    return Creds(device_id, cert_path, key_path)


def craft(
    fleet: Fleet,
    name: str,
    profile: profiles.Profile,
    *,
    uris: tuple[str, ...] = (),
    dns_names: tuple[str, ...] = (),
    now: dt.datetime | None = None,
    validity: dt.timedelta = dt.timedelta(days=30),
    issuer: profiles.Issuer | None = None,
    chain: tuple[x509.Certificate, ...] | None = None,
) -> Creds:
    """A certificate built directly (bypassing enrollment's checks), signed by the fleet's
    issuing CA unless another ``issuer`` is given."""
    key = ec.generate_private_key(ec.SECP256R1())
    ca = fleet.service.ca
    cert = profiles.build_certificate(
        profile,
        subject=profiles.Subject(common_name=name, uris=uris, dns_names=dns_names),
        public_key=key.public_key(),
        issuer=issuer or ca.issuer,
        validity=validity,
        now=now or dt.datetime.now(dt.UTC),
    )
    directory = fleet.config.home / "crafted" / name
    write_private_key(directory / "client.key", key)
    write_certificates(
        directory / "client.crt", [cert, *(chain if chain is not None else (ca.anchors.issuing,))]
    )
    return Creds(name, directory / "client.crt", directory / "client.key")


def foreign_ca_device(fleet: Fleet, device_id: str) -> Creds:
    """A device certificate with the right shape from a CA that is not the fleet's."""
    now = dt.datetime.now(dt.UTC)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = profiles.build_certificate(
        profiles.ROOT,
        subject=profiles.Subject(common_name="someone else's root"),
        public_key=root_key.public_key(),
        issuer=profiles.Issuer(key=root_key, certificate=None),
        validity=dt.timedelta(days=365),
        now=now,
    )
    return craft(
        fleet,
        device_id,
        profiles.DEVICE,
        uris=(f"urn:fleetgate:device:{device_id}",),
        issuer=profiles.Issuer(key=root_key, certificate=root),
        chain=(),
    )


# -- the broker -----------------------------------------------------------------------------------


class ThreadedBroker:
    """A :class:`Broker` built from ``config`` on its own event loop in a thread.

    ``port`` fixes the MQTT port (a test that restarts a broker needs the same one); the
    metrics port, and by default the MQTT port, are free loopback ports.
    """

    def __init__(self, config: Config, *, port: int | None = None, **settings: Any) -> None:
        broker_settings = dataclasses.replace(
            config.broker, port=port or free_port(), metrics_port=free_port(), **settings
        )
        self.config = dataclasses.replace(config, broker=broker_settings)
        self.broker = Broker(self.config)
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.broker.start())
        except BaseException as exc:  # reported to the test thread by start()
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    def start(self) -> Self:
        self._thread.start()
        if not self._ready.wait(30):
            raise RuntimeError("the broker did not start within 30 s")
        if self._error is not None:
            raise self._error
        return self

    def stop(self) -> None:
        if self._error is None:
            asyncio.run_coroutine_threadsafe(self.broker.stop(), self._loop).result(30)
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        self._loop.close()

    def call(self, function: Callable[[], Any]) -> Any:
        """Run ``function`` on the broker's loop (its state is not thread-safe) and return."""

        async def run() -> Any:
            return function()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    @property
    def port(self) -> int:
        return self.broker.ports.tls


class RunningBroker(ThreadedBroker):
    """A broker of ``fleet``'s data directory, with helpers to read its metrics and audit."""

    def __init__(self, fleet: Fleet, **settings: Any) -> None:
        super().__init__(fleet.config, **settings)
        self.fleet = fleet

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.broker.ports.metrics}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            return str(response.read().decode())

    def metric(self, name: str, labels: str = "") -> float:
        """One sample from /metrics, e.g. ``metric("acl_denials_total", 'action="publish"')``."""
        wanted = f"fleetgate_broker_{name}{{{labels}}}" if labels else f"fleetgate_broker_{name}"
        for line in self.metrics().splitlines():
            if line.startswith(wanted + " "):
                return float(line.rsplit(" ", 1)[1])
        return 0.0

    def audit_events(self, subject: str | None = None, **match: str) -> list[AuditEvent]:
        """Stored audit events about ``subject`` whose fields equal ``match`` (waits for the
        background writer)."""
        asyncio.run_coroutine_threadsafe(self.broker.audit.flush(), self._loop).result(10)
        return [
            event
            for event in self.fleet.registry.audit_events(subject=subject, limit=1000)
            if all(str(getattr(event, key)) == value for key, value in match.items())
        ]


@pytest.fixture(name="broker")
def running_broker(fleet: Fleet) -> Iterator[RunningBroker]:
    """A broker with default settings; import ``running_broker`` to use the fixture."""
    running = RunningBroker(fleet).start()
    yield running
    running.stop()


# -- Mosquitto's clients ---------------------------------------------------------------------------


def mosquitto(
    tool: str,
    broker: RunningBroker,
    creds: Creds | None,
    *args: str,
    version: str = "mqttv5",
    timeout: float = 15.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``mosquitto_pub``/``mosquitto_sub`` against the broker over mutual TLS, with ``-d``
    so the packets it receives (e.g. ``received CONNACK (135)``) are in its output."""
    command = [
        tool,
        "-h",
        "localhost",
        "-p",
        str(broker.port),
        "--cafile",
        str(broker.fleet.root),
        "-V",
        version,
        "-d",
    ]
    if creds is not None:
        command += ["--cert", str(creds.cert), "--key", str(creds.key)]
    return subprocess.run(
        [*command, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


class MosquittoSub:
    """A long-running ``mosquitto_sub``; killed by its PID when the test ends."""

    def __init__(self, broker: RunningBroker, creds: Creds, *args: str, version: str = "mqttv5"):
        command = [
            "stdbuf",  # line-buffered output, so each line is seen when printed
            "-oL",
            "mosquitto_sub",
            "-h",
            "localhost",
            "-p",
            str(broker.port),
            "--cafile",
            str(broker.fleet.root),
            "--cert",
            str(creds.cert),
            "--key",
            str(creds.key),
            "-V",
            version,
            "-d",
            *args,
        ]
        self.process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_line(self, predicate: Callable[[str], bool], timeout: float = WAIT_S) -> str:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"mosquitto_sub printed no such line; saw {self.seen}")
            try:
                line = self.lines.get(timeout=remaining)
            except queue.Empty:
                continue
            self.seen.append(line)
            if predicate(line):
                return line

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)


# -- paho-mqtt -------------------------------------------------------------------------------------


@dataclass
class Received:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    properties: Any


@dataclass
class PahoEvents:
    connack: queue.Queue[tuple[int, bool, Any]] = field(default_factory=queue.Queue)
    disconnects: queue.Queue[tuple[int, float]] = field(default_factory=queue.Queue)
    messages: queue.Queue[Received] = field(default_factory=queue.Queue)
    subacks: queue.Queue[list[int]] = field(default_factory=queue.Queue)
    published: queue.Queue[tuple[int, int]] = field(default_factory=queue.Queue)


def tls_context(broker: RunningBroker, creds: Creds | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(broker.fleet.root))
    if creds is not None:
        context.load_cert_chain(creds.cert, creds.key)
    return context


class Paho:
    """paho-mqtt 2.x with its network thread, recording every callback in queues."""

    def __init__(
        self,
        broker: RunningBroker,
        creds: Creds | None,
        *,
        version: int = V5,
        client_id: str | None = None,
        clean: bool = True,
        session_expiry: int | None = None,
        will: tuple[str, bytes, int, bool] | None = None,
        keep_alive: int = 60,
    ) -> None:
        self.version = version
        self.events = PahoEvents()
        kwargs: dict[str, Any] = {"protocol": version}
        if version == V311:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=creds.device_id if client_id is None and creds else (client_id or ""),
            reconnect_on_failure=False,  # a refused or kicked client must stay out
            **kwargs,
        )
        self.client.tls_set_context(tls_context(broker, creds))
        if will is not None:
            self.client.will_set(*will)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.on_publish = self._on_publish
        self._broker = broker
        self._clean = clean
        self._session_expiry = session_expiry
        self._keep_alive = keep_alive

    def connect(self) -> tuple[int, bool, Any]:
        """Connect and wait for the CONNACK: (reason code value, session present, properties)."""
        self.start()
        return self.events.connack.get(timeout=WAIT_S)

    def start(self) -> None:
        """Open the connection and start paho's network thread, without waiting for CONNACK."""
        properties = None
        kwargs: dict[str, Any] = {}
        if self.version == V5:
            kwargs["clean_start"] = self._clean
            if self._session_expiry is not None:
                properties = PahoProperties(mqtt.PacketTypes.CONNECT)
                properties.SessionExpiryInterval = self._session_expiry
        self.client.connect(
            "localhost",
            self._broker.port,
            keepalive=self._keep_alive,
            properties=properties,
            **kwargs,
        )
        self.client.loop_start()

    def subscribe(self, topic: str, qos: int = 0, **options: Any) -> list[int]:
        if self.version == V5:
            self.client.subscribe(topic, options=mqtt.SubscribeOptions(qos=qos, **options))
        else:
            self.client.subscribe(topic, qos)
        return self.events.subacks.get(timeout=WAIT_S)

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> int:
        """Publish and, for QoS 1/2, wait for the flow to end; returns its reason code."""
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if qos == 0:
            info.wait_for_publish(WAIT_S)
            return 0
        mid, code = self.events.published.get(timeout=WAIT_S)
        assert mid == info.mid
        return code

    def message(self, timeout: float = WAIT_S) -> Received:
        return self.events.messages.get(timeout=timeout)

    def no_message(self, within: float = 0.5) -> None:
        try:
            unexpected = self.events.messages.get(timeout=within)
        except queue.Empty:
            return
        raise AssertionError(f"unexpected message {unexpected}")

    def disconnect_code(self, timeout: float = WAIT_S) -> tuple[int, float]:
        """The reason code paho reports for the connection's end, and the wall-clock time."""
        return self.events.disconnects.get(timeout=timeout)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def drop(self) -> None:
        """Vanish without DISCONNECT, as a crashed device would."""
        sock = self.client.socket()
        if sock is not None:
            sock.shutdown(socket.SHUT_RDWR)
        self.client.loop_stop()

    # -- callbacks (paho's network thread) --

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.events.connack.put((_code(reason), bool(flags.session_present), props))

    def _on_disconnect(
        self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self.events.disconnects.put((_code(reason), time.time()))

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.events.messages.put(
            Received(
                message.topic,
                message.payload,
                message.qos,
                bool(message.retain),
                bool(message.dup),
                getattr(message, "properties", None),
            )
        )

    def _on_subscribe(self, client: Any, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        self.events.subacks.put([_code(r) for r in reasons])

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self.events.published.put((mid, _code(reason)))


def _code(reason: Any) -> int:
    if isinstance(reason, PahoReasonCode):
        return int(reason.value)
    return int(reason)


# -- a raw client on fleetgate's codec, for byte-level checks no ready-made client exposes ------


class RawClient:
    """One TLS socket speaking packets through :mod:`broker.mqtt`: for what paho hides (DUP
    resends, withheld acknowledgements, silence past the keep-alive, topic aliases)."""

    def __init__(self, broker: RunningBroker, creds: Creds, *, level: int = 5) -> None:
        raw = socket.create_connection(("localhost", broker.port), timeout=WAIT_S)
        self.sock = tls_context(broker, creds).wrap_socket(raw, server_hostname="localhost")
        self.level = level
        self.decoder = Decoder(protocol_level=level)

    def send(self, *packets: Packet) -> None:
        self.sock.sendall(b"".join(encode(p, self.level) for p in packets))

    def receive(self, timeout: float = WAIT_S) -> Packet | None:
        """The next packet, or ``None`` once the server closed the connection."""
        deadline = time.monotonic() + timeout
        while (packet := self.decoder.next_packet()) is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError("no packet from the broker in time")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except (ssl.SSLError, ConnectionError):
                return None
            if not data:
                return None
            self.decoder.feed(data)
        return packet

    def nothing(self, within: float = 0.5) -> None:
        """Assert the broker sends nothing for ``within`` seconds."""
        self.sock.settimeout(within)
        try:
            data = self.sock.recv(65536)
        except TimeoutError:
            return
        raise AssertionError(f"unexpected bytes from the broker: {data!r}")

    def connect(self, **fields: Any) -> ConnAck:
        self.send(Connect(**fields))
        connack = self.receive()
        assert isinstance(connack, ConnAck), connack
        return connack

    def close(self) -> None:
        self.sock.close()
