"""Bridges in fabric mode: each ``[[bridge]]`` forwards upstream once per cluster, not once per
node, and loses nothing acknowledged when a node dies.

- **Source.** The stream ``FG_MSGS`` already holds every QoS 1/2 message before its PUBACK, so
  it is the bridge's durable queue: one durable pull consumer per bridge
  (``FG_BRIDGE_<name>``, ``filter_subjects`` = its out rules' subjects, explicit acks) feeds the
  same upstream link as the queue file (:class:`broker.bridge.link.BridgeLink`). A message is
  acknowledged to the stream only after the upstream's PUBACK: at least once upstream, with
  MQTT DUP on a message the stream delivered before (a resend, or another owner's).
- **One owner.** Each bridge has a lease in the KV bucket ``FG_BRIDGES`` (key
  ``lease.<name>``, bucket TTL :data:`LEASE_TTL_S`). A node takes it with a create (the key
  absent: exactly one wins), renews it every :data:`RENEW_S` with a compare-and-swap on its own
  revision, and while it holds it runs the link and reads the consumer. A node that cannot
  renew for ``LEASE_TTL_S - RENEW_S`` stops forwarding before its key can expire; a dead node's
  key expires after ``LEASE_TTL_S``, and a survivor takes it and carries on from the
  consumer's ack floor. Messages the dead owner had fetched and not acknowledged come again
  after :data:`ACK_WAIT_S` (a clean stop hands them back at once). Even two owners at once (a
  partition) would not double the stream's messages: the consumer hands each one to one fetch.
- **QoS 0** bridged messages are not in the stream, only on core NATS: the owner subscribes
  to the out rules' subjects there and forwards them at most once, while its link is up
  (others are counted in ``dropped_qos0_fabric``); they are not resent by the next owner.
- **In.** Only the owner subscribes upstream. An inbound message goes through the fabric's gate
  like a device message (core NATS to every node, QoS 1 into the stream), and is published to
  this node's subscribers. A QoS 1 one is acknowledged upstream only once the stream has it
  (in arrival order, :class:`broker.bridge.link.InboundAcks`); one the fabric does not take
  drops the connection, so the upstream's session sends it again. Its stream copy names the
  sender ``bridge:<name>``: the consumer skips it, so nothing that came in over a bridge goes
  out over one (as with the queue file).
- **Loops.** The origin marker is the cluster's, made from the stream's creation time, so every
  node adds and recognises the same one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import secrets
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from broker.bridge.manager import BridgeRuntime, _Bridge, new_queue
from broker.bridge.plan import BridgePlan
from broker.bridge.queue import RAM_LIMIT, Queued
from broker.core import BrokerCore, GateVerdict
from broker.fabric.connect import auth_options
from broker.fabric.durable import STREAM, STREAM_PREFIX
from broker.fabric.node import QOS_HEADER, RETAIN_HEADER, FabricNode, message_from_nats
from broker.fabric.sessions import SENDER_HEADER
from broker.fabric.subjects import filter_to_subjects, subject_to_topic
from broker.metrics import family_lines
from broker.mqtt import QoS
from broker.routing import Message
from enrollment.registry import Registry
from fleetgate.config import Config
from fleetgate.errors import ConfigError

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.js.api import ConsumerInfo, StreamInfo
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

log = logging.getLogger("fleetgate.broker.bridge")

LEASE_BUCKET = "FG_BRIDGES"
LEASE_TTL_S = 6.0
"""A dead owner's lease is gone this long after its last renewal; then a survivor takes it."""
RENEW_S = 1.0
ACK_WAIT_S = 10.0
"""A fetched message not acknowledged within this is delivered again (to the next owner)."""
FETCH_MAX = 512
FETCH_WAIT_S = 1.0
SETUP_TIMEOUT_S = 15.0
INBOUND_SENDER = "bridge:"
ECHO_WINDOW_S = 10.0
"""How long the owner remembers an inbound QoS 0 message it published, to skip it when core
NATS brings it back to its own QoS 0 subscription (no sender header on a QoS 0 message)."""


# -- pure rules -----------------------------------------------------------------------------------


def consumer_name(bridge: str) -> str:
    """The durable consumer of a bridge (names allow no '.'; bridge names may have one)."""
    if "." in bridge:
        return "FG_BRIDGE_x" + bridge.encode().hex()
    return "FG_BRIDGE_" + bridge


