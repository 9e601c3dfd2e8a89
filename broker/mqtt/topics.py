"""Topic names and filters (spec section 4.7, shared subscriptions 4.8.2): validation, matching,
containment (ACLs) and overlap (bridge echo paths).

Pure functions on strings, so the broker can use them on configuration and ACLs as well as on
packets. This is the only module that knows the rules of topic levels and wildcards.
"""

from __future__ import annotations

from dataclasses import dataclass

SHARE_PREFIX = "$share/"
_MAX_LENGTH = 0xFFFF


class InvalidTopic(ValueError):
    """A topic name or filter breaks the syntax rules."""


def _check_string(kind: str, text: str) -> None:
    if not text:
        raise InvalidTopic(f"{kind} must be at least one character long")
    if "\x00" in text:
        raise InvalidTopic(f"{kind} must not contain U+0000")
    try:
        encoded = text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidTopic(f"{kind} is not valid Unicode text") from None
    if len(encoded) > _MAX_LENGTH:
        raise InvalidTopic(f"{kind} is longer than 65535 bytes")


def validate_topic_name(name: str) -> None:
    """A name that can be published to: no wildcards."""
    _check_string("topic name", name)
    if "+" in name or "#" in name:
        raise InvalidTopic(f"topic name {name!r} contains a wildcard")


def _check_filter_levels(topic_filter: str) -> None:
    levels = topic_filter.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise InvalidTopic(f"'#' must be the whole last level in {topic_filter!r}")
        if "+" in level and level != "+":
            raise InvalidTopic(f"'+' must be a whole level in {topic_filter!r}")


@dataclass(frozen=True, slots=True)
class SharedSubscription:
    """``$share/<share_name>/<topic_filter>``: subscribers of one group share the messages."""

    share_name: str
    topic_filter: str


def parse_shared_subscription(topic_filter: str) -> SharedSubscription | None:
    """Split a shared subscription; ``None`` for an ordinary filter."""
    if not topic_filter.startswith(SHARE_PREFIX):
        return None
    share_name, slash, inner = topic_filter[len(SHARE_PREFIX) :].partition("/")
    if not share_name or "+" in share_name or "#" in share_name:
        raise InvalidTopic(f"shared subscription {topic_filter!r} has an invalid share name")
    if not slash or not inner:
        raise InvalidTopic(f"shared subscription {topic_filter!r} has no topic filter")
    _check_filter_levels(inner)
    return SharedSubscription(share_name, inner)


def validate_topic_filter(topic_filter: str) -> None:
    """A filter that can be subscribed to, including the shared-subscription form."""
    _check_string("topic filter", topic_filter)
    _check_filter_levels(topic_filter)
    parse_shared_subscription(topic_filter)


def topic_matches(topic_filter: str, topic_name: str) -> bool:
    """Whether a valid filter matches a valid name.

    Wildcards in the first level never match names starting with ``$`` (``$SYS`` etc.). A shared
    subscription is matched with its inner filter (:func:`parse_shared_subscription`).
    """
    if topic_name.startswith("$") and topic_filter[:1] in ("+", "#"):
        return False
    filter_levels = topic_filter.split("/")
    name_levels = topic_name.split("/")
    for index, level in enumerate(filter_levels):
        if level == "#":
            return True
        if index >= len(name_levels) or level not in ("+", name_levels[index]):
            return False
    return len(filter_levels) == len(name_levels)


def filter_contains(outer: str, inner: str) -> bool:
    """True if every topic matched by filter ``inner`` is matched by filter ``outer``.

    A plain topic name is a filter that matches itself, so this also answers "may publish".
    Topics starting with ``$`` are never reached through a leading wildcard (MQTT 4.7.2).
    """
    outer_levels = outer.split("/")
    inner_levels = inner.split("/")
    if inner.startswith("$") and outer_levels[0] in {"+", "#"}:
        return False
    for i, level in enumerate(outer_levels):
        if level == "#":
            return True
        if i >= len(inner_levels):
            return False
        candidate = inner_levels[i]
        if candidate == "#":
            return False  # inner reaches deeper/wider than outer at this level
        if level == "+":
            continue
        if candidate != level:  # a literal contains only the same literal, never '+'
            return False
    return len(inner_levels) == len(outer_levels)


def filters_overlap(first: str, second: str) -> bool:
    """Whether some topic name matches both filters (used to spot echo paths)."""
    a, b = first.split("/"), second.split("/")
    for index in range(max(len(a), len(b))):
        x = a[index] if index < len(a) else None
        y = b[index] if index < len(b) else None
        if x == "#" or y == "#":
            return not (index == 0 and "$" in ((x or "")[:1] + (y or "")[:1]))
        if x is None or y is None:
            return False
        if x != y and "+" not in (x, y):
            return False
        if index == 0 and "+" in (x, y) and (x + y).replace("+", "").startswith("$"):
            return False
    return True
