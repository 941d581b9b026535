"""Interaction coverage: which endpoints and caller -> callee calls a recorded run exercised.

    >>> from hoptrace.coverage import coverage_of_db, load_specs, render_text
    >>> print(render_text(coverage_of_db("traces.db", load_specs(["gateway=openapi/gateway.yaml"]))))

The names load on first use, so that ``hoptrace --help`` (which imports the
``coverage`` command from ``hoptrace.coverage._cli``) does not pay for pandas.
"""

from __future__ import annotations

import importlib

_WHERE = {
    "CoverageError": "_errors",
    "CLIENT": "_model", "Coverage": "_model", "caller_services": "_model", "compare": "_model",
    "coverage_of": "_model", "coverage_of_db": "_model", "load_specs": "_openapi",
    "Operation": "_openapi", "load_spec": "_openapi", "parse_spec_arg": "_openapi",
    "render_text": "_render", "render_markdown": "_render", "render_json": "_render", "render_comparison": "_render",
}  # fmt: skip

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'hoptrace.coverage' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"hoptrace.coverage.{_WHERE[name]}"), name)
    globals()[name] = value
    return value
