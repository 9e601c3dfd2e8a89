"""The asyncio shell: listeners, the registry off the loop, timers, the change feed, /metrics.

Everything MQTT means happens in :mod:`broker.connection` and :mod:`broker.core`; this module
moves bytes between sockets and those state machines, runs blocking registry calls in threads,
and writes each connection's pending output once per event-loop turn (so a burst of messages to
one subscriber becomes one TLS write).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import logging
import os
import socket
import sqlite3
import ssl
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from aiohttp import web
from sqlalchemy.exc import SQLAlchemyError

from broker.admission import (
    Admitted,
    CertificateIdentities,
    Identity,
    Refused,
    Unidentified,
    decide_admission,
    read_admission_facts,
)
from broker.audit import AuditWriter
from broker.bridge import BridgeManager, BridgeRuntime
from broker.connection import AdmissionRequest, Connection
from broker.core import BrokerCore, CoreSettings
from broker.feed import PolicyChange, RevocationFeed
from broker.gcpolicy import GcPolicy
from broker.metrics import Metrics
from broker.mqtt import MAX_PACKET_SIZE, ReasonCode
from broker.tls import (
    broker_context,
    broker_credentials,
    fleet_trust,
    follow_fleet_cas,
    handshake_label,
)
from enrollment.ca import ServerCredentials, ensure_server_certificate, is_initialised
from enrollment.registry import AdmissionFacts, AuditRecord, DeviceChange, DeviceState, Registry
from enrollment.registry.outage import RegistryOutage
from fleetgate.config import Config, node_name
from fleetgate.errors import ConfigError, FleetgateError, InvalidDeviceId
from fleetgate.ids import validate_id
from fleetgate.lifecycle import run_until_signalled
from fleetgate.tls import serve_tls

log = logging.getLogger("fleetgate.broker")

TICK_S = 0.5
"""How often keep-alives, delayed wills and session expiry are checked."""
_CLOSE_GRACE_S = 2.0


@dataclass(frozen=True)
class BoundPorts:
    """Where the broker listens once started (0: that listener is off)."""

    tls: int
    plaintext: int
    metrics: int


class _MqttProtocol(asyncio.Protocol):
    """Feeds one transport's bytes to its :class:`Connection`."""

    __slots__ = (
        "_admitting",
        "_broker",
        "_listener",
        "_rate_paused",
        "_write_paused",
        "conn",
        "transport",
    )

    def __init__(self, broker: Broker, listener: str) -> None:
        self._broker = broker
        self._listener = listener
        self._admitting = False
        self._write_paused = False
        self._rate_paused = False
        self.transport: asyncio.Transport | None = None
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport  # TCP_NODELAY: asyncio sets it on every TCP socket it accepts
        peername = transport.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if peername else "unknown"
        self.conn = self._broker.open_connection(self, peer, self._listener)

    def data_received(self, data: bytes) -> None:
        assert self.conn is not None
        request = self.conn.receive_data(data, self._broker.now())
        if request is not None:
            self._broker.admit(self, request)
        self.pace()
        if self.conn.held_back:  # held by a full queue, with enough read meanwhile
            self._update_reading()
        self._broker.wake()

    def pace(self) -> None:
        """The connection published faster than its rate: stop reading (TCP backpressure
        slows the device) until :attr:`Connection.resume_at`."""
        conn = self.conn
        if conn is None or conn.resume_at is None or self._rate_paused:
            return
        self._rate_paused = True
        self._update_reading()
        self._broker.call_at(conn.resume_at, self._resume_publishing)

    def _resume_publishing(self) -> None:
        assert self.conn is not None
        self._rate_paused = False
        self.conn.resume(self._broker.now())
        self.pace()
        self._update_reading()
        self._broker.wake()

    def admission_started(self) -> None:
        """The registry is asked in a thread: read nothing more until it answered."""
        self._admitting = True
        self._update_reading()

    def admission_finished(self) -> None:
        self._admitting = False
        self._update_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.connection_lost(self._broker.now())
            self._broker.forget(self.conn)
            self._broker.wake()

    def pause_writing(self) -> None:
        """The client is not reading: stop reading it, and drop QoS 0 messages for it."""
        self._write_paused = True
        if self.conn is not None:
            self.conn.writable = False
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.conn is not None:
            self.conn.writable = True
        self._update_reading()

    def _update_reading(self) -> None:
        if self.transport is None or self.transport.is_closing():
            return
        held = self.conn is not None and self.conn.held_back
        if self._admitting or self._write_paused or self._rate_paused or held:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()


