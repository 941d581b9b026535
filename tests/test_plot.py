"""hoptrace.plot on real Analysis objects of small hand-made trace DBs: what the layouts and
figures show, the HTML report, the CLI.

The scenario is the seed's checkout: the gateway validates alice's token, ~1 s later payment
validates it again after it has expired, and checkout answers 401. Each DB is written as the
recorder writes it (tests/analyzer_fixtures.Builder) and analyzed by the real analyzer; the
findings are then replaced by hand-written ones, so a test knows exactly what they say.
test_plot_e2e.py runs the same charts on traces recorded through the real proxy.
"""

from __future__ import annotations

import dataclasses
import html.parser
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.container import BarContainer

import hoptrace.plot as hp
from hoptrace._errors import AnalysisError, TraceFileError
from hoptrace.analyzer import Analysis, analyze
from hoptrace.analyzer._detectors import FINDING_COLUMNS
from hoptrace.analyzer._model import sorted_findings
from hoptrace.plot import _cli
from hoptrace.plot._common import EXPIRED_COLOR

from .analyzer_fixtures import T0, Builder

W = T0 + 1000.0  # workflow start (UNIX s)
EXP_A = W + 45.5  # alice's first token expires mid-checkout
FP_A, FP_B = "a1b2c3d4e5f60718", "b2c3d4e5f6071829"


# ---------------------------------------------------------------- scenario


def _hop(id, trace, parent, service, method, path, start, end, status=200, *, validation=False, token=None, failed=0,
         error=None, error_kind=None, trace_id=None, **_):  # fmt: skip
    """One hop of the scenario; ``trace``: its request's root hop id (the span ids link it to ``parent``)."""
    return {"id": id, "trace": trace, "parent": parent, "service": service, "endpoint": f"{method} {path}",
            "start": start, "end": end, "status": status, "validation": validation, "token": token,
            "failed": bool(failed), "error": error, "error_kind": error_kind, "trace_id": trace_id or f"t{trace}"}  # fmt: skip


def checkout_hops() -> list[dict]:
    c = W + 44.6  # checkout starts 0.9 s before the token expires
    c2 = W + 51.0
    return [
        _hop(1, 1, None, "gateway", "GET", "/products", W + 10, W + 10.030, token=FP_A, trace_id="4bf92f3577b34da6a3ce929d0e0e4736"),
        _hop(2, 1, 1, "product", "GET", "/products", W + 10.005, W + 10.025, token=FP_A),
        _hop(3, 3, None, "gateway", "POST", "/cart/items", W + 15, W + 15.060, 201, token=FP_A),
        _hop(4, 3, 3, "auth", "GET", "/verify", W + 15.002, W + 15.012, validation=True, token=FP_A),
        _hop(5, 3, 3, "cart", "POST", "/items", W + 15.015, W + 15.055, 201, token=FP_A),
        _hop(6, 6, None, "gateway", "GET", "/cart/abc123", W + 25, W + 25.020, token=FP_A),
        _hop(7, 6, 6, "cart", "GET", "/cart/abc123", W + 25.002, W + 25.018, token=FP_A),
        # The checkout: gateway validates at +5 ms, payment re-validates at +1000 ms, after exp (+900 ms).
        _hop(8, 8, None, "gateway", "POST", "/checkout", c, c + 1.400, 401, token=FP_A),
        _hop(9, 8, 8, "auth", "GET", "/verify", c + 0.005, c + 0.025, validation=True, token=FP_A),
        _hop(10, 8, 8, "cart", "GET", "/cart/abc123", c + 0.030, c + 0.080, token=FP_A),
        _hop(11, 8, 8, "payment", "POST", "/payments", c + 0.100, c + 1.380, 401, token=FP_A),
        _hop(12, 8, 11, "auth", "GET", "/verify", c + 1.000, c + 1.020, 401, validation=True, token=FP_A),
        # A request with the expired token, then a refresh, then the checkout again.
        _hop(13, 13, None, "gateway", "GET", "/orders", W + 48, W + 48.015, 401, token=FP_A),
        _hop(14, 13, 13, "auth", "GET", "/verify", W + 48.002, W + 48.010, 401, validation=True, token=FP_A),
        _hop(15, 15, None, "gateway", "POST", "/auth/refresh", W + 50, W + 50.040),
        _hop(16, 15, 15, "auth", "POST", "/token", W + 50.005, W + 50.035),
        _hop(17, 17, None, "gateway", "POST", "/checkout", c2, c2 + 0.300, token=FP_B),
        _hop(18, 17, 17, "auth", "GET", "/verify", c2 + 0.005, c2 + 0.020, validation=True, token=FP_B),
        _hop(19, 17, 17, "payment", "POST", "/payments", c2 + 0.030, c2 + 0.280, token=FP_B),
        _hop(20, 17, 19, "auth", "GET", "/verify", c2 + 0.040, c2 + 0.055, validation=True, token=FP_B),
        # An upstream that reset the connection mid-body: status 200 but failed.
        _hop(21, 21, None, "gateway", "GET", "/products/7", W + 53, W + 53.5, 200, failed=1,
             error="peer closed connection without sending complete message body", error_kind="truncated", token=FP_B),
    ]  # fmt: skip


