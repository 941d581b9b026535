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

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace.plot._common import (
    DEFAULT_DPI,
    SEVERITY_RANK,
    PlotError,
    as_float,
    as_int,
    col,
    figure_bytes,
    findings_for,
    finite_floats,
    fmt_ms,
    fmt_utc,
    frame,
    hop_ids_of,
    hops_by_trace,
    is_missing,
    output_format,
    require_hops,
    truthy_flags,
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
    analysis: Any,
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
    ``max_waterfalls``), the workflow view of each affected session (at most
    ``max_sessions``), latency per service, and the service call graph.

    The findings table lists every error finding up to ``max_error_findings`` (default
    500) and the first ``max_findings_per_kind`` (default 50) findings of each warning
    and info kind, grouped by kind; a kind cut short ends with a line saying how many
    more there are (``hoptrace analyze DB --format json`` lists them all). So the
    report stays a few MB however many findings the trace has; the summary counts all.
    """
    from hoptrace.plot._graph import service_graph
    from hoptrace.plot._latency import latency_figure, service_stats
    from hoptrace.plot._session import session_figure
    from hoptrace.plot._waterfall import waterfall_figure

    hops = require_hops(analysis)
    findings = _sorted_findings(frame(analysis, "findings"))
    sessions = frame(analysis, "sessions")
    tokens = frame(analysis, "tokens")

    error_traces = _error_traces(findings, hops)
    shown = error_traces[:max_waterfalls]
    groups, affected = _affected_sessions(sessions, error_traces, max_sessions)
    # The rows of the charted requests, picked out of the whole trace once: every chart
    # below then touches only its own request's or session's hops and findings.
    session_traces = {int(t) for _, rows in groups for t in rows["trace"]}
    rows_of = hops_by_trace(hops, set(shown) | session_traces)
    shown_hop_ids = {int(i) for t in shown for i in rows_of[t].index}
    shown_findings = findings_for(findings, shown_hop_ids, set(shown))
    session_rows = [rows_of[t] for t in sorted(session_traces) if t in rows_of]
    session_hops = pd.concat(session_rows) if session_rows else hops.iloc[0:0]
    hop_tokens = frame(analysis, "hop_tokens")
    if len(hop_tokens) and "hop_id" in hop_tokens.columns:
        hop_tokens = hop_tokens[hop_tokens["hop_id"].isin(session_hops.index).to_numpy(dtype=bool)]

    parts: list[str] = []
    add = parts.append
    db_name = source or Path(str(getattr(analysis, "source", None) or "")).name
    heading = title or f"hoptrace report: {db_name or 'trace database'}"
    add("<!DOCTYPE html>")
    add('<html lang="en"><head><meta charset="utf-8">')
    add(f'<meta http-equiv="Content-Security-Policy" content="{CSP}">')
    add('<meta name="viewport" content="width=device-width, initial-scale=1">')
    add(f"<title>{_e(heading)}</title><style>{STYLE}</style></head><body>")
    add(f"<h1>{_e(heading)}</h1>")
    add(
        f'<p class="meta">Generated {_e(datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))} by hoptrace '
        f"{_e(_version())}. Times are the proxy's clock, in UTC.</p>"
    )
    add(
        '<nav><a href="#summary">Summary</a><a href="#findings">Findings</a><a href="#requests">Failed requests</a>'
        '<a href="#workflows">Workflows</a><a href="#latency">Latency</a><a href="#services">Services</a></nav>'
    )

    add(_summary(analysis, hops, findings, sessions))
    add(_findings_table(findings, set(shown), max_error_findings, max_findings_per_kind, db_name or "DB"))

    add(f'<section id="requests"><h2>Requests with an error finding ({len(error_traces)})</h2>')
    if not error_traces:
        add("<p>No request has an error finding.</p>")
    elif len(error_traces) > len(shown):
        add(
            f'<p class="warn">Showing the first {len(shown)} of {len(error_traces)}; '
            f"run <code>hoptrace plot DB --trace ID</code> for the others.</p>"
        )
    kinds_of = _kinds_by_trace(shown_findings, shown)
    for t in shown:
        root = hops.loc[t] if t in hops.index else None
        what = "" if root is None else f"{root.get('service')} {root.get('method')} {root.get('path')} → {_status(root)}"
        add(
            _chart(
                f"trace-{t}",
                "waterfall",
                f"Request {t}: {what}",
                ", ".join(kinds_of.get(t, [])),
                lambda t=t: waterfall_figure(rows_of[t], tokens, shown_findings),
                dpi,
                data={"trace": t},
            )
        )
    add("</section>")

    add('<section id="workflows"><h2>Affected workflows</h2>')
    if not groups:
        add("<p>No workflow has a request with an error finding or one sent with an expired token.</p>")
    for key, rows in groups:
        subjects = ", ".join(sorted({str(s) for s in col(rows, "subject").dropna()})) or "unknown subject"
        add(
            _chart(
                f"session-{key}",
                "session",
                f"Session {key} ({subjects}): {len(rows)} requests",
                "",
                lambda rows=rows: session_figure(rows, tokens, hop_tokens, session_hops, findings),
                dpi,
                data={"session": key},
            )
        )
    if affected > len(groups):
        add(f'<p class="warn">{affected - len(groups)} more affected workflows not shown.</p>')
    add("</section>")

    add('<section id="latency"><h2>Latency and errors per service</h2>')
    services = frame(analysis, "services")
    stats = service_stats(hops, services)
    add(_chart("latency-chart", "latency", "Latency per service", "", lambda: latency_figure(hops, services, stats=stats), dpi))
    add(
        "<table><thead><tr><th>service</th><th>hops</th><th>errors</th><th>error rate</th><th>p50</th><th>p95</th>"
        "<th>p99</th></tr></thead><tbody>"
    )
    for _, r in stats.iterrows():
        rate = as_float(r.error_rate)
        add(
            f"<tr><td>{_e(r.service)}</td><td class=num>{_e(as_int(r['count']))}</td><td class=num>{_e(as_int(r.errors))}</td>"
            f"<td class=num>{'' if rate is None else f'{100 * rate:.1f}%'}</td><td class=num>{_e(fmt_ms(r.p50_ms))}</td>"
            f"<td class=num>{_e(fmt_ms(r.p95_ms))}</td><td class=num>{_e(fmt_ms(r.p99_ms))}</td></tr>"
        )
    add("</tbody></table></section>")

    add('<section id="services"><h2>Service call graph</h2>')
    add(_chart("services-chart", "services", "Calls between services", "", lambda: service_graph(analysis), dpi))
    add("</section>")
    add("</body></html>")
    return "\n".join(parts)


def write_report(analysis: Any, path: str | Path, **kwargs) -> Path:
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


def _version() -> str:
    try:
        from hoptrace import __version__

        return __version__
    except ImportError:  # pragma: no cover
        return "?"


def _status(root) -> str:
    status = as_int(root.get("status"))
    if as_int(root.get("failed")):
        return f"{status if status is not None else 'no response'} + {root.get('error_kind') or 'error'}"
    return "no response" if status is None else str(status)


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


def _sorted_findings(findings: pd.DataFrame) -> pd.DataFrame:
    if not len(findings):
        return findings
    rank = col(findings, "severity").map(lambda s: SEVERITY_RANK.get(s, 3))
    order = findings.assign(_rank=rank.to_numpy(), _at=pd.to_numeric(col(findings, "at"), errors="coerce").to_numpy())
    return order.sort_values(["_rank", "_at"], kind="stable").drop(columns=["_rank", "_at"])


def _summary(analysis, hops, findings, sessions) -> str:
    captures = frame(analysis, "captures")
    tokens = frame(analysis, "tokens")
    out = ['<section id="summary"><h2>Summary</h2><table class="summary"><tbody>']

    def row(k, v, cls=""):
        out.append(f'<tr><th>{_e(k)}</th><td class="{cls}">{_e(v)}</td></tr>')

    starts = pd.to_numeric(col(hops, "started_at"), errors="coerce")
    ends = pd.to_numeric(col(hops, "ended_at"), errors="coerce")
    row("captures", len(captures))
    row("traffic from", f"{fmt_utc(starts.min())} to {fmt_utc(ends.max())}")
    row("hops recorded", len(hops))
    row("requests", col(hops, "trace").nunique())
    row("services", col(hops, "service").nunique())
    row("workflows (sessions)", col(sessions, "session").nunique() if len(sessions) else 0)
    row("tokens seen", len(tokens))
    for name, label in (
        ("hops_dropped", "hops dropped by the recorder"),
        ("addon_errors", "recorder errors"),
        ("write_errors", "database write errors"),
    ):
        if name in captures.columns:
            n = int(pd.to_numeric(captures[name], errors="coerce").fillna(0).sum())
            row(label, f"{n}" + (" — the trace is incomplete" if n else ""), "bad" if n else "")
    by_sev = col(findings, "severity").value_counts()
    row(
        "findings",
        ", ".join(f"{int(by_sev.get(s, 0))} {s}" for s in ("error", "warning", "info")) or "none",
        "bad" if by_sev.get("error", 0) else "",
    )
    kinds = col(findings, "kind").value_counts()
    if len(kinds):
        row("findings by kind", ", ".join(f"{k} × {int(n)}" for k, n in kinds.items()))
    out.append("</tbody></table>")
    notes = [n for n in (getattr(analysis, "notes", None) or []) if not is_missing(n)]
    if notes:
        out.append('<p>About the data:</p><ul class="notes">')
        out += [f"<li>{_e(n)}</li>" for n in notes]
        out.append("</ul>")
    out.append("</section>")
    return "".join(out)


def _findings_table(findings: pd.DataFrame, linked: set[int], max_errors: int, per_kind: int, db_name: str) -> str:
    """The findings grouped by severity and kind, capped (see :func:`render_report`)."""
    out = [f'<section id="findings"><h2>Findings ({len(findings)})</h2>']
    if not len(findings):
        out.append("<p>No findings.</p></section>")
        return "".join(out)
    severity = col(findings, "severity").astype("string").fillna("").to_numpy(dtype=object)
    kind = col(findings, "kind").astype("string").fillna("").to_numpy(dtype=object)
    by_kind = pd.DataFrame({"severity": severity, "kind": kind}).groupby(["severity", "kind"], sort=False)
    group = by_kind.ngroup().to_numpy()  # numbered in order of each kind's first finding
    is_error = severity == "error"
    listed = np.where(is_error, np.cumsum(is_error) <= max_errors, by_kind.cumcount().to_numpy() < per_kind)
    full_list = f"<code>hoptrace analyze {_e(db_name)} --format json</code>"
    if not listed.all():
        out.append(
            f'<p class="warn">Listing {int(listed.sum())} of {len(findings)} findings: every error finding up to '
            f"{max_errors} and the first {per_kind} of each other kind. The summary counts them all; "
            f"{full_list} lists them all.</p>"
        )
    out.append(
        '<table class="findings"><thead><tr><th>severity</th><th>kind</th><th>service</th><th>request</th>'
        "<th>hops</th><th>at (UTC)</th><th>message</th></tr></thead><tbody>"
    )
    for g in range(by_kind.ngroups):
        mine = group == g
        for f in findings[mine & listed].to_dict("records"):
            out.append(_finding_row(f, linked))
        more = int((mine & ~listed).sum())
        if more:
            first = int(np.argmax(mine))
            out.append(
                f'<tr class="more-findings"><td colspan="7">… and {more} more {_e(kind[first])} '
                f"finding{'s' * (more != 1)} ({_e(severity[first])}) not listed; {full_list} lists all.</td></tr>"
            )
    out.append("</tbody></table></section>")
    return "".join(out)


def _finding_row(f: dict, linked: set[int]) -> str:
    sev = "" if is_missing(f.get("severity")) else str(f.get("severity"))
    trace = as_int(f.get("trace"))
    request = "" if trace is None else (f'<a href="#trace-{trace}">{trace}</a>' if trace in linked else _e(trace))
    hop_list = ", ".join(str(i) for i in hop_ids_of(f.get("hop_ids"))[:20])
    return (
        f'<tr class="finding sev-{_e(sev)}"><td class="sev">{_e(sev)}</td><td>{_e(f.get("kind"))}</td>'
        f"<td>{_e(f.get('service'))}</td><td class=num>{request}</td><td>{_e(hop_list)}</td>"
        f"<td>{_e(fmt_utc(f.get('at')))}</td><td>{_e(f.get('message'))}</td></tr>"
    )


def _error_traces(findings: pd.DataFrame, hops: pd.DataFrame) -> list[int]:
    """The requests (in ``hops``) with an error finding, each once, in the findings' order."""
    errors = (col(findings, "severity") == "error").to_numpy(dtype=bool)
    traces = pd.Series(np.trunc(finite_floats(col(findings, "trace")))[errors]).dropna().drop_duplicates()
    return [int(t) for t in traces[traces.isin(col(hops, "trace")).to_numpy(dtype=bool)]]


