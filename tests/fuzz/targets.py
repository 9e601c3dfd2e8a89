"""The fuzz targets: each takes one input's bytes and returns, or raises because of a bug.

A target catches only what its code under test declares as its refusal of bad input (the codec's
:class:`~broker.mqtt.ProtocolError` family, :class:`~fleetgate.errors.CSRRejected`, ...);
any other exception escaping is a crash. Some also check properties beyond "does not crash"
(``AssertionError`` then), e.g. that a packet the decoder accepts re-encodes to the same packet.
Plain Python: pytest replays the corpus through these without atheris (tests/test_fuzz_*.py),
and tests/fuzz/run.py hands them to libFuzzer.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from broker.acl import AclTemplate, DeviceAcl
from broker.admission import Admitted, Identity, Refused, Unidentified
from broker.connection import AdmissionRequest, Connection, State
from broker.core import BrokerCore, CoreSettings, GateVerdict
from broker.metrics import Metrics
from broker.mqtt import (
    NO_PROPERTIES,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Properties,
    ProtocolError,
    ProtocolLevel,
    Publish,
    QoS,
    Subscribe,
    Subscription,
    encode,
    encode_publish,
)
from broker.routing import Message
from enrollment.attestation.messages import (
    PivEnrollRequest,
    TpmChallengeRequest,
    TpmEnrollRequest,
)
from enrollment.csr import check_device_csr, decode_est_body
from enrollment.registry import DeviceState
from fleetgate.config import DeviceLimits, LimitSettings
from fleetgate.errors import AttestationRefused, CSRRejected, MalformedRequest
from fuzz import pki

# -- input layout ----------------------------------------------------------------------------------


def split(data: bytes, count: int) -> list[bytes]:
    """``count`` fields: each but the last behind a two-byte big-endian length (cut short where
    the input ends), the last is the rest. :func:`join` is the inverse, for seeds."""
    fields = []
    for _ in range(count - 1):
        size = int.from_bytes(data[:2], "big")
        fields.append(data[2 : 2 + size])
        data = data[2 + size :]
    fields.append(data)
    return fields


def join(*fields: bytes) -> bytes:
    return b"".join(len(f).to_bytes(2, "big") + f for f in fields[:-1]) + fields[-1]


# -- MQTT codec ------------------------------------------------------------------------------------

_LEVELS = (None, 4, 5)  # server side (learns the level from CONNECT), client 3.1.1, client 5
_CHUNKS = (0, 1, 2, 3, 5, 8, 13, 64)  # 0: everything at once


def _decode_stream(
    level: int | None, stream: bytes, chunk: int
) -> tuple[list[Packet], tuple[type, int] | None, int | None]:
    """Feed ``stream`` in pieces of ``chunk`` bytes: (packets, (error type, reason), level)."""
    decoder = Decoder(level)
    packets: list[Packet] = []
    pieces = [stream[i : i + chunk] for i in range(0, len(stream), chunk)] if chunk else [stream]
    try:
        for piece in pieces:
            decoder.feed(piece)
            while (packet := decoder.next_packet()) is not None:
                packets.append(packet)
    except ProtocolError as exc:
        return packets, (type(exc), exc.reason_code), decoder.protocol_level
    return packets, None, decoder.protocol_level


def _check_round_trip(packet: Packet, level: int) -> None:
    """What the decoder accepted, the encoder accepts (both run the same checks) and it
    decodes back to the same packet; the broker's PUBLISH shortcut gives the same bytes."""
    data = encode(packet, level)
    decoder = Decoder() if isinstance(packet, Connect) else Decoder(level)
    decoder.feed(data)
    again = decoder.next_packet()
    assert again == packet, f"{packet!r} re-decodes as {again!r}"
    assert decoder.next_packet() is None
    if isinstance(packet, Publish):
        shortcut = encode_publish(
            packet.topic,
            packet.payload,
            packet.qos,
            packet.retain,
            packet.packet_id,
            packet.properties,
            ProtocolLevel(level),
            dup=packet.dup,
        )
        assert shortcut == data, f"encode_publish differs from encode for {packet!r}"


def fuzz_codec(data: bytes) -> None:
    """Byte 0: which side decodes and how the stream is cut; the rest: the byte stream.

    The decoder may refuse with its ProtocolError family only; the same stream cut into pieces
    must give the same packets and the same refusal; every packet must round-trip.
    """
    if not data:
        return
    mode, stream = data[0], data[1:]
    level = _LEVELS[mode % 3]
    whole = _decode_stream(level, stream, 0)
    pieces = _decode_stream(level, stream, _CHUNKS[mode >> 2 & 7] or 1)
    assert whole == pieces, f"whole stream: {whole}; in pieces: {pieces}"
    packets, _, known = whole
    for packet in packets:
        assert known is not None
        _check_round_trip(packet, known)


