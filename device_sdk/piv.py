"""The host side of a PIV smartcard over PC/SC (pyscard): the station's and device's view of it.

Two layers. The wire format (BER-TLV, command chaining, status words, the PIV data objects) is a
set of pure functions, unit-tested on bytes and written independently of the card applet, so
each cross-checks the other over real PC/SC. :class:`PivCard` is the thin I/O shell: it sends the
APDUs and turns status words and PC/SC failures into typed errors that say what to do.

:class:`PivCardKey` is an ``ec.EllipticCurvePrivateKey`` whose ``sign()`` is GENERAL
AUTHENTICATE on the card, so cryptography's CSR builder signs with the card key; the private key
itself never leaves the card.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed
from smartcard.Exceptions import (  # type: ignore[import-untyped]
    CardConnectionException,
    NoCardException,
    SmartcardException,
)
from smartcard.pcsc.PCSCExceptions import BaseSCardException  # type: ignore[import-untyped]
from smartcard.scard import (  # type: ignore[import-untyped]
    SCARD_LEAVE_CARD,
    SCARD_S_SUCCESS,
    SCardBeginTransaction,
    SCardEndTransaction,
    SCardGetErrorMessage,
)
from smartcard.System import readers as pcsc_readers  # type: ignore[import-untyped]

from device_sdk.errors import DeviceSdkError

PIV_AID = bytes.fromhex("A000000308")
SLOT_9A = 0x9A  # PIV Authentication: the device's TLS key
ALG_P256 = 0x11
PIN_REF = 0x80
OBJECT_CERT_9A = bytes.fromhex("5FC105")
OBJECT_ATTESTATION_CERT = bytes.fromhex("5FFF01")  # YubiKey's slot F9 certificate object
INS_VERIFY, INS_GENERATE, INS_AUTHENTICATE = 0x20, 0x47, 0x87
INS_GET_DATA, INS_PUT_DATA, INS_ATTEST, INS_GET_RESPONSE = 0xCB, 0xDB, 0xF9, 0xC0
SW_OK = 0x9000


# -- errors -------------------------------------------------------------------------------------


class PivError(DeviceSdkError):
    """A smartcard operation failed; the message says what to do next."""


class NoReader(PivError):
    """PC/SC has no reader to offer (pcscd down, or no reader attached)."""


class CardAbsent(PivError):
    """The reader holds no card, or the card was removed during an operation."""


class WrongPin(PivError):
    """The card rejected the PIN; ``retries_left`` more wrong PINs block it."""

    def __init__(self, retries_left: int) -> None:
        super().__init__(
            f"wrong PIN: {retries_left} {'try' if retries_left == 1 else 'tries'} left before "
            "the card blocks it; check the PIN this device was provisioned with"
        )
        self.retries_left = retries_left


class PinBlocked(PivError):
    """Too many wrong PINs: the card refuses the PIN until it is reset with the PUK."""

    def __init__(self) -> None:
        super().__init__(
            "the card's PIN is blocked after too many wrong PINs: reset it with the PUK, or "
            "replace the card and enroll the device again"
        )


class CardRefused(PivError):
    """The card answered a command with an error status word."""

    def __init__(self, what: str, sw: int, hint: str) -> None:
        super().__init__(f"the card refused to {what} (status {sw:04X}): {hint}")
        self.sw = sw


# -- the wire format (pure) -----------------------------------------------------------------------


def tlv(tag: bytes, value: bytes) -> bytes:
    """BER-TLV with a definite length (short, 81 or 82 form; PIV objects stay below 64 KiB)."""
    n = len(value)
    if n < 0x80:
        return tag + bytes([n]) + value
    if n < 0x100:
        return tag + b"\x81" + bytes([n]) + value
    if n < 0x10000:
        return tag + b"\x82" + n.to_bytes(2, "big") + value
    raise ValueError(f"a {n}-byte value does not fit a PIV data object")


def iter_tlv(data: bytes) -> Iterator[tuple[bytes, bytes]]:
    """The top-level (tag, value) pairs of ``data``; :class:`PivError` if malformed."""
    i = 0
    while i < len(data):
        start = i
        i += 1
        if data[start] & 0x1F == 0x1F:
            while i < len(data) and data[i] & 0x80:
                i += 1
            i += 1
        if i >= len(data):
            raise PivError(f"truncated TLV from the card: {data[start:].hex()}")
        tag, length = data[start:i], data[i]
        i += 1
        if length in (0x81, 0x82):
            width = length - 0x80
            length = int.from_bytes(data[i : i + width], "big")
            i += width
        elif length > 0x82:
            raise PivError(f"unsupported TLV length form {length:02X} from the card")
        if i + length > len(data):
            raise PivError(f"TLV {tag.hex()} from the card claims {length} bytes past its end")
        yield tag, data[i : i + length]
        i += length


def tlv_value(data: bytes, tag: bytes) -> bytes:
    """The value of the top-level ``tag`` in ``data``."""
    for found, value in iter_tlv(data):
        if found == tag:
            return value
    raise PivError(f"the card's answer lacks tag {tag.hex().upper()}")


def command_apdus(ins: int, p1: int, p2: int, data: bytes = b"", *, le: bool = True) -> list[bytes]:
    """Short APDUs for one command, chained (CLA 0x10) when ``data`` exceeds 255 bytes."""
    parts = [data[i : i + 255] for i in range(0, len(data), 255)] or [b""]
    apdus = []
    for index, part in enumerate(parts):
        cla = 0x00 if index == len(parts) - 1 else 0x10
        apdu = bytes([cla, ins, p1, p2]) + (bytes([len(part)]) + part if part else b"")
        apdus.append(apdu + (b"\x00" if le and cla == 0x00 else b""))
    return apdus


def pin_block(pin: str) -> bytes:
    """The PIV PIN block: 6 to 8 ASCII characters, padded to 8 bytes with FF."""
    raw = pin.encode()
    if not 6 <= len(raw) <= 8 or not pin.isascii():
        raise PivError("a PIV PIN is 6 to 8 ASCII characters (digits on most cards)")
    return raw.ljust(8, b"\xff")


def check_status(sw: int, what: str) -> None:
    """Raise the typed error for a status word other than 9000."""
    if sw == SW_OK:
        return
    if sw & 0xFFF0 == 0x63C0:
        if sw & 0x0F == 0:
            raise PinBlocked()
        raise WrongPin(sw & 0x0F)
    if sw == 0x6983:
        raise PinBlocked()
    hints = {
        0x6982: "verify the PIN first (PivCard.verify_pin)",
        0x6A82: "the card holds no such object (nothing stored yet, or not a PIV card)",
        0x6A88: "slot 9A holds no key yet: generate one first",
        0x6A80: "the card rejected the data (wrong algorithm, or a read-only object)",
        0x6A86: "the card does not support this slot or algorithm",
        0x6D00: "the card does not support this command (not a PIV card with attestation?)",
        0x6985: "select the PIV application first",
    }
    raise CardRefused(what, sw, hints.get(sw, "see the card's documentation"))


def generate_command() -> bytes:
    """GENERATE ASYMMETRIC KEY PAIR data: control reference template with algorithm P-256."""
    return tlv(b"\xac", tlv(b"\x80", bytes([ALG_P256])))


def parse_generated(answer: bytes) -> ec.EllipticCurvePublicKey:
    """The public key from a GENERATE answer: ``7F49 { 86 <uncompressed point> }``."""
    point = tlv_value(tlv_value(answer, b"\x7f\x49"), b"\x86")
    try:
        return ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    except ValueError as exc:
        raise PivError(f"the card returned an invalid P-256 point ({exc})") from exc


def sign_command(digest: bytes) -> bytes:
    """GENERAL AUTHENTICATE data asking for a signature over a SHA-256 ``digest``."""
    if len(digest) != 32:
        raise ValueError(f"a P-256 card signs a 32-byte SHA-256 digest, not {len(digest)} bytes")
    return tlv(b"\x7c", tlv(b"\x82", b"") + tlv(b"\x81", digest))


def parse_signature(answer: bytes) -> bytes:
    """The DER ECDSA signature from ``7C { 82 <signature> }``."""
    return tlv_value(tlv_value(answer, b"\x7c"), b"\x82")


def object_command(tag: bytes, value: bytes | None = None) -> bytes:
    """GET DATA (``value`` None) or PUT DATA data for the object ``tag``."""
    name = tlv(b"\x5c", tag)
    return name if value is None else name + tlv(b"\x53", value)


def certificate_container(cert: x509.Certificate) -> bytes:
    """SP 800-73-4 certificate object: ``70`` cert, ``71`` CertInfo (uncompressed), ``FE`` LRC."""
    der = cert.public_bytes(serialization.Encoding.DER)
    return tlv(b"\x70", der) + tlv(b"\x71", b"\x00") + tlv(b"\xfe", b"")


def parse_certificate_object(answer: bytes) -> x509.Certificate:
    """The certificate in a GET DATA answer: ``53 { 70 <DER> 71 .. FE .. }`` or ``53 <DER>``."""
    content = tlv_value(answer, b"\x53")
    der = content if content[:1] == b"\x30" else tlv_value(content, b"\x70")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise PivError(f"the card's certificate object is not a certificate ({exc})") from exc


# -- the card (I/O) -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Reader:
    name: str
    handle: Any  # pyscard's reader object


def list_readers() -> list[Reader]:
    """PC/SC readers; :class:`NoReader` if pcscd cannot be reached."""
    try:
        return [Reader(str(r), r) for r in pcsc_readers()]
    except (BaseSCardException, SmartcardException) as exc:
        raise NoReader(
            f"cannot reach the PC/SC service ({exc}): is pcscd running (and, for a private "
            "pcscd, PCSCLITE_CSOCK_NAME set to its socket)?"
        ) from exc


class PivCard:
    """A PIV card in a reader, its PIV application selected; ``close()`` when done."""

    def __init__(self, connection: Any, reader: str) -> None:
        self._connection = connection
        self.reader = reader
        self._lock = threading.Lock()  # a chained exchange must not interleave with another

    @classmethod
    def open(cls, reader: str | None = None) -> PivCard:
        """Connect to the card in ``reader`` (a substring of its name; default the first)."""
        found = list_readers()
        names = [r.name for r in found]
        matching = [r for r in found if reader is None or reader in r.name]
        if not matching:
            raise NoReader(
                f"no PC/SC reader {'named like ' + repr(reader) if reader else 'attached'} "
                f"(readers: {', '.join(names) or 'none'}): connect the card reader"
            )
        chosen = matching[0]
        card = cls(chosen.handle.createConnection(), chosen.name)
        try:
            card._connection.connect()
        except SmartcardException as exc:
            card.close()
            if isinstance(exc, NoCardException):
                raise CardAbsent(
                    f"no card in reader {chosen.name!r}: insert the device's smartcard"
                ) from exc
            raise CardAbsent(f"cannot connect to the card in {chosen.name!r}: {exc}") from exc
        try:
            card.select()
        except PivError:
            card.close()
            raise
        return card

    def close(self) -> None:
        with contextlib.suppress(SmartcardException):  # already gone with the card
            self._connection.disconnect()
        with contextlib.suppress(SmartcardException):  # pcscd already gone
            self._connection.release()

    def __enter__(self) -> PivCard:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def transmit(
        self, ins: int, p1: int, p2: int, data: bytes, *, what: str, le: bool = True
    ) -> bytes:
        """Send one command (chained as needed), collect a chained answer, check the status.

        ``le`` False for commands that return no data (VERIFY, PUT DATA: ISO cases 1 and 3).
        """
        with self._lock, self._transaction(what):
            apdus = command_apdus(ins, p1, p2, data, le=le)
            for apdu in apdus[:-1]:
                _, sw = self._exchange(apdu, what)
                check_status(sw, what)
            answer, sw = self._exchange(apdus[-1], what)
            while sw >> 8 == 0x61:
                more, sw = self._exchange(bytes([0, INS_GET_RESPONSE, 0, 0, sw & 0xFF]), what)
                answer += more
        check_status(sw, what)
        return answer

    @contextlib.contextmanager
    def _transaction(self, what: str) -> Iterator[None]:
        """Hold the card for one command (a PC/SC transaction), so a chained exchange does not
        interleave with another client's: OpenSC, signing a TLS handshake in this process or
        another, shares the card and takes transactions itself (pcscd then makes us wait)."""
        hcard = self._connection.component.hcard  # pyscard's PCSCCardConnection handle
        result = SCardBeginTransaction(hcard)
        if result != SCARD_S_SUCCESS:
            raise CardAbsent(
                f"cannot hold the card in {self.reader!r} to {what} "
                f"({SCardGetErrorMessage(result).strip()}): reinsert it and start again"
            )
        try:
            yield
        finally:
            SCardEndTransaction(hcard, SCARD_LEAVE_CARD)

    def _exchange(self, apdu: bytes, what: str) -> tuple[bytes, int]:
        try:
            data, sw1, sw2 = self._connection.transmit(list(apdu))
        except (CardConnectionException, SmartcardException) as exc:
            raise CardAbsent(
                f"the card in {self.reader!r} went away while trying to {what} ({exc}): "
                "reinsert it and start the operation again"
            ) from exc
        return bytes(data), (sw1 << 8) | sw2

    # -- PIV commands --

    def select(self) -> None:
        self.transmit(0xA4, 0x04, 0x00, PIV_AID, what="select the PIV application")

    def resume(self, pin: str) -> None:
        """SELECT and VERIFY again, before writing after other clients had the card: one of them
        may have selected another application (OpenSC probes several while it connects)."""
        self.select()
        self.verify_pin(pin)

    def verify_pin(self, pin: str) -> None:
        """Unlock the card's keys for this session; :class:`WrongPin` says the tries left."""
        self.transmit(INS_VERIFY, 0x00, PIN_REF, pin_block(pin), what="verify the PIN", le=False)

    def pin_retries(self) -> int:
        """Wrong PINs the card still accepts before blocking (0 if blocked)."""
        try:
            self.transmit(INS_VERIFY, 0x00, PIN_REF, b"", what="read the PIN status", le=False)
        except WrongPin as exc:
            return exc.retries_left
        except PinBlocked:
            return 0
        raise PivError("the PIN is verified in this session; the card does not report tries")

    def generate_key(self) -> ec.EllipticCurvePublicKey:
        """A new P-256 key in slot 9A, made on the card (replaces the slot's key and cert)."""
        answer = self.transmit(
            INS_GENERATE, 0x00, SLOT_9A, generate_command(), what="generate a key in slot 9A"
        )
        return parse_generated(answer)

    def sign_digest(self, digest: bytes) -> bytes:
        """ECDSA over a SHA-256 digest with slot 9A's key: a DER signature."""
        answer = self.transmit(
            INS_AUTHENTICATE, ALG_P256, SLOT_9A, sign_command(digest), what="sign with slot 9A"
        )
        return parse_signature(answer)

    def put_certificate(self, cert: x509.Certificate) -> None:
        """Store slot 9A's certificate on the card (where OpenSC and PKCS#11 find it)."""
        data = object_command(OBJECT_CERT_9A, certificate_container(cert))
        self.transmit(
            INS_PUT_DATA, 0x3F, 0xFF, data, what="store the slot 9A certificate", le=False
        )

    def certificate(self) -> x509.Certificate:
        """Slot 9A's certificate as stored on the card."""
        answer = self.transmit(
            INS_GET_DATA, 0x3F, 0xFF, object_command(OBJECT_CERT_9A), what="read the certificate"
        )
        return parse_certificate_object(answer)

    def attest(self) -> x509.Certificate:
        """The card's attestation certificate for slot 9A's key, signed by its F9 key."""
        answer = self.transmit(INS_ATTEST, SLOT_9A, 0x00, b"", what="attest the slot 9A key")
        try:
            return x509.load_der_x509_certificate(answer)
        except ValueError as exc:
            raise PivError(f"the card's attestation is not a certificate ({exc})") from exc

    def attestation_certificate(self) -> x509.Certificate:
        """The F9 attestation key's certificate, issued by the card manufacturer's CA."""
        answer = self.transmit(
            INS_GET_DATA,
            0x3F,
            0xFF,
            object_command(OBJECT_ATTESTATION_CERT),
            what="read the attestation certificate",
        )
        return parse_certificate_object(answer)


