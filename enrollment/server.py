"""Runs the enrollment service: loads the CA and registry, serves EST over mutual TLS."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import multiprocessing
import multiprocessing.process
import os
import resource
import signal
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.synchronize import Event as EventType

from aiohttp import web
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from enrollment.audit_writer import AuditWriter
from enrollment.authorities import TrustedCAs
from enrollment.ca import (
    ServerCredentials,
    ca_paths,
    enrollment_server_credentials,
    ensure_server_certificate,
    load_ca,
    renew_server_certificate_if_due,
)
from enrollment.crl import needs_refresh
from enrollment.deadlines import HeaderDeadline
from enrollment.est import ESTApp
from enrollment.registry import AuditRecord, Registry
from enrollment.registry.engine import normalise_url
from enrollment.registry.outage import RegistryOutage
from enrollment.service import EnrollmentService
from enrollment.workers import ServiceThreads, service_threads
from fleetgate import jsonlog
from fleetgate.config import Config, EnrollmentSettings
from fleetgate.errors import CAPassphraseError, FleetgateError
from fleetgate.keyfiles import load_certificates
from fleetgate.lifecycle import run_until_signalled
from fleetgate.tls import ConnectionCaps, serve_tls, server_context

log = logging.getLogger("fleetgate.server")

CERTIFICATE_CHECK_INTERVAL_S = 3600.0
DESCRIPTOR_RESERVE = 64
"""Descriptors kept back from the connection cap: database, logs, CA files, the listener."""


def connection_caps(settings: EnrollmentSettings) -> ConnectionCaps:
    """``max_connections``, or with 0 the open-file limit less :data:`DESCRIPTOR_RESERVE`, so
    that accept() never runs out (issue 11: 243 idle connections filled 256 descriptors)."""
    total = settings.max_connections
    if total == 0:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft == resource.RLIM_INFINITY:
            soft = 65536
        total = max(1, soft - DESCRIPTOR_RESERVE)
    return ConnectionCaps(total=total, per_address=settings.max_connections_per_address)


class EnrollmentServer:
    """The EST endpoint bound to a data directory; ``start``/``stop`` for tests and the CLI.

    The event loop runs TLS handshakes and HTTP only: service calls (CSR checks, signing,
    registry round trips) run on ``threads``, and refused handshakes are audited through
    ``audit``, a batched writer that commits on the same threads.
    """

    def __init__(
        self,
        config: Config,
        *,
        port: int | None = None,
        threads: int | None = None,
        reuse_port: bool = False,
    ) -> None:
        """``threads`` overrides :func:`~enrollment.workers.service_threads`'s choice (tests
        use it to make requests overlap on SQLite); ``reuse_port``: one of several processes
        on the port (:func:`serve_processes`)."""
        self.config = config
        self.reuse_port = reuse_port
        self.registry = Registry(config.database_url)
        try:
            ca = load_ca(config)
        except CAPassphraseError as exc:
            reason = f"{exc.code}: {exc.message}"
            self.registry.audit(
                AuditRecord("service:enrollment", "ca.unlock", "refused", None, reason)
            )
            exc.audited = True
            self.registry.close()
            raise
        self.service = EnrollmentService(ca, self.registry)
        self.threads = ServiceThreads(threads or service_threads(self.registry))
        self.outage = RegistryOutage(self.registry.url, log)  # logged once, whoever hits it
        self.audit = AuditWriter(self.registry, offload=self.threads.run, outage=self.outage)
        self.port = config.enrollment.port if port is None else port
        self._runner: web.AppRunner | None = None
        self._est: ESTApp | None = None
        self._server: asyncio.Server | None = None
        self._renewer: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self.authorities_changed = asyncio.Event()  # set on each rotation picked up (tests)
        self._auditor: asyncio.Task[None] | None = None
        self.certificate_check_interval_s = CERTIFICATE_CHECK_INTERVAL_S
        self._crl_lock = threading.Lock()

    def _read_crl(self, name: str = "") -> bytes:
        """A CA's current CRL (``name``: its key id; "" for the one at ``ca.crl_url``), re-signed
        first if it is stale; empty for a CA not in service. Runs on the service threads: the
        lock keeps two of them from re-signing at once (both would write ``crl.der.tmp``)."""
        paths = ca_paths(self.config)
        if name and name not in self.service.cas.crl_names:
            return b""
        path = paths.crl_of(name) if name else paths.crl
        with self._crl_lock:
            if not path.exists() or needs_refresh(path.read_bytes(), now=self.service.clock()):
                self.service.publish_crl()
            return path.read_bytes()

    def _on_handshake_refused(self, peer: str, reason: str) -> None:
        log.warning("TLS handshake refused", extra={"peer": peer, "reason": reason})
        self.audit.submit(AuditRecord(f"peer:{peer}", "tls.handshake", "refused", None, reason))

    async def start(self) -> int:
        """Start listening; returns the bound port (useful with ``port=0``)."""
        credentials = ensure_server_certificate(
            self.config, enrollment_server_credentials(self.config), ca=self.service.ca
        )
        paths = ca_paths(self.config)
        if not paths.crl.exists():
            self.service.publish_crl()
        context = server_context(
            cert_chain=credentials.cert,
            key=credentials.key,
            client_ca=paths.chain,
            client_cert="optional",  # cacerts and csrattrs are public (RFC 7030 section 3.2.3)
        )
        self._auditor = asyncio.create_task(self.audit.run())
        settings = self.config.enrollment
        deadline = HeaderDeadline(self._make_protocol, settings.header_timeout_s)
        self._est = ESTApp(
            self.service,
            crl_path_getter=self._read_crl,
            threads=self.threads,
            outage=self.outage,
            middlewares=(deadline.middleware,),
        )
        app = self._est.build()
        # keepalive_timeout bounds a connection waiting for its next request, from its start or
        # its last response to the end of the next request's headers (aiohttp's default: 3630 s).
        # No lingering to read an unread body after the response (aiohttp's default: 10 s, which
        # a slow body would get on top of its deadline): closing, the TLS layer drains for 2 s.
        self._runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            keepalive_timeout=settings.idle_timeout_s,
            lingering_time=0,
        )
        await self._runner.setup()
        self._server = await serve_tls(
            deadline.protocol,
            host=settings.host,
            port=self.port,
            context=context,
            on_refused=self._on_handshake_refused,
            handshake_timeout=settings.tls_handshake_timeout_s,
            caps=connection_caps(settings),
            reuse_port=self.reuse_port,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._renewer = asyncio.create_task(self._keep_certificate_current(context, credentials))
        trust = TrustedCAs(context, load_certificates(paths.chain))
        self._follower = asyncio.create_task(self._follow_authorities(trust))
        log.info(
            "enrollment service listening",
            extra={"host": self.config.enrollment.host, "port": self.port},
        )
        return self.port

    def _make_protocol(self) -> asyncio.Protocol:
        """aiohttp's protocol for one connection (the runner is set up before serving)."""
        assert self._runner is not None and self._runner.server is not None
        return self._runner.server()

    async def _keep_certificate_current(
        self, context: ssl.SSLContext, credentials: ServerCredentials
    ) -> None:
        """Renew the server's own certificate while it runs, not only at start: a service up
        for longer than the renewal margin would otherwise serve an expiring certificate."""
        while True:
            await asyncio.sleep(self.certificate_check_interval_s)
            renew = functools.partial(
                renew_server_certificate_if_due, self.config, credentials, ca=self.service.ca
            )
            try:
                renewed = await self.threads.run(renew)
            except (OSError, FleetgateError) as exc:
                log.error("server certificate renewal failed: %s", exc)
                continue
            if renewed:
                context.load_cert_chain(credentials.cert, credentials.key)  # new handshakes
                log.info("server certificate renewed", extra={"names": list(credentials.names)})

    async def _follow_authorities(self, trust: TrustedCAs) -> None:
        """Pick up a CA rotation without a restart: sign with the registry's active issuing CA,
        and trust (for renewals) every rotated CA that chains to the ones already trusted."""
        while True:
            await asyncio.sleep(self.config.ca.authority_poll_interval_s)
            try:
                changed = await self.threads.run(self.service.refresh_authorities)
            except (OSError, FleetgateError, SQLAlchemyError) as exc:
                log.error("reading the CA generations failed: %s", exc)
                continue
            if changed:
                added = trust.add(self.service.cas.trusted)
                log.info(
                    "CA generations changed",
                    extra={
                        "signer": self.service.ca.anchors.issuing.subject.rfc4514_string(),
                        "trusted_added": [c.subject.rfc4514_string() for c in added],
                    },
                )
                self.authorities_changed.set()

    async def stop(self) -> None:
        """Stop listening, finish the requests in progress, store the queued audit, close."""
        if self._renewer is not None:
            self._renewer.cancel()
        if self._follower is not None:
            self._follower.cancel()
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._auditor is not None:
            self._auditor.cancel()
            await asyncio.gather(self._auditor, return_exceptions=True)
        await self.audit.flush(final=True)
        self.threads.shutdown()
        timings = {k: round(v, 6) for k, v in self.service.timer.seconds.items()}
        log.info(
            "enrollment service stopped",
            extra={
                "stage_seconds": json.dumps(timings),
                "peak_service_calls": self.threads.peak_in_flight,
                # enrollments committed and the transactions that carried them (group commit)
                "enroll_commits": _commits(self._est),
            },
        )
        self.registry.close()


