"""Analysis of a hoptrace trace DB: rebuilt request trees, findings, latency, sessions.

    >>> from hoptrace.analyzer import analyze
    >>> analysis = analyze("traces.db")
    >>> analysis.findings[["kind", "severity", "message"]]

Everything is a pandas DataFrame (see :class:`Analysis`); the renderers turn an
analysis into the text, JSON and Markdown reports of ``hoptrace analyze``.

The names load on first use, so that ``hoptrace --help`` (which imports the
``analyze`` command from ``hoptrace.analyzer._cli``) does not pay for pandas.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hoptrace.analyzer._analysis import Analysis, analyze, analyze_tables
    from hoptrace.analyzer._config import AnalyzerConfig
    from hoptrace.analyzer._detectors import DETECTORS, KINDS, Detector
    from hoptrace.analyzer._load import load
    from hoptrace.analyzer._render import render_json, render_markdown, render_text
    from hoptrace.analyzer._traces import LINKS, link_accuracy

_WHERE = {
    "Analysis": "_analysis", "analyze": "_analysis", "analyze_tables": "_analysis",
    "AnalyzerConfig": "_config",
    "DETECTORS": "_detectors", "KINDS": "_detectors", "Detector": "_detectors",
    "load": "_load",
    "render_json": "_render", "render_markdown": "_render", "render_text": "_render",
    "LINKS": "_traces", "link_accuracy": "_traces",
}  # fmt: skip

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


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hoptrace.analyzer' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hoptrace.analyzer.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
