"""One self-contained HTML report that opens with the answer, no network needed.

First the story of each error finding in one sentence with its numbers, and its
request's waterfall (for a capture with only warnings: the clearest example of each
warning kind); then the findings grouped by kind, each group a ``<details>``; each
drawn request's hops, each a ``<details>`` with what was recorded about it (redacted
headers and query, the token's header and claims, the time split, a redacted ``curl``).
Charts are inline SVG with their text kept as text (crisp, selectable, searchable).

Everything that came from the trace database is passed through :func:`html.escape`:
a DB may come from a bug report and its paths, headers and messages are untrusted.
A Content-Security-Policy forbids scripts and any fetch: the file only shows.
"""

from __future__ import annotations

import dataclasses
import html
import warnings
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from hoptrace import __version__
from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, as_int, is_missing, token_left
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._merge import by_file
from hoptrace.analyzer._model import Model, findings_about, model, slowest_first, tree_prefixes
from hoptrace.analyzer._types import SEVERITIES
from hoptrace.plot._common import DEFAULT_DPI, PlotError, fmt_ms, fmt_utc, output_format, require_hops, svg_text
from hoptrace.plot._detail import HopDetail, curl_line, hop_details, scrub, timings
from hoptrace.plot._story import story

MAX_ERROR_FINDINGS = 500  # error findings listed in the report at most
MAX_FINDINGS_PER_KIND = 50  # findings of each warning or info kind listed at most
MAX_DETAILED_HOPS = 200  # hops of one drawn request given a detail panel at most
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
svg.chart { max-width: 100%; height: auto; border: 1px solid #eee; display: block; }
.story { font-size: 1.15em; margin: .4em 0 .2em; } .story.sev-error { border-left: 4px solid #C00000; padding-left: .6em; }
.story.sev-warning { border-left: 4px solid #E69F00; padding-left: .6em; }
details { margin: .3em 0; } summary { cursor: pointer; } details.kind > summary { font-weight: 600; }
details.hop > summary { font-family: ui-monospace, "DejaVu Sans Mono", monospace; white-space: pre; font-size: 12.5px; }
details.hop .panel { margin: .3em 0 .8em 1.4em; } pre.curl { white-space: pre-wrap; word-break: break-all; background: #f5f5f5; padding: .4em; }
.lede { font-size: 1.05em; margin: .3em 0; }
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
    max_sessions: int = 3,
    max_error_findings: int = MAX_ERROR_FINDINGS,
    max_findings_per_kind: int = MAX_FINDINGS_PER_KIND,
    dpi: int = DEFAULT_DPI,
    progress: Callable[[str], None] | None = None,
) -> str:
    """The HTML report of ``analysis`` as one string (UTF-8 text, no external resources).

    Sections: the answer (each error finding's story and its request's waterfall, at
    most ``max_waterfalls`` requests drawn, worst first in the presentation model's
    order; without an error finding, the clearest example of each warning kind: the
    worst request having it), the findings grouped by kind, the summary, the workflow
    view of each affected session (at most ``max_sessions``), latency per service, and
    the service call graph. Each drawn request lists its hops, each expandable to what
    was recorded about it (read from ``analysis.source`` for those hops only).

    The findings list every error finding up to ``max_error_findings`` (default 500) and
    the first ``max_findings_per_kind`` (default 50) of each warning and info kind; a
    kind cut short ends with a line saying how many more there are (``hoptrace analyze
    DB --format json`` lists them all). ``progress`` is told each stage as it starts.
    ``dpi`` is kept for callers of the PNG era: SVG charts have no resolution.
    """
    from hoptrace.plot._graph import graph_layout, graph_svg
    from hoptrace.plot._latency import latency_layout, latency_svg

    say = progress or (lambda stage: None)
    require_hops(analysis)
    m = model(analysis)
    db_name = source or Path(str(analysis.source or "")).name
    heading = title or f"hoptrace report: {db_name or 'trace database'}"
    say("stories and waterfalls")
    shown, error_traces = _charted_requests(m, max_waterfalls)
    answer = _answer_section(m, shown, error_traces, max_waterfalls)
    say("findings")
    findings = _findings_table(m, set(shown), max_error_findings, max_findings_per_kind, db_name or "DB")
    say("workflows")
    workflows = _workflows_section(analysis, error_traces, max_sessions)
    say("latency and service graph")
    parts = [
        _head(heading, m),
        answer,
        findings,
        _summary(analysis, m),
        workflows,
        '<section id="latency"><h2>Latency and errors per service</h2>',
        _chart("latency-chart", "latency", "Latency per service", "",
               lambda: latency_svg(latency_layout(analysis.hops, analysis.services))),
        _latency_table(analysis.services),
        '</section><section id="services"><h2>Service call graph</h2>',
        _chart("services-chart", "services", "Calls between services", "", lambda: graph_svg(graph_layout(m.graph[1], m.graph[0]))),
        "</section></body></html>",
    ]
    return "\n".join(parts)


def _head(heading: str, m: Model) -> str:
    sm = m.summary
    by_sev = ", ".join(f"{sm['findings'][k]} {k}" for k in SEVERITIES)
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{CSP}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{_e(heading)}</title><style>{STYLE}</style></head><body>",
        f"<h1>{_e(heading)}</h1>",
        f'<p class="lede">{sm["hops"]} hops in {sm["requests"]} requests, {fmt_utc(sm["started_at"])} to '
        f'{fmt_utc(sm["ended_at"])}; findings: {_e(by_sev)}.</p>',
        '<nav><a href="#answer">What went wrong</a><a href="#findings">Findings</a><a href="#summary">Summary</a>'
        '<a href="#workflows">Workflows</a><a href="#latency">Latency</a><a href="#services">Services</a></nav>',
        f'<p class="meta">Generated {_e(datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%S UTC"))} by hoptrace '
        f"{_e(__version__)}. Times are the proxy's clock, in UTC.</p>",
    ])  # fmt: skip


def _charted_requests(m: Model, limit: int) -> tuple[list[int], list[int]]:
    """(the requests to draw, every request with an error finding), both worst first."""
    error_traces = m.with_error_findings()
    shown = error_traces[:limit] if error_traces else m.worst(min(limit, 1))
    return shown, error_traces


def _answer_section(m: Model, shown: list[int], error_traces: list[int], limit: int) -> str:
    """Each error finding's story and its request's waterfall; else one example per warning kind."""
    groups = [g for g in m.finding_groups if g.severity == "error"]
    out = ['<section id="answer">']
    if groups:
        n = sum(len(g) for g in groups)
        out.append(f"<h2>What went wrong: {n} error finding{'s' * (n != 1)} in {len(error_traces)} "
                   f"request{'s' * (len(error_traces) != 1)}</h2>")  # fmt: skip
        examples = [f for g in groups for f in g.rows.to_dict("records")]
    else:
        warn = [g for g in m.finding_groups if g.severity == "warning"]
        out.append("<h2>No error finding" + ("; the clearest example of each warning kind</h2>" if warn else "</h2>"))
        rank = {t: k for k, t in enumerate(m.worst_order)}
        examples = sorted((_clearest(m, g) for g in warn), key=lambda f: rank.get(as_int(f["trace"]), len(rank)))
        if examples:
            shown = list(dict.fromkeys(as_int(f["trace"]) for f in examples if as_int(f["trace"]) is not None))[:limit]
        elif shown:  # _charted_requests' choice: the worst request
            out.append("<p>No request has an error or warning finding. The worst request:</p>")
    told = examples[:limit] if examples else []
    m = _model_of(m, {*shown, *(as_int(f["trace"]) for f in told)} - {None})
    details = by_file(m.analysis.files or (m.analysis.source,), [h for t in shown for h in _detailed_hops(m, t)], hop_details)
    drawn: set[int] = set()
    for f in told:
        out.append(f'<p class="story sev-{_e(f["severity"])}">{_e(story(m, f))}</p>')
        trace = as_int(f["trace"])
        if trace in shown and trace not in drawn:
            drawn.add(trace)
            out.append(_request_block(m, trace, details))
    out += [_request_block(m, t, details) for t in shown if t not in drawn and not examples]
    if len(examples) > limit or len(error_traces) > len(drawn) and groups:
        out.append(f'<p class="warn">Told {min(len(examples), limit)} of {len(examples)} findings and drew '
                   f"{len(drawn)} of {len(error_traces)} requests, worst first; the findings below list them, "
                   "<code>hoptrace plot DB --trace ID</code> draws any request.</p>")  # fmt: skip
    out.append("</section>")
    return "".join(out)


def _model_of(m: Model, traces: set[int]) -> Model:
    """The model of ``traces`` alone: their hops, and the findings about them or touching their hops.

    What a story, a waterfall or a hop list looks up (a request's hops, its tier and finding
    kinds, the findings about it) is then found among a few hundred rows instead of scanned
    for in the whole capture, once per request drawn: at a million hops each such scan cost
    tens of milliseconds, and the finding kinds of every request were gathered in Python."""
    a = m.analysis
    hops = a.hops[a.hops["trace"].isin(traces).to_numpy()]
    return model(dataclasses.replace(a, hops=hops, findings=findings_about(a.findings, hops.index, traces)))


def _clearest(m: Model, group) -> dict:
    """The finding of ``group`` about the request highest in the worst-first order."""
    rank = m.tiers.index.get_indexer(group.rows["trace"].fillna(-1).astype("int64"))
    rank = [r if r >= 0 else len(m.tiers) for r in rank]
    return group.rows.iloc[int(min(range(len(rank)), key=rank.__getitem__))].to_dict()


def _request_block(m: Model, trace: int, details: dict[int, HopDetail]) -> str:
    from hoptrace.plot._svg import waterfall_svg
    from hoptrace.plot._waterfall import waterfall_layout

    r = m.request(trace)
    caption = f"Request {trace}: {r.service} {r.method} {r.path} → {r.ended}"
    a = m.analysis
    draw = lambda: waterfall_svg(waterfall_layout(a.trace_hops(trace), a.tokens, a.findings))  # noqa: E731
    chart = _chart(f"trace-{trace}", "waterfall", caption, ", ".join(r.kinds), draw, data={"trace": trace})
    return chart + _hop_list(m, trace, details)


def _detailed_hops(m: Model, trace: int) -> list[int]:
    return [int(h) for h in m.hop_rows(trace).index[:MAX_DETAILED_HOPS]]


def _hop_list(m: Model, trace: int, details: dict[int, HopDetail]) -> str:
    """The request's hops, each a ``<details>`` opening onto what was recorded about it."""
    rows = m.hop_rows(trace)
    shown = rows.iloc[:MAX_DETAILED_HOPS]
    out = [f'<details class="hops"><summary>The {len(rows)} hop{"s" * (len(rows) != 1)} of request {trace}, '
           "each with its headers, token and timings</summary>"]  # fmt: skip
    for prefix, (hop, h) in zip(tree_prefixes(shown), shown.iterrows()):
        line = f"{prefix}{h['service']} {h['method']} {h['path']} → {h['ended']} · {fmt_ms(h['duration_ms'])}"
        out.append(f'<details class="hop" id="detail-hop-{int(hop)}"><summary>{_e(line)}</summary><div class="panel">'
                   f"{_hop_panel(h, details.get(int(hop)))}</div></details>")  # fmt: skip
    if len(rows) > len(shown):
        out.append(f'<p class="warn">{len(rows) - len(shown)} more hops not detailed here.</p>')
    return "".join([*out, "</details>"])


def _hop_panel(h, d: HopDetail | None) -> str:
    link = f"{h['link']}" + ("" if as_int(h.get("link_candidates")) in (None, 1) else
                             f" (a guess among {as_int(h['link_candidates'])} candidates)")  # fmt: skip
    facts = [("hop", int(h.name)), ("started", fmt_utc(h["started_at"])), ("linked to its caller by", link)]
    if "file" in h:  # several files joined: where this hop was recorded, and its id there
        facts.insert(1, ("recorded in", f"{h['file']}, hop {as_int(h['file_hop'])}"))
    left = token_left(h.get("remaining_s"))
    if left:
        facts.append(("token at this hop", left))
    if d is None:
        return _pairs(facts) + '<p class="meta">Headers and timings: not available (the trace DB could not be read).</p>'
    facts.append(("query", scrub(d.hop.get("query")) or "(none)"))
    split = ", ".join(f"{name} {'reused connection' if v is None and name == 'connect' else fmt_ms(v)}"
                      for name, v in timings(d.hop))  # fmt: skip
    facts.append(("time split", split))
    parts = [_pairs(facts), "<p><b>Request headers</b> (redacted when recorded)</p>", _pairs(d.request_headers),
             "<p><b>Response headers</b></p>", _pairs(d.response_headers)]  # fmt: skip
    for t in d.tokens:
        parts.append(_token_panel(t, h["started_at"]))
    parts.append(f'<p><b>curl</b> (secrets left as variables)</p><pre class="curl">{_e(curl_line(d.hop, d.request_headers))}</pre>')
    return "".join(parts)


def _token_panel(t: dict, at) -> str:
    exp, start = as_float(t.get("exp")), as_float(at)
    life = token_left(exp - start) if exp is not None and start is not None else "no exp"
    head = [("fingerprint", t["fingerprint"]), ("role", f"{t['role']} ({t['location']})"), ("kind", t["kind"]),
            ("alg", t["alg"]), ("kid", t["kid"]), ("typ", t["typ"]), ("remaining life at this hop", life)]  # fmt: skip
    claims = [(k, scrub(v if not isinstance(v, float) or k not in ("exp", "iat", "nbf") else f"{v} ({fmt_utc(v)})"))
              for k, v in t["claims"].items()]  # fmt: skip
    note = f'<p class="warn">{_e(scrub(t["error"]))}</p>' if t.get("error") else ""
    return f"<p><b>Token</b>: header</p>{_pairs(head)}<p>claims (decoded; no signature is stored)</p>{_pairs(claims)}{note}"


def _pairs(rows) -> str:
    if not rows:
        return '<p class="meta">(none recorded)</p>'
    cells = "".join(f"<tr><th>{_e(k)}</th><td>{_e(scrub(v))}</td></tr>" for k, v in rows if not is_missing(v))
    return f'<table class="kv"><tbody>{cells}</tbody></table>'


def _workflows_section(analysis: Analysis, error_traces: list[int], limit: int) -> str:
    from hoptrace.plot._session import session_layout, session_svg

    groups, affected = _affected_sessions(analysis.sessions, error_traces, limit)
    out = ['<section id="workflows"><h2>Affected workflows</h2>']
    if not groups:
        out.append("<p>No workflow has a request with an error finding or one sent with an expired token.</p>")
    for key, rows in groups:
        subjects = ", ".join(sorted({str(s) for s in rows["subject"].dropna()})) or "unknown subject"
        caption = f"Session {key} ({subjects}): {len(rows)} requests"
        draw = lambda rows=rows: session_svg(session_layout(analysis, rows))  # noqa: E731
        out.append(_chart(f"session-{key}", "session", caption, "", draw, data={"session": key}))
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
    if kwargs.get("progress"):
        kwargs["progress"]("writing")
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise PlotError(f"{path}: cannot write: {exc.strerror or exc}") from None
    return path


def _chart(anchor: str, kind: str, caption: str, sub: str, draw: Callable, data: dict | None = None) -> str:
    """A figure holding the chart as inline SVG (its text kept as text), or a line saying why not.

    ``draw`` returns a matplotlib Figure, or SVG text already (the waterfall's direct drawing)."""
    attrs = "".join(f' data-{k}="{_e(v)}"' for k, v in (data or {}).items())
    try:
        drawn = draw()
        svg = drawn if isinstance(drawn, str) else svg_text(drawn)
    except (AnalysisError, ValueError, KeyError, TypeError, IndexError) as exc:
        warnings.warn(f"hoptrace report: {kind} chart {anchor} not drawn: {exc}", stacklevel=2)
        return (
            f'<figure id="{_e(anchor)}"><figcaption>{_e(caption)}</figcaption>'
            f'<p class="bad">This chart could not be drawn: {_e(exc)}</p></figure>'
        )
    extra = f' <span class="meta">({_e(sub)})</span>' if sub else ""
    label = f'class="chart" role="img" data-chart="{_e(kind)}"{attrs} aria-label="{_e(kind)} chart: {_e(caption)}"'
    return (
        f'<figure id="{_e(anchor)}"><figcaption>{_e(caption)}{extra}</figcaption>'
        + svg.replace("<svg ", f"<svg {label} ", 1)
        + "</figure>"
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
    head = ('<table class="findings"><thead><tr><th>severity</th><th>kind</th><th>service</th><th>request</th>'
            "<th>hops</th><th>at (UTC)</th><th>message</th></tr></thead><tbody>")  # fmt: skip
    full_list = f"<code>hoptrace analyze {_e(db_name)} --format json</code>"
    for group in m.finding_groups:
        cap = errors_left if group.severity == "error" else per_kind
        shown = group.rows.head(max(cap, 0))
        errors_left -= len(shown) if group.severity == "error" else 0
        listed += len(shown)
        opened = " open" if group.severity == "error" else ""
        rows.append(f'<details class="kind sev-{_e(group.severity)}"{opened}><summary>{_e(group.kind)} × {len(group)} '
                    f"({_e(group.severity)})</summary>{head}")  # fmt: skip
        rows += [_finding_row(f, linked) for f in shown.to_dict("records")]
        more = len(group) - len(shown)
        if more:
            rows.append(
                f'<tr class="more-findings"><td colspan="7">… and {more} more {_e(group.kind)} '
                f"finding{'s' * (more != 1)} ({_e(group.severity)}) not listed; {full_list} lists all.</td></tr>"
            )
        rows.append("</tbody></table></details>")
    if listed < total:
        out.append(
            f'<p class="warn">Listing {listed} of {total} findings: every error finding up to '
            f"{max_errors} and the first {per_kind} of each other kind. The summary counts them all; "
            f"{full_list} lists them all.</p>"
        )
    return "".join([*out, *rows, "</section>"])


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
