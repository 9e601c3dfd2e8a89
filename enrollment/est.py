"""EST (RFC 7030) over HTTPS: the wire format around :class:`EnrollmentService`.

Bodies are base64 DER: PKCS#10 in, PKCS#7 certs-only out, so any EST client or ``curl`` works.
Errors are ``text/plain`` with one line that says what went wrong and what to do. Every
response carries HSTS and ``nosniff`` and no ``Server`` banner; a request body has
``body_timeout_s`` to arrive once its headers are in (the header and idle deadlines are the
server's: :mod:`enrollment.server`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextvars
import functools
import logging
import sqlite3
import ssl
import uuid
from collections.abc import Awaitable, Callable
from typing import TypeVar
from urllib.parse import unquote

from aiohttp import BasicAuth, hdrs, web
from aiohttp.typedefs import Middleware
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, pkcs7
from sqlalchemy.exc import SQLAlchemyError

from enrollment.group_commit import GroupCommit
from enrollment.registry import AuditRecord
from enrollment.registry.outage import RegistryOutage
from enrollment.service import EnrollmentService
from enrollment.workers import ServiceThreads
from fleetgate import jsonlog
from fleetgate.errors import FleetgateError

log = logging.getLogger("fleetgate.est")

EST_PREFIX = "/.well-known/est"
PKCS7_CERTS_ONLY = "application/pkcs7-mime; smime-type=certs-only"

# CsrAttrs (RFC 7030 section 4.5.2): ecdsa-with-SHA256, and id-ecPublicKey with secp256r1.
CSR_ATTRS_DER = bytes.fromhex(
    "3026"
    "06082a8648ce3d040302"  # OID 1.2.840.10045.4.3.2 ecdsa-with-SHA256
    "3015"  # Attribute
    "06072a8648ce3d0201"  # OID 1.2.840.10045.2.1 id-ecPublicKey
    "310a"  # SET OF: the allowed curves, and nothing else
    "06082a8648ce3d030107"  # OID 1.2.840.10045.3.1.7 secp256r1
    "0603550403"  # OID 2.5.4.3 commonName (top level): the device id goes in the CN
)

# The CA label (RFC 7030 section 3.2.2) under which a station redeems its bootstrap code.
STATION_LABEL = "station"
BOOTSTRAP_REALM = 'Basic realm="fleetgate station bootstrap", charset="UTF-8"'

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
T = TypeVar("T")
U = TypeVar("U")

SECURITY_HEADERS = {
    "Strict-Transport-Security": "max-age=31536000",
    "X-Content-Type-Options": "nosniff",
}


def _b64_response(der: bytes, content_type: str) -> web.Response:
    return web.Response(
        body=base64.encodebytes(der),
        headers={"Content-Type": content_type, "Content-Transfer-Encoding": "base64"},
    )


def _error(status: int, message: str) -> web.Response:
    return web.Response(status=status, text=message + "\n", content_type="text/plain")


async def _security_headers(request: web.Request, response: web.StreamResponse) -> None:
    """HSTS and nosniff on every answer; no ``Server`` banner naming aiohttp's version."""
    response.headers.update(SECURITY_HEADERS)
    response.headers.popall("Server", None)


def peer_certificate(request: web.Request) -> x509.Certificate | None:
    """The client certificate the TLS layer verified, if the client sent one."""
    ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
    if not isinstance(ssl_object, ssl.SSLObject):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return x509.load_der_x509_certificate(der) if der else None


def peer_address(request: web.Request) -> str:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    return f"{peer[0]}:{peer[1]}" if peer else "unknown"


