"""Each detector on hand-made hop tables, at its edges: exactly at exp, no exp, opaque tokens,
concurrent users, overlapping requests, missing headers, tokens issued mid-request."""

from __future__ import annotations

import pytest

from .analyzer_fixtures import T0, Builder, detect


def checkout(b: Builder, token, start=0.0, *, exp_status=200, intro_at=1.5, user_token=None, verify=True):
    """The scenario's checkout: gateway verifies, payment works, then re-validates at auth."""
    root = b.hop("gateway", "POST /checkout", start, start + 2.0, presented=token, status=exp_status)
    if verify:
        b.hop("auth", "GET /verify", start + 0.01, start + 0.02, presented=token, parent=root)
    pay = b.hop("payment", "POST /checkout", start + 0.03, start + 1.9, presented=token, parent=root, status=exp_status)
    b.hop("cart", "GET /cart/cart_1", start + 0.04, start + 0.05, presented=token, parent=pay)
    intro = b.hop(
        "auth",
        "POST /introspect",
        start + intro_at,
        start + intro_at + 0.1,
        validated=user_token or token,
        parent=pay,
        status=exp_status,
    )
    return root, pay, intro


# -- expired_mid_flow -------------------------------------------------------------------


def test_expired_mid_flow_the_scenario(tmp_path):
    b = Builder()
    t = b.token(sub="alice", exp=1.0)
    root, _pay, intro = checkout(b, t, exp_status=401)
    f = detect(b, tmp_path, "expired_mid_flow")
    assert len(f) == 1
    row = f.iloc[0]
    assert (row["severity"], row["trace"], row["service"], row["hop_ids"]) == ("error", root, "auth", [intro])
    assert row["details"]["late_by_s"] == pytest.approx(0.5)
    assert row["details"]["remaining_at_entry_s"] == pytest.approx(1.0)
    assert row["details"]["status"] == 401 and row["details"]["path"] == "/introspect"
    assert "0.500 s after it expired" in row["message"] and "POST /introspect" in row["message"] and "401" in row["message"]
    assert row["at"] == pytest.approx(T0)


def test_expired_mid_flow_exactly_at_exp_counts_just_before_does_not(tmp_path):
    b = Builder()
    checkout(b, b.token(sub="a", exp=1.5), intro_at=1.5)  # presented at exp itself: expired
    checkout(b, b.token(sub="b", exp=1.501), start=0.0, intro_at=1.5)  # 1 ms before exp: fine
    f = detect(b, tmp_path, "expired_mid_flow")
    assert len(f) == 1 and f.iloc[0]["details"]["late_by_s"] == pytest.approx(0.0, abs=1e-6)


def test_expired_mid_flow_needs_a_token_valid_at_entry(tmp_path):
    b = Builder()
    checkout(b, b.token(sub="a", exp=0.0))  # expired when the request entered: not "mid-flow"
    checkout(b, b.token(sub="b", exp=None), start=5)  # no exp claim
    checkout(b, b.token(sub=None, exp=None, kind="opaque"), start=10)  # opaque
    b.hop("gateway", "GET /health", 20, 21)  # no token anywhere (no Authorization header)
    assert detect(b, tmp_path, "expired_mid_flow").empty


def test_expired_mid_flow_token_issued_mid_request(tmp_path):
    b = Builder()
    old, fresh = b.token(sub="a", exp=100), b.token(sub="a", exp=0.5)
    root = b.hop("gateway", "POST /checkout", 0.0, 2.0, presented=old)
    b.hop("auth", "POST /refresh", 0.01, 0.02, validated=old, issued=fresh, parent=root)
    late = b.hop("payment", "POST /checkout", 1.0, 1.5, presented=fresh, parent=root, status=401)
    f = detect(b, tmp_path, "expired_mid_flow")
    assert len(f) == 1 and f.iloc[0]["hop_ids"] == [late]
    assert f.iloc[0]["details"]["issued_during_request"] is True
    assert f.iloc[0]["message"].startswith("a token issued during the request")


