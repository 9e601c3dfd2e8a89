"""What every command group shares: the data directory chosen on the command line, the
registry and service it opens, and how results are printed."""

from __future__ import annotations

import datetime as dt
import getpass
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509

from enrollment import ca as ca_module
from enrollment.registry import (
    AuditRecord,
    Registry,
)
from enrollment.registry.models import as_utc
from enrollment.service import EnrollmentService
from fleetgate.config import Config, load_config
from fleetgate.errors import CAPassphraseError

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
state: dict[str, Path | None] = {"home": None}


def home_config() -> Config:
    return load_config(state["home"])


def admin_actor() -> str:
    return f"admin:{getpass.getuser()}"


def open_service(config: Config) -> EnrollmentService:
    """The service with the CA unlocked; a failed unlock is audited before it is reported."""
    registry = open_registry(config)
    try:
        ca = ca_module.load_ca(config)
    except CAPassphraseError as exc:
        registry.audit(
            AuditRecord(admin_actor(), "ca.unlock", "refused", None, f"{exc.code}: {exc.message}")
        )
        exc.audited = True
        raise
    return EnrollmentService(ca, registry)


def open_registry(config: Config) -> Registry:
    ca_module.load_anchors(config)  # a clear "run ca init" error before touching the database
    return Registry(config.database_url)


def when(value: dt.datetime | None) -> str:
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def emit(rows: Sequence[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(list(rows), indent=2, default=str))
        return
    if not rows:
        typer.echo("(none)")
        return
    headers = list(rows[0])
    cells = [[str(r[h]) for h in headers] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(headers)]
    typer.echo("  ".join(h.upper().ljust(w) for h, w in zip(headers, widths, strict=True)).rstrip())
    for row in cells:
        typer.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def cert_summary(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_after": when(cert.not_valid_after_utc),
        "key": f"EC {cert.public_key().curve.name}",  # type: ignore[union-attr]
    }