def scenario_builder(rows: list[dict]) -> Builder:
    """The trace DB the recorder would have written for ``rows``: alice's two tokens, B issued by the refresh."""
    b = Builder()
    b.token("alice", EXP_A - T0, iat=W - 3554.5 - T0, iss="auth", seen=W + 10 - T0, fingerprint=FP_A)
    b.token("alice", W + 3650.02 - T0, iat=W + 50.02 - T0, iss="auth", seen=W + 50.03 - T0, fingerprint=FP_B)
    for r in rows:
        token = () if r["token"] is None else r["token"]
        b.hop(r["service"], r["endpoint"], r["start"] - T0, r["end"] - T0, parent=r["parent"], status=r["status"],
              presented=() if r["validation"] else token, validated=token if r["validation"] else (),
              issued=FP_B if r["endpoint"] in ("POST /token", "POST /auth/refresh") and len(rows) > 1 else (),
              failed=r["failed"], error=r["error"], error_kind=r["error_kind"], trace_id=r["trace_id"],
              span_id=f"s{r['id']}", parent_span_id=None if r["parent"] is None else f"s{r['parent']}")  # fmt: skip
    return b


_ANALYSES: dict[str, Analysis] = {}
# One folder for the scenarios' files, removed when the test process exits (a TemporaryDirectory's finalizer).
_FILES = tempfile.TemporaryDirectory(prefix="hoptrace-plot-")


def _analyzed(key: str, rows: list[dict]) -> Analysis:
    """The analysis of ``rows``, analyzed once per distinct scenario (each test gets its own copy)."""
    if key not in _ANALYSES:
        path = scenario_builder(rows).write(Path(_FILES.name) / f"scenario-{len(_ANALYSES)}.db")
        _ANALYSES[key] = analyze(path)
    shared = _ANALYSES[key]
    return dataclasses.replace(shared, **{f.name: getattr(shared, f.name).copy() for f in dataclasses.fields(shared)
                                          if isinstance(getattr(shared, f.name), pd.DataFrame)})  # fmt: skip


def make_analysis(rows: list[dict] | None = None, findings: list[dict] | None = None) -> Analysis:
    """A real analysis of ``rows`` (default: the checkout), its findings replaced by ``findings``
    (default: hand-written ones about the checkout, so each test knows exactly what they say)."""
    rows = checkout_hops() if rows is None else rows
    analysis = _analyzed(repr(rows), rows)
    assert [int(i) for i in analysis.hops.index] == sorted(r["id"] for r in rows) or len(rows) > 21
    if findings is None:
        findings = default_findings() if len(rows) == len(checkout_hops()) else []
    frame = pd.DataFrame(findings, columns=list(FINDING_COLUMNS)).astype({"trace": "Int64", "at": "float64"})
    return dataclasses.replace(analysis, findings=frame)


def default_findings() -> list[dict]:
    return [
        {
            "kind": "expired_mid_flow",
            "severity": "error",
            "trace": 8,
            "service": "payment",
            "hop_ids": [9, 12],
            "message": "payment validated token a1b2c3d4 0.10 s after it expired; gateway had validated it 0.98 s earlier",
            "details": {"validated_ok": 9, "rejected": 12},
            "at": W + 45.6,
        },
        {
            "kind": "duplicate_validation",
            "severity": "warning",
            "trace": 8,
            "service": "auth",
            "hop_ids": [9, 12],
            "message": "token a1b2c3d4 validated 2 times in one request",
            "details": {},
            "at": W + 45.6,
        },
        {
            "kind": "expired_in_session",
            "severity": "error",
            "trace": 13,
            "service": "gateway",
            "hop_ids": [13],
            "message": "GET /orders sent with a token expired 2.50 s earlier",
            "details": {},
            "at": W + 48,
        },
        {
            "kind": "duplicate_validation",
            "severity": "warning",
            "trace": 17,
            "service": "auth",
            "hop_ids": [18, 20],
            "message": "token b2c3d4e5 validated 2 times in one request",
            "details": {},
            "at": W + 51.04,
        },
        {
            "kind": "upstream_error",
            "severity": "warning",
            "trace": 21,
            "service": "gateway",
            "hop_ids": [21],
            "message": "<script>alert('x')</script> & truncated body",
            "details": {},
            "at": W + 53.5,
        },
    ]


def one_hop_analysis() -> Analysis:
    return make_analysis([_hop(1, 1, None, "solo", "GET", "/health", W, W + 0.004)], findings=[])


def empty_analysis() -> Analysis:
    a = make_analysis([_hop(1, 1, None, "x", "GET", "/", W, W + 0.001)], findings=[])
    empty = {name: getattr(a, name).iloc[0:0] for name in ("hops", "sessions", "services", "edges", "endpoints", "hop_tokens")}
    return dataclasses.replace(a, **empty)


def big_trace_analysis(n: int = 200) -> Analysis:
    """One request fanning out into ``n - 1`` hops, nested up to depth 4."""
    rows = [_hop(1, 1, None, "gateway", "GET", "/fanout", W, W + 2.0, token=FP_A)]
    parents = {0: 1}
    for i in range(2, n + 1):
        depth = 1 + (i % 4)
        parent = parents.get(depth - 1, 1)
        start = W + 0.001 * i
        rows.append(_hop(i, 1, parent, f"svc{i % 7}-{depth}", "GET", f"/items/{i}", start, start + 0.05 + 0.001 * (i % 9),
                         500 if i % 50 == 0 else 200, token=FP_A))  # fmt: skip
        parents[depth] = i
    return make_analysis(rows, findings=[])


