"""The five services of the sample e-commerce stack, as aiohttp applications.

The request paths reproduce seed 000's scenario::

    client → gateway → auth      GET /verify       (every non-auth request)
                     → products  GET /products[/{id}]
                     → cart      POST /cart/items  → products GET /products/{id}
                                 GET /cart/{id}
                     → payment   POST /checkout    → cart GET /cart/{id}
                                                   → (work) → auth POST /introspect

Payment re-validating the token after its work, although the gateway already validated
it, is the scenario's bug: with a short TTL the token expires between the two checks.
Services reach each other only through ``upstreams`` base URLs, so a proxy can sit on
every hop. Each app also answers ``GET /_stats`` with its own counts (not counted).
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import hmac
import math
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from hoptrace.stack.client import NO_BACKOFF, RETRY_BACKOFF, DownstreamError, ServiceClient
from hoptrace.stack.config import StackConfig
from hoptrace.stack.stats import ServiceStats
from hoptrace.stack.tokens import (
    KeyRing,
    TokenError,
    TokenExpired,
    Verifier,
    bearer_token,
    check_token,
    issue_token,
    keys_of_jwks,
    unverified_subject,
)
from hoptrace.stack.tracing import TraceContext

STATS = web.AppKey("stats", ServiceStats)
CLIENTS = web.AppKey("clients", dict[str, ServiceClient])  # keyed by callee
TRACE = web.RequestKey("trace", TraceContext)
TOKENLESS = web.AppKey("tokenless_calls", bool)

# The identity the gateway vouches for on every forwarded call, from auth's answer.
USER_ID_HEADER = "X-User-Id"
INVALID_TOKEN = "Invalid or expired token"  # the scenario's 401 body
INTERNAL_KEY_HEADER = "X-Internal-Key"
PAYMENT_CLOCK_EXPIRED = "token expired (payment clock)"
# Stands in for whatever a handler awaits between setting the shared client's token and
# using the client (a log write, a cache lookup): any await lets another request run
# set_auth_token in between, which is all seed 004's bug needs.
SHARED_CLIENT_GAP = 0.005

# Short, so that under load some checkouts find payment's cached key set stale at once and
# fetch it concurrently: the token-less calls whose parents only timing and connections tell.
KEYSET_CACHE_SECONDS = 0.3

Clock = Callable[[], float]


def build_apps(config: StackConfig, upstreams: dict[str, str]) -> dict[str, web.Application]:
    """One application per service; ``upstreams`` is where each service is reachable."""
    return {
        "gateway": _gateway_app(config, upstreams),
        "auth": _auth_app(config, upstreams),
        "products": _products_app(config, upstreams),
        "cart": _cart_app(config, upstreams),
        "payment": _payment_app(config, upstreams),
    }


# --- plumbing shared by every service ------------------------------------------------


def _base_app(
    service: str,
    config: StackConfig,
    upstreams: dict[str, str],
    *,
    callees: Iterable[str] = (),
    middlewares: Iterable[Middleware] = (),
) -> web.Application:
    stats = ServiceStats(service)
    checks = [_require_internal_key(config.internal_key)] if config.key_missing_caller and service != "gateway" else []
    app = web.Application(middlewares=[_instrument(stats, config.propagate), *checks, *middlewares])
    app[STATS] = stats
    app.router.add_get("/_stats", _serve_stats)
    callees = tuple(callees)
    if callees:
        app.cleanup_ctx.append(_downstream_clients(service, callees, upstreams, stats, config))
    return app


def _downstream_clients(
    service: str,
    callees: tuple[str, ...],
    upstreams: dict[str, str],
    stats: ServiceStats,
    config: StackConfig,
) -> Callable[[web.Application], AsyncIterator[None]]:
    """One client session per calling service (its own connection pool, as separate
    processes would have), opened with the app and closed with it."""

    async def clients(app: web.Application) -> AsyncIterator[None]:
        # Checkout waits for payment's work, so the bound must outlast it.
        timeout = aiohttp.ClientTimeout(total=config.work_seconds + 30, connect=5)
        # The User-Agent names the caller, so a recorder can tell who made each hop.
        headers = {"User-Agent": f"hoptrace-stack-{service}"}
        if service != config.key_missing_caller:
            headers[INTERNAL_KEY_HEADER] = config.internal_key
        backoff = NO_BACKOFF if config.retry_no_backoff else RETRY_BACKOFF
        async with aiohttp.ClientSession(timeout=timeout, headers=headers) as session:
            app[CLIENTS] = {
                callee: ServiceClient(
                    session,
                    callee,
                    upstreams[callee],
                    stats,
                    backoff=backoff,
                    honour_retry_after=not config.retry_no_backoff,
                )
                for callee in callees
            }
            yield

    return clients


def _instrument(stats: ServiceStats, propagate: str) -> Middleware:
    """Count the request, attach its trace context, turn unreachable hops into 502."""

    @web.middleware
    async def instrument(request: web.Request, handler: Handler) -> web.StreamResponse:
        trace = TraceContext.from_headers(propagate, request.headers)
        request[TRACE] = trace
        counted = request.path != "/_stats"
        if counted:
            stats.record_request(f"{request.method} {_route_pattern(request)}")
            if _vouched_identity_differs(request):
                stats.identity_mismatches += 1
        try:
            response = await handler(request)
        except web.HTTPException as exc:  # aiohttp raises these itself, e.g. 404 on no route
            exc.headers.update(trace.response_headers())
            if counted:
                stats.statuses[exc.status] += 1
            raise
        except DownstreamError as exc:
            response = _error(502, str(exc))
        except Exception:
            if counted:  # aiohttp answers 500; count it as the caller will see it
                stats.statuses[500] += 1
            raise
        response.headers.update(trace.response_headers())
        if counted:
            stats.statuses[response.status] += 1
        return response

    return instrument


def _require_internal_key(key: str) -> Middleware:
    """Refuse (401) a call without the stack's internal key, as seed 004's services do."""

    @web.middleware
    async def require_key(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get(INTERNAL_KEY_HEADER, "")
        if request.path != "/_stats" and not hmac.compare_digest(given.encode(), key.encode()):
            return _error(401, "missing or wrong internal key")
        return await handler(request)

    return require_key


def _route_pattern(request: web.Request) -> str:
    resource = request.match_info.route.resource
    return resource.canonical if resource is not None else "<unmatched>"


def _vouched_identity_differs(request: web.Request) -> bool:
    """True when the gateway's X-User-Id and the bearer token name different users:
    the trace of a token crossover, seen from the service that received it."""
    vouched = request.headers.get(USER_ID_HEADER)
    token = bearer_token(request.headers.get("Authorization"))
    return vouched is not None and token is not None and unverified_subject(token) != vouched


async def _serve_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATS].to_json())


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    """The request body if it is a JSON object, else None (the caller answers 400)."""
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _identity_headers(request: web.Request) -> dict[str, str]:
    """The caller's Authorization and X-User-Id, forwarded as they came."""
    return {
        name: request.headers[name]
        for name in ("Authorization", USER_ID_HEADER)
        if name in request.headers
    }


