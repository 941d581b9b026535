"""Each detector on hand-made hop tables, at its edges: exactly at exp, no exp, opaque tokens,
concurrent users, overlapping requests, missing headers, tokens issued mid-request."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

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
    assert row["message"].startswith("payment re-validated the token at auth POST /introspect 0.50 s after exp (401)")
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
    assert f.iloc[0]["message"].startswith("gateway sent a token issued during the request to payment POST /checkout")


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
    assert (row["caller"], row["callee"], row["endpoint"]) == ("payment", "auth", "POST /introspect")
    assert row["message"].startswith("payment re-validated the token at auth POST /introspect: 2 validations in one request")


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


def test_duplicate_validation_passed_through_is_one_validation(tmp_path):
    """A client's GET /auth/verify at the gateway, forwarded to auth's /verify: one check, not two."""
    b = Builder()
    t = b.token(sub="a", exp=100)
    root = b.hop("gateway", "GET /auth/verify", 0, 1, presented=t)
    b.hop("auth", "GET /verify", 0.1, 0.2, presented=t, parent=root)
    assert detect(b, tmp_path, "duplicate_validation").empty
    b.hop("auth", "GET /verify", 0.3, 0.4, presented=t, parent=root)  # a second real check still counts
    (tmp_path / "again").mkdir()
    f = detect(b, tmp_path / "again", "duplicate_validation")
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


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fraction=st.floats(0.01, 0.99), left=st.floats(0.01, 0.99))
def test_rejected_valid_token_names_a_fractional_exp_read_as_whole_seconds(tmp_path, fraction, left):
    """RFC 7519's NumericDate may have a fraction; a validator that drops it sees the token expire up to a second early."""
    assume(abs(fraction - left) > 1e-6)
    b = Builder()
    exp = 50 + fraction  # T0 is a whole second: the claim's fraction is ``fraction``
    t = b.token(sub="a", exp=exp)
    root = b.hop("gateway", "GET /a", exp - left - 0.5, exp - left + 0.001, presented=t, status=401)
    b.hop("payment", "GET /a", exp - left - 0.4, exp - left, presented=t, parent=root, status=401)
    found = detect(b, tmp_path, "rejected_valid_token")
    assert len(found) == 1
    assert ("has a fraction of a second" in found.iloc[0]["message"]) == (fraction > left)


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


