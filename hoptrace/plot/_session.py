"""The workflow view: a subject's requests over wall time against its tokens' lifetimes."""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace.plot._common import (
    EXPIRED_COLOR,
    OUTCOME_COLORS,
    TOKEN_COLOR,
    as_float,
    as_int,
    bar_note,
    clean_text,
    col,
    finite_floats,
    fmt_ms,
    fmt_s,
    fmt_utc,
    frame,
    is_missing,
    new_figure,
    outcome_legend_handles,
    outcome_of,
    short_fp,
)

ROW_IN = 0.3
REQUEST_BARS = "requests"  # label of the BarContainer with one Rectangle per request
TOKEN_BARS = "tokens"  # label of the BarContainer with one band per token
EXP_GID = "token-exp"
REFRESH_GID = "refresh"
ISSUED_GID = "issued"
EXPIRED_HATCH = "xxx"


def select_session(analysis: Any, key: Any) -> pd.DataFrame:
    """The ``Analysis.sessions`` rows that ``key`` names.

    ``key`` is a subject (``sub`` claim: all its requests), a token fingerprint or a
    unique prefix of one (at least 6 characters: the workflows that used or were issued
    that token), or a session number.
    """
    sessions = frame(analysis, "sessions")
    if len(sessions) == 0:
        raise AnalysisError("no requests in this trace database: no workflow to plot")
    text = str(key).strip()
    subjects = col(sessions, "subject").astype("string")
    rows = sessions[(subjects == text).fillna(False).to_numpy(dtype=bool)]
    if len(rows):
        return rows
    fp = _match_token(analysis, text)
    if fp is not None:
        traces = {int(t) for t in sessions.loc[col(sessions, "token_fp") == fp, "trace"]}
        hop_tokens, hops = frame(analysis, "hop_tokens"), frame(analysis, "hops")
        if len(hop_tokens) and len(hops) and "trace" in hops.columns:
            hop_ids = [i for i in hop_tokens.loc[col(hop_tokens, "fingerprint") == fp, "hop_id"] if i in hops.index]
            traces |= {int(t) for t in hops.loc[hop_ids, "trace"]}
        mine = sessions[sessions["trace"].isin(traces)]
        if "session" in sessions.columns and len(mine):
            mine = sessions[sessions["session"].isin(set(mine["session"].dropna()))]
        if len(mine):
            return mine
        raise AnalysisError(f"token {text!r} was seen, but no request carried it")
    if re.fullmatch(r"\d+", text) and "session" in sessions.columns:
        rows = sessions[pd.to_numeric(sessions["session"], errors="coerce") == int(text)]
        if len(rows):
            return rows
    known = sorted({str(s) for s in subjects.dropna()})
    listed = ", ".join(repr(s) for s in known[:10]) + (" …" if len(known) > 10 else "")
    raise AnalysisError(
        f"no subject, token or session {text!r} in this trace database"
        + (f"; subjects: {listed}" if known else "; no token carried a subject")
    )


def _match_token(analysis: Any, text: str) -> str | None:
    tokens = frame(analysis, "tokens")
    fps = [str(f) for f in tokens.index] if len(tokens) else []
    if text in fps:
        return text
    if len(text) < 6:
        return None
    hits = [f for f in fps if f.startswith(text)]
    if len(hits) > 1:
        raise AnalysisError(f"token prefix {text!r} is ambiguous: {', '.join(h[:12] for h in hits[:5])}")
    return hits[0] if hits else None


def session_view(analysis: Any, key: Any, *, title: str | None = None):
    """The workflow Figure for a subject, token or session (see :func:`select_session`)."""
    rows = select_session(analysis, key)
    return session_figure(
        rows,
        frame(analysis, "tokens"),
        frame(analysis, "hop_tokens"),
        frame(analysis, "hops"),
        frame(analysis, "findings"),
        title=title,
    )


