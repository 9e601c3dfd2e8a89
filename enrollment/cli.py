"""``fleetgate``: the admin command line (Typer).

Human tables by default, ``--json`` for scripts; failures print one line and exit non-zero.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import getpass
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from sqlmodel import col, select

from broker.bridge.cli import bridge_app
from enrollment import ca as ca_module
from enrollment import jsonlog
from enrollment.config import CONFIG_FILE, DEFAULT_CONFIG_TOML, Config, load_config
from enrollment.errors import CAPassphraseError, EnrollmentRefused, FleetgateError, NotFound
from enrollment.ids import validate_id
from enrollment.keyfiles import write_certificates, write_private_key
from enrollment.registry import (
    AuditRecord,
    Device,
    DeviceState,
    Registry,
    StationState,
    SubjectKind,
    schema,
)
from enrollment.registry.models import as_utc
from enrollment.service import EnrollmentService

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
ca_app = typer.Typer(no_args_is_help=True, help="Create and inspect the fleet CA.")
station_app = typer.Typer(no_args_is_help=True, help="Production-line stations allowed to enroll.")
batch_app = typer.Typer(no_args_is_help=True, help="Device ids a station may enroll.")
device_app = typer.Typer(no_args_is_help=True, help="Enrolled devices: inspect, suspend, revoke.")
crl_app = typer.Typer(no_args_is_help=True, help="Certificate revocation lists.")
acl_app = typer.Typer(no_args_is_help=True, help="Per-group topic ACL templates (%d = device id).")
group_app = typer.Typer(no_args_is_help=True, help="Device groups' key-protection policy.")
serve_app = typer.Typer(no_args_is_help=True, help="Run fleetgate services.")
db_app = typer.Typer(no_args_is_help=True, help="The registry database: schema version, roles.")
app.add_typer(ca_app, name="ca")
app.add_typer(station_app, name="station")
app.add_typer(batch_app, name="batch")
app.add_typer(device_app, name="device")
app.add_typer(crl_app, name="crl")
app.add_typer(acl_app, name="acl")
app.add_typer(group_app, name="group")
app.add_typer(serve_app, name="serve")
app.add_typer(bridge_app, name="bridge")
app.add_typer(db_app, name="db")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
_state: dict[str, Path | None] = {"home": None}


@app.callback()
def _main(
    home: Annotated[
        Path | None, typer.Option("--home", envvar="FLEETGATE_HOME", help="Data directory.")
    ] = None,
) -> None:
    _state["home"] = home


def _config() -> Config:
    return load_config(_state["home"])


def _actor() -> str:
    return f"admin:{getpass.getuser()}"


def _service(config: Config) -> EnrollmentService:
    """The service with the CA unlocked; a failed unlock is audited before it is reported."""
    registry = _registry(config)
    try:
        ca = ca_module.load_ca(config)
    except CAPassphraseError as exc:
        registry.audit(
            AuditRecord(_actor(), "ca.unlock", "refused", None, f"{exc.code}: {exc.message}")
        )
        exc.audited = True
        raise
    return EnrollmentService(ca, registry)


def _registry(config: Config) -> Registry:
    ca_module.load_anchors(config)  # a clear "run ca init" error before touching the database
    return Registry(config.database_url)


def _when(value: dt.datetime | None) -> str:
    return as_utc(value).strftime("%Y-%m-%d %H:%M:%SZ") if value else "-"


def _emit(rows: Sequence[dict[str, Any]], as_json: bool) -> None:
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


def _cert_summary(cert: x509.Certificate) -> dict[str, Any]:
    return {
        "subject": cert.subject.rfc4514_string(),
        "serial": f"{cert.serial_number:x}",
        "not_after": _when(cert.not_valid_after_utc),
        "key": f"EC {cert.public_key().curve.name}",  # type: ignore[union-attr]
    }


# -- db ----------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade() -> None:
    """Bring the registry schema to this fleetgate's revision; run as the database owner."""
    config = _config()
    before = schema.upgrade(config.database_url)
    if before.current:
        outcome = f"already at revision {schema.HEAD}"
    elif before.legacy:
        outcome = f"adopted (created before versioned migrations), now at revision {schema.HEAD}"
    else:
        outcome = f"upgraded from {before.revision or 'nothing'} to revision {schema.HEAD}"
    registry = Registry(config.database_url)
    registry.audit(AuditRecord(_actor(), "db.upgrade", "ok", None, outcome))
    registry.close()
    typer.echo(f"registry schema {outcome}")