def _bff_sessions(b: Builder, users: int, dashboards: int, *, cross=None, own_calls=()) -> dict:
    """A backend-for-frontend: each user logs in (the edge gets the user's token from idp and hands back
    a session cookie), then loads dashboards (userinfo and balance, each with the user's token, linked by
    trace headers). ``cross`` = (user, dashboard, other): that dashboard sends the other's token to ledger.
    ``own_calls[u]``: calls to catalog with the edge's own token in each of user u's dashboards, a token
    the edge fetched during the first login. Returns the crossing dashboard's trace, if any."""
    spans = iter(range(1, 10_000))

    def call(root, trace, service, endpoint, at, **tokens):
        return b.hop(service, endpoint, at, at + 0.01, parent=root, trace_id=trace, parent_span_id=f"s{root}",
                     span_id=f"s{next(spans)}", **tokens)

    own = b.token(sub="edge-service", exp=10_000)
    tokens = [b.token(sub=f"user{u}", exp=10_000) for u in range(users)]
    crossing = None
    for u in range(users):
        t = 100.0 * u
        cookie = b.token(kind="opaque")
        login = b.hop("edge", "POST /login", t, t + 1.0, issued=cookie, trace_id=f"t{u}-login", span_id=f"s{len(b.hops) + 1}")
        call(login, f"t{u}-login", "idp", "POST /oauth/token", t + 0.1, issued=tokens[u])
        if u == 0 and any(own_calls):
            call(login, f"t{u}-login", "idp", "POST /oauth/token", t + 0.2, issued=own)
        for k in range(dashboards):
            at, trace = t + 10.0 * (k + 1), f"t{u}-{k}"
            root = b.hop("edge", "GET /dashboard", at, at + 1.0, presented=cookie, trace_id=trace, span_id=f"s{len(b.hops) + 1}")
            call(root, trace, "idp", "GET /userinfo", at + 0.1, presented=tokens[u])
            sent = tokens[u]
            if cross is not None and cross[:2] == (u, k):
                sent, crossing = tokens[cross[2]], root
            call(root, trace, "ledger", "GET /balance", at + 0.2, presented=sent)
            for n in range(own_calls[u] if own_calls else 0):
                call(root, trace, "catalog", "GET /prices", at + 0.3 + 0.01 * n, presented=own)
    return {"crossing": crossing}


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(users=st.integers(2, 4), dashboards=st.integers(2, 3), data=st.data())
def test_a_crossover_behind_a_session_cookie_is_found_in_the_sessions_request(tmp_path, users, dashboards, data):
    """Requests entering with a session cookie name no subject: the session's is the one most of its calls
    present (the token issued at its login). Another user's token sent from one of its requests is a
    crossover, a warning (the subject was read from the session, not named by the request); none without one."""
    cross = data.draw(st.none() | st.tuples(st.integers(0, users - 1), st.integers(0, dashboards - 1), st.integers(0, users - 1)))
    assume(cross is None or cross[0] != cross[2])
    b = Builder(entry="edge")
    crossing = _bff_sessions(b, users, dashboards, cross=cross)["crossing"]
    f = detect(b, tmp_path, "token_crossover")
    if cross is None:
        assert f.empty
        return
    assert len(f) == 1
    row = f.iloc[0]
    assert row["trace"] == crossing and row["severity"] == "warning"
    assert (row["details"]["subject"], row["details"]["other_subject"]) == (f"user{cross[0]}", f"user{cross[2]}")
    assert row["details"]["subject_from"] == "session" and "user" in row["message"] and "session" in row["message"]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(own_calls=st.lists(st.integers(0, 4), min_size=2, max_size=4), dashboards=st.integers(1, 3))
def test_a_backends_own_token_in_every_session_is_no_crossover(tmp_path, own_calls, dashboards):
    """The edge's own token, fetched during the first login and sent to catalog in any share of every
    session's calls (most of them, in some sessions), is no user's: it owns no session."""
    b = Builder(entry="edge")
    _bff_sessions(b, len(own_calls), dashboards, own_calls=own_calls)
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


# -- the new detectors: hop tables with headers --------------------------------------------------


def detect_with_headers(b: Builder, tmp_path, kind: str, **config):
    """Like ``detect``, with the header lines the analysis reads beside the loader's tables."""
    from hoptrace.analyzer import DETECTORS, AnalyzerConfig, load
    from hoptrace.analyzer._analysis import prepare
    from hoptrace.analyzer._detectors import run_detectors
    from hoptrace.analyzer._headers import HeaderReader

    path = tmp_path / f"{kind}-h.db"
    path.unlink(missing_ok=True)
    b.write(path)
    ctx = prepare(load(path), AnalyzerConfig(**config), headers=HeaderReader(path))
    return run_detectors(ctx, tuple(d for d in DETECTORS if kind in (d.kind, "all")))


def headers(*pairs) -> str:
    return json.dumps([list(p) for p in pairs])


def timed_calls(b: Builder, plan, start=0.0, caller="cart", callee="products", retry_after=None):
    """``caller`` calls ``callee`` at the given (start, end, status) times, under one parent."""
    parent = b.hop(caller, "POST /cart/items", start, start + 10.0)
    ids = []
    for s, e, status in plan:
        extra = {"response_headers": headers(("Retry-After", retry_after))} if retry_after and status == 429 else {}
        ids.append(b.hop(callee, "GET /products/p1", start + s, start + e, status=status, parent=parent, **extra))
    return parent, ids


