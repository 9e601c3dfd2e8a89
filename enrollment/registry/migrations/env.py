"""Alembic's environment for the registry, driven by ``enrollment.registry.schema.upgrade``.

There is no alembic.ini: ``upgrade`` builds the configuration in code and hands over its
connection, already inside the one transaction every pending revision runs in. On PostgreSQL an
advisory lock makes a second concurrent upgrade wait and then find nothing left to do; on SQLite
the transaction's ``BEGIN IMMEDIATE`` does the same.
"""

from __future__ import annotations

from alembic import context

# Any constant shared by every fleetgate upgrader of one database ("fleetgat" in ASCII).
_UPGRADE_LOCK = 0x666C656574676174

if context.is_offline_mode():
    raise RuntimeError("registry migrations run against a database; offline SQL is not supported")

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=None)
with context.begin_transaction():
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_UPGRADE_LOCK})")
    context.run_migrations()