def session_figure(
    sessions: pd.DataFrame,
    tokens: pd.DataFrame | None = None,
    hop_tokens: pd.DataFrame | None = None,
    hops: pd.DataFrame | None = None,
    findings: pd.DataFrame | None = None,
    *,
    title: str | None = None,
):
    """Draw requests (rows of ``Analysis.sessions``) over wall time with their tokens.

    One row per request (bar from start to end, coloured by outcome; requests sent with an
    expired token hatched and outlined red); above them one band per token from ``iat`` to
    ``exp`` with its ``exp`` as a dashed line across all rows; arrows from the request that
    issued a token to its band, and from each token to the one that refreshed it.
    ``tokens``/``hop_tokens``/``hops``/``findings`` are optional ``Analysis`` frames.
    """
    if sessions is None or len(sessions) == 0:
        raise AnalysisError("no requests to draw")
    s = sessions.sort_values(["started_at", "trace"], kind="stable").reset_index(drop=True)
    tokens = tokens if tokens is not None else pd.DataFrame()
    hop_tokens = hop_tokens if hop_tokens is not None else pd.DataFrame()
    hops = hops if hops is not None else pd.DataFrame()
    n = len(s)
    t0 = float(pd.to_numeric(s["started_at"]).min())
    start = (pd.to_numeric(s["started_at"]).astype(float) - t0).to_numpy()
    end = (pd.to_numeric(col(s, "ended_at"), errors="coerce").astype(float) - t0).to_numpy()
    end = np.where(np.isfinite(end), end, start)
    end = np.maximum(end, start)
    hi = float(max(end.max(), 1e-3))
    span = hi

    # Tokens in view: those the requests carried, then those issued inside them.
    traces = [int(t) for t in s["trace"]]
    issued = _issued(traces, hop_tokens, hops)  # fp -> (trace, time)
    fps: list[str] = []
    for fp in list(col(s, "token_fp")) + list(issued):
        if not is_missing(fp) and str(fp) not in fps:
            fps.append(str(fp))
    info = {}
    for fp in fps:
        iat = exp = sub = None
        if len(tokens) and fp in tokens.index:
            iat, exp = (
                as_float(tokens.at[fp, "iat"]) if "iat" in tokens else None,
                as_float(tokens.at[fp, "exp"]) if "exp" in tokens else None,
            )
            sub = tokens.at[fp, "sub"] if "sub" in tokens else None
            if iat is None and "first_seen_at" in tokens:
                iat = as_float(tokens.at[fp, "first_seen_at"])
        if exp is None:
            same = s.loc[col(s, "token_fp") == fp, "token_exp"] if "token_exp" in s else pd.Series(dtype=float)
            exp = as_float(same.dropna().iloc[0]) if len(same.dropna()) else None
        if iat is None and fp in issued:
            iat = issued[fp][1]
        info[fp] = (iat, exp, None if is_missing(sub) else str(sub))
    fps.sort(key=lambda f: info[f][0] if info[f][0] is not None else np.inf)
    k = len(fps)

    lo = 0.0
    for iat, exp, _ in info.values():
        for t in (iat, exp):
            if t is not None and -0.5 * span <= t - t0 <= 1.5 * span:
                lo, hi = min(lo, t - t0), max(hi, t - t0)
    span = max(hi - lo, 1e-3)
    xlim = (lo - 0.02 * span, hi + 0.45 * span)

    # Rows: token lanes on top, then requests.
    y_tok = {fp: i for i, fp in enumerate(fps)}
    y_req = np.arange(n) + (k + 0.6 if k else 0)
    height = 1.9 + (k + n) * ROW_IN + (0.3 if k else 0)
    fig = new_figure(14.5, height)
    ax = fig.add_subplot()
    ax.set_xlim(*xlim)

    labels = [f"token {short_fp(fp)}" + (f" ({clean_text(info[fp][2], 20)})" if info[fp][2] else "") for fp in fps]
    labels += [
        f"{fmt_utc(float(s.at[i, 'started_at']), False)}  {clean_text(s.at[i, 'endpoint'], 48) if 'endpoint' in s else ''}"
        f"  [{traces[i]}]"
        for i in range(n)
    ]
    label_in = max(len(x) for x in labels) * 8.5 * 0.6 / 72.0
    axes_in = max(fig.get_figwidth() - label_in - 0.9, 1.0)
    failed = _failed_by_trace(hops, traces)
    outcomes = [outcome_of(st, failed.get(t, 0)) for st, t in zip(col(s, "status"), traces)]
    widths = np.maximum(end - start, 0.006 * span)
    bars = ax.barh(
        y_req,
        widths,
        left=start,
        height=0.6,
        color=[OUTCOME_COLORS[o] for o in outcomes],
        edgecolor="#222222",
        linewidth=0.4,
        label=REQUEST_BARS,
        zorder=3,
    )
    expired = col(s, "expired", False).map(lambda v: False if is_missing(v) else bool(v)).to_numpy()
    kinds = _error_kinds(findings, traces)
    for i, bar in enumerate(bars.patches):
        bar.set_gid(f"request-{traces[i]}")
        text = f"{_status(s.at[i, 'status'], failed.get(traces[i], 0))} · {fmt_ms((end[i] - start[i]) * 1000)}"
        flags = []
        if expired[i]:
            bar.set_hatch(EXPIRED_HATCH)
            bar.set_edgecolor(EXPIRED_COLOR)
            bar.set_linewidth(1.6)
            exp = as_float(s.at[i, "token_exp"]) if "token_exp" in s else None
            ago = None if exp is None else float(s.at[i, "started_at"]) - exp
            if ago is None:
                flags.append("used an expired token")
            elif ago >= 0:
                flags.append(f"sent with a token expired {fmt_s(ago)} earlier")
            else:
                flags.append(f"its token expired {fmt_s(-ago)} into the request")
        flags += [kd.replace("_", " ") for kd in kinds.get(traces[i], []) if not (expired[i] and kd == "expired_in_session")]
        if flags:
            text += "  ⚠ " + "; ".join(flags)
        bar_note(ax, y_req[i], start[i], start[i] + widths[i], text, xlim, axes_in, color=EXPIRED_COLOR if flags else "#222222")

    # Token bands, expiry lines, issue and refresh links.
    if k:
        left, right, notes = [], [], []
        for fp in fps:
            iat, exp, _ = info[fp]
            a = xlim[0] if iat is None else min(max(iat - t0, xlim[0]), xlim[1])  # a label beyond the axes overflows the rasteriser
            b = xlim[1] if exp is None else min(exp - t0, xlim[1])
            left.append(a)
            right.append(max(b, a))
            note = []
            if iat is not None and iat - t0 < xlim[0]:
                note.append(f"◀ issued {fmt_s(t0 - iat)} before the first request")
            if exp is not None and exp - t0 > xlim[1]:
                note.append(f"expires {fmt_s(exp - t0)} after it ▶")
            if iat is not None and exp is not None:
                note.append(f"iat {fmt_utc(iat, False)} → exp {fmt_utc(exp, False)} (lifetime {fmt_s(exp - iat)})")
            elif exp is None:
                note.append("no exp (opaque or undecodable token)")
            notes.append("   ".join(note))
        ax.barh(
            [y_tok[f] for f in fps],
            np.array(right) - np.array(left),
            left=left,
            height=0.5,
            color=TOKEN_COLOR,
            alpha=0.22,
            edgecolor=TOKEN_COLOR,
            linewidth=1.0,
            label=TOKEN_BARS,
            zorder=2,
        )
        for fp, a, note in zip(fps, left, notes):
            ax.text(
                a + 0.005 * span,
                y_tok[fp],
                clean_text(note, 160),
                va="center",
                fontsize=7.5,
                color="#0b3d66",
                zorder=6,
                clip_on=True,
            )
        for fp in fps:
            exp = info[fp][1]
            if exp is not None and xlim[0] <= exp - t0 <= xlim[1]:
                ax.axvline(
                    exp - t0, color=EXPIRED_COLOR, ls="--", lw=1.4, zorder=4, gid=EXP_GID, label=f"exp of token {short_fp(fp)}"
                )
        ax.axhline(k - 0.2, color="#999999", lw=0.6, zorder=1)
        by_trace = {t: i for i, t in enumerate(traces)}
        for fp, (trace, when) in issued.items():
            i = by_trace.get(trace)
            if i is None or fp not in y_tok:
                continue
            x = min(max(when - t0, xlim[0]), xlim[1])
            ax.annotate(
                "",
                xy=(x, y_tok[fp] + 0.25),
                xytext=(x, y_req[i] - 0.3),
                gid=ISSUED_GID,
                zorder=5,
                arrowprops={"arrowstyle": "-|>", "color": TOKEN_COLOR, "lw": 1.2, "ls": ":", "shrinkA": 0, "shrinkB": 0},
            )
        for old, new in itertools.pairwise(fps):
            if info[old][2] != info[new][2] or info[new][0] is None:
                continue
            x = min(max((issued[new][1] if new in issued else info[new][0]) - t0, xlim[0]), xlim[1])
            ax.annotate(
                "refresh",
                xy=(x, y_tok[new] - 0.25),
                xytext=(x, y_tok[old] + 0.25),
                gid=REFRESH_GID,
                fontsize=7,
                color=TOKEN_COLOR,
                ha="right",
                va="center",
                zorder=5,
                arrowprops={"arrowstyle": "-|>", "color": TOKEN_COLOR, "lw": 1.4, "shrinkA": 0, "shrinkB": 0},
            )

    ax.set_yticks([*range(k), *y_req], labels, fontsize=8.5)
    for tick, flag in zip(ax.get_yticklabels()[k:], expired):
        if flag:
            tick.set_color(EXPIRED_COLOR)
            tick.set_fontweight("bold")
    for tick in ax.get_yticklabels()[:k]:
        tick.set_color("#0b3d66")
    ax.set_ylim((y_req[-1] if n else k) + 0.6, -0.6)
    ax.set_xlabel(f"time since the first request (s, proxy clock; first request at {fmt_utc(t0)})")
    ax.grid(axis="x", color="#dddddd", lw=0.6)
    ax.set_axisbelow(True)
    for spine in ("right", "top"):
        ax.spines[spine].set_visible(False)

    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = outcome_legend_handles(outcomes)
    if expired.any():
        handles.append(
            Patch(facecolor="white", edgecolor=EXPIRED_COLOR, hatch=EXPIRED_HATCH, label="token expired before or during it")
        )
    if k:
        handles.append(Patch(facecolor=TOKEN_COLOR, alpha=0.3, edgecolor=TOKEN_COLOR, label="token lifetime (iat → exp)"))
        if any(line.get_gid() == EXP_GID for line in ax.get_lines()):
            handles.append(Line2D([], [], color=EXPIRED_COLOR, ls="--", lw=1.4, label="token exp"))
        if issued:
            handles.append(Line2D([], [], color=TOKEN_COLOR, ls=":", lw=1.2, marker=">", label="token issued by request"))
    for text in ax.texts:  # all drawn inside the axes: the layout need not measure them
        text.set_in_layout(False)
    fig.legend(handles=handles, loc="outside upper left", ncols=min(len(handles), 4), fontsize=8, frameon=False)

    if title is None:
        subjects = sorted({str(x) for x in col(s, "subject").dropna()})
        who = ", ".join(clean_text(x, 30) for x in subjects[:3]) or "unknown subject"
        title = (
            f"Workflow of {who}: {n} request{'s' * (n != 1)} over {fmt_s(hi if lo == 0 else float(end.max()))}, "
            f"{k} token{'s' * (k != 1)}\n{int(expired.sum())} with a token expired before or during it · "
            f"{sum(1 for o in outcomes if o != '2xx' and o != '3xx')} failed"
        )
    ax.set_title(title, loc="left", fontsize=11)
    return fig


