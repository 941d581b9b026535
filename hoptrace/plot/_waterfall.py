"""The waterfall of one request: every hop it caused, on a millisecond axis."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace.plot._common import (
    EXPIRED_COLOR,
    NEUTRAL,
    OUTCOME_COLORS,
    SEVERITY_RANK,
    as_float,
    as_int,
    bar_note,
    clean_text,
    col,
    durations_ms,
    findings_for,
    fmt_ms,
    fmt_s,
    fmt_utc,
    frame,
    hop_ids_of,
    is_missing,
    new_figure,
    outcome_legend_handles,
    outcome_of,
    require_hops,
    resolve_trace,
    short_fp,
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


def waterfall(analysis: Any, trace: Any, *, title: str | None = None):
    """The waterfall Figure of request ``trace`` (root hop id, trace id, or any hop id in it)."""
    trace_id = resolve_trace(analysis, trace)
    hops = require_hops(analysis)
    rows = hops[col(hops, "trace") == trace_id]
    return waterfall_figure(rows, frame(analysis, "tokens"), frame(analysis, "findings"), title=title)


def waterfall_figure(
    hops: pd.DataFrame, tokens: pd.DataFrame | None = None, findings: pd.DataFrame | None = None, *, title: str | None = None
):
    """Draw the hops of one request.

    ``hops``: the request's rows of ``Analysis.hops`` (indexed by hop id; uses service,
    method, path, status, failed, error_kind, started_at, ended_at, duration_ms, and when
    present depth, order, parent_id, is_validation, token_fp, token_exp, remaining_s,
    trace, trace_id). ``tokens``: ``Analysis.tokens`` (for exp when a hop lacks
    token_exp, and the subject). ``findings``: ``Analysis.findings``; those about this
    request are listed under the chart, and duplicate validations are hatched.

    One row per hop in tree order, bars from start to end in ms since the request's
    start, coloured by outcome; each token's ``exp`` as a red dashed line with the time
    after it shaded; validation hops marked with a diamond; status and duration by each bar.
    """
    if hops is None or len(hops) == 0:
        raise AnalysisError("this request has no hops to draw")
    h = _ordered(hops)
    n = len(h)
    ids = [int(i) for i in h.index]
    records = h.to_dict("records")  # per-hop text is built from plain dicts, not pandas rows
    root = h.iloc[0]
    t0 = as_float(root.get("started_at"))
    starts_s = pd.to_numeric(h["started_at"], errors="coerce").astype(float)
    if t0 is None:
        t0 = float(starts_s.min())
    ends_s = pd.to_numeric(col(h, "ended_at"), errors="coerce").astype(float)
    dur = durations_ms(h).to_numpy()
    start_ms = ((starts_s - t0) * 1000.0).to_numpy()
    end_ms = ((ends_s - t0) * 1000.0).to_numpy()
    end_ms = np.where(np.isfinite(end_ms), end_ms, start_ms + np.nan_to_num(dur))
    end_ms = np.maximum(end_ms, start_ms)
    lo = float(min(0.0, np.nanmin(start_ms)))
    hi = float(max(np.nanmax(end_ms), lo + 1e-3))
    span = hi - lo
    widths = np.maximum(end_ms - start_ms, span * 0.002)

    outcomes = [outcome_of(s, f) for s, f in zip(col(h, "status"), col(h, "failed", 0))]
    colors = [OUTCOME_COLORS[o] for o in outcomes]

    # Which hops findings point at.
    mine = findings_for(findings, set(ids), as_int(root.get("trace"))) if findings is not None else None
    started = dict(zip(ids, starts_s.tolist()))
    duplicates = _duplicate_hops(mine, started)
    validation = col(h, "is_validation", False).map(lambda v: bool(v) if not is_missing(v) else False).to_numpy()

    # Tokens whose expiry matters here.
    exps = _token_expiries(h, tokens)
    exp_lines, exp_notes = [], []
    for fp, exp, sub in exps:
        x = (exp - t0) * 1000.0
        who = f"token {short_fp(fp)}" + (f" (sub {clean_text(sub, 24)})" if sub else "")
        if -0.02 * span <= x - lo and x <= hi + 0.5 * span:
            exp_lines.append((x, who))
        elif x < lo:
            exp_notes.append(f"{who} had expired {fmt_s(t0 - exp)} before this request started")
            exp_lines.append((None, who))
        else:
            exp_notes.append(f"{who} expires {fmt_s(exp - t0)} after this request started")
    right_data = max([hi] + [x for x, _ in exp_lines if x is not None])
    xlim = (lo - 0.01 * span, right_data + 0.42 * (right_data - lo))

    notes = _notes(mine, exp_notes)
    handles = _legend_handles(outcomes, validation.any(), bool(duplicates), exp_lines)
    # Laid out by hand, in inches: constrained layout would measure every row label
    # again and again, which is most of the drawing time of a 200-hop request.
    legend_rows = -(-len(handles) // LEGEND_COLS)
    title_pad = 16 if n <= 25 else 32
    top_in = 0.1 + 0.22 * legend_rows + 0.12 + 0.42 + title_pad / 72
    plot_in = max(n * ROW_IN, 0.6)
    notes_in = 0.2 * len(notes) + 0.1 if notes else 0.0
    bottom_in = 0.62 + (notes_in + 0.12 if notes else 0.0)
    height = top_in + plot_in + bottom_in
    max_depth = as_int(pd.to_numeric(col(h, "depth", 0), errors="coerce").max()) or 0
    bodies = [_label_body(r) for r in records]
    width = 13.0 + min(max(len(b) for b in bodies) + 3 * min(max_depth, 12), 110) * 0.055
    fig = new_figure(width, height, layout=None)
    height = fig.get_figheight()  # capped for huge requests
    plot_in = max(height - top_in - bottom_in, 0.5)
    ax = fig.add_axes((0.0, bottom_in / height, 1.0, plot_in / height))
    ax_notes = fig.add_axes((0.0, 0.05 / height, 1.0, notes_in / height)) if notes else None

    y = np.arange(n)
    bars = ax.barh(
        y, widths, left=start_ms, height=0.64, color=colors, edgecolor="#222222", linewidth=0.4, label=HOP_BARS, zorder=3
    )
    for k, bar in enumerate(bars.patches):
        bar.set_gid(f"hop-{ids[k]}")
        if ids[k] in duplicates:
            bar.set_hatch(DUPLICATE_HATCH)
    if validation.any():
        ax.scatter(
            start_ms[validation],
            y[validation],
            marker="D",
            s=30,
            color="black",
            zorder=5,
            gid=VALIDATION_GID,
            label="token validation",
        )

    # Row labels first: their width decides how wide the plotting area is.
    ax.set_xlim(*xlim)
    ax.set_ylim(n - 0.5, -0.5)  # first hop on top
    labels = _labels(h, bodies)
    ax.set_yticks(y, labels, fontsize=LABEL_FONT, family="DejaVu Sans Mono")
    for tick, o in zip(ax.get_yticklabels(), outcomes):
        if o in ("4xx", "5xx", "error"):
            tick.set_fontweight("bold")
    label_in = _left_align_yticklabels(fig, ax)
    left_in, right_in = label_in + 0.12, 0.3
    axes_in = max(width - left_in - right_in, 1.0)
    ax.set_position((left_in / width, bottom_in / height, axes_in / width, plot_in / height))
    if ax_notes is not None:
        ax_notes.set_position((left_in / width, 0.05 / height, axes_in / width, notes_in / height))

    # Status, duration and flags by each bar.
    remaining = pd.to_numeric(col(h, "remaining_s"), errors="coerce").astype(float).to_numpy()
    hop_exp = pd.to_numeric(col(h, "token_exp"), errors="coerce").astype(float).to_numpy()
    for k, r in enumerate(records):
        text = f"{_status_text(r)} · {fmt_ms(dur[k] if np.isfinite(dur[k]) else end_ms[k] - start_ms[k])}"
        flags = []
        if validation[k]:
            flags.append("validation")
        if ids[k] in duplicates:
            first = duplicates[ids[k]]
            gap = (started[ids[k]] - started[first]) * 1000.0
            flags.append(f"DUPLICATE of hop {first} ({fmt_ms(gap)} later)")
        left = remaining[k] if np.isfinite(remaining[k]) else (hop_exp[k] - started[ids[k]])
        if np.isfinite(left) and left < 0:
            flags.append(f"token expired {fmt_s(-left)} earlier")
        alarm = any(f.startswith(("DUP", "token")) for f in flags)
        if flags:
            text += ("  ⚠ " if alarm else "  · ") + ", ".join(flags)
        bar_note(ax, y[k], start_ms[k], start_ms[k] + widths[k], text, xlim, axes_in, color=EXPIRED_COLOR if alarm else "#222222")

    for x, who in exp_lines:
        xx = xlim[0] if x is None else x
        ax.axvspan(xx, xlim[1], color=EXPIRED_COLOR, alpha=0.07, lw=0, zorder=1, gid=EXPIRED_SPAN_GID)
        if x is not None:
            ax.axvline(x, color=EXPIRED_COLOR, ls="--", lw=1.6, zorder=4, gid=EXP_GID, label=f"exp of {who}")
            # Named just above the plot (above the top tick labels on a tall chart).
            ax.annotate(
                who.replace("token ", "exp ", 1),
                xy=(x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(0, 16 if n > 25 else 3),
                textcoords="offset points",
                fontsize=7.5,
                color=EXPIRED_COLOR,
                va="bottom",
                ha="center",
                annotation_clip=False,
            )

    ax.set_xlabel("time since the request started (ms, proxy clock)")
    ax.grid(axis="x", color="#dddddd", lw=0.6, zorder=0)
    ax.set_axisbelow(True)
    if n > 25:
        ax.tick_params(axis="x", labeltop=True, top=True)
    for spine in ("right", "top"):
        ax.spines[spine].set_visible(n > 25 and spine == "top")

    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=(0.1 / width, 1 - 0.08 / height),
        ncols=LEGEND_COLS,
        fontsize=8,
        frameon=False,
        borderaxespad=0.0,
    )

    ax.set_title(title if title is not None else _title(h, t0), loc="left", fontsize=11, pad=title_pad)
    if ax_notes is not None:
        ax_notes.axis("off")
        for k, (line, color) in enumerate(notes):
            ax_notes.text(
                0.0,
                1.0 - (k + 0.5) / len(notes),
                line,
                transform=ax_notes.transAxes,
                fontsize=8.5,
                va="center",
                ha="left",
                color=color,
            )
    return fig


def _legend_handles(outcomes, validation: bool, duplicates: bool, exp_lines) -> list:
    """Outcomes present, then the markers the chart uses."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = outcome_legend_handles(outcomes)
    if validation:
        handles.append(Line2D([], [], marker="D", color="black", ls="", markersize=6, label="token validation"))
    if duplicates:
        handles.append(Patch(facecolor="white", edgecolor="#222222", hatch=DUPLICATE_HATCH, label="duplicate validation"))
    if any(x is not None for x, _ in exp_lines):
        handles.append(Line2D([], [], color=EXPIRED_COLOR, ls="--", lw=1.6, label="token exp"))
    if exp_lines:
        handles.append(Patch(facecolor=EXPIRED_COLOR, alpha=0.15, label="after token expiry"))
    return handles


