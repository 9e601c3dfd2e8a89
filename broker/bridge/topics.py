"""A bridge's topic rules as pure functions: which topics cross, and under which name.

A rule pairs a source filter with a target filter that has the same wildcards in the same
order; the topic levels a ``+`` (or the tail a ``#``) matched in the source fill the target's
``+`` (or ``#``). So ``devices/+/telemetry`` -> ``sites/plant-7/devices/+/telemetry`` carries the
device id across, and ``sites/plant-7/commands/+`` -> ``devices/+/commands`` brings it back.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from broker.mqtt import InvalidTopic, parse_shared_subscription, validate_topic_filter
from enrollment.errors import ConfigError

SITE_PLACEHOLDER = "{site}"


class InvalidBridgeRule(ConfigError):
    """A ``[[bridge.out]]`` or ``[[bridge.in]]`` rule that cannot map topics."""

    code = "invalid_bridge_rule"


@dataclass(frozen=True, slots=True)
class TopicRule:
    """Topics matching ``source`` are renamed by ``target``; both hold the same wildcards."""

    source: str
    target: str


def compile_rule(source: str, target: str, *, site: str, where: str) -> TopicRule:
    """A checked rule with ``{site}`` filled in; :class:`InvalidBridgeRule` says what is wrong."""
    if SITE_PLACEHOLDER in source + target:
        if not site or any(c in site for c in "+#\x00") or site.startswith("$"):
            raise InvalidBridgeRule(
                f"{where}: the rule uses {{site}} but the bridge's site is {site!r}; set "
                "site to a topic level (or path) without wildcards"
            )
        source = source.replace(SITE_PLACEHOLDER, site)
        target = target.replace(SITE_PLACEHOLDER, site)
    for name in (source, target):
        try:
            validate_topic_filter(name)
        except InvalidTopic as exc:
            raise InvalidBridgeRule(f"{where}: {exc}") from exc
        if parse_shared_subscription(name) is not None:
            raise InvalidBridgeRule(f"{where}: {name!r} is a shared subscription; use a filter")
    if _wildcards(source) != _wildcards(target):
        raise InvalidBridgeRule(
            f"{where}: {source!r} and {target!r} must have the same wildcards in the same order "
            f"({''.join(_wildcards(source)) or 'none'} vs {''.join(_wildcards(target)) or 'none'})"
        )
    return TopicRule(source, target)


def _wildcards(topic_filter: str) -> list[str]:
    return [level for level in topic_filter.split("/") if level in ("+", "#")]


def remap(rule: TopicRule, topic: str) -> str | None:
    """``topic`` renamed by ``rule``, or ``None`` if the rule's source does not match it."""
    if topic.startswith("$") and rule.source[:1] in ("+", "#"):
        return None  # a leading wildcard never matches a $ topic (MQTT 4.7.2)
    levels = topic.split("/")
    captured: list[str] = []
    tail: list[str] | None = None
    source = rule.source.split("/")
    for index, level in enumerate(source):
        if level == "#":
            tail = levels[index:]
            break
        if index >= len(levels):
            return None
        if level == "+":
            captured.append(levels[index])
        elif level != levels[index]:
            return None
    else:
        if len(levels) != len(source):
            return None
    out: list[str] = []
    singles = iter(captured)
    for level in rule.target.split("/"):
        if level == "+":
            out.append(next(singles))
        elif level == "#":
            assert tail is not None  # compile_rule paired the wildcards
            out.extend(tail)
        else:
            out.append(level)
    return "/".join(out)


def first_remap(rules: Iterable[TopicRule], topic: str) -> str | None:
    """The target name from the first rule that matches ``topic`` (one copy per bridge)."""
    for rule in rules:
        renamed = remap(rule, topic)
        if renamed is not None:
            return renamed
    return None
