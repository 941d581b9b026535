"""The workflow view: a subject's requests over wall time against its tokens' lifetimes.

:func:`session_layout` decides what is drawn where, as data (rows, bars, token bands,
arrows, what had to be clamped to the axis); :func:`draw_session` draws it.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, is_missing
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._model import hop_endings, outcomes
from hoptrace.plot import _svg as s
from hoptrace.plot._common import (
    EXPIRED_COLOR,
    OUTCOME_COLORS,
    OUTCOME_LABELS,
    TOKEN_COLOR,
    bar_note,
    clean_text,
    fmt_ms,
    fmt_s,
    fmt_utc,
    new_figure,
    outcome_legend_handles,
    short_fp,
)

ROW_IN = 0.3
REQUEST_BARS = "requests"  # label of the BarContainer with one Rectangle per request
TOKEN_BARS = "tokens"  # label of the BarContainer with one band per token
EXP_GID = "token-exp"
REFRESH_GID = "refresh"
ISSUED_GID = "issued"
EXPIRED_HATCH = "xxx"
MAX_SPAN_S = 7 * 86_400.0  # a request is cut a week after the first one: beyond it a time is a clock error


def select_session(analysis: Analysis, key: Any) -> pd.DataFrame:
    """The ``Analysis.sessions`` rows that ``key`` names.

    ``key`` is a subject (``sub`` claim: all its requests), a token fingerprint or a
    unique prefix of one (at least 6 characters: the workflows that used or were issued
    that token), or a session number.
    """
    sessions = analysis.sessions
    if len(sessions) == 0:
        raise AnalysisError("no requests in this trace database: no workflow to plot")
    text = str(key).strip()
    subjects = sessions["subject"].astype("string")
    rows = sessions[(subjects == text).fillna(False).to_numpy(dtype=bool)]
    if len(rows):
        return rows
    fp = _match_token(analysis.tokens, text)
    if fp is not None:
        traces = _traces_carrying(analysis, {fp})
        mine = sessions[sessions["session"].isin(set(sessions.loc[sessions["trace"].isin(traces), "session"]))]
        if len(mine):
            return mine
        raise AnalysisError(f"token {text!r} was seen, but no request carried it")
    # A subject no request entered with (the client held a cookie, the services a JWT): the requests whose calls carried it.
    # Before session numbers: a subject is a claim the user read somewhere ("1" may be both).
    token_subjects = analysis.tokens["sub"].astype("string")
    carried = _traces_carrying(analysis, set(analysis.tokens.index[(token_subjects == text).fillna(False).to_numpy(dtype=bool)]))
    rows = sessions[sessions["trace"].isin(carried)]
    if len(rows):
        return rows
    if re.fullmatch(r"\d{1,18}", text):
        rows = sessions[sessions["session"] == int(text)]
        if len(rows):
            return rows
    known = sorted({str(s) for s in subjects.dropna()} | {str(s) for s in token_subjects.dropna()})
    listed = ", ".join(repr(s) for s in known[:10]) + (" …" if len(known) > 10 else "")
    raise AnalysisError(
        f"no subject, token or session {text!r} in this trace database"
        + (f"; subjects: {listed}" if known else "; no token carried a subject")
    )


def _traces_carrying(analysis: Analysis, fps: set) -> set[int]:
    """The requests any of whose hops carried (or answered with) one of these tokens."""
    sessions = analysis.sessions
    hop_ids = analysis.hop_tokens.loc[analysis.hop_tokens["fingerprint"].isin(fps), "hop_id"]
    traces = set(sessions.loc[sessions["token_fp"].isin(fps), "trace"].astype(int))
    return traces | set(analysis.hops["trace"].reindex(hop_ids).dropna().astype(int))


def _match_token(tokens: pd.DataFrame, text: str) -> str | None:
    fps = [str(f) for f in tokens.index]
    if text in fps:
        return text
    if len(text) < 6:
        return None
    hits = [f for f in fps if f.startswith(text)]
    if len(hits) > 1:
        raise AnalysisError(f"token prefix {text!r} is ambiguous: {', '.join(h[:12] for h in hits[:5])}")
    return hits[0] if hits else None


def session_view(analysis: Analysis, key: Any, *, title: str | None = None):
    """The workflow Figure for a subject, token or session (see :func:`select_session`)."""
    return session_figure(analysis, select_session(analysis, key), title=title)


def session_figure(analysis: Analysis, sessions: pd.DataFrame, *, title: str | None = None):
    """Draw requests (rows of ``analysis.sessions``) over wall time with their tokens.

    One row per request (bar from start to end, coloured by outcome; requests sent with an
    expired token hatched and outlined red); above them one band per token from ``iat`` to
    ``exp`` with its ``exp`` as a dashed line across all rows; arrows from the request that
    issued a token to its band, and from each token to the one that refreshed it.
    """
    return draw_session(session_layout(analysis, sessions, title=title))


@dataclass
class Token:
    fp: str
    label: str
    left: float  # band from (s since the first request), clamped to the axis
    right: float
    exp_x: float | None  # the exp line, when it is on the axis
    note: str  # "iat 12:00:01 → exp 13:00:01 (lifetime 60.0 min)", what lies off the axis


@dataclass
class SessionLayout:
    """A workflow as data, x in seconds since its first request."""

    traces: list[int]
    labels: list[str]  # one per request
    starts: np.ndarray
    widths: np.ndarray
    outcomes: list[str]
    expired: np.ndarray  # bool per request: sent with (or during) an expired token
    texts: list[str]  # beside each request's bar
    alarms: list[bool]
    tokens: list[Token]
    issued: list[tuple[float, str, int]]  # (x, token fp, request row) arrows
    refreshes: list[tuple[float, str, str]]  # (x, old fp, new fp) arrows
    xlim: tuple[float, float]
    t0: float
    title: str
    clipped: list[str] = field(default_factory=list)  # times that lay off the axis and were drawn at its edge


def session_layout(analysis: Analysis, sessions: pd.DataFrame, *, title: str | None = None) -> SessionLayout:
    """The workflow view of ``sessions`` (rows of ``analysis.sessions``) as data.

    Token times (iat, exp) far from the requests widen the axis only up to half the
    requests' span on either side; beyond it, a band is cut at the axis's edge and its
    note says when it was issued or expires, so an absurd claim (an ``exp`` of 1e-7, an
    ``iat`` of 2e10) never puts anything at an x the renderer cannot draw.
    """
    if sessions is None or len(sessions) == 0:
        raise AnalysisError("no requests to draw")
    s = sessions.sort_values(["started_at", "trace"], kind="stable").reset_index(drop=True)
    traces = [int(t) for t in s["trace"]]
    t0 = float(s["started_at"].min())
    start = s["started_at"].to_numpy(dtype=float) - t0
    end = np.nan_to_num(s["ended_at"].to_numpy(dtype=float) - t0, nan=0.0)
    cut = [f"request {t} claims to end {fmt_s(e)} after the first request: drawn cut at {fmt_s(MAX_SPAN_S)}"
           for t, e in zip(s["trace"], end) if e > MAX_SPAN_S]  # fmt: skip
    start = np.minimum(start, MAX_SPAN_S)
    end = np.maximum(np.minimum(end, MAX_SPAN_S), start)
    issued = _issued(analysis, traces)
    info = _token_info(analysis.tokens, s, issued)
    xlim, clipped = _axis(start, end, info, t0)
    roots = analysis.hops.reindex(traces)
    texts, alarms = _request_texts(s, roots, analysis.findings, end - start)
    span = max(xlim[1] - xlim[0], 1e-3)
    lay = SessionLayout(
        traces=traces,
        labels=[f"{fmt_utc(t, False)}  {clean_text(e, 48)}  [{r}]" for t, e, r in zip(s["started_at"], s["endpoint"], traces)],
        starts=start,
        widths=np.maximum(end - start, 0.006 * span),
        outcomes=outcomes(roots).tolist(),
        expired=s["expired"].fillna(False).to_numpy(dtype=bool),
        texts=texts,
        alarms=alarms,
        tokens=[_token(fp, info[fp], t0, xlim) for fp in info],
        issued=[(_clamp(w - t0, xlim), fp, traces.index(t)) for fp, (t, w) in issued.items() if fp in info],
        refreshes=_refreshes(info, issued, t0, xlim),
        xlim=xlim,
        t0=t0,
        title="",
        clipped=cut + clipped,
    )
    lay.title = title if title is not None else _title(s, lay, float(end.max()))
    if cut:  # said on the chart: a bar drawn shorter than it claims
        lay.title += f"\n{clean_text(cut[0], 160)}" + (f" (and {len(cut) - 1} more)" if len(cut) > 1 else "")
    return lay


def _clamp(x: float, xlim: tuple[float, float]) -> float:
    return min(max(x, xlim[0]), xlim[1])


def _axis(start, end, info, t0) -> tuple[tuple[float, float], list[str]]:
    """The x range: the requests, widened to token times within half their span; and what lies beyond."""
    lo, hi = 0.0, float(max(end.max(), 1e-3))
    span = hi
    clipped = []
    for fp, (iat, exp, _) in info.items():
        for name, t in (("iat", iat), ("exp", exp)):
            if t is None:
                continue
            if -0.5 * span <= t - t0 <= 1.5 * span:
                lo, hi = min(lo, t - t0), max(hi, t - t0)
            else:
                clipped.append(f"token {short_fp(fp)}'s {name} ({fmt_utc(t)}) is off the axis")
    span = max(hi - lo, 1e-3)
    return (lo - 0.02 * span, hi + 0.45 * span), clipped


def _token_info(tokens: pd.DataFrame, s: pd.DataFrame, issued: dict) -> dict[str, tuple]:
    """fingerprint -> (iat, exp, sub) of the tokens the requests carried, then those issued in them, by iat."""
    fps = list(dict.fromkeys(str(fp) for fp in [*s["token_fp"], *issued] if not is_missing(fp) and fp not in ("nan", "")))
    info = {}
    for fp in fps:
        row = tokens.loc[fp] if fp in tokens.index else None
        iat = None if row is None else as_float(row["iat"]) or as_float(row["first_seen_at"])
        exp = None if row is None else as_float(row["exp"])
        if exp is None:
            exp = as_float(s.loc[s["token_fp"] == fp, "token_exp"].dropna().min())
        if iat is None and fp in issued:
            iat = issued[fp][1]
        sub = None if row is None or is_missing(row["sub"]) else str(row["sub"])
        info[fp] = (iat, exp, sub)
    return dict(sorted(info.items(), key=lambda kv: np.inf if kv[1][0] is None else kv[1][0]))


def _token(fp: str, info: tuple, t0: float, xlim: tuple[float, float]) -> Token:
    iat, exp, sub = info
    left = xlim[0] if iat is None else _clamp(iat - t0, xlim)
    right = xlim[1] if exp is None else _clamp(exp - t0, xlim)
    note = []
    if iat is not None and iat - t0 < xlim[0]:
        note.append(f"◀ issued {fmt_s(t0 - iat)} before the first request")
    if exp is not None and exp - t0 > xlim[1]:
        note.append(f"expires {fmt_s(exp - t0)} after it ▶")
    if iat is not None and exp is not None:
        note.append(f"iat {fmt_utc(iat, False)} → exp {fmt_utc(exp, False)} (lifetime {fmt_s(exp - iat)})")
    elif exp is None:
        note.append("no exp (opaque or undecodable token)")
    on_axis = exp is not None and xlim[0] <= exp - t0 <= xlim[1]
    label = f"token {short_fp(fp)}" + (f" ({clean_text(sub, 20)})" if sub else "")
    return Token(fp, label, left, max(right, left), exp - t0 if on_axis else None, clean_text("   ".join(note), 160))


def _refreshes(info: dict, issued: dict, t0: float, xlim) -> list[tuple[float, str, str]]:
    """A token followed by another of the same subject was refreshed by it."""
    out = []
    for old, new in itertools.pairwise(info):
        if info[old][2] == info[new][2] and info[new][0] is not None:
            out.append((_clamp((issued[new][1] if new in issued else info[new][0]) - t0, xlim), old, new))
    return out


def _request_texts(s: pd.DataFrame, roots: pd.DataFrame, findings: pd.DataFrame, dur_s: np.ndarray):
    kinds = _error_kinds(findings, set(roots.index))
    texts, alarms = [], []
    for i, (trace, ended, expired, exp, started) in enumerate(
        zip(roots.index, hop_endings(roots), s["expired"].fillna(False), s["token_exp"], s["started_at"])
    ):
        flags = []
        if expired:
            ago = None if is_missing(exp) else float(started) - float(exp)
            flags.append(
                "used an expired token" if ago is None
                else f"sent with a token expired {fmt_s(ago)} earlier" if ago >= 0
                else f"its token expired {fmt_s(-ago)} into the request"
            )  # fmt: skip
        flags += [k.replace("_", " ") for k in kinds.get(trace, []) if not (expired and k == "expired_in_session")]
        texts.append(f"{clean_text(ended, 40)} · {fmt_ms(dur_s[i] * 1000)}" + ("  ⚠ " + "; ".join(flags) if flags else ""))
        alarms.append(bool(flags))
    return texts, alarms


def _error_kinds(findings: pd.DataFrame, traces: set[int]) -> dict[int, list[str]]:
    about = findings["trace"].isin(traces).fillna(False).to_numpy(dtype=bool)
    errors = findings[(findings["severity"] == "error").to_numpy(dtype=bool) & about]
    out: dict[int, list[str]] = {}
    for t, kind in zip(errors["trace"], errors["kind"]):
        if (kind := clean_text(kind, 30)) not in out.setdefault(int(t), []):
            out[int(t)].append(kind)
    return out


def _issued(analysis: Analysis, traces: list[int]) -> dict[str, tuple[int, float]]:
    """fingerprint -> (request, time) for tokens issued inside the given requests (earliest issue)."""
    hops, ht = analysis.hops, analysis.hop_tokens
    # The requests' hops first, then their token rows: one look at each million-row column, not a
    # comparison of every token row's role (a workflow chart in a report cost ~0.5 s at 1M hops).
    mine = ht[ht["hop_id"].isin(hops.index[hops["trace"].isin(traces).to_numpy()]).to_numpy()]
    issued = mine[(mine["role"] == "issued").to_numpy(dtype=bool)]
    where = hops.reindex(issued["hop_id"])
    ended, started = where["ended_at"].to_numpy(dtype=float), where["started_at"].to_numpy(dtype=float)
    when = np.where(np.isnan(ended) | (ended == 0), started, ended)  # as `ended or started`
    out: dict[str, tuple[int, float]] = {}
    for fp, t, w in zip(issued["fingerprint"].tolist(), where["trace"].tolist(), when.tolist()):
        if not np.isnan(w) and (fp not in out or w < out[fp][1]):
            out[str(fp)] = (int(t), w)
    return out


def _title(s: pd.DataFrame, lay: SessionLayout, last_end: float) -> str:
    subjects = sorted({str(x) for x in s["subject"].dropna()})
    who = ", ".join(clean_text(x, 30) for x in subjects[:3]) or "unknown subject"
    n, k = len(lay.traces), len(lay.tokens)
    failed = sum(1 for o in lay.outcomes if o not in ("2xx", "3xx"))
    return (
        f"Workflow of {who}: {n} request{'s' * (n != 1)} over {fmt_s(last_end)}, {k} token{'s' * (k != 1)}\n"
        f"{int(lay.expired.sum())} with a token expired before or during it · {failed} failed"
    )


# -- drawing --------------------------------------------------------------------------------


def draw_session(lay: SessionLayout):
    """The Figure of a :class:`SessionLayout`: token lanes on top, then one row per request."""
    k, n = len(lay.tokens), len(lay.traces)
    y_req = np.arange(n) + (k + 0.6 if k else 0)
    fig = new_figure(14.5, 1.9 + (k + n) * ROW_IN + (0.3 if k else 0))
    ax = fig.add_subplot()
    ax.set_xlim(*lay.xlim)
    labels = [t.label for t in lay.tokens] + lay.labels
    axes_in = max(fig.get_figwidth() - max(len(x) for x in labels) * 8.5 * 0.6 / 72.0 - 0.9, 1.0)
    bars = ax.barh(y_req, lay.widths, left=lay.starts, height=0.6, color=[OUTCOME_COLORS[o] for o in lay.outcomes],
                   edgecolor="#222222", linewidth=0.4, label=REQUEST_BARS, zorder=3)  # fmt: skip
    for i, bar in enumerate(bars.patches):
        bar.set_gid(f"request-{lay.traces[i]}")
        if lay.expired[i]:
            bar.set(hatch=EXPIRED_HATCH, edgecolor=EXPIRED_COLOR, linewidth=1.6)
        color = EXPIRED_COLOR if lay.alarms[i] else "#222222"
        bar_note(ax, y_req[i], lay.starts[i], lay.starts[i] + lay.widths[i], lay.texts[i], lay.xlim, axes_in, color=color)
    if k:
        _draw_tokens(ax, lay, y_req)
    ax.set_yticks([*range(k), *y_req], labels, fontsize=8.5)
    for tick, flag in zip(ax.get_yticklabels()[k:], lay.expired):
        if flag:
            tick.set(color=EXPIRED_COLOR, fontweight="bold")
    for tick in ax.get_yticklabels()[:k]:
        tick.set_color("#0b3d66")
    ax.set_ylim((y_req[-1] if n else k) + 0.6, -0.6)
    ax.set_xlabel(f"time since the first request (s, proxy clock; first request at {fmt_utc(lay.t0)})")
    ax.grid(axis="x", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    for spine in ("right", "top"):
        ax.spines[spine].set_visible(False)
    for text in ax.texts:  # all drawn inside the axes: the layout need not measure them
        text.set_in_layout(False)
    handles = _legend_handles(lay, ax)
    fig.legend(handles=handles, loc="outside upper left", ncols=min(len(handles), 4), fontsize=8, frameon=False)
    ax.set_title(lay.title, loc="left", fontsize=11)
    return fig


def _draw_tokens(ax, lay: SessionLayout, y_req) -> None:
    """Token bands, their exp lines, and the issue and refresh arrows."""
    span = lay.xlim[1] - lay.xlim[0]
    y_tok = {t.fp: i for i, t in enumerate(lay.tokens)}
    ax.barh(list(range(len(lay.tokens))), [t.right - t.left for t in lay.tokens], left=[t.left for t in lay.tokens],
            height=0.5, color=TOKEN_COLOR, alpha=0.22, edgecolor=TOKEN_COLOR, linewidth=1.0, label=TOKEN_BARS,
            zorder=2)  # fmt: skip
    for t in lay.tokens:
        ax.text(t.left + 0.005 * span, y_tok[t.fp], t.note, va="center", fontsize=7.5, color="#0b3d66", zorder=6,
                clip_on=True)  # fmt: skip
        if t.exp_x is not None:
            ax.axvline(t.exp_x, color=EXPIRED_COLOR, ls="--", lw=1.4, zorder=4, gid=EXP_GID, label=f"exp of {t.label}")
    ax.axhline(len(lay.tokens) - 0.2, color="#999999", lw=0.6, zorder=1)
    for x, fp, row in lay.issued:
        ax.annotate("", xy=(x, y_tok[fp] + 0.25), xytext=(x, y_req[row] - 0.3), gid=ISSUED_GID, zorder=5,
                    arrowprops={"arrowstyle": "-|>", "color": TOKEN_COLOR, "lw": 1.2, "ls": ":", "shrinkA": 0,
                                "shrinkB": 0})  # fmt: skip
    for x, old, new in lay.refreshes:
        ax.annotate("refresh", xy=(x, y_tok[new] - 0.25), xytext=(x, y_tok[old] + 0.25), gid=REFRESH_GID, fontsize=7,
                    color=TOKEN_COLOR, ha="right", va="center", zorder=5,
                    arrowprops={"arrowstyle": "-|>", "color": TOKEN_COLOR, "lw": 1.4, "shrinkA": 0, "shrinkB": 0})  # fmt: skip


def _legend_handles(lay: SessionLayout, ax) -> list:
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = outcome_legend_handles(lay.outcomes)
    if lay.expired.any():
        handles.append(Patch(facecolor="white", edgecolor=EXPIRED_COLOR, hatch=EXPIRED_HATCH,
                             label="token expired before or during it"))  # fmt: skip
    if lay.tokens:
        handles.append(Patch(facecolor=TOKEN_COLOR, alpha=0.3, edgecolor=TOKEN_COLOR, label="token lifetime (iat → exp)"))
        if any(t.exp_x is not None for t in lay.tokens):
            handles.append(Line2D([], [], color=EXPIRED_COLOR, ls="--", lw=1.4, label="token exp"))
        if lay.issued:
            handles.append(Line2D([], [], color=TOKEN_COLOR, ls=":", lw=1.2, marker=">", label="token issued by request"))
    return handles


# -- drawing straight to SVG (the report) ---------------------------------------------------


def session_svg(lay: SessionLayout) -> str:
    """``<svg>`` text of a :class:`SessionLayout`, as :func:`draw_session` draws it: token lanes on
    top, then one row per request; every text inside its place (cut with … where it must be)."""
    k, n = len(lay.tokens), len(lay.traces)
    labels = [s.fit(x, s.MAX_LABEL_PX, s.FONT, s.MONO_EM) for x in [t.label for t in lay.tokens] + lay.labels]
    x0 = max(len(x) for x in labels) * s.FONT * s.MONO_EM + 2 * s.PAD
    x1 = s.WIDTH - s.PAD
    lo, hi = lay.xlim
    sx = lambda v: x0 + (float(v) - lo) / max(hi - lo, 1e-12) * (x1 - x0)  # noqa: E731
    title = lay.title.split("\n")
    items = _svg_legend(lay)
    top = 8 + 18 * len(title) + 14 + s.LEGEND_LINE * (s.legend_lines(items, s.PAD) - 1) + 18
    y_req = top + (k * s.ROW + 8 if k else 0)
    bottom = y_req + n * s.ROW
    height = bottom + 44
    out = [f'<svg width="{s.WIDTH}" height="{height}" viewBox="0 0 {s.WIDTH} {height}" '
           'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
           f'<defs><pattern id="hoptrace-expired" width="6" height="6" patternUnits="userSpaceOnUse" '
           f'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="{EXPIRED_COLOR}" stroke-width="1.2"/>'
           f'</pattern><marker id="hoptrace-arrow-token" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" '
           f'markerHeight="8" markerUnits="userSpaceOnUse" orient="auto"><path d="M0 0 L10 5 L0 10 Z" fill="{TOKEN_COLOR}"/>'
           "</marker></defs>"]  # fmt: skip
    out += [f'<text x="{s.PAD}" y="{22 + 18 * i}" font-size="{14 if i == 0 else 12}" font-weight="{600 if i == 0 else 400}">'
            f"{s.esc(line)}</text>" for i, line in enumerate(title)]  # fmt: skip
    out.append(s.legend(items, s.PAD, 8 + 18 * len(title) + 14))
    ticks = [(v, f"{v:g}") for v in s.nice_ticks(lo, hi)]
    out += s.axis(ticks, sx, top, bottom, x0, x1, f"time since the first request (s, proxy clock; first request at "
                  f"{fmt_utc(lay.t0)})")  # fmt: skip
    for i, label in enumerate(labels):
        y = (top + i * s.ROW) if i < k else (y_req + (i - k) * s.ROW)
        full = ([t.label for t in lay.tokens] + lay.labels)[i]
        style = ' fill="#0b3d66"' if i < k else (f' fill="{EXPIRED_COLOR}" font-weight="bold"' if lay.expired[i - k] else "")
        out.append(f'<text x="{s.PAD}" y="{y + s.ROW / 2 + 4:.1f}" font-family="DejaVu Sans Mono, monospace" '
                   f'xml:space="preserve"{style}><title>{s.esc(full)}</title>{s.esc(label)}</text>')  # fmt: skip
    out += _svg_tokens(lay, sx, top, y_req, bottom, x0, x1)
    out += _svg_requests(lay, sx, y_req, x0, x1)
    out.append("</svg>")
    return "".join(out)


def _svg_legend(lay: SessionLayout) -> list[tuple[str, str]]:
    present = set(lay.outcomes)
    items = [(s.swatch(OUTCOME_COLORS[o]), OUTCOME_LABELS[o]) for o in OUTCOME_COLORS if o in present]
    if lay.expired.any():
        items.append((f'<rect width="12" height="10" y="-9" fill="url(#hoptrace-expired)" stroke="{EXPIRED_COLOR}" '
                      'stroke-width="1.6"/>', "token expired before or during it"))  # fmt: skip
    if lay.tokens:
        items.append((f'<rect width="12" height="10" y="-9" fill="{TOKEN_COLOR}" fill-opacity="0.3" stroke="{TOKEN_COLOR}"/>',
                      "token lifetime (iat → exp)"))  # fmt: skip
        if any(t.exp_x is not None for t in lay.tokens):
            items.append((f'<line x1="0" x2="12" y1="-4" y2="-4" stroke="{EXPIRED_COLOR}" stroke-dasharray="4 2" '
                          'stroke-width="2"/>', "token exp"))  # fmt: skip
        if lay.issued:
            items.append((f'<line x1="0" x2="12" y1="-4" y2="-4" stroke="{TOKEN_COLOR}" stroke-dasharray="2 2" '
                          'stroke-width="1.5"/>', "token issued by request"))  # fmt: skip
    return items


def _svg_tokens(lay: SessionLayout, sx, top: float, y_req: float, bottom: float, x0: float, x1: float) -> list[str]:
    """Token bands with their notes, exp lines across every row, issue and refresh arrows."""
    out, lane = [], {t.fp: top + i * s.ROW + s.ROW / 2 for i, t in enumerate(lay.tokens)}
    for t in lay.tokens:
        left, right, mid = sx(t.left), sx(t.right), lane[t.fp]
        out.append(f'<rect x="{left:.1f}" y="{mid - 7:.1f}" width="{max(right - left, 1.0):.1f}" height="14" '
                   f'fill="{TOKEN_COLOR}" fill-opacity="0.22" stroke="{TOKEN_COLOR}"/>')  # fmt: skip
        note = s.fit(t.note, x1 - x0 - 2 * s.PAD, 11)
        width = len(note) * 11 * s.SANS_EM
        x = min(left + s.PAD, x1 - s.PAD - width)  # from the band's start, moved left to stay inside the plot
        out.append(f'<text x="{max(x, x0 + 2):.1f}" y="{mid + 4:.1f}" font-size="11" fill="#0b3d66">{s.esc(note)}</text>')
        if t.exp_x is not None:
            x = sx(t.exp_x)
            out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom}" stroke="{EXPIRED_COLOR}" '
                       'stroke-width="1.4" stroke-dasharray="6 3"/>')  # fmt: skip
    if lay.tokens:
        out.append(f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{y_req - 4:.1f}" y2="{y_req - 4:.1f}" stroke="#999"/>')
    for x, fp, row in lay.issued:
        y = y_req + row * s.ROW + 4
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{y:.1f}" y2="{lane[fp] + 7:.1f}" stroke="{TOKEN_COLOR}" '
                   'stroke-width="1.2" stroke-dasharray="2 2" marker-end="url(#hoptrace-arrow-token)"/>')  # fmt: skip
    for x, old, new in lay.refreshes:
        out.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{lane[old] + 7:.1f}" y2="{lane[new] - 7:.1f}" '
                   f'stroke="{TOKEN_COLOR}" stroke-width="1.4" marker-end="url(#hoptrace-arrow-token)"/>'
                   f'<text x="{max(sx(x) - 3, x0 + 40):.1f}" y="{(lane[old] + lane[new]) / 2 + 3:.1f}" font-size="10" '
                   f'text-anchor="end" fill="{TOKEN_COLOR}">refresh</text>')  # fmt: skip
    return out


def _svg_requests(lay: SessionLayout, sx, y_req: float, x0: float, x1: float) -> list[str]:
    out = []
    for i, trace in enumerate(lay.traces):
        y = y_req + i * s.ROW
        left, right = sx(lay.starts[i]), sx(lay.starts[i] + lay.widths[i])
        stroke = f'stroke="{EXPIRED_COLOR}" stroke-width="1.6"' if lay.expired[i] else 'stroke="#222" stroke-width="0.5"'
        out.append(f'<rect id="request-{trace}" x="{left:.1f}" y="{y + 4}" width="{max(right - left, 1.0):.1f}" '
                   f'height="{s.ROW - 8}" fill="{OUTCOME_COLORS[lay.outcomes[i]]}" {stroke}/>')  # fmt: skip
        if lay.expired[i]:
            out.append(f'<rect x="{left:.1f}" y="{y + 4}" width="{max(right - left, 1.0):.1f}" height="{s.ROW - 8}" '
                       'fill="url(#hoptrace-expired)"/>')  # fmt: skip
        color = EXPIRED_COLOR if lay.alarms[i] else "#222"
        out.append(s.bar_text(lay.texts[i], left, right, y + s.ROW / 2, x0, x1, color))
    return out
