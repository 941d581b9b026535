"""hoptrace.plot on the real analyzer: a trace DB written with plain sqlite3, analyzed, plotted, reported.

The DB is the seed's checkout as the recorder would store it: the gateway validates
alice's token at auth, payment works ~1 s, then validates it again after it expired,
and checkout answers 401. Skipped until ``hoptrace.analyzer.analyze`` exists.
"""

from __future__ import annotations

import html.parser
import sqlite3
from pathlib import Path

import pandas as pd
import pytest
from click.testing import CliRunner
from matplotlib.container import BarContainer

import hoptrace.analyzer
from hoptrace.db import HOP_COLUMNS, HOP_TOKEN_COLUMNS, SCHEMA, SCHEMA_VERSION, TOKEN_COLUMNS

pytestmark = pytest.mark.skipif(not hasattr(hoptrace.analyzer, "analyze"), reason="hoptrace.analyzer.analyze not there yet")

T0 = 1_705_322_535.0
EXP = T0 + 45.5  # alice's token expires 0.9 s into the checkout
CHECKOUT = T0 + 44.6


def write_db(path: Path, hops: list[dict], tokens: list[dict], links: list[tuple]) -> Path:
    conn = sqlite3.connect(path)
    conn.executescript(SCHEMA)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
    end = max((h["ended_at"] for h in hops), default=T0)
    conn.execute(
        "INSERT INTO captures (id, started_at, ended_at, routes, entry, hoptrace_version, mitmproxy_version,"
        " hops_seen, hops_recorded) VALUES (1, ?, ?, '[]', 'gateway', '0.1.0', '11.0.2', ?, ?)",
        (T0, end, len(hops), len(hops)),
    )
    conn.executemany(
        f"INSERT INTO hops VALUES ({', '.join('?' * len(HOP_COLUMNS))})", ([h.get(c) for c in HOP_COLUMNS] for h in hops)
    )
    conn.executemany(
        f"INSERT INTO tokens VALUES ({', '.join('?' * len(TOKEN_COLUMNS))})", ([t.get(c) for c in TOKEN_COLUMNS] for t in tokens)
    )
    conn.executemany(f"INSERT INTO hop_tokens VALUES ({', '.join('?' * len(HOP_TOKEN_COLUMNS))})", links)
    conn.commit()
    conn.close()
    return path


def checkout_db(path: Path, propagate: bool = True) -> Path:
    """Three requests by alice; the last is the checkout that fails.

    With ``propagate`` every hop carries a traceparent's ids; without, the analyzer
    has only the timing and the entry route to rebuild the requests."""
    fp = "a1" * 16
    hops, links = [], []

    def hop(service, endpoint, start, end, *, trace, span, parent=None, status=200, role="presented"):
        hop_id = len(hops) + 1
        method, _, p = endpoint.partition(" ")
        row = dict.fromkeys(HOP_COLUMNS)
        row.update(
            id=hop_id,
            capture_id=1,
            flow_id=f"flow-{hop_id}",
            service=service,
            method=method,
            path=p,
            scheme="http",
            host="127.0.0.1",
            port=3000,
            status=status,
            failed=0,
            started_at=start,
            request_end_at=start + 0.0005,
            response_start_at=end - 0.0005,
            ended_at=end,
            duration_ms=(end - start) * 1000,
            trace_id=trace if propagate else None,
            span_id=span if propagate else None,
            parent_span_id=parent if propagate else None,
            trace_source="traceparent" if propagate else None,
        )
        hops.append(row)
        links.append((hop_id, fp, role, "header:authorization"))
        return hop_id

    t = "0af7651916cd43dd8448eb211c80319c"
    hop("gateway", "GET /products", T0 + 10, T0 + 10.03, trace=t, span="s1")
    hop("products", "GET /products", T0 + 10.005, T0 + 10.025, trace=t, span="s2", parent="s1")
    t = "1bf7651916cd43dd8448eb211c80319c"
    hop("gateway", "GET /cart/abc123", T0 + 25, T0 + 25.02, trace=t, span="s3")
    hop("cart", "GET /cart/abc123", T0 + 25.002, T0 + 25.018, trace=t, span="s4", parent="s3")
    t = "4bf92f3577b34da6a3ce929d0e0e4736"
    c = CHECKOUT
    hop("gateway", "POST /checkout", c, c + 1.4, trace=t, span="c1", status=401)
    hop("auth", "GET /verify", c + 0.005, c + 0.025, trace=t, span="c2", parent="c1", role="validated")
    hop("cart", "GET /cart/abc123", c + 0.03, c + 0.08, trace=t, span="c3", parent="c1")
    hop("payment", "POST /payments", c + 0.1, c + 1.38, trace=t, span="c4", parent="c1", status=401)
    hop("auth", "GET /verify", c + 1.0, c + 1.02, trace=t, span="c5", parent="c4", status=401, role="validated")
    # hop ids follow end times, as the recorder assigns them
    order = sorted(range(len(hops)), key=lambda i: hops[i]["ended_at"])
    renumber = {hops[i]["id"]: n + 1 for n, i in enumerate(order)}
    for h in hops:
        h["id"] = renumber[h["id"]]
    links = [(renumber[a], *rest) for a, *rest in links]
    token = {
        "fingerprint": fp,
        "capture_id": 1,
        "kind": "jwt",
        "length": 180,
        "alg": "HS256",
        "sub": "alice",
        "iss": "auth",
        "iat": EXP - 3600,
        "exp": EXP,
        "first_seen_at": T0 + 10,
    }
    return write_db(path, hops, [token], links)