@db_app.command("status")
def db_status(as_json: JsonFlag = False) -> None:
    """Show the registry schema's revision and whether it is the one this fleetgate needs."""
    state = schema.status_at(_config().database_url)
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
    schema.grant(_config().database_url, statements)
    typer.echo(f"granted: {', '.join(r for r in (broker_role, enrollment_role, admin_role) if r)}")


# -- ca ----------------------------------------------------------------------------------------


@ca_app.command("init")
def ca_init(
    curve: Annotated[str, typer.Option(help="Root key curve: P-256 or P-384.")] = "",
    force: Annotated[bool, typer.Option(help="Replace an existing CA.")] = False,
) -> None:
    """Create the root and issuing CA (keys encrypted with FLEETGATE_CA_PASSPHRASE)."""
    config = _config()
    config.home.mkdir(parents=True, exist_ok=True)
    if not (config.home / CONFIG_FILE).exists():
        (config.home / CONFIG_FILE).write_text(DEFAULT_CONFIG_TOML)
    anchors = ca_module.init_ca(config, curve=curve or None, force=force)
    schema.create_if_empty(config.database_url)
    registry = Registry(config.database_url)
    _service(config).publish_crl()
    registry.audit(
        AuditRecord(
            _actor(), "ca.init", "ok", None, f"root {_cert_summary(anchors.root)['serial']}"
        )
    )
    typer.echo(f"CA created in {config.ca_dir}")
    typer.echo(f"  root:    {anchors.root.subject.rfc4514_string()}")
    typer.echo(f"  issuing: {anchors.issuing.subject.rfc4514_string()}")
    typer.echo(f"  trust anchor for devices and brokers: {config.ca_dir / 'root.crt'}")


@ca_app.command("show")
def ca_show(as_json: JsonFlag = False) -> None:
    """Show the root and issuing CA certificates."""
    anchors = ca_module.load_anchors(_config())
    rows = [
        {"role": "root", **_cert_summary(anchors.root)},
        {"role": "issuing", **_cert_summary(anchors.issuing)},
    ]
    _emit(rows, as_json)


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
    config = _config()
    credentials = ca_module.ServerCredentials(
        out / "broker.crt", out / "broker.key", tuple(dict.fromkeys(names))
    )
    ca_module.ensure_server_certificate(config, credentials, replace=True)
    shutil.copyfile(ca_module.ca_paths(config).chain, out / "chain.pem")
    cert = x509.load_pem_x509_certificates(credentials.cert.read_bytes())[0]
    typer.echo(
        f"server certificate {cert.serial_number:x} for {', '.join(credentials.names)} "
        f"(until {_when(cert.not_valid_after_utc)}) in {out}: copy broker.crt, broker.key "
        "and chain.pem to the host's <home>/ca/"
    )


# -- stations ----------------------------------------------------------------------------------


@station_app.command("add")
def station_add(
    name: str,
    out: Annotated[
        Path | None, typer.Option(help="Directory for the station's key and cert.")
    ] = None,
) -> None:
    """Issue a station certificate; its key is written 0600 beside it."""
    config = _config()
    key, cert = _service(config).add_station(name, actor=_actor())
    directory = out or config.stations_dir / name
    write_private_key(directory / "station.key", key)
    write_certificates(directory / "station.crt", [cert, ca_module.load_anchors(config).issuing])
    typer.echo(f"station {name} added; key and certificate in {directory}")


@station_app.command("list")
def station_list(as_json: JsonFlag = False) -> None:
    """List stations."""
    registry = _registry(_config())
    rows = []
    for station in registry.stations():
        certs = registry.certificates_of(SubjectKind.STATION, station.id)
        rows.append(
            {
                "id": station.id,
                "state": station.state.value,
                "certificate": certs[-1].serial if certs else "-",
                "expires": _when(certs[-1].not_after) if certs else "-",
            }
        )
    _emit(rows, as_json)