def test_retry_without_backoff_flat_gaps(tmp_path):
    b = Builder()
    _, ids = timed_calls(b, [(0.1, 0.11, 503), (0.11, 0.12, 503), (0.12, 0.13, 503), (0.13, 0.14, 200)])
    f = detect_with_headers(b, tmp_path, "retry_without_backoff")
    assert len(f) == 1
    row = f.iloc[0]
    assert (row["caller"], row["callee"], row["endpoint"], row["severity"]) == ("cart", "products", "GET /products/{id}", "warning")
    assert row["hop_ids"] == ids and row["details"]["retries"] == 3 and row["details"]["flat_gaps"]
    assert row["message"].startswith("cart retried products GET /products/{id} 3 times without backoff")


def test_retry_with_growing_backoff_is_not_flagged(tmp_path):
    b = Builder()
    # Gaps 0.05, 0.1, 0.2: doubling, as RETRY_BACKOFF does.
    timed_calls(b, [(0.1, 0.11, 503), (0.16, 0.17, 503), (0.27, 0.28, 503), (0.48, 0.49, 200)])
    # One retry: no growth to judge, and no Retry-After.
    timed_calls(b, [(0.1, 0.11, 503), (0.11, 0.12, 200)], start=20)
    assert detect_with_headers(b, tmp_path, "retry_without_backoff").empty


def test_retry_sooner_than_retry_after(tmp_path):
    b = Builder()
    _, ids = timed_calls(b, [(0.1, 0.11, 429), (0.5, 0.51, 200)], retry_after="1")
    assert len(ids) == 2
    f = detect_with_headers(b, tmp_path, "retry_without_backoff")
    assert len(f) == 1 and f.iloc[0]["details"]["ignored_retry_after"] == 1
    assert "Retry-After of 1 s" in f.iloc[0]["message"]


def test_retry_after_honoured_is_not_flagged(tmp_path):
    b = Builder()
    timed_calls(b, [(0.1, 0.11, 429), (1.11, 1.12, 200)], retry_after="1")
    timed_calls(b, [(0.1, 0.11, 429), (1.08, 1.09, 200)], start=20, retry_after="1")  # within the tolerance
    timed_calls(b, [(0.1, 0.11, 429), (0.2, 0.21, 200)], start=40, retry_after="soon")  # unreadable: not judged
    assert detect_with_headers(b, tmp_path, "retry_without_backoff").empty


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(st.characters(categories=("N", "P", "Zs", "L")), min_size=1, max_size=8).filter(str.strip))
def test_any_retry_after_value_is_judged_or_set_aside(tmp_path, retry_after):
    """A recorded header is the service's word, not hoptrace's: '¹' is a digit to str.isdigit, not to float."""
    b = Builder()
    timed_calls(b, [(0.1, 0.11, 429), (0.2, 0.21, 429), (0.3, 0.31, 200)], retry_after=retry_after)
    found = detect_with_headers(b, tmp_path, "retry_without_backoff")
    assert len(found) <= 1


_status = st.sampled_from([200, 200, 429, 503])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(fan_out=st.lists(st.tuples(st.floats(0, 0.009), st.floats(0.011, 0.3), _status), min_size=2, max_size=6),
       after=st.lists(_status, max_size=4))  # fmt: skip
def test_calls_made_side_by_side_are_not_retries_of_each_other(tmp_path, fan_out, after):
    """A fan-out whose calls all start before any ends, one or more of them failing, then ``after``: calls one
    after another, each once the last ended. Only a call that started after a failure ended can retry it."""
    plan = [(0.1 + s, 0.1 + e, status) for s, e, status in fan_out]
    at = max(e for _, e, _ in plan) + 0.05
    for status in after:
        plan.append((at, at + 0.01, status))
        at += 0.06
    # Every call ended before the next sequential one starts: each sequential call retries a failure not yet retried.
    waiting, expected = sum(status != 200 for _, _, status in fan_out), 0
    for status in after:
        if waiting:
            waiting, expected = waiting - 1, expected + 1
        waiting += status != 200
    _, ids = timed_calls(b := Builder(), plan, retry_after="0")
    storms = detect_with_headers(b, tmp_path, "retry_storm", retry_min=1)
    assert sum(storms["details"].map(lambda d: d["retries"])) == expected
    assert all(gap >= 0 for d in storms["details"] for gap in d["gaps_s"])
    flagged = detect_with_headers(b, tmp_path, "retry_without_backoff")
    assert all(gap >= 0 for d in flagged["details"] for gap in d["gaps_s"])
    assert expected or flagged.empty