def _ordered(hops: pd.DataFrame) -> pd.DataFrame:
    h = hops.copy()
    if "order" in h.columns and h["order"].notna().all():
        return h.sort_values(["order", "started_at"], kind="stable")
    return h.sort_values("started_at", kind="stable")


def _label_body(r) -> str:
    service = clean_text(r.get("service"), 28)
    method = clean_text(r.get("method"), 10) or "?"
    path = clean_text(r.get("path"), 56) or "/"
    return f"{service} {method} {path}"


def _labels(h: pd.DataFrame, bodies: list[str]) -> list[str]:
    """``bodies`` (each hop's :func:`_label_body`), indented by a tree drawn with box characters."""
    ids = [int(i) for i in h.index]
    idset = set(ids)
    prefixes: dict[int, str] = {}
    if "parent_id" in h.columns:
        parents = [as_int(p) for p in h["parent_id"]]
        children: dict[int, list[int]] = defaultdict(list)
        roots = []
        for i, p in zip(ids, parents):
            (children[p] if p is not None and p in idset and p != i else roots).append(i)
        stack = [(r, "", True, True) for r in reversed(roots)]
        while stack:
            i, lead, last, is_root = stack.pop()
            if i in prefixes:
                continue
            prefixes[i] = "" if is_root else lead + ("└─ " if last else "├─ ")
            nxt = "" if is_root else lead + ("   " if last else "│  ")
            kids = children.get(i, [])
            for k in range(len(kids) - 1, -1, -1):
                stack.append((kids[k], nxt, k == len(kids) - 1, False))
    depths = col(h, "depth", 0)
    out = []
    for i, body, d in zip(ids, bodies, depths):
        pre = prefixes.get(i)
        if pre is None:
            d = as_int(d) or 0
            pre = "   " * max(d - 1, 0) + ("└─ " if d > 0 else "")
        if len(pre) > 36:
            pre = "┆" + pre[-35:]
        out.append(pre + body)
    return out


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


