"""The sample stack, run for real: five aiohttp services on free 127.0.0.1 ports, driven by
a real HTTP client. Where a test needs to see the hops between services it puts a
recording relay (a real HTTP hop, like the proxy) on every service's upstream URL.
"""

from __future__ import annotations

import asyncio
import itertools
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import aiohttp
import click
import jwt
import pytest
from aiohttp import web
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from hoptrace.stack import (
    SERVICES,
    RunningStack,
    StackConfig,
    run_checkout_flow,
    run_users,
    start_stack,
)
from hoptrace.stack._cli import stack as stack_command
from hoptrace.stack.client import RETRY_BACKOFF
from hoptrace.stack.config import StackError
from hoptrace.stack.services import CATALOG
from hoptrace.stack.tracing import TraceContext

T = TypeVar("T")
TRACEPARENT_RE = re.compile(r"^00-([0-9a-f]{32})-([0-9a-f]{16})-01$")
CLIENT_TRACEPARENT = "00-" + "ab" * 16 + "-" + "cd" * 8 + "-01"


def run(coro: Awaitable[T]) -> T:
    return asyncio.run(coro)  # type: ignore[arg-type]


def config(**overrides: Any) -> StackConfig:
    """Free ports, and payment work short enough not to matter unless a test wants it."""
    settings_: dict[str, Any] = {"ports": {name: 0 for name in SERVICES}, "work_seconds": 0.05}
    return StackConfig(**{**settings_, **overrides})


@dataclass
class Hop:
    service: str
    method: str
    path: str
    headers: dict[str, str]
    at: float


class Relays:
    """One forwarding HTTP hop in front of each service, recording every request it relays."""

    _NOT_FORWARDED = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}

    def __init__(self) -> None:
        self.hops: list[Hop] = []
        self.urls: dict[str, str] = {}
        self.targets: dict[str, str] = {}
        self._runners: list[web.AppRunner] = []

    async def start(self, session: aiohttp.ClientSession) -> None:
        for service in SERVICES:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._handler(service, session))
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
            port = runner.addresses[0][1]
            self.urls[service] = f"http://127.0.0.1:{port}"

    def _handler(
        self, service: str, session: aiohttp.ClientSession
    ) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def relay(request: web.Request) -> web.Response:
            headers = {
                name: value
                for name, value in request.headers.items()
                if name.lower() not in self._NOT_FORWARDED
            }
            self.hops.append(Hop(service, request.method, request.path, headers, time.monotonic()))
            async with session.request(
                request.method,
                self.targets[service] + request.path_qs,
                headers=headers,
                data=await request.read(),
            ) as response:
                return web.Response(
                    status=response.status,
                    body=await response.read(),
                    content_type=response.content_type,
                    # A limited service's Retry-After must reach the caller as the proxy passes it on.
                    headers={k: v for k, v in response.headers.items() if k.lower() == "retry-after"},
                )

        return relay

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()

    def to(self, service: str) -> list[Hop]:
        return [hop for hop in self.hops if hop.service == service]


@asynccontextmanager
async def relayed_stack(**overrides: Any) -> AsyncIterator[tuple[RunningStack, Relays]]:
    """A stack whose services reach each other only through recording relays."""
    async with aiohttp.ClientSession() as session:
        relays = Relays()
        await relays.start(session)
        try:
            async with await start_stack(
                config(upstreams=dict(relays.urls), **overrides)
            ) as running:
                relays.targets.update(running.urls)
                yield running, relays
        finally:
            await relays.stop()


async def get_json(url: str, **kwargs: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


async def post_json(url: str, body: Any, **kwargs: Any) -> tuple[int, Any, Any]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, **kwargs) as response:
        return response.status, await response.json(content_type=None), response.headers


# --- the scenario -----------------------------------------------------------------------


