"""The streaming process's side of ``--otlp-endpoint``: a private window of the capture, and which of its requests to send."""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path

from hoptrace._errors import HoptraceError
from hoptrace.db import migrate, shared_columns
from hoptrace.exchange._otlp import SpanIds, describe_capture, request_message, requests
from hoptrace.exchange._select import select
from hoptrace.proxy.otlp_stream import HORIZON, LATE, ORPHAN_SETTLE, SETTLE, StreamInput

logger = logging.getLogger("hoptrace")


class Window:
    """The capture's recent rows, copied from its live file (or from every shard of it) into a
    private file, which the analysis reads instead of the live one.

    Why a copy: an analysis checks every page of the file it reads (quick_check) and the export
    reads every row of it; on the live file both grow with the capture, here they stay the size
    of the window. And shards become one capture: the analysis relates hops of one capture only,
    and every shard numbers its hops from 1; so the copy holds one capture row, and hop ``id`` of
    shard ``p`` (0-based) of ``W`` becomes ``id * W + p``, unique and reversible (:class:`WindowIds`).
    """

    def __init__(self, inputs: list[StreamInput], path: Path) -> None:
        self.inputs, self.path = inputs, path
        # uri: ATTACH then takes file: URIs. Any thread: the analyses run in one of their own, one at a time.
        self.conn = sqlite3.connect(path.as_uri(), uri=True, isolation_level=None, check_same_thread=False)
        migrate(self.conn, 0)
        self.conn.execute("PRAGMA synchronous = OFF")  # a scratch file: a crash loses nothing that matters
        self.capture_ids: list[int | None] = [i.capture_id for i in inputs]
        self.last = [0] * len(inputs)  # per input: the last hop id copied
        self.longest = 0.0  # the longest hop of the capture so far, seconds
        # The earliest start and end of the hops copied since the follower last analysed the window.
        self.new_from: float | None = None
        self.new_ended: float | None = None
        self.ids = WindowIds(len(inputs))
        self._column_names: dict[str, list[str]] = {}

    def copy(self) -> int:
        """Copy the hops recorded since the last copy (and their token rows); returns how many."""
        copied = 0
        for position, source in enumerate(self.inputs):
            try:
                copied += self._copy(position, source)
            except sqlite3.Error as exc:  # a file still being created, a busy moment: the next tick tries again
                logger.warning("hoptrace: OTLP stream could not read %s: %s", source.db, exc)
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
            finally:
                if any(row[1] == "live" for row in self.conn.execute("PRAGMA database_list")):
                    self.conn.execute("DETACH DATABASE live")
        return copied

    def _copy(self, position: int, source: StreamInput) -> int:
        if not source.db.exists():
            return 0
        self.conn.execute("ATTACH DATABASE ? AS live", (f"{source.db.resolve().as_uri()}?mode=ro",))
        self.conn.execute("BEGIN")  # one snapshot of the live file: hops, their tokens, their token rows
        capture = self.capture_ids[position]
        if capture is None:
            row = self.conn.execute("SELECT max(id) FROM live.captures WHERE source = ?", (source.source,)).fetchone()
            if row[0] is None:
                self.conn.execute("ROLLBACK")
                return 0
            capture = self.capture_ids[position] = row[0]
        if position not in self.ids.captures:
            self._add_capture(position, capture)
        last, longest, first_start, first_end = self.conn.execute(
            "SELECT max(id), max(ended_at - started_at), min(started_at), min(ended_at) FROM live.hops"
            " WHERE id > ? AND capture_id = ?",
            (self.last[position], capture),
        ).fetchone()
        copied = 0
        if last is not None:
            copied = self._copy_hops(position, capture, self.last[position], last)
            self.last[position], self.longest = last, max(self.longest, min(longest, HORIZON))
            self.new_from = _earliest(self.new_from, first_start)
            self.new_ended = _earliest(self.new_ended, first_end)
        self.conn.execute("COMMIT")
        return copied

    def _add_capture(self, position: int, capture: int) -> None:
        names = self._columns("captures")
        row = self.conn.execute(f"SELECT {', '.join(names)} FROM live.captures WHERE id = ?", (capture,)).fetchone()
        self.ids.captures[position] = describe_capture(capture, row[names.index("source")] if "source" in names else None)
        # Hops of earlier captures in the same file have smaller ids: the first copy starts after them.
        self.last[position] = self.conn.execute(
            "SELECT coalesce(max(id), 0) FROM live.hops WHERE capture_id < ?", (capture,)
        ).fetchone()[0]
        values = [1 if name == "id" else value for name, value in zip(names, row, strict=True)]
        self.conn.execute(f"INSERT OR IGNORE INTO captures ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", values)

    def _copy_hops(self, position: int, capture: int, after: int, last: int) -> int:
        count = len(self.inputs)
        hops = [{"id": f"id * {count} + {position}", "capture_id": "1"}.get(name, name) for name in self._columns("hops")]
        copied = self.conn.execute(
            f"INSERT INTO hops ({', '.join(self._columns('hops'))}) SELECT {', '.join(hops)} FROM live.hops"
            " WHERE id > ? AND id <= ? AND capture_id = ?",
            (after, last, capture),
        ).rowcount
        tokens = ["1" if name == "capture_id" else name for name in self._columns("tokens")]
        self.conn.execute(
            f"INSERT OR REPLACE INTO tokens ({', '.join(self._columns('tokens'))}) SELECT {', '.join(tokens)} FROM live.tokens"
            " WHERE fingerprint IN (SELECT fingerprint FROM live.hop_tokens WHERE hop_id > ? AND hop_id <= ?)",
            (after, last),
        )
        self.conn.execute(
            f"INSERT OR IGNORE INTO hop_tokens (hop_id, fingerprint, role, location)"
            f" SELECT hop_id * {count} + {position}, fingerprint, role, location FROM live.hop_tokens WHERE hop_id > ? AND hop_id <= ?",
            (after, last),
        )
        return copied

    def _columns(self, table: str) -> list[str]:
        """The columns the live file and the copy both have (an older live file may lack some; all inputs are alike)."""
        if table not in self._column_names:
            self._column_names[table] = shared_columns(self.conn, table, "live")
        return self._column_names[table]

    def forget(self, before: float) -> None:
        """Drop the rows of hops that started before ``before``: no request the analysis still reads holds them."""
        self.conn.execute("DELETE FROM hops WHERE started_at < ?", (before,))
        self.conn.execute("DELETE FROM hop_tokens WHERE hop_id NOT IN (SELECT id FROM hops)")

    def close(self) -> None:
        self.conn.close()


