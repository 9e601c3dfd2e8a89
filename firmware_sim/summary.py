"""A scenario run as JSON (for scripts and CI) and as text (for a person at a terminal)."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

from firmware_sim.engine import RunResult
from firmware_sim.observations import (
    ACKED,
    CONNECTS,
    DELIVERED,
    INVARIANTS,
    RESENT,
    RESUMED,
    SENT,
    Observations,
    lost_by_topic,
)
from firmware_sim.report import percentile


def _ms(samples: list[float]) -> dict[str, float | None]:
    def at(fraction: float) -> float | None:
        value = percentile(samples, fraction)
        return None if value is None else round(value, 2)

    return {"p50": at(0.5), "p90": at(0.9), "p99": at(0.99), "max": at(1.0)}


def by_key_store(result: RunResult, lost_topics: Counter[str]) -> dict[str, dict[str, Any]]:
    """Per key store (file, tpm, smartcard) in the scenario: its groups, what stood in for
    the hardware, and how many devices enrolled and connected, and their messages
    (``lost_topics``: :func:`lost_by_topic` of the checked subscribers)."""
    obs = result.obs
    delivered, lost = _per_device_key_store(obs, result.checked_subscribers, lost_topics)
    stores: dict[str, dict[str, Any]] = {}
    for group in result.scenario.groups:
        kind = str(group.key_store)
        counts = obs.by_key_store[kind]
        entry = stores.setdefault(
            kind,
            {
                "groups": [],
                "hardware": result.hardware.get(kind, ""),
                "devices": 0,
                **{what: counts[what] for what in KEY_STORE_COUNTS},
                "delivered": delivered[kind],
                "lost": lost[kind],
                "enroll_ms": _ms(obs.key_store_ms[f"{kind} enroll"]),
                "connect_ms": _ms(obs.key_store_ms[f"{kind} connect"]),
            },
        )
        entry["groups"].append(group.name)
        entry["devices"] += group.devices
    return stores


KEY_STORE_COUNTS = ("enrolled", "connected", "connects", "sent", "acknowledged")


def _per_device_key_store(
    obs: Observations, checked: tuple[str, ...], lost_topics: Counter[str]
) -> tuple[Counter[str], Counter[str]]:
    """Deliveries to the checked subscribers, and acknowledged messages they lack, by the
    publishing device's key store (hardware devices are few and listed; the rest are file)."""

    def key_store(topic: str) -> str:
        parts = topic.split("/")
        return obs.hardware.get(parts[1], "file") if len(parts) > 2 else "file"

    delivered: Counter[str] = Counter()
    for (subscriber, topic), seqs in obs.arrivals.items():
        if subscriber in checked:
            delivered[key_store(topic)] += len(seqs)
    lost: Counter[str] = Counter()
    for topic, count in lost_topics.items():
        lost[key_store(topic)] += count
    return delivered, lost


def summary(result: RunResult) -> dict[str, Any]:
    obs = result.obs
    scenario = result.scenario
    latency = [x for samples in obs.latency_ms.values() for x in samples]
    broken = {v.invariant: v for v in result.violations}
    acked = obs.total(ACKED)
    delivered_unique = sum(len(set(seqs)) for seqs in obs.arrivals.values())
    lost_topics = lost_by_topic(obs, result.checked_subscribers)  # one pass, two uses
    lost = sum(lost_topics.values())
    return {
        "scenario": scenario.name,
        "description": scenario.description,
        "mode": result.mode,
        "duration_s": scenario.duration_s,
        "took_s": round(result.seconds, 1),
        "devices": scenario.devices,
        "enrolled": obs.enrolled,
        "peak_connected": max(obs.connected.values(), default=0),
        "connects": obs.total(CONNECTS),
        "resumed": obs.total(RESUMED),
        "sent": obs.total(SENT),
        "resent": obs.total(RESENT),
        "acknowledged": acked,
        "delivered": obs.total(DELIVERED),
        "delivered_unique": delivered_unique,
        "lost": lost,
        "delivered_ratio": round(1 - lost / acked, 6) if acked else None,
        "checked_subscribers": list(result.checked_subscribers),
        "key_stores": by_key_store(result, lost_topics),
        "latency_ms": {
            "publish_to_deliver": _ms(latency),
            "connect": _ms(obs.connect_ms),
            "enroll": _ms(obs.enroll_ms),
            "revoke_to_kick": _ms(
                [(obs.kicked[d] - at) * 1000 for d, at in obs.revoked_at.items() if d in obs.kicked]
            ),
        },
        "refusals": {reason: sum(c.values()) for reason, c in sorted(obs.refusals.items())},
        "errors": dict(obs.errors.most_common(10)),
        "revoked": len(obs.revoked_at),
        "kicked": len(obs.kicked),
        "renewals": {
            "due": len({r.device_id for r in obs.renewals}),
            "done": len({r.device_id for r in obs.renewals if r.done_at is not None}),
        },
        "faults": [
            {
                "fault": m.label,
                "at_s": round(m.start, 2),
                "until_s": round(m.end, 2),
                "recovery_s": None if m.recovery_s is None else round(m.recovery_s, 1),
                "renewal": m.renewal,
            }
            for m in result.faults
        ],
        "invariants": {
            name: (
                {
                    "held": False,
                    "count": broken[name].count,
                    "examples": list(broken[name].examples),
                }
                if name in broken
                else {"held": True}
            )
            for name in INVARIANTS
        },
        "notes": result.notes,
    }


