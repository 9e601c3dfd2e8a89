"""Broker counters, rendered in the Prometheus text exposition format (version 0.0.4).

Plain integers bumped on the hot path; labels are small closed sets (QoS, a reason label), never
free text, so a misbehaving client cannot grow the number of series.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable

from broker.mqtt import QoS

_PREFIX = "fleetgate_broker_"

Sample = int | float
"""A sample's value: counters and counts as ``int`` (booleans as 0/1), times as ``float``."""


def sample_text(value: Sample) -> str:
    """A value exactly as Prometheus reads it back: an integer in all its digits, a float in
    its shortest round-trip form (``repr``), never ``%g``'s six digits (``1.0924e+06`` for a
    counter at 1,092,396, a Unix time to within ~10,000 s); NaN and infinities in the
    exposition format's spelling."""
    if isinstance(value, int):  # bool included
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def family_lines(
    name: str, kind: str, text: str, samples: Iterable[tuple[str, Sample]]
) -> list[str]:
    """One metric family: HELP, TYPE and its samples (``labels`` like ``{bridge="x"}``)."""
    lines = [f"# HELP {_PREFIX}{name} {text}", f"# TYPE {_PREFIX}{name} {kind}"]
    lines.extend(f"{_PREFIX}{name}{labels} {sample_text(value)}" for labels, value in samples)
    return lines


