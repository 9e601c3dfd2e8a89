"""Creating the fabric's JetStream streams: every node tries at start, the first one wins."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from broker.fabric.node import FabricUnavailable

if TYPE_CHECKING:
    from nats.js.api import StreamConfig, StreamInfo
    from nats.js.client import JetStreamContext


async def ensure_stream(js: JetStreamContext, config: StreamConfig, timeout: float) -> StreamInfo:
    """The stream's info, created with ``config`` if it does not exist. A cluster that just
    started may not place a replicated stream yet: retried until ``timeout``, then
    :class:`FabricUnavailable` with the reason."""
    import nats.js.errors

    assert config.name is not None
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            try:
                return await js.stream_info(config.name)
            except nats.js.errors.NotFoundError:
                return await js.add_stream(config)
        except Exception as exc:
            if loop.time() < deadline:
                await asyncio.sleep(0.2)
                continue
            raise FabricUnavailable(
                f"the fabric has no usable JetStream stream {config.name} "
                f"(R{config.num_replicas}): {exc}"
            ) from exc
