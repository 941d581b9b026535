"""What every chart shares: the outcome palette, text hygiene, figure creation, saving.

Nothing here imports matplotlib at module level except through :func:`new_figure`
and :func:`save_figure`, so the CLI can import this cheaply.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from hoptrace._errors import AnalysisError, HoptraceError

# One palette for outcomes, used by every chart (Okabe-Ito, colour-blind safe).
OUTCOMES = ("2xx", "3xx", "4xx", "5xx", "error")
OUTCOME_COLORS = {
    "2xx": "#009E73",  # bluish green
    "3xx": "#56B4E9",  # sky blue
    "4xx": "#E69F00",  # orange
    "5xx": "#D55E00",  # vermillion
    "error": "#6A3D9A",  # purple: no response, or the transfer broke
}
OUTCOME_LABELS = {
    "2xx": "2xx success",
    "3xx": "3xx redirect",
    "4xx": "4xx client error",
    "5xx": "5xx server error",
    "error": "error (no/broken response)",
}
EXPIRED_COLOR = "#C00000"  # the token-expiry line, and what was sent after it
TOKEN_COLOR = "#0072B2"  # token lifetimes
NEUTRAL = "#555555"

FORMATS = {".png": "png", ".svg": "svg"}
DEFAULT_DPI = 100
MAX_FIGURE_HEIGHT_IN = 300.0  # 30,000 px at 100 dpi; Agg's hard limit is 2**16 px


class PlotError(HoptraceError):
    """A chart cannot be written (bad output name, unwritable path)."""


def outcome_of(status: Any, failed: Any = 0) -> str:
    """Classify one hop: ``2xx`` ``3xx`` ``4xx`` ``5xx`` or ``error``.

    A hop is ``error`` when it failed (even with a status: a 200 whose body broke off)
    or has no status at all; a 1xx counts with the 2xx.
    """
    if _truthy(failed):
        return "error"
    code = as_float(status)
    if code is None:
        return "error"
    if code >= 500:
        return "5xx"
    if code >= 400:
        return "4xx"
    if code >= 300:
        return "3xx"
    return "2xx"


def hop_outcomes(hops):
    """:func:`outcome_of` of every hop of ``hops`` at once: a Series of outcomes on ``hops.index``."""
    import numpy as np
    import pandas as pd

    status = finite_floats(col(hops, "status"))
    failed = truthy_flags(col(hops, "failed", 0))
    outcome = np.select(
        [failed | np.isnan(status), status >= 500, status >= 400, status >= 300], ["error", "5xx", "4xx", "3xx"], "2xx"
    )
    return pd.Series(outcome, index=hops.index, dtype=object)


def finite_floats(values):
    """:func:`as_float` of each value as a float array, NaN for None."""
    import numpy as np
    import pandas as pd

    if pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
        out = pd.Series(values).to_numpy(dtype=float, na_value=np.nan)
    else:  # text, objects, bools: one by one, exactly as as_float
        out = np.array([np.nan if (f := as_float(v)) is None else f for v in values], dtype=float)
    return np.where(np.isfinite(out), out, np.nan)


def truthy_flags(values):
    """``_truthy`` of each value as a bool array."""
    import numpy as np
    import pandas as pd

    if pd.api.types.is_numeric_dtype(values):
        return pd.Series(values).to_numpy(dtype=float, na_value=0.0) != 0
    return np.array([_truthy(v) for v in values], dtype=bool)


def _truthy(value: Any) -> bool:
    if is_missing(value):
        return False
    try:
        return bool(value)
    except (TypeError, ValueError):
        return False


def as_float(value: Any) -> float | None:
    """A finite float, or None for None / NaN / NA / garbage."""
    if value is None or isinstance(value, bool):
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def as_int(value: Any) -> int | None:
    f = as_float(value)
    return int(f) if f is not None else None


def is_missing(value: Any) -> bool:
    """None, NaN, NaT or pd.NA (a list or other container is not missing)."""
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    import pandas as pd

    try:
        return bool(pd.api.types.is_scalar(value) and pd.isna(value))
    except (TypeError, ValueError):
        return False


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def clean_text(value: Any, max_len: int = 80) -> str:
    """Text from the DB made safe for a matplotlib label.

    Control characters become spaces, long strings are cut with an ellipsis, and
    ``$`` is escaped so a path can never switch matplotlib into mathtext.
    """
    if is_missing(value):
        return ""
    s = _CONTROL.sub(" ", str(value))
    if len(s) > max_len:
        s = s[: max(max_len - 1, 1)] + "…"
    return s.replace("$", r"\$")


def short_fp(fp: Any, n: int = 8) -> str:
    return "" if is_missing(fp) else str(fp)[:n]


def fmt_ms(ms: Any) -> str:
    f = as_float(ms)
    if f is None:
        return "?"
    if f >= 10_000:
        return f"{f / 1000:.1f} s"
    if f >= 100:
        return f"{f:.0f} ms"
    return f"{f:.1f} ms"


def fmt_s(seconds: float) -> str:
    a = abs(seconds)
    if a >= 7200:
        return f"{seconds / 3600:.1f} h"
    if a >= 120:
        return f"{seconds / 60:.1f} min"
    if a >= 10:
        return f"{seconds:.0f} s"
    return f"{seconds:.2f} s"


def fmt_utc(ts: Any, with_date: bool = True) -> str:
    f = as_float(ts)
    if f is None:
        return "?"
    try:
        dt = datetime.fromtimestamp(f, tz=UTC)
    except (OverflowError, OSError, ValueError):
        return "?"
    ms = f"{dt.microsecond // 1000:03d}"
    return dt.strftime("%Y-%m-%d %H:%M:%S.") + ms + " UTC" if with_date else dt.strftime("%H:%M:%S")


def col(df, name: str, default: Any = None):
    """``df[name]``, or a Series of ``default`` when the column is absent."""
    import pandas as pd

    if name in df.columns:
        return df[name]
    return pd.Series([default] * len(df), index=df.index, dtype="object")


def durations_ms(hops):
    """Each hop's duration in ms: ``duration_ms``, or ``(ended_at - started_at) * 1000`` where that is missing."""
    import pandas as pd

    dur = pd.to_numeric(col(hops, "duration_ms"), errors="coerce").astype(float)
    spans = (
        pd.to_numeric(col(hops, "ended_at"), errors="coerce").astype(float)
        - pd.to_numeric(col(hops, "started_at"), errors="coerce").astype(float)
    ) * 1000.0
    return dur.where(dur.notna(), spans)