def _status_text(r) -> str:
    status = as_int(r.get("status"))
    failed = bool(as_int(r.get("failed")) or 0)
    kind = r.get("error_kind")
    kind = "" if is_missing(kind) else clean_text(kind, 16)
    if status is None:
        return kind or "no response"
    if failed:
        return f"{status} + {kind or 'error'}"
    return str(status)


def _token_expiries(h: pd.DataFrame, tokens: pd.DataFrame | None) -> list[tuple[str, float, str | None]]:
    """(fingerprint, exp, sub) of each distinct token the request's hops carried, in order of first use."""
    out, seen = [], set()
    tok = tokens if tokens is not None and len(tokens) else None
    for fp, exp, sub in zip(col(h, "token_fp"), col(h, "token_exp"), col(h, "token_sub")):
        if is_missing(fp) or fp in seen:
            continue
        exp = as_float(exp)
        if tok is not None and fp in tok.index:
            if exp is None:
                exp = as_float(tok.at[fp, "exp"]) if "exp" in tok.columns else None
            if is_missing(sub) and "sub" in tok.columns:
                sub = tok.at[fp, "sub"]
        if exp is None:
            continue
        seen.add(fp)
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
    for _, f in findings[col(findings, "kind") == "duplicate_validation"].iterrows():
        members = [i for i in hop_ids_of(f.get("hop_ids")) if i in started]
        members.sort(key=lambda i: (started[i], i))
        for i in members[1:]:
            out.setdefault(i, members[0])
    return out