# --- gateway ---------------------------------------------------------------------------


# The gateway's routes: (method, its path, the service behind it, the path there, validate the token first).
# Checking a token *is* auth's job: /auth/verify is passed through, not pre-validated.
_GATEWAY_ROUTES: tuple[tuple[str, str, str, Callable[[web.Request], str], bool], ...] = (
    ("POST", "/auth/register", "auth", lambda r: "/register", False),
    ("POST", "/auth/login", "auth", lambda r: "/login", False),
    ("GET", "/auth/verify", "auth", lambda r: "/verify", False),
    ("POST", "/auth/refresh", "auth", lambda r: "/refresh", False),
    ("GET", "/products", "products", lambda r: "/products", True),
    ("GET", "/products/{product_id}", "products", lambda r: f"/products/{_segment(r, 'product_id')}", True),
    ("POST", "/cart/items", "cart", lambda r: "/cart/items", True),
    ("GET", "/cart/{cart_id}", "cart", lambda r: f"/cart/{_segment(r, 'cart_id')}", True),
    ("POST", "/checkout", "payment", lambda r: "/checkout", True),
)


def _gateway_app(config: StackConfig, upstreams: dict[str, str]) -> web.Application:
    app = _base_app("gateway", config, upstreams, callees=("auth", "products", "cart", "payment"))
    if config.leak_internal_key:
        app.on_response_prepare.append(_echo_internal_key(config.internal_key))
    for method, route, service, path_of, authenticate in _GATEWAY_ROUTES:

        async def handler(request: web.Request, service=service, path_of=path_of, authenticate=authenticate) -> web.Response:
            return await _forward(request, config, service, path_of(request), authenticate=authenticate)

        app.router.add_route(method, route, handler)
    return app