def frame(analysis: Any, name: str):
    """``analysis.<name>`` as a DataFrame (empty if missing)."""
    import pandas as pd

    df = getattr(analysis, name, None)
    return df if isinstance(df, pd.DataFrame) else pd.DataFrame()


def hop_ids_of(value: Any) -> list[int]:
    """A finding's ``hop_ids`` as a list of ints, whatever shape it arrived in."""
    if value is None:
        return []
    if isinstance(value, str):
        return [int(x) for x in re.findall(r"\d+", value)]
    try:
        items = list(value)
    except TypeError:
        i = as_int(value)
        return [] if i is None else [i]
    out = []
    for x in items:
        i = as_int(x)
        if i is not None:
            out.append(i)
    return out


def finding_hop_ids(findings):
    """Every (row position, hop id) pair of ``findings.hop_ids``: :func:`hop_ids_of` of all rows at once.

    Returns two int arrays of equal length.
    """
    import numpy as np
    import pandas as pd

    whole = col(findings, "hop_ids")
    ids = whole.reset_index(drop=True).explode()
    numbers = pd.to_numeric(ids, errors="coerce").astype(float).to_numpy()
    number = np.isfinite(numbers)
    # Rows holding anything but numbers (text like "3, 7", junk) go through hop_ids_of.
    odd = np.unique(ids.index[~number & ids.notna().to_numpy()])
    plain = number & ~np.isin(ids.index, odd)
    rows = [ids.index.to_numpy()[plain]]
    hop_ids = [numbers[plain]]
    for pos in odd:
        found = hop_ids_of(whole.iloc[pos])
        rows.append(np.full(len(found), pos))
        hop_ids.append(np.array(found, dtype=float))
    return np.concatenate(rows).astype(np.int64), np.concatenate(hop_ids).astype(np.int64)


def findings_for(findings, hop_ids: set[int], trace: int | set[int] | None = None):
    """The findings about one trace (or any of a set of traces), or touching any of ``hop_ids``."""
    import numpy as np

    if findings is None or len(findings) == 0:
        return findings.iloc[0:0] if findings is not None else None
    traces = list(trace) if isinstance(trace, set | frozenset | list | tuple) else [] if trace is None else [trace]
    mask = np.isin(np.trunc(finite_floats(col(findings, "trace"))), traces)
    rows, hops = finding_hop_ids(findings)
    mask[rows[np.isin(hops, list(hop_ids))]] = True
    return findings[mask]


def hops_by_trace(hops, traces) -> dict:
    """trace -> its rows of ``hops``, for each of ``traces`` (one pass over ``hops``, however many traces)."""
    if "trace" not in hops.columns:
        return {}
    wanted = hops["trace"].isin(list(traces)).to_numpy(dtype=bool)
    return {int(t): rows for t, rows in hops[wanted].groupby("trace", sort=False)}


SEVERITY_RANK = {"error": 0, "warning": 1, "info": 2}


def require_hops(analysis: Any):
    hops = frame(analysis, "hops")
    if len(hops) == 0:
        raise AnalysisError("no hops recorded in this trace database: nothing to plot")
    return hops


