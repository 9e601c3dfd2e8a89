"""Running a fleetgate service in the foreground until SIGINT or SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Protocol


class Service(Protocol):
    async def start(self) -> object: ...

    async def stop(self) -> None: ...


async def run_until_signalled(service: Service) -> None:
    """Start ``service``, wait for SIGINT or SIGTERM, then stop it cleanly."""
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await service.stop()