# -- broker connection -----------------------------------------------------------------------------

DEVICE_ID = "fuzz"
_SETTINGS = CoreSettings(
    max_packet_size=256 * 1024,
    max_queued_messages=4,
    receive_maximum=3,
    topic_alias_maximum=4,
    connect_timeout_s=30.0,
)
_ACL = AclTemplate(
    publish=("devices/%d/#", "shared/#"), subscribe=("devices/%d/#", "shared/#")
).for_device(DEVICE_ID)
_WATCHER_ACL = DeviceAcl(publish=("shared/#",), subscribe=("#",))
_LIMITS = LimitSettings(
    groups=(
        (
            "tight",
            DeviceLimits(
                max_subscriptions=2,
                max_topic_bytes=24,
                max_topic_levels=3,
                max_retained_messages=1,
                max_retained_bytes=16,
                max_queued_messages=2,
                max_queued_bytes=64,
                max_inflight=1,
                publish_rate=1.0,
                publish_burst=2,
            ),
        ),
    )
)
"""The fuzzed device's group when byte 1 says so: every per-device limit within reach."""
_STEPS = (0.25, 3.0, 40.0, 700.0)  # seconds between two pieces of the client's stream
_VERDICTS = (GateVerdict.ROUTE, GateVerdict.HOLD, GateVerdict.LOOP, GateVerdict.FULL)


class _Gate:
    """A bridge stand-in: the verdict comes from the payload's first byte, and held messages
    are reported stored (or not) when the harness says so."""

    def __init__(self) -> None:
        self.pending: list[Callable[[bool, float], None]] = []

    def offer(
        self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]
    ) -> GateVerdict:
        verdict = _VERDICTS[message.payload[0] % 4 if message.payload else 0]
        if verdict is GateVerdict.HOLD:
            self.pending.append(on_stored)
        return verdict

    def settle(self, ok: bool, now: float) -> None:
        pending, self.pending = self.pending, []
        for on_stored in pending:
            on_stored(ok, now)


