"""The registry schema as fleetgate wrote it before versioned migrations.

Revision ID: 0001
Revises:
Create Date: 2026-12-07

Until this revision every process that opened the registry ran ``create_all``, a few
``ALTER TABLE ... ADD COLUMN`` for columns added after the first release, and re-created the
append-only audit trigger. This revision is that code path, frozen: on an empty database it
creates the whole schema; on a database an earlier fleetgate made (registry tables, no
``alembic_version``) it adds only what is missing, exactly as those processes did, so
``fleetgate db upgrade`` adopts such a database in place, data intact.

The tables are written out here, not taken from ``models.py``: a revision must keep creating the
schema of its day however the models change later.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)
_metadata = sa.MetaData()

# Enum columns store member *names*; on PostgreSQL each is a named enum type.
_device_state = sa.Enum("PENDING", "ACTIVE", "SUSPENDED", "REVOKED", name="devicestate")
_subject_kind = sa.Enum("DEVICE", "STATION", "SERVER", name="subjectkind")
_cert_status = sa.Enum("ACTIVE", "ON_HOLD", "SUPERSEDED", "REVOKED", name="certstatus")
_station_state = sa.Enum("ACTIVE", "REVOKED", name="stationstate")
_active_cert = sa.text("status = 'ACTIVE'")

sa.Table(
    "certificate",
    _metadata,
    sa.Column("serial", sa.String(42), primary_key=True),
    sa.Column("subject_kind", _subject_kind, nullable=False),
    sa.Column("subject_id", sa.String(64), nullable=False, index=True),
    sa.Column("fingerprint_sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("not_before", _ts, nullable=False),
    sa.Column("not_after", _ts, nullable=False),
    sa.Column("status", _cert_status, nullable=False, index=True),
    sa.Column("revoked_at", _ts),
    sa.Column("revocation_reason", sa.String()),
    sa.Column("pem", sa.String(), nullable=False),
    sa.Index(
        "one_active_certificate_per_subject",
        "subject_kind",
        "subject_id",
        unique=True,
        sqlite_where=_active_cert,
        postgresql_where=_active_cert,
    ),
)
sa.Table(
    "station",
    _metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("state", _station_state, nullable=False),
    sa.Column("created_at", _ts, nullable=False),
)
sa.Table(
    "auditevent",
    _metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("at", _ts, nullable=False, index=True),
    sa.Column("actor", sa.String(), nullable=False),
    sa.Column("action", sa.String(), nullable=False),
    sa.Column("subject", sa.String(), index=True),
    sa.Column("outcome", sa.String(), nullable=False),
    sa.Column("reason", sa.String(), nullable=False),
    sa.Column("request_id", sa.String()),
)
sa.Table(
    "devicechange",
    _metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("state", _device_state, nullable=False),
    sa.Column("reason", sa.String(), nullable=False),
    sa.Column("at", _ts, nullable=False),
)
sa.Table(
    "grouppolicy",
    _metadata,
    sa.Column("group", sa.String(64), primary_key=True),
    sa.Column("required_protection", sa.String(16), nullable=False),
)
sa.Table(
    "attestationchallenge",
    _metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("device_id", sa.String(64), nullable=False),
    sa.Column("ak_public", sa.String(), nullable=False),
    sa.Column("nonce", sa.String(64), nullable=False),
    sa.Column("secret_sha256", sa.String(64), nullable=False),
    sa.Column("ek_fingerprint", sa.String(64), nullable=False),
    sa.Column("ek_summary", sa.String(), nullable=False),
    sa.Column("expires_at", _ts, nullable=False),
    sa.Column("used_at", _ts),
)
sa.Table(
    "aclrule",
    _metadata,
    sa.Column("group", sa.String(64), primary_key=True),
    sa.Column("action", sa.String(16), primary_key=True),
    sa.Column("pattern", sa.String(512), primary_key=True),
)
sa.Table(
    "device",
    _metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("group", sa.String(64), nullable=False),
    sa.Column("state", _device_state, nullable=False, index=True),
    sa.Column("station_id", sa.String(), sa.ForeignKey("station.id")),
    sa.Column("created_at", _ts, nullable=False),
    sa.Column("updated_at", _ts, nullable=False),
    sa.Column("key_protection", sa.String(16), nullable=False),
    sa.Column("hardware_binding", sa.String(64)),
    sa.Column("attestation", sa.String(), nullable=False),
)
sa.Table(
    "batch",
    _metadata,
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("station_id", sa.String(), sa.ForeignKey("station.id"), nullable=False, index=True),
    sa.Column("label", sa.String(), nullable=False),
    sa.Column("created_at", _ts, nullable=False),
)
sa.Table(
    "batchentry",
    _metadata,
    sa.Column("device_id", sa.String(), sa.ForeignKey("device.id"), primary_key=True),
    sa.Column("batch_id", sa.Integer(), sa.ForeignKey("batch.id"), nullable=False, index=True),
    sa.Column("enrolled_at", _ts),
)

# Columns an older fleetgate's tables may lack, with the DDL that fleetgate used to add them.
_ADDED_COLUMNS = {
    "device": {
        "key_protection": "VARCHAR(16) NOT NULL DEFAULT 'software'",
        "hardware_binding": "VARCHAR(64)",
        "attestation": "VARCHAR NOT NULL DEFAULT ''",
    },
}

_AUDIT_TRIGGERS = {
    "sqlite": (
        "CREATE TRIGGER IF NOT EXISTS auditevent_append_only_update BEFORE UPDATE ON auditevent "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
        "CREATE TRIGGER IF NOT EXISTS auditevent_append_only_delete BEFORE DELETE ON auditevent "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
    ),
    "postgresql": (
        "CREATE OR REPLACE FUNCTION fleetgate_audit_append_only() RETURNS trigger AS $$ "
        "BEGIN RAISE EXCEPTION 'the audit log is append-only'; END $$ LANGUAGE plpgsql",
        "DROP TRIGGER IF EXISTS auditevent_append_only ON auditevent",
        "CREATE TRIGGER auditevent_append_only BEFORE UPDATE OR DELETE ON auditevent "
        "FOR EACH ROW EXECUTE FUNCTION fleetgate_audit_append_only()",
    ),
}


def upgrade() -> None:
    bind = op.get_bind()
    _metadata.create_all(bind, checkfirst=True)
    inspector = sa.inspect(bind)
    for table, columns in _ADDED_COLUMNS.items():
        present = {c["name"] for c in inspector.get_columns(table)}
        for name, ddl in columns.items():
            if name not in present:
                bind.exec_driver_sql(f"ALTER TABLE {table} ADD COLUMN {name} {ddl}")
    for statement in _AUDIT_TRIGGERS[bind.dialect.name]:
        bind.exec_driver_sql(statement)


def downgrade() -> None:
    """Not reversible: going below this revision would drop the registry, audit trail included.

    Restore a backup instead.
    """
    raise NotImplementedError("the first registry revision cannot be downgraded: restore a backup")
