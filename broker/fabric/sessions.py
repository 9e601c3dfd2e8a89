"""Persistent sessions in the fabric, not in one node (issue 12).

A session with a session expiry (MQTT 5 expiry > 0, or 3.1.1 clean session 0) is a record in
the KV bucket ``FG_SESSIONS`` (:mod:`broker.fabric.records`), key = client id. While its client
is away nothing else exists for it in NATS: no consumer, no subscription.

- **Claim.** Before the CONNACK, the node reads the record. If another node holds the session
  live it asks that node to let go (``$FG.ctl.release.<node>``, request/reply): the holder
  closes its connection with 0x8E (Session taken over), writes the session's exact state and
  answers. Then the claiming node writes the record naming itself, by compare-and-swap on the
  revision it read: of two nodes racing for one client id, one wins, the other reads again. A
  holder that does not answer (killed) is not waited for: its last checkpoint is the state.
- **Delivery from the stream.** QoS 1/2 messages reach a persistent session only from the
  stream ``FG_MSGS``, never from the live core-NATS copy (:meth:`BrokerCore.deliver` skips
  those for it). Each QoS 1/2 filter of a connected session has one ephemeral push consumer
  (R1, memory, no acks, filtered to the filter's subjects), started after the filter's cursor,
  or for a filter that never got a message at the time it was subscribed. The stream is one
  total order, so there is no replay/live handover to get wrong: a resumed session reads on
  from its cursor, and the messages published while it resumes simply come after. A consumer
  sequence gap or missing heartbeats restart the consumer after the last sequence handed on.
- **Overlapping filters.** Each filter's consumer sees a message that two filters match; only
  the smallest matching filter (that existed when the message was stored) delivers it, once,
  at the highest QoS of the matching filters.
- **Cursors.** Per filter: every stream sequence at or below it has been completed by the
  client (or was not for it). Written to the record by a checkpoint about once a second while
  anything changed, and exactly at disconnect and takeover. Messages in flight are recorded
  with their packet ids and resent with DUP after a resume; a QoS 2 message whose PUBREL was
  sent is resent as PUBREL, never as PUBLISH again. A resumed filter reads on after its
  cursor or its highest sequence in flight, whichever is later: each one up to that was
  resent or completed (out of order, so the cursor stayed below it).
- **Exactly once (the write-ahead).** The connection holds each outgoing QoS 2 PUBLISH and
  PUBREL, and each PUBREC for an incoming QoS 2 PUBLISH once it is in the stream, until a
  record naming that packet id and stage is written (:meth:`SessionFeed.write_ahead`, then
  ``Connection.recorded``): one compare-and-swap covers every packet asked for before its
  snapshot, started as a task at the first, so a loop turn's packets share it. A write that
  fails keeps them held until one succeeds (the checkpoints try again); a disconnect or
  takeover drops them unsent, and the exact state written then is what is resent.
- **Expiry.** A record whose client has been away longer than its expiry is treated as absent
  at claim. The node that held it ends it at expiry (as today, with its will) and deletes the
  record; records of a node that died are deleted by the sweep every node runs
  (``sweep_interval_s``), with a compare-and-swap delete, so racing sweepers are harmless.
  A swept session's will, if a dead node's and still pending, is due then (``on_ended``,
  :meth:`broker.fabric.wills.WillKeeper.session_ended`).
- **Shared subscriptions** are in the record too (``shares``), without cursors: their
  messages come from the NATS queue groups. A resumed session joins its groups again.
- **Announcements.** A claim is announced on ``$FG.ctl.takeover``: a node with a live clean
  session of that client id closes it (0x8E); a node with an away copy of the persistent
  session forgets it (its shared subscriptions stop taking messages there). With ``Fg-Ends``
  (the client starts a new session) the old session ends: its waiting will is published, by
  its holder or the survivor that claimed it; without, a resumption cancels it.

What is not exact: after a node is killed, its sessions resume from the last record written,
so QoS 1 messages completed since the last checkpoint (at most ``checkpoint_s`` old) come
again (with DUP where they were in flight). QoS 2 does not: the client never saw a stage the
record lacks. Its PUBLISH is resent under the same id, or its PUBREL, never a PUBLISH after
the PUBREL; a resent incoming PUBLISH whose id is in ``qos2_in`` gets PUBREC and is not stored
again (an id there whose PUBCOMP went out after the last write is stale: a PUBLISH under it
with DUP 0 is new). Left: an incoming QoS 2 message stored in the stream whose node dies
before the record lists its id (so before its PUBREC) is stored again when the client resends
it elsewhere, under a new ``Nats-Msg-Id``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from broker.fabric.durable import STREAM, STREAM_PREFIX
from broker.fabric.records import (
    RELEASED,
    FilterState,
    SessionRecord,
    ShareState,
    client_id_of,
    record_key,
)
from broker.fabric.subjects import filter_to_subjects
from broker.mqtt import NO_PROPERTIES, Properties, Publish, PubRel, QoS
from broker.routing import SubscriptionOptions
from broker.session import Delivery, Session
from broker.shared import share_key
from fleetgate.topics import topic_matches

if TYPE_CHECKING:
    from nats.aio.client import Client as NatsClient
    from nats.aio.msg import Msg
    from nats.aio.subscription import Subscription
    from nats.js.kv import KeyValue

    from broker.core import BrokerCore

log = logging.getLogger("fleetgate.fabric")

BUCKET = "FG_SESSIONS"
RELEASE_PREFIX = "$FG.ctl.release."
TAKEOVER_SUBJECT = "$FG.ctl.takeover"
HOLDS_PREFIX = "$FG.ctl.holds."
SENDER_HEADER = "Fg-Client"  # the publishing client id, on the stored copy only (no local)
SINCE_MARGIN_S = 1.0
"""A new filter also takes stream messages stored this long before it was made: clocks of
nodes and NATS servers differ a little, and a message published right after the SUBACK must
not be missed."""
HEARTBEAT_S = 5.0
INACTIVE_S = 30.0
RELEASE_TIMEOUT_S = 3.0
RETRY_S = 1.0
CLAIM_PATIENCE_S = 8.0
JS_TIMEOUT_S = 2.0
"""A JetStream request not answered in this long is tried again (a claim, a consumer)."""
_QOS = (QoS.AT_MOST_ONCE, QoS.AT_LEAST_ONCE, QoS.EXACTLY_ONCE)
ENDS_HEADER = "Fg-Ends"
"""On a release request or a takeover announcement: the client starts a new session, so the
old one ends (a will waiting for its delay is published, not cancelled)."""
_ENDS = {ENDS_HEADER: "1"}


def _ends(msg: Msg) -> bool:
    return bool(msg.headers and msg.headers.get(ENDS_HEADER) == "1")


def _stream_position(reply: str) -> tuple[int, int, float]:
    """(stream sequence, consumer sequence, stored at in wall-clock seconds) from a JetStream
    delivery's reply subject (both the 9-token and the 12-token form)."""
    tokens = reply.split(".")
    if len(tokens) == 9:
        sseq, cseq, ts = tokens[5], tokens[6], tokens[7]
    else:
        sseq, cseq, ts = tokens[7], tokens[8], tokens[9]
    return int(sseq), int(cseq), int(ts) / 1e9


