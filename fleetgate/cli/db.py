"""``fleetgate db``: the registry's schema version and its database roles."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from enrollment.registry import (
    AuditRecord,
    Registry,
    schema,
)
from fleetgate.cli.common import (
    JsonFlag,
    admin_actor,
    home_config,
)

db_app = typer.Typer(no_args_is_help=True, help="The registry database: schema version, roles.")


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the registry schema to this fleetgate's revision; run as the database owner."""
    config = home_config()
    before = schema.upgrade(config.database_url)
    if before.current:
        outcome = f"already at revision {schema.HEAD}"
    elif before.legacy:
        outcome = f"adopted (created before versioned migrations), now at revision {schema.HEAD}"
    else:
        outcome = f"upgraded from {before.revision or 'nothing'} to revision {schema.HEAD}"
    registry = Registry(config.database_url)
    registry.audit(AuditRecord(admin_actor(), "db.upgrade", "ok", None, outcome))
    registry.close()
    typer.echo(f"registry schema {outcome}")


@db_app.command("status")
def db_status(as_json: JsonFlag = False) -> None:
    """Show the registry schema's revision and whether it is the one this fleetgate needs."""
    state = schema.status_at(home_config().database_url)
    row = {"revision": state.revision, "head": schema.HEAD, "current": state.current}
    typer.echo(json.dumps(row) if as_json else state.describe())


@db_app.command("grant")
def db_grant(
    broker_role: Annotated[str, typer.Option(help="PostgreSQL role the brokers log in as.")],
    enrollment_role: Annotated[
        str, typer.Option(help="PostgreSQL role the enrollment services log in as.")
    ],
    admin_role: Annotated[
        str | None, typer.Option(help="Role for day-to-day admin commands (not upgrades).")
    ] = None,
    print_only: Annotated[
        bool, typer.Option("--print", help="Print the SQL instead of running it.")
    ] = False,
) -> None:
    """Grant each service role only what it needs (PostgreSQL; run as the schema owner)."""
    statements = schema.grant_statements(
        broker_role=broker_role, enrollment_role=enrollment_role, admin_role=admin_role
    )
    if print_only:
        typer.echo("".join(f"{statement};\n" for statement in statements), nl=False)
        return
    schema.grant(home_config().database_url, statements)
    typer.echo(f"granted: {', '.join(r for r in (broker_role, enrollment_role, admin_role) if r)}")
