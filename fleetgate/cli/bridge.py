"""``fleetgate bridge status``: each bridge's link, queue and counters, from the running broker.

The broker answers ``GET /bridges`` on its metrics port (127.0.0.1). When it does not answer,
the queue file still tells how many messages wait and how old the oldest is; in fabric mode
there is no queue file, so each bridge's backlog is asked of its ``FG_MSGS`` consumer (and its
owner of the lease bucket) on NATS, if NATS answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import urllib.request
from pathlib import Path
from typing import Annotated, Any

import typer

from broker.bridge.manager import queue_path
from broker.bridge.status import BridgeStatus, iso, render_table
from broker.bridge.store import QueueStore
from fleetgate.config import Config, load_config

bridge_app = typer.Typer(no_args_is_help=True, help="Bridges to upstream MQTT brokers.")

_TIMEOUT_S = 5.0


@bridge_app.command("status")
def status(
    ctx: typer.Context,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Connected or not, since when, queue depth and oldest message age, counts."""
    config = load_config(_home(ctx))
    report = live_status(config) or offline_status(config)
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    if report.get("fabric"):
        for line in render_fabric_offline(report):
            typer.echo(line)
        return
    if not report["live"]:
        typer.echo(f"broker not answering on {report['url']}: figures from the queue file only")
    statuses = [BridgeStatus.from_json(b) for b in report["bridges"]]
    for line in render_table(statuses):
        typer.echo(line)
    if report.get("loops_dropped"):
        typer.echo(f"echoes refused at ingress (origin marker): {report['loops_dropped']}")


def _home(ctx: typer.Context) -> Path | None:
    """``fleetgate --home DIR`` (or ``FLEETGATE_HOME``), read from the parent command."""
    parent = ctx.parent
    while parent is not None:
        home = parent.params.get("home")
        if home is not None:
            return Path(home)
        parent = parent.parent
    return None


def _url(config: Config) -> str:
    return f"http://127.0.0.1:{config.broker.metrics_port}/bridges"


def live_status(config: Config) -> dict[str, Any] | None:
    """The running broker's figures, or ``None`` if it does not answer."""
    if not config.broker.metrics_port:
        return None
    url = _url(config)
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:  # noqa: S310 - loopback
            data: dict[str, Any] = json.loads(response.read())
    except (OSError, ValueError):
        return None
    return {"live": True, "url": url, **data}


def offline_status(config: Config) -> dict[str, Any]:
    """What the queue file holds for each configured bridge, the broker being down."""
    if config.fabric is not None:
        return fabric_offline_status(config)
    path = queue_path(config)
    now = time.time()
    bridges = []
    store = QueueStore(path) if path.exists() else None
    try:
        for settings in config.bridges:
            backlog = store.backlog(settings.name) if store is not None else None
            oldest = backlog.oldest if backlog is not None else None
            bridges.append(
                BridgeStatus(
                    name=settings.name,
                    upstream=f"{settings.host}:{settings.port}",
                    protocol=settings.protocol,
                    connected=False,
                    since=None,
                    last_error="broker not running",
                    queue_messages=backlog.messages if backlog else 0,
                    queue_bytes=backlog.size if backlog else 0,
                    queue_full=bool(
                        backlog
                        and (
                            backlog.messages >= settings.queue_max_messages
                            or backlog.size >= settings.queue_max_bytes
                        )
                    ),
                    oldest_age_s=None if oldest is None else round(now - oldest, 3),
                ).to_json()
            )
    finally:
        if store is not None:
            store.close()
    return {
        "live": False,
        "url": _url(config),
        "origin": store.origin if store is not None else None,
        "checked_at": iso(now),
        "loops_dropped": 0,
        "bridges": bridges,
    }


FABRIC_ASK_S = 3.0
"""How long ``bridge status`` waits for NATS when the broker does not answer (fabric mode)."""


