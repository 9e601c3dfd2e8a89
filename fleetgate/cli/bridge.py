"""``fleetgate bridge status``: each bridge's link, queue and counters, from the running broker.

The broker answers ``GET /bridges`` on its metrics port (127.0.0.1). When it does not answer,
the queue file still tells how many messages wait and how old the oldest is.
"""

from __future__ import annotations

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
