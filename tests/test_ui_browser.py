"""`hoptrace ui` in a real browser (Debian's headless chromium through Selenium) on the demo's trace:
the checkout that answers 401 because payment re-validated an expired token."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
from pathlib import Path

import pytest
from selenium.common.exceptions import StaleElementReferenceException
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as ec
from selenium.webdriver.support.ui import Select, WebDriverWait

from .conftest import Proc
from .ui_browser import WAIT_S, chromium, png_colours, quit_browser, start_ui, ui_args, ui_url

pytestmark = [pytest.mark.e2e, pytest.mark.browser]

SAMPLE = Path(__file__).resolve().parent.parent / "sample_traces" / "checkout-expiry.db"
README_SHOTS = Path(__file__).resolve().parent.parent / "docs" / "images"
# HOPTRACE_README_SHOTS=1 saves the checked screenshots as the README's (docs/images/ui-*.png).
SAVE_SHOTS = os.environ.get("HOPTRACE_README_SHOTS") == "1"
HOSTILE_PATH = "/<img src=x onerror=window.pwned=1>"


@pytest.fixture(scope="module")
def browser():
    driver = chromium()
    yield driver
    quit_browser(driver)


@pytest.fixture(scope="module")
def sample_ui():
    """One `hoptrace ui` on the demo's trace for the tests that only read it."""
    proc = Proc(ui_args(SAMPLE))
    try:
        yield ui_url(proc)
    finally:
        proc.stop()


@pytest.fixture
def failing_checkout():
    conn = sqlite3.connect(f"file:{SAMPLE}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT id FROM hops WHERE service = 'gateway' AND path = '/checkout' AND status = 401").fetchone()[0]
    finally:
        conn.close()


def wait_for(driver, css: str, text: str | None = None):
    """The first element matching ``css`` once it is displayed (and contains ``text``)."""

    def found(d):
        for el in d.find_elements(By.CSS_SELECTOR, css):
            if el.is_displayed() and (text is None or text in el.text):
                return el
        return False

    # The page re-renders views whole: an element can go stale between the query and the check.
    wait = WebDriverWait(driver, WAIT_S, ignored_exceptions=(StaleElementReferenceException,))
    return wait.until(found, message=f"no visible {css!r}" + (f" with {text!r}" if text else ""))


def analysed(driver) -> None:
    """Wait until the page says the analysis is done (the list shows before it, without findings)."""
    wait_for(driver, "#live-status", "findings")


def save_screenshot(driver, name: str) -> None:
    """A screenshot that shows something (not one flat colour), kept for the README when asked."""
    png = driver.get_screenshot_as_png()
    assert png_colours(png) > 50, name
    if SAVE_SHOTS:
        README_SHOTS.mkdir(parents=True, exist_ok=True)
        (README_SHOTS / name).write_bytes(png)


