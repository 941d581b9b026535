"""Reports of an analysis: text for a terminal, JSON for programs, Markdown for a PR or a ticket.

They only format the presentation model (:mod:`hoptrace.analyzer._model`): the text and
Markdown reports are built from the same sections (:func:`_sections`), each written out
by its own small formatter. Every string that came from the trace DB is cleaned of
control characters (:func:`hoptrace._format.clean`) and Markdown cells are escaped.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from hoptrace._format import as_float, clean, count, md_cell, md_table, ms, text_table, token_left, utc
from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._arrays import run_starts
from hoptrace.analyzer._model import Model, model, tree_prefixes

JSON_FORMAT = "hoptrace-analysis"
JSON_VERSION = 1
# Findings of one kind shown in text and Markdown before "... and N more".
_PER_KIND = 5
_ENDPOINT_ROWS = 20
_TREE_LINES = 60


# -- sections shared by text and Markdown -----------------------------------------------


@dataclass(frozen=True)
class Table:
    title: str
    headers: list[str]
    rows: list[list[str]]
    right: frozenset[int] = frozenset()  # right-aligned columns (numbers)


@dataclass(frozen=True)
class Tree:
    title: str
    lines: list[str]


def _scope(s: dict) -> str:
    """What the analysis covers, in one line: hops, requests, sessions, captures, time span."""
    if not s["hops"]:
        return "no hops recorded"
    return (
        f"{count(s['hops'], 'hop')} in {count(s['requests'], 'request')}, {count(s['sessions'], 'session')},"
        f" {count(s['captures'], 'capture')}; {utc(s['started_at'])} to {utc(s['ended_at'])}"
    )


def _findings_rows(m: Model, more: str) -> list[list[str]]:
    rows = []
    for group in m.finding_groups:
        for trace, service, message in zip(*(group.rows[c].head(_PER_KIND) for c in ("trace", "service", "message"))):
            request = "-" if pd.isna(trace) else str(trace)
            rows.append([group.severity, group.kind, request, clean(service, 30), clean(message, 400)])
        if len(group) > _PER_KIND:
            rows.append(["", group.kind, "", "", f"… and {len(group) - _PER_KIND} more{more}"])
    return rows


def _latency_tables(a: Analysis) -> list[Table]:
    def stats(r) -> list[str]:
        return [f"{100 * r.error_rate:.1f}", f"{r.p50_ms:.1f}", f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.self_p50_ms:.1f}"]

    top = a.endpoints.assign(total=a.endpoints["count"] * a.endpoints["p50_ms"]).nlargest(_ENDPOINT_ROWS, "total")
    cut = f", the {len(top)} with most time of {len(a.endpoints)}" if len(top) < len(a.endpoints) else ""
    numbers = ["ERR%", "P50", "P95", "P99", "SELF P50"]
    return [
        Table("Latency by service (ms)", ["SERVICE", "COUNT", "ERRORS", *numbers],
              [[clean(r.service, 30), str(r.count), str(r.errors), *stats(r)] for r in a.services.itertuples()],
              frozenset(range(1, 8))),
        Table(f"Latency by endpoint (ms){cut}", ["SERVICE", "ENDPOINT", "COUNT", *numbers],
              [[clean(r.service, 30), clean(r.endpoint, 60), str(r.count), *stats(r)] for r in top.itertuples()],
              frozenset(range(2, 8))),
        Table("Calls between services", ["CALLER", "CALLEE", "CALLS", "ERRORS", "P95 MS"],
              [[clean(r.caller, 30), clean(r.callee, 30), str(r.calls), str(r.errors), f"{r.p95_ms:.1f}"]
               for r in a.edges.itertuples()], frozenset({2, 3, 4})),
    ]  # fmt: skip


def request_tree(m: Model, trace: int, limit: int = _TREE_LINES) -> list[str]:
    """One request as an indented tree: service, endpoint, how it ended, time, token life, link."""
    hops = m.hop_rows(trace)
    columns = ("service", "endpoint", "ended", "duration_ms", "self_ms", "remaining_s", "link", "on_critical_path")
    lines = []
    for prefix, values in zip(tree_prefixes(hops)[:limit], zip(*(hops[c] for c in columns))):
        service, endpoint, ended, total, own, left, link, critical = values
        label = f"{prefix}{clean(service, 40)} {clean(endpoint, 80)}"
        guessed = "" if link in ("root", "token", "header") else link
        extras = "  ".join(e for e in (f"self {ms(own)}" if own != total else "", token_left(left), guessed) if e)
        mark = "*" if critical else " "
        lines.append(f"    {label:<60} {clean(ended, 40):>4} {ms(total, '-'):>10}{mark} {extras}".rstrip())
    if len(hops) > limit:
        lines.append(f"    … and {len(hops) - limit} more hops")
    return lines


def _worst_trees(m: Model) -> list[Tree]:
    out = []
    for trace in m.worst(m.analysis.config.worst):
        r = m.request(trace)
        found = f"  [{', '.join(r.kinds)}]" if r.kinds else ""
        title = (
            f"request {trace}: {clean(r.service, 40)} {clean(r.endpoint, 80)} {clean(r.ended, 60)}"
            f" in {ms(r.duration_ms, '-')} at {utc(r.started_at)}{found}"
        )
        out.append(Tree(title, request_tree(m, trace)))
    return out


def _sections(a: Analysis, more: str) -> tuple[Model, list[list[str]], list[Table], list[Tree]]:
    """What both the text and the Markdown report show: the model, findings rows, latency tables, worst trees."""
    m = model(a)
    tables = _latency_tables(a) if len(a.services) else []
    return m, _findings_rows(m, more), tables, _worst_trees(m)


# -- text --------------------------------------------------------------------------------


def _severity_counts(s: dict) -> str:
    n = s["findings"]
    return f"{count(n['error'], 'error')}, {count(n['warning'], 'warning')}, {n['info']} info"


def render_text(analysis: Analysis) -> str:
    """A report for a terminal: findings, latency, call graph, the worst requests as hop trees.

    In the trees, ``*`` marks the critical path, the column after the endpoint says how the
    hop ended (``401``, ``no response (timeout)``, ``200, then broken (truncated)``), and
    the last column the token's remaining life at that hop. The requests are in the
    model's worst-first order (:mod:`hoptrace.analyzer._model`).
    """
    m, findings, tables, trees = _sections(analysis, " (--format json lists all)")
    s = m.summary
    out = [f"hoptrace analysis of {clean(analysis.source or 'trace DB')}", f"  {_scope(s)}"]
    out += [f"  note: {clean(n, 300)}" for n in analysis.notes]
    out += ["", f"Findings: {_severity_counts(s)}"]
    if findings:
        out += text_table(["SEVERITY", "KIND", "TRACE", "SERVICE", "MESSAGE"], findings)
    for t in tables:
        out += ["", t.title, *text_table(t.headers, t.rows, t.right)]
    if trees:
        out += ["", f"Worst requests ({len(trees)}; * marks the critical path)"]
        for tree in trees:
            out += [f"  {tree.title}", *tree.lines]
    return "\n".join(out) + "\n"


# -- JSON ---------------------------------------------------------------------------------

_HOP_FIELDS = (
    ("id", "id"), ("parent", "parent_id"), ("link", "link"), ("depth", "depth"), ("service", "service"),
    ("method", "method"), ("path", "path"), ("endpoint", "endpoint"), ("status", "status"), ("failed", "failed"),
    ("error", "error"), ("started_at", "started_at"), ("ended_at", "ended_at"), ("duration_ms", "duration_ms"),
    ("self_ms", "self_ms"), ("token", "token_fp"), ("subject", "token_sub"), ("token_exp", "token_exp"),
    ("remaining_s", "remaining_s"), ("critical", "on_critical_path"),
)  # fmt: skip
"""(JSON key, hops column) of each hop in ``traces[].hops``: the documented per-hop keys, in order."""
_FILE_FIELDS = (("file", "file"), ("file_hop", "file_hop"))
"""What a hop of several joined files adds: the file it came from and its id there."""
TOP_KEYS = ("format", "version", "source", "config", "summary", "notes", "findings", "worst", "latency", "sessions", "traces")
TRACE_KEYS = ("trace", "root", "session", "service", "endpoint", "status", "started_at", "duration_ms", "critical_path", "hops")


def _num(value):
    """A JSON-safe number: None for NaN/NA/inf, an int stays an int."""
    if isinstance(value, (bool, np.bool_)):
        return float(value)
    f = as_float(value)
    if f is None:
        return None
    return int(f) if isinstance(value, (int, np.integer)) else f


def render_json(analysis: Analysis) -> str:
    """The whole analysis as one JSON document (``"format": "hoptrace-analysis", "version": 1``).

    Top-level keys, in this order:

    - ``format``, ``version``: ``"hoptrace-analysis"``, ``1``. A new version only when a
      key changes meaning or disappears; added keys do not make one.
    - ``source``: the trace DB path.
    - ``config``: the options used (AnalyzerConfig fields).
    - ``summary``: ``hops``, ``requests``, ``sessions``, ``captures``, ``started_at``,
      ``ended_at`` (UNIX seconds, proxy clock), ``findings`` (count per severity),
      ``links`` (count of hops per link kind).
    - ``notes``: sentences about the data (ignored rows, guessed links).
    - ``findings``: list, by severity (error, warning, info), then by time. Each: ``kind``, ``severity``
      (error|warning|info), ``trace`` (request id, null for service-wide findings such
      as clock_skew), ``service``, ``caller`` (the service that made the call: the parent
      hop's, ``client`` for a request; null for service-wide findings), ``callee`` (the
      service called, ``client`` for an answer to it), ``endpoint`` (``METHOD /path/{id}``,
      or null), ``hop_ids``, ``message`` (one line), ``details``
      (kind-specific object), ``at`` (UNIX seconds of the first hop involved).
    - ``worst``: the ids of the requests most worth a look, worst first (as many as
      ``config.worst``; the order is :mod:`hoptrace.analyzer._model`'s, the same the
      text report, `hoptrace plot` and the HTML report use).
    - ``latency``: ``services`` (per service: ``service``, ``count``, ``errors``,
      ``error_rate``, ``client_errors``, ``p50_ms``, ``p95_ms``, ``p99_ms``, ``max_ms``,
      ``self_p50_ms``, ``self_p95_ms``), ``endpoints`` (the same plus ``endpoint``),
      ``edges`` (``caller``, ``callee``, ``calls``, ``errors``, ``p50_ms``, ``p95_ms``;
      caller ``client`` for requests, ``unknown`` for orphans).
    - ``sessions``: list of ``{session, subject, traces}`` (request ids in time order).
    - ``traces``: one per request, in time order: ``trace`` (its id: the root hop's id),
      ``root``, ``session``, ``service``, ``endpoint``, ``status``, ``started_at``,
      ``duration_ms``, ``critical_path`` (hop ids), and ``hops``, depth first, each:
      ``id``, ``parent`` (null for the root), ``link`` (root|header|token|nesting|
      ambiguous|orphan: how the parent was found), ``depth``, ``service``, ``method``,
      ``path``, ``endpoint``, ``status`` (null: no response), ``failed`` (0|1),
      ``error``, ``started_at``, ``ended_at``, ``duration_ms``, ``self_ms``, ``token``
      (fingerprint), ``subject``, ``token_exp``, ``remaining_s`` (token life left when
      the hop started, negative once expired), ``critical`` (on the critical path).

    Numbers that are unknown are null, never NaN.

    Several files joined into one analysis (see :mod:`hoptrace.analyzer._merge`): each hop
    also has ``file`` (the file it came from) and ``file_hop`` (its id there), and each
    finding ``files``: ``[file, id there]`` for each of its ``hop_ids``.
    """
    a = analysis
    m = model(a)
    doc = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "source": a.source,
        "config": _config(a),
        "summary": m.summary,
        "notes": list(a.notes),
        "findings": _findings_json(a.findings, a.hops),
        "worst": m.worst(a.config.worst),
        "latency": {
            "services": _records(a.services),
            "endpoints": _records(a.endpoints),
            "edges": _records(a.edges),
        },
        "sessions": _sessions_json(a.sessions),
        "traces": _traces_json(a),
    }
    return json.dumps(doc, ensure_ascii=False, allow_nan=False) + "\n"


def _config(a: Analysis) -> dict:
    out = asdict(a.config)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, float, np.integer, np.floating)) or value is None or value is pd.NA:
        return _num(value)
    return str(value)


def _records(frame: pd.DataFrame) -> list[dict]:
    columns = list(frame.columns)
    return [{c: _jsonable(v) for c, v in zip(columns, row)} for row in frame.itertuples(index=False)]


def _findings_json(findings: pd.DataFrame, hops: pd.DataFrame) -> list[dict]:
    out = [
        {"kind": k, "severity": s, "trace": _num(t), "service": _jsonable(svc), "caller": _jsonable(by),
         "callee": _jsonable(to), "endpoint": _jsonable(e), "hop_ids": [int(i) for i in ids],
         "message": m, "details": _jsonable(d), "at": _num(at)}
        for k, s, t, svc, by, to, e, ids, m, d, at in zip(
            findings["kind"], findings["severity"], findings["trace"], findings["service"], findings["caller"],
            findings["callee"], findings["endpoint"], findings["hop_ids"], findings["message"], findings["details"],
            findings["at"],
        )
    ]  # fmt: skip
    if "file" in hops:  # several files joined: where each hop of the evidence was recorded
        where = dict(zip(hops.index.tolist(), zip(_values(hops["file"]), hops["file_hop"].tolist(), strict=True), strict=True))
        for finding in out:
            finding["files"] = [list(where.get(i, (None, None))) for i in finding["hop_ids"]]
    return out


def _sessions_json(sessions: pd.DataFrame) -> list[dict]:
    out = []
    for session, group in sessions.groupby("session", sort=True):
        subject = group["subject"].dropna()
        out.append({
            "session": int(session), "subject": str(subject.iloc[0]) if len(subject) else None,
            "traces": [int(t) for t in group["trace"]],
        })  # fmt: skip
    return out


def _traces_json(a: Analysis) -> list[dict]:
    hops = a.hops
    if len(hops) == 0:
        return []
    ordered = hops.sort_values(["trace", "order"], kind="stable")
    fields = (*_HOP_FIELDS, *_FILE_FIELDS) if "file" in hops else _HOP_FIELDS
    keys = [key for key, _ in fields]
    columns = [_values(ordered.index if column == "id" else ordered[column]) for _, column in fields]
    rows = [dict(zip(keys, values)) for values in zip(*columns)]
    session_of = dict(zip(a.sessions["trace"].tolist(), a.sessions["session"].tolist()))
    starts = np.flatnonzero(run_starts(ordered["trace"].to_numpy()))
    ends = np.r_[starts[1:], len(rows)]
    out = []
    for first, last in zip(starts.tolist(), ends.tolist()):
        root, tree = rows[first], rows[first:last]
        out.append({
            "trace": root["id"], "root": root["id"], "session": session_of.get(root["id"]),
            "service": root["service"], "endpoint": root["endpoint"], "status": root["status"],
            "started_at": root["started_at"], "duration_ms": root["duration_ms"],
            "critical_path": [h["id"] for h in tree if h["critical"]], "hops": tree,
        })  # fmt: skip
    out.sort(key=lambda t: (t["started_at"], t["trace"]))
    return out


def _values(column) -> list:
    """A column as JSON-ready Python values (None for missing), converted in bulk."""
    if isinstance(column.dtype, pd.CategoricalDtype):
        labels = np.asarray(column.cat.categories, dtype=object)
        codes = column.cat.codes.to_numpy()
        return np.where(codes >= 0, labels[codes], None).tolist()
    array = (
        column.to_numpy(dtype=object, na_value=None)
        if isinstance(column.dtype, pd.api.extensions.ExtensionDtype)
        else column.to_numpy()
    )
    if array.dtype.kind == "f":
        finite = np.isfinite(array)
        array = array.astype(object)
        array[~finite] = None
    return array.tolist()


# -- Markdown ------------------------------------------------------------------------------


def render_markdown(analysis: Analysis) -> str:
    """A report for a pull request or a ticket: the text report's sections as Markdown."""
    m, findings, tables, trees = _sections(analysis, "")
    s = m.summary
    out = [f"# hoptrace analysis of `{md_cell(analysis.source or 'trace DB')}`", "", f"{_scope(s)}."]
    out += [f"- {md_cell(n)}" for n in analysis.notes]
    out += ["", "## Findings", "", f"{_severity_counts(s)}.", ""]
    if findings:
        out += md_table(["Severity", "Kind", "Request", "Service", "Message"], findings)
    for t in tables:
        out += ["", f"## {t.title[0]}{t.title[1:]}", "", *md_table([h.capitalize() for h in t.headers], t.rows)]
    if trees:
        out += ["", "## Worst requests", ""]
        for tree in trees:
            lines = [line.replace("```", "\'\'\'") for line in tree.lines]
            out += [f"### {md_cell(tree.title[0].upper() + tree.title[1:])}", "", "```", *lines, "```", ""]
    return "\n".join(out).rstrip() + "\n"
