"""Rebuilding request trees: exact links from trace headers, inferred ones from tokens and nesting."""

from __future__ import annotations

import sqlite3

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hoptrace.analyzer import LINKS, link_accuracy

from .analyzer_fixtures import Builder, analyze_builder, rebuild_builder, synthetic_stack


def links(a) -> dict[int, tuple]:
    return {
        int(i): (None if pd.isna(p) else int(p), link) for i, p, link in zip(a.hops.index, a.hops["parent_id"], a.hops["link"])
    }


def test_token_links_checkout_tree(tmp_path):
    b = Builder()
    t = b.token(sub="alice", exp=100)
    root = b.hop("gateway", "POST /checkout", 0.0, 2.0, presented=t)
    verify = b.hop("auth", "GET /verify", 0.01, 0.02, presented=t, parent=root)
    pay = b.hop("payment", "POST /checkout", 0.03, 1.9, presented=t, parent=root)
    cart = b.hop("cart", "GET /cart/cart_abc123", 0.04, 0.05, presented=t, parent=pay)
    intro = b.hop("auth", "POST /introspect", 1.5, 1.6, validated=t, parent=pay)
    a = analyze_builder(b, tmp_path)
    assert links(a) == {
        root: (None, "root"), verify: (root, "token"), pay: (root, "token"), cart: (pay, "token"), intro: (pay, "token"),
    }  # fmt: skip
    h = a.hops
    assert h.loc[[root, verify, pay, cart, intro], "depth"].tolist() == [0, 1, 1, 2, 2]
    assert h.loc[[root, verify, pay, cart, intro], "order"].tolist() == [0, 1, 2, 3, 4]
    assert (h["trace"] == root).all()
    assert h.loc[cart, "endpoint"] == "GET /cart/{id}"
    assert link_accuracy(h, b.truth) == 1.0


def test_concurrent_users_are_told_apart_by_their_tokens(tmp_path):
    b = Builder()
    ta, tb = b.token(sub="alice", exp=100), b.token(sub="bob", exp=100)
    ra = b.hop("gateway", "GET /products", 0.000, 1.000, presented=ta)
    rb = b.hop("gateway", "GET /products", 0.001, 1.001, presented=tb)
    # Bob's call starts first and Alice's request started earlier: nesting alone would swap them.
    cb = b.hop("products", "GET /products", 0.010, 0.990, presented=tb, parent=rb)
    ca = b.hop("products", "GET /products", 0.011, 0.991, presented=ta, parent=ra)
    a = analyze_builder(b, tmp_path)
    assert links(a)[ca] == (ra, "token") and links(a)[cb] == (rb, "token")


def test_subject_links_a_refreshed_token(tmp_path):
    b = Builder()
    old, new = b.token(sub="alice", exp=10), b.token(sub="alice", exp=100)
    other = b.token(sub="bob", exp=100)
    root = b.hop("gateway", "POST /checkout", 0.0, 1.0, presented=old)
    b.hop("gateway", "POST /checkout", 0.0001, 1.1, presented=other)
    refresh = b.hop("auth", "POST /refresh", 0.01, 0.02, validated=old, issued=new, parent=root)
    pay = b.hop("payment", "POST /checkout", 0.03, 0.9, presented=new, parent=root)
    a = analyze_builder(b, tmp_path)
    # The refresh hop itself issued `new` but ended before payment started: not a container.
    assert links(a)[pay] == (root, "token") and links(a)[refresh] == (root, "token")


def test_issued_token_links_login_through_gateway(tmp_path):
    b = Builder()
    users = []
    for i in range(3):  # three concurrent logins, no token presented anywhere
        t = b.token(sub=f"u{i}", exp=100)
        root = b.hop("gateway", "POST /auth/login", 0.001 * i, 0.05 + 0.001 * i, issued=t)
        users.append((root, b.hop("auth", "POST /login", 0.01 + 0.001 * i, 0.04, issued=t, parent=root)))
    a = analyze_builder(b, tmp_path)
    for root, child in users:
        assert links(a)[child] == (root, "token")


