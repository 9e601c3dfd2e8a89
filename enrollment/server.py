"""Runs the enrollment service: loads the CA and registry, serves EST over mutual TLS."""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import resource
import ssl
import threading

from aiohttp import web
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
from enrollment.registry.outage import RegistryOutage
from enrollment.service import EnrollmentService
from enrollment.workers import ServiceThreads, service_threads
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
        self, config: Config, *, port: int | None = None, threads: int | None = None
    ) -> None:
        """``threads`` overrides :func:`~enrollment.workers.service_threads`'s choice (tests
        use it to make requests overlap on SQLite)."""
        self.config = config
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
        app = ESTApp(
            self.service,
            crl_path_getter=self._read_crl,
            threads=self.threads,
            outage=self.outage,
            middlewares=(deadline.middleware,),
        ).build()
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
            },
        )
        self.registry.close()


async def run_forever(config: Config) -> None:
    """Serve until SIGINT or SIGTERM."""
    await run_until_signalled(EnrollmentServer(config))