# ---------------------------------------------------------------- helpers to read figures


def main_axes(fig):
    return next(ax for ax in fig.axes if ax.containers)


def bars(ax, label):
    found = [c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == label]
    assert len(found) == 1, [c.get_label() for c in ax.containers]
    return found[0].patches


def lines(ax, gid):
    return [line for line in ax.get_lines() if line.get_gid() == gid]


def tick_texts(ax):
    return [t.get_text() for t in ax.get_yticklabels()]


def legend_texts(fig):
    return [
        t.get_text() for leg in fig.legends + [ax.get_legend() for ax in fig.axes if ax.get_legend()] for t in leg.get_texts()
    ]


def all_texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def rgba(color):
    from matplotlib.colors import to_rgba

    return to_rgba(color)


# ---------------------------------------------------------------- waterfall


def test_waterfall_one_bar_per_hop_in_tree_order_with_labels():
    a = make_analysis()
    fig = hp.waterfall(a, 8)
    ax = main_axes(fig)
    rects = bars(ax, "hops")
    assert len(rects) == 5 == int((a.hops["trace"] == 8).sum())
    labels = tick_texts(ax)
    bodies = ["gateway POST /checkout", "auth GET /verify", "cart GET /cart/abc123", "payment POST /payments", "auth GET /verify"]
    assert [b in lab for b, lab in zip(bodies, labels)] == [True] * 5
    # Indented by depth: the root flush left, payment's own call below payment, one level deeper.
    assert labels[0] == "gateway POST /checkout"
    assert labels[3].index("payment") < labels[4].index("auth")
    assert labels[3].startswith("└─ ") and labels[4].startswith("   └─ ")
    # Bars span start..end in ms from the request's start.
    c = W + 44.6
    got = [(r.get_x(), r.get_x() + r.get_width()) for r in rects]
    assert got[0] == pytest.approx((0.0, 1400.0), abs=1e-3)
    assert got[4] == pytest.approx(((W + 44.6 + 1.0 - c) * 1000, (W + 44.6 + 1.02 - c) * 1000), abs=1e-3)
    assert "ms" in ax.get_xlabel() and "request started" in ax.get_xlabel()
    assert "Request 8" in ax.get_title(loc="left") and "401" in ax.get_title(loc="left")


def test_waterfall_token_expiry_line_shading_and_flags():
    a = make_analysis()
    fig = hp.waterfall(a, 8)
    ax = main_axes(fig)
    exp_lines = lines(ax, "token-exp")
    assert len(exp_lines) == 1
    assert exp_lines[0].get_xdata()[0] == pytest.approx((EXP_A - (W + 44.6)) * 1000)  # 900 ms
    spans = [p for p in ax.patches if p.get_gid() == "token-expired"]
    assert len(spans) == 1 and spans[0].get_x() == pytest.approx(900.0)
    # Validation hops marked, the second one flagged duplicate, the after-expiry hop says so.
    markers = [c for c in ax.collections if c.get_gid() == "validation"]
    assert len(markers) == 1 and sorted(markers[0].get_offsets()[:, 1].tolist()) == [1.0, 4.0]
    rects = bars(ax, "hops")
    assert [bool(r.get_hatch()) for r in rects] == [False, False, False, False, True]
    texts = all_texts(fig)
    assert any(t.startswith("401 · 1400 ms") for t in texts)
    assert any("DUPLICATE of hop 9 (995 ms later)" in t and "token expired 0.10 s earlier" in t for t in texts)
    # The findings about this request are written under the chart.
    assert any("expired_mid_flow" in t for t in texts)


def test_waterfall_outcome_colours_and_legend():
    a = make_analysis()
    fig = hp.waterfall(a, 8)
    rects = bars(main_axes(fig), "hops")
    assert rects[0].get_facecolor() == rgba(hp.OUTCOME_COLORS["4xx"])
    assert rects[1].get_facecolor() == rgba(hp.OUTCOME_COLORS["2xx"])
    legend = legend_texts(fig)
    for entry in (
        "2xx success",
        "4xx client error",
        "token validation",
        "duplicate validation",
        "token exp",
        "after token expiry",
    ):
        assert entry in legend
    # A 200 whose body broke off is an error, not a success.
    fig = hp.waterfall(a, 21)
    assert bars(main_axes(fig), "hops")[0].get_facecolor() == rgba(hp.OUTCOME_COLORS["error"])
    assert "error (no/broken response)" in legend_texts(fig)
    assert any(t.startswith("200, then broken (truncated)") for t in all_texts(fig))