def test_rate_limited_names_who_hit_it_and_who_passed_it_on(tmp_path):
    b = Builder()
    for i in range(6):  # 6 requests to products in the second before
        b.hop("products", "GET /products", 0.1 * i, 0.1 * i + 0.01, parent=None)
    root = b.hop("gateway", "POST /cart/items", 0.7, 1.0, status=502)
    cart = b.hop("cart", "POST /cart/items", 0.71, 0.9, status=502, parent=root)
    limited = b.hop("products", "GET /products/p1", 0.72, 0.73, status=429, parent=cart)
    f = detect_with_headers(b, tmp_path, "rate_limited")
    assert len(f) == 1
    row = f.iloc[0]
    assert (row["caller"], row["callee"], row["hop_ids"]) == ("cart", "products", [limited])
    assert row["details"]["rate_per_s"] == pytest.approx(6.0)
    assert row["details"]["propagated_by"] == ["cart 502 to gateway", "gateway 502 to client"]
    assert row["message"].startswith("cart hit products' rate limit: 1 calls answered 429")


def test_rate_limited_not_without_429_and_not_passed_on_when_recovered(tmp_path):
    b = Builder()
    timed_calls(b, [(0.1, 0.11, 503), (0.2, 0.21, 200)])
    assert detect_with_headers(b, tmp_path, "rate_limited").empty
    b = Builder()
    _, ids = timed_calls(b, [(0.1, 0.11, 429), (1.2, 1.21, 200)])  # the caller (200) recovered
    f = detect_with_headers(b, tmp_path, "rate_limited")
    assert len(f) == 1 and f.iloc[0]["hop_ids"] == ids[:1] and f.iloc[0]["details"]["propagated_by"] == []


KEY = ("X-Internal-Key", "[redacted:8bc7e9fce36c]")


def keyed_stack(b: Builder, start: float, *, cart_key=True, cart_status=200, leak=False, client_sends=False):
    """gateway -> products (with the key), gateway -> cart, cart -> products (key as told)."""
    client = [("Cookie", "[redacted:aaaaaaaaaaaa]")] + ([KEY] if client_sends else [])
    answer = [("Content-Type", "application/json")] + ([KEY] if leak else [])
    root = b.hop("gateway", "POST /cart/items", start, start + 1, request_headers=headers(*client), response_headers=headers(*answer))
    b.hop("products", "GET /products", start + 0.1, start + 0.2, parent=root, request_headers=headers(KEY))
    cart = b.hop("cart", "POST /cart/items", start + 0.3, start + 0.9, parent=root, request_headers=headers(KEY))
    sent = headers(KEY) if cart_key else headers(("Accept", "*/*"))
    item = b.hop("products", "GET /products/p1", start + 0.4, start + 0.5, parent=cart, status=cart_status, request_headers=sent)
    return root, item


def test_service_key_missing(tmp_path):
    b = Builder()
    keyed_stack(b, 0)
    _, refused = keyed_stack(b, 5, cart_key=False, cart_status=401)
    f = detect_with_headers(b, tmp_path, "service_key_missing")
    assert len(f) == 1
    row = f.iloc[0]
    assert (row["severity"], row["caller"], row["callee"], row["hop_ids"]) == ("error", "cart", "products", [refused])
    assert row["details"]["header"] == "x-internal-key" and "without the x-internal-key header" in row["message"]


def test_service_key_present_everywhere_or_absent_without_failure_is_not_flagged(tmp_path):
    b = Builder()
    keyed_stack(b, 0)
    keyed_stack(b, 5, cart_status=401)  # refused for another reason: the key was there
    keyed_stack(b, 10, cart_key=False)  # no key, and it worked: nothing to say
    assert detect_with_headers(b, tmp_path, "service_key_missing").empty
    # One caller only: its constant header is not learned as a service credential.
    b = Builder()
    root = b.hop("gateway", "GET /products", 0, 1)
    b.hop("products", "GET /products", 0.1, 0.2, parent=root, request_headers=headers(KEY))
    b.hop("products", "GET /products", 0.3, 0.4, parent=root, status=401)
    assert detect_with_headers(b, tmp_path, "service_key_missing").empty


