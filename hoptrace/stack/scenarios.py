"""The sample stack recorded through a real `hoptrace proxy`: the demo, `sample_traces/` and the e2e tests.

:func:`record` starts the five services in this event loop, `hoptrace proxy` as a
child process with one listener per service, points every service at the listeners,
drives a workload through the gateway's listener, then stops the proxy with SIGINT
the way a user would. Each :data:`SCENARIOS` entry is one story the stack can tell.
"""

from __future__ import annotations

import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from hoptrace._errors import HoptraceError
from hoptrace._ports import free_port
from hoptrace.stack import (
    SERVICES,
    FlowResult,
    StackConfig,
    run_checkout_flow,
    run_users,
    start_stack,
)
from hoptrace.stack.workload import DEFAULT_PASSWORD

Drive = Callable[[str, Mapping[str, str]], Awaitable[list[FlowResult]]]
"""drive(the gateway's proxy listener, each service's own address, which the proxy does not see)."""


@dataclass
class Recording:
    db: Path
    flows: list[FlowResult]
    service_stats: dict[str, dict[str, Any]]
    proxy_exit: int
    proxy_output: str


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    config: dict = field(default_factory=dict)
    users: int = 4
    # Users (by index) whose checkout waits until this little of their token is left,
    # so payment's re-validation, `work_seconds` later, finds it expired.
    late_users: tuple[int, ...] = ()
    late_remaining: float = 0.4
    # Users who signed up straight at auth before the capture (the proxy never saw their
    # token issued), and come back with the token they kept once the others are done.
    returning_users: int = 0

    def stack_config(self, **overrides) -> StackConfig:
        return StackConfig(**{"token_ttl": 3, "work_seconds": 1.0, **self.config, **overrides})

    async def drive(self, gateway_url: str, services: Mapping[str, str] | None = None) -> list[FlowResult]:
        kept = await _signed_up_before(services, [self._returning(i) for i in range(self.returning_users)])
        on_time = run_users(
            gateway_url, self.users - len(self.late_users), email_prefix=f"{self.name}-user",
            refresh_twice=self.config.get("refresh_race", False),
        )  # fmt: skip
        late = [
            run_checkout_flow(gateway_url, f"{self.name}-late-{i}@example.test", checkout_when_remaining=self.late_remaining)
            for i in self.late_users
        ]
        results = await asyncio.gather(on_time, *late)
        back = [run_checkout_flow(gateway_url, self._returning(i), kept_token=token) for i, token in enumerate(kept)]
        return [*results[0], *results[1:], *await asyncio.gather(*back)]

    def _returning(self, index: int) -> str:
        return f"{self.name}-returning-{index}@example.test"