async def _forward(request: web.Request, config: StackConfig, service: str, path: str, *, authenticate: bool) -> web.Response:
    """Forward a client request to ``service``; with ``authenticate``, validate its token at auth first."""
    trace = request[TRACE]
    clients = request.app[CLIENTS]
    client = clients[service]
    authorization = request.headers.get("Authorization")
    headers: dict[str, str] = {}
    body = await request.read() if request.body_exists else None
    if body is not None:
        headers["Content-Type"] = request.headers.get("Content-Type", "application/json")
    if not authenticate:
        if authorization is not None:
            headers["Authorization"] = authorization
    else:
        token = bearer_token(authorization)
        if token is None:
            return _error(401, "No token provided")
        verdict = await clients["auth"].request("GET", "/verify", trace, headers={"Authorization": f"Bearer {token}"})
        if verdict.status == 401:
            return _error(401, INVALID_TOKEN)
        identity = verdict.json_object()
        if verdict.status != 200 or identity is None or not isinstance(identity.get("sub"), str):
            return _error(502, f"auth answered {verdict.status} to /verify")
        headers[USER_ID_HEADER] = identity["sub"]
        if config.shared_client:
            # Seed 004's bug: the token lives on a client every request shares.
            client.set_auth_token(token)
            await asyncio.sleep(SHARED_CLIENT_GAP)
        else:
            headers["Authorization"] = f"Bearer {token}"
    reply = await client.request(request.method, path, trace, headers=headers, data=body)
    return web.Response(status=reply.status, body=reply.body, content_type=reply.content_type)


