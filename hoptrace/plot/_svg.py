"""The waterfall drawn straight to SVG from its layout, for the HTML report.

:func:`hoptrace.plot._waterfall.draw_waterfall` draws a :class:`WaterfallLayout` with
matplotlib (for `hoptrace plot`, PNG or SVG files); :func:`waterfall_svg` draws the same
layout as SVG text in about a millisecond, where matplotlib takes ~0.5 s a figure: a
report draws one per failing request. Text stays text (crisp, selectable, searchable);
everything from the trace DB is escaped. Sizes are CSS pixels at the report's width.

The primitives below (escaped text, a legend, an axis, a bar's text placed inside the plot)
are shared by the workflow, latency and service-graph drawings, which the report draws the
same way (``session_svg``, ``latency_svg``, ``graph_svg`` beside their layouts): the report
imports no matplotlib at all.
"""

from __future__ import annotations

import html
import math

import numpy as np

from hoptrace.plot._common import EXPIRED_COLOR, OUTCOME_COLORS, OUTCOME_LABELS
from hoptrace.plot._waterfall import WaterfallLayout

WIDTH = 1320  # px: the report's column at a 1400 px window
ROW = 22  # px per hop
FONT = 12  # px, hop labels (monospace) and bar texts (sans)
MONO_EM, SANS_EM = 0.6, 0.56  # average glyph width / font size, DejaVu Sans Mono and Sans
MAX_LABEL_PX = 520
PAD = 6
LEGEND_LINE = 18  # px between lines of a legend


def esc(value: str) -> str:
    """Layout text (cleaned for matplotlib, ``$`` escaped against mathtext) as escaped SVG text."""
    return html.escape(str(value).replace(r"\$", "$"), quote=True)


def nice_ticks(lo: float, hi: float, target: int = 8) -> list[float]:
    """Round tick values (1, 2 or 5 times a power of ten apart) covering [lo, hi]."""
    span = max(hi - lo, 1e-9)
    raw = span / target
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 5, 10) if step * m >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + k * step, 10) for k in range(int((hi - first) / step) + 1)]


def waterfall_svg(lay: WaterfallLayout) -> str:
    """``<svg>`` text of ``lay``: title, legend, one row per hop, token-expiry lines, axis, notes."""
    n = len(lay.hop_ids)
    fit = int(MAX_LABEL_PX / (FONT * MONO_EM))  # characters of a hop label that fit its column
    labels = [x if len(x) <= fit else x[: fit - 1] + "…" for x in lay.labels]
    label_w = max(len(x) for x in labels) * FONT * MONO_EM + 2 * PAD
    x0, x1 = label_w, WIDTH - PAD
    lo, hi = lay.xlim

    def sx(v: float) -> float:
        return x0 + (float(v) - lo) / max(hi - lo, 1e-12) * (x1 - x0)

    title_lines = lay.title.split("\n")
    top = 8 + 18 * len(title_lines) + 22 + 18  # title, legend, exp labels
    plot_h = n * ROW
    bottom = top + plot_h
    height = bottom + 40 + 17 * len(lay.notes) + 6
    out = [f'<svg width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" '
           'font-family="DejaVu Sans, Arial, sans-serif" font-size="12">',
           '<defs><pattern id="hoptrace-dup" width="6" height="6" patternUnits="userSpaceOnUse" '
           'patternTransform="rotate(45)"><line x1="0" y1="0" x2="0" y2="6" stroke="#222" stroke-width="1.2"/>'
           "</pattern></defs>"]  # fmt: skip
    out += [f'<text x="{PAD}" y="{22 + 18 * k}" font-size="{14 if k == 0 else 12}" font-weight="{600 if k == 0 else 400}">'
            f"{esc(line)}</text>" for k, line in enumerate(title_lines)]  # fmt: skip
    out.append(_legend(lay, PAD, 8 + 18 * len(title_lines) + 14))
    out += _expiry(lay, sx, top, bottom, x1)
    out += _grid_and_axis(lo, hi, sx, top, bottom, x0, x1)
    out += _rows(lay, labels, sx, top, x0, x1)
    for k, (line, color) in enumerate(lay.notes):
        out.append(f'<text x="{PAD}" y="{bottom + 52 + 17 * k}" fill="{color}">{esc(line)}</text>')
    out.append("</svg>")
    return "".join(out)


