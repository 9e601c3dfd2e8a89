"""QoS 1/2 messages from devices stored in JetStream before they are acknowledged (issue 12).

The node publishes each such message to the stream ``FG_MSGS`` (subjects ``$FG.q.<subject>``)
with a reply subject on its own acknowledgement inbox, ``$FG.acks.<node>.<n>``. One wildcard
subscription collects every acknowledgement, so a publish costs no request/response round trip
object in nats-py. The device's PUBACK/PUBREC is held (the ``HOLD`` path of ``PublishGate``)
until the stream's answer names the message stored on the configured replicas.

Without an answer within :attr:`DurableLedger.ack_timeout_s`, or with an error (503: no
stream leader, during a leader election), the same message is sent again with the same
``Nats-Msg-Id``: JetStream stores it once within its duplicate window. The stream's order is
the order subscribers get (sessions read it by sequence), so a resend must not land behind
later messages (MQTT 5 §4.6: one publisher's QoS 1 messages on a topic arrive in order): an
overdue message starts a *hold* (:meth:`DurableLedger.due`). Until the oldest waiting message
is stored, only it is sent again; the others, and new ones, wait behind it, and are sent again
in order once it is (:meth:`DurableLedger.release`). Resent each at its own timeout, the
messages of one tick reached a just-elected leader before those of the tick before, which had
gone out while there was none (measured: 50-59 stored ahead of 40-49). After
:attr:`DurableLedger.give_up_s` the message counts as not stored, and the device gets PUBACK
0x83 (MQTT 5) or a close without acknowledgement (3.1.1, which then resends).

A stall (a leader election: 4-9 s) only holds acknowledgements, within the client's receive
maximum. A fabric that *stays* down is told apart by :class:`Availability`: the NATS link down
for longer than ``link_grace_s`` (nats-py finds another server in milliseconds), or no stored
answer for ``stall_s`` while a message waits. Then new QoS 1/2 messages are refused at once
(0x97 on MQTT 5, a close without acknowledgement on 3.1.1) and the waiting ones given up, until
the stream answers again.

The stream is bounded (``[fabric] stream_max_bytes``, ``stream_max_age_s``) with *discard
new*: once full it refuses new messages rather than dropping the oldest, so nothing a device
was told is stored is lost, and a device with a valid certificate cannot fill the NATS servers'
disks. :class:`StreamRoom` tracks that: the first refusal for the cap
(:func:`refused_as_full`) gives up that message (0x83 or a close, as any JetStream error) and
turns the node's QoS 1/2 refusals on (0x97 at once, audited per client with the core's
throttle), until a probe finds room again. QoS 0 never touches the stream.

Subjects start with ``$``, so MQTT ``#`` and ``+`` subscribers on any node never see them
(MQTT 4.7.2), and device ACLs never grant ``$`` topics.

:class:`DurableLedger` is the bookkeeping, without I/O: ids, what to resend, what to give up.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field

from enrollment.registry import AuditRecord

STREAM = "FG_MSGS"
STREAM_PREFIX = "$FG.q."
ACK_PREFIX = "$FG.acks."
MSG_ID_HEADER = "Nats-Msg-Id"
DUPLICATE_WINDOW_S = 120.0
FULL_ERRORS = frozenset({"maximum bytes exceeded", "maximum messages exceeded"})
"""The descriptions of JetStream's err_code 10077 (store failed) for a stream at its cap."""
ROOM_FRACTION = 0.01
"""How much of the cap must be free before a full stream's node takes QoS 1/2 again (and at
least room for the message it refused): not at the first freed byte, so aging out does not
flip the state (and a message) per message."""


def stored(body: bytes) -> bool:
    """Whether a JetStream publish acknowledgement says stored (``{"stream":…,"seq":…}``,
    perhaps ``"duplicate":true``) rather than an error. One per QoS 1/2 message: the common
    shape is recognised without ``json.loads`` (~6 µs here, a tenth of the node's cost per
    message); anything else is parsed."""
    if body.startswith(b'{"stream":') and b'"seq":' in body and b'"error"' not in body:
        return True
    try:
        answer = json.loads(body)
    except ValueError:
        return False
    return isinstance(answer, dict) and "error" not in answer and "seq" in answer