@station_app.command("revoke")
def station_revoke(
    name: str, reason: Annotated[str, typer.Option(help="RFC 5280 reason.")] = "keyCompromise"
) -> None:
    """Revoke a station: it can enroll nothing more; the CRL is regenerated."""
    _service(_config()).revoke_station(name, reason=reason, actor=_actor())
    typer.echo(f"station {name} revoked ({reason}); CRL regenerated")


# -- batches -----------------------------------------------------------------------------------


@batch_app.command("add")
def batch_add(
    station: str,
    device_ids: list[str],
    group: Annotated[str, typer.Option(help="Device group (selects ACL templates).")] = "default",
    label: Annotated[str, typer.Option(help="Free-text label, e.g. a work order.")] = "",
) -> None:
    """Allow STATION to enroll DEVICE_IDS (all are added, or none)."""
    batch_id = _registry(_config()).add_batch(
        station, device_ids, group=group, label=label, actor=_actor()
    )
    typer.echo(f"batch {batch_id}: station {station} may enroll {len(device_ids)} device(s)")


@batch_app.command("import")
def batch_import(csv_file: Path) -> None:
    """Import batches from CSV with columns station,device_id[,group]."""
    by_key: dict[tuple[str, str], list[str]] = {}
    with csv_file.open(newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            if not row.get("station") or not row.get("device_id"):
                raise typer.BadParameter(
                    f"{csv_file}:{line}: needs 'station' and 'device_id' columns"
                )
            key = (row["station"].strip(), (row.get("group") or "default").strip())
            by_key.setdefault(key, []).append(row["device_id"].strip())
    registry = _registry(_config())
    _check_import(csv_file, registry, by_key)
    for (station, group), ids in by_key.items():
        batch_id = registry.add_batch(
            station, ids, group=group, label=csv_file.name, actor=_actor()
        )
        typer.echo(
            f"batch {batch_id}: station {station} may enroll {len(ids)} device(s) in group {group}"
        )


def _check_import(
    csv_file: Path, registry: Registry, by_key: dict[tuple[str, str], list[str]]
) -> None:
    """Refuse the whole file up front, so a bad row in a later batch adds no earlier one."""
    ids = [validate_id(d) for batch in by_key.values() for d in batch]
    for station, group in by_key:
        validate_id(group, kind="group")
        if registry.station(station).state != StationState.ACTIVE:
            raise NotFound(f"{csv_file}: station {station} is revoked")
    twice = sorted(d for d, n in Counter(ids).items() if n > 1)
    if twice:
        raise EnrollmentRefused(f"{csv_file}: device id(s) listed twice: {', '.join(twice[:10])}")
    with registry.transaction() as s:
        taken = sorted(s.exec(select(Device.id).where(col(Device.id).in_(ids))).all())
    if taken:
        raise EnrollmentRefused(
            f"{csv_file}: device id(s) already registered: {', '.join(taken[:10])}; "
            "ids are never reused; nothing was imported"
        )


# -- devices -----------------------------------------------------------------------------------


@device_app.command("list")
def device_list(
    state: Annotated[DeviceState | None, typer.Option(help="Only devices in this state.")] = None,
    as_json: JsonFlag = False,
) -> None:
    """List devices."""
    rows = [
        {
            "id": d.id,
            "group": d.group,
            "state": d.state.value,
            "station": d.station_id or "-",
            "updated": _when(d.updated_at),
        }
        for d in _registry(_config()).devices(state=state)
    ]
    _emit(rows, as_json)


@device_app.command("show")
def device_show(device_id: str, as_json: JsonFlag = False) -> None:
    """Show one device and its certificates."""
    registry = _registry(_config())
    device = registry.device(device_id)
    certs = [
        {
            "serial": c.serial,
            "status": c.status.value,
            "not_after": _when(c.not_after),
            "sha256": c.fingerprint_sha256,
            "revoked": f"{_when(c.revoked_at)} {c.revocation_reason}" if c.revoked_at else "-",
        }
        for c in registry.certificates_of(SubjectKind.DEVICE, device_id)
    ]
    info = {
        "id": device.id,
        "group": device.group,
        "state": device.state.value,
        "station": device.station_id,
        "key": device.key_protection,
        "bound_to": device.hardware_binding or "-",
        "evidence": device.attestation or "-",
    }
    if as_json:
        typer.echo(json.dumps({**info, "certificates": certs}, indent=2))
        return
    for key, value in info.items():
        typer.echo(f"{key:8} {value}")
    typer.echo("")
    _emit(certs, False)


def _change_device(device_id: str, target: DeviceState, reason: str, verb: str) -> None:
    device, crl = _service(_config()).change_device(
        device_id, target, reason=reason, actor=_actor()
    )
    typer.echo(f"device {device.id} {verb}; CRL regenerated ({len(list(crl))} entries)")


@device_app.command("suspend")
def device_suspend(
    device_id: str, reason: Annotated[str, typer.Option()] = "certificateHold"
) -> None:
    """Suspend a device (its certificate goes on hold in the CRL)."""
    _change_device(device_id, DeviceState.SUSPENDED, reason, "suspended")


@device_app.command("reinstate")
def device_reinstate(device_id: str) -> None:
    """Re-admit a suspended device (never a revoked one)."""
    _change_device(device_id, DeviceState.ACTIVE, "reinstated", "reinstated")


@device_app.command("revoke")
def device_revoke(
    device_id: str,
    reason: Annotated[
        str, typer.Option(help="RFC 5280 reason, e.g. keyCompromise.")
    ] = "unspecified",
) -> None:
    """Revoke a device for good: every certificate it holds goes into the CRL."""
    _change_device(device_id, DeviceState.REVOKED, reason, f"revoked ({reason})")


@device_app.command("run")
def device_run(
    directory: Annotated[Path, typer.Argument(help="The device's key store directory.")],
    count: Annotated[int | None, typer.Option(help="Stop after this many messages.")] = None,
    interval: Annotated[float | None, typer.Option(help="Seconds between messages.")] = None,
) -> None:
    """Run a device agent from its key-store directory (file, TPM or smartcard; see the README)."""
    import signal
    import threading

    from device_sdk.agent import run_agent
    from device_sdk.errors import DeviceSdkError

    jsonlog.configure("INFO")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        sent = run_agent(directory, stop=stop, count=count, interval_s=interval)
    except DeviceSdkError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise SystemExit(1) from None
    typer.echo(f"device agent stopped after {sent} message(s)")


# -- acl -----------------------------------------------------------------------------------------


@acl_app.command("set")
def acl_set(
    group: str,
    publish: Annotated[list[str], typer.Option(help="Topic filter a device may publish to.")],
    subscribe: Annotated[list[str], typer.Option(help="Topic filter a device may subscribe to.")],
) -> None:
    """Replace GROUP's ACL template, e.g. --publish 'devices/%d/#'."""
    _registry(_config()).set_acl(group, publish=publish, subscribe=subscribe, actor=_actor())
    typer.echo(f"ACL of group {group} set: publish {publish}, subscribe {subscribe}")


@acl_app.command("show")
def acl_show(group: str, as_json: JsonFlag = False) -> None:
    """Show GROUP's ACL template (the built-in default when none is stored)."""
    from broker.acl import DEFAULT_TEMPLATE

    stored = _registry(_config()).acl_patterns(group)
    source = "stored" if stored else "default"
    template = stored or DEFAULT_TEMPLATE
    rows = [
        {"group": group, "action": "publish", "pattern": p, "source": source}
        for p in template.publish
    ]
    rows += [
        {"group": group, "action": "subscribe", "pattern": p, "source": source}
        for p in template.subscribe
    ]
    _emit(rows, as_json)


@group_app.command("require")
def group_require(
    group: str,
    protection: Annotated[
        str, typer.Argument(help="none, tpm, smartcard or any-hardware.", show_default=False)
    ],
) -> None:
    """Require GROUP's devices to prove their key protection at enrollment and renewal."""
    from enrollment.policy import parse_requirement

    requirement = parse_requirement(protection)
    _registry(_config()).set_group_policy(group, requirement.value, actor=_actor())
    typer.echo(f"group {group} now requires key protection: {requirement}")


@group_app.command("list")
def group_list(as_json: JsonFlag = False) -> None:
    """Groups with a key-protection policy (other groups accept any key)."""
    rows = [
        {"group": p.group, "requires": p.required_protection}
        for p in _registry(_config()).group_policies()
    ]
    _emit(rows, as_json)


# -- crl / audit -------------------------------------------------------------------------------


@crl_app.command("export")
def crl_export(
    out: Annotated[Path | None, typer.Option(help="Write here instead of stdout.")] = None,
    pem: Annotated[bool, typer.Option(help="PEM instead of DER.")] = False,
) -> None:
    """Sign a fresh CRL from the registry and export it."""
    crl = _service(_config()).publish_crl()
    data = crl.public_bytes(Encoding.PEM if pem else Encoding.DER)
    if out is None:
        sys.stdout.buffer.write(data)
    else:
        out.write_bytes(data)
        typer.echo(f"CRL with {len(list(crl))} entries written to {out}", err=True)


@app.command("audit")
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
            "at": _when(e.at),
            "actor": e.actor,
            "action": e.action,
            "subject": e.subject or "-",
            "outcome": e.outcome,
            "reason": e.reason,
        }
        for e in _registry(_config()).audit_events(subject=device, limit=limit)
    ]
    _emit(rows, as_json)


