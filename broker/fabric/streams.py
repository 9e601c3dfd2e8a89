"""Creating the fabric's JetStream streams and KV buckets: every node tries at start, the
first one wins; a cluster that just started may not place a replicated one yet, so each
attempt is retried until a deadline."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from broker.fabric.node import FabricUnavailable

if TYPE_CHECKING:
    from nats.js.api import StreamConfig, StreamInfo
    from nats.js.client import JetStreamContext
    from nats.js.kv import KeyValue

_T = TypeVar("_T")
log = logging.getLogger("fleetgate.fabric")


async def until(what: str, attempt: Callable[[], Awaitable[_T]], timeout: float) -> _T:
    """``attempt()`` again every 0.2 s until it succeeds; after ``timeout``, FabricUnavailable
    naming ``what``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            return await attempt()
        except Exception as exc:
            if loop.time() < deadline:
                await asyncio.sleep(0.2)
                continue
            raise FabricUnavailable(f"the fabric has no usable {what}: {exc}") from exc


async def ensure_stream(
    js: JetStreamContext, config: StreamConfig, timeout: float, *, limits: tuple[str, ...] = ()
) -> StreamInfo:
    """The stream's info, created with ``config`` if it does not exist. An existing stream
    whose ``limits`` (StreamConfig field names, e.g. ``max_bytes``) differ from ``config`` gets
    ``config``'s, and a log line says so; its other settings (replicas, subjects) stay."""
    import nats.js.errors

    assert config.name is not None
    name = config.name

    async def attempt() -> StreamInfo:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            return await js.add_stream(config)
        changed = {
            field: (_shown(getattr(info.config, field)), _shown(getattr(config, field)))
            for field in limits
            if getattr(info.config, field) != getattr(config, field)
        }
        if not changed:
            return info
        log.warning(
            "stream %s changed to this node's settings: %s",
            name,
            ", ".join(f"{field} {old} -> {new}" for field, (old, new) in changed.items()),
        )
        new = {field: getattr(config, field) for field in changed}
        return await js.update_stream(dataclasses.replace(info.config, **new))

    return await until(f"JetStream stream {name} (R{config.num_replicas})", attempt, timeout)


def _shown(value: object) -> object:
    return getattr(value, "value", value)  # an enum's value: "new", not DiscardPolicy.NEW


async def ensure_bucket(
    js: JetStreamContext, bucket: str, replicas: int, ttl: float | None, timeout: float
) -> KeyValue:
    """The KV bucket (history 1, file storage, direct gets), created if it does not exist."""
    import nats.js.errors
    from nats.js.api import KeyValueConfig, StorageType

    config = KeyValueConfig(
        bucket=bucket,
        history=1,
        ttl=ttl,
        replicas=replicas,
        storage=StorageType.FILE,
        direct=True,
    )

    async def attempt() -> KeyValue:
        try:
            return await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            return await js.create_key_value(config)

    return await until(f"KV bucket {bucket} (R{replicas})", attempt, timeout)
