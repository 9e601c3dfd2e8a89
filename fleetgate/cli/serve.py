"""``fleetgate serve``: the enrollment service and the MQTT broker, until interrupted."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from fleetgate import jsonlog
from fleetgate.cli.common import (
    home_config,
)

serve_app = typer.Typer(no_args_is_help=True, help="Run fleetgate services.")


@serve_app.command("enrollment")
def serve_enrollment(
    port: Annotated[int | None, typer.Option(help="Override enrollment.port.")] = None,
    workers: Annotated[
        int,
        typer.Option(help="Processes on the port (SO_REUSEPORT); more than 1 needs PostgreSQL."),
    ] = 1,
) -> None:
    """Serve EST over mutual TLS until interrupted."""
    from enrollment.server import run_forever, serve_processes

    if workers < 1:
        raise typer.BadParameter("--workers must be at least 1")

    config = home_config()
    if port is not None:
        import dataclasses

        config = dataclasses.replace(
            config, enrollment=dataclasses.replace(config.enrollment, port=port)
        )
    jsonlog.configure(config.log.level, config.logs_dir)
    if workers > 1:
        raise typer.Exit(serve_processes(config, workers))
    asyncio.run(run_forever(config))


@serve_app.command("broker")
def serve_broker(
    port: Annotated[int | None, typer.Option(help="Override broker.port.")] = None,
) -> None:
    """Serve MQTT over mutual TLS until interrupted (SIGINT or SIGTERM)."""
    from broker.server import run_forever

    config = home_config()
    if port is not None:
        import dataclasses

        config = dataclasses.replace(config, broker=dataclasses.replace(config.broker, port=port))
    jsonlog.configure(config.log.level, config.logs_dir)
    asyncio.run(run_forever(config))
