"""Per-service latency distributions with p50 / p95 / p99, and outcome shares / error rates."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace.plot._common import (
    OUTCOME_COLORS,
    OUTCOMES,
    as_float,
    as_int,
    clean_text,
    col,
    durations_ms,
    fmt_ms,
    frame,
    hop_outcomes,
    new_figure,
    outcome_legend_handles,
    require_hops,
)

ROW_IN = 0.62
MAX_POINTS = 400  # dots drawn per service (a deterministic sample beyond that)
PERCENTILES = (("p50", "p50_ms", 50, "|", 220), ("p95", "p95_ms", 95, "D", 38), ("p99", "p99_ms", 99, "s", 38))
SHARE_BARS = "outcome-share"  # label prefix of the BarContainers in the outcome panel


def latency(analysis: Any, *, title: str | None = None):
    """The latency Figure of every service in ``analysis``."""
    return latency_figure(require_hops(analysis), frame(analysis, "services"), title=title)


def service_stats(hops: pd.DataFrame, services: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per service: count, errors, error_rate, p50_ms, p95_ms, p99_ms.

    Taken from ``services`` (the analyzer's numbers) where it has them, computed from
    ``hops`` otherwise (an error there is a failed hop or a 5xx). Sorted worst p95 first.
    """
    h = pd.DataFrame({"_d": durations_ms(hops), "_err": hop_outcomes(hops).isin(["5xx", "error"])})
    rows = []
    for svc, g in h.groupby(_service_names(hops), sort=True):
        d = g["_d"].dropna()
        rows.append(
            {
                "service": str(svc),
                "count": len(g),
                "errors": int(g["_err"].sum()),
                **{key: float(np.percentile(d, q)) if len(d) else np.nan for _, key, q, _, _ in PERCENTILES},
            }
        )
    out = pd.DataFrame(rows, columns=["service", "count", "errors", "p50_ms", "p95_ms", "p99_ms"])
    out["error_rate"] = out["errors"] / out["count"].where(out["count"] > 0)
    if services is not None and len(services) and "service" in services.columns:
        given = services.drop_duplicates("service").set_index(services["service"].astype(str).drop_duplicates())
        if "client_errors" in given.columns:
            out["client_errors"] = out["service"].map(given["client_errors"])
        for name in ("count", "errors", "error_rate", "p50_ms", "p95_ms", "p99_ms"):
            if name in given.columns:
                mapped = out["service"].map(given[name])
                out[name] = mapped.where(mapped.notna(), out[name])
    return out.sort_values(["p95_ms", "service"], ascending=[False, True], na_position="last").reset_index(drop=True)


