"""The HTML report is one self-contained file whose plots a real browser renders: headless
Chromium (Debian's package) loads it, and the test reads back every image's decoded size and
looks for the plotted lines' colours in a screenshot."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
from PIL import Image

from firmware_sim.engine import RunResult
from firmware_sim.html_report import render
from firmware_sim.observations import ACKED, DELIVERED, SENT, FaultMark, Observations, Violation
from firmware_sim.scenario import DEFAULT

CHROMIUM = shutil.which("chromium")
PROBE = """<script>
window.addEventListener("load", () => {
  document.title = [...document.images]
    .map(i => i.complete && i.naturalWidth > 0 ? i.naturalWidth + "x" + i.naturalHeight : "broken")
    .join(",");
});
</script></body>"""
BLUE = (0x2F, 0x6D, 0xB5)  # the connected-devices line


def a_run() -> RunResult:
    obs = Observations()
    obs.subscribers["backend"] = ("devices/+/telemetry",)
    for second in range(20):
        down = 12 <= second < 15
        obs.connected[second] = 0 if down else min(100, 25 * (second + 1))
        for name in (SENT, ACKED, DELIVERED):
            obs.counts[name][second] = 0 if down else obs.connected[second]
        obs.latency_ms[second] = [1.0 + second % 3, 2.5, 40.0]
        obs.refusals["TLS unknown ca"][3] = 1
    obs.connect_ms = [4.0 + n % 30 for n in range(120)]
    obs.enroll_ms = [40.0 + n % 20 for n in range(100)]
    return RunResult(
        scenario=DEFAULT,
        obs=obs,
        violations=[Violation("per-topic order", 1, ("backend got x #1 after #2",))],
        faults=[FaultMark("broker-kill", 12.0, 15.0, recovery_s=4.0)],
        checked_subscribers=("backend",),
        seconds=21.0,
        mode="in-process, throw-away data directory",
    )


def chromium(*args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM, "chromium is in scripts/debian-packages-test.txt"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=90,
    )


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    directory = tmp_path_factory.mktemp("report")
    html = render(a_run())
    (directory / "report.html").write_text(html)
    return directory, html


def test_the_report_is_self_contained_and_leads_with_the_verdict(report):
    _, html = report
    assert not re.search(r"(src|href)=\"(https?:|//|file:)", html)
    assert html.count('src="data:image/png;base64,') == 5
    verdict = html.index("invariant(s) broken: per-topic order")
    assert verdict < html.index("<h2>Invariants</h2>") < html.index("<img")
    assert "recovery" in html and "4.0 s" in html


def test_chromium_decodes_every_plot(report):
    directory, html = report
    probe = directory / "probe.html"
    probe.write_text(html.replace("</body>", PROBE))
    result = chromium("--dump-dom", "--virtual-time-budget=5000", probe.as_uri())
    title = re.search(r"<title>(.*?)</title>", result.stdout)
    assert title, result.stderr[-2000:]
    sizes = title.group(1).split(",")
    assert len(sizes) == 5 and "broken" not in sizes, sizes
    assert all(int(size.split("x")[0]) > 500 for size in sizes)


def test_a_screenshot_shows_the_plotted_lines(report):
    directory, _ = report
    shot = directory / "shot.png"
    result = chromium(
        f"--screenshot={shot}", "--window-size=1200,3600", (directory / "report.html").as_uri()
    )
    assert shot.exists(), result.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    pixels = list(image.get_flattened_data())
    near_blue = sum(1 for p in pixels if all(abs(a - b) < 40 for a, b in zip(p, BLUE, strict=True)))
    not_white = sum(1 for p in pixels if min(p) < 200)
    assert near_blue > 2000  # the connected line and histogram, drawn
    assert not_white > 0.03 * image.width * image.height