def fabric_offline_status(config: Config) -> dict[str, Any]:
    """Fabric mode, the broker down: no queue file; each bridge's backlog is its consumer's
    (pending + unacknowledged) and its owner the lease's holder, if NATS answers in time."""
    from broker.fabric.bridge import consumer_name

    try:
        found, reason = asyncio.run(asyncio.wait_for(_ask_fabric(config), 2 * FABRIC_ASK_S))
    except TimeoutError:
        found, reason = {}, f"no answer within {2 * FABRIC_ASK_S:g} s"
    except Exception as exc:  # unreachable, refused: say so, guess nothing
        found, reason = {}, str(exc) or type(exc).__name__
    bridges = []
    for settings in config.bridges:
        backlog, owner = found.get(settings.name, (None, "unknown"))
        bridges.append(
            {
                "name": settings.name,
                "upstream": f"{settings.host}:{settings.port}",
                "protocol": settings.protocol,
                "consumer": consumer_name(settings.name) if settings.out else None,
                "backlog": backlog,
                "owner": owner,
            }
        )
    return {
        "live": False,
        "fabric": True,
        "url": _url(config),
        "nats_error": reason,
        "checked_at": iso(time.time()),
        "bridges": bridges,
    }


async def _ask_fabric(config: Config) -> tuple[dict[str, tuple[int | None, str | None]], str]:
    """Each bridge's consumer backlog and lease holder; an error reason per missing answer."""
    import nats

    from broker.fabric.bridge import (
        LEASE_BUCKET,
        consumer_backlog,
        consumer_name,
        holder_node,
        lease_key,
    )
    from broker.fabric.connect import auth_options
    from broker.fabric.durable import STREAM

    assert config.fabric is not None
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc) or type(exc).__name__)

    try:
        nc = await nats.connect(
            servers=list(config.fabric.servers),
            name="fleetgate-cli-bridge-status",
            inbox_prefix="$FG.inbox",
            connect_timeout=FABRIC_ASK_S,
            max_reconnect_attempts=1,  # one try of each server (0 would mean: try forever)
            reconnect_time_wait=0.1,
            error_cb=on_error,
            **auth_options(config),
        )
    except nats.errors.NoServersError:
        raise OSError(errors[-1] if errors else "no NATS server answered") from None
    found: dict[str, tuple[int | None, str | None]] = {}
    reason = ""
    try:
        js = nc.jetstream(timeout=FABRIC_ASK_S)
        try:
            kv = await js.key_value(LEASE_BUCKET)
        except Exception as exc:
            kv, reason = None, f"lease bucket: {exc or type(exc).__name__}"
        for settings in config.bridges:
            backlog = owner = None
            if settings.out:
                try:
                    info = await js.consumer_info(STREAM, consumer_name(settings.name))
                    backlog = consumer_backlog(info)
                except Exception as exc:
                    reason = f"consumer {consumer_name(settings.name)}: {exc or type(exc).__name__}"
            if kv is not None:
                with contextlib.suppress(Exception):  # no key: nobody owns it now
                    entry = await kv.get(lease_key(settings.name))
                    owner = holder_node(entry.value.decode()) if entry.value else None
            found[settings.name] = (backlog, owner)
    finally:
        await nc.close()
    return found, reason


def render_fabric_offline(report: dict[str, Any]) -> list[str]:
    """What ``bridge status`` prints in fabric mode while this node's broker is down."""
    out = [
        f"broker not answering on {report['url']}; fabric mode: no queue file, each bridge's "
        "backlog is its FG_MSGS consumer's"
    ]
    if report["nats_error"]:
        out.append(f"NATS: {report['nats_error']}")
    for bridge in report["bridges"]:
        owner = f"  owner {bridge['owner']}" if bridge["owner"] else "  owner none"
        out.append(f"{bridge['name']}  ({bridge['protocol']} to {bridge['upstream']}){owner}")
        if bridge["consumer"] is None:
            out.append("  backlog    none (in rules only)")
        elif bridge["backlog"] is None:
            out.append(f"  backlog    unknown (in FG_MSGS consumer {bridge['consumer']})")
        else:
            out.append(
                f"  backlog    {bridge['backlog']} messages (FG_MSGS consumer {bridge['consumer']})"
            )
    return out
