"""A client driving the scenario's purchase flow through the gateway, as seed 000's test did:
register → login → browse → add to cart → view cart → checkout.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import aiohttp
import jwt

STEPS: tuple[str, ...] = ("register", "login", "browse", "add_to_cart", "view_cart", "checkout")
DEFAULT_PASSWORD = "TestPass123!"
_CLIENT_TIMEOUT = aiohttp.ClientTimeout(total=60, connect=5)


@dataclass
class FlowResult:
    """What one user's flow saw. A flow stops at its first failed step, as a client would,
    so ``statuses`` holds only the steps that ran (0: no HTTP answer, see ``error``)."""

    email: str
    statuses: dict[str, int] = field(default_factory=dict)
    sub: str | None = None
    exp: int | None = None
    refresh_statuses: list[int] = field(default_factory=list)
    """With ``refresh_twice``: the answers to the two concurrent refreshes (one is refused)."""
    refresh_token: str | None = field(default=None, repr=False)
    """The one-time refresh token login gave (the refresh-race fault), secret like ``token``."""
    login_reused_token: bool | None = None
    """Whether login answered with the very token register issued (the token-reuse bug)."""
    cart_id: str | None = None
    cart_owner: str | None = None
    """Whose cart the add-to-cart step created; not ``sub`` when another user's token was used."""
    order_id: str | None = None
    amount: float | None = None
    error: str | None = None
    """Why the flow stopped, if it did."""
    failed_body: Any = None
    """The answer of the step that failed (e.g. ``{"error": "Invalid or expired token"}``)."""
    token: str | None = field(default=None, repr=False)
    """The bearer token login returned: secret, kept so tests can check it never leaks."""
    session_cookie: str = field(default_factory=lambda: secrets.token_urlsafe(24), repr=False)
    """A browser-style session cookie the client sends on every step (also must never leak)."""

    @property
    def ok(self) -> bool:
        """Every step ran, up to checkout, and answered 2xx (a user who signed in earlier
        skips register and login)."""
        return STEPS[-1] in self.statuses and all(200 <= status < 300 for status in self.statuses.values())


class _StepFailed(Exception):
    """The current step failed; its status and the reason are already on the result."""


async def run_checkout_flow(
    gateway_url: str,
    email: str,
    *,
    password: str = DEFAULT_PASSWORD,
    think_time: float = 0.0,
    checkout_when_remaining: float | None = None,
    session: aiohttp.ClientSession | None = None,
    refresh_twice: bool = False,
    kept_token: str | None = None,
) -> FlowResult:
    """Run one user's purchase flow against ``gateway_url`` and report every step.

    ``think_time`` is slept between steps. With ``checkout_when_remaining`` the client reads
    its own token's ``exp`` (unverified: clients don't hold the secret) and waits until only
    that many seconds of its life remain before checking out, which makes the expiry between
    the gateway's validation and payment's re-validation happen on purpose. With
    ``refresh_twice`` the client sends the refresh token login gave it to ``/auth/refresh``
    twice at once (the refresh-race fault), then goes on with the token that came back. With
    ``kept_token`` the user signed in earlier: no register or login, the flow starts at
    browsing with the token the client kept.
    """
    if session is None:
        async with aiohttp.ClientSession(timeout=_CLIENT_TIMEOUT) as own_session:
            return await _flow(
                gateway_url, email, password, think_time, checkout_when_remaining, own_session, refresh_twice, kept_token
            )
    return await _flow(gateway_url, email, password, think_time, checkout_when_remaining, session, refresh_twice, kept_token)


async def run_users(
    gateway_url: str,
    n_users: int,
    *,
    concurrency: int = 50,
    think_time: float = 0.0,
    checkout_when_remaining: float | None = None,
    email_prefix: str | None = None,
    refresh_twice: bool = False,
) -> list[FlowResult]:
    """Run ``n_users`` flows, at most ``concurrency`` at a time, with unique emails.

    Results come back in user order. Emails carry a random run tag unless ``email_prefix``
    is given, so repeated runs against one stack don't collide on register (409).
    """
    if n_users < 0 or concurrency < 1:
        raise ValueError("n_users must be >= 0 and concurrency >= 1")
    prefix = email_prefix if email_prefix is not None else f"user-{uuid.uuid4().hex[:8]}"
    slots = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(timeout=_CLIENT_TIMEOUT, connector=connector) as session:

        async def one(index: int) -> FlowResult:
            async with slots:
                return await run_checkout_flow(
                    gateway_url,
                    f"{prefix}-{index}@example.test",
                    think_time=think_time,
                    checkout_when_remaining=checkout_when_remaining,
                    session=session,
                    refresh_twice=refresh_twice,
                )

        return list(await asyncio.gather(*(one(i) for i in range(n_users))))


