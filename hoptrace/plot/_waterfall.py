"""The waterfall of one request: every hop it caused, on a millisecond axis.

Two steps: :func:`waterfall_layout` decides everything (rows, bar positions, labels,
the token-expiry lines, what had to be clipped) as plain data, tested as data;
:func:`draw_waterfall` draws a layout with matplotlib.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, as_int, is_missing
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._model import findings_about, hop_endings, outcomes, resolve_trace, sorted_findings, tree_prefixes
from hoptrace.plot._common import (
    EXPIRED_COLOR, NEUTRAL, OUTCOME_COLORS, bar_note, clean_text, fmt_ms, fmt_s, fmt_utc, new_figure, outcome_legend_handles,
    require_hops, short_fp,
)

ROW_IN = 0.27  # inches per hop row
LABEL_FONT = 8.5
MAX_NOTES = 8
HOP_BARS = "hops"  # label of the BarContainer holding one Rectangle per hop
EXP_GID = "token-exp"  # gid of each token-expiry line
EXPIRED_SPAN_GID = "token-expired"  # gid of the shading after an expiry
VALIDATION_GID = "validation"  # gid of the validation markers
DUPLICATE_HATCH = "////"
LEGEND_COLS = 4
MIN_BAR_FRACTION = 0.006  # ~6 px of a 1000 px axis: a 3 ms bar in a 1.4 s request stays visible
RIGHT_MARGIN = 0.03  # of the span after the last bar or exp line: a bar's text goes before or inside it when it
# does not fit after, so the axis ends with the request instead of running ~40 % past it
MAX_SPAN_MS = 86_400_000.0  # a bar is cut a day after the request started: beyond it a time is a clock error
NOTE_COLORS = {"error": EXPIRED_COLOR, "warning": "#8a5a00", "info": NEUTRAL}


@dataclass
class WaterfallLayout:
    """What the waterfall shows, in data units (ms since the request started)."""

    hop_ids: list[int]
    labels: list[str]  # tree-indented "service METHOD /path"
    starts: np.ndarray  # bar left edges
    widths: np.ndarray  # bar widths (at least MIN_BAR_FRACTION of the span, so a 0 ms hop shows)
    outcomes: list[str]
    texts: list[str]  # "401 · 1400 ms  ⚠ DUPLICATE of hop 9 …" beside each bar
    alarms: list[bool]  # text in the expiry colour
    duplicates: set[int]  # hop ids hatched as duplicate validations
    validation: np.ndarray  # bool per row
    xlim: tuple[float, float]
    exp_lines: list[tuple[float | None, str]]  # (x, "token ab12cd34 (sub alice)"); None: expired before the request
    notes: list[tuple[str, str]]  # (text, colour) under the chart: findings, expiries off the axis, clipping
    title: str
    clipped: list[str] = field(default_factory=list)  # what could not be drawn where it belongs


def waterfall(analysis: Analysis, trace: Any, *, title: str | None = None):
    """The waterfall Figure of request ``trace`` (root hop id, trace id, or any hop id in it)."""
    hops = require_hops(analysis)
    chosen = resolve_trace(hops, trace)
    return waterfall_figure(analysis.trace_hops(chosen), analysis.tokens, analysis.findings, title=title)


def waterfall_figure(hops: pd.DataFrame, tokens: pd.DataFrame, findings: pd.DataFrame | None = None, *, title: str | None = None):
    """Draw the hops of one request (its rows of ``Analysis.hops``) with ``Analysis.tokens``
    and ``Analysis.findings`` (those about this request are listed under the chart).

    One row per hop in tree order, bars from start to end in ms since the request's
    start, coloured by outcome; each token's ``exp`` as a red dashed line with the time
    after it shaded; validation hops marked with a diamond; status and duration by each bar.
    """
    return draw_waterfall(waterfall_layout(hops, tokens, findings, title=title))


def waterfall_layout(
    hops: pd.DataFrame, tokens: pd.DataFrame, findings: pd.DataFrame | None = None, *, title: str | None = None
) -> WaterfallLayout:
    """The waterfall of one request's hops as data (see :class:`WaterfallLayout`)."""
    if hops is None or len(hops) == 0:
        raise AnalysisError("this request has no hops to draw")
    h = hops.sort_values(["order", "started_at"], kind="stable")
    ids = [int(i) for i in h.index]
    t0 = float(h["started_at"].iloc[0])
    start, end, clipped = _clamped_times(h, t0)
    lo = float(min(0.0, start.min()))
    hi = float(max(end.max(), lo + 1e-3))
    span = hi - lo
    mine = findings_about(findings, ids, [as_int(h["trace"].iloc[0])]) if findings is not None else None
    started = dict(zip(ids, h["started_at"].tolist()))
    duplicates = _duplicate_hops(mine, started)
    exp_lines, exp_notes = _expiry_lines(h, tokens, t0, lo, hi)
    right = max([hi] + [x for x, _ in exp_lines if x is not None])
    xlim = (lo - 0.01 * span, right + RIGHT_MARGIN * (right - lo))
    texts, alarms = _bar_texts(h, duplicates, started, end - start)
    layout = WaterfallLayout(
        hop_ids=ids,
        labels=_labels(h),
        starts=start,
        widths=np.maximum(end - start, MIN_BAR_FRACTION * (xlim[1] - xlim[0])),
        outcomes=outcomes(h).tolist(),
        texts=texts,
        alarms=alarms,
        duplicates=set(duplicates),
        validation=h["is_validation"].fillna(False).to_numpy(dtype=bool),
        xlim=xlim,
        exp_lines=exp_lines,
        notes=_notes(mine, exp_notes + clipped),
        title=title if title is not None else _title(h, t0),
        clipped=clipped,
    )
    return layout


