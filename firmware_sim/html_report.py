"""One self-contained HTML file per run: the verdict first, then the figures, then the plots.

Plots are drawn with matplotlib's Agg backend (no display) to PNG and inlined as data URIs,
so the file can be mailed, attached to a CI run or opened offline. Faults are shaded on every
timeline, with a dashed line where the fleet had recovered.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from firmware_sim.engine import RunResult
from firmware_sim.observations import ACKED, DELIVERED, SENT, FaultMark, Observations
from firmware_sim.report import percentile
from firmware_sim.summary import summary

COLOURS = {"sent": "#7f8c9a", "acknowledged": "#2f6db5", "delivered": "#2e9c5a"}
FAULT_COLOUR = "#d9534f"
RENEWAL_COLOUR = "#1f78b4"
WIDTH, HEIGHT = 10.0, 3.2


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:  # the [sim] extra
        raise RuntimeError(
            "the HTML report needs matplotlib: pip install 'fleetgate[sim]'"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(figure: Any) -> str:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _timeline(title: str, ylabel: str, faults: list[FaultMark], seconds: int) -> tuple[Any, Any]:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(WIDTH, HEIGHT))
    axes.set_title(title, loc="left", fontsize=11, fontweight="bold")
    axes.set_xlabel("seconds since start")
    axes.set_ylabel(ylabel)
    axes.set_xlim(0, max(1, seconds))
    axes.grid(True, alpha=0.3)
    for spine in ("top", "right"):
        axes.spines[spine].set_visible(False)
    for row, mark in enumerate(faults):
        renewal = mark.renewal
        colour = RENEWAL_COLOUR if renewal else FAULT_COLOUR
        end = max(mark.end, mark.start + 0.3)
        axes.axvspan(mark.start, end, color=colour, alpha=0.08 if renewal else 0.15, lw=0)
        if renewal:
            axes.axvline(mark.end, color=colour, lw=1.5)
        axes.annotate(
            f"{mark.label} (expiry)" if renewal else mark.label,
            (mark.end if renewal else mark.start, 1.0),
            xycoords=("data", "axes fraction"),
            xytext=(3, -11 - 10 * row),
            textcoords="offset points",
            fontsize=8,
            color=colour,
        )
        if mark.recovery_s is not None:
            at = mark.start + mark.recovery_s
            axes.axvline(at, color=colour, ls="--", lw=1)
            axes.annotate(
                f"{mark.label}: recovered +{mark.recovery_s:.1f} s",
                (at, 0.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, 4 + 10 * row),
                textcoords="offset points",
                fontsize=8,
                color=colour,
            )
    return figure, axes


def _series(counter: Any, seconds: int) -> list[int]:
    return [counter.get(s, 0) for s in range(seconds)]


def plot_connected(obs: Observations, faults: list[FaultMark], seconds: int) -> str:
    figure, axes = _timeline("Devices connected", "devices", faults, seconds)
    axes.plot(range(seconds), _series(obs.connected, seconds), color="#2f6db5", lw=2)
    axes.set_ylim(bottom=0)
    return _png(figure)


def plot_messages(obs: Observations, faults: list[FaultMark], seconds: int) -> str:
    figure, axes = _timeline("Messages per second", "messages / s", faults, seconds)
    for name in (SENT, ACKED, DELIVERED):
        axes.plot(
            range(seconds), _series(obs.counts[name], seconds), label=name, color=COLOURS[name]
        )
    axes.set_ylim(bottom=0)
    axes.legend(loc="lower right", fontsize=8, frameon=False, ncol=3)
    return _png(figure)


def plot_latency(obs: Observations, faults: list[FaultMark], seconds: int) -> str:
    figure, axes = _timeline("Publish → deliver latency", "ms (log scale)", faults, seconds)
    xs = [s for s in range(seconds) if obs.latency_ms.get(s)]
    for fraction, label, style in ((0.5, "p50", "-"), (0.9, "p90", "--"), (0.99, "p99", ":")):
        ys = [percentile(obs.latency_ms[s], fraction) or 0.0 for s in xs]
        axes.plot(xs, ys, style, label=label, color="#6a3d9a")
    if xs:
        axes.set_yscale("log")
    axes.legend(loc="upper right", fontsize=8, frameon=False, ncol=3)
    return _png(figure)


def plot_connect_latency(obs: Observations) -> str:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(WIDTH, HEIGHT))
    axes.set_title(
        "Connect latency (TLS handshake + CONNACK) and enrollment latency",
        loc="left",
        fontsize=11,
        fontweight="bold",
    )
    if obs.connect_ms:
        axes.hist(obs.connect_ms, bins=40, color="#2f6db5", alpha=0.8, label="connect")
    if obs.enroll_ms:
        axes.hist(obs.enroll_ms, bins=40, color="#e08e0b", alpha=0.6, label="enroll (EST)")
    for samples, colour in ((obs.connect_ms, "#2f6db5"), (obs.enroll_ms, "#e08e0b")):
        p99 = percentile(samples, 0.99)
        if p99 is not None:
            axes.axvline(p99, color=colour, ls="--", lw=1)
            axes.annotate(
                f"p99 {p99:.0f} ms",
                (p99, 0.95),
                xycoords=("data", "axes fraction"),
                xytext=(3, 0),
                textcoords="offset points",
                fontsize=8,
                color=colour,
            )
    axes.set_xlabel("ms")
    axes.set_ylabel("attempts")
    axes.legend(loc="center right", fontsize=8, frameon=False)
    for spine in ("top", "right"):
        axes.spines[spine].set_visible(False)
    return _png(figure)


def plot_refusals(obs: Observations, faults: list[FaultMark], seconds: int) -> str:
    figure, axes = _timeline("Refusals by reason", "refusals / s", faults, seconds)
    bottom = [0] * seconds
    palette = ["#d9534f", "#f0ad4e", "#5bc0de", "#9b59b6", "#34495e", "#16a085", "#c0392b"]
    for n, (reason, per_s) in enumerate(sorted(obs.refusals.items())):
        values = _series(per_s, seconds)
        axes.bar(
            range(seconds),
            values,
            bottom=bottom,
            width=0.9,
            label=reason,
            color=palette[n % len(palette)],
        )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    axes.yaxis.get_major_locator().set_params(integer=True)
    if obs.refusals:
        axes.legend(loc="upper right", fontsize=8, frameon=False)
    else:
        axes.text(0.5, 0.5, "no refusals", transform=axes.transAxes, ha="center", color="grey")
    return _png(figure)


CSS = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 1100px;
       color: #222; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.1em; }
.sub { color: #666; margin-top: 0; }
.verdict { padding: 0.8em 1em; border-radius: 6px; font-size: 1.15em; font-weight: 600; }
.ok { background: #e6f4ea; color: #1e6b34; border: 1px solid #b7dfc2; }
.bad { background: #fdecea; color: #8a1c14; border: 1px solid #f3b8b2; }
.cards { display: grid; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr));
         gap: 0.6em; margin: 1em 0; }
.card { border: 1px solid #e3e3e3; border-radius: 6px; padding: 0.5em 0.8em; }
.card b { display: block; font-size: 1.35em; }
.card span { color: #666; font-size: 0.85em; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; }
td, th { text-align: left; padding: 0.25em 0.9em 0.25em 0; border-bottom: 1px solid #eee; }
th { color: #555; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.held { color: #1e6b34; font-weight: 600; } .broken { color: #8a1c14; font-weight: 600; }
figure { margin: 1.2em 0; } figure img { max-width: 100%; }
figcaption { color: #666; font-size: 0.9em; }
"""