def consumer_backlog(info: ConsumerInfo) -> int:
    """A bridge's backlog as its consumer shows it: messages not yet delivered to the owner,
    and those delivered but not acknowledged (not yet PUBACKed upstream)."""
    return int(info.num_pending or 0) + int(info.num_ack_pending or 0)


def lease_key(bridge: str) -> str:
    return f"lease.{bridge}"


def subject_covers(wide: str, narrow: str) -> bool:
    """Whether every subject the NATS filter ``narrow`` matches, ``wide`` matches too."""
    w, n = wide.split("."), narrow.split(".")
    for i, level in enumerate(w):
        if level == ">":
            return len(n) > i
        if i >= len(n) or n[i] == ">":
            return False
        if level != "*" and level != n[i]:
            return False
    return len(w) == len(n)


def subjects_overlap(one: str, other: str) -> bool:
    """Whether some subject matches both NATS filters."""
    a, b = one.split("."), other.split(".")
    for x, y in zip(a, b, strict=False):
        if x == ">" or y == ">":
            return True
        if x != "*" and y != "*" and x != y:
            return False
    return len(a) == len(b)


def _filter_of(subject: str) -> str:
    """The MQTT filter a subject of :func:`filter_to_subjects` stands for (fabric topics hold
    no literal '*' or '>')."""
    return subject_to_topic(subject).replace("*", "+").replace(">", "#")


def core_subjects(plan: BridgePlan) -> list[str]:
    """The core NATS subjects of a bridge's out rules, none covered by another one;
    :class:`ConfigError` if two overlap without one covering the other (JetStream refuses a
    consumer whose filters overlap)."""
    subjects = {s for rule in plan.out for s in filter_to_subjects(rule.source)}
    kept = sorted(s for s in subjects if not any(o != s and subject_covers(o, s) for o in subjects))
    for i, one in enumerate(kept):
        for other in kept[i + 1 :]:
            if subjects_overlap(one, other):
                raise ConfigError(
                    f"[[bridge]] {plan.name}: out rules for {_filter_of(one)!r} and "
                    f"{_filter_of(other)!r} overlap without one containing the other; in "
                    "fabric mode a bridge reads one JetStream consumer, whose filters must not "
                    "overlap: make them disjoint or replace them with the wider filter"
                )
    return kept


def stream_subjects(plan: BridgePlan) -> list[str]:
    """The ``FG_MSGS`` subjects a bridge's out rules read (JetStream refuses a consumer whose
    filters overlap: none is covered by another)."""
    return [STREAM_PREFIX + s for s in core_subjects(plan)]


class EchoFilter:
    """The inbound QoS 0 messages the owner published lately (no I/O): each one that comes back
    on its QoS 0 subscription is skipped once, so nothing that came in goes out again."""

    def __init__(self, window_s: float = ECHO_WINDOW_S) -> None:
        self._window_s = window_s
        self._recent: deque[tuple[float, tuple[str, bytes]]] = deque()
        self._counts: Counter[tuple[str, bytes]] = Counter()

    def published(self, topic: str, payload: bytes, now: float) -> None:
        self._expire(now)
        key = (topic, payload)
        self._recent.append((now, key))
        self._counts[key] += 1

    def echo(self, topic: str, payload: bytes, now: float) -> bool:
        """Whether this is one of those messages coming back (then it is forgotten)."""
        self._expire(now)
        return self._forget((topic, payload))

    def _forget(self, key: tuple[str, bytes]) -> bool:
        count = self._counts.pop(key, 0)
        if count > 1:
            self._counts[key] = count - 1
        return count > 0

    def _expire(self, now: float) -> None:
        """Those that did not come back in time (no node subscribed, say) are forgotten."""
        while self._recent and self._recent[0][0] < now - self._window_s:
            self._forget(self._recent.popleft()[1])


def cluster_origin(info: StreamInfo) -> str:
    """The origin marker every node of one fabric shares: from ``FG_MSGS``'s creation time."""
    created = "" if info.created is None else info.created.isoformat()
    return "fabric-" + hashlib.sha256(f"{STREAM} {created}".encode()).hexdigest()[:16]


def holder_node(owner: str) -> str:
    """The node name of a lease value ``<node>.<epoch>``."""
    return owner.rpartition(".")[0] or owner