def test_expired_mid_flow_concurrent_users_blame_the_right_request(tmp_path):
    b = Builder()
    ra, _, ia = checkout(b, b.token(sub="alice", exp=1.2), start=0.0)
    _rb, _, _ = checkout(b, b.token(sub="bob", exp=60), start=0.005)
    f = detect(b, tmp_path, "expired_mid_flow")
    assert f["trace"].tolist() == [ra] and f.iloc[0]["hop_ids"] == [ia]


# -- expired_in_session --------------------------------------------------------------------


def session(b: Builder, token, times, issued_at=None, new=None):
    roots = [b.hop("gateway", "GET /products", t, t + 0.1, presented=token) for t in times]
    if issued_at is not None:
        b.hop("gateway", "POST /auth/refresh", issued_at, issued_at + 0.1, presented=token, issued=new)
    return roots


def test_expired_in_session(tmp_path):
    b = Builder()
    t = b.token(sub="alice", exp=10)
    first, _, late = session(b, t, [0, 5, 12])
    f = detect(b, tmp_path, "expired_in_session")
    assert len(f) == 1
    row = f.iloc[0]
    assert row["trace"] == late and row["hop_ids"] == [first, late] and row["severity"] == "error"
    assert row["details"]["late_by_s"] == pytest.approx(2.0)


def test_expired_in_session_exactly_at_exp(tmp_path):
    b = Builder()
    session(b, b.token(sub="alice", exp=10), [0, 10])
    assert len(detect(b, tmp_path, "expired_in_session")) == 1


def test_expired_in_session_not_after_a_refresh_nor_without_exp(tmp_path):
    b = Builder()
    t, t2 = b.token(sub="alice", exp=10), b.token(sub="alice", exp=100)
    session(b, t, [0, 12], issued_at=5, new=t2)  # the session was given a new token in between
    session(b, b.token(sub="bob", exp=None), [0, 50])
    session(b, b.token(sub="carol", exp=1), [2, 3])  # expired already at its first use
    assert detect(b, tmp_path, "expired_in_session").empty


# -- near_expiry --------------------------------------------------------------------------


def test_near_expiry_threshold_is_strict(tmp_path):
    b = Builder()
    for i, left in enumerate((10.0, 30.0)):
        t = b.token(sub=f"u{i}", exp=100 * i + 0.01 + left)
        root = b.hop("gateway", "GET /products", 100 * i, 100 * i + 0.1, presented=t)
        b.hop("products", "GET /products", 100 * i + 0.01, 100 * i + 0.05, presented=t, parent=root)
    f = detect(b, tmp_path, "near_expiry")
    assert len(f) == 1 and f.iloc[0]["details"]["remaining_s"] == pytest.approx(10.0)
    assert f.iloc[0]["details"]["reason"] == "threshold" and f.iloc[0]["severity"] == "warning"


def test_near_expiry_less_life_than_the_request_takes(tmp_path):
    b = Builder()
    t = b.token(sub="a", exp=4.0)
    checkout(b, t)  # 2 s request, token forwarded with ~4 s: fine at a 1 s threshold
    t2 = b.token(sub="b", exp=11.5)
    checkout(b, t2, start=10)  # forwarded with ~1.5 s left, the request takes 2 s
    f = detect(b, tmp_path, "near_expiry", near_expiry_s=1.0)
    assert len(f) == 1 and f.iloc[0]["details"]["reason"] == "request duration"


def test_near_expiry_ignores_expired_unforwarded_and_unknown(tmp_path):
    b = Builder()
    t = b.token(sub="a", exp=0.5)
    b.hop("gateway", "GET /a", 0.0, 0.1, presented=t)  # not forwarded anywhere
    checkout(b, b.token(sub="b", exp=10.0), start=20)  # forwarded after exp: expired, not near
    checkout(b, b.token(sub=None, kind="opaque"), start=40)
    assert detect(b, tmp_path, "near_expiry").empty


# -- duplicate_validation -------------------------------------------------------------------


def test_duplicate_validation_header_then_body(tmp_path):
    b = Builder()
    t = b.token(sub="a", exp=100)
    root, _pay, _intro = checkout(b, t)
    f = detect(b, tmp_path, "duplicate_validation")
    assert len(f) == 1
    row = f.iloc[0]
    assert row["trace"] == root and row["service"] == "payment" and len(row["hop_ids"]) == 2
    assert row["details"]["callers"] == ["gateway", "payment"] and row["details"]["count"] == 2
    assert row["details"]["extra_ms"] == pytest.approx(100.0)
    assert "validated 2 times" in row["message"]