def test_nesting_without_tokens_and_ambiguity_between_overlapping_requests(tmp_path):
    b = Builder()
    r1 = b.hop("gateway", "GET /health", 0.0, 1.0)
    c1 = b.hop("products", "GET /health", 0.1, 0.2, parent=r1)
    r2 = b.hop("gateway", "GET /health", 2.0, 3.0)
    c2 = b.hop("products", "GET /health", 2.01, 2.02, parent=r2)
    r3 = b.hop("gateway", "GET /health", 2.05, 3.1)
    c3 = b.hop("products", "GET /health", 2.1, 2.2, parent=r3)
    a = analyze_builder(b, tmp_path)
    assert links(a)[c1] == (r1, "nesting") and links(a)[c2] == (r2, "nesting")
    # Inside two overlapping requests, one of which made that call already: a guess, marked as one.
    assert links(a)[c3] == (r3, "ambiguous")
    assert a.hops.loc[c3, "link_candidates"] == 2
    assert links(a)[r2] == (None, "root")
    assert any("ambiguous" in note for note in a.notes)


def test_orphan_and_unknown_entry(tmp_path):
    b = Builder()
    root = b.hop("gateway", "GET /a", 0.0, 1.0)
    orphan = b.hop("auth", "GET /verify", 5.0, 5.1)  # nothing contains it: a client called auth directly
    child = b.hop("auth", "GET /verify", 0.1, 0.2, parent=root)
    a = analyze_builder(b, tmp_path)
    assert links(a)[orphan] == (None, "orphan") and a.hops.loc[orphan, "trace"] == orphan
    assert links(a)[child] == (root, "nesting")
    b.entry = None  # an old capture without an entry route: what nothing contains is a root
    a = analyze_builder(b, tmp_path, name="noentry.db")
    assert links(a)[orphan] == (None, "root") and links(a)[root] == (None, "root")


def test_b3_parent_span_ids_are_exact(tmp_path):
    b = Builder()
    t = b.token(sub="alice", exp=100)
    root = b.hop("gateway", "GET /a", 0.0, 1.0, presented=t, trace_id="t1", span_id="s1")
    # Two overlapping siblings: nesting could not tell whose child `deep` is; the span ids can.
    s2 = b.hop("cart", "GET /x", 0.1, 0.9, presented=t, parent=root, trace_id="t1", span_id="s2", parent_span_id="s1")
    s3 = b.hop("products", "GET /y", 0.2, 0.8, presented=t, parent=root, trace_id="t1", span_id="s3", parent_span_id="s1")
    deep = b.hop("auth", "GET /v", 0.3, 0.4, presented=t, parent=s2, trace_id="t1", span_id="s4", parent_span_id="s2")
    a = analyze_builder(b, tmp_path)
    assert links(a) == {root: (None, "root"), s2: (root, "header"), s3: (root, "header"), deep: (s2, "header")}


def test_traceparent_without_parent_span_nests_within_the_trace(tmp_path):
    b = Builder()
    ta, tb = b.token(sub="a", exp=100), b.token(sub="b", exp=100)
    # W3C mode: the client sends no traceparent, so the roots have none; the gateway starts one.
    ra = b.hop("gateway", "POST /checkout", 0.0, 2.0, presented=ta)
    rb = b.hop("gateway", "POST /checkout", 0.001, 2.0, presented=tb)
    pa = b.hop("payment", "POST /checkout", 0.01, 1.9, presented=ta, parent=ra, trace_id="A", span_id="a1")
    pb = b.hop("payment", "POST /checkout", 0.011, 1.9, presented=tb, parent=rb, trace_id="B", span_id="b1")
    # payment calls auth without forwarding the bearer token: only the trace id says whose it is.
    ia = b.hop("auth", "POST /introspect", 1.0, 1.1, parent=pa, trace_id="A", span_id="a2")
    ib = b.hop("auth", "POST /introspect", 1.0, 1.1, parent=pb, trace_id="B", span_id="b2")
    a = analyze_builder(b, tmp_path)
    got = links(a)
    assert got[pa] == (ra, "token") and got[pb] == (rb, "token")
    assert got[ia] == (pa, "header") and got[ib] == (pb, "header")


def test_hostile_span_ids_cannot_make_a_cycle(tmp_path):
    b = Builder()
    x = b.hop("cart", "GET /x", 0.0, 1.0, trace_id="t", span_id="a", parent_span_id="b")
    y = b.hop("products", "GET /y", 0.0, 1.0, trace_id="t", span_id="b", parent_span_id="a")
    z = b.hop("auth", "GET /z", 0.0, 1.0, trace_id="t", span_id="c", parent_span_id="c")
    a = analyze_builder(b, tmp_path)
    parents = links(a)
    # Exactly one direction survives, and nothing is its own ancestor.
    assert sorted([parents[x][0] is None, parents[y][0] is None]) == [False, True]
    assert parents[z][0] != z
    assert a.hops["depth"].max() <= 2


