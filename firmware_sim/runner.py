"""``fleetgate sim``: run the enrollment service and the broker in-process, then a fleet on them."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable

from broker.server import Broker
from enrollment.ca import load_ca
from enrollment.config import Config
from enrollment.registry import Registry
from enrollment.server import EnrollmentServer
from enrollment.service import EnrollmentService
from firmware_sim.fleet import Endpoints, FleetPlan, FleetSimulation
from firmware_sim.report import FleetReport

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


async def simulate(config: Config, plan: FleetPlan, progress: Progress) -> FleetReport:
    """Start both services on free ports, provision and run the fleet, stop the services."""
    config = _on_free_ports(config)
    est = EnrollmentServer(config)
    broker = Broker(config)
    est_port = await est.start()
    ports = await broker.start()
    registry = Registry(config.database_url)
    try:
        endpoints = Endpoints(f"https://localhost:{est_port}", "127.0.0.1", ports.tls)
        service = EnrollmentService(load_ca(config), registry)
        simulation = FleetSimulation(service, endpoints, plan, progress=progress)
        await asyncio.to_thread(simulation.provision)  # blocking EST client, served by this loop
        return await simulation.run()
    finally:
        registry.close()
        await broker.stop()
        await est.stop()
