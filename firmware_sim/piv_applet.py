"""A PIV-style card applet for tests and the simulator, reached only through real PC/SC.

It is a ``virtualsmartcard`` ``SmartcardOS`` served to pcscd's vpcd reader driver, and implements
the part of NIST SP 800-73-4 (plus YubiKey's attestation extension) that device enrollment needs:

- SELECT the PIV AID; VERIFY the PIN (key reference 80) with a retry counter that survives power
  cycles and restarts (``63Cx`` = x tries left, ``6983`` = blocked);
- GENERATE ASYMMETRIC KEY PAIR, P-256 in slot 9A: the private key is made here and never leaves
  this process; GENERAL AUTHENTICATE (ECDSA over a host-supplied SHA-256 digest, PIN required);
- PUT/GET DATA for the slot 9A certificate container (5FC105), GET DATA for the attestation
  certificate (5FFF01, YubiKey's object);
- ATTEST (INS F9, P1 = 9A, YubiKey's command): a certificate for slot 9A's public key signed by
  the attestation key F9, whose own certificate the card manufacturer's CA issued at manufacture;
- command chaining (CLA bit 0x10) and response chaining (``61xx`` + GET RESPONSE).

GENERATE and PUT DATA need the PIN here; a real PIV card asks for the management key (9B)
instead, which this stand-in does not model. The card state (keys, PIN and counter, data
objects) lives in a JSON file standing in for the card's secure memory.

The card is inserted by connecting to vpcd, the virtual reader driver inside pcscd; stopping
the process is "removing the card", and starting it again is inserting it. (vpcd listens on all
interfaces: ``firmware_sim.vcard`` runs pcscd and the applet in a private network namespace.)

    piv_applet.py manufacture --state S --serial N --ca-cert C --ca-key K [--pin P]
    piv_applet.py serve --state S --port P [--quickack]

The first is the factory's personalisation step: make the attestation key on the card and have
the manufacturer CA certify it. The second runs the card.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID
from virtualsmartcard.VirtualSmartcard import SmartcardOS  # type: ignore[import-not-found]

log = logging.getLogger("fleetgate.piv_applet")

PIV_AID = bytes.fromhex("A000000308")
ATR = bytes.fromhex("3B8880014D696E6950495600")  # T=1; historical bytes "MiniPIV"
PIN_KEY_REF = 0x80
SLOT_AUTHENTICATION = 0x9A
ALG_ECC_P256 = 0x11
TAG_CERT_9A = bytes.fromhex("5FC105")
TAG_CERT_F9 = bytes.fromhex("5FFF01")
DEFAULT_PIN = "123456"
PIN_RETRIES = 3

# Status words (ISO 7816-4 / SP 800-73-4).
SW_OK = 0x9000
SW_WRONG_LENGTH = 0x6700
SW_SECURITY_NOT_SATISFIED = 0x6982
SW_PIN_BLOCKED = 0x6983
SW_CONDITIONS_NOT_SATISFIED = 0x6985
SW_WRONG_DATA = 0x6A80
SW_NOT_FOUND = 0x6A82
SW_INCORRECT_P1P2 = 0x6A86
SW_REFERENCE_NOT_FOUND = 0x6A88
SW_INS_NOT_SUPPORTED = 0x6D00

# vpcd's wire protocol: a 2-byte big-endian length, then a 1-byte control code or an APDU.
VPCD_POWER_OFF, VPCD_POWER_ON, VPCD_RESET, VPCD_ATR = 0, 1, 2, 4


class CardStatus(Exception):
    """Ends a command with a status word other than 9000."""

    def __init__(self, sw: int) -> None:
        super().__init__(f"{sw:04X}")
        self.sw = sw


# -- BER-TLV and APDUs (pure) ------------------------------------------------------------------


def tlv(tag: bytes, value: bytes) -> bytes:
    """One BER-TLV with a definite length (short, 81 or 82 form)."""
    n = len(value)
    if n < 0x80:
        length = bytes([n])
    elif n < 0x100:
        length = b"\x81" + bytes([n])
    else:
        length = b"\x82" + n.to_bytes(2, "big")
    return tag + length + value


def parse_tlv(data: bytes) -> dict[bytes, bytes]:
    """Top-level BER-TLVs by tag; malformed input is the host's fault (``6A80``)."""
    out: dict[bytes, bytes] = {}
    i = 0
    try:
        while i < len(data):
            start = i
            i += 1
            if data[start] & 0x1F == 0x1F:  # multi-byte tag
                while data[i] & 0x80:
                    i += 1
                i += 1
            tag = data[start:i]
            length = data[i]
            i += 1
            if length in (0x81, 0x82):
                width = length - 0x80
                length = int.from_bytes(data[i : i + width], "big")
                i += width
            elif length > 0x82:
                raise CardStatus(SW_WRONG_DATA)
            if i + length > len(data):
                raise CardStatus(SW_WRONG_DATA)
            out[tag] = data[i : i + length]
            i += length
    except IndexError:
        raise CardStatus(SW_WRONG_DATA) from None
    return out


