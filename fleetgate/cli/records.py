"""``fleetgate crl export`` and ``fleetgate audit``: the revocation list and the audit trail."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.serialization import Encoding

from enrollment.registry.audit import AuditChainBroken, verify_archive
from fleetgate.cli.common import (
    JsonFlag,
    admin_actor,
    emit,
    home_config,
    open_registry,
    open_service,
    when,
)
from fleetgate.errors import FleetgateError

crl_app = typer.Typer(no_args_is_help=True, help="Certificate revocation lists.")


@crl_app.command("export")
def crl_export(
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
    pem: Annotated[bool, typer.Option(help="PEM instead of DER.")] = False,
) -> None:
    """Sign a fresh CRL from the registry and export it."""
    crl = open_service(home_config()).publish_crl()
    data = crl.public_bytes(Encoding.PEM if pem else Encoding.DER)
    if out is None:
        sys.stdout.buffer.write(data)
    else:
        out.write_bytes(data)
        typer.echo(f"CRL with {len(list(crl))} entries written to {out}", err=True)


audit_app = typer.Typer(
    help="The audit trail: list it (no subcommand), verify its hash chain, archive old rows."
)


@audit_app.callback(invoke_without_command=True)
def audit(
    ctx: typer.Context,
    device: Annotated[
        str | None, typer.Option(help="Only events about this device or station.")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many of the latest events.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Show the audit trail, oldest first."""
    if ctx.invoked_subcommand is not None:
        return
    rows = [
        {
            "at": when(e.at),
            "actor": e.actor,
            "action": e.action,
            "subject": e.subject or "-",
            "outcome": e.outcome,
            "reason": e.reason,
        }
        for e in open_registry(home_config()).audit_events(subject=device, limit=limit)
    ]
    emit(rows, as_json)


@audit_app.command("verify")
def audit_verify(
    archive: Annotated[
        Path | None, typer.Option(help="Check this archive file instead of the registry.")
    ] = None,
) -> None:
    """Walk the hash chain: one line with the rows checked and the head hash, or exit 1 naming
    the first row that breaks it."""
    if archive is not None:
        check, start = verify_archive(archive)
        typer.echo(
            f"archive {archive}: {check.checked} rows verified, chained from {start}, "
            f"last hash {check.head}"
        )
        return
    check = open_registry(home_config()).verify_audit_chain()
    if not check.ok:
        raise AuditChainBroken(
            f"audit row {check.broken_id} {check.problem} ({check.checked} rows before it hold)"
        )
    typer.echo(f"{check.checked} audit rows verified, head hash {check.head}")


@audit_app.command("archive")
def audit_archive(
    before: Annotated[
        dt.datetime,
        typer.Option(
            formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"],
            help="Archive the oldest rows stamped before this UTC date or time.",
        ),
    ],
    out: Annotated[Path, typer.Option(help="The archive file to write (JSON lines, 0600).")],
) -> None:
    """Export the oldest audit rows to a file, then delete them from the registry."""
    if out.exists():
        raise FleetgateError(f"{out} exists: archive to a new file")
    registry = open_registry(home_config())
    summary = registry.archive_audit(before.replace(tzinfo=dt.UTC), out, actor=admin_actor())
    if summary.count == 0:
        typer.echo(f"no audit rows before {before:%Y-%m-%d %H:%M:%S}Z: nothing archived")
        return
    typer.echo(
        f"{summary.count} audit rows (through id {summary.last_id}) archived to {out}, "
        f"last hash {summary.last_hash}; store the file elsewhere"
    )
