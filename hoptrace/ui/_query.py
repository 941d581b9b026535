"""The request list's query string, parsed as untrusted input: a value or a one-line :class:`BadQuery`."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from hoptrace._errors import HoptraceError
from hoptrace.analyzer._config import parse_time
from hoptrace.analyzer._types import OUTCOMES, SEVERITIES

MAX_LIMIT = 500
MAX_TEXT = 200
SORTS = ("worst", "started", "duration", "status", "hops", "severity")
"""``worst``: the presentation model's worst-first order (ascending: the worst first), the default."""


class BadQuery(HoptraceError):
    """A query parameter the API cannot use; the message names it."""


@dataclass(frozen=True)
class RequestQuery:
    """Filters, sort and page of the request list (every filter optional)."""

    text: str = ""
    service: str = ""
    endpoint: str = ""
    subject: str = ""
    status: str = ""
    kind: str = ""
    severity: str = ""
    since: float | None = None
    until: float | None = None
    sort: str = "worst"
    descending: bool = False
    offset: int = 0
    limit: int = 50

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> RequestQuery:
        unknown = set(params) - {"q", "service", "endpoint", "subject", "status", "kind", "severity", "since", "until",
                                 "sort", "order", "offset", "limit"}  # fmt: skip
        if unknown:
            raise BadQuery(f"unknown query parameter {min(unknown)!r}")
        text = {k: _text(params, k) for k in ("q", "service", "endpoint", "subject", "kind")}
        sort = _choice(params, "sort", SORTS) or "worst"
        return cls(
            text=text["q"],
            service=text["service"],
            endpoint=text["endpoint"],
            subject=text["subject"],
            kind=text["kind"],
            status=_choice(params, "status", OUTCOMES),
            severity=_choice(params, "severity", SEVERITIES),
            since=_time(params, "since"),
            until=_time(params, "until"),
            sort=sort,
            descending=(_choice(params, "order", ("asc", "desc")) or default_order(sort)) == "desc",
            offset=integer(params, "offset", 0, 0, 10**9),
            limit=integer(params, "limit", 50, 1, MAX_LIMIT),
        )


def default_order(sort: str) -> str:
    """``asc`` for the worst-first order (its first place is the worst), ``desc`` (newest, slowest, ...) otherwise."""
    return "asc" if sort == "worst" else "desc"


def integer(params: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = params.get(name)
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 12:
        raise BadQuery(f"{name}: expected a whole number, got {raw[:40]!r}")
    value = int(raw)
    if not low <= value <= high:
        raise BadQuery(f"{name}: {value} is outside {low}..{high}")
    return value


def _text(params: Mapping[str, str], name: str) -> str:
    value = params.get(name, "")
    if len(value) > MAX_TEXT:
        raise BadQuery(f"{name}: longer than {MAX_TEXT} characters")
    return value


def _choice(params: Mapping[str, str], name: str, allowed: tuple[str, ...]) -> str:
    value = params.get(name, "")
    if value and value not in allowed:
        raise BadQuery(f"{name}: {value[:40]!r} is not one of {', '.join(allowed)}")
    return value


def _time(params: Mapping[str, str], name: str) -> float | None:
    value = params.get(name, "")
    if not value:
        return None
    if len(value) > 64:
        raise BadQuery(f"{name}: longer than 64 characters")
    try:
        return parse_time(value, name)
    except HoptraceError as exc:
        raise BadQuery(str(exc)) from None