def _commits(est: ESTApp | None) -> dict[str, int]:
    if est is None:
        return {"enrollments": 0, "transactions": 0}
    return {"enrollments": est.enrollments.items, "transactions": est.enrollments.batches}


async def run_forever(
    config: Config, *, reuse_port: bool = False, ready: Callable[[], object] | None = None
) -> None:
    """Serve until SIGINT or SIGTERM; ``ready()`` once listening."""
    server = EnrollmentServer(config, reuse_port=reuse_port)
    await run_until_signalled(_Started(server, ready))


@dataclass
class _Started:
    """``server``, calling ``ready`` once it listens."""

    server: EnrollmentServer
    ready: Callable[[], object] | None

    async def start(self) -> int:
        port = await self.server.start()
        if self.ready is not None:
            self.ready()
        return port

    async def stop(self) -> None:
        await self.server.stop()


def serve_processes(config: Config, workers: int) -> int:
    """``workers`` processes serving one port (SO_REUSEPORT), until SIGINT or SIGTERM; the
    exit status. PostgreSQL only: each process has its own pool of service threads, and the
    database serialises what must be (the conditional UPDATEs, the audit chain's lock).

    The first process starts alone (it may write the server certificate and the CRL), the
    others once it listens. Every process unlocks the CA itself.
    """
    if make_url(normalise_url(config.database_url)).get_backend_name() != "postgresql":
        raise FleetgateError(
            f"--workers {workers} needs a PostgreSQL registry: SQLite lets one writer in at a "
            "time and every enrollment writes, so more processes would only queue on its lock "
            "(one process with one service thread is fastest there: enrollment/workers.py)"
        )
    spawn = multiprocessing.get_context("spawn")
    first_ready = spawn.Event()
    processes: list[multiprocessing.process.BaseProcess] = []

    def stop(_signum: int, _frame: object) -> None:
        for process in processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        for n in range(workers):
            ready = first_ready if n == 0 else None
            process = spawn.Process(
                target=_serve_one, args=(config, ready), name=f"fleetgate-enrollment-{n}"
            )
            process.start()
            processes.append(process)
            while n == 0 and not first_ready.wait(0.2):
                if not process.is_alive():
                    return process.exitcode or 1
        for running in processes:
            running.join()
    finally:
        stop(0, None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return max((p.exitcode or 0 for p in processes), default=0)


def _serve_one(config: Config, ready: EventType | None) -> None:
    """One of :func:`serve_processes`' processes (spawned: a fresh interpreter)."""
    jsonlog.configure(config.log.level, config.logs_dir)
    asyncio.run(run_forever(config, reuse_port=True, ready=ready.set if ready else None))
