"""``fleetgate ca``: create and inspect the fleet CA, issue server certificates."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509

from enrollment import ca as ca_module
from enrollment.registry import (
    AuditRecord,
    Registry,
    schema,
)
from fleetgate.cli.common import (
    JsonFlag,
    admin_actor,
    cert_summary,
    emit,
    home_config,
    open_service,
    when,
)
from fleetgate.config import CONFIG_FILE, DEFAULT_CONFIG_TOML

ca_app = typer.Typer(no_args_is_help=True, help="Create and inspect the fleet CA.")


@ca_app.command("init")
def ca_init(
    curve: Annotated[str, typer.Option(help="Root key curve: P-256 or P-384.")] = "",
    force: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
) -> None:
    """Create the root and issuing CA (keys encrypted with FLEETGATE_CA_PASSPHRASE)."""
    config = home_config()
    config.home.mkdir(parents=True, exist_ok=True)
    if not (config.home / CONFIG_FILE).exists():
        (config.home / CONFIG_FILE).write_text(DEFAULT_CONFIG_TOML)
    anchors = ca_module.init_ca(config, curve=curve or None, force=force)
    schema.create_if_empty(config.database_url)
    registry = Registry(config.database_url)
    open_service(config).publish_crl()
    registry.audit(
        AuditRecord(
            admin_actor(), "ca.init", "ok", None, f"root {cert_summary(anchors.root)['serial']}"
        )
    )
    typer.echo(f"CA created in {config.ca_dir}")
    typer.echo(f"  root:    {anchors.root.subject.rfc4514_string()}")
    typer.echo(f"  issuing: {anchors.issuing.subject.rfc4514_string()}")
    typer.echo(f"  trust anchor for devices and brokers: {config.ca_dir / 'root.crt'}")


@ca_app.command("show")
def ca_show(as_json: JsonFlag = False) -> None:
    """Show the root and issuing CA certificates."""
    anchors = ca_module.load_anchors(home_config())
    rows = [
        {"role": "root", **cert_summary(anchors.root)},
        {"role": "issuing", **cert_summary(anchors.issuing)},
    ]
    emit(rows, as_json)


@ca_app.command("server-cert")
def ca_server_cert(
    names: Annotated[
        list[str], typer.Option("--name", help="DNS name or IP the server answers to; repeat.")
    ],
    out: Annotated[Path, typer.Option(help="Directory for broker.crt, broker.key, chain.pem.")],
) -> None:
    """Issue a broker (or EST server) certificate for another host, which then needs no CA key.

    Copy the directory's files to that host's ``<home>/ca/``; ``serve broker`` there uses them
    as long as its ``broker.server_names`` match and more than 30 days remain.
    """
    config = home_config()
    credentials = ca_module.ServerCredentials(
        out / "broker.crt", out / "broker.key", tuple(dict.fromkeys(names))
    )
    ca_module.ensure_server_certificate(config, credentials, replace=True)
    shutil.copyfile(ca_module.ca_paths(config).chain, out / "chain.pem")
    cert = x509.load_pem_x509_certificates(credentials.cert.read_bytes())[0]
    typer.echo(
        f"server certificate {cert.serial_number:x} for {', '.join(credentials.names)} "
        f"(until {when(cert.not_valid_after_utc)}) in {out}: copy broker.crt, broker.key "
        "and chain.pem to the host's <home>/ca/"
    )