def test_outcome_palette_is_shared_by_every_chart():
    assert set(hp.OUTCOME_COLORS) == {"2xx", "3xx", "4xx", "5xx", "error"}
    assert len(set(hp.OUTCOME_COLORS.values())) == 5
    assert [hp.outcome_of(s, f) for s, f in [(200, 0), (302, 0), (404, 0), (503, 0), (200, 1), (None, 0), (pd.NA, 0)]] == [
        "2xx",
        "3xx",
        "4xx",
        "5xx",
        "error",
        "error",
        "error",
    ]
    a = make_analysis()
    session_rects = bars(main_axes(hp.session_view(a, "alice")), "requests")
    assert session_rects[3].get_facecolor() == rgba(hp.OUTCOME_COLORS["4xx"])  # the 401 checkout
    lat = hp.latency(a)
    dots = [c for c in lat.axes[0].collections if c.get_gid() is None and len(c.get_offsets())]
    used = {tuple(np.round(fc, 4)) for c in dots for fc in c.get_facecolors()[:, :3]}
    assert tuple(np.round(rgba(hp.OUTCOME_COLORS["4xx"])[:3], 4)) in used


def test_waterfall_resolves_trace_ids_and_rejects_unknown():
    a = make_analysis()
    assert hp.resolve_trace(a, "8") == 8
    assert hp.resolve_trace(a, "4BF92F3577B34DA6A3CE929D0E0E4736") == 1  # a propagated trace id
    assert hp.resolve_trace(a, 12) == 8  # a hop inside request 8
    with pytest.raises(AnalysisError, match=r"no request '999'.*ids: 1, 3, 6, 8"):
        hp.waterfall(a, 999)


def test_waterfall_expiry_far_from_the_request_is_a_note_not_a_squashed_axis():
    a = make_analysis()
    fig = hp.waterfall(a, 13)  # token expired 2.5 s before this 15 ms request
    ax = main_axes(fig)
    assert lines(ax, "token-exp") == []
    assert ax.get_xlim()[1] < 100  # still a millisecond-scale chart
    assert [p for p in ax.patches if p.get_gid() == "token-expired"]  # all of it shaded
    assert any("had expired 2.50 s before this request started" in t for t in all_texts(fig))
    fig = hp.waterfall(a, 17)  # token valid for an hour more
    assert lines(main_axes(fig), "token-exp") == []
    assert any("expires 60.0 min after this request started" in t for t in all_texts(fig))


def test_waterfall_of_200_hops_stays_readable():
    a = big_trace_analysis(200)
    small = hp.waterfall(make_analysis(), 8)
    fig = hp.waterfall(a, 1)
    ax = main_axes(fig)
    assert len(bars(ax, "hops")) == 200
    assert len(tick_texts(ax)) == 200
    assert fig.get_figheight() > 200 * 0.25 > small.get_figheight()
    assert {t.get_fontsize() for t in ax.get_yticklabels()} == {8.5}
    assert ax.xaxis.get_tick_params(which="major")["labeltop"]  # the scale is also at the top
    # At the default 100 dpi each row gets ≥ 25 px for an 8.5 pt (12 px) label.
    row_px = ax.get_position().height * fig.get_figheight() * 100 / 200
    assert row_px >= 25
    # (Rendering it takes seconds of glyph drawing; the other tests render the same code.)


def test_waterfall_of_one_hop_and_hostile_text():
    a = one_hop_analysis()
    fig = hp.waterfall(a, 1)
    assert len(bars(main_axes(fig), "hops")) == 1
    evil = _hop(1, 1, None, "svc$x$", "GET", "/a/$\\frac{1}{0}$/b\n<script>", W, W + 0.01)
    fig = hp.waterfall(make_analysis([evil], findings=[]), 1)
    label = tick_texts(main_axes(fig))[0]
    assert "\n" not in label and r"\$" in label
    hp.figure_bytes(fig, "svg")  # mathtext never parses DB text: no error


def test_waterfall_figure_takes_one_requests_rows():
    a = make_analysis()
    fig = hp.waterfall_figure(a.trace_hops(8), a.tokens)  # no findings: no notes, no hatching
    assert lines(main_axes(fig), "token-exp")[0].get_xdata()[0] == pytest.approx(900.0)
    assert any(t.startswith("401 · 1400 ms") for t in all_texts(fig))
    assert not any(r.get_hatch() for r in bars(main_axes(fig), "hops"))
    with pytest.raises(AnalysisError):
        hp.waterfall_figure(a.trace_hops(8).iloc[0:0], a.tokens)


def test_pick_worst_trace():
    assert hp.pick_worst_trace(make_analysis())[0] == 8
    trace, why = hp.pick_worst_trace(make_analysis(findings=[]))
    assert trace == 8 and "failed" in why  # no finding: the requests that failed come first, slowest first


# ---------------------------------------------------------------- session


