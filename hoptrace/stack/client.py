"""How one service calls another: through a configurable base URL, with retries on 5xx/429.

The client deliberately has both ways of carrying a bearer token that seed 004's
``ServiceClient`` had: per call (``headers=``, correct) and as a default set with
:meth:`ServiceClient.set_auth_token` (shared by every request using the object, which is
the token-crossover bug when one client serves concurrent users).
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

import aiohttp

from hoptrace.stack.stats import ServiceStats
from hoptrace.stack.tracing import TraceContext

# Like seed 003's client, scaled down so a retry storm fits in a test: 3 retries, doubling.
RETRY_BACKOFF: tuple[float, ...] = (0.05, 0.1, 0.2)
# The no-backoff fault: as many retries, each at once.
NO_BACKOFF: tuple[float, ...] = (0.0,) * len(RETRY_BACKOFF)
# A Retry-After longer than this is not waited for: the call gives up with the answer it has.
_MAX_RETRY_AFTER = 2.0
# Only methods that are safe to repeat are retried, so a flaky hop never doubles a checkout.
_RETRIED_METHODS = frozenset({"GET", "HEAD"})


def _is_retryable(status: int) -> bool:
    return status >= 500 or status == 429


class DownstreamError(Exception):
    """A downstream service could not be reached at all (no HTTP answer)."""

    def __init__(self, service: str, cause: BaseException) -> None:
        super().__init__(f"{service} unreachable: {cause!r}")
        self.service = service


@dataclass(frozen=True)
class Reply:
    """A downstream answer, read in full."""

    status: int
    body: bytes
    content_type: str
    retry_after: float | None = None
    """Seconds the answer's ``Retry-After`` asked for, when given as seconds."""

    def json_object(self) -> dict[str, Any] | None:
        """The body if it is a JSON object, else None (e.g. an error page from a proxy)."""
        try:
            body = json.loads(self.body)
        except ValueError:
            return None
        return body if isinstance(body, dict) else None


class ServiceClient:
    """Client of one downstream service, owned by the calling service (one per app)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        service: str,
        base_url: str,
        stats: ServiceStats,
        *,
        backoff: tuple[float, ...] = RETRY_BACKOFF,
        honour_retry_after: bool = True,
    ) -> None:
        self.service = service
        self._backoff = backoff
        self._honour_retry_after = honour_retry_after
        self._session = session
        self._base_url = base_url.rstrip("/")
        self._stats = stats
        self._auth_token: str | None = None

    def set_auth_token(self, token: str) -> None:
        """Make every later call carry this bearer token, whoever makes it."""
        self._auth_token = token

    async def request(
        self,
        method: str,
        path: str,
        trace: TraceContext,
        *,
        headers: dict[str, str] | None = None,
        json_body: Any = None,
        data: bytes | None = None,
    ) -> Reply:
        """Call ``path`` (already URL-encoded) on the service; GETs are retried on 5xx/429."""
        call_headers: dict[str, str] = {}
        # Read the shared token once, when the call starts, as axios merges its defaults.
        if self._auth_token is not None:
            call_headers["Authorization"] = f"Bearer {self._auth_token}"
        call_headers.update(headers or {})
        backoff = self._backoff if method in _RETRIED_METHODS else ()
        delays = iter(backoff)
        while True:
            # Each attempt is its own HTTP call, hence its own span.
            attempt_headers = {**call_headers, **trace.outgoing_headers()}
            reply = await self._send(method, path, attempt_headers, json_body, data)
            if not _is_retryable(reply.status):
                return reply
            delay = next(delays, None)
            if delay is not None and self._honour_retry_after and reply.retry_after is not None:
                if reply.retry_after > _MAX_RETRY_AFTER:
                    return reply
                delay = max(delay, reply.retry_after)
            if delay is None:
                if backoff:
                    self._stats.retries_exhausted += 1
                return reply
            self._stats.retries += 1
            await asyncio.sleep(delay)

    async def _send(
        self, method: str, path: str, headers: dict[str, str], json_body: Any, data: bytes | None
    ) -> Reply:
        try:
            async with self._session.request(
                method, self._base_url + path, headers=headers, json=json_body, data=data
            ) as response:
                wait = response.headers.get("Retry-After", "")
                retry_after = float(wait) if wait.strip().isdecimal() else None
                return Reply(response.status, await response.read(), response.content_type, retry_after)
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DownstreamError(self.service, exc) from exc