class FilterFeed:
    """One QoS 1/2 filter of a connected session: its consumer and where it is."""

    __slots__ = ("consumer", "expected", "filter", "generation", "handed", "heard", "sub")

    def __init__(self, topic_filter: str, handed: int) -> None:
        self.filter = topic_filter
        self.handed = handed  # the last stream sequence this filter's consumer handed on
        self.sub: Subscription | None = None
        self.consumer = ""
        self.expected = 1
        self.generation = 0
        self.heard = 0.0  # monotonic time of the last message or heartbeat


class SessionFeed:
    """The fabric side of one persistent session held by this node (``Session.fabric``)."""

    def __init__(self, store: SessionStore, session: Session, record: SessionRecord, rev: int):
        self.store = store
        self.session = session
        self.record = record
        self.revision = rev
        self.key = record_key(session.client_id)
        self.filters: dict[str, FilterFeed] = {}
        self.pid_seq: dict[int, tuple[str, int]] = {}
        self.queued: dict[int, tuple[Delivery, str, int]] = {}
        self.paused: dict[str, int] = {}  # filter -> first sequence not taken (queue full)
        self.dirty = False
        self.lost = False  # another node took the record
        self.lock = asyncio.Lock()
        # The write-ahead (module docstring, "Exactly once"): record snapshots taken so far,
        # whether one is asked for, and the incoming QoS 2 ids the record may name (stored in
        # the stream; session.incoming_qos2 also has those still being stored).
        self.snapshots = 0
        self.ahead_due = False
        self.qos2_in = set(record.qos2_in)

    # -- hooks from the connection ----------------------------------------------------------------

    def sent(self, packet_id: int, delivery: Delivery) -> None:
        """The connection gave a delivery this packet id (now in flight)."""
        ref = self.queued.pop(id(delivery), None)
        if ref is not None:
            self.pid_seq[packet_id] = (ref[1], ref[2])
            self.dirty = True
        if self.paused and len(self.session.queue) <= self.store.queue_limit(self.session) // 2:
            for topic_filter, seq in list(self.paused.items()):
                del self.paused[topic_filter]
                feed = self.filters.get(topic_filter)
                if feed is not None:
                    feed.handed = seq - 1
                    self.store.spawn(self.store.restart(self, feed))

    def write_ahead(self, received: int | None = None) -> int:
        """The connection holds a packet until the record names it: the number of the record
        write that will (:meth:`Connection.recorded` is called with it once written). One
        write covers every packet asked for before its snapshot. ``received``: the packet id
        of an incoming QoS 2 PUBLISH now stored in the stream, for ``qos2_in``."""
        if received is not None:
            self.qos2_in.add(received)
        self.dirty = True
        if not self.ahead_due:
            self.ahead_due = True
            self.store.spawn(self.flush())
        return self.snapshots + 1

    # -- the record -------------------------------------------------------------------------------

    def snapshot(self, wall: float) -> SessionRecord:
        """The record as of now: cursors below everything still queued or in flight."""
        session = self.session
        lowest: dict[str, int] = {}
        inflight = []
        for pid, packet in session.inflight.items():
            ref = self.pid_seq.get(pid)
            if ref is None:
                continue
            topic_filter, seq = ref
            stage = RELEASED if isinstance(packet, PubRel) else int(packet.qos)
            inflight.append((pid, seq, topic_filter, stage))
            lowest[topic_filter] = min(lowest.get(topic_filter, seq), seq)
        if len(self.pid_seq) > len(session.inflight):
            self.pid_seq = {p: r for p, r in self.pid_seq.items() if p in session.inflight}
        if self.queued:
            waiting = {id(d) for d in session.queue}
            for key, (_, topic_filter, seq) in list(self.queued.items()):
                if key in waiting:
                    lowest[topic_filter] = min(lowest.get(topic_filter, seq), seq)
                else:  # dropped (expired, too large): done with
                    del self.queued[key]
        for topic_filter, seq in self.paused.items():
            lowest[topic_filter] = min(lowest.get(topic_filter, seq), seq)
        subs = {}
        for topic_filter, state in self.record.subs.items():
            feed = self.filters.get(topic_filter)
            cursor = state.cursor if feed is None else feed.handed
            if topic_filter in lowest:
                cursor = min(cursor, lowest[topic_filter] - 1)
            subs[topic_filter] = replace(state, cursor=max(cursor, 0))
        record = self.record
        record.subs = subs
        record.inflight = inflight
        self.qos2_in &= session.incoming_qos2  # released ones are done with
        record.qos2_in = sorted(self.qos2_in)
        record.expiry = session.expiry_interval
        record.away_since = None if session.connection is not None else wall
        return record

    async def flush(self) -> None:
        """Write the record if it changed (compare-and-swap on this node's revision)."""
        import nats.js.errors

        async with self.lock:
            self.ahead_due = False
            if not self.dirty or self.lost:
                return
            self.dirty = False
            self.snapshots += 1
            number = self.snapshots
            data = self.snapshot(time.time()).encode()
            try:
                self.revision = await self.store.kv.update(self.key, data, last=self.revision)
                connection = self.session.connection
                if connection is not None:  # what it held for this write goes out
                    connection.recorded(number)
                    self.store.wake()
            except nats.js.errors.KeyWrongLastSequenceError:
                self.lost = True  # claimed elsewhere without asking this node (it was slow)
                log.warning("fabric: session %r was claimed elsewhere", self.session.client_id)
                self.store.let_go(self.session)
            except Exception as exc:  # the fabric is down: try again at the next checkpoint
                self.dirty = True  # (held packets stay held until a write succeeds)
                log.debug("fabric: session record write failed: %s", exc)


