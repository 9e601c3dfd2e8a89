"""``fleetgate ca``: create and inspect the fleet CA, issue server certificates."""

from __future__ import annotations

import datetime as dt
import re
import shutil
from pathlib import Path
from typing import Annotated

import typer
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from enrollment import ca as ca_module
from enrollment import profiles, rotation
from enrollment.registry import (
    AuditRecord,
    Registry,
    schema,
)
from enrollment.registry.authorities import authority_key_id
from fleetgate.cli.common import (
    JsonFlag,
    admin_actor,
    cert_summary,
    emit,
    home_config,
    open_registry,
    open_service,
    when,
)
from fleetgate.config import CONFIG_FILE, DEFAULT_CONFIG_TOML, Config
from fleetgate.errors import ConfigError
from fleetgate.keyfiles import write_certificates, write_private_key

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
    audit = AuditRecord(
        admin_actor(), "ca.init", "ok", None, f"root {cert_summary(anchors.root)['serial']}"
    )
    rotation.register_new_ca(config, registry, audit)
    open_service(config).publish_crl()
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


FABRIC_CERT, FABRIC_KEY, FABRIC_CA = "fabric-node.crt", "fabric-node.key", "ca.crt"


def issue_fabric_certificate(config: Config, node: str, out: Path) -> x509.Certificate:
    """A client certificate for a broker node's NATS connection: ``out`` gets the certificate
    (with the issuing CA), its key (0600) and the fleet root, which also verifies the NATS
    servers' certificates from ``ca server-cert``."""
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", node):
        raise ConfigError(f"node name {node!r}: 1-64 of A-Z a-z 0-9 _ - (as [fabric] node_name)")
    authority = ca_module.load_ca(config)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = authority.issue(
        profiles.FABRIC_NODE,
        profiles.Subject(common_name=node, organization="fleetgate fabric"),
        key.public_key(),
        dt.timedelta(days=config.ca.server_validity_days),
    )
    write_private_key(out / FABRIC_KEY, key)
    write_certificates(out / FABRIC_CERT, [cert, *authority.presented])
    shutil.copyfile(ca_module.ca_paths(config).root_cert, out / FABRIC_CA)
    return cert


@ca_app.command("fabric-cert")
def ca_fabric_cert(
    node: Annotated[str, typer.Option(help="The node's [fabric] node_name.")],
    out: Annotated[Path, typer.Option(help=f"Directory for {FABRIC_CERT}, {FABRIC_KEY}, ca.crt.")],
) -> None:
    """Issue a broker node's client certificate for TLS to the NATS fabric (clientAuth).

    Point ``[fabric] tls_cert_file``/``tls_key_file``/``tls_ca_file`` at the three files; the
    NATS servers take their own certificates from ``ca server-cert`` and trust ca.crt with
    ``verify: true`` (docs/operations.md).
    """
    cert = issue_fabric_certificate(home_config(), node, out)
    typer.echo(
        f"fabric client certificate {cert.serial_number:x} for node {node} "
        f"(until {when(cert.not_valid_after_utc)}) in {out}: {FABRIC_CERT}, {FABRIC_KEY} (0600), "
        f"{FABRIC_CA}"
    )


# -- rotation (issue 14): rotate, status, retire ------------------------------------------------

rotate_app = typer.Typer(no_args_is_help=True, help="Roll a CA over while devices keep connecting.")
ca_app.add_typer(rotate_app, name="rotate")


@rotate_app.command("issuing")
def ca_rotate_issuing() -> None:
    """A new issuing CA under the same root: it signs from now on, the old one stays trusted.

    Running enrollment services and brokers pick it up from the registry within
    ``ca.authority_poll_interval_s``; devices move over as they renew. Then `ca retire` the old.
    """
    config = home_config()
    registry = open_registry(config)
    issuing = rotation.rotate_issuing(config, registry, actor=admin_actor())
    typer.echo(f"new issuing CA {issuing.subject.rfc4514_string()}")
    typer.echo(
        f"  key id {authority_key_id(issuing)}; the previous one stays trusted until retired"
    )


@rotate_app.command("root")
def ca_rotate_root() -> None:
    """A new root, cross-certified both ways with the current one, and a new issuing CA under it.

    Devices learn the new root as they renew (EST cacerts); `ca retire` the old root once
    `ca status` shows no device on it.
    """
    config = home_config()
    registry = open_registry(config)
    root = rotation.rotate_root(config, registry, actor=admin_actor())
    typer.echo(f"new root CA {root.subject.rfc4514_string()} (key id {authority_key_id(root)})")
    typer.echo(f"  trust anchor for new devices and brokers: {config.ca_dir / 'root.crt'}")


@ca_app.command("status")
def ca_status(as_json: JsonFlag = False) -> None:
    """Every CA generation, its state, and how many active devices still hold its certificates."""
    registry = open_registry(home_config())
    counts = registry.active_devices_by_issuer()
    rows = [
        {
            "key_id": r.key_id[:16],
            "role": r.role.value,
            "state": r.state.value,
            "active_devices": counts.get(r.key_id, 0) if r.role == "issuing" else "-",
            "subject": r.certificate.subject.rfc4514_string(),
            "not_after": when(r.certificate.not_valid_after_utc),
        }
        for r in registry.authorities()
    ]
    emit(rows, as_json)


@ca_app.command("retire")
def ca_retire(
    key_id: Annotated[str, typer.Argument(help="The CA's key id (a prefix) from `ca status`.")],
    force: Annotated[
        bool, typer.Option(help="Retire even if active devices still need it; lists them.")
    ] = False,
) -> None:
    """End a rotation's overlap: stop trusting an old issuing CA (or an old root, with all under
    it). Refused while an active device still holds a certificate from it, unless --force."""
    config = home_config()
    registry = open_registry(config)
    done = rotation.retire(config, registry, key_id, force=force, actor=admin_actor())
    open_service(config).publish_crl()
    for record in done.retired:
        typer.echo(f"retired {record.role} {record.certificate.subject.rfc4514_string()}")
    if done.cut_off:
        typer.echo(f"cut off {len(done.cut_off)} certificate(s), revoked (cessationOfOperation):")
        for holder in done.cut_off:
            typer.echo(f"  {holder}")
