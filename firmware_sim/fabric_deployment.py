"""The in-process deployment on the fabric (``[deployment] fabric = N``): a real NATS
JetStream cluster on loopback and N ``fleetgate serve broker`` nodes on it, sharing the run's
data directory (CA, registry) and spreading the devices between them.

Sessions, QoS 1/2 queues and retained messages live in the cluster's R3 (or fewer, for a
smaller cluster) streams and KV buckets, so a device whose node dies resumes its persistent
session on another node. This deployment adds the faults only it can cause: SIGKILL or SIGTERM
of one broker node or one nats-server, started again after the fault's ``duration_s``.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from firmware_sim.deployment import LocalDeployment, free_port
from firmware_sim.nats_cluster import NatsCluster
from firmware_sim.scenario import Fault, FaultKind, Scenario
from firmware_sim.upstream import Upstream

NATS_HEALTHY_S = 60.0


class FabricDeployment(LocalDeployment):
    """The enrollment service, ``nodes`` broker nodes and the NATS cluster under them."""

    def __init__(
        self, home: Path | None, broker_config: Mapping[str, Any], *, nodes: int, nats_nodes: int
    ) -> None:
        super().__init__(home, broker_config)
        self.cluster = NatsCluster(self.home / "nats", size=nats_nodes)
        del self.ports["broker"]
        self.brokers = [f"broker-{n + 1}" for n in range(nodes)]
        common = {
            "FLEETGATE_FABRIC_SERVERS": ",".join(self.cluster.urls),
            "FLEETGATE_FABRIC_REPLICAS": str(min(3, nats_nodes)),
        }
        for name in self.brokers:
            self.ports[name] = free_port()
            self.service_env[name] = {
                **common,
                "FLEETGATE_BROKER_PORT": str(self.ports[name]),
                "FLEETGATE_BROKER_NODE_NAME": name,
            }

    async def start(self) -> None:
        """The cluster, then what one broker starts (enrollment, a bridge's upstream, the
        broker: here every node, each running the bridge, one forwarding it at a time)."""
        await asyncio.to_thread(self.cluster.start, NATS_HEALTHY_S)
        await super().start()

    async def start_service(self, name: str) -> None:
        """``broker`` (what a ``broker-kill`` fault restarts) is every node, one after the
        other: two nodes creating the fabric's streams at once on a fresh cluster saw
        "no response from stream" and exited."""
        for each in self.brokers if name == "broker" else [name]:
            await super().start_service(each)

    def stop_service(self, name: str, *, kill: bool = False) -> None:
        for each in self.brokers if name == "broker" else [name]:
            super().stop_service(each, kill=kill)

    def close_extra(self) -> None:
        super().close_extra()
        self.cluster.stop()

    async def inject(self, fault: Fault) -> None:
        """Stop one broker node or nats-server (SIGKILL or SIGTERM), wait ``duration_s``,
        start it again on its data and wait until it serves (a nats-server: until the cluster
        is healthy again, every node current)."""
        kill = fault.kind in (FaultKind.NODE_KILL, FaultKind.NATS_KILL)
        if fault.kind in (FaultKind.NODE_KILL, FaultKind.NODE_RESTART):
            name = self.brokers[fault.node - 1]
            await asyncio.to_thread(self.stop_service, name, kill=kill)
            await asyncio.sleep(fault.duration_s)
            await self.start_service(name)
            return
        if fault.kind in (FaultKind.NATS_KILL, FaultKind.NATS_RESTART):
            node = self.cluster.nodes[fault.node - 1]
            sig = signal.SIGKILL if kill else signal.SIGTERM
            await asyncio.to_thread(self.cluster.kill, node, sig)
            await asyncio.sleep(fault.duration_s)
            await asyncio.to_thread(self.cluster.restart, node, NATS_HEALTHY_S)
            return
        await super().inject(fault)


def deployment_for(scenario: Scenario, home: Path | None) -> LocalDeployment:
    """The in-process deployment a scenario asks for: one broker, or nodes on the fabric;
    with a bridge's upstream if it has a ``[bridge]``."""
    spec = scenario.deployment
    deployment = (
        FabricDeployment(
            home, scenario.broker_config, nodes=spec.fabric, nats_nodes=spec.nats_nodes
        )
        if spec.fabric
        else LocalDeployment(home, scenario.broker_config)
    )
    if scenario.bridge is not None:
        deployment.upstream = Upstream(deployment.config, scenario.bridge)
    return deployment


__all__ = ["FabricDeployment", "deployment_for"]
