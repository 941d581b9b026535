"""`hoptrace ui` on a DB the real `hoptrace proxy` is writing: the sample stack behind the proxy,
a browser on the UI, a new user's requests appearing while they are recorded; and every API
answer grepped for the raw tokens the traffic carried."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import urllib.request

import pytest
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from hoptrace.stack import run_users
from hoptrace.stack.scenarios import SCENARIOS, record

from .ui_browser import WAIT_S, chromium, png_colours, quit_browser, start_ui

pytestmark = [pytest.mark.e2e, pytest.mark.browser]
STEPS = 6  # requests per user flow at the gateway: register, login, products, cart, cart, checkout


class Recorder(threading.Thread):
    """The stack behind `hoptrace proxy` in a thread of its own: one user, a pause until told, one more user."""

    def __init__(self, db) -> None:
        super().__init__(daemon=True)
        self.db = db
        self.first_done, self.go, self.second_done, self.finish = (threading.Event() for _ in range(4))
        self.flows: list = []
        self.error: BaseException | None = None
        self.second_done_at = 0.0

    def run(self) -> None:
        scenario = SCENARIOS["clean"]
        try:
            asyncio.run(record(self.db, scenario.stack_config(), self.drive))
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            self.error = exc
            self.first_done.set()

    async def drive(self, gateway_url: str, services=None):
        loop = asyncio.get_running_loop()
        self.flows += await run_users(gateway_url, 1, email_prefix="live-first")
        self.first_done.set()
        await loop.run_in_executor(None, self.go.wait, 60)
        self.flows += await run_users(gateway_url, 1, email_prefix="live-second")
        self.second_done_at = time.monotonic()
        self.second_done.set()
        await loop.run_in_executor(None, self.finish.wait, 60)
        return self.flows


def get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=WAIT_S) as response:
        return response.read().decode()


def wait_analysed(url: str) -> None:
    """Until every listed request has its analysis (new ones are listed first, analysed a moment later)."""
    deadline = time.monotonic() + WAIT_S
    while any(item["hops"] is None for item in json.loads(get(f"{url}api/requests?limit=500"))["items"]):
        assert time.monotonic() < deadline, "requests listed live were never analysed"
        time.sleep(0.1)


def every_api_answer(url: str) -> list[str]:
    """The body of every API endpoint, for every request, hop and session the UI holds."""
    wait_analysed(url)
    bodies = [get(f"{url}api/{path}") for path in ("status", "facets", "sessions", "latency", "graph")]
    listing = get(f"{url}api/requests?limit=500")
    bodies.append(listing)
    traces = [item["trace"] for item in json.loads(listing)["items"]]
    for trace in traces:
        request = get(f"{url}api/request/{trace}")
        bodies.append(request)
        bodies += [get(f"{url}api/hop/{hop['id']}") for hop in json.loads(request)["hops"]]
    bodies.append(get(f"{url}api/compare?a={traces[0]}&b={traces[-1]}"))
    bodies += [get(f"{url}api/session/{s['session']}") for s in json.loads(bodies[2])]
    return bodies


def test_new_requests_appear_live_and_no_raw_token_reaches_the_ui(spawn, tmp_path):
    recorder = Recorder(tmp_path / "live.db")
    recorder.start()
    browser = None
    try:
        assert recorder.first_done.wait(90) and recorder.error is None, recorder.error
        url = start_ui(spawn, recorder.db)
        browser = chromium()
        browser.get(url)
        def count(d):
            return d.find_element(By.ID, "request-count").text
        wait = WebDriverWait(browser, WAIT_S, ignored_exceptions=(Exception,))
        wait.until(lambda d: count(d).startswith(f"{STEPS} requests"), message="the first user's requests")

        def listed(d):
            """The listed traces, read inside the wait: the list re-renders when the analysis takes over
            from the SQL preview, and a row read across a re-render is stale (the wait reads again)."""
            traces = {r.get_attribute("data-trace") for r in d.find_elements(By.CSS_SELECTOR, "#request-list tbody tr")}
            return traces if len(traces) == STEPS else False

        before = wait.until(listed, message="the first user's rows")

        recorder.go.set()
        assert recorder.second_done.wait(60)
        wait.until(lambda d: count(d).startswith(f"{2 * STEPS} requests"), message="the second user's requests, live")
        lag = time.monotonic() - recorder.second_done_at
        print(f"live: the second user's last request listed {lag:.2f} s after its response")
        wait_analysed(url)

        def rows(d):
            """Listed traces and the highlighted new ones, read in one go (the list re-renders on each update)."""
            now = {r.get_attribute("data-trace") for r in d.find_elements(By.CSS_SELECTOR, "#request-list tbody tr")}
            fresh = {
                r.get_attribute("data-trace")
                for r in d.find_elements(By.CSS_SELECTOR, "#request-list tbody tr.new")
                if r.is_displayed()
            }
            return (now, fresh) if len(now) == 2 * STEPS else False

        now, fresh = wait.until(rows)
        assert before < now and len(now - before) == STEPS
        assert fresh and fresh <= now - before  # the rows of the latest update are highlighted
        assert "live-second" not in browser.page_source  # emails travel in bodies, which are not stored
        assert "12 requests" in browser.find_element(By.ID, "live-status").text
        assert png_colours(browser.get_screenshot_as_png()) > 50

        tokens = [flow.token for flow in recorder.flows]
        assert len(tokens) == 2 and all(t and t.count(".") == 2 for t in tokens)
        secrets = [*tokens, *(t.rsplit(".", 1)[1] for t in tokens)]
        answers = [*every_api_answer(url), browser.page_source]
        assert sum(len(a) for a in answers) > 10_000
        for secret in secrets:
            assert not any(secret in answer for answer in answers)
    finally:
        recorder.go.set()
        recorder.finish.set()
        if browser is not None:
            quit_browser(browser)
        recorder.join(90)
    assert recorder.error is None, recorder.error
