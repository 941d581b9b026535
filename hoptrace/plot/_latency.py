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
from hoptrace.analyzer._model import outcomes as hop_outcomes
from hoptrace.analyzer._model import slowest_first
from hoptrace.analyzer._types import OUTCOMES
from hoptrace.plot._common import (
    OUTCOME_COLORS,
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
    svc = hops["service"].astype(str).to_numpy()
    outcome = hop_outcomes(hops).to_numpy()
    rows_of = pd.Series(svc).groupby(svc, sort=False).indices  # service -> positions of its hops
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
        dots.append((d, i + rng.uniform(-0.22, 0.22, len(d)), [OUTCOME_COLORS[x] for x in o]))
    counts = pd.crosstab(svc, outcome).reindex(index=stats["service"], columns=list(OUTCOMES), fill_value=0)
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
        present=set(pd.unique(outcome)),
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
