"""Analysis of a hoptrace trace DB: rebuilt request trees, findings, latency, sessions.

    >>> from hoptrace.analyzer import analyze
    >>> analysis = analyze("traces.db")
    >>> analysis.findings[["kind", "severity", "message"]]

Everything is a pandas DataFrame (see :class:`Analysis`); the renderers turn an
analysis into the text, JSON and Markdown reports of ``hoptrace analyze``.
"""

from hoptrace.analyzer._analysis import Analysis, analyze, analyze_tables
from hoptrace.analyzer._config import AnalyzerConfig
from hoptrace.analyzer._detectors import DETECTORS, KINDS, Detector
from hoptrace.analyzer._load import load
from hoptrace.analyzer._render import render_json, render_markdown, render_text
from hoptrace.analyzer._traces import LINKS, link_accuracy

__all__ = [
    "DETECTORS",
    "KINDS",
    "LINKS",
    "Analysis",
    "AnalyzerConfig",
    "Detector",
    "analyze",
    "analyze_tables",
    "link_accuracy",
    "load",
    "render_json",
    "render_markdown",
    "render_text",
]