@dataclass(frozen=True)
class Command:
    """A command APDU; ``le`` is None when the host expects no data."""

    cla: int
    ins: int
    p1: int
    p2: int
    data: bytes = b""
    le: int | None = None


def parse_command(apdu: bytes) -> Command:
    """Decode a short or extended command APDU (ISO 7816-4 cases 1-4)."""
    if len(apdu) < 4:
        raise CardStatus(SW_WRONG_LENGTH)
    cla, ins, p1, p2 = apdu[:4]
    body = apdu[4:]
    if not body:
        return Command(cla, ins, p1, p2)
    if len(body) == 1:
        return Command(cla, ins, p1, p2, le=body[0] or 256)
    if body[0] != 0:  # short Lc
        lc = body[0]
        rest = body[1 + lc :]
        if len(body) < 1 + lc or len(rest) > 1:
            raise CardStatus(SW_WRONG_LENGTH)
        return Command(cla, ins, p1, p2, body[1 : 1 + lc], (rest[0] or 256) if rest else None)
    if len(body) == 3:  # extended Le only
        return Command(cla, ins, p1, p2, le=int.from_bytes(body[1:], "big") or 65536)
    lc = int.from_bytes(body[1:3], "big")
    rest = body[3 + lc :]
    if lc == 0 or len(body) < 3 + lc or len(rest) not in (0, 2):
        raise CardStatus(SW_WRONG_LENGTH)
    le = (int.from_bytes(rest, "big") or 65536) if rest else None
    return Command(cla, ins, p1, p2, body[3 : 3 + lc], le)


# -- card state --------------------------------------------------------------------------------


@dataclass
class CardState:
    """What the card remembers across power cycles: its secure memory, as a JSON file."""

    serial: int
    pin: str
    attestation_key: ec.EllipticCurvePrivateKey
    pin_tries_left: int = PIN_RETRIES
    key_9a: ec.EllipticCurvePrivateKey | None = None
    objects: dict[bytes, bytes] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> CardState:
        raw = json.loads(path.read_text())
        return cls(
            serial=raw["serial"],
            pin=raw["pin"],
            attestation_key=_load_key(raw["attestation_key"]),
            pin_tries_left=raw["pin_tries_left"],
            key_9a=_load_key(raw["key_9a"]) if raw["key_9a"] else None,
            objects={bytes.fromhex(k): bytes.fromhex(v) for k, v in raw["objects"].items()},
        )

    def save(self, path: Path) -> None:
        """Replace the file in one step: a crash never leaves a half-written card."""
        raw = {
            "serial": self.serial,
            "pin": self.pin,
            "pin_tries_left": self.pin_tries_left,
            "attestation_key": _key_pem(self.attestation_key),
            "key_9a": _key_pem(self.key_9a) if self.key_9a else None,
            "objects": {k.hex(): v.hex() for k, v in self.objects.items()},
        }
        tmp = path.with_name(path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(raw, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def _load_key(pem: str) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def attestation_name(serial: int, what: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.COMMON_NAME, what),
            x509.NameAttribute(NameOID.SERIAL_NUMBER, str(serial)),
        ]
    )


