"""What the sample stack runs with: ports, how services reach each other, token TTL, faults.

Every fault is off by default, so a default stack shows only the scenario's own bug
(payment re-validating a token that the gateway already accepted).
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from hoptrace._errors import HoptraceError

SERVICES: tuple[str, ...] = ("gateway", "auth", "products", "cart", "payment")

# The scenario's docker-compose ports, so traces from the sample look like the story.
DEFAULT_PORTS: dict[str, int] = {
    "gateway": 8080,
    "auth": 3001,
    "products": 3002,
    "cart": 3003,
    "payment": 3004,
}

PROPAGATION_MODES: tuple[str, ...] = ("none", "traceparent", "x-request-id")
JWT_ALGORITHMS: tuple[str, ...] = ("HS256", "RS256")

# Services only ever call this machine: a typo'd upstream must not send bearer tokens elsewhere.
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})

# Long enough for HS256 (RFC 7518 3.2 asks for at least 32 bytes; pyjwt warns below that).
DEFAULT_SECRET = "hoptrace-sample-stack-secret-not-for-production"


class StackError(HoptraceError):
    """The sample stack cannot be configured or started as asked (bad value, port in use)."""


@dataclass
class StackConfig:
    """Configuration of the five-service sample stack.

    ``ports`` may name only some services; the others keep their default port. Port 0 asks
    the OS for a free one. ``upstreams`` maps a service to the base URL the *other*
    services use to reach it; a service missing there is reached directly on the port it
    listens on. Pointing an upstream at a proxy listener is how the traffic gets recorded.
    """

    ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PORTS))
    upstreams: dict[str, str] = field(default_factory=dict)
    token_ttl: int = 3600
    """Lifetime of issued JWTs in seconds; a few seconds makes mid-flow expiry reproducible."""
    secret: str = DEFAULT_SECRET
    work_seconds: float = 1.0
    """How long payment works on a checkout before it re-validates the token with auth."""
    payment_clock_offset: float = 0.0
    """Fault: payment's clock runs this many seconds ahead (negative: behind)."""
    shared_client: bool = False
    """Fault: the gateway sets the bearer token on one client shared by all requests."""
    flaky_rate: float = 0.0
    """Fault: probability that products answers 503."""
    flaky_seed: int = 0
    """Seed of products' failure draws, so a sequential run fails the same calls every time."""
    propagate: str = "none"
    """Trace context the services forward: "none", "traceparent" or "x-request-id"."""
    internal_key: str = field(default_factory=lambda: secrets.token_hex(16))
    """Shared secret every service-to-service call sends as X-Internal-Key, as seed 004's
    services do. Checked only with ``key_missing_caller`` set; it is the custom secret
    header a recorder must redact."""
    rate_limit: int = 0
    """Fault: products answers 429 with ``Retry-After: 1`` once more than this many requests
    arrived in the last second (0: no limit), like seed 003's 200-per-minute API."""
    retry_no_backoff: bool = False
    """Fault: every service client retries a failed GET at once, ignoring ``Retry-After``."""
    key_missing_caller: str | None = None
    """Fault: this service's calls leave out X-Internal-Key, and every other service then
    requires the key, answering 401 without it (seed 004's internal key, forgotten once)."""
    leak_internal_key: bool = False
    """Fault: the gateway echoes X-Internal-Key back to the client on every answer."""
    token_audience: tuple[str, ...] = ()
    """Fault: auth issues tokens with this ``aud``; no service checks it."""
    refresh_race: bool = False
    """Fault: auth hands out one-time refresh tokens at login, and each client refreshes
    twice at once with its one: auth refuses the slower refresh (401)."""
    jwt_algorithm: str = "HS256"
    """How auth signs: "HS256" with ``secret``, or "RS256" with an RSA key named by a ``kid``,
    published at ``GET /.well-known/jwks.json``; payment then checks each token's signature
    itself against the key set it fetched (no token sent), cached for ``KEYSET_CACHE_SECONDS``."""
    rotate_key_after: int = 0
    """Fault (RS256): auth rotates its signing key after this many tokens (0: never), with no
    overlap: the new key signs and is the only one published, so a token signed with the old
    key, still held by a client, is refused (401) wherever it is checked."""
    tokenless_calls: bool = False
    """Calls that carry no token, as real services make them: payment fetches auth's key set
    (``GET /.well-known/jwks.json``) whenever its cache of it is older than
    ``KEYSET_CACHE_SECONDS``, and cart reads products' ``GET /config`` before each add."""

    def __post_init__(self) -> None:
        self.ports = {**DEFAULT_PORTS, **self.ports}
        self.upstreams = dict(self.upstreams)
        self._validate()

    def _validate(self) -> None:
        unknown = (set(self.ports) | set(self.upstreams)) - set(SERVICES)
        if unknown:
            raise StackError(
                f"unknown service {sorted(unknown)[0]!r} (services: {', '.join(SERVICES)})"
            )
        for name, port in self.ports.items():
            if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
                raise StackError(f"port of {name} must be an integer 0-65535, got {port!r}")
        fixed = [port for port in self.ports.values() if port != 0]
        if len(fixed) != len(set(fixed)):
            raise StackError(f"two services cannot share a port: {self.ports}")
        for name, url in self.upstreams.items():
            _check_upstream(name, url)
        if (
            isinstance(self.token_ttl, bool)
            or not isinstance(self.token_ttl, int)
            or self.token_ttl < 1
        ):
            # JWT exp is whole seconds, so a TTL below one second cannot be expressed.
            raise StackError(
                f"token_ttl must be a whole number of seconds >= 1, got {self.token_ttl!r}"
            )
        if not self.secret:
            raise StackError("secret must not be empty")
        if not _finite(self.work_seconds) or self.work_seconds < 0:
            raise StackError(f"work_seconds must be >= 0, got {self.work_seconds!r}")
        if not _finite(self.payment_clock_offset):
            raise StackError(
                f"payment_clock_offset must be finite, got {self.payment_clock_offset!r}"
            )
        if not _finite(self.flaky_rate) or not 0.0 <= self.flaky_rate <= 1.0:
            raise StackError(f"flaky_rate must be between 0 and 1, got {self.flaky_rate!r}")
        if isinstance(self.rate_limit, bool) or not isinstance(self.rate_limit, int) or self.rate_limit < 0:
            raise StackError(f"rate_limit must be a whole number >= 0, got {self.rate_limit!r}")
        if self.jwt_algorithm not in JWT_ALGORITHMS:
            raise StackError(f"jwt_algorithm must be one of {', '.join(JWT_ALGORITHMS)}, got {self.jwt_algorithm!r}")
        if isinstance(self.rotate_key_after, bool) or not isinstance(self.rotate_key_after, int) or self.rotate_key_after < 0:
            raise StackError(f"rotate_key_after must be a whole number >= 0, got {self.rotate_key_after!r}")
        if self.rotate_key_after and self.jwt_algorithm != "RS256":
            raise StackError("rotate_key_after needs jwt_algorithm RS256: an HS256 secret has no published key to rotate")
        if self.key_missing_caller is not None and self.key_missing_caller not in SERVICES:
            raise StackError(
                f"key_missing_caller must be one of {', '.join(SERVICES)}, got {self.key_missing_caller!r}"
            )
        self.token_audience = tuple(self.token_audience)
        if not all(isinstance(aud, str) and aud for aud in self.token_audience):
            raise StackError(f"token_audience must be non-empty strings, got {self.token_audience!r}")
        if self.propagate not in PROPAGATION_MODES:
            raise StackError(
                f"propagate must be one of {', '.join(PROPAGATION_MODES)}, got {self.propagate!r}"
            )


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_upstream(name: str, url: str) -> None:
    try:
        parts = urlsplit(url)
        port = parts.port
    except (TypeError, ValueError) as exc:
        raise StackError(f"upstream of {name} is not a URL: {url!r}") from exc
    if parts.scheme != "http" or parts.hostname not in _LOOPBACK_HOSTS or port is None:
        raise StackError(
            f"upstream of {name} must be http://127.0.0.1:PORT (loopback only), got {url!r}"
        )
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise StackError(f"upstream of {name} must be a base URL without path, got {url!r}")
