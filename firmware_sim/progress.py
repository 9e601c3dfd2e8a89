"""The line a run shows while it goes: time, stage, connected, delivered msgs/s, refusals.

On a terminal it is one line rewritten in place; anywhere else (CI logs, a pipe) a plain line
every ``every_s`` seconds, so logs stay readable.
"""

from __future__ import annotations

import time
from typing import TextIO

from firmware_sim.engine import Progress


def progress_text(p: Progress) -> str:
    return (
        f"[{p.t:5.0f}/{p.duration:g} s] {p.stage:10} connected {p.connected}/{p.devices}  "
        f"delivered {p.delivered_per_s:7.0f} msg/s  refusals {p.refusals}"
    )


class LiveLine:
    def __init__(self, stream: TextIO, *, enabled: bool = True, every_s: float = 5.0) -> None:
        self.stream = stream
        self.enabled = enabled
        self.tty = stream.isatty()
        self.every_s = every_s
        self._last = 0.0
        self._shown = False

    def update(self, progress: Progress) -> None:
        if not self.enabled:
            return
        text = progress_text(progress)
        if self.tty:
            self.stream.write("\r\x1b[2K" + text)
            self._shown = True
        elif time.monotonic() - self._last >= self.every_s:
            self._last = time.monotonic()
            self.stream.write(text + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()
            self._shown = False


__all__ = ["LiveLine", "progress_text"]
