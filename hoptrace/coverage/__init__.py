"""Interaction coverage: which endpoints and caller -> callee calls a recorded run exercised.

    >>> from hoptrace.coverage import coverage_of_db, load_specs, render_text
    >>> print(render_text(coverage_of_db("traces.db", load_specs(["gateway=openapi/gateway.yaml"]))))

The ``hoptrace coverage`` command lives in ``hoptrace._coverage_cli``, outside this
package, so that ``hoptrace --help`` does not load pandas.
"""

from hoptrace._openapi import OpenAPIError, Operation, load_spec, load_specs, parse_spec_arg
from hoptrace.coverage._model import CLIENT, Coverage, caller_services, compare, coverage_of, coverage_of_db
from hoptrace.coverage._render import render_comparison, render_json, render_markdown, render_text

__all__ = [
    "CLIENT",
    "Coverage",
    "OpenAPIError",
    "Operation",
    "caller_services",
    "compare",
    "coverage_of",
    "coverage_of_db",
    "load_spec",
    "load_specs",
    "parse_spec_arg",
    "render_comparison",
    "render_json",
    "render_markdown",
    "render_text",
]