@pytest.fixture(params=[True, False], ids=["traceparent", "timing-only"])
def db(tmp_path, request):
    return checkout_db(tmp_path / "traces.db", propagate=request.param)


def test_real_analysis_waterfall_shows_the_expiry_between_the_two_validations(db):
    from hoptrace import plot as hp
    from hoptrace.analyzer import analyze

    a = analyze(db)
    root = int(a.hops.loc[(a.hops["path"] == "/checkout")].index[0])
    checkout = a.hops[a.hops["trace"] == a.hops.at[root, "trace"]]
    assert len(checkout) == 5
    fig = hp.waterfall(a, str(root))
    ax = next(ax for ax in fig.axes if ax.containers)
    rects = next(c for c in ax.containers if isinstance(c, BarContainer) and c.get_label() == "hops").patches
    assert len(rects) == 5
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels[0] == "gateway POST /checkout"
    assert sum("auth GET /verify" in lab for lab in labels) == 2
    exp_lines = [line for line in ax.get_lines() if line.get_gid() == "token-exp"]
    assert len(exp_lines) == 1
    assert exp_lines[0].get_xdata()[0] == pytest.approx((EXP - CHECKOUT) * 1000, abs=0.01)
    hp.figure_bytes(fig)

    # The worst request is the checkout, and every chart draws from the real frames.
    assert hp.pick_worst_trace(a)[0] == int(a.hops.at[root, "trace"])
    session = hp.session_view(a, "alice")
    notes = [t.get_text() for ax in session.axes for t in ax.texts]
    assert any("its token expired 0.90 s into the request" in t for t in notes), notes
    for fig in (session, hp.latency(a), hp.service_graph(a)):  # rendered in the report test
        assert fig.axes


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.finding_rows = [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "svg" and "data-chart" in a:  # each chart an inline SVG
            self.images.append(a)
        if tag == "tr" and "finding" in (a.get("class") or ""):
            self.finding_rows += 1


def test_real_analysis_cli_plot_and_report(tmp_path):
    db = checkout_db(tmp_path / "traces.db")
    from hoptrace.analyzer import analyze
    from hoptrace.plot._cli import plot, report

    runner = CliRunner()
    r = runner.invoke(plot, [str(db), "-o", str(tmp_path / "w.png")])
    assert r.exit_code == 0, r.output
    assert "no --trace given" in r.stderr and (tmp_path / "w.png").stat().st_size > 1000
    r = runner.invoke(report, [str(db), "-o", str(tmp_path / "r.html")])
    assert r.exit_code == 0, r.output
    p = _Images()
    p.feed((tmp_path / "r.html").read_text(encoding="utf-8"))
    a = analyze(db)
    errors = {int(t) for t, s in zip(a.findings["trace"], a.findings["severity"]) if s == "error" and pd.notna(t)}
    assert {int(i["data-trace"]) for i in p.images if i["data-chart"] == "waterfall"} == errors
    assert errors, "the checkout's expired token should be an error finding"
    assert {"latency", "services"} <= {i["data-chart"] for i in p.images}
    assert p.finding_rows == len(a.findings)
    assert all(i.get("aria-label") for i in p.images)


@pytest.mark.parametrize("case", ["empty", "unknown trace", "not sqlite", "missing"])
def test_real_analysis_bad_input_exits_2(tmp_path, case):
    db = checkout_db(tmp_path / "traces.db")
    from hoptrace.plot._cli import plot, report

    args = [str(db), "--trace", "999999"]
    if case == "empty":
        args = [str(write_db(tmp_path / "empty.db", [], [], []))]
    elif case == "not sqlite":
        (tmp_path / "junk.db").write_text("hello")
        args = [str(tmp_path / "junk.db")]
    elif case == "missing":
        args = [str(tmp_path / "nope.db")]
    r = CliRunner().invoke(plot, [*args, "-o", str(tmp_path / "x.png")])
    assert r.exit_code == 2, r.output
    assert r.exception is None or isinstance(r.exception, SystemExit)
    assert "Error:" in r.output and "Traceback" not in r.output
    if case != "unknown trace":
        r = CliRunner().invoke(report, [*args, "-o", str(tmp_path / "r.html")])
        assert r.exit_code == 2, r.output