class Broker:
    """The fleetgate MQTT broker bound to a data directory; ``start``/``stop`` for tests and CLI."""

    certificate_check_interval_s = 3600.0
    """How often a running broker checks that its own certificate is current (tests shorten it)."""

    def __init__(
        self, config: Config, *, registry: Registry | None = None, reuse_port: bool = False
    ) -> None:
        settings = config.broker
        _check_settings(config)
        self.config = config
        self.reuse_port = reuse_port  # one of several worker processes on one port
        self.registry = registry or Registry(config.database_url)
        self._own_registry = registry is None
        self.metrics = Metrics()
        # One for the feed, admission and audit: an outage is logged once, not once per caller.
        self.outage = RegistryOutage(self.registry.url, log)
        self.audit = AuditWriter(self.registry, self.metrics, outage=self.outage)
        self.node_name = node_name(config)
        self.core = BrokerCore(
            CoreSettings(
                max_packet_size=settings.max_packet_size,
                max_queued_messages=settings.max_queued_messages,
                receive_maximum=settings.receive_maximum,
                max_keep_alive_s=settings.max_keep_alive_s,
            ),
            metrics=self.metrics,
            audit=self._audit,
            limits=settings.limits,
        )
        self.feed = RevocationFeed(
            self.registry,
            self.metrics,
            interval=settings.feed_poll_interval_s,
            on_change=self._on_device_change,
            on_policy=self._on_policy_change,
            outage=self.outage,
        )
        self.bridges: BridgeRuntime | None = None
        self.fabric = None
        if config.fabric is not None:  # several nodes on a NATS cluster (issue 12)
            from broker.fabric.node import FabricNode  # nats-py only in fabric mode

            self.fabric = FabricNode(config, self.core, wake=self.wake, clock=self.now)
        if config.bridges and self.fabric is not None:  # read from the stream, one owner
            from broker.fabric.bridge import FabricBridges

            self.bridges = FabricBridges(
                config, self.core, self.registry, node=self.fabric, wake=self.wake
            )
        elif config.bridges:
            self.bridges = BridgeManager(config, self.core, self.registry, wake=self.wake)
        self.identities = CertificateIdentities()
        self.trust_changed = asyncio.Event()  # set when a rotated CA joins the trust (tests)
        self._admit_inline = self.registry.reads_locally
        self.ports = BoundPorts(0, 0, 0)
        self._protocols: dict[Connection, _MqttProtocol] = {}
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._metrics_runner: web.AppRunner | None = None
        self._flush_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.gc_policy: GcPolicy | None = None
        """Set by :func:`run_forever` (the broker owns its process): collections timed and
        long-lived state frozen (:mod:`broker.gcpolicy`); a broker in a test process leaves
        the collector as it is."""

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> BoundPorts:
        """Listen; ports configured as 0 stay off, except that tests may pass real ones."""
        self._loop = asyncio.get_running_loop()
        if self.fabric is not None:  # first: a node that cannot reach it does not start
            await self.fabric.start()
        settings = self.config.broker
        credentials = await asyncio.to_thread(
            ensure_server_certificate, self.config, broker_credentials(self.config)
        )
        context = broker_context(self.config, credentials.cert, credentials.key)
        await self.feed.start()
        if self.bridges is not None:  # before listening: queued messages and the gate first
            await self.bridges.start()
        tls_server = await serve_tls(
            lambda: _MqttProtocol(self, "tls"),
            host=settings.host,
            port=settings.port,
            context=context,
            on_refused=self._on_handshake_refused,
            handshake_timeout=settings.tls_handshake_timeout_s,
            reuse_port=self.reuse_port,
        )
        self._servers.append(tls_server)
        plaintext_port = 0
        if settings.plaintext_port:
            plain = await self._loop.create_server(
                lambda: _MqttProtocol(self, "plaintext"),
                settings.plaintext_host,
                settings.plaintext_port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
            )
            self._servers.append(plain)
            plaintext_port = plain.sockets[0].getsockname()[1]
            log.warning(
                "PLAINTEXT MQTT listener enabled for tests: no TLS, every client is one identity",
                extra={
                    "host": settings.plaintext_host,
                    "port": plaintext_port,
                    "identity": settings.plaintext_identity,
                },
            )
        metrics_port = await self._start_metrics() if settings.metrics_port else 0
        renewal = self._keep_certificate_current(context, credentials)
        rotation = follow_fleet_cas(  # a rotated CA is trusted without a restart (issue 14)
            fleet_trust(self.config, context),
            self.registry,
            interval_s=self.config.ca.authority_poll_interval_s,
            changed=self.trust_changed,
        )
        for job in (self.feed.run(), self.audit.run(), self._tick(), renewal, rotation):
            task = self._loop.create_task(job)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        self.ports = BoundPorts(
            tls_server.sockets[0].getsockname()[1], plaintext_port, metrics_port
        )
        log.info(
            "broker listening",
            extra={
                "host": settings.host,
                "port": self.ports.tls,
                "metrics": metrics_port,
                "node": self.node_name,
            },
        )
        return self.ports

    async def stop(self) -> None:
        """Stop listening, tell MQTT 5 clients the server is shutting down, store the audit."""
        for server in self._servers:
            server.close()
        self.core.shutdown(self.now())
        self._flush()
        deadline = self.now() + _CLOSE_GRACE_S
        while self._protocols and self.now() < deadline:
            await asyncio.sleep(0.02)
        for protocol in list(self._protocols.values()):
            if protocol.transport is not None:
                protocol.transport.abort()
        if self.bridges is not None:
            await self.bridges.stop()
        if self.fabric is not None:
            await self.fabric.stop()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.audit.flush(final=True)
        if self._metrics_runner is not None:
            await self._metrics_runner.cleanup()
        if self._own_registry:
            self.registry.close()
        log.info("broker stopped")

    async def _keep_certificate_current(
        self, context: ssl.SSLContext, credentials: ServerCredentials
    ) -> None:
        """Renew the broker's own certificate while it runs, not only at start (as the enrollment
        service does): a broker up for longer than the renewal margin would otherwise serve an
        expiring certificate. Only where the data directory holds the CA; a broker host without
        it logs once that its certificate is due, and how to get a new one."""
        reported = False
        while True:
            await asyncio.sleep(self.certificate_check_interval_s)
            has_ca = is_initialised(self.config)
            before = _modified(credentials.cert)
            try:
                # Returns at once while the certificate is current; unlocks the CA only if not.
                await asyncio.to_thread(ensure_server_certificate, self.config, credentials)
            except (OSError, FleetgateError) as exc:
                if has_ca:
                    log.error("broker certificate renewal failed: %s", exc)
                elif not reported:
                    reported = True
                    log.warning(
                        "the broker certificate %s is due for renewal and this host has no CA: "
                        "on the CA host run `fleetgate ca server-cert --name <each name> --out "
                        "<dir>`, copy broker.crt, broker.key and chain.pem into %s, restart the "
                        "broker",
                        credentials.cert,
                        credentials.cert.parent,
                        extra={"names": list(credentials.names)},
                    )
                continue
            reported = False
            if _modified(credentials.cert) != before:
                context.load_cert_chain(credentials.cert, credentials.key)  # new handshakes
                log.info("broker certificate renewed", extra={"names": list(credentials.names)})

    # -- connections -------------------------------------------------------------------------------

    def now(self) -> float:
        assert self._loop is not None
        return self._loop.time()

    def open_connection(self, protocol: _MqttProtocol, peer: str, listener: str) -> Connection:
        assert protocol.transport is not None
        identity: Identity | Unidentified
        if listener == "tls":
            ssl_object = protocol.transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
            identity = self.identities.identify(der, now=dt.datetime.now(dt.UTC))
        else:
            identity = Identity(
                self.config.broker.plaintext_identity, serial=None, client_id_bound=False
            )
        conn = Connection(
            self.core, peer=peer, identity=identity, listener=listener, now=self.now()
        )
        self._protocols[conn] = protocol
        return conn

    def forget(self, conn: Connection) -> None:
        self._protocols.pop(conn, None)

    def admit(self, protocol: _MqttProtocol, request: AdmissionRequest) -> None:
        """Ask the registry about the CONNECT's certificate, every time (no verdict is cached).

        SQLite answers on the event loop: the read is one indexed statement on a local file
        (~0.16 ms), in WAL mode, where a reader never waits for a writer; a thread hop would
        cost more CPU than the read itself (the worker and the loop then trade the GIL on every
        sqlite3 call). A database across the network (PostgreSQL) is asked in a thread, with the
        connection's reading paused until it answers.
        """
        if self._admit_inline:
            cursor = self.feed.cursor
            self._decide(protocol, request, self._read_facts(request), cursor)
            return
        assert self._loop is not None
        protocol.admission_started()
        task = self._loop.create_task(self._admit_in_thread(protocol, request))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _read_facts(self, request: AdmissionRequest) -> AdmissionFacts | None:
        """The registry's facts for the CONNECT; None when it cannot answer."""
        try:
            facts = read_admission_facts(self.registry, request.identity)
        except (SQLAlchemyError, sqlite3.Error) as exc:  # sqlite3: the plain local reads
            if not self.outage.failed_with("an admission read", exc):
                log.exception("admission read failed", extra={"device": request.identity.device_id})
            return None
        self.outage.succeeded()
        return facts

    async def _admit_in_thread(self, protocol: _MqttProtocol, request: AdmissionRequest) -> None:
        device_id = request.identity.device_id
        while True:  # again if a policy change the read may predate was applied meanwhile
            cursor = self.feed.cursor
            facts = await asyncio.to_thread(self._read_facts, request)
            if facts is None or not self.feed.policy_changed_since(device_id, facts.group, cursor):
                break
        self._decide(protocol, request, facts, cursor)
        protocol.admission_finished()
        self.wake()

    def _decide(
        self,
        protocol: _MqttProtocol,
        request: AdmissionRequest,
        facts: AdmissionFacts | None,
        cursor: int,
    ) -> None:
        """:func:`decide_admission` on the facts and on what the feed saw since ``cursor``."""
        identity = request.identity
        barred = self.feed.barred_since(identity.device_id, cursor)
        verdict = decide_admission(facts, identity, barred=barred, will_topic=request.will_topic)
        assert protocol.conn is not None
        if isinstance(verdict, Admitted) and self.fabric is not None:  # the session first
            protocol.admission_started()
            assert self._loop is not None
            task = self._loop.create_task(self._claim_then_admit(protocol, verdict))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            return
        protocol.conn.admission_done(verdict, self.now())
        protocol.pace()  # packets sent before the CONNACK may be over the publish rate

    async def _claim_then_admit(self, protocol: _MqttProtocol, verdict: Admitted) -> None:
        """Fabric mode: the session is claimed from the fabric before the CONNACK; a fabric
        that cannot answer refuses the CONNECT (Server unavailable)."""
        conn = protocol.conn
        assert conn is not None and self.fabric is not None
        client_id, clean_start, expiry = conn.requested_session()
        result: Admitted | Refused = verdict
        try:
            await self.fabric.claim_session(conn.device_id, client_id, clean_start, expiry)
        except Exception as exc:
            log.warning("fabric: session claim failed: %s", exc, extra={"client": client_id})
            reason = f"the fabric's session store did not answer: {exc}"
            result = Refused(reason, ReasonCode.SERVER_UNAVAILABLE, "fabric")
        conn.admission_done(result, self.now())
        if conn.session is None and isinstance(result, Admitted):  # it left while claiming
            self.fabric.abandon_session(client_id)
        protocol.admission_finished()
        protocol.pace()
        self.wake()

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        assert self._loop is not None
        self._loop.call_at(when, callback)

    def wake(self) -> None:
        """Write pending output at the end of this loop turn."""
        if (self.core.dirty or self.core.released) and not self._flush_scheduled:
            assert self._loop is not None
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self.core.released:
            self._resume_released()
        dirty, self.core.dirty = self.core.dirty, set()
        for conn in dirty:
            protocol = self._protocols.get(conn)
            if protocol is None or protocol.transport is None:
                continue
            data = conn.take_output()
            if data:
                protocol.transport.write(data)
            if conn.closing:
                protocol.transport.close()

    def _resume_released(self) -> None:
        """Publishers a full queue let go: process what they sent meanwhile, read them again.
        Their deferred packets go in round robin, one each per round, so they share the room
        the queue made (one after another, the first would fill it and every other would get
        one message in before it is held again, in the same order each time). Resuming one
        can hold or release others; a bounded number of rounds per loop turn."""
        now = self.now()
        for _ in range(8):
            released, self.core.released = self.core.released, {}
            going = list(released)
            while going:
                going = [conn for conn in going if conn.resume_publishing(now, 1)]
            for conn in released:
                conn.resume_publishing(now)  # what was buffered behind its deferred packets
                protocol = self._protocols.get(conn)
                if protocol is not None:
                    protocol.pace()
                    protocol._update_reading()
            if not self.core.released:
                return
        self._flush_scheduled = True  # the rest on the next turn
        assert self._loop is not None
        self._loop.call_soon(self._flush)

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(TICK_S)
            now = self.now()
            self.core.tick(now)
            self.wake()
            if self.gc_policy is not None:
                self.gc_policy.settle(now)

    # -- events from outside ---------------------------------------------------------------------

    def _on_device_change(self, change: DeviceChange) -> None:
        if change.device_id is None or change.state not in (
            DeviceState.REVOKED,
            DeviceState.SUSPENDED,
        ):
            return
        if self.fabric is not None:  # the other nodes kick now, not at their next poll
            self.fabric.kicks.announce(change)
        kicked = self.core.kick(change.device_id, change.state, change.reason, self.now())
        if kicked:
            log.warning(
                "device session closed by revocation",
                extra={
                    "device": change.device_id,
                    "state": str(change.state),
                    "node": self.node_name,
                },
            )
        self.wake()

    def _on_policy_change(self, change: PolicyChange) -> None:
        reached, closed = self.core.apply_policy(
            change.device_id, change.group, change.acl, self.now()
        )
        if reached:
            log.info(
                "policy change applied to live sessions",
                extra={
                    "group": change.group,
                    "sessions": reached,
                    "closed": closed,
                    "node": self.node_name,
                },
            )
        self.wake()

    def _audit(self, record: AuditRecord) -> None:
        """Every audit row says which node wrote it: two brokers' kicks of one device are two
        rows that differ (in the reason text, which the hash chain covers; a new column would
        change the chain's encoding, which must never change)."""
        self.audit.submit(replace(record, reason=f"{record.reason} [node {self.node_name}]"))

    def _on_handshake_refused(self, peer: str, reason: str) -> None:
        """Counted every time; audited like every other refusal (:meth:`BrokerCore.refused`):
        once per source address and kind a minute. Failing a handshake needs no certificate,
        and each one wrote a row: a loop of them was an audit flood open to anyone."""
        label = handshake_label(reason)
        self.metrics.handshake_failures[label] += 1
        address = peer.rpartition(":")[0] or peer  # the port changes with every connection
        record = AuditRecord(f"peer:{peer}", "mqtt.tls_handshake", "refused", None, reason)
        self.core.refused(f"peer:{address}", f"tls.{label}", record, self.now())
        log.info("TLS handshake refused", extra={"peer": peer, "reason": reason})

    # -- /metrics --------------------------------------------------------------------------------

    async def _start_metrics(self) -> int:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_get("/bridges", self._bridges_handler)
        self._metrics_runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._metrics_runner.setup()
        sock = socket.create_server(("127.0.0.1", self.config.broker.metrics_port))
        await web.SockSite(self._metrics_runner, sock).start()
        return int(sock.getsockname()[1])

    async def _metrics_handler(self, request: web.Request) -> web.Response:
        text = self.metrics.render(
            connections=len(self.core.connections),
            sessions=len(self.core.sessions),
            queued=self.core.queued(),
            retained=self.core.retained.count,
            feed_lag_s=self.now() - self.feed.last_read,
        )
        text += self.metrics.render_limits(
            self.core.queue_drops(), self.core.queue_holds(), self.core.publishers_held()
        )
        text += self.metrics.render_node(self.node_name)
        if self.gc_policy is not None:
            p = self.gc_policy.pauses
            text += self.metrics.render_gc(p.count, p.worst_s, p.total_s, p.refreezes)
        if self.bridges is not None:
            text += self.bridges.render_metrics()
        if self.fabric is not None:
            text += self.fabric.render_metrics()
        return web.Response(
            body=text.encode(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"}
        )

    async def _bridges_handler(self, request: web.Request) -> web.Response:
        """Per-bridge figures as JSON, for ``fleetgate bridge status``."""
        if self.bridges is None:
            return web.json_response({"origin": None, "loops_dropped": 0, "bridges": []})
        return web.json_response(self.bridges.status_json())


def _modified(path: Path) -> int:
    try:
        return path.stat().st_mtime_ns
    except FileNotFoundError:
        return 0


def _check_settings(config: Config) -> None:
    """Refuse settings that would open the broker wider than intended, or make no sense."""
    settings = config.broker
    if settings.plaintext_port:
        host = settings.plaintext_host
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConfigError(
                f"[broker] plaintext_host {host!r} is not a loopback address: the plaintext "
                "listener is for local test suites only; use 127.0.0.1 or ::1"
            )
        try:
            validate_id(settings.plaintext_identity)
        except InvalidDeviceId as exc:
            raise ConfigError(
                "[broker] plaintext_identity must name the device id every plaintext client is "
                f"mapped to: {exc.message}"
            ) from exc
    if not 1 <= settings.receive_maximum <= 0xFFFF:
        raise ConfigError("[broker] receive_maximum must be between 1 and 65535")
    if not 0 <= settings.max_keep_alive_s <= 0xFFFF:
        raise ConfigError("[broker] max_keep_alive_s must be between 0 (no cap) and 65535")
    if not 128 <= settings.max_packet_size <= MAX_PACKET_SIZE:
        raise ConfigError(f"[broker] max_packet_size must be between 128 and {MAX_PACKET_SIZE}")
    if settings.max_queued_messages < 0 or settings.feed_poll_interval_s <= 0:
        raise ConfigError("[broker] max_queued_messages must be >= 0, feed_poll_interval_s > 0")


class _Announced:
    """A worker's broker, which tells its parent on ``ready_fd`` once it listens."""

    def __init__(self, broker: Broker, ready_fd: int) -> None:
        self._broker = broker
        self._ready_fd = ready_fd

    async def start(self) -> BoundPorts:
        ports = await self._broker.start()
        os.write(self._ready_fd, b"ready\n")
        return ports

    async def stop(self) -> None:
        await self._broker.stop()


async def run_forever(
    config: Config, *, reuse_port: bool = False, ready_fd: int | None = None
) -> None:
    """Serve until SIGINT or SIGTERM.

    What the process holds once the broker is built (modules, the registry's engine, caches)
    lives as long as the process: it is moved out of the garbage collector's sight
    (``gc.freeze``), and so is connection and session state once it has settled
    (:class:`GcPolicy`). Without it, each full collection during a connect burst stopped the
    event loop for ~44 ms, and with 10,000 connections 140-234 ms.
    """
    broker = Broker(config, reuse_port=reuse_port)
    broker.gc_policy = GcPolicy()
    broker.gc_policy.install()
    await run_until_signalled(broker if ready_fd is None else _Announced(broker, ready_fd))