def _clamped_times(h: pd.DataFrame, t0: float) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each hop's start and end in ms since ``t0``, within a day of it; and a note naming the hops cut.

    A recorded time a day away from its request is a clock or data error; drawn where it
    claims to be it would stretch the axis past what the renderer can draw.
    """
    start = (h["started_at"].to_numpy(dtype=float) - t0) * 1000.0
    end = np.nan_to_num((h["ended_at"].to_numpy(dtype=float) - t0) * 1000.0, nan=0.0)
    off = (np.abs(start) > MAX_SPAN_MS) | (np.abs(end) > MAX_SPAN_MS)
    start = np.clip(start, -MAX_SPAN_MS, MAX_SPAN_MS)
    end = np.maximum(np.clip(end, -MAX_SPAN_MS, MAX_SPAN_MS), start)
    if not off.any():
        return start, end, []
    ids = ", ".join(str(i) for i in h.index[off][:5]) + (" …" if off.sum() > 5 else "")
    return start, end, [f"{int(off.sum())} hop(s) claim times over a day from the request's start (hop {ids}): drawn cut at 24 h"]


def _bar_texts(h: pd.DataFrame, duplicates: dict[int, int], started: dict[int, float], dur_ms: np.ndarray):
    """The text beside each bar, and whether it is an alarm (duplicate, expired token)."""
    texts, alarms = [], []
    for k, (hop, ended, validation, left) in enumerate(
        zip(h.index, hop_endings(h), h["is_validation"].fillna(False), h["remaining_s"].to_numpy(dtype=float))
    ):
        flags = ["validation"] if validation else []
        if hop in duplicates:
            first = duplicates[hop]
            flags.append(f"DUPLICATE of hop {first} ({fmt_ms((started[hop] - started[first]) * 1000.0)} later)")
        if np.isfinite(left) and left < 0:
            flags.append(f"token expired {fmt_s(-left)} earlier")
        alarm = any(f.startswith(("DUP", "token")) for f in flags)
        text = f"{clean_text(ended, 40)} · {fmt_ms(dur_ms[k])}"
        texts.append(text + (("  ⚠ " if alarm else "  · ") + ", ".join(flags) if flags else ""))
        alarms.append(alarm)
    return texts, alarms


def _expiry_lines(h: pd.DataFrame, tokens: pd.DataFrame, t0: float, lo: float, hi: float):
    """(x or None, who) of each token's exp near the request, and notes for those too far to draw.

    An exp more than half the request's span after its end, or before its start, is a
    note under the chart ("expired 2.50 s before this request started"), not a line
    that would squash the millisecond axis (or, at an absurd exp, overflow it).
    """
    span = hi - lo
    lines, notes = [], []
    for fp, exp, sub in _token_expiries(h, tokens):
        x = (exp - t0) * 1000.0
        who = f"token {short_fp(fp)}" + (f" (sub {clean_text(sub, 24)})" if sub else "")
        if -0.02 * span <= x - lo and x <= hi + 0.5 * span:
            lines.append((x, who))
        elif x < lo:
            notes.append(f"{who} had expired {fmt_s(t0 - exp)} before this request started")
            lines.append((None, who))
        else:
            notes.append(f"{who} expires {fmt_s(exp - t0)} after this request started")
    return lines, notes


def _token_expiries(h: pd.DataFrame, tokens: pd.DataFrame) -> list[tuple[str, float, str | None]]:
    """(fingerprint, exp, sub) of each distinct token the request's hops carried, in order of first use."""
    out, seen = [], set()
    for fp, exp, sub in zip(h["token_fp"], h["token_exp"], h["token_sub"]):
        exp = as_float(exp)
        if is_missing(fp) or fp in ("", "nan", "None") or fp in seen or exp is None:
            continue
        seen.add(fp)
        if is_missing(sub) or sub in ("nan", "None"):
            sub = tokens.at[fp, "sub"] if fp in tokens.index else None
        out.append((str(fp), exp, None if is_missing(sub) else str(sub)))
    return out