def test_session_view_requests_tokens_expiry_refresh():
    a = make_analysis()
    fig = hp.session_view(a, "alice")
    ax = main_axes(fig)
    req = bars(ax, "requests")
    assert len(req) == len(a.sessions) == 8
    toks = bars(ax, "tokens")
    assert len(toks) == 2
    t0 = W + 10  # first request
    exp_lines = lines(ax, "token-exp")
    assert len(exp_lines) == 1 and exp_lines[0].get_xdata()[0] == pytest.approx(EXP_A - t0)
    assert toks[0].get_x() + toks[0].get_width() == pytest.approx(EXP_A - t0)  # band ends at exp
    assert toks[1].get_x() == pytest.approx(W + 50.02 - t0)  # the refreshed token starts at its iat
    # The checkout (its token expired during it) and the GET /orders sent after expiry are highlighted.
    hatched = [i for i, r in enumerate(req) if r.get_hatch()]
    labels = tick_texts(ax)
    assert [labels[2 + i].split("  ")[1] for i in hatched] == ["POST /checkout", "GET /orders"]
    assert ax.get_yticklabels()[2 + hatched[1]].get_color() == EXPIRED_COLOR
    assert labels[0].startswith("token a1b2c3d4") and labels[1].startswith("token b2c3d4e5")
    gids = [c.get_gid() for c in ax.texts]
    assert gids.count("refresh") == 1 and gids.count("issued") == 1
    assert "token expired before or during it" in legend_texts(fig)
    assert any("sent with a token expired 2.50 s earlier" in t for t in all_texts(fig))
    assert "s" in ax.get_xlabel() and "first request" in ax.get_xlabel()


def test_select_session_by_subject_token_and_errors():
    a = make_analysis()
    assert len(hp.select_session(a, "alice")) == 8
    assert len(hp.select_session(a, FP_B[:8])) == 8  # the session that used or got token B
    assert len(hp.select_session(a, "0")) == 8  # a session number
    with pytest.raises(AnalysisError, match="subjects: 'alice'"):
        hp.session_view(a, "bob")


def test_a_subject_no_request_entered_with_names_the_requests_whose_calls_carried_it(tmp_path):
    """The client holds an opaque session cookie; the services call each other with the user's JWT."""
    b = Builder()
    cookies = {user: b.token(None, kind="opaque") for user in ("alice", "bob")}
    jwts = {user: b.token(user, 3600) for user in ("alice", "bob")}
    requests = {"alice": [], "bob": []}
    for i, user in enumerate(["alice", "bob", "alice", "bob", "alice"]):
        root = b.hop("edge", "GET /dashboard", i, i + 0.5, presented=cookies[user])
        b.hop("ledger", "GET /balance", i + 0.1, i + 0.2, parent=root, presented=jwts[user])
        requests[user].append(root)
    a = analyze(b.write(tmp_path / "t.db"))
    assert a.sessions["subject"].isna().all()  # no request entered with a subject
    for user, roots in requests.items():
        assert sorted(hp.select_session(a, user)["trace"].astype(int)) == roots
    with pytest.raises(AnalysisError, match="subjects: 'alice', 'bob'"):  # the subjects there are, not "none"
        hp.select_session(a, "carol")


def test_a_numeric_subject_is_a_subject_before_a_session_number(tmp_path):
    b = Builder()
    cookies = [b.token(None, kind="opaque") for _ in range(3)]
    jwt = b.token("1", 3600)
    mine = []
    for i in range(6):
        root = b.hop("edge", "GET /dashboard", i, i + 0.5, presented=cookies[i % 3])
        if i % 3 == 0:
            b.hop("ledger", "GET /balance", i + 0.1, i + 0.2, parent=root, presented=jwt)
            mine.append(root)
    a = analyze(b.write(tmp_path / "t.db"))
    assert 1 in set(a.sessions["session"])  # "1" also names a session
    assert sorted(hp.select_session(a, "1")["trace"].astype(int)) == mine


# ---------------------------------------------------------------- latency & services


def test_latency_percentiles_and_error_rates():
    a = make_analysis()
    fig = hp.latency(a)
    ax = fig.axes[0]
    labels = tick_texts(ax)
    assert len(labels) == len(a.services) == 5
    order = [lab.split("\n")[0] for lab in labels]
    assert set(order) == set(a.services["service"])
    assert order[0] == "payment"  # slowest p95 on top
    stats = a.services.set_index("service").loc[order]
    for name, key in (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")):
        marks = [c for c in ax.collections if c.get_gid() == name]
        assert len(marks) == 1
        assert marks[0].get_offsets()[:, 0].tolist() == pytest.approx(stats[key].tolist())
    assert "ms" in ax.get_xlabel()
    assert any("12.5% errors" in t.get_text() for t in fig.axes[1].texts)  # gateway: 1 of 8 failed
    assert {"p50", "p95", "p99"} <= set(legend_texts(fig))


def test_service_graph_edges_and_nodes():
    a = make_analysis()
    fig = hp.service_graph(a)
    ax = fig.axes[0]
    edges = [p for p in ax.patches if str(p.get_gid()).startswith("edge:")]  # each arrow a spline from dot
    assert sorted(p.get_gid() for p in edges) == sorted(f"edge:{c}->{d}" for c, d in zip(a.edges.caller, a.edges.callee))
    nodes = {t.get_gid()[5:]: t.get_text() for t in ax.texts if str(t.get_gid()).startswith("node:")}
    assert set(nodes) == {"client", "gateway", "auth", "cart", "payment", "product"}
    assert "7 hops" in nodes["auth"] and "8 requests" in nodes["client"]
    labels = [t.get_text() for t in ax.texts if t.get_gid() is None]
    assert "5 calls · p95 28.0 ms\n1 4xx" in labels  # gateway -> auth: the 401 at /verify counts where it happened
    assert any(lab.startswith("8 calls") and "1 error, 2 4xx" in lab for lab in labels)
    hp.figure_bytes(fig)


# ---------------------------------------------------------------- report


class ReportParser(html.parser.HTMLParser):
    VOID = frozenset({"meta", "img", "br", "link", "hr", "input"})

    def __init__(self):
        super().__init__()
        self.images, self.rows, self.links, self.scripts, self._row, self._cell, self.open_tags = [], [], [], 0, None, None, []
        self.more = []  # the "… and N more" rows of the findings table
        self._rows = self.rows
        self.misnested = []  # end tags that do not close the innermost open element

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag not in self.VOID:
            self.open_tags.append(tag)
        if tag == "svg" and "data-chart" in a:  # each chart an inline SVG
            self.images.append(a)
        if tag == "script":
            self.scripts += 1
        if tag in ("a", "link"):
            self.links.append(a.get("href", ""))
        if tag == "tr" and (a.get("class") or "").split()[:1] in (["finding"], ["more-findings"]):
            self._row = []
            self._rows = self.rows if a["class"].startswith("finding") else self.more
        if tag == "td" and self._row is not None:
            self._cell = ""

    def handle_endtag(self, tag):
        if self.open_tags and self.open_tags[-1] == tag:
            self.open_tags.pop()
        else:
            self.misnested.append(tag)
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(self._cell)
            self._cell = None
        if tag == "tr" and self._row is not None:
            self._rows.append(self._row)
            self._row = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text: str) -> ReportParser:
    p = ReportParser()
    p.feed(text)
    p.close()
    return p


