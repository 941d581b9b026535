"""Interaction coverage of a trace DB: which endpoints and caller -> callee calls a run exercised.

Pure steps over the analysis: every hop gets its endpoint (the OpenAPI template it
matches, else the analyzer's normalised path), its status class and its caller (the
service of its parent hop, ``client`` for a request); then grouped per endpoint and per
edge, and checked against the documented operations.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from hoptrace._openapi import Operation, response_seen
from hoptrace.analyzer._prepare import normalise_path

CLIENT = "client"


@dataclass
class Coverage:
    """``endpoints``: service method path calls classes statuses callers documented;
    ``edges``: caller callee method path calls classes; ``operations`` (empty without
    documents): service method path operation_id called missing_responses."""

    source: str
    endpoints: pd.DataFrame
    edges: pd.DataFrame
    operations: pd.DataFrame
    specs: list[str] = field(default_factory=list)  # services with a document

    @property
    def never_called(self) -> pd.DataFrame:
        return self.operations[~self.operations["called"]] if len(self.operations) else self.operations

    @property
    def errors_never_seen(self) -> pd.DataFrame:
        """Exercised endpoints that never answered 4xx, 5xx or failed: their error paths went untested."""
        e = self.endpoints
        return e[~e["classes"].map(lambda classes: any(k not in ("2xx", "3xx") for k in classes)).astype(bool)]


def coverage_of(analysis, operations: list[Operation] = ()) -> Coverage:
    hops = _classified(analysis.hops, operations)
    return Coverage(
        source=str(analysis.source or ""),
        endpoints=_endpoints(hops),
        edges=_edges(hops),
        operations=_operations(hops, operations),
        specs=sorted({op.service for op in operations}),
    )


def _classified(hops: pd.DataFrame, operations: list[Operation]) -> pd.DataFrame:
    """Per hop: service, method, path (template), caller, status, status class."""
    frame = pd.DataFrame(
        {
            "service": _text(hops["service"]),
            "method": _text(hops["method"]),
            "raw": _text(hops["path"]),
            "status": hops["status"],
            "caller": caller_services(hops).to_numpy(),
        },
        index=hops.index,
    )
    by_service: dict[str, list[Operation]] = {}
    for op in operations:
        by_service.setdefault(op.service, []).append(op)
    templates = {}
    for key in frame[["service", "method", "raw"]].drop_duplicates().itertuples(index=False):
        templates[tuple(key)] = _template(by_service.get(key.service, ()), key.method, key.raw)
    keys = list(zip(frame["service"], frame["method"], frame["raw"]))
    frame["path"] = [templates[k][0] for k in keys]
    frame["documented"] = [templates[k][1] for k in keys]
    frame["class"] = [_status_class(s) for s in frame["status"]]
    return frame


def _text(column: pd.Series) -> pd.Series:
    """A text column with "" for none: a hostile file's NULL path is no path, not a crash."""
    return column.astype(object).fillna("").astype(str)


def _template(ops, method: str, raw: str) -> tuple[str, bool | None]:
    """The documented template a path matches; else the normalised path, and whether a document knew it."""
    for op in ops:
        if op.matches(method, raw):
            return op.template, True
    return normalise_path(raw), (False if ops else None)


def caller_services(hops: pd.DataFrame) -> pd.Series:
    """Per hop, the service of its parent hop: who called it (``client`` for a request)."""
    service_of = hops["service"].astype(str)
    return hops["parent_id"].astype("float64").map(service_of).fillna(CLIENT).astype(str)


def _status_class(status) -> str:
    """2xx .. 5xx, or ``error`` when no response came back (refused, reset, timeout)."""
    return "error" if pd.isna(status) else f"{int(status) // 100}xx"


def _endpoints(hops: pd.DataFrame) -> pd.DataFrame:
    columns = ["service", "method", "path", "calls", "classes", "statuses", "callers", "documented"]
    if hops.empty:
        return pd.DataFrame(columns=columns)
    grouped = hops.groupby(["service", "method", "path"], sort=True, observed=True)
    out = grouped.agg(
        calls=("class", "size"),
        classes=("class", lambda c: sorted(set(c))),
        statuses=("status", lambda s: sorted({int(v) for v in s.dropna()})),
        callers=("caller", lambda c: sorted(set(c))),
        documented=("documented", "first"),
    ).reset_index()
    return out[columns]


def _edges(hops: pd.DataFrame) -> pd.DataFrame:
    columns = ["caller", "callee", "method", "path", "calls", "classes"]
    if hops.empty:
        return pd.DataFrame(columns=columns)
    grouped = hops.rename(columns={"service": "callee"}).groupby(["caller", "callee", "method", "path"], sort=True)
    out = grouped.agg(calls=("class", "size"), classes=("class", lambda c: sorted(set(c)))).reset_index()
    return out[columns]


def _operations(hops: pd.DataFrame, operations: list[Operation]) -> pd.DataFrame:
    seen = {
        key: set(group["status"].dropna().astype(int)) for key, group in hops.groupby(["service", "method", "path"], sort=False)
    }
    rows = []
    for op in operations:
        statuses = seen.get((op.service, op.method, op.template))
        called = statuses is not None
        missing = [r for r in op.responses if not response_seen(r, statuses or set())] if called else list(op.responses)
        rows.append([op.service, op.method, op.template, op.operation_id, called, missing])
    return pd.DataFrame(rows, columns=["service", "method", "path", "operation_id", "called", "missing_responses"])


def compare(base: Coverage, new: Coverage) -> dict[str, dict[str, list[str]]]:
    """What ``new`` exercised that ``base`` did not (``added``) and the reverse (``lost``)."""

    def keys(c: Coverage) -> dict[str, set[str]]:
        return {
            "endpoints": {f"{r.service} {r.method} {r.path}" for r in c.endpoints.itertuples()},
            "status classes": {f"{r.service} {r.method} {r.path} {k}" for r in c.endpoints.itertuples() for k in r.classes},
            "calls": {f"{r.caller} -> {r.callee} {r.method} {r.path}" for r in c.edges.itertuples()},
        }

    old, now = keys(base), keys(new)
    return {what: {"added": sorted(now[what] - old[what]), "lost": sorted(old[what] - now[what])} for what in old}


def coverage_of_db(path, operations: list[Operation] = ()) -> Coverage:
    from hoptrace.analyzer import analyze

    return coverage_of(analyze(path), operations)
