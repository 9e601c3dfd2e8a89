"""What a simulated fleet run did, counted, and rendered for a person or a script."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field


def percentile(samples: list[float], fraction: float) -> float | None:
    """Nearest-rank percentile; ``None`` when there are no samples."""
    if not samples:
        return None
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class FleetReport:
    """Counts and latencies of one run; ``refused`` is keyed by "what: reason".

    A hardware run (``key_store`` tpm or smartcard) also counts the revocation and its kick, the
    attested enrollments' times, and each device's key protection and hardware binding as the
    registry recorded them.
    """

    devices: int = 0
    enrolled: int = 0
    connected: int = 0
    sent: int = 0
    acknowledged: int = 0
    delivered: int = 0
    commands_delivered: int = 0
    refused: Counter[str] = field(default_factory=Counter)
    misbehaved: Counter[str] = field(default_factory=Counter)
    connect_ms: list[float] = field(default_factory=list)
    ack_ms: list[float] = field(default_factory=list)
    delivery_ms: list[float] = field(default_factory=list)
    seconds: float = 0.0
    key_store: str = "file"
    hardware: str = ""  # what stood in for the devices' TPMs or cards
    revoked: int = 0
    kicked: int = 0
    enroll_ms: list[float] = field(default_factory=list)
    revoke_kick_ms: list[float] = field(default_factory=list)
    identities: list[dict[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        def ms(samples: list[float], fraction: float) -> float | None:
            value = percentile(samples, fraction)
            return None if value is None else round(value, 2)

        summary: dict[str, object] = {
            "devices": self.devices,
            "enrolled": self.enrolled,
            "connected": self.connected,
            "sent": self.sent,
            "acknowledged": self.acknowledged,
            "delivered": self.delivered,
            "commands_delivered": self.commands_delivered,
            "refused": dict(sorted(self.refused.items())),
            "misbehaving_devices": dict(sorted(self.misbehaved.items())),
            "connect_ms": {"p50": ms(self.connect_ms, 0.5), "p99": ms(self.connect_ms, 0.99)},
            "publish_ack_ms": {"p50": ms(self.ack_ms, 0.5), "p99": ms(self.ack_ms, 0.99)},
            "delivery_ms": {"p50": ms(self.delivery_ms, 0.5), "p99": ms(self.delivery_ms, 0.99)},
            "seconds": round(self.seconds, 2),
        }
        if self.key_store != "file":
            summary |= {
                "key_store": self.key_store,
                "hardware": self.hardware,
                "revoked": self.revoked,
                "kicked": self.kicked,
                "enroll_ms": {"p50": ms(self.enroll_ms, 0.5), "p99": ms(self.enroll_ms, 0.99)},
                "revoke_to_kick_ms": {
                    "p50": ms(self.revoke_kick_ms, 0.5),
                    "p99": ms(self.revoke_kick_ms, 0.99),
                },
                "identities": self.identities,
            }
        return summary

    def to_json(self) -> str:
        return json.dumps(self.summary(), indent=2)

    def to_text(self) -> str:
        data = self.summary()
        lines = [
            f"devices      {self.devices} ({sum(self.misbehaved.values())} misbehaving on purpose)",
            *self._hardware_head(),
            f"enrolled     {self.enrolled}",
            f"connected    {self.connected}",
            f"sent         {self.sent} telemetry messages (QoS 1)",
            f"acknowledged {self.acknowledged}",
            f"delivered    {self.delivered} to the backend subscriber",
            f"commands     {self.commands_delivered} delivered to devices",
        ]
        if self.key_store != "file":
            lines.append(f"revoked      {self.revoked}, kicked by the broker {self.kicked}")
        names = ["connect_ms", "publish_ack_ms", "delivery_ms"]
        if self.key_store != "file":
            names = ["enroll_ms", *names, "revoke_to_kick_ms"]
        for name in names:
            stats = data[name]
            assert isinstance(stats, dict)
            lines.append(f"{name:12} p50 {stats['p50']}  p99 {stats['p99']}")
        lines.append("refused:" if self.refused else "refused      none")
        lines += [f"  {count:5}  {reason}" for reason, count in sorted(self.refused.items())]
        lines += self._identity_lines()
        lines.append(f"took {self.seconds:.1f} s")
        return "\n".join(lines)

    def _hardware_head(self) -> list[str]:
        if self.key_store == "file":
            return []
        return [f"key store    {self.key_store}: {self.hardware}"]

    def _identity_lines(self) -> list[str]:
        """Each device's protection and binding (SHA-256 of the EK's or card F9 key's SPKI)."""
        if not self.identities:
            return []
        lines = ["registry (key protection, hardware binding):"]
        for item in self.identities:
            binding = item["hardware_binding"] or "none"
            lines.append(f"  {item['device_id']}  {item['key_protection']:9}  {binding}")
        return lines
