"""``fleetgate sim``: a simulated fleet or production line against a real service."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from fleetgate.cli.common import (
    JsonFlag,
    home_config,
)


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

    config = home_config()
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