def test_report_embeds_every_chart_and_lists_findings(tmp_path):
    a = make_analysis()
    out = hp.write_report(a, tmp_path / "report.html", source="traces.db")
    text = out.read_text(encoding="utf-8")
    p = parse(text)
    charts = [(img.get("data-chart"), img.get("data-trace") or img.get("data-session")) for img in p.images]
    # A waterfall for each request with an error finding, the affected workflow, latency, services.
    assert charts == [("waterfall", "8"), ("waterfall", "13"), ("session", "0"), ("latency", None), ("services", None)]
    for img in p.images:
        assert img.get("aria-label") and img.get("role") == "img"
    assert text.count("<svg ") == len(p.images)
    # Vector charts only, drawn straight to SVG: the latency chart's dots are paths too, no raster.
    figures = re.findall(r'<figure id="([^"]+)">(.*?)</figure>', text, re.S)
    assert len(figures) == len(charts) and not any("<image" in body for _, body in figures)
    latency = dict(figures)["latency-chart"]
    assert latency.count('stroke-linecap="round"') >= 1 and "p99" in latency
    assert text.count("<text ") > 20  # labels kept as text: crisp and selectable
    # The story of each error finding comes before the findings list and the summary.
    assert text.index('class="story sev-error"') < text.index('id="trace-8"') < text.index('id="findings"')
    # Findings table: one row per finding, errors first, text exactly as in the DB (escaped in the file).
    assert len(p.rows) == len(a.findings) and p.more == []
    assert p.misnested == [] and p.open_tags == []  # every element closed, in order
    expected = sorted_findings(a.findings)
    assert [r[0] for r in p.rows] == list(expected["severity"])
    assert [r[1] for r in p.rows] == list(expected["kind"])
    assert [r[-1] for r in p.rows] == list(expected["message"])
    assert p.scripts == 0 and "<script>alert" not in text  # the hostile message stays text
    # Offline: nothing but in-page anchors and data URIs.
    assert all(h.startswith("#") for h in p.links)
    # (The hops' curl lines name their URLs as text to copy: nothing the page loads.)
    outside_curl = re.sub(r'<pre class="curl">[^<]*</pre>', "", text)
    assert "http://" not in outside_curl.replace("http-equiv", "") and "https://" not in outside_curl
    assert "Content-Security-Policy" in text
    assert 'href="#trace-8"' in text and 'id="trace-8"' in text


def many_findings_analysis(errors: int, warnings: int, infos: int) -> Analysis:
    """The checkout with ``errors`` expired_mid_flow, ``warnings`` duplicate_validation and ``infos`` slow_hop findings."""

    def finding(kind, severity, i):
        return {
            "kind": kind,
            "severity": severity,
            "trace": 8,
            "service": "auth",
            "hop_ids": [9, 12],
            "message": f"{kind} number {i}",
            "details": {},
            "at": W + 45 + i,  # interleaved in time: the table groups them by kind all the same
        }

    return make_analysis(
        findings=[finding("duplicate_validation", "warning", i) for i in range(warnings)]
        + [finding("expired_mid_flow", "error", i) for i in range(errors)]
        + [finding("slow_hop", "info", i) for i in range(infos)]
    )