def _echo_internal_key(key: str) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """The leak fault: a debugging echo of the internal key on every answer to the client."""

    async def echo(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[INTERNAL_KEY_HEADER] = key

    return echo


def _segment(request: web.Request, name: str) -> str:
    return quote(request.match_info[name], safe="")


# --- auth ------------------------------------------------------------------------------


@dataclass
class _Account:
    sub: str
    salt: bytes
    password_hash: bytes
    token: str = ""


def _hash_password(salt: bytes, password: str) -> bytes:
    # A real service would use a slow KDF; this one must not spend the load tests' CPU.
    return hashlib.sha256(salt + password.encode()).digest()


def _auth_app(config: StackConfig, upstreams: dict[str, str]) -> web.Application:
    app = _base_app("auth", config, upstreams)
    accounts: dict[str, _Account] = {}
    refresh_tokens: dict[str, _Account] = {}  # one-time: used once, then gone
    clock: Clock = time.time  # expiry is judged on auth's clock
    signer, verifier, key_set = _signing(config)

    def credentials(body: dict[str, Any] | None) -> tuple[str, str] | None:
        if body is None:
            return None
        email, password = body.get("email"), body.get("password")
        if isinstance(email, str) and isinstance(password, str) and email and password:
            return email, password
        return None

    def new_token(account: _Account) -> str:
        account.token = issue_token(signer, account.sub, config.token_ttl, clock(), config.token_audience)
        return account.token

    def answer(account: _Account, token: str, status: int = 200) -> web.Response:
        body = {"token": token}
        if config.refresh_race:
            body["refresh_token"] = secrets.token_urlsafe(24)
            refresh_tokens[body["refresh_token"]] = account
        return web.json_response(body, status=status)

    async def register(request: web.Request) -> web.Response:
        creds = credentials(await _json_object(request))
        if creds is None:
            return _error(400, "email and password are required")
        email, password = creds
        if email in accounts:
            return _error(409, "email already registered")
        salt = secrets.token_bytes(16)
        account = _Account(f"user_{uuid.uuid4().hex[:12]}", salt, _hash_password(salt, password))
        accounts[email] = account
        return web.json_response({"token": new_token(account)}, status=201)

    async def login(request: web.Request) -> web.Response:
        creds = credentials(await _json_object(request))
        if creds is None:
            return _error(400, "email and password are required")
        email, password = creds
        account = accounts.get(email)
        if account is None or not hmac.compare_digest(
            account.password_hash, _hash_password(account.salt, password)
        ):
            return _error(401, "invalid credentials")
        try:
            # The scenario's token-reuse bug: login hands back the token issued at
            # register, with whatever life it has left, instead of a fresh one.
            check_token(verifier(), account.token, clock())
            token = account.token
        except TokenError:
            token = new_token(account)
        return answer(account, token)

    async def refresh(request: web.Request) -> web.Response:
        body = await _json_object(request)
        given = body.get("refresh_token") if body is not None else None
        if not isinstance(given, str):
            return _error(400, "refresh_token is required")
        # Stands in for the store lookup a real auth awaits; a concurrent refresh gets in here.
        await asyncio.sleep(0.01)
        account = refresh_tokens.pop(given, None)
        if account is None:
            return _error(401, "refresh token already used or unknown")
        return answer(account, new_token(account))

    verify, introspect = _validation_handlers(verifier, clock)

    app.router.add_post("/register", register)
    app.router.add_post("/login", login)
    app.router.add_get("/verify", verify)
    app.router.add_post("/introspect", introspect)
    app.router.add_post("/refresh", refresh)
    app.router.add_get("/.well-known/jwks.json", key_set)
    return app


def _signing(config: StackConfig) -> tuple[KeyRing | str, Callable[[], Verifier], Handler]:
    """What auth signs with, what it checks tokens against, and the handler of its published key set."""
    if config.jwt_algorithm != "RS256":
        # HS256 keys are secret: the key set auth publishes is empty, but callers still fetch it.
        return config.secret, lambda: config.secret, _answer_with({"keys": []})
    ring = KeyRing(config.rotate_key_after)

    async def serve(request: web.Request) -> web.Response:
        return web.json_response(ring.jwks())

    # auth checks tokens as any verifier would: against the keys it publishes now.
    return ring, ring.public_keys, serve


def _answer_with(body: dict[str, Any]) -> Handler:
    """A handler that answers every request with the same JSON."""

    async def answer(request: web.Request) -> web.Response:
        return web.json_response(body)

    return answer


def _validation_handlers(verifier: Callable[[], Verifier], clock: Clock) -> tuple[Handler, Handler]:
    """auth's two ways to validate a token: ``GET /verify`` (bearer header) and ``POST /introspect`` (JSON body)."""

    async def verify(request: web.Request) -> web.Response:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return web.json_response({"valid": False, "error": "no bearer token"}, status=401)
        try:
            claims = check_token(verifier(), token, clock())
        except TokenError as exc:
            return web.json_response({"valid": False, "error": str(exc)}, status=401)
        return web.json_response(
            {"valid": True, "sub": claims["sub"], "exp": claims["exp"], "expires_at": claims["exp"]}
        )

    async def introspect(request: web.Request) -> web.Response:
        body = await _json_object(request)
        token = body.get("token") if body is not None else None
        if not isinstance(token, str):
            return web.json_response({"active": False, "error": "token is required"}, status=400)
        try:
            claims = check_token(verifier(), token, clock())
        except TokenError as exc:
            return web.json_response({"active": False, "error": str(exc)}, status=401)
        return web.json_response({"active": True, "sub": claims["sub"], "exp": claims["exp"]})

    return verify, introspect


# --- products --------------------------------------------------------------------------

CATALOG: tuple[dict[str, Any], ...] = (
    {"id": "p1", "name": "Mechanical keyboard", "price": 129.99},
    {"id": "p2", "name": "USB-C dock", "price": 89.5},
    {"id": "p3", "name": "27-inch monitor", "price": 249.0},
    {"id": "p4", "name": "Laptop stand", "price": 39.95},
)


def _products_app(config: StackConfig, upstreams: dict[str, str]) -> web.Application:
    middlewares = [_flaky(config.flaky_rate, config.flaky_seed)] if config.flaky_rate > 0 else []
    if config.rate_limit:
        middlewares.insert(0, _rate_limited(config.rate_limit))
    app = _base_app("products", config, upstreams, middlewares=middlewares)
    by_id = {product["id"]: product for product in CATALOG}

    async def list_products(request: web.Request) -> web.Response:
        return web.json_response(list(CATALOG))

    async def get_product(request: web.Request) -> web.Response:
        product = by_id.get(request.match_info["product_id"])
        if product is None:
            return _error(404, "no such product")
        return web.json_response(product)

    app.router.add_get("/products", list_products)
    app.router.add_get("/config", _answer_with({"currency": "EUR", "max_quantity": 99}))
    app.router.add_get("/products/{product_id}", get_product)
    return app


def _rate_limited(per_second: int) -> Middleware:
    """Answer 429 with ``Retry-After: 1`` beyond ``per_second`` arrivals in the last second
    (every arrival counts, refused ones too, so a client retrying at once stays limited)."""
    arrivals: collections.deque[float] = collections.deque()

    @web.middleware
    async def limit(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/_stats":
            return await handler(request)
        now = time.monotonic()
        while arrivals and arrivals[0] <= now - 1.0:
            arrivals.popleft()
        arrivals.append(now)
        if len(arrivals) > per_second:
            return web.json_response({"error": "rate limit exceeded"}, status=429, headers={"Retry-After": "1"})
        return await handler(request)

    return limit


def _flaky(rate: float, seed: int) -> Middleware:
    """Fail a share of requests with 503, drawn from a seeded RNG (seed 003's retry case)."""
    rng = random.Random(seed)

    @web.middleware
    async def flaky(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path != "/_stats" and rng.random() < rate:
            return _error(503, "temporarily unavailable")
        return await handler(request)

    return flaky


# --- cart ------------------------------------------------------------------------------


@dataclass
class _Cart:
    cart_id: str
    owner: str
    items: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        total = round(sum(item["price"] * item["quantity"] for item in self.items), 2)
        return {"cart_id": self.cart_id, "owner": self.owner, "items": self.items, "total": total}


def _cart_app(config: StackConfig, upstreams: dict[str, str]) -> web.Application:
    app = _base_app("cart", config, upstreams, callees=("products",))
    app[TOKENLESS] = config.tokenless_calls
    carts: dict[str, _Cart] = {}

    def caller(request: web.Request) -> str | None:
        # Cart trusts the gateway's validation: it only reads who the token belongs to.
        token = bearer_token(request.headers.get("Authorization"))
        return unverified_subject(token) if token is not None else None

    async def add_item(request: web.Request) -> web.Response:
        owner = caller(request)
        if owner is None:
            return _error(401, "no bearer token")
        body = await _json_object(request)
        if body is None:
            return _error(400, "expected a JSON object")
        product_id, quantity = body.get("product_id"), body.get("quantity", 1)
        if not isinstance(product_id, str) or not product_id:
            return _error(400, "product_id must be a non-empty string")
        if isinstance(quantity, bool) or not isinstance(quantity, int) or not 1 <= quantity <= 99:
            return _error(400, "quantity must be an integer 1-99")
        cart_id = body.get("cart_id")  # absent: a new cart
        if request.app[TOKENLESS]:
            await request.app[CLIENTS]["products"].request("GET", "/config", request[TRACE])
        cart: _Cart | None = None
        if cart_id is not None:
            cart = carts.get(cart_id) if isinstance(cart_id, str) else None
            if cart is None:
                return _error(404, "no such cart")
            if cart.owner != owner:
                return _error(403, "cart belongs to another user")
        reply = await request.app[CLIENTS]["products"].request(
            "GET",
            f"/products/{quote(product_id, safe='')}",
            request[TRACE],
            headers=_identity_headers(request),
        )
        if reply.status == 404:
            return _error(404, "no such product")
        product = reply.json_object()
        if reply.status != 200 or product is None:
            return _error(502, f"products answered {reply.status}")
        if cart is None:
            cart = _Cart(f"cart_{uuid.uuid4().hex[:12]}", owner)
            carts[cart.cart_id] = cart
        cart.items.append(
            {
                "product_id": product_id,
                "name": product["name"],
                "price": product["price"],
                "quantity": quantity,
            }
        )
        return web.json_response(cart.to_json(), status=201)

    async def get_cart(request: web.Request) -> web.Response:
        owner = caller(request)
        if owner is None:
            return _error(401, "no bearer token")
        cart = carts.get(request.match_info["cart_id"])
        if cart is None:
            return _error(404, "no such cart")
        if cart.owner != owner:
            return _error(403, "cart belongs to another user")
        return web.json_response(cart.to_json())

    app.router.add_post("/cart/items", add_item)
    app.router.add_get("/cart/{cart_id}", get_cart)
    return app


# --- payment ---------------------------------------------------------------------------


def _payment_app(config: StackConfig, upstreams: dict[str, str]) -> web.Application:
    app = _base_app("payment", config, upstreams, callees=("cart", "auth"))
    offset = config.payment_clock_offset
    signed_by_key = config.jwt_algorithm == "RS256"
    keyset = _KeySetCache(config.tokenless_calls or signed_by_key)

    def clock() -> float:
        return time.time() + offset

    if offset:
        app.on_response_prepare.append(_date_from(clock))

    async def checkout(request: web.Request) -> web.Response:
        token = bearer_token(request.headers.get("Authorization"))
        if token is None:
            return _error(401, "no bearer token")
        body = await _json_object(request)
        cart_id = body.get("cart_id") if body is not None else None
        method = body.get("payment_method") if body is not None else None
        if not (isinstance(cart_id, str) and cart_id and isinstance(method, str) and method):
            return _error(400, "cart_id and payment_method are required")
        trace = request[TRACE]
        clients = request.app[CLIENTS]
        cart_reply = await clients["cart"].request(
            "GET", f"/cart/{quote(cart_id, safe='')}", trace, headers=_identity_headers(request)
        )
        cart = cart_reply.json_object()
        if cart_reply.status != 200 or cart is None:
            # A 4xx is the caller's problem and keeps its status; anything else is ours.
            status = cart_reply.status if 400 <= cart_reply.status < 500 else 502
            return _error(status, f"cart answered {cart_reply.status}")

        await asyncio.sleep(config.work_seconds)  # charging the card takes a while

        await keyset.refresh(clients["auth"], trace)
        if offset or signed_by_key:
            # The clock-skew fault: payment also judges expiry itself, on its own clock; an
            # RS256 token it checks against auth's key set, as a verifier of signed tokens does.
            try:
                check_token(keyset.keys if signed_by_key else config.secret, token, clock())
            except TokenExpired:
                return _error(401, PAYMENT_CLOCK_EXPIRED)
            except TokenError:
                return _error(401, INVALID_TOKEN)
        # The scenario's redundant re-validation: by now the token may have expired.
        verdict = await clients["auth"].request(
            "POST", "/introspect", trace, json_body={"token": token}
        )
        answer = verdict.json_object()
        if verdict.status != 200 or answer is None or answer.get("active") is not True:
            return _error(401, INVALID_TOKEN)
        return web.json_response(
            {
                "order_id": f"ord_{uuid.uuid4().hex[:12]}",
                "status": "processing",
                "amount": cart["total"],
                "cart_id": cart_id,
                "payment_method": method,
            }
        )

    app.router.add_post("/checkout", checkout)
    return app


class _KeySetCache:
    """payment's copy of auth's key set, fetched (with no token) when older than KEYSET_CACHE_SECONDS."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.fetched_at = -math.inf
        self.keys: dict[str, Any] = {}
        """The RS256 public keys of the last key set fetched, by kid."""

    async def refresh(self, auth: ServiceClient, trace: TraceContext) -> None:
        if self.enabled and time.monotonic() - self.fetched_at > KEYSET_CACHE_SECONDS:
            reply = await auth.request("GET", "/.well-known/jwks.json", trace)
            if reply.status == 200:
                self.fetched_at = time.monotonic()
                self.keys = keys_of_jwks(reply.json_object())


def _date_from(clock: Clock) -> Callable[[web.Request, web.StreamResponse], Awaitable[None]]:
    """Stamp responses with this service's (skewed) clock; aiohttp only sets Date if absent."""

    async def stamp(request: web.Request, response: web.StreamResponse) -> None:
        response.headers["Date"] = formatdate(clock(), usegmt=True)

    return stamp