def _legend(lay: WaterfallLayout, x: float, y: float) -> str:
    items = [(f'<rect width="12" height="10" y="-9" fill="{OUTCOME_COLORS[o]}"/>', OUTCOME_LABELS[o])
             for o in OUTCOME_COLORS if o in set(lay.outcomes)]  # fmt: skip
    if lay.validation.any():
        items.append(('<path d="M6 -9 L11 -4 L6 1 L1 -4 Z" fill="#000"/>', "token validation"))
    if lay.duplicates:
        items.append(('<rect width="12" height="10" y="-9" fill="url(#hoptrace-dup)" stroke="#222"/>', "duplicate validation"))
    if any(v is not None for v, _ in lay.exp_lines):
        items.append((f'<line x1="0" x2="12" y1="-4" y2="-4" stroke="{EXPIRED_COLOR}" stroke-dasharray="4 2" '
                      'stroke-width="2"/>', "token exp"))  # fmt: skip
    return legend(items, x, y)


def legend(items: list[tuple[str, str]], x: float, y: float, right: float = WIDTH - PAD) -> str:
    """(mark, label) pairs from (x, y), wrapped into lines of ``LEGEND_LINE`` px before ``right``;
    each mark is SVG drawn in a 12 × 10 box left of its label."""
    out = []
    for (mark, label), (cx, cy) in zip(items, _legend_places(items, x, y, right)):
        out.append(f'<g transform="translate({cx:.1f},{cy:.1f})">{mark}<text x="17" y="0">{esc(label)}</text></g>')
    return "".join(out)


def legend_lines(items: list[tuple[str, str]], x: float, right: float = WIDTH - PAD) -> int:
    """How many lines :func:`legend` takes."""
    return 1 + int(_legend_places(items, x, 0.0, right)[-1][1] / LEGEND_LINE) if items else 0


def _legend_places(items: list[tuple[str, str]], x: float, y: float, right: float) -> list[tuple[float, float]]:
    places, cx, cy = [], x, y
    for _, label in items:
        width = 17 + len(label) * 12 * SANS_EM
        if cx > x and cx + width > right:
            cx, cy = x, cy + LEGEND_LINE
        places.append((cx, cy))
        cx += width + 22
    return places


def swatch(color: str) -> str:
    """A legend mark: a filled box."""
    return f'<rect width="12" height="10" y="-9" fill="{color}"/>'


def fit(text: str, px: float, size: float, em: float = SANS_EM) -> str:
    """``text`` cut with an ellipsis to ``px`` pixels at font ``size`` (``em``: average glyph width / size)."""
    chars = max(int(px / (size * em)), 1)
    return text if len(text) <= chars else text[: chars - 1] + "…"


def lines(x: float, y: float, texts: list[str], *, size: float = 12, step: float | None = None, attrs: str = "") -> str:
    """A ``<text>`` of several lines (``<tspan>`` each), the first line's baseline at ``y``."""
    step = step or size * 1.25
    spans = "".join(f'<tspan x="{x:.1f}" dy="{0 if k == 0 else step:.1f}">{esc(t)}</tspan>' for k, t in enumerate(texts))
    return f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size:g}"{attrs}>{spans}</text>'


def _expiry(lay: WaterfallLayout, sx, top: float, bottom: float, x1: float) -> list[str]:
    out = []
    for v, who in lay.exp_lines:
        left = sx(lay.xlim[0]) if v is None else sx(v)
        out.append(f'<rect x="{left:.1f}" y="{top}" width="{max(x1 - left, 0):.1f}" height="{bottom - top}" '
                   f'fill="{EXPIRED_COLOR}" fill-opacity="0.07"/>')  # fmt: skip
        if v is None:
            continue
        out.append(f'<line x1="{left:.1f}" x2="{left:.1f}" y1="{top - 4}" y2="{bottom}" stroke="{EXPIRED_COLOR}" '
                   'stroke-width="1.6" stroke-dasharray="6 3"/>')  # fmt: skip
        text = who.replace("token ", "exp of token ", 1)
        anchor = "end" if left + len(text) * 11 * SANS_EM / 2 > x1 else "middle"
        out.append(f'<text x="{left:.1f}" y="{top - 7}" font-size="11" text-anchor="{anchor}" fill="{EXPIRED_COLOR}">'
                   f"{esc(text)}</text>")  # fmt: skip
    return out


