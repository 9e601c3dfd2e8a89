"""``/metrics`` in the Prometheus text format (0.0.4), exact: a counter's every digit, a Unix
time to the microsecond (issue 11: ``bridge_forwarded_total`` read ``1.0924e+06`` while
``/bridges`` said 1092396, and a timestamp gauge was good to ~10,000 s)."""

from __future__ import annotations

import math
import re

import pytest

from broker.bridge.status import BridgeCounters, BridgeStatus, render_metrics
from broker.metrics import Metrics, sample_text

NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABELS = r'\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*",?)*\}'
VALUE = r"[+-]?(?:\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|Inf|NaN)"
SAMPLE = re.compile(rf"^({NAME})({LABELS})? ({VALUE})$")
HELP = re.compile(rf"^# HELP ({NAME}) (.*)$")
TYPE = re.compile(rf"^# TYPE ({NAME}) (counter|gauge|histogram|summary|untyped)$")


def parse(text: str) -> dict[str, list[tuple[str, str]]]:
    """Check ``text`` line by line against the exposition format; the samples by family, their
    values as written. Every family has HELP then TYPE, once, and its samples follow them."""
    assert text.endswith("\n")
    families: dict[str, list[tuple[str, str]]] = {}
    current = None
    for line in text[:-1].split("\n"):
        if match := HELP.match(line):
            assert match[1] not in families, f"family {match[1]} twice"
            current = match[1]
            families[current] = []
        elif match := TYPE.match(line):
            assert match[1] == current, f"TYPE without its HELP: {line}"
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            assert match[1] == current, f"sample outside its family: {line}"
            families[current].append((match[2] or "", match[3]))
    return families


def bridge(name: str, forwarded: int, age: float | None, connected: bool) -> BridgeStatus:
    return BridgeStatus(
        name=name,
        upstream="central.example:8883",
        protocol="5",
        connected=connected,
        since=None,
        last_error="",
        queue_messages=123_456_789,
        queue_bytes=9_876_543_210,
        queue_full=not connected,
        oldest_age_s=age,
        counters=BridgeCounters(forwarded=forwarded, duplicates_out=7),
    )


def test_bridge_figures_are_exact_in_metrics():
    since = [1_765_089_012.345678, 0.0]
    text = render_metrics(
        [bridge("central", 1_092_396, 12.345, True), bridge("backup", 0, None, False)], since
    )
    families = parse(text)
    values = {
        (family, labels): value for family, samples in families.items() for labels, value in samples
    }
    p = "fleetgate_broker_bridge_"
    assert values[(f"{p}forwarded_total", '{bridge="central"}')] == "1092396"
    assert values[(f"{p}queue_bytes", '{bridge="central"}')] == "9876543210"
    assert values[(f"{p}queue_messages", '{bridge="backup"}')] == "123456789"
    assert float(values[(f"{p}state_since_timestamp_seconds", '{bridge="central"}')]) == since[0]
    assert values[(f"{p}queue_oldest_age_seconds", '{bridge="central"}')] == "12.345"
    assert values[(f"{p}queue_oldest_age_seconds", '{bridge="backup"}')] == "0"
    assert values[(f"{p}connected", '{bridge="central"}')] == "1"
    assert values[(f"{p}queue_full", '{bridge="central"}')] == "0"
    assert values[(f"{p}duplicates_out_total", '{bridge="backup"}')] == "7"


def test_broker_metrics_are_valid_exposition_text_with_integers_as_integers():
    metrics = Metrics()
    metrics.messages_received[1] = 12_345_678
    metrics.audit_written = 2**53 + 1  # past a float's integers
    metrics.dropped["queue_full"] = 3
    text = metrics.render(
        connections=1_000_001, sessions=2, queued=0, retained=5, feed_lag_s=0.123456789
    )
    families = parse(text)
    p = "fleetgate_broker_"
    assert families[f"{p}messages_received_total"][1] == ('{qos="1"}', "12345678")
    assert families[f"{p}audit_events_written_total"] == [("", str(2**53 + 1))]
    assert families[f"{p}connections"] == [("", "1000001")]
    assert families[f"{p}revocation_feed_lag_seconds"] == [("", "0.123456789")]


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0, "0"),
        (True, "1"),
        (1_092_396, "1092396"),
        (1_765_089_012.345678, "1765089012.345678"),
        (0.1, "0.1"),
        (2.5e-07, "2.5e-07"),
        (math.inf, "+Inf"),
        (-math.inf, "-Inf"),
        (math.nan, "NaN"),
    ],
)
def test_a_sample_is_written_so_that_it_reads_back_as_the_same_number(value, text):
    assert sample_text(value) == text
    assert re.fullmatch(VALUE, text)
    if not math.isnan(value):
        assert float(text.replace("Inf", "inf")) == value
