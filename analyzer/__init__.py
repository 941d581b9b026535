"""Analysis of a hoptrace trace DB: rebuilt request trees, findings, latency, sessions.

    >>> from hoptrace.analyzer import analyze
    >>> analysis = analyze("traces.db")
    >>> analysis.findings[["kind", "severity", "message"]]

Everything is a pandas DataFrame (see :class:`Analysis`). :func:`model` derives from an
analysis, once, what every report shows (the worst-first order, how each hop ended,
findings grouped by kind, the service graph); the renderers only format it into the
text, JSON and Markdown reports of ``hoptrace analyze``, and ``hoptrace.plot`` into charts.
:func:`save` keeps an analysis in the trace file; :func:`analysis_for` reuses it while it is current.

The names load on first use, so that ``hoptrace --help`` (which imports the
``analyze`` command from ``hoptrace.analyzer._cli``) does not pay for pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hoptrace._lazy import lazy_exports

if TYPE_CHECKING:
    from hoptrace.analyzer._analysis import Analysis, analyze, analyze_tables, latency_tables
    from hoptrace.analyzer._config import AnalyzerConfig
    from hoptrace.analyzer._detectors import DETECTORS, KINDS, Detector
    from hoptrace.analyzer._load import load
    from hoptrace.analyzer._model import FindingGroup, Model, RequestSummary, model, resolve_trace
    from hoptrace.analyzer._render import render_json, render_markdown, render_text
    from hoptrace.analyzer._saved import analysis_for, load_saved, save
    from hoptrace.analyzer._traces import LINKS, link_accuracy
    from hoptrace.analyzer._types import SEVERITIES

_WHERE = {
    "Analysis": "_analysis", "analyze": "_analysis", "analyze_tables": "_analysis", "latency_tables": "_analysis",
    "AnalyzerConfig": "_config",
    "DETECTORS": "_detectors", "KINDS": "_detectors", "Detector": "_detectors",
    "load": "_load",
    "FindingGroup": "_model", "Model": "_model", "RequestSummary": "_model", "model": "_model",
    "resolve_trace": "_model",
    "render_json": "_render", "render_markdown": "_render", "render_text": "_render",
    "analysis_for": "_saved", "load_saved": "_saved", "save": "_saved",
    "LINKS": "_traces", "link_accuracy": "_traces",
    "SEVERITIES": "_types",
}  # fmt: skip

__all__ = [
    "DETECTORS",
    "KINDS",
    "LINKS",
    "SEVERITIES",
    "Analysis",
    "AnalyzerConfig",
    "Detector",
    "FindingGroup",
    "Model",
    "RequestSummary",
    "analysis_for",
    "analyze",
    "analyze_tables",
    "latency_tables",
    "link_accuracy",
    "load",
    "load_saved",
    "model",
    "render_json",
    "render_markdown",
    "render_text",
    "resolve_trace",
    "save",
]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