def test_report_findings_table_lists_errors_up_to_a_cap_and_each_other_kind_up_to_n():
    a = many_findings_analysis(errors=7, warnings=12, infos=3)
    text = hp.render_report(a, source="big.db", max_waterfalls=0, max_sessions=0, max_error_findings=5, max_findings_per_kind=4)
    p = parse(text)
    assert p.misnested == [] and p.open_tags == []  # every element closed, in order
    # Errors first, then warnings, then info; each kind in one block, in time order.
    assert [(r[0], r[1]) for r in p.rows] == [("error", "expired_mid_flow")] * 5 + [("warning", "duplicate_validation")] * 4 + [
        ("info", "slow_hop")
    ] * 3
    assert [r[-1] for r in p.rows[:5]] == [f"expired_mid_flow number {i}" for i in range(5)]
    assert [r[-1] for r in p.rows[5:9]] == [f"duplicate_validation number {i}" for i in range(4)]
    # One "more" line per kind cut short, saying how many and where the full list is.
    assert [r[0] for r in p.more] == [
        "… and 2 more expired_mid_flow findings (error) not listed; hoptrace analyze big.db --format json lists all.",
        "… and 8 more duplicate_validation findings (warning) not listed; hoptrace analyze big.db --format json lists all.",
    ]
    assert "Findings (22)" in text and "Listing 12 of 22 findings" in text
    # The summary still counts every finding.
    assert "7 error, 12 warning, 3 info" in text
    assert "duplicate_validation × 12" in text and "expired_mid_flow × 7" in text


def test_report_findings_table_default_caps():
    from hoptrace.plot._report import MAX_FINDINGS_PER_KIND

    a = many_findings_analysis(errors=3, warnings=MAX_FINDINGS_PER_KIND + 1, infos=0)
    p = parse(hp.render_report(a, max_waterfalls=0, max_sessions=0))
    assert len(p.rows) == 3 + MAX_FINDINGS_PER_KIND
    assert len(p.more) == 1 and p.more[0][0].startswith("… and 1 more duplicate_validation finding (warning)")


def test_report_caps_waterfalls_and_handles_one_hop(tmp_path):
    a = make_analysis()
    p = parse(hp.render_report(a, max_waterfalls=1, max_sessions=0))
    assert [img["data-chart"] for img in p.images] == ["waterfall", "latency", "services"]
    one = one_hop_analysis()
    one.notes = ["3 hops were linked to their caller by a guess <b>"]  # the analyzer's notes on the data
    text = hp.render_report(one)
    assert "<li>3 hops were linked to their caller by a guess &lt;b&gt;</li>" in text
    # No error finding: the worst request is still drawn.
    assert [img["data-chart"] for img in parse(text).images] == ["waterfall", "latency", "services"]
    assert "No request has an error or warning finding. The worst request:" in text
    with pytest.raises(hp.PlotError, match=r"\.html or \.htm"):
        hp.write_report(a, tmp_path / "report.pdf")
    with pytest.raises(AnalysisError, match="no hops"):
        hp.render_report(empty_analysis())


# ---------------------------------------------------------------- CLI


@pytest.fixture
def fake_analyze(monkeypatch):
    """Point `hoptrace.analyzer.analyze` and `analysis_for` at a hand-built analysis."""
    import hoptrace.analyzer

    def use(analysis_or_exc):
        def analyze(path, config=None, trace=None, since=None, until=None):
            if isinstance(analysis_or_exc, Exception):
                raise analysis_or_exc
            return analysis_or_exc

        for name in ("analyze", "analysis_for"):  # plot and report read a saved analysis through analysis_for
            monkeypatch.setattr(hoptrace.analyzer, name, analyze, raising=False)

    return use


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "traces.db"
    path.write_bytes(b"")  # the fake analyzer never reads it
    return path


def run(cmd, *args):
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    # Bad input never shows a traceback: either success or a clean SystemExit.
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


def test_cli_plot_trace_png_and_svg(fake_analyze, db, tmp_path):
    fake_analyze(make_analysis())
    r = run(_cli.plot, db, "--trace", "8", "-o", tmp_path / "w.png")
    assert r.exit_code == 0, r.output
    assert "waterfall of request 8, 5 hops" in r.stdout
    assert (tmp_path / "w.png").read_bytes().startswith(b"\x89PNG")
    r = run(_cli.plot, db, "--trace", "8", "-o", tmp_path / "w.svg")
    assert r.exit_code == 0 and b"<svg" in (tmp_path / "w.svg").read_bytes()[:2000]
    for flag, name in (("--latency", "l.png"), ("--services", "g.svg")):
        r = run(_cli.plot, db, flag, "-o", tmp_path / name)
        assert r.exit_code == 0, r.output
        assert (tmp_path / name).stat().st_size > 1000
    r = run(_cli.plot, db, "--session", "alice", "-o", tmp_path / "s.png")
    assert r.exit_code == 0 and "workflow of alice" in r.stdout


