"""A device identity whose key is slot 9A of a PIV smartcard, and mutual TLS 1.3 with it.

The key is generated on the card and never leaves it. The issued certificate is written back to
the card (PUT DATA, where OpenSC and any PKCS#11 application find it) and kept, with the fleet
trust anchors, in the store's directory.

Python's ``ssl`` cannot sign with a card key on Debian 12: it loads key files only, and the
OpenSSL 3 ``pkcs11-provider`` is not packaged. So TLS runs on the same system OpenSSL 3.0 through
M2Crypto, with the key as an engine key: OpenSSL -> libengine-pkcs11-openssl -> OpenSC's PKCS#11
module -> pcscd -> the card. Every CertificateVerify signature is a GENERAL AUTHENTICATE on the
card. The context gets the SDK's cipher policy (TLS 1.3 only, the policy's suites) through
``SSL_CTX_set_ciphersuites`` on M2Crypto's own ``SSL_CTX`` pointer, since M2Crypto 0.51 has no
call for it, and the result is read back before use. :class:`DeviceClient` connects through
:meth:`SmartcardKeyStore.tls_context`, an object with the client side of ``ssl.SSLContext``
that paho takes through its public ``tls_set_context``.

Renewal (:meth:`SmartcardKeyStore.renew`) is EST ``simplereenroll`` with the same card key, over
the same card-key TLS (``http.client`` on an M2Crypto connection, handed to
:class:`~device_sdk.est.EstClient` as its transport).
"""

from __future__ import annotations

import functools
import http.client
import io
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, SupportsInt, TypeVar, cast
from urllib.parse import quote

import M2Crypto._m2crypto as _m2crypto
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from M2Crypto import Engine, m2
from M2Crypto.SSL.Connection import Connection
from M2Crypto.SSL.Context import Context
from M2Crypto.SSL.SSLError import SSLError
from M2Crypto.SSL.timeout import timeout as SocketTimeout

from device_sdk.ciphers import CipherPolicy, resolve
from device_sdk.debian import MissingPackageFile, package_file
from device_sdk.errors import DeviceSdkError, EnrollmentError, KeyStoreError
from device_sdk.est import EstClient, EstError, device_csr
from device_sdk.hazmat import MissingBinding, libcrypto, libssl
from device_sdk.keystore import _pem, _public_der, _write_atomic, device_id_of
from device_sdk.piv import CardAbsent, PivCard, PivCardKey, PivError
from device_sdk.provisioning import issuers_of

log = logging.getLogger("fleetgate.device_sdk")

_T = TypeVar("_T")
CARD_KEY_LABEL = "PIV AUTH key"  # OpenSC's PKCS#11 label for slot 9A's private key
_PARTIAL_WRITES = libssl.SSL_MODE_ENABLE_PARTIAL_WRITE | libssl.SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER


class CardTlsError(DeviceSdkError, OSError):
    """TLS with the card key failed (handshake, verification, or the PKCS#11 stack)."""