class PivCardKey(ec.EllipticCurvePrivateKey):
    """Slot 9A's key as cryptography sees it: ``sign()`` runs on the card, nothing exports."""

    def __init__(self, card: PivCard, public_key: ec.EllipticCurvePublicKey) -> None:
        if not isinstance(public_key.curve, ec.SECP256R1):
            raise PivError(f"slot 9A holds P-256 keys, not {public_key.curve.name}")
        self._card = card
        self._public_key = public_key

    def sign(
        self,
        data: bytes | bytearray | memoryview,
        signature_algorithm: ec.EllipticCurveSignatureAlgorithm,
    ) -> bytes:
        algorithm = signature_algorithm.algorithm
        if isinstance(algorithm, Prehashed) and algorithm.digest_size == 32:
            digest = bytes(data)
        elif isinstance(algorithm, hashes.SHA256):
            hasher = hashes.Hash(hashes.SHA256())
            hasher.update(bytes(data))
            digest = hasher.finalize()
        else:
            raise PivError(f"the card signs ECDSA with SHA-256 only, not {algorithm!r}")
        return self._card.sign_digest(digest)

    def public_key(self) -> ec.EllipticCurvePublicKey:
        return self._public_key

    @property
    def curve(self) -> ec.EllipticCurve:
        return self._public_key.curve

    @property
    def key_size(self) -> int:
        return self._public_key.key_size

    def exchange(self, algorithm: ec.ECDH, peer_public_key: ec.EllipticCurvePublicKey) -> NoReturn:
        raise PivError("slot 9A's key signs only; it does no key agreement")

    def private_numbers(self) -> NoReturn:
        raise PivError("the card key cannot be exported: it never leaves the card")

    def private_bytes(
        self,
        encoding: serialization.Encoding,
        format: serialization.PrivateFormat,
        encryption_algorithm: serialization.KeySerializationEncryption,
    ) -> NoReturn:
        raise PivError("the card key cannot be exported: it never leaves the card")

    def __copy__(self) -> PivCardKey:
        return self

    def __deepcopy__(self, memo: dict[int, object]) -> PivCardKey:
        return self