def test_cli_plot_without_trace_picks_the_worst_and_says_so(fake_analyze, db, tmp_path):
    fake_analyze(make_analysis())
    r = run(_cli.plot, db, "-o", tmp_path / "w.png")
    assert r.exit_code == 0, r.output
    assert "no --trace given: drawing request 8, the worst request: error finding (duplicate_validation, expired_mid_flow)" in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--trace", "999"], "no request '999'"),
        (["--session", "bob"], "no subject, token or session 'bob'"),
        (["--latency", "--services"], "--latency and --services cannot be combined"),
    ],
)
def test_cli_plot_bad_input_exits_2(fake_analyze, db, tmp_path, args, message):
    fake_analyze(make_analysis())
    r = run(_cli.plot, db, *args, "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and message in r.output
    assert not (tmp_path / "x.png").exists()


def test_cli_output_names_and_files(fake_analyze, db, tmp_path):
    fake_analyze(make_analysis())
    for name in ("x.pdf", "x"):
        r = run(_cli.plot, db, "-o", tmp_path / name)
        assert r.exit_code == 2 and ".png or .svg" in r.output
    r = run(_cli.plot, db, "-o", tmp_path / "missing" / "x.png")
    assert r.exit_code == 2 and "does not exist" in r.output
    r = run(_cli.report, db, "-o", tmp_path / "r.png")
    assert r.exit_code == 2 and ".html or .htm" in r.output
    r = run(_cli.plot, tmp_path / "nope.db", "-o", tmp_path / "x.png")
    assert r.exit_code == 2 and "nope.db: no such file" in r.output


def test_cli_empty_and_unreadable_db_exit_2(fake_analyze, db, tmp_path):
    fake_analyze(empty_analysis())
    for cmd, out in ((_cli.plot, "x.png"), (_cli.report, "r.html")):
        r = run(cmd, db, "-o", tmp_path / out)
        assert r.exit_code == 2 and "no hops recorded" in r.output
    fake_analyze(TraceFileError(f"{db}: not a hoptrace trace database (missing tables: hops)"))
    r = run(_cli.report, db, "-o", tmp_path / "r.html")
    assert r.exit_code == 2 and "not a hoptrace trace database" in r.output


def test_cli_one_hop(fake_analyze, db, tmp_path):
    fake_analyze(one_hop_analysis())
    for args in ([], ["--latency"], ["--services"], ["--session", "0"]):
        r = run(_cli.plot, db, *args, "-o", tmp_path / "x.png")
        assert r.exit_code == 0, (args, r.output)
    r = run(_cli.report, db, "-o", tmp_path / "r.html")
    assert r.exit_code == 0 and "0 findings" in r.stdout


def test_cli_report(fake_analyze, db, tmp_path):
    fake_analyze(make_analysis())
    r = run(_cli.report, db, "-o", tmp_path / "r.html", "--max-waterfalls", "1", "--max-sessions", "0")
    assert r.exit_code == 0, r.output
    assert "5 findings" in r.stdout
    p = parse((tmp_path / "r.html").read_text(encoding="utf-8"))
    assert [i["data-chart"] for i in p.images] == ["waterfall", "latency", "services"]


def test_cli_help_has_examples_and_import_is_cheap():
    for cmd in (_cli.plot, _cli.report):
        r = CliRunner().invoke(cmd, ["--help"])
        assert r.exit_code == 0 and "Example:" in r.output
    import subprocess
    import sys

    code = "import sys, hoptrace.plot._cli; print(any(m.startswith(('matplotlib', 'pandas')) for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_bar_notes_go_where_there_is_room():
    from hoptrace.plot._common import bar_note, new_figure

    fig = new_figure(8, 3)
    ax = fig.add_subplot()
    long = "401 · 2.4 ms  ⚠ validation, DUPLICATE of hop 110 (1022 ms later), token expired 0.63 s earlier"
    assert bar_note(ax, 0, 0, 5, long, (0, 100), 6.0).get_horizontalalignment() == "left"
    # Too long for either side of a bar at 90-95: on the roomier side, moved in so it starts inside the axes.
    right = bar_note(ax, 1, 90, 95, long, (0, 100), 6.0)
    assert right.get_horizontalalignment() == "left" and 0 < right.get_position()[0] < 90
    assert right.get_bbox_patch() is not None  # on a white ground where it may cover a bar
    # A bar as wide as the axis: its text on the bar, from the left edge, not cut off on either side.
    full = bar_note(ax, 3, 0, 100, "401 · 1028 ms", (0, 100), 6.0)
    assert full.get_horizontalalignment() == "left" and 0 < full.get_position()[0] < 5
    assert bar_note(ax, 2, 80, 85, "200 · 5 ms", (0, 100), 6.0).get_horizontalalignment() == "left"


def test_session_view_says_when_the_token_expired_during_the_request():
    fig = hp.session_view(make_analysis(), "alice")
    assert any("its token expired 0.90 s into the request" in t for t in all_texts(fig))
    assert len([r for r in bars(main_axes(fig), "requests") if r.get_hatch()]) == 2


def test_service_graph_puts_callees_right_of_all_their_callers():
    a = make_analysis()
    ax = hp.service_graph(a).axes[0]
    x = {t.get_gid()[5:]: t.get_position()[0] for t in ax.texts if str(t.get_gid()).startswith("node:")}
    assert x["client"] < x["gateway"] < x["payment"] < x["auth"]  # auth is called by payment too
    # A cycle still lays out, every edge drawn once.
    e = pd.DataFrame({"caller": ["client", "a", "b", "a"], "callee": ["a", "b", "a", "a"], "calls": [3, 2, 1, 1],
                      "errors": [0, 1, 0, 0], "p95_ms": [1.0, 2.0, 3.0, 4.0]})  # fmt: skip
    fig = hp.service_graph_figure(e)
    gids = sorted(p.get_gid() for p in fig.axes[0].patches if str(p.get_gid()).startswith("edge:"))
    assert gids == ["edge:a->a", "edge:a->b", "edge:b->a", "edge:client->a"]  # the self-call drawn as a loop
    hp.figure_bytes(fig)