def _notes(findings: pd.DataFrame | None, extra: list[str]) -> list[tuple[str, str]]:
    colors = {"error": EXPIRED_COLOR, "warning": "#8a5a00", "info": NEUTRAL}
    lines = []
    if findings is not None and len(findings):
        f = findings.assign(_rank=col(findings, "severity").map(lambda s: SEVERITY_RANK.get(s, 3)))
        f = f.sort_values(["_rank", "at"] if "at" in f.columns else ["_rank"], kind="stable")
        for _, r in f.head(MAX_NOTES).iterrows():
            sev = clean_text(r.get("severity"), 10)
            lines.append(
                (f"{sev.upper()}  {clean_text(r.get('kind'), 30)}: {clean_text(r.get('message'), 190)}", colors.get(sev, NEUTRAL))
            )
        if len(f) > MAX_NOTES:
            lines.append((f"… and {len(f) - MAX_NOTES} more findings about this request", NEUTRAL))
    lines += [(clean_text(x, 160), NEUTRAL) for x in extra]
    return lines


def _title(h: pd.DataFrame, t0: float) -> str:
    root = h.iloc[0]
    trace = as_int(root.get("trace"))
    name = f"Request {trace}" if trace is not None else "Request"
    total = as_float(durations_ms(h.iloc[:1]).iloc[0])
    services = col(h, "service").nunique()
    tid = root.get("trace_id")
    tid = "" if is_missing(tid) else f" · trace id {clean_text(tid, 40)}"
    return (
        f"{name}: {_label_body(root)} → {_status_text(root)} in {fmt_ms(total)}\n"
        f"{len(h)} hop{'s' * (len(h) != 1)} across {services} service{'s' * (services != 1)} · "
        f"started {fmt_utc(t0)}{tid}"
    )