def test_happy_path_is_all_2xx_and_every_hop_goes_through_the_upstreams() -> None:
    async def scenario() -> None:
        async with relayed_stack() as (running, relays):
            result = await run_checkout_flow(running.urls["gateway"], "happy@example.test")

            assert result.ok, result
            assert result.statuses == {
                "register": 201,
                "login": 200,
                "browse": 200,
                "add_to_cart": 201,
                "view_cart": 200,
                "checkout": 200,
            }
            assert result.order_id and result.amount == round(2 * CATALOG[0]["price"], 2)
            assert result.cart_owner == result.sub

            stats = running.stats()
            assert stats["gateway"]["total"] == 6
            assert stats["auth"]["requests"] == {
                "POST /register": 1,
                "POST /login": 1,
                "GET /verify": 4,  # browse, add to cart, view cart, checkout
                "POST /introspect": 1,  # payment's own re-validation
            }
            assert stats["products"]["requests"] == {
                "GET /products": 1,
                "GET /products/{product_id}": 1,
            }
            assert stats["cart"]["requests"] == {"POST /cart/items": 1, "GET /cart/{cart_id}": 2}
            assert stats["payment"]["requests"] == {"POST /checkout": 1}
            # Every service-to-service call crossed its relay: none bypassed the upstream URL.
            for service in ("auth", "products", "cart", "payment"):
                assert len(relays.to(service)) == stats[service]["total"], service
            # No fault, no trace context: the default stack is the scenario as it was.
            for hop in relays.hops:
                assert not {"traceparent", "tracestate", "x-request-id"} & {
                    h.lower() for h in hop.headers
                }
            # Each hop names its caller, so a recorder can tell who made it.
            assert {hop.headers["User-Agent"] for hop in relays.to("cart")} == {
                "hoptrace-stack-gateway",
                "hoptrace-stack-payment",
            }

            # /_stats over HTTP is the same account, and reading it is not counted.
            for _ in range(2):
                status, served, _headers = await get_json(f"{running.urls['auth']}/_stats")
                assert status == 200 and served == stats["auth"]

    run(scenario())


def test_checkout_fails_401_when_the_token_expires_between_gateway_and_payment() -> None:
    async def scenario() -> None:
        async with await start_stack(config(token_ttl=2, work_seconds=1.0)) as running:
            result = await run_checkout_flow(
                running.urls["gateway"], "late@example.test", checkout_when_remaining=0.4
            )
            stats = running.stats()

        assert result.statuses == {
            "register": 201,
            "login": 200,
            "browse": 200,
            "add_to_cart": 201,
            "view_cart": 200,
            "checkout": 401,
        }
        assert result.failed_body == {"error": "Invalid or expired token"}
        # The gateway accepted the token for checkout and forwarded it; payment's own
        # re-validation one second of work later is what auth refused.
        assert stats["auth"]["requests"]["GET /verify"] == 4
        assert stats["auth"]["requests"]["POST /introspect"] == 1
        assert stats["auth"]["statuses"] == {"200": 5, "201": 1, "401": 1}
        assert stats["payment"]["statuses"] == {"401": 1}

    run(scenario())


def test_login_returns_the_token_register_issued_until_it_expires() -> None:
    async def scenario() -> None:
        async with await start_stack(config(token_ttl=2)) as running:
            gateway = running.urls["gateway"]
            credentials = {"email": "reuse@example.test", "password": "pw"}
            async with aiohttp.ClientSession() as session:
                async with session.post(f"{gateway}/auth/register", json=credentials) as response:
                    assert response.status == 201
                    registered = (await response.json())["token"]
                async with session.post(f"{gateway}/auth/login", json=credentials) as response:
                    assert response.status == 200
                    assert (await response.json())["token"] == registered

                exp = jwt.decode(registered, options={"verify_signature": False})["exp"]
                await asyncio.sleep(max(0.0, exp - time.time()) + 0.05)
                async with session.post(f"{gateway}/auth/login", json=credentials) as response:
                    assert response.status == 200
                    fresh = (await response.json())["token"]
                async with session.post(
                    f"{gateway}/auth/login", json={**credentials, "password": "no"}
                ) as response:
                    assert response.status == 401

        assert fresh != registered
        assert jwt.decode(fresh, options={"verify_signature": False})["exp"] > exp

    run(scenario())


# --- the faults -------------------------------------------------------------------------


