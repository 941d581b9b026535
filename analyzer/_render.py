"""Reports of an analysis: text for a terminal, JSON for programs, Markdown for a PR or a ticket.

Every string that came from the trace DB (services, paths, error messages) is
untrusted: control characters are replaced before it reaches a terminal, so a
recorded path cannot carry escape sequences, and Markdown cells are escaped.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict
from datetime import UTC, datetime

import numpy as np
import pandas as pd

from hoptrace.analyzer._analysis import Analysis
from hoptrace.analyzer._arrays import run_starts
from hoptrace.analyzer._detectors import SEVERITIES

JSON_FORMAT = "hoptrace-analysis"
JSON_VERSION = 1
# Findings of one kind shown in text and Markdown before "... and N more".
_PER_KIND = 5
_ENDPOINT_ROWS = 20
_TREE_LINES = 60
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


# -- helpers ---------------------------------------------------------------------------


def _clean(value, limit: int = 200) -> str:
    """DB text made safe for a terminal: no control characters, bounded length."""
    if value is None or (isinstance(value, float) and math.isnan(value)) or value is pd.NA:
        return ""
    text = _CONTROL.sub("?", str(value))
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def _ms(value) -> str:
    if value is None or pd.isna(value):
        return "-"
    return f"{value / 1000:.2f} s" if value >= 10_000 else f"{value:.1f} ms"


def _left(remaining) -> str:
    """A token's remaining life at a hop, in words."""
    if remaining is None or pd.isna(remaining):
        return ""
    if remaining > 0:
        return f"token {_seconds(remaining)} left"
    return "token expired at exp" if remaining == 0 else f"token expired {_seconds(-remaining)} ago"


def _seconds(value: float) -> str:
    if value >= 7200:
        return f"{value / 3600:.1f} h"
    if value >= 120:
        return f"{value / 60:.1f} min"
    return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"


def _utc(ts) -> str:
    try:
        return datetime.fromtimestamp(float(ts), tz=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (TypeError, ValueError, OverflowError, OSError):
        return "?"


def _status(status, failed) -> str:
    code = "-" if status is None or pd.isna(status) else str(int(status))
    return f"{code}!" if failed else code


def _table(headers: list[str], rows: list[list[str]], right: set[int] = frozenset()) -> list[str]:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]

    def line(cells):
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  " + "  ".join(out).rstrip()

    return [line(headers), *(line(r) for r in rows)]