def test_failing_checkout_from_the_list_to_the_expired_token(browser, sample_ui, failing_checkout):
    url = sample_ui
    browser.get(url)
    analysed(browser)
    wait_for(browser, "#request-list tbody tr")
    everything = int(browser.find_element(By.ID, "request-count").text.split()[0])

    # Filter to errors: only the failing checkout is left.
    Select(browser.find_element(By.ID, "filter-severity")).select_by_value("error")
    wait_for(browser, "#request-count", "1 requests")
    rows = browser.find_elements(By.CSS_SELECTOR, "#request-list tbody tr")
    assert everything > 1 and len(rows) == 1
    assert "POST /checkout" in rows[0].text and "401" in rows[0].text and "expired_mid_flow" in rows[0].text

    # The waterfall: the 401s, the token's exp line, the critical path, the finding linked to its hop.
    rows[0].click()
    wait_for(browser, "#waterfall-svg")
    assert browser.current_url.endswith(f"#/request/{failing_checkout}")
    bars = browser.find_elements(By.CSS_SELECTOR, "#waterfall-svg text.bar-note")
    assert sum("401" in b.text for b in bars) >= 2  # the gateway's answer and auth's /introspect
    exp_line = browser.find_element(By.ID, "exp-line")
    assert exp_line.is_displayed()
    assert "token exp" in browser.find_element(By.CSS_SELECTOR, "#waterfall-svg text.exp-label").text
    assert browser.find_elements(By.CSS_SELECTOR, "#waterfall-svg rect.bar.critical")
    assert "expired_mid_flow" in wait_for(browser, "#findings li", "expired_mid_flow").text

    # Collapse payment's subtree: its /introspect hop leaves the chart; expand brings it back.
    def labels():
        return [t.text for t in browser.find_elements(By.CSS_SELECTOR, "#waterfall-svg text.hop-label")]
    assert any("/introspect" in t for t in labels())
    payment = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#waterfall-svg g.row") if "payment" in r.text)
    payment.find_element(By.CSS_SELECTOR, "text.toggle").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: not any("/introspect" in t for t in labels()))
    browser.find_element(By.ID, "expand-all").click()
    WebDriverWait(browser, WAIT_S).until(lambda d: any("/introspect" in t for t in labels()))

    # Payment's /introspect hop: claims, remaining life (negative: expired), no raw token.
    introspect = next(r for r in browser.find_elements(By.CSS_SELECTOR, "#waterfall-svg g.row") if "/introspect" in r.text)
    hop_id = int(introspect.get_attribute("data-hop"))
    introspect.find_element(By.CSS_SELECTOR, "rect.bar").click()
    title = wait_for(browser, "#hop-title", "/introspect")
    assert title.is_displayed()
    assert browser.current_url.endswith(f"#/request/{failing_checkout}/hop/{hop_id}")  # a deep link
    claims = wait_for(browser, "#token-claims")
    assert "sub" in claims.text and "exp" in claims.text and "user_" in claims.text
    remaining = browser.find_element(By.ID, "hop-facts").text
    assert "expired" in remaining and "token life left" in remaining
    pane = browser.find_element(By.ID, "hop-pane").text
    assert "[redacted:" in pane and "curl" in browser.find_element(By.ID, "curl").text
    assert "eyJ" not in browser.page_source  # no JWT, whole or in part, reached the page
    save_screenshot(browser, "ui-waterfall.png")

    # Compare with the passing checkout of the same endpoint: the differing hops highlighted.
    browser.find_element(By.ID, "compare-peer").click()
    summary = wait_for(browser, "#compare-summary")
    assert "differ" in summary.text
    diff_cells = browser.find_elements(By.CSS_SELECTOR, "#compare td.diff")
    assert any("401" in c.text for c in diff_cells) and any("expired" in c.text for c in diff_cells)
    assert any("200" in c.text for c in diff_cells)
    save_screenshot(browser, "ui-compare.png")

    # A deep link opens the same hop in a fresh page load.
    browser.get(f"{url}#/request/{failing_checkout}/hop/{hop_id}")
    assert "/introspect" in wait_for(browser, "#hop-title").text


def test_sessions_latency_and_graph_views(browser, sample_ui):
    url = sample_ui
    browser.get(f"{url}#/sessions")
    analysed(browser)
    browser.refresh()
    first = wait_for(browser, "#session-list tbody tr")
    assert "yes" in first.text  # the expired session is listed first
    first.click()
    wait_for(browser, "#session-svg")
    assert browser.find_elements(By.CSS_SELECTOR, "#session-svg rect.tokenlife")
    assert browser.find_elements(By.CSS_SELECTOR, "#session-svg line.exp")
    browser.get(f"{url}#/latency")
    assert "payment" in wait_for(browser, "#latency-services").text
    browser.get(f"{url}#/graph")
    graph = wait_for(browser, "#graph-svg")
    names = {t.text for t in graph.find_elements(By.CSS_SELECTOR, "g.node text")}
    assert {"client", "gateway", "auth", "payment", "cart", "products"} <= names
    assert len(graph.find_elements(By.CSS_SELECTOR, "path.edge.failing")) == 3  # the 401's path: client, gateway, payment, auth


def test_hostile_strings_from_the_trace_are_shown_as_text(browser, spawn, tmp_path):
    db = tmp_path / "hostile.db"
    shutil.copy(SAMPLE, db)
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE hops SET path = ?, request_headers = ? WHERE service = 'gateway' AND path = '/checkout'",
                     (HOSTILE_PATH, json.dumps([["X-Evil", "<script>window.pwned=2</script>"]])))  # fmt: skip
    url = start_ui(spawn, db)
    browser.get(f"{url}#/?q=onerror")
    analysed(browser)
    row = wait_for(browser, "#request-list tbody tr", "onerror")
    assert HOSTILE_PATH in row.text  # the markup, as text
    row.click()
    wait_for(browser, "#waterfall-svg")
    browser.find_element(By.CSS_SELECTOR, "#waterfall-svg g.row rect.bar").click()
    assert "<script>window.pwned=2</script>" in wait_for(browser, "#request-headers", "X-Evil").text
    assert browser.execute_script("return window.pwned === undefined")
    assert not browser.find_elements(By.CSS_SELECTOR, "#main img, #main script")
    WebDriverWait(browser, WAIT_S).until(ec.presence_of_element_located((By.ID, "curl")))