def test_payment_clock_offset_skews_its_date_and_rejects_a_token_auth_accepts() -> None:
    offset = 7200.0

    async def scenario() -> None:
        async with await start_stack(config(payment_clock_offset=offset)) as running:
            result = await run_checkout_flow(running.urls["gateway"], "skew@example.test")
            now = time.time()
            _status, _body, payment_headers = await get_json(f"{running.urls['payment']}/_stats")
            _status, _body, auth_headers = await get_json(f"{running.urls['auth']}/_stats")
            # Logging in again hands back the same token: auth still accepts it.
            async with (
                aiohttp.ClientSession() as session,
                session.post(
                    f"{running.urls['gateway']}/auth/login",
                    json={"email": "skew@example.test", "password": "TestPass123!"},
                ) as response,
            ):
                token = (await response.json())["token"]
            status, verdict, _headers = await get_json(
                f"{running.urls['gateway']}/auth/verify",
                headers={"Authorization": f"Bearer {token}"},
            )
            stats = running.stats()

        assert result.statuses["checkout"] == 401
        assert result.failed_body == {"error": "token expired (payment clock)"}
        assert status == 200 and verdict["valid"] is True and verdict["sub"] == result.sub
        # Payment judged the token itself and never asked auth.
        assert "POST /introspect" not in stats["auth"]["requests"]
        payment_date = parsedate_to_datetime(payment_headers["Date"]).timestamp()
        auth_date = parsedate_to_datetime(auth_headers["Date"]).timestamp()
        assert abs(payment_date - (now + offset)) < 5
        assert abs(auth_date - now) < 5

    run(scenario())


def test_shared_client_sends_other_users_tokens_under_concurrency() -> None:
    async def flows(shared: bool) -> tuple[list[Any], dict[str, dict[str, Any]]]:
        async with await start_stack(config(shared_client=shared)) as running:
            results = await run_users(running.urls["gateway"], 12)
            return results, running.stats()

    leaky, leaky_stats = run(flows(shared=True))
    crossed = [r for r in leaky if r.cart_owner is not None and r.cart_owner != r.sub]
    assert crossed, "no flow's cart was created under another user's token"
    assert sum(stats["identity_mismatches"] for stats in leaky_stats.values()) > 0
    assert leaky_stats["products"]["identity_mismatches"] > 0

    correct, correct_stats = run(flows(shared=False))
    assert all(r.ok and r.cart_owner == r.sub for r in correct)
    assert sum(stats["identity_mismatches"] for stats in correct_stats.values()) == 0


def test_flaky_products_are_retried_with_growing_backoff_and_counted() -> None:
    async def scenario() -> tuple[list[Any], dict[str, dict[str, Any]], list[Hop]]:
        async with relayed_stack(flaky_rate=0.5, flaky_seed=3, propagate="traceparent") as (
            running,
            relays,
        ):
            # Sequential flows: the seeded draws then fail the same calls on every run.
            results = [
                await run_checkout_flow(running.urls["gateway"], f"flaky{i}@example.test")
                for i in range(4)
            ]
            return results, running.stats(), relays.to("products")

    results, stats, product_hops = run(scenario())
    failures = stats["products"]["statuses"].get("503", 0)
    retries = sum(s["retries"] for s in stats.values())
    exhausted = sum(s["retries_exhausted"] for s in stats.values())
    assert failures > 0 and retries > 0
    # Every 503 was followed by a retry, or was the last attempt of a call that gave up.
    assert failures == retries + exhausted
    assert stats["products"]["total"] == len(product_hops)
    assert any(result.ok for result in results)

    # Attempts of one logical call share their parent span; their gaps follow the backoff.
    calls: dict[tuple[str, str], list[float]] = defaultdict(list)
    for hop in product_hops:
        calls[(hop.headers["tracestate"], hop.path)].append(hop.at)
    retried = [times for times in calls.values() if len(times) > 1]
    assert retried
    for times in retried:
        assert len(times) <= 1 + len(RETRY_BACKOFF)
        for attempt, (earlier, later) in enumerate(zip(times, times[1:], strict=False)):
            assert later - earlier >= RETRY_BACKOFF[attempt] * 0.9


def test_a_products_outage_costs_exactly_one_call_plus_three_retries() -> None:
    async def scenario() -> tuple[Any, dict[str, dict[str, Any]]]:
        async with await start_stack(config(flaky_rate=1.0)) as running:
            result = await run_checkout_flow(running.urls["gateway"], "down@example.test")
            return result, running.stats()

    result, stats = run(scenario())
    assert result.statuses["browse"] == 503 and "add_to_cart" not in result.statuses
    assert stats["products"]["statuses"] == {"503": 1 + len(RETRY_BACKOFF)}
    assert (stats["gateway"]["retries"], stats["gateway"]["retries_exhausted"]) == (
        len(RETRY_BACKOFF),
        1,
    )


