"""The UI's data adapter on the demo's trace: the request list's filters, sort and pages, a request's
waterfall data, a hop's detail, compare, the live merge; and its pure layout helpers as data."""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from hoptrace.analyzer import analyze, model, render_json, render_text
from hoptrace.analyzer._model import TIERS, group_findings
from hoptrace.ui import _data
from hoptrace.ui._data import (
    Data,
    Facets,
    NotFound,
    NotReady,
    _live_findings,
    align,
    copy_tail,
    curl_line,
    graph_layout,
    tail_pass,
    timings,
)
from hoptrace.ui._preview import Preview
from hoptrace.ui._query import BadQuery, RequestQuery

SAMPLE = Path(__file__).resolve().parent.parent / "sample_traces" / "checkout-expiry.db"


@pytest.fixture(scope="module")
def data():
    d = Data([SAMPLE])
    assert d.refresh() and not d.refresh()  # the second call finds nothing new
    return d


def page(data, **params) -> list[dict]:
    return data.request_page(RequestQuery(limit=500, **params))["items"]


def sql(query: str, *args):
    conn = sqlite3.connect(f"file:{SAMPLE}?mode=ro", uri=True)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def failing(data) -> dict:
    (item,) = page(data, severity="error")
    return item


def test_the_list_has_one_row_per_request_and_filters_narrow_it(data):
    everything = page(data)
    assert len(everything) == sql("SELECT count(*) FROM hops WHERE service = 'gateway'")[0][0]
    bad = failing(data)
    assert (bad["endpoint"], bad["status"], bad["status_class"], bad["severity"]) == ("POST /checkout", 401, "4xx", "error")
    assert "expired_mid_flow" in bad["kinds"]
    assert {r["trace"] for r in page(data, status="4xx")} == {r["trace"] for r in everything if 400 <= r["status"] < 500}
    mine = page(data, subject=bad["subject"])
    assert len(mine) == 6 and bad["trace"] in {r["trace"] for r in mine}  # the user's whole workflow
    reused = page(data, kind="token_reuse")
    assert reused and all("token_reuse" in r["kinds"] for r in reused)
    assert all("checkout" in r["endpoint"].lower() for r in page(data, text="Checkout"))
    payment = page(data, service="payment")
    assert payment and all(any(h["service"] == "payment" for h in data.request(0, r["trace"])["hops"]) for r in payment)
    middle = sorted(r["started_at"] for r in everything)[len(everything) // 2]
    assert {r["trace"] for r in page(data, since=middle)} == {r["trace"] for r in everything if r["started_at"] >= middle}


def test_sorting_and_pages_cover_every_request_once(data):
    durations = [r["duration_ms"] for r in page(data, sort="duration", descending=False)]
    assert durations == sorted(durations)
    worst = page(data, sort="severity", descending=False)
    assert worst[0]["severity"] == "error"
    seen: list[int] = []
    total = data.request_page(RequestQuery(limit=5))["total"]
    for offset in range(0, total, 5):
        seen += [r["trace"] for r in data.request_page(RequestQuery(limit=5, offset=offset))["items"]]
    assert len(seen) == len(set(seen)) == total


def test_the_failing_checkouts_waterfall_data(data):
    bad = failing(data)
    req = data.request(0, bad["trace"])
    ids = [h["id"] for h in req["hops"]]
    assert ids[0] == bad["trace"] and all(h["parent"] in ids[:i] for i, h in enumerate(req["hops"]) if i)  # depth first
    introspect = next(h for h in req["hops"] if h["path"] == "/introspect")
    assert introspect["status"] == 401 and introspect["remaining_s"] < 0 and introspect["on_critical_path"]
    (exp,) = req["expiries"]
    assert exp["at"] == introspect["token_exp"] and 0 < exp["ms"] < bad["duration_ms"]
    expired = next(n for n, f in enumerate(req["findings"]) if f["kind"] == "expired_mid_flow")
    assert expired in introspect["findings"] and introspect["id"] in req["findings"][expired]["hop_ids"]
    peer = data.request(0, req["peer"])
    assert (peer["endpoint"], peer["status"]) == ("POST /checkout", 200)


def test_a_hops_detail_has_claims_life_timings_and_only_redacted_secrets(data):
    bad = failing(data)
    introspect = next(h for h in data.request(0, bad["trace"])["hops"] if h["path"] == "/introspect")
    hop = data.hop(0, introspect["id"])
    (token,) = hop["tokens"]
    assert token["claims"]["sub"] == bad["subject"] and token["header"]["alg"] == "HS256"
    assert token["remaining_s"] == pytest.approx(token["exp"] - hop["started_at"]) and token["remaining_s"] < 0
    parts = [v for v in hop["timings"].values() if v is not None]
    assert len(parts) >= 3 and all(v >= 0 for v in parts) and sum(parts) <= hop["duration_ms"] + 0.01
    assert any(v.startswith("[redacted:") for _, v in hop["request_headers"])
    argv = shlex.split(hop["curl"])
    assert argv[:3] == ["curl", "-X", "POST"] and argv[3].endswith("/introspect")
    assert any(a.startswith("X-Internal-Key: [redacted:") for a in argv)


def test_unknown_requests_hops_and_sessions_are_not_found(data):
    for call in (
        lambda: data.request(0, 10**9),
        lambda: data.hop(0, 10**9),
        lambda: data.session(0, 10**6),
        lambda: data.request(3, 1),
    ):
        with pytest.raises(NotFound):
            call()


def test_compare_pairs_hops_and_names_what_differs():
    def hop(service, endpoint, status=200, ms=10.0, remaining=5.0):
        return {"service": service, "method": endpoint.split()[0], "endpoint": endpoint, "status": status,
                "error_kind": None, "link": "token", "duration_ms": ms, "remaining_s": remaining}  # fmt: skip

    a = [hop("gateway", "POST /checkout", 401), hop("auth", "GET /verify"), hop("auth", "POST /introspect", 401, 3, -0.6)]
    b = [hop("gateway", "POST /checkout"), hop("auth", "GET /verify", ms=40), hop("auth", "POST /introspect", 200, 3, 0.9),
         hop("auth", "GET /verify")]  # fmt: skip
    rows = {r["key"]: r["differs"] for r in align(a, b)}
    assert rows == {
        "gateway POST /checkout": ["status"],
        "auth GET /verify": ["duration"],
        "auth POST /introspect": ["status", "expired"],
        "auth GET /verify #2": ["missing"],
    }


def test_graph_layout_puts_callees_right_of_their_callers_and_survives_cycles():
    calls = {"calls": 1, "errors": 0, "p95_ms": 1.0}
    edges = {("client", "gateway"): calls, ("gateway", "auth"): calls, ("gateway", "payment"): calls, ("payment", "auth"): calls,
             ("a", "b"): calls, ("b", "a"): calls}  # fmt: skip
    nodes = {n["name"]: n for n in graph_layout(edges)["nodes"]}
    assert nodes["client"]["column"] < nodes["gateway"]["column"] < nodes["payment"]["column"] < nodes["auth"]["column"]
    assert {nodes["a"]["column"], nodes["b"]["column"]} == {0, 1}
    assert len({(n["column"], n["row"]) for n in nodes.values()}) == len(nodes)  # no two boxes on one spot


def test_timings_and_curl_from_a_row():
    row = {"started_at": 10.0, "request_end_at": 10.001, "connect_at": None, "connected_at": None,
           "response_start_at": 10.004, "ended_at": None, "method": "GET", "scheme": "http", "host": "127.0.0.1",
           "port": 3001, "path": "/a b", "query": "x=1&y='"}  # fmt: skip
    t = timings(row)
    assert t["connect"] is None and t["receive"] is None
    assert t["send"] == pytest.approx(1.0) and t["wait"] == pytest.approx(3.0)
    line = curl_line(row, [["Cookie", "session=[redacted:ab]"], ["Host", "x"]])
    assert shlex.split(line) == ["curl", "-X", "GET", "http://127.0.0.1:3001/a b?x=1&y='", "-H", "Cookie: session=[redacted:ab]"]


def _mid_capture(tmp_path: Path, cut: int) -> Path:
    """The sample as it was mid-capture: its hops after ``cut``, and their token sightings, not yet written."""
    db = tmp_path / "growing.db"
    shutil.copy(SAMPLE, db)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM hop_tokens WHERE hop_id > ?", (cut,))
        conn.execute("DELETE FROM hops WHERE id > ?", (cut,))
    return db


def _record(db: Path, low: int, high: int) -> None:
    """Write the sample's hops ``low < id <= high`` into ``db``, with their token sightings, as the proxy would."""
    with sqlite3.connect(db) as conn:
        conn.execute("ATTACH ? AS full", (f"file:{SAMPLE}?mode=ro",))
        conn.execute("INSERT INTO hops SELECT * FROM full.hops WHERE id > ? AND id <= ?", (low, high))
        conn.execute("INSERT INTO hop_tokens SELECT * FROM full.hop_tokens WHERE hop_id > ? AND hop_id <= ?", (low, high))


def _assert_the_same_as_the_whole_file(live: Data) -> None:
    """The requests ``live`` lists, and the findings of its merged analysis, are the whole sample's."""
    whole = Data([SAMPLE])
    whole.refresh()
    merged, fresh = (sorted(map(_request_summary, d.request_page(RequestQuery(limit=500))["items"])) for d in (live, whole))
    assert merged == fresh
    assert _finding_kinds(live) == _finding_kinds(whole)


def _request_summary(row: dict) -> tuple:
    """What the request list says of a request."""
    return (row["trace"], row["status"], row["hops"], row["severity"])


def _finding_kinds(data: Data) -> Counter:
    """How many findings of each kind the first file's settled analysis holds."""
    return Counter(data.settled(data.sources[0]).findings["kind"])


def test_a_live_refresh_merges_the_tail_into_what_it_had(tmp_path):
    (last,) = sql("SELECT max(id) FROM hops")[0]
    db = _mid_capture(tmp_path, last * 2 // 3)  # the last third not yet written
    live = Data([db], lookback_s=1.0)
    assert live.refresh()
    early = live.request_page(RequestQuery(limit=500))["total"]
    _record(db, last * 2 // 3, last)
    # The pass's rows are listed, and the server told, before its analysis joins the pending one.
    before, told = live.sources[0].pending, []
    live.on_change = lambda: told.append((live.request_page(RequestQuery(limit=500))["items"], live.sources[0].pending))
    assert live.refresh()
    whole = Data([SAMPLE])
    whole.refresh()
    merged, fresh = (d.request_page(RequestQuery(limit=500))["items"] for d in (live, whole))
    assert early < len(merged)
    assert len(told) == 1 and told[0][1] is before and live.sources[0].pending is not before
    assert [(r["trace"], r["hops"]) for r in told[0][0]] == [(r["trace"], r["hops"]) for r in merged]
    assert sorted(map(_request_summary, merged)) == sorted(map(_request_summary, fresh))
    assert live.sources[0].pending is not None  # the tail waits to be merged until a whole-capture view asks
    # The list's filters, which a live page asks for on every change, come without that merge.
    assert live.facets() == whole.facets() and live.sources[0].pending is not None
    facets = whole.facets()
    for name in ("service", "endpoint", "subject", "kind", "severity"):
        for value in facets[name]:
            pages = [{r["trace"] for r in d.request_page(RequestQuery(limit=500, **{name: value}))["items"]} for d in (live, whole)]
            assert pages[0] == pages[1], (name, value)
    assert live.sources[0].pending is not None
    assert live.status()["dbs"][0]["findings"] == len(whole.sources[0].analysis.findings)
    assert _finding_kinds(live) == _finding_kinds(whole) and live.sources[0].pending is None
    assert sum(s["count"] for s in live.latency()["services"]) == sql("SELECT count(*) FROM hops")[0][0]


@pytest.mark.parametrize("sample", sorted(SAMPLE.parent.glob("*.db")), ids=lambda p: p.stem)
def test_a_tail_pass_gives_exactly_what_the_tail_analysed_with_arrow_text_gives(tmp_path, sample):
    """A live pass analyses its tail holding text as Python strings (faster on a few thousand rows);
    what it returns is what the same tail analysed as everywhere else gives: values, dtypes, categories."""
    (since,) = sqlite3.connect(sample).execute("SELECT started_at FROM hops ORDER BY started_at LIMIT 1 OFFSET (SELECT count(*) / 2 FROM hops)").fetchone()
    got, rows = tail_pass((sample,), False, since, 0)
    copy_tail(sample, tmp_path / "tail.db", since)
    want = analyze(tmp_path / "tail.db", since=since, latency=False)
    frames = [(f.name, getattr(got, f.name), getattr(want, f.name)) for f in dataclasses.fields(want)]
    frames = [*((name, a, b) for name, a, b in frames if isinstance(b, pd.DataFrame)), ("rows", rows, _data._requests(model(want), 0))]
    assert len(want.hops) and len(rows)
    for name, a, b in frames:
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=name)
        assert [repr(t) for t in (*a.dtypes, a.index.dtype, a.columns.dtype)] == [repr(t) for t in (*b.dtypes, b.index.dtype, b.columns.dtype)], name


def test_a_pass_during_the_merge_of_the_pending_tail_lists_its_rows_and_joins_after_it(tmp_path, monkeypatch):
    """The merge of a grown pending tail runs in a thread of its own: a pass meanwhile lists its rows
    at once and leaves its analysis, which the merge joins when it is done; the end is the whole file."""
    (last,) = sql("SELECT max(id) FROM hops")[0]
    bounds = [last // 3, last * 2 // 3, last]
    db = _mid_capture(tmp_path, bounds[0])
    # Every pending tail is "grown" (SETTLE_HOPS 0), and the merge in its thread waits for `release`.
    release, merge = threading.Event(), _data._merge

    def held(*args):
        if threading.current_thread().name == "hoptrace-settle":
            assert release.wait(30)
        return merge(*args)

    monkeypatch.setattr(_data, "SETTLE_HOPS", 0)
    monkeypatch.setattr(_data, "_merge", held)
    live = Data([db], lookback_s=3.0)
    try:
        assert live.refresh()
        _record(db, bounds[0], bounds[1])
        assert live.refresh() and live._settler.is_alive()  # its tail is pending, and its merge is held
        source, listed = live.sources[0], live.request_page(RequestQuery(limit=500))["total"]
        _record(db, bounds[1], bounds[2])
        while live.refresh():  # the passes are not held by the merge: their rows are listed
            pass
        assert live.request_page(RequestQuery(limit=500))["total"] > listed
        assert source.settling and source.deferred and live._settler.is_alive()
        release.set()
        live._settler.join(30)
        assert not source.settling and not source.deferred and source.pending is not None and live.last_error is None
        _assert_the_same_as_the_whole_file(live)
    finally:
        release.set()
        live.close()


def test_hops_recorded_during_a_pass_start_the_next_one_and_the_end_is_the_whole_capture(tmp_path):
    """A pass that finds more hops recorded once it is done starts the next one in the worker
    before its own rows are merged; what the passes add up to is what the whole file gives."""
    (last,) = sql("SELECT max(id) FROM hops")[0]
    cut = last // 3
    db = _mid_capture(tmp_path, cut)

    def record_during_a_pass(low: int, high: int) -> None:
        deadline = time.monotonic() + 30
        while not live._tails.busy and time.monotonic() < deadline:
            time.sleep(0.002)
        _record(db, low, high)

    # Longer than the sample's longest request (1.4 s): a pass sees each request whole once its
    # root is recorded (a root is recorded last, when it answers).
    live = Data([db], lookback_s=3.0)
    try:
        assert live.refresh()
        bounds = [cut + (last - cut) * k // 4 for k in range(5)]
        _record(db, bounds[0], bounds[1])
        ahead = 0
        for low, high in itertools.pairwise(bounds[1:]):
            writer = threading.Thread(target=record_during_a_pass, args=(low, high))
            writer.start()
            assert live.refresh()
            writer.join()
            ahead += live._started is not None
        assert ahead >= 1  # some pass saw hops recorded while it ran, and started the next at once
        for _ in range(5):
            if not live.refresh():
                break
        assert live._started is None and live.sources[0].max_hop_id == last
        _assert_the_same_as_the_whole_file(live)
    finally:
        live.close()


@given(st.dictionaries(st.sampled_from(["q", "status", "sort", "order", "offset", "limit", "since", "until", "severity", "bogus"]),
                       st.text(max_size=30)))  # fmt: skip
def test_any_query_string_is_a_query_or_a_one_line_bad_query(params):
    try:
        query = RequestQuery.parse(params)
    except BadQuery as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        sorts = ("worst", "started", "duration", "status", "hops", "severity")
        assert 1 <= query.limit <= 500 and query.offset >= 0 and query.sort in sorts


def test_the_preview_lists_the_same_requests_before_any_analysis(data):
    early = Data([SAMPLE])
    early.preview()
    listed = early.request_page(RequestQuery(limit=500))
    assert listed["analysing"] and early.status()["dbs"][0]["analysing"]
    analysed = page(data)
    assert sorted((r["trace"], r["status"], r["status_class"]) for r in listed["items"]) == sorted(
        (r["trace"], r["status"], r["status_class"]) for r in analysed
    )
    assert early.request_page(RequestQuery(severity="error"))["total"] == 0  # findings are not known yet
    with pytest.raises(NotReady):
        early.request(0, analysed[0]["trace"])


def test_requests_recorded_live_are_listed_before_their_analysis(tmp_path, data):
    bad = sql("SELECT id FROM hops WHERE service = 'gateway' AND path = '/checkout' AND status = 401")[0][0]
    db = _mid_capture(tmp_path, bad - 1)
    live = Data([db])
    live.refresh()
    assert not live.peek()  # nothing new
    _record(db, bad - 1, sql("SELECT max(id) FROM hops")[0][0])
    assert live.peek()
    listed = {r["trace"]: r for r in live.request_page(RequestQuery(limit=500))["items"]}
    assert listed[bad]["status"] == 401 and listed[bad]["severity"] is None  # listed, findings to come
    with pytest.raises(NotReady):
        live.request(0, bad)
    assert live.refresh()
    listed = {r["trace"]: r for r in live.request_page(RequestQuery(limit=500))["items"]}
    assert listed[bad]["severity"] == "error" and sorted(listed) == sorted(r["trace"] for r in page(data))


@pytest.mark.parametrize("below_us", [0.3, 0.7], ids=["rounds-down", "rounds-up"])
def test_a_request_listed_live_is_analysed_in_the_time_window_that_listed_it(tmp_path, data, below_us):
    """A recorded start time has digits below the microsecond; the analysis keeps whole microseconds.
    The request listed live (by SQL) and the same request analysed must fall in the same window, and
    the pass that starts at that request (the oldest waiting one) must analyse it: a request lost at
    that boundary stayed listed and was never analysed (the UI benchmark's 1 in ~1,700)."""
    db = tmp_path / "growing.db"
    shutil.copy(SAMPLE, db)
    bad = sql("SELECT id FROM hops WHERE service = 'gateway' AND path = '/checkout' AND status = 401")[0][0]
    (start,) = sql("SELECT started_at FROM hops WHERE id = ?", bad)[0]
    recorded = round(start, 6) + below_us * 1e-6  # as time.time() records it: 1767255321.7541513
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE hops SET started_at = ? WHERE id = ?", (recorded, bad))
        conn.execute("CREATE TABLE later AS SELECT * FROM hops WHERE id >= ?", (bad,))
        conn.execute("CREATE TABLE later_tokens AS SELECT * FROM hop_tokens WHERE hop_id >= ?", (bad,))
        conn.execute("DELETE FROM hop_tokens WHERE hop_id >= ?", (bad,))
        conn.execute("DELETE FROM hops WHERE id >= ?", (bad,))
    live = Data([db], lookback_s=0.0)  # the pass starts at the oldest request waiting: this one
    live.refresh()
    with sqlite3.connect(db) as conn:
        conn.execute("INSERT INTO hops SELECT * FROM later")
        conn.execute("INSERT INTO hop_tokens SELECT * FROM later_tokens")
    window = RequestQuery(limit=500, since=recorded)
    assert live.peek()
    listed = {r["trace"]: r for r in live.request_page(window)["items"]}
    assert listed[bad]["hops"] is None  # listed, its analysis to come
    assert live.refresh()
    listed = {r["trace"]: r for r in live.request_page(window)["items"]}
    assert bad in listed, "the analysed request left the window that listed it"
    assert listed[bad]["severity"] == "error" and listed[bad]["hops"] == len(live.request(0, bad)["hops"]) > 1
    assert listed[bad]["started_at"] == live.request(0, bad)["started_at"]


def test_the_graph_counts_the_401_on_the_failing_path(data):
    graph = data.graph()
    rejected = {(e["caller"], e["callee"]): e["client_errors"] for e in graph["edges"]}
    assert rejected[("client", "gateway")] == rejected[("gateway", "payment")] == rejected[("payment", "auth")] == 1
    assert rejected[("gateway", "auth")] == 0
    assert {n["name"]: n["worst"] for n in graph["nodes"]}["auth"] == "4xx"


@pytest.mark.parametrize("name, worst", [("flaky-retries.db", 62), ("checkout-expiry.db", None)])
def test_the_ui_shows_the_presentation_models_order_phrasing_groups_and_graph(name, worst):
    """The list's default order, each hop's ending, the finding groups and the graph are the model's,
    so the UI and `hoptrace analyze` name the same worst request in the same words."""
    db = SAMPLE.parent / name
    ui = Data([db])
    ui.refresh()
    a = analyze(db)
    m = model(a)
    listed = ui.request_page(RequestQuery(limit=500))["items"]  # the default order
    assert [r["trace"] for r in listed] == m.worst_order[:500]
    assert [r["worst"] for r in listed] == list(range(len(listed)))
    assert listed[0]["trace"] == (worst or m.with_error_findings()[0])
    text = render_text(a)
    assert [int(t) for t in re.findall(r"^ *request (\d+): ", text, re.MULTILINE)] == [r["trace"] for r in listed[: a.config.worst]]
    assert json.loads(render_json(a))["worst"] == [r["trace"] for r in listed[: a.config.worst]]
    for item in listed[:5]:
        summary, req, rows = m.request(item["trace"]), ui.request(0, item["trace"]), m.hop_rows(item["trace"])
        assert item["ended"] == req["ended"] == summary.ended and req["tier"] == TIERS[summary.tier]
        assert f"request {summary.trace}: {summary.service} {summary.endpoint} {summary.ended}" in text
        assert [h["id"] for h in req["hops"]] == list(rows.index)
        assert [(h["ended"], h["outcome"]) for h in req["hops"]] == list(zip(rows["ended"], rows["outcome"]))
    kinds = [(k["kind"], k["severity"], k["count"]) for k in ui.facets()["kinds"]]
    assert kinds == [(g.kind, g.severity, len(g)) for g in m.finding_groups] and kinds
    _, edges = m.graph
    shown = {(e["caller"], e["callee"]): e for e in ui.graph()["edges"]}
    assert len(shown) == len(edges)
    for e in edges.itertuples():
        mine = shown[(e.caller, e.callee)]
        assert (mine["calls"], mine["errors"], mine["client_errors"]) == (e.calls, e.errors, e.client_errors)
        assert mine["worst"] == (None if pd.isna(e.worst) else e.worst)


def test_the_first_page_comes_from_sql_without_pandas(data):
    """The server and its preview import neither pandas nor the analyzer (seconds of imports), and
    the preview lists what the loaded Data lists before its analysis, newest first."""
    code = (
        "import json, sys; from pathlib import Path; import hoptrace.ui._server;"
        " from hoptrace.ui._preview import Preview; from hoptrace.ui._query import RequestQuery;"
        f" page = Preview([Path({str(SAMPLE)!r})]).request_page(RequestQuery(limit=500));"
        " print(json.dumps([page, sorted(m for m in ('pandas', 'numpy', 'hoptrace.analyzer._analysis') if m in sys.modules)]))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    page, heavy = json.loads(done.stdout)
    assert heavy == []
    early = Data([SAMPLE])
    early.preview()
    listed = early.request_page(RequestQuery(limit=500, sort="started", descending=True))["items"]
    assert [(r["trace"], r["ended"]) for r in page["items"]] == [(r["trace"], r["ended"]) for r in listed]
    assert page["total"] == len(listed) and page["analysing"]
    with pytest.raises(NotReady):  # a filter needs the analysis
        Preview([SAMPLE]).request_page(RequestQuery(status="4xx"))


def _relisted_by_filters(listed: pd.DataFrame, fresh: pd.DataFrame, since: float) -> pd.DataFrame:
    """The request list after a live pass as first written: filter the list, join, append those waiting
    (all of them after a pass that analysed nothing: the first version dropped them until the next)."""
    kept = listed[(listed["started_at"] < since).to_numpy() & listed["hops"].notna().to_numpy()]
    requests = pd.concat([kept[~kept["trace"].isin(fresh["trace"])], fresh], ignore_index=True)
    waiting = listed[listed["hops"].isna().to_numpy() & ~listed["trace"].isin(requests["trace"]).to_numpy()]
    newest = requests["trace"].max() if len(requests) else -1
    return pd.concat([requests, waiting[waiting["trace"] > newest]], ignore_index=True)


_row = st.tuples(st.integers(0, 40), st.integers(0, 40), st.one_of(st.none(), st.integers(1, 9)))  # trace, start, hops


@given(listed=st.lists(_row, max_size=25, unique_by=lambda r: r[0]), fresh=st.lists(_row, max_size=8, unique_by=lambda r: r[0]),
       since=st.integers(0, 40))  # fmt: skip
def test_a_live_pass_relists_as_the_filters_would_with_one_copy(listed, fresh, since):
    from hoptrace.ui._data import _relisted

    def frame(rows):
        return pd.DataFrame({"trace": [r[0] for r in rows], "started_at": [float(r[1]) for r in rows],
                             "hops": pd.array([r[2] for r in rows], dtype="Int64"), "endpoint": [f"GET /{r[0]}" for r in rows]})  # fmt: skip

    # What a pass analyses started at ``since`` or later, and was analysed (it has hops).
    fresh_rows = [(t, max(start, since), hops or 1) for t, start, hops in fresh]
    expected = _relisted_by_filters(frame(listed), frame(fresh_rows), since)
    got = _relisted(frame(listed), frame(fresh_rows), float(since))
    pd.testing.assert_frame_equal(got, expected)
    endpoints = got["endpoint"].array  # Arrow-backed text, unless there is none
    assert not hasattr(endpoints, "__arrow_array__") or endpoints.__arrow_array__().num_chunks <= 1  # or each pass adds chunks


_listed = st.tuples(st.integers(0, 4), st.one_of(st.none(), st.integers(0, 3)), st.booleans())  # start, sort value (None: NaN), kept


@given(rows=st.lists(_listed, max_size=30), other=st.lists(_listed, max_size=10), sort=st.sampled_from(["worst", "started", "duration", "status", "hops", "severity"]),
       descending=st.booleans(), offset=st.integers(0, 12), limit=st.integers(1, 12))  # fmt: skip
def test_a_page_read_from_the_list_sorted_once_is_the_kept_rows_sorted(rows, other, sort, descending, offset, limit):
    """The request list is sorted once per list and order, and each page filters that order: the same
    page as sorting the kept rows (NaN last, ties newest first, then as listed), for the list now held."""
    from hoptrace.ui._data import SORTABLE, Source, _sorted

    def frame(rows):
        values = {column: [float("nan") if r[1] is None else float(r[1]) for r in rows] for column in set(SORTABLE.values())}
        return pd.DataFrame({**values, "started_at": [float(r[0]) for r in rows], "trace": range(len(rows))})

    source = Source(0, Path("listed.db"))
    for held in (rows, other):  # a pass swaps the list: the order is the new list's
        listed, keep = frame(held), np.array([r[2] for r in held], dtype=bool)
        order = source.order(listed, sort, descending)
        got = listed.iloc[order[keep[order]]]["trace"].tolist()[offset : offset + limit]
        assert got == _sorted(listed[keep], sort, descending)["trace"].tolist()[offset : offset + limit]


_ranked_row = st.tuples(st.one_of(st.none(), st.integers(0, 3)), st.integers(0, 3), st.one_of(st.none(), st.integers(0, 4)),
                        st.booleans(), st.integers(0, 4))  # tier (None: not analysed), count, ms (None: NaN), ranked earlier, start


@given(rows=st.lists(_ranked_row, max_size=30), traces=st.randoms(use_true_random=False), descending=st.booleans())
def test_a_list_ranked_in_part_before_ranks_and_sorts_as_the_whole_list_would(rows, traces, descending):
    """A live pass ranks only its own rows and merges them among the rows ranked before; the places and
    the list's worst-first order are those of ranking the whole list at once."""
    from hoptrace.ui._data import Source, _ranked, _sorted

    ids = list(range(len(rows)))
    traces.shuffle(ids)
    frame = pd.DataFrame({
        "tier": [np.nan if r[0] is None else float(r[0]) for r in rows], "count": [r[1] for r in rows],
        "duration_ms": [np.nan if r[2] is None else float(r[2]) for r in rows], "trace": ids,
        "started_at": [float(r[4]) for r in rows],
    })  # fmt: skip
    # The worst-first order as the model sorts: tier, most findings, longest (NaN last), lowest id.
    analysed = sorted((i for i, r in enumerate(rows) if r[0] is not None),
                      key=lambda i: (rows[i][0], -rows[i][1], -rows[i][2] if rows[i][2] is not None else np.inf, ids[i]))  # fmt: skip
    expected = np.full(len(rows), np.nan)
    expected[analysed] = np.arange(len(analysed))
    earlier = np.array([r[3] for r in rows], dtype=bool)
    held = frame.assign(worst=np.nan)
    if earlier.any():  # the rows an earlier pass ranked, with that ranking's places
        held.loc[earlier, "worst"] = _ranked(frame[earlier])["worst"].to_numpy()
    got = _ranked(held)
    np.testing.assert_array_equal(got["worst"].to_numpy(), expected)
    order = Source(0, Path("listed.db")).order(got, "worst", descending)
    assert got.iloc[order]["trace"].tolist() == _sorted(got, "worst", descending)["trace"].tolist()


def test_a_memo_keeps_its_value_while_its_objects_are_the_same_objects():
    from hoptrace.ui._data import Memo

    memo, calls = Memo(), []
    assert Memo().get(lambda: "computed") == "computed"  # of no objects too (a view before any analysis)

    def compute(*objects):
        calls.append(objects)
        return len(calls)

    a, b = pd.DataFrame({"x": [1]}), pd.DataFrame({"x": [1]})
    assert memo.get(compute, a) == memo.get(compute, a) == 1
    assert memo.get(compute, b) == 2  # an equal frame, but another one: a pass swapped the list
    assert memo.get(compute, a, b) == memo.get(compute, a, b) == 3
    assert memo.get(compute, a, 1.5) == memo.get(compute, a, 1.5) == 4  # a plain value (a time) counts by value
    assert memo.get(compute, a, 2.0) == 5
    assert memo.get(compute, a, 2) == 6  # equal to 2.0, but another type: computed again


def test_rows_made_json_ready_hold_no_missing_value_of_pandas():
    """A workflow's request without a response has no status: pandas' NA in an Int64 column, which
    json cannot write; every missing value becomes None, whatever the column's type."""
    from hoptrace.ui._data import _records

    frame = pd.DataFrame({"status": pd.array([200, None], dtype="Int64"), "ok": pd.array([True, None], dtype="boolean"),
                          "ms": [1.5, float("nan")], "n": np.array([1, 2]), "name": pd.array(["a", None], dtype="str")})  # fmt: skip
    rows = _records(frame)
    assert json.loads(json.dumps(rows)) == [{"status": 200, "ok": True, "ms": 1.5, "n": 1, "name": "a"},
                                            {"status": None, "ok": None, "ms": None, "n": 2, "name": None}]  # fmt: skip


_finding = st.tuples(
    st.sampled_from(["error", "warning", "info", None]), st.sampled_from(["a", "b", "c", None]),
    st.sampled_from([0.0, 1.0, 2.0, 3.0, float("nan")]), st.sampled_from([None, 10, 11, 12, 99]),
)


@settings(deadline=None)
@example(  # a finding of each part at the same time and severity: the whole capture's comes first
    base=[("error", "a", 1.0, None)], tail=[("error", "b", 1.0, 12)], starts=[0.0, 1.0, 2.0], since=1.5
)
@given(
    base=st.lists(_finding, max_size=25), tail=st.lists(_finding, max_size=10),
    starts=st.lists(st.sampled_from([0.0, 1.0, 2.0, float("nan")]), min_size=3, max_size=3),
    since=st.sampled_from([0.5, 1.0, 1.5, 2.5]),
)
def test_a_live_pass_counts_finding_kinds_as_grouping_the_merged_findings_would(base, tail, starts, since):
    """The filters' finding kinds, worked out from the whole analysis once and the tail each pass,
    are the groups (in order, with counts) of the findings a merge would hold."""
    def frame(rows):
        return pd.DataFrame(rows, columns=["severity", "kind", "at", "trace"]).astype({"trace": "Int64", "at": float})
    hops = pd.DataFrame({"started_at": starts}, index=[10, 11, 12])
    whole = SimpleNamespace(hops=hops, findings=frame(base))
    pending = SimpleNamespace(since=since, analysis=SimpleNamespace(findings=frame(tail)))
    merged = pd.concat([f[["severity", "kind", "at"]] for f in _live_findings(whole, pending)], ignore_index=True)
    want = [(g.severity, g.kind, len(g)) for g in group_findings(merged)]
    no_values = hops.assign(service=None, endpoint=None, token_sub=None)
    facets = Facets.of(no_values, whole.findings)
    assert facets.merged(Facets.of(no_values, pending.analysis.findings), since)[1] == want
    assert facets.merged()[1] == [(g.severity, g.kind, len(g)) for g in group_findings(whole.findings)]
