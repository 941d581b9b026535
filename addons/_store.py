"""The trace file's writing side: a capture's row, batches of hop rows, the clean end.

Used by the writer thread and by the row process alike (one connection each,
never both at once). A batch is one ``BEGIN IMMEDIATE`` transaction in WAL mode,
so a crash loses at most the batch in flight. A batch SQLite refuses for one of
its rows is split in halves until that row is alone; the row then goes in bare,
or, if even that fails, is counted as dropped: one bad hop never costs its
neighbours. A refusal that is about the file (disk full, I/O error, read-only)
drops the batch at once, counted and said loudly by the caller.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from collections.abc import Iterable
from typing import NamedTuple

from hoptrace import __version__
from hoptrace import _hop_columns as hop_columns
from hoptrace._types import Route
from hoptrace.addons._rows import HopRows, _bare, bare_hop, build_rows, clean_row
from hoptrace.db import HOP_COLUMNS, HOP_TOKEN_COLUMNS, TOKEN_COLUMNS, open_for_writing

logger = logging.getLogger("hoptrace")

_HOP_INSERT = f"INSERT INTO hops ({', '.join(HOP_COLUMNS)}) VALUES ({', '.join('?' * len(HOP_COLUMNS))})"
_TOKEN_INSERT = f"INSERT OR IGNORE INTO tokens ({', '.join(TOKEN_COLUMNS)}) VALUES ({', '.join('?' * len(TOKEN_COLUMNS))})"
_LINK_INSERT = f"INSERT OR IGNORE INTO hop_tokens ({', '.join(HOP_TOKEN_COLUMNS)}) VALUES (?, ?, ?, ?)"
# max(): a capture's counters in the file never go back, whatever order updates land in.
_CAPTURE_UPDATE = (
    "UPDATE captures SET hops_seen = max(hops_seen, ?), hops_recorded = max(hops_recorded, ?),"
    " hops_dropped = max(hops_dropped, ?), addon_errors = max(addon_errors, ?),"
    " write_errors = max(write_errors, ?), ended_at = coalesce(?, ended_at) WHERE id = ?"
)

# Where a column sits in a HopRows.hop (which has no id).
_AT = {name: index - 1 for index, name in enumerate(HOP_COLUMNS)}


class Counts(NamedTuple):
    """A capture's counters as they stand (the capture row's columns, in order)."""

    seen: int
    recorded: int
    dropped: int
    addon_errors: int
    write_errors: int


class Written(NamedTuple):
    """What became of one batch. ``addon_errors`` counts hops that went in bare."""

    recorded: int
    dropped: int
    addon_errors: int
    write_errors: int
    error: str | None


def start_capture(conn: sqlite3.Connection, routes: Iterable[Route], entry: str | None, store_bodies: bool, source: str) -> int:
    from mitmproxy import version

    routes_json = json.dumps([{"name": r.name, "upstream": r.upstream, "listen_port": r.listen_port} for r in routes])
    return conn.execute(
        "INSERT INTO captures (started_at, routes, entry, hoptrace_version, mitmproxy_version, bodies_stored, source)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (time.time(), routes_json, entry, __version__, version.VERSION, int(store_bodies), source),
    ).lastrowid


def update_capture(conn: sqlite3.Connection, capture_id: int, counts: Counts, ended_at: float | None = None) -> None:
    conn.execute(_CAPTURE_UPDATE, (*counts, ended_at, capture_id))


def build_and_write(
    conn: sqlite3.Connection, path, capture_id: int, items: list, key: bytes, store_bodies: bool, known: set[str], counts: Counts,
    columns: bool = False,
) -> Written:
    """Rows of a batch of snapshots, written; ``known`` (tokens already in the file) grows with what committed.
    ``columns``: also their Arrow columns (see :func:`write_batch`)."""
    built = build_rows(items, key, store_bodies, capture_id, known)
    counts = counts._replace(addon_errors=counts.addon_errors + built.addon_errors)
    written = write_batch(conn, path, capture_id, built.hops, counts, columns)
    if not written.dropped and not written.addon_errors:
        known.update(token[0] for rows in built.hops for token in rows.tokens)
    return written._replace(addon_errors=written.addon_errors + built.addon_errors)


def write_batch(conn: sqlite3.Connection, path, capture_id: int, hops: list[HopRows], counts: Counts, columns: bool = False) -> Written:
    """Insert a batch, splitting it around rows SQLite refuses; ``counts`` stand before this batch.

    ``columns``: with the batch's analysis columns in Arrow (:mod:`hoptrace._hop_columns`), which the
    row process writes and the proxy's own writer thread does not: encoding imports pyarrow (~0.2 s of
    the event loop's GIL, once) and costs ~1.7 µs a hop, and a short capture reads fast as rows anyway.
    """
    try:
        _insert(conn, capture_id, hops, counts, columns)
    except sqlite3.OperationalError as exc:  # the file, not a row: disk full, I/O error, read-only, locked
        _rollback(conn)
        return Written(0, len(hops), 0, 1, f"{path}: {exc}")
    except Exception as exc:  # a row SQLite will not take (constraint, type); anything else is a bug to survive
        _rollback(conn)
        if len(hops) > 1:
            half = len(hops) // 2
            first = write_batch(conn, path, capture_id, hops[:half], counts, columns)
            counts = counts._replace(recorded=counts.recorded + first.recorded, dropped=counts.dropped + first.dropped)
            return _sum(first, write_batch(conn, path, capture_id, hops[half:], counts, columns))
        return _write_alone(conn, path, capture_id, hops[0], counts, exc)
    return Written(len(hops), 0, 0, 0, None)


def _write_alone(conn, path, capture_id: int, rows: HopRows, counts: Counts, exc: Exception) -> Written:
    """The one row of a batch SQLite refused: in bare (its id, service, what failed), or dropped."""
    flow_id, method, path_, started = (rows.hop[_AT[name]] for name in ("flow_id", "method", "path", "started_at"))
    bare = _bare(flow_id, method, path_, started, exc)
    try:
        _insert(conn, capture_id, [HopRows(bare_hop(capture_id, rows.hop[_AT["service"]], bare), [], [])], counts)
    except Exception as again:
        _rollback(conn)
        return Written(0, 1, 0, 1, f"{path}: {again!r}")
    return Written(1, 0, 1, 0, None)


def _insert(conn: sqlite3.Connection, capture_id: int, hops: list[HopRows], counts: Counts, columns: bool = False) -> None:
    # clean_row is the one choke point: every value stored passes it. Ids are given in the transaction,
    # so the rows are cleaned (and their columns encoded) with a placeholder id, outside it.
    rows = [clean_row((0, *hop.hop)) for hop in hops]
    links = [(i, *clean_row(link)) for i, hop in enumerate(hops) for link in hop.links]
    encoded = _columns(rows, links) if columns and hops else None
    conn.execute("BEGIN IMMEDIATE")
    first_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM hops").fetchone()[0]
    conn.executemany(_HOP_INSERT, ((first_id + i, *row[1:]) for i, row in enumerate(rows)))
    # Sightings left by hops a client deleted, whose ids these hops take: the rows would count them, the streams not.
    if encoded is not None and conn.execute("SELECT 1 FROM hop_tokens WHERE hop_id >= ? LIMIT 1", (first_id,)).fetchone():
        encoded = None
    conn.executemany(_TOKEN_INSERT, (clean_row(token) for hop in hops for token in hop.tokens))
    conn.executemany(_LINK_INSERT, ((first_id + i, *link) for i, *link in links))
    if encoded is not None:
        hop_columns.insert(conn, first_id, first_id + len(rows) - 1, encoded)
    update_capture(conn, capture_id, counts._replace(recorded=counts.recorded + len(hops)))
    conn.execute("COMMIT")


def _columns(rows: list[tuple], links: list[tuple]) -> tuple[bytes, bytes] | None:
    """The batch's Arrow streams, or None: they are a copy of the rows, so whatever fails in them
    (a pyarrow that one day imports what the row process leaves out) must not cost the rows."""
    try:
        return hop_columns.encode(rows, HOP_COLUMNS, links)
    except Exception as exc:  # noqa: BLE001 -- these hops are read as rows instead
        logger.warning("hoptrace: a batch's Arrow columns could not be encoded (%r); its hops will be read as rows", exc)
        return None


def _rollback(conn: sqlite3.Connection) -> None:
    try:
        if conn.in_transaction:
            conn.rollback()
    except sqlite3.Error:
        pass


def _sum(a: Written, b: Written) -> Written:
    return Written(
        a.recorded + b.recorded, a.dropped + b.dropped, a.addon_errors + b.addon_errors, a.write_errors + b.write_errors, b.error or a.error
    )


def finish(conn: sqlite3.Connection) -> str | None:
    """Leave the file self-contained: WAL checkpointed into it and the journal mode back to DELETE.

    A WAL-mode file needs its -wal and -shm, and write access to open: a copy
    on read-only media could not be read. Returns why not, when another
    connection (a reader following the capture) keeps the file in WAL mode.
    """
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        mode = conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0]
    except sqlite3.Error as exc:
        return str(exc)
    return None if mode == "delete" else f"journal mode is still {mode} (another connection has the file open)"


__all__ = ["Counts", "Written", "build_and_write", "finish", "open_for_writing", "start_capture", "update_capture", "write_batch"]
