"""``fleetgate sim``: run a scenario against a throw-away deployment (the default) or a running
one; report in text, JSON and HTML; exit 1 when an invariant broke, so CI can use it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated

import typer

from fleetgate.cli.common import JsonFlag, home_config, state


def _broker(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise typer.BadParameter(f"{text!r}: give host:port")
    return host, int(port)


def sim(
    scenario_file: Annotated[
        Path | None,
        typer.Argument(
            help="A scenario (TOML, see docs/simulation.md); without one a default scenario "
            "runs: 100 devices, a ramp, steady traffic with churn, misbehaviour, a revocation."
        ),
    ] = None,
    devices: Annotated[
        int | None, typer.Option(help="Resize the fleet (every group in proportion).")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="Write report.txt, report.json and report.html (plots) into DIR."),
    ] = None,
    procs: Annotated[int, typer.Option(help="Spread the devices over N processes.")] = 1,
    home_registry: Annotated[
        bool,
        typer.Option(
            "--home-registry",
            help="Run on the data directory's CA and registry (--home) instead of a throw-away "
            "one; what the run adds stays there.",
        ),
    ] = False,
    keep: Annotated[
        bool, typer.Option(help="Keep the throw-away data directory (its logs, its registry).")
    ] = False,
    est_url: Annotated[
        str | None, typer.Option(help="A running deployment's EST URL (remote mode).")
    ] = None,
    broker: Annotated[
        list[str] | None, typer.Option(help="host:port of a broker (remote mode; repeatable).")
    ] = None,
    ca: Annotated[Path | None, typer.Option(help="The fleet's root certificate (remote).")] = None,
    station_cert: Annotated[Path | None, typer.Option(help="Station certificate (remote).")] = None,
    station_key: Annotated[Path | None, typer.Option(help="Station key (remote).")] = None,
    subscriber: Annotated[
        Path | None,
        typer.Option(
            help="Key + certificate PEM of an identity that may subscribe to "
            "devices/+/telemetry (remote; without it delivery is not checked)."
        ),
    ] = None,
    id_prefix: Annotated[
        str,
        typer.Option(
            help="Remote mode: device ids are PREFIX<group>-00000...; the station must have them."
        ),
    ] = "sim-",
    server_name: Annotated[
        str, typer.Option(help="TLS server name of the services (remote).")
    ] = "localhost",
    key_store: Annotated[
        str,
        typer.Option(
            help="file: run the scenario (whose groups may have key_store tpm or smartcard); "
            "tpm or smartcard: instead a line of at most 20 virtual hardware devices "
            "(attested enrollment, one revoked, one software key refused)."
        ),
    ] = "file",
    messages: Annotated[
        int, typer.Option(help="Messages per device (--key-store tpm|smartcard).")
    ] = 5,
    as_json: JsonFlag = False,
) -> None:
    """Simulate a fleet: enroll over EST, connect over mTLS, publish, misbehave, suffer faults;
    then check the invariants and report."""
    if key_store != "file":
        _hardware_line(key_store, devices or 3, messages, home_registry, as_json)
        return
    from firmware_sim.engine import Coordinator, Remote
    from firmware_sim.progress import LiveLine
    from firmware_sim.scenario import DEFAULT, ScenarioError, load_scenario, resized

    try:
        scenario = DEFAULT if scenario_file is None else load_scenario(scenario_file)
        if devices is not None:
            scenario = resized(scenario, devices)
    except ScenarioError as exc:
        raise typer.BadParameter(str(exc), param_hint="SCENARIO_FILE") from exc
    remote = None
    if est_url is not None:
        if not (broker and ca and station_cert and station_key):
            raise typer.BadParameter(
                "remote mode needs --broker, --ca, --station-cert, --station-key"
            )
        remote = Remote(
            est_url,
            tuple(_broker(b) for b in broker),
            ca,
            station_cert,
            station_key,
            id_prefix,
            subscriber,
            server_name,
        )
    home = home_config().home if home_registry else None
    line = LiveLine(sys.stderr, enabled=not as_json or sys.stderr.isatty())
    try:
        coordinator = Coordinator(
            scenario, remote=remote, home=home, procs=procs, keep=keep, progress=line.update
        )
        result = asyncio.run(coordinator.run())
    except ValueError as exc:
        line.close()
        raise typer.BadParameter(str(exc)) from exc
    line.close()
    _report(result, report, as_json)
    if result.violations:
        raise typer.Exit(1)


def _report(result: object, directory: Path | None, as_json: bool) -> None:
    from firmware_sim.engine import RunResult
    from firmware_sim.summary import to_json, to_text

    assert isinstance(result, RunResult)
    text, data = to_text(result), to_json(result)
    if directory is not None:
        from firmware_sim.html_report import render

        directory.mkdir(parents=True, exist_ok=True)
        (directory / "report.txt").write_text(text + "\n")
        (directory / "report.json").write_text(data + "\n")
        (directory / "report.html").write_text(render(result))
        text += f"\nreport       {directory / 'report.html'}"
    typer.echo(data if as_json else text)


def _hardware_line(
    key_store: str, devices: int, messages: int, home_registry: bool, as_json: bool
) -> None:
    """A small TPM or smartcard line, on a throw-away data directory unless asked otherwise."""
    from rich.progress import Progress

    from firmware_sim.deployment import LocalDeployment
    from firmware_sim.hardware_line import LinePlan, parse_kind
    from firmware_sim.runner import simulate_hardware

    line = LinePlan(kind=parse_kind(key_store), devices=devices, messages=messages)
    deployment = None
    if home_registry:
        config = home_config()
    else:
        deployment = LocalDeployment(None, {})
        deployment.prepare()
        config = deployment.config
    try:
        with Progress(transient=True, disable=as_json) as bar:
            tasks = {
                "enrolled": bar.add_task("enrolling", total=devices),
                "ran": bar.add_task("running", total=devices),
                "manufactured": bar.add_task(f"making {key_store}s", total=devices),
            }
            report = asyncio.run(
                simulate_hardware(config, line, lambda stage, n: bar.advance(tasks[stage], n))
            )
    finally:
        if deployment is not None:
            deployment.close()
    typer.echo(report.to_json() if as_json else report.to_text())


__all__ = ["sim", "state"]