def _earliest(kept: float | None, new: float | None) -> float | None:
    return new if kept is None else kept if new is None else min(kept, new)


class WindowIds(SpanIds):
    """Span ids of the window's hops: those of each hop in its own shard (see :class:`_Window`)."""

    def __init__(self, shards: int) -> None:
        super().__init__()
        self.shards = shards  # self.captures: shard position -> its capture's (key, attributes)

    def locate(self, hop_id: int, capture_id: int) -> tuple[tuple[str, dict], int]:
        return self.captures[hop_id % self.shards], hop_id // self.shards


class Follower:
    """Which requests of the window are complete and not sent yet, and which hops the window still needs."""

    def __init__(self, window: Window, entry: str | None, sender) -> None:
        self.window, self.entry, self.sender = window, entry, sender
        # Requests that started before this are all sent; None before the first tick.
        self.frontier: float | None = None
        self.waiting = False  # a request was held back at the last tick: the next one must look again
        self.sent: dict[int, float] = {}  # hop id (the window's) -> started_at, for hops already sent
        # How far behind a recorder was, seconds: the longest a hop copied at a tick had ended before the
        # tick before (the stream's own pacing is not lateness: what ends between two ticks is copied at the next).
        self.lateness = 0.0
        self.last_tick: float | None = None

    def tick(self, now: float) -> None:
        until = now - SETTLE
        longest = self.window.longest
        # Where to look from: the requests held back, and the hops copied since the last look.
        # A hop lands in the file after it ended, late when its recorder is behind (a worker's
        # shard may trail another's by seconds): its start, not the clock, says where it goes.
        # And its request's root started at most the longest hop so far earlier than it.
        looked_from = [start for start in (self.frontier, self.window.new_from) if start is not None]
        since = min(looked_from) - longest - 0.5 if self.frontier is not None and looked_from else None
        try:
            selection = select((self.window.path,), since=since, until=None if now == float("inf") else until)
            hops = list(selection.hops())
            tokens = selection.tokens() if hops else {}
        except (HoptraceError, sqlite3.Error, OSError) as exc:
            logger.warning("hoptrace: OTLP stream could not analyse the capture: %s", exc)
            return
        if self.window.new_ended is not None and self.last_tick is not None:
            self.lateness = max(self.lateness, self.last_tick - self.window.new_ended)
        self.window.new_from = self.window.new_ended = None
        self.last_tick = now
        pending_from, self.waiting = until, False
        for request in requests(hops):
            root = request[0]
            wait = SETTLE if root["service"] == self.entry else ORPHAN_SETTLE
            if root["ended_at"] > now - wait and root["started_at"] > now - HORIZON:
                pending_from, self.waiting = min(pending_from, root["started_at"]), True
                continue
            unsent = [hop for hop in request if hop["id"] not in self.sent]
            if unsent:
                self.sender.add(request_message(unsent, tokens, self.window.ids), len(unsent))
                self.sent.update((hop["id"], hop["started_at"]) for hop in unsent)
        self.sender.flush()
        self.frontier = pending_from
        keep_from = pending_from - longest - self.reach(longest)
        self.sent = {hop: started for hop, started in self.sent.items() if started >= keep_from}
        self.window.forget(keep_from)

    def reach(self, longest: float) -> float:
        """How long before the earliest request still to send (less its longest hop) the window keeps hops.

        For a hop that lands late: it ended up to :attr:`lateness` before the tick before the one that saw
        it, and its request's root started up to ``longest`` before it; it is sent under its parent only if
        the request's earlier hops are still here. ``LATE``, or twice the lateness seen (a recorder falling further behind), and
        never past ``HORIZON``: each analysis reads the window whole (its structure check, the load's
        counts), so at 1,000 hops a second ``HORIZON`` alone kept 120,000 hops to send a second's.
        """
        return min(HORIZON, longest + max(LATE, 2 * self.lateness))


__all__ = ["Follower", "Window", "WindowIds"]