class Metrics:
    """Everything ``/metrics`` reports; gauges that the core already knows are read at scrape."""

    def __init__(self) -> None:
        self.connections_total: Counter[str] = Counter()  # by listener: "tls" | "plaintext"
        self.handshake_failures: Counter[str] = Counter()  # by reason label
        self.connect_refusals: Counter[str] = Counter()  # by reason label
        self.messages_received: Counter[int] = Counter()  # by QoS
        self.messages_sent: Counter[int] = Counter()  # by QoS
        self.acl_denials: Counter[str] = Counter()  # "publish" | "subscribe" | "will"
        self.kicks: Counter[str] = Counter()  # by device state: "revoked" | "suspended"
        self.dropped: Counter[str] = Counter()  # by reason label
        self.audit_dropped = 0
        self.audit_written = 0
        self.feed_errors = 0
        self.limit_refusals: Counter[str] = Counter()  # by broker.limits.Limit
        self.protocol_refusals: Counter[str] = Counter()  # by reason code name
        self.publish_pauses = 0
        self.audit_suppressed = 0
        self.backpressure_holds = 0  # publishes whose acknowledgement a full queue held
        self.backpressure_timeouts = 0  # full queues that held publishers too long

    def render(
        self, *, connections: int, sessions: int, queued: int, retained: int, feed_lag_s: float
    ) -> str:
        """The exposition text; the arguments are gauges read from the live broker."""
        lines: list[str] = []

        def family(name: str, kind: str, text: str, samples: Iterable[tuple[str, Sample]]) -> None:
            lines.extend(family_lines(name, kind, text, samples))

        def by(label: str, counter: Counter[str] | Counter[int]) -> list[tuple[str, Sample]]:
            return [(f'{{{label}="{key}"}}', value) for key, value in sorted(counter.items())]

        def qos(counter: Counter[int]) -> list[tuple[str, Sample]]:
            return [(f'{{qos="{q}"}}', counter[q]) for q in QoS]

        def gauge(value: Sample) -> list[tuple[str, Sample]]:
            return [("", value)]

        family("connections", "gauge", "Open MQTT connections.", gauge(connections))
        family(
            "connections_total",
            "counter",
            "MQTT connections accepted (CONNACK success), by listener.",
            by("listener", self.connections_total),
        )
        family("sessions", "gauge", "Sessions, connected or persisted.", gauge(sessions))
        family(
            "tls_handshake_failures_total",
            "counter",
            "Refused TLS handshakes, by reason.",
            by("reason", self.handshake_failures),
        )
        family(
            "connect_refusals_total",
            "counter",
            "CONNECTs refused after TLS, by reason.",
            by("reason", self.connect_refusals),
        )
        family(
            "messages_received_total",
            "counter",
            "PUBLISH packets received from clients.",
            qos(self.messages_received),
        )
        family(
            "messages_sent_total",
            "counter",
            "PUBLISH packets sent to clients.",
            qos(self.messages_sent),
        )
        family(
            "acl_denials_total",
            "counter",
            "ACL refusals, by action.",
            by("action", self.acl_denials),
        )
        family(
            "kicks_total", "counter", "Live sessions closed by revocation.", by("state", self.kicks)
        )
        family(
            "messages_dropped_total",
            "counter",
            "Messages not delivered, by reason.",
            by("reason", self.dropped),
        )
        family("messages_queued", "gauge", "QoS 1/2 messages waiting in sessions.", gauge(queued))
        family("retained_messages", "gauge", "Retained messages held.", gauge(retained))
        family(
            "audit_events_written_total",
            "counter",
            "Audit events stored.",
            gauge(self.audit_written),
        )
        family(
            "audit_events_dropped_total",
            "counter",
            "Audit events lost because the audit queue was full.",
            gauge(self.audit_dropped),
        )
        family(
            "revocation_feed_errors_total",
            "counter",
            "Failed polls of the registry's change feed.",
            gauge(self.feed_errors),
        )
        family(
            "revocation_feed_lag_seconds",
            "gauge",
            "Seconds since the change feed was last read successfully.",
            gauge(feed_lag_s),
        )
        return "\n".join(lines) + "\n"

    @staticmethod
    def render_node(name: str) -> str:
        """``node_info{node="..."} 1``: which broker node this scrape's counters (admissions,
        refusals, kicks) are from, to join on when several nodes are scraped."""
        lines = family_lines(
            "node_info",
            "gauge",
            "This broker node's name (the value is always 1).",
            [(f'{{node="{name}"}}', 1)],
        )
        return "\n".join(lines) + "\n"

    @staticmethod
    def render_gc(
        count: dict[int, int], worst_s: dict[int, float], total_s: dict[int, float], refreezes: int
    ) -> str:
        """The garbage collector's pauses, per generation (:mod:`broker.gcpolicy`)."""

        def per(values: dict[int, int] | dict[int, float]) -> list[tuple[str, Sample]]:
            return [(f'{{generation="{g}"}}', values[g]) for g in sorted(values)]

        lines = family_lines(
            "gc_collections_total", "counter", "Garbage collections, by generation.", per(count)
        )
        lines += family_lines(
            "gc_pause_seconds_total",
            "counter",
            "Time the event loop stood still in garbage collections, by generation.",
            per(total_s),
        )
        lines += family_lines(
            "gc_pause_seconds_max",
            "gauge",
            "The longest garbage collection pause since start, by generation.",
            per(worst_s),
        )
        lines += family_lines(
            "gc_refreezes_total",
            "counter",
            "Full collections the GC policy ran to free dead frozen objects.",
            [("", refreezes)],
        )
        return "\n".join(lines) + "\n"

    def render_limits(
        self,
        queue_drops: Iterable[tuple[str, int]],
        queue_holds: Iterable[tuple[str, int]] = (),
        publishers_held: int = 0,
    ) -> str:
        """The per-device limit families; ``queue_drops`` and ``queue_holds`` are (client id,
        messages dropped / publishes held) per session whose queue overflowed: one series per
        such session, so bounded by the sessions; ``publishers_held`` a gauge."""
        lines: list[str] = []
        lines += family_lines(
            "limit_refusals_total",
            "counter",
            "Requests refused (or messages dropped) by a per-device limit, by limit.",
            [(f'{{limit="{k}"}}', v) for k, v in sorted(self.limit_refusals.items())],
        )
        lines += family_lines(
            "protocol_refusals_total",
            "counter",
            "Connections closed for breaking the protocol, by reason code.",
            [(f'{{reason="{k}"}}', v) for k, v in sorted(self.protocol_refusals.items())],
        )
        lines += family_lines(
            "publish_pauses_total",
            "counter",
            "Times a connection was not read for a while because it published too fast.",
            [("", self.publish_pauses)],
        )
        lines += family_lines(
            "audit_refusals_suppressed_total",
            "counter",
            "Refusals left out of the audit (one row per client and kind per minute).",
            [("", self.audit_suppressed)],
        )
        lines += family_lines(
            "session_queue_dropped_total",
            "counter",
            "Messages dropped because a session's queue was full, by client id.",
            _by_client(queue_drops),
        )
        lines += family_lines(
            "session_queue_held_total",
            "counter",
            "Publishes whose acknowledgement a session's full queue held (overflow_policy "
            "backpressure), by the subscriber's client id.",
            _by_client(queue_holds),
        )
        for name, kind, text, value in (
            (
                "backpressure_holds_total",
                "counter",
                "Publishes whose acknowledgement a full queue held, all sessions.",
                self.backpressure_holds,
            ),
            (
                "backpressure_timeouts_total",
                "counter",
                "Full queues that held publishers for max_backpressure_s and then dropped new "
                "messages until they drained.",
                self.backpressure_timeouts,
            ),
            ("publishers_held", "gauge", "Publishing connections held now.", publishers_held),
        ):
            lines += family_lines(name, kind, text, [("", value)])
        return "\n".join(lines) + "\n"


def _by_client(counts: Iterable[tuple[str, int]]) -> list[tuple[str, Sample]]:
    return [(f'{{client_id="{_label(c)}"}}', n) for c, n in sorted(counts)]


def _label(value: str) -> str:
    """A label value escaped as the exposition format asks."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
