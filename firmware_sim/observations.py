"""What a run saw, second by second and message by message, and the invariants it must keep.

Pure: the runner (and each of its worker processes) records into an :class:`Observations`;
workers' records are merged; :func:`check_invariants` turns the merged record into
:class:`Violation` s and :func:`recovery_times` measures how long each fault set the fleet back.
Times are seconds since the run's start on the system's monotonic clock, which every process
on the machine shares, so a publisher in one process and a subscriber in another agree.
"""

from __future__ import annotations

from array import array
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from fleetgate.topics import topic_matches

# Counters kept per second (see Observations.count).
SENT = "sent"
ACKED = "acknowledged"
DELIVERED = "delivered"
CONNECTS = "connects"
DISCONNECTS = "disconnects"
RESENT = "resent"  # unacknowledged QoS 1/2 messages sent again after a reconnect
RESUMED = "resumed"  # sessions found present on another broker node than before


@dataclass
class Renewal:
    device_id: str
    not_after: float  # run seconds at which the certificate it renewed expired
    done_at: float | None = None  # run seconds at which the new certificate arrived
    error: str = ""


@dataclass(frozen=True)
class FaultMark:
    """A fault on the timelines: when it began, when its cause ended, when the fleet recovered."""

    label: str
    start: float
    end: float
    recovery_s: float | None = None
    renewal: bool = False  # a renewal wave: its end is the certificates' expiry


@dataclass(frozen=True)
class Violation:
    invariant: str
    count: int
    examples: tuple[str, ...]

    def line(self) -> str:
        shown = "; ".join(self.examples)
        return f"{self.invariant}: {self.count} ({shown})"


