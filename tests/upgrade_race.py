"""Run ``upgrade(url)`` in several processes released at the same moment (not threads: Alembic's
migration context is process-global, and real concurrent upgrades are separate processes)."""

from __future__ import annotations

import subprocess
import sys

_CHILD = """
import sys
from enrollment.registry.schema import upgrade
print("ready", flush=True)
sys.stdin.readline()
upgrade(sys.argv[1])
"""


def upgrade_concurrently(url: str, processes: int) -> list[str]:
    """Each process's stderr, once all have exited; empty strings mean all succeeded."""
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _CHILD, url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(processes)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline() == "ready\n"
    for child in children:
        assert child.stdin is not None
        child.stdin.write("go\n")
        child.stdin.flush()
    errors = []
    for child in children:
        _out, err = child.communicate(timeout=120)
        errors.append(err if child.returncode else "")
    return errors
