"""What each bridge reports: live state, counters and the full-queue alarm, as JSON for
``fleetgate bridge status`` and as Prometheus samples for ``/metrics`` (pure; the figures come
from the running broker)."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from broker.metrics import Sample, family_lines


@dataclass
class BridgeCounters:
    """Counters of one bridge since the broker started."""

    forwarded: int = 0  # acknowledged by the upstream
    received: int = 0  # from the upstream, published locally
    duplicates_out: int = 0  # sent upstream again (after a reconnect or restart): may repeat
    duplicates_in: int = 0  # DUP from the upstream, or a device resend of a bridged message
    refused_full: int = 0  # device QoS 1/2 publishes refused: the queue was full
    dropped_qos0_full: int = 0  # device QoS 0 publishes not queued: the queue was full
    loops: int = 0  # messages that came back to this broker (origin marker), not routed again
    inbound_denied: int = 0  # inbound messages outside the bridge's local ACL
    store_errors: int = 0  # device publishes answered with an error: the queue write failed
    connect_failures: int = 0
    dropped_qos0_fabric: int = 0  # fabric mode: QoS 0 bridged publishes not forwarded (link down)


@dataclass
class LinkState:
    """Connected or not, since when (wall clock), and the last reason it was not."""

    connected: bool = False
    since: float = 0.0
    last_error: str = ""

    def up(self, now: float) -> None:
        self.connected, self.since, self.last_error = True, now, ""

    def down(self, reason: str, now: float) -> None:
        if self.connected or not self.since:
            self.since = now
        self.connected = False
        self.last_error = reason


FULL_QUIET_S = 10.0
"""A full-queue episode ends once the queue is below 90 % of its bounds and nothing was
refused for this long: a queue that touches its bound again and again while the upstream
catches up (devices resending on reconnect) is one episode, logged once, not once per touch."""


@dataclass
class FullAlarm:
    """One bridge's full-queue alarm: raised by the first refusal of an episode, cleared when
    the episode ends (see ``FULL_QUIET_S``); times are monotonic seconds."""

    raised: bool = False
    refused: int = 0  # in this episode
    first_at: float = 0.0
    last_at: float = 0.0

    def refusal(self, now: float) -> bool:
        """A publish was refused; True if it starts an episode (log it)."""
        self.last_at = now
        self.refused += 1
        if self.raised:
            return False
        self.raised, self.refused, self.first_at = True, 1, now
        return True

    def settle(self, now: float, *, room: bool) -> bool:
        """True if the episode ends now (log it): ``room``, the queue is below 90 %."""
        if not self.raised or not room or now - self.last_at < FULL_QUIET_S:
            return False
        self.raised = False
        return True


@dataclass(frozen=True)
class BridgeStatus:
    """One bridge's figures at one moment."""

    name: str
    upstream: str
    protocol: str
    connected: bool
    since: str | None  # ISO 8601 UTC
    last_error: str
    queue_messages: int
    queue_bytes: int
    queue_full: bool
    oldest_age_s: float | None
    counters: BridgeCounters = field(default_factory=BridgeCounters)
    owner: str | None = None  # fabric mode: the node running the link (the lease holder)

    @property
    def duplicates(self) -> int:
        return self.counters.duplicates_out + self.counters.duplicates_in

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["duplicates"] = self.duplicates
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> BridgeStatus:
        fields = {k: v for k, v in data.items() if k not in ("counters", "duplicates")}
        return cls(**fields, counters=BridgeCounters(**data.get("counters", {})))


def iso(timestamp: float) -> str | None:
    if not timestamp:
        return None
    return dt.datetime.fromtimestamp(timestamp, dt.UTC).isoformat(timespec="seconds")