@dataclass
class Observations:
    """Everything the invariants and the report need; mergeable across processes."""

    # per second: counter name -> values; connected is a gauge sampled once a second
    counts: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    connected: Counter[int] = field(default_factory=Counter)
    refusals: defaultdict[str, Counter[int]] = field(default_factory=lambda: defaultdict(Counter))
    errors: Counter[str] = field(default_factory=Counter)  # network errors, not refusals
    latency_ms: defaultdict[int, list[float]] = field(default_factory=lambda: defaultdict(list))
    connect_ms: list[float] = field(default_factory=list)
    enroll_ms: list[float] = field(default_factory=list)
    # message accounting: topic -> acknowledged seqs; (subscriber, topic) -> seqs as they came
    acked: dict[str, array[int]] = field(default_factory=dict)
    acked_sent: dict[str, array[float]] = field(default_factory=dict)  # when each was sent
    arrivals: dict[tuple[str, str], array[int]] = field(default_factory=dict)
    sent_at: dict[tuple[str, str], array[float]] = field(default_factory=dict)
    subscribers: dict[str, tuple[str, ...]] = field(default_factory=dict)  # id -> filters
    subscribed_at: dict[str, float] = field(default_factory=dict)  # checked subscribers
    # checked subscriber -> [(from, to)]: its subscription died with the broker's memory and
    # was not made again yet; what was published meanwhile was due to no one
    unsubscribed: dict[str, list[tuple[float, float]]] = field(default_factory=dict)
    # (device or kind, what it did, the answer) for misbehaviour; expected answers alongside
    answers: list[tuple[str, str, str, tuple[str, ...]]] = field(default_factory=list)
    kicked: dict[str, float] = field(default_factory=dict)  # revoked device -> kick time
    revoked_at: dict[str, float] = field(default_factory=dict)
    renewals: list[Renewal] = field(default_factory=list)
    enrolled: int = 0
    refusal_total: int = 0
    # per key store (file, tpm, smartcard): enrolled, connected (devices), connects, sent,
    # acknowledged; and enroll/connect latencies ("tpm enroll" -> ms)
    by_key_store: defaultdict[str, Counter[str]] = field(
        default_factory=lambda: defaultdict(Counter)
    )
    key_store_ms: defaultdict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    hardware: dict[str, str] = field(default_factory=dict)  # hardware device id -> key store

    def count(self, name: str, t: float, n: int = 1) -> None:
        self.counts[name][int(t)] += n

    def refused(self, reason: str, t: float) -> None:
        self.refusals[reason][int(t)] += 1
        self.refusal_total += 1

    def acknowledged(self, topic: str, seq: int, t: float, *, sent: float) -> None:
        self.counts[ACKED][int(t)] += 1
        _append(self.acked, self.acked_sent, topic, seq, sent)

    def delivered(self, subscriber: str, topic: str, seq: int, sent: float, t: float) -> None:
        self.counts[DELIVERED][int(t)] += 1
        _append(self.arrivals, self.sent_at, (subscriber, topic), seq, sent)
        self.latency_ms[int(t)].append((t - sent) * 1000)

    def answered(self, who: str, what: str, answer: str, expected: tuple[str, ...]) -> None:
        self.answers.append((who, what, answer, expected))

    def merge(self, other: Observations) -> None:
        for name, per_s in other.counts.items():
            self.counts[name].update(per_s)
        self.connected.update(other.connected)
        for reason, per_s in other.refusals.items():
            self.refusals[reason].update(per_s)
        self.errors.update(other.errors)
        for second, samples in other.latency_ms.items():
            self.latency_ms[second].extend(samples)
        self.connect_ms += other.connect_ms
        self.enroll_ms += other.enroll_ms
        for topic, seqs in other.acked.items():
            self.acked.setdefault(topic, array("q")).extend(seqs)
            self.acked_sent.setdefault(topic, array("d")).extend(other.acked_sent[topic])
        for key, seqs in other.arrivals.items():
            self.arrivals.setdefault(key, array("q")).extend(seqs)
            self.sent_at.setdefault(key, array("d")).extend(other.sent_at[key])
        self.subscribers.update(other.subscribers)
        self.subscribed_at.update(other.subscribed_at)
        for subscriber, gaps in other.unsubscribed.items():
            self.unsubscribed.setdefault(subscriber, []).extend(gaps)
        self.answers += other.answers
        self.kicked.update(other.kicked)
        self.revoked_at.update(other.revoked_at)
        self.renewals += other.renewals
        self.enrolled += other.enrolled
        self.refusal_total += other.refusal_total
        for key_store, counts in other.by_key_store.items():
            self.by_key_store[key_store].update(counts)
        for name, samples in other.key_store_ms.items():
            self.key_store_ms[name].extend(samples)
        self.hardware.update(other.hardware)

    def total(self, name: str) -> int:
        return sum(self.counts[name].values())

    def seconds(self) -> int:
        """One past the last second anything was recorded in."""
        last = [max(c) for c in (*self.counts.values(), self.connected) if c]
        return max(last, default=0) + 1


def _append(
    seqs: dict[Any, array[int]], times: dict[Any, array[float]], key: Any, seq: int, t: float
) -> None:
    """One (sequence number, send time) pair into two parallel compact arrays under ``key``."""
    found = seqs.get(key)
    if found is None:
        found = seqs[key] = array("q")
        times[key] = array("d")
    found.append(seq)
    times[key].append(t)


# -- the invariants ------------------------------------------------------------------------------

ACKED_DELIVERED = "every acknowledged QoS 1/2 message delivered"
ORDER = "per-topic order"
REVOKED_SILENT = "no message from a revoked device after its kick"
ACL = "no delivery across ACL boundaries"
RENEWED = "every renewal done before expiry"
REASONS = "every refusal carries the expected reason code"
INVARIANTS = (ACKED_DELIVERED, ORDER, REVOKED_SILENT, ACL, RENEWED, REASONS)
KICK_GRACE_S = 2.0