def test_duplicate_validation_once_or_different_tokens_is_fine(tmp_path):
    b = Builder()
    checkout(b, b.token(sub="a", exp=100), verify=False)
    t1, t2 = b.token(sub="b", exp=100), b.token(sub="svc", exp=100)
    checkout(b, t1, start=10, user_token=t2)  # payment validates another token than the gateway did
    assert detect(b, tmp_path, "duplicate_validation").empty


def test_duplicate_validation_opaque_tokens_and_custom_paths(tmp_path):
    b = Builder()
    t = b.token(kind="opaque")
    root = b.hop("gateway", "GET /a", 0, 1, presented=t)
    b.hop("auth", "POST /sessions/check", 0.1, 0.2, presented=t, parent=root)
    b.hop("auth", "POST /sessions/check", 0.3, 0.4, presented=t, parent=root)
    assert detect(b, tmp_path, "duplicate_validation").empty  # not a validation path by default
    f = detect(b, tmp_path, "duplicate_validation", validation_patterns=("check$",))
    assert len(f) == 1 and f.iloc[0]["details"]["count"] == 2


# -- rejected_valid_token ------------------------------------------------------------------------


def test_rejected_valid_token(tmp_path):
    b = Builder()
    t = b.token(sub="a", exp=100)
    root, pay, intro = checkout(b, t, exp_status=401)
    f = detect(b, tmp_path, "rejected_valid_token")
    assert len(f) == 1
    row = f.iloc[0]
    # The first hop to answer 401 is where the rejection began; its callers passed it on.
    assert row["service"] == "auth" and row["hop_ids"][0] == intro and set(row["hop_ids"]) == {intro, pay, root}
    assert row["details"]["remaining_s"] == pytest.approx(100 - 1.6)
    assert "clock skew" in row["message"]


def test_rejected_valid_token_names_a_skewed_clock(tmp_path):
    b = Builder()
    t = b.token(sub="a", exp=30)
    root = b.hop("gateway", "GET /a", 0, 1, presented=t, status=401)
    b.hop("payment", "GET /a", 0.1, 0.2, presented=t, parent=root, status=401, server_date_ts=float(int(T0 + 60.2)))
    f = detect(b, tmp_path, "rejected_valid_token")
    assert "payment's clock runs 60" in f.iloc[0]["message"]


def test_rejected_token_that_was_expired_or_unknown_is_not_this(tmp_path):
    b = Builder()
    checkout(b, b.token(sub="a", exp=1.6), exp_status=401)  # expires as auth answers: expiry explains it
    checkout(b, b.token(sub="b", exp=None), start=10, exp_status=403)
    checkout(b, b.token(kind="opaque"), start=20, exp_status=401)
    checkout(b, b.token(sub="c", exp=100, nbf=40), start=30, exp_status=401)  # not valid yet
    b.hop("gateway", "GET /a", 50, 51, status=401)  # no token at all
    assert detect(b, tmp_path, "rejected_valid_token").empty


# -- clock_skew ---------------------------------------------------------------------------


def dated(b: Builder, service: str, offset: float, n: int = 10):
    for i in range(n):
        start = 10.0 * i + 0.37
        b.hop(service, "GET /x", start, start + 0.02, server_date_ts=float(int(T0 + start + 0.01 + offset)))


def test_clock_skew_from_date_headers(tmp_path):
    b = Builder()
    dated(b, "payment", 45.0)
    dated(b, "cart", 0.0)
    dated(b, "products", -5.0)
    f = detect(b, tmp_path, "clock_skew").set_index("service")
    assert set(f.index) == {"payment", "products"}
    assert f.loc["payment", "details"]["offset_s"] == pytest.approx(45.0, abs=1.0)
    assert f.loc["products", "details"]["offset_s"] == pytest.approx(-5.0, abs=1.0)
    assert "ahead of" in f.loc["payment", "message"] and "behind" in f.loc["products", "message"]
    assert pd_isna(f.loc["payment", "trace"])


def pd_isna(value) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


