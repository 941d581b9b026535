"""Workflows: the requests of one user joined by token lineage and subject, in time order.

Two requests are in one session when their entry hops share a token (issued by one,
presented by the other: register -> login -> checkout; or presented -> refreshed)
or a subject, directly or through other requests. Only entry hops count: a service
calling others with its own credentials must not join every user into one session.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hoptrace.analyzer._arrays import run_starts

SESSION_COLUMNS = (
    "trace", "session", "subject", "started_at", "ended_at", "status", "endpoint",
    "token_fp", "token_exp", "expired",
)  # fmt: skip


def sessions(hops: pd.DataFrame, hop_tokens: pd.DataFrame, tokens: pd.DataFrame, uses: pd.DataFrame) -> pd.DataFrame:
    """One row per request (trace), with its session id; sorted by session then start."""
    roots = hops[hops["depth"].to_numpy() == 0]
    if len(roots) == 0:
        return pd.DataFrame({c: pd.Series(dtype=object) for c in SESSION_COLUMNS})
    trace_ids = roots.index.to_numpy()
    root_tokens = hop_tokens[hop_tokens["hop_id"].isin(trace_ids)]
    subjects = root_tokens["fingerprint"].map(tokens["sub"])
    # The request's subject: its own token's, else the one it was issued.
    presented_sub = roots["token_sub"]
    issued_sub = pd.Series(subjects.to_numpy(), index=root_tokens["hop_id"].to_numpy()).dropna().groupby(level=0).first()
    subject = presented_sub.astype(object).where(presented_sub.notna(), issued_sub.reindex(roots.index).astype(object))
    # Requests and keys (tokens, subjects) form a graph; sessions are its components.
    token_key = pd.factorize(root_tokens["fingerprint"])[0]
    subject_key = pd.factorize(subject)[0]
    has_subject = subject_key >= 0
    node = np.concatenate([pd.Index(trace_ids).get_indexer(root_tokens["hop_id"]), np.flatnonzero(has_subject)])
    key = np.concatenate([token_key, subject_key[has_subject] + len(token_key)])
    component = _components(len(roots), node, key)
    started = roots["started_at"].to_numpy()
    # Session ids in order of each session's first request.
    first = pd.Series(started).groupby(component).transform("min").to_numpy()
    order = np.lexsort((component, first))
    ordered = component[order]
    session_id = np.empty(len(roots), np.int64)
    session_id[order] = np.cumsum(run_starts(ordered)) - 1
    expired_traces = _expired_traces(hops, uses)
    out = pd.DataFrame({
        "trace": trace_ids,
        "session": session_id,
        "subject": subject.to_numpy(),
        "started_at": started,
        "ended_at": roots["ended_at"].to_numpy(),
        "status": roots["status"].array,
        "endpoint": roots["endpoint"].array,
        "token_fp": roots["token_fp"].array,
        "token_exp": roots["token_exp"].to_numpy(),
        "expired": np.isin(trace_ids, expired_traces),
    })  # fmt: skip
    out["subject"] = out["subject"].astype("str")
    return out.sort_values(["session", "started_at", "trace"], kind="stable").reset_index(drop=True)


def _components(n: int, node: np.ndarray, key: np.ndarray) -> np.ndarray:
    """Connected components of requests linked through shared keys (min-label propagation)."""
    label = np.arange(n)
    if len(node) == 0:
        return label
    while True:
        key_label = np.full(key.max() + 1, n, np.int64)
        np.minimum.at(key_label, key, label[node])
        new = label.copy()
        np.minimum.at(new, node, key_label[key])
        new = new[new]  # jump: follow labels to their own labels
        if np.array_equal(new, label):
            return label
        label = new


def _expired_traces(hops: pd.DataFrame, uses: pd.DataFrame) -> np.ndarray:
    """Requests in which some hop presented or validated a token at or after its exp."""
    when = hops["started_at"].reindex(uses["hop_id"]).to_numpy()
    late = uses["exp"].to_numpy() <= when
    return np.unique(hops["trace"].reindex(uses["hop_id"][late]).to_numpy())
