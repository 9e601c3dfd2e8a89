"""Device and station identifiers: the one place their rules live.

Identities end up inside MQTT topic names (``devices/<id>/telemetry``), so an id holding ``+``,
``#``, ``/``, ``$``, NUL or white space could widen an ACL or escape its subtree. Only
``[A-Za-z0-9._-]{1,64}`` is accepted, and ``.``/``..`` are refused as path-like.
"""

from __future__ import annotations

import re
from enum import StrEnum

from enrollment.errors import InvalidDeviceId


class SubjectKind(StrEnum):
    """What a fleetgate certificate is for: a device or a production-line station (the two a
    client certificate may name, in its URI SAN), or one of fleetgate's own servers."""

    DEVICE = "device"
    STATION = "station"
    SERVER = "server"


_ID_RE = re.compile(r"[A-Za-z0-9._-]{1,64}")
DEVICE_URI_PREFIX = "urn:fleetgate:device:"
STATION_URI_PREFIX = "urn:fleetgate:station:"
URI_PREFIXES = {SubjectKind.DEVICE: DEVICE_URI_PREFIX, SubjectKind.STATION: STATION_URI_PREFIX}


def validate_id(value: str, *, kind: str = "device") -> str:
    """Return ``value`` if it is a valid identifier, else raise :class:`InvalidDeviceId`."""
    if not isinstance(value, str) or _ID_RE.fullmatch(value) is None or value in {".", ".."}:
        raise InvalidDeviceId(
            f"{kind} id {value!r} is invalid: use 1-64 characters from A-Z a-z 0-9 . _ - "
            "(no MQTT wildcards, slashes, '$', spaces or control characters)"
        )
    return value


def device_uri(device_id: str) -> str:
    """The URI SAN naming a device in its certificate."""
    return DEVICE_URI_PREFIX + validate_id(device_id)


def station_uri(station_id: str) -> str:
    """The URI SAN naming a production-line station in its certificate."""
    return STATION_URI_PREFIX + validate_id(station_id, kind="station")


def id_from_uri(uri: str, prefix: str) -> str | None:
    """The validated id in ``uri`` if it starts with ``prefix``; ``None`` if it is another URI."""
    if not uri.startswith(prefix):
        return None
    return validate_id(uri[len(prefix) :], kind=prefix.split(":")[2])
