"""The audit trail becomes a hash chain that can be archived.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07

Every ``auditevent`` row gets ``prev_hash`` and ``row_hash`` (``enrollment.registry.chain``); the
rows already there are chained here, in id order, so ``fleetgate audit verify`` passes on an
upgraded database. The one-row ``auditanchor`` table records the last archived row (id 0 and the
genesis hash until the first archive). The append-only triggers still refuse every UPDATE; a
DELETE is allowed only of rows at or below the anchor, and the anchor moves only forward, to a row
that exists with that hash: ``fleetgate audit archive`` moves it and deletes what it archived in
one transaction, and a plain DELETE is still refused.

The hash is computed with ``enrollment.registry.chain``: its encoding is stored data (rows,
archive files) and never changes, so this revision may use it.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from enrollment.registry.chain import GENESIS, row_hash

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

_anchor = sa.Table(
    "auditanchor",
    sa.MetaData(),
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=False),
    sa.Column("last_id", sa.Integer(), nullable=False),
    sa.Column("last_hash", sa.String(64), nullable=False),
    sa.Column("archived_at", sa.DateTime(timezone=True)),
    sa.CheckConstraint("id = 1", name="auditanchor_one_row"),
)
_audit = sa.Table(
    "auditevent",
    sa.MetaData(),
    sa.Column("id", sa.Integer(), primary_key=True),
    sa.Column("at", sa.DateTime(timezone=True), nullable=False),
    *(sa.Column(name, sa.String()) for name in ("actor", "action", "subject", "outcome")),
    *(sa.Column(name, sa.String()) for name in ("reason", "request_id")),
    sa.Column("prev_hash", sa.String(64)),
    sa.Column("row_hash", sa.String(64)),
)

# Dropped (SQLite) or disabled (PostgreSQL) while the existing rows are chained, then restored.
_LIFT_UPDATE_TRIGGER = {
    "sqlite": ("DROP TRIGGER auditevent_append_only_update",),
    "postgresql": ("ALTER TABLE auditevent DISABLE TRIGGER auditevent_append_only",),
}
_TRIGGERS = {
    "sqlite": (
        "CREATE TRIGGER auditevent_append_only_update BEFORE UPDATE ON auditevent "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only'); END",
        "DROP TRIGGER auditevent_append_only_delete",
        "CREATE TRIGGER auditevent_append_only_delete BEFORE DELETE ON auditevent "
        "WHEN OLD.id > (SELECT last_id FROM auditanchor) "
        "BEGIN SELECT RAISE(ABORT, 'the audit log is append-only: only archived rows may be "
        "deleted'); END",
        "CREATE TRIGGER auditanchor_forward_only BEFORE UPDATE ON auditanchor "
        "WHEN NEW.id != OLD.id OR NEW.last_id <= OLD.last_id OR NOT EXISTS "
        "(SELECT 1 FROM auditevent WHERE id = NEW.last_id AND row_hash = NEW.last_hash) "
        "BEGIN SELECT RAISE(ABORT, 'the audit anchor moves only forward, to a stored audit "
        "row'); END",
        "CREATE TRIGGER auditanchor_kept BEFORE DELETE ON auditanchor "
        "BEGIN SELECT RAISE(ABORT, 'the audit anchor moves only forward, to a stored audit "
        "row'); END",
    ),
    "postgresql": (
        "CREATE OR REPLACE FUNCTION fleetgate_audit_append_only() RETURNS trigger AS $$ BEGIN "
        "IF TG_OP = 'DELETE' AND OLD.id <= (SELECT last_id FROM auditanchor) THEN RETURN OLD; "
        "END IF; RAISE EXCEPTION 'the audit log is append-only'; END $$ LANGUAGE plpgsql",
        "ALTER TABLE auditevent ENABLE TRIGGER auditevent_append_only",
        # A row written without its hashes is refused outright (SQLite cannot drop a default).
        "ALTER TABLE auditevent ALTER COLUMN prev_hash DROP DEFAULT, "
        "ALTER COLUMN row_hash DROP DEFAULT",
        "CREATE FUNCTION fleetgate_audit_anchor_forward() RETURNS trigger AS $$ BEGIN "
        "IF TG_OP = 'UPDATE' AND NEW.id = OLD.id AND NEW.last_id > OLD.last_id AND EXISTS "
        "(SELECT 1 FROM auditevent WHERE id = NEW.last_id AND row_hash = NEW.last_hash) "
        "THEN RETURN NEW; END IF; "
        "RAISE EXCEPTION 'the audit anchor moves only forward, to a stored audit row'; "
        "END $$ LANGUAGE plpgsql",
        "CREATE TRIGGER auditanchor_forward_only BEFORE UPDATE OR DELETE ON auditanchor "
        "FOR EACH ROW EXECUTE FUNCTION fleetgate_audit_anchor_forward()",
    ),
}


def upgrade() -> None:
    bind = op.get_bind()
    dialect = bind.dialect.name
    for column in ("prev_hash", "row_hash"):
        bind.exec_driver_sql(
            f"ALTER TABLE auditevent ADD COLUMN {column} VARCHAR(64) NOT NULL DEFAULT ''"
        )
    _anchor.create(bind)
    bind.execute(_anchor.insert().values(id=1, last_id=0, last_hash=GENESIS, archived_at=None))
    for statement in _LIFT_UPDATE_TRIGGER[dialect]:
        bind.exec_driver_sql(statement)
    prev = GENESIS
    rows = bind.execute(sa.select(_audit).order_by(_audit.c.id)).mappings().all()
    for row in rows:
        prev = _chain_one(bind, row, prev)
    for statement in _TRIGGERS[dialect]:
        bind.exec_driver_sql(statement)


def _chain_one(bind: sa.Connection, row: sa.RowMapping, prev: str) -> str:
    digest = row_hash(row, prev)
    bind.execute(
        _audit.update().where(_audit.c.id == row["id"]).values(prev_hash=prev, row_hash=digest)
    )
    return digest


def downgrade() -> None:
    """Not supported: the chain is evidence; restore a backup to go back."""
    raise NotImplementedError("the audit chain cannot be downgraded: restore a backup")