async def _flow(
    base: str,
    email: str,
    password: str,
    think_time: float,
    checkout_when_remaining: float | None,
    session: aiohttp.ClientSession,
    refresh_twice: bool = False,
    kept_token: str | None = None,
) -> FlowResult:
    base = base.rstrip("/")
    result = FlowResult(email)

    async def step(
        name: str, method: str, path: str, token: str | None = None, body: Any = None
    ) -> Any:
        if result.statuses and think_time > 0:
            await asyncio.sleep(think_time)
        headers = {"Cookie": f"session={result.session_cookie}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            async with session.request(method, base + path, json=body, headers=headers) as response:
                raw = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            result.statuses[name] = 0
            result.error = f"{name}: {exc!r}"
            raise _StepFailed from exc
        result.statuses[name] = response.status
        payload = _parse(raw)
        if not 200 <= response.status < 300:
            result.error = f"{name}: HTTP {response.status}"
            result.failed_body = payload
            raise _StepFailed
        return payload

    credentials = {"email": email, "password": password}
    try:
        token = kept_token or await _sign_in(step, credentials, result)
        if refresh_twice and isinstance(result.refresh_token, str):
            token = await _refresh_twice(session, base, result.refresh_token, result) or token
        result.token = token
        claims = jwt.decode(token, options={"verify_signature": False})
        result.sub, result.exp = claims.get("sub"), claims.get("exp")

        products = await step("browse", "GET", "/products", token)
        item = {"product_id": products[0]["id"], "quantity": 2}
        cart = await step("add_to_cart", "POST", "/cart/items", token, item)
        result.cart_id, result.cart_owner = cart["cart_id"], cart["owner"]
        await step("view_cart", "GET", f"/cart/{quote(result.cart_id, safe='')}", token)

        if checkout_when_remaining is not None and isinstance(result.exp, int):
            await asyncio.sleep(max(0.0, result.exp - checkout_when_remaining - time.time()))
        order = await step(
            "checkout",
            "POST",
            "/checkout",
            token,
            {"cart_id": result.cart_id, "payment_method": "credit_card"},
        )
        result.order_id, result.amount = order["order_id"], order["amount"]
    except _StepFailed:
        pass
    except (KeyError, IndexError, TypeError, jwt.PyJWTError) as exc:
        # A 2xx whose body is not what the gateway sends (e.g. something else answered).
        result.error = f"unexpected answer: {exc!r}"
    return result


async def _sign_in(step, credentials: dict[str, str], result: FlowResult) -> str:
    """Register, then log in: the token login answered with."""
    registered = (await step("register", "POST", "/auth/register", body=credentials))["token"]
    login = await step("login", "POST", "/auth/login", body=credentials)
    result.login_reused_token = login["token"] == registered
    result.refresh_token = login.get("refresh_token")
    return login["token"]


async def _refresh_twice(session: aiohttp.ClientSession, base: str, refresh_token: str, result: FlowResult) -> str | None:
    """Two refreshes at once with one refresh token, as two tabs of one app might send;
    the token of the one that succeeded, if one did."""

    async def one() -> tuple[int, Any]:
        body = {"grant_type": "refresh_token", "refresh_token": refresh_token}
        async with session.post(base + "/auth/refresh", json=body) as response:
            return response.status, _parse(await response.read())

    answers = await asyncio.gather(one(), one())
    result.refresh_statuses = [status for status, _ in answers]
    won = [body for status, body in answers if status == 200 and isinstance(body, dict)]
    return won[0].get("token") if won else None


def _parse(raw: bytes) -> Any:
    """JSON if the body is JSON, else its text (aiohttp's own error pages are plain text)."""
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
