"""Station bootstrap codes: a station enrolls a key it made itself; the CA host never sees it.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-07

``stationbootstrap`` holds one row per one-time code that ``fleetgate station add`` issued: the
code's SHA-256 (never the code), the station, its expiry and when it was used. The station
redeems it over EST (``/.well-known/est/station/simpleenroll``, HTTP Basic authentication).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "stationbootstrap",
        sa.Column("code_sha256", sa.String(64), primary_key=True),
        sa.Column("station_id", sa.String(64), sa.ForeignKey("station.id"), nullable=False),
        sa.Column("created_by", sa.String(), nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("expires_at", _ts, nullable=False),
        sa.Column("used_at", _ts),
    )
    op.create_index("ix_stationbootstrap_station_id", "stationbootstrap", ["station_id"])


def downgrade() -> None:
    op.drop_index("ix_stationbootstrap_station_id", "stationbootstrap")
    op.drop_table("stationbootstrap")