class SmartcardKeyStore:
    """A PIV card's slot 9A key, with ``device.crt`` and ``ca.crt`` in ``directory``.

    ``pin`` unlocks the card for signing; ``reader`` picks the reader (a substring of its name).
    """

    def __init__(self, directory: Path, *, pin: str, reader: str | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.reader = reader
        self._pin = pin
        self._lock = threading.Lock()
        self._card: PivCard | None = None

    @property
    def trust_anchors_path(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def certificate_path(self) -> Path:
        return self.directory / "device.crt"

    def set_trust_anchors(self, certs: Sequence[x509.Certificate]) -> None:
        """Provision the fleet CA certificates (from the factory, or EST ``cacerts``)."""
        _write_atomic(self.trust_anchors_path, _pem(certs), mode=0o644)

    def certificates(self) -> list[x509.Certificate]:
        try:
            data = self.certificate_path.read_bytes()
        except FileNotFoundError:
            raise KeyStoreError(
                f"no device certificate in {self.directory}: enroll the smartcard first "
                "(device_sdk.piv_provisioning.enroll_smartcard)"
            ) from None
        return x509.load_pem_x509_certificates(data)

    def card(self) -> PivCard:
        """The card, PIV application selected and PIN verified; reopened after a removal."""
        with self._lock:
            if self._card is None:
                card = PivCard.open(self.reader)
                try:
                    card.verify_pin(self._pin)
                except PivError:
                    card.close()
                    raise
                self._card = card
            return self._card

    def close(self) -> None:
        with self._lock:
            card, self._card = self._card, None
        if card is not None:
            card.close()

    def load_identity(self, context: Any) -> None:
        raise KeyStoreError(
            "a smartcard key cannot be loaded into Python's ssl (it takes key files only, and "
            "Debian 12 packages no pkcs11-provider): connect through tls_context(), as "
            "DeviceClient does"
        )

    def new_key(self) -> PivCardKey:
        """Generate a P-256 key in slot 9A on the card (this replaces the slot's key)."""
        card = self.card()
        return PivCardKey(card, self._on_card(lambda c: c.generate_key()))

    def install(self, key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate]) -> None:
        """Write the certificate to the card (slot 9A's object) and then to the directory."""
        if not chain:
            raise KeyStoreError("install() needs the device certificate (an empty chain was given)")
        if not isinstance(key, PivCardKey):
            raise KeyStoreError(
                "a smartcard store installs only keys from its new_key(): a software key would "
                "not be on the card"
            )
        if _public_der(chain[0].public_key()) != _public_der(key.public_key()):
            raise KeyStoreError(
                f"certificate {chain[0].serial_number:x} is not for the key in slot 9A: the CSR "
                "and the certificate must come from the same new_key()"
            )
        self._on_card(lambda c: c.put_certificate(chain[0]))
        _write_atomic(self.certificate_path, _pem(chain), mode=0o644)

    def renew(self, device_id: str, *, est_url: str, timeout: float = 30.0) -> x509.Certificate:
        """EST ``simplereenroll`` for the card's current key, over mutual TLS signed by that key.

        The key stays in slot 9A: the service keeps a hardware key's protection only for the same
        key (a new one would have to be attested again), and this process's pkcs11 engine would
        not see a new key until it restarts. :class:`DeviceClient` calls this when renewal is due.
        """
        current = self.certificates()[0]
        context = self.tls_context()  # the card's key must still be device.crt's
        try:
            key = PivCardKey(self.card(), _ec_public_key(current))
            csr = device_csr(device_id, key)  # signed on the card
            if not csr.is_signature_valid:
                raise KeyStoreError(
                    f"the card's slot 9A key no longer matches {self.certificate_path} (the card "
                    "was re-keyed or swapped): enroll the device again"
                )
            try:
                with EstClient(est_url, context.https_connection, timeout=timeout) as est:
                    ca_certs = est.cacerts()
                    cert = est.simplereenroll(csr)
            except EstError as exc:
                raise EnrollmentError(
                    f"the EST server at {est_url} refused to renew {device_id}: {exc.message}"
                ) from exc
            except CardTlsError:
                raise  # the handshake: its message says what to check
            except (SSLError, http.client.HTTPException, OSError) as exc:
                raise EnrollmentError(
                    f"the connection to the EST server at {est_url} failed while renewing "
                    f"{device_id} ({exc!r}); the current certificate stays in use: retry"
                ) from exc
            if device_id_of(cert) != device_id or _public_der(cert.public_key()) != _public_der(
                current.public_key()
            ):
                raise EnrollmentError(
                    f"the EST server at {est_url} issued certificate {cert.serial_number:x} for "
                    f"{device_id_of(cert)} or another key, not for {device_id}'s card key; "
                    "nothing was installed"
                )
            self._install_renewed([cert, *issuers_of(cert, ca_certs)])
        finally:
            self.close()  # a long-lived agent holds no PC/SC handle between renewals
        return cert

    def _install_renewed(self, chain: Sequence[x509.Certificate]) -> None:
        """``device.crt`` first, then the card.

        The service superseded the old certificate when it issued this one, so the new one must
        reach the file TLS loads from even if the card is pulled now. The card's copy is for
        other PKCS#11 applications (OpenSC finds the key by the same public key either way);
        a failed write is logged, and the next renewal writes the card again.
        """
        _write_atomic(self.certificate_path, _pem(chain), mode=0o644)

        def put(card: PivCard) -> None:
            card.resume(self._pin)  # OpenSC signed the EST handshake in between
            card.put_certificate(chain[0])

        try:
            self._on_card(put)
        except PivError as exc:
            log.warning(
                "renewed certificate %x is in %s, but not on the card yet (%s); the next "
                "renewal writes it there",
                chain[0].serial_number,
                self.certificate_path,
                exc,
            )

    def tls_context(self, cipher_policy: CipherPolicy = "auto") -> CardTlsContext:
        """What DeviceClient connects with: mutual TLS 1.3 signed by the card."""
        self.certificates()  # enrolled?
        if not self.trust_anchors_path.exists():
            raise KeyStoreError(
                f"no trust anchors at {self.trust_anchors_path}: provision the fleet root CA "
                "certificate there (set_trust_anchors) before connecting"
            )
        return CardTlsContext(
            certificate_path=self.certificate_path,
            trust_anchors_path=self.trust_anchors_path,
            pin=self._pin,
            suites=resolve(cipher_policy),
        )

    def _on_card(self, action: Callable[[PivCard], _T]) -> _T:
        """``action(card)``; after a card removal the next operation reopens the card."""
        try:
            return action(self.card())
        except CardAbsent:
            self.close()
            raise


def _ec_public_key(cert: x509.Certificate) -> ec.EllipticCurvePublicKey:
    key = cert.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise KeyStoreError(
            f"certificate {cert.serial_number:x} holds a {type(key).__name__}, not the card's "
            "P-256 key: enroll the device again"
        )
    return key


# -- TLS with the card key --------------------------------------------------------------------


class _Pkcs11Engine:
    """OpenSSL's pkcs11 engine on OpenSC's module; one per process (engines are global)."""

    def __init__(self) -> None:
        try:
            engine_path = str(package_file("libengine-pkcs11-openssl", "/engines-3/pkcs11.so"))
            module_path = str(package_file("opensc-pkcs11", "/opensc-pkcs11.so"))
        except MissingPackageFile as exc:
            raise CardTlsError(exc.args[0]) from exc
        try:
            Engine.load_dynamic()
            self._engine = Engine.load_dynamic_engine(b"pkcs11", engine_path)
            self._engine.ctrl_cmd_string("MODULE_PATH", module_path)
            self._engine.init()
        except Engine.EngineError as exc:
            raise CardTlsError(f"cannot load the pkcs11 engine {engine_path}: {exc}") from exc
        self._lock = threading.Lock()

    def load_private_key(self, uri: str, pin: str) -> Any:
        """The key's EVP_PKEY; the engine signs with it through PKCS#11 (login with ``pin``).

        libp11 keeps the token's objects from its first load for the life of the process, and
        its RE_ENUMERATE control crashes (libp11 0.4.12), so a card swapped under a running
        process still shows its predecessor's key; the key check in CardTlsContext catches it.
        """
        with self._lock:
            self._engine.ctrl_cmd_string("PIN", pin)
            return self._engine.load_private_key(uri)


@functools.cache
def _pkcs11_engine() -> _Pkcs11Engine:
    return _Pkcs11Engine()


def _openssl() -> tuple[libssl.LibSsl, libcrypto.LibCrypto]:
    """libssl and libcrypto as M2Crypto links them (its ``SSL_CTX`` go only to its libssl)."""
    try:
        return libssl.through(_m2crypto.__file__), libcrypto.through(_m2crypto.__file__)
    except MissingBinding as exc:
        raise CardTlsError(f"M2Crypto's OpenSSL cannot be reached: {exc}") from exc


def _configure(address: int, suites: tuple[str, ...]) -> None:
    """TLS 1.3 only, partial writes (paho resends the unsent rest), the policy's suites, read
    back from the ``SSL_CTX`` rather than assumed: M2Crypto 0.51 has no call for any of it."""
    ssl_lib, crypto_lib = _openssl()
    wanted = ":".join(suites)
    try:
        if (
            ssl_lib.SSL_CTX_ctrl(
                address, libssl.SSL_CTRL_SET_MIN_PROTO_VERSION, libssl.TLS1_3_VERSION, None
            )
            != 1
        ):
            raise CardTlsError("OpenSSL refused TLS 1.3 as the minimum version")
        ssl_lib.SSL_CTX_ctrl(address, libssl.SSL_CTRL_MODE, _PARTIAL_WRITES, None)
        if ssl_lib.SSL_CTX_set_ciphersuites(address, wanted.encode()) != 1:
            raise CardTlsError(f"OpenSSL knows none of the TLS 1.3 suites {wanted}")
        stack = ssl_lib.SSL_CTX_get_ciphers(address)
        names = [
            ssl_lib.SSL_CIPHER_get_name(crypto_lib.OPENSSL_sk_value(stack, i)).decode()
            for i in range(crypto_lib.OPENSSL_sk_num(stack))
        ]
    except MissingBinding as exc:
        raise CardTlsError(f"cannot set the TLS policy on M2Crypto's context: {exc}") from exc
    offered = [name for name in names if name.startswith("TLS_")]
    if offered != list(suites):
        raise CardTlsError(f"the TLS context offers {offered}, not the policy's {suites}")


class CardTlsContext:
    """Mutual TLS 1.3 client connections that sign with the card's slot 9A key (via PKCS#11).

    It offers the client side of ``ssl.SSLContext`` (``wrap_socket`` with ``server_hostname``,
    ``check_hostname``), so paho takes it through its public ``tls_set_context`` and makes the
    TCP connection itself, as it does for a stdlib context. OpenSSL checks the server's name
    (``SSL_set1_host``) during verification, so ``check_hostname`` is always true.
    """

    check_hostname = True

    def __init__(
        self,
        *,
        certificate_path: Path,
        trust_anchors_path: Path,
        pin: str,
        suites: tuple[str, ...],
    ) -> None:
        self.suites = suites
        engine = _pkcs11_engine()
        uri = f"pkcs11:object={quote(CARD_KEY_LABEL)};type=private"
        try:
            self._key = engine.load_private_key(uri, pin)
        except Engine.EngineError as exc:
            raise CardTlsError(
                f"OpenSC found no usable key {uri} ({exc}): is the card inserted, enrolled, and "
                "the PIN right?"
            ) from exc
        ctx = Context("tls")
        _configure(int(cast(SupportsInt, ctx.ctx)), suites)  # a SWIG pointer: the SSL_CTX *
        if ctx.load_verify_locations(str(trust_anchors_path)) != 1:
            raise CardTlsError(f"cannot load the fleet trust anchors {trust_anchors_path}")
        ctx.set_verify(m2.SSL_VERIFY_PEER | m2.SSL_VERIFY_FAIL_IF_NO_PEER_CERT, depth=4)
        if m2.ssl_ctx_use_cert_chain(ctx.ctx, str(certificate_path)) != 1:
            raise CardTlsError(f"cannot load the device certificate chain {certificate_path}")
        try:
            paired = m2.ssl_ctx_use_pkey_privkey(ctx.ctx, self._key.pkey) == 1 and (
                m2.ssl_ctx_check_privkey(ctx.ctx) == 1
            )
        except SSLError:
            paired = False
        if not paired:
            raise CardTlsError(
                f"the card's slot 9A key does not match {certificate_path}: the card was "
                "re-keyed after enrollment (enroll the device again), or swapped while this "
                "process ran (OpenSC's PKCS#11 view is loaded once per process: restart it)"
            )
        self._ctx = ctx

    def wrap_socket(
        self,
        sock: socket.socket,
        *,
        server_hostname: str | None = None,
        do_handshake_on_connect: bool = True,
    ) -> CardTlsConnection:
        """TLS on the connected ``sock``, verifying ``server_hostname``; it takes the socket's
        timeout, which then bounds each read and write of the handshake."""
        if not server_hostname:  # an OSError, not ssl's ValueError: paho retries on ValueError
            sock.close()
            raise CardTlsError("card TLS verifies the server's name: give server_hostname")
        timeout = sock.gettimeout()
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)  # M2Crypto's BIO wants a blocking descriptor: see settimeout
            conn = Connection(self._ctx, sock=sock)
            conn.set_tlsext_host_name(server_hostname)
            conn.set1_host(server_hostname)
        except BaseException:
            sock.close()
            raise
        tls = CardTlsConnection(conn, server_hostname)
        tls.settimeout(timeout)
        if do_handshake_on_connect:
            tls.do_handshake()
        return tls

    def https_connection(self, host: str, port: int, timeout: float) -> http.client.HTTPConnection:
        """An HTTPS connection signed by the card: :class:`EstClient`'s transport for renewal."""
        return _CardHttpsConnection(self, host, port, timeout)