def manufacture(
    state_path: Path,
    *,
    serial: int,
    pin: str,
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    now: dt.datetime,
) -> x509.Certificate:
    """Personalise a new card: its attestation key F9, certified by the manufacturer CA."""
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(attestation_name(serial, "fleetgate PIV attestation"))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=20 * 365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    state = CardState(serial=serial, pin=pin, attestation_key=key)
    der = cert.public_bytes(serialization.Encoding.DER)
    # SP 800-73-4 certificate container, as YubiKey stores its F9 certificate too
    state.objects[TAG_CERT_F9] = tlv(b"\x70", der) + tlv(b"\x71", b"\x00") + tlv(b"\xfe", b"")
    state.save(state_path)
    return cert


# -- the applet --------------------------------------------------------------------------------


class PivApplet(SmartcardOS):  # type: ignore[misc]
    """The card OS: one PIV application, state in ``state_path``."""

    def __init__(self, state_path: Path) -> None:
        self.state_path = state_path
        self.state = CardState.load(state_path)
        self._reset()

    # SmartcardOS interface (called by the vpcd link)

    def getATR(self) -> bytes:  # SmartcardOS's names
        return ATR

    def powerUp(self) -> None:
        self._reset()

    def powerDown(self) -> None:
        self._reset()

    def reset(self) -> None:
        self._reset()

    def execute(self, msg: bytes) -> bytes:
        """One command APDU in, one response APDU out; never raises (a card answers)."""
        try:
            data = self._execute(parse_command(msg))
        except CardStatus as status:
            return status.sw.to_bytes(2, "big")
        except Exception:
            log.exception("applet error on %s", msg[:4].hex())
            return b"\x6f\x00"
        return data

    def _reset(self) -> None:
        self._selected = False
        self._pin_verified = False
        self._chained = b""
        self._pending = b""

    def _execute(self, cmd: Command) -> bytes:
        if cmd.ins == 0xC0:  # GET RESPONSE
            return self._respond(self._pending, cmd.le)
        if cmd.cla & 0x10:  # command chaining: collect until the last part
            self._chained += cmd.data
            return SW_OK.to_bytes(2, "big")
        data, self._chained = self._chained + cmd.data, b""
        if cmd.ins == 0xA4 and cmd.p1 == 0x04:
            return self._select(data, cmd.le)
        if not self._selected:
            raise CardStatus(SW_CONDITIONS_NOT_SATISFIED)
        handler = {
            0x20: self._verify,
            0x47: self._generate,
            0x87: self._general_authenticate,
            0xDB: self._put_data,
            0xCB: self._get_data,
            0xF9: self._attest,
        }.get(cmd.ins)
        if handler is None:
            raise CardStatus(SW_INS_NOT_SUPPORTED)
        return self._respond(handler(cmd, data), cmd.le)

    def _select(self, aid: bytes, le: int | None) -> bytes:
        if not aid or not PIV_AID.startswith(aid[: len(PIV_AID)]):
            self._selected = False
            raise CardStatus(SW_NOT_FOUND)
        self._selected = True
        apt = tlv(
            b"\x61",
            tlv(b"\x4f", PIV_AID + b"\x00\x00\x10\x00\x01\x00")
            + tlv(b"\x79", tlv(b"\x4f", PIV_AID))
            + tlv(b"\x50", b"fleetgate PIV test applet")
            + tlv(b"\xac", b"\x80\x01\x11\x06\x01\x00"),
        )
        return self._respond(apt, le)

    def _verify(self, cmd: Command, data: bytes) -> bytes:
        if cmd.p2 != PIN_KEY_REF:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        state = self.state
        if state.pin_tries_left == 0:
            raise CardStatus(SW_PIN_BLOCKED)
        if not data:  # status query
            if self._pin_verified:
                return b""
            raise CardStatus(0x63C0 | state.pin_tries_left)
        if data.rstrip(b"\xff") == state.pin.encode():
            self._pin_verified = True
            if state.pin_tries_left != PIN_RETRIES:
                state.pin_tries_left = PIN_RETRIES
                state.save(self.state_path)
            return b""
        self._pin_verified = False
        state.pin_tries_left -= 1
        state.save(self.state_path)  # counted before answering: pulling the card is no retry
        if state.pin_tries_left == 0:
            raise CardStatus(SW_PIN_BLOCKED)
        raise CardStatus(0x63C0 | state.pin_tries_left)

    def _require_pin(self) -> None:
        if self.state.pin_tries_left == 0:
            raise CardStatus(SW_PIN_BLOCKED)
        if not self._pin_verified:
            raise CardStatus(SW_SECURITY_NOT_SATISFIED)

    def _generate(self, cmd: Command, data: bytes) -> bytes:
        template = parse_tlv(parse_tlv(data).get(b"\xac", b""))
        if cmd.p2 != SLOT_AUTHENTICATION:
            raise CardStatus(SW_INCORRECT_P1P2)
        if template.get(b"\x80") != bytes([ALG_ECC_P256]):
            raise CardStatus(SW_WRONG_DATA)
        self._require_pin()
        key = ec.generate_private_key(ec.SECP256R1())
        self.state.key_9a = key
        self.state.objects.pop(TAG_CERT_9A, None)  # the old certificate is for the old key
        self.state.save(self.state_path)
        point = key.public_key().public_bytes(
            serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
        )
        return tlv(b"\x7f\x49", tlv(b"\x86", point))

    def _general_authenticate(self, cmd: Command, data: bytes) -> bytes:
        if cmd.p1 != ALG_ECC_P256 or cmd.p2 != SLOT_AUTHENTICATION:
            raise CardStatus(SW_INCORRECT_P1P2)
        key = self.state.key_9a
        if key is None:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        self._require_pin()
        template = parse_tlv(parse_tlv(data).get(b"\x7c", b""))
        digest = template.get(b"\x81")
        if digest is None or len(digest) != 32:
            raise CardStatus(SW_WRONG_DATA)
        signature = key.sign(digest, ec.ECDSA(utils.Prehashed(hashes.SHA256())))
        return tlv(b"\x7c", tlv(b"\x82", signature))

    def _put_data(self, cmd: Command, data: bytes) -> bytes:
        fields = parse_tlv(data)
        tag, value = fields.get(b"\x5c"), fields.get(b"\x53")
        if tag != TAG_CERT_9A or value is None:  # the attestation certificate is factory-set
            raise CardStatus(SW_WRONG_DATA)
        self._require_pin()
        self.state.objects[tag] = value
        self.state.save(self.state_path)
        return b""

    def _get_data(self, cmd: Command, data: bytes) -> bytes:
        tag = parse_tlv(data).get(b"\x5c")
        if tag is None or tag not in self.state.objects:
            raise CardStatus(SW_NOT_FOUND)
        return tlv(b"\x53", self.state.objects[tag])

    def _attest(self, cmd: Command, data: bytes) -> bytes:
        if cmd.p1 != SLOT_AUTHENTICATION:
            raise CardStatus(SW_INCORRECT_P1P2)
        key = self.state.key_9a
        if key is None:
            raise CardStatus(SW_REFERENCE_NOT_FOUND)
        container = parse_tlv(self.state.objects[TAG_CERT_F9])
        issuer = x509.load_der_x509_certificate(container[b"\x70"])
        cert = (
            x509.CertificateBuilder()
            .subject_name(attestation_name(self.state.serial, "fleetgate PIV attestation 9a"))
            .issuer_name(issuer.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(issuer.not_valid_before_utc)
            .not_valid_after(issuer.not_valid_after_utc)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(self.state.attestation_key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.DER)

    def _respond(self, payload: bytes, le: int | None) -> bytes:
        chunk = 256 if le is None else le
        out, self._pending = payload[:chunk], payload[chunk:]
        if self._pending:
            return out + bytes([0x61, min(len(self._pending), 256) & 0xFF])
        return out + SW_OK.to_bytes(2, "big")


# -- the vpcd link -----------------------------------------------------------------------------


def serve(applet: PivApplet, *, host: str, port: int, quickack: bool, wait: float = 10.0) -> None:
    """Connect to vpcd at ``host:port`` (inserting the card) and answer it until it hangs up.

    vpcd writes the 2-byte length and the APDU in separate segments, so Nagle plus delayed ACK
    costs ~40 ms per APDU; ``quickack`` re-arms TCP_QUICKACK before every read (0.3 ms).
    """
    deadline = time.monotonic() + wait
    while True:  # vpcd listens once pcscd has loaded the reader driver
        try:
            conn = socket.create_connection((host, port), timeout=1.0)
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    conn.settimeout(None)
    conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    print(f"inserted into vpcd at {host}:{port}", flush=True)  # the launcher waits for this
    with conn:
        try:
            _session(applet, conn, quickack)
        except ConnectionError:
            log.info("vpcd hung up")


def _session(applet: PivApplet, conn: socket.socket, quickack: bool) -> None:
    while True:
        (size,) = struct.unpack("!H", _recv_exact(conn, 2, quickack))
        msg = _recv_exact(conn, size, quickack)
        if size == 1:
            if msg[0] == VPCD_ATR:
                conn.sendall(struct.pack("!H", len(ATR)) + ATR)
            elif msg[0] == VPCD_POWER_ON:
                applet.powerUp()
            else:  # power off, reset
                applet.reset()
            continue
        answer = applet.execute(msg)
        conn.sendall(struct.pack("!H", len(answer)) + answer)


def _recv_exact(conn: socket.socket, n: int, quickack: bool) -> bytes:
    buf = b""
    while len(buf) < n:
        if quickack:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
        part = conn.recv(n - len(buf))
        if not part:
            raise ConnectionResetError("vpcd closed the connection")
        buf += part
    return buf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="fleetgate PIV test card applet")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("manufacture", help="personalise a new card (attestation key)")
    make.add_argument("--state", type=Path, required=True)
    make.add_argument("--serial", type=int, required=True)
    make.add_argument("--pin", default=DEFAULT_PIN)
    make.add_argument("--ca-cert", type=Path, required=True)
    make.add_argument("--ca-key", type=Path, required=True)
    run = commands.add_parser("serve", help="insert the card into vpcd's reader and run it")
    run.add_argument("--state", type=Path, required=True)
    run.add_argument("--host", default="127.0.0.1")
    run.add_argument("--port", type=int, required=True)
    run.add_argument("--quickack", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.command == "manufacture":
        ca_key = serialization.load_pem_private_key(args.ca_key.read_bytes(), None)
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
            parser.error(f"{args.ca_key} is not an EC private key")
        cert = manufacture(
            args.state,
            serial=args.serial,
            pin=args.pin,
            ca_cert=x509.load_pem_x509_certificate(args.ca_cert.read_bytes()),
            ca_key=ca_key,
            now=dt.datetime.now(dt.UTC),
        )
        sys.stdout.write(cert.public_bytes(serialization.Encoding.PEM).decode())
        return
    serve(PivApplet(args.state), host=args.host, port=args.port, quickack=args.quickack)


if __name__ == "__main__":
    main()