def test_identical_intervals_on_two_services_do_not_loop(tmp_path):
    b = Builder(entry=None)
    b.hop("cart", "GET /x", 0.0, 1.0)
    b.hop("products", "GET /y", 0.0, 1.0)
    a = analyze_builder(b, tmp_path)
    assert sorted(a.hops["depth"].tolist()) == [0, 1]


def test_two_captures_are_never_linked(tmp_path):
    b = Builder()
    root = b.hop("gateway", "GET /a", 0.0, 1.0)
    other = b.hop("auth", "GET /b", 0.1, 0.2, capture_id=2)
    path = b.write(tmp_path / "two.db")
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT INTO captures (id, started_at, routes, entry, hoptrace_version, mitmproxy_version) VALUES (2, 0, '[]', 'gateway', 'x', 'y')"
        )
    from hoptrace.analyzer import analyze

    a = analyze(path)
    assert links(a)[other] == (None, "orphan") and links(a)[root] == (None, "root")


def test_link_kinds_are_the_documented_ones(tmp_path):
    a = analyze_builder(synthetic_stack(3, 1, seed=3), tmp_path)
    assert set(a.hops["link"]) <= set(LINKS)
    assert a.hops["parent_id"].dtype == "Int64" and a.hops["trace"].dtype == "int64"


@pytest.mark.parametrize("think_s", [0.0, 0.01])
def test_inference_accuracy_ten_concurrent_users(tmp_path, think_s):
    b = synthetic_stack(users=10, workflows=3, seed=7, think_s=think_s)
    a = analyze_builder(b, tmp_path)
    assert link_accuracy(a.hops, b.truth) >= 0.99
    assert a.hops["link"].isin(["root", "token"]).all()


def test_inference_with_propagated_trace_ids_is_exact(tmp_path):
    b = synthetic_stack(users=10, workflows=2, seed=11, propagate=True)
    a = analyze_builder(b, tmp_path)
    assert link_accuracy(a.hops, b.truth) == 1.0
    assert (a.hops["link"] == "header").sum() > 0


def test_link_accuracy_counts_roots_and_ignores_unknown_hops():
    hops = pd.DataFrame({"parent_id": pd.array([pd.NA, 1, 1, 2], dtype="Int64")}, index=[1, 2, 3, 4])
    truth = pd.Series({1: None, 2: 1, 3: 2, 4: 2, 99: 1}, dtype="Int64")
    assert link_accuracy(hops, truth) == 0.75
    with pytest.raises(ValueError):
        link_accuracy(hops, pd.Series({7: 1}, dtype="Int64"))


def _grow_tree(b: Builder, draw, start: float, services: list[str]) -> float:
    """A random call tree under one gateway request starting at ``start``; returns its end."""

    def build(service, s, depth, parent_slot):
        kids = draw(st.integers(0, 3)) if depth < 3 else 0
        others = [x for x in services if x not in ("gateway", service)]
        cursor = s + 0.001
        children: list = []
        for _ in range(kids):
            cursor = build(draw(st.sampled_from(others)), cursor, depth + 1, children) + 0.001
        end = cursor + 0.001
        parent_slot.append((service, s, end, children))
        return end

    top: list = []
    end = build("gateway", start, 0, top)

    def emit(node, parent):
        service, s, e, children = node
        me = b.hop(service, f"GET /{service}", s, e, parent=parent)
        for child in children:
            emit(child, me)

    emit(top[0], None)
    return end


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_nesting_recovers_any_sequential_tree(tmp_path, data):
    b = Builder()
    t = 0.0
    for _ in range(data.draw(st.integers(1, 3))):
        t = _grow_tree(b, data.draw, t, ["gateway", "a", "b", "c", "d"]) + 0.5
    hops = rebuild_builder(b, tmp_path)
    assert link_accuracy(hops, b.truth) == 1.0
    # Depth-first order: every hop comes after its parent, and ranks are a permutation.
    for _, tree in hops.groupby("trace"):
        assert sorted(tree["order"]) == list(range(len(tree)))
        parents = tree["parent_id"].dropna().astype(int)
        assert (tree.loc[parents.index, "order"].to_numpy() > tree.loc[parents.to_numpy(), "order"].to_numpy()).all()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    st.lists(st.tuples(st.integers(0, 50), st.integers(0, 50), st.sampled_from(["gateway", "a", "b"])), min_size=1, max_size=40)
)
def test_any_intervals_give_a_forest(tmp_path, spans):
    b = Builder()
    for s, length, service in spans:
        b.hop(service, "GET /", s / 10, (s + length) / 10)
    h = rebuild_builder(b, tmp_path)
    has_parent = h["parent_id"].notna()
    parents = h.loc[h.loc[has_parent, "parent_id"].astype(int).to_numpy()]
    child = h[has_parent]
    # A parent contains its child, runs on another service, and the depths add up.
    assert (parents["started_at"].to_numpy() <= child["started_at"].to_numpy()).all()
    assert (parents["ended_at"].to_numpy() >= child["ended_at"].to_numpy()).all()
    assert (parents["service"].to_numpy() != child["service"].to_numpy()).all()
    assert (parents["depth"].to_numpy() + 1 == child["depth"].to_numpy()).all()
    assert (h.loc[h["trace"].to_numpy(), "depth"] == 0).all()