def test_service_key_leak_to_and_from_the_client(tmp_path):
    b = Builder()
    keyed_stack(b, 0)
    leaked, _ = keyed_stack(b, 5, leak=True)
    sent, _ = keyed_stack(b, 10, client_sends=True)
    f = detect_with_headers(b, tmp_path, "service_key_leak").sort_values("at")
    assert len(f) == 2 and set(f["severity"]) == {"error"}
    out, into = f.iloc[0], f.iloc[1]
    assert (out["caller"], out["callee"], out["hop_ids"], out["details"]["side"]) == ("gateway", "client", [leaked], "response")
    assert (into["caller"], into["callee"], into["hop_ids"], into["details"]["side"]) == ("client", "gateway", [sent], "request")
    assert "answered the client with the service credential x-internal-key" in out["message"]


def test_no_service_key_leak_without_a_learned_key(tmp_path):
    b = Builder()
    keyed_stack(b, 0)
    # The client's own cookie in a response is a session, not a service credential.
    b.hop("gateway", "POST /auth/login", 5, 6, response_headers=headers(("Set-Cookie", "[redacted:aaaaaaaaaaaa]")))
    assert detect_with_headers(b, tmp_path, "service_key_leak").empty


def aud_token(b: Builder, aud) -> str:
    fp = b.token(sub="alice", exp=3600)
    b.tokens[-1]["aud"] = aud
    return fp


def test_audience_mismatch(tmp_path):
    b = Builder()
    t = aud_token(b, json.dumps(["gateway", "products"]))
    root = b.hop("gateway", "POST /cart/items", 0, 1, presented=t)
    b.hop("auth", "GET /verify", 0.01, 0.02, presented=t, parent=root)  # the validator: not a use
    b.hop("products", "GET /products", 0.1, 0.2, presented=t, parent=root)
    cart = b.hop("cart", "POST /cart/items", 0.3, 0.9, presented=t, parent=root, status=401)
    f = detect_with_headers(b, tmp_path, "audience_mismatch")
    assert len(f) == 1
    row = f.iloc[0]
    assert (row["severity"], row["caller"], row["callee"], row["hop_ids"]) == ("error", "gateway", "cart", [cart])
    assert row["details"]["aud"] == ["gateway", "products"]
    assert row["message"].startswith("gateway sent a token for aud gateway,products to cart POST /cart/items (1 calls, 1 refused)")


def test_audience_mismatch_not_refused_is_a_warning_and_the_map_accepts(tmp_path):
    b = Builder()
    t = aud_token(b, "gateway")
    root = b.hop("gateway", "GET /cart/c1", 0, 1, presented=t)
    b.hop("cart", "GET /cart/c1", 0.1, 0.2, presented=t, parent=root)
    f = detect_with_headers(b, tmp_path, "audience_mismatch")
    assert list(f["severity"]) == ["warning"]
    assert detect_with_headers(b, tmp_path, "audience_mismatch", audiences={"cart": ("gateway",)}).empty


def test_audience_mismatch_needs_an_aud_in_the_stacks_words(tmp_path):
    b = Builder()
    for i, aud in enumerate((None, "https://api.example.com", json.dumps(["shop-api"]))):
        t = aud_token(b, aud)
        root = b.hop("gateway", "GET /cart/c1", 10 * i, 10 * i + 1, presented=t)
        b.hop("cart", "GET /cart/c1", 10 * i + 0.1, 10 * i + 0.2, presented=t, parent=root)
    assert detect_with_headers(b, tmp_path, "audience_mismatch").empty
    # Told that cart answers to shop-api, the same capture is judged: cart accepts its token, the gateway does not.
    f = detect_with_headers(b, tmp_path, "audience_mismatch", audiences={"cart": ("shop-api",)})
    assert list(f["callee"]) == ["gateway"]
    f = detect_with_headers(b, tmp_path, "audience_mismatch", audiences={"products": ("shop-api",)})
    assert len(f) == 2  # shop-api is now a known audience: gateway and cart are outside it