def test_traceparent_gives_every_hop_of_a_request_one_trace_and_its_parent() -> None:
    async def scenario() -> tuple[list[Hop], list[Hop], str]:
        async with relayed_stack(propagate="traceparent") as (running, relays):
            result = await run_checkout_flow(running.urls["gateway"], "trace@example.test")
            assert result.ok, result
            flow_hops = list(relays.hops)
            async with aiohttp.ClientSession() as session:
                # Login hands back the flow's token (the reuse bug): use it once more.
                async with session.post(
                    f"{running.urls['gateway']}/auth/login",
                    json={"email": result.email, "password": "TestPass123!"},
                ) as response:
                    token = (await response.json())["token"]
                mark = len(relays.hops)
                # A client that sends its own context gets it continued, and echoed back.
                async with session.get(
                    f"{running.urls['gateway']}/products",
                    headers={"Authorization": f"Bearer {token}", "traceparent": CLIENT_TRACEPARENT},
                ) as response:
                    assert response.status == 200
                    echoed = response.headers["traceresponse"]
            return flow_hops, relays.hops[mark:], echoed

    flow_hops, client_traced, echoed = run(scenario())

    spans = {}
    traces: dict[str, list[Hop]] = defaultdict(list)
    for hop in flow_hops:
        match = TRACEPARENT_RE.match(hop.headers["traceparent"])
        assert match, hop.headers["traceparent"]
        trace_id, span_id = match.groups()
        assert span_id not in spans, "span ids must be unique per outgoing call"
        spans[span_id] = hop
        traces[trace_id].append(hop)
    assert len(traces) == 6  # one trace per client request of the flow

    [checkout] = [hops for hops in traces.values() if any(h.path == "/checkout" for h in hops)]
    assert [(h.service, h.method, h.path.split("/")[1]) for h in checkout] == [
        ("auth", "GET", "verify"),
        ("payment", "POST", "checkout"),
        ("cart", "GET", "cart"),
        ("auth", "POST", "introspect"),
    ]
    verify, payment, cart, introspect = (_parent(hop) for hop in checkout)
    assert verify == payment  # both made by the gateway while serving the client's request
    payment_span = TRACEPARENT_RE.match(checkout[1].headers["traceparent"])[2]  # type: ignore[index]
    assert cart == introspect == payment_span  # made by payment while serving that call

    assert [h.path for h in client_traced] == ["/verify", "/products"]
    for hop in client_traced:
        assert TRACEPARENT_RE.match(hop.headers["traceparent"])[1] == "ab" * 16  # type: ignore[index]
        assert _parent(hop) == "cd" * 8
    assert echoed == CLIENT_TRACEPARENT


def test_x_request_id_is_forwarded_unchanged_on_every_hop() -> None:
    async def scenario() -> tuple[Any, list[Hop]]:
        async with relayed_stack(propagate="x-request-id") as (running, relays):
            result = await run_checkout_flow(running.urls["gateway"], "rid@example.test")
            return result, relays.hops

    result, hops = run(scenario())
    assert result.ok, result
    paths_by_id: dict[str, list[str]] = defaultdict(list)
    for hop in hops:
        paths_by_id[hop.headers["X-Request-ID"]].append(hop.path)
    assert len(paths_by_id) == 6  # one id per client request of the flow
    assert [
        "/verify",
        "/checkout",
        f"/cart/{result.cart_id}",
        "/introspect",
    ] in paths_by_id.values()


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=120), st.text(max_size=300))
def test_trace_context_survives_any_incoming_headers(traceparent: str, tracestate: str) -> None:
    context = TraceContext.from_headers(
        "traceparent", {"traceparent": traceparent, "tracestate": tracestate}
    )
    outgoing = context.outgoing_headers()
    assert TRACEPARENT_RE.match(outgoing["traceparent"])
    assert outgoing["tracestate"].startswith(f"hoptrace={context.span_id}")
    assert len(outgoing["tracestate"].split(",")) <= 32