_GAP = st.floats(0.0005, 0.02)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(arrivals=st.lists(_GAP, min_size=2, max_size=8), delay=st.floats(0.001, 0.5), data=st.data())
def test_a_burst_of_requests_gets_its_calls_in_arrival_order(tmp_path, arrivals, delay, data):
    """Requests of one kind that all came in before the first of their calls went out (ten logins at once):
    the service takes them in order, so the k-th call is the k-th request's, whatever order they answer in.
    The innermost container alone would give every call to the last one in."""
    b = Builder()
    k = len(arrivals)
    starts = np.cumsum(arrivals)
    calls = starts[-1] + delay + np.cumsum(data.draw(st.lists(_GAP, min_size=k, max_size=k)))
    ends = calls[-1] + 1.0 + 0.01 * np.array(data.draw(st.permutations(range(k))))
    for start, at, end in zip(starts, calls, ends):
        request = b.hop("edge", "POST /login", start, end)
        b.hop("idp", "POST /oauth/token", at, at + 0.3, parent=request)
    hops = rebuild_builder(b, tmp_path)
    assert link_accuracy(hops, b.truth) == 1.0
    # A guess all the same: nothing but the order of arrival tells these requests apart.
    assert (hops.loc[hops["path"] == "/oauth/token", "link"] == "ambiguous").all()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.tuples(_GAP, _GAP, st.floats(0.001, 0.2)), min_size=2, max_size=8), idle=st.booleans(), ids=st.booleans())
def test_requests_that_make_their_call_as_they_come_in_keep_it(tmp_path, steps, idle, ids):
    """Overlapping requests of one kind, each making its call before the next comes in: every call is its own
    request's, though all of them contain the later calls; also beside a request of the kind that never makes
    the call (``idle``: a cache hit), and when each call names its own id (``ids``: /items/1001, /items/1002)."""
    b = Builder()
    if idle:
        b.hop("edge", "GET /me", 0.0, 20.0)
    t, requests = 0.001, []
    for arrival, wait, length in steps:
        t += arrival
        requests.append((b.hop("edge", "GET /me", t, 10.0 + t), t + wait / 2, length))
        t += wait
    for k, (request, at, length) in enumerate(requests):
        b.hop("idp", f"GET /userinfo/{1000 + k}" if ids else "GET /userinfo", at, at + length, parent=request)
    assert link_accuracy(rebuild_builder(b, tmp_path), b.truth) == 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(gaps=st.lists(st.floats(0.0002, 0.002), min_size=3, max_size=8), reaction=st.floats(1.2, 4.0), data=st.data())
