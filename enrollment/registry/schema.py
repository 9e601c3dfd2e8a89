"""The registry schema's version: upgrading it (Alembic) and the check each process makes at open.

The schema changes only when an operator asks (``fleetgate db upgrade``, or ``ca init`` on an
empty database), never as a side effect of opening the registry: on PostgreSQL the brokers and
enrollment services are not even allowed to change it (:func:`grant_statements`). A process
reads the one-row ``alembic_version`` table when it opens the registry and refuses to run on any
schema but the one it was written for.

A database made before versioned migrations (registry tables, no ``alembic_version``) is adopted
by the first revision, which is the old open-time code path frozen: it adds only what is missing.
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Connection, inspect
from sqlalchemy.engine import Engine

from enrollment.registry.engine import create_registry_engine
from fleetgate.errors import FleetgateError

if TYPE_CHECKING:  # Alembic is imported only to upgrade: it costs ~0.2 s, every open would pay
    from alembic.config import Config
    from alembic.script import ScriptDirectory

REVISIONS = ("0001", "0002", "0003", "0004", "0005")
"""Every revision, oldest first; a test checks it against the migrations directory."""
HEAD = REVISIONS[-1]
VERSION_TABLE = "alembic_version"
UPGRADE_COMMAND = "fleetgate db upgrade"
_SCRIPT_LOCATION = "enrollment.registry:migrations"
# Alembic's migration context is process-global (alembic.context, alembic.op): one upgrade at a
# time per process. Across processes the database serialises them (env.py).
_UPGRADING = threading.Lock()
# Tables every fleetgate registry has had: their presence without a version marks a legacy one.
_REGISTRY_TABLES = frozenset({"device", "certificate", "auditevent"})


class SchemaOutdated(FleetgateError):
    """The registry's schema is not the one this fleetgate was written for."""

    code = "schema_outdated"


@dataclass(frozen=True)
class SchemaStatus:
    """Where a database's registry schema stands against this fleetgate's :data:`HEAD`."""

    revision: str | None
    """The stored revision; None without an ``alembic_version`` row."""
    legacy: bool
    """Registry tables without a version: made by a fleetgate before versioned migrations."""

    @property
    def current(self) -> bool:
        return self.revision == HEAD

    @property
    def empty(self) -> bool:
        return self.revision is None and not self.legacy

    def describe(self) -> str:
        """One line saying where the schema stands and what to run."""
        if self.current:
            return f"the registry schema is at revision {HEAD}, the current one"
        if self.legacy:
            return (
                "the registry was created before versioned schema migrations: "
                f"run `{UPGRADE_COMMAND}` to adopt it"
            )
        if self.revision is None:
            return f"the database has no registry schema: run `{UPGRADE_COMMAND}`"
        if self.revision in REVISIONS:
            return (
                f"the registry schema is at revision {self.revision}, this fleetgate needs "
                f"{HEAD}: run `{UPGRADE_COMMAND}`"
            )
        return (
            f"the registry schema is at revision {self.revision}, which this fleetgate does not "
            f"know (it needs {HEAD}): run a fleetgate at least as new as the one that upgraded it"
        )


def status(engine: Engine) -> SchemaStatus:
    """The schema's state, read with a look at the database's tables."""
    with engine.connect() as conn:
        tables = set(inspect(conn).get_table_names())
        revision = read_revision(conn) if VERSION_TABLE in tables else None
    legacy = VERSION_TABLE not in tables and bool(_REGISTRY_TABLES & tables)
    return SchemaStatus(revision, legacy)


def status_at(url: str) -> SchemaStatus:
    """:func:`status` of the database at ``url``."""
    engine = create_registry_engine(url)
    try:
        return status(engine)
    finally:
        engine.dispose()


def read_revision(conn: Connection) -> str | None:
    """The stored revision (one indexed row); fails when there is no version table."""
    value = conn.exec_driver_sql("SELECT version_num FROM alembic_version").scalar()
    return None if value is None else str(value)


def refusal(engine: Engine, revision: str | None) -> SchemaOutdated | None:
    """Why a process must not run on a schema at ``revision``; None when it may."""
    if revision == HEAD:
        return None
    state = SchemaStatus(revision, False) if revision is not None else status(engine)
    return SchemaOutdated(state.describe())


def script_directory() -> ScriptDirectory:
    """The packaged revisions, as Alembic reads them."""
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(_alembic_config())


def upgrade(url: str, revision: str = HEAD) -> SchemaStatus:
    """Bring the database at ``url`` to :data:`HEAD` (or an earlier ``revision``, for tests of
    a revision's own schema) in one transaction; the status before.

    An empty database gets the whole schema, a legacy one is adopted in place, a current one is
    left alone. A schema newer than this fleetgate is refused rather than touched.
    """
    from alembic import command

    engine = create_registry_engine(url)
    try:
        before = status(engine)
        if before.revision is not None and before.revision not in REVISIONS:
            raise SchemaOutdated(before.describe())
        config = _alembic_config()
        with _UPGRADING, engine.begin() as conn:
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
        return before
    finally:
        engine.dispose()


