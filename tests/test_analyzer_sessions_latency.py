"""Sessions by token lineage, endpoints, self time, critical paths, latency tables."""

from __future__ import annotations

import pytest

from hoptrace.analyzer._prepare import normalise_path

from .analyzer_fixtures import Builder, analyze_builder


def test_sessions_follow_token_lineage_and_subject(tmp_path):
    b = Builder()
    t1, t2 = b.token(sub="alice", exp=10), b.token(sub="alice", exp=100)
    reg = b.hop("gateway", "POST /auth/register", 0, 0.1, issued=t1)
    browse = b.hop("gateway", "GET /products", 1, 1.1, presented=t1)
    refresh = b.hop("gateway", "POST /auth/refresh", 2, 2.1, presented=t1, issued=t2)
    pay = b.hop("gateway", "POST /checkout", 3, 3.1, presented=t2)
    late = b.hop("gateway", "GET /products", 20, 20.1, presented=t1)  # old token, after exp
    bob = b.token(sub="bob", exp=100)
    other = b.hop("gateway", "GET /products", 1.5, 1.6, presented=bob)
    anon = b.hop("gateway", "GET /health", 0.5, 0.6)
    s = analyze_builder(b, tmp_path).sessions.set_index("trace")
    assert len({s.loc[t, "session"] for t in (reg, browse, refresh, pay, late)}) == 1
    assert s.loc[other, "session"] != s.loc[reg, "session"] != s.loc[anon, "session"]
    assert s.loc[reg, "subject"] == "alice" and s.loc[other, "subject"] == "bob"
    assert s.loc[late, "expired"] and not s.loc[browse, "expired"]
    # Sessions are numbered by their first request, rows in time order within each.
    assert s.loc[reg, "session"] == 0
    assert list(s.columns) >= [
        "session",
        "subject",
        "started_at",
        "ended_at",
        "status",
        "endpoint",
        "token_fp",
        "token_exp",
        "expired",
    ]


def test_a_service_token_does_not_join_users(tmp_path):
    b = Builder()
    svc = b.token(sub="payment-svc", exp=100)
    for i in range(3):
        t = b.token(sub=f"u{i}", exp=100)
        root = b.hop("gateway", "POST /checkout", i, i + 0.5, presented=t)
        b.hop("cart", "GET /cart/1", i + 0.1, i + 0.2, presented=svc, parent=root)
    assert analyze_builder(b, tmp_path).sessions["session"].nunique() == 3


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/cart/cart_abc123", "/cart/{id}"),
        ("/orders/42/items/7", "/orders/{id}/items/{id}"),
        ("/u/3f2b1c9e-4d5a-4b6c-8d7e-9f0a1b2c3d4e", "/u/{id}"),
        ("/blob/deadbeef01", "/blob/{id}"),
        ("/t/eyJhbGciOiJIUzI1NiJ9abc1", "/t/{id}"),
        ("/api/v1/products", "/api/v1/products"),
        ("/verify", "/verify"),
        ("/auth/facade", "/auth/facade"),
    ],
)
def test_endpoint_normalisation(path, expected):
    assert normalise_path(path) == expected


def test_self_time_and_critical_path(tmp_path):
    b = Builder()
    root = b.hop("gateway", "GET /a", 0.0, 1.0)
    first = b.hop("auth", "GET /v", 0.1, 0.2, parent=root)  # then, sequentially:
    p1 = b.hop("cart", "GET /c", 0.3, 0.6, parent=root)  # two calls in parallel
    p2 = b.hop("products", "GET /p", 0.4, 0.9, parent=root)
    a = analyze_builder(b, tmp_path)
    h = a.hops
    # Covered by children: 0.1-0.2 and 0.3-0.9 (the parallel calls overlap): 0.7 s.
    assert h.loc[root, "self_ms"] == pytest.approx(300.0, abs=1e-3)
    assert h.loc[first, "self_ms"] == pytest.approx(100.0, abs=1e-3)
    # Walking back from the end: p2 ended last; before it started, `first` had ended.
    assert h.loc[[root, first, p2], "on_critical_path"].all() and not h.loc[p1, "on_critical_path"]


def test_latency_tables(tmp_path):
    b = Builder()
    for i in range(10):
        root = b.hop("gateway", "GET /products", i, i + 0.1 + 0.01 * i, status=502 if i == 9 else 200)
        b.hop("products", f"GET /products/{i}", i + 0.01, i + 0.05, parent=root, status=503 if i == 9 else 200)
    a = analyze_builder(b, tmp_path)
    svc = a.services.set_index("service")
    assert svc.loc["gateway", "count"] == 10 and svc.loc["gateway", "errors"] == 1
    assert svc.loc["gateway", "error_rate"] == pytest.approx(0.1, abs=1e-3)
    assert svc.loc["gateway", "p50_ms"] == pytest.approx(145.0, abs=1e-3)
    assert svc.loc["products", "p99_ms"] == pytest.approx(40.0, abs=1e-3)
    assert svc.loc["gateway", "self_p50_ms"] == pytest.approx(105.0, abs=1e-3)
    ep = a.endpoints.set_index(["service", "endpoint"])
    assert ep.loc[("products", "GET /products/{id}"), "count"] == 10
    edges = a.edges.set_index(["caller", "callee"])
    assert edges.loc[("client", "gateway"), "calls"] == 10 and edges.loc[("gateway", "products"), "errors"] == 1
