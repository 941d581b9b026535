"""The seed's scenario recorded end to end: the sample stack, `hoptrace proxy` in front of every
service, a real client through the gateway's listener, SIGINT, then the trace file checked
against what the services themselves counted."""

from __future__ import annotations

import sqlite3
from collections import Counter

import pytest

from hoptrace.stack import SERVICES

from .conftest import file_bytes, record_scenario

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    recording, config, db = record_scenario("checkout-expiry", tmp_path_factory.mktemp("capture"))
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    yield recording, conn, config
    conn.close()


def test_proxy_stopped_by_sigint_with_nothing_lost(checkout):
    recording, conn, _ = checkout
    assert recording.proxy_exit == 0
    capture = conn.execute("SELECT * FROM captures").fetchone()
    assert capture["hops_seen"] == capture["hops_recorded"]
    assert (capture["hops_dropped"], capture["addon_errors"], capture["write_errors"]) == (0, 0, 0)
    assert f"{capture['hops_recorded']} hops recorded, 0 dropped, 0 addon errors" in recording.proxy_output


def test_every_request_each_service_received_is_a_row(checkout):
    recording, conn, _ = checkout
    recorded = Counter(row["service"] for row in conn.execute("SELECT service FROM hops"))
    counted = {name: stats["total"] for name, stats in recording.service_stats.items()}
    assert recorded == counted
    assert set(recorded) == set(SERVICES)
    # The client's own requests: six steps per user, all at the gateway.
    assert recorded["gateway"] == 6 * len(recording.flows)


def test_timings_are_ordered_on_the_proxy_clock(checkout):
    _, conn, _ = checkout
    for hop in conn.execute("SELECT * FROM hops"):
        assert hop["started_at"] <= hop["request_end_at"] <= hop["ended_at"]
        assert hop["started_at"] <= hop["response_start_at"] <= hop["ended_at"]
        assert hop["duration_ms"] >= 0


def test_each_users_token_is_decoded(checkout):
    recording, conn, config = checkout
    tokens = {row["sub"]: row for row in conn.execute("SELECT * FROM tokens WHERE kind = 'jwt'")}
    for flow in recording.flows:
        token = tokens[flow.sub]
        assert (token["exp"], token["alg"], token["iss"]) == (flow.exp, "HS256", "auth")
        assert token["exp"] - token["iat"] == config.token_ttl
        assert token["jti"] and token["error"] is None


def test_checkout_401_and_payments_second_validation_are_recorded(checkout):
    recording, conn, _ = checkout
    late = [flow for flow in recording.flows if flow.statuses.get("checkout") == 401]
    assert len(late) == 1, [flow.statuses for flow in recording.flows]
    fp = conn.execute("SELECT fingerprint FROM tokens WHERE sub = ?", (late[0].sub,)).fetchone()[0]
    gateway_checkout = conn.execute(
        "SELECT h.* FROM hops h JOIN hop_tokens t ON t.hop_id = h.id"
        " WHERE h.service = 'gateway' AND h.path = '/checkout' AND t.fingerprint = ?", (fp,)
    ).fetchone()  # fmt: skip
    assert gateway_checkout["status"] == 401

    def inside(service: str, path: str, role: str) -> list[sqlite3.Row]:
        return conn.execute(
            "SELECT h.* FROM hops h JOIN hop_tokens t ON t.hop_id = h.id WHERE h.service = ? AND h.path = ?"
            " AND t.fingerprint = ? AND t.role = ? AND h.started_at >= ? AND h.ended_at <= ? ORDER BY h.started_at",
            (service, path, fp, role, gateway_checkout["started_at"], gateway_checkout["ended_at"]),
        ).fetchall()

    (gateway_validation,) = inside("auth", "/verify", "presented")
    (payment,) = inside("payment", "/checkout", "presented")
    (payment_validation,) = inside("auth", "/introspect", "validated")  # the token in the JSON body
    assert gateway_validation["status"] == 200 and payment["status"] == 401 and payment_validation["status"] == 401
    # The story in numbers: valid at the gateway's check, expired at payment's, a second later.
    assert gateway_validation["started_at"] < late[0].exp <= payment_validation["started_at"]
    assert payment["started_at"] <= payment_validation["started_at"] <= payment_validation["ended_at"] <= payment["ended_at"]


def test_login_returns_the_token_register_issued(checkout):
    recording, conn, _ = checkout
    assert all(flow.login_reused_token for flow in recording.flows)
    issued = conn.execute(
        "SELECT t.fingerprint, h.path FROM hop_tokens t JOIN hops h ON h.id = t.hop_id"
        " WHERE t.role = 'issued' AND h.service = 'auth'"
    ).fetchall()
    paths_by_token = {}
    for fp, path in issued:
        paths_by_token.setdefault(fp, set()).add(path)
    assert len(paths_by_token) == len(recording.flows)
    assert all(paths == {"/register", "/login"} for paths in paths_by_token.values())


def test_no_secret_reaches_the_file(checkout):
    recording, conn, config = checkout
    stored = file_bytes(recording.db)
    secrets = [config.internal_key, config.secret]
    for flow in recording.flows:
        secrets += [flow.token, flow.token.rsplit(".", 1)[1], flow.session_cookie]
    for secret in secrets:
        assert secret.encode() not in stored, secret[:12]
    # ...while the headers still show that they were there.
    headers = conn.execute("SELECT request_headers FROM hops WHERE service = 'payment'").fetchone()[0]
    assert '"X-Internal-Key", "[redacted:' in headers and '"Authorization", "Bearer [redacted:' in headers