def render_metrics(statuses: Sequence[BridgeStatus], since: Sequence[float]) -> str:
    """The bridge families of ``/metrics``; ``since`` holds each bridge's state-change time."""
    lines: list[str] = []

    def per_bridge(values: Iterable[Sample]) -> list[tuple[str, Sample]]:
        return [(f'{{bridge="{s.name}"}}', v) for s, v in zip(statuses, values, strict=True)]

    def gauge(name: str, text: str, values: Iterable[Sample]) -> None:
        lines.extend(family_lines(f"bridge_{name}", "gauge", text, per_bridge(values)))

    def counter(name: str, text: str, attribute: str) -> None:
        values = (int(getattr(s.counters, attribute)) for s in statuses)
        lines.extend(family_lines(f"bridge_{name}", "counter", text, per_bridge(values)))

    gauge(
        "connected",
        "1 while the bridge's upstream connection is up.",
        (s.connected for s in statuses),
    )
    gauge(
        "state_since_timestamp_seconds",
        "When the bridge last connected or lost its connection.",
        since,
    )
    gauge(
        "queue_messages",
        "Messages queued for the upstream (durable).",
        (s.queue_messages for s in statuses),
    )
    gauge("queue_bytes", "Bytes queued for the upstream.", (s.queue_bytes for s in statuses))
    gauge(
        "queue_oldest_age_seconds",
        "Age of the oldest message not yet acknowledged upstream (0 when empty).",
        (0 if s.oldest_age_s is None else s.oldest_age_s for s in statuses),
    )
    gauge(
        "queue_full",
        "ALARM: 1 from a refused bridged publish (queue full) until the queue has room and "
        f"nothing was refused for {FULL_QUIET_S:g} s.",
        (s.queue_full for s in statuses),
    )
    counter("forwarded_total", "Messages acknowledged by the upstream.", "forwarded")
    counter("received_total", "Messages from the upstream published locally.", "received")
    counter(
        "duplicates_out_total",
        "Messages sent upstream again (possible duplicates).",
        "duplicates_out",
    )
    counter("duplicates_in_total", "Possible duplicates received (DUP set).", "duplicates_in")
    counter(
        "refused_queue_full_total",
        "Bridged QoS 1/2 publishes refused (queue full).",
        "refused_full",
    )
    counter(
        "dropped_qos0_queue_full_total",
        "Bridged QoS 0 publishes dropped (queue full).",
        "dropped_qos0_full",
    )
    counter(
        "dropped_qos0_fabric_total",
        "Fabric mode: bridged QoS 0 publishes not forwarded (link down or full).",
        "dropped_qos0_fabric",
    )
    counter("loops_dropped_total", "Messages that came back to this broker, not routed.", "loops")
    counter(
        "inbound_denied_total", "Inbound messages outside the bridge's local ACL.", "inbound_denied"
    )
    counter(
        "store_errors_total",
        "Bridged publishes answered with an error: queue write failed.",
        "store_errors",
    )
    counter(
        "connect_failures_total", "Failed connection attempts to the upstream.", "connect_failures"
    )
    return "\n".join(lines) + "\n" if lines else ""


def render_table(statuses: Sequence[BridgeStatus]) -> list[str]:
    """Human-readable lines, one block per bridge."""
    if not statuses:
        return ["no bridges configured"]
    out: list[str] = []
    for s in statuses:
        state = "connected" if s.connected else "DISCONNECTED"
        age = "-" if s.oldest_age_s is None else f"{s.oldest_age_s:.1f} s"
        c = s.counters
        owner = "" if s.owner is None else f"  owner {s.owner or '-'}"
        out += [
            f"{s.name}  {state} since {s.since or '-'}  ({s.protocol} to {s.upstream}){owner}",
            f"  queue      {s.queue_messages} messages, {s.queue_bytes} bytes, oldest {age}"
            + ("  FULL: bridged publishes refused" if s.queue_full else ""),
            f"  forwarded  {c.forwarded}   received {c.received}   duplicates {s.duplicates}"
            f" (out {c.duplicates_out}, in {c.duplicates_in})",
            f"  refused    {c.refused_full} (queue full), {c.inbound_denied} inbound by ACL;"
            f" loops dropped {c.loops}",
        ]
        if s.last_error:
            out.append(f"  last error {s.last_error}")
    return out
