"""An impairment proxy between simulated devices and the broker: delay, jitter, loss,
bandwidth, a partition (blackhole) and connection resets, switchable while the run goes on.

This kernel has no ``netem`` qdisc, so impairment happens in user space, on the byte stream of
each TCP connection (TLS passes through untouched). What that means per impairment:

* delay and jitter: each chunk read is released ``delay ± jitter`` later, never before the
  chunk ahead of it (TCP keeps order, so jitter cannot reorder bytes);
* loss: a lost segment on a TCP connection reaches the application as a retransmission
  timeout's worth of delay, so a "lost" chunk is held back one RTO (200 ms, Linux's minimum);
* bandwidth: one token bucket per direction, shared by every connection (a shared uplink);
* partition: nothing is forwarded until it heals; connections stay open, as through a
  blackhole, and what was held back flows when it heals (unless keep-alives gave up first);
* reset: every open connection is aborted (RST) at once.

With ``netem`` a kernel adds real packet loss, duplication, corruption and reordering below TCP,
per-packet rather than per-read delay, and rate limits that include headers.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from dataclasses import dataclass

RTO_S = 0.2
CHUNK = 65536


@dataclass
class Impairment:
    delay_s: float = 0.0
    jitter_s: float = 0.0
    loss: float = 0.0
    bandwidth_bps: float = 0.0  # bits per second per direction; 0: unlimited

    @property
    def active(self) -> bool:
        return bool(self.delay_s or self.loss or self.bandwidth_bps)


class _Direction:
    """One direction's shared bandwidth budget."""

    def __init__(self) -> None:
        self.next_free = 0.0


class ImpairmentProxy:
    """Listens on a loopback port and forwards each connection to ``target``."""

    def __init__(self, target_host: str, target_port: int, *, seed: int = 1) -> None:
        self.target = (target_host, target_port)
        self.impairment = Impairment()
        self.rng = random.Random(seed)  # noqa: S311 - simulated network noise
        self._healed = asyncio.Event()
        self._healed.set()
        self._links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._up = _Direction()
        self._down = _Direction()
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.resets = 0

    async def start(self, host: str = "127.0.0.1") -> int:
        self._server = await asyncio.start_server(self._accept, host, 0, backlog=4096)
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, reset every connection, and wait for their pumps to end."""
        if self._server is not None:
            self._server.close()
        self._healed.set()
        self.reset()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=5)

    def impair(self, impairment: Impairment) -> None:
        self.impairment = impairment

    def partition(self, on: bool) -> None:
        if on:
            self._healed.clear()
        else:
            self._healed.set()

    def reset(self) -> None:
        """Abort every open connection, both sides (each sees a reset)."""
        for client, upstream in list(self._links):
            client.transport.abort()
            upstream.transport.abort()
            self.resets += 1
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        link = (writer, up_writer)
        self._links.add(link)
        try:
            await asyncio.gather(
                self._pump(reader, up_writer, self._up),
                self._pump(up_reader, writer, self._down),
            )
        finally:
            self._links.discard(link)
            for side in link:
                side.transport.abort()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: _Direction
    ) -> None:
        """Forward one direction; released in order, each chunk at its impaired time."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()
        held = [0]  # chunks queued or being written: the fast path must not overtake them
        sender = asyncio.create_task(self._release(queue, writer, held))
        last = 0.0
        try:
            while data := await reader.read(CHUNK):
                imp = self.impairment
                if not imp.active and self._healed.is_set() and not held[0]:
                    writer.write(data)
                    await writer.drain()
                    continue
                now = time.monotonic()
                release = now + imp.delay_s
                if imp.jitter_s:
                    release += self.rng.uniform(-imp.jitter_s, imp.jitter_s)
                if imp.loss and self.rng.random() < imp.loss:
                    release += RTO_S
                if imp.bandwidth_bps:
                    direction.next_free = max(now, direction.next_free) + (
                        len(data) * 8 / imp.bandwidth_bps
                    )
                    release = max(release, direction.next_free)
                last = max(last, release)
                held[0] += 1
                queue.put_nowait((last, data))
        except (ConnectionError, OSError):
            pass
        finally:
            queue.put_nowait((0.0, b""))
            with contextlib.suppress(ConnectionError, OSError, asyncio.CancelledError):
                await sender
            writer.transport.abort()

    async def _release(
        self,
        queue: asyncio.Queue[tuple[float, bytes]],
        writer: asyncio.StreamWriter,
        held: list[int],
    ) -> None:
        while True:
            release, data = await queue.get()
            if not data:
                return
            await self._healed.wait()  # a partition holds everything back
            wait = release - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(data)
            await writer.drain()
            held[0] -= 1


__all__ = ["Impairment", "ImpairmentProxy"]
