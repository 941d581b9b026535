"""Each service's own account of its traffic, served on ``GET /_stats``.

Tests compare these counts with what a proxy recorded: a recorder that drops or doubles
flows shows up as a difference.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any


@dataclass
class ServiceStats:
    """Counters of one service. ``requests`` is keyed by ``"METHOD /route/{pattern}"``."""

    service: str
    total: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    retries: int = 0
    """Outgoing calls this service repeated after a 5xx or 429."""
    retries_exhausted: int = 0
    """Outgoing calls that still failed after the last retry."""
    identity_mismatches: int = 0
    """Requests whose bearer token is not that of the X-User-Id the gateway vouched for."""

    def record_request(self, key: str) -> None:
        self.total += 1
        self.requests[key] += 1

    def to_json(self) -> dict[str, Any]:
        return {
            "service": self.service,
            "total": self.total,
            "requests": dict(self.requests),
            "statuses": {str(status): n for status, n in sorted(self.statuses.items())},
            "retries": self.retries,
            "retries_exhausted": self.retries_exhausted,
            "identity_mismatches": self.identity_mismatches,
        }
