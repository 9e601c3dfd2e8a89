"""Group commit: several enrollments in one transaction, each answered only after its commit.

The registry's side (``Registry.record_enrollments``) runs on SQLite and PostgreSQL: one
certificate per id even inside one batch, a refused issuance rolled back alone (its savepoint)
while the others commit, an audit row for every issuance and an audit chain that still
verifies, and a real crash (SIGKILL just before ``COMMIT``) that loses the unanswered batch
whole and nothing answered before it. The batching side (``GroupCommit``) runs on the server's
real thread pool: what arrives while a commit runs goes into the next one, a per-item refusal
reaches its own caller only, and a failed commit reaches every caller of that batch and no other.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from cryptography import x509
from registry_helpers import new_registry
from test_registry import Signer
from test_registry_postgres import pg_server, pg_url  # noqa: F401 (fixtures: a fresh database)

from enrollment.group_commit import GroupCommit
from enrollment.registry import AuditRecord, CertStatus, DeviceState, Registry, SubjectKind
from enrollment.registry.devices import Issuance
from enrollment.workers import ServiceThreads
from fleetgate.errors import EnrollmentRefused

STATION = "line-1"


@pytest.fixture(scope="module")
def signer() -> Signer:
    return Signer()


@pytest.fixture(params=["sqlite", "postgresql"])
def registry(request: pytest.FixtureRequest, tmp_path: Path, signer: Signer) -> Iterator[Registry]:
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/registry.db"
    else:
        url = request.getfixturevalue("pg_url")
    reg = new_registry(url)
    reg.add_station(STATION, signer.station(STATION), actor="test")
    yield reg
    reg.close()


def issuance(signer: Signer, device_id: str, station: str = STATION) -> Issuance:
    cert = signer.device(device_id)
    audit = AuditRecord(f"station:{station}", "enroll", "ok", device_id, f"{cert.serial_number:x}")
    return Issuance(station, device_id, cert, audit)


def enroll_outcomes(registry: Registry, subject: str) -> list[str]:
    return [e.outcome for e in registry.audit_events(subject=subject) if e.action == "enroll"]


def active_serials(registry: Registry, device_id: str) -> list[str]:
    rows = registry.certificates_of(SubjectKind.DEVICE, device_id)
    return [r.serial for r in rows if r.status == CertStatus.ACTIVE]


def test_one_transaction_commits_every_issuance_of_a_batch_with_its_audit_row(registry, signer):
    ids = [f"unit-{n}" for n in range(6)]
    registry.add_batch(STATION, ids, group="default", label="", actor="t")
    batch = [issuance(signer, d) for d in ids]

    assert registry.record_enrollments(batch) == [None] * 6

    for item in batch:
        assert registry.device(item.device_id).state == DeviceState.ACTIVE
        assert active_serials(registry, item.device_id) == [f"{item.cert.serial_number:x}"]
        assert enroll_outcomes(registry, item.device_id) == ["ok"]
    assert registry.verify_audit_chain().ok


def test_two_issuances_of_one_id_in_one_batch_commit_one_certificate(registry, signer):
    registry.add_batch(STATION, ["sensor-1", "sensor-2"], group="default", label="", actor="t")
    first, second, other = (
        issuance(signer, "sensor-1"),
        issuance(signer, "sensor-1"),
        issuance(signer, "sensor-2"),
    )

    refusals = registry.record_enrollments([first, second, other])

    assert refusals[0] is None and refusals[2] is None
    assert isinstance(refusals[1], EnrollmentRefused)
    assert "was enrolled by a concurrent request" in refusals[1].message
    assert active_serials(registry, "sensor-1") == [f"{first.cert.serial_number:x}"]
    assert registry.certificate(second.cert.serial_number) is None
    assert enroll_outcomes(registry, "sensor-1") == ["ok"]  # the refusal is the caller's to audit
    assert active_serials(registry, "sensor-2") == [f"{other.cert.serial_number:x}"]
    assert registry.verify_audit_chain().ok


def test_refused_issuances_in_the_middle_of_a_batch_roll_back_alone(registry, signer):
    registry.add_station("line-2", signer.station("line-2"), actor="t")
    registry.add_batch(STATION, ["a", "b", "c", "e"], group="default", label="", actor="t")
    registry.add_batch("line-2", ["d"], group="default", label="", actor="t")
    # b's certificate reuses a stored serial: the certificate row's unique key refuses it after
    # b's device row and batch entry were already changed in the transaction.
    taken = registry.certificates_of(SubjectKind.STATION, STATION)[0]
    clash = x509.load_pem_x509_certificate(taken.pem.encode())
    b = Issuance(STATION, "b", clash, AuditRecord("station:line-1", "enroll", "ok", "b"))
    d = issuance(signer, "d")  # d is line-2's device, not this station's
    a, c, e = issuance(signer, "a"), issuance(signer, "c"), issuance(signer, "e")

    refusals = registry.record_enrollments([a, b, c, d, e])

    assert [r is None for r in refusals] == [True, False, True, False, True]
    assert "already has an active certificate" in str(refusals[1])
    for refused in ("b", "d"):
        assert registry.device(refused).state == DeviceState.PENDING
        assert registry.certificates_of(SubjectKind.DEVICE, refused) == []
        assert enroll_outcomes(registry, refused) == []
    registry.check_may_enroll(STATION, "b")  # the batch entry is untouched: b may enroll again
    for item in (a, c, e):
        assert active_serials(registry, item.device_id) == [f"{item.cert.serial_number:x}"]
        assert enroll_outcomes(registry, item.device_id) == ["ok"]
    check = registry.verify_audit_chain()
    assert check.ok, check
    assert registry.record_enrollments([issuance(signer, "b")]) == [None]
    assert registry.verify_audit_chain().ok


# A child process that commits one batch, says so, then dies by SIGKILL the moment the second
# batch's transaction reaches COMMIT (sqlite3's trace callback sees the statement before it runs).
CRASHING_CHILD = textwrap.dedent(
    """
    import os, signal, sys
    from sqlalchemy import event
    from sqlalchemy.engine import Engine
    from test_registry import Signer
    from test_group_commit import issuance
    from enrollment.registry import Registry

    armed = False

    def trace(statement):
        if armed and statement.strip().upper() == "COMMIT":
            os.kill(os.getpid(), signal.SIGKILL)

    @event.listens_for(Engine, "connect")
    def _trace(dbapi_conn, _record):
        dbapi_conn.set_trace_callback(trace)

    registry = Registry(sys.argv[1])

    signer = Signer()
    first = [issuance(signer, d) for d in ("ack-1", "ack-2", "ack-3")]
    assert registry.record_enrollments(first) == [None] * 3
    print("acknowledged", flush=True)
    armed = True
    registry.record_enrollments([issuance(signer, d) for d in ("lost-1", "lost-2", "lost-3")])
    print("the second batch committed", flush=True)
    """
)


def test_a_crash_before_commit_loses_the_unanswered_batch_whole_and_nothing_answered(
    tmp_path, signer
):
    url = f"sqlite:///{tmp_path}/registry.db"
    registry = new_registry(url)
    try:
        registry.add_station(STATION, signer.station(STATION), actor="test")
        acked, lost = ["ack-1", "ack-2", "ack-3"], ["lost-1", "lost-2", "lost-3"]
        registry.add_batch(STATION, acked + lost, group="default", label="", actor="t")
    finally:
        registry.close()
    tests = Path(__file__).parent  # the child imports the test helpers from here

    child = subprocess.run(
        [sys.executable, "-c", CRASHING_CHILD, url],
        cwd=tests,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert child.stdout.splitlines() == ["acknowledged"]
    registry = Registry(url)
    try:
        for device_id in acked:
            assert registry.device(device_id).state == DeviceState.ACTIVE
            assert len(active_serials(registry, device_id)) == 1
            assert enroll_outcomes(registry, device_id) == ["ok"]
        for device_id in lost:
            assert registry.device(device_id).state == DeviceState.PENDING
            assert registry.certificates_of(SubjectKind.DEVICE, device_id) == []
            assert enroll_outcomes(registry, device_id) == []
        assert registry.verify_audit_chain().ok
    finally:
        registry.close()


# -- batching: GroupCommit on the server's thread pool ------------------------------------------


class Committer:
    """A commit function that records its batches, can be held at its start, and answers per
    item: ``"refuse"`` gets its own exception, ``"fail"`` fails the whole batch."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def __call__(self, items: Sequence[str]) -> list[str | BaseException]:
        self.batches.append(list(items))
        self.started.set()
        assert self.release.wait(20)
        if "fail" in items:
            raise OSError("the transaction failed")
        return [EnrollmentRefused(f"{i} refused") if i == "refuse" else i.upper() for i in items]