def refreshes(b: Builder, token, times, statuses):
    ids = []
    for (s, e), status in zip(times, statuses):
        root = b.hop("gateway", "POST /auth/refresh", s, e, validated=token, status=status)
        ids.append(b.hop("auth", "POST /refresh", s + 0.001, e - 0.001, validated=token, parent=root, status=status))
    return ids


def test_refresh_race(tmp_path):
    b = Builder()
    t = b.token(kind="opaque")
    ids = refreshes(b, t, [(0.0, 0.02), (0.001, 0.03)], [200, 401])
    f = detect_with_headers(b, tmp_path, "refresh_race")
    assert len(f) == 1
    row = f.iloc[0]
    assert (row["severity"], row["caller"], row["callee"], row["endpoint"]) == ("error", "gateway", "auth", "POST /refresh")
    assert row["hop_ids"] == ids and row["details"]["statuses"] == [200, 401] and row["details"]["overlapping"]
    assert row["message"].startswith("client sent one refresh token to auth POST /refresh through gateway twice")


def test_refresh_race_edges(tmp_path):
    b = Builder()
    refreshes(b, b.token(kind="opaque"), [(0.0, 0.02), (0.01, 0.03)], [200, 200])  # both accepted
    refreshes(b, b.token(kind="opaque"), [(10.0, 10.02), (12.0, 12.03)], [200, 401])  # 2 s apart: reuse, not a race
    refreshes(b, b.token(kind="opaque"), [(20.0, 20.02)], [401])  # once
    t = b.token(kind="opaque")  # twice at once, but not at a refresh path
    b.hop("cart", "GET /cart/c1", 30, 30.02, presented=t, status=200)
    b.hop("cart", "GET /cart/c1", 30.01, 30.03, presented=t, status=403)
    assert detect_with_headers(b, tmp_path, "refresh_race").empty
    # Within the window, not overlapping.
    b = Builder()
    refreshes(b, b.token(kind="opaque"), [(0.0, 0.02), (0.3, 0.32)], [200, 401])
    assert len(detect_with_headers(b, tmp_path, "refresh_race")) == 1
    assert detect_with_headers(b, tmp_path, "refresh_race", refresh_race_window_s=0.1).empty


# -- every finding names its caller; no detector raises on arbitrary small tables -------------------


def test_the_seeds_answer_names_payment(tmp_path):
    b = Builder()
    t = b.token(sub="alice", exp=1.0)
    checkout(b, t, exp_status=401)
    row = detect(b, tmp_path, "expired_mid_flow").iloc[0]
    assert (row["caller"], row["callee"], row["endpoint"]) == ("payment", "auth", "POST /introspect")
    assert row["message"] == (
        "payment re-validated the token at auth POST /introspect 0.50 s after exp (401);"
        " gateway had validated it at auth 1.49 s earlier with 0.99 s left"
    )


_STATUSES = st.sampled_from([None, 200, 201, 401, 403, 404, 429, 500, 502, 503])
_NAMES = st.sampled_from(["gateway", "auth", "cart", "products"])
_PATHS = st.sampled_from(["GET /products", "POST /refresh", "POST /introspect", "GET /verify", "POST /token", "GET /x/1"])
_HEADER_LISTS = st.lists(
    st.tuples(st.sampled_from(["X-Internal-Key", "Retry-After", "Set-Cookie", "Accept"]),
              st.sampled_from(["[redacted:aaaaaaaaaaaa]", "[redacted:bbbbbbbbbbbb]", "1", "0", "Wed, 21 Oct 2015 07:28:00 GMT", "x"])),
    max_size=3,
)  # fmt: skip


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    hops=st.lists(
        st.tuples(_NAMES, _PATHS, st.floats(0, 3), st.floats(0, 1), _STATUSES, st.integers(-1, 5),
                  st.integers(0, 3), _HEADER_LISTS, _HEADER_LISTS),
        min_size=1, max_size=12,
    ),
    auds=st.lists(st.sampled_from([None, "cart", '["gateway","auth"]', "[not json", "https://x"]), min_size=3, max_size=3),
)  # fmt: skip
def test_detectors_never_raise_on_small_tables(tmp_path, hops, auds):
    from hoptrace.analyzer import DETECTORS

    b = Builder()
    fps = [aud_token(b, aud) for aud in auds] + [None]
    ids: list[int] = []
    for service, endpoint, start, length, status, parent, token, sent, answered in hops:
        fp = fps[token]
        ids.append(b.hop(
            service, endpoint, start, start + length, status=status,
            parent=ids[parent] if 0 <= parent < len(ids) else None,
            presented=() if fp is None else fp, request_headers=headers(*sent), response_headers=headers(*answered),
        ))  # fmt: skip
    found = detect_with_headers(b, tmp_path, "all")
    assert set(found["kind"]) <= {d.kind for d in DETECTORS}
    assert set(found["severity"]) <= {"error", "warning", "info"}
    assert all(isinstance(c, str) for c in found["callee"])