def _md_cell(value) -> str:
    return _clean(value).replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`")


def _md_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    out += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows]
    return out


def _scope(s: dict) -> str:
    """What the analysis covers, in one line: hops, requests, sessions, captures, time span."""
    return (
        f"{_count(s['hops'], 'hop')} in {_count(s['requests'], 'request')}, {_count(s['sessions'], 'session')},"
        f" {_count(s['captures'], 'capture')}; {_utc(s['started_at'])} to {_utc(s['ended_at'])}"
    )


def _summary(a: Analysis) -> dict:
    hops = a.hops
    counts = a.findings["severity"].value_counts() if len(a.findings) else pd.Series(dtype=int)
    links = hops["link"].value_counts() if len(hops) else pd.Series(dtype=int)
    return {
        "hops": len(hops),
        "requests": int((hops["depth"] == 0).sum()) if len(hops) else 0,
        "sessions": int(a.sessions["session"].nunique()) if len(a.sessions) else 0,
        "captures": len(a.captures),
        "started_at": _num(hops["started_at"].min()) if len(hops) else None,
        "ended_at": _num(hops["ended_at"].max()) if len(hops) else None,
        "findings": {s: int(counts.get(s, 0)) for s in SEVERITIES},
        "links": {k: int(v) for k, v in links.items()},
    }


def _worst(a: Analysis, n: int) -> list[int]:
    """The requests most worth a look: by their worst finding, then how many, then duration."""
    roots = a.hops[a.hops["depth"].to_numpy() == 0]
    if n == 0 or len(roots) == 0:
        return []
    score = pd.DataFrame({"rank": len(SEVERITIES), "count": 0, "ms": roots["duration_ms"].to_numpy()}, index=roots.index)
    f = a.findings.dropna(subset=["trace"])
    if len(f):
        rank = f["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
        by_trace = pd.DataFrame({"trace": f["trace"].astype("int64"), "rank": rank}).groupby("trace")["rank"]
        known = by_trace.min().index.intersection(score.index)
        score.loc[known, "rank"] = by_trace.min()[known]
        score.loc[known, "count"] = by_trace.size()[known]
    score = score.sort_values(["rank", "count", "ms"], ascending=[True, False, False])
    return [int(t) for t in score.index[:n]]


def _tree(a: Analysis, trace: int, limit: int = _TREE_LINES) -> list[str]:
    """One request as an indented tree: service, endpoint, status, time, token life, link."""
    hops = a.trace_hops(trace)
    rows = list(
        zip(
            hops.index,
            hops["parent_id"],
            hops["depth"],
            hops["service"],
            hops["endpoint"],
            hops["status"],
            hops["failed"],
            hops["duration_ms"],
            hops["self_ms"],
            hops["remaining_s"],
            hops["link"],
            hops["on_critical_path"],
        )
    )
    last_child: dict[int, int] = {}
    for hop, parent, *_ in rows:
        if not pd.isna(parent):
            last_child[int(parent)] = hop
    lines, open_levels = [], []
    for hop, parent, depth, service, endpoint, status, failed, ms, own, left, link, critical in rows[:limit]:
        depth = int(depth)
        del open_levels[max(depth - 1, 0) :]
        if depth == 0:
            prefix = ""
        else:
            is_last = last_child.get(int(parent)) == hop
            prefix = "".join("│  " if more else "   " for more in open_levels) + ("└─ " if is_last else "├─ ")
            open_levels.append(not is_last)
        label = f"{prefix}{_clean(service, 40)} {_clean(endpoint, 80)}"
        mark = "*" if critical else " "
        extras = [f"self {_ms(own)}" if own != ms else "", _left(left), "" if link in ("root", "token", "header") else link]
        lines.append(
            f"    {label:<60} {_status(status, failed):>4} {_ms(ms):>10}{mark} {'  '.join(e for e in extras if e)}".rstrip()
        )
    if len(rows) > limit:
        lines.append(f"    … and {len(rows) - limit} more hops")
    return lines


def _num(value):
    """A JSON-safe number: None for NaN/NA/inf."""
    if value is None or value is pd.NA:
        return None
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    if not math.isfinite(f):
        return None
    return int(f) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else f


# -- text --------------------------------------------------------------------------------


def render_text(analysis: Analysis) -> str:
    """A report for a terminal: findings, latency, call graph, the worst requests as hop trees.

    In the trees, ``*`` marks the critical path, ``!`` after a status a failed
    transfer, and the last column the token's remaining life at that hop.
    """
    a = analysis
    s = _summary(a)
    out = [f"hoptrace analysis of {_clean(a.source or 'trace DB')}"]
    if s["hops"]:
        out.append(f"  {_scope(s)}")
    else:
        out.append("  no hops recorded")
    out += [f"  note: {_clean(n, 300)}" for n in a.notes]

    f = a.findings
    n = s["findings"]
    out += ["", f"Findings: {_count(n['error'], 'error')}, {_count(n['warning'], 'warning')}, {n['info']} info"]
    if len(f):
        rows = []
        for kind, group in f.groupby("kind", sort=False):
            for _, row in group.head(_PER_KIND).iterrows():
                trace = "-" if pd.isna(row["trace"]) else str(row["trace"])
                rows.append([row["severity"], kind, trace, _clean(row["service"], 30), _clean(row["message"], 400)])
            if len(group) > _PER_KIND:
                rows.append(["", kind, "", "", f"… and {len(group) - _PER_KIND} more (--format json lists all)"])
        out += _table(["SEVERITY", "KIND", "TRACE", "SERVICE", "MESSAGE"], rows)

    if len(a.services):
        out += ["", "Latency by service (ms)"]
        out += _table(
            ["SERVICE", "COUNT", "ERRORS", "ERR%", "P50", "P95", "P99", "SELF P50"],
            [[_clean(r.service, 30), str(r.count), str(r.errors), f"{100 * r.error_rate:.1f}", f"{r.p50_ms:.1f}",
              f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.self_p50_ms:.1f}"] for r in a.services.itertuples()],
            right={1, 2, 3, 4, 5, 6, 7},
        )  # fmt: skip
        top = a.endpoints.assign(total=a.endpoints["count"] * a.endpoints["p50_ms"]).nlargest(_ENDPOINT_ROWS, "total")
        more = len(a.endpoints) - len(top)
        out += ["", "Latency by endpoint (ms)" + (f", the {len(top)} with most time of {len(a.endpoints)}" if more else "")]
        out += _table(
            ["SERVICE", "ENDPOINT", "COUNT", "ERR%", "P50", "P95", "P99", "SELF P50"],
            [[_clean(r.service, 30), _clean(r.endpoint, 60), str(r.count), f"{100 * r.error_rate:.1f}", f"{r.p50_ms:.1f}",
              f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.self_p50_ms:.1f}"] for r in top.itertuples()],
            right={2, 3, 4, 5, 6, 7},
        )  # fmt: skip
        out += ["", "Calls between services"]
        out += _table(
            ["CALLER", "CALLEE", "CALLS", "ERRORS", "P95 MS"],
            [[_clean(r.caller, 30), _clean(r.callee, 30), str(r.calls), str(r.errors), f"{r.p95_ms:.1f}"] for r in a.edges.itertuples()],
            right={2, 3, 4},
        )  # fmt: skip

    worst = _worst(a, a.config.worst)
    if worst:
        out += ["", f"Worst requests ({len(worst)}; * marks the critical path)"]
        shown = f[f["trace"].isin(worst).fillna(False).to_numpy(bool)]
        kinds = {int(t): sorted(set(k)) for t, k in shown.groupby("trace")["kind"]}
        for trace in worst:
            root = a.hops.loc[trace]
            found = ", ".join(kinds.get(trace, []))
            out.append(
                f"  request {trace}: {_clean(root['service'], 40)} {_clean(root['endpoint'], 80)}"
                f" {_status(root['status'], root['failed'])} in {_ms(root['duration_ms'])} at {_utc(root['started_at'])}"
                + (f"  [{found}]" if found else "")
            )
            out += _tree(a, trace)
    return "\n".join(out) + "\n"


# -- JSON ---------------------------------------------------------------------------------

_HOP_FIELDS = (
    ("id", "id"), ("parent", "parent_id"), ("link", "link"), ("depth", "depth"), ("service", "service"),
    ("endpoint", "endpoint"), ("path", "path"), ("status", "status"), ("failed", "failed"),
    ("started_at", "started_at"), ("duration_ms", "duration_ms"), ("self_ms", "self_ms"),
    ("token", "token_fp"), ("remaining_s", "remaining_s"), ("critical", "on_critical_path"),
)  # fmt: skip


def render_json(analysis: Analysis) -> str:
    """The whole analysis as one JSON document (``"format": "hoptrace-analysis", "version": 1``).

    Top-level keys, in this order:

    - ``format``, ``version``: ``"hoptrace-analysis"``, ``1``. A new version only when a
      key changes meaning or disappears; added keys do not make one.
    - ``source``: the trace DB path. ``config``: the options used (AnalyzerConfig fields).
    - ``summary``: ``hops``, ``requests``, ``sessions``, ``captures``, ``started_at``,
      ``ended_at`` (UNIX seconds, proxy clock), ``findings`` (count per severity),
      ``links`` (count of hops per link kind).
    - ``notes``: sentences about the data (ignored rows, guessed links).
    - ``findings``: list, errors first, then by time. Each: ``kind``, ``severity``
      (error|warning|info), ``trace`` (request id, null for service-wide findings such
      as clock_skew), ``service``, ``caller`` (the service that made the call: the parent
      hop's, ``client`` for a request; null for service-wide findings), ``callee`` (the
      service called, ``client`` for an answer to it), ``endpoint`` (``METHOD /path/{id}``,
      or null), ``hop_ids``, ``message`` (one line), ``details``
      (kind-specific object), ``at`` (UNIX seconds of the first hop involved).
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
    """
    a = analysis
    doc = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "source": a.source,
        "config": _config(a),
        "summary": _summary(a),
        "notes": list(a.notes),
        "findings": _findings_json(a.findings),
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


def _findings_json(findings: pd.DataFrame) -> list[dict]:
    return [
        {"kind": k, "severity": s, "trace": _num(t), "service": _jsonable(svc), "caller": _jsonable(by),
         "callee": _jsonable(to), "endpoint": _jsonable(e), "hop_ids": [int(i) for i in ids],
         "message": m, "details": _jsonable(d), "at": _num(at)}
        for k, s, t, svc, by, to, e, ids, m, d, at in zip(
            findings["kind"], findings["severity"], findings["trace"], findings["service"], findings["caller"],
            findings["callee"], findings["endpoint"], findings["hop_ids"], findings["message"], findings["details"],
            findings["at"],
        )
    ]  # fmt: skip


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
    keys = [key for key, _ in _HOP_FIELDS]
    columns = [_values(ordered.index if column == "id" else ordered[column]) for _, column in _HOP_FIELDS]
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
    """A report for a pull request or a ticket: summary, findings, latency, worst requests."""
    a = analysis
    s = _summary(a)
    out = [f"# hoptrace analysis of `{_md_cell(a.source or 'trace DB')}`", ""]
    if s["hops"]:
        out.append(f"{_scope(s)}.")
    else:
        out.append("No hops recorded.")
    out += [f"- {_md_cell(n)}" for n in a.notes]
    out += [
        "",
        "## Findings",
        "",
        f"{_count(s['findings']['error'], 'error')}, {_count(s['findings']['warning'], 'warning')}, {s['findings']['info']} info.",
        "",
    ]
    if len(a.findings):
        rows = []
        for kind, group in a.findings.groupby("kind", sort=False):
            for _, row in group.head(_PER_KIND).iterrows():
                trace = "" if pd.isna(row["trace"]) else str(row["trace"])
                rows.append([row["severity"], kind, trace, row["service"], row["message"]])
            if len(group) > _PER_KIND:
                rows.append(["", kind, "", "", f"… and {len(group) - _PER_KIND} more"])
        out += _md_table(["Severity", "Kind", "Request", "Service", "Message"], rows)
    if len(a.services):
        out += ["", "## Latency by service", ""]
        out += _md_table(
            ["Service", "Count", "Errors", "Error %", "p50 ms", "p95 ms", "p99 ms", "Self p50 ms"],
            [[r.service, str(r.count), str(r.errors), f"{100 * r.error_rate:.1f}", f"{r.p50_ms:.1f}",
              f"{r.p95_ms:.1f}", f"{r.p99_ms:.1f}", f"{r.self_p50_ms:.1f}"] for r in a.services.itertuples()],
        )  # fmt: skip
        out += ["", "## Calls between services", ""]
        out += _md_table(
            ["Caller", "Callee", "Calls", "Errors", "p95 ms"],
            [[r.caller, r.callee, str(r.calls), str(r.errors), f"{r.p95_ms:.1f}"] for r in a.edges.itertuples()],
        )
    worst = _worst(a, a.config.worst)
    if worst:
        out += ["", "## Worst requests", ""]
        for trace in worst:
            root = a.hops.loc[trace]
            out += [
                (
                    f"### Request {trace}: {_md_cell(root['endpoint'])} → {_status(root['status'], root['failed'])}"
                    f" in {_ms(root['duration_ms'])}"
                ),
                "",
                "```",
                *(line.replace("```", "'''") for line in _tree(a, trace)),
                "```",
                "",
            ]
    return "\n".join(out).rstrip() + "\n"
