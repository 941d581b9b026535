"""Rebuilding the tree of hops of every client request, exactly where trace headers allow.

Each non-entry hop gets a parent, found by the first of these that yields one:

=====  ====================================================  =======================
tier   candidates (same capture, another service, earlier)   link
=====  ====================================================  =======================
1      the hop whose span id is this hop's parent span id    ``header``
2-4    containing hops of the same trace id carrying the     ``header``
       same token, else the same subject, else any
5      containing hops carrying the same token and naming    ``token``
       the same long id in their path (a cart id, an
       order id: ``GET /cart/cart_7f3a…`` at the gateway
       and at cart)
6      containing hops naming the same long path id          ``token``
7-8    containing hops carrying the same token, else the     ``token``
       same subject (fingerprint of any role: presented,
       validated or issued)
9      containing hops                                       ``nesting``
=====  ====================================================  =======================

"Containing" is on the proxy's clock: the candidate started no later and ended no
earlier. Among the candidates of the first tier that has any, the innermost wins
(latest start). When another candidate of that tier is not an ancestor of the
chosen one, the choice was a guess: a tier 5-9 link is then ``ambiguous``, and
``link_candidates`` says among how many unrelated hops. Entry hops are ``root``;
other hops with no candidate are ``orphan`` (roots of their own tree).

Candidates are never searched among all hops: hops are bucketed by duration into
classes (1 ms, 4 ms, 16 ms, ... 4^k ms), and a container of class k must have
started at most 4^k ms before the hop it contains. So each hop is compared with
the hops of its group that started shortly before it, about as many as run
concurrently, and the whole pass is O(n log n).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from hoptrace.analyzer._arrays import run_starts
from hoptrace.analyzer._prepare import Paths, paths_of, subject_codes, token_positions

LINKS = ("root", "header", "token", "nesting", "ambiguous", "orphan")
_ROOT, _HEADER, _TOKEN, _NESTING, _AMBIGUOUS, _ORPHAN = range(len(LINKS))
_BASE_S = 0.001
_RATIO = 4.0
# Pairs examined at once: bounds memory whatever the concurrency.
_MAX_PAIRS = 4_000_000


def rebuild(
    hops: pd.DataFrame,
    hop_tokens: pd.DataFrame,
    tokens: pd.DataFrame,
    captures: pd.DataFrame,
    paths: Paths | None = None,
) -> pd.DataFrame:
    """``hops`` (as loaded) sorted by start, with ``parent_id``, ``link``, ``link_candidates``,
    ``trace``, ``depth`` and ``order`` added. ``paths`` (of these hops, in start order) saves a pass."""
    ordered = in_start_order(hops)
    if ordered is not hops:  # the given paths were in the old order
        hops, paths = ordered, None
    n = len(hops)
    start = hops["started_at"].to_numpy(np.float64)
    end = hops["ended_at"].to_numpy(np.float64)
    capture = pd.factorize(hops["capture_id"])[0].astype(np.int64)
    service, names = pd.factorize(hops["service"])
    # The entry route of each hop's capture, as a service code (-1: none, or never seen).
    entry = pd.Series(pd.Index(names).get_indexer(captures["entry"].astype(object)), index=captures.index)
    entry_code = hops["capture_id"].map(entry).fillna(-1).to_numpy(np.int64)
    has_entry = hops["capture_id"].map(captures["entry"].notna()).fillna(False).to_numpy(bool)
    is_entry = (service == entry_code) & (entry_code >= 0)

    positions = pd.Index(hops.index).get_indexer(hop_tokens["hop_id"])
    token_code = token_positions(hop_tokens["fingerprint"], tokens)
    subject = subject_codes(tokens)
    sub_code = np.where(token_code >= 0, subject[np.maximum(token_code, 0)], -1) if len(subject) else token_code
    trace_code = pd.factorize(hops["trace_id"])[0].astype(np.int64)
    graph = _Graph(start, end, service)

    parent = np.full(n, -1, np.int64)
    link = np.full(n, _ORPHAN, np.int8)
    candidates = np.zeros(n, np.int64)
    link[is_entry] = _ROOT
    todo = ~is_entry

    if "span_id" in hops and "parent_span_id" in hops:
        found_q, found_c = _by_span(hops, capture, trace_code, todo)
        parent[found_q], link[found_q], candidates[found_q] = found_c, _HEADER, 1
        todo[found_q] = False

    hop_pos = np.arange(n)
    known = positions >= 0
    positions, token_code, sub_code = positions[known], token_code[known], sub_code[known]
    paths = paths or paths_of(hops["path"])
    id_pos, id_code = paths.id_pos, paths.id_code
    tiers = [
        (_TOKEN, lambda: _both(positions, token_code, id_pos, id_code)),
        (_TOKEN, lambda: (id_pos, id_code)),
        (_TOKEN, lambda: (positions, token_code)),
        (_TOKEN, lambda: (positions, sub_code)),
        (_NESTING, lambda: (hop_pos, np.zeros(n, np.int64))),
    ]
    if (trace_code >= 0).any():
        traced = trace_code[positions]
        tiers[:0] = [
            (_HEADER, lambda: (positions, _pair_code(traced, token_code))),
            (_HEADER, lambda: (positions, _pair_code(traced, sub_code))),
            (_HEADER, lambda: (hop_pos, trace_code)),
        ]
    for kind, elements in tiers:
        if not todo.any():
            break
        elem_pos, elem_group = elements()
        # The capture is part of every group: hops of two captures are never related.
        group = _pair_code(capture[elem_pos], elem_group)
        q, best, count = graph.innermost(elem_pos, group, todo)
        parent[q], candidates[q] = best, count
        link[q] = kind if kind == _HEADER else np.where(count > 1, _AMBIGUOUS, kind)
        todo[q] = False

    # With no entry route known, a hop nothing contains is where a request entered.
    link[todo & ~has_entry] = _ROOT
    trace, depth, order = _tree(parent)
    ids = hops.index.to_numpy()
    out = hops.copy(deep=False)  # copy-on-write: new columns, shared old ones
    out["parent_id"] = pd.array(np.where(parent >= 0, ids[np.maximum(parent, 0)], 0), dtype="Int64")
    out.loc[parent < 0, "parent_id"] = pd.NA
    out["link"] = pd.Categorical.from_codes(link, pd.Index(LINKS, dtype="str"))
    out["link_candidates"] = candidates
    out["trace"] = ids[trace]
    out["depth"] = depth
    out["order"] = order
    return out


def _both(pos_a, code_a, pos_b, code_b) -> tuple[np.ndarray, np.ndarray]:
    """Elements keyed by a pair of keys of the same hop (its token and a path id)."""
    joined = pd.DataFrame({"pos": pos_a, "a": code_a}).merge(pd.DataFrame({"pos": pos_b, "b": code_b}), on="pos")
    return joined["pos"].to_numpy(np.int64), _pair_code(joined["a"].to_numpy(), joined["b"].to_numpy())


def in_start_order(hops: pd.DataFrame) -> pd.DataFrame:
    """``hops`` sorted by start, the longest first on a tie (so a parent precedes its child);
    the same object when they already are."""
    start = hops["started_at"].to_numpy()
    step = np.diff(start)
    if np.all((step > 0) | ((step == 0) & (np.diff(hops["ended_at"].to_numpy()) <= 0))):
        return hops
    return hops.sort_values(["started_at", "ended_at"], ascending=[True, False], kind="stable")


def _pair_code(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One int code per distinct (a, b); -1 where either is -1."""
    a = np.asarray(a, np.int64)
    b = np.asarray(b, np.int64)
    if len(a) == 0 or a.min() == a.max():  # a single value of a: b alone tells the pairs apart
        code = b
    else:
        code = pd.factorize(a * (int(b.max(initial=0)) + 2) + b)[0]
    return np.where((a >= 0) & (b >= 0), code, -1).astype(np.int64)