def check_invariants(obs: Observations, *, checked_subscribers: tuple[str, ...]) -> list[Violation]:
    """The broken invariants (an empty list: all held). ``checked_subscribers`` must each
    receive every acknowledged message on the topics their filters match."""
    found = [
        _lost(obs, checked_subscribers),
        _disorder(obs),
        _revoked_speaking(obs),
        _acl_crossings(obs),
        _late_renewals(obs),
        _wrong_answers(obs),
    ]
    return [v for v in found if v is not None]


def lost_messages(obs: Observations, subscribers: tuple[str, ...]) -> int:
    return sum(len(missing) for _, _, missing in _missing(obs, subscribers))


def lost_by_topic(obs: Observations, subscribers: tuple[str, ...]) -> Counter[str]:
    """Acknowledged messages missing at a checked subscriber, per topic."""
    lost: Counter[str] = Counter()
    for _, topic, missing in _missing(obs, subscribers):
        lost[topic] += len(missing)
    return lost


def lost_sent_times(obs: Observations, subscribers: tuple[str, ...]) -> list[float]:
    """When each lost message was sent (run seconds): did the losses cluster at a fault?"""
    return sorted(t for _, _, missing in _missing(obs, subscribers) for _, t in missing)


def _missing(
    obs: Observations, subscribers: tuple[str, ...]
) -> list[tuple[str, str, list[tuple[int, float]]]]:
    """(subscriber, topic, [(seq, sent)]) for each topic with acknowledged messages missing."""
    result = []
    for subscriber in subscribers:
        filters = obs.subscribers.get(subscriber, ())
        since = obs.subscribed_at.get(subscriber, 0.0)
        gaps = obs.unsubscribed.get(subscriber, [])
        for topic, acked in obs.acked.items():
            if not any(topic_matches(f, topic) for f in filters):
                continue
            got = set(obs.arrivals.get((subscriber, topic), ()))
            due = zip(acked, obs.acked_sent[topic], strict=True)
            missing = sorted(
                {(s, t) for s, t in due if t >= since and s not in got and not within(t, gaps)}
            )
            if missing:
                result.append((subscriber, topic, missing))
    return result


def within(t: float, gaps: list[tuple[float, float]]) -> bool:
    """Whether ``t`` falls in one of the ``[from, to)`` intervals."""
    return any(start <= t < end for start, end in gaps)


def _violation(name: str, problems: list[str], count: int | None = None) -> Violation | None:
    if not problems:
        return None
    return Violation(name, len(problems) if count is None else count, tuple(problems[:3]))


def _lost(obs: Observations, subscribers: tuple[str, ...]) -> Violation | None:
    missing = _missing(obs, subscribers)
    problems = [
        f"{sub} lacks {topic} #{seqs[0][0]}"
        + (f" and {len(seqs) - 1} more" if len(seqs) > 1 else "")
        for sub, topic, seqs in missing
    ]
    return _violation(ACKED_DELIVERED, problems, sum(len(s) for _, _, s in missing))


def _disorder(obs: Observations) -> Violation | None:
    """A message that arrives after a later one of its topic, unless it is a duplicate of one
    that already arrived (a QoS 1 redelivery may repeat; it may not reorder)."""
    problems = []
    for (subscriber, topic), seqs in obs.arrivals.items():
        seen: set[int] = set()
        highest = -1
        for seq in seqs:
            if seq < highest and seq not in seen:
                problems.append(f"{subscriber} got {topic} #{seq} after #{highest}")
            seen.add(seq)
            highest = max(highest, seq)
    return _violation(ORDER, problems)


def _revoked_speaking(obs: Observations) -> Violation | None:
    """Nothing a revoked device sent after its kick may arrive; a device never kicked counts
    as kicked ``KICK_GRACE_S`` after its revocation (so a broker that ignores it is caught)."""
    problems = []
    for (subscriber, topic), sent in obs.sent_at.items():
        device = topic.split("/")[1] if topic.startswith("devices/") else ""
        kicked = obs.kicked.get(device)
        if kicked is None and device in obs.revoked_at:
            kicked = obs.revoked_at[device] + KICK_GRACE_S
        if kicked is None:
            continue
        late = [t for t in sent if t > kicked]
        if late:
            problems.append(f"{subscriber} got {len(late)} from {device} sent after its kick")
    return _violation(REVOKED_SILENT, problems)


