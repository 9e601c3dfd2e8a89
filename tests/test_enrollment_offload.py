"""The pieces that keep the enrollment server's event loop free: its thread pool and the
batched audit writer (shared with the broker)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from enrollment.audit_writer import AuditWriter
from enrollment.errors import NotAuthorised
from enrollment.registry import AuditRecord, Registry
from enrollment.workers import ServiceThreads, service_threads


@pytest.fixture
def registry(tmp_path: Path) -> Iterator[Registry]:
    reg = Registry(f"sqlite:///{tmp_path / 'registry.db'}")
    yield reg
    reg.close()


def test_service_threads_return_results_raise_refusals_and_count_calls_in_flight() -> None:
    threads = ServiceThreads(2)
    entered = threading.Barrier(3, timeout=10)

    def meet() -> str:
        entered.wait()  # both calls and the test: the two run at once
        entered.wait()
        return threading.current_thread().name

    def refuse() -> None:
        raise NotAuthorised("no")

    async def scenario() -> None:
        both = asyncio.gather(threads.run(meet), threads.run(meet))
        await asyncio.to_thread(entered.wait)
        assert threads.in_flight == 2
        await asyncio.to_thread(entered.wait)
        names = await both
        assert len(set(names)) == 2 and all(n.startswith("fleetgate-est-") for n in names)
        with pytest.raises(NotAuthorised):
            await threads.run(refuse)

    try:
        asyncio.run(scenario())
    finally:
        threads.shutdown()
    assert (threads.in_flight, threads.peak_in_flight) == (0, 2)


def test_a_call_whose_caller_was_cancelled_still_runs_to_its_end() -> None:
    threads = ServiceThreads(1)
    release, finished = threading.Event(), threading.Event()

    def slow() -> None:
        release.wait(10)
        finished.set()

    async def scenario() -> None:
        task = asyncio.ensure_future(threads.run(slow))
        await asyncio.sleep(0)  # one loop turn: the task has queued its call
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()

    asyncio.run(scenario())
    threads.shutdown()  # waits for the call
    assert finished.is_set()


def test_the_sqlite_registry_gets_one_service_thread(registry: Registry) -> None:
    assert service_threads(registry) == 1


def test_audit_writer_loses_no_batch_when_its_task_is_cancelled_mid_commit(
    registry: Registry,
) -> None:
    """The enrollment server cancels the writer's task at stop, then flushes: a batch that was
    waiting for a thread at that moment is still stored, in order, and counted once."""
    threads = ServiceThreads(1)
    gate = threading.Event()
    handed: list[asyncio.Event] = []

    async def gated(call: Callable[[], bool]) -> bool:
        handed[0].set()
        return await threads.run(lambda: gate.wait(10) and call())

    def record(n: int) -> AuditRecord:
        return AuditRecord(f"peer:{n}", "tls.handshake", "refused", None, "test")

    async def scenario() -> AuditWriter:
        handed.append(asyncio.Event())
        writer = AuditWriter(registry, offload=gated)
        runner = asyncio.create_task(writer.run())
        writer.submit(record(1))
        await handed[0].wait()  # the batch [1] is on its way to the (gated) thread
        runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
        writer.submit(record(2))
        gate.set()
        await writer.flush()
        return writer

    try:
        writer = asyncio.run(scenario())
    finally:
        threads.shutdown()
    actors = [e.actor for e in registry.audit_events() if e.action == "tls.handshake"]
    assert actors == ["peer:1", "peer:2"]
    assert (writer.counts.audit_written, writer.counts.audit_dropped) == (2, 0)