class SessionStore:
    """This node's persistent sessions in ``FG_SESSIONS``; the core's session hooks."""

    checkpoint_s = 1.0
    sweep_interval_s = 60.0

    def __init__(
        self,
        node: str,
        core: BrokerCore,
        nc: NatsClient,
        *,
        replicas: int,
        clock: Callable[[], float],
        wake: Callable[[], None],
    ) -> None:
        self.node = node
        self._core = core
        self._nc = nc
        self._js = nc.jetstream(timeout=JS_TIMEOUT_S)
        self._replicas = replicas
        self._clock = clock
        self._wake = wake
        self.kv: KeyValue
        self._claims: dict[str, tuple[SessionRecord, int] | None] = {}
        self._feeds: set[SessionFeed] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.claimed = 0
        self.resumed = 0
        self.taken_over = 0
        self.swept = 0
        # A session ended in the fabric (swept, or a new one began): its client id.
        self.on_ended: Callable[[str], None] | None = None

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, timeout: float) -> None:
        from nats.js.api import KeyValueConfig, StorageType

        config = KeyValueConfig(
            bucket=BUCKET, history=1, storage=StorageType.FILE, replicas=self._replicas
        )
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            try:
                self.kv = await self._js.create_key_value(config)
                break
            except Exception:
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.2)
        await self._nc.subscribe(RELEASE_PREFIX + self.node, cb=self._on_release)
        await self._nc.subscribe(TAKEOVER_SUBJECT, cb=self._on_takeover)
        await self._nc.subscribe(HOLDS_PREFIX + self.node, cb=self._on_holds)
        for job in (self._checkpoints(), self._sweeps(), self._watchdog()):
            self.spawn(job)

    async def stop(self) -> None:
        """Write what the sessions' last moments changed (the core closed every connection
        first), then stop."""
        feeds = [s.fabric for s in self._core.sessions.values() if s.fabric is not None]
        await asyncio.gather(
            *(feed.flush() for feed in feeds if isinstance(feed, SessionFeed)),
            return_exceptions=True,
        )
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def metric_families(self) -> list[tuple[str, str, str, float]]:
        """(name, type, help, value) of the node's session figures for /metrics."""
        return [
            (
                "fabric_sessions_claimed_total",
                "counter",
                "Sessions claimed from FG_SESSIONS.",
                self.claimed,
            ),
            (
                "fabric_sessions_resumed_total",
                "counter",
                "Claims that resumed a stored session.",
                self.resumed,
            ),
            (
                "fabric_sessions_taken_over_total",
                "counter",
                "Sessions another node took from this one.",
                self.taken_over,
            ),
            (
                "fabric_sessions_swept_total",
                "counter",
                "Expired session records this node deleted.",
                self.swept,
            ),
            (
                "fabric_sessions_fed",
                "gauge",
                "Connected persistent sessions fed from FG_MSGS.",
                len(self._feeds),
            ),
        ]

    def wake(self) -> None:
        """Have the server write the connections' output at the end of this loop turn."""
        self._wake()

    def spawn(self, job: Any) -> None:
        task = asyncio.get_running_loop().create_task(job)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def queue_limit(self, session: Session) -> int:
        return min(self._core.settings.max_queued_messages, session.limits.max_queued_messages)

    # -- claim (before the CONNACK) ---------------------------------------------------------------

    async def claim(self, client_id: str, device_id: str, clean_start: bool, expiry: int) -> None:
        """Make this node the holder of ``client_id``'s session, per the CONNECT's flags.

        While the bucket has no leader (an election after a server died: 4-9 s) the CONNECT
        waits, up to ``CLAIM_PATIENCE_S``; then it is refused (Server unavailable)."""
        import nats.errors
        import nats.js.errors

        await self._let_go_locally(client_id, ends=clean_start)
        key = record_key(client_id)
        asked, conflicts = False, 0
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CLAIM_PATIENCE_S
        while True:
            try:
                try:
                    entry = await self.kv.get(key)
                    record = SessionRecord.decode(entry.value or b"")
                    revision: int | None = entry.revision
                except nats.js.errors.KeyNotFoundError:
                    record, revision = None, None
                holder = record.node if record is not None and record.away_since is None else ""
                if holder and holder != self.node and not asked:
                    asked = True  # live on another node: ask it to let go, then read again
                    if await self._ask_release(holder, client_id, clean_start):
                        continue
                resumed = record is not None and not clean_start and not record.expired(time.time())
                if not resumed:
                    record = None
                if record is None and expiry == 0:  # a clean session: no record
                    if revision is not None:
                        await self.kv.delete(key, last=revision)
                    if not asked:
                        await self._announce(client_id, ends=True)
                    self._claims[client_id] = None
                    return
                if record is None:
                    record = SessionRecord(device_id, self.node, expiry)
                record.node, record.away_since, record.expiry = self.node, None, expiry
                data = record.encode()
                if revision is None:
                    revision = await self.kv.create(key, data)
                else:
                    revision = await self.kv.update(key, data, last=revision)
            except nats.js.errors.KeyWrongLastSequenceError:
                conflicts += 1  # another node wrote it meanwhile: read again
                if conflicts > 10:
                    raise
                continue
            except (nats.errors.Error, TimeoutError):
                if loop.time() >= deadline:
                    raise
                await asyncio.sleep(0.25)
                continue
            break
        self.claimed += 1
        if not asked:
            await self._announce(client_id, ends=not resumed)
        self._claims[client_id] = (record, revision)
        if resumed:
            self.resumed += 1
            await self._restore(client_id, record, revision)

    async def _let_go_locally(self, client_id: str, *, ends: bool = False) -> None:
        """This node's own copy of the session (a takeover on the same node, or a client
        coming back): closed with 0x8E if live, its state written, forgotten; ``ends``: the
        client starts a new session, so this one ends and a will waiting for its delay is
        published now (MQTT 5 3.1.2.5), else the resumption cancels it."""
        session = self._core.sessions.get(client_id)
        if session is None:
            return
        self._close_here(session)
        feed = session.fabric
        if isinstance(feed, SessionFeed):
            await feed.flush()
        self._forget(session, with_will=ends)

    def abandon(self, client_id: str) -> None:
        """A claim whose client left before its CONNACK: forget it here. Its record still
        names this node as connected; the sweep finds this node does not hold it and starts
        its expiry."""
        self._claims.pop(client_id, None)
        session = self._core.sessions.get(client_id)
        if session is not None and session.connection is None:
            self._forget(session)

    def let_go(self, session: Session) -> None:
        """Another node holds the session now: close its connection here (0x8E), forget it."""
        self._close_here(session)
        self._forget(session)

    def _close_here(self, session: Session) -> None:
        if session.connection is not None:
            session.connection.take_over(self._clock())
            self._wake()

    def _forget(self, session: Session, *, with_will: bool = False) -> None:
        """Drop a session this node no longer holds, without its record, and without its
        will unless ``with_will`` (the session ends: a will waiting is published now)."""
        session.fabric = None
        if not with_will:
            session.pending_will = None
        if session.connection is None and self._core.sessions.get(session.client_id) is session:
            self._core.end_session(session, self._clock())

    async def _ask_release(self, node: str, client_id: str, ends: bool) -> bool:
        """True if the node answered (the record may have changed: read it again); False if
        it is gone or silent, and its last checkpoint stands."""
        try:
            await self._nc.request(
                RELEASE_PREFIX + node,
                client_id.encode(),
                timeout=RELEASE_TIMEOUT_S,
                headers=_ENDS if ends else None,
            )
        except Exception as exc:  # no responders: that node is gone
            log.info("fabric: node %s did not release %r: %s", node, client_id, exc)
            return False
        return True

    async def _announce(self, client_id: str, *, ends: bool) -> None:
        """Tell every node this client id connected here: one holding it live in a session
        without a record (clean) closes that connection with 0x8E, and one keeping an away
        copy of its persistent session (stale now: the record names this node) forgets it,
        so its shared subscriptions stop taking messages there, and publishes its waiting
        will if ``ends`` (a new session), else drops it. At most once, like all of core NATS:
        a copy missed is forgotten at its own expiry."""
        if ends and self.on_ended is not None:  # no echo: this node hears not its own
            self.on_ended(client_id)
        with contextlib.suppress(Exception):
            await self._nc.publish(
                TAKEOVER_SUBJECT,
                f"{self.node}\n{client_id}".encode(),
                headers=_ENDS if ends else None,
            )

    async def _on_takeover(self, msg: Msg) -> None:
        node, _, client_id = msg.data.decode(errors="replace").partition("\n")
        if node != self.node and _ends(msg) and self.on_ended is not None:
            self.on_ended(client_id)  # a will a survivor claimed for it is due now
        session = self._core.sessions.get(client_id)
        if node == self.node or session is None:
            return
        if session.connection is None:
            if session.fabric is not None and client_id not in self._claims:  # stale now
                self._forget(session, with_will=_ends(msg))
                self._wake()
        elif session.fabric is None:  # a clean session (a persistent one was asked to release)
            self.taken_over += 1
            self._close_here(session)

    def holds(self, client_id: str) -> bool:
        """Whether this node holds the session live (or is claiming it)."""
        session = self._core.sessions.get(client_id)
        live = session is not None and session.connection is not None
        return live or client_id in self._claims

    async def _holds(self, node: str, client_id: str) -> bool:
        import nats.errors

        if node == self.node:
            return self.holds(client_id)
        try:
            answer = await self._nc.request(
                HOLDS_PREFIX + node, client_id.encode(), timeout=RELEASE_TIMEOUT_S
            )
        except nats.errors.NoRespondersError:  # the node is gone
            return False
        except Exception:  # slow or unreachable: assume it is alive, ask at the next sweep
            return True
        return answer.data == b"yes"

    async def _on_holds(self, msg: Msg) -> None:
        with contextlib.suppress(Exception):
            await msg.respond(b"yes" if self.holds(msg.data.decode(errors="replace")) else b"no")

    async def _on_release(self, msg: Msg) -> None:
        """Another node takes over a session this node holds."""
        client_id = msg.data.decode(errors="replace")
        if self._core.sessions.get(client_id) is not None:
            self.taken_over += 1
        await self._let_go_locally(client_id, ends=_ends(msg))
        self._wake()
        with contextlib.suppress(Exception):
            await msg.respond(b"released")

    async def _restore(self, client_id: str, record: SessionRecord, revision: int) -> None:
        """The session as the record has it, in this node's core, before the CONNACK: its
        subscriptions, its QoS 2 ids, and its in-flight messages (resent with DUP on attach)."""
        stored = await asyncio.gather(
            *(self._stored(seq) for _, seq, _, stage in record.inflight if stage != RELEASED)
        )
        session = Session(client_id, record.device_id)
        session.incoming_qos2 = set(record.qos2_in)
        messages = iter(stored)
        for pid, _, _, stage in record.inflight:
            if stage == RELEASED:
                session.inflight[pid] = PubRel(packet_id=pid)
                continue
            found = next(messages)
            if found is not None:  # else aged out of the stream
                topic, payload = found
                ids = tuple(
                    sorted(
                        state.subscription_id
                        for f, state in record.subs.items()
                        if state.subscription_id is not None and topic_matches(f, topic)
                    )
                )
                session.inflight[pid] = Publish(
                    topic=topic,
                    payload=payload,
                    qos=_QOS[stage],
                    packet_id=pid,
                    dup=True,
                    properties=Properties(subscription_identifiers=ids) if ids else NO_PROPERTIES,
                )
        self._core.sessions[client_id] = session
        for topic_filter, state in record.subs.items():
            options = SubscriptionOptions(
                _QOS[state.qos], state.no_local, state.as_published, state.subscription_id
            )
            self._core.subscribe(session, topic_filter, options)  # no hooks yet: fabric unset
        for topic_filter, share in record.shares.items():  # a member of its groups again
            options = SubscriptionOptions(
                _QOS[share.qos], False, share.as_published, share.subscription_id
            )
            self._core.subscribe(session, topic_filter, options)
        # From now on live QoS 1/2 copies are not for it: they come from the stream.
        session.fabric = SessionFeed(self, session, record, revision)

    async def _stored(self, seq: int) -> tuple[str, bytes] | None:
        try:
            raw = await self._js.get_msg(STREAM, seq)
        except Exception:
            return None
        if raw.subject is None or raw.data is None:
            return None
        from broker.fabric.subjects import subject_to_topic

        return subject_to_topic(raw.subject[len(STREAM_PREFIX) :]), raw.data

    # -- the core's hooks -------------------------------------------------------------------------

    def attached(self, session: Session, now: float) -> None:
        claim = self._claims.pop(session.client_id, None)
        if claim is None:
            return
        record, revision = claim
        feed = session.fabric
        if not isinstance(feed, SessionFeed) or feed.session is not session:
            feed = SessionFeed(self, session, record, revision)
        # A filter's consumer starts after its highest sequence in flight: each one up to it
        # is resent from the record or was completed (out of order: the cursor stays below).
        resent: dict[str, int] = {}
        for pid, seq, topic_filter, _ in record.inflight:
            resent[topic_filter] = max(resent.get(topic_filter, 0), seq)
            if pid in session.inflight:
                feed.pid_seq[pid] = (topic_filter, seq)
        session.fabric = feed
        self._feeds.add(feed)
        for topic_filter, state in record.subs.items():
            if state.qos:
                self._open(feed, topic_filter, max(state.cursor, resent.get(topic_filter, 0)))

    def detached(self, session: Session, now: float) -> None:
        feed = session.fabric
        if not isinstance(feed, SessionFeed):
            return
        self._close_feeds(feed)
        feed.dirty = True
        self.spawn(feed.flush())

    def ended(self, session: Session, now: float) -> None:
        feed = session.fabric
        if not isinstance(feed, SessionFeed):
            return
        session.fabric = None
        self._close_feeds(feed)
        self.spawn(self._delete(feed))

    def subscribed(self, session: Session, topic_filter: str, options: SubscriptionOptions) -> None:
        feed = session.fabric
        if not isinstance(feed, SessionFeed):
            return
        if share_key(topic_filter) is not None:  # its messages come from the queue group
            feed.record.shares[topic_filter] = ShareState(
                int(options.qos), options.retain_as_published, options.subscription_id
            )
            feed.dirty = True
            return
        old = feed.record.subs.get(topic_filter)
        feed.record.subs[topic_filter] = FilterState(
            int(options.qos),
            options.no_local,
            options.retain_as_published,
            options.subscription_id,
            old.since if old else time.time() - SINCE_MARGIN_S,
            old.cursor if old else 0,
        )
        feed.dirty = True
        if options.qos and topic_filter not in feed.filters:
            self._open(feed, topic_filter, old.cursor if old else 0)
        elif not options.qos and topic_filter in feed.filters:
            self._close_filter(feed, topic_filter)

    def unsubscribed(self, session: Session, topic_filter: str) -> None:
        feed = session.fabric
        if not isinstance(feed, SessionFeed):
            return
        feed.record.subs.pop(topic_filter, None)
        feed.record.shares.pop(topic_filter, None)
        feed.dirty = True
        if topic_filter in feed.filters:
            self._close_filter(feed, topic_filter)

    async def _delete(self, feed: SessionFeed) -> None:
        async with feed.lock:
            if feed.lost:
                return
            feed.lost = True
            with contextlib.suppress(Exception):
                await self.kv.delete(feed.key, last=feed.revision)

    # -- consumers --------------------------------------------------------------------------------

    def _open(self, feed: SessionFeed, topic_filter: str, cursor: int) -> None:
        filter_feed = FilterFeed(topic_filter, cursor)
        feed.filters[topic_filter] = filter_feed
        self.spawn(self.restart(feed, filter_feed))

    def _close_filter(self, feed: SessionFeed, topic_filter: str) -> None:
        filter_feed = feed.filters.pop(topic_filter)
        feed.paused.pop(topic_filter, None)
        filter_feed.generation += 1
        self.spawn(self._drop_consumer(filter_feed.sub, filter_feed.consumer))

    def _close_feeds(self, feed: SessionFeed) -> None:
        """Stop the session's consumers; each filter keeps its position for the record."""
        self._feeds.discard(feed)
        for filter_feed in feed.filters.values():
            filter_feed.generation += 1
            self.spawn(self._drop_consumer(filter_feed.sub, filter_feed.consumer))
            filter_feed.sub, filter_feed.consumer = None, ""

    async def _drop_consumer(self, sub: Subscription | None, consumer: str) -> None:
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        if consumer:
            with contextlib.suppress(Exception):
                await self._js.delete_consumer(STREAM, consumer)

    async def restart(self, feed: SessionFeed, filter_feed: FilterFeed) -> None:
        """(Re)create the filter's consumer after the last sequence it handed on."""
        from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

        filter_feed.generation += 1
        generation = filter_feed.generation
        old_sub, old_consumer = filter_feed.sub, filter_feed.consumer
        filter_feed.sub, filter_feed.consumer = None, ""
        await self._drop_consumer(old_sub, old_consumer)
        state = feed.record.subs.get(filter_feed.filter)
        if state is None or feed.filters.get(filter_feed.filter) is not filter_feed:
            return
        subjects = [STREAM_PREFIX + s for s in filter_to_subjects(filter_feed.filter)]
        config = ConsumerConfig(
            deliver_subject=self._nc.new_inbox(),
            ack_policy=AckPolicy.NONE,
            mem_storage=True,
            num_replicas=1,
            idle_heartbeat=HEARTBEAT_S,
            inactive_threshold=INACTIVE_S,
        )
        if len(subjects) == 1:
            config.filter_subject = subjects[0]
        else:
            config.filter_subjects = subjects
        if filter_feed.handed:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = filter_feed.handed + 1
        else:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = dt.datetime.fromtimestamp(state.since, dt.UTC)

        async def on_message(msg: Msg) -> None:
            if filter_feed.generation == generation:
                self._on_stream(feed, filter_feed, msg)

        assert config.deliver_subject is not None
        try:
            sub = await self._nc.subscribe(config.deliver_subject, cb=on_message)
            filter_feed.expected = 1
            filter_feed.heard = self._clock()
            filter_feed.sub = sub
            info = await self._js.add_consumer(STREAM, config)
        except Exception as exc:  # a stream leader election, say: again in a second
            log.warning("fabric: consumer for %r failed: %s", filter_feed.filter, exc)
            await asyncio.sleep(RETRY_S)
            current = feed.filters.get(filter_feed.filter) is filter_feed
            if current and filter_feed.generation == generation:
                filter_feed.heard = self._clock()
                self.spawn(self.restart(feed, filter_feed))
            return
        if filter_feed.generation != generation:
            await self._drop_consumer(sub, info.name)
            return
        filter_feed.consumer = info.name

    def _on_stream(self, feed: SessionFeed, filter_feed: FilterFeed, msg: Msg) -> None:
        """A stream message (or heartbeat) from one filter's consumer."""
        now = self._clock()
        filter_feed.heard = now
        headers = msg.headers
        if not msg.reply:  # a status: a heartbeat naming the consumer's last sequence, or 409
            last = headers.get("Nats-Last-Consumer") if headers else None
            gone = headers is not None and headers.get("Status") == "409"  # consumer deleted
            if gone or (last is not None and int(last) != filter_feed.expected - 1):
                self.spawn(self.restart(feed, filter_feed))
            return
        seq, cseq, stored_at = _stream_position(msg.reply)
        if cseq != filter_feed.expected:  # a gap: start again after what was handed on
            self.spawn(self.restart(feed, filter_feed))
            return
        filter_feed.expected += 1
        if seq <= filter_feed.handed or filter_feed.filter in feed.paused:
            return
        session = feed.session
        if session.connection is None:
            return
        if len(session.queue) >= self.queue_limit(session):  # read it again once drained
            feed.paused[filter_feed.filter] = seq
            filter_feed.generation += 1
            self.spawn(self._drop_consumer(filter_feed.sub, filter_feed.consumer))
            return
        filter_feed.handed = seq
        feed.dirty = True
        delivery = self._delivery(feed, filter_feed.filter, msg, stored_at, now)
        if delivery is None:
            return
        feed.queued[id(delivery)] = (delivery, filter_feed.filter, seq)
        session.connection.send(delivery, now)
        self._wake()

    def _delivery(
        self, feed: SessionFeed, topic_filter: str, msg: Msg, stored_at: float, now: float
    ) -> Delivery | None:
        """What this filter delivers of a stream message: nothing if another of the session's
        filters is the one to deliver it, or none matches (no local, made after it)."""
        from broker.fabric.node import message_from_nats

        age = max(0.0, time.time() - stored_at)
        message = message_from_nats(msg.subject[len(STREAM_PREFIX) :], msg.data, msg.headers, now)
        if message is None:
            return None
        if message.expires_at is not None:
            message = replace(message, expires_at=message.expires_at - age)
        sender = msg.headers.get(SENDER_HEADER, "") if msg.headers else ""
        client_id = feed.session.client_id
        matching = [
            (f, state)
            for f, state in feed.record.subs.items()
            if state.qos
            and state.since <= stored_at
            and not (state.no_local and sender == client_id)
            and topic_matches(f, message.topic)
        ]
        if not matching or min(f for f, _ in matching) != topic_filter:
            return None
        qos = min(max(state.qos for _, state in matching), int(message.qos))
        ids = tuple(sorted(s.subscription_id for _, s in matching if s.subscription_id is not None))
        if message.properties is NO_PROPERTIES and not ids:
            return Delivery(message, _QOS[qos], False)
        return Delivery(message, _QOS[qos], False, ids)

    # -- background work --------------------------------------------------------------------------

    async def _checkpoints(self) -> None:
        while True:
            await asyncio.sleep(self.checkpoint_s)
            dirty = [
                feed
                for feed in self._feeds
                if feed.dirty or feed.session.inflight or feed.qos2_in - feed.session.incoming_qos2
            ]
            for feed in dirty:
                feed.dirty = True
            if dirty:
                await asyncio.gather(*(feed.flush() for feed in dirty))

    async def _watchdog(self) -> None:
        """Restart consumers that went quiet (their server died, say): no heartbeat within
        two intervals."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = self._clock()
            for feed in list(self._feeds):
                for topic_filter, filter_feed in feed.filters.items():
                    if topic_filter in feed.paused:
                        continue
                    if now - filter_feed.heard > 2 * HEARTBEAT_S:
                        filter_feed.heard = now
                        self.spawn(self.restart(feed, filter_feed))

    async def _sweeps(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_interval_s)
            try:
                await self.sweep()
            except Exception as exc:
                log.warning("fabric: session sweep failed: %s", exc)

    async def sweep(self) -> int:
        """Delete the records of sessions that expired while away (any node may; a record
        written meanwhile is not deleted: compare-and-swap)."""
        import nats.js.errors

        try:
            keys = await self.kv.keys()
        except nats.js.errors.NoKeysError:
            return 0
        wall = time.time()
        deleted = 0
        for key in keys:
            try:
                entry = await self.kv.get(key)
            except nats.js.errors.KeyNotFoundError:
                continue
            record = SessionRecord.decode(entry.value or b"")
            if record is None:
                continue
            if record.away_since is None:  # connected, if its node still holds it
                client_id = client_id_of(key)
                if await self._holds(record.node, client_id):
                    continue
                record.away_since = wall  # its node died: the expiry counts from now
                with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                    await self.kv.update(key, record.encode(), last=entry.revision)
                continue
            if not record.expired(wall):
                continue
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self.kv.delete(key, last=entry.revision)
                deleted += 1
                if self.on_ended is not None:  # its will, if still pending, is due now
                    self.on_ended(client_id_of(key))
        self.swept += deleted
        return deleted