@serve_app.command("enrollment")
def serve_enrollment(
    port: Annotated[int | None, typer.Option(help="Override enrollment.port.")] = None,
) -> None:
    """Serve EST over mutual TLS until interrupted."""
    from enrollment.server import run_forever

    config = _config()
    if port is not None:
        import dataclasses

        config = dataclasses.replace(
            config, enrollment=dataclasses.replace(config.enrollment, port=port)
        )
    jsonlog.configure(config.log.level, config.logs_dir)
    asyncio.run(run_forever(config))


@app.command("sim")
def sim(
    devices: Annotated[int, typer.Option(help="How many simulated devices.")] = 100,
    messages: Annotated[int, typer.Option(help="Telemetry messages per device.")] = 5,
    misbehaving: Annotated[
        int, typer.Option(help="Devices that misbehave on purpose (--key-store file).")
    ] = 3,
    interval: Annotated[
        float, typer.Option(help="Seconds between a device's messages (--key-store file).")
    ] = 0.0,
    key_store: Annotated[
        str,
        typer.Option(
            help="file: thousands of software-key devices; tpm or smartcard: a line of at most "
            "20 virtual hardware devices (attested enrollment, one revoked, one software key "
            "refused)."
        ),
    ] = "file",
    as_json: JsonFlag = False,
) -> None:
    """Simulate a fleet: enroll over EST, connect over mTLS, publish, misbehave; then report."""
    from rich.progress import Progress

    from firmware_sim.fleet import FleetPlan
    from firmware_sim.hardware_line import LinePlan, parse_kind
    from firmware_sim.runner import simulate, simulate_hardware

    config = _config()
    with Progress(transient=True, disable=as_json) as bar:
        tasks = {
            "enrolled": bar.add_task("enrolling", total=devices),
            "ran": bar.add_task("running", total=devices),
        }
        if key_store == "file":
            plan = FleetPlan(
                devices=devices, messages=messages, misbehaving=misbehaving, interval_s=interval
            )
            run = simulate(config, plan, lambda stage, n: bar.advance(tasks[stage], n))
        else:
            line = LinePlan(kind=parse_kind(key_store), devices=devices, messages=messages)
            tasks["manufactured"] = bar.add_task(f"making {key_store}s", total=devices)
            run = simulate_hardware(config, line, lambda stage, n: bar.advance(tasks[stage], n))
        report = asyncio.run(run)
    typer.echo(report.to_json() if as_json else report.to_text())


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
        config = _config()
        if not ca_module.is_initialised(config):
            return  # no fleet here yet: nothing to audit into
        registry = Registry(config.database_url)
        reason = f"{exc.code}: {exc.message}"
        registry.audit(AuditRecord(_actor(), "cli." + ".".join(words), "refused", None, reason))
        registry.close()
    except FleetgateError:
        return  # the configuration itself is what failed; the message already says so


@serve_app.command("broker")
def serve_broker(
    port: Annotated[int | None, typer.Option(help="Override broker.port.")] = None,
) -> None:
    """Serve MQTT over mutual TLS until interrupted (SIGINT or SIGTERM)."""
    from broker.server import run_forever

    config = _config()
    if port is not None:
        import dataclasses

        config = dataclasses.replace(config, broker=dataclasses.replace(config.broker, port=port))
    jsonlog.configure(config.log.level, config.logs_dir)
    asyncio.run(run_forever(config))


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