def _duplicate_hops(findings: pd.DataFrame | None, started: dict[int, float]) -> dict[int, int]:
    """Hop id -> the earlier hop it duplicates, from ``duplicate_validation`` findings.

    A finding names every validation of the same token in the request; all but the
    earliest are the duplicates.
    """
    out: dict[int, int] = {}
    if findings is None or len(findings) == 0:
        return out
    for ids in findings.loc[findings["kind"] == "duplicate_validation", "hop_ids"]:
        members = sorted((int(i) for i in ids if int(i) in started), key=lambda i: (started[i], i))
        for i in members[1:]:
            out.setdefault(i, members[0])
    return out


def _notes(findings: pd.DataFrame | None, extra: list[str]) -> list[tuple[str, str]]:
    lines = []
    if findings is not None and len(findings):
        f = sorted_findings(findings)
        for sev, kind, message in zip(*(f[c].head(MAX_NOTES) for c in ("severity", "kind", "message"))):
            text = f"{clean_text(sev, 10).upper()}  {clean_text(kind, 30)}: {clean_text(message, 190)}"
            lines.append((text, NOTE_COLORS.get(sev, NEUTRAL)))
        if len(f) > MAX_NOTES:
            lines.append((f"… and {len(f) - MAX_NOTES} more findings about this request", NEUTRAL))
    return lines + [(clean_text(x, 160), NEUTRAL) for x in extra]


def _label_body(service, method, path) -> str:
    return f"{clean_text(service, 28)} {clean_text(method, 10) or '?'} {clean_text(path, 56) or '/'}"


def _labels(h: pd.DataFrame) -> list[str]:
    """Each hop's ``service METHOD /path``, indented by a tree drawn with box characters."""
    prefixes = tree_prefixes(h)
    bodies = [_label_body(*r) for r in zip(h["service"], h["method"], h["path"])]
    return [(p if len(p) <= 36 else "┆" + p[-35:]) + b for p, b in zip(prefixes, bodies)]


def _title(h: pd.DataFrame, t0: float) -> str:
    root = h.iloc[0]
    services = h["service"].nunique()
    tid = root.get("trace_id")
    tid = "" if is_missing(tid) else f" · trace id {clean_text(tid, 40)}"
    return (
        f"Request {int(root['trace'])}: {_label_body(root['service'], root['method'], root['path'])}"
        f" → {clean_text(hop_endings(h.iloc[:1]).iloc[0], 60)} in {fmt_ms(root['duration_ms'])}\n"
        f"{len(h)} hop{'s' * (len(h) != 1)} across {services} service{'s' * (services != 1)} · "
        f"started {fmt_utc(t0)}{tid}"
    )


# -- drawing --------------------------------------------------------------------------------


