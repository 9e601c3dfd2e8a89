"""Per-device limits (issue 11): what one device may hold in and demand of the broker.

A stolen device keeps a valid certificate until it is revoked; until then nothing it sends may
grow the broker's memory, its registry or its CPU without bound. Pure logic, time passed in:
the settings (:class:`DeviceLimits`, per group, from ``[broker.limits]``), token buckets for the
publish and connect rates, the checks :mod:`broker.connection` and :mod:`broker.core` ask, and
the audit throttle and text bound that keep a flood of refusals from flooding the audit table.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from dataclasses import dataclass

from fleetgate.config import OVERFLOW_POLICIES, DeviceLimits, LimitSettings

__all__ = [
    "AUDIT_TEXT_CHARS",
    "BACKPRESSURE",
    "DROP_NEW",
    "DROP_OLDEST",
    "OVERFLOW_POLICIES",
    "PACE_S",
    "AuditThrottle",
    "DeviceLimits",
    "Limit",
    "LimitSettings",
    "RateLimiter",
    "TokenBucket",
    "audit_text",
    "granted_receive_maximum",
    "retained_excess",
    "topic_excess",
]

BACKPRESSURE, DROP_NEW, DROP_OLDEST = OVERFLOW_POLICIES
"""What a session's full queue does with one more QoS 1/2 message (``overflow_policy``)."""

AUDIT_TEXT_CHARS = 256
"""How much of a topic, filter or refusal message an audit row keeps."""


class Limit:
    """The ``limit`` label of ``limit_refusals_total``: one per limit, a closed set."""

    SUBSCRIPTIONS = "subscriptions"
    TOPIC_BYTES = "topic_bytes"
    TOPIC_LEVELS = "topic_levels"
    RETAINED_MESSAGES = "retained_messages"
    RETAINED_BYTES = "retained_bytes"
    QUEUED_MESSAGES = "queued_messages"
    QUEUED_BYTES = "queued_bytes"
    PUBLISH_RATE = "publish_rate"
    CONNECT_RATE = "connect_rate"


def audit_text(text: str, limit: int = AUDIT_TEXT_CHARS) -> str:
    """``text`` as an audit row keeps it: whole up to ``limit`` characters, else its start, its
    length and its SHA-256 (enough to tell two long filters apart, or find a known one), so a
    refused 64 KiB filter costs the audit table ~350 bytes, not 64 KiB."""
    if len(text) <= limit:
        return text
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{text[:limit]}… ({len(text)} characters, sha256 {digest})"


def topic_excess(topic: str, limits: DeviceLimits) -> str | None:
    """Which of the group's topic limits ``topic`` (a name or filter) breaks, or ``None``.

    Counting UTF-8 bytes means encoding; a topic of at most a quarter of the limit in
    characters cannot exceed it (four bytes per character at most), so the common short topic
    is not encoded."""
    if len(topic) * 4 > limits.max_topic_bytes and len(topic.encode()) > limits.max_topic_bytes:
        return Limit.TOPIC_BYTES
    if topic.count("/") >= limits.max_topic_levels:
        return Limit.TOPIC_LEVELS
    return None


def retained_excess(
    held: tuple[int, int], replaced: int | None, size: int, limits: DeviceLimits
) -> str | None:
    """Which retained limit storing one more message of ``size`` bytes breaks, or ``None``.

    ``held`` is what the device's retained messages count and weigh now; ``replaced`` is the
    size of its own message this one replaces (``None`` if none): a replacement does not add
    to the count.
    """
    count, total = held
    if replaced is not None:
        count, total = count - 1, total - replaced
    if count + 1 > limits.max_retained_messages:
        return Limit.RETAINED_MESSAGES
    if total + size > limits.max_retained_bytes:
        return Limit.RETAINED_BYTES
    return None


