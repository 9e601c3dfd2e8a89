"""Groups' ACL templates as the registry stores them, and the check every stored one passes.

A pattern is an MQTT topic filter in which ``%d`` stands for the device id, as a whole level.
The broker binds and enforces templates (``broker.acl``); this module only decides what may be
stored, so a template the broker would refuse never reaches the database, whoever writes it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from enrollment.errors import FleetgateError

DEVICE_PLACEHOLDER = "%d"


class InvalidAcl(FleetgateError):
    """An ACL template an operator typed is not a set of valid topic filters."""

    code = "invalid_acl"


@dataclass(frozen=True)
class AclPatterns:
    """A group's ACL template (raw patterns; the broker interprets them)."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]


def check_patterns(publish: Iterable[str], subscribe: Iterable[str]) -> AclPatterns:
    """The patterns as a template, each read once; malformed filters raise :class:`InvalidAcl`."""
    # Imported here: a module-level import of anything under ``broker`` runs broker/__init__,
    # which imports the broker server and so this package, half-initialised. topics is the
    # sans-I/O MQTT syntax, with no imports of its own.
    from broker.mqtt.topics import InvalidTopic, validate_topic_filter

    patterns = AclPatterns(tuple(publish), tuple(subscribe))
    for pattern in (*patterns.publish, *patterns.subscribe):
        try:
            validate_topic_filter(pattern.replace(DEVICE_PLACEHOLDER, "x"))
        except InvalidTopic as exc:
            raise InvalidAcl(
                f"ACL pattern {pattern!r} is not a valid MQTT topic filter: {exc}"
            ) from exc
        if DEVICE_PLACEHOLDER in pattern and any(
            level != DEVICE_PLACEHOLDER and DEVICE_PLACEHOLDER in level
            for level in pattern.split("/")
        ):
            raise InvalidAcl(f"ACL pattern {pattern!r}: %d must be a whole topic level")
    return patterns
