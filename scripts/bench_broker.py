"""mTLS MQTT broker benchmark: fleetgate's broker beside Mosquitto, same certificates, same load.

``make bench-broker`` runs this. It builds a throw-away data directory (CA, one station, a
backend identity allowed to subscribe to every device's telemetry, and thousands of devices
enrolled in-process through ``EnrollmentService.enroll``, as over EST but without HTTP), issues
one broker certificate from the fleet CA, and runs the same load against

* ``fleetgate serve broker`` (the registry, the change feed, the ACLs), and
* Debian's Mosquitto 2.0.11 with a generated configuration: the same server certificate and key,
  the fleet chain as ``cafile``, ``require_certificate``, ``use_identity_as_username``, TLS 1.3;
  beyond that as shipped except ``set_tcp_nodelay true`` (fleetgate sets TCP_NODELAY too),
  ``max_inflight_messages 64`` (fleetgate's ``broker.receive_maximum``: the same send window)
  and ``max_queued_messages 0`` (see ``mosquitto_config``: 2.0.11 otherwise drops QoS 1
  messages under this load), errors, warnings and notices logged, connections not.

Each broker is pinned to core 0 (``taskset``); the load generator, one process pinned
to core 1, speaks MQTT 5 over TLS 1.3 with P-256 certificates and P-256 key exchange only, its
TLS on :class:`fleetgate.tlspump.TLSPump` over plain TCP (one record read at a time). Its
hot paths (PUBLISH out, PUBLISH/PUBACK in) are hand-rolled byte strings, checked byte for byte
against the ``broker.mqtt`` codec at start-up, because the codec (~5 us to encode and ~9 us to
decode a PUBLISH here) would cost the generator as much as Mosquitto spends on a whole message,
and a generator that spends more per message than the broker cannot measure the broker.
CONNECT, CONNACK, SUBSCRIBE and DISCONNECT go through the codec.

Phases, each bounded in time and count, loopback only:

1. idle memory: N idle mTLS connections (keep-alive 1 h); the broker's VmRSS before and after.
2. connect rate: C CONNECT/CONNACK/DISCONNECT sessions from distinct device identities, K in
   flight; connects/s, handshake+CONNACK latency, broker CPU per connect (``/proc/<pid>/stat``).
   These identities connected in phase 1 too: a reconnect, as after a network outage
   (fleetgate remembers what a certificate it has already seen names; a first connect costs
   it ~0.1 ms more). This phase's
   client is a lean non-blocking ``ssl.SSLSocket`` loop (:class:`ConnectBurst`), not asyncio.
3. QoS 0 and 4. QoS 1 fan-in: P publishers -> 1 subscriber (``devices/+/telemetry``) for D
   seconds. Closed loop: each publisher keeps at most W messages in flight end to end (sent,
   not yet received by the subscriber), sending in bursts of W/2, so the brokers' queues stay
   bounded (P x W <= 900, below fleetgate's max_queued_messages) and latency means something:
   at saturation it is about P x W / throughput. Messages/s at the subscriber, publish->receive
   latency (a timestamp in the payload, one clock), broker CPU per message.
5. saturated QoS 1 fan-in (``fanin-q1-sat``, issue 11): ``--sat-publishers`` (50) -> 1
   subscriber, each publisher keeping ``--sat-window`` (64) PUBLISHes unacknowledged, or the
   Receive Maximum its broker's CONNACK grants if that is less (Mosquitto grants its
   ``max_inflight_messages``, 64; fleetgate its ``[broker.limits] receive_maximum``, 20), in
   bursts of half that, whatever the subscriber has received: the brokers at their defaults
   decide how much builds up between publisher and subscriber (fleetgate: a queue of 1,000
   with ``overflow_policy = "backpressure"``; Mosquitto: as configured above, its queue
   unbounded). Publish->receive latency p50/p99, messages never delivered, messages/s. Whatever
   the broker does, up to publishers x window messages are in flight, so the latency cannot be
   below that number divided by the rate (3,200 / rate at a window of 64, 1,000 / rate at 20).
6. revoke kick (fleetgate only): R connected devices are revoked one by one in-process with
   ``EnrollmentService.change_device(id, REVOKED)`` (what ``fleetgate device revoke`` calls,
   CRL signing included, minus the CLI's ~1 s start-up), timed until the device's connection
   sees the broker's DISCONNECT (or close).

For every phase the broker's and the generator's CPU per operation are printed, with how busy
each core was (``/proc/stat``, irq and softirq included: loopback TCP costs CPU outside both
processes) and how much other processes used meanwhile: the generator's ceiling (1 / its CPU
per operation) says whether a figure is broker- or generator-bound, and "one core's worth"
(1 / the broker's CPU per operation) compares the brokers whatever the generator could drive.
``--profile`` runs fleetgate's broker under cProfile and prints where its time goes;
``--phases idle,connect`` (say) runs only those phases, for A/B runs of one change.
The last line is machine-readable::

    connect_ratio=<x> fanin_q0_ratio=<x> fanin_q1_ratio=<x> idle_kib_per_conn=<n> \
revoke_kick_p99_ms=<n> fanin_q1_sat_ratio=<x> fanin_q1_sat_p50_ms=<n> fanin_q1_sat_p99_ms=<n> \
fanin_q1_sat_mosquitto_p50_ms=<n> fanin_q1_sat_mosquitto_p99_ms=<n> fanin_q1_sat_lost=<n> \
fanin_q1_sat_mosquitto_lost=<n>

(ratios are fleetgate / Mosquitto; the others are each broker's own figures; ``nan`` when a
broker could not be measured.)
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import math
import os
import pstats
import random
import resource
import selectors
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchlib import (
    chosen_names,
    close_all,
    cpu_seconds,
    fanin_options,
    free_port,
    percentile,
    run_options,
)
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from broker.mqtt import (
    ConnAck,
    Connect,
    Decoder,
    Disconnect,
    ProtocolError,
    Publish,
    QoS,
    ReasonCode,
    SubAck,
    Subscribe,
    Subscription,
    decode_varint,
    encode,
    write_varint,
)
from broker.tls import broker_credentials
from device_sdk.est import client_context, device_csr
from enrollment.ca import ensure_server_certificate, init_ca, load_ca
from enrollment.registry import DeviceState, Registry
from enrollment.registry.schema import upgrade
from enrollment.service import EnrollmentService
from firmware_sim.station import provision_station
from fleetgate.config import PASSPHRASE_ENV, Config, load_config
from fleetgate.keyfiles import write_secret
from fleetgate.tlspump import TLSPump

REPO = Path(__file__).resolve().parents[1]

PASSPHRASE = "bench-passphrase-0123"
STATION = "bench"
BACKEND = "bench-backend"  # the subscriber; its group may subscribe to devices/+/telemetry
BACKEND_GROUP = "bench-backend"
TELEMETRY_FILTER = "devices/+/telemetry"
HOST = "127.0.0.1"
SERVER_NAME = "localhost"
BROKER_CORE = 0
GENERATOR_CORE = 1
MQTT5 = 5
IDLE_KEEP_ALIVE = 3600
MOSQUITTO = "/usr/sbin/mosquitto"
MOSQUITTO_QUEUE = 0  # no limit; see mosquitto_config
MOSQUITTO_INFLIGHT = 64  # = fleetgate's broker.receive_maximum, the per-client send window

DISCONNECT = encode(Disconnect(), MQTT5)
PUBACK_HEAD = b"\x40\x02"
PACKET_IDS = [n.to_bytes(2, "big") for n in range(65536)]
PHASES = ("idle", "connect", "fanin", "fanin-q1-sat", "kick")
STAMP = struct.Struct("<dH")  # perf_counter() at send, publisher index; the payload's head


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--brokers",
        choices=("both", "fleetgate", "mosquitto"),
        default="both",
        help="which brokers to run (ratios need both)",
    )
    parser.add_argument("--idle", type=int, default=5000, help="idle connections (N)")
    parser.add_argument("--connects", type=int, default=5000, help="timed connects (C)")
    parser.add_argument("--concurrency", type=int, default=64, help="connects in flight (K)")
    fanin_options(parser, publishers=100, duration=10.0, window=8)
    parser.add_argument(
        "--sat-publishers", type=int, default=50, help="saturated QoS 1 fan-in publishers"
    )
    parser.add_argument(
        "--sat-window",
        type=int,
        default=64,
        help="saturated fan-in: unacknowledged PUBLISHes per publisher (capped by the broker's "
        "Receive Maximum)",
    )
    parser.add_argument(
        "--mosquitto-queue",
        type=int,
        default=MOSQUITTO_QUEUE,
        help="Mosquitto's max_queued_messages (0: no limit, the default here; 1000 is "
        "Mosquitto's own default, under which it drops the saturated fan-in's messages)",
    )
    parser.add_argument("--kicks", type=int, default=20, help="devices revoked while connected")
    parser.add_argument(
        "--phases",
        default=",".join(PHASES),
        help=f"comma-separated phases to run, of {','.join(PHASES)} (connects are reconnects only "
        "after the idle phase); ratios of phases not run are nan",
    )
    parser.add_argument("--phase-timeout", type=float, default=60.0, help="bound on a phase, s")
    parser.add_argument(
        "--fleetgate-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a FLEETGATE_* setting for fleetgate's broker (A/B runs; repeatable)",
    )
    run_options(parser, profile_top=30)
    args = parser.parse_args()
    args.phases = set(chosen_names(parser, "--phases", args.phases, PHASES))
    if args.connects > args.idle:
        parser.error("--connects may not exceed --idle (connects reuse the idle identities)")
    if args.publishers > args.idle or args.publishers < 1:
        parser.error("--publishers must be between 1 and --idle")
    if not 1 <= args.sat_publishers <= args.idle or args.sat_window < 2:
        parser.error("--sat-publishers must be between 1 and --idle, --sat-window >= 2")
    if args.window < 2 or args.window * args.publishers > 900:
        parser.error(
            "--window must be >= 2 and window * publishers <= 900 (fleetgate's broker queues at "
            "most 1,000 messages per session by default; beyond that it drops them)"
        )
    if args.payload < STAMP.size or args.payload > 100:
        parser.error(f"--payload must be between {STAMP.size} and 100 bytes")
    return args


# -- set-up: the fleet ----------------------------------------------------------------------------


@dataclass
class Fleet:
    """A throw-away data directory and the credentials the generator connects with."""

    home: Path
    config: Config
    registry: Registry
    service: EnrollmentService
    devices: list[str]  # idle, connect and fan-in identities
    kick_ids: list[str]  # revoked during the run: used last, and only against fleetgate
    contexts: dict[str, ssl.SSLContext]
    broker_cert: Path
    broker_key: Path

    @property
    def chain(self) -> Path:
        return self.config.ca_dir / "chain.pem"

    @property
    def root(self) -> Path:
        return self.config.ca_dir / "root.crt"


def device_context(root: Path, credentials: Path) -> ssl.SSLContext:
    """The SDK's client context (TLS 1.3, fleet root, device key and chain), P-256 ECDHE only."""
    context = client_context(root, credentials)
    context.set_ecdh_curve("prime256v1")  # the only group offered: no X25519 key share
    return context