def granted_receive_maximum(limits: DeviceLimits, ceiling: int) -> int:
    """The Receive Maximum a device of this group is granted: its group's ``receive_maximum``,
    at most the broker's ``[broker] receive_maximum`` (``ceiling``).

    Why it is small (20): a publisher faster than the subscribers of its topics keeps this many
    QoS 1/2 PUBLISHes between itself and the broker whatever the broker's queues do, so with P
    such publishers P x Receive Maximum messages wait ahead of each new one (Little's law: 50
    publishers x 64 made 67 ms of latency at 48,000 messages/s before any queue, 50 x 20 make
    21 ms). 20 is what a device needs: paho's and the SDK's own window (``device_sdk``'s
    ``_WINDOW``), so they never exceed it, and 20 messages per round trip is 200/s over a
    100 ms link, far above a sensor's rate; a group of faster publishers over slow links gets
    more in ``[broker.limits.groups.<group>]``.

    What happens beyond it (:class:`broker.connection.Connection`): an MQTT 5 client is told the
    grant in CONNACK and one that sends more than it while the broker holds its
    acknowledgements (a full queue's backpressure, or QoS 2 before PUBREL) gets DISCONNECT 0x93;
    MQTT 3.1.1 has no Receive Maximum, so a held 3.1.1 client is not read once this many of its
    PUBLISHes wait. Acknowledgements a bridge holds until its queue has the message on disk do
    not count: the bridge's queue bounds those (PUBACK 0x97 when full), and paho, which ignores
    the grant, keeps working through a bridge.
    """
    return min(limits.receive_maximum, ceiling)


PACE_S = 0.005
"""A caller kept waiting by a :class:`TokenBucket` waits for this long's worth of tokens (at
least one, at most the burst), not for the next single token: a device publishing at its
``publish_rate`` is then read 200 times a second in slices, not once per message, each pause
and resume of its transport a timer and two ``epoll_ctl`` calls. The price is at most this
much extra wait for the first message of a slice; the rate is the same."""


class TokenBucket:
    """``rate`` tokens a second, at most ``burst`` saved up; starts full."""

    __slots__ = ("burst", "quantum", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate = rate
        self.burst = burst
        self.tokens = float(burst)
        self.stamp = now
        self.quantum = max(1.0, min(float(burst), rate * PACE_S))

    def take(self, now: float) -> float:
        """Take one token: 0.0 if there was one, else the seconds until there will be
        :data:`PACE_S`'s worth (one, at a low rate; nothing is taken)."""
        tokens = self.tokens
        if now != self.stamp:  # packets of one read share a time: refilled once for them all
            tokens += (now - self.stamp) * self.rate
            if tokens > self.burst:
                tokens = self.burst
            self.stamp = now
        if tokens >= 1.0:
            self.tokens = tokens - 1.0
            return 0.0
        self.tokens = tokens
        return (self.quantum - tokens) / self.rate


class RateLimiter:
    """One :class:`TokenBucket` per key (a device id) for the most recent ``capacity`` keys.

    Memory stays bounded whatever the number of ids; a key pushed out starts again with a full
    bucket, which needs ``capacity`` other ids, each with its own valid certificate, in between.
    """

    def __init__(self, rate: float, burst: float, *, capacity: int = 10_000) -> None:
        self.rate = rate
        self.burst = burst
        self.capacity = capacity
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> float:
        """:meth:`TokenBucket.take` on ``key``'s bucket."""
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.rate, self.burst, now)
            if len(self._buckets) > self.capacity:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)

    def __len__(self) -> int:
        return len(self._buckets)


@dataclass(slots=True)
class _Window:
    opened: float
    suppressed: int = 0


class AuditThrottle:
    """At most one audit row per (client, kind of refusal) per ``interval`` seconds.

    A device repeating a refused request gets one row, then silence for the interval; the next
    row after it says how many were left out. The refusals themselves are all counted on
    ``/metrics``. Memory is bounded to ``capacity`` keys (least recently refused dropped first,
    with whatever count they held).
    """

    def __init__(self, *, interval: float = 60.0, capacity: int = 10_000) -> None:
        self.interval = interval
        self.capacity = capacity
        self._windows: OrderedDict[tuple[str, str], _Window] = OrderedDict()

    def record(self, client: str, kind: str, now: float) -> int | None:
        """``None``: leave this refusal out of the audit. Otherwise write it, noting the returned
        number of refusals of this kind left out since the previous row."""
        key = (client, kind)
        window = self._windows.get(key)
        if window is not None:
            self._windows.move_to_end(key)
            if now - window.opened < self.interval:
                window.suppressed += 1
                return None
            suppressed = window.suppressed
            window.opened, window.suppressed = now, 0
            return suppressed
        self._windows[key] = _Window(now)
        if len(self._windows) > self.capacity:
            self._windows.popitem(last=False)
        return 0

    def __len__(self) -> int:
        return len(self._windows)
