"""One self-contained HTML report: summary, findings, the charts (PNG data URIs), no network needed.

Everything that came from the trace database is passed through :func:`html.escape`:
a DB may come from a bug report and its paths, headers and messages are untrusted.
A Content-Security-Policy forbids scripts and any fetch: the file only shows.
"""

from __future__ import annotations

import base64
import html
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from hoptrace import __version__
from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, as_int, is_missing
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._model import Model, model, slowest_first
from hoptrace.analyzer._types import SEVERITIES
from hoptrace.plot._common import (
    DEFAULT_DPI,
    PlotError,
    figure_bytes,
    fmt_ms,
    fmt_utc,
    output_format,
    require_hops,
)

MAX_ERROR_FINDINGS = 500  # error findings listed in the report at most
MAX_FINDINGS_PER_KIND = 50  # findings of each warning or info kind listed at most
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"

STYLE = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1500px; padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: .2em; margin-top: 2em; }
.meta { color: #666; }
table { border-collapse: collapse; margin: .6em 0; }
th, td { border: 1px solid #ddd; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.sev-error td.sev { color: #fff; background: #C00000; font-weight: bold; }
tr.sev-warning td.sev { background: #ffe3a3; } tr.sev-info td.sev { background: #e8f1fb; }
figure { margin: 1.2em 0; } figcaption { font-weight: 600; margin-bottom: .3em; }
img.chart { max-width: 100%; height: auto; border: 1px solid #eee; }
.warn { color: #8a5a00; } .bad { color: #C00000; font-weight: bold; }
code { background: #f5f5f5; padding: 0 .2em; }
nav a { margin-right: 1em; }
"""


def _e(value: Any) -> str:
    """Escape anything for HTML text or attribute context."""
    if is_missing(value):
        return ""
    return html.escape(str(value), quote=True)


def render_report(
    analysis: Analysis,
    *,
    source: str | None = None,
    title: str | None = None,
    max_waterfalls: int = 20,
    max_sessions: int = 10,
    max_error_findings: int = MAX_ERROR_FINDINGS,
    max_findings_per_kind: int = MAX_FINDINGS_PER_KIND,
    dpi: int = DEFAULT_DPI,
) -> str:
    """The HTML report of ``analysis`` as one string (UTF-8 text, no external resources).

    Sections: summary (captures, hops, capture health, findings by severity and by kind),
    the findings table, a waterfall for each request with an error finding (at most
    ``max_waterfalls``, worst first in the presentation model's order; with no error
    finding, the model's worst request, so a capture with only warnings still gets a
    picture), the workflow view of each affected session (at most ``max_sessions``),
    latency per service, and the service call graph.

    The findings table lists every error finding up to ``max_error_findings`` (default
    500) and the first ``max_findings_per_kind`` (default 50) findings of each warning
    and info kind, grouped by kind; a kind cut short ends with a line saying how many
    more there are (``hoptrace analyze DB --format json`` lists them all). So the
    report stays a few MB however many findings the trace has; the summary counts all.
    """
    from hoptrace.plot._graph import service_graph
    from hoptrace.plot._latency import latency

    require_hops(analysis)
    m = model(analysis)
    db_name = source or Path(str(analysis.source or "")).name
    heading = title or f"hoptrace report: {db_name or 'trace database'}"
    shown, error_traces = _charted_requests(m, max_waterfalls)
    parts = [
        _head(heading),
        _summary(analysis, m),
        _findings_table(m, set(shown), max_error_findings, max_findings_per_kind, db_name or "DB"),
        _requests_section(m, shown, error_traces, dpi),
        _workflows_section(analysis, error_traces, max_sessions, dpi),
        '<section id="latency"><h2>Latency and errors per service</h2>',
        _chart("latency-chart", "latency", "Latency per service", "", lambda: latency(analysis), dpi),
        _latency_table(analysis.services),
        '</section><section id="services"><h2>Service call graph</h2>',
        _chart("services-chart", "services", "Calls between services", "", lambda: service_graph(analysis), dpi),
        "</section></body></html>",
    ]
    return "\n".join(parts)


def _head(heading: str) -> str:
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(heading)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(heading)}</h1>",
        f'<p class="meta">Generated {_e(datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))} by hoptrace '
        f"{_e(__version__)}. Times are the proxy's clock, in UTC.</p>",
        '<nav><a href="#summary">Summary</a><a href="#findings">Findings</a><a href="#requests">Failed requests</a>'
        '<a href="#workflows">Workflows</a><a href="#latency">Latency</a><a href="#services">Services</a></nav>',
    ])  # fmt: skip


def _charted_requests(m: Model, limit: int) -> tuple[list[int], list[int]]:
    """(the requests to draw, every request with an error finding), both worst first."""
    error_traces = m.with_error_findings()
    shown = error_traces[:limit] if error_traces else m.worst(min(limit, 1))
    return shown, error_traces


def _requests_section(m: Model, shown: list[int], error_traces: list[int], dpi: int) -> str:
    from hoptrace.plot._waterfall import waterfall

    out = [f'<section id="requests"><h2>Requests with an error finding ({len(error_traces)})</h2>']
    if not error_traces:
        out.append("<p>No request has an error finding." + (" The worst request:" if shown else "") + "</p>")
    elif len(error_traces) > len(shown):
        out.append(
            f'<p class="warn">Showing the first {len(shown)} of {len(error_traces)}, worst first; '
            f"run <code>hoptrace plot DB --trace ID</code> for the others.</p>"
        )
    for t in shown:
        r = m.request(t)
        caption = f"Request {t}: {r.service} {r.method} {r.path} → {r.ended}"
        draw = lambda t=t: waterfall(m.analysis, t)  # noqa: E731
        out.append(_chart(f"trace-{t}", "waterfall", caption, ", ".join(r.kinds), draw, dpi, data={"trace": t}))
    out.append("</section>")
    return "".join(out)


def _workflows_section(analysis: Analysis, error_traces: list[int], limit: int, dpi: int) -> str:
    from hoptrace.plot._session import session_figure

    groups, affected = _affected_sessions(analysis.sessions, error_traces, limit)
    out = ['<section id="workflows"><h2>Affected workflows</h2>']
    if not groups:
        out.append("<p>No workflow has a request with an error finding or one sent with an expired token.</p>")
    for key, rows in groups:
        subjects = ", ".join(sorted({str(s) for s in rows["subject"].dropna()})) or "unknown subject"
        caption = f"Session {key} ({subjects}): {len(rows)} requests"
        draw = lambda rows=rows: session_figure(analysis, rows)  # noqa: E731
        out.append(_chart(f"session-{key}", "session", caption, "", draw, dpi, data={"session": key}))
    if affected > len(groups):
        out.append(f'<p class="warn">{affected - len(groups)} more affected workflows not shown.</p>')
    out.append("</section>")
    return "".join(out)


def _latency_table(services: pd.DataFrame) -> str:
    out = [
        "<table><thead><tr><th>service</th><th>hops</th><th>errors</th><th>error rate</th><th>p50</th><th>p95</th>"
        "<th>p99</th></tr></thead><tbody>"
    ]
    for r in slowest_first(services).itertuples():
        rate = as_float(r.error_rate)
        cells = [as_int(r.count), as_int(r.errors), "" if rate is None else f"{100 * rate:.1f}%", fmt_ms(r.p50_ms),
                 fmt_ms(r.p95_ms), fmt_ms(r.p99_ms)]  # fmt: skip
        out.append(f"<tr><td>{_e(r.service)}</td>" + "".join(f"<td class=num>{_e(c)}</td>" for c in cells) + "</tr>")
    out.append("</tbody></table>")
    return "".join(out)


def write_report(analysis: Analysis, path: str | Path, **kwargs) -> Path:
    """Write :func:`render_report` to ``path`` (``.html`` / ``.htm``)."""
    path = Path(path)
    output_format(path, {".html": "html", ".htm": "html"})
    if not path.parent.exists():
        raise PlotError(f"{path}: folder {path.parent} does not exist")
    text = render_report(analysis, **kwargs)
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PlotError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path


def _chart(anchor: str, kind: str, caption: str, sub: str, draw: Callable, dpi: int, data: dict | None = None) -> str:
    attrs = "".join(f' data-{k}="{_e(v)}"' for k, v in (data or {}).items())
    try:
        png = figure_bytes(draw(), "png", dpi=dpi)
    except (AnalysisError, ValueError, KeyError, TypeError, IndexError) as exc:
        warnings.warn(f"hoptrace report: {kind} chart {anchor} not drawn: {exc}", stacklevel=2)
        return (
            f'<figure id="{_e(anchor)}"><figcaption>{_e(caption)}</figcaption>'
            f'<p class="bad">This chart could not be drawn: {_e(exc)}</p></figure>'
        )
    uri = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    extra = f' <span class="meta">({_e(sub)})</span>' if sub else ""
    return (
        f'<figure id="{_e(anchor)}"><figcaption>{_e(caption)}{extra}</figcaption>'
        f'<img class="chart" data-chart="{_e(kind)}"{attrs} alt="{_e(kind)} chart: {_e(caption)}" src="{uri}">'
        f"</figure>"
    )


def _summary(analysis: Analysis, m: Model) -> str:
    hops, captures, s = analysis.hops, analysis.captures, m.summary
    rows = [
        ("captures", len(captures), ""),
        ("traffic from", f"{fmt_utc(s['started_at'])} to {fmt_utc(s['ended_at'])}", ""),
        ("hops recorded", s["hops"], ""),
        ("requests", s["requests"], ""),
        ("services", hops["service"].nunique(), ""),
        ("workflows (sessions)", s["sessions"], ""),
        ("tokens seen", len(analysis.tokens), ""),
    ]
    for name, label in (
        ("hops_dropped", "hops dropped by the recorder"),
        ("addon_errors", "recorder errors"),
        ("write_errors", "database write errors"),
    ):
        if name in captures.columns:
            n = int(pd.to_numeric(captures[name], errors="coerce").fillna(0).sum())
            rows.append((label, f"{n}" + (" — the trace is incomplete" if n else ""), "bad" if n else ""))
    by_sev = s["findings"]
    rows.append(("findings", ", ".join(f"{by_sev[k]} {k}" for k in SEVERITIES), "bad" if by_sev["error"] else ""))
    kinds = analysis.findings["kind"].value_counts()
    if len(kinds):
        rows.append(("findings by kind", ", ".join(f"{k} × {int(n)}" for k, n in kinds.items()), ""))
    out = ['<section id="summary"><h2>Summary</h2><table class="summary"><tbody>']
    out += [f'<tr><th>{_e(k)}</th><td class="{cls}">{_e(v)}</td></tr>' for k, v, cls in rows]
    out.append("</tbody></table>")
    if analysis.notes:
        out.append('<p>About the data:</p><ul class="notes">')
        out += [f"<li>{_e(n)}</li>" for n in analysis.notes]
        out.append("</ul>")
    out.append("</section>")
    return "".join(out)


def _findings_table(m: Model, linked: set[int], max_errors: int, per_kind: int, db_name: str) -> str:
    """The findings grouped by severity and kind (the model's groups), capped (see :func:`render_report`)."""
    total = len(m.analysis.findings)
    out = [f'<section id="findings"><h2>Findings ({total})</h2>']
    if not total:
        return "".join([*out, "<p>No findings.</p></section>"])
    errors_left = max_errors
    rows, listed = [], 0
    full_list = f"<code>hoptrace analyze {_e(db_name)} --format json</code>"
    for group in m.finding_groups:
        cap = errors_left if group.severity == "error" else per_kind
        shown = group.rows.head(max(cap, 0))
        errors_left -= len(shown) if group.severity == "error" else 0
        listed += len(shown)
        rows += [_finding_row(f, linked) for f in shown.to_dict("records")]
        more = len(group) - len(shown)
        if more:
            rows.append(
                f'<tr class="more-findings"><td colspan="7">… and {more} more {_e(group.kind)} '
                f"finding{'s' * (more != 1)} ({_e(group.severity)}) not listed; {full_list} lists all.</td></tr>"
            )
    if listed < total:
        out.append(
            f'<p class="warn">Listing {listed} of {total} findings: every error finding up to '
            f"{max_errors} and the first {per_kind} of each other kind. The summary counts them all; "
            f"{full_list} lists them all.</p>"
        )
    out.append(
        '<table class="findings"><thead><tr><th>severity</th><th>kind</th><th>service</th><th>request</th>'
        "<th>hops</th><th>at (UTC)</th><th>message</th></tr></thead><tbody>"
    )
    return "".join([*out, *rows, "</tbody></table></section>"])


def _finding_row(f: dict, linked: set[int]) -> str:
    sev = "" if is_missing(f["severity"]) else str(f["severity"])
    trace = as_int(f["trace"])
    request = "" if trace is None else (f'<a href="#trace-{trace}">{trace}</a>' if trace in linked else _e(trace))
    hop_list = ", ".join(str(int(i)) for i in list(f["hop_ids"])[:20])
    return (
        f'<tr class="finding sev-{_e(sev)}"><td class="sev">{_e(sev)}</td><td>{_e(f["kind"])}</td>'
        f"<td>{_e(f['service'])}</td><td class=num>{request}</td><td>{_e(hop_list)}</td>"
        f"<td>{_e(fmt_utc(f['at']))}</td><td>{_e(f['message'])}</td></tr>"
    )


def _affected_sessions(sessions: pd.DataFrame, error_traces: list[int], limit: int) -> tuple[list[tuple[int, pd.DataFrame]], int]:
    """(session, its rows) of the first ``limit`` sessions with an error-finding request or an
    expired-token request, and how many such sessions there are."""
    if not len(sessions):
        return [], 0
    bad = sessions["trace"].isin(error_traces).to_numpy(dtype=bool) | sessions["expired"].fillna(False).to_numpy(dtype=bool)
    affected = sessions.loc[bad, "session"].dropna().drop_duplicates().tolist()
    chosen = affected[:limit]
    rows_of = dict(tuple(sessions[sessions["session"].isin(chosen).to_numpy(dtype=bool)].groupby("session", sort=False)))
    return [(int(k), rows_of[k]) for k in chosen], len(affected)
