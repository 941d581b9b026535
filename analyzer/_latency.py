"""Where the time goes: self time, critical paths, and latency per service, endpoint and call edge."""

from __future__ import annotations

import numpy as np
import pandas as pd

from hoptrace.analyzer._arrays import group_quantiles


def parent_positions(hops: pd.DataFrame) -> np.ndarray:
    """Row position of each hop's parent (-1 for roots)."""
    pos = pd.Index(hops.index).get_indexer(hops["parent_id"].fillna(-1).astype("int64").to_numpy())
    return np.where(hops["parent_id"].isna().to_numpy(), -1, pos)


def self_ms(hops: pd.DataFrame, parent: np.ndarray) -> np.ndarray:
    """Duration minus the time covered by at least one child (children may run in parallel)."""
    start = hops["started_at"].to_numpy(np.float64)
    end = hops["ended_at"].to_numpy(np.float64)
    duration = hops["duration_ms"].to_numpy(np.float64)
    kids = np.flatnonzero(parent >= 0)
    if len(kids) == 0:
        return duration.copy()
    p = parent[kids]
    kids = kids[np.lexsort((start[kids], p))]
    p = parent[kids]
    # Clip to the parent: a child that outlived it (fire and forget) made it wait no longer.
    lo = np.maximum(start[kids], start[p])
    hi = np.minimum(end[kids], end[p])
    reach = pd.Series(hi).groupby(p).cummax()
    before = reach.groupby(p).shift().to_numpy(np.float64)
    covered = np.clip(hi - np.fmax(lo, before), 0.0, None)
    waiting = np.bincount(p, weights=covered, minlength=len(hops)) * 1000.0
    return np.maximum(duration - waiting, 0.0)


def critical_path(hops: pd.DataFrame, parent: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Hops on their request's critical path.

    Walking back from a hop's end: the child that ended last is on the path, then the
    child that ended last before that one started, and so on; recursively inside each.
    """
    n = len(hops)
    start = hops["started_at"].to_numpy(np.float64)
    kids = np.flatnonzero(parent >= 0)
    on_chain = np.zeros(n, bool)
    if len(kids):
        p = parent[kids]
        kid_end = np.minimum(hops["ended_at"].to_numpy(np.float64)[kids], hops["ended_at"].to_numpy(np.float64)[p])
        frame = pd.DataFrame({"p": p, "kid": kids, "end": kid_end, "start": start[kids]})
        last = frame.sort_values(["p", "end", "kid"]).drop_duplicates("p", keep="last")["kid"].to_numpy()
        # For every child, the sibling that ended last before it started.
        by_start = frame.sort_values("start", kind="stable")
        by_end = frame.sort_values("end", kind="stable")
        prev = pd.merge_asof(
            by_start[["p", "kid", "start"]],
            by_end[["p", "kid", "end"]].rename(columns={"kid": "prev"}),
            left_on="start",
            right_on="end",
            by="p",
            direction="backward",
        )
        before = np.full(n, -1, np.int64)
        before[prev["kid"].to_numpy()] = prev["prev"].fillna(-1).to_numpy(np.int64)
        before[before == np.arange(n)] = -1  # a zero-length child "ends before" itself
        cur = last
        while len(cur):
            cur = cur[~on_chain[cur]]  # stops at a cycle of zero-length siblings too
            on_chain[cur] = True
            cur = before[cur]
            cur = cur[cur >= 0]
    on_path = parent < 0
    levels = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[levels], np.arange(depth.max(initial=0) + 2))
    for d in range(1, len(bounds) - 1):
        nodes = levels[bounds[d] : bounds[d + 1]]
        on_path[nodes] = on_chain[nodes] & on_path[parent[nodes]]
    return on_path


def is_error(hops: pd.DataFrame) -> np.ndarray:
    """Failed (no or broken response) or 5xx."""
    status = hops["status"].to_numpy(dtype=np.float64, na_value=np.nan)
    return (hops["failed"].to_numpy() != 0) | (status >= 500)


def latency_table(hops: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """count, errors, error_rate, client_errors, p50/p95/p99/max, self p50/p95, per group of ``keys``."""
    columns = [
        *keys,
        "count",
        "errors",
        "error_rate",
        "client_errors",
        "p50_ms",
        "p95_ms",
        "p99_ms",
        "max_ms",
        "self_p50_ms",
        "self_p95_ms",
    ]
    if len(hops) == 0:
        return pd.DataFrame(columns=columns)
    status = hops["status"].to_numpy(dtype=np.float64, na_value=np.nan)
    group = hops.groupby(keys, sort=True, observed=True, dropna=False).ngroup().to_numpy()
    n = group.max() + 1
    out = hops[keys].iloc[np.unique(group, return_index=True)[1]].reset_index(drop=True)
    out["count"] = np.bincount(group, minlength=n)
    out["errors"] = np.bincount(group, weights=is_error(hops), minlength=n).astype(np.int64)
    out["error_rate"] = out["errors"] / out["count"]
    out["client_errors"] = np.bincount(group, weights=(status >= 400) & (status < 500), minlength=n).astype(np.int64)
    _, ms = group_quantiles(group, hops["duration_ms"].to_numpy(np.float64), (0.5, 0.95, 0.99, 1.0))
    out[["p50_ms", "p95_ms", "p99_ms", "max_ms"]] = ms
    _, own = group_quantiles(group, hops["self_ms"].to_numpy(np.float64), (0.5, 0.95))
    out[["self_p50_ms", "self_p95_ms"]] = own
    return out[columns]


def edges_table(hops: pd.DataFrame, parent: np.ndarray) -> pd.DataFrame:
    """The call graph: caller ("client" for requests, "unknown" for orphans), callee, calls, errors, p50/p95."""
    columns = ["caller", "callee", "calls", "errors", "p50_ms", "p95_ms"]
    if len(hops) == 0:
        return pd.DataFrame(columns=columns)
    callee, names = pd.factorize(hops["service"])
    names = [*map(str, names), "client", "unknown"]
    orphan = (hops["link"] == "orphan").to_numpy()
    caller = np.where(parent >= 0, callee[np.maximum(parent, 0)], np.where(orphan, len(names) - 1, len(names) - 2))
    edge = caller * len(names) + callee
    codes, quantiles = group_quantiles(edge, hops["duration_ms"].to_numpy(np.float64), (0.5, 0.95))
    calls = np.bincount(edge)[codes]
    errors = np.bincount(edge, weights=is_error(hops))[codes].astype(np.int64)
    out = pd.DataFrame({
        "caller": [names[c // len(names)] for c in codes], "callee": [names[c % len(names)] for c in codes],
        "calls": calls, "errors": errors, "p50_ms": quantiles[:, 0], "p95_ms": quantiles[:, 1],
    })  # fmt: skip
    return out.sort_values(["caller", "callee"]).reset_index(drop=True)
