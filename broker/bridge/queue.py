"""One bridge's outgoing messages between the device's PUBACK and the upstream's (pure).

Every message here is already committed to the durable store (or being committed: its room is
reserved). The queue keeps the bounds, the order and the in-flight window; the store keeps the
bytes. Only a read-ahead window of messages sits in memory: beyond ``ram_limit`` new messages
stay on disk and are read back in order when the window drains, so a long outage costs disk,
not memory.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

RAM_LIMIT = 4096
"""Messages of one bridge held in memory, ready to send; the rest waits on disk."""


@dataclass(slots=True)
class Queued:
    """A message on its way upstream; ``topic`` is already the upstream's name for it and
    ``properties`` the MQTT 5 encoding of its properties (length first, origin marker in), as
    stored: forwarding copies bytes, it does not encode properties again."""

    seq: int
    topic: str
    payload: bytes
    retain: bool
    properties: bytes
    enqueued_at: float  # wall clock, seconds since the epoch
    size: int
    sent: bool = False  # sent before: sending again may duplicate it upstream

    @property
    def packet_id(self) -> int:
        """Fixed by the sequence number, so a resend after a restart reuses the same id."""
        return self.seq % 0xFFFF + 1


class OutQueue:
    """Bounds, order and in-flight window of one bridge's queue."""

    def __init__(self, *, max_messages: int, max_bytes: int, ram_limit: int = RAM_LIMIT) -> None:
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.messages = 0  # stored or being stored, not yet acknowledged upstream
        self.bytes = 0
        self._ram_limit = ram_limit
        self._ram: deque[Queued] = deque()
        self._inflight: dict[int, Queued] = {}  # by packet id, in send order
        self._stored_to = 0  # highest sequence number committed for this bridge
        self._read_to = 0  # highest sequence number moved from disk (or the commit) to memory
        self._oldest_on_disk: float | None = None  # None: nothing waits on disk only
        self._unstored = 0  # reserved, their commit not done yet
        self._unstored_since: float | None = None  # when the oldest of those was queued

    # -- the device side -------------------------------------------------------------------------

    def reserve(self, size: int, now: float) -> bool:
        """Make room for one message of ``size`` bytes queued at ``now`` (wall clock); False
        when a bound would be passed."""
        if self.messages >= self.max_messages or self.bytes + size > self.max_bytes:
            return False
        self.messages += 1
        self.bytes += size
        if not self._unstored:
            self._unstored_since = now
        self._unstored += 1
        return True

    def unreserve(self, size: int) -> None:
        """A reserved message was not stored after all (the write failed)."""
        self.messages -= 1
        self.bytes -= size
        self._unstored -= 1
        if not self._unstored:
            self._unstored_since = None

    def stored(self, item: Queued) -> None:
        """``item`` is committed; sequence numbers arrive in increasing order, in the order
        of their reservations."""
        self._unstored -= 1
        # those still being committed were queued after this one: its time bounds their age
        self._unstored_since = item.enqueued_at if self._unstored else None
        caught_up = self._read_to == self._stored_to
        self._stored_to = item.seq
        if caught_up and len(self._ram) < self._ram_limit:
            self._ram.append(item)
            self._read_to = item.seq
        elif self._oldest_on_disk is None:
            self._oldest_on_disk = item.enqueued_at

    # -- recovery: what the store holds ------------------------------------------------------------

    def recovered(self, *, messages: int, size: int, last_seq: int, oldest: float | None) -> None:
        """The store's figures at start-up: everything there is still to be sent."""
        self.messages, self.bytes = messages, size
        self._stored_to = last_seq
        self._oldest_on_disk = oldest

    def load_from(self) -> int | None:
        """The sequence number to read the store after, when memory wants more; else ``None``."""
        if self._read_to < self._stored_to and len(self._ram) < self._ram_limit // 2:
            return self._read_to
        return None

    def loaded(self, items: list[Queued]) -> None:
        """Messages read back from the store, in order, after :meth:`load_from`."""
        for item in items:
            if item.seq > self._read_to:
                self._ram.append(item)
                self._read_to = item.seq
        if items:  # what is left on disk was queued after the last message read
            self._oldest_on_disk = (
                items[-1].enqueued_at if self._read_to < self._stored_to else None
            )

    # -- the upstream side -----------------------------------------------------------------------

    def take(self, room: int) -> list[Queued]:
        """Up to ``room`` messages to send now, in order; they stay in flight until acked."""
        batch: list[Queued] = []
        ram, inflight = self._ram, self._inflight
        while ram and len(batch) < room:
            item = ram[0]
            packet_id = item.seq % 0xFFFF + 1  # item.packet_id, without the property call
            if packet_id in inflight:
                break  # 65,535 sequence numbers behind a message still unacknowledged
            ram.popleft()
            inflight[packet_id] = item
            batch.append(item)
        return batch

    def acked(self, packet_id: int) -> Queued | None:
        """The upstream acknowledged ``packet_id``: the message leaves the queue."""
        item = self._inflight.pop(packet_id, None)
        if item is not None:
            self.messages -= 1
            self.bytes -= item.size
        return item

    def acked_many(self, packet_ids: list[int]) -> list[Queued]:
        """:meth:`acked` for each of ``packet_ids`` (ids not in flight are skipped)."""
        pop, done, size = self._inflight.pop, [], 0
        for packet_id in packet_ids:
            item = pop(packet_id, None)
            if item is not None:
                done.append(item)
                size += item.size
        self.messages -= len(done)
        self.bytes -= size
        return done

    def rewind(self) -> None:
        """The connection is gone: unacknowledged messages go first on the next one."""
        self._ram.extendleft(sorted(self._inflight.values(), key=lambda q: q.seq, reverse=True))
        self._inflight.clear()

    def floor(self) -> int:
        """The lowest sequence number of this bridge not yet acknowledged upstream (or the next
        one to be stored): every stored message of this bridge below it was acknowledged."""
        first = next(iter(self._inflight.values()), None)
        low = self._stored_to + 1
        if self._read_to < self._stored_to:
            low = self._read_to + 1
        if self._ram:
            low = min(low, self._ram[0].seq)
        if first is not None:
            low = min(low, first.seq)
        return low

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    @property
    def ready(self) -> bool:
        """Something in memory could be sent."""
        return bool(self._ram)

    @property
    def full(self) -> bool:
        return self.messages >= self.max_messages or self.bytes >= self.max_bytes

    def oldest(self) -> float | None:
        """When the oldest message still unacknowledged was queued (wall clock); ``None`` only
        for an empty queue. Of messages only on disk or still being committed, the time is
        that of the message just before them: at most one arrival too early."""
        first = next(iter(self._inflight.values()), None)
        candidates = [] if first is None else [first.enqueued_at]
        if self._ram:
            candidates.append(self._ram[0].enqueued_at)
        if self._oldest_on_disk is not None:
            candidates.append(self._oldest_on_disk)
        if self._unstored_since is not None:
            candidates.append(self._unstored_since)
        return min(candidates) if candidates else None
