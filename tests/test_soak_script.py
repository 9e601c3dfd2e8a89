"""``make soak`` in miniature: the script's own logic, at CI speed (~25 s).

50 devices for 12 s, a 3 s message period, every attack at a twentieth of its volume: the
script must run each attack, see each limit hold, drop nobody, and end with its parseable
last line. The figures themselves (latency ratio, RSS growth) are not asserted here: with 50
devices and a few hundred messages they are noise; the full run measures them.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(
    r"soak_conns=(?P<conns>\d+) minutes=(?P<minutes>[\d.]+) drops=(?P<drops>\d+) "
    r"rss_growth_pct=(?P<rss>-?[\d.]+) audit_mib=(?P<audit>[\d.]+) "
    r"attack_p99_ratio=(?P<ratio>[\d.]+|nan)"
)


def test_soak_script_runs_every_attack_and_ends_with_its_last_line() -> None:
    run = subprocess.run(
        [
            sys.executable,
            str(REPO / "scripts" / "soak.py"),
            *("--conns", "50", "--minutes", "0.2", "--period", "3", "--attack-scale", "0.05"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    out = run.stdout
    lines = out.strip().splitlines()
    assert lines, run.stderr
    match = LAST_LINE.fullmatch(lines[-1])
    assert match is not None, out + run.stderr
    assert int(match["conns"]) == 50
    assert int(match["drops"]) == 0, out
    assert float(match["audit"]) < 1.0, out
    assert "messages never delivered 0" in out
    summaries = re.findall(r"^  ([a-z_]+) +runs (\d+), held (\d+),", out, re.MULTILINE)
    assert len(summaries) == 9, out  # every attack of scripts/soak.py's ATTACKS
    for attack, runs, held in summaries:
        assert runs == held != "0", f"{attack} did not run, or did not hold:\n{out}"