def provision(tmp: Path, args: argparse.Namespace, extra: dict[str, str] | None = None) -> Fleet:
    """``extra`` enrolls more identities, id -> group (their contexts only; scripts/soak.py)."""
    home = tmp / "fleet-data"
    os.environ[PASSPHRASE_ENV] = PASSPHRASE  # this process only: the CA is unlocked in-process
    config = load_config(home, environ={})
    init_ca(config)
    upgrade(config.database_url)  # what `fleetgate ca init` does for a new data directory
    registry = Registry(config.database_url)
    service = EnrollmentService(load_ca(config), registry)
    station_dir = home / "stations" / STATION
    *_, station_cert = provision_station(service, STATION, station_dir, actor="bench")
    devices = [f"dev-{n:05d}" for n in range(args.idle)]
    kick_ids = [f"kick-{n:03d}" for n in range(args.kicks)]
    enrolling = [*devices, *kick_ids]
    for start in range(0, len(enrolling), 1000):
        registry.add_batch(
            STATION, enrolling[start : start + 1000], group="default", label="bench", actor="bench"
        )
    registry.add_batch(STATION, [BACKEND], group=BACKEND_GROUP, label="bench", actor="bench")
    for device_id, group in (extra or {}).items():
        registry.add_batch(STATION, [device_id], group=group, label="bench", actor="bench")
    registry.set_acl(BACKEND_GROUP, publish=[], subscribe=[TELEMETRY_FILTER], actor="bench")
    # The broker's own certificate, issued now as `fleetgate serve broker` would on first start
    # (it finds it current and reuses it); Mosquitto is given the same files.
    broker = ensure_server_certificate(config, broker_credentials(config), ca=service.ca)

    issuing_pem = service.ca.anchors.issuing.public_bytes(Encoding.PEM)
    root = config.ca_dir / "root.crt"
    contexts = {}
    for device_id in [BACKEND, *enrolling, *(extra or {})]:
        key = ec.generate_private_key(ec.SECP256R1())
        body = base64.b64encode(device_csr(device_id, key).public_bytes(Encoding.DER))
        cert = service.enroll(station_cert, body)
        path = tmp / "devices" / f"{device_id}.pem"
        write_secret(
            path,
            key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption())
            + cert.public_bytes(Encoding.PEM)
            + issuing_pem,
        )
        contexts[device_id] = device_context(root, path)
    return Fleet(
        home, config, registry, service, devices, kick_ids, contexts, broker.cert, broker.key
    )


# -- the brokers ----------------------------------------------------------------------------------


@dataclass
class BrokerProcess:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path
    metrics_port: int = 0

    @property
    def pid(self) -> int:
        return self.proc.pid


def raise_nofile() -> None:
    """Soft RLIMIT_NOFILE up to the hard limit (the generator, and each broker via preexec)."""
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def pinned(argv: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", str(BROKER_CORE), *argv] if pin else argv


def mosquitto_config(fleet: Fleet, port: int, log: Path, queue: int = MOSQUITTO_QUEUE) -> str:
    return "\n".join(
        [
            "# Generated by scripts/bench_broker.py: one mutual-TLS listener, no persistence.",
            "per_listener_settings false",
            "persistence false",
            "user root",  # the key is the bench's own 0600 file; do not drop to 'mosquitto'
            f"log_dest file {log}",
            "log_type error",
            "log_type warning",
            "log_type notice",  # "Outgoing messages are being dropped for client ..."
            "connection_messages false",
            "set_tcp_nodelay true",  # as fleetgate (TCP_NODELAY); Nagle delays a CONNACK ~40 ms
            f"max_inflight_messages {MOSQUITTO_INFLIGHT}",
            # Under sustained QoS 1 fan-in, 2.0.11 starts dropping the subscriber's messages
            # ("Outgoing messages are being dropped") although the closed loop keeps at most
            # publishers x window (<= 900) in the broker: within seconds with the default limit
            # of 1000, after ~230,000 messages with 100,000. 0 turns the check off; the
            # generator's window still bounds the real queue.
            f"max_queued_messages {queue}",
            f"listener {port} {HOST}",
            f"cafile {fleet.chain}",
            f"certfile {fleet.broker_cert}",
            f"keyfile {fleet.broker_key}",
            "require_certificate true",
            "use_identity_as_username true",
            "tls_version tlsv1.3",
            "",
        ]
    )


def start_mosquitto(
    tmp: Path, fleet: Fleet, pin: bool, queue: int = MOSQUITTO_QUEUE
) -> BrokerProcess:
    port = free_port()
    log = tmp / "mosquitto.log"
    conf = tmp / "mosquitto.conf"
    conf.write_text(mosquitto_config(fleet, port, log, queue))
    stderr = tmp / "mosquitto.stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            pinned([MOSQUITTO, "-c", str(conf)], pin),
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=raise_nofile,
        )
    return BrokerProcess("mosquitto", proc, port, stderr)


# ``fleetgate serve broker`` under cProfile (main thread: the event loop), dumped on SIGTERM.
PROFILED_BROKER = """\
import cProfile, sys
from fleetgate.cli import main
sys.argv = ["fleetgate", "serve", "broker"]
profiler = cProfile.Profile()
profiler.enable()
try:
    main()
except SystemExit:
    pass
finally:
    profiler.disable()
    profiler.dump_stats({out!r})
"""


def start_fleetgate(
    tmp: Path,
    fleet: Fleet,
    pin: bool,
    log_level: str,
    profile_out: Path | None,
    settings: Iterable[str] = (),
) -> BrokerProcess:
    port, metrics_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETGATE_")}
    env.update(
        FLEETGATE_HOME=str(fleet.home),
        FLEETGATE_CA_PASSPHRASE=PASSPHRASE,  # unused while ca/broker.crt is valid
        FLEETGATE_LOG_LEVEL=log_level,
        FLEETGATE_BROKER_HOST=HOST,
        FLEETGATE_BROKER_PORT=str(port),
        FLEETGATE_BROKER_METRICS_PORT=str(metrics_port),
        FLEETGATE_BROKER_PLAINTEXT_PORT="0",
    )
    for setting in settings:
        name, _, value = setting.partition("=")
        env[name] = value
    fleetgate = Path(sys.executable).with_name("fleetgate")
    argv = [str(fleetgate), "serve", "broker"]
    if profile_out is not None:
        argv = [sys.executable, "-c", PROFILED_BROKER.format(out=str(profile_out))]
    stderr = tmp / "fleetgate-broker.stderr"
    with stderr.open("wb") as err:
        proc = subprocess.Popen(
            pinned(argv, pin),
            env=env,
            cwd=REPO,
            stdout=subprocess.DEVNULL,
            stderr=err,
            preexec_fn=raise_nofile,
        )
    return BrokerProcess("fleetgate", proc, port, stderr, metrics_port)


def stop_broker(broker: BrokerProcess) -> None:
    if broker.proc.poll() is not None:
        return
    broker.proc.send_signal(signal.SIGTERM)
    try:
        broker.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        print(f"warning: {broker.name} ignored SIGTERM for 15 s; killing it", file=sys.stderr)
        broker.proc.kill()
        broker.proc.wait()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def wait_quiet(pid: int, *, busy: float = 0.05, limit: float = 15.0) -> None:
    """Until the process uses under ``busy`` of a core over 0.3 s (closes, GC, audit writes)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(0.3)
        if cpu_seconds(pid) - before < busy * 0.3:
            return


def other_mosquittos(ours: set[int]) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) not in ours:
            with contextlib.suppress(OSError):
                if (entry / "comm").read_text().strip() == "mosquitto":
                    found.append(int(entry.name))
    return found


# -- the generator: one MQTT 5 link --------------------------------------------------------------


class Refused(ConnectionError):
    """The broker answered CONNECT with a failure reason code."""


# Whatever opening a link can raise: ssl.SSLError, ConnectionError and Refused are OSErrors.
LINK_ERRORS = (OSError, TimeoutError)


class TlsChannel:
    """The plaintext side of a :class:`Link`: what the phases write through, encrypted by the
    link's :class:`TLSPump` onto its TCP transport."""

    __slots__ = ("pump", "tcp")

    def __init__(self, tcp: asyncio.Transport, pump: TLSPump) -> None:
        self.tcp = tcp
        self.pump = pump

    def write(self, data: bytes) -> None:
        self.tcp.write(self.pump.send(data))

    def close(self) -> None:
        if not self.tcp.is_closing():
            self.tcp.write(self.pump.close())
            self.tcp.close()

    def abort(self) -> None:
        self.tcp.abort()

    def is_closing(self) -> bool:
        return self.tcp.is_closing()