class _Client:
    """The client's end of one Connection: everything the broker writes must decode as MQTT
    of the connection's level, and a PUBLISH, or a DISCONNECT with a reason, must fit the
    client's Maximum Packet Size (MQTT-3.1.2-25, MQTT-3.14.2-3)."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.decoder: Decoder | None = None

    def read(self) -> None:
        data = self.conn.take_output()
        if not data:
            return
        if self.decoder is None:
            self.decoder = Decoder(self.conn.level)
        self.decoder.feed(data)
        limit = self.conn.max_send_size
        while (packet := self.decoder.next_packet()) is not None:
            if limit is None or not (
                isinstance(packet, Publish)
                or (isinstance(packet, Disconnect) and packet.properties != NO_PROPERTIES)
            ):
                continue
            size = len(encode(packet, self.conn.level, validate=False))
            assert size <= limit, f"{size}-byte {packet!r} exceeds the client's limit {limit}"


def _connect(
    core: BrokerCore, identity: Identity, acl: DeviceAcl, setup: tuple[bytes, bytes]
) -> None:
    """A connection made and admitted with ``setup``: a CONNECT's bytes, then more packets'."""
    conn = Connection(core, peer="setup", identity=identity, listener="tls", now=0.0)
    request = conn.receive_data(setup[0], 0.0)
    assert isinstance(request, AdmissionRequest)
    conn.admission_done(Admitted("default", acl), 0.0)
    conn.receive_data(setup[1], 0.0)
    assert conn.state is State.CONNECTED


def _setup(connect: Connect, *packets: Packet) -> tuple[bytes, bytes]:
    return encode(connect, 5), b"".join(encode(p, 5) for p in packets)


_WATCHER = _setup(
    Connect(client_id="watcher", properties=Properties(receive_maximum=2)),
    Subscribe(packet_id=1, subscriptions=(Subscription(topic_filter="#", qos=QoS.EXACTLY_ONCE),)),
)
_EARLIER_SESSION = _setup(
    Connect(
        client_id=DEVICE_ID, clean_start=False, properties=Properties(session_expiry_interval=3600)
    ),
    Subscribe(
        packet_id=1, subscriptions=(Subscription(topic_filter="shared/#", qos=QoS.EXACTLY_ONCE),)
    ),
)


def _broker(control: int) -> tuple[BrokerCore, _Gate]:
    """A core with a watcher subscribed to everything, a retained message and, if ``control``
    says so, a bridge gate and a stored session of the fuzzed device with messages queued."""
    core = BrokerCore(_SETTINGS, metrics=Metrics(), audit=lambda record: None, limits=_LIMITS)
    gate = _Gate()
    if control & 0x10:
        core.gate = gate
    _connect(core, Identity("watcher", 2), _WATCHER_ACL, _WATCHER)
    core.publish(Message("shared/r", b"retained", QoS.AT_LEAST_ONCE, True, NO_PROPERTIES, "x"), 0.0)
    if control & 0x20:  # a session left by an earlier connection, with deliveries waiting
        _connect(core, Identity(DEVICE_ID, 1), _ACL, _EARLIER_SESSION)
        (earlier,) = [c for c in core.connections if c.client_id == DEVICE_ID]
        earlier.connection_lost(0.0)
        for qos in (QoS.AT_LEAST_ONCE, QoS.EXACTLY_ONCE, QoS.AT_LEAST_ONCE):
            core.publish(Message("shared/q", b"queued", qos, False, NO_PROPERTIES, "x"), 0.0)
    return core, gate


_IDENTITIES: tuple[Identity | Unidentified, ...] = (
    Identity(DEVICE_ID, 1),
    Identity(DEVICE_ID, 1),
    Identity(DEVICE_ID, None, client_id_bound=False),
    Unidentified("certificate names no device"),
)


def fuzz_connection(data: bytes) -> None:
    """Bytes 0-1: how the broker around the connection behaves; the rest: the client's bytes.

    Byte 0: identity (bits 0-1), refused admission (bit 2), admission answered only after the
    next piece (bit 3), bridge gate (bit 4), stored session (bit 5), time step (bits 6-7).
    Byte 1: piece size (bits 0-2), how the connection ends (bits 3-4), stored-or-failed for
    held messages (bit 5), a group with tight per-device limits (bit 6). Connection never
    raises; what it writes must be valid MQTT.
    """
    if len(data) < 2:
        return
    control, ending, stream = data[0], data[1], data[2:]
    core, gate = _broker(control)
    watcher = _Client(next(iter(core.connections)))
    watcher.read()
    conn = Connection(core, peer="fuzz", identity=_IDENTITIES[control & 3], listener="tls", now=0.0)
    client = _Client(conn)
    group = "tight" if ending & 0x40 else "default"
    verdict: Admitted | Refused = (
        Refused("refused by the fuzz harness") if control & 4 else Admitted(group, _ACL)
    )
    step = _STEPS[control >> 6]
    chunk = _CHUNKS[ending & 7] or max(len(stream), 1)
    now = 0.0
    waiting = False
    for start in range(0, len(stream), chunk):
        if waiting:
            conn.admission_done(verdict, now)
            waiting = False
        now += step
        if conn.receive_data(stream[start : start + chunk], now) is not None:
            if control & 8:
                waiting = True
            else:
                conn.admission_done(verdict, now)
        gate.settle(bool(ending & 0x20), now)
        core.tick(now)
        client.read()
        watcher.read()
    _end(core, conn, ending >> 3 & 3, now + step)
    core.tick(now + 10_000.0)
    client.read()
    watcher.read()
    closed = conn.state is State.CLOSED
    assert closed == conn.closing, f"state {conn.state} but closing={conn.closing}"
    assert not closed or conn not in core.connections


def _end(core: BrokerCore, conn: Connection, how: int, now: float) -> None:
    if how == 0:
        conn.connection_lost(now)
    elif how == 1:
        conn.take_over(now)
    elif how == 2:
        core.kick(DEVICE_ID, DeviceState.REVOKED, "revoked by the fuzz harness", now)
    else:
        core.shutdown(now)


# -- enrollment: CSR -------------------------------------------------------------------------------


def fuzz_csr(data: bytes) -> None:
    """Byte 0 (mod 3): an EST body; a DER CSR; a CertificationRequestInfo that the harness signs
    with the device key, so that mutations get past the proof-of-possession check."""
    if not data:
        return
    mode, body = data[0] % 3, data[1:]
    with contextlib.suppress(CSRRejected):
        if mode == 0:
            check_device_csr(decode_est_body(body))
        elif mode == 1:
            check_device_csr(body)
        else:
            check_device_csr(pki.signed(body, pki.DEVICE))


# -- enrollment: attestation -----------------------------------------------------------------------

_MESSAGES: tuple[tuple[Callable[[bytes], Any], tuple[str, ...]], ...] = (
    (TpmChallengeRequest.parse, ("device_id", "ek_certificate", "ek_chain", "ak_public")),
    (
        TpmEnrollRequest.parse,
        (
            "challenge_id",
            "activated_secret",
            "csr",
            "key_public",
            "certify_info",
            "certify_signature",
        ),
    ),
    (PivEnrollRequest.parse, ("csr", "attestation_certificate", "attestation_intermediate")),
)


def _json_fields(names: tuple[str, ...], data: bytes) -> bytes:
    """A JSON object with the message's field names and values made from ``data``: one kind
    byte per field (a string, a list of strings, a number, null), then the values."""
    kinds, *values = split(data, 1 + len(names))
    payload: dict[str, Any] = {}
    for index, (name, value) in enumerate(zip(names, values, strict=True)):
        text = value.decode("latin-1")
        kind = kinds[index] % 4 if index < len(kinds) else 0
        payload[name] = (text, text.split(","), len(value), None)[kind]
    return json.dumps(payload).encode()


def fuzz_messages(data: bytes) -> None:
    """Byte 0: which attested-enrollment message (mod 3) and, if 3 or more (mod 6), that the
    rest makes the fields (:func:`_json_fields`) rather than being the HTTP body itself."""
    if not data:
        return
    parse, names = _MESSAGES[data[0] % 3]
    body = _json_fields(names, data[1:]) if data[0] % 6 >= 3 else data[1:]
    with contextlib.suppress(MalformedRequest):
        parse(body)


def _certify(body: bytes, resign: bool) -> None:
    from enrollment.attestation import tpm
    from fuzz import tpm_objects

    if resign:
        key, info = split(body, 2)
        info = tpm_objects.with_name(info, key)
        ak, signature = tpm_objects.ak_public(), tpm_objects.ak_signature(info)
    else:
        ak, key, info, signature = split(body, 4)
    tpm.verify_certify(
        ak_public=ak,
        nonce=pki.NONCE,
        key_public=key,
        certify_info=info,
        certify_signature=signature,
        csr_key=pki.key(pki.DEVICE).public_key(),
    )


def _challenge(body: bytes) -> None:
    from enrollment.attestation import tpm

    if not body:
        return
    ek, *chain, ak = split(body[1:], 2 + body[0] % 3)
    if body[0] & 0x80:
        ek = pki.signed(ek, pki.TPM_CA)
    tpm.make_challenge(
        ek_certificate=ek, ek_chain=chain, ak_public=ak, anchors=pki.tpm_anchors(), now=pki.NOW
    )


def fuzz_tpm(data: bytes) -> None:
    """Byte 0 (mod 3): which step and how.

    0: verify_certify(ak_public, key_public, certify_info, certify_signature), all from the input;
    1: verify_certify(key_public, certify_info) with the certify statement renamed for that key
       and signed by the fuzz AK: the checks behind the signature and the name;
    2: make_challenge(ek_certificate, ek_chain..., ak_public): byte 1 says how many chain
       certificates (mod 3) and, in bit 7, that the harness signs the EK certificate's
       to-be-signed part by the fuzz TPM maker.
    """
    if not data:
        _challenge(b"")  # imports the verifier (instrumented when run under atheris)
        return
    with contextlib.suppress(AttestationRefused):
        if data[0] % 3 == 2:
            _challenge(data[1:])
        else:
            _certify(data[1:], resign=data[0] % 3 == 1)


def fuzz_piv(data: bytes) -> None:
    """Byte 0 (mod 2): 0, both certificates from the input; 1, their to-be-signed parts signed
    as the card would (attestation by the F9 key, F9 by the card maker)."""
    from enrollment.attestation.piv import verify_piv_attestation

    if not data:
        return
    attestation, intermediate = split(data[1:], 2)
    if data[0] % 2:
        attestation = pki.signed(attestation, pki.CARD_F9)
        intermediate = pki.signed(intermediate, pki.CARD_CA)
    with contextlib.suppress(AttestationRefused):
        verify_piv_attestation(
            attestation_certificate=attestation,
            attestation_intermediate=intermediate,
            anchors=pki.card_anchors(),
            csr_key=pki.key(pki.DEVICE).public_key(),
            now=pki.NOW,
        )


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    runs: int  # this target's share of `make fuzz`
    max_len: int  # the largest input libFuzzer makes


TARGETS = {
    t.name: t
    for t in (
        Target("codec", fuzz_codec, 300_000, 2048),
        Target("connection", fuzz_connection, 200_000, 2048),
        Target("csr", fuzz_csr, 150_000, 2048),
        Target("messages", fuzz_messages, 250_000, 4096),
        Target("tpm", fuzz_tpm, 75_000, 2048),
        Target("piv", fuzz_piv, 75_000, 2048),
    )
}