def _issued(traces: list[int], hop_tokens: pd.DataFrame, hops: pd.DataFrame) -> dict[str, tuple[int, float]]:
    """fingerprint -> (request, time) for tokens issued inside the given requests (earliest issue)."""
    out: dict[str, tuple[int, float]] = {}
    if not len(hop_tokens) or not len(hops) or "trace" not in hops.columns:
        return out
    issued = hop_tokens[(col(hop_tokens, "role") == "issued").to_numpy(dtype=bool)]
    issued = issued[issued["hop_id"].isin(hops.index).to_numpy(dtype=bool)]
    # Only the issuing hops are looked up, all at once: hops may be every hop of the trace DB.
    where = hops.reindex(issued["hop_id"])
    trace = where["trace"].isin(traces).to_numpy(dtype=bool)
    ended, started = finite_floats(col(where, "ended_at")), finite_floats(col(where, "started_at"))
    when = np.where(np.isnan(ended) | (ended == 0), started, ended)  # as `ended or started`
    for fp, t, w in zip(issued["fingerprint"][trace].tolist(), where["trace"][trace].tolist(), when[trace].tolist()):
        if not np.isnan(w) and (fp not in out or w < out[fp][1]):
            out[str(fp)] = (int(t), w)
    return out


def _failed_by_trace(hops: pd.DataFrame, traces: list[int]) -> dict[int, int]:
    if not len(hops) or "failed" not in hops.columns:
        return {}
    roots = hops["failed"].reindex([t for t in traces if t in hops.index])
    return {int(t): as_int(f) or 0 for t, f in roots.items()}


def _status(status: Any, failed: int) -> str:
    code = as_int(status)
    if code is None:
        return "no response"
    return f"{code} + error" if failed else str(code)


def _error_kinds(findings: pd.DataFrame | None, traces: list[int]) -> dict[int, list[str]]:
    out: dict[int, list[str]] = {}
    if findings is None or not len(findings):
        return out
    errors = (col(findings, "severity") == "error").to_numpy(dtype=bool)
    mine = errors & np.isin(np.trunc(finite_floats(col(findings, "trace"))), traces)
    for t, kind in zip(col(findings, "trace")[mine].tolist(), col(findings, "kind")[mine].tolist()):
        kind = clean_text(kind, 30)
        if kind not in out.setdefault(int(t), []):
            out[int(t)].append(kind)
    return out
