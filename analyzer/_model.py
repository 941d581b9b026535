"""The presentation model: everything a report or chart shows, derived once from an :class:`Analysis`.

Text, Markdown, JSON, the HTML report and the charts only format what this module
decides: which request is the worst, how a hop ended, how findings are grouped and
ordered, which requests a trace id names, the call graph's nodes and edges.

Worst first
    Requests are ordered by how much they deserve a look: (1) those with an error
    finding, (2) those the client saw fail (a status of 400 or more, no response, or a
    broken transfer), (3) those with a warning finding, (4) the rest. Within a tier,
    more findings first, then the slowest, then the lower id. A user asking "what went
    wrong?" wants a broken request before a slow one, and a request a detector proved
    wrong before one that merely failed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from hoptrace._errors import AnalysisError
from hoptrace._format import as_float, as_int, hop_ended, is_missing
from hoptrace.analyzer._types import OUTCOMES, SEVERITIES, SEVERITY_RANK

if TYPE_CHECKING:  # _analysis imports resolve_trace from here
    from hoptrace.analyzer._analysis import Analysis

TIERS = ("error finding", "failed", "warning finding", "no finding")
"""Why a request sits where it does in the worst-first order (see the module docstring)."""
CLIENT = "client"  # the caller of every request's root hop


@dataclass(frozen=True)
class RequestSummary:
    """One request as every renderer names it."""

    trace: int
    service: str
    method: str
    path: str
    endpoint: str
    ended: str  # :func:`hoptrace._format.hop_ended` of the root hop
    failed: bool  # the client saw a status >= 400, no response, or a broken transfer
    started_at: float
    duration_ms: float | None
    tier: int  # index into TIERS
    kinds: tuple[str, ...]  # kinds of the findings about it, sorted
    hops: int


@dataclass(frozen=True)
class FindingGroup:
    """The findings of one kind and severity, in time order."""

    kind: str
    severity: str
    rows: pd.DataFrame

    def __len__(self) -> int:
        return len(self.rows)


@dataclass
class Model:
    """Built by :func:`model` from an :class:`Analysis`; its parts are computed on first use."""

    analysis: Analysis

    @cached_property
    def roots(self) -> pd.DataFrame:
        hops = self.analysis.hops
        return hops[hops["depth"].to_numpy() == 0]

    @cached_property
    def worst_order(self) -> list[int]:
        """Every request id, worst first (see the module docstring)."""
        return [int(t) for t in self._scores.index]

    def worst(self, n: int | None = None) -> list[int]:
        return self.worst_order if n is None else self.worst_order[:n]

    def with_error_findings(self) -> list[int]:
        """The requests with an error finding (tier 0), worst first."""
        return [int(t) for t in self._scores.index[self._scores["tier"].to_numpy() == 0]]

    @cached_property
    def tiers(self) -> pd.Series:
        """request id -> its tier (index into :data:`TIERS`)."""
        return self._scores["tier"]

    @cached_property
    def _scores(self) -> pd.DataFrame:
        return _worst_scores(self.roots, self.analysis.findings)

    @cached_property
    def kinds_by_trace(self) -> dict[int, tuple[str, ...]]:
        f = self.analysis.findings.dropna(subset=["trace"])
        return {int(t): tuple(sorted(set(k))) for t, k in f.groupby("trace")["kind"]}

    def request(self, trace: int) -> RequestSummary:
        root = self.analysis.hops.loc[trace]
        return RequestSummary(
            trace=int(trace),
            service=str(root["service"]),
            method=str(root["method"]),
            path=str(root["path"]),
            endpoint=str(root["endpoint"]),
            ended=hop_ended(root["status"], root["failed"], root.get("error_kind")),
            failed=_client_saw_failure(root["status"], root["failed"]),
            started_at=float(root["started_at"]),
            duration_ms=as_float(root["duration_ms"]),
            tier=int(self.tiers.get(trace, len(TIERS) - 1)),
            kinds=self.kinds_by_trace.get(int(trace), ()),
            hops=int((self.analysis.hops["trace"].to_numpy() == trace).sum()),
        )

    def why(self, trace: int) -> str:
        """Why ``trace`` leads the worst-first order, in words (for `hoptrace plot` without --trace)."""
        r = self.request(trace)
        kinds = f" ({', '.join(r.kinds)})" if r.kinds else ""
        return f"the worst request: {TIERS[r.tier]}{kinds}, {r.endpoint} {r.ended}"

    def hop_rows(self, trace: int) -> pd.DataFrame:
        """The request's hops, depth first, with ``ended`` (how each ended, in words) and ``outcome``."""
        hops = self.analysis.trace_hops(trace)
        return hops.assign(ended=hop_endings(hops), outcome=outcomes(hops))

    @cached_property
    def finding_groups(self) -> list[FindingGroup]:
        """Findings grouped by (severity, kind): groups by :data:`SEVERITIES`, then their first finding's time."""
        return group_findings(self.analysis.findings)

    @cached_property
    def summary(self) -> dict:
        """hops, requests, sessions, captures, started_at, ended_at, findings per severity, links."""
        return _summary(self.analysis)

    @cached_property
    def graph(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """(nodes, edges) of the service call graph; see :func:`graph_tables`."""
        return graph_tables(self.analysis)


def model(analysis: Analysis) -> Model:
    """The presentation model of ``analysis``: cheap to make, each part computed on first use."""
    from hoptrace.analyzer._analysis import Analysis

    if not isinstance(analysis, Analysis):
        raise TypeError(f"expected a hoptrace.analyzer.Analysis, got {type(analysis).__name__}")
    return Model(analysis)


# -- the worst-first order --------------------------------------------------------------


def _client_saw_failure(status, failed) -> bool:
    code = as_float(status)
    return bool(not is_missing(failed) and failed) or code is None or code >= 400


def _worst_scores(roots: pd.DataFrame, findings: pd.DataFrame) -> pd.DataFrame:
    status = pd.to_numeric(roots["status"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    failed = roots["failed"].fillna(0).to_numpy(dtype=float) != 0
    broke = failed | np.isnan(status) | (status >= 400)
    f = findings.dropna(subset=["trace"])
    trace = f["trace"].astype("int64").to_numpy()
    errors = pd.Series(f["severity"].to_numpy() == "error").groupby(trace).sum()
    warnings = pd.Series(f["severity"].to_numpy() == "warning").groupby(trace).sum()
    count = pd.Series(1, index=trace).groupby(level=0).sum()
    ids = roots.index
    tier = np.select(
        [errors.reindex(ids, fill_value=0).to_numpy() > 0, broke, warnings.reindex(ids, fill_value=0).to_numpy() > 0],
        [0, 1, 2],
        3,
    )
    scores = pd.DataFrame(
        {"tier": tier, "count": count.reindex(ids, fill_value=0).to_numpy(), "ms": roots["duration_ms"].to_numpy(),
         "request": ids.to_numpy()},
        index=pd.Index(ids.to_numpy(), name="trace"),
    )  # fmt: skip
    keys = worst_first_keys(scores["tier"], scores["count"], scores["ms"], scores["request"])
    return scores.iloc[np.lexsort(keys[::-1])]


def worst_first_keys(tier, count, duration_ms, request) -> list[np.ndarray]:
    """The keys of the worst-first order (see the module docstring), the first key first, for a sort or a
    comparison: the tier, then the most findings, the longest (no duration last), the lowest request id.
    A NaN ``tier`` (a request not analysed) compares with nothing and sorts last."""
    ms = np.asarray(duration_ms, dtype=np.float64)
    return [np.asarray(tier, dtype=np.float64), -np.asarray(count, dtype=np.float64), -np.nan_to_num(ms, nan=-np.inf),
            np.asarray(request)]  # fmt: skip


# -- hops ----------------------------------------------------------------------------------


def hop_endings(hops: pd.DataFrame) -> pd.Series:
    """:func:`hop_ended` of every hop, on ``hops.index``."""
    kinds = hops["error_kind"] if "error_kind" in hops else [None] * len(hops)
    return pd.Series(
        [hop_ended(s, f, k) for s, f, k in zip(hops["status"], hops["failed"], kinds)], index=hops.index, dtype=object
    )


def tree_prefixes(hops: pd.DataFrame) -> list[str]:
    """The box-drawing prefix of each hop of one request (rows depth first): ``""`` for the
    root, ``├─ `` / ``└─ `` under its caller, ``│  `` where a caller has more calls below.
    A hop whose parent is not among the rows is indented by its depth."""
    ids = [int(i) for i in hops.index]
    known = set(ids)
    children: dict[int, list[int]] = {}
    tops = []
    for hop, parent in zip(ids, hops["parent_id"]):
        p = as_int(parent)
        (children.setdefault(p, []) if p is not None and p in known and p != hop else tops).append(hop)
    prefixes: dict[int, str] = {}
    stack = [(hop, "", True, True) for hop in reversed(tops)]
    while stack:
        hop, lead, last, top = stack.pop()
        if hop in prefixes:
            continue
        prefixes[hop] = "" if top else lead + ("└─ " if last else "├─ ")
        below = "" if top else lead + ("   " if last else "│  ")
        kids = children.get(hop, [])
        stack += [(kid, below, k == len(kids) - 1, False) for k, kid in reversed(list(enumerate(kids)))]
    depths = [as_int(d) or 0 for d in hops["depth"]]
    return [
        prefixes[hop] if hop not in tops or d == 0 else "   " * max(d - 1, 0) + "└─ " for hop, d in zip(ids, depths)
    ]


def outcomes(hops: pd.DataFrame) -> pd.Series:
    """Each hop's class in :data:`OUTCOMES`: ``error`` when it failed (even with a status) or
    had no response; a 1xx counts with the 2xx."""
    return pd.Series(np.array(OUTCOMES, dtype=object)[outcome_codes(hops)], index=hops.index, dtype=object)


def outcome_codes(hops: pd.DataFrame) -> np.ndarray:
    """:func:`outcomes` as positions in :data:`OUTCOMES` (int8): for counting a million hops without
    a string per hop."""
    status = pd.to_numeric(hops["status"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    failed = pd.to_numeric(hops["failed"], errors="coerce").fillna(0).to_numpy(dtype=float) != 0
    conditions = [failed | ~np.isfinite(status), status >= 500, status >= 400, status >= 300]
    return np.select(conditions, [OUTCOMES.index(o) for o in ("error", "5xx", "4xx", "3xx")], OUTCOMES.index("2xx")).astype(np.int8)


def service_codes(hops: pd.DataFrame) -> tuple[pd.Index, np.ndarray]:
    """(names, each hop's position in names) of the hops' services, without a string per hop."""
    codes, names = pd.factorize(hops["service"], sort=False, use_na_sentinel=False)
    return pd.Index(np.asarray(names).astype(str), dtype=object), codes


# -- findings -----------------------------------------------------------------------------


def sorted_findings(findings: pd.DataFrame) -> pd.DataFrame:
    """``findings`` by :data:`SEVERITIES`, then time (the analyzer's order; kept for hand-made frames)."""
    if not len(findings):
        return findings
    rank, at = finding_sort_keys(findings)
    return findings.iloc[np.lexsort((at, rank))]


def finding_sort_keys(findings: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`sorted_findings` sorts by, stably: each finding's severity rank, then its time."""
    rank = findings["severity"].map(SEVERITY_RANK).fillna(len(SEVERITIES)).to_numpy(dtype=float)
    return rank, pd.to_numeric(findings["at"], errors="coerce").to_numpy(dtype=float)


def group_findings(findings: pd.DataFrame) -> list[FindingGroup]:
    """``findings`` grouped by (severity, kind): groups by :data:`SEVERITIES`, then their first finding's time."""
    f = sorted_findings(findings)
    if not len(f):
        return []
    groups = f.groupby(["severity", "kind"], sort=False, observed=True)
    return [FindingGroup(kind=str(k), severity=str(s), rows=rows) for (s, k), rows in groups]


def findings_about(findings: pd.DataFrame, hop_ids, traces) -> pd.DataFrame:
    """The findings about any of ``traces`` or touching any of ``hop_ids``."""
    if not len(findings):
        return findings
    traces = list(traces)
    about = findings["trace"].isin(traces).fillna(False).to_numpy(dtype=bool)
    ids = set(int(i) for i in hop_ids)
    touches = np.fromiter((not ids.isdisjoint(h) for h in findings["hop_ids"]), dtype=bool, count=len(findings))
    return findings[about | touches]


# -- latency -------------------------------------------------------------------------------


def slowest_first(services: pd.DataFrame) -> pd.DataFrame:
    """``Analysis.services`` (or endpoints) by p95, slowest first, then by name: every latency table and chart."""
    ordered = services.assign(service=services["service"].astype(str))
    return ordered.sort_values(["p95_ms", "service"], ascending=[False, True], na_position="last").reset_index(drop=True)


# -- resolving a request --------------------------------------------------------------------


def resolve_trace(hops: pd.DataFrame, key: object) -> int:
    """The request (root hop id) that ``key`` names: its id (as `hoptrace analyze` prints it),
    a propagated trace id (traceparent / b3) or request / correlation id, in any letter case,
    or the id of any hop in it. Raises :class:`AnalysisError` naming a few known ids."""
    text = str(key).strip()
    roots = hops.index[hops["depth"].to_numpy() == 0]
    number = int(text) if re.fullmatch(r"\d{1,18}", text) else None
    if number is not None and number in roots:
        return number
    for column in ("trace_id", "request_id", "correlation_id"):
        if text and column in hops:
            ids = hops[column].astype("string").str.lower()
            hit = hops[(ids == text.lower()).fillna(False).to_numpy(dtype=bool)]
            if len(hit):
                return int(hit.sort_values("started_at")["trace"].iloc[0])
    if number is not None and number in hops.index:
        return int(hops.at[number, "trace"])
    some = ", ".join(str(t) for t in roots[:8]) + (" …" if len(roots) > 8 else "")
    raise AnalysisError(
        f"no request {text!r} in this trace database ({len(roots)} requests; ids: {some or 'none'});"
        " use a request id from `hoptrace analyze`, a trace id from a traceparent/b3/x-request-id header, or a hop id"
    )


# -- summary and graph ----------------------------------------------------------------------


def _summary(a: Analysis) -> dict:
    hops = a.hops
    counts = a.findings["severity"].value_counts() if len(a.findings) else pd.Series(dtype=int)
    links = hops["link"].value_counts() if len(hops) else pd.Series(dtype=int)
    return {
        "hops": len(hops),
        "requests": int((hops["depth"] == 0).sum()) if len(hops) else 0,
        "sessions": int(a.sessions["session"].nunique()) if len(a.sessions) else 0,
        "captures": len(a.captures),
        "started_at": as_float(hops["started_at"].min()) if len(hops) else None,
        "ended_at": as_float(hops["ended_at"].max()) if len(hops) else None,
        "findings": {s: int(counts.get(s, 0)) for s in SEVERITIES},
        "links": {k: int(v) for k, v in links.items()},
    }


def callers(hops: pd.DataFrame) -> pd.Series:
    """Each hop's caller: its parent hop's service, or ``client`` for a root (or a parent cut off)."""
    services = hops["service"].astype(str)
    parents = pd.to_numeric(hops["parent_id"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    has_parent = np.isfinite(parents)
    out = np.full(len(hops), CLIENT, dtype=object)
    out[has_parent] = services.reindex(parents[has_parent].astype(np.int64)).fillna(CLIENT).to_numpy(dtype=object)
    return pd.Series(out, index=hops.index)


def _pair_failures(hops: pd.DataFrame) -> tuple[pd.Series, pd.Series]:
    """Per (caller, callee): the rank of its worst outcome (0 error, 1 5xx, 2 4xx, 3 none failed) and
    its 4xx count. Counted on integer codes: at a million hops, grouping strings took seconds."""
    names, callee = service_codes(hops)
    if CLIENT not in names:
        names = names.append(pd.Index([CLIENT], dtype=object))
    parents = pd.to_numeric(hops["parent_id"], errors="coerce").to_numpy(dtype=float, na_value=np.nan)
    at = np.full(len(hops), -1, dtype=np.int64)
    has_parent = np.isfinite(parents)
    at[has_parent] = hops.index.get_indexer(parents[has_parent].astype(np.int64))
    caller = np.where(at >= 0, callee[np.maximum(at, 0)], names.get_loc(CLIENT))  # a root, or a parent cut off: client
    codes = outcome_codes(hops)
    rank = np.select([codes == OUTCOMES.index(o) for o in ("error", "5xx", "4xx")], [0, 1, 2], 3)
    pairs, which = np.unique(caller * len(names) + callee, return_inverse=True)
    worst = np.full(len(pairs), 3, dtype=np.int64)
    np.minimum.at(worst, which, rank)
    client = np.bincount(which, weights=rank == 2, minlength=len(pairs)).astype(np.int64)
    index = pd.MultiIndex.from_arrays([names[pairs // len(names)], names[pairs % len(names)]])
    return pd.Series(worst, index=index), pd.Series(client, index=index)


def graph_tables(a: Analysis) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The call graph's nodes and edges.

    ``edges``: ``Analysis.edges`` (caller, callee, calls, errors, p50_ms, p95_ms) plus
    ``client_errors`` (4xx answers) and ``worst`` (the worst outcome among its failed
    calls: ``error``, ``5xx``, ``4xx``, or None). ``nodes``: one per service and the
    client: ``service count errors client_errors error_rate p95_ms worst``. A 4xx counts
    where it happened: the path that returned a 401 is marked as failing, not 0 % errors.
    """
    edges = a.edges.copy()
    edges["caller"] = edges["caller"].astype(str)
    edges["callee"] = edges["callee"].astype(str)
    worst, client = _pair_failures(a.hops)
    key = pd.MultiIndex.from_arrays([edges["caller"], edges["callee"]])
    edges["client_errors"] = client.reindex(key).fillna(0).astype("int64").to_numpy()
    edges["worst"] = worst.reindex(key).map({0: "error", 1: "5xx", 2: "4xx"}).to_numpy(dtype=object)
    nodes = a.services.copy()
    nodes["service"] = nodes["service"].astype(str)
    node_worst = edges.dropna(subset=["worst"]).assign(rank=lambda e: e["worst"].map({"error": 0, "5xx": 1, "4xx": 2}))
    node_worst = node_worst.groupby("callee")["rank"].min().map({0: "error", 1: "5xx", 2: "4xx"})
    nodes["worst"] = nodes["service"].map(node_worst).to_numpy(dtype=object)
    return nodes.reset_index(drop=True), edges
