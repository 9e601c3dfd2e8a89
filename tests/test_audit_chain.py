"""The audit trail's hash chain (issue 11): every writer extends one chain, ``verify`` names the
first row that was changed or removed, and ``archive`` moves the oldest rows to a file without
breaking what stays, while a plain DELETE is still refused. On SQLite and on PostgreSQL.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from registry_helpers import new_registry
from sqlalchemy.exc import DBAPIError
from test_cli import Cli
from test_registry_migrations import _made_by_main as _sqlite_made_by_main
from test_registry_postgres import _database, pg_server, pg_url  # noqa: F401 - fixtures
from test_registry_postgres import _made_by_main as _pg_made_by_main

from enrollment.registry import AuditRecord, Registry
from enrollment.registry.audit import AuditChainBroken, verify_archive
from enrollment.registry.chain import GENESIS
from enrollment.registry.schema import upgrade
from fleetgate.config import Config

# SQL that lifts the append-only trigger, as only the database's owner can.
_LIFT_TRIGGERS = {
    "sqlite": (
        "DROP TRIGGER IF EXISTS auditevent_append_only_update",
        "DROP TRIGGER IF EXISTS auditevent_append_only_delete",
    ),
    "postgresql": ("ALTER TABLE auditevent DISABLE TRIGGER auditevent_append_only",),
}


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'registry.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def registry(url: str) -> Iterator[Registry]:
    reg = new_registry(url)
    yield reg
    reg.close()


def _write(registry: Registry, *actions: str) -> None:
    """One row per action, alternately alone and inside a larger transaction."""
    for n, action in enumerate(actions):
        record = AuditRecord("admin:test", action, "ok", f"sensor-{n}", 'é and "quotes"')
        if n % 2:
            with registry.transaction() as session:
                registry.audit(record, session)
        else:
            registry.audit(record)


def _as_owner(registry: Registry, *statements: str) -> None:
    with registry.engine.begin() as conn:
        for statement in (*_LIFT_TRIGGERS[registry.engine.dialect.name], *statements):
            conn.exec_driver_sql(statement)


def _hashes(registry: Registry) -> list[tuple[int, str]]:
    with registry.engine.connect() as conn:
        return [
            (row[0], row[1])
            for row in conn.exec_driver_sql("SELECT id, row_hash FROM auditevent ORDER BY id")
        ]


def test_every_row_links_to_the_one_before_and_verify_reports_the_head(registry):
    assert registry.verify_audit_chain().checked == 0
    _write(registry, "a", "b", "c", "d")
    with registry.transaction() as session:  # a batch, as the broker's AuditWriter commits it
        for action in ("e", "f"):
            registry.audit(AuditRecord("device:d", action, "refused", "d"), session)
    check = registry.verify_audit_chain()
    rows = _hashes(registry)
    assert [i for i, _ in rows] == [1, 2, 3, 4, 5, 6]
    assert (check.ok, check.checked, check.head) == (True, 6, rows[-1][1])


def test_a_changed_row_is_named(registry):
    _write(registry, "a", "b", "c")
    _as_owner(registry, "UPDATE auditevent SET reason = 'forged' WHERE id = 2")
    check = registry.verify_audit_chain()
    assert (check.ok, check.broken_id, check.checked) == (False, 2, 1)
    assert "changed" in check.problem


def test_a_changed_row_with_a_recomputed_hash_breaks_the_next_link(registry):
    _write(registry, "a", "b", "c")
    _as_owner(
        registry, "UPDATE auditevent SET reason = 'forged', row_hash = prev_hash WHERE id = 2"
    )
    check = registry.verify_audit_chain()
    assert (check.broken_id, check.checked) == (2, 1)  # its own hash no longer matches
    _as_owner(registry, "DELETE FROM auditevent WHERE id = 2")
    check = registry.verify_audit_chain()
    assert (check.broken_id, check.problem) == (3, "does not link to the row before it")


def test_concurrent_writers_in_their_own_connections_extend_one_chain(url, registry):
    writers = [Registry(url) for _ in range(4)]
    start = threading.Barrier(len(writers))

    def write(reg: Registry, n: int) -> None:
        start.wait()
        _write(reg, *(f"w{n}-{i}" for i in range(15)))

    threads = [threading.Thread(target=write, args=(r, n)) for n, r in enumerate(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for reg in writers:
        reg.close()
    check = registry.verify_audit_chain()
    assert (check.ok, check.checked) == (True, 60)


def test_archive_round_trip_keeps_the_chain_and_a_plain_delete_is_still_refused(registry, tmp_path):
    _write(registry, "old-1", "old-2", "old-3")
    cut = dt.datetime.now(dt.UTC)
    _write(registry, "new-1", "new-2")
    first = tmp_path / "archive-1.jsonl"

    summary = registry.archive_audit(cut, first, actor="admin:test")

    assert (summary.count, summary.last_id) == (3, 3)
    assert stat.S_IMODE(first.stat().st_mode) == 0o600
    check, start = verify_archive(first)
    assert (check.checked, start, check.head) == (3, GENESIS, summary.last_hash)
    lines = first.read_text().splitlines()
    assert [json.loads(line)["action"] for line in lines[:-1]] == ["old-1", "old-2", "old-3"]
    assert json.loads(lines[-1])["trailer"]["count"] == 3
    remaining = registry.audit_events()
    assert [e.action for e in remaining] == ["new-1", "new-2", "audit.archive"]
    assert registry.verify_audit_chain().checked == 3

    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM auditevent")
    with pytest.raises(DBAPIError, match="append-only"), registry.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM auditevent WHERE id = 4")
    with pytest.raises(DBAPIError, match="moves only forward"), registry.engine.begin() as conn:
        conn.exec_driver_sql("UPDATE auditanchor SET last_id = 5, last_hash = 'forged'")
    with pytest.raises(DBAPIError, match="moves only forward"), registry.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM auditanchor")

    # Everything else, later: the second archive continues where the first one ended.
    _write(registry, "after")
    second = tmp_path / "archive-2.jsonl"
    later = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    assert registry.archive_audit(later, second, actor="admin:test").count == 4
    check, start = verify_archive(second)
    assert start == summary.last_hash
    again = registry.verify_audit_chain()
    assert (again.ok, again.checked) == (True, 1)  # the second archive's own audit row
    assert registry.archive_audit(cut, tmp_path / "none.jsonl", actor="t").count == 0
    assert not (tmp_path / "none.jsonl").exists()


def test_an_archive_with_a_changed_row_or_trailer_is_refused(registry, tmp_path):
    _write(registry, "a", "b", "c")
    path = tmp_path / "a.jsonl"
    registry.archive_audit(dt.datetime.now(dt.UTC), path, actor="admin:test")
    original = path.read_text()
    path.write_text(original.replace('"action":"b"', '"action":"x"'))
    with pytest.raises(AuditChainBroken, match="body does not match"):
        verify_archive(path)
    lines = original.splitlines(keepends=True)
    body = "".join(lines[:-1]).replace('"action":"b"', '"action":"x"')
    trailer = json.loads(lines[-1])
    trailer["trailer"]["body_sha256"] = hashlib.sha256(body.encode()).hexdigest()
    path.write_text(body + json.dumps(trailer) + "\n")
    with pytest.raises(AuditChainBroken, match="audit row 2 does not match its hash"):
        verify_archive(path)


def test_a_broken_chain_is_not_archived(registry, tmp_path):
    _write(registry, "a", "b", "c")
    _as_owner(registry, "UPDATE auditevent SET actor = 'someone-else' WHERE id = 1")
    with pytest.raises(AuditChainBroken, match=r"audit row 1 .* nothing was archived"):
        registry.archive_audit(dt.datetime.now(dt.UTC), tmp_path / "a.jsonl", actor="t")
    assert not (tmp_path / "a.jsonl").exists()


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_the_upgrade_chains_the_rows_an_older_registry_holds(request, tmp_path, dialect):
    if dialect == "sqlite":
        _sqlite_made_by_main(tmp_path / "main.db")
        url = f"sqlite:///{tmp_path / 'main.db'}"
    else:
        url = request.getfixturevalue("pg_url")
        _pg_made_by_main(request.getfixturevalue("pg_server"), _database(url))
    upgrade(url)
    registry = Registry(url)
    try:
        before = registry.verify_audit_chain()
        assert before.ok and before.checked >= 1
        registry.audit(AuditRecord("admin:test", "probe", "ok"))
        assert registry.verify_audit_chain().checked == before.checked + 1
    finally:
        registry.close()


# -- the command line ----------------------------------------------------------------------------


def test_audit_verify_and_archive_from_the_command_line(config: Config, tmp_path: Path):
    registry = Registry(config.database_url)
    _write(registry, "a", "b")
    fleet = Cli(config.home)
    assert [e["action"] for e in fleet("audit", "--json").ok().json()][-2:] == ["a", "b"]
    verified = fleet("audit", "verify").ok().stdout.strip()
    count = int(verified.split()[0])
    assert verified == f"{count} audit rows verified, head hash {_hashes(registry)[-1][1]}"

    out = tmp_path / "archive.jsonl"
    tomorrow = (dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).strftime("%Y-%m-%d")
    archived = fleet("audit", "archive", "--before", tomorrow, "--out", str(out)).ok().stdout
    assert f"{count} audit rows (through id {count}) archived" in archived
    assert f" {count} rows verified" in fleet("audit", "verify", "--archive", str(out)).ok().stdout
    assert "1 audit rows verified" in fleet("audit", "verify").ok().stdout  # audit.archive
    refused = fleet("audit", "archive", "--before", tomorrow, "--out", str(out)).failed()
    assert "exists" in refused.stderr

    try:
        _as_owner(registry, "UPDATE auditevent SET outcome = 'refused'")
    finally:
        registry.close()
    broken = fleet("audit", "verify").failed().stderr
    assert f"audit row {count + 1} does not match its hash" in broken


def test_on_postgresql_the_admin_role_archives_and_the_service_roles_only_append(
    pg_server,  # noqa: F811
    tmp_path,
):
    from test_registry_postgres import _run_sql

    from enrollment.registry.schema import grant, grant_statements

    _run_sql(
        pg_server,
        "postgres",
        "CREATE ROLE chain_owner LOGIN; CREATE ROLE chain_broker LOGIN; "
        "CREATE ROLE chain_enroll LOGIN; CREATE ROLE chain_admin LOGIN",
    )
    _run_sql(pg_server, "postgres", "CREATE DATABASE chain_roles OWNER chain_owner")
    base = f"postgresql+psycopg://{{}}@{pg_server.host}:{pg_server.port}/chain_roles"
    owner_url, broker_url, enroll_url, admin_url = (
        base.format(f"chain_{r}") for r in ("owner", "broker", "enroll", "admin")
    )
    upgrade(owner_url)
    grant(
        owner_url,
        grant_statements(
            broker_role="chain_broker", enrollment_role="chain_enroll", admin_role="chain_admin"
        ),
    )
    roles = [Registry(u) for u in (broker_url, enroll_url, admin_url)]
    try:
        for n, reg in enumerate(roles):
            _write(reg, f"by-{n}-a", f"by-{n}-b")
        broker, enroll, admin = roles
        for reg in (broker, enroll):
            for statement in (
                "DELETE FROM auditevent",
                "UPDATE auditanchor SET last_id = 1",
                "SELECT reason FROM auditevent",
            ):
                with pytest.raises(DBAPIError, match="permission denied"), reg.engine.begin() as c:
                    c.exec_driver_sql(statement)
        summary = admin.archive_audit(
            dt.datetime.now(dt.UTC), tmp_path / "a.jsonl", actor="admin:test"
        )
        assert summary.count == 6
        _write(broker, "after-archive")
        check = admin.verify_audit_chain()
        assert (check.ok, check.checked) == (True, 2)
        with pytest.raises(DBAPIError, match="append-only"), admin.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM auditevent")
    finally:
        for reg in roles:
            reg.close()