def _kinds_by_trace(findings: pd.DataFrame, traces: list[int]) -> dict[int, list[str]]:
    """trace -> the kinds of the findings about it, sorted."""
    about = np.trunc(finite_floats(col(findings, "trace")))
    mine = np.isin(about, traces)
    kinds: dict[int, set[str]] = {}
    for t, k in zip(about[mine].tolist(), col(findings, "kind")[mine].tolist()):
        kinds.setdefault(int(t), set()).add(str(k))
    return {t: sorted(k) for t, k in kinds.items()}


def _affected_sessions(sessions: pd.DataFrame, error_traces: list[int], limit: int) -> tuple[list[tuple[Any, pd.DataFrame]], int]:
    """(session key, its rows) of the first ``limit`` sessions with an error-finding request or an
    expired-token request, and how many such sessions there are."""
    if not len(sessions) or "trace" not in sessions.columns:
        return [], 0
    bad = sessions["trace"].isin(error_traces).to_numpy(dtype=bool) | truthy_flags(col(sessions, "expired", False))
    key = "session" if "session" in sessions.columns else "subject"
    affected = sessions.loc[bad, key].dropna().drop_duplicates().tolist()
    chosen = affected[:limit]
    rows_of = dict(tuple(sessions[sessions[key].isin(chosen).to_numpy(dtype=bool)].groupby(key, sort=False)))
    keys = [as_int(k) if key == "session" and as_int(k) is not None else k for k in chosen]
    return [(k, rows_of[c]) for k, c in zip(keys, chosen)], len(affected)
