"""The HTML report as a person meets it: the answer first, each hop's detail, no secret, in a real browser.

The trace is the demo's (sample_traces/checkout-expiry.db, recorded through a real
`hoptrace proxy` in front of the sample stack): one checkout's token expired between the
gateway's validation and payment's re-validation at auth.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import jwt
import numpy as np
import pandas as pd
import pytest

import hoptrace.plot as hp
from hoptrace.analyzer import analyze
from hoptrace.analyzer._model import model
from hoptrace.plot._common import svg_text
from hoptrace.plot._detail import curl_line, scrub, timings
from hoptrace.plot._graph import graph_svg
from hoptrace.plot._story import story
from hoptrace.stack.config import DEFAULT_SECRET

SAMPLES = Path(__file__).resolve().parent.parent / "sample_traces"
DEMO = SAMPLES / "checkout-expiry.db"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium") or "/usr/bin/chromium", shutil.which("chromedriver") or "/usr/bin/chromedriver"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1400,900")  # fmt: skip


@pytest.fixture(scope="module")
def demo_report(tmp_path_factory) -> tuple[str, Path]:
    out = tmp_path_factory.mktemp("report") / "report.html"
    hp.write_report(analyze(DEMO), out, source=DEMO.name)
    return out.read_text(encoding="utf-8"), out


def test_the_report_opens_with_the_error_findings_story_and_its_waterfall(demo_report):
    text, _ = demo_report
    a = analyze(DEMO)
    error = a.findings[a.findings["severity"] == "error"].iloc[0]
    trace = int(error["trace"])
    story = re.search(r'<p class="story sev-error">([^<]*)</p>', text)
    assert story, "no story of the error finding"
    sentence = story[1]
    # Who called whom, how late, how much life the token had: the finding's own numbers.
    late, left = error["details"]["late_by_s"], error["details"]["remaining_at_entry_s"]
    assert f"Request {trace} (POST /checkout at gateway → 401" in sentence
    assert f"payment sent the token to auth POST /introspect {late:.2f} s after its exp and got 401" in sentence
    assert f"the token had {left:.2f} s left when it entered gateway" in sentence
    # The order: story, its waterfall, then the findings, then the summary.
    assert text.index(story[0]) < text.index(f'data-trace="{trace}"') < text.index('id="findings"') < text.index('id="summary"')
    # Findings grouped by kind with counts, each group a <details> (errors open).
    counts = a.findings["kind"].value_counts()
    for kind, n in counts.items():
        assert re.search(rf'<details class="kind sev-\w+"( open)?><summary>{kind} × {n} \(', text), kind
    assert '<details class="kind sev-error" open>' in text
    assert "<script" not in text and "default-src 'none'; img-src data:; style-src 'unsafe-inline'" in text


def test_each_hop_opens_onto_what_was_recorded_about_it(demo_report):
    text, _ = demo_report
    panel = re.search(r'<details class="hop" id="detail-hop-74">(.*?)</div></details>', text, re.S)
    assert panel, "the failing /introspect hop has no detail panel"
    body = panel[1]
    with sqlite3.connect(DEMO) as conn:
        headers = json.loads(conn.execute("SELECT request_headers FROM hops WHERE id = 74").fetchone()[0])
        claims = json.loads(conn.execute("SELECT claims FROM tokens t JOIN hop_tokens h ON h.fingerprint = t.fingerprint "
                                         "WHERE h.hop_id = 74").fetchone()[0])  # fmt: skip
    for name, value in headers:  # every recorded (redacted) request header, as recorded
        assert f"<th>{name}</th><td>{value}</td>" in body, name
    assert "[redacted:" in body  # X-Internal-Key as the recorder redacted it
    for claim in ("sub", "iss", "jti"):
        assert f"<th>{claim}</th><td>{claims[claim]}</td>" in body
    assert re.search(r"remaining life at this hop</th><td>token expired 0\.\d\d s ago", body)
    assert re.search(r"time split</th><td>connect reused connection, send [\d.]+ ms, wait [\d.]+ ms, receive [\d.]+ ms", body)
    assert "linked to its caller by" in body
    curl = re.search(r'<pre class="curl">([^<]*)</pre>', body)[1]
    assert curl.startswith("curl -X POST http://127.0.0.1:") and "/introspect" in curl
    assert "X-Internal-Key: $X_INTERNAL_KEY" in curl and "redacted" not in curl


def test_no_raw_token_or_signature_anywhere_in_the_report(demo_report):
    """Canary: the sample stack signs with a known key, so each recorded token can be
    rebuilt from its claims; neither it nor its signature may appear in the report."""
    text, _ = demo_report
    with sqlite3.connect(DEMO) as conn:
        rows = conn.execute("SELECT claims FROM tokens WHERE kind = 'jwt'").fetchall()
    assert rows
    for (claims,) in rows:
        c = json.loads(claims)
        issued = {k: c[k] for k in ("sub", "iat", "exp", "jti", "iss")}  # hoptrace.stack.tokens.issue_token's order
        token = jwt.encode(issued, DEFAULT_SECRET, algorithm="HS256")
        assert jwt.decode(token, DEFAULT_SECRET, algorithms=["HS256"], options={"verify_exp": False}) == issued
        head, payload, signature = token.split(".")
        for part in (token, payload, signature):
            assert part not in text
    assert not re.search(r"eyJ[\w-]{4,}\.", text)  # no JWT shape at all


def headless_chromium(tmp_path):
    """Debian's chromium at 1400×900 through its chromedriver, with a profile of its own."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)


