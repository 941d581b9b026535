"""The request list before the analysis, from SQL alone: what `hoptrace ui` serves while pandas and
the analyzer load (1–3 s of imports on a loaded 2-core machine).

This module imports neither: the newest requests of each capture are one indexed query
away, so the first page is served within a second of the server listening. Until the
analysis is loaded it answers only the list's default view (newest first, no filter);
everything else is :class:`NotReady`, and the page asks again when the data changes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hoptrace._format import hop_ended
from hoptrace.db import open_for_reading
from hoptrace.ui._query import RequestQuery

PREVIEW_ROWS = 2000
"""Requests listed per capture before the analysis is done: the newest ones."""
COLUMNS = ("trace", "started_at", "endpoint", "service", "status", "failed", "error_kind", "duration_ms")


def _as_loaded(column: str, scale: str) -> str:
    """``column`` as the analyzer's loader reads it: a whole number of ``1/scale`` units (times in
    microseconds, durations in microseconds too), anything but a number as NULL. A row listed here
    and the same request analysed then carry the same start time, so a time window that holds
    one holds the other (a recorded time has digits below the microsecond: 1767255321.7541513)."""
    number = f"CAST({column} * {scale} + 0.5 AS INTEGER) / {scale}"
    return f"CASE typeof({column}) WHEN 'integer' THEN {number} WHEN 'real' THEN {number} END"


_SELECT = (
    f"h.id, {_as_loaded('h.started_at', '1e6')}, h.method || ' ' || h.path, h.service, h.status, h.failed, h.error_kind,"
    f" {_as_loaded('h.duration_ms', '1e3')}"
)


class NotFound(LookupError):
    """A request, hop or session the DBs do not hold."""


class NotReady(LookupError):
    """The DB is still being analysed: only the request list (without findings) is there yet."""


def entry_requests(path: Path, after_id: int | None = None) -> list[tuple]:
    """The newest ``PREVIEW_ROWS`` requests (entry-route hops) of each capture, as :data:`COLUMNS`,
    read through the (capture_id, started_at) index: no trees, no findings, and no full pass over
    the file, which at a million hops reads ~1 GB.

    With ``after_id``: the entry-route hops recorded after that hop id instead (the primary
    key finds them), for a live view. The file's structure check runs with the analysis
    that follows; until then these rows are only listed (escaped by the page), never used
    to compute anything. A file that is not a trace DB raises ``TraceFileError`` here.
    """
    conn = open_for_reading(path, check=False)
    try:
        if after_id is not None:
            return conn.execute(
                f"SELECT {_SELECT} FROM hops h JOIN captures c ON c.id = h.capture_id WHERE h.id > ? AND h.service = c.entry",
                (after_id,),
            ).fetchall()
        captures = conn.execute("SELECT id, entry FROM captures WHERE entry IS NOT NULL").fetchall()
        return [
            row
            for capture, entry in captures
            for row in conn.execute(
                f"SELECT {_SELECT} FROM hops h WHERE capture_id = ? AND service = ? ORDER BY started_at DESC LIMIT ?",
                (capture, entry, PREVIEW_ROWS),
            )
        ]
    finally:
        conn.close()


class Preview:
    """The newest requests of ``paths``, listed newest first, until :class:`hoptrace.ui._data.Data` is loaded."""

    version = 0

    def __init__(self, paths: list[Path]) -> None:
        self.paths = paths
        self.last_error: str | None = None
        """Why loading the analysis failed, if it did."""
        # Several files are one joined analysis (DB 0): hop i of file k of K is hop i * K + k there.
        listed = (
            (0, dict(zip(COLUMNS, (row[0] * len(paths) + k, *row[1:]), strict=True)))
            for k, path in enumerate(paths)
            for row in entry_requests(path)
        )
        self.rows = sorted(
            listed,
            key=lambda item: -(item[1]["started_at"] or 0.0),
        )

    def request_page(self, query: RequestQuery) -> dict[str, Any]:
        if query != RequestQuery(offset=query.offset, limit=query.limit):
            raise NotReady("the trace is still loading: filters and other orders follow in a moment")
        page = self.rows[query.offset : query.offset + query.limit]
        items = [
            {**{k: row[k] for k in ("trace", "started_at", "endpoint", "service", "status", "duration_ms")}, "db": db,
             "ended": hop_ended(row["status"], row["failed"], row["error_kind"]), "status_class": None, "hops": None,
             "subject": None, "severity": None, "kinds": "", "worst": None, "tier": None}  # fmt: skip
            for db, row in page
        ]
        return {"total": len(self.rows), "offset": query.offset, "items": items, "version": 0, "analysing": True}

    def facets(self) -> dict[str, list]:
        return {"service": [], "endpoint": [], "subject": [], "kind": [], "kinds": [], "severity": [], "status": []}

    def status(self) -> dict[str, Any]:
        return {
            "version": 0,
            "last_error": self.last_error,
            "dbs": [
                {"db": 0, "path": ", ".join(map(str, self.paths)), "hops": 0, "requests": len(self.rows), "analysing": True,
                 "findings": 0, "max_hop_id": 0, "analyse_s": 0.0}  # fmt: skip
            ],
        }

    def __getattr__(self, name: str):
        """A request, hop, session, latency or graph view: they need the analysis, not loaded yet."""
        if name.startswith("_"):
            raise AttributeError(name)

        def not_yet(*args: Any) -> Any:
            raise NotReady("the trace is still loading; try again in a second")

        return not_yet
