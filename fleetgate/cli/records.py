"""``fleetgate crl export`` and ``fleetgate audit``: the revocation list and the audit trail."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives.serialization import Encoding

from fleetgate.cli.common import (
    JsonFlag,
    emit,
    home_config,
    open_registry,
    open_service,
    when,
)

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


def audit(
    device: Annotated[
        str | None, typer.Option(help="Only events about this device or station.")
    ] = None,
    limit: Annotated[int, typer.Option(help="How many of the latest events.")] = 50,
    as_json: JsonFlag = False,
) -> None:
    """Show the audit trail, oldest first."""
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
