"""The analyzer's options, each with its default, and the parsing of times given by people."""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from hoptrace._errors import AnalysisError


@dataclass(frozen=True)
class AnalyzerConfig:
    """Thresholds and choices of the analysis. Every field has a documented default."""

    near_expiry_s: float = 30.0
    """``near_expiry``: a token forwarded with less life left than this (seconds)..."""
    near_expiry_duration_factor: float = 1.0
    """...or with less than this many times the request's own duration left."""
    skew_threshold_s: float = 2.0
    """``clock_skew``: a service or issuer off the proxy's clock by more than this (seconds);
    the estimate already allows for Date headers and ``iat`` being whole seconds."""
    retry_min: int = 2
    """``retry_storm``: a call repeated at least this many times after a 5xx, 429 or error."""
    retry_backoff_growth: float = 1.2
    """``retry_without_backoff``: retries whose every gap is at most this many times the gap
    before it have no backoff (1.2 leaves room for scheduling jitter; doubling passes)."""
    retry_after_tolerance_s: float = 0.05
    """``retry_without_backoff``: a retry this much sooner than ``Retry-After`` still honours it."""
    rate_window_s: float = 1.0
    """``rate_limited``: the request rate at the limited service is counted over this many
    seconds before its first 429."""
    key_min_callers: int = 2
    """``service_key_*``: a redacted header value sent to services by at least this many
    callers is a service credential..."""
    key_min_share: float = 0.5
    """...on the services where at least this share of calls carry its header."""
    audiences: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """``audience_mismatch``: per service, the ``aud`` values it accepts beyond its own name."""
    refresh_patterns: tuple[str, ...] = ("refresh", r"(?:^|/)(?:oauth2?/)?token$")
    """``refresh_race``: regular expressions (case-insensitive) searched in a hop's path: a
    match makes it a token refresh hop."""
    refresh_race_window_s: float = 0.5
    """``refresh_race``: two refreshes with one token overlapping or this close are concurrent."""
    slow_p95_factor: float = 2.0
    """``slow_hop``: a hop slower than this many times its endpoint's p95..."""
    slow_min_samples: int = 20
    """...where the endpoint has at least this many hops (a p95 of three hops means little)..."""
    slow_ms: float | None = None
    """...or slower than this many milliseconds, whatever the endpoint (None: off)."""
    validation_patterns: tuple[str, ...] = ("verify", "validate", "introspect", "userinfo", "tokeninfo")
    """Regular expressions (case-insensitive) searched in a hop's path: a match makes it a
    token validation hop, for ``duplicate_validation``."""
    worst: int = 5
    """How many requests the text and markdown reports draw as hop trees."""
    max_hop_ids: int = 20
    """At most this many hop ids in a finding about a whole service (``clock_skew``)."""
    extra_hop_columns: tuple[str, ...] | str = field(default=())
    """Hop columns to read beyond those the analysis needs, or ``"all"`` (all but headers and bodies)."""

    def __post_init__(self) -> None:
        for name in (
            "near_expiry_s", "near_expiry_duration_factor", "skew_threshold_s", "slow_p95_factor",
            "retry_backoff_growth", "retry_after_tolerance_s", "rate_window_s", "refresh_race_window_s",
        ):  # fmt: skip
            value = getattr(self, name)
            if not _finite(value) or value < 0:
                raise AnalysisError(f"{name} must be a number >= 0, got {value!r}")
        if self.slow_ms is not None and (not _finite(self.slow_ms) or self.slow_ms <= 0):
            raise AnalysisError(f"slow_ms must be a number > 0 or None, got {self.slow_ms!r}")
        for name in ("retry_min", "slow_min_samples", "worst", "max_hop_ids", "key_min_callers"):
            least = 1 if name in ("retry_min", "key_min_callers") else 0
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise AnalysisError(f"{name} must be a whole number >= {least}, got {value!r}")
        if not _finite(self.key_min_share) or not 0 < self.key_min_share <= 1:
            raise AnalysisError(f"key_min_share must be a number in (0, 1], got {self.key_min_share!r}")
        for name in ("validation_patterns", "refresh_patterns"):
            _check_patterns(name, getattr(self, name))
        if not isinstance(self.audiences, dict) or not all(
            isinstance(k, str) and isinstance(v, (tuple, list)) and all(isinstance(a, str) for a in v)
            for k, v in self.audiences.items()
        ):
            raise AnalysisError(f"audiences must map a service to a list of aud values, got {self.audiences!r}")

    @property
    def validation_regex(self) -> str:
        return "|".join(f"(?:{p})" for p in self.validation_patterns) or r"(?!)"

    @property
    def refresh_regex(self) -> str:
        return "|".join(f"(?:{p})" for p in self.refresh_patterns) or r"(?!)"


def _check_patterns(name: str, patterns: object) -> None:
    if isinstance(patterns, str):
        raise AnalysisError(f"{name} must be a tuple of patterns, not one string")
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise AnalysisError(f"{name[:-9]} pattern {pattern!r} is not a regular expression: {exc}") from None


def _finite(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


RELATIVE = re.compile(r"(\d{1,9}(?:\.\d{1,6})?)\s*(s|sec|m|min|h|d)", re.IGNORECASE)
"""A time ago: ``30s``, ``15m``, ``2h``, ``1d`` (``15min``, ``1.5h``)."""
UNIT_S = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400}


def parse_time(value: object, name: str = "time", *, now: float | None = None) -> float | None:
    """UNIX seconds from a number, a numeric string, an ISO-8601 string, a datetime, or a
    time ago (``15m``: 15 minutes before ``now``, default the current time; units s m h d).

    A time without a zone is UTC, so that the same command means the same thing on
    every machine. Raises :class:`AnalysisError` with a one-line message otherwise.
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        moment = value if value.tzinfo else value.replace(tzinfo=UTC)
        return moment.timestamp()
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            seconds = float(value)
        except OverflowError:  # an int beyond any float, such as 10**400
            seconds = math.inf
        if not math.isfinite(seconds):
            raise AnalysisError(f"{name}: {str(value)[:40]} is not a finite time")
        return seconds
    if isinstance(value, str):
        text = value.strip()
        ago = RELATIVE.fullmatch(text)
        if ago:
            return (time.time() if now is None else now) - float(ago[1]) * UNIT_S[ago[2].lower()]
        try:
            seconds = float(text)
        except ValueError:
            pass
        else:
            if math.isfinite(seconds):
                return seconds
        try:
            moment = datetime.fromisoformat(text)
            if moment.tzinfo is None:
                moment = moment.replace(tzinfo=UTC)
            return moment.timestamp()
        except (ValueError, OverflowError):  # OverflowError: year 1 with a zone east of UTC
            pass
    shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
    raise AnalysisError(
        f"{name}: cannot read {shown} as a time (UNIX seconds, ISO-8601 such as 2024-01-15T10:23:45Z, or a time ago "
        "such as 15m, 2h, 30s)"
    )
