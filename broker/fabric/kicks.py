"""Revocation kicks pushed over the fabric, on top of the registry's change feed (issue 12).

The feed (:mod:`broker.feed`) stays the authority: every node polls the registry and kicks a
revoked or suspended device's sessions itself, whatever the fabric does. The fabric only makes
that sooner. The first node whose poll reads a change publishes it on ``$FG.kick`` (core NATS,
at most once, ~1 ms across nodes), and every other node runs the same ``core.kick`` at once
instead of at its own next poll. A change id is acted on once per node whichever way it comes
first; a later copy (the feed's, or another node's announcement) finds no session left to close.

Anyone who may publish on ``$FG.kick`` can close a device's sessions (not admit one): the subject
belongs to the fabric's own credentials, like every ``$FG.`` subject. A device can never reach it:
``$`` topics are outside every device ACL, and MQTT wildcards never match them.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import TYPE_CHECKING

from enrollment.registry import DeviceChange, DeviceState

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg

log = logging.getLogger("fleetgate.fabric.kicks")

SUBJECT = "$FG.kick"
REMEMBERED = 4096
"""Change ids remembered as handled (a few minutes of revocations at any plausible rate)."""
_KICKING = (DeviceState.REVOKED, DeviceState.SUSPENDED)


def encode_change(change: DeviceChange, node: str) -> bytes:
    return json.dumps(
        {
            "id": change.id,
            "device": change.device_id,
            "state": str(change.state),
            "reason": change.reason,
            "node": node,
        }
    ).encode()


def decode_change(data: bytes) -> tuple[DeviceChange, str] | None:
    """The change and the announcing node; None for anything that is not a kick."""
    try:
        body = json.loads(data)
        change = DeviceChange(
            id=int(body["id"]),
            device_id=str(body["device"]),
            state=DeviceState(body["state"]),
            reason=str(body.get("reason", "")),
        )
        node = str(body.get("node", ""))
    except (ValueError, KeyError, TypeError):
        return None
    if change.state not in _KICKING:
        return None
    return change, node


class KickRelay:
    """Announces this node's feed changes and kicks on other nodes' announcements."""

    def __init__(self, node: str, kick: Callable[[DeviceChange], int]) -> None:
        """``kick`` closes the device's sessions here (``BrokerCore.kick``), returns how many."""
        self.node = node
        self._kick = kick
        self._nc: NatsClient | None = None
        self._handled: OrderedDict[int, None] = OrderedDict()
        self.sent = 0
        self.received = 0
        self.kicked = 0

    async def start(self, nc: NatsClient) -> None:
        self._nc = nc
        await nc.subscribe(SUBJECT, cb=self._on_message)

    def _first(self, change_id: int) -> bool:
        """Whether this node has not acted on ``change_id`` yet (it now has)."""
        if change_id in self._handled:
            return False
        self._handled[change_id] = None
        if len(self._handled) > REMEMBERED:
            self._handled.popitem(last=False)
        return True

    def announce(self, change: DeviceChange) -> None:
        """The feed read ``change`` (the caller kicks locally): tell the other nodes, unless
        one of them already told this one."""
        if change.id is None or change.state not in _KICKING or not self._first(change.id):
            return
        if self._nc is None or not self._nc.is_connected:
            return  # the other nodes' own polls still see it
        asyncio.get_running_loop().create_task(self._publish(encode_change(change, self.node)))

    async def _publish(self, data: bytes) -> None:
        assert self._nc is not None
        try:
            await self._nc.publish(SUBJECT, data)
        except Exception as exc:  # at most once: the feed is the backstop
            log.warning("kick not announced: %s", exc, extra={"node": self.node})
        else:
            self.sent += 1

    async def _on_message(self, msg: Msg) -> None:
        decoded = decode_change(msg.data)
        if decoded is None:
            return
        change, origin = decoded
        self.received += 1
        assert change.id is not None
        if not self._first(change.id):
            return
        kicked = self._kick(change)
        if kicked:
            self.kicked += kicked
            log.warning(
                "device session closed by revocation (announced over the fabric)",
                extra={
                    "device": change.device_id,
                    "state": str(change.state),
                    "node": self.node,
                    "announced_by": origin,
                },
            )
