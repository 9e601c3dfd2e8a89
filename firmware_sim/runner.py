"""``fleetgate sim --key-store tpm|smartcard``: both services in-process, a hardware line."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from broker.server import Broker
from enrollment.ca import load_ca
from enrollment.registry import Registry
from enrollment.server import EnrollmentServer
from enrollment.service import EnrollmentService
from firmware_sim.fleet import Endpoints
from firmware_sim.hardware_line import HardwareLine, LinePlan
from firmware_sim.report import FleetReport
from fleetgate.config import Config

Progress = Callable[[str, int], None]


def _on_free_ports(config: Config) -> Config:
    """The same data directory, with every listener of this run on a free loopback port."""
    return dataclasses.replace(
        config,
        enrollment=dataclasses.replace(config.enrollment, host="127.0.0.1", port=0),
        broker=dataclasses.replace(
            config.broker, host="127.0.0.1", port=0, metrics_port=0, plaintext_port=0
        ),
    )


@asynccontextmanager
async def _services(config: Config) -> AsyncIterator[tuple[EnrollmentService, Endpoints]]:
    """Both services on free ports for the length of the block, then stopped."""
    config = _on_free_ports(config)
    est = EnrollmentServer(config)
    broker = Broker(config)
    est_port = await est.start()
    ports = await broker.start()
    registry = Registry(config.database_url)
    try:
        endpoints = Endpoints(f"https://localhost:{est_port}", "127.0.0.1", ports.tls)
        yield EnrollmentService(load_ca(config), registry), endpoints
    finally:
        registry.close()
        await broker.stop()
        await est.stop()


async def simulate_hardware(config: Config, plan: LinePlan, progress: Progress) -> FleetReport:
    """Make the virtual hardware, serve EST (trusting only its maker) and the broker, run the
    line; every process the line started is stopped at the end, however it ends."""
    line = HardwareLine(config, plan, progress=progress)
    try:
        line.manufacture()  # on this (the main) thread: card daemons die with their thread
        async with _services(line.trusting(config)) as (service, endpoints):
            return await line.run(service, endpoints)
    finally:
        line.close()