def create_if_empty(url: str) -> bool:
    """Create the schema when the database has none (``ca init``); whether it did.

    A legacy or outdated schema is left for ``fleetgate db upgrade``, which an operator runs on
    purpose (after a backup).
    """
    empty = status_at(url).empty
    if empty:
        upgrade(url)
    return empty


def _alembic_config() -> Config:
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", _SCRIPT_LOCATION)
    return config


# -- PostgreSQL roles ----------------------------------------------------------------------------

_ROLE_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
_ALL_TABLES = (
    "aclrule",
    "attestationchallenge",
    "auditanchor",
    "auditevent",
    "batch",
    "batchentry",
    "certauthority",
    "certificate",
    "device",
    "devicechange",
    "grouppolicy",
    "station",
    "stationbootstrap",
    VERSION_TABLE,
)
# What each service does to each table, read from its code paths. Every role appends audit rows,
# which reads the chain's head: the last row's id and hash (only those columns of auditevent) or
# the archive anchor. Audit ids come from the chain, not from auditevent's sequence.
_BROKER = {
    "SELECT": (
        "aclrule",
        "auditanchor",
        "certauthority",
        "certificate",
        "device",
        "devicechange",
        VERSION_TABLE,
    ),
    "INSERT": ("auditevent",),
}
_ENROLLMENT = {
    "SELECT": tuple(t for t in _ALL_TABLES if t != "auditevent"),
    "INSERT": ("attestationchallenge", "auditevent", "certificate"),
    "UPDATE": ("attestationchallenge", "batchentry", "certificate", "device", "stationbootstrap"),
}
# The admin archives the audit trail (fleetgate audit archive): it moves the anchor and deletes
# the archived rows; the triggers refuse any other UPDATE or DELETE of either table.
_ADMIN = {
    "SELECT": _ALL_TABLES,
    "INSERT": tuple(t for t in _ALL_TABLES if t not in {"auditanchor", VERSION_TABLE}),
    "UPDATE": tuple(t for t in _ALL_TABLES if t not in {"auditevent", VERSION_TABLE}),
    "DELETE": tuple(t for t in _ALL_TABLES if t not in {"auditanchor", VERSION_TABLE}),
}
_SEQUENCES = ("auditevent_id_seq", "batch_id_seq", "devicechange_id_seq")


def grant_statements(
    *, broker_role: str, enrollment_role: str, admin_role: str | None = None
) -> list[str]:
    """The SQL that gives each PostgreSQL role exactly what its service needs, run as the owner.

    The roles own nothing, so none of them can ALTER or DROP a table or its audit trigger, and
    none may UPDATE audit rows or DELETE any the archive anchor does not cover (the triggers
    refuse those for the owner too). Each
    role's earlier grants are revoked first, so running the statements again, as after an
    upgrade, leaves exactly these.
    """
    roles = [(broker_role, _BROKER), (enrollment_role, _ENROLLMENT)]
    if admin_role is not None:
        roles.append((admin_role, _ADMIN))
    statements: list[str] = []
    for role, grants in roles:
        if not _ROLE_NAME.fullmatch(role):
            raise FleetgateError(
                f"role name {role!r}: use lower-case letters, digits and _ (at most 63)"
            )
        statements.append(f"REVOKE ALL ON {', '.join(_ALL_TABLES)} FROM {role}")
        statements.append(f"REVOKE ALL ON SEQUENCE {', '.join(_SEQUENCES)} FROM {role}")
        for privilege, granted in grants.items():
            statements.append(f"GRANT {privilege} ON {', '.join(granted)} TO {role}")
        if grants is not _ADMIN:
            statements.append(f"GRANT SELECT (id, row_hash) ON auditevent TO {role}")
        else:
            sequences = ", ".join(s for s in _SEQUENCES if s != "auditevent_id_seq")
            statements.append(f"GRANT USAGE ON SEQUENCE {sequences} TO {role}")
    return statements


def grant(url: str, statements: list[str]) -> None:
    """Run :func:`grant_statements` output against ``url`` (PostgreSQL) in one transaction."""
    engine = create_registry_engine(url)
    try:
        if engine.dialect.name != "postgresql":
            raise FleetgateError(
                "database roles exist only on PostgreSQL; a SQLite registry is protected by "
                "its file's owner and mode (0600)"
            )
        with engine.begin() as conn:
            for statement in statements:
                conn.exec_driver_sql(statement)
    finally:
        engine.dispose()