def _card(value: object, label: str) -> str:
    return f'<div class="card"><b>{html.escape(str(value))}</b><span>{label}</span></div>'


def _ms(stats: dict[str, Any]) -> str:
    def one(value: float) -> str:
        return f"{value:.1f}" if value < 10 else f"{value:.0f}"

    return "-" if stats["p50"] is None else f"{one(stats['p50'])} / {one(stats['p99'])} ms"


def _fault_row(fault: dict[str, Any], renewals: dict[str, int]) -> str:
    if fault["renewal"]:
        outcome = f"{renewals['done']} of {renewals['due']} renewed before expiry"
    elif fault["recovery_s"] is None:
        outcome = "not recovered"
    else:
        outcome = f"{fault['recovery_s']} s"
    return (
        f"<tr><td>{html.escape(fault['fault'])}</td><td class='num'>{fault['at_s']:.1f} s</td>"
        f"<td class='num'>{fault['until_s']:.1f} s</td><td class='num'>{outcome}</td></tr>"
    )


def _invariant_row(name: str, verdict: dict[str, Any]) -> str:
    if verdict["held"]:
        return f"<tr><td class='held'>held</td><td>{html.escape(name)}</td><td></td></tr>"
    detail = f"{verdict['count']}: " + "; ".join(verdict["examples"])
    return (
        f"<tr><td class='broken'>BROKEN</td><td>{html.escape(name)}</td>"
        f"<td>{html.escape(detail)}</td></tr>"
    )


def _key_store_table(stores: dict[str, dict[str, Any]]) -> str:
    """What each key store's devices did: a tpm or smartcard line beside the file-key fleet."""
    head = (
        "<tr><th>key store</th><th>groups</th><th>devices</th><th>enrolled</th>"
        "<th>connected</th><th>connects</th><th>sent</th><th>acknowledged</th>"
        "<th>delivered</th><th>lost</th><th>enroll p50 / p99</th><th>connect p50 / p99</th></tr>"
    )
    rows = ""
    for kind, store in stores.items():
        counts = "".join(
            f"<td class='num'>{store[what]}</td>"
            for what in ("devices", "enrolled", "connected", "connects", "sent", "acknowledged")
        )
        lost = f"<td class='num{' broken' if store['lost'] else ''}'>{store['lost']}</td>"
        hardware = (
            f"<br><small>{html.escape(store['hardware'])}</small>" if store["hardware"] else ""
        )
        rows += (
            f"<tr><td>{html.escape(kind)}{hardware}</td>"
            f"<td>{html.escape(', '.join(store['groups']))}</td>{counts}"
            f"<td class='num'>{store['delivered']}</td>{lost}"
            f"<td class='num'>{_ms(store['enroll_ms'])}</td>"
            f"<td class='num'>{_ms(store['connect_ms'])}</td></tr>"
        )
    return f"<h2>Key stores</h2><table>{head}{rows}</table>"