def signed_token(b: Builder, kid, verdict) -> str:
    fp = b.token(sub="alice", exp=3600)
    b.tokens[-1].update(alg="RS256", kid=kid, verdict=verdict)
    return fp


def test_unknown_signing_key(tmp_path):
    b = Builder()
    old = signed_token(b, "2024-rotated", "unknown_kid")
    root = b.hop("gateway", "POST /checkout", 0, 2, presented=old)
    pay = b.hop("payment", "POST /checkout", 0.1, 1.9, presented=old, parent=root)
    intro = b.hop("auth", "POST /introspect", 1.5, 1.6, validated=old, parent=pay, status=401)
    new = signed_token(b, "2025-current", "valid")  # another user's token, signed with the key auth uses now
    b.hop("gateway", "GET /products", 3, 3.1, presented=new)
    f = detect_with_headers(b, tmp_path, "unknown_signing_key")
    # Every call that carried it: the client's to the gateway, the gateway's to payment, payment's to auth.
    assert sorted(zip(f["caller"], f["callee"])) == [("client", "gateway"), ("gateway", "payment"), ("payment", "auth")]
    refused = f[f["callee"] == "auth"].iloc[0]
    assert (refused["severity"], refused["caller"], refused["hop_ids"]) == ("error", "payment", [intro])
    assert refused["details"] == {
        "kid": "2024-rotated", "other_kids": ["2025-current"], "calls": 1, "refused": 1, "statuses": ["401"],
    }  # fmt: skip
    assert refused["message"].startswith("payment sent auth POST /introspect a token signed with key '2024-rotated'")
    assert refused["message"].endswith("(1 calls, 1 refused); the capture's other tokens name '2025-current'")
    # The 401 to a token with an hour left is also a rejected valid token, which says why.
    rejected = detect_with_headers(b, tmp_path, "rejected_valid_token")
    assert "signed with key '2024-rotated', in no key set the capture served: see unknown_signing_key" in rejected.iloc[0]["message"]
    passed = f[f["callee"] == "payment"].iloc[0]
    assert (passed["severity"], passed["caller"], passed["hop_ids"]) == ("warning", "gateway", [pay])


@pytest.mark.parametrize("verdict", [None, "valid", "invalid", "unverifiable"])
def test_unknown_signing_key_only_for_that_verdict(tmp_path, verdict):
    b = Builder()
    t = signed_token(b, "k1", verdict)
    root = b.hop("gateway", "GET /cart/c1", 0, 1, presented=t)
    b.hop("cart", "GET /cart/c1", 0.1, 0.2, presented=t, parent=root, status=401)
    assert detect_with_headers(b, tmp_path, "unknown_signing_key").empty


def test_unknown_signing_key_tolerates_a_file_without_verdicts(tmp_path):
    import sqlite3

    b = Builder()
    t = signed_token(b, "k1", "unknown_kid")
    b.hop("gateway", "GET /cart/c1", 0, 1, presented=t)
    path = b.write(tmp_path / "old.db")
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE tokens DROP COLUMN verdict")  # as a file from before the column
    conn.commit()
    conn.close()
    from hoptrace.analyzer import analyze

    assert "unknown_signing_key" not in set(analyze(path).findings["kind"])