def _parent(hop: Hop) -> str:
    entry = hop.headers["tracestate"].split(",")[0]
    assert entry.startswith("hoptrace=")
    return entry.removeprefix("hoptrace=")


# --- CLI --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["--port", "nope=1"],
        ["--port", "auth=abc"],
        ["--port", "auth"],
        ["--port", "auth=70000"],
        ["--port", "auth=0", "--port", "auth=0"],
        ["--port", "auth=3101", "--port", "cart=3101"],
        ["--upstream", "auth=http://example.com:80"],
        ["--upstream", "auth=not a url"],
        ["--ttl", "0"],
        ["--ttl", "soon"],
        ["--work-seconds", "-1"],
        ["--flaky-rate", "1.5"],
        ["--propagate", "zipkin"],
        ["--rate-limit", "-3"],
        ["--key-missing-caller", "billing"],
        ["--token-audience", ""],
        ["--rotate-key-after", "2"],  # an HS256 secret has no published key to rotate
        ["--jwt-algorithm", "RS256", "--rotate-key-after", "-1"],
        ["--jwt-algorithm", "none"],
        ["--bogus"],
    ],
)
def test_cli_rejects_bad_input_in_one_line_with_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(stack_command, args)
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output


def test_cli_reports_a_port_in_use_in_one_line_with_exit_2() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        args = [arg for name in SERVICES if name != "auth" for arg in ("--port", f"{name}=0")]
        result = CliRunner().invoke(stack_command, [*args, "--port", f"auth={port}"])
    assert result.exit_code == 2
    assert (
        result.output.strip() == f"Error: cannot listen for auth on 127.0.0.1:{port}: port in use"
    )


def test_cli_help_has_an_example() -> None:
    result = CliRunner().invoke(stack_command, ["--help"])
    assert result.exit_code == 0
    assert "Example: hoptrace stack" in result.output