async def _signed_up_before(services: Mapping[str, str] | None, emails: list[str]) -> list[str]:
    """The tokens auth's ``POST /register`` gives these users, asked of auth directly: sign-ups
    from before the capture, which no hop of it shows."""
    if not emails:
        return []
    if services is None:
        raise HoptraceError("users who signed up before the capture need auth's own address")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        tokens = []
        for email in emails:
            body = {"email": email, "password": DEFAULT_PASSWORD}
            async with session.post(f"{services['auth'].rstrip('/')}/register", json=body) as response:
                if response.status != 201:
                    raise HoptraceError(f"auth answered {response.status} to a sign-up before the capture")
                tokens.append((await response.json())["token"])
        return tokens


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "checkout-expiry",
            "The seed's bug: the gateway validates the token, payment re-validates it 1 s later, "
            "after it expired: checkout 401. Login also returns register's token.",
            users=4,
            late_users=(0,),
        ),
        Scenario("clean", "No faults, a token TTL of an hour: every flow succeeds.", config={"token_ttl": 3600}, users=4),
        Scenario(
            "clock-skew",
            "Payment's clock runs 120 s ahead: its Date header is off, and it rejects tokens auth still accepts.",
            config={"token_ttl": 60, "payment_clock_offset": 120.0},
            users=3,
        ),
        Scenario(
            "shared-client",
            "The gateway sets each user's token on one shared HTTP client: under concurrency, calls carry another user's token.",
            config={"token_ttl": 3600, "shared_client": True},
            users=8,
        ),
        Scenario(
            "flaky-retries",
            "Products answers 503 a third of the time; the gateway retries with exponential backoff.",
            config={"token_ttl": 3600, "flaky_rate": 0.35, "flaky_seed": 7},
            users=4,
        ),
        Scenario(
            "service-faults",
            "Seeds 003 and 004's failures at once: products limits requests (429, Retry-After: 1) and"
            " every client retries at once; payment forgets X-Internal-Key and cart and auth refuse it;"
            " the gateway echoes the key to the client; tokens name no cart in their aud; each client"
            " refreshes twice at once with one refresh token.",
            config={
                "token_ttl": 3600, "rate_limit": 8, "retry_no_backoff": True, "key_missing_caller": "payment",
                "leak_internal_key": True, "token_audience": ("gateway", "auth", "products", "payment"),
                "refresh_race": True,
            },
            users=6,
        ),
        Scenario(
            "rotated-key",
            "Auth signs RS256 tokens and rotates its key without overlap: two users signed up before the"
            " capture with key auth-1, auth then signs with auth-2 and publishes only it; they come back"
            " with their kept tokens and auth's /verify refuses them (401).",
            # The key rotates right after the returning users' two sign-ups: every token of the capture is auth-2's.
            config={"token_ttl": 3600, "jwt_algorithm": "RS256", "rotate_key_after": 2},
            users=3,
            returning_users=2,
        ),
        Scenario(
            "propagated",
            "Clean run with W3C traceparent forwarded by every service: the ground truth for trace inference.",
            config={"token_ttl": 3600, "propagate": "traceparent"},
            users=10,
        ),
    )
}


async def record(
    db: Path,
    config: StackConfig,
    drive: Drive,
    *,
    progress: Callable[[str], None] = lambda message: None,
    proxy_args: tuple[str, ...] = (),
) -> Recording:
    """Run the stack behind `hoptrace proxy` (given ``proxy_args`` too) into ``db`` while
    ``drive(gateway_listener_url, service_urls)`` runs."""
    listen = {name: free_port() for name in SERVICES}
    config.upstreams = {name: f"http://127.0.0.1:{port}" for name, port in listen.items()}
    config.ports = dict.fromkeys(SERVICES, 0)
    progress("starting the sample stack")
    async with await start_stack(config) as stack:
        routes = [f"--route={name}={stack.urls[name]}@{listen[name]}" for name in SERVICES]
        progress("starting hoptrace proxy in front of every service")
        proxy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "hoptrace", "proxy", "--db", str(db), "--entry", "gateway", *routes, *proxy_args,
            stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        output: list[str] = []
        reader = asyncio.create_task(_collect(proxy.stdout, output))
        try:
            await _wait_for_line(output, "proxy ready", proxy, timeout=60)
            progress("driving the checkout workflow")
            flows = await drive(f"http://127.0.0.1:{listen['gateway']}", stack.urls)
            service_stats = stack.stats()
        finally:
            if proxy.returncode is None:
                proxy.send_signal(signal.SIGINT)
            exit_code = await asyncio.wait_for(proxy.wait(), 60)
            await reader
    progress("proxy stopped; trace written")
    return Recording(db, flows, service_stats, exit_code, "".join(output))


async def _collect(stream: asyncio.StreamReader, into: list[str]) -> None:
    async for line in stream:
        into.append(line.decode(errors="replace"))


async def _wait_for_line(output: list[str], text: str, proc: asyncio.subprocess.Process, timeout: float) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not any(text in line for line in output):
        if proc.returncode is not None or loop.time() > deadline:
            raise HoptraceError(f"hoptrace proxy did not start: {''.join(output).strip() or 'no output'}")
        await asyncio.sleep(0.05)
