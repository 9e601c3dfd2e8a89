"""The fabric's record of one persistent session, as stored in the KV bucket ``FG_SESSIONS``
(issue 12). Pure data and its JSON form, no I/O: :mod:`broker.fabric.sessions` reads, claims and
writes it.

One record per client id, about 0.3-1 KiB of JSON: the device, the node that holds the session
(``node``), whether the client is away and since when (wall-clock seconds, compared across
nodes), the session expiry interval, the subscriptions with, for each QoS 1/2 filter, the
``FG_MSGS`` sequence it has consumed up to (``cursor``) and the wall-clock time it was made
(``since``: stream messages stored before it are not for it), the QoS 1/2 messages in flight
to the client (packet id, stream sequence, filter, QoS or 3 for "PUBREL sent"), the QoS 2
packet ids received from the client and not yet released, and its shared subscriptions
(``$share/<group>/<filter>``: QoS, retain-as-published, subscription id; no cursor, as their
messages come from the NATS queue groups, not from the stream). ``g`` is optional in the JSON:
a record written before shared subscriptions were kept in it reads as having none.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

from broker.session import NEVER_EXPIRES

RELEASED = 3
"""The stage of an outgoing QoS 2 message whose PUBREL was sent (its PUBLISH is never resent)."""

_PLAIN_KEY = re.compile(r"[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*")


def record_key(client_id: str) -> str:
    """The KV key of a client id: as is when KV accepts it, else hex-encoded (another prefix,
    so the two forms never collide)."""
    if len(client_id) <= 200 and _PLAIN_KEY.fullmatch(client_id):
        return f"c.{client_id}"
    return "h." + client_id.encode().hex()


def client_id_of(key: str) -> str:
    """The client id a record key stands for (:func:`record_key` reversed)."""
    kind, _, rest = key.partition(".")
    return rest if kind == "c" else bytes.fromhex(rest).decode(errors="replace")


@dataclass(slots=True)
class FilterState:
    """One subscription of a persistent session."""

    qos: int
    no_local: bool = False
    as_published: bool = False
    subscription_id: int | None = None
    since: float = 0.0
    cursor: int = 0


@dataclass(frozen=True, slots=True)
class ShareState:
    """One shared subscription of a persistent session (its options; a member of its group
    again wherever the session resumes)."""

    qos: int
    as_published: bool = False
    subscription_id: int | None = None


@dataclass(slots=True)
class SessionRecord:
    device_id: str
    node: str
    expiry: int
    away_since: float | None = None
    subs: dict[str, FilterState] = field(default_factory=dict)
    inflight: list[tuple[int, int, str, int]] = field(default_factory=list)
    qos2_in: list[int] = field(default_factory=list)
    shares: dict[str, ShareState] = field(default_factory=dict)  # by $share/<group>/<filter>

    def ends_at(self) -> float | None:
        """Wall-clock time the session ends while its client stays away (None: connected, or
        it never expires)."""
        if self.away_since is None or self.expiry == NEVER_EXPIRES:
            return None
        return self.away_since + self.expiry

    def expired(self, wall: float) -> bool:
        """Whether the session ended while its client was away."""
        ends = self.ends_at()
        return ends is not None and wall >= ends

    def encode(self) -> bytes:
        subs = {
            f: [s.qos, s.no_local, s.as_published, s.subscription_id, round(s.since, 3), s.cursor]
            for f, s in self.subs.items()
        }
        body = {
            "d": self.device_id,
            "n": self.node,
            "x": self.expiry,
            "a": self.away_since,
            "s": subs,
            "f": self.inflight,
            "q": self.qos2_in,
        }
        if self.shares:
            body["g"] = {
                f: [s.qos, s.as_published, s.subscription_id] for f, s in self.shares.items()
            }
        return json.dumps(body, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> SessionRecord | None:
        """The record, or None for bytes that are none (a record of another version, say)."""
        try:
            body = json.loads(data)
            subs = {
                str(f): FilterState(int(q), bool(nl), bool(rap), sid, float(since), int(cursor))
                for f, (q, nl, rap, sid, since, cursor) in body["s"].items()
            }
            away = body["a"]
            return cls(
                device_id=str(body["d"]),
                node=str(body["n"]),
                expiry=int(body["x"]),
                away_since=None if away is None else float(away),
                subs=subs,
                inflight=[(int(p), int(s), str(f), int(q)) for p, s, f, q in body["f"]],
                qos2_in=[int(p) for p in body["q"]],
                shares={
                    str(f): ShareState(int(q), bool(rap), None if sid is None else int(sid))
                    for f, (q, rap, sid) in body.get("g", {}).items()
                },
            )
        except (ValueError, KeyError, TypeError):
            return None
