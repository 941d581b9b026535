"""Where the importers meet the live recorder's row builder, and how an import is stored.

:func:`build_hop_rows` is the one call into the recorder: mitmproxy flows in, the rows
of ``hops``, ``tokens`` and ``hop_tokens`` out, built exactly as ``hoptrace proxy``
builds them (token extraction and decoding, keyed fingerprints, redaction, error
classes). Everything else here stores those rows, one transaction per imported file.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import sqlite_utils

from hoptrace import __version__
from hoptrace.db import HOP_COLUMNS, HOP_TOKEN_COLUMNS, TOKEN_COLUMNS

# Positions in a hop row as build_hop_rows returns it: HOP_COLUMNS without ``id``.
HOP_ROW_COLUMNS = HOP_COLUMNS[1:]


@dataclass
class Rows:
    """A batch of built rows: hop rows (HOP_ROW_COLUMNS), new token rows, (hop index, link) pairs."""

    hops: list[tuple]
    tokens: list[tuple]
    links: list[tuple[int, tuple]]
    addon_errors: int


def build_hop_rows(flows: list[tuple[str, object]], key: bytes, capture_id: int, known: set[str]) -> Rows:
    """(service, mitmproxy flow) pairs -> rows, through the live recorder's own builder.

    Snapshots, bare rows for flows the recorder cannot read, token decoding, redaction
    and the final sanitising step are the recorder's (``hoptrace.addons``); nothing is
    re-implemented here. Tokens whose fingerprint is in ``known`` are not repeated
    (``known`` is updated).
    """
    from hoptrace.addons._rows import build_rows, clean_row, snapshots

    items, unreadable = snapshots(flows)
    built = build_rows(items, key, False, capture_id, known)
    known.update(token[0] for rows in built.hops for token in rows.tokens)
    return Rows(
        hops=[clean_row(rows.hop) for rows in built.hops],
        tokens=[clean_row(token) for rows in built.hops for token in rows.tokens],
        links=[(i, clean_row(link)) for i, rows in enumerate(built.hops) for link in rows.links],
        addon_errors=unreadable + built.addon_errors,
    )


@contextlib.contextmanager
def atomic(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One ``BEGIN IMMEDIATE`` transaction: committed whole, or rolled back whole on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.rollback()
        raise
    conn.execute("COMMIT")


def imported_as(conn: sqlite3.Connection, source: str) -> int | None:
    """The capture id a file with this source tag was already imported as, if any."""
    row = conn.execute("SELECT id FROM captures WHERE source = ?", (source,)).fetchone()
    return row[0] if row else None


@dataclass
class CaptureSink:
    """Writes one imported file's rows into an open transaction, as capture ``capture_id``."""

    conn: sqlite3.Connection
    source: str
    capture_id: int = 0
    next_hop_id: int = 0
    hops: int = 0
    addon_errors: int = 0
    first_started: float | None = None
    last_ended: float | None = None
    first_service: str | None = None
    routes: dict[str, dict] = field(default_factory=dict)

    def open(self, mitmproxy_version: str) -> None:
        self.capture_id = self.conn.execute(
            "INSERT INTO captures (started_at, routes, entry, hoptrace_version, mitmproxy_version, source)"
            " VALUES (?, '[]', NULL, ?, ?, ?)",
            (time.time(), __version__, mitmproxy_version, self.source),
        ).lastrowid
        self.next_hop_id = self.conn.execute("SELECT coalesce(max(id), 0) + 1 FROM hops").fetchone()[0]

    def write(self, rows: Rows) -> None:
        # sqlite-utils inside the file's one transaction (its writes nest as savepoints); an
        # import's cost is mitmproxy building flows, not these inserts, unlike the recorder's.
        db = sqlite_utils.Database(self.conn)
        first = self.next_hop_id
        db["hops"].insert_all((dict(zip(HOP_COLUMNS, (first + i, *row))) for i, row in enumerate(rows.hops)), batch_size=500)
        db["tokens"].insert_all((dict(zip(TOKEN_COLUMNS, row)) for row in rows.tokens), ignore=True, batch_size=500)
        links = (dict(zip(HOP_TOKEN_COLUMNS, (first + i, *link))) for i, link in rows.links)
        db["hop_tokens"].insert_all(links, ignore=True, batch_size=500)
        self.next_hop_id += len(rows.hops)
        self.hops += len(rows.hops)
        self.addon_errors += rows.addon_errors
        started, ended, service = (HOP_ROW_COLUMNS.index(c) for c in ("started_at", "ended_at", "service"))
        for row in rows.hops:
            if self.first_started is None or row[started] < self.first_started:
                self.first_started, self.first_service = row[started], row[service]
            self.last_ended = row[ended] if self.last_ended is None else max(self.last_ended, row[ended])

    def close(self, entry: str | None) -> None:
        """Stamp the capture row: its span of time, routes, entry and counters."""
        routes = [{"name": name, **route} for name, route in self.routes.items()]
        self.conn.execute(
            "UPDATE captures SET started_at = coalesce(?, started_at), ended_at = ?, routes = ?, entry = ?,"
            " hops_seen = ?, hops_recorded = ?, addon_errors = ? WHERE id = ?",
            (
                self.first_started,
                self.last_ended,
                json.dumps(routes),
                entry or self.first_service,
                self.hops,
                self.hops,
                self.addon_errors,
                self.capture_id,
            ),
        )
