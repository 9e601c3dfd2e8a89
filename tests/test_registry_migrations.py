"""Versioned registry schema on SQLite: created, checked at open, and adopted from main's.

"A registry main made" is built from tests/fixtures/registry_main_sqlite.sql, the DDL main ran
when it opened an empty database. The PostgreSQL side of these promises, and the database roles,
are in test_registry_postgres.py.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from registry_helpers import new_registry
from upgrade_race import upgrade_concurrently

from broker.acl import check_template
from enrollment.registry import AuditRecord, DeviceState, Registry, SchemaOutdated
from enrollment.registry import schema as schema_module
from enrollment.registry.acl import InvalidAcl
from enrollment.registry.engine import normalise_url
from enrollment.registry.schema import HEAD, REVISIONS, SchemaStatus, script_directory, upgrade

FIXTURES = Path(__file__).parent / "fixtures"
MAIN_SQLITE = FIXTURES / "registry_main_sqlite.sql"
MAIN_ROWS = FIXTURES / "registry_main_rows.sql"
ADDED_LATER = ("key_protection", "hardware_binding", "attestation")


def _schema(path: Path) -> set[tuple[str, str, str]]:
    """(type, name, DDL) of every schema object but Alembic's, trailing blanks stripped."""
    with sqlite3.connect(path) as db:
        rows = db.execute(
            "SELECT type, name, sql FROM sqlite_master WHERE tbl_name != 'alembic_version'"
        ).fetchall()
    return {
        (kind, name, "\n".join(line.rstrip() for line in (sql or "").splitlines()))
        for kind, name, sql in rows
    }


def _made_by_main(path: Path) -> None:
    """A registry as main left it: its schema, one station, an enrolled device and its audit."""
    with sqlite3.connect(path) as db:
        db.executescript(MAIN_SQLITE.read_text())
        db.executescript(MAIN_ROWS.read_text())


def _url(path: Path) -> str:
    return f"sqlite:///{path}"


# -- a new database ----------------------------------------------------------------------------


