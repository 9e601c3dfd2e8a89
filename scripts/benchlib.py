"""What the benchmark scripts share: free loopback ports, process CPU time, percentiles, closing
a generator's links."""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import random
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
_TAKEN: set[int] = set()


def free_port(low: int = 20000, high: int = 32767) -> int:
    """A free loopback port below the ephemeral range (a load generator's many client
    connections take their ports from 32768 up), not handed out before in this run."""
    for port in random.sample(range(low, high + 1), 200):
        if port in _TAKEN:
            continue
        with socket.socket() as sock:
            try:
                sock.bind((HOST, port))
            except OSError:
                continue
            _TAKEN.add(port)
            return port
    raise RuntimeError(f"no free port in {low}-{high}")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # fields[0] is field 3 (state); utime and stime are fields 14 and 15.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile by rank; NaN when there are no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Closable(Protocol):
    """A load generator's client link: DISCONNECT and close, and a future set once it is gone."""

    tcp: asyncio.Transport | None
    gone: asyncio.Future[str]

    def disconnect(self) -> None: ...


async def close_all(links: Sequence[Closable], limit: float = 15.0) -> None:
    """DISCONNECT and close every link; abort those the peer has not closed within ``limit``."""
    for link in links:
        link.disconnect()
    pending = [link.gone for link in links if not link.gone.done()]
    if pending:
        await asyncio.wait(pending, timeout=limit)
    for link in links:
        if link.tcp is not None and not link.gone.done():
            link.tcp.abort()


def fanin_options(
    parser: argparse.ArgumentParser, *, publishers: int, duration: float, window: int
) -> None:
    """The load shape every fan-in benchmark takes, with that benchmark's defaults."""
    parser.add_argument("--publishers", type=int, default=publishers, help="publishers (P)")
    parser.add_argument("--duration", type=float, default=duration, help="timed seconds (D)")
    parser.add_argument("--window", type=int, default=window, help="QoS 1 in flight per publisher")
    parser.add_argument("--payload", type=int, default=64, help="PUBLISH payload bytes")


def run_options(parser: argparse.ArgumentParser, *, profile_top: int | None = None) -> None:
    """How a benchmark runs fleetgate: its log level, the temporary directory, cProfile."""
    parser.add_argument("--log-level", default="WARNING", help="fleetgate FLEETGATE_LOG_LEVEL")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    if profile_top is not None:
        parser.add_argument(
            "--profile", action="store_true", help="run fleetgate under cProfile (slower)"
        )
        parser.add_argument("--top", type=int, default=profile_top, help="profile rows to print")


def chosen_names(
    parser: argparse.ArgumentParser, option: str, value: str, known: Sequence[str]
) -> list[str]:
    """A comma-separated ``option`` value split into names, each one of ``known``."""
    names = [name.strip() for name in value.split(",") if name.strip()]
    if not names or not set(names) <= set(known):
        parser.error(f"{option} takes some of {','.join(known)}")
    return names