class ESTApp:
    """The aiohttp application serving EST and the CRL.

    Every call into the service or the registry runs on ``threads``, never on the event loop,
    which also runs the TLS handshakes.
    """

    def __init__(
        self,
        service: EnrollmentService,
        *,
        crl_path_getter: Callable[[str], bytes],
        threads: ServiceThreads,
        outage: RegistryOutage | None = None,
        middlewares: tuple[Middleware, ...] = (),
    ) -> None:
        """``middlewares`` run before the app's own (the server's header deadline)."""
        self.service = service
        self._middlewares = middlewares
        self.body_timeout_s = service.config.enrollment.body_timeout_s
        self.threads = threads
        self.outage = outage or RegistryOutage(service.registry.url, log)
        self.max_body = service.config.enrollment.max_body_bytes
        self._crl = crl_path_getter
        self._cacerts: tuple[tuple[x509.Certificate, ...], bytes] = ((), b"")
        self.enrollments = GroupCommit(service.commit_enrollments, threads.run)

    def build(self) -> web.Application:
        # client_max_size backs up the explicit check in _read_body.
        app = web.Application(
            client_max_size=self.max_body,
            middlewares=[*self._middlewares, self._request_context],
        )
        app.on_response_prepare.append(_security_headers)
        app.router.add_get(f"{EST_PREFIX}/cacerts", self.cacerts)
        app.router.add_get(f"{EST_PREFIX}/csrattrs", self.csrattrs)
        app.router.add_post(f"{EST_PREFIX}/simpleenroll", self.simpleenroll)
        app.router.add_post(f"{EST_PREFIX}/simplereenroll", self.simplereenroll)
        app.router.add_post(f"{EST_PREFIX}/{STATION_LABEL}/simpleenroll", self.station_enroll)
        app.router.add_post(f"{EST_PREFIX}/fleetgate/tpm/challenge", self.tpm_challenge)
        app.router.add_post(f"{EST_PREFIX}/fleetgate/tpm/enroll", self.tpm_enroll)
        app.router.add_post(f"{EST_PREFIX}/fleetgate/piv/enroll", self.piv_enroll)
        app.router.add_get("/crl", self.crl)
        app.router.add_get("/crl/{name:[0-9a-f]{40}}", self.crl)
        app.router.add_post("/ocsp", self.ocsp_post)
        app.router.add_get("/ocsp/{request:.+}", self.ocsp_get)
        return app

    @web.middleware
    async def _request_context(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        rid = request.headers.get("X-Request-ID", "")[:64] or uuid.uuid4().hex[:16]
        token = jsonlog.request_id.set(rid)
        device_token = jsonlog.device_id.set(None)  # the service sets it once it knows the id
        try:
            response = await handler(request)
        finally:
            jsonlog.device_id.reset(device_token)
            jsonlog.request_id.reset(token)
        response.headers["X-Request-ID"] = rid
        return response

    async def cacerts(self, request: web.Request) -> web.Response:
        """Every CA certificate not retired (RFC 7030 4.1.3), the signing CA and its root first:
        during a rotation, the new CA and, for a new root, the cross certificates that link it
        to the root devices already trust (the SDK adopts a new root only through one)."""
        trusted = self.service.cas.trusted
        if self._cacerts[0] != trusted:  # a rotation since the last request
            self._cacerts = (trusted, pkcs7.serialize_certificates(list(trusted), Encoding.DER))
        return _b64_response(self._cacerts[1], "application/pkcs7-mime")

    async def csrattrs(self, request: web.Request) -> web.Response:
        return _b64_response(CSR_ATTRS_DER, "application/csrattrs")

    async def crl(self, request: web.Request) -> web.Response:
        name = request.match_info.get("name", "")  # a rotated CA's key id: its own CRL
        crl = await self.threads.run(functools.partial(self._crl, name))  # may re-sign them
        if not crl:
            return _error(404, f"no_such_crl: no issuing CA with key id {name} is in service")
        return web.Response(body=crl, content_type="application/pkix-crl")

    async def ocsp_post(self, request: web.Request) -> web.Response:
        """RFC 6960 A.1: a DER OCSPRequest in the body."""
        body = await self._read_in_time(request)
        if isinstance(body, web.Response):
            return body
        return await self._ocsp_response(body)

    async def ocsp_get(self, request: web.Request) -> web.Response:
        """RFC 6960 A.1: the base64 DER OCSPRequest, URL-encoded, as the last path segment."""
        try:
            der = base64.b64decode(unquote(request.match_info["request"]), validate=True)
        except (binascii.Error, ValueError):
            der = b""  # answered as malformedRequest
        return await self._ocsp_response(der)

    async def _ocsp_response(self, der: bytes) -> web.Response:
        answer = await self.threads.run(functools.partial(self.service.ocsp_response, der))
        return web.Response(body=answer, content_type="application/ocsp-response")

    async def simpleenroll(self, request: web.Request) -> web.Response:
        """Checked and signed on the service threads, then committed with the enrollments of
        concurrent requests (group commit); answered once its own commit is done."""
        return await self._enroll(
            request, "enroll", self.service.prepare_enroll, then=self.enrollments.submit
        )

    async def simplereenroll(self, request: web.Request) -> web.Response:
        return await self._enroll(request, "reenroll", self.service.reenroll)

    async def station_enroll(self, request: web.Request) -> web.Response:
        """A station's first certificate for its own key, authenticated by its one-time
        bootstrap code: HTTP Basic, user the station id, password the code (RFC 7030 section
        3.2.3 allows HTTP authentication; TLS already verified the server)."""
        try:
            auth = BasicAuth.decode(request.headers.get(hdrs.AUTHORIZATION, ""))
        except ValueError:
            message = (
                "not_authorised: send the station id and its bootstrap code with HTTP Basic "
                "authentication (curl -u STATION:CODE)"
            )
            record = AuditRecord(
                f"peer:{peer_address(request)}",
                "station.enroll",
                "refused",
                None,
                message,
                jsonlog.request_id.get(),
            )
            await self.threads.run(functools.partial(self.service.registry.audit, record))
            response = _error(401, message)
            response.headers["WWW-Authenticate"] = BOOTSTRAP_REALM
            return response

        def redeem(_cert: object, body: bytes, *, request_id: str | None) -> x509.Certificate:
            return self.service.enroll_station(
                auth.login, auth.password, body, request_id=request_id
            )

        return await self._enroll(request, "station.enroll", redeem)

    async def tpm_challenge(self, request: web.Request) -> web.Response:
        """fleetgate extension, TPM step 1: JSON evidence in, a JSON challenge out."""
        answer = await self._call(request, "tpm.challenge", self.service.tpm_challenge)
        if isinstance(answer, web.Response):
            return answer
        return web.json_response(answer)

    async def tpm_enroll(self, request: web.Request) -> web.Response:
        """fleetgate extension, TPM step 2: the answered challenge in, a certificate out."""
        return await self._enroll(request, "tpm.enroll", self.service.enroll_tpm)

    async def piv_enroll(self, request: web.Request) -> web.Response:
        """fleetgate extension: a CSR with its smartcard attestation in, a certificate out."""
        return await self._enroll(request, "piv.enroll", self.service.enroll_piv)

    async def _enroll(
        self,
        request: web.Request,
        action: str,
        operation: Callable[..., T],
        then: Callable[[T], Awaitable[x509.Certificate]] | None = None,
    ) -> web.Response:
        """``operation`` returns the certificate, or with ``then`` what ``then`` turns into it."""
        cert = await self._call(request, action, operation, then)
        if isinstance(cert, web.Response):
            return cert
        assert isinstance(cert, x509.Certificate)
        log.info("%s ok", action, extra={"serial": f"{cert.serial_number:x}"})
        return _b64_response(pkcs7.serialize_certificates([cert], Encoding.DER), PKCS7_CERTS_ONLY)

    async def _call(
        self,
        request: web.Request,
        action: str,
        operation: Callable[..., T],
        then: Callable[[T], Awaitable[U]] | None = None,
    ) -> T | U | web.Response:
        """Run a service operation on the request body, and ``then`` on its result if given;
        a refusal becomes a one-line error."""
        rid = jsonlog.request_id.get()
        body = await self._read_body(request, action, rid)
        if isinstance(body, web.Response):
            return body
        call = functools.partial(operation, peer_certificate(request), body, request_id=rid)
        context = contextvars.copy_context()
        outcome: T | U | FleetgateError
        try:
            outcome = await self.threads.run(call, context=context)
            if then is not None:
                outcome = await then(outcome)
        except FleetgateError as exc:
            outcome = exc
        except (SQLAlchemyError, sqlite3.Error) as exc:
            if not self.outage.failed_with(action, exc):
                raise
            # Logged once per outage; the client is told to come back (EST: 503, Retry-After).
            response = _error(503, "registry_unavailable: the registry is unreachable; retry later")
            response.headers["Retry-After"] = "30"
            return response
        self.outage.succeeded()
        jsonlog.device_id.set(context.get(jsonlog.device_id))  # as the service named it
        if isinstance(outcome, FleetgateError):
            log.warning("%s refused: %s", action, outcome.message, extra={"code": outcome.code})
            return _error(outcome.http_status, f"{outcome.code}: {outcome.message}")
        return outcome

    async def _read_body(
        self, request: web.Request, action: str, rid: str | None
    ) -> bytes | web.Response:
        too_big = f"the request body exceeds {self.max_body} bytes; a P-256 CSR is under 1 KiB"
        if request.content_length is not None and request.content_length > self.max_body:
            return await self._refuse_body(request, action, rid, too_big)
        try:
            return await self._read_in_time(request)
        except web.HTTPRequestEntityTooLarge:
            return await self._refuse_body(request, action, rid, too_big)

    async def _read_in_time(self, request: web.Request) -> bytes | web.Response:
        """The body, or a 408 that closes the connection if it takes over ``body_timeout_s``."""
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await request.read()
        except TimeoutError:
            log.warning("request body too slow", extra={"peer": peer_address(request)})
            response = _error(408, f"body_timeout: send the body within {self.body_timeout_s} s")
            response.force_close()
            return response

    async def _refuse_body(
        self, request: web.Request, action: str, rid: str | None, message: str
    ) -> web.Response:
        """Audited before the client reads the refusal, as the service's refusals are."""
        record = AuditRecord(
            f"peer:{peer_address(request)}",
            action,
            "refused",
            None,
            f"body_too_large: {message}",
            rid,
        )
        await self.threads.run(functools.partial(self.service.registry.audit, record))
        log.warning("%s refused: %s", action, message)
        return _error(413, f"body_too_large: {message}")
