"""The recorder's writer: finished flows in, batched SQLite transactions out, on its own thread.

mitmproxy's hooks only :meth:`TraceWriter.submit` a flow (a queue put, well under
a microsecond); parsing, token decoding, redaction and SQLite all happen here.
A batch is one ``BEGIN IMMEDIATE`` transaction in WAL mode, so a crash loses at
most the batch in flight and readers can follow the capture as it grows.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hoptrace import __version__
from hoptrace.addons._hop import hop_row
from hoptrace.addons._tokens import TokenInfo, decode, fingerprint
from hoptrace.db import HOP_COLUMNS, HOP_TOKEN_COLUMNS, TOKEN_COLUMNS, open_for_writing

logger = logging.getLogger("hoptrace")

_HOP_INSERT = f"INSERT INTO hops ({', '.join(HOP_COLUMNS)}) VALUES ({', '.join('?' * len(HOP_COLUMNS))})"
_TOKEN_INSERT = f"INSERT OR IGNORE INTO tokens ({', '.join(TOKEN_COLUMNS)}) VALUES ({', '.join('?' * len(TOKEN_COLUMNS))})"
_LINK_INSERT = f"INSERT OR IGNORE INTO hop_tokens ({', '.join(HOP_TOKEN_COLUMNS)}) VALUES (?, ?, ?, ?)"
# Every hop column after the four the writer fills itself: id, capture_id, flow_id, service.
_HOP_FIELDS = HOP_COLUMNS[4:]


@dataclass(frozen=True, slots=True)
class Route:
    """One reverse listener: the service behind it, where it forwards, the port it listens on."""

    name: str
    upstream: str
    listen_port: int


@dataclass
class Counters:
    """What happened to the flows of a capture. ``seen`` counts requestheaders events."""

    seen: int = 0
    recorded: int = 0
    dropped: int = 0
    addon_errors: int = 0
    write_errors: int = 0
    last_error: str | None = field(default=None, repr=False)

    def summary(self) -> str:
        text = (
            f"{self.recorded} hops recorded, {self.dropped} dropped, "
            f"{self.addon_errors} addon errors, {self.write_errors} write errors"
        )
        if unfinished := self.seen - self.recorded - self.dropped:
            text += f", {unfinished} unfinished"
        return text


class TraceWriter:
    """Owns the trace DB connection and the thread that writes to it.

    ``submit`` may be called from any thread; everything else about the DB
    happens on the writer thread, except ``close``, which joins it first.
    """

    _STOP = object()

    def __init__(
        self,
        path: str | Path,
        *,
        routes: Iterable[Route],
        entry: str | None,
        key: bytes,
        store_bodies: bool = False,
        max_pending: int = 200_000,
        batch_size: int = 2_000,
    ) -> None:
        self.path = Path(path)
        self.counters = Counters()
        self._key = key
        self._store_bodies = store_bodies
        self._max_pending = max_pending
        self._batch_size = batch_size
        self._known_tokens: set[str] = set()
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._conn = open_for_writing(self.path)
        routes = list(routes)
        self.capture_id = self._conn.execute(
            "INSERT INTO captures (started_at, routes, entry, hoptrace_version, mitmproxy_version, bodies_stored)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (
                time.time(),
                json.dumps([{"name": r.name, "upstream": r.upstream, "listen_port": r.listen_port} for r in routes]),
                entry,
                __version__,
                _mitmproxy_version(),
                int(store_bodies),
            ),
        ).lastrowid
        self._thread = threading.Thread(target=self._run, name="hoptrace-writer", daemon=True)
        self._thread.start()
        self.closed = False

    # -- any thread ---------------------------------------------------------

    def submit(self, service: str, flow) -> None:
        """Queue a finished flow. Never blocks: past ``max_pending`` the flow is counted as dropped."""
        if self.closed or self._queue.qsize() >= self._max_pending:
            self.counters.dropped += 1
            return
        self._queue.put((service, flow))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is committed."""
        done = threading.Event()
        self._queue.put(done)
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> Counters:
        """Write what is queued, stamp the capture's end and counters, close the DB. Idempotent."""
        if self.closed:
            return self.counters
        self.closed = True
        self._queue.put(self._STOP)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.error("hoptrace: writer did not finish within %.0f s; %s", timeout, self.path)
            return self.counters
        try:
            self._update_capture(ended_at=time.time())
        except sqlite3.Error as exc:
            self.counters.write_errors += 1
            self.counters.last_error = f"{self.path}: {exc}"
            logger.error("hoptrace: could not stamp the end of the capture in %s: %s", self.path, exc)
        self._conn.close()
        return self.counters

    # -- writer thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch, markers, stop = self._next_batch()
            if batch:
                self._write(batch)
            for marker in markers:
                marker.set()
            if stop:
                return

    def _next_batch(self) -> tuple[list, list[threading.Event], bool]:
        batch: list = []
        markers: list[threading.Event] = []
        item = self._queue.get()
        while True:
            if item is self._STOP:
                return batch, markers, True
            if isinstance(item, threading.Event):
                markers.append(item)
            else:
                batch.append(item)
            if len(batch) >= self._batch_size:
                return batch, markers, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return batch, markers, False

    def _write(self, batch: list) -> None:
        hops, tokens, links = self._rows(batch)
        try:
            self._conn.execute("BEGIN IMMEDIATE")
            first_id = self._conn.execute("SELECT coalesce(max(id), 0) + 1 FROM hops").fetchone()[0]
            self._conn.executemany(_HOP_INSERT, ((first_id + i, *row) for i, row in enumerate(hops)))
            self._conn.executemany(_TOKEN_INSERT, tokens)
            self._conn.executemany(_LINK_INSERT, ((first_id + i, *link) for i, link in links))
            self._update_capture(recorded=self.counters.recorded + len(hops))
            self._conn.execute("COMMIT")
        except sqlite3.Error as exc:
            if self._conn.in_transaction:
                self._conn.rollback()
            self.counters.write_errors += 1
            self.counters.dropped += len(hops)
            self.counters.last_error = f"{self.path}: {exc}"
            # Loud, not silent: the user is losing data.
            logger.error("hoptrace: could not write %d hops to %s: %s", len(hops), self.path, exc)
            return
        self.counters.recorded += len(hops)
        self._known_tokens.update(row[0] for row in tokens)

    def _rows(self, batch: list) -> tuple[list[tuple], list[tuple], list[tuple[int, tuple]]]:
        hops, tokens, links = [], [], []
        new_tokens: set[str] = set()
        for service, flow in batch:
            try:
                row, sightings = hop_row(flow, self._key, self._store_bodies)
            except Exception:  # a flow shape we did not foresee must not lose the batch
                self.counters.addon_errors += 1
                logger.exception("hoptrace: could not read flow %s; recorded without details", getattr(flow, "id", "?"))
                row, sightings = _bare_row(flow), []
            index = len(hops)
            hops.append((self.capture_id, row["flow_id"], service, *(row[name] for name in _HOP_FIELDS)))
            seen_here = set()
            for sighting in sightings:
                fp = fingerprint(self._key, sighting.token)
                if fp not in self._known_tokens and fp not in new_tokens:
                    new_tokens.add(fp)
                    tokens.append(self._token_row(fp, decode(sighting.token), row["started_at"]))
                if (fp, sighting.role, sighting.location) not in seen_here:
                    seen_here.add((fp, sighting.role, sighting.location))
                    links.append((index, (fp, sighting.role, sighting.location)))
        return hops, tokens, links

    def _token_row(self, fp: str, info: TokenInfo, seen_at: float) -> tuple:
        values = {"fingerprint": fp, "capture_id": self.capture_id, "first_seen_at": seen_at}
        return tuple(values[name] if name in values else getattr(info, name) for name in TOKEN_COLUMNS)

    def _update_capture(self, recorded: int | None = None, ended_at: float | None = None) -> None:
        counters = self.counters
        self._conn.execute(
            "UPDATE captures SET hops_seen = ?, hops_recorded = ?, hops_dropped = ?, addon_errors = ?,"
            " write_errors = ?, ended_at = coalesce(?, ended_at) WHERE id = ?",
            (
                counters.seen,
                counters.recorded if recorded is None else recorded,
                counters.dropped,
                counters.addon_errors,
                counters.write_errors,
                ended_at,
                self.capture_id,
            ),
        )


def _bare_row(flow) -> dict:
    """The little we can say of a flow whose details would not parse."""
    started = getattr(flow.request, "timestamp_start", None) or time.time()
    row = dict.fromkeys(HOP_COLUMNS)
    row.update(
        flow_id=flow.id,
        method=getattr(flow.request, "method", None),
        path=getattr(flow.request, "path", "").partition("?")[0],
        error="hoptrace could not read this flow",
        error_kind="other",
        failed=1,
        started_at=started,
        ended_at=started,
        duration_ms=0.0,
    )
    return row


def _mitmproxy_version() -> str:
    from mitmproxy import version

    return version.VERSION


__all__ = ["Counters", "Route", "TraceWriter"]