def draw_waterfall(lay: WaterfallLayout):
    """The Figure of a :class:`WaterfallLayout`, sized in inches by hand.

    Constrained layout would measure every row label again and again, which is most of
    the drawing time of a 200-hop request.
    """
    n = len(lay.hop_ids)
    handles = _legend_handles(lay)
    title_pad = 16 if n <= 25 else 32
    top_in = 0.1 + 0.22 * -(-len(handles) // LEGEND_COLS) + 0.54 + title_pad / 72
    notes_in = 0.2 * len(lay.notes) + 0.1 if lay.notes else 0.0
    bottom_in = 0.62 + (notes_in + 0.12 if lay.notes else 0.0)
    width = 13.0 + min(max(len(x) for x in lay.labels), 110) * 0.055
    fig = new_figure(width, top_in + max(n * ROW_IN, 0.6) + bottom_in, layout=None)
    height = fig.get_figheight()  # capped for huge requests
    plot_in = max(height - top_in - bottom_in, 0.5)
    ax = fig.add_axes((0.0, bottom_in / height, 1.0, plot_in / height))
    y = _draw_bars(ax, lay)
    left_in = _left_align_yticklabels(fig, ax) + 0.12
    axes_in = max(width - left_in - 0.3, 1.0)
    ax.set_position((left_in / width, bottom_in / height, axes_in / width, plot_in / height))
    for k in range(n):
        color = EXPIRED_COLOR if lay.alarms[k] else "#222222"
        bar_note(ax, y[k], lay.starts[k], lay.starts[k] + lay.widths[k], lay.texts[k], lay.xlim, axes_in, color=color)
    _draw_expiry(ax, lay, n)
    ax.set_xlabel("time since the request started (ms, proxy clock)")
    ax.grid(axis="x", color="#dddddd", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    if n > 25:
        ax.tick_params(axis="x", labeltop=True, top=True)
    for spine in ("right", "top"):
        ax.spines[spine].set_visible(n > 25 and spine == "top")
    fig.legend(handles=handles, loc="upper left", bbox_to_anchor=(0.1 / width, 1 - 0.08 / height), ncols=LEGEND_COLS,
               fontsize=8, frameon=False, borderaxespad=0.0)  # fmt: skip
    ax.set_title(lay.title, loc="left", fontsize=11, pad=title_pad)
    if lay.notes:
        notes = fig.add_axes((left_in / width, 0.05 / height, axes_in / width, notes_in / height))
        notes.axis("off")
        for k, (line, color) in enumerate(lay.notes):
            notes.text(0.0, 1.0 - (k + 0.5) / len(lay.notes), line, transform=notes.transAxes, fontsize=8.5, va="center",
                       ha="left", color=color)  # fmt: skip
    return fig


def _draw_bars(ax, lay: WaterfallLayout) -> np.ndarray:
    y = np.arange(len(lay.hop_ids))
    colors = [OUTCOME_COLORS[o] for o in lay.outcomes]
    bars = ax.barh(y, lay.widths, left=lay.starts, height=0.64, color=colors, edgecolor="#222222", linewidth=0.4,
                   label=HOP_BARS, zorder=3)  # fmt: skip
    for hop, bar in zip(lay.hop_ids, bars.patches):
        bar.set_gid(f"hop-{hop}")
        if hop in lay.duplicates:
            bar.set_hatch(DUPLICATE_HATCH)
    if lay.validation.any():
        # Under the bars (zorder 2 < 3), at their left edge: a 3 ms failing bar is never hidden by its marker.
        ax.scatter(lay.starts[lay.validation], y[lay.validation], marker="D", s=30, color="black", zorder=2,
                   gid=VALIDATION_GID, label="token validation")  # fmt: skip
    ax.set_xlim(*lay.xlim)
    ax.set_ylim(len(y) - 0.5, -0.5)  # first hop on top
    ax.set_yticks(y, lay.labels, fontsize=LABEL_FONT, family="DejaVu Sans Mono")
    for tick, o in zip(ax.get_yticklabels(), lay.outcomes):
        if o in ("4xx", "5xx", "error"):
            tick.set_fontweight("bold")
    return y


def _draw_expiry(ax, lay: WaterfallLayout, n: int) -> None:
    for x, who in lay.exp_lines:
        ax.axvspan(lay.xlim[0] if x is None else x, lay.xlim[1], color=EXPIRED_COLOR, alpha=0.07, lw=0, zorder=1,
                   gid=EXPIRED_SPAN_GID)  # fmt: skip
        if x is None:
            continue
        ax.axvline(x, color=EXPIRED_COLOR, ls="--", lw=1.6, zorder=4, gid=EXP_GID, label=f"exp of {who}")
        # Named just above the plot (above the top tick labels on a tall chart).
        ax.annotate(who.replace("token ", "exp ", 1), xy=(x, 1.0), xycoords=("data", "axes fraction"),
                    xytext=(0, 16 if n > 25 else 3), textcoords="offset points", fontsize=7.5, color=EXPIRED_COLOR,
                    va="bottom", ha="center", annotation_clip=False)  # fmt: skip


def _legend_handles(lay: WaterfallLayout) -> list:
    """Outcomes present, then the markers the chart uses."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = outcome_legend_handles(lay.outcomes)
    if lay.validation.any():
        handles.append(Line2D([], [], marker="D", color="black", ls="", markersize=6, label="token validation"))
    if lay.duplicates:
        handles.append(Patch(facecolor="white", edgecolor="#222222", hatch=DUPLICATE_HATCH, label="duplicate validation"))
    if any(x is not None for x, _ in lay.exp_lines):
        handles.append(Line2D([], [], color=EXPIRED_COLOR, ls="--", lw=1.6, label="token exp"))
    if lay.exp_lines:
        handles.append(Patch(facecolor=EXPIRED_COLOR, alpha=0.15, label="after token expiry"))
    return handles


def _left_align_yticklabels(fig, ax) -> float:
    """Left-align the y tick labels (so the tree indentation shows) by padding them out by the widest.

    Returns the labels' width in inches."""
    renderer = fig.canvas.get_renderer()
    labels = ax.get_yticklabels()
    if not labels:
        return 0.0
    # Monospaced: the longest strings are the widest; measuring every row would cost a
    # text layout per hop.
    longest = sorted(labels, key=lambda t: len(t.get_text()), reverse=True)[:3]
    widest = max(t.get_window_extent(renderer=renderer).width for t in longest)
    pad_pt = widest * 72.0 / fig.dpi + 4
    for t in labels:
        t.set_horizontalalignment("left")
    ax.tick_params(axis="y", pad=pad_pt, length=0)
    return pad_pt / 72.0