def _acl_crossings(obs: Observations) -> Violation | None:
    """A device (not a backend subscriber) receiving another device's traffic, or any
    subscriber receiving on a topic none of its filters named."""
    problems = []
    for subscriber, topic in obs.arrivals:
        filters = obs.subscribers.get(subscriber, ())
        own = f"devices/{subscriber}/"
        if (
            topic.startswith("devices/")
            and not topic.startswith(own)
            and filters_are_own(subscriber, filters)
        ):
            problems.append(f"{subscriber} received {topic}")
        elif not any(topic_matches(f, topic) for f in filters):
            problems.append(f"{subscriber} received {topic}, which it never subscribed to")
    return _violation(ACL, problems)


def filters_are_own(device_id: str, filters: tuple[str, ...]) -> bool:
    """True for a device that should only ever hear its own topics (not a backend identity);
    an ACL probe's granted wildcard filter does not make it a backend."""
    return any(f.startswith(f"devices/{device_id}/") for f in filters)


def _late_renewals(obs: Observations) -> Violation | None:
    problems = [
        f"{r.device_id} renewed {r.done_at - r.not_after:.1f} s after expiry"
        if r.done_at is not None
        else f"{r.device_id} never renewed ({r.error or 'no attempt finished'})"
        for r in obs.renewals
        if r.done_at is None or r.done_at > r.not_after
    ]
    return _violation(RENEWED, problems)


def _wrong_answers(obs: Observations) -> Violation | None:
    problems = [
        f"{who} {what}: {answer} (expected {' or '.join(expected) or 'no refusal'})"
        for who, what, answer, expected in obs.answers
        if answer not in expected
    ]
    return _violation(REASONS, problems)


# -- recovery ------------------------------------------------------------------------------------

RECOVERY_WINDOW_S = 10  # seconds before a fault that say what "back" means


def recovery_time(
    obs: Observations,
    start: float,
    end: float,
    *,
    keep: float = 1.0,
    keep_rate: float | None = None,
    window: int = RECOVERY_WINDOW_S,
) -> float | None:
    """Seconds from ``start`` until the fleet is back, for two seconds running, to its
    connected count (times ``keep``, for a fault that removes devices on purpose) and its
    delivered rate (times ``keep_rate``, or ``keep``) of the ``window`` seconds before the
    fault, both within 5 %; ``None`` if it never was before the run ended. Second ``s`` is
    the gauge sampled at ``s`` and the messages delivered in ``[s, s + 1)``.

    The window is long because a subscriber catching up on a backlog delivers above the
    fleet's rate for a second or two: a 3 s window once set the bar at 11,933 msg/s for a
    fleet asked for 10,000 (bench-sim), which it could never be back to."""
    first = int(start)
    before = range(max(0, first - window), first)
    if not before:
        return None
    connected = sum(obs.connected[s] for s in before) / len(before) * keep
    rate = sum(obs.counts[DELIVERED][s] for s in before) / len(before)
    rate *= keep if keep_rate is None else keep_rate

    def back(second: int) -> bool:
        return (
            obs.connected[second] >= connected * 0.95
            and obs.counts[DELIVERED][second] >= rate * 0.95
        )

    for second in range(max(first, int(end)), obs.seconds() - 1):
        if back(second) and back(second + 1):  # and stays back
            return max(0.0, second - start)
    return None


__all__ = [
    "INVARIANTS",
    "RECOVERY_WINDOW_S",
    "FaultMark",
    "Observations",
    "Renewal",
    "Violation",
    "check_invariants",
    "lost_by_topic",
    "lost_messages",
    "lost_sent_times",
    "recovery_time",
    "within",
]
