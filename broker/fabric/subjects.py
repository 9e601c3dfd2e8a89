"""MQTT topics and filters as NATS subjects, exactly as nats-server >= 2.10 maps them for its own
MQTT listener, so fleetgate nodes, nats-server's MQTT clients and NATS-native services see the
same subjects for the same topics.

The rules (nats-server ``server/mqtt.go``, checked on the wire against 2.10.27):

- ``/`` separates levels and becomes ``.``; a ``.`` inside a level becomes ``//``;
- an empty level becomes ``/.`` at the start and ``./`` at the end or before another ``/``;
- ``+`` becomes ``*`` and ``#`` becomes ``>``; ``a/#`` also matches ``a``, so it needs two NATS
  subscriptions, ``a.>`` and ``a``.

Some topics have no encoding, and fleetgate refuses them in fabric mode (:func:`refusal`):
whitespace and DEL cut or corrupt the NATS protocol line (2.10 still lets a TAB through), and a
literal ``*`` or ``>`` would become a NATS wildcard (a subscriber to the MQTT filter ``a/*/b``
would receive ``a/other/b``, which is an ACL escape). Pure functions, no I/O.
"""

from __future__ import annotations

from functools import lru_cache

UNMAPPABLE = frozenset(" \t\n\r\f\x7f*>")
"""Characters a topic or filter must not contain to cross the fabric."""

_NAMES = {" ": "a space", "\t": "a tab", "\n": "a line feed", "\r": "a carriage return"}
_NAMES |= {"\f": "a form feed", "\x7f": "DEL", "*": "'*'", ">": "'>'"}


class Unmappable(ValueError):
    """A topic or filter that has no NATS subject."""


def refusal(text: str) -> str | None:
    """Why ``text`` (a topic name or filter) cannot cross the fabric, or None if it can."""
    if UNMAPPABLE.isdisjoint(text):
        return None
    found = next(ch for ch in text if ch in UNMAPPABLE)
    return f"{text!r} contains {_NAMES[found]}, which has no NATS subject"


def _encode(text: str) -> str:
    """The subject for a topic or filter whose characters all map (see :func:`refusal`)."""
    if "." not in text and "//" not in text and text[:1] != "/" and text[-1:] != "/":
        # The common case (devices/dev-1/telemetry): no empty level, no dot.
        return text.replace("/", ".").replace("+", "*").replace("#", ">")
    out: list[str] = []
    last = len(text) - 1
    for i, ch in enumerate(text):
        if ch == "/":
            if i == 0 or (out and out[-1].endswith(".")):
                out.append("/.")  # an empty level before this separator
            elif i == last or text[i + 1] == "/":
                out.append("./")  # an empty level after this separator
            else:
                out.append(".")
        elif ch == ".":
            out.append("//")
        elif ch == "+":
            out.append("*")
        elif ch == "#":
            out.append(">")
        else:
            out.append(ch)
    subject = "".join(out)
    return subject + "/" if subject.endswith(".") else subject


@lru_cache(maxsize=65536)
def topic_to_subject(topic: str) -> str:
    """The subject a message on ``topic`` (a valid MQTT topic name) is published on.

    Cached: a fleet publishes to the same topics over and over.
    """
    reason = refusal(topic)
    if reason is not None:
        raise Unmappable(reason)
    return _encode(topic)


def filter_to_subjects(topic_filter: str) -> tuple[str, ...]:
    """The NATS subscriptions that together receive what a valid MQTT filter matches.

    ``a/#`` matches ``a`` as well (MQTT 4.7.1.2), which ``a.>`` does not: the parent gets its
    own subscription, as nats-server's MQTT listener does.
    """
    reason = refusal(topic_filter)
    if reason is not None:
        raise Unmappable(reason)
    subject = _encode(topic_filter)
    if topic_filter.endswith("/#"):
        return (subject, subject[:-2])
    return (subject,)


def subject_to_topic(subject: str) -> str:
    """The MQTT topic for a subject, as nats-server shows it to MQTT subscribers.

    ``//`` is a dot, ``/.`` an empty level's separator, any other ``.`` a level separator, and a
    lone ``/`` is dropped. A NATS-native subject may give a topic MQTT does not accept (with
    ``+`` or ``#`` in it, say): the caller validates the result.
    """
    if "/" not in subject:
        return subject.replace(".", "/")
    out: list[str] = []
    i, n = 0, len(subject)
    while i < n:
        ch = subject[i]
        if ch == "/":
            following = subject[i + 1] if i + 1 < n else ""
            if following == ".":
                out.append("/")
                i += 1
            elif following == "/":
                out.append(".")
                i += 1
        elif ch == ".":
            out.append("/")
        else:
            out.append(ch)
        i += 1
    return "".join(out)
