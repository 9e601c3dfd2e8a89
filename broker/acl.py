"""Topic ACLs: per-group templates where ``%d`` stands for the device id. Pure, default deny.

Also the one decision on what a live session keeps when its ACL changes (:func:`outgrown`).

A device may PUBLISH to a topic name matched by one of its publish patterns, and SUBSCRIBE to a
filter only if every topic that filter could match is inside one of its subscribe patterns
(filter containment, not mere overlap): ``devices/+/commands/#`` is refused even though it
overlaps ``devices/d1/commands/#``, because it would also deliver other devices' commands.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.limits import audit_text

# What may be stored is decided beside the registry, which refuses what this module would.
from enrollment.registry.acl import DEVICE_PLACEHOLDER as DEVICE_PLACEHOLDER
from enrollment.registry.acl import AclPatterns, check_patterns
from enrollment.registry.acl import InvalidAcl as InvalidAcl
from fleetgate.topics import filter_contains, parse_shared_subscription

RESERVED_PREFIX = "$"
"""Topics starting with ``$`` (``$SYS/...``) belong to the server (MQTT 4.7.2): no template
grants them to a device."""


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
        """A shared subscription (``$share/<group>/<filter>``) is judged by its filter."""
        if (shared := parse_shared_subscription(topic_filter)) is not None:
            topic_filter = shared.topic_filter
        return not topic_filter.startswith(RESERVED_PREFIX) and any(
            filter_contains(pattern, topic_filter) for pattern in self.subscribe
        )


def check_template(publish: Iterable[str], subscribe: Iterable[str]) -> AclTemplate:
    """An :class:`AclTemplate` from operator input; malformed filters raise :class:`InvalidAcl`.

    The check is the registry's (``check_patterns``), so what the registry stores and what the
    broker accepts cannot drift apart; each argument is read once, so generators work too.
    """
    patterns = check_patterns(publish, subscribe)
    return AclTemplate(publish=patterns.publish, subscribe=patterns.subscribe)


def bind_acl(patterns: AclPatterns | None, device_id: str) -> DeviceAcl:
    """A group's stored template (None: it has none, the default applies) bound to a device."""
    template = AclTemplate(patterns.publish, patterns.subscribe) if patterns else None
    return (template or DEFAULT_TEMPLATE).for_device(device_id)


@dataclass(frozen=True)
class Outgrown:
    """What a live session holds that its new ACL does not allow."""

    filters: tuple[str, ...]
    will_topic: str | None

    def describe(self, group: str) -> str:
        """One bounded line for the device (MQTT 5 reason string) and the audit trail."""
        held = [f"subscription {audit_text(f)!r}" for f in self.filters[:3]]
        if len(self.filters) > 3:
            held.append(f"{len(self.filters) - 3} more subscription(s)")
        if self.will_topic is not None:
            held.append(f"will topic {audit_text(self.will_topic)!r}")
        return f"the ACL of group {group} no longer allows {', '.join(held)}"


def outgrown(acl: DeviceAcl, filters: Iterable[str], will_topic: str | None) -> Outgrown | None:
    """What of a live session's subscriptions and will the new ``acl`` refuses; None: nothing,
    the session goes on under ``acl``.

    The one decision on a policy change, whatever its source (``fleetgate acl set``, ``device
    move``): a subscription is judged as a new SUBSCRIBE would be, the will as at CONNECT.
    """
    refused = tuple(f for f in filters if not acl.may_subscribe(f))
    will = will_topic if will_topic is not None and not acl.may_publish(will_topic) else None
    if not refused and will is None:
        return None
    return Outgrown(refused, will)