@pytest.mark.parametrize(("offset", "flagged"), [(2.0, False), (1.5, False), (3.5, True), (-3.5, True)])
def test_clock_skew_threshold_allows_whole_second_dates(tmp_path, offset, flagged):
    b = Builder()
    dated(b, "payment", offset)
    assert (len(detect(b, tmp_path, "clock_skew")) == 1) is flagged


def test_clock_skew_of_an_issuer_from_iat(tmp_path):
    b = Builder()
    for i in range(5):
        t = b.token(sub=f"u{i}", exp=10 * i + 3600, iat=float(int(T0 + 10 * i + 60)) - T0)
        root = b.hop("gateway", "POST /auth/login", 10 * i, 10 * i + 0.1, issued=t)
        b.hop("auth", "POST /login", 10 * i + 0.01, 10 * i + 0.05, issued=t, parent=root)
    # A token issued again later (register's token from login) says nothing of the clock.
    reused = b.token(sub="r", exp=3600, iat=100.0)
    b.hop("auth", "POST /register", 100.0, 100.05, issued=reused)
    b.hop("auth", "POST /login", 200.0, 200.05, issued=reused)
    f = detect(b, tmp_path, "clock_skew")
    assert len(f) == 1 and f.iloc[0]["service"] == "auth"
    assert f.iloc[0]["details"]["source"] == "iat" and f.iloc[0]["details"]["samples"] == 6
    assert f.iloc[0]["details"]["offset_s"] == pytest.approx(60, abs=1.0)


# -- token_reuse ------------------------------------------------------------------------------


def test_token_reuse_login_returns_registers_token(tmp_path):
    b = Builder()
    t = b.token(sub="alice", exp=3600)
    reg = b.hop("gateway", "POST /auth/register", 0, 0.1, issued=t, status=201)
    a1 = b.hop("auth", "POST /register", 0.01, 0.05, issued=t, parent=reg, status=201)
    login = b.hop("gateway", "POST /auth/login", 5, 5.1, issued=t)
    a2 = b.hop("auth", "POST /login", 5.01, 5.05, issued=t, parent=login)
    other = b.token(sub="bob", exp=3600)  # issued once, passed through the gateway: fine
    r = b.hop("gateway", "POST /auth/login", 6, 6.1, issued=other)
    b.hop("auth", "POST /login", 6.01, 6.05, issued=other, parent=r)
    f = detect(b, tmp_path, "token_reuse")
    assert len(f) == 1
    row = f.iloc[0]
    assert row["trace"] == login and row["service"] == "auth" and row["hop_ids"] == [a1, a2]
    assert "POST /auth/register, POST /auth/login" in row["message"]


# -- token_crossover ----------------------------------------------------------------------------


def test_token_crossover(tmp_path):
    b = Builder()
    ta, tb = b.token(sub="alice", exp=100), b.token(sub="bob", exp=100)
    ra = b.hop("gateway", "GET /products", 0, 1, presented=ta)
    rb = b.hop("gateway", "GET /products", 5, 6, presented=tb)
    b.hop("products", "GET /products", 5.1, 5.2, presented=tb, parent=rb)
    # The shared-client bug: Alice's call goes out with Bob's token, and Bob is not in flight.
    wrong = b.hop("products", "GET /products", 0.1, 0.2, presented=tb, parent=ra)
    f = detect(b, tmp_path, "token_crossover")
    assert len(f) == 1
    row = f.iloc[0]
    assert row["trace"] == ra and row["hop_ids"] == [wrong]
    assert row["details"]["subject"] == "alice" and row["details"]["other_subject"] == "bob"


def test_no_crossover_for_service_credentials_or_concurrent_users(tmp_path):
    b = Builder()
    svc = b.token(sub="payment-service", exp=100)
    for i in range(5):  # overlapping requests of five users, each with its own token
        t = b.token(sub=f"user{i}", exp=100)
        checkout(b, t, start=0.001 * i)
    t = b.token(sub="zed", exp=100)
    root = b.hop("gateway", "GET /a", 10, 11, presented=t)
    b.hop("cart", "GET /c", 10.1, 10.2, presented=svc, parent=root)  # a service's own token
    assert detect(b, tmp_path, "token_crossover").empty


