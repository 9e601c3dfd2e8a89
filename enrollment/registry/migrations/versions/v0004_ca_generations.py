"""CA generations: the issuing and root CAs a rotation overlaps, and who issued each certificate.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

``certauthority`` holds one row per CA certificate (roots, issuing CAs and the cross certificates
of a root rotation) with its state: ``active`` (the issuing CA that signs, the current root),
``trusted`` (still trusted while a rotation overlaps) or ``retired``. Brokers read the rows that
are not retired to trust a new CA without a restart (``enrollment.authorities``).

``certificate.issuer_key_id`` names the CA that signed each certificate (its key identifier,
hex); the rows already there get it from their own authority key identifier, so ``fleetgate ca
status`` counts every device on the CA it is on.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from cryptography import x509

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

_ts = sa.DateTime(timezone=True)
_certificate = sa.Table(
    "certificate",
    sa.MetaData(),
    sa.Column("serial", sa.String(42), primary_key=True),
    sa.Column("pem", sa.String()),
    sa.Column("issuer_key_id", sa.String(40)),
)


def upgrade() -> None:
    op.create_table(
        "certauthority",
        sa.Column("fingerprint_sha256", sa.String(64), primary_key=True),
        sa.Column("key_id", sa.String(40), nullable=False, index=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False, index=True),
        sa.Column("subject", sa.String(), nullable=False),
        sa.Column("issuer_key_id", sa.String(40)),
        sa.Column("pem", sa.String(), nullable=False),
        sa.Column("not_after", _ts, nullable=False),
        sa.Column("created_at", _ts, nullable=False),
        sa.Column("retired_at", _ts),
    )
    op.add_column("certificate", sa.Column("issuer_key_id", sa.String(40)))
    op.create_index("ix_certificate_issuer_key_id", "certificate", ["issuer_key_id"])
    bind = op.get_bind()
    rows = bind.execute(sa.select(_certificate.c.serial, _certificate.c.pem)).all()
    for serial, pem in rows:
        bind.execute(
            _certificate.update()
            .where(_certificate.c.serial == serial)
            .values(issuer_key_id=_issuer_key_id(pem))
        )


def _issuer_key_id(pem: str) -> str | None:
    """The certificate's authority key identifier, hex (fleetgate always writes one); None for
    a row whose PEM does not parse (left for an operator to see, not a reason to stop)."""
    try:
        cert = x509.load_pem_x509_certificate(pem.encode())
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except (ValueError, x509.ExtensionNotFound):
        return None
    return aki.key_identifier.hex() if aki.key_identifier else None


def downgrade() -> None:
    op.drop_index("ix_certificate_issuer_key_id", "certificate")
    op.drop_column("certificate", "issuer_key_id")
    op.drop_table("certauthority")
