"""The change feed carries policy changes too: a group's new ACL, a device's new group.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

``devicechange`` was one row per device state change (revoke, suspend, reinstate). A row may now
also say that the ACL of ``group`` changed (no device, no state) or that a device moved to
``group`` (no state), so that every broker sharing the registry reapplies the policy to its live
sessions through the same poll that kicks revoked devices (``broker.feed``). The rows already
there are state changes and keep their meaning: ``group`` is NULL on them.

SQLite cannot drop a NOT NULL constraint in place: Alembic's batch mode copies the table (a few
rows per state change ever made; the copy runs in the upgrade's one transaction).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("devicechange") as batch:
        batch.add_column(sa.Column("group", sa.String(64), nullable=True))
        batch.alter_column("device_id", existing_type=sa.String(64), nullable=True)
        batch.alter_column("state", existing_type=sa.String(9), nullable=True)


def downgrade() -> None:
    """Not supported, as for the revisions before: restore a backup to go back."""
    raise NotImplementedError("the registry schema cannot be downgraded: restore a backup")
