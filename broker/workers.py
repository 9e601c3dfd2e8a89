"""``fleetgate serve broker --workers N``: N broker processes on one port, each a node of the
fabric (issue 12, "several cores on one machine").

One Python process uses one core. The workers listen on the same port with SO_REUSEPORT, and
the kernel spreads new connections among them; what one worker's client publishes reaches
another worker's subscribers through the fabric, exactly as between machines. So workers need
``[fabric]``: without it each would be an island, and the command refuses to start.

Each worker is a node of its own: ``<name>-w<i>``, ``<name>`` being what the broker would be
called alone (``[broker] node_name``, default ``<host>-<port>``), with ``/metrics`` on
``metrics_port + i`` when ``metrics_port`` is set. The parent
process starts them, restarts one that dies (with a log line), and stops them all by PID on
SIGINT/SIGTERM. A worker that exits before it first reported "ready" on its stdout (the fabric
unreachable, say: its reason is in the log) stops the whole command, which exits non-zero.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import signal
import sys
from collections.abc import Sequence

from fleetgate.config import Config, node_name
from fleetgate.errors import ConfigError

log = logging.getLogger("fleetgate.broker.workers")

RESTART_DELAY_S = 1.0
STOP_TIMEOUT_S = 20.0


def check_workers(config: Config, count: int) -> None:
    if count < 1:
        raise ConfigError("--workers must be at least 1")
    if count > 1 and config.fabric is None:
        raise ConfigError(
            f"--workers {count} needs [fabric] in fleetgate.toml: workers share subscribers, "
            "sessions and retained messages only through a NATS fabric (for one machine, "
            "[fabric] local = true); without it run one process"
        )


def worker_config(config: Config, index: int) -> Config:
    """Worker ``index``'s configuration: its own node name and metrics port."""
    broker = config.broker
    name = f"{node_name(config)}-w{index}"[-64:]
    metrics = broker.metrics_port + index if broker.metrics_port else 0
    return dataclasses.replace(
        config, broker=dataclasses.replace(broker, node_name=name, metrics_port=metrics)
    )


class Workers:
    """The worker processes, started from ``argv(index)``; ``run`` until ``stop``."""

    def __init__(self, count: int, argv: Sequence[str], env: dict[str, str]) -> None:
        self.count = count
        self._argv = list(argv)
        self._env = env
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.restarts = 0
        self._stopping = False
        self.failed: str = ""

    async def run(self) -> None:
        """Start every worker and keep them running; returns when one failed at start."""
        await asyncio.gather(*(self._keep(index) for index in range(self.count)))

    async def _spawn(self, index: int) -> asyncio.subprocess.Process:
        process = await asyncio.create_subprocess_exec(
            *self._argv,
            str(index),
            env=self._env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,  # "ready" once it listens
        )
        self.processes[index] = process
        log.info("broker worker started", extra={"worker": index, "pid": process.pid})
        return process

    async def _keep(self, index: int) -> None:
        first = True
        while not self._stopping:
            process = await self._spawn(index)
            assert process.stdout is not None
            ready = await process.stdout.readline() == b"ready\n"
            code = await process.wait()
            if self._stopping:
                return
            if first and not ready:
                self.failed = f"broker worker {index} exited at start (code {code})"
                log.error(self.failed)
                await self.stop()
                return
            first = False
            log.error(
                "broker worker exited: restarting",
                extra={"worker": index, "pid": process.pid, "code": code},
            )
            self.restarts += 1
            await asyncio.sleep(RESTART_DELAY_S)

    async def stop(self) -> None:
        """SIGTERM to each worker by PID; SIGKILL to those still running after the timeout."""
        self._stopping = True
        running = [p for p in self.processes.values() if p.returncode is None]
        for process in running:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in running)), STOP_TIMEOUT_S)
        except TimeoutError:
            for process in running:
                if process.returncode is None:
                    process.kill()
            await asyncio.gather(*(p.wait() for p in running))


def worker_argv(port: int) -> list[str]:
    """The command line of a worker (the index is appended)."""
    return [
        sys.executable,
        "-c",
        "from fleetgate.cli import main; main()",
        "serve",
        "broker",
        "--port",
        str(port),
        "--worker",
    ]


def worker_env(config: Config) -> dict[str, str]:
    return {**os.environ, "FLEETGATE_HOME": str(config.home)}