def render(result: RunResult) -> str:
    """The whole report as one HTML document."""
    obs = result.obs
    data = summary(result)
    seconds = int(result.scenario.duration_s)  # the samples after it are the shutdown
    faults = result.faults
    broken = [name for name, v in data["invariants"].items() if not v["held"]]
    verdict = (
        f'<p class="verdict ok">All {len(data["invariants"])} invariants held.</p>'
        if not broken
        else f'<p class="verdict bad">{len(broken)} invariant(s) broken: '
        f"{html.escape('; '.join(broken))}.</p>"
    )
    ratio = data["delivered_ratio"]
    lat = data["latency_ms"]
    cards = "".join(
        [
            _card(f"{data['peak_connected']} / {data['devices']}", "peak connected / devices"),
            _card(data["enrolled"], "enrolled over EST"),
            _card(data["acknowledged"], "messages acknowledged"),
            _card("-" if ratio is None else f"{ratio:.4f}", "delivered ratio"),
            _card(data["lost"], "acknowledged but lost"),
            _card(_ms(lat["publish_to_deliver"]), "latency p50 / p99"),
            _card(_ms(lat["connect"]), "connect p50 / p99"),
            _card(sum(data["refusals"].values()), "refusals"),
            _card(data["resumed"], "sessions resumed on another node"),
        ]
    )
    if data["revoked"]:
        cards += _card(f"{data['kicked']} / {data['revoked']}", "kicked / revoked")
        cards += _card(_ms(lat["revoke_to_kick"]), "revoke → kick p50 / p99")
    if data["renewals"]["due"]:
        renewals = data["renewals"]
        cards += _card(f"{renewals['done']} / {renewals['due']}", "renewed / due")
    invariant_rows = "".join(
        _invariant_row(name, verdict) for name, verdict in data["invariants"].items()
    )
    fault_rows = "".join(_fault_row(f, data["renewals"]) for f in data["faults"])
    expected = {answer for _, _, answer, wanted in obs.answers if answer in wanted}
    refusal_rows = "".join(
        f"<tr><td class='num'>{count}</td><td>{html.escape(reason)}</td>"
        + (
            "<td class='held'>expected</td>"
            if reason in expected
            else "<td class='broken'>unexpected</td>"
        )
        + "</tr>"
        for reason, count in data["refusals"].items()
    )
    plots = [
        (plot_connected(obs, faults, seconds), "Devices connected, sampled each second."),
        (
            plot_messages(obs, faults, seconds),
            "Telemetry sent by devices, acknowledged by the broker (PUBACK/PUBCOMP) and "
            "delivered to the checked subscriber(s).",
        ),
        (
            plot_latency(obs, faults, seconds),
            "From the device's send to the subscriber's receipt, per second of receipt.",
        ),
        (plot_connect_latency(obs), "Every successful connect and every EST enrollment."),
        (
            plot_refusals(obs, faults, seconds),
            "Protocol refusals (TLS alerts, CONNACK/PUBACK/SUBACK/DISCONNECT reason codes).",
        ),
    ]
    figures = "".join(
        f'<figure><img src="{src}" alt="{html.escape(caption)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
        for src, caption in plots
    )
    notes = "".join(f"<li>{html.escape(n)}</li>" for n in data["notes"])
    sections = ""
    sections += _key_store_table(data["key_stores"])
    if fault_rows:
        head = "<tr><th>fault</th><th>at</th><th>until (expiry)</th><th>recovery</th></tr>"
        sections += f"<h2>Faults</h2><table>{head}{fault_rows}</table>"
    if refusal_rows:
        sections += f"<h2>Refusals</h2><table>{refusal_rows}</table>"
    if notes:
        sections += f"<h2>Notes</h2><ul>{notes}</ul>"
    title = f"fleetgate sim: {data['scenario']}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>{CSS}</style></head><body>
<h1>{html.escape(title)}</h1>
<p class="sub">{html.escape(data["description"])}<br>
{data["devices"]} devices, {data["duration_s"]:g} s scenario, {html.escape(data["mode"])};
the run took {data["took_s"]} s.</p>
{verdict}
<div class="cards">{cards}</div>
<h2>Invariants</h2><table>{invariant_rows}</table>
{sections}
<h2>Timelines</h2>
<p class="sub">Faults are shaded red; a dashed line marks when the fleet was back to its
connected count and message rate from before the fault.</p>
{figures}
</body></html>
"""


__all__ = ["render"]