# -- the header lines of hostile columns ------------------------------------------------------------

_json_leaf = st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none(), st.floats(allow_nan=False, allow_infinity=False))
_json = st.recursive(_json_leaf, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=12)
# Text with lone UTF-16 surrogates now and then: json.dumps spells them "\ud800", which is valid JSON.
_text = st.lists(st.one_of(st.characters(), st.sampled_from(["\ud800", "\udbff", "\udc00", "\udfff"])), max_size=12).map("".join)
_pair = st.tuples(_text, _text.map(lambda v: v if v[:1] != "[" else "[redacted:" + v)).map(list)
_recorded = st.lists(st.one_of(_pair, _json), max_size=6).map(json.dumps)  # what the recorder writes, with odd items mixed in


class TextBytes(bytes):
    """Bytes stored as TEXT (``CAST(? AS TEXT)``): a column of text that is not valid UTF-8."""


_column = st.one_of(
    _recorded,
    st.tuples(_recorded, st.integers(0, 40), st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])).map(
        lambda t: TextBytes(t[0].encode()[: t[1]] + t[2] + t[0].encode()[t[1] :])
    ),
    _json.map(json.dumps),  # any JSON: an object, a scalar, nested lists
    st.text(max_size=30),  # not JSON
    st.binary(max_size=30),  # a blob
    st.integers(-(2**63), 2**63 - 1),
    st.none(),
)


def _lines_as_python_reads_them(value) -> list[tuple[str, str]]:
    """The oracle: JSON that is an array; its [text, text] items, names lower-cased; text that is
    not UTF-8 read with U+FFFD for each bad byte, and so is each lone surrogate the JSON spells."""
    if isinstance(value, TextBytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return []
    try:
        items = json.loads(value)
    except ValueError:
        return []
    if not isinstance(items, list):
        return []
    def whole(text: str) -> str:
        return "".join("\ufffd" if 0xD800 <= ord(c) <= 0xDFFF else c for c in text)

    pairs = [i for i in items if isinstance(i, list) and len(i) == 2 and all(isinstance(x, str) for x in i)]
    return [(whole(name).lower(), whole(value)) for name, value in pairs]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(columns=st.lists(_column, min_size=1, max_size=5))
def test_header_lines_are_the_text_pairs_of_a_json_array_whatever_the_column_holds(tmp_path, columns):
    """What the service-key and Retry-After detectors read of a header column a hostile file holds:
    any other hop's lines survive it."""
    import sqlite3

    from hoptrace.analyzer._headers import REDACTED_PREFIX, HeaderReader

    b = Builder()
    ids = [b.hop("cart", "GET /x", float(i), i + 0.5) for i in range(len(columns))]
    path = tmp_path / "headers.db"
    path.unlink(missing_ok=True)
    b.write(path)
    with sqlite3.connect(path) as conn:
        for value, hop in zip(columns, ids, strict=True):
            cast = "CAST(? AS TEXT)" if isinstance(value, TextBytes) else "?"
            conn.execute(f"UPDATE hops SET request_headers = {cast} WHERE id = ?", (bytes(value) if isinstance(value, TextBytes) else value, hop))
    reader = HeaderReader(path)
    expected = [(hop, *line) for hop, value in zip(ids, columns, strict=True) for line in _lines_as_python_reads_them(value)]
    got = reader.lines(ids, "request")
    assert list(got.itertuples(index=False, name=None)) == expected
    for value in got["value"]:
        value.encode("utf-8")  # every output can hold it: no lone surrogate is left
    redacted = reader.lines(ids, "request", containing=(REDACTED_PREFIX,))
    holding = {hop for hop, value in zip(ids, columns, strict=True) if isinstance(value, str | bytes) and REDACTED_PREFIX.encode() in (
        value if isinstance(value, bytes) else value.encode())}  # fmt: skip
    assert list(redacted.itertuples(index=False, name=None)) == [line for line in expected if line[0] in holding]