@pytest.fixture
def threads() -> Iterator[ServiceThreads]:
    pool = ServiceThreads(1)
    yield pool
    pool.shutdown()


async def _gather(group: GroupCommit[str, str], items: Sequence[str]) -> list[object]:
    return await asyncio.gather(*(group.submit(i) for i in items), return_exceptions=True)


def test_what_arrives_during_a_commit_goes_into_the_next_one(threads):
    committer = Committer()
    committer.release.clear()

    async def scenario() -> tuple[object, list[object]]:
        group = GroupCommit(committer, threads.run)
        first = asyncio.ensure_future(group.submit("a"))
        assert await asyncio.to_thread(committer.started.wait, 20)  # "a" is being committed
        later = asyncio.ensure_future(_gather(group, ["b", "c", "d", "e"]))
        await asyncio.sleep(0)  # the four are queued behind the running commit
        committer.release.set()
        return await first, await later

    first, later = asyncio.run(scenario())

    assert (first, later) == ("A", ["B", "C", "D", "E"])
    assert committer.batches == [["a"], ["b", "c", "d", "e"]]


def test_a_refusal_reaches_its_own_caller_and_a_failed_commit_every_caller_of_its_batch(threads):
    committer = Committer()
    committer.release.clear()

    async def scenario() -> tuple[object, list[object], list[object]]:
        group = GroupCommit(committer, threads.run)
        first = asyncio.ensure_future(group.submit("x"))
        assert await asyncio.to_thread(committer.started.wait, 20)
        doomed = asyncio.ensure_future(_gather(group, ["f", "fail", "g"]))
        await asyncio.sleep(0)
        committer.release.set()
        await first
        mixed = await _gather(group, ["h", "refuse", "i"])  # the next batch commits as usual
        return await first, await doomed, mixed

    first, doomed, mixed = asyncio.run(scenario())

    assert first == "X"
    assert [type(o) for o in doomed] == [OSError] * 3
    assert mixed[0] == "H" and mixed[2] == "I"
    assert isinstance(mixed[1], EnrollmentRefused)
    assert committer.batches == [["x"], ["f", "fail", "g"], ["h", "refuse", "i"]]


def test_a_batch_never_exceeds_its_bound(threads):
    committer = Committer()
    committer.release.clear()

    async def scenario() -> list[object]:
        group = GroupCommit(committer, threads.run, max_batch=3)
        first = asyncio.ensure_future(group.submit("a"))
        assert await asyncio.to_thread(committer.started.wait, 20)
        rest = asyncio.ensure_future(_gather(group, list("bcdefgh")))
        await asyncio.sleep(0)
        committer.release.set()
        return [await first, *await rest]

    assert asyncio.run(scenario()) == list("ABCDEFGH")
    assert committer.batches == [["a"], ["b", "c", "d"], ["e", "f", "g"], ["h"]]