@contextmanager
def _stack_process(*args: str) -> Iterator[tuple[subprocess.Popen[str], queue.Queue[str]]]:
    ports = [arg for name in SERVICES for arg in ("--port", f"{name}=0")]
    proc = subprocess.Popen(
        [sys.executable, "-m", "hoptrace.stack._cli", *ports, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield proc, lines
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_cli_serves_until_signalled_then_exits_0(signum: signal.Signals) -> None:
    with _stack_process("--propagate", "x-request-id") as (proc, lines):
        seen: dict[str, str] = {}
        deadline = time.monotonic() + 20
        while (line := lines.get(timeout=max(0.1, deadline - time.monotonic()))) != "stack ready":
            name, url = line.split()[:2]
            seen[name] = url
        assert list(seen) == list(SERVICES)
        assert all(url.startswith("http://127.0.0.1:") for url in seen.values())

        status, body, headers = run(get_json(f"{seen['gateway']}/products"))
        assert status == 401 and body == {"error": "No token provided"}
        assert headers["X-Request-ID"]

        proc.send_signal(signum)
        assert proc.wait(timeout=15) == 0
        assert lines.get(timeout=5) == "stack stopped"


# --- the faults of seeds 003 and 004 ------------------------------------------------------


def test_rate_limit_answers_429_with_retry_after_and_no_backoff_retries_at_once() -> None:
    async def scenario() -> None:
        async with relayed_stack(rate_limit=2, retry_no_backoff=True) as (running, relays):
            results = await run_users(running.urls["gateway"], 4, email_prefix="limited")
            stats = running.stats()
        calls = sorted(hop.at for hop in relays.to("products"))
        # Every GET that met a 429 was retried 3 times: more calls than products served.
        assert stats["products"]["statuses"]["429"] >= 4
        assert stats["gateway"]["retries"] + stats["cart"]["retries"] >= 3
        limited = [r for r in results if not r.ok]
        assert limited and all(r.statuses.get("browse") in (200, 429) for r in results)
        # No backoff: a retry follows the 429 within a few ms, far sooner than Retry-After's 1 s.
        assert min(b - a for a, b in itertools.pairwise(calls)) < 0.2

    run(scenario())


def test_a_limited_call_waits_for_retry_after_when_the_client_honours_it() -> None:
    async def scenario() -> None:
        async with relayed_stack(rate_limit=1) as (running, relays):
            started = time.monotonic()
            status, _body, _headers = await get_json(f"{running.urls['products']}/products")  # uses the one slot
            result = await run_checkout_flow(running.urls["gateway"], "patient@example.test")
            took = time.monotonic() - started
        assert status == 200 and result.statuses["browse"] == 200
        # The gateway's call met 429, waited Retry-After (1 s), then got through.
        browse = [hop.at for hop in relays.to("products") if hop.path == "/products"]
        assert len(browse) == 2 and browse[1] - browse[0] >= 0.95 and took >= 1.0

    run(scenario())


def test_missing_internal_key_is_refused_and_a_leaked_one_reaches_the_client() -> None:
    async def scenario() -> None:
        key = "canary-internal-key-0123456789"
        async with relayed_stack(key_missing_caller="payment", leak_internal_key=True, internal_key=key) as (running, relays):
            result = await run_checkout_flow(running.urls["gateway"], "keyless@example.test")
            async with aiohttp.ClientSession() as session, session.get(running.urls["gateway"] + "/products") as answer:
                echoed = answer.headers.get("X-Internal-Key")
            unkeyed, _body, _ = await get_json(f"{running.urls['cart']}/cart/x")
        assert result.statuses["add_to_cart"] == 201 and result.statuses["checkout"] == 401
        assert [h.headers.get("X-Internal-Key") for h in relays.to("cart") if h.headers["User-Agent"].endswith("payment")] == [None]
        assert echoed == key
        assert unkeyed == 401

    run(scenario())


def test_audience_and_one_time_refresh_tokens() -> None:
    async def scenario() -> None:
        async with await start_stack(config(token_audience=("gateway", "products"), refresh_race=True)) as running:
            result = await run_checkout_flow(running.urls["gateway"], "racer@example.test", refresh_twice=True)
        assert result.ok, result  # nothing checks aud; the winning refresh's token works on
        assert sorted(result.refresh_statuses) == [200, 401]
        claims = jwt.decode(result.token, options={"verify_signature": False})
        assert claims["aud"] == ["gateway", "products"]

    run(scenario())


async def _register(auth_url: str, email: str) -> str:
    """A sign-up straight at auth: the token it answers with."""
    status, body, _headers = await post_json(f"{auth_url}/register", {"email": email, "password": "pw"})
    assert status == 201, body
    return body["token"]


def test_rs256_tokens_name_their_key_and_payment_checks_them_against_auth_key_set() -> None:
    async def scenario() -> None:
        async with await start_stack(config(jwt_algorithm="RS256")) as running:
            result = await run_checkout_flow(running.urls["gateway"], "signed@example.test")
            _status, jwks, _headers = await get_json(f"{running.urls['auth']}/.well-known/jwks.json")
            stats = running.stats()
        assert result.ok, result
        assert jwt.get_unverified_header(result.token) == {"alg": "RS256", "kid": "auth-1", "typ": "JWT"}
        assert [(k["kid"], k["kty"], k["alg"]) for k in jwks["keys"]] == [("auth-1", "RSA", "RS256")]
        assert "d" not in jwks["keys"][0]  # the public half only
        # Payment fetched the key set (with no token) to check the token itself before charging.
        assert stats["auth"]["requests"].get("GET /.well-known/jwks.json", 0) >= 1, stats["auth"]

    run(scenario())


def test_key_rotation_without_overlap_refuses_tokens_of_the_old_key() -> None:
    async def scenario() -> None:
        async with await start_stack(config(jwt_algorithm="RS256", rotate_key_after=1)) as running:
            kept = await _register(running.urls["auth"], "early@example.test")  # signed before the rotation
            fresh = await run_checkout_flow(running.urls["gateway"], "late@example.test")
            back = await run_checkout_flow(running.urls["gateway"], "early@example.test", kept_token=kept)
            _status, jwks, _headers = await get_json(f"{running.urls['auth']}/.well-known/jwks.json")
            verdict = await get_json(f"{running.urls['auth']}/verify", headers={"Authorization": f"Bearer {kept}"})
        assert jwt.get_unverified_header(kept)["kid"] == "auth-1"
        assert fresh.ok and jwt.get_unverified_header(fresh.token)["kid"] == "auth-2"
        assert [k["kid"] for k in jwks["keys"]] == ["auth-2"]  # the old key is gone at once: no overlap
        assert back.statuses == {"browse": 401} and back.failed_body == {"error": "Invalid or expired token"}
        assert verdict[0] == 401 and "'auth-1' is not in the key set" in verdict[1]["error"]

    run(scenario())


def test_payment_refuses_a_token_whose_key_its_key_set_lacks() -> None:
    async def scenario() -> None:
        async with await start_stack(config(jwt_algorithm="RS256")) as running:
            flow = await run_checkout_flow(running.urls["gateway"], "forged@example.test")
            # The same claims signed with a key auth never published, straight to payment.
            claims = jwt.decode(flow.token, options={"verify_signature": False})
            rogue = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            forged = jwt.encode(claims, rogue, algorithm="RS256", headers={"kid": "rogue"})
            body = {"cart_id": flow.cart_id, "payment_method": "card"}
            status, answer, _headers = await post_json(
                f"{running.urls['payment']}/checkout", body, headers={"Authorization": f"Bearer {forged}", "X-User-Id": flow.sub},
            )  # fmt: skip
        assert flow.ok and status == 401 and answer == {"error": "Invalid or expired token"}

    run(scenario())


@pytest.mark.parametrize(
    "overrides",
    [
        {"rate_limit": -1}, {"rate_limit": True}, {"key_missing_caller": "billing"}, {"token_audience": ("",)},
        {"jwt_algorithm": "none"}, {"rotate_key_after": 1}, {"jwt_algorithm": "RS256", "rotate_key_after": -1},
    ],
)  # fmt: skip
def test_fault_settings_are_checked(overrides: dict[str, Any]) -> None:
    with pytest.raises(StackError):
        config(**overrides)


@pytest.fixture(scope="module")
def faulty_recording(tmp_path_factory):
    """The service-faults scenario through the real `hoptrace proxy`, analyzed."""
    from hoptrace.analyzer import analyze

    from .conftest import record_scenario

    recording, stack_config, db = record_scenario("service-faults", tmp_path_factory.mktemp("faults"))
    return recording, stack_config, analyze(db)


@pytest.mark.e2e
@pytest.mark.parametrize(
    ("kind", "severity", "caller", "callee"),
    [
        ("retry_without_backoff", "warning", "cart", "products"),
        ("rate_limited", "warning", "cart", "products"),
        ("service_key_missing", "error", "payment", "cart"),
        ("service_key_leak", "error", "gateway", "client"),
        ("audience_mismatch", "warning", "gateway", "cart"),
        ("refresh_race", "error", "gateway", "auth"),
    ],
)
def test_each_planted_fault_is_found_with_its_caller(faulty_recording, kind, severity, caller, callee) -> None:
    recording, _config, analysis = faulty_recording
    assert recording.proxy_exit == 0
    found = analysis.findings[analysis.findings["kind"] == kind]
    mine = found[(found["caller"] == caller) & (found["callee"] == callee)]
    assert len(mine), found[["caller", "callee", "message"]].to_dict("records")
    assert set(mine["severity"]) == {severity}
    assert all(caller in m.split(":")[0] for m in mine["message"])


@pytest.mark.e2e
def test_planted_faults_leave_no_secret_in_the_file(faulty_recording) -> None:
    from .conftest import file_bytes

    recording, stack_config, _analysis = faulty_recording
    stored = file_bytes(recording.db)
    secrets = [stack_config.internal_key, stack_config.secret, *(f.token for f in recording.flows if f.token)]
    assert all(secret.encode() not in stored for secret in secrets)


FAULTS = (
    "rate_limit", "retry_no_backoff", "key_missing_caller", "leak_internal_key", "token_audience", "refresh_race",
    "rotate_key_after", "payment_clock_offset", "shared_client", "flaky_rate",
)  # fmt: skip


@pytest.mark.e2e
@pytest.mark.parametrize("name", ["clean", "rotated-key"])
def test_a_run_with_every_fault_off_has_no_error_finding(tmp_path, name) -> None:
    """Clean with HS256; and RS256 with users who signed in before the capture, keeping their key."""
    from hoptrace.analyzer import analyze
    from hoptrace.stack.scenarios import SCENARIOS, record

    scenario = SCENARIOS[name]
    defaults = StackConfig()
    off = {k: getattr(defaults, k) for k in FAULTS}
    recording = asyncio.run(record(tmp_path / "clean.db", scenario.stack_config(**off), scenario.drive))
    findings = analyze(tmp_path / "clean.db").findings
    assert recording.flows and all(flow.ok for flow in recording.flows)
    assert findings[findings["severity"] == "error"].empty, findings["message"].tolist()


@pytest.fixture(scope="module")
def rotated_recording(tmp_path_factory):
    """The rotated-key scenario through the real `hoptrace proxy`, analyzed."""
    from hoptrace.analyzer import analyze

    from .conftest import record_scenario

    recording, _stack_config, db = record_scenario("rotated-key", tmp_path_factory.mktemp("rotated"))
    return recording, db, analyze(db)


@pytest.mark.e2e
def test_a_key_rotated_without_overlap_is_found_with_its_caller(rotated_recording) -> None:
    import sqlite3

    recording, db, analysis = rotated_recording
    assert recording.proxy_exit == 0
    returning = [flow for flow in recording.flows if "-returning-" in flow.email]
    assert len(returning) == 2 and all(flow.statuses == {"browse": 401} for flow in returning)
    assert all(flow.ok for flow in recording.flows if flow not in returning)
    with sqlite3.connect(db) as conn:
        verdicts = dict(conn.execute("SELECT kid, group_concat(DISTINCT verdict) FROM tokens WHERE alg = 'RS256' GROUP BY kid"))
    # The recorder read the key set payment fetched (auth-2 only) before it first saw the kept tokens.
    assert verdicts["auth-1"] == "unknown_kid" and "unknown_kid" not in verdicts["auth-2"]
    f = analysis.findings
    found = f[f["kind"] == "unknown_signing_key"]
    mine = found[(found["caller"] == "gateway") & (found["callee"] == "auth")]
    assert len(mine) == 1, found[["caller", "callee", "message"]].to_dict("records")
    row = mine.iloc[0]
    assert (row["severity"], row["endpoint"]) == ("error", "GET /verify")
    assert row["message"].startswith("gateway sent auth GET /verify a token signed with key 'auth-1', which no key set")
    assert "(2 calls, 2 refused); the capture's other tokens name 'auth-2'" in row["message"]
    assert set(f.loc[f["severity"] == "error", "kind"]) == {"unknown_signing_key", "rejected_valid_token"}


@pytest.mark.e2e
def test_rotated_key_run_leaves_no_token_in_the_file(rotated_recording) -> None:
    from .conftest import file_bytes

    recording, db, _analysis = rotated_recording
    stored = file_bytes(db)
    tokens = [flow.token for flow in recording.flows if flow.token]
    assert len(tokens) == len(recording.flows) and not any(token.encode() in stored for token in tokens)
    assert not any(token.split(".")[2].encode() in stored for token in tokens)  # nor a signature alone


_NUMBERS = {param.opts[0]: param for param in stack_command.params if isinstance(param.type, click.IntRange | click.FloatRange)}
_OUTSIDE = st.one_of(
    st.sampled_from(["nan", "inf", "-inf", "1e20", "", "x", "²", "0x10"]),
    st.floats(min_value=1e12, allow_infinity=True).map(repr),
    st.integers(max_value=-(10**12)).map(str),
    st.integers(min_value=10**19).map(str),
)


@settings(max_examples=60, deadline=None)
@given(flag=st.sampled_from(sorted(_NUMBERS)), value=_OUTSIDE)
def test_a_number_no_stack_can_run_with_is_one_line_before_anything_starts(flag, value):
    """Every numeric option of `hoptrace stack` has bounds (a 10-year token, a 1-year clock offset,
    a share of requests within 0..1); past them, or not a number, is one line and exit 2."""
    result = CliRunner().invoke(stack_command, [flag, value])
    assert result.exit_code == 2, (flag, value, result.output)
    assert result.output.count("\n") == 1 and flag in result.output, result.output


def test_the_stack_options_are_all_bounded():
    assert {"--ttl", "--work-seconds", "--payment-clock-offset", "--flaky-rate", "--rate-limit"} <= set(_NUMBERS)
