"""Per-service latency distributions with p50 / p95 / p99, and outcome shares / error rates.

:func:`latency_layout` takes the analyzer's own per-service table (``Analysis.services``,
nothing recomputed) and samples the dots, as data; :func:`draw_latency` draws it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, as_int
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._model import outcome_codes, service_codes, slowest_first
from hoptrace.analyzer._types import OUTCOMES
from hoptrace.plot import _svg as s
from hoptrace.plot._common import (
    OUTCOME_COLORS,
    OUTCOME_LABELS,
    clean_text,
    fmt_ms,
    new_figure,
    outcome_legend_handles,
)

ROW_IN = 0.62
MAX_POINTS = 400  # dots drawn per service (a deterministic sample beyond that)
PERCENTILES = (("p50", "p50_ms", "|", 220), ("p95", "p95_ms", "D", 38), ("p99", "p99_ms", "s", 38))
SHARE_BARS = "outcome-share"  # label prefix of the BarContainers in the outcome panel


@dataclass
class LatencyLayout:
    stats: pd.DataFrame  # Analysis.services, slowest p95 first
    labels: list[str]  # one per row
    dots: list[tuple[np.ndarray, np.ndarray, list[str]]]  # per row: x (ms), y jitter, outcome colours
    boxes: list[np.ndarray]  # per row: every duration (for the box and whiskers)
    shares: np.ndarray  # rows x OUTCOMES, percent
    rate_texts: list[str]
    rate_alarm: list[bool]
    log_scale: bool
    present: set[str]  # outcomes seen
    title: str


def latency(analysis: Analysis, *, title: str | None = None):
    """The latency Figure of every service in ``analysis``."""
    return latency_figure(analysis.hops, analysis.services, title=title)


def latency_figure(hops: pd.DataFrame, services: pd.DataFrame, *, title: str | None = None):
    """Draw one row per service of ``Analysis.services``: its hops' durations (dots coloured
    by outcome, a box from p25 to p75 with whiskers at p5/p95), the analyzer's p50 / p95 /
    p99 marked; and beside it the share of each outcome with the error rate written out.

    Dots are a deterministic sample of at most ``MAX_POINTS`` hops per service; the
    boxes and whiskers are from all of them.
    """
    return draw_latency(latency_layout(hops, services, title=title))


def latency_layout(hops: pd.DataFrame, services: pd.DataFrame, *, title: str | None = None) -> LatencyLayout:
    if hops is None or len(hops) == 0 or len(services) == 0:
        raise AnalysisError("no hops recorded: no latencies to plot")
    stats = slowest_first(services)
    dur = hops["duration_ms"].to_numpy(dtype=float)
    # Services and outcomes as integer codes: at a million hops a string per hop cost seconds to group.
    names, svc = service_codes(hops)
    outcome = outcome_codes(hops)
    order = np.argsort(svc, kind="stable")
    bounds = np.searchsorted(svc[order], np.arange(len(names) + 1))
    rows_of = {name: order[bounds[k] : bounds[k + 1]] for k, name in enumerate(names)}  # service -> its hops' positions
    colors = np.array([OUTCOME_COLORS[o] for o in OUTCOMES], dtype=object)
    rng = np.random.default_rng(0)
    dots, boxes = [], []
    for i, name in enumerate(stats["service"]):
        mine = rows_of.get(name, np.array([], dtype=np.int64))
        keep = np.isfinite(dur[mine])
        d, o = np.maximum(dur[mine][keep], 0.01), outcome[mine][keep]
        boxes.append(d if len(d) else np.array([np.nan]))
        if len(d) > MAX_POINTS:
            pick = rng.choice(len(d), MAX_POINTS, replace=False)
            d, o = d[pick], o[pick]
        dots.append((d, i + rng.uniform(-0.22, 0.22, len(d)), colors[o].tolist()))
    counts = np.bincount(svc.astype(np.int64) * len(OUTCOMES) + outcome, minlength=len(names) * len(OUTCOMES))
    counts = pd.DataFrame(counts.reshape(len(names), len(OUTCOMES)), index=names, columns=list(OUTCOMES))
    counts = counts.reindex(index=stats["service"].astype(str), fill_value=0)
    shares = 100.0 * counts.to_numpy(dtype=float) / np.maximum(counts.sum(axis=1).to_numpy(dtype=float), 1.0)[:, None]
    finite = dur[np.isfinite(dur) & (dur > 0)]
    m = len(stats)
    return LatencyLayout(
        stats=stats,
        labels=[f"{clean_text(r.service, 30)}\n{_hops(r.count)} · p50 {fmt_ms(r.p50_ms)} · p95 {fmt_ms(r.p95_ms)}"
                f" · p99 {fmt_ms(r.p99_ms)}" for r in stats.itertuples()],  # fmt: skip
        dots=dots,
        boxes=boxes,
        shares=shares,
        rate_texts=[_rate_text(r) for r in stats.itertuples()],
        rate_alarm=[bool(as_float(r.error_rate)) for r in stats.itertuples()],
        log_scale=bool(len(finite) and finite.max() / max(finite.min(), 0.01) > 50),
        present={OUTCOMES[k] for k in np.unique(outcome)},
        title=title or f"Latency per service ({len(hops)} hops, {m} service{'s' * (m != 1)}; slowest p95 on top)",
    )


def _rate_text(r) -> str:
    rate = as_float(r.error_rate)
    client = as_int(r.client_errors) if hasattr(r, "client_errors") else None
    text = "?" if rate is None else f"{100 * rate:.1f}%"
    return f"{text} errors\n({_num(r.errors)}/{_num(r.count)})" + (f"\n+ {client} 4xx" if client else "")


def _hops(v) -> str:
    i = as_int(v)
    return "? hops" if i is None else f"{i} hop{'s' * (i != 1)}"


def _num(v) -> str:
    i = as_int(v)
    return "?" if i is None else str(i)


def draw_latency(lay: LatencyLayout):
    """The Figure of a :class:`LatencyLayout`: distributions on the left, outcome shares on the right."""
    m = len(lay.stats)
    fig = new_figure(14.0, 1.9 + m * ROW_IN)
    gs = fig.add_gridspec(1, 2, width_ratios=[3.0, 1.25])
    ax = fig.add_subplot(gs[0])
    axr = fig.add_subplot(gs[1], sharey=ax)
    y = np.arange(m)
    for x, jitter, colors in lay.dots:
        # Rasterised: up to MAX_POINTS dots a service are thousands of SVG elements (~1 MB, ~2 s to
        # write); as one embedded image the cloud costs little, and every label stays vector text.
        ax.scatter(x, jitter, s=14, c=colors, alpha=0.7, lw=0, zorder=2, rasterized=True)
    ax.boxplot(lay.boxes, positions=y, orientation="horizontal", widths=0.55, showfliers=False, whis=(5, 95),
               patch_artist=True, manage_ticks=False, zorder=3,
               boxprops={"facecolor": "#ffffff00", "edgecolor": "#333333", "lw": 1.0},
               medianprops={"color": "#333333", "lw": 0}, whiskerprops={"color": "#333333"},
               capprops={"color": "#333333"})  # fmt: skip
    for name, key, marker, size in PERCENTILES:
        x = pd.to_numeric(lay.stats[key], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(x)
        style = ({"color": "black", "linewidths": 2.4} if marker == "|" else
                 {"facecolors": "white" if marker == "D" else "black", "edgecolors": "black", "linewidths": 1.0})  # fmt: skip
        ax.scatter(x[ok], y[ok], marker=marker, s=size, zorder=5, gid=name, label=name, **style)
    if lay.log_scale:
        ax.set_xscale("log")
        ax.set_xlabel("hop duration (ms, log scale)")
    else:
        ax.set_xlabel("hop duration (ms)")
        ax.set_xlim(left=0)
    ax.set_yticks(y, lay.labels, fontsize=8.5)
    ax.set_ylim(m - 0.5, -0.5)
    ax.grid(axis="x", color="#dddddd", lw=0.6, which="both")
    ax.set_axisbelow(True)
    ax.set_title(lay.title, loc="left", fontsize=11)
    _draw_shares(axr, lay, y)
    for a in (ax, axr):
        a.spines["right"].set_visible(False)
        a.spines["top"].set_visible(False)
    fig.legend(handles=_legend_handles(lay), loc="outside upper left", ncols=5, fontsize=8, frameon=False)
    return fig


def _draw_shares(axr, lay: LatencyLayout, y) -> None:
    left = np.zeros(len(y))
    for o, share in zip(OUTCOMES, lay.shares.T):
        if share.any():
            axr.barh(y, share, left=left, height=0.55, color=OUTCOME_COLORS[o], label=f"{SHARE_BARS}:{o}", zorder=3)
        left += share
    for i, (text, alarm) in enumerate(zip(lay.rate_texts, lay.rate_alarm)):
        axr.text(101.5, y[i], text, va="center", fontsize=8, color=OUTCOME_COLORS["5xx"] if alarm else "#222222",
                 clip_on=False)  # fmt: skip
    axr.set_xlim(0, 100)
    axr.set_xlabel("share of hops by outcome (%)")
    axr.tick_params(axis="y", labelleft=False, length=0)
    axr.set_title("outcomes and error rate", loc="left", fontsize=10)


def _legend_handles(lay: LatencyLayout) -> list:
    from matplotlib.lines import Line2D

    return [
        *outcome_legend_handles(lay.present),
        Line2D([], [], marker="|", color="black", ls="", markersize=12, markeredgewidth=2.2, label="p50"),
        Line2D([], [], marker="D", markerfacecolor="white", color="black", ls="", markersize=6, label="p95"),
        Line2D([], [], marker="s", color="black", ls="", markersize=6, label="p99"),
        Line2D([], [], color="#333333", lw=1, label="box p25–p75, whiskers p5–p95"),
    ]


# -- drawing straight to SVG (the report) ---------------------------------------------------

LAT_ROW = 46  # px per service: two lines of label
SHARE_W, RATE_W = 260, 120  # px: the outcome panel and the error-rate text beside it


def latency_svg(lay: LatencyLayout) -> str:
    """``<svg>`` text of a :class:`LatencyLayout`, as :func:`draw_latency` draws it: per service its
    dots (one path per colour), box p25–p75 with whiskers p5–p95, p50 / p95 / p99 marks; beside it
    the share of each outcome and the error rate written out."""
    m = len(lay.stats)
    labels = [[s.fit(part, s.MAX_LABEL_PX, 12 if k == 0 else 11) for k, part in enumerate(x.split("\n"))] for x in lay.labels]
    x0 = max(len(t) * (12 if k == 0 else 11) * s.SANS_EM for lab in labels for k, t in enumerate(lab)) + 2 * s.PAD
    xr1 = s.WIDTH - s.PAD - RATE_W
    xr0 = xr1 - SHARE_W
    x1 = xr0 - 40
    items = _svg_legend_items(lay)
    top = 8 + 18 + 14 + s.LEGEND_LINE * (s.legend_lines(items, s.PAD) - 1) + 24
    bottom = top + m * LAT_ROW
    height = bottom + 44
    lo, hi, ticks = _x_scale(lay)
    scale = (lambda v: np.log10(v)) if lay.log_scale else (lambda v: v)  # noqa: E731
    sx = lambda v: x0 + (scale(v) - scale(lo)) / max(scale(hi) - scale(lo), 1e-12) * (x1 - x0)  # noqa: E731
    out = [f'<svg width="{s.WIDTH}" height="{height}" viewBox="0 0 {s.WIDTH} {height}" '
           'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
           f'<text x="{s.PAD}" y="22" font-size="14" font-weight="600">{s.esc(lay.title)}</text>',
           s.legend(items, s.PAD, 8 + 18 + 14)]  # fmt: skip
    out += s.axis(ticks, sx, top, bottom, x0, x1, "hop duration (ms, log scale)" if lay.log_scale else "hop duration (ms)")
    out += s.axis([(v, f"{v:g}") for v in (0, 25, 50, 75, 100)], lambda v: xr0 + v / 100 * (xr1 - xr0), top, bottom,
                  xr0, xr1, "share of hops by outcome (%)")  # fmt: skip
    out.append(f'<text x="{xr0}" y="{top - 6}" font-size="12">outcomes and error rate</text>')
    for i in range(m):
        mid = top + i * LAT_ROW + LAT_ROW / 2
        out.append(s.lines(s.PAD, mid - 3, labels[i][:1], attrs=' font-weight="600"')
                   + s.lines(s.PAD, mid + 12, labels[i][1:], size=11))  # fmt: skip
        out += _svg_row(lay, i, mid, lambda v: float(np.clip(sx(v), x0, x1)))
        out += _svg_shares(lay, i, mid, xr0, xr1)
    out.append("</svg>")
    return "".join(out)


def _x_scale(lay: LatencyLayout) -> tuple[float, float, list[tuple[float, str]]]:
    """The duration axis (ms): what the dots, whiskers and marks reach; decades on a log scale."""
    reach = [float(np.nanmax(d)) for d, _, _ in lay.dots if len(d)]
    reach += [float(np.nanpercentile(b, 95)) for b in lay.boxes if np.isfinite(b).any()]
    reach += [v for v in pd.to_numeric(lay.stats["p99_ms"], errors="coerce").to_numpy(dtype=float) if np.isfinite(v)]
    hi = max(reach, default=1.0) or 1.0
    if not lay.log_scale:
        ticks = s.nice_ticks(0.0, hi * 1.04)
        return 0.0, max(ticks[-1], hi * 1.04), [(v, f"{v:g}") for v in ticks]
    lo = max(min((float(np.nanmin(d)) for d, _, _ in lay.dots if len(d)), default=0.01), 0.01) / 1.25
    hi *= 1.25
    decades = 10.0 ** np.arange(np.floor(np.log10(lo)), np.ceil(np.log10(hi)) + 1)
    steps = (1.0,) if hi / lo > 1000 else (1.0, 2.0, 5.0)  # a narrow range gets 2s and 5s between its decades
    ticks = [v for d in decades for v in (d * k for k in steps) if lo <= v <= hi]
    return lo, hi, [(v, f"{v:g}") for v in ticks]


def _svg_row(lay: LatencyLayout, i: int, mid: float, sx) -> list[str]:
    d, jitter, colors = lay.dots[i]
    out = []
    for color in dict.fromkeys(colors):  # one path per colour: a dot is a zero-length line with round caps
        mine = np.asarray(colors) == color
        path = "".join(f"M{sx(x):.1f} {mid + j * LAT_ROW:.1f}h0" for x, j in zip(d[mine], jitter[mine] - i))
        out.append(f'<path d="{path}" stroke="{color}" stroke-opacity="0.7" stroke-width="5" stroke-linecap="round"/>')
    box = lay.boxes[i]
    if np.isfinite(box).any():
        p5, p25, p75, p95 = (sx(v) for v in np.nanpercentile(box, [5, 25, 75, 95]))
        out.append(f'<rect x="{p25:.1f}" y="{mid - 12:.1f}" width="{max(p75 - p25, 1):.1f}" height="24" fill="none" '
                   f'stroke="#333"/><path d="M{p5:.1f} {mid:.1f}H{p25:.1f}M{p75:.1f} {mid:.1f}H{p95:.1f}M{p5:.1f} '
                   f'{mid - 6:.1f}v12M{p95:.1f} {mid - 6:.1f}v12" stroke="#333" fill="none"/>')  # fmt: skip
    r = lay.stats.iloc[i]
    for name, key, _, _ in PERCENTILES:
        v = as_float(r[key])
        if v is None or not np.isfinite(v):
            continue
        x = sx(max(v, 0.01) if lay.log_scale else v)
        out.append(_mark(name, x, mid))
    return out


def _mark(name: str, x: float, y: float) -> str:
    if name == "p50":
        return f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y - 10:.1f}" y2="{y + 10:.1f}" stroke="#000" stroke-width="3"/>'
    if name == "p95":
        return f'<path d="M{x:.1f} {y - 5:.1f}L{x + 5:.1f} {y:.1f}L{x:.1f} {y + 5:.1f}L{x - 5:.1f} {y:.1f}Z" fill="#fff" stroke="#000"/>'
    return f'<rect x="{x - 4:.1f}" y="{y - 4:.1f}" width="8" height="8" fill="#000"/>'


def _svg_shares(lay: LatencyLayout, i: int, mid: float, xr0: float, xr1: float) -> list[str]:
    out, left = [], 0.0
    for o, share in zip(OUTCOMES, lay.shares[i]):
        if share > 0:
            x = xr0 + left / 100 * (xr1 - xr0)
            out.append(f'<rect x="{x:.1f}" y="{mid - 12:.1f}" width="{share / 100 * (xr1 - xr0):.1f}" height="24" '
                       f'fill="{OUTCOME_COLORS[o]}"><title>{o}: {share:.1f}%</title></rect>')  # fmt: skip
        left += share
    text = lay.rate_texts[i].split("\n")
    color = OUTCOME_COLORS["5xx"] if lay.rate_alarm[i] else "#222"
    out.append(s.lines(xr1 + 8, mid - 6 * (len(text) - 1) + 4, text, size=11, step=12, attrs=f' fill="{color}"'))
    return out


def _svg_legend_items(lay: LatencyLayout) -> list[tuple[str, str]]:
    items = [(s.swatch(OUTCOME_COLORS[o]), OUTCOME_LABELS[o]) for o in OUTCOMES if o in lay.present]
    return [*items, (_mark("p50", 6, -4), "p50"), (_mark("p95", 6, -4), "p95"), (_mark("p99", 6, -4), "p99"),
            ('<rect x="0" y="-9" width="12" height="10" fill="none" stroke="#333"/>', "box p25–p75, whiskers p5–p95")]  # fmt: skip
