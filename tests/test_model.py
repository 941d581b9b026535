"""The presentation model and the chart layouts, as data; and the former disagreements, settled.

Every renderer (text, Markdown, JSON, `hoptrace plot`, the HTML report) now reads the same
model; one test per former disagreement proves they agree on real traces.
"""

from __future__ import annotations

import ast
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hoptrace.plot as hp
from hoptrace._errors import AnalysisError
from hoptrace._format import clean, hop_ended, ms, seconds, utc
from hoptrace.analyzer import analyze, render_json, render_markdown, render_text
from hoptrace.analyzer._cli import analyze as analyze_cmd
from hoptrace.analyzer._model import TIERS, model, tree_prefixes
from hoptrace.plot import _cli

from .analyzer_fixtures import T0, Builder
from .test_plot import FP_A, checkout_hops, make_analysis, scenario_builder

ROOT = Path(__file__).resolve().parent.parent
FLAKY = ROOT / "sample_traces" / "flaky-retries.db"
PROPAGATED = ROOT / "sample_traces" / "propagated.db"


def run(cmd, *args):
    result = CliRunner().invoke(cmd, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result


# ---------------------------------------------------------------- the model


def test_worst_first_order_errors_then_failures_then_warnings_then_the_rest():
    findings = [
        {"kind": "near_expiry", "severity": "warning", "trace": 1, "service": "gateway", "hop_ids": [1], "message": "w",
         "details": {}, "at": T0},
        {"kind": "token_reuse", "severity": "warning", "trace": 3, "service": "gateway", "hop_ids": [3], "message": "w",
         "details": {}, "at": T0},
        {"kind": "expired_in_session", "severity": "error", "trace": 17, "service": "gateway", "hop_ids": [17],
         "message": "e", "details": {}, "at": T0},
    ]  # fmt: skip
    m = model(make_analysis(findings=findings))
    # 17: an error finding; then the failed requests (8: 401 in 1.4 s, 21: broken in 0.5 s, 13: 401 in 15 ms);
    # then the warnings (3: 60 ms, 1: 30 ms); then the rest, slowest first.
    assert m.worst_order[:6] == [17, 8, 21, 13, 3, 1]
    assert [TIERS[m.tiers[t]] for t in (17, 8, 3, 6)] == ["error finding", "failed", "warning finding", "no finding"]
    assert m.request(21).ended == "200, then broken (truncated)" and m.request(21).failed


def test_hop_rows_say_how_each_hop_ended_in_one_phrasing():
    m = model(make_analysis())
    rows = m.hop_rows(8)
    assert rows["ended"].tolist() == ["401", "200", "200", "401", "401"]
    assert rows["outcome"].tolist() == ["4xx", "2xx", "2xx", "4xx", "4xx"]
    assert tree_prefixes(rows) == ["", "├─ ", "├─ ", "└─ ", "   └─ "]
    assert [hop_ended(None, 1, "timeout"), hop_ended(503), hop_ended(200, True, "reset"), hop_ended(pd.NA)] == [
        "no response (timeout)", "503", "200, then broken (reset)", "no response"]  # fmt: skip


def test_findings_grouped_by_kind_in_the_one_severity_order():
    groups = model(make_analysis()).finding_groups
    assert [(g.severity, g.kind, len(g)) for g in groups] == [
        ("error", "expired_mid_flow", 1), ("error", "expired_in_session", 1),
        ("warning", "duplicate_validation", 2), ("warning", "upstream_error", 1),
    ]  # fmt: skip


def test_graph_counts_4xx_where_they_failed():
    nodes, edges = model(make_analysis()).graph
    e = edges.set_index(["caller", "callee"])
    assert e.loc[("payment", "auth"), "client_errors"] == 1 and e.loc[("payment", "auth"), "worst"] == "4xx"
    assert e.loc[("client", "gateway"), "worst"] == "error"  # the broken transfer outranks the 401s
    assert pd.isna(e.loc[("gateway", "cart"), "worst"])
    assert nodes.set_index("service").loc["payment", "worst"] == "4xx"


def test_formatting_is_one_set_of_rules():
    assert [ms(2.44), ms(1400), ms(12_500), ms(None), ms(float("nan"), "-")] == ["2.4 ms", "1400 ms", "12.5 s", "?", "-"]
    assert [seconds(0.1), seconds(-2.5), seconds(45), seconds(3600), seconds(86_400)] == [
        "0.10 s", "-2.50 s", "45 s", "60.0 min", "24.0 h"]  # fmt: skip
    assert utc(0) == "1970-01-01 00:00:00 UTC" and utc(0.25, millis=True) == "1970-01-01 00:00:00.250 UTC"
    assert utc(1e300) == "?" and utc("x") == "?"
    assert clean("a\x1b[31m\u2028b", 6) == "a?[31…" and clean(None) == ""


# ---------------------------------------------------------------- layouts, as data


def test_waterfall_layout_rows_positions_labels():
    a = make_analysis()
    lay = hp.waterfall_layout(a.trace_hops(8), a.tokens, a.findings)
    assert lay.hop_ids == [8, 9, 10, 11, 12]
    assert lay.labels[3:] == ["└─ payment POST /payments", "   └─ auth GET /verify"]
    assert lay.starts.tolist() == pytest.approx([0, 5, 30, 100, 1000], abs=1e-3)
    assert (lay.starts + lay.widths)[0] == pytest.approx(1400, abs=1e-3)
    assert lay.exp_lines == [(pytest.approx(900, abs=1e-3), "token a1b2c3d4 (sub alice)")]
    assert lay.duplicates == {12} and lay.validation.tolist() == [False, True, False, False, True]
    assert lay.texts[4].startswith("401 · 20.0 ms  ⚠ validation, DUPLICATE of hop 9") and lay.alarms[4]
    assert lay.xlim[0] < 0 < 1400 < lay.xlim[1] < 2100 and lay.clipped == []
    assert lay.notes[0][0].startswith("ERROR  expired_mid_flow")


YEAR = 365 * 86_400


def _far_times(exp=T0 - 10 * YEAR, iat=T0 + 20 * YEAR, ended=T0 + 5 * 86_400) -> Builder:
    """One request whose token expired years before it, another's issued decades after, one hop ending days later."""
    rows = checkout_hops()[:7]
    b = scenario_builder(rows)
    b.tokens[0]["exp"] = exp
    b.tokens[1]["iat"] = iat
    b.hops[1]["ended_at"] = ended
    bad = b.token("bob", iat - T0, iat=iat - T0)
    b.hop("gateway", "GET /late", 30.0, 30.1, presented=bad, trace_id="late", span_id="s-late")
    return b


def test_the_loader_reads_impossible_times_as_unknown_and_says_so(tmp_path):
    """exp 1e-7, iat 2e10, a hop ending in 2e10: no clock had them; the charts never see them."""
    a = analyze(_far_times(exp=1e-7, iat=2e10, ended=2e10).write(tmp_path / "absurd.db"))
    assert any("token times" in n and "read as unknown" in n for n in a.notes), a.notes
    assert any("without a valid start or end time" in n for n in a.notes), a.notes
    lay = hp.waterfall_layout(a.trace_hops(1), a.tokens, a.findings)
    assert lay.exp_lines == [] and np.isfinite(lay.xlim).all()
    hp.figure_bytes(hp.draw_waterfall(lay))


def test_layouts_clamp_far_times_and_say_so(tmp_path):
    a = analyze(_far_times().write(tmp_path / "far.db"))
    lay = hp.waterfall_layout(a.trace_hops(1), a.tokens, a.findings)
    assert any("had expired" in text and "h before" in text for text, _ in lay.notes)  # years before: a note, not a line
    assert lay.exp_lines == [(None, "token a1b2c3d4 (sub alice)")]
    hp.figure_bytes(hp.draw_waterfall(lay))
    # Hop 2 no longer fits in its caller (an orphan): its own request, cut at a day.
    lay = hp.waterfall_layout(a.trace_hops(int(a.hops.at[2, "trace"])), a.tokens, a.findings)
    assert lay.xlim[1] < 2 * 86_400_000 and (lay.starts + lay.widths).max() <= 86_400_000
    assert lay.clipped == ["1 hop(s) claim times over a day from the request's start (hop 2): drawn cut at 24 h"]
    assert lay.clipped[0] in [text for text, _ in lay.notes]
    for key in ("alice", "bob"):
        s = hp.session_layout(a, hp.select_session(a, key))
        lo, hi = s.xlim
        assert np.isfinite([lo, hi]).all() and hi - lo < 30 * 86_400
        xs = [*s.starts, *(s.starts + s.widths), *(t.left for t in s.tokens), *(t.right for t in s.tokens),
              *(x for x, *_ in s.issued), *(x for x, *_ in s.refreshes)]  # fmt: skip
        assert all(lo <= x <= hi for x in xs), (key, xs, s.xlim)
        hp.figure_bytes(hp.draw_session(s))  # the rasteriser gets only drawable coordinates
    hp.figure_bytes(hp.draw_waterfall(lay))


def test_graph_and_latency_layouts_as_data():
    a = make_analysis()
    nodes, edges = model(a).graph
    g = hp.graph_layout(edges, nodes)
    x = {n.name: n.x for n in g.nodes}
    assert x["client"] < x["gateway"] < x["payment"] < x["auth"]
    assert {(e.caller, e.callee) for e in g.edges} == set(zip(a.edges["caller"], a.edges["callee"]))
    assert g.worst == {"error", "4xx"}
    lat = hp.latency_layout(a.hops, a.services)
    assert lat.stats["service"].iloc[0] == "payment" and len(lat.dots) == len(a.services)
    assert lat.shares.sum(axis=1) == pytest.approx([100.0] * len(a.services))


# ---------------------------------------------------------------- the former disagreements


@pytest.mark.parametrize("spelling", [str.upper, str.lower])
def test_a_trace_id_in_any_case_names_the_same_request_everywhere(spelling, tmp_path):
    a = analyze(PROPAGATED)
    trace_id = str(a.hops["trace_id"].dropna().iloc[-1])
    expected = int(a.hops.loc[a.hops["trace_id"] == trace_id, "trace"].iloc[0])
    key = spelling(trace_id)
    text = run(analyze_cmd, PROPAGATED, "--trace", key)
    assert text.exit_code == 0, text.output
    assert f"request {expected}:" in text.stdout
    doc = json.loads(run(analyze_cmd, PROPAGATED, "--trace", key, "--format", "json").stdout)
    assert [t["trace"] for t in doc["traces"]] == [expected]
    plotted = run(_cli.plot, PROPAGATED, "--trace", key, "-o", tmp_path / "w.svg")
    assert plotted.exit_code == 0 and f"waterfall of request {expected}," in plotted.stdout
    assert hp.resolve_trace(a, key) == expected


def test_text_json_plot_and_report_agree_on_the_worst_request(tmp_path):
    a = analyze(FLAKY)
    worst = model(a).worst_order[0]
    assert worst == 62  # the text report's choice before; `plot` drew request 10, the earliest warning
    assert render_text(a).split("Worst requests")[1].splitlines()[1].startswith(f"  request {worst}:")
    assert f"### Request {worst}:" in render_markdown(a)
    assert json.loads(render_json(a))["worst"][0] == worst
    plotted = run(_cli.plot, FLAKY, "-o", tmp_path / "w.png")
    assert f"drawing request {worst}," in plotted.stderr
    report = hp.render_report(a, max_sessions=0)
    assert report.index(f'id="trace-{worst}"') < report.index('id="latency"')
    # Only warnings: the clearest example of each warning kind, the worst request first.
    warning_kinds = {g.kind for g in model(a).finding_groups if g.severity == "warning"}
    assert 1 <= report.count('data-chart="waterfall"') <= len(warning_kinds)
    assert report.index('data-chart="waterfall"') == report.index(f'data-chart="waterfall" data-trace="{worst}"')


# ---------------------------------------------------------------- size of functions

MAX_LINES = 80


def test_no_function_over_80_lines_outside_tests():
    long = []
    for folder in ("analyzer", "hoptrace", "addons", "proxy"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            name = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_LINES:
                        long.append(f"{name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


# ---------------------------------------------------------------- hostile values, as a class

CLAIM = st.one_of(st.none(), st.floats(allow_nan=True, allow_infinity=True), st.floats(-1e12, 1e12))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(exp_a=CLAIM, iat_a=CLAIM, exp_b=CLAIM, iat_b=CLAIM)
def test_any_token_times_stay_on_the_axis(exp_a, iat_a, exp_b, iat_b):
    """Whatever a token claims (0, 1e-7, 2e10, inf, NaN, none), every x a layout places lies on its axis."""
    a = make_analysis()
    claims = {FP_A: (iat_a, exp_a), "b2c3d4e5f6071829": (iat_b, exp_b)}
    for fp, (iat, exp) in claims.items():
        a.tokens.loc[fp, ["iat", "exp"]] = [iat, exp]
        a.hops.loc[a.hops["token_fp"] == fp, "token_exp"] = exp
    a.hops["remaining_s"] = a.hops["token_exp"] - a.hops["started_at"]
    for trace in (8, 17):
        w = hp.waterfall_layout(a.trace_hops(trace), a.tokens, a.findings)
        assert np.isfinite(w.xlim).all() and w.xlim[1] - w.xlim[0] < 1e9
        assert all(x is None or w.xlim[0] <= x <= w.xlim[1] for x, _ in w.exp_lines)
    s = hp.session_layout(a, hp.select_session(a, "alice"))
    lo, hi = s.xlim
    xs = [*s.starts, *(s.starts + s.widths), *(t.left for t in s.tokens), *(t.right for t in s.tokens),
          *(t.exp_x for t in s.tokens if t.exp_x is not None), *(x for x, *_ in s.issued), *(x for x, *_ in s.refreshes)]  # fmt: skip
    assert np.isfinite([lo, hi]).all() and all(lo <= x <= hi for x in xs)


@settings(max_examples=200, deadline=None)
@given(key=st.one_of(st.text(max_size=40), st.integers(-(10**30), 10**30)))
def test_any_request_key_resolves_or_says_why(key):
    """A --trace value is a request, or one AnalysisError line: never another exception."""
    a = _checkout()
    try:
        trace = hp.resolve_trace(a, key)
    except AnalysisError as exc:
        assert "\n" not in str(exc) and "no request" in str(exc)
    else:
        assert trace in set(a.hops.index[a.hops["depth"] == 0])


@functools.cache
def _checkout():
    return make_analysis()