def _grid_and_axis(lo: float, hi: float, sx, top: float, bottom: float, x0: float, x1: float) -> list[str]:
    ticks = [(v, f"{v:g}") for v in nice_ticks(lo, hi)]
    return axis(ticks, sx, top, bottom, x0, x1, "time since the request started (ms, proxy clock)")


def axis(ticks: list[tuple[float, str]], sx, top: float, bottom: float, x0: float, x1: float, label: str) -> list[str]:
    """The x axis under a plot from ``top`` to ``bottom``: grid lines, tick labels, the axis's name."""
    out = [f'<line x1="{x0:.1f}" x2="{x1:.1f}" y1="{bottom}" y2="{bottom}" stroke="#444"/>',
           f'<line x1="{x0:.1f}" x2="{x0:.1f}" y1="{top}" y2="{bottom}" stroke="#444"/>']  # fmt: skip
    for v, text in ticks:
        x = sx(v)
        out.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{top}" y2="{bottom + 4}" stroke="#ddd"/>'
                   f'<text x="{x:.1f}" y="{bottom + 17}" text-anchor="middle" font-size="11">{esc(text)}</text>')  # fmt: skip
    out.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{bottom + 34}" text-anchor="middle">{esc(label)}</text>')
    return out


def _rows(lay: WaterfallLayout, labels: list[str], sx, top: float, x0: float, x1: float) -> list[str]:
    out = []
    for k, hop in enumerate(lay.hop_ids):
        y = top + k * ROW
        mid = y + ROW / 2
        failed = lay.outcomes[k] in ("4xx", "5xx", "error")
        weight = ' font-weight="bold"' if failed else ""
        out.append(f'<text x="{PAD}" y="{mid + 4:.1f}" font-family="DejaVu Sans Mono, monospace" xml:space="preserve"'
                   f"{weight}><title>{esc(lay.labels[k])}</title>{esc(labels[k])}</text>")  # fmt: skip
        left, right = sx(lay.starts[k]), sx(lay.starts[k] + lay.widths[k])
        if lay.validation[k]:  # drawn first: under the bar, so a 3 ms bar is never hidden by its marker
            out.append(f'<path d="M{left:.1f} {mid - 6:.1f} L{left + 6:.1f} {mid:.1f} L{left:.1f} {mid + 6:.1f} '
                       f'L{left - 6:.1f} {mid:.1f} Z" fill="#000"/>')  # fmt: skip
        fill = OUTCOME_COLORS[lay.outcomes[k]]
        out.append(f'<rect id="bar-hop-{hop}" x="{left:.1f}" y="{y + 4}" width="{max(right - left, 1.0):.1f}" '
                   f'height="{ROW - 8}" fill="{fill}" stroke="#222" stroke-width="0.5"/>')  # fmt: skip
        if hop in lay.duplicates:
            out.append(f'<rect x="{left:.1f}" y="{y + 4}" width="{max(right - left, 1.0):.1f}" height="{ROW - 8}" '
                       'fill="url(#hoptrace-dup)"/>')  # fmt: skip
        out.append(bar_text(lay.texts[k], left, right, mid, x0, x1, EXPIRED_COLOR if lay.alarms[k] else "#222"))
    return out


def bar_text(text: str, left: float, right: float, mid: float, x0: float, x1: float, color: str) -> str:
    """Beside the bar where it fits (after, else before), else on the roomier side moved inside the plot
    (cut with … when longer than the plot is wide)."""
    text = fit(text, x1 - x0 - 2 * PAD, 11)
    width = len(text) * 11 * SANS_EM
    ground = ""
    if right + PAD + width <= x1:
        x, anchor = right + PAD, "start"
    elif left - PAD - width >= x0:
        x, anchor = left - PAD, "end"
    else:
        x = max(x0 + PAD, left - PAD - width) if left - x0 >= x1 - right else min(x1 - PAD, right + PAD + width) - width
        x, anchor = float(np.clip(x, x0 + 2, max(x1 - width, x0 + 2))), "start"
        ground = f'<rect x="{x - 2:.1f}" y="{mid - 8:.1f}" width="{width + 4:.1f}" height="15" fill="#fff" fill-opacity="0.85"/>'
    return f'{ground}<text x="{x:.1f}" y="{mid + 4:.1f}" font-size="11" text-anchor="{anchor}" fill="{color}">{esc(text)}</text>'
