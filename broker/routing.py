"""Which sessions a topic reaches, and which retained messages a filter reaches: two topic tries.

A linear scan over every subscription (or every retained topic) costs O(fleet) per message and
O(fleet²) when a whole fleet reconnects and subscribes; a trie walks only the levels that can
match. Both tries apply MQTT 4.7.2: a leading wildcard never reaches a topic starting with ``$``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Generic, TypeVar

from broker.mqtt import NO_PROPERTIES, Properties, QoS
from broker.mqtt.packets import quick_init

_T = TypeVar("_T")


@quick_init
@dataclass(frozen=True, slots=True)
class Message:
    """An application message as the broker keeps it, independent of any connection.

    ``properties`` holds only what travels with the message (MQTT 5 section 3.3.2.3: payload
    format, content type, response topic, correlation data, user properties); the expiry is
    kept as a deadline on the broker's clock.
    """

    topic: str
    payload: bytes
    qos: QoS
    retain: bool
    properties: Properties
    sender: str
    expires_at: float | None = None


def weight(message: Message) -> int:
    """What a message costs to hold, for the per-device byte limits: its payload, its topic and
    the properties that travel with it (user properties can outweigh a small payload)."""
    size = len(message.payload) + len(message.topic)
    props = message.properties
    if props is not NO_PROPERTIES:
        size += sum(len(k) + len(v) for k, v in props.user_properties)
        for value in (props.content_type, props.response_topic, props.correlation_data):
            if value is not None:
                size += len(value)
    return size


@dataclass(frozen=True, slots=True)
class SubscriptionOptions:
    """What one subscription asks for; 3.1.1 subscriptions use only ``qos``."""

    qos: QoS
    no_local: bool = False
    retain_as_published: bool = False
    subscription_id: int | None = None


class _Node(Generic[_T]):
    __slots__ = ("children", "value")

    def __init__(self) -> None:
        self.children: dict[str, _Node[_T]] = {}
        self.value: _T | None = None


def _path(root: _Node[_T], levels: list[str]) -> list[_Node[_T]] | None:
    node, path = root, [root]
    for level in levels:
        child = node.children.get(level)
        if child is None:
            return None
        node = child
        path.append(node)
    return path


def _prune(path: list[_Node[_T]], levels: list[str], empty: bool) -> None:
    """Drop the nodes of ``path`` that no longer hold anything, deepest first."""
    for depth in range(len(levels), 0, -1):
        node = path[depth]
        if node.children or not empty:
            return
        del path[depth - 1].children[levels[depth - 1]]
        empty = path[depth - 1].value is None


MATCH_CACHE_TOPICS = 65536


class SubscriptionTree:
    """Subscriptions of every session, keyed by topic filter levels."""

    def __init__(self) -> None:
        self._root: _Node[dict[str, SubscriptionOptions]] = _Node()
        # Devices publish to the same few topics over and over: remember each topic's matches
        # until the subscriptions change.
        self._matches: dict[str, list[tuple[str, SubscriptionOptions]]] = {}

    def add(self, topic_filter: str, client_id: str, options: SubscriptionOptions) -> bool:
        """Subscribe (or replace the options of) ``client_id``; True if the filter is new to it."""
        self._matches.clear()
        node = self._root
        for level in topic_filter.split("/"):
            node = node.children.setdefault(level, _Node())
        if node.value is None:
            node.value = {}
        new = client_id not in node.value
        node.value[client_id] = options
        return new

    def remove(self, topic_filter: str, client_id: str) -> bool:
        """Unsubscribe; False if ``client_id`` had no such subscription."""
        self._matches.clear()
        levels = topic_filter.split("/")
        path = _path(self._root, levels)
        if path is None or path[-1].value is None or client_id not in path[-1].value:
            return False
        subscribers = path[-1].value
        del subscribers[client_id]
        if not subscribers:
            path[-1].value = None
            _prune(path, levels, empty=True)
        return True

    def match(self, topic: str) -> list[tuple[str, SubscriptionOptions]]:
        """Every (client id, options) whose filter matches the topic name."""
        found = self._matches.get(topic)
        if found is None:
            if len(self._matches) >= MATCH_CACHE_TOPICS:
                self._matches.clear()
            found = self._matches[topic] = list(self._walk(topic))
        return found

    def _walk(self, topic: str) -> Iterator[tuple[str, SubscriptionOptions]]:
        levels = topic.split("/")
        dollar = topic.startswith("$")
        stack: list[tuple[_Node[dict[str, SubscriptionOptions]], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            wild = not (depth == 0 and dollar)
            multi = node.children.get("#") if wild else None
            if multi is not None and multi.value:
                yield from multi.value.items()  # '#' also matches the parent level
            if depth == len(levels):
                if node.value:
                    yield from node.value.items()
                continue
            exact = node.children.get(levels[depth])
            if exact is not None:
                stack.append((exact, depth + 1))
            single = node.children.get("+") if wild else None
            if single is not None:
                stack.append((single, depth + 1))


class RetainedMessages:
    """The last retained message of each topic; a filter walks only the branches it can match.

    Each message is held on behalf of an owner (the device that published it), whose count and
    bytes (:func:`weight`) are kept for the per-device retained limits; replacing or deleting a
    topic's message takes it off its owner's account, whoever replaces or deletes it.
    """

    def __init__(self) -> None:
        self._root: _Node[Message] = _Node()
        self._owners: dict[str, str] = {}  # topic -> owner
        self._held: dict[str, tuple[int, int]] = {}  # owner -> (messages, bytes)
        self.count = 0

    def held(self, owner: str) -> tuple[int, int]:
        """How many retained messages ``owner`` has here, and their bytes."""
        return self._held.get(owner, (0, 0))

    def replaced(self, topic: str, owner: str) -> int | None:
        """The weight of ``owner``'s retained message on ``topic``; ``None`` if it has none."""
        if self._owners.get(topic) != owner:
            return None
        path = _path(self._root, topic.split("/"))
        value = None if path is None else path[-1].value
        return None if value is None else weight(value)

    def store(self, message: Message, owner: str = "") -> None:
        """Keep ``message`` for its topic; an empty payload deletes the topic's message."""
        levels = message.topic.split("/")
        if not message.payload:
            path = _path(self._root, levels)
            if path is not None and path[-1].value is not None:
                self._account(message.topic, path[-1].value, None, owner)
                path[-1].value = None
                self.count -= 1
                _prune(path, levels, empty=True)
            return
        node = self._root
        for level in levels:
            node = node.children.setdefault(level, _Node())
        if node.value is None:
            self.count += 1
        self._account(message.topic, node.value, message, owner)
        node.value = message

    def _account(
        self, topic: str, previous: Message | None, new: Message | None, owner: str
    ) -> None:
        """Move ``topic``'s message off its previous owner's account and onto ``owner``'s."""
        if previous is not None:
            old = self._owners.pop(topic)
            count, size = self._held[old]
            if count == 1:
                del self._held[old]
            else:
                self._held[old] = (count - 1, size - weight(previous))
        if new is not None:
            self._owners[topic] = owner
            count, size = self._held.get(owner, (0, 0))
            self._held[owner] = (count + 1, size + weight(new))

    def matching(self, topic_filter: str) -> Iterator[Message]:
        """Retained messages whose topic the filter matches."""
        levels = topic_filter.split("/")
        stack: list[tuple[_Node[Message], int]] = [(self._root, 0)]
        while stack:
            node, depth = stack.pop()
            if depth == len(levels):
                if node.value is not None:
                    yield node.value
                continue
            level = levels[depth]
            if level == "#":
                yield from self._subtree(node, skip_dollar=depth == 0)
            elif level == "+":
                for name, child in node.children.items():
                    if not (depth == 0 and name.startswith("$")):
                        stack.append((child, depth + 1))
            elif (literal := node.children.get(level)) is not None:
                stack.append((literal, depth + 1))

    @staticmethod
    def _subtree(node: _Node[Message], *, skip_dollar: bool) -> Iterator[Message]:
        """``node`` itself (``a/#`` matches ``a``) and everything below it."""
        if node.value is not None:
            yield node.value
        stack = [
            child
            for name, child in node.children.items()
            if not (skip_dollar and name.startswith("$"))
        ]
        while stack:
            current = stack.pop()
            if current.value is not None:
                yield current.value
            stack.extend(current.children.values())
