"""``fleetgate device``: inspect, suspend, reinstate, revoke, move and run devices."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from enrollment.registry import (
    DeviceState,
    SubjectKind,
)
from fleetgate import jsonlog
from fleetgate.cli.common import (
    JsonFlag,
    admin_actor,
    emit,
    home_config,
    open_registry,
    open_service,
    when,
)

device_app = typer.Typer(
    no_args_is_help=True, help="Enrolled devices: inspect, suspend, revoke, move between groups."
)


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
            "updated": when(d.updated_at),
        }
        for d in open_registry(home_config()).devices(state=state)
    ]
    emit(rows, as_json)


@device_app.command("show")
def device_show(device_id: str, as_json: JsonFlag = False) -> None:
    """Show one device and its certificates."""
    registry = open_registry(home_config())
    device = registry.device(device_id)
    certs = [
        {
            "serial": c.serial,
            "status": c.status.value,
            "not_after": when(c.not_after),
            "sha256": c.fingerprint_sha256,
            "revoked": f"{when(c.revoked_at)} {c.revocation_reason}" if c.revoked_at else "-",
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
    emit(certs, False)


def _change_device(device_id: str, target: DeviceState, reason: str, verb: str) -> None:
    device, crl = open_service(home_config()).change_device(
        device_id, target, reason=reason, actor=admin_actor()
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


@device_app.command("move")
def device_move(
    device_id: str,
    group: Annotated[str, typer.Option(help="The group whose ACL the device takes.")],
) -> None:
    """Move a device to another group: its live sessions take the group's ACL at once."""
    old = open_registry(home_config()).move_device(device_id, group, actor=admin_actor())
    typer.echo(
        f"device {device_id} moved from group {old} to {group}; live sessions take its ACL "
        "within the brokers' feed poll (a session holding what it no longer allows is closed)"
    )


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
