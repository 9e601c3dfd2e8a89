"""``fleetgate serve``: the enrollment service and the MQTT broker, until interrupted."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from typing import Annotated

import typer

from fleetgate import jsonlog
from fleetgate.cli.common import (
    home_config,
)
from fleetgate.config import Config, node_name

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
    workers: Annotated[
        int,
        typer.Option(help="Broker processes on one port (SO_REUSEPORT), each a node of [fabric]."),
    ] = 1,
    worker: Annotated[int | None, typer.Option(hidden=True)] = None,
) -> None:
    """Serve MQTT over mutual TLS until interrupted (SIGINT or SIGTERM).

    With ``[fabric] local = true`` this also starts and supervises a local nats-server; with
    ``--workers N``, N broker processes (docs/operations.md).
    """
    import dataclasses

    from broker.workers import check_workers

    config = home_config()
    if port is not None:
        config = dataclasses.replace(config, broker=dataclasses.replace(config.broker, port=port))
    check_workers(config, workers)
    if worker is not None:
        from broker.server import run_forever
        from broker.workers import worker_config

        config = worker_config(config, worker)
    jsonlog.configure(config.log.level, config.logs_dir, node=node_name(config))
    if worker is not None:
        ready = sys.stdout.fileno()  # the parent reads "ready" there
        asyncio.run(run_forever(config, reuse_port=True, ready_fd=ready))
        return
    if not asyncio.run(_serve(config, workers)):
        raise typer.Exit(1)


async def _serve(config: Config, workers: int) -> bool:
    """One broker, or the supervisor of ``workers``; with the local nats-server around them.
    False when a worker failed to start."""
    local: contextlib.AbstractAsyncContextManager[object] = contextlib.nullcontext()
    if config.fabric is not None and config.fabric.local:
        from broker.fabric.local import LocalNats

        local = LocalNats(config)
    async with local:
        if workers == 1:
            from broker.server import run_forever

            await run_forever(config)
            return True
        return await _supervise_workers(config, workers)


async def _supervise_workers(config: Config, count: int) -> bool:
    from broker.tls import broker_credentials
    from broker.workers import Workers, worker_argv, worker_env
    from enrollment.ca import ensure_server_certificate

    # Once, here: N workers must not race to issue the broker's certificate.
    await asyncio.to_thread(ensure_server_certificate, config, broker_credentials(config))
    workers = Workers(count, worker_argv(config.broker.port), worker_env(config))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    running = loop.create_task(workers.run())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({running, stopped}, return_when=asyncio.FIRST_COMPLETED)
    await workers.stop()
    stopped.cancel()
    await running
    return not workers.failed
