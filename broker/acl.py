"""Topic ACLs: per-group templates where ``%d`` stands for the device id. Pure, default deny.

A device may PUBLISH to a topic name matched by one of its publish patterns, and SUBSCRIBE to a
filter only if every topic that filter could match is inside one of its subscribe patterns
(filter containment, not mere overlap): ``devices/+/commands/#`` is refused even though it
overlaps ``devices/d1/commands/#``, because it would also deliver other devices' commands.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.mqtt.topics import InvalidTopic, filter_contains, validate_topic_filter
from enrollment.errors import FleetgateError

DEVICE_PLACEHOLDER = "%d"
RESERVED_PREFIX = "$"
"""Topics starting with ``$`` (``$SYS/...``) belong to the server (MQTT 4.7.2): no template
grants them to a device."""


class InvalidAcl(FleetgateError):
    """An ACL template an operator typed is not a set of valid topic filters."""

    code = "invalid_acl"


@dataclass(frozen=True)
class AclTemplate:
    """What a group of devices may do; patterns are MQTT topic filters with ``%d``."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def for_device(self, device_id: str) -> DeviceAcl:
        """Bind the template to one device; ids are validated upstream (no wildcards in them)."""
        return DeviceAcl(
            publish=tuple(p.replace(DEVICE_PLACEHOLDER, device_id) for p in self.publish),
            subscribe=tuple(p.replace(DEVICE_PLACEHOLDER, device_id) for p in self.subscribe),
        )


DEFAULT_TEMPLATE = AclTemplate(publish=("devices/%d/#",), subscribe=("devices/%d/commands/#",))


@dataclass(frozen=True)
class DeviceAcl:
    """A template bound to one device id."""

    publish: tuple[str, ...]
    subscribe: tuple[str, ...]

    def may_publish(self, topic: str) -> bool:
        return not topic.startswith(RESERVED_PREFIX) and any(
            filter_contains(pattern, topic) for pattern in self.publish
        )

    def may_subscribe(self, topic_filter: str) -> bool:
        return not topic_filter.startswith(RESERVED_PREFIX) and any(
            filter_contains(pattern, topic_filter) for pattern in self.subscribe
        )


def check_template(publish: Iterable[str], subscribe: Iterable[str]) -> AclTemplate:
    """An :class:`AclTemplate` from operator input; malformed filters raise :class:`InvalidAcl`."""
    for pattern in (*publish, *subscribe):
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
    return AclTemplate(publish=tuple(publish), subscribe=tuple(subscribe))
