"""Charts and a self-contained HTML report of a hoptrace analysis.

Every chart takes an ``Analysis`` (from ``hoptrace.analyzer.analyze``) and is made in
two steps: a pure ``*_layout`` function deciding everything drawn (rows, positions,
labels, what was clipped) as data, and a short ``draw_*`` function turning a layout
into a Figure. ``*_figure`` functions take parts of an analysis (one request's hops,
some sessions) and do both::

    from hoptrace.analyzer import analyze
    from hoptrace import plot

    a = analyze("traces.db")
    plot.save_figure(plot.waterfall(a, 8), "checkout.png")   # one request's hops
    plot.save_figure(plot.session_view(a, "alice"), "alice.svg")  # a workflow over wall time
    plot.save_figure(plot.latency(a), "latency.png")          # per-service latency and errors
    plot.save_figure(plot.service_graph(a), "services.png")   # who calls whom
    plot.write_report(a, "report.html")                       # all of it, one offline file

Figures are ``matplotlib.figure.Figure`` objects on the Agg canvas: no pyplot, no
display. The HTML report puts charts inline as SVG drawn straight from their layouts by
``waterfall_svg``, ``session_svg``, ``latency_svg`` and ``graph_svg`` (no matplotlib).
matplotlib is imported on first use of a Figure, not when this package is.
All charts colour outcomes with :data:`OUTCOME_COLORS`.
"""

from __future__ import annotations

from hoptrace._lazy import lazy_exports

_EXPORTS = {
    "OUTCOMES": "_common",
    "OUTCOME_COLORS": "_common",
    "OUTCOME_LABELS": "_common",
    "PlotError": "_common",
    "outcome_of": "_common",
    "resolve_trace": "_common",
    "pick_worst_trace": "_common",
    "save_figure": "_common",
    "figure_bytes": "_common",
    "waterfall": "_waterfall",
    "waterfall_figure": "_waterfall",
    "waterfall_layout": "_waterfall",
    "draw_waterfall": "_waterfall",
    "session_layout": "_session",
    "draw_session": "_session",
    "latency_layout": "_latency",
    "draw_latency": "_latency",
    "graph_layout": "_graph",
    "draw_graph": "_graph",
    "session_view": "_session",
    "session_figure": "_session",
    "select_session": "_session",
    "latency": "_latency",
    "latency_figure": "_latency",
    "service_graph": "_graph",
    "service_graph_figure": "_graph",
    "waterfall_svg": "_svg",
    "session_svg": "_session",
    "latency_svg": "_latency",
    "graph_svg": "_graph",
    "render_report": "_report",
    "write_report": "_report",
}

__all__ = [
    "OUTCOMES",
    "OUTCOME_COLORS",
    "OUTCOME_LABELS",
    "PlotError",
    "draw_graph",
    "draw_latency",
    "draw_session",
    "draw_waterfall",
    "figure_bytes",
    "graph_layout",
    "graph_svg",
    "latency",
    "latency_figure",
    "latency_layout",
    "latency_svg",
    "outcome_of",
    "pick_worst_trace",
    "render_report",
    "resolve_trace",
    "save_figure",
    "select_session",
    "service_graph",
    "service_graph_figure",
    "session_figure",
    "session_layout",
    "session_svg",
    "session_view",
    "waterfall",
    "waterfall_figure",
    "waterfall_layout",
    "waterfall_svg",
    "write_report",
]


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, globals())