def _by_span(hops: pd.DataFrame, capture, trace_code, todo) -> tuple[np.ndarray, np.ndarray]:
    """Tier 1: within one trace, the hop whose span id is this hop's parent span id."""
    spans = pd.concat([hops["span_id"], hops["parent_span_id"]], ignore_index=True)
    codes = pd.factorize(spans)[0]
    n = len(hops)
    span, parent_span = codes[:n], codes[n:]
    pos = np.arange(n)
    has_trace = trace_code >= 0
    callee = pd.DataFrame({"cap": capture, "trace": trace_code, "span": span, "q": pos})[todo & has_trace & (parent_span >= 0)]
    callee["span"] = parent_span[callee["q"].to_numpy()]
    caller = pd.DataFrame({"cap": capture, "trace": trace_code, "span": span, "c": pos})[has_trace & (span >= 0)]
    pairs = callee.merge(caller, on=["cap", "trace", "span"])
    # Parents come first in start order, which also keeps a hostile file from making a cycle.
    pairs = pairs[pairs["c"] < pairs["q"]]
    best = pairs.groupby("q")["c"].max()
    return best.index.to_numpy(np.int64), best.to_numpy(np.int64)


class _Graph:
    """The hops' intervals, for containment searches."""

    def __init__(self, start, end, service) -> None:
        self.start, self.end, self.service = start, end, service
        self.n = len(start)
        duration = np.maximum(end - start, 0.0)
        self.cls = np.ceil(np.log(np.maximum(duration, _BASE_S) / _BASE_S) / np.log(_RATIO) - 1e-9).astype(np.int64)
        self.cls = np.maximum(self.cls, 0)
        self._by_end = np.argsort(end, kind="stable")
        self._reaches: dict[int, np.ndarray] = {}

    def _reach(self, k: int) -> np.ndarray:
        """For every hop, the first position a container of class k could start at.

        A container of class k lasts at most 4^k ms and must end after the hop does.
        """
        if k not in self._reaches:
            reach = _BASE_S * _RATIO**k * (1 + 1e-9) + 1e-6
            first = np.empty(self.n, np.int64)
            # Needles in sorted order make the search a merge rather than random probes.
            first[self._by_end] = np.searchsorted(self.start, self.end[self._by_end] - reach, side="left")
            self._reaches[k] = first
        return self._reaches[k]

    def innermost(self, elem_pos: np.ndarray, group: np.ndarray, todo: np.ndarray):
        """For each hop still to do that has an element here, its innermost container among
        the elements of the same group. Returns (hops, chosen parents, candidate counts)."""
        valid = group >= 0
        # One element per (group, hop), sorted by group then start: the order every search needs.
        key = np.sort(group[valid] * self.n + elem_pos[valid])
        key = key[run_starts(key)]
        group, elem_pos = key // self.n, key % self.n
        is_query = todo[elem_pos]
        q_pos, q_group = elem_pos[is_query], group[is_query]
        best = np.full(self.n, -1, np.int64)
        low_end = np.full(self.n, np.inf)
        for c_pos, qp, lo, hi in self._classes(elem_pos, group, q_pos, q_group):
            for q, seg, c in _expand(qp, lo, hi, c_pos):
                ok = (self.end[c] >= self.end[q]) & (self.service[c] != self.service[q])
                first = np.flatnonzero(run_starts(seg))
                # Innermost: the latest-starting container (positions are in start order).
                np.maximum.at(best, q[first], np.maximum.reduceat(np.where(ok, c, -1), first))
                np.minimum.at(low_end, q[first], np.minimum.reduceat(np.where(ok, self.end[c], np.inf), first))
        hops = np.flatnonzero(best >= 0)
        chosen = best[hops]
        count = np.ones(len(hops), np.int64)
        # A candidate that ended before the chosen one is not its ancestor: the choice was a guess.
        rival = hops[low_end[hops] < self.end[chosen]]
        if len(rival):
            count[np.searchsorted(hops, rival)] += self._rivals(rival, best, elem_pos, group, todo)
        return hops, chosen, count

    def _classes(self, elem_pos, group, q_pos, q_group):
        """Per duration class k: its candidates, and for each query the range of them to try."""
        elem_cls = self.cls[elem_pos]
        q_cls = self.cls[q_pos]
        for k in np.flatnonzero(np.bincount(elem_cls)):
            in_k = elem_cls == k
            c_pos = elem_pos[in_k]
            c_key = group[in_k] * (self.n + 1) + c_pos
            eligible = q_cls <= k
            qp, qg = q_pos[eligible], q_group[eligible]
            lo = np.searchsorted(c_key, qg * (self.n + 1) + self._reach(k)[qp], side="left")
            hi = np.searchsorted(c_key, qg * (self.n + 1) + qp, side="left")
            yield c_pos, qp, lo, hi

    def _rivals(self, rival, best, elem_pos, group, todo) -> np.ndarray:
        """How many candidates of each hop in ``rival`` are not ancestors of its chosen parent."""
        mask = np.zeros(self.n, bool)
        mask[rival] = True
        keep = mask[elem_pos] & todo[elem_pos]
        q_pos, q_group = elem_pos[keep], group[keep]
        pairs_q, pairs_c = [], []
        for c_pos, qp, lo, hi in self._classes(elem_pos, group, q_pos, q_group):
            for q, seg, c in _expand(qp, lo, hi, c_pos):
                ok = (self.end[c] >= self.end[q]) & (self.service[c] != self.service[q]) & (self.end[c] < self.end[best[q]])
                pairs_q.append(q[ok])
                pairs_c.append(c[ok])
        # The same hop may be a candidate through two tokens: count it once.
        unique = np.unique(np.concatenate(pairs_q) * self.n + np.concatenate(pairs_c))
        return np.bincount(np.searchsorted(rival, unique // self.n), minlength=len(rival))


def _expand(q_pos, lo, hi, c_pos):
    """(query, segment, candidate) triples for the ranges [lo, hi), in batches of bounded size.

    ``segment`` numbers the ranges, so each query's candidates form one run of it.
    """
    counts = np.maximum(hi - lo, 0)
    total = np.cumsum(counts)
    first = 0
    while first < len(counts):
        base = total[first - 1] if first else 0
        last = max(int(np.searchsorted(total, base + _MAX_PAIRS, side="right")), first + 1)
        cnt = counts[first:last]
        n = int(cnt.sum())
        if n:
            seg = np.repeat(np.arange(first, last), cnt)
            offsets = np.arange(n) - np.repeat(np.cumsum(cnt) - cnt, cnt)
            yield q_pos[seg], seg, c_pos[np.repeat(lo[first:last], cnt) + offsets]
        first = last


def _tree(parent: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Root position, depth and depth-first rank (children by start) of every hop."""
    n = len(parent)
    pos = np.arange(n)
    top = np.where(parent >= 0, parent, pos)
    depth = (parent >= 0).astype(np.int64)
    # Pointer doubling: log2(depth) rounds whatever the depth.
    while True:
        up = top[top]
        if np.array_equal(up, top):
            break
        depth = depth + depth[top]
        top = up
    # Subtree sizes bottom-up, level by level.
    levels = np.argsort(depth, kind="stable")
    bounds = np.searchsorted(depth[levels], np.arange(depth.max(initial=0) + 2))
    size = np.ones(n, np.int64)
    for d in range(len(bounds) - 2, 0, -1):
        nodes = levels[bounds[d] : bounds[d + 1]]
        size += np.bincount(parent[nodes], weights=size[nodes], minlength=n).astype(np.int64)
    # A child's rank = its parent's + 1 + the sizes of the siblings that started before it.
    children = pos[parent >= 0]  # already in start order
    by_parent = children[np.argsort(parent[children], kind="stable")]
    csum = np.cumsum(size[by_parent])
    first_of_group = run_starts(parent[by_parent])
    group_base = np.maximum.accumulate(np.where(first_of_group, csum - size[by_parent], 0))
    before = np.zeros(n, np.int64)
    before[by_parent] = csum - size[by_parent] - group_base
    order = np.zeros(n, np.int64)
    for d in range(1, len(bounds) - 1):
        nodes = levels[bounds[d] : bounds[d + 1]]
        order[nodes] = order[parent[nodes]] + 1 + before[nodes]
    return top, depth, order


def link_accuracy(inferred_hops: pd.DataFrame, truth_parent: pd.Series) -> float:
    """Share of hops whose ``parent_id`` equals the true parent (both <NA> for roots counts).

    ``truth_parent`` is indexed by hop id; hops missing from either side are not scored.
    """
    common = inferred_hops.index.intersection(truth_parent.index)
    if len(common) == 0:
        raise ValueError("no hop is in both the inferred hops and the truth")
    got = inferred_hops.loc[common, "parent_id"].astype("Int64")
    want = truth_parent.loc[common].astype("Int64")
    same = (got == want).fillna(False) | (got.isna() & want.isna())
    return float(same.mean())
