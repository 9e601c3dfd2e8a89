"""A ``[[bridge]]`` section checked and compiled once, before the broker listens (pure)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from broker.bridge.topics import InvalidBridgeRule, TopicRule, compile_rule
from broker.mqtt import ProtocolLevel
from broker.mqtt.topics import filters_overlap
from enrollment.config import BridgeSettings, Config
from enrollment.errors import ConfigError, InvalidDeviceId
from enrollment.ids import validate_id

_LEVELS = {
    "5": ProtocolLevel.MQTT_5,
    "5.0": ProtocolLevel.MQTT_5,
    "3.1.1": ProtocolLevel.MQTT_3_1_1,
}


@dataclass(frozen=True)
class BridgePlan:
    """One bridge as the broker runs it: its settings, protocol level, paths and rules."""

    settings: BridgeSettings
    level: ProtocolLevel
    keystore: Path
    ca_file: Path | None
    out: tuple[TopicRule, ...]
    inbound: tuple[TopicRule, ...]

    @property
    def name(self) -> str:
        return self.settings.name

    @property
    def server_name(self) -> str:
        return self.settings.server_name or self.settings.host


def plan_bridges(config: Config) -> tuple[BridgePlan, ...]:
    """Every configured bridge, or :class:`ConfigError` naming the first bad setting."""
    return tuple(plan_bridge(config, settings) for settings in config.bridges)


def plan_bridge(config: Config, settings: BridgeSettings) -> BridgePlan:
    where = f"[[bridge]] {settings.name}"
    try:
        validate_id(settings.name)
    except InvalidDeviceId as exc:
        raise ConfigError(
            f"{where}: the name is the bridge's identity in local ACLs (%d) and metrics, so it "
            f"must be a valid id: {exc.message}"
        ) from exc
    level = _LEVELS.get(settings.protocol)
    if level is None:
        raise ConfigError(f'{where}: protocol must be "5" or "3.1.1", not {settings.protocol!r}')
    if not settings.keystore:
        raise ConfigError(
            f"{where}: keystore must name the key store directory holding the bridge's client "
            "certificate (device.crt, device.key, ca.crt)"
        )
    _check_limits(where, settings)
    out = tuple(
        compile_rule(r.local, r.remote, site=settings.site, where=f"{where} out rule {i + 1}")
        for i, r in enumerate(settings.out)
    )
    inbound = tuple(
        compile_rule(r.remote, r.local, site=settings.site, where=f"{where} in rule {i + 1}")
        for i, r in enumerate(settings.inbound)
    )
    if not out and not inbound:
        raise ConfigError(f"{where}: no [[bridge.out]] or [[bridge.in]] rule; nothing would cross")
    if level is ProtocolLevel.MQTT_3_1_1:
        _check_no_echo(where, out, inbound)
    return BridgePlan(
        settings=settings,
        level=level,
        keystore=config.data_path(settings.keystore),
        ca_file=config.data_path(settings.ca_file) if settings.ca_file else None,
        out=out,
        inbound=inbound,
    )


def _check_limits(where: str, s: BridgeSettings) -> None:
    checks = (
        (1 <= s.port <= 0xFFFF, "port must be between 1 and 65535"),
        (s.queue_max_messages > 0 and s.queue_max_bytes > 0, "queue limits must be above 0"),
        (1 <= s.max_inflight <= 0xFFFF, "max_inflight must be between 1 and 65535"),
        (0 <= s.keepalive_s <= 0xFFFF, "keepalive_s must be between 0 and 65535"),
        (0 <= s.session_expiry_s <= 0xFFFFFFFF, "session_expiry_s must fit 32 bits"),
        (0 < s.backoff_initial_s <= s.backoff_max_s, "need 0 < backoff_initial_s <= backoff_max_s"),
        (s.connect_timeout_s > 0, "connect_timeout_s must be above 0"),
    )
    for ok, message in checks:
        if not ok:
            raise ConfigError(f"{where}: {message}")


def _check_no_echo(where: str, out: tuple[TopicRule, ...], inbound: tuple[TopicRule, ...]) -> None:
    """MQTT 3.1.1 has no no-local and no user properties, so the upstream would send the
    bridge's own messages back through an in rule that overlaps an out rule's target."""
    for sent in out:
        for received in inbound:
            if filters_overlap(sent.target, received.source):
                raise InvalidBridgeRule(
                    f"{where}: out rule target {sent.target!r} overlaps in rule {received.source!r}"
                    "; MQTT 3.1.1 cannot suppress the echo (no no-local, no origin marker), so "
                    'use protocol = "5" or disjoint topics'
                )
