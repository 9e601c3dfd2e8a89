"""Structured logs: one JSON object per line, carrying the request and device id in context."""

from __future__ import annotations

import contextvars
import json
import logging
import sys
from pathlib import Path
from typing import Any

request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)
device_id: contextvars.ContextVar[str | None] = contextvars.ContextVar("device_id", default=None)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """Formats a record as JSON; ``extra=`` fields become top-level keys.

    ``node`` names the broker node on every line, so the logs of several nodes can be merged
    and still say which node admitted, refused or kicked a device.
    """

    def __init__(self, node: str | None = None) -> None:
        super().__init__()
        self.node = node

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self.node is not None:
            entry["node"] = self.node
        for key, var in (("request_id", request_id), ("device_id", device_id)):
            value = var.get()
            if value is not None:
                entry[key] = value
        entry.update({k: v for k, v in vars(record).items() if k not in _RESERVED})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure(level: str = "INFO", log_dir: Path | None = None, node: str | None = None) -> None:
    """Send JSON lines to stderr and, when given, to ``<log_dir>/fleetgate.log``; with ``node``,
    every line names that broker node."""
    import time

    JsonFormatter.converter = time.gmtime
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if log_dir is not None:
        log_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_dir / "fleetgate.log"))
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        handler.setFormatter(JsonFormatter(node))
        root.addHandler(handler)
    root.setLevel(level.upper())
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