RECEIVE_BUFFER = memoryview(bytearray(16 * 1024))
"""Every link reads into this one buffer (the loop is single-threaded and a read is consumed at
once): without it, asyncio allocates 256 KiB for each ``recv``, costly for many small reads."""


class Link(asyncio.BufferedProtocol):
    """One client connection: TLS by a :class:`TLSPump` (the public ``ssl`` API) over plain
    TCP read into :data:`RECEIVE_BUFFER`, so the generator holds no read buffer per connection.
    Control packets go through the codec until a phase installs a fast ``on_data``;
    ``transport`` is set once the handshake is done; ``closed_at`` is when a DISCONNECT or the
    close was first seen."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, client_id: str, context: ssl.SSLContext
    ) -> None:
        self.client_id = client_id
        self.pump = TLSPump(context, server_side=False, server_hostname=SERVER_NAME)
        self.tcp: asyncio.Transport | None = None
        self.transport: TlsChannel | None = None
        self.handshake: asyncio.Future[None] = loop.create_future()
        self.decoder = Decoder(protocol_level=MQTT5)
        self.connack: asyncio.Future[ConnAck] = loop.create_future()
        self.suback: asyncio.Future[SubAck] = loop.create_future()
        self.gone: asyncio.Future[str] = loop.create_future()
        self.on_data: Callable[[bytes], None] | None = None
        self.closed_at: float | None = None
        self.close_reason = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.tcp = transport
        transport.write(self.pump.start())

    def tls(self) -> tuple[str, bytes | None]:
        """The negotiated version and suite, and the server's certificate (DER)."""
        ssl_object = self.pump.ssl_object
        cert = ssl_object.getpeercert(binary_form=True)
        cipher = ssl_object.cipher()
        return f"{ssl_object.version()} {cipher[0] if cipher else '-'}", cert

    def get_buffer(self, sizehint: int) -> memoryview:
        return RECEIVE_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        pump, tcp = self.pump, self.tcp
        assert tcp is not None
        try:
            plain = pump.receive(RECEIVE_BUFFER[:nbytes])
        except ssl.SSLError as exc:
            tcp.write(pump.outgoing())
            tcp.abort()
            self.closed(f"TLS: {exc}", exc)
            return
        if pump.has_output():  # a handshake flight, a key update's answer
            tcp.write(pump.outgoing())
        if self.transport is None and pump.handshake_done:
            self.transport = TlsChannel(tcp, pump)
            self.handshake.set_result(None)
        if plain:
            self.plaintext(plain)
        if pump.closed_by_peer:
            tcp.close()

    def plaintext(self, data: bytes) -> None:
        if self.on_data is not None:
            self.on_data(data)
            return
        self.decoder.feed(data)
        try:
            while (packet := self.decoder.next_packet()) is not None:
                if isinstance(packet, ConnAck):
                    if not self.connack.done():
                        self.connack.set_result(packet)
                elif isinstance(packet, SubAck):
                    if not self.suback.done():
                        self.suback.set_result(packet)
                elif isinstance(packet, Disconnect):
                    self.closed(f"DISCONNECT 0x{int(packet.reason_code):02x}")
        except ProtocolError as exc:
            self.closed(f"protocol error: {exc}")
            if self.transport is not None:
                self.transport.abort()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed("closed" + (f" ({exc})" if exc else ""))

    def closed(self, reason: str, error: OSError | None = None) -> None:
        if self.closed_at is None:
            self.closed_at = time.perf_counter()
            self.close_reason = reason
        if not self.handshake.done():
            self.handshake.set_exception(error or ConnectionError(reason))
            self.handshake.exception()  # retrieved: Endpoint.open may have given up already
        for waiter in (self.connack, self.suback):
            if not waiter.done():
                waiter.set_exception(ConnectionError(reason))
                waiter.exception()  # retrieved: nobody may be waiting for a SUBACK
        if not self.gone.done():
            self.gone.set_result(reason)

    def disconnect(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(DISCONNECT)
            self.transport.close()


class Endpoint:
    """Where a broker listens, and how the generator opens links to it."""

    def __init__(self, port: int, contexts: dict[str, ssl.SSLContext], timeout: float) -> None:
        self.port = port
        self.contexts = contexts
        self.timeout = timeout

    async def open(self, client_id: str, *, keep_alive: int = 60) -> Link:
        """TLS handshake, CONNECT, CONNACK; raises on any failure (the link is then closed)."""
        loop = asyncio.get_running_loop()
        context = self.contexts[client_id]
        _, link = await asyncio.wait_for(
            loop.create_connection(lambda: Link(loop, client_id, context), HOST, self.port),
            self.timeout,
        )
        try:
            await asyncio.wait_for(asyncio.shield(link.handshake), self.timeout)
        except BaseException:
            assert link.tcp is not None
            link.tcp.abort()
            raise
        assert link.transport is not None
        link.transport.write(encode(Connect(client_id=client_id, keep_alive=keep_alive), MQTT5))
        try:
            ack = await asyncio.wait_for(asyncio.shield(link.connack), self.timeout)
        except BaseException:
            link.transport.abort()
            raise
        if ack.reason_code != ReasonCode.SUCCESS:
            link.transport.abort()
            raise Refused(f"CONNACK 0x{int(ack.reason_code):02x}")
        return link

    async def subscribe(self, link: Link, topic_filter: str, qos: QoS) -> int:
        assert link.transport is not None
        packet = Subscribe(
            packet_id=1, subscriptions=(Subscription(topic_filter=topic_filter, qos=qos),)
        )
        link.transport.write(encode(packet, MQTT5))
        ack = await asyncio.wait_for(asyncio.shield(link.suback), self.timeout)
        return int(ack.reason_codes[0])


@dataclass
class Failures:
    count: int = 0
    samples: list[str] = field(default_factory=list)

    def add(self, what: str, exc: BaseException) -> None:
        self.count += 1
        if len(self.samples) < 5:
            self.samples.append(f"{what}: {type(exc).__name__} {exc}".strip())


async def bounded(
    items: Iterable[str], concurrency: int, job: Callable[[str], Awaitable[None]]
) -> None:
    source = iter(items)

    async def worker() -> None:
        for item in source:
            await job(item)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def open_many(
    endpoint: Endpoint, ids: list[str], concurrency: int, failures: Failures, keep_alive: int = 60
) -> list[Link]:
    links: list[Link] = []

    async def job(client_id: str) -> None:
        try:
            links.append(await endpoint.open(client_id, keep_alive=keep_alive))
        except LINK_ERRORS as exc:
            failures.add(client_id, exc)

    await bounded(ids, concurrency, job)
    return links


def core_ticks() -> dict[int, tuple[int, int]]:
    """(busy, total) clock ticks per core from /proc/stat; busy includes irq and softirq, which
    loopback TCP spends outside any process's own CPU time."""
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            ticks = [int(v) for v in values[:8]]
            idle = ticks[3] + ticks[4]
            out[int(name[3:])] = (sum(ticks) - idle, sum(ticks))
    return out


def others_cpu(exclude: set[int]) -> dict[int, float]:
    """CPU seconds so far of every other process (the machine is shared: is it quiet?)."""
    out = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and int(entry.name) not in exclude:
            with contextlib.suppress(OSError, IndexError, ValueError):
                out[int(entry.name)] = cpu_seconds(int(entry.name))
    return out


@dataclass
class Usage:
    """Wall time and CPU of the broker and of the generator over one measured interval."""

    wall: float = 0.0
    broker_cpu: float = 0.0
    generator_cpu: float = 0.0
    core_busy: dict[int, float] = field(default_factory=dict)  # share of each core, 0..1
    others_cpu: float = 0.0  # CPU of all other processes on the machine meanwhile

    def busy(self, core: int) -> float:
        return self.core_busy.get(core, math.nan)


class Meter:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.wall = time.perf_counter()
        self.broker = cpu_seconds(pid)
        self.generator = time.process_time()
        self.cores = core_ticks()
        self.others = others_cpu({pid, os.getpid()})

    def stop(self) -> Usage:
        wall = time.perf_counter() - self.wall
        broker, generator = (
            cpu_seconds(self.pid) - self.broker,
            time.process_time() - self.generator,
        )
        cores = core_ticks()
        busy = {}
        for core, (busy1, total1) in cores.items():
            busy0, total0 = self.cores.get(core, (busy1, total1))
            if total1 > total0:
                busy[core] = (busy1 - busy0) / (total1 - total0)
        others = others_cpu({self.pid, os.getpid()})
        foreign = sum(cpu - self.others.get(pid, 0.0) for pid, cpu in others.items())
        return Usage(wall, broker, generator, busy, max(0.0, foreign))


# -- phases ---------------------------------------------------------------------------------------


@dataclass
class IdleResult:
    connections: int = 0
    rss_before_kib: int = 0
    rss_after_kib: int = 0
    fds_added: int = 0
    connect_s: float = 0.0

    @property
    def kib_per_conn(self) -> float:
        if not self.connections:
            return math.nan
        return (self.rss_after_kib - self.rss_before_kib) / self.connections


async def idle_phase(
    endpoint: Endpoint, pid: int, ids: list[str], concurrency: int, failures: Failures
) -> IdleResult:
    await wait_quiet(pid)
    result = IdleResult(rss_before_kib=rss_kib(pid))
    fds_before = open_fds(pid)
    started = time.perf_counter()
    links = await open_many(endpoint, ids, concurrency, failures, keep_alive=IDLE_KEEP_ALIVE)
    result.connect_s = time.perf_counter() - started
    try:
        await wait_quiet(pid)
        await asyncio.sleep(0.5)
        result.connections = sum(1 for link in links if not link.gone.done())
        result.rss_after_kib = rss_kib(pid)
        result.fds_added = open_fds(pid) - fds_before
    finally:
        await close_all(links)
    await wait_quiet(pid)
    return result


@dataclass
class ConnectResult:
    connects: int = 0
    latencies: list[float] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    @property
    def per_s(self) -> float:
        return self.connects / self.usage.wall if self.usage.wall else math.nan


async def connect_phase(
    endpoint: Endpoint, pid: int, ids: list[str], concurrency: int, failures: Failures
) -> ConnectResult:
    """C connects through :class:`ConnectBurst`, which blocks this event loop meanwhile (no other
    phase runs then: the idle links are closed before)."""
    result = ConnectResult()
    burst = ConnectBurst(endpoint, ids, concurrency, failures)
    meter = Meter(pid)
    burst.run()
    result.usage = meter.stop()
    result.latencies = burst.latencies
    result.connects = len(burst.latencies)
    await wait_quiet(pid)
    return result


class ConnectBurst:
    """The connect-rate load: K mTLS sessions in flight, each TCP connect, TLS 1.3 handshake,
    CONNECT, CONNACK (success checked), DISCONNECT, close_notify, close; then the next identity.

    Non-blocking ``ssl.SSLSocket``s on one ``selectors`` loop: asyncio's TLS transport,
    ``create_connection`` and ``wait_for`` cost the generator ~1 ms per connect on top of
    OpenSSL's ~1.1 ms, more than either broker spends, so the rate measured the generator.
    The client still verifies the broker's certificate chain and name, as a device does.
    """

    def __init__(
        self, endpoint: Endpoint, ids: list[str], concurrency: int, failures: Failures
    ) -> None:
        self.endpoint = endpoint
        self.pending = iter(ids)
        self.concurrency = concurrency
        self.failures = failures
        self.latencies: list[float] = []
        self.selector = selectors.DefaultSelector()

    def run(self) -> None:
        for _ in range(self.concurrency):
            self._start_next()
        deadline_check = time.monotonic() + 1.0
        while self.selector.get_map():
            for key, _ in self.selector.select(timeout=0.5):
                key.data.step()
            if time.monotonic() >= deadline_check:
                deadline_check = time.monotonic() + 1.0
                for key in list(self.selector.get_map().values()):
                    key.data.check_deadline()
        self.selector.close()

    def _start_next(self) -> None:
        client_id = next(self.pending, None)
        if client_id is not None:
            _Session(self, client_id).start()

    def done(self, session: _Session, error: BaseException | None) -> None:
        if error is None:
            self.latencies.append(time.perf_counter() - session.started)
        else:
            self.failures.add(session.client_id, error)
        self._start_next()


class _Session:
    """One connect of a :class:`ConnectBurst`: a small state machine driven by readiness."""

    def __init__(self, burst: ConnectBurst, client_id: str) -> None:
        self.burst = burst
        self.client_id = client_id
        self.started = time.perf_counter()
        self.deadline = time.monotonic() + burst.endpoint.timeout
        self.raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.tls: ssl.SSLSocket | None = None
        self.step = self._connected
        self.received = bytearray()

    def start(self) -> None:
        self.raw.setblocking(False)
        self.raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.raw.connect_ex((HOST, self.burst.endpoint.port))
        self.burst.selector.register(self.raw, selectors.EVENT_WRITE, self)

    def check_deadline(self) -> None:
        if time.monotonic() > self.deadline:
            self._finish(TimeoutError(f"no CONNACK within {self.burst.endpoint.timeout} s"))

    def _connected(self) -> None:
        error = self.raw.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._finish(ConnectionRefusedError(error, os.strerror(error)))
            return
        self.burst.selector.unregister(self.raw)
        context = self.burst.endpoint.contexts[self.client_id]
        self.tls = context.wrap_socket(
            self.raw, server_hostname=SERVER_NAME, do_handshake_on_connect=False
        )
        self.burst.selector.register(self.tls, selectors.EVENT_READ, self)
        self.step = self._handshake
        self._handshake()

    def _handshake(self) -> None:
        assert self.tls is not None
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            return
        except OSError as exc:  # ssl.SSLError included: a refused handshake
            self._finish(exc)
            return
        self.tls.sendall(encode(Connect(client_id=self.client_id, keep_alive=60), MQTT5))
        self.step = self._connack

    def _connack(self) -> None:
        assert self.tls is not None
        try:
            data = self.tls.recv(4096)
        except ssl.SSLWantReadError:
            return  # a record without application data (a session ticket), or half a record
        except OSError as exc:
            self._finish(exc)
            return
        if not data:
            self._finish(ConnectionResetError("closed before CONNACK"))
            return
        self.received += data
        head = decode_varint(self.received, 1, len(self.received))
        if head is None or len(self.received) < head[1] + head[0]:
            return  # the CONNACK is not complete yet
        body = head[1]  # acknowledge flags, then the reason code
        if self.received[0] != 0x20 or self.received[body + 1] != ReasonCode.SUCCESS:
            self._finish(Refused(f"CONNACK {bytes(self.received[: body + 2]).hex()}"))
            return
        self.tls.sendall(DISCONNECT)
        self._finish(None)

    def _finish(self, error: BaseException | None) -> None:
        sock = self.tls or self.raw
        self.burst.selector.unregister(sock)
        if self.tls is not None:
            with contextlib.suppress(OSError, ValueError):
                self.tls.unwrap()  # close_notify; the broker's own is not awaited
        sock.close()
        self.burst.done(self, error)


@dataclass
class Publisher:
    index: int
    link: Link
    head: bytes  # fixed header, topic (and, QoS 0, the empty property list)
    sent: int = 0
    acked: int = 0
    lost: int = 0  # given up on by the watchdog (not delivered within 2 s), maybe late
    lost_acks: int = 0
    refused: int = 0
    next_id: int = 1
    receive_maximum: int = 65535
    burst: int = 1  # PUBLISHes sent at once: half its window (as capped by receive_maximum)
    seen: int = 0  # deliveries at the watchdog's last look
    progress_at: float = 0.0
    buf: bytearray = field(default_factory=bytearray)
    # QoS 1: [send time, PUBLISHes of that burst not yet acknowledged], oldest first (the
    # brokers acknowledge in order), for the publish->PUBACK latency.
    bursts: deque[list[float]] = field(default_factory=deque)


def publish_head(topic: str, qos: QoS, payload_size: int) -> bytes:
    """PUBLISH bytes up to the packet id (QoS 1) or the payload (QoS 0); MQTT 5, no properties."""
    name = topic.encode()
    remaining = 2 + len(name) + (2 if qos else 0) + 1 + payload_size
    head = bytes([0x30 | (int(qos) << 1)]) + write_varint(remaining) + len(name).to_bytes(2, "big")
    return head + name if qos else head + name + b"\x00"


def check_fast_codec(payload_size: int) -> None:
    """The hand-rolled PUBLISH bytes are exactly what ``broker.mqtt`` encodes and decodes."""
    topic = "devices/dev-00042/telemetry"
    payload = STAMP.pack(time.perf_counter(), 42) + b"x" * (payload_size - STAMP.size)
    for qos in (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE):
        head = publish_head(topic, qos, payload_size)
        ours = head + (PACKET_IDS[7] + b"\x00" if qos else b"") + payload
        packet = Publish(topic=topic, payload=payload, qos=qos, packet_id=7 if qos else None)
        if ours != encode(packet, MQTT5):
            raise RuntimeError(f"the generator's QoS {int(qos)} PUBLISH differs from the codec's")
        decoder = Decoder(protocol_level=MQTT5)
        decoder.feed(ours)
        if decoder.next_packet() != packet:
            raise RuntimeError(f"the codec does not decode the generator's QoS {int(qos)} PUBLISH")


class FanIn:
    """P publishers -> one subscriber, closed loop (W messages in flight per publisher), or
    ``saturated``: each publisher keeps W PUBLISHes unacknowledged (at most the broker's
    Receive Maximum), whatever the subscriber has received, so the broker's own flow control
    (when it acknowledges, when it reads) is all that bounds what it holds."""

    def __init__(
        self, qos: QoS, window: int, payload_size: int, *, saturated: bool = False
    ) -> None:
        self.qos = qos
        self.window = window
        self.saturated = saturated
        self.burst = max(1, window // 2)
        self.pad = b"x" * (payload_size - STAMP.size)
        self.payload_size = payload_size
        self.publishers: list[Publisher] = []
        self.delivered: list[int] = []
        self.received = 0
        self.latencies: list[float] = []
        # QoS 1: publish->PUBACK, the time a message spent before the broker took it (socket,
        # publish rate, held by a full queue); the rest of its latency is the broker's queue
        # and the subscriber's window.
        self.ack_latencies: list[float] = []
        self.measuring = False
        self.stopping = False
        self.sub_buf = bytearray()
        self.subscriber: Link | None = None
        self.touched: set[int] = set()
        self.problems: Counter[str] = Counter()
        self.stalls = 0  # a publisher got nothing delivered for 2 s

    def add_publisher(self, link: Link) -> None:
        index = len(self.publishers)
        head = publish_head(f"devices/{link.client_id}/telemetry", self.qos, self.payload_size)
        pub = Publisher(index, link, head, progress_at=time.perf_counter())
        ack = link.connack.result()
        if ack.properties.receive_maximum:
            pub.receive_maximum = ack.properties.receive_maximum
        # Half the window the broker lets it have: a burst of half of 64 would never fit in a
        # granted Receive Maximum below 32, and the publisher would never send.
        pub.burst = min(self.burst, max(1, pub.receive_maximum // 2))
        self.publishers.append(pub)
        self.delivered.append(0)
        link.on_data = lambda data: self.publisher_data(pub, data)

    def start(self, subscriber: Link) -> None:
        self.subscriber = subscriber
        subscriber.on_data = self.subscriber_data
        for pub in self.publishers:
            self.pump(pub)

    def pump(self, pub: Publisher) -> None:
        """Send a burst if this publisher has room in its window (and, QoS 1, the broker's)."""
        if self.stopping or pub.link.closed_at is not None:
            return
        unacked = pub.sent - pub.acked - pub.lost_acks
        if self.saturated:
            room = min(self.window, pub.receive_maximum) - unacked
        else:
            room = self.window - (pub.sent - self.delivered[pub.index] - pub.lost)
            if self.qos:
                room = min(room, pub.receive_maximum - unacked)
        if room < pub.burst:
            return
        sent_at = time.perf_counter()
        tail = STAMP.pack(sent_at, pub.index) + self.pad
        if self.qos:
            pub.bursts.append([sent_at, room])
            ids, head, body = PACKET_IDS, pub.head, b"\x00" + tail
            first = pub.next_id
            data = b"".join([head + ids[(first + n - 1) % 65535 + 1] + body for n in range(room)])
            pub.next_id = (first + room - 1) % 65535 + 1
        else:
            data = (pub.head + tail) * room
        assert pub.link.transport is not None
        pub.link.transport.write(data)
        pub.sent += room

    def subscriber_data(self, data: bytes) -> None:
        buf = self.sub_buf
        buf += data
        now = time.perf_counter()
        end = len(buf)
        pos = 0
        delivered, touched, unpack = self.delivered, self.touched, STAMP.unpack_from
        latencies = self.latencies if self.measuring else None
        acks: list[bytes] = []
        count = 0
        while end - pos >= 2:
            first = buf[pos]
            remaining = buf[pos + 1]
            if remaining < 0x80:
                body = pos + 2
            else:
                header = decode_varint(buf, pos + 1, end)
                if header is None:
                    break
                remaining, body = header
            stop = body + remaining
            if stop > end:
                break
            if first >> 4 == 3:
                at = body + 2 + (buf[body] << 8 | buf[body + 1])
                if first & 0x06:
                    acks.append(PUBACK_HEAD + buf[at : at + 2])
                    at += 2
                props = buf[at]
                if props < 0x80:
                    at += 1 + props
                else:
                    header = decode_varint(buf, at, stop)
                    assert header is not None
                    at = header[1] + header[0]
                stamp, index = unpack(buf, at)
                delivered[index] += 1
                touched.add(index)
                if latencies is not None:
                    latencies.append(now - stamp)
                count += 1
            elif first >> 4 == 14:
                self.problems[f"subscriber got DISCONNECT 0x{buf[body]:02x}"] += 1
            pos = stop
        del buf[:pos]
        self.received += count
        if acks and self.subscriber is not None and self.subscriber.transport is not None:
            self.subscriber.transport.write(b"".join(acks))
        if touched:
            publishers = self.publishers
            for index in touched:
                self.pump(publishers[index])
            touched.clear()

    def publisher_data(self, pub: Publisher, data: bytes) -> None:
        buf = pub.buf
        buf += data
        end = len(buf)
        pos = 0
        now = time.perf_counter()
        bursts, acks = pub.bursts, self.ack_latencies if self.measuring else None
        while end - pos >= 2:
            header = decode_varint(buf, pos + 1, end)
            if header is None:
                break
            remaining, body = header
            stop = body + remaining
            if stop > end:
                break
            kind = buf[pos] >> 4
            if kind == 4:  # PUBACK; a reason code, if any, follows the packet id
                pub.acked += 1
                if bursts:
                    oldest = bursts[0]
                    if acks is not None:
                        acks.append(now - oldest[0])
                    oldest[1] -= 1
                    if not oldest[1]:
                        bursts.popleft()
                if remaining >= 3 and buf[body + 2] >= 0x80:
                    pub.refused += 1
            elif kind == 14:
                reason = buf[body] if remaining else 0
                self.problems[f"publisher got DISCONNECT 0x{reason:02x}"] += 1
            pos = stop
        del buf[:pos]
        self.pump(pub)

    def outstanding(self, pub: Publisher) -> int:
        return max(0, pub.sent - self.delivered[pub.index] - pub.lost)

    def undelivered(self) -> int:
        return sum(max(0, p.sent - self.delivered[p.index]) for p in self.publishers)

    async def watchdog(self) -> None:
        """A publisher whose messages stopped arriving for 2 s counts them lost and goes on."""
        while True:
            await asyncio.sleep(0.25)
            now = time.perf_counter()
            for pub in self.publishers:
                if self.delivered[pub.index] != pub.seen:
                    pub.seen, pub.progress_at = self.delivered[pub.index], now
                elif now - pub.progress_at > 2.0 and not self.stopping:
                    self.stalls += 1
                    pub.lost += self.outstanding(pub)
                    pub.lost_acks += max(0, pub.sent - pub.acked - pub.lost_acks)
                    pub.bursts.clear()
                    pub.progress_at = now
                    self.pump(pub)


@dataclass
class FanInResult:
    qos: int
    delivered: int = 0
    latencies: list[float] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)  # QoS 1: publish->PUBACK
    usage: Usage = field(default_factory=Usage)
    sent_total: int = 0
    lost: int = 0  # never delivered, even after the final drain
    stalls: int = 0
    shares: list[int] = field(default_factory=list)  # delivered per publisher, timed part
    refused: int = 0
    problems: Counter[str] = field(default_factory=Counter)
    granted: int = 65535  # the smallest Receive Maximum a publisher's CONNACK granted

    @property
    def per_s(self) -> float:
        return self.delivered / self.usage.wall if self.usage.wall else math.nan


async def fanin_phase(
    endpoint: Endpoint,
    pid: int,
    qos: QoS,
    publishers: list[str],
    args: argparse.Namespace,
    failures: Failures,
    *,
    saturated: bool = False,
) -> FanInResult:
    test = FanIn(qos, args.window, args.payload, saturated=saturated)
    subscriber = await endpoint.open(BACKEND)
    links = [subscriber]
    watchdog: asyncio.Task[None] | None = None
    try:
        granted = await endpoint.subscribe(subscriber, TELEMETRY_FILTER, qos)
        if granted != int(qos):
            raise RuntimeError(f"SUBSCRIBE {TELEMETRY_FILTER} QoS {int(qos)}: 0x{granted:02x}")
        pub_links = await open_many(endpoint, publishers, args.concurrency, failures)
        links += pub_links
        if len(pub_links) != len(publishers):
            raise RuntimeError(f"only {len(pub_links)} of {len(publishers)} publishers connected")
        for link in pub_links:
            test.add_publisher(link)
        watchdog = asyncio.create_task(test.watchdog())
        test.start(subscriber)
        await asyncio.sleep(1.0)  # warm-up: not counted
        received0, each0 = test.received, list(test.delivered)
        test.measuring = True
        meter = Meter(pid)
        await asyncio.sleep(args.duration)
        usage = meter.stop()
        test.measuring = False
        delivered = test.received - received0
        shares = sorted(n - n0 for n, n0 in zip(test.delivered, each0, strict=True))
        test.stopping = True
        deadline = time.monotonic() + (10.0 if saturated else 3.0)
        while time.monotonic() < deadline and test.undelivered():
            await asyncio.sleep(0.05)
        return FanInResult(
            qos=int(qos),
            delivered=delivered,
            latencies=test.latencies,
            ack_latencies=test.ack_latencies,
            usage=usage,
            sent_total=sum(p.sent for p in test.publishers),
            lost=test.undelivered(),
            stalls=test.stalls,
            shares=shares,
            refused=sum(p.refused for p in test.publishers),
            problems=test.problems,
            granted=min(p.receive_maximum for p in test.publishers),
        )
    finally:
        if watchdog is not None:
            watchdog.cancel()
        await close_all(links, limit=5.0)
        await wait_quiet(pid)


async def saturated_phase(
    endpoint: Endpoint,
    pid: int,
    publishers: list[str],
    args: argparse.Namespace,
    failures: Failures,
) -> FanInResult:
    """QoS 1 fan-in at saturation, the brokers at their defaults: each publisher keeps
    ``--sat-window`` PUBLISHes unacknowledged (at most the broker's Receive Maximum), so the
    latency is whatever the broker lets build up between publisher and subscriber."""
    sat = argparse.Namespace(**{**vars(args), "window": args.sat_window})
    return await fanin_phase(
        endpoint, pid, QoS.AT_LEAST_ONCE, publishers, sat, failures, saturated=True
    )


@dataclass
class KickResult:
    latencies: list[float] = field(default_factory=list)  # revoke call -> DISCONNECT/close seen
    call_s: list[float] = field(default_factory=list)  # the revoke call alone (commit + CRL)
    reasons: Counter[str] = field(default_factory=Counter)
    missed: int = 0
    reconnect: str = ""


def revoke(service: EnrollmentService, device_id: str) -> float:
    started = time.perf_counter()
    service.change_device(device_id, DeviceState.REVOKED, reason="keyCompromise", actor="bench")
    return time.perf_counter() - started


async def kick_phase(
    endpoint: Endpoint, fleet: Fleet, failures: Failures, timeout: float = 5.0
) -> KickResult:
    result = KickResult()
    links = await open_many(endpoint, fleet.kick_ids, 8, failures)
    rng = random.Random(98)
    try:
        for link in links:
            # Spread the revocations over the feed's poll period rather than hitting one phase.
            await asyncio.sleep(rng.uniform(0.05, 0.3))
            started = time.perf_counter()
            result.call_s.append(await asyncio.to_thread(revoke, fleet.service, link.client_id))
            try:
                await asyncio.wait_for(asyncio.shield(link.gone), timeout)
            except TimeoutError:
                result.missed += 1
                continue
            assert link.closed_at is not None
            result.latencies.append(link.closed_at - started)
            result.reasons[link.close_reason.split(" (")[0]] += 1
        if links:
            try:
                again = await endpoint.open(links[0].client_id)
            except Refused as exc:
                result.reconnect = f"refused ({exc})"
            except LINK_ERRORS as exc:
                result.reconnect = f"refused ({type(exc).__name__}: {exc})"
            else:
                again.disconnect()
                result.reconnect = "ADMITTED: a revoked device reconnected"
    finally:
        await close_all(links, limit=5.0)
    return result


# -- one broker, all phases -----------------------------------------------------------------------


@dataclass
class BrokerResult:
    name: str
    idle: IdleResult | None = None
    connect: ConnectResult | None = None
    fanin: dict[int, FanInResult] = field(default_factory=dict)
    saturated: FanInResult | None = None
    kick: KickResult | None = None
    failures: Failures = field(default_factory=Failures)
    cipher: str = ""
    server_cert: bytes | None = None
    error: str = ""
    metrics: list[str] = field(default_factory=list)
    log_problems: list[str] = field(default_factory=list)

    def usages(self) -> list[tuple[str, Usage]]:
        out = [("connect", self.connect.usage)] if self.connect is not None else []
        out += [(f"QoS {qos} fan-in", f.usage) for qos, f in sorted(self.fanin.items())]
        if self.saturated is not None:
            out.append(("saturated QoS 1 fan-in", self.saturated.usage))
        return out


async def wait_serving(broker: BrokerProcess, endpoint: Endpoint, probe: str) -> Link:
    """Until an mTLS CONNECT is accepted (a bare TCP probe would be audited as a failure)."""
    deadline = time.monotonic() + 30
    while True:
        if broker.proc.poll() is not None:
            tail = broker.log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{broker.name} exited with {broker.proc.returncode}:\n{tail}")
        try:
            return await endpoint.open(probe)
        except LINK_ERRORS as exc:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{broker.name} did not accept a connection in 30 s: {exc}"
                ) from exc
        await asyncio.sleep(0.2)


def scrape_metrics(port: int) -> list[str]:
    """fleetgate's /metrics samples worth a look after a run: kicks, drops, failures."""
    with urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    keep = ("kick", "drop", "fail", "refus", "error", "connections_total", "pause", "hold")
    return [
        line
        for line in text.splitlines()
        if line
        and not line.startswith("#")
        and any(word in line for word in keep)
        and not line.rstrip().endswith(" 0")
    ]


async def exercise(broker: BrokerProcess, fleet: Fleet, args: argparse.Namespace) -> BrokerResult:
    result = BrokerResult(broker.name)
    endpoint = Endpoint(broker.port, fleet.contexts, timeout=10.0)
    probe = await wait_serving(broker, endpoint, fleet.devices[-1])
    result.cipher, result.server_cert = probe.tls()
    await close_all([probe])
    devices, pid, limit = fleet.devices, broker.pid, args.phase_timeout
    try:
        warm = await open_many(endpoint, devices[-50:], 8, result.failures)
        await close_all(warm)
        if "idle" in args.phases:
            print(f"  {broker.name}: idle connections ...", flush=True)
            result.idle = await asyncio.wait_for(
                idle_phase(endpoint, pid, devices, args.concurrency, result.failures), limit
            )
        if "connect" in args.phases:
            print(f"  {broker.name}: connect rate ...", flush=True)
            result.connect = await asyncio.wait_for(
                connect_phase(
                    endpoint, pid, devices[: args.connects], args.concurrency, result.failures
                ),
                limit,
            )
        for qos in (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE) if "fanin" in args.phases else ():
            print(f"  {broker.name}: QoS {int(qos)} fan-in ...", flush=True)
            result.fanin[int(qos)] = await asyncio.wait_for(
                fanin_phase(endpoint, pid, qos, devices[: args.publishers], args, result.failures),
                limit,
            )
        if "fanin-q1-sat" in args.phases:
            print(f"  {broker.name}: saturated QoS 1 fan-in ...", flush=True)
            result.saturated = await asyncio.wait_for(
                saturated_phase(
                    endpoint, pid, devices[: args.sat_publishers], args, result.failures
                ),
                limit,
            )
        if broker.name == "fleetgate" and args.kicks and "kick" in args.phases:
            print(f"  {broker.name}: revoke kicks ...", flush=True)
            result.kick = await asyncio.wait_for(
                kick_phase(endpoint, fleet, result.failures), limit
            )
    except (*LINK_ERRORS, RuntimeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if broker.metrics_port and broker.proc.poll() is None:
        with contextlib.suppress(OSError):
            result.metrics = await asyncio.to_thread(scrape_metrics, broker.metrics_port)
    if broker.proc.poll() is not None and not result.error:
        result.error = f"{broker.name} exited with {broker.proc.returncode}"
    return result


# -- report ---------------------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return math.nan
    return a / b


def fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, spec)


def bound(usage: Usage) -> str:
    """Which core ran out (busy >= 90%, irq and softirq included): broker's, generator's, both."""
    broker = usage.busy(BROKER_CORE) >= 0.9
    generator = usage.busy(GENERATOR_CORE) >= 0.9
    if broker and generator:
        return "both cores saturated"
    if generator:
        return "generator-bound"
    if broker:
        return "broker-bound"
    return "neither core saturated: latency/window-bound"


def cpu_line(usage: Usage, ops: int, unit: str, scale: float, spec: str) -> str:
    """Broker and generator CPU per operation, core use, the generator's ceiling, the bound."""
    if not ops or not usage.wall:
        return "          (nothing measured)"
    broker, generator = usage.broker_cpu / ops * scale, usage.generator_cpu / ops * scale
    ceiling = ops / usage.generator_cpu if usage.generator_cpu else math.inf
    share_b, share_g = usage.broker_cpu / usage.wall, usage.generator_cpu / usage.wall
    return (
        f"          broker {broker:{spec}} {unit} CPU/op (process {share_b:.0%}"
        f", core {BROKER_CORE} busy {usage.busy(BROKER_CORE):.0%}); generator "
        f"{generator:{spec}} {unit} CPU/op (process {share_g:.0%}, core "
        f"{GENERATOR_CORE} busy {usage.busy(GENERATOR_CORE):.0%}) -> generator ceiling "
        f"{ceiling:.0f}/s; {bound(usage)}"
        + (
            f"; OTHER PROCESSES used {usage.others_cpu / usage.wall:.0%} of a core meanwhile"
            if usage.others_cpu / usage.wall >= 0.05
            else ""
        )
    )


@dataclass
class Figures:
    """The headline numbers of one broker, NaN where not measured."""

    connect_per_s: float = math.nan
    connect_cpu_ms: float = math.nan
    connect_p50_ms: float = math.nan
    connect_p99_ms: float = math.nan
    q0_per_s: float = math.nan
    q0_cpu_us: float = math.nan
    q0_p50_ms: float = math.nan
    q0_p99_ms: float = math.nan
    q1_per_s: float = math.nan
    q1_cpu_us: float = math.nan
    q1_p50_ms: float = math.nan
    q1_p99_ms: float = math.nan
    sat_per_s: float = math.nan
    sat_cpu_us: float = math.nan
    sat_p50_ms: float = math.nan
    sat_p99_ms: float = math.nan
    sat_lost: float = math.nan
    idle_kib: float = math.nan
    kick_p50_ms: float = math.nan
    kick_p99_ms: float = math.nan
    kick_max_ms: float = math.nan

    @property
    def connect_capacity(self) -> float:
        return 1e3 / self.connect_cpu_ms

    @property
    def q0_capacity(self) -> float:
        return 1e6 / self.q0_cpu_us

    @property
    def q1_capacity(self) -> float:
        return 1e6 / self.q1_cpu_us


def figures(result: BrokerResult | None) -> Figures:
    out = Figures()
    if result is None:
        return out
    if result.connect is not None and result.connect.connects:
        c = result.connect
        out.connect_per_s = c.per_s
        out.connect_cpu_ms = c.usage.broker_cpu / c.connects * 1e3
        out.connect_p50_ms = percentile(c.latencies, 0.5) * 1e3
        out.connect_p99_ms = percentile(c.latencies, 0.99) * 1e3
    phases = [(f"q{qos}", f) for qos, f in result.fanin.items()]
    if result.saturated is not None:
        phases.append(("sat", result.saturated))
        out.sat_lost = result.saturated.lost
    for prefix, f in phases:
        if not f.delivered:
            continue
        values = (
            f.per_s,
            f.usage.broker_cpu / f.delivered * 1e6,
            percentile(f.latencies, 0.5) * 1e3,
            percentile(f.latencies, 0.99) * 1e3,
        )
        for name, value in zip(("per_s", "cpu_us", "p50_ms", "p99_ms"), values, strict=True):
            setattr(out, f"{prefix}_{name}", value)
    if result.idle is not None:
        out.idle_kib = result.idle.kib_per_conn
    if result.kick is not None and result.kick.latencies:
        k = result.kick.latencies
        out.kick_p50_ms = percentile(k, 0.5) * 1e3
        out.kick_p99_ms = percentile(k, 0.99) * 1e3
        out.kick_max_ms = max(k) * 1e3
    return out


def print_details(result: BrokerResult, args: argparse.Namespace) -> None:
    print(f"\n== {result.name} ==")
    print(f"TLS: {result.cipher or '-'}, client certificate and key exchange P-256")
    if result.idle is not None:
        i = result.idle
        print(
            f"idle:     {i.connections} connections held (broker fds +{i.fds_added}), "
            f"VmRSS {i.rss_before_kib} -> {i.rss_after_kib} KiB = "
            f"{fmt(i.kib_per_conn, '.1f')} KiB/connection; opened in {i.connect_s:.1f} s "
            f"({fmt(i.connections / i.connect_s if i.connect_s else math.nan, '.0f')}/s)"
        )
    if result.connect is not None:
        c, u = result.connect, result.connect.usage
        print(
            f"connect:  {c.connects} in {u.wall:.2f} s = {fmt(c.per_s, '.0f')}/s "
            f"({args.concurrency} in flight); handshake+CONNACK p50 "
            f"{percentile(c.latencies, 0.5) * 1e3:.1f} ms, p99 "
            f"{percentile(c.latencies, 0.99) * 1e3:.1f} ms"
        )
        print(cpu_line(u, c.connects, "ms", 1e3, ".2f"))
    runs = [
        (f"QoS {qos}:   ", f, args.publishers, args.window, "in flight")
        for qos, f in sorted(result.fanin.items())
    ]
    if result.saturated is not None:
        runs.append(
            ("QoS 1 sat:", result.saturated, args.sat_publishers, args.sat_window, "unacknowledged")
        )
    for label, f, publishers, window, what in runs:
        u = f.usage
        if f.qos:
            what += f", Receive Maximum granted {f.granted}"
        print(
            f"{label} {f.delivered} delivered in {u.wall:.2f} s = {fmt(f.per_s, '.0f')}/s "
            f"({publishers} -> 1, {window} {what} per publisher); latency p50 "
            f"{percentile(f.latencies, 0.5) * 1e3:.2f} ms, p90 "
            f"{percentile(f.latencies, 0.9) * 1e3:.2f} ms, p99 "
            f"{percentile(f.latencies, 0.99) * 1e3:.2f} ms, max "
            f"{max(f.latencies, default=math.nan) * 1e3:.2f} ms"
        )
        if f.ack_latencies:
            acks = f.ack_latencies
            print(
                f"          of which publish->PUBACK (socket, publish rate, held): p50 "
                f"{percentile(acks, 0.5) * 1e3:.2f} ms, p90 {percentile(acks, 0.9) * 1e3:.2f} "
                f"ms, p99 {percentile(acks, 0.99) * 1e3:.2f} ms"
            )
        if f.shares:
            print(
                f"          delivered per publisher: min {f.shares[0]}, median "
                f"{f.shares[len(f.shares) // 2]}, max {f.shares[-1]} (fairness)"
            )
        print(cpu_line(u, f.delivered, "us", 1e6, ".1f"))
        print(
            f"          sent {f.sent_total}, never delivered {f.lost}, publisher stalls (nothing "
            f"delivered for 2 s) {f.stalls}, PUBACK refusals {f.refused}"
        )
        for problem, count in f.problems.items():
            print(f"          PROBLEM: {problem} x{count}")
    if result.kick is not None:
        k = result.kick
        ms = sorted(x * 1e3 for x in k.latencies)
        print(
            f"kick:     {len(ms)} devices revoked while connected; from the revoke call to the "
            f"DISCONNECT seen: p50 {percentile(ms, 0.5):.0f} ms, p99 {percentile(ms, 0.99):.0f} "
            f"ms, max {max(ms, default=math.nan):.0f} ms, min {min(ms, default=math.nan):.0f} ms"
        )
        print(
            "          revoked in-process with EnrollmentService.change_device(REVOKED), what "
            "`fleetgate device revoke` runs; the CLI's own start-up is not counted"
        )
        print(
            f"          the call itself (commit, audit, CRL signed and written): p50 "
            f"{percentile(k.call_s, 0.5) * 1e3:.1f} ms; how sessions ended: {dict(k.reasons)}; "
            f"not kicked within 5 s: {k.missed}"
        )
        print(f"          reconnect of a revoked device: {k.reconnect}")
        print(f"          all: {' '.join(f'{x:.0f}' for x in ms)} ms")
    if result.metrics:
        print("metrics:  " + "; ".join(result.metrics[:12]))
    if result.failures.count:
        print(f"FAILED connections: {result.failures.count}, e.g.:")
        for sample in result.failures.samples:
            print(f"  {sample}")
    if result.error:
        print(f"ERROR: {result.error}")


def print_profile(path: Path, top: int) -> None:
    if not path.exists():
        print("no profile was written (the broker did not stop cleanly)")
        return
    for sort, title in (("tottime", "own time"), ("cumulative", "cumulative")):
        out = io.StringIO()
        pstats.Stats(str(path), stream=out).sort_stats(sort).print_stats(top)
        text = out.getvalue().replace(f"{REPO}/", "")
        start = text.find("   ncalls")
        print(
            f"\n== fleetgate broker profile (cProfile, figures inflated): top {top} by {title} =="
        )
        print(text[start:].rstrip() if start >= 0 else text.rstrip())


def print_table(fg: Figures, mq: Figures) -> None:
    rows = [
        ("mTLS connects/s (higher is better)", "connect_per_s", ".0f"),
        ("  broker CPU ms per connect", "connect_cpu_ms", ".2f"),
        ("  one core's worth (1 / CPU per connect)", "connect_capacity", ".0f"),
        ("  connect p99 ms (handshake+CONNACK)", "connect_p99_ms", ".1f"),
        ("QoS 0 fan-in messages/s", "q0_per_s", ".0f"),
        ("  broker CPU us per message", "q0_cpu_us", ".1f"),
        ("  one core's worth (1 / CPU per message)", "q0_capacity", ".0f"),
        ("  p99 publish->receive ms", "q0_p99_ms", ".2f"),
        ("QoS 1 fan-in messages/s", "q1_per_s", ".0f"),
        ("  broker CPU us per message", "q1_cpu_us", ".1f"),
        ("  one core's worth (1 / CPU per message)", "q1_capacity", ".0f"),
        ("  p99 publish->receive ms", "q1_p99_ms", ".2f"),
        ("saturated QoS 1 fan-in messages/s", "sat_per_s", ".0f"),
        ("  broker CPU us per message", "sat_cpu_us", ".1f"),
        ("  p50 publish->receive ms", "sat_p50_ms", ".2f"),
        ("  p99 publish->receive ms", "sat_p99_ms", ".2f"),
        ("  messages lost", "sat_lost", ".0f"),
        ("RSS KiB per idle mTLS connection", "idle_kib", ".1f"),
        ("revoke -> kick p99 ms", "kick_p99_ms", ".0f"),
    ]
    print("\n== fleetgate vs Mosquitto (ratio = fleetgate / Mosquitto) ==")
    print(f"{'metric':<42} {'fleetgate':>11} {'mosquitto':>11} {'ratio':>7}")
    for label, name, spec in rows:
        a, b = getattr(fg, name), getattr(mq, name)
        shown_b = "n/a" if name.startswith("kick") else fmt(b, spec)
        print(f"{label:<42} {fmt(a, spec):>11} {shown_b:>11} {fmt(ratio(a, b), '.2f'):>7}")
    print(
        "(\"one core's worth\" is each broker's own limit whatever the generator could drive; "
        "Mosquitto has no\n live kick: it checks revocation, from a CRL file, only at a handshake)"
    )


def print_bounds(results: dict[str, BrokerResult]) -> None:
    """What limited each figure, and the generator's own ceiling (1 / its CPU per operation)."""
    names = [n for n in ("fleetgate", "mosquitto") if n in results]
    print("\nwhat bounds each figure (a core >= 90% busy), and the generator's ceiling:")
    print(f"{'':<14}" + "".join(f"{name:<50}" for name in names).rstrip())
    for label, key in (
        ("connect", "connect"),
        ("QoS 0 fan-in", "QoS 0"),
        ("QoS 1 fan-in", "QoS 1"),
        ("QoS 1 sat", "QoS 1 sat"),
    ):
        cells = []
        for name in names:
            found = [(u, ops) for phase, u, ops in phase_usages(results[name]) if phase == key]
            if not found or not found[0][1] or not found[0][0].generator_cpu:
                cells.append("-")
                continue
            usage, ops = found[0]
            cells.append(f"{bound(usage)}; generator {ops / usage.generator_cpu:,.0f}/s")
        print(f"{label:<14}" + "".join(f"{cell:<50}" for cell in cells).rstrip())


def phase_usages(result: BrokerResult) -> list[tuple[str, Usage, int]]:
    out = []
    if result.connect is not None:
        out.append(("connect", result.connect.usage, result.connect.connects))
    for qos, f in sorted(result.fanin.items()):
        out.append((f"QoS {qos}", f.usage, f.delivered))
    if result.saturated is not None:
        out.append(("QoS 1 sat", result.saturated.usage, result.saturated.delivered))
    return out


def print_targets(fg: Figures, mq: Figures) -> None:
    checks = [
        ("connection rate >= 1.0x Mosquitto", ratio(fg.connect_per_s, mq.connect_per_s), 1.0, 1),
        ("QoS 0 fan-in >= 0.5x Mosquitto", ratio(fg.q0_per_s, mq.q0_per_s), 0.5, 1),
        ("memory per idle connection <= 64 KiB", fg.idle_kib, 64.0, -1),
        ("revoke -> session closed p99 <= 1000 ms", fg.kick_p99_ms, 1000.0, -1),
        ("saturated QoS 1: nothing lost", fg.sat_lost, 0.0, -1),
        ("saturated QoS 1: p99 <= 100 ms", fg.sat_p99_ms, 100.0, -1),
        ("saturated QoS 1 >= 1.0x Mosquitto", ratio(fg.sat_per_s, mq.sat_per_s), 1.0, 1),
    ]
    print("\ntargets (issue 3; the saturated fan-in's, issue 11):")
    for label, value, target, sense in checks:
        if math.isnan(value):
            verdict = "not measured"
        else:
            verdict = "met" if (value - target) * sense >= 0 else "MISSED"
        print(f"  {label:<42} {fmt(value, '.2f'):>9}  {verdict}")


def last_line(fg: Figures, mq: Figures) -> str:
    def kv(value: float, spec: str) -> str:
        return "nan" if math.isnan(value) else format(value, spec)

    return (
        f"connect_ratio={kv(ratio(fg.connect_per_s, mq.connect_per_s), '.2f')}"
        f" fanin_q0_ratio={kv(ratio(fg.q0_per_s, mq.q0_per_s), '.2f')}"
        f" fanin_q1_ratio={kv(ratio(fg.q1_per_s, mq.q1_per_s), '.2f')}"
        f" idle_kib_per_conn={kv(fg.idle_kib, '.1f')}"
        f" revoke_kick_p99_ms={kv(fg.kick_p99_ms, '.0f')}"
        f" fanin_q1_sat_ratio={kv(ratio(fg.sat_per_s, mq.sat_per_s), '.2f')}"
        f" fanin_q1_sat_p50_ms={kv(fg.sat_p50_ms, '.1f')}"
        f" fanin_q1_sat_p99_ms={kv(fg.sat_p99_ms, '.1f')}"
        f" fanin_q1_sat_mosquitto_p50_ms={kv(mq.sat_p50_ms, '.1f')}"
        f" fanin_q1_sat_mosquitto_p99_ms={kv(mq.sat_p99_ms, '.1f')}"
        f" fanin_q1_sat_lost={kv(fg.sat_lost, '.0f')}"
        f" fanin_q1_sat_mosquitto_lost={kv(mq.sat_lost, '.0f')}"
    )


LOG_TROUBLE = ("dropped", "Error", "ERROR", "Traceback", "Exception")


def log_problems(broker: BrokerProcess, tmp: Path) -> list[str]:
    """Lines of the broker's own log that say something went wrong (Mosquitto logs dropped
    messages at notice level; fleetgate logs JSON lines at WARNING and above here)."""
    paths = [broker.log, tmp / "mosquitto.log"] if broker.name == "mosquitto" else [broker.log]
    found = []
    for path in paths:
        with contextlib.suppress(OSError):
            for line in path.read_text(errors="replace").splitlines():
                if any(word in line for word in LOG_TROUBLE):
                    found.append(line.strip()[:200])
    return found


def disturbed(results: dict[str, BrokerResult]) -> list[str]:
    """Phases during which other processes on this machine used >= 10% of a core, or a core
    was >= 10% busier than the benchmark's own process on it (CPU this machine's ``/proc``
    does not show: another tenant, another namespace; loopback softirq is a few percent)."""
    out = []
    for r in results.values():
        for phase, usage in r.usages():
            if not usage.wall:
                continue
            share = usage.others_cpu / usage.wall
            if share >= 0.10:
                out.append(f"{r.name} {phase}: other processes used {share:.0%} of a core")
            for core, ours in (
                (BROKER_CORE, usage.broker_cpu),
                (GENERATOR_CORE, usage.generator_cpu),
            ):
                unseen = usage.busy(core) - ours / usage.wall
                if unseen >= 0.10:
                    out.append(f"{r.name} {phase}: core {core} was {unseen:.0%} busy beyond ours")
    return out


def sanity(results: dict[str, BrokerResult]) -> list[str]:
    problems = []
    certs = {r.server_cert for r in results.values() if r.server_cert is not None}
    if len(certs) > 1:
        problems.append("the two brokers presented different server certificates")
    for r in results.values():
        if r.error:
            problems.append(f"{r.name}: {r.error}")
        if r.failures.count:
            problems.append(f"{r.name}: {r.failures.count} connections failed")
        for label, q1 in (("QoS 1", r.fanin.get(1)), ("saturated QoS 1", r.saturated)):
            if q1 is not None and (q1.lost or q1.refused or q1.stalls):
                problems.append(
                    f"{r.name}: {label} never delivered {q1.lost}, refused {q1.refused} "
                    f"messages; {q1.stalls} publisher stalls"
                )
        for f in r.fanin.values():
            if f.problems:
                problems.append(f"{r.name}: QoS {f.qos} fan-in: {dict(f.problems)}")
        if r.kick is not None:
            if r.kick.missed:
                problems.append(f"{r.name}: {r.kick.missed} revoked devices were not kicked")
            if not r.kick.reconnect.startswith("refused"):
                problems.append(f"{r.name}: {r.kick.reconnect}")
        for line in r.log_problems[:5]:
            problems.append(f"{r.name} log: {line}")
    return problems


# -- main -----------------------------------------------------------------------------------------


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)


def main() -> int:
    args = parse_args()
    names = ["mosquitto", "fleetgate"] if args.brokers == "both" else [args.brokers]
    if "mosquitto" in names and not Path(MOSQUITTO).exists():
        print(f"error: {MOSQUITTO} is missing: apt-get install mosquitto", file=sys.stderr)
        return 2
    affinity = os.sched_getaffinity(0)
    pin = {BROKER_CORE, GENERATOR_CORE} <= affinity and shutil.which("taskset") is not None
    if not pin:
        print(f"warning: cannot pin to cores 0 and 1 (affinity {sorted(affinity)}); not pinning")
    raise_nofile()
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile < args.idle + 1000:
        print(f"error: RLIMIT_NOFILE is {nofile}; --idle {args.idle} needs more", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _terminate)
    check_fast_codec(args.payload)

    tmp = Path(tempfile.mkdtemp(prefix="fleetgate-bench-broker-"))
    started: list[BrokerProcess] = []
    fleet: Fleet | None = None
    try:
        t0 = time.perf_counter()
        fleet = provision(tmp, args)
        enrolled = len(fleet.devices) + len(fleet.kick_ids) + 1
        print(
            f"set-up: CA, station, {enrolled} devices enrolled in-process and their TLS "
            f"contexts in {time.perf_counter() - t0:.1f} s ({tmp})"
        )
        print(
            f"load: {args.idle} idle; {args.connects} connects, {args.concurrency} in flight; "
            f"{args.publishers} publishers -> 1 subscriber for {args.duration:.0f} s per QoS, "
            f"{args.payload}-byte payloads; {args.kicks} revocations. Broker on core "
            f"{BROKER_CORE}, generator on core {GENERATOR_CORE}: {'pinned' if pin else 'NOT'}"
        )
        ours = set()
        results: dict[str, BrokerResult] = {}
        for name in names:
            if name == "mosquitto":
                broker = start_mosquitto(tmp, fleet, pin, args.mosquitto_queue)
            else:
                profile_out = tmp / "broker.prof" if args.profile else None
                broker = start_fleetgate(
                    tmp, fleet, pin, args.log_level, profile_out, args.fleetgate_env
                )
            started.append(broker)
            ours.add(broker.pid)
            strangers = other_mosquittos(ours)
            if strangers:
                print(f"warning: other mosquitto processes are running (pids {strangers})")
            print(f"{name}: pid {broker.pid}, port {broker.port}", flush=True)
            if pin:
                os.sched_setaffinity(0, {GENERATOR_CORE})
            try:
                results[name] = asyncio.run(exercise(broker, fleet, args))
            except RuntimeError as exc:  # the broker never served
                results[name] = BrokerResult(name, error=str(exc))
            finally:
                if pin:
                    os.sched_setaffinity(0, affinity)
                stop_broker(broker)
            results[name].log_problems = log_problems(broker, tmp)
            print_details(results[name], args)
            if name == "fleetgate" and args.profile:
                print_profile(tmp / "broker.prof", args.top)

        fg, mq = figures(results.get("fleetgate")), figures(results.get("mosquitto"))
        print_table(fg, mq)
        print_bounds(results)
        print_targets(fg, mq)
        problems = sanity(results)
        cert = next((r.server_cert for r in results.values() if r.server_cert), None)
        if cert is not None and len(results) > 1 and not any("certificates" in p for p in problems):
            print("\nsanity: both brokers presented the same server certificate (ca/broker.crt)")
        for problem in problems:
            print(f"SANITY: {problem}")
        for note in disturbed(results):
            print(f"WARNING: the machine was not quiet: {note}; figures are disturbed")
        print(last_line(fg, mq))
        return 1 if problems else 0
    finally:
        for broker in started:
            if broker.proc.poll() is None:
                broker.proc.kill()
                broker.proc.wait()
        if fleet is not None:
            fleet.registry.close()
        if args.keep:
            print(f"kept {tmp}", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