# -- retry_storm --------------------------------------------------------------------------------


def retries(b: Builder, statuses, start=0.0, failed=()):
    root = b.hop("gateway", "GET /products", start, start + 1.0)
    ids = []
    for i, status in enumerate(statuses):
        s = start + 0.1 + 0.2 * i
        ids.append(
            b.hop(
                "products",
                "GET /products",
                s,
                s + 0.05,
                status=status,
                parent=root,
                error="timed out" if i in failed else None,
                error_kind="timeout" if i in failed else None,
            )
        )
    return root, ids


def test_retry_storm(tmp_path):
    b = Builder()
    root, ids = retries(b, [503, 429, None, 200], failed=(2,))
    f = detect(b, tmp_path, "retry_storm")
    assert len(f) == 1
    row = f.iloc[0]
    assert row["trace"] == root and row["hop_ids"] == ids
    d = row["details"]
    assert (d["calls"], d["retries"], d["recovered"], d["caller"]) == (4, 3, True, "gateway")
    assert d["statuses"] == ["503", "429", "no response (timeout)", "200"]
    assert d["gaps_s"] == pytest.approx([0.15, 0.15, 0.15])
    assert d["cost_ms"] == pytest.approx(150.0)


def test_retry_storm_minimum_and_plain_repeats(tmp_path):
    b = Builder()
    retries(b, [503, 200])  # one retry: resilience, not a storm
    retries(b, [200, 200, 200], start=10)  # repeated, nothing failed
    assert detect(b, tmp_path, "retry_storm").empty
    assert len(detect(b, tmp_path, "retry_storm", retry_min=1)) == 1


# -- upstream_error ------------------------------------------------------------------------------


def test_upstream_error_points_at_where_it_began(tmp_path):
    b = Builder()
    root = b.hop("gateway", "GET /products", 0, 1, status=502)
    origin = b.hop("products", "GET /products/7", 0.1, 0.2, status=503, parent=root)
    broken = b.hop(
        "gateway",
        "GET /cart",
        2,
        3,
        status=200,
        error="peer closed connection without sending complete message body",
        error_kind="truncated",
    )
    recovered, (first, _) = retries(b, [503, 200], start=10)
    f = detect(b, tmp_path, "upstream_error").set_index("trace")
    assert f.loc[root, "hop_ids"] == [origin] and f.loc[root, "service"] == "products"
    assert "503" in f.loc[root, "message"] and "ended 502" in f.loc[root, "message"]
    assert f.loc[broken, "details"]["outcomes"] == ["200, then broken (truncated)"]
    # The client saw those two; a retry hid the third.
    assert f.loc[[root, broken], "severity"].tolist() == ["error", "error"]
    assert f.loc[recovered, "severity"] == "warning" and f.loc[recovered, "hop_ids"] == [first]


# -- slow_hop --------------------------------------------------------------------------------------


def test_slow_hop_against_the_endpoints_p95(tmp_path):
    b = Builder()
    for i in range(30):
        b.hop("products", f"GET /products/{i}", i, i + 0.010 + 0.0001 * i)
    slow = b.hop("products", "GET /products/99", 40, 40.1)
    f = detect(b, tmp_path, "slow_hop")
    assert len(f) == 1 and f.iloc[0]["hop_ids"] == [slow] and f.iloc[0]["severity"] == "info"
    assert "GET /products/{id}" in f.iloc[0]["message"]
    assert detect(b, tmp_path, "slow_hop", slow_min_samples=40).empty
    assert len(detect(b, tmp_path, "slow_hop", slow_min_samples=40, slow_ms=50)) == 1


def test_clock_skew_with_inconsistent_dates_falls_back_to_medians(tmp_path):
    b = Builder()
    dated(b, "payment", 45.0, n=6)
    for i in range(6):  # a cache answering with old Date headers half of the time
        start = 100.0 + 10 * i
        b.hop("payment", "GET /x", start, start + 0.02, server_date_ts=float(int(T0 + start - 300)))
    f = detect(b, tmp_path, "clock_skew")
    assert len(f) == 1 and f.iloc[0]["details"]["samples"] == 12
    assert f.iloc[0]["details"]["low_s"] <= f.iloc[0]["details"]["high_s"]
