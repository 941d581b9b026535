"""The pytest plugin, run by pytest's own `pytester` on a suite written like the seed's
(register, login, browse, add to cart, view cart, checkout; the token "validates when
tested directly") against the bundled stack behind a real `hoptrace proxy`.

Each inner run is a child pytest process (the plugin starts processes and the proxy
installs signal handlers). The stack runs on free 127.0.0.1 ports: started by the inner
suite's own session fixture (`hoptrace stack` as a child), or by the stack file's `command`.
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import sqlite3
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

# pytester's in-process runs drop the modules they imported when they end, and numpy's
# extension cannot be loaded twice in one process: pandas (and numpy) come in here, first.
import pandas  # noqa: F401
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from .conftest import free_port

pytest_plugins = ["pytester"]

SERVICES = ("gateway", "auth", "products", "cart", "payment")
OPENAPI = Path(__file__).resolve().parent.parent / "hoptrace" / "stack" / "openapi"

# The stack's token TTL is 3 s and payment works 3 s before it re-validates: whatever
# the token has left when checkout enters (under 3 s: it was issued at register), it
# has expired by payment's re-validation, while the gateway's validation passed.
FAULT_ON = "--ttl 3 --work-seconds 3"
FAULT_OFF = "--ttl 3600 --work-seconds 0.2"

CONFTEST = '''
import os, signal, subprocess, sys
import pytest

@pytest.fixture(scope="session")
def base_url(hoptrace):
    """The gateway as the client sees it: the proxy's listener in front of it."""
    args = os.environ.get("STACK_ARGS")
    if args is None:  # the stack file's command started it
        yield hoptrace.entry_url
        return
    ports = [f"--port={n}={u.rsplit(':', 1)[1]}" for n, u in hoptrace.upstreams.items()]
    via = [f"--upstream={n}={u}" for n, u in hoptrace.urls.items() if n != "gateway"]
    proc = subprocess.Popen([sys.executable, "-m", "hoptrace", "stack", *ports, *via, *args.split()],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    said = []
    for line in proc.stdout:
        if "stack ready" in line:
            break
        said.append(line)
    else:
        pytest.fail(f"the stack did not start ({proc.wait()}): {''.join(said).strip()}")
    yield hoptrace.entry_url
    proc.send_signal(signal.SIGINT)
    proc.wait(30)
'''

SUITE = '''
import threading, time
import pytest
import requests

@pytest.fixture
def headers(base_url, hoptrace_requests):
    """Register and log in, as the seed's setup does."""
    creds = {"email": f"test_{time.time_ns()}@example.com", "password": "TestPass123!"}
    assert hoptrace_requests.post(f"{base_url}/auth/register", json=creds).status_code == 201
    response = hoptrace_requests.post(f"{base_url}/auth/login", json=creds)
    assert response.status_code == 200
    with open("tokens.txt", "a") as canaries:  # for the outer test to grep hoptrace's outputs
        canaries.write(response.json()["token"] + "\\n")
    return {"Authorization": f"Bearer {response.json()['token']}"}

def test_complete_purchase_flow(base_url, headers, hoptrace_requests):
    http = hoptrace_requests
    products = http.get(f"{base_url}/products", headers=headers).json()
    response = http.post(f"{base_url}/cart/items", headers=headers, json={"product_id": products[0]["id"], "quantity": 2})
    assert response.status_code == 201
    cart_id = response.json()["cart_id"]
    assert len(http.get(f"{base_url}/cart/{cart_id}", headers=headers).json()["items"]) == 1
    response = http.post(f"{base_url}/checkout", headers=headers, json={"cart_id": cart_id, "payment_method": "credit_card"})
    assert response.status_code == 200, f"Checkout failed: {response.text}"

def test_token_validation_direct(base_url, headers, hoptrace_requests):
    response = hoptrace_requests.get(f"{base_url}/auth/verify", headers=headers)
    assert response.status_code == 200
    assert response.json()["valid"] is True
'''

# Two tests whose requests interleave: the first leaves a thread browsing (its own
# requests.Session, marked with the first test's header) that goes on once the second
# test has started, while the second browses too.
INTERLEAVED = """
import threading, time
import requests

SECOND_STARTED = threading.Event()
BACKGROUND = []

def test_background_browsing(base_url, headers, hoptrace_headers):
    session = requests.Session()
    session.headers.update({**headers, **hoptrace_headers})
    def browse():
        for i in range(12):
            assert session.get(f"{base_url}/products?by=a").status_code == 200
            if i == 1:
                SECOND_STARTED.wait(30)
            time.sleep(0.03)
    BACKGROUND.append(threading.Thread(target=browse))
    BACKGROUND[0].start()

def test_browsing_while_another_test_browses(base_url, headers, hoptrace_requests):
    SECOND_STARTED.set()
    for _ in range(6):
        assert hoptrace_requests.get(f"{base_url}/products?by=b", headers=headers).status_code == 200
        time.sleep(0.05)
    BACKGROUND[0].join(30)

def test_httpx_and_aiohttp_clients_carry_the_header_too(base_url, headers, hoptrace_httpx, hoptrace_aiohttp):
    import asyncio
    assert hoptrace_httpx.get(f"{base_url}/products?by=httpx", headers=headers).status_code == 200
    async def browse():
        async with hoptrace_aiohttp(headers=headers) as session:
            async with session.get(f"{base_url}/products?by=aiohttp") as response:
                assert response.status == 200
    asyncio.run(browse())

def test_a_plain_client_is_found_by_its_window(base_url, headers):
    for _ in range(2):
        assert requests.get(f"{base_url}/products?by=plain", headers=headers).status_code == 200

def test_the_capture_can_be_analyzed_during_the_session(hoptrace):
    analysis = hoptrace.analysis()
    assert (analysis.hops["depth"] == 0).sum() >= 20
    assert "duplicate_validation" in set(analysis.findings["kind"])
"""


def _stack_file(path: Path, db: Path, stack_args: str | None = None) -> Path:
    """A stack file of the five services on free ports; with ``stack_args``, its command starts them."""
    routes = {name: (free_port(), free_port()) for name in SERVICES}  # (service's port, proxy's listen port)
    lines = ['entry = "gateway"', f'db = "{db}"']
    if stack_args is not None:
        ports = " ".join(f"--port={n}={port}" for n, (port, _) in routes.items())
        via = " ".join(f"--upstream={n}=http://127.0.0.1:{listen}" for n, (_, listen) in routes.items() if n != "gateway")
        lines.append(f'command = "{sys.executable} -m hoptrace stack {ports} {via} {stack_args}"')
    for name, (port, listen) in routes.items():
        lines += [f"[routes.{name}]", f'upstream = "http://127.0.0.1:{port}"', f"listen = {listen}"]
    path.write_text("\n".join(lines) + "\n")
    return path


def _junit(path: Path) -> dict[str, dict[str, list[str]]]:
    """Per test name: its properties, each name with all its values."""
    tests = {}
    for case in ET.parse(path).iter("testcase"):
        props: dict[str, list[str]] = {}
        for prop in case.iter("property"):
            props.setdefault(prop.get("name"), []).append(prop.get("value"))
        tests[case.get("name")] = props
    return tests


def _run(pytester: pytest.Pytester, monkeypatch, stack_args: str | None, *args: str, suite: str = SUITE):
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_checkout_flow=suite)
    if stack_args is None:
        monkeypatch.delenv("STACK_ARGS", raising=False)
    else:
        monkeypatch.setenv("STACK_ARGS", stack_args)
    # Without the plugins this suite does not use: hypothesis' summary alone takes seconds.
    return pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio", "-rA", *args, timeout=120
    )


@pytest.mark.e2e
def test_expired_token_fails_checkout_and_its_report_names_the_finding(pytester, monkeypatch, tmp_path):
    db = tmp_path / "traces.db"
    stack = _stack_file(tmp_path / "stack.toml", db)
    result = _run(pytester, monkeypatch, FAULT_ON, "--hoptrace", str(stack), f"--junitxml={tmp_path / 'junit.xml'}")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert "FAILED test_checkout_flow.py::test_complete_purchase_flow" in out
    # The failing test's section: its requests found by header, the finding with payment
    # as the caller, the checkout's hop tree.
    section = out[out.index("hoptrace: this test's requests") :]
    assert "6 requests of this test (by its X-Hoptrace-Test header)" in section
    assert "Failing request" in section and "POST /checkout 401" in section
    assert "error expired_mid_flow" in section and "payment -> auth" in section
    story = re.search(r"POST /checkout 401: gateway validated the token \(auth GET /verify\) with (\S+) s left; "
                      r"payment validated it \(auth POST /introspect\) (\S+) s after exp", section)  # fmt: skip
    assert story and float(story[1]) > 0 and float(story[2]) > 0, section
    assert "└─ auth POST /introspect" in section
    section = section[: section.index("= PASSES =")]
    assert not any(t.rpartition(".")[2] in section for t in (pytester.path / "tokens.txt").read_text().split())
    junit = _junit(tmp_path / "junit.xml")
    findings = junit["test_complete_purchase_flow"]["hoptrace_finding"]
    assert any("expired_mid_flow" in f and "payment -> auth" in f for f in findings)
    assert not any("expired_mid_flow" in f for f in junit["test_token_validation_direct"].get("hoptrace_finding", []))
    # The session summary, after the proxy stopped and flushed.
    summary = out[out.index("= hoptrace =") :]
    assert "1 error finding" in summary and "test_complete_purchase_flow: " in summary
    assert "hops recorded, 0 dropped" in summary
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT count(*) FROM hops WHERE service = 'gateway'").fetchone()[0] == 9


@pytest.mark.e2e
def test_without_the_fault_every_test_passes_attribution_is_exact_and_coverage_is_printed(pytester, monkeypatch, tmp_path):
    db = tmp_path / "traces.db"
    stack = _stack_file(tmp_path / "stack.toml", db, stack_args=FAULT_OFF)
    specs = [f"--hoptrace-openapi={n}={OPENAPI / n}.yaml" for n in SERVICES]
    result = _run(
        pytester, monkeypatch, None, "--hoptrace", str(stack), *specs, f"--junitxml={tmp_path / 'junit.xml'}",
        f"--hoptrace-report={tmp_path / 'report.html'}", suite=SUITE + INTERLEAVED,
    )  # fmt: skip
    result.assert_outcomes(passed=7)
    out = result.stdout.str()
    summary = out[out.index("= hoptrace =") :]
    assert "no error finding" in summary
    # Coverage: exactly the documented operations this suite never calls.
    never = summary[summary.index("Documented operations never called: 6") :].splitlines()[2:8]
    assert sorted(" ".join(line.split()[:3]) for line in never) == sorted(
        ["gateway GET /products/{product_id}", *(f"{n} GET /_stats" for n in SERVICES)]
    )
    assert "Error paths never exercised" in summary
    # Attribution: by header, exactly the requests each test (or its thread) sent. The
    # JUnit properties say what was recorded when the test ended; the JSON beside the
    # trace what was recorded in the end (the first test's thread went on after it).
    junit = _junit(tmp_path / "junit.xml")
    quiet = "test_the_capture_can_be_analyzed_during_the_session"  # sends nothing: found by its window
    assert junit.pop(quiet)["hoptrace_attribution"] == ["window"]
    plain = "test_a_plain_client_is_found_by_its_window"  # register and login by header, then a plain client
    assert junit.pop(plain)["hoptrace_attribution"] == ["header+window"]
    assert all(props["hoptrace_attribution"] == ["header"] for props in junit.values())
    tests = {t["nodeid"].rpartition("::")[2]: t for t in json.loads(Path(f"{db}.tests.json").read_text())["tests"]}
    assert all(t["by"] == "header" for name, t in tests.items() if name not in (quiet, plain))
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT id, started_at, path, query FROM hops WHERE service = 'gateway' ORDER BY started_at"
        ).fetchall()
    by = {hop: query for hop, _, _, query in rows}
    assert sorted(str(by[h]) for h in tests[plain]["requests"]) == ["None", "None", "by=plain", "by=plain"]
    a, b = tests["test_background_browsing"]["requests"], tests["test_browsing_while_another_test_browses"]["requests"]
    assert [by[h] for h in a].count("by=a") == 12 and len(a) == 14  # register, login, 12 from the thread
    assert [by[h] for h in b].count("by=b") == 6 and len(b) == 8
    assert {h for h, q in by.items() if q == "by=a"} <= set(a) and {h for h, q in by.items() if q == "by=b"} <= set(b)
    assert sorted(h for t in tests.values() for h in t["requests"]) == sorted(by)  # every request is one test's, once
    assert junit["test_browsing_while_another_test_browses"]["hoptrace_requests"] == [" ".join(map(str, b))]
    clients = tests["test_httpx_and_aiohttp_clients_carry_the_header_too"]["requests"]
    assert sorted(str(by[h]) for h in clients) == ["None", "None", "by=aiohttp", "by=httpx"]
    assert tests[quiet]["requests"] == []
    order = "".join(q[-1] for _, _, _, q in rows if q in ("by=a", "by=b"))
    assert "ab" in order and "ba" in order, order  # they did interleave
    report = (tmp_path / "report.html").read_text()
    assert "test_complete_purchase_flow]" in report
    outputs = [report, Path(f"{db}.tests.json").read_text(), summary]
    tokens = (pytester.path / "tokens.txt").read_text().split()
    assert len(tokens) == 6 and not any(t in o or t.rpartition(".")[2] in o for t in tokens for o in outputs)


@pytest.mark.e2e
def test_fail_on_fails_the_checkout_test_whose_asserts_passed(pytester, monkeypatch, tmp_path):
    stack = _stack_file(tmp_path / "stack.toml", tmp_path / "traces.db")
    result = _run(pytester, monkeypatch, FAULT_OFF, "--hoptrace", str(stack), "--hoptrace-fail-on", "duplicate_validation")
    out = result.stdout.str()
    # Its asserts pass (checkout answers 200), yet the gateway and payment both validated the token.
    assert "FAILED test_checkout_flow.py::test_complete_purchase_flow - hoptrace" in out
    assert "Checkout failed" not in out
    failure = out[out.index("_ test_complete_purchase_flow _") :]
    assert failure.startswith("_ test_complete_purchase_flow _")
    assert "hoptrace: --hoptrace-fail-on duplicate_validation: 1 finding on this test's requests" in failure
    # The request it is on, with its finding and its tree: two validations of one token.
    request = failure[failure.index("request ") :]
    assert request.startswith("request ") and "gateway POST /checkout 200" in request.splitlines()[0]
    assert (
        "warning duplicate_validation" in request and "├─ auth GET /verify" in request and "└─ auth POST /introspect" in request
    )


@pytest.mark.e2e
def test_bad_options_are_one_usage_error(pytester, tmp_path):
    stack = _stack_file(tmp_path / "stack.toml", tmp_path / "traces.db")
    pytester.makepyfile("def test_nothing(): pass")
    # In-process: the options are refused before anything starts.
    bad_kind = pytester.runpytest("--hoptrace", str(stack), "--hoptrace-fail-on", "expired")
    assert bad_kind.ret == pytest.ExitCode.USAGE_ERROR
    assert "'expired' is neither a finding kind" in bad_kind.stderr.str()
    bad_route = pytester.runpytest("--hoptrace-route", "gateway=ftp://x@1")
    assert bad_route.ret == pytest.ExitCode.USAGE_ERROR and "must be an http://" in bad_route.stderr.str()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        busy = pytester.runpytest_subprocess("--hoptrace-route", f"gateway=http://127.0.0.1:{free_port()}@{port}", timeout=60)
    assert busy.ret == pytest.ExitCode.USAGE_ERROR
    assert (
        f"hoptrace: hoptrace proxy did not start (Error: route gateway: port 127.0.0.1:{port} is already in use)"
        in busy.stdout.str()
    )


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    routes=st.lists(
        st.text(max_size=40) | st.from_regex(r"[a-z]{1,6}=https?://127\.0\.0\.1:[0-9]{1,6}@[0-9]{1,6}", fullmatch=True),
        max_size=3,
    ),
    fail_on=st.none() | st.text(max_size=30) | st.sampled_from(["error", "expired_mid_flow,warning", " , "]),
    stack=st.none() | st.text(max_size=200),
)
def test_any_option_value_is_accepted_or_one_clear_error(tmp_path, routes, fail_on, stack):
    from hoptrace._errors import HoptraceError
    from hoptrace.pytest_plugin import Settings

    stack_file = None
    if stack is not None:
        stack_file = tmp_path / "stack.toml"
        stack_file.write_text(stack, encoding="utf-8", errors="surrogateescape")
    opt = argparse.Namespace(
        hoptrace_stack=stack_file, hoptrace_routes=routes, hoptrace_entry=None, hoptrace_db=None,
        hoptrace_fail_on=fail_on, hoptrace_report=None, hoptrace_openapi=[],
    )  # fmt: skip
    if not routes and stack is None:
        return  # the plugin stays off
    try:
        settings_ = Settings.from_options(opt)
    except HoptraceError as exc:
        assert str(exc) and "\n" not in str(exc)
    else:
        assert settings_.routes and settings_.entry in {r.name for r in settings_.routes}


@pytest.mark.e2e
def test_the_plugin_is_inert_without_its_options(pytester):
    pytester.makepyfile(
        """
        def test_no_capture(pytestconfig):
            assert pytestconfig.pluginmanager.get_plugin("hoptrace-capture") is None
        def test_fixture_says_what_it_needs(hoptrace):
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest", "-p", "no:anyio", timeout=60)
    result.assert_outcomes(passed=1, errors=1)
    assert "the hoptrace fixture needs pytest --hoptrace STACK.toml" in result.stdout.str()
    assert "= hoptrace =" not in result.stdout.str()


# -- the report's pure steps, on a trace recorded from the stack (sample_traces/) ---------

SAMPLES = Path(__file__).resolve().parent.parent / "sample_traces"


@pytest.fixture(scope="module")
def expiry():
    from hoptrace.analyzer import analyze

    return analyze(SAMPLES / "checkout-expiry.db")


def _entry_hops(analysis, tag_of):
    roots = analysis.hops[analysis.hops["depth"] == 0]
    return [(int(h), float(t), tag_of(int(h))) for h, t in zip(roots.index, roots["started_at"])]


def test_the_caller_is_the_findings_own_else_the_parent_hops_service(expiry):
    from hoptrace._pytest_report import caller_of

    f = expiry.findings[expiry.findings["kind"] == "expired_mid_flow"].iloc[0].to_dict()
    assert caller_of(f, expiry.hops) == "payment"
    assert caller_of({**f, "caller": "billing"}, expiry.hops) == "billing"  # a detector that names it wins
    assert caller_of({**f, "caller": None}, expiry.hops) == "payment"
    root = int(f["trace"])
    assert caller_of({"hop_ids": [root]}, expiry.hops) == "client"
    assert caller_of({"hop_ids": []}, expiry.hops) is None


def test_attribution_by_header_by_window_and_both(expiry):
    from hoptrace._pytest_report import attribute
    from hoptrace.pytest_plugin import RequestsOfTest

    entry = _entry_hops(expiry, lambda hop: None)
    (first, t0, _), (second, t1, _), (third, t2, _) = entry[:3]
    # Untagged: the window decides.
    test = RequestsOfTest("t::window", t0, t1)
    attribute(test, entry, expiry)
    assert test.roots == [first, second] and test.by == "window" and test.foreign == 0
    # The header wins over the window: another test's tagged request inside the window is not ours.
    tags = {first: "t::a", second: "t::b", third: "t::a"}
    tagged = _entry_hops(expiry, tags.get)
    test = RequestsOfTest("t::a", t1, t1)
    attribute(test, tagged, expiry)
    assert test.roots == [first, third] and test.by == "header" and test.foreign == 1
    # Tagged requests plus untagged ones in the window.
    mixed = [(h, t, tags.get(h) if h != third else None) for h, t, _ in entry]
    test = RequestsOfTest("t::a", t2, t2)
    attribute(test, mixed, expiry)
    assert test.roots == [first, third] and test.by == "header+window"


def test_the_failing_requests_section_tells_the_token_story(expiry):
    from hoptrace._pytest_report import attribute, section, token_story
    from hoptrace.pytest_plugin import RequestsOfTest

    late = int(expiry.findings[expiry.findings["kind"] == "expired_mid_flow"]["trace"].iloc[0])
    story = token_story(expiry, late)
    assert re.fullmatch(
        r"POST /checkout 401: gateway validated the token \(auth GET /verify\) with 0\.\d s left; "
        r"payment validated it \(auth POST /introspect\) 0\.\d s after exp",
        story,
    ), story
    start = float(expiry.hops.at[late, "started_at"])
    test = RequestsOfTest("t::checkout", start, start)
    attribute(test, _entry_hops(expiry, lambda hop: None), expiry)
    text = section(test, expiry)
    assert f"Failing request {late}: gateway POST /checkout 401" in text
    assert "error expired_mid_flow" in text and f"(request {late}, payment -> auth)" in text
    assert "       └─ auth POST /introspect" in text