def refused_as_full(body: bytes) -> bool:
    """Whether a JetStream publish answer refuses the message because the stream is at its
    cap (``{"error":{"code":503,"err_code":10077,"description":"maximum bytes exceeded"}}``;
    measured on nats-server 2.10.27, R1 and R3)."""
    if b'"err_code":10077' not in body:
        return False
    try:
        error = json.loads(body).get("error") or {}
    except (ValueError, AttributeError):
        return False
    return isinstance(error, dict) and error.get("description") in FULL_ERRORS


@dataclass(slots=True)
class Pending:
    """One message waiting for the stream's acknowledgement."""

    subject: str
    payload: bytes
    headers: dict[str, str]
    on_stored: Callable[[bool, float], None]
    first_sent: float
    last_sent: float | None = None

    def stored_size(self) -> int:
        """About the bytes the stream counts for it: subject, NATS headers, payload and the
        file store's record framing (30 bytes; 10 more kept as margin: 1,000-byte payloads
        measured 1,155 bytes each on 2.10.27, this says 1,161)."""
        header = 12 + sum(len(key) + len(value) + 4 for key, value in self.headers.items())
        return len(self.subject) + header + len(self.payload) + 40


@dataclass
class DurableLedger:
    """Messages sent to the stream and not yet acknowledged, by sequence number."""

    node: str
    epoch: str
    ack_timeout_s: float = 1.0
    give_up_s: float = 30.0
    pending: dict[int, Pending] = field(default_factory=dict)
    holding: bool = False  # only the oldest waiting message is sent until it is stored
    _probe: int = 0  # that message, during a hold
    _next: int = 1
    _id_prefix: str = field(init=False, default="")
    _ack_prefix: str = field(init=False, default="")

    def __post_init__(self) -> None:  # per-message strings, built once
        self._id_prefix = f"{self.node}.{self.epoch}."
        self._ack_prefix = f"{ACK_PREFIX}{self.node}."

    @property
    def ack_prefix(self) -> str:
        return self._ack_prefix

    def add(
        self,
        subject: str,
        payload: bytes,
        headers: dict[str, str] | None,
        on_stored: Callable[[bool, float], None],
        now: float,
        extra: dict[str, str] | None = None,
    ) -> int:
        """Register a message; its number names its reply subject and its ``Nats-Msg-Id``.
        ``headers`` (perhaps shared with other messages) is copied, with ``extra`` added."""
        number = self._next
        self._next += 1
        stamped = {**headers, **extra} if headers and extra else dict(headers or extra or {})
        stamped[MSG_ID_HEADER] = f"{self._id_prefix}{number}"
        self.pending[number] = Pending(STREAM_PREFIX + subject, payload, stamped, on_stored, now)
        return number

    def reply_subject(self, number: int) -> str:
        return f"{self._ack_prefix}{number}"

    def answered(self, reply_subject: str, body: bytes, status: str | None) -> int | None:
        """The message an acknowledgement is for, if it says stored; None otherwise (an error,
        a 503 without a stream leader, or an answer for a message no longer pending)."""
        number = self.number(reply_subject)
        if number not in self.pending or status is not None:
            return None
        return number if stored(body) else None

    def number(self, reply_subject: str) -> int | None:
        """The message number a reply subject names (pending or not)."""
        try:
            return int(reply_subject.rsplit(".", 1)[1])
        except (IndexError, ValueError):
            return None

    def due(self, now: float) -> tuple[list[int], list[int]]:
        """(to send again, to give up on): unanswered for ``give_up_s`` since the first send
        is given up. One unanswered for ``ack_timeout_s`` since its last send starts a hold
        (or one goes on): then only the oldest message that waits is sent again, when it is
        overdue or was never sent, and the others wait behind it, unsent (``last_sent`` None)
        until :meth:`release`."""
        resend, failed = [], []
        for number, item in self.pending.items():
            if now - item.first_sent >= self.give_up_s:
                failed.append(number)
            elif item.last_sent is not None and now - item.last_sent >= self.ack_timeout_s:
                resend.append(number)
        if not resend and not self.holding:
            return resend, failed
        gone = set(failed)
        waiting = [number for number in self.pending if number not in gone]
        self.holding = bool(waiting)
        if not waiting:
            return [], failed
        self._probe = waiting[0]
        for number in waiting[1:]:
            self.pending[number].last_sent = None  # held: neither overdue nor sent again
        oldest = self.pending[self._probe]
        if oldest.last_sent is None or now - oldest.last_sent >= self.ack_timeout_s:
            return waiting[:1], failed
        return [], failed

    def release(self) -> list[int]:
        """After a stored answer (or a give-up) during a hold: if the oldest waiting message
        is no longer waiting, the hold ends and every message still waiting is to be sent
        again, oldest first (the same ``Nats-Msg-Id``: the stream stores each once); else
        nothing."""
        if self._probe in self.pending:
            return []  # the oldest is still out: the answer was a later message's
        self.holding = False
        return list(self.pending)

    def oldest(self) -> float | None:
        """When the longest-waiting message was first sent, if any waits."""
        return min((item.first_sent for item in self.pending.values()), default=None)