def test_the_first_screen_in_a_real_browser_shows_the_story_and_its_waterfall(demo_report, tmp_path):
    """Headless Debian chromium at 1400×900 with Selenium: the story and the waterfall's SVG
    are within the first 900 px, and the SVG's text is real text (found by the page's search)."""
    from selenium.webdriver.common.by import By

    _, path = demo_report
    driver = headless_chromium(tmp_path)
    try:
        driver.set_page_load_timeout(30)
        driver.get(path.as_uri())
        assert driver.execute_script("return window.innerWidth") == 1400
        story = driver.find_element(By.CSS_SELECTOR, "p.story.sev-error")
        svg = driver.find_element(By.CSS_SELECTOR, 'svg[data-chart="waterfall"]')
        assert story.is_displayed() and "after its exp and got 401" in story.text
        top_story, top_svg = (driver.execute_script("return arguments[0].getBoundingClientRect().top", e) for e in (story, svg))
        height = driver.execute_script("return arguments[0].getBoundingClientRect().height", svg)
        assert 0 <= top_story < top_svg < 900 and height > 150
        width = driver.execute_script("return arguments[0].getBoundingClientRect().width", svg)
        assert width <= 1400  # at native size or less, never wider than the window
        texts = driver.execute_script("return Array.from(arguments[0].querySelectorAll('text')).map(t => t.textContent)", svg)
        assert any("POST /introspect" in t for t in texts)  # the hop labels are text, not pixels
        # A hop's detail opens with a click (a <details>: no script in the page).
        hop = driver.find_element(By.CSS_SELECTOR, "details.hops > summary")
        hop.click()
        driver.find_element(By.CSS_SELECTOR, "#detail-hop-74 > summary").click()
        hop74 = driver.find_element(By.ID, "detail-hop-74")
        assert driver.execute_script("return arguments[0].open", hop74)
        assert "remaining life at this hop" in driver.execute_script("return arguments[0].innerText", hop74)
    finally:
        driver.quit()