def to_json(result: RunResult) -> str:
    return json.dumps(summary(result), indent=2)


def to_text(result: RunResult) -> str:
    data = summary(result)
    latency = data["latency_ms"]
    lines = [
        f"scenario     {data['scenario']} ({data['mode']})",
        f"devices      {data['devices']}: {data['enrolled']} enrolled, "
        f"peak {data['peak_connected']} connected, {data['connects']} connects, "
        f"{data['resumed']} sessions resumed on another node",
        f"messages     {data['sent']} sent ({data['resent']} sent again after a reconnect), "
        f"{data['acknowledged']} acknowledged, "
        f"{data['delivered']} delivered to {len(data['checked_subscribers'])} subscriber(s) "
        f"({data['delivered_unique']} unique), {data['lost']} lost",
    ]
    for kind, store in data["key_stores"].items():
        lines.append(
            f"{'key store':12} {kind} ({', '.join(store['groups'])}): {store['devices']} "
            f"devices, {store['enrolled']} enrolled, {store['connected']} connected, "
            f"{store['acknowledged']} acknowledged, {store['delivered']} delivered, "
            f"{store['lost']} lost; connect p50 {store['connect_ms']['p50']} ms"
        )
    for name, label in (("publish_to_deliver", "latency"), ("connect", "connect"),
                        ("enroll", "enroll"), ("revoke_to_kick", "revoke→kick")):  # fmt: skip
        stats = latency[name]
        if stats["p50"] is not None:
            lines.append(
                f"{label:12} p50 {stats['p50']} ms  p90 {stats['p90']} ms  "
                f"p99 {stats['p99']} ms  max {stats['max']} ms"
            )
    if data["refusals"]:
        lines.append("refusals:")
        lines += [f"  {count:6}  {reason}" for reason, count in data["refusals"].items()]
    if data["errors"]:
        lines.append("network errors (not refusals):")
        lines += [f"  {count:6}  {reason}" for reason, count in data["errors"].items()]
    renewals = data["renewals"]
    for fault in data["faults"]:
        if fault["renewal"]:
            outcome = f"{renewals['done']} of {renewals['due']} renewed before expiry at"
            lines.append(f"fault        {fault['fault']} from {fault['at_s']} s: {outcome} "
                         f"{fault['until_s']} s")  # fmt: skip
            continue
        recovery = "not recovered" if fault["recovery_s"] is None else f"{fault['recovery_s']} s"
        lines.append(
            f"fault        {fault['fault']} at {fault['at_s']} s (until {fault['until_s']} s): "
            f"recovery {recovery}"
        )
    lines.append("invariants:")
    for name, verdict in data["invariants"].items():
        if verdict["held"]:
            lines.append(f"  ok      {name}")
        else:
            lines.append(f"  BROKEN  {name}: {verdict['count']}")
            lines += [f"            {example}" for example in verdict["examples"]]
    lines += [f"note         {note}" for note in data["notes"]]
    lines.append(f"took {data['took_s']} s")
    return "\n".join(lines)


__all__ = ["by_key_store", "summary", "to_json", "to_text"]