def test_upgrade_creates_exactly_the_schema_main_wrote(tmp_path):
    upgrade(_url(tmp_path / "new.db"), "0001")
    with sqlite3.connect(tmp_path / "main.db") as db:
        db.executescript(MAIN_SQLITE.read_text())
    assert _schema(tmp_path / "new.db") == _schema(tmp_path / "main.db")
    with sqlite3.connect(tmp_path / "new.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [("0001",)]


def test_opening_an_empty_database_is_refused_naming_db_upgrade_and_creates_nothing(tmp_path):
    path = tmp_path / "empty.db"
    with pytest.raises(SchemaOutdated, match=r"no registry schema: run `fleetgate db upgrade`$"):
        Registry(_url(path))
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT name FROM sqlite_master").fetchall() == []


def test_opening_does_not_touch_the_schema_even_when_the_trigger_is_gone(tmp_path):
    """Main re-created the audit trigger at every open; now only an upgrade changes the schema."""
    path = tmp_path / "r.db"
    upgrade(_url(path))
    with sqlite3.connect(path) as db:
        db.execute("DROP TRIGGER auditevent_append_only_delete")
    Registry(_url(path)).close()
    with sqlite3.connect(path) as db:
        names = {
            n
            for (n,) in db.execute(
                "SELECT name FROM sqlite_master WHERE type='trigger' AND tbl_name='auditevent'"
            )
        }
    assert names == {"auditevent_append_only_update"}


def test_upgrading_a_current_database_changes_nothing(tmp_path):
    path = tmp_path / "r.db"
    assert upgrade(_url(path)) == SchemaStatus(None, legacy=False)
    before = _schema(path)
    assert upgrade(_url(path)) == SchemaStatus(HEAD, legacy=False)
    assert _schema(path) == before


def test_a_schema_newer_than_this_fleetgate_is_refused_at_open_and_by_upgrade(tmp_path):
    path = tmp_path / "r.db"
    upgrade(_url(path))
    with sqlite3.connect(path) as db:
        db.execute("UPDATE alembic_version SET version_num = '9999'")
    with pytest.raises(SchemaOutdated, match="at revision 9999, which this fleetgate does not"):
        Registry(_url(path))
    with pytest.raises(SchemaOutdated, match="9999"):
        upgrade(_url(path))


def test_an_older_revision_is_refused_naming_db_upgrade(monkeypatch):
    monkeypatch.setattr(schema_module, "REVISIONS", ("0001", "0002"))
    monkeypatch.setattr(schema_module, "HEAD", "0002")
    assert SchemaStatus("0001", legacy=False).describe() == (
        "the registry schema is at revision 0001, this fleetgate needs 0002: "
        "run `fleetgate db upgrade`"
    )


def test_the_revision_list_matches_the_packaged_migrations():
    walked = [s.revision for s in script_directory().walk_revisions()]
    assert tuple(reversed(walked)) == REVISIONS
    assert script_directory().get_current_head() == HEAD


# -- a database main made ----------------------------------------------------------------------


def test_a_registry_main_made_is_refused_until_upgraded_then_adopted_with_its_data(tmp_path):
    path = tmp_path / "main.db"
    _made_by_main(path)
    with pytest.raises(SchemaOutdated, match="before versioned schema migrations: run `fleetgate"):
        Registry(_url(path))

    assert upgrade(_url(path)) == SchemaStatus(None, legacy=True)

    fresh = tmp_path / "fresh.db"
    upgrade(_url(fresh))
    assert _schema(path) == _schema(fresh)
    registry = Registry(_url(path))
    try:
        device = registry.device("sensor-1")
        assert (device.state, device.group, device.key_protection, device.hardware_binding) == (
            DeviceState.ACTIVE,
            "meters",
            "tpm",
            "ab12",
        )
        facts = registry.admission_facts("sensor-1", 0x1F)
        assert facts.device_state == DeviceState.ACTIVE and facts.acl is not None
        assert facts.certificate is not None and facts.certificate.status == "active"
        assert facts.acl.publish == ("meters/%d/#",)
        registry.audit(AuditRecord("admin:test", "probe", "ok", "sensor-1"))
        assert [e.action for e in registry.audit_events(subject="sensor-1")] == ["enroll", "probe"]
        with pytest.raises(Exception, match="append-only"), registry.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM auditevent")
    finally:
        registry.close()


def test_upgrade_adds_the_columns_an_older_release_lacked(tmp_path):
    """Main added these with ALTER TABLE at every open; the first revision does it once."""
    path = tmp_path / "older.db"
    _made_by_main(path)
    with sqlite3.connect(path) as db:
        for column in ADDED_LATER:
            db.execute(f"ALTER TABLE device DROP COLUMN {column}")
    upgrade(_url(path))
    registry = Registry(_url(path))
    try:
        device = registry.device("sensor-1")
        assert (device.key_protection, device.hardware_binding, device.attestation) == (
            "software",
            None,
            "",
        )
    finally:
        registry.close()


# -- ACL templates -----------------------------------------------------------------------------


@pytest.fixture
def registry(tmp_path):
    reg = new_registry(_url(tmp_path / "r.db"))
    yield reg
    reg.close()


@pytest.mark.parametrize(
    ("publish", "says"),
    [
        (["devices/%d/#/more"], "not a valid MQTT topic filter"),
        (["devices/x%d/#"], "%d must be a whole topic level"),
        (["devices/a+/#"], "not a valid MQTT topic filter"),
    ],
)
def test_the_registry_refuses_an_acl_template_the_broker_would(registry, publish, says):
    with pytest.raises(InvalidAcl, match=says):
        registry.set_acl("meters", publish=publish, subscribe=[], actor="test")
    assert registry.acl_patterns("meters") is None
    assert registry.audit_events() == []


def test_acl_templates_given_as_generators_are_stored_whole(registry):
    registry.set_acl(
        "meters",
        publish=(p for p in ["meters/%d/#"]),
        subscribe=(s for s in ["meters/%d/commands/#"]),
        actor="test",
    )
    stored = registry.acl_patterns("meters")
    assert stored is not None
    assert (stored.publish, stored.subscribe) == (("meters/%d/#",), ("meters/%d/commands/#",))
    template = check_template((p for p in ["a/%d"]), (s for s in ["b/%d/#"]))
    assert (template.publish, template.subscribe) == (("a/%d",), ("b/%d/#",))


# -- URLs --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("postgres://fleet@db/fleet", "postgresql+psycopg://fleet@db/fleet"),
        ("postgresql://fleet:pw@db:5433/fleet", "postgresql+psycopg://fleet:pw@db:5433/fleet"),
        ("postgresql+psycopg://fleet@db/fleet", "postgresql+psycopg://fleet@db/fleet"),
        ("sqlite:////srv/fleet.db", "sqlite:////srv/fleet.db"),
    ],
)
def test_postgresql_urls_name_the_installed_driver(given, used):
    assert normalise_url(given) == used


def test_concurrent_upgrades_of_one_new_database_all_succeed(tmp_path):
    """BEGIN IMMEDIATE makes the later upgrades wait for the first, then find nothing to do."""
    url = _url(tmp_path / "r.db")
    assert upgrade_concurrently(url, processes=3) == ["", "", ""]
    with sqlite3.connect(tmp_path / "r.db") as db:
        assert db.execute("SELECT version_num FROM alembic_version").fetchall() == [(HEAD,)]
    Registry(url).close()