def test_every_chart_is_inline_svg_with_no_text_cut_or_overlapping_in_a_real_browser(demo_report, tmp_path):
    """Each chart of the report (waterfall, workflow, latency, service graph) is drawn straight to SVG
    (no matplotlib: the report imports none); in headless chromium every text's box lies inside its
    chart and no two texts of a chart overlap."""
    text, path = demo_report
    assert {"waterfall", "session", "latency", "services"} <= set(re.findall(r'data-chart="(\w+)"', text))
    out = subprocess.run([sys.executable, "-c", "import sys, hoptrace.plot as p, hoptrace.analyzer as a;"
                          f"p.render_report(a.analyze({str(DEMO)!r})); print('matplotlib' in sys.modules)"],
                         capture_output=True, text=True, check=True)  # fmt: skip
    assert out.stdout.strip() == "False"
    driver = headless_chromium(tmp_path)
    try:
        driver.get(path.as_uri())
        charts = driver.execute_script(
            """return Array.from(document.querySelectorAll('svg.chart')).map(svg => {
                 const view = svg.viewBox.baseVal, s = svg.getBoundingClientRect(), k = view.width / s.width;
                 const boxes = Array.from(svg.querySelectorAll('text')).filter(t => t.textContent.trim())
                   .map(t => { const b = t.getBoundingClientRect();
                               return [t.textContent, (b.left - s.left) * k, (b.top - s.top) * k, (b.right - s.left) * k,
                                       (b.bottom - s.top) * k]; });
                 return [svg.dataset.chart, view.width, view.height, boxes]; })"""
        )
    finally:
        driver.quit()
    assert len(charts) >= 4
    for kind, width, height, boxes in charts:
        assert boxes, kind
        for label, x0, y0, x1, y1 in boxes:
            assert -0.5 <= x0 and x1 <= width + 0.5 and -0.5 <= y0 and y1 <= height + 0.5, (kind, label, x0, x1, width)
        for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes):
            for b, bx0, by0, bx1, by1 in boxes[i + 1 :]:
                overlap = min(ax1, bx1) - max(ax0, bx0) > 1 and min(ay1, by1) - max(ay0, by0) > 1
                assert not overlap, (kind, a, b)


# ---------------------------------------------------------------- charts as data


def test_the_waterfall_axis_ends_with_the_request_and_a_3ms_bar_stays_visible():
    a = analyze(DEMO)
    trace = int(a.findings.loc[a.findings["severity"] == "error", "trace"].iloc[0])
    lay = hp.waterfall_layout(a.trace_hops(trace), a.tokens, a.findings)
    span = max(float((lay.starts + lay.widths).max()), *(x for x, _ in lay.exp_lines if x is not None))
    assert lay.xlim[1] <= span * 1.05  # was ~1.42× the request
    k = lay.hop_ids.index(74)  # the failing 3 ms /introspect
    assert lay.widths[k] >= 0.006 * (lay.xlim[1] - lay.xlim[0])
    fig = hp.draw_waterfall(lay)
    ax = fig.axes[0]
    marker = next(c for c in ax.collections if c.get_gid() == "validation")
    bars = next(c for c in ax.containers if c.get_label() == "hops")
    assert marker.get_zorder() < bars.patches[k].get_zorder()  # under the bar, never hiding it
    # Every bar's text lies inside the axes (never cut at an edge).
    fig.canvas.draw()
    box = ax.get_window_extent()
    for t in ax.texts:
        e = t.get_window_extent()
        assert box.x0 - 1 <= e.x0 and e.x1 <= box.x1 + 1, t.get_text()


def twelve_service_edges() -> pd.DataFrame:
    """A 12-service mesh: a gateway fanning out, shared backends called from several layers, a cycle."""
    calls = [("client", "gateway"), ("gateway", "auth"), ("gateway", "catalog"), ("gateway", "cart"), ("gateway", "orders"),
             ("catalog", "pricing"), ("catalog", "search"), ("cart", "pricing"), ("cart", "inventory"),
             ("orders", "payment"), ("orders", "inventory"), ("orders", "shipping"), ("payment", "auth"),
             ("payment", "ledger"), ("shipping", "notify"), ("ledger", "notify"), ("notify", "orders"),
             ("search", "inventory"), ("pricing", "auth"), ("shipping", "auth")]  # fmt: skip
    rng = np.random.default_rng(0)
    return pd.DataFrame({"caller": [c for c, _ in calls], "callee": [d for _, d in calls],
                         "calls": rng.integers(1, 500, len(calls)), "errors": rng.integers(0, 3, len(calls)),
                         "p95_ms": rng.uniform(1, 300, len(calls))})  # fmt: skip