@dataclass
class Lease:
    """One bridge's lease as this node sees it (no I/O)."""

    me: str
    revision: int | None = None  # of this node's last write, while it holds the lease
    renewed_at: float = 0.0
    holder: str = ""  # the owner value last seen ("" unknown or nobody)

    def won(self, revision: int, now: float) -> None:
        self.revision, self.renewed_at, self.holder = revision, now, self.me

    def lost(self, holder: str = "") -> None:
        self.revision, self.holder = None, holder

    def valid(self, now: float) -> bool:
        """Held, and renewed recently enough that it cannot have expired yet."""
        return self.revision is not None and now - self.renewed_at < LEASE_TTL_S - RENEW_S


@dataclass
class _Term:
    """One bridge while this node owns it: the consumer, and what it handed over unacked."""

    sub: Any  # nats-py's PullSubscription; None for a bridge with in rules only
    limit: int
    held: dict[int, tuple[Msg, int]] = field(default_factory=dict)  # queue seq -> (msg, stream seq)
    stream_seqs: set[int] = field(default_factory=set)
    next_seq: int = 0
    room: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    qos0: list[Any] = field(default_factory=list)  # core NATS subscriptions, QoS 0 messages


class FabricBridges(BridgeRuntime):
    """Every ``[[bridge]]`` of a fabric node; the core's publish gate in front of the node's."""

    def __init__(
        self,
        config: Config,
        core: BrokerCore,
        registry: Registry,
        *,
        node: FabricNode,
        wake: Callable[[], None],
    ) -> None:
        super().__init__(config, core, registry, wake=wake)
        self._node = node
        self._me = f"{node.name}.{secrets.token_hex(6)}"
        for bridge in self._bridges.values():
            core_subjects(bridge.plan)  # a ConfigError before anything starts
        self._leases = {name: Lease(self._me) for name in self._bridges}
        self._terms: dict[str, _Term] = {}
        self._backlog: dict[str, int] = dict.fromkeys(self._bridges, 0)
        self._nc: NatsClient | None = None
        self._js: JetStreamContext | None = None
        self._kv: KeyValue | None = None
        self._echoes = EchoFilter()

    # -- lifecycle -------------------------------------------------------------------------------

    async def start(self) -> None:
        """After the fabric node: its own NATS link, the lease bucket, one consumer per bridge,
        then the gate; the leases are taken in the background."""
        import nats

        from broker.fabric.streams import ensure_bucket, until

        self._loop = asyncio.get_running_loop()
        fabric = self._node.settings
        setup_s = max(fabric.connect_timeout_s, SETUP_TIMEOUT_S)
        options: dict[str, Any] = {
            "servers": list(fabric.servers),
            "name": f"fleetgate-{self._node.name}-bridges",
            "inbox_prefix": "$FG.inbox",
            "connect_timeout": fabric.connect_timeout_s,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 0.5,
        }
        options.update(auth_options(self._config))
        self._nc = nc = await nats.connect(**options)
        self._js = js = nc.jetstream(timeout=setup_s)
        info = await until(f"stream {STREAM}", lambda: js.stream_info(STREAM), setup_s)
        self._set_origin(cluster_origin(info))
        self._kv = await ensure_bucket(js, LEASE_BUCKET, fabric.replicas, LEASE_TTL_S, setup_s)
        self._js = nc.jetstream(timeout=5.0)
        for name, bridge in self._bridges.items():
            await until(
                f"consumer for bridge {name}", functools.partial(self._consumer, bridge), setup_s
            )
            await self._load_acl(bridge)
            bridge.state.down("standby: another node owns the bridge", time.time())
            self._runners.append(self._spawn(self._hold_lease(bridge)))
        self._core.gate = self

    async def stop(self) -> None:
        """Hand every held bridge back (its messages to the stream, its lease deleted), so
        another node takes over at once."""
        self._core.gate = self._node
        for task in self._runners:
            task.cancel()
        await asyncio.gather(*self._runners, return_exceptions=True)
        for name in list(self._terms):
            await self._step_down(self._bridges[name], "stopping")
            lease = self._leases[name]
            if lease.revision is not None and self._kv is not None:
                with contextlib.suppress(Exception):
                    await self._kv.delete(lease_key(name), last=lease.revision)
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._nc is not None and not self._nc.is_closed:
            with contextlib.suppress(Exception):
                await self._nc.drain()

    async def _consumer(self, bridge: _Bridge) -> None:
        """Create or update the bridge's durable consumer (the same config on every node)."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        assert self._js is not None
        plan = bridge.plan
        if not plan.out:  # in rules only: no filter would mean every subject
            return
        await self._js.add_consumer(
            STREAM,
            ConsumerConfig(
                durable_name=consumer_name(plan.name),
                filter_subjects=stream_subjects(plan),
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=ACK_WAIT_S,
                deliver_policy=DeliverPolicy.NEW,
                max_ack_pending=self._window(plan),
            ),
        )

    @staticmethod
    def _window(plan: BridgePlan) -> int:
        """Messages the owner holds from the stream at most: in memory, within the bounds."""
        settings = plan.settings
        return max(1, min(RAM_LIMIT // 2, settings.queue_max_messages, 4 * settings.max_inflight))

    # -- the lease -------------------------------------------------------------------------------

    async def _hold_lease(self, bridge: _Bridge) -> None:
        """Take the lease when free, renew it while held; look at the backlog each round."""
        import nats.errors
        import nats.js.errors

        assert self._kv is not None and self._loop is not None
        name, kv = bridge.plan.name, self._kv
        lease, key, me = self._leases[name], lease_key(name), self._me.encode()
        while True:
            now = self._loop.time()
            try:
                if lease.revision is None:
                    lease.won(await kv.create(key, me), now)
                else:
                    lease.won(await kv.update(key, me, last=lease.revision), now)
                if name not in self._terms:  # just won, or the last start failed
                    await self._take_over(bridge)
                self._terms[name].room.set()  # fetching may go on (see _fetch)
            except nats.js.errors.KeyWrongLastSequenceError:
                holder = await self._holder(key)
                if lease.revision is not None or name in self._terms:
                    await self._step_down(bridge, f"the lease went to {holder_node(holder)}")
                lease.lost(holder)
                bridge.state.last_error = f"standby: {holder_node(holder)} owns the bridge"
            except (nats.errors.Error, TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
                if lease.revision is not None and name not in self._terms:
                    bridge.state.last_error = f"owner, but the consumer did not start: {reason}"
                if not lease.valid(self._loop.time()):
                    await self._step_down(bridge, f"the lease could not be renewed: {reason}")
                    lease.lost()
            await self._count_backlog(bridge)
            await asyncio.sleep(RENEW_S)

    async def _holder(self, key: str) -> str:
        assert self._kv is not None
        try:
            entry = await self._kv.get(key)
        except Exception:
            return ""
        return "" if entry.value is None else entry.value.decode(errors="replace")

    async def _count_backlog(self, bridge: _Bridge) -> None:
        """What waits for the upstream, from the consumer (every node can tell)."""
        assert self._js is not None
        if not bridge.plan.out:
            return
        try:
            info = await self._js.consumer_info(STREAM, consumer_name(bridge.plan.name))
        except Exception:
            return
        self._backlog[bridge.plan.name] = consumer_backlog(info)

    async def _take_over(self, bridge: _Bridge) -> None:
        """This node holds the lease now: bind the consumer, start the link."""
        assert self._js is not None
        plan = bridge.plan
        sub = None
        if plan.out:
            await self._consumer(bridge)  # again: it may have been deleted since the start
            name = consumer_name(plan.name)
            sub = await self._js.pull_subscribe_bind(consumer=name, stream=STREAM)
        term = _Term(sub, self._window(plan))
        self._terms[plan.name] = term
        bridge.queue = new_queue(plan)
        link = self._new_link(bridge, self)
        bridge.state.down("owner: connecting", time.time())
        term.tasks = [self._spawn(link.run())]
        if sub is not None:
            term.tasks.append(self._spawn(self._fetch(bridge, term)))
        assert self._nc is not None

        async def on_qos0(msg: Msg) -> None:
            self._forward_qos0(bridge, term, msg)

        term.qos0 = [await self._nc.subscribe(s, cb=on_qos0) for s in core_subjects(plan)]
        log.info(
            "bridge %s: this node (%s) owns it now",
            plan.name,
            self._node.name,
            extra={"bridge": plan.name, "node": self._node.name},
        )

    async def _step_down(self, bridge: _Bridge, reason: str) -> None:
        """Stop forwarding; what was fetched and not acknowledged goes back to the stream."""
        term = self._terms.pop(bridge.plan.name, None)
        if term is None:
            return
        for task in term.tasks:
            task.cancel()
        await asyncio.gather(*term.tasks, return_exceptions=True)
        for msg, _ in term.held.values():
            with contextlib.suppress(Exception):
                await msg.nak()
        for sub in (term.sub, *term.qos0):
            if sub is not None:
                with contextlib.suppress(Exception):
                    await sub.unsubscribe()
        bridge.link = None
        bridge.queue = new_queue(bridge.plan)
        bridge.state.down(f"standby: {reason}", time.time())
        log.warning(
            "bridge %s: this node no longer owns it: %s",
            bridge.plan.name,
            reason,
            extra={"bridge": bridge.plan.name, "node": self._node.name},
        )

    # -- the stream, read ------------------------------------------------------------------------

    async def _fetch(self, bridge: _Bridge, term: _Term) -> None:
        """While connected and the window has room, move messages from the consumer to the
        link's queue; while the upstream is away they wait in the stream."""
        import nats.errors

        loop = asyncio.get_running_loop()
        while True:
            await term.room.wait()
            term.room.clear()
            room = term.limit - len(term.held)
            lease = self._leases[bridge.plan.name]
            if not bridge.state.connected or room <= 0 or not lease.valid(loop.time()):
                continue  # woken again by an ack, the link, or the next renewal
            try:
                msgs = await term.sub.fetch(min(room, FETCH_MAX), timeout=FETCH_WAIT_S)
            except (nats.errors.TimeoutError, TimeoutError):
                msgs = []
            except nats.errors.Error as exc:
                log.warning("bridge %s: consumer fetch failed: %s", bridge.plan.name, exc)
                await asyncio.sleep(0.5)
                msgs = []
            done = [m for m in msgs if not self._take(bridge, term, m)]
            if done:
                self._spawn(_ack_all(done))
            if bridge.link is not None and len(done) < len(msgs):
                bridge.link.wake()
            term.room.set()

    def _take(self, bridge: _Bridge, term: _Term, msg: Msg) -> bool:
        """Queue one stream message for the upstream; False if it is not to go (ack it)."""
        meta = msg.metadata
        stream_seq = meta.sequence.stream
        if stream_seq in term.stream_seqs:
            return True  # delivered again while still held here: nothing to do
        headers = msg.headers
        if headers and headers.get(SENDER_HEADER, "").startswith(INBOUND_SENDER):
            return False  # came in over a bridge: never out over one
        stored_at = meta.timestamp.timestamp()
        message = message_from_nats(msg.subject[len(STREAM_PREFIX) :], msg.data, headers, stored_at)
        if message is None or (message.expires_at is not None and message.expires_at < time.time()):
            return False
        out = self._outgoing(bridge, message)
        if out is None:
            return False
        if not bridge.queue.reserve(out[2], stored_at):
            return True  # beyond the bounds: delivered again after ACK_WAIT_S
        # sent before (num_delivered > 1): another owner, or this one, may have sent it
        retain = RETAIN_HEADER in headers if headers else False
        item = self._queue(
            bridge, term, message, out, stored_at, sent=meta.num_delivered > 1, retain=retain
        )
        term.held[item.seq] = (msg, stream_seq)
        term.stream_seqs.add(stream_seq)
        return True

    def _forward_qos0(self, bridge: _Bridge, term: _Term, msg: Msg) -> None:
        """A QoS 0 message on core NATS: to the upstream at most once, if the link is up."""
        headers = msg.headers
        if headers and headers.get(QOS_HEADER, "0") != "0":
            return  # QoS 1/2: the stream's copy is forwarded
        now = time.time()
        message = message_from_nats(msg.subject, msg.data, headers, now)
        if message is None or self._echoes.echo(message.topic, message.payload, now):
            return
        out = self._outgoing(bridge, message)
        if out is None:
            return
        if not bridge.state.connected or not bridge.queue.reserve(out[2], now):
            bridge.counters.dropped_qos0_fabric += 1
            return
        retain = RETAIN_HEADER in headers if headers else False
        self._queue(bridge, term, message, out, now, sent=False, retain=retain)
        if bridge.link is not None:
            bridge.link.wake()

    def _outgoing(self, bridge: _Bridge, message: Message) -> tuple[str, bytes, int] | None:
        """The upstream topic, property block and size of ``message`` on ``bridge``; None if
        it does not go (no out rule, or an echo of what this cluster sent upstream)."""
        props = message.properties
        if self._looped(bridge, props):
            return None
        route = next((r for r in self._routes_for(message.topic) if r[0] is bridge), None)
        if route is None:
            return None
        _, remote, remote_size = route
        block = self._marked(props)
        return remote, block, remote_size + len(message.payload) + len(block)

    @staticmethod
    def _queue(
        bridge: _Bridge,
        term: _Term,
        message: Message,
        out: tuple[str, bytes, int],
        at: float,
        *,
        sent: bool,
        retain: bool,
    ) -> Queued:
        """Hand a message whose room is reserved to the link's queue; ``retain``: it goes
        upstream with RETAIN (the stream copy's :data:`RETAIN_HEADER`)."""
        term.next_seq += 1
        remote, block, size = out
        item = Queued(term.next_seq, remote, message.payload, retain, block, at, size, sent)
        bridge.queue.stored(item)
        return item

    # -- LinkOwner -------------------------------------------------------------------------------

    def acked(self, name: str, items: list[Queued]) -> None:
        """The upstream has them: acknowledge them to the stream (after, never before)."""
        term = self._terms.get(name)
        if term is None:
            return
        done = []
        for item in items:
            held = term.held.pop(item.seq, None)
            if held is not None:
                done.append(held[0])
                term.stream_seqs.discard(held[1])
        self._spawn(_ack_all(done))
        term.room.set()

    def sent(self, name: str, seq: int) -> None:
        """Nothing to record: the stream keeps the position (its ack floor)."""

    def disconnected(self, name: str) -> None:
        """Fetching pauses by itself (the link is down); the stream keeps the messages."""

    def want_more(self, name: str) -> None:
        term = self._terms.get(name)
        if term is not None:
            term.room.set()

    # -- the gate ----------------------------------------------------------------------------------

    def offer(
        self, message: Message, dup: bool, on_stored: Callable[[bool, float], None]
    ) -> GateVerdict:
        """Refuse an echo of this cluster's own forwarded messages; the rest is the node's."""
        if message.properties.user_properties and self._came_back(message.properties):
            return GateVerdict.LOOP
        return self._node.offer(message, dup, on_stored)

    def _publish_inbound(
        self, message: Message, now: float, settle: Callable[[bool], None]
    ) -> None:
        """To every node, through the fabric's gate as a device message, then here. A QoS 1
        message is acknowledged upstream once ``FG_MSGS`` has it, as a device's is: if it is
        not stored (the fabric down, or no answer in time) the link reconnects and the
        upstream sends it again, so an owner killed in between loses nothing."""
        if message.qos == QoS.AT_MOST_ONCE:
            self._echoes.published(message.topic, message.payload, time.time())
        verdict = self._node.offer(message, False, lambda ok, _: settle(ok))
        if verdict is GateVerdict.FULL:
            settle(False)  # the fabric refuses QoS 1 now: routed when it comes again
            return
        if verdict is GateVerdict.INVALID:
            log.warning(
                "bridge: inbound topic %r has no NATS subject; delivered on this node only",
                message.topic,
            )
        if verdict is not GateVerdict.HOLD:
            settle(True)
        self._core.publish(message, now)

    # -- figures -------------------------------------------------------------------------------

    def _waiting(self, bridge: _Bridge) -> int:
        return self._backlog[bridge.plan.name]

    def _owner_of(self, bridge: _Bridge) -> str | None:
        return holder_node(self._leases[bridge.plan.name].holder)

    def render_metrics(self) -> str:
        held = [
            (f'{{bridge="{name}",node="{self._node.name}"}}', int(name in self._terms))
            for name in self._bridges
        ]
        lines = family_lines(
            "bridge_lease_held", "gauge", "1 while this node owns the bridge (fabric mode).", held
        )
        return super().render_metrics() + "\n".join(lines) + "\n"


async def _ack_all(msgs: list[Msg]) -> None:
    for msg in msgs:
        await msg.ack()