def test_a_burst_coming_in_faster_than_its_service_reacts_gets_its_calls_in_arrival_order(tmp_path, gaps, reaction, data):
    """Requests of one kind coming in a fraction of a millisecond apart, each making its call a reaction time
    (``reaction`` times the mean gap, so the first calls go out while the burst is still coming in) after
    it came: the k-th call is the k-th request's. Lone requests of the kind before show the reaction time.
    Read from start times alone, each call went to a request that came in after its own."""
    b = Builder(entry="edge")
    react = reaction * float(np.mean(gaps))
    for k in range(3):  # lone requests, whose calls nothing else contains
        lone = b.hop("edge", "GET /flaky", k, k + 0.5)
        b.hop("ledger", "GET /flaky", k + react, k + react + 0.01, parent=lone)
    starts = 10.0 + np.cumsum(gaps)
    ends = starts[-1] + react + 1.0 + 0.01 * np.array(data.draw(st.permutations(range(len(gaps)))))
    for start, end in zip(starts, ends):
        request = b.hop("edge", "GET /flaky", start, end)
        b.hop("ledger", "GET /flaky", start + react, start + react + 0.3, parent=request)
    hops = rebuild_builder(b, tmp_path)
    assert link_accuracy(hops, b.truth) == 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    failed=st.lists(st.booleans(), min_size=2, max_size=8).filter(lambda f: sum(f) >= 2),
    backoff=st.floats(0.01, 1.0),
    slow=st.booleans(),
)
def test_retries_in_a_burst_go_to_the_requests_whose_calls_failed(tmp_path, failed, backoff, slow):
    """A burst of requests of one kind, each making its call in turn; the ones whose call failed retry it
    after one backoff, in the order they failed, and the others answer. Each retry is its own request's: of
    the requests that have made the call, the one that made it fewest times, waiting longest since.
    The innermost container alone would give every retry to the last request still open; or (``slow``)
    to a long call to another service that began just before the retries, a kind of request never seen
    making that call. (A retry made while requests of the burst have yet to make their first call may
    be taken for one of those.)"""
    b = Builder(entry="edge")
    k = len(failed)
    starts = 0.001 * np.arange(k)
    calls = starts[-1] + 0.01 + 0.002 * np.arange(k)
    backoff += calls[-1] - calls[0]  # the retries come after the burst's first calls
    if slow:
        begins = calls[0] + 0.0015 + backoff - 0.002
        waiting = b.hop("edge", "GET /slow", begins, begins + backoff + 1.0)
        b.hop("catalog", "GET /slow", begins + 0.0005, begins + backoff + 0.9, parent=waiting)
    for start, at, bad in zip(starts, calls, failed):
        end = at + 0.001 + (backoff + 0.05 if bad else 0.0005)
        request = b.hop("edge", "GET /flaky", start, end)
        b.hop("ledger", "GET /flaky", at, at + 0.001, status=503 if bad else 200, parent=request)
        if bad:
            b.hop("ledger", "GET /flaky", at + 0.001 + backoff, at + 0.001 + backoff + 0.001, parent=request)
    hops = rebuild_builder(b, tmp_path)
    assert link_accuracy(hops, b.truth) == 1.0


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(st.floats(0.002, 0.02), min_size=2, max_size=8))
def test_on_a_shared_pool_a_call_goes_to_a_request_that_has_not_made_it(tmp_path, steps):
    """Requests of one kind coming in one after another, each calling at once over a pool of connections
    and answered 429, then each retrying once after a second, in turn. A request that has made the call
    is not the one making it again while another has not: the first to end alone would take every first call."""
    b = Builder(entry="edge")
    t = b.token(sub="svc", exp=10_000)
    # One call linked by its token: the connections calling this endpoint are the edge's.
    known = b.hop("edge", "GET /quote", 0.0, 0.1, presented=t)
    b.hop("catalog", "GET /quote", 0.01, 0.02, presented=t, parent=known, client_conn_id="c0")
    starts = 1.0 + np.cumsum(steps)
    requests = [b.hop("edge", "GET /quote", start, 3.0 + 0.01 * k) for k, start in enumerate(starts)]
    for k, (request, start) in enumerate(zip(requests, starts)):
        b.hop("catalog", "GET /quote", start + 0.0005, start + 0.001, status=429, parent=request, client_conn_id=f"c{k + 1}")
    for k, request in enumerate(requests):
        at = 2.5 + 0.002 * k
        b.hop("catalog", "GET /quote", at, at + 0.001, parent=request, client_conn_id=f"c{k % 2 + 1}")
    hops = rebuild_builder(b, tmp_path)
    assert (hops.loc[hops["client_conn_id"].notna() & (hops["client_conn_id"] != "c0"), "link"] == "connection").all()
    assert link_accuracy(hops, b.truth) == 1.0