class _CardHttpsConnection(http.client.HTTPConnection):
    """``http.client`` over :meth:`CardTlsContext.wrap_socket`: the broker connection's
    verification (OpenSSL's host name check) and time bound. M2Crypto's ``httpslib`` has
    neither: no handshake timeout, and a name check in Python after the handshake."""

    default_port = 443

    def __init__(self, context: CardTlsContext, host: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout)
        self._context = context
        self._handshake_timeout = timeout

    def connect(self) -> None:
        try:
            sock = socket.create_connection((self.host, self.port), self._handshake_timeout)
        except OSError as exc:
            raise CardTlsError(f"cannot reach {self.host}:{self.port}: {exc}") from exc
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


class CardTlsConnection:
    """An M2Crypto TLS client connection with the ``ssl.SSLSocket`` calls paho and
    ``http.client`` make: non-blocking ``recv``/``send`` map "want read/write" to
    ``BlockingIOError``; ``sendall``/``makefile`` block, for ``http.client``."""

    def __init__(self, conn: Connection, server_hostname: str) -> None:
        self._conn = conn
        self._server = server_hostname

    def settimeout(self, timeout: float | None) -> None:
        """Bound each blocking read and write (``SO_RCVTIMEO``/``SO_SNDTIMEO``): M2Crypto's BIO
        needs a blocking descriptor, so the socket's own timeout cannot be used."""
        seconds = timeout or 0.0  # 0: no bound
        bound = SocketTimeout(sec=int(seconds), microsec=int(seconds % 1 * 1e6))
        self._conn.set_socket_read_timeout(bound)
        self._conn.set_socket_write_timeout(bound)

    def do_handshake(self) -> None:
        """The blocking client handshake; the server must chain to the fleet CA and be named."""
        conn = self._conn
        try:
            conn.setup_ssl()
            conn.set_connect_state()
            if conn.connect_ssl() != 1:
                raise SSLError("handshake did not complete")
        except (SSLError, OSError) as exc:
            result = conn.get_verify_result()
            self.close()
            reason = m2.x509_get_verify_error(result) if result != m2.X509_V_OK else f"{exc}"
            raise CardTlsError(
                f"TLS with {self._server} using the card key failed ({reason}): the server must "
                "chain to the fleet CA and name the host; a server that refuses the device "
                "certificate, or offers none of the policy's suites, also ends here"
            ) from exc

    def recv(self, size: int) -> bytes:
        try:
            data = m2.ssl_read_nbio(self._conn.ssl, size)
        except SSLError as exc:
            raise ConnectionResetError(f"TLS read failed: {exc}") from exc
        if data is None:  # want read/write: nothing decrypted yet
            raise BlockingIOError
        return bytes(data)  # b"" on close_notify: paho sees the end of the connection

    def send(self, data: bytes | bytearray) -> int:
        if not data:
            return 0
        try:
            sent = m2.ssl_write_nbio(self._conn.ssl, bytes(data))
        except SSLError as exc:
            raise ConnectionResetError(f"TLS write failed: {exc}") from exc
        if sent is None or sent < 0:
            raise BlockingIOError
        return int(sent)

    def sendall(self, data: bytes) -> None:
        """Write all of ``data`` on a blocking connection (the context allows partial writes)."""
        view = memoryview(data)
        while view:
            sent = self._conn.write(bytes(view))
            if sent <= 0:
                raise ConnectionResetError(f"TLS write to {self._server} failed")
            view = view[sent:]

    def makefile(self, mode: str) -> io.BufferedReader:
        """Blocking reads through a file whose close leaves the connection open, as
        ``socket``'s does: M2Crypto's own ``makefile`` wraps the connection, so closing one
        response (which ``http.client`` does) would shut TLS down under a kept-alive one."""
        if mode != "rb":
            raise ValueError(f"a card TLS connection reads through mode 'rb' only, not {mode!r}")
        return io.BufferedReader(_TlsReader(self._conn))

    def pending(self) -> int:
        return int(self._conn.pending())

    def fileno(self) -> int:
        return int(self._conn.fileno())

    def setblocking(self, flag: bool) -> None:
        self._conn.setblocking(1 if flag else 0)

    def close(self) -> None:
        """Send close_notify, then close the socket (M2Crypto's close leaves it open)."""
        self._conn.close()
        self._conn.socket.close()

    def version(self) -> str | None:
        version = self._conn.get_version()
        return str(version) if version else None

    def cipher(self) -> tuple[str, str, int] | None:
        cipher = self._conn.get_cipher()
        if cipher is None:
            return None
        return cipher.name(), cipher.version(), len(cipher)  # len(): secret bits


class _TlsReader(io.RawIOBase):
    """Reads of a TLS connection; closing it does not close the connection."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._conn.read(len(buffer))  # b"" at close_notify
        buffer[: len(data)] = data
        return len(data)