def latency_figure(
    hops: pd.DataFrame, services: pd.DataFrame | None = None, *, title: str | None = None, stats: pd.DataFrame | None = None
):
    """Draw one row per service: its hops' durations (dots coloured by outcome, a box from
    p25 to p75 with whiskers at p5/p95), p50 / p95 / p99 marked; and beside it the share
    of each outcome with the error rate written out.

    ``hops``: ``Analysis.hops`` (service, duration_ms, status, failed). ``services``:
    ``Analysis.services``, whose percentiles and error rates are shown when given.
    ``stats``: :func:`service_stats` of the two, when the caller has it already.

    Dots are a deterministic sample of at most ``MAX_POINTS`` hops per service; the
    boxes, whiskers and percentile marks are from all of them.
    """
    if hops is None or len(hops) == 0:
        raise AnalysisError("no hops recorded: no latencies to plot")
    stats = service_stats(hops, services) if stats is None else stats
    m = len(stats)
    dur = durations_ms(hops).to_numpy()
    svc = _service_names(hops)
    outcomes = hop_outcomes(hops).to_numpy()
    rows_of = svc.groupby(svc.to_numpy(), sort=False).indices  # service -> positions of its hops
    none = np.array([], dtype=np.int64)

    fig = new_figure(14.0, 1.9 + m * ROW_IN)
    gs = fig.add_gridspec(1, 2, width_ratios=[3.0, 1.25])
    ax = fig.add_subplot(gs[0])
    axr = fig.add_subplot(gs[1], sharey=ax)
    y = np.arange(m)
    rng = np.random.default_rng(0)
    data = []
    for i, name in enumerate(stats["service"]):
        mine = rows_of.get(name, none)
        d, o = dur[mine], outcomes[mine]
        keep = np.isfinite(d)
        d, o = np.maximum(d[keep], 0.01), o[keep]
        data.append(d if len(d) else np.array([np.nan]))
        if len(d) > MAX_POINTS:
            pick = rng.choice(len(d), MAX_POINTS, replace=False)
            d, o = d[pick], o[pick]
        jitter = rng.uniform(-0.22, 0.22, len(d))
        ax.scatter(d, y[i] + jitter, s=14, c=[OUTCOME_COLORS[x] for x in o], alpha=0.7, lw=0, zorder=2)
    ax.boxplot(
        data,
        positions=y,
        orientation="horizontal",
        widths=0.55,
        showfliers=False,
        whis=(5, 95),
        patch_artist=True,
        manage_ticks=False,
        zorder=3,
        boxprops={"facecolor": "#ffffff00", "edgecolor": "#333333", "lw": 1.0},
        medianprops={"color": "#333333", "lw": 0},
        whiskerprops={"color": "#333333"},
        capprops={"color": "#333333"},
    )
    for name, key, _, marker, size in PERCENTILES:
        x = pd.to_numeric(stats[key], errors="coerce").to_numpy(dtype=float)
        ok = np.isfinite(x)
        style = (
            {"color": "black", "linewidths": 2.4}
            if marker == "|"
            else {"facecolors": "white" if marker == "D" else "black", "edgecolors": "black", "linewidths": 1.0}
        )
        ax.scatter(x[ok], y[ok], marker=marker, s=size, zorder=5, gid=name, label=name, **style)

    finite = dur[np.isfinite(dur) & (dur > 0)]
    if len(finite) and finite.max() / max(finite.min(), 0.01) > 50:
        ax.set_xscale("log")
        ax.set_xlabel("hop duration (ms, log scale)")
    else:
        ax.set_xlabel("hop duration (ms)")
        ax.set_xlim(left=0)
    labels = [
        f"{clean_text(r.service, 30)}\n{_hops(r['count'])} · p50 {fmt_ms(r.p50_ms)} · p95 {fmt_ms(r.p95_ms)}"
        f" · p99 {fmt_ms(r.p99_ms)}"
        for _, r in stats.iterrows()
    ]
    ax.set_yticks(y, labels, fontsize=8.5)
    ax.set_ylim(m - 0.5, -0.5)
    ax.grid(axis="x", color="#dddddd", lw=0.6, which="both")
    ax.set_axisbelow(True)
    ax.set_title(
        title or f"Latency per service ({len(hops)} hops, {m} service{'s' * (m != 1)}; slowest p95 on top)",
        loc="left",
        fontsize=11,
    )

    # Outcome shares and error rates.
    counts = pd.crosstab(svc.to_numpy(), outcomes).reindex(index=stats["service"], columns=OUTCOMES, fill_value=0)
    shares = 100.0 * counts.to_numpy(dtype=float) / np.maximum(counts.sum(axis=1).to_numpy(dtype=float), 1.0)[:, None]
    left = np.zeros(m)
    for o, share in zip(OUTCOMES, shares.T):
        if share.any():
            axr.barh(y, share, left=left, height=0.55, color=OUTCOME_COLORS[o], label=f"{SHARE_BARS}:{o}", zorder=3)
        left += share
    for i, r in stats.iterrows():
        rate = as_float(r.error_rate)
        text = "?" if rate is None else f"{100 * rate:.1f}%"
        client = as_int(r.get("client_errors")) if "client_errors" in stats.columns else None
        extra = f"\n+ {client} 4xx" if client else ""
        axr.text(
            101.5,
            y[i],
            f"{text} errors\n({_num(r.errors)}/{_num(r['count'])}){extra}",
            va="center",
            fontsize=8,
            color=OUTCOME_COLORS["5xx"] if rate else "#222222",
            clip_on=False,
        )
    axr.set_xlim(0, 100)
    axr.set_xlabel("share of hops by outcome (%)")
    axr.tick_params(axis="y", labelleft=False, length=0)
    axr.set_title("outcomes and error rate", loc="left", fontsize=10)
    for a in (ax, axr):
        a.spines["right"].set_visible(False)
        a.spines["top"].set_visible(False)

    from matplotlib.lines import Line2D

    handles = outcome_legend_handles(set(pd.unique(outcomes)))
    handles += [
        Line2D([], [], marker="|", color="black", ls="", markersize=12, markeredgewidth=2.2, label="p50"),
        Line2D([], [], marker="D", markerfacecolor="white", color="black", ls="", markersize=6, label="p95"),
        Line2D([], [], marker="s", color="black", ls="", markersize=6, label="p99"),
        Line2D([], [], color="#333333", lw=1, label="box p25–p75, whiskers p5–p95"),
    ]
    fig.legend(handles=handles, loc="outside upper left", ncols=min(len(handles), 5), fontsize=8, frameon=False)
    return fig


def _service_names(hops: pd.DataFrame) -> pd.Series:
    return col(hops, "service").astype("string").fillna("?")


def _hops(v) -> str:
    i = as_int(v)
    return "? hops" if i is None else f"{i} hop{'s' * (i != 1)}"


def _num(v) -> str:
    i = as_int(v)
    return "?" if i is None else str(i)