def _refresh_race(b: Builder, at: float, winner_first: bool, winners_call_first: bool) -> list[tuple[int, int]]:
    """Two requests of one client presenting one refresh token at once (to the gateway, on to
    auth): one wins a new token pair, the other is refused. Returns (request, its call) pairs."""
    refresh = b.token(sub="alice", exp=3600)
    fresh, next_refresh = b.token(sub="alice", exp=3600), b.token(sub="alice", exp=7200)
    starts = (at, at + 0.01) if winner_first else (at + 0.01, at)
    calls = (at + 0.05, at + 0.051) if winners_call_first else (at + 0.051, at + 0.05)
    won = b.hop("gateway", "POST /auth/refresh", starts[0], at + 0.30, validated=refresh, issued=(fresh, next_refresh))
    lost = b.hop("gateway", "POST /auth/refresh", starts[1], at + 0.31, validated=refresh, status=401)
    # The refused call ends before the winner's request does: both requests contain both calls.
    won_call = b.hop("auth", "POST /refresh", calls[0], at + 0.15, validated=refresh, issued=(fresh, next_refresh), parent=won)
    lost_call = b.hop("auth", "POST /refresh", calls[1], at + 0.16, validated=refresh, status=401, parent=lost)
    return [(won, won_call), (lost, lost_call)]


@pytest.mark.parametrize("winner_first", [True, False])
@pytest.mark.parametrize("winners_call_first", [True, False])
def test_concurrent_refreshes_with_one_refresh_token_link_each_call_to_its_request(tmp_path, winner_first, winners_call_first):
    b = Builder()
    pairs = _refresh_race(b, 0.0, winner_first, winners_call_first)
    a = analyze_builder(b, tmp_path)
    (won, won_call), (lost, lost_call) = pairs
    # The token pair the winning call answered with went back through its request only: certain.
    assert links(a)[won_call] == (won, "token") and a.hops.loc[won_call, "link_confidence"] == 1.0
    # The refused call: both requests contain it, but the winner's was busy with its own /refresh.
    assert links(a)[lost_call] == (lost, "ambiguous")
    assert link_accuracy(a.hops, b.truth) == 1.0
    # Each request issued its own tokens: no token is reported as issued by two requests.
    assert "token_reuse" not in set(a.findings["kind"])


def test_a_container_busy_with_the_same_call_is_passed_over_only_for_that_call(tmp_path):
    b = Builder()
    t, new = b.token(sub="alice", exp=3600), b.token(sub="alice", exp=3600)
    first = b.hop("gateway", "POST /checkout", 0.0, 1.0, presented=t)
    second = b.hop("gateway", "POST /checkout", 0.01, 1.01, presented=t, issued=new)
    # `second` is linked for sure to its /refresh call (it answered with the call's token) ...
    sure = b.hop("auth", "POST /refresh", 0.1, 0.3, validated=t, parent=second, issued=new)
    # ... which does not make it busy for a call to another endpoint at the same time.
    other = b.hop("auth", "GET /verify", 0.2, 0.25, presented=t, parent=second)
    # A second /refresh overlapping `sure` cannot be `second`'s: it goes to `first`.
    again = b.hop("auth", "POST /refresh", 0.2, 0.26, validated=t, parent=first)
    a = analyze_builder(b, tmp_path)
    assert links(a)[other] == (second, "ambiguous")
    assert links(a)[again] == (first, "ambiguous")
    assert links(a)[sure] == (second, "token")


def test_many_concurrent_refresh_races_link_every_call(tmp_path):
    b = Builder()
    pairs = []
    for i in range(20):  # twenty clients, each racing itself, all overlapping one another
        pairs += _refresh_race(b, 0.005 * i, winner_first=i % 2 == 0, winners_call_first=i % 3 == 0)
    a = analyze_builder(b, tmp_path)
    assert all(links(a)[call][0] == request for request, call in pairs)
    assert "token_reuse" not in set(a.findings["kind"])


_IDS = st.sampled_from([None, "a", "b", "c", "d"])


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(
        st.tuples(st.integers(0, 1), st.sampled_from([None, "t1", "t2"]), _IDS, _IDS, st.booleans()), max_size=40
    )
)
def test_span_links_are_the_latest_earlier_hop_of_the_parent_span_in_the_trace(rows):
    from hoptrace.analyzer._traces import _by_span

    hops = pd.DataFrame(rows, columns=["capture", "trace", "span_id", "parent_span_id", "todo"])
    capture = hops["capture"].to_numpy(np.int64)
    trace = pd.factorize(hops["trace"])[0].astype(np.int64)  # -1: no trace id
    found = _by_span(hops, capture, trace, hops["todo"].to_numpy(bool))
    expected = {}
    for q, (cap, tid, _, parent_span, todo) in enumerate(rows):
        if todo and tid is not None and parent_span is not None:
            earlier = [c for c, row in enumerate(rows[:q]) if row[:3] == (cap, tid, parent_span)]
            if earlier:
                expected[q] = max(earlier)
    assert dict(zip(found[0].tolist(), found[1].tolist())) == expected
    assert found[0].tolist() == sorted(expected)


