"""``fleetgate``: the admin command line (Typer).

Human tables by default, ``--json`` for scripts; failures print one line and exit non-zero.
"""

from __future__ import annotations

import os
import sqlite3
import sys
from pathlib import Path
from typing import Annotated

import typer
from sqlalchemy.exc import SQLAlchemyError

from enrollment import ca as ca_module
from enrollment.registry import AuditRecord, Registry
from enrollment.registry.engine import display_url, failure_cause, unreachable
from fleetgate.cli import ca, db, devices, policy, records, serve, sim, stations
from fleetgate.cli.bridge import bridge_app
from fleetgate.cli.common import admin_actor, home_config, state
from fleetgate.errors import FleetgateError

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
app.add_typer(ca.ca_app, name="ca")
app.add_typer(stations.station_app, name="station")
app.add_typer(stations.batch_app, name="batch")
app.add_typer(devices.device_app, name="device")
app.add_typer(records.crl_app, name="crl")
app.add_typer(policy.acl_app, name="acl")
app.add_typer(policy.group_app, name="group")
app.add_typer(serve.serve_app, name="serve")
app.add_typer(bridge_app, name="bridge")
app.add_typer(db.db_app, name="db")
app.add_typer(records.audit_app, name="audit")
app.command("sim")(sim.sim)


@app.callback()
def _main(
    home: Annotated[
        Path | None, typer.Option("--home", envvar="FLEETGATE_HOME", help="Data directory.")
    ] = None,
) -> None:
    state["home"] = home


def _command_words(argv: list[str]) -> list[str]:
    """The command path (e.g. ["device", "revoke"]), skipping global options and their values."""
    words: list[str] = []
    skip_next = False
    for word in argv:
        if skip_next:
            skip_next = False
        elif word == "--home":
            skip_next = True
        elif not word.startswith("-"):
            words.append(word)
    return words[:2]


def _audit_cli_refusal(exc: FleetgateError) -> None:
    """Record a refused admin command, if there is a registry to record it in."""
    if exc.audited:
        return
    words = _command_words(sys.argv[1:])
    try:
        config = home_config()
        if not ca_module.is_initialised(config):
            return  # no fleet here yet: nothing to audit into
        registry = Registry(config.database_url)
        reason = f"{exc.code}: {exc.message}"
        registry.audit(
            AuditRecord(admin_actor(), "cli." + ".".join(words), "refused", None, reason)
        )
        registry.close()
    except FleetgateError:
        return  # the configuration itself is what failed; the message already says so


def _database_failure(exc: SQLAlchemyError | sqlite3.Error) -> str:
    """One line naming the database (no password) and the driver's reason, e.g. "the registry
    at postgresql://fleet@db:5432/fleet is unreachable: ... Connection refused"."""
    try:
        where = f"the registry at {display_url(home_config().database_url)}"
    except FleetgateError:
        where = "the registry"
    if unreachable(exc):
        return f"{where} is unreachable: {failure_cause(exc)}"
    return f"{where} refused the command: {failure_cause(exc)}"


def main() -> None:
    """Console entry point: typed errors become one line on stderr and exit code 1.

    Files fleetgate creates are private to their owner unless it widens them on purpose
    (the CRL is world-readable), so the database and configuration are 0600 too.
    """
    os.umask(0o077)
    try:
        app()
    except FleetgateError as exc:
        _audit_cli_refusal(exc)
        typer.echo(f"error: {exc.message}", err=True)
        raise SystemExit(1) from None
    except OSError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    except (SQLAlchemyError, sqlite3.Error) as exc:  # not audited: the registry is the failure
        typer.echo(f"error: {_database_failure(exc)}", err=True)
        raise SystemExit(1) from None
