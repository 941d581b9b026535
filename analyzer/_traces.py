"""Rebuilding the tree of hops of every client request, exactly where trace headers allow.

Each non-entry hop gets a parent, found by the first of these that yields one:

=====  ====================================================  =======================
tier   candidates (same capture, another service, earlier)   link
=====  ====================================================  =======================
1      the hop whose span id is this hop's parent span id    ``header``
2-4    containing hops of the same trace id carrying the     ``header``
       same token, else the same subject, else any
5      containing hops that answered with a token this hop   ``token``
       answered with (a token issued here and handed back)
6      containing hops carrying the same token and naming    ``token``
       the same long id in their path (a cart id, an
       order id: ``GET /cart/cart_7f3a…`` at the gateway
       and at cart)
7      containing hops naming the same long path id          ``token``
8-9    containing hops carrying the same token, else the     ``token``
       same subject (fingerprint of any role: presented,
       validated or issued)
10     containing hops of the service that owns the hop's    ``connection``
       client connection (learnt from the header- and
       token-linked hops on that connection, else from the
       other connections calling the same endpoint), whose
       known calls do not overlap it: the first to end,
       or one of its kind that made the call fewer times
11     containing hops: the innermost, of a kind of          ``nesting``
       request seen making the call if there is one; then,
       among the concurrent requests of its kind that have
       not made the call yet, the one whose turn it is
       (arrival order, the service's reaction time allowed
       for); a retry, to the one that made it least and
       waited longest since
=====  ====================================================  =======================

Tier 10 (:func:`_by_connection`) needs ``client_conn_id``; without it, it does nothing.
Every link has a ``link_confidence`` in 0-1: 1 for a root or a header link, 1/candidates
for a token or nesting link, the owner's vote share / candidates for a connection link;
0 for an orphan.

"Containing" is on the proxy's clock: the candidate started no later and ended no
earlier. Among the candidates of the first tier that has any, the innermost wins
(latest start). When another candidate of that tier is not an ancestor of the
chosen one (it ended earlier, or the chosen one is where a request entered), the
choice was a guess: a tier 5-11 link except 10 is then ``ambiguous``, and
``link_candidates`` says among how many unrelated hops. A token tier's guess passes
over a candidate already making the same call at the same time (:func:`_free_rival`);
a nesting guess goes to the request of the chosen one's kind whose turn it is to make that
call, in the order they came (:func:`_in_arrival_order`), or retries it (:func:`_retrying`). Entry hops are ``root``;
other hops with no candidate are ``orphan`` (roots of their own tree).

Candidates are never searched among all hops: hops are bucketed by duration into
classes (1 ms, 4 ms, 16 ms, ... 4^k ms), and a container of class k must have
started at most 4^k ms before the hop it contains. So each hop is compared with
the hops of its group that started shortly before it, about as many as run
concurrently, and the whole pass is O(n log n).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np
import pandas as pd

from hoptrace.analyzer._arrays import group_codes, run_starts
from hoptrace.analyzer._prepare import Paths, paths_of, subject_codes, token_positions

LINKS = ("root", "header", "token", "connection", "nesting", "ambiguous", "orphan")
_ROOT, _HEADER, _TOKEN, _CONNECTION, _NESTING, _AMBIGUOUS, _ORPHAN = range(len(LINKS))
_BASE_S = 0.001
_RATIO = 4.0
# Pairs examined at once: bounds memory whatever the concurrency.
_MAX_PAIRS = 4_000_000


@dataclass
class _Hops:
    """What every tier reads about the hops, in start order."""

    n: int
    capture: np.ndarray
    service: np.ndarray
    is_entry: np.ndarray
    has_entry: np.ndarray
    trace_code: np.ndarray
    graph: _Graph
    frame: pd.DataFrame
    """The hops themselves, in start order (positions are its rows)."""
    template: np.ndarray
    """A code per hop for its path with ids as ``{id}`` (``GET /items/1001`` and ``/items/1002`` alike)."""

    @cached_property
    def call(self) -> np.ndarray:
        """A code per hop for the call it is (capture, service, method and templated path): equal calls, equal codes."""
        keys = self.frame[["service", "method"]].assign(capture=self.capture, template=self.template)
        return group_codes(keys, ["capture", "service", "method", "template"])


@dataclass
class _Links:
    """The links found so far: parent position, kind, candidate count, confidence, and what is left."""

    parent: np.ndarray
    link: np.ndarray
    candidates: np.ndarray
    confidence: np.ndarray
    todo: np.ndarray

    @classmethod
    def start(cls, is_entry: np.ndarray) -> _Links:
        n = len(is_entry)
        link = np.where(is_entry, _ROOT, _ORPHAN).astype(np.int8)
        return cls(np.full(n, -1, np.int64), link, np.zeros(n, np.int64), is_entry.astype(np.float64), ~is_entry)

    def set(self, q: np.ndarray, best: np.ndarray, count: np.ndarray, kind: int, confidence=None) -> None:
        """Link hops ``q`` to ``best``; a tier after the header ones that had rivals is ``ambiguous``."""
        self.parent[q], self.candidates[q] = best, count
        self.link[q] = kind if kind == _HEADER else np.where(count > 1, _AMBIGUOUS, kind)
        self.confidence[q] = 1.0 / np.maximum(count, 1) if confidence is None else confidence
        self.todo[q] = False

    def confident(self) -> np.ndarray:
        """Hops linked by a header, or by a token with no rival."""
        return (self.parent >= 0) & ((self.link == _HEADER) | (self.link == _TOKEN))


def rebuild(
    hops: pd.DataFrame,
    hop_tokens: pd.DataFrame,
    tokens: pd.DataFrame,
    captures: pd.DataFrame,
    paths: Paths | None = None,
) -> pd.DataFrame:
    """``hops`` (as loaded) sorted by start, with ``parent_id``, ``link``, ``link_candidates``,
    ``link_confidence``, ``trace``, ``depth`` and ``order`` added. ``paths`` (of these hops, in
    start order) saves a pass."""
    ordered = in_start_order(hops)
    if ordered is not hops:  # the given paths were in the old order
        hops, paths = ordered, None
    paths = paths or paths_of(hops["path"])
    ctx = _hops_of(hops, captures, paths)
    links = _Links.start(ctx.is_entry)
    if "span_id" in hops and "parent_span_id" in hops:
        found_q, found_c = _by_span(hops, ctx.capture, ctx.trace_code, links.todo)
        links.set(found_q, found_c, np.ones(len(found_q), np.int64), _HEADER)
    for kind, elements in _key_tiers(hops, hop_tokens, tokens, paths, ctx):
        _run_tier(ctx, links, kind, *elements())
    if "client_conn_id" in hops and links.todo.any():
        _by_connection(ctx, links, _connection_codes(hops, ctx.capture), _endpoint_codes(hops, ctx.capture))
    if links.todo.any():
        unlinked = links.todo.copy()
        _run_tier(ctx, links, _NESTING, np.arange(ctx.n), np.zeros(ctx.n, np.int64))
        _cut_calls(ctx, links, unlinked)
    # With no entry route known, a hop nothing contains is where a request entered.
    unrooted = links.todo & ~ctx.has_entry
    links.link[unrooted], links.confidence[unrooted] = _ROOT, 1.0
    return _with_links(hops, links)


# The error kinds of a hop the proxy cut itself (its upstream timeout, its shutdown): still open then.
_CUT_KINDS = ("timeout", "shutdown")
# How many failed hops that started after a cut call's container, and before the call, are tried as its caller.
_CUT_CALLERS_TRIED = 1024


def _cut_calls(ctx: _Hops, links: _Links, unlinked: np.ndarray) -> None:
    """Calls the proxy cut that the tiers before nesting left: under the failed hop they started in, if that is more inner.

    A hop the proxy cut was still open: its recorded end is when it was cut, not when it would have
    ended. Its caller, waiting on it, failed first or in the same pass (a caller and its call cut by
    one upstream timeout end a moment apart, in the order they were cut), so the call outlives it:
    nothing contains it, or only its caller's caller does (what the nesting tier took). So a failed
    hop of another service that was open when the call started, and started after the container
    the nesting tier chose, is taken instead, when that container is around it (its caller's caller).
    A container that cannot be around it (the same service) stays, as one of two guesses
    (``ambiguous``). Only where the capture names its entry route: without one, a hop nothing
    contains is a request of its own.
    """
    frame, graph = ctx.frame, ctx.graph
    kinds = frame["error_kind"].to_numpy(object) if "error_kind" in frame else np.zeros(ctx.n, object)
    cut = np.flatnonzero(unlinked & ctx.has_entry & ~ctx.is_entry & np.isin(kinds, _CUT_KINDS))
    if not len(cut):
        return
    status = frame["status"].to_numpy(np.float64, na_value=np.nan)
    callers = np.flatnonzero((frame["failed"].to_numpy(np.float64, na_value=0) == 1) | (status >= 500))
    start, end, service = graph.start, graph.end, ctx.service
    found = []  # (cut call, its parent, how many could be)
    for q in cut.tolist():
        container = int(links.parent[q])
        lo = np.searchsorted(callers, container, side="right") if container >= 0 else 0
        hi = np.searchsorted(callers, q)  # positions are in start order: these started before the call
        earlier = callers[max(lo, hi - _CUT_CALLERS_TRIED) : hi][::-1]
        open_then = earlier[(end[earlier] >= start[q]) & (service[earlier] != service[q]) & (ctx.capture[earlier] == ctx.capture[q])]
        if not len(open_then):
            continue
        chosen, others = open_then[0], open_then[1:]
        if container < 0 or (end[container] >= end[chosen] and service[container] != service[chosen]):
            # A failed hop around the chosen one may be its own caller (the request it failed): no rival.
            rivals = (start[others] > start[chosen]) | (end[others] < end[chosen]) | (service[others] == service[chosen])
            found.append((q, chosen, 1 + int(rivals.sum())))
        else:
            found.append((q, container, int(links.candidates[q]) + 1))
    if found:
        q, parent, count = (np.array(column, np.int64) for column in zip(*found))
        links.set(q, parent, count, _NESTING)


def _hops_of(hops: pd.DataFrame, captures: pd.DataFrame, paths: Paths) -> _Hops:
    start = hops["started_at"].to_numpy(np.float64)
    end = hops["ended_at"].to_numpy(np.float64)
    capture = pd.factorize(hops["capture_id"])[0].astype(np.int64)
    service, names = pd.factorize(hops["service"])
    # The entry route of each hop's capture, as a service code (-1: none, or never seen).
    entry = pd.Series(pd.Index(names).get_indexer(captures["entry"].astype(object)), index=captures.index)
    entry_code = hops["capture_id"].map(entry).fillna(-1).to_numpy(np.int64)
    has_entry = hops["capture_id"].map(captures["entry"].notna()).fillna(False).to_numpy(bool)
    is_entry = (service == entry_code) & (entry_code >= 0)
    trace_code = pd.factorize(hops["trace_id"])[0].astype(np.int64)
    template = paths.templates()[0]
    graph = _Graph(start, end, service, is_entry)
    return _Hops(len(hops), capture, service, is_entry, has_entry, trace_code, graph, hops, template)


def _key_tiers(hops, hop_tokens, tokens, paths, ctx: _Hops):
    """The tiers keyed by a trace id, a token or a path id, in order: (kind, elements)."""
    n = ctx.n
    positions = pd.Index(hops.index).get_indexer(hop_tokens["hop_id"])
    token_code = token_positions(hop_tokens["fingerprint"], tokens)
    sub_code = subject_codes(tokens, token_code)[0]
    known = positions >= 0
    issued = known & (hop_tokens["role"] == "issued").to_numpy()
    issued_pos, issued_code = positions[issued], token_code[issued]
    positions, token_code, sub_code = positions[known], token_code[known], sub_code[known]
    id_pos, id_code = paths.id_pos, paths.id_code
    tiers = [
        # A token a hop answered with is new: only the requests it was handed back through
        # carry it too, whereas a token presented (a refresh token sent twice at once) may be
        # carried by several concurrent requests, each a container of the other's calls.
        (_TOKEN, lambda: (issued_pos, issued_code)),
        (_TOKEN, lambda: _both(positions, token_code, id_pos, id_code)),
        (_TOKEN, lambda: (id_pos, id_code)),
        (_TOKEN, lambda: (positions, token_code)),
        (_TOKEN, lambda: (positions, sub_code)),
    ]
    trace_code = ctx.trace_code
    if (trace_code >= 0).any():
        traced = trace_code[positions]
        tiers[:0] = [
            (_HEADER, lambda: (positions, _pair_code(traced, token_code))),
            (_HEADER, lambda: (positions, _pair_code(traced, sub_code))),
            (_HEADER, lambda: (np.arange(n), trace_code)),
        ]
    return tiers


def _run_tier(ctx: _Hops, links: _Links, kind: int, elem_pos: np.ndarray, elem_group: np.ndarray) -> None:
    """Link the hops still to do to their innermost container among the elements of their group."""
    if not links.todo.any():
        return
    # The capture is part of every group: hops of two captures are never related.
    group = _pair_code(ctx.capture[elem_pos], elem_group)
    q, best, count = ctx.graph.innermost(elem_pos, group, links.todo, peers_rival=kind == _NESTING)
    if kind == _TOKEN:
        best = _free_rival(ctx, links, q, best, count, elem_pos, group)
    elif kind == _NESTING:
        best = _in_arrival_order(ctx, links, q, best, count, elem_pos, group)
    links.set(q, best, count, kind)


def _free_rival(ctx: _Hops, links: _Links, q, best, count, elem_pos, group) -> np.ndarray:
    """``best`` with each guess (a hop with rival containers) moved off a container that is
    already making the same call (same service, method and path, ids aside: ``/cart/{id}``) over
    the same time, to the innermost rival that is not.

    Two requests presenting one token at once (two refreshes with one refresh token) both
    contain both their calls; once one call is linked for sure (by the token it issued), the
    other belongs to the request that is not busy with that very call: a handler waits for
    its call's answer before it makes the call again.
    """
    start, end, call = ctx.graph.start, ctx.graph.end, ctx.call

    def busy(parent: int, hop: int, made: dict) -> bool:
        mine, s, e = call[hop], start[hop], end[hop]
        return any(c == mine and b_s < e and s < b_e for c, b_s, b_e in made.get(parent, ()))

    def pick(hop: int, chosen: int, candidates: list[int], made: dict) -> int:
        if not busy(chosen, hop, made):
            return chosen
        # The innermost free one: positions are in start order, the candidates sorted.
        return next((c for c in reversed(candidates) if not busy(c, hop, made)), chosen)

    return _reconsider_guesses(ctx, links, q, best, count, elem_pos, group, np.flatnonzero(links.confident()), pick)


def _in_arrival_order(ctx: _Hops, links: _Links, q, best, count, elem_pos, group) -> np.ndarray:
    """``best`` with each guess of the nesting tier moved to the request whose turn it is, among those of
    the chosen one's kind (the same service, method and templated path) that contain the call and have
    not made it yet (a request makes a given call once; a retry finds none, see :func:`_retrying`).

    The chosen one, the innermost container, is right when each request makes its call as soon as it
    comes in. In a burst (ten logins at once, each calling the identity provider), all the requests
    have come in before the first call goes out, and the innermost would take every call. A service
    takes its requests in the order they came, so the calls still to come before another request of
    the kind could make its call go, in order, to the latest of the requests that could have made
    theirs, as many as there are calls: in a burst of ten, the first call to the first login; a lone
    call to the innermost, and a request that never makes the call (a cache hit) is passed over.

    The kind is the innermost container's, unless no request of its kind was seen making the call so far
    (linked before this tier, or by a guess before this one) while one of another candidate's kind was:
    then the innermost of that kind's. A long call to another service that began just before a burst's
    retries contains them, and was innermost; it never made that call.

    "Could have": a service makes a call no sooner than its reaction time after the request came in,
    read from the requests whose calls were linked without a rival (:func:`_reaction_times`): a request
    counts once the quickest of those has passed, the next one's turn comes once the median has. Behind
    a proxy that is a millisecond or more, while a burst's requests come in a fraction of one apart:
    read from start times alone, each call of a burst went to the request after its own.
    """
    guessed = q[count > 1]
    if not len(guessed):
        return best
    call, start = ctx.call, ctx.graph.start
    codes = call.tolist()  # a list's items are read faster than an array's, once per candidate
    arrivals, pending = _starts_by(call, np.arange(ctx.n), start), _starts_by(call, guessed, start)
    known = np.flatnonzero(links.parent >= 0)
    sure = known[links.candidates[known] <= 1]
    single = count == 1
    quick, usual = _reaction_times(ctx, np.r_[sure, q[single]], np.r_[links.parent[sure], best[single]])
    makers = _makers(call, np.r_[known, q[single]], np.r_[links.parent[known], best[single]])

    def pick(hop: int, chosen: int, candidates: list[int], made: dict) -> int:
        mine, at = codes[hop], start[hop]
        seen = makers.setdefault(mine, set())
        if codes[chosen] not in seen:
            chosen = next((c for c in reversed(candidates) if codes[c] in seen), chosen)
        kind = codes[chosen]
        seen.add(kind)  # the choice below is a request of this kind
        peers = [c for c in candidates if codes[c] == kind]
        fresh = [c for c in peers if all(m != mine or began > at for m, began, _ in made.get(c, ()))]
        if len(fresh) < 2:
            return fresh[0] if fresh else _retrying(peers, mine, at, made, chosen)
        ready = [c for c in fresh if start[c] + quick[kind] <= at] or fresh[:1]
        # The turn of the first request of the kind that could not have made its call yet.
        came = arrivals(kind)
        waiting = np.searchsorted(came, at - quick[kind], side="right")
        next_turn = came[waiting] + usual[kind] if waiting < len(came) else np.inf
        calls = pending(mine)
        coming = int(np.searchsorted(calls, next_turn, side="left") - np.searchsorted(calls, at, side="left"))
        return ready[max(len(ready) - max(coming, 1), 0)]

    return _reconsider_guesses(ctx, links, q, best, count, elem_pos, group, known, pick)


def _makers(call: np.ndarray, kids: np.ndarray, parents: np.ndarray) -> dict[int, set]:
    """``call code -> the codes of the kinds of request seen making that call``, from linked (kid, parent) pairs."""
    n_codes = int(call.max(initial=-1)) + 1
    makers: dict[int, set] = {}
    # Each pair of codes once (a hash, not a Python step per link: 0.25 s at a million hops).
    for pair in pd.unique(call[kids] * n_codes + call[parents]).tolist():
        makers.setdefault(pair // n_codes, set()).add(pair % n_codes)
    return makers


def _retrying(peers: list[int], call: int, at: float, made: dict, chosen: int) -> int:
    """The request, among ``peers`` that have all made ``call`` before ``at``, making it again then: of those
    whose calls of it have all ended, the one that made fewest, then the one waiting longest since its last.

    Requests of one kind make the same calls, so the one that has made this one least is likeliest to make
    it next; and requests failed the same way retry after the same backoff, the first to fail first.
    ``chosen`` when every one is still waiting on that call."""
    choice, choice_key = chosen, None
    for peer in peers:
        ends = [end for code, began, end in made.get(peer, ()) if code == call and began <= at]
        key = (len(ends), max(ends))
        if key[1] <= at and (choice_key is None or key < choice_key):
            choice, choice_key = peer, key
    return choice


# Fewer first calls of a kind of request than this, and its service's reaction times stand for its own.
_REACTION_SAMPLES = 3


def _reaction_times(ctx: _Hops, kids: np.ndarray, parents: np.ndarray) -> tuple[list[float], list[float]]:
    """Per :attr:`_Hops.call` code, as a kind of request: the quickest and the median time from such a
    request coming in to its first call, over ``parents`` (each linked to the ``kids`` at the same place).
    Its service's (in its capture) where the kind has fewer than :data:`_REACTION_SAMPLES`; else 0."""
    n_codes = int(ctx.call.max(initial=-1)) + 1
    service = np.zeros(n_codes, np.int64)
    service[ctx.call] = ctx.capture * ctx.n + ctx.service
    start = ctx.graph.start
    lags = pd.Series(start[kids] - start[parents]).groupby(parents).min()
    first = pd.DataFrame({"lag": lags.to_numpy(), "kind": ctx.call[lags.index.to_numpy(np.int64)]})
    first["service"] = service[first["kind"].to_numpy()]
    quick, usual = np.zeros(n_codes), np.zeros(n_codes)
    # Each service's times, then each kind's own where it has enough.
    for column, of_code in (("service", service), ("kind", np.arange(n_codes))):
        stats = first.groupby(column)["lag"].agg(["min", "median", "size"])
        stats = stats[stats["size"] >= _REACTION_SAMPLES]
        has = np.isin(of_code, stats.index.to_numpy())
        row = stats.index.get_indexer(of_code[has])
        quick[has], usual[has] = stats["min"].to_numpy()[row], stats["median"].to_numpy()[row]
    return quick.tolist(), usual.tolist()


def _starts_by(call: np.ndarray, positions: np.ndarray, start: np.ndarray):
    """``code -> the start times of the hops at positions (in start order) making that call``, from one sort."""
    order = positions[np.argsort(call[positions], kind="stable")]
    codes, starts = call[order], start[order]
    return lambda code: starts[np.searchsorted(codes, code, side="left") : np.searchsorted(codes, code, side="right")]


def _reconsider_guesses(ctx: _Hops, links: _Links, q, best, count, elem_pos, group, known: np.ndarray, pick) -> np.ndarray:
    """``best`` with each guess (a hop with rival containers) replaced, in start order, by
    ``pick(hop, chosen, candidates, made)``: ``candidates`` its containers in start order, ``made``
    the calls each container makes, as (:attr:`_Hops.call` code, start, end): those of its ``known``
    children, of the hops linked without rival in this tier, and of each guess taken before this one."""
    guessed = np.flatnonzero(count > 1)
    if not len(guessed):
        return best
    pairs_q, pairs_c = ctx.graph.containers(*ctx.graph.sorted_elements(elem_pos, group), links.todo, q[guessed])
    start, end = ctx.graph.start, ctx.graph.end
    call = ctx.call
    kids = np.concatenate([known, q[count == 1]])
    parents = np.concatenate([links.parent[known], best[count == 1]])
    # Only the calls a guess could be compared with: of a candidate, and one the guesses make.
    among = np.isin(parents, pairs_c) & np.isin(call[kids], call[q[guessed]])
    kids, parents = kids[among], parents[among]
    made: dict[int, list] = {}
    for kid, parent in zip(kids.tolist(), parents.tolist()):
        made.setdefault(parent, []).append((call[kid], start[kid], end[kid]))
    best = best.copy()
    bounds = np.searchsorted(pairs_q, q[guessed]).tolist() + [len(pairs_q)]
    for k, (i, hop) in enumerate(zip(guessed.tolist(), q[guessed].tolist())):
        best[i] = pick(hop, int(best[i]), pairs_c[bounds[k] : bounds[k + 1]].tolist(), made)
        made.setdefault(int(best[i]), []).append((call[hop], start[hop], end[hop]))
    return best


def _connection_codes(hops: pd.DataFrame, capture: np.ndarray) -> np.ndarray:
    """One code per (capture, client connection); -1 where the connection is unknown."""
    conn = pd.factorize(hops["client_conn_id"].astype(object))[0].astype(np.int64)
    return _pair_code(capture, conn)


def _endpoint_codes(hops: pd.DataFrame, capture: np.ndarray) -> np.ndarray:
    """One code per (capture, service, method, path) of the hops that have a client connection."""
    keys = hops[["service", "method", "path"]].assign(capture=capture)
    code = group_codes(keys, ["capture", "service", "method", "path"])
    return np.where(hops["client_conn_id"].notna().to_numpy(), code, -1)


def _by_connection(ctx: _Hops, links: _Links, conn: np.ndarray, endpoint: np.ndarray) -> None:
    """Tier 10, for hops no header or token linked: their client connection's owner.

    On HTTP/1.1 the requests on one client connection never overlap and come from one
    calling process, so the service the header- and token-linked hops of a connection
    were called by is where the parent of every other hop on it must be. A connection
    that carried no such hop (a pool grows under load) takes the owner of the other
    connections that called the same endpoint: a caller's pool serves all its calls.
    Among the owner's hops containing the hop, those still free are candidates: a handler
    makes its calls one after another, so a hop whose known calls (or a call given it in
    this pass) overlap this one is not. Of the free ones the first to end is chosen: a
    service works off concurrent requests in the order it took them in, so the request it
    served first both makes its calls first and answers first. (The proxy's start times
    may order them otherwise: it timestamps a request before it forwards it.) Unless a free
    one of its kind has made the call fewer times (:func:`_first_free`): of six requests
    coming in a few milliseconds apart, each answered 429 at once and retrying a second
    later, the first to end took two others' first calls and its own retry, a retry storm
    that no request made.
    """
    conn_owner, conn_share = _owners(conn, ctx.service[np.maximum(links.parent, 0)], links.confident())
    hop_owner, hop_share = _per_hop(conn, conn_owner, conn_share)
    # Each hop on an owned connection votes for its endpoint with its connection's owner.
    end_owner, end_share = _owners(endpoint, hop_owner, hop_owner >= 0)
    fallback, fallback_share = _per_hop(endpoint, end_owner, end_share)
    unowned = hop_owner < 0
    hop_owner[unowned], hop_share[unowned] = fallback[unowned], fallback_share[unowned]
    asking = np.flatnonzero(links.todo & (hop_owner >= 0))
    if not len(asking):
        return
    q, c = _owner_candidates(ctx, asking, hop_owner)
    q_out, c_out, count = _first_free(ctx.graph, ctx.call, q, c, _busy_children(ctx, links))
    links.parent[q_out], links.candidates[q_out] = c_out, count
    links.link[q_out] = _CONNECTION
    links.confidence[q_out] = hop_share[q_out] / count
    links.todo[q_out] = False


def _per_hop(key: np.ndarray, owner: np.ndarray, share: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if not len(owner):
        return np.full(len(key), -1, np.int64), np.zeros(len(key))
    at = np.maximum(key, 0)
    return np.where(key >= 0, owner[at], -1), np.where(key >= 0, share[at], 0.0)


def _owner_candidates(ctx: _Hops, asking: np.ndarray, hop_owner: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(hop, candidate) pairs: every hop of the owner service of ``asking``'s connection containing it."""
    graph = ctx.graph
    # Every hop is a candidate under its own service; the hops asking, under their connection's owner.
    elem_pos = np.concatenate([np.arange(ctx.n), asking])
    elem_group = _pair_code(ctx.capture[elem_pos], np.concatenate([ctx.service.astype(np.int64), hop_owner[asking]]))
    key = np.sort(elem_group * ctx.n + elem_pos, kind=_MOSTLY_SORTED)
    key = key[run_starts(key)]
    group, elem_pos = key // ctx.n, key % ctx.n
    asks = np.zeros(ctx.n, bool)
    asks[asking] = True
    owner_group = _pair_code(ctx.capture[asking], hop_owner[asking])
    wanted = pd.Series(owner_group, index=asking)
    is_query = asks[elem_pos] & (group == wanted.reindex(elem_pos).fillna(-2).to_numpy(np.int64))
    pairs_q, pairs_c = [], []
    for c_pos, qp, lo, hi in graph._classes(elem_pos, group, elem_pos[is_query], group[is_query]):
        for qq, _, cc in _expand(qp, lo, hi, c_pos):
            ok = (graph.end[cc] >= graph.end[qq]) & (graph.service[cc] != graph.service[qq])
            pairs_q.append(qq[ok])
            pairs_c.append(cc[ok])
    if not pairs_q:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(pairs_q), np.concatenate(pairs_c)


def _busy_children(ctx: _Hops, links: _Links) -> dict[int, list[tuple[int, float, float]]]:
    """The calls of each hop's header- or token-linked children, as (:attr:`_Hops.call` code, start, end)."""
    kids = np.flatnonzero(links.confident())
    busy: dict[int, list[tuple[int, float, float]]] = {}
    call, start, end = ctx.call, ctx.graph.start, ctx.graph.end
    for kid, parent in zip(kids.tolist(), links.parent[kids].tolist()):
        busy.setdefault(parent, []).append((call[kid], start[kid], end[kid]))
    return busy


def _first_free(graph: _Graph, call: np.ndarray, q: np.ndarray, c: np.ndarray, busy: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per hop (in start order): the first-ending candidate whose children do not overlap it (and make
    it busy for the hops after); among the free ones of its kind, one that has made the call fewest times so far.

    Requests of one kind make the same calls: of two free ones, one that has not made this call yet
    is likelier its maker than one that has (which would be retrying it)."""
    order = np.lexsort((c, q))
    q, c = q[order], c[order]
    bounds = np.flatnonzero(run_starts(q)).tolist() + [len(q)]
    out_q, out_c, out_n = [], [], []
    start, end = graph.start, graph.end
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        hop = int(q[lo])
        s, e, mine = start[hop], end[hop], call[hop]
        free = [int(cand) for cand in c[lo:hi] if not any(b_s < e and s < b_e for _, b_s, b_e in busy.get(int(cand), ()))]
        if free:
            kind = call[min(free, key=end.__getitem__)]
            made = {cand: sum(code == mine and b_s < s for code, b_s, _ in busy.get(cand, ())) for cand in free if call[cand] == kind}
            chosen = min(made, key=lambda cand: (made[cand], end[cand]))
            out_q.append(hop)
            out_c.append(chosen)
            out_n.append(len(free))
            busy.setdefault(chosen, []).append((mine, s, e))
    return np.array(out_q, np.int64), np.array(out_c, np.int64), np.array(out_n, np.int64)


def _owners(conn: np.ndarray, caller: np.ndarray, voting: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per code of ``conn`` (a connection, an endpoint): the service that called over it
    (-1: unknown), by majority of the ``caller`` of its ``voting`` hops, and the share of them that agree."""
    n_conn = int(conn.max(initial=-1)) + 1
    owner, share = np.full(n_conn, -1, np.int64), np.zeros(n_conn)
    voters = np.flatnonzero(voting & (conn >= 0))
    if not len(voters):
        return owner, share
    votes = pd.DataFrame({"conn": conn[voters], "caller": caller[voters]})
    counts = votes.value_counts().reset_index(name="count").sort_values(["conn", "count"], ascending=[True, False])
    total = counts.groupby("conn")["count"].transform("sum")
    first = ~counts["conn"].duplicated()
    owner[counts.loc[first, "conn"].to_numpy()] = counts.loc[first, "caller"].to_numpy()
    share[counts.loc[first, "conn"].to_numpy()] = (counts["count"] / total)[first].to_numpy()
    return owner, share


def _with_links(hops: pd.DataFrame, links: _Links) -> pd.DataFrame:
    parent = links.parent
    trace, depth, order = _tree(parent)
    ids = hops.index.to_numpy()
    out = hops.copy(deep=False)  # copy-on-write: new columns, shared old ones
    out["parent_id"] = pd.array(np.where(parent >= 0, ids[np.maximum(parent, 0)], 0), dtype="Int64")
    out.loc[parent < 0, "parent_id"] = pd.NA
    out["link"] = pd.Categorical.from_codes(links.link, pd.Index(LINKS, dtype="str"))
    out["link_candidates"] = links.candidates
    out["link_confidence"] = links.confidence
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
    start = hops["started_at"].to_numpy(np.float64, na_value=np.nan)
    end = hops["ended_at"].to_numpy(np.float64, na_value=np.nan)
    step = np.diff(start)
    if np.all((step > 0) | ((step == 0) & (np.diff(end) <= 0))):
        return hops
    # numpy's lexsort, as sort_values(["started_at", "ended_at"], ascending=[True, False], kind="stable")
    # orders (NaN last in both keys), without pandas ranking each key first: 0.05 s at 1M hops, not 0.3.
    return hops.take(np.lexsort((-end, start)))


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


# The keys sorted here (group * n + position) come in long runs already in order: numpy's stable sort
# (timsort for int64) merges the runs, 5-10x faster than its default introsort (at 1M hops: 0.24 ->
# 0.035 s over a rebuild's nine sorts). These sort values, not positions: the result is the same.
_MOSTLY_SORTED = "stable"


class _Graph:
    """The hops' intervals, for containment searches."""

    def __init__(self, start, end, service, entry) -> None:
        self.start, self.end, self.service, self.entry = start, end, service, entry
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

    def innermost(self, elem_pos: np.ndarray, group: np.ndarray, todo: np.ndarray, peers_rival: bool = False):
        """For each hop still to do that has an element here, its innermost container among
        the elements of the same group. Returns (hops, chosen parents, candidate counts).
        With ``peers_rival``, a candidate on the chosen one's service is a rival too: a hop's
        parent is on another service, so another request of that service is not its ancestor
        (only by a call back, S to T to S), however long it lasts."""
        elem_pos, group = self.sorted_elements(elem_pos, group)
        is_query = todo[elem_pos]
        q_pos, q_group = elem_pos[is_query], group[is_query]
        best = np.full(self.n, -1, np.int64)
        low_end = np.full(self.n, np.inf)
        first_c = np.full(self.n, self.n, np.int64)
        for c_pos, qp, lo, hi in self._classes(elem_pos, group, q_pos, q_group):
            for q, seg, c in _expand(qp, lo, hi, c_pos):
                ok = (self.end[c] >= self.end[q]) & (self.service[c] != self.service[q])
                first = np.flatnonzero(run_starts(seg))
                # Innermost: the latest-starting container (positions are in start order).
                np.maximum.at(best, q[first], np.maximum.reduceat(np.where(ok, c, -1), first))
                np.minimum.at(low_end, q[first], np.minimum.reduceat(np.where(ok, self.end[c], np.inf), first))
                np.minimum.at(first_c, q[first], np.minimum.reduceat(np.where(ok, c, self.n), first))
        hops = np.flatnonzero(best >= 0)
        chosen = best[hops]
        count = np.ones(len(hops), np.int64)
        # A candidate that ended before the chosen one is not its ancestor, nor is any other
        # candidate when the chosen one is where a request entered: the choice was a guess.
        rivalled = (low_end[hops] < self.end[chosen]) | (self.entry[chosen] & (first_c[hops] < chosen))
        if peers_rival:
            rivalled |= self._peered(elem_pos, group, q_pos, q_group, best)[hops]
        rival = hops[rivalled]
        if len(rival):
            count[np.searchsorted(hops, rival)] += self._rivals(rival, best, elem_pos, group, todo, peers_rival)
        return hops, chosen, count

    def _peered(self, elem_pos, group, q_pos, q_group, best) -> np.ndarray:
        """Per hop: whether another candidate than ``best`` runs on the service of ``best``."""
        found = np.zeros(self.n, bool)
        for c_pos, qp, lo, hi in self._classes(elem_pos, group, q_pos, q_group):
            for q, _, c in _expand(qp, lo, hi, c_pos):
                found[q[(self.end[c] >= self.end[q]) & (self.service[c] == self.service[best[q]]) & (c != best[q])]] = True
        return found

    def sorted_elements(self, elem_pos, group) -> tuple[np.ndarray, np.ndarray]:
        """One element per (group, hop), sorted by group then start: the order every search needs."""
        valid = group >= 0
        key = np.sort(group[valid] * self.n + elem_pos[valid], kind=_MOSTLY_SORTED)
        key = key[run_starts(key)]
        return key % self.n, key // self.n

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

    def _rivals(self, rival, best, elem_pos, group, todo, peers_rival: bool = False) -> np.ndarray:
        """How many candidates of each hop in ``rival`` are not ancestors of its chosen parent."""
        q, c = self.containers(elem_pos, group, todo, rival)
        unique = q * self.n + c
        chosen = best[q]
        others = (self.entry[chosen] | peers_rival & (self.service[c] == self.service[chosen])) & (c != chosen)
        unique = unique[(self.end[c] < self.end[chosen]) | others]
        return np.bincount(np.searchsorted(rival, unique // self.n), minlength=len(rival))

    def containers(self, elem_pos, group, todo, wanted) -> tuple[np.ndarray, np.ndarray]:
        """(hop, candidate) pairs, each once: the elements of a group of each hop of ``wanted``
        (still to do) that contain it, of another service; the elements as :meth:`sorted_elements` gives them."""
        mask = np.zeros(self.n, bool)
        mask[wanted] = True
        keep = mask[elem_pos] & todo[elem_pos]
        q_pos, q_group = elem_pos[keep], group[keep]
        pairs_q, pairs_c = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for c_pos, qp, lo, hi in self._classes(elem_pos, group, q_pos, q_group):
            for q, seg, c in _expand(qp, lo, hi, c_pos):
                ok = (self.end[c] >= self.end[q]) & (self.service[c] != self.service[q])
                pairs_q.append(q[ok])
                pairs_c.append(c[ok])
        # The same hop may be a candidate through two tokens: once (a sort: np.unique hashes, slower here).
        unique = np.sort(np.concatenate(pairs_q) * self.n + np.concatenate(pairs_c), kind=_MOSTLY_SORTED)
        unique = unique[run_starts(unique)]
        return unique // self.n, unique % self.n


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