def _bezier(points, steps: int = 40) -> np.ndarray:
    p = np.asarray(points, dtype=float)
    out = []
    for k in range(0, len(p) - 3, 3):
        t = np.linspace(0, 1, steps)[:, None]
        a, b, c, d = p[k : k + 4]
        out.append((1 - t) ** 3 * a + 3 * (1 - t) ** 2 * t * b + 3 * (1 - t) * t**2 * c + t**3 * d)
    return np.vstack(out)


def test_the_service_graph_at_12_services_routes_no_edge_through_a_box():
    lay = hp.graph_layout(twelve_service_edges())
    assert len(lay.nodes) == 13 and len(lay.edges) == 20
    boxes = {n.name: (n.x - n.width / 2, n.y - n.height / 2, n.x + n.width / 2, n.y + n.height / 2) for n in lay.nodes}
    for e in lay.edges:
        curve = _bezier(e.points)
        for name, (x0, y0, x1, y1) in boxes.items():
            if name in (e.caller, e.callee):
                continue
            inside = (curve[:, 0] > x0 + 0.02) & (curve[:, 0] < x1 - 0.02) & (curve[:, 1] > y0 + 0.02) & (curve[:, 1] < y1 - 0.02)
            assert not inside.any(), f"{e.caller}->{e.callee} crosses {name}"
    # Boxes do not overlap, and every label sits outside every box.
    names = list(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = boxes[a], boxes[b]
            assert ax1 <= bx0 or bx1 <= ax0 or ay1 <= by0 or by1 <= ay0, (a, b)
    for e in lay.edges:
        x, y = e.label_xy
        assert not any(x0 < x < x1 and y0 < y < y1 for x0, y0, x1, y1 in boxes.values()), e.label
    hp.figure_bytes(hp.draw_graph(lay), "svg")


def test_a_hostile_service_name_reaches_neither_dot_nor_the_svg_as_syntax():
    e = twelve_service_edges().head(3).copy()
    e.loc[1, "callee"] = 'a"] ; evil [label="x\\l</text><script>'
    lay = hp.graph_layout(e)
    assert any(n.name == e.loc[1, "callee"] for n in lay.nodes)
    for svg in (svg_text(hp.draw_graph(lay)), graph_svg(lay)):  # matplotlib's drawing, and the report's own
        assert "<script>" not in svg and "&lt;script&gt;" in svg


# ---------------------------------------------------------------- hop detail, pure


def test_timings_split_a_hop_by_its_timestamps():
    hop = {"started_at": 10.0, "request_end_at": 10.002, "connect_at": 10.0005, "connected_at": 10.0015,
           "response_start_at": 10.052, "ended_at": 10.055}  # fmt: skip
    got = dict(timings(hop))
    assert got == pytest.approx({"connect": 1.0, "send": 2.0, "wait": 50.0, "receive": 3.0})
    reused = dict(timings({**hop, "connect_at": None, "connected_at": None}))
    assert reused["connect"] is None and reused["wait"] == pytest.approx(50.0)
    assert dict(timings({"started_at": 1.0, "ended_at": 2.0}))["receive"] is None


def test_curl_line_keeps_secrets_out_and_quotes_the_rest():
    hop = {"method": "POST", "scheme": "http", "host": "127.0.0.1", "port": 8080, "path": "/pay", "query": "a=1&b='x'"}
    headers = [("Authorization", "Bearer eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.sig"), ("Cookie", "s=1"),
               ("X-Note", "it's $HOME"), ("Host", "x"), ("Content-Length", "3")]  # fmt: skip
    line = curl_line(hop, headers)
    assert line.startswith("curl -X POST 'http://127.0.0.1:8080/pay?a=1&b='\"'\"'x'\"'\"''")
    assert '-H "Authorization: Bearer $TOKEN"' in line and '-H "Cookie: $COOKIE"' in line
    assert "eyJ" not in line and "s=1" not in line and "Host" not in line and "Content-Length" not in line
    assert "-H 'X-Note: it'\"'\"'s $HOME'" in line  # single-quoted: the shell expands nothing recorded
    assert scrub("Bearer eyJhbGciOi.eyJzdWIiOi.c2ln") == "Bearer [token]"


def test_report_without_a_readable_db_still_lists_hops():
    a = analyze(DEMO)
    a.source, a.files = None, ()  # the file the analysis came from is gone
    text = hp.render_report(a, max_sessions=0)
    assert '<details class="hop" id="detail-hop-74">' in text and "could not be read" in text


def test_a_report_capped_at_no_waterfall_says_how_many_it_left_out():
    a = analyze(DEMO)
    m = model(a)
    text = hp.render_report(a, max_waterfalls=0, max_sessions=0)
    assert text.count('data-chart="waterfall"') == 0 and m.with_error_findings()
    assert "drew 0 of 1 requests" in text


def test_graphviz_is_installed_by_the_set_up():
    """dev.py's set-up installs Debian's graphviz (dot) when missing."""
    import dev  # the repository's set-up script

    assert dev.RUN_PACKAGES["dot"] == "graphviz" and dev.TEST_PACKAGES["chromedriver"] == "chromium-driver"
    assert shutil.which("dot"), "run `python3 dev.py test` as root once: it installs graphviz"
    out = subprocess.run(["dot", "-V"], capture_output=True, text=True, check=True)
    assert "graphviz" in (out.stdout + out.stderr).lower()


def test_the_story_names_the_hop_the_finding_names_when_several_carried_the_expired_token(tmp_path):
    """In the benchmark's synthetic checkout both payment's /introspect and the audit call carry
    the token after exp: the story tells the one the finding names, and counts the other."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
    import synth

    a = analyze(synth.write(tmp_path / "s.db", 900).path)
    m = model(a)
    f = a.findings[a.findings["kind"] == "expired_mid_flow"].iloc[0].to_dict()
    assert f["details"]["late_hops"] == 2
    told = story(m, f)
    assert f"payment sent the token to auth POST /introspect {f['details']['late_by_s']:.2f} s after its exp and got 401" in told
    assert told.endswith("; 1 more hop carried it after its exp.")


def test_the_report_waterfall_keeps_every_text_inside_its_place():
    """The SVG waterfall: hop labels fit their column (cut with … and the full label as a tooltip),
    bar texts lie inside the plot, the axis ends with the request."""
    from hoptrace.plot._svg import FONT, MONO_EM, WIDTH, waterfall_svg

    a = analyze(DEMO)
    trace = int(a.findings.loc[a.findings["severity"] == "error", "trace"].iloc[0])
    hops = a.trace_hops(trace).copy()
    hops["path"] = hops["path"].astype(str)
    hops.loc[hops.index[-1], "path"] = "/<b>&/" + "very-long-segment/" * 8
    lay = hp.waterfall_layout(hops, a.tokens, a.findings)
    svg = waterfall_svg(lay)
    assert "<b>" not in svg and "&lt;b&gt;&amp;" in svg  # the full label, escaped, in the tooltip
    x0 = float(re.search(r'<line x1="([\d.]+)" x2="\1" y1="\d+" y2="\d+" stroke="#444"/>', svg)[1])
    rows = re.findall(r'font-family="DejaVu Sans Mono, monospace"[^>]*>(?:<title>[^<]*</title>)?([^<]*)</text>', svg)
    assert len(rows) == len(lay.hop_ids) and any(r.endswith("…") for r in rows)
    assert all(6 + len(html_unescape(r)) * FONT * MONO_EM <= x0 for r in rows)
    for x, anchor, text in re.findall(r'<text x="([\d.]+)" y="[\d.]+" font-size="11" text-anchor="(start|end)" fill="[^"]+">([^<]*)</text>', svg):
        width = len(html_unescape(text)) * 11 * 0.56
        left = float(x) - (width if anchor == "end" else 0)
        assert x0 <= left + 1 and left + width <= WIDTH, text


def html_unescape(text: str) -> str:
    import html

    return html.unescape(text)