def resolve_trace(analysis: Any, key: Any) -> int:
    """The request (root hop id) that ``key`` names.

    ``key`` may be the request's id (its root hop id, as `hoptrace analyze` prints
    it), a propagated trace id (traceparent / b3), a request or correlation id, or the
    id of any hop inside the request.
    """
    hops = require_hops(analysis)
    traces = col(hops, "trace")
    text = str(key).strip()
    if re.fullmatch(r"\d+", text) and bool((traces == int(text)).any()):
        return int(text)
    for column in ("trace_id", "request_id", "correlation_id"):
        if text and column in hops.columns:
            ids = hops[column].astype("string").str.lower()
            hit = hops[(ids == text.lower()).fillna(False).to_numpy(dtype=bool)]
            if len(hit):
                return int(hit.sort_values("started_at")["trace"].iloc[0])
    if re.fullmatch(r"\d+", text) and int(text) in hops.index:
        return int(hops.loc[int(text), "trace"])
    known = sorted(int(t) for t in traces.dropna().unique())
    some = ", ".join(str(t) for t in known[:8])
    more = " …" if len(known) > 8 else ""
    raise AnalysisError(
        f"no request with id {text!r} in this trace database "
        f"({len(known)} requests; ids: {some}{more}). Use a request id from `hoptrace analyze`, "
        f"a trace id from a traceparent/b3/x-request-id header, or a hop id"
    )


def pick_worst_trace(analysis: Any) -> tuple[int, str]:
    """The request to show when none was named, and why it was chosen.

    The first error finding's request; else the first warning's; else the slowest request.
    """
    import pandas as pd

    hops = require_hops(analysis)
    findings = frame(analysis, "findings")
    known = pd.Index(col(hops, "trace").dropna().unique())
    if len(findings):
        for severity in ("error", "warning"):
            sel = findings[col(findings, "severity") == severity]
            for _, f in sel.iterrows():
                t = as_int(f.get("trace"))
                if t is None:
                    ids = [i for i in hop_ids_of(f.get("hop_ids")) if i in hops.index]
                    t = int(hops.loc[ids[0], "trace"]) if ids else None
                if t is not None and t in known:
                    msg = clean_text(f.get("message"), 160).replace(r"\$", "$")
                    return t, f"first {severity} finding ({f.get('kind')}): {msg}"
    roots = hops[hops.index.isin(known)] if len(known) else hops
    if len(roots) == 0:
        raise AnalysisError("no request found in this trace database")
    worst = durations_ms(roots).fillna(-1.0).idxmax()
    t = int(hops.loc[worst, "trace"]) if "trace" in hops.columns else int(worst)
    return t, "no findings; the slowest request"


def output_format(path: str | Path, allowed: dict[str, str] = FORMATS) -> str:
    suffix = Path(path).suffix.lower()
    if suffix not in allowed:
        names = " or ".join(allowed)
        got = f"{suffix!r}" if suffix else "no extension"
        raise PlotError(f"{path}: cannot tell the output format from {got}; name the file with {names}")
    return allowed[suffix]


def new_figure(width: float, height: float, *, layout: str | None = "constrained"):
    """A Figure on the Agg canvas, outside pyplot's global state."""
    # The Agg canvas is attached directly: no pyplot, no global backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, min(height, MAX_FIGURE_HEIGHT_IN)), layout=layout)
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path, *, dpi: int = DEFAULT_DPI) -> Path:
    """Write ``fig`` as PNG or SVG, by the extension of ``path``."""
    path = Path(path)
    fmt = output_format(path)
    if path.parent and not path.parent.exists():
        raise PlotError(f"{path}: folder {path.parent} does not exist")
    try:
        fig.savefig(path, format=fmt, dpi=dpi, metadata=_metadata(fmt))
    except OSError as exc:
        raise PlotError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path


def figure_bytes(fig, fmt: str = "png", *, dpi: int = DEFAULT_DPI) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, dpi=dpi, metadata=_metadata(fmt))
    return buf.getvalue()


def _metadata(fmt: str) -> dict:
    # Reproducible output: no creation date in the file.
    if fmt == "svg":
        return {"Date": None}
    if fmt == "png":
        return {"Software": "hoptrace"}
    return {}


def bar_note(
    ax,
    y: float,
    start: float,
    end: float,
    text: str,
    xlim,
    axes_in: float,
    *,
    fontsize: float = 7.5,
    color: str = "#222222",
    **kwargs,
):
    """Write ``text`` beside the bar [start, end] on row ``y``: after it if it fits, else before it.

    ``axes_in`` is the plotting area's width in inches (to estimate how much of the
    axis the text takes: ~0.55 em a character).
    """
    span = max(xlim[1] - xlim[0], 1e-12)
    per_in = span / max(axes_in, 0.5)
    width = len(text) * fontsize * 0.55 / 72.0 * per_in
    pad = 0.005 * span
    after = end + pad + width <= xlim[1] or (xlim[1] - end) >= (start - xlim[0])
    x, ha = (end + pad, "left") if after else (start - pad, "right")
    return ax.text(
        x, y, text, va="center", ha=ha, fontsize=fontsize, color=color, zorder=6, clip_on=True, in_layout=False, **kwargs
    )  # inside the axes: no need to weigh it in the layout


def outcome_legend_handles(present):
    """Legend patches for the outcomes in ``present``, in palette order."""
    from matplotlib.patches import Patch

    return [Patch(facecolor=OUTCOME_COLORS[o], label=OUTCOME_LABELS[o]) for o in OUTCOMES if o in set(present)]
