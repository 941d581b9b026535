"""What every chart shares: the outcome palette, label hygiene, figure creation, saving.

Numbers, durations and times are written by :mod:`hoptrace._format` (re-exported here
under the charts' names); which request, how a hop ended and how findings rank come
from the presentation model, :mod:`hoptrace.analyzer._model`. Nothing here imports
matplotlib or pandas at module level, so the CLI can import this cheaply.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hoptrace._errors import AnalysisError, HoptraceError
from hoptrace._format import as_float, clean, is_missing, ms, seconds, utc
from hoptrace.analyzer._types import OUTCOMES

if TYPE_CHECKING:  # importing the analyzer loads pandas: the CLI imports this module cheaply
    from hoptrace.analyzer._analysis import Analysis

# One palette for outcomes, used by every chart (Okabe-Ito, colour-blind safe).
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
    import pandas as pd

    from hoptrace.analyzer._model import outcomes

    return outcomes(pd.DataFrame({"status": [as_float(status)], "failed": [0 if is_missing(failed) else failed]})).iloc[0]


def clean_text(value: Any, max_len: int = 80) -> str:
    """Text from the DB made safe for a matplotlib label.

    Control characters become spaces, long strings are cut with an ellipsis, and
    ``$`` is escaped so a path can never switch matplotlib into mathtext.
    """
    return clean(value, max_len, mark=" ").replace("$", r"\$")


def short_fp(fp: Any, n: int = 8) -> str:
    return "" if is_missing(fp) else str(fp)[:n]


fmt_ms = ms
fmt_s = seconds


def fmt_utc(ts: Any, with_date: bool = True) -> str:
    """``2024-01-15 12:42:15.123 UTC``, or ``12:42:15`` without the date."""
    return utc(ts, millis=True, date=with_date)


def require_hops(analysis: Analysis):
    """``analysis.hops``, or an :class:`AnalysisError` when there is none to draw."""
    if len(analysis.hops) == 0:
        raise AnalysisError("no hops recorded in this trace database: nothing to plot")
    return analysis.hops


def resolve_trace(analysis: Analysis, key: Any) -> int:
    """The request (root hop id) that ``key`` names: see :func:`hoptrace.analyzer._model.resolve_trace`."""
    from hoptrace.analyzer._model import resolve_trace as resolve

    return resolve(require_hops(analysis), key)


def pick_worst_trace(analysis: Analysis) -> tuple[int, str]:
    """The request to show when none was named, and why: the first of the model's worst-first order."""
    from hoptrace.analyzer._model import model

    require_hops(analysis)
    m = model(analysis)
    worst = m.worst(1)
    if not worst:
        raise AnalysisError("no request found in this trace database")
    return worst[0], m.why(worst[0])


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


def svg_text(fig) -> str:
    """``fig`` as an ``<svg>`` element to put inline in HTML: text kept as text (crisp at any
    zoom, selectable, found by the browser's search), ids stable from run to run."""
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "hoptrace"}):
        text = figure_bytes(fig, "svg").decode("utf-8")
    svg = text[text.index("<svg") :]  # without the XML declaration and DOCTYPE, which HTML does not take
    # Inline in HTML an <svg> needs no namespace declarations, and the RDF metadata only names
    # matplotlib: both are URLs that would make an offline file look as if it referred outside.
    svg = re.sub(r"<metadata>.*?</metadata>\s*", "", svg, count=1, flags=re.S)
    return re.sub(r'\s+xmlns(?::\w+)?="[^"]*"', "", svg)


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
    """Write ``text`` beside the bar [start, end] on row ``y``: after it if it fits, else before
    it if it fits there, else on the side with more room, moved just enough to stay inside
    the axes (on a white ground where it then covers the bar): never cut at the axes' edge.

    ``axes_in`` is the plotting area's width in inches (to estimate how much of the
    axis the text takes: ~0.55 em a character).
    """
    span = max(xlim[1] - xlim[0], 1e-12)
    per_in = span / max(axes_in, 0.5)
    width = len(text) * fontsize * 0.55 / 72.0 * per_in
    pad = 0.005 * span
    if end + pad + width <= xlim[1]:
        x, ha = end + pad, "left"
    elif start - pad - width >= xlim[0]:
        x, ha = start - pad, "right"
    else:
        if start - xlim[0] >= xlim[1] - end:
            x, ha = max(xlim[0] + pad, start - pad - width), "left"
        else:
            x, ha = min(xlim[1] - pad, end + pad + width), "right"
        kwargs.setdefault("bbox", {"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none", "alpha": 0.85})
    return ax.text(
        x, y, text, va="center", ha=ha, fontsize=fontsize, color=color, zorder=6, clip_on=True, in_layout=False, **kwargs
    )  # inside the axes: no need to weigh it in the layout


def outcome_legend_handles(present):
    """Legend patches for the outcomes in ``present``, in palette order."""
    from matplotlib.patches import Patch

    return [Patch(facecolor=OUTCOME_COLORS[o], label=OUTCOME_LABELS[o]) for o in OUTCOMES if o in set(present)]