@dataclass
class Availability:
    """Whether the fabric takes QoS 1/2 messages now: the state behind the refusals, its log
    lines and /metrics (no I/O; the node feeds it what it sees)."""

    link_grace_s: float = 2.0
    stall_s: float = 12.0  # above the Raft election's 4-9 s
    down: bool = False
    changes: int = 0
    refused: int = 0
    reason: str = ""
    _link_lost: float | None = None
    _answered: float = 0.0

    def answered(self, now: float) -> bool:
        """The stream answered (a stored message, a probe); True if that ends a down state."""
        self._answered = now
        if not self.down:
            return False
        self.down, self.reason = False, ""
        self.changes += 1
        return True

    def check(self, connected: bool, oldest: float | None, now: float) -> bool:
        """Look at the link and the longest-waiting message; True if that starts a down state."""
        if connected:
            self._link_lost = None
        elif self._link_lost is None:
            self._link_lost = now
        if self.down:
            return False
        if self._link_lost is not None and now - self._link_lost >= self.link_grace_s:
            self.reason = f"the NATS link has been down for {now - self._link_lost:.0f} s"
        elif oldest is not None and now - max(oldest, self._answered) >= self.stall_s:
            self.reason = f"{STREAM} has not answered for {now - max(oldest, self._answered):.0f} s"
        else:
            return False
        self.down = True
        self.changes += 1
        return True


@dataclass
class StreamRoom:
    """Whether ``FG_MSGS`` has room for this node's QoS 1/2 messages (no I/O): full from the
    first refusal for its cap until a probe sees :data:`ROOM_FRACTION` of the cap free."""

    max_bytes: int
    full: bool = False
    changes: int = 0
    refused: int = 0
    wanted: int = 0  # bytes of the largest message refused for the cap while full

    def filled(self, size: int) -> bool:
        """The stream refused a message of about ``size`` bytes for its cap; True if that
        starts a full state."""
        self.wanted = max(self.wanted, size)
        if self.full:
            return False
        self.full = True
        self.changes += 1
        return True

    def measured(self, used: int, cap: int) -> bool:
        """A probe's figures (the stream's bytes and its cap, perhaps raised, or removed:
        -1, by an operator); True if that ends a full state."""
        if not self.full:
            return False
        if cap > 0 and cap - used < max(cap * ROOM_FRACTION, self.wanted):
            return False
        self.full, self.wanted = False, 0
        self.changes += 1
        return True

    def refusal(self, device_id: str | None, topic: str, qos: int) -> AuditRecord:
        """The audit row of one refused message (the core throttles them per client)."""
        return AuditRecord(
            f"device:{device_id}" if device_id else "broker",
            "mqtt.publish",
            "refused",
            device_id,
            f"{STREAM} is full ([fabric] stream_max_bytes = {self.max_bytes}): QoS {qos} "
            f"message on {topic!r} refused (0x97 on MQTT 5, a close on 3.1.1) until it has room",
        )

    def metric_families(self) -> list[tuple[str, str, str, float]]:
        return [
            (
                "fabric_stream_full",
                "gauge",
                "1 while FG_MSGS is at its stream_max_bytes and QoS 1/2 publishes are refused.",
                float(self.full),
            ),
            (
                "fabric_stream_full_changes_total",
                "counter",
                "Times FG_MSGS became full or had room again.",
                self.changes,
            ),
            (
                "fabric_stream_full_refused_total",
                "counter",
                "QoS 1/2 messages refused at once because FG_MSGS was full (0x97 or a close).",
                self.refused,
            ),
        ]