_TIME = st.one_of(st.sampled_from([0.0, 1.0, 2.0, np.nan]), st.floats(-3, 3, allow_nan=False))


@settings(max_examples=200, deadline=None)
@given(times=st.lists(st.tuples(_TIME, _TIME), max_size=30))
def test_start_order_is_by_start_then_longest_first_stable_with_unknown_times_last(times):
    """``in_start_order`` orders hops as pandas' stable sort by start (ascending) then end (descending)
    does, with NaN last in both keys: ties, repeated rows and unknown times included."""
    from hoptrace.analyzer._traces import in_start_order

    hops = pd.DataFrame(times, columns=["started_at", "ended_at"], index=pd.Index(range(100, 100 + len(times)), name="id"))
    want = hops.sort_values(["started_at", "ended_at"], ascending=[True, False], kind="stable")
    pd.testing.assert_frame_equal(in_start_order(hops), want)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(called_after=st.floats(0.001, 0.9), cut_after=st.floats(0.0, 30.0), caller_kind=st.sampled_from(["timeout", "502"]),
       kind=st.sampled_from(["timeout", "shutdown"]), noise=st.integers(0, 150))  # fmt: skip
def test_a_call_the_proxy_cut_after_its_caller_failed_stays_in_its_request(tmp_path, called_after, cut_after, caller_kind, kind, noise):
    """The proxy's upstream timeout cuts a caller and the call it waits on: the call ends when it is cut, a moment
    or its own deadline after its caller. Nothing but the caller's caller contains it, yet it started inside its
    caller: it is that call, however many unrelated failures (``noise``, over before it started) came between."""
    b = Builder()
    root = b.hop("gateway", "GET /slow", 0.0, 1.0 + cut_after / 10 + 0.001, status=502)
    failed = dict(status=None, error="cut", error_kind="timeout") if caller_kind == "timeout" else dict(status=502)
    caller = b.hop("edge", "GET /slow", 0.002, 1.0, parent=root, **failed)
    for i in range(noise):
        b.hop("pricing", f"GET /p{i}", 0.003 + i * 1e-6, 0.003 + i * 1e-6 + 1e-7, status=503)
    call = b.hop("catalog", "GET /slow", 0.01 + called_after, 1.0 + cut_after, parent=caller, status=None, error="cut", error_kind=kind)
    quiet = b.hop("catalog", "GET /other", 40.0, 41.0 + cut_after, status=None, error="cut", error_kind=kind)  # no caller open
    a = analyze_builder(b, tmp_path, "cut.db")
    assert links(a)[call] == (caller, "nesting")
    assert a.hops.loc[call, "trace"] == root
    assert links(a)[quiet] == (None, "orphan")


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(other_starts=st.floats(0.001, 0.09), cut_after=st.floats(0.0, 5.0))
def test_a_cut_call_inside_a_caller_that_recovered_stays_there_as_a_guess(tmp_path, other_starts, cut_after):
    """A caller that answered 200 after its call was cut contains it; a failed hop of the same service open then
    cannot be that caller's callee, so it is only another guess (``ambiguous``), not the answer."""
    b = Builder()
    recovered = b.hop("edge", "GET /a", 0.0, 3.0 + cut_after, status=200)
    b.hop("edge", "GET /b", other_starts, 1.0, status=500)
    call = b.hop("catalog", "GET /slow", 0.1, 2.1 + cut_after, parent=recovered, status=None, error="cut", error_kind="timeout")
    assert links(analyze_builder(b, tmp_path, "recovered.db"))[call] == (recovered, "ambiguous")


def test_without_an_entry_route_a_cut_hop_nothing_contains_is_a_request(tmp_path):
    b = Builder(entry=None)
    b.hop("search", "GET /q", 0.0, 1.0, status=500)
    request = b.hop("billing", "GET /invoice", 0.5, 3.0, status=None, error="cut", error_kind="timeout")
    assert links(analyze_builder(b, tmp_path, "no-entry.db"))[request] == (None, "root")
