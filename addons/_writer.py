"""The recorder's writer: finished flows in, batched SQLite transactions out, on its own thread.

mitmproxy's hooks only :meth:`TraceWriter.submit` a flow (a queue put, well under
a microsecond); parsing, token decoding, redaction and SQLite all happen here.
A batch is one ``BEGIN IMMEDIATE`` transaction in WAL mode, so a crash loses at
most the batch in flight and readers can follow the capture as it grows.

The writer thread shares the GIL with mitmproxy's event loop. Turning a flow into
a row (headers, tokens, redaction, JSON) takes ~110 µs and inserting it ~25 µs,
measured on a 2-core box, and a thread busy with that also makes the event loop
wait for the GIL after its socket calls. So under sustained load a child process
(:class:`RowProcess`) builds and inserts the rows: the writer thread only copies
each flow into a :func:`~hoptrace.addons._hop.snapshot` of plain values (~5 µs),
hands the batch over a pipe (``marshal``), and waits for the commit.
``benchmarks/`` measures both ways (``hoptrace_row_process``).
"""

from __future__ import annotations

import json
import logging
import marshal
import os
import queue
import select
import signal
import sqlite3
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from hoptrace import __version__
from hoptrace.addons import _hop
from hoptrace.addons._hop import snapshot, snapshot_row
from hoptrace.addons._tokens import TokenInfo, decode, fingerprint
from hoptrace.db import HOP_COLUMNS, HOP_TOKEN_COLUMNS, TOKEN_COLUMNS, open_for_writing

logger = logging.getLogger("hoptrace")

_HOP_INSERT = f"INSERT INTO hops ({', '.join(HOP_COLUMNS)}) VALUES ({', '.join('?' * len(HOP_COLUMNS))})"
_TOKEN_INSERT = f"INSERT OR IGNORE INTO tokens ({', '.join(TOKEN_COLUMNS)}) VALUES ({', '.join('?' * len(TOKEN_COLUMNS))})"
_LINK_INSERT = f"INSERT OR IGNORE INTO hop_tokens ({', '.join(HOP_TOKEN_COLUMNS)}) VALUES (?, ?, ?, ?)"
_CAPTURE_UPDATE = (
    "UPDATE captures SET hops_seen = ?, hops_recorded = ?, hops_dropped = ?, addon_errors = ?,"
    " write_errors = ?, ended_at = coalesce(?, ended_at) WHERE id = ?"
)
# Every hop column after the four the writer fills itself: id, capture_id, flow_id, service.
_HOP_FIELDS = HOP_COLUMNS[4:]
# Where rows are built and inserted: "auto" moves that to a child process once a
# capture has seen ROW_PROCESS_AFTER flows (sustained load; a short capture never
# pays for a process), "on" from the start, "off" never (the writer thread).
ROW_PROCESS_MODES = ("auto", "on", "off")
ROW_PROCESS_AFTER = 100


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
        row_process: str = "auto",
        linger: float = 0.1,
    ) -> None:
        if row_process not in ROW_PROCESS_MODES:
            raise ValueError(f"row_process: one of {', '.join(ROW_PROCESS_MODES)}, not {row_process!r}")
        self.path = Path(path)
        self.counters = Counters()
        self._row_process_mode = row_process
        self._row_process: RowProcess | None = None
        self._submitted = 0
        # After the first flow of a batch, wait this long for more: fewer, larger
        # batches mean fewer wake-ups of this thread taking the GIL from the event
        # loop (measured under mitmdump at 64 clients: 0.02 s cost ~15 % of
        # throughput, 0.1 s ~5 %). flush() and close() cut the wait short.
        self._linger = linger
        self._wake = threading.Event()
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
        self.closed = False
        if row_process == "on":
            self._process()  # its start-up (~0.2 s) then overlaps the proxy's, not the first requests
        self._thread = threading.Thread(target=self._run, name="hoptrace-writer", daemon=True)
        self._thread.start()

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
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> Counters:
        """Write what is queued, stamp the capture's end and counters, close the DB. Idempotent."""
        if self.closed:
            return self.counters
        self.closed = True
        self._queue.put(self._STOP)
        self._wake.set()
        self._thread.join(timeout)
        if self._row_process is not None:
            self._row_process.close()
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
        if self._linger and item is not self._STOP and not isinstance(item, threading.Event):
            self._wake.wait(self._linger)
            self._wake.clear()
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
        items = self._snapshots(batch)
        counts = self._capture_counts()
        if (process := self._process()) is not None:
            try:
                outcome = process.write(items, counts)
            except RowProcessError as exc:
                logger.warning("hoptrace: row process failed (%s); writing from the writer thread from now on", exc)
                process.close()
                self._row_process, self._row_process_mode = None, "off"
                if self._committed(items):  # it died after its commit, before its reply
                    self.counters.recorded += len(items)
                    return
            else:
                self._account(*outcome, count=len(items))
                return
        hops, tokens, links, errors = build_rows(items, self._key, self._store_bodies, self.capture_id, self._known_tokens)
        counts[3] += errors
        outcome = write_rows(self._conn, self.path, self.capture_id, hops, tokens, links, counts)
        if outcome[2] == 0:
            self._known_tokens.update(row[0] for row in tokens)
        self._account(errors, *outcome, count=len(items))

    def _snapshots(self, batch: list) -> list[tuple[str, tuple | dict]]:
        items: list[tuple[str, tuple | dict]] = []
        for service, flow in batch:
            try:
                items.append((service, snapshot(flow)))
            except Exception:  # a flow shape we did not foresee must not lose the batch
                self.counters.addon_errors += 1
                logger.exception("hoptrace: could not read flow %s; recorded without details", getattr(flow, "id", "?"))
                items.append((service, _bare_row(flow)))
        self._submitted += len(items)
        return items

    def _capture_counts(self) -> list:
        """The capture row's counters as they stand before this batch (seen, recorded, dropped, addon errors, write errors)."""
        c = self.counters
        return [c.seen, c.recorded, c.dropped, c.addon_errors, c.write_errors]

    def _account(
        self, errors: int, recorded: int, dropped: int, write_errors: int, last_error: str | None, *, count: int
    ) -> None:
        self.counters.addon_errors += errors
        self.counters.recorded += recorded
        self.counters.dropped += dropped
        self.counters.write_errors += write_errors
        if last_error is not None:
            self.counters.last_error = last_error
            # Loud, not silent: the user is losing data.
            logger.error("hoptrace: could not write %d hops to %s", count, last_error)

    def _committed(self, items: list) -> bool:
        last = items[-1][1]
        flow_id = last["flow_id"] if isinstance(last, dict) else last[_hop._FLOW_ID]
        try:
            return (
                self._conn.execute(
                    "SELECT 1 FROM hops WHERE capture_id = ? AND flow_id = ?", (self.capture_id, flow_id)
                ).fetchone()
                is not None
            )
        except sqlite3.Error:
            return False

    def _process(self) -> RowProcess | None:
        mode = self._row_process_mode
        if self._row_process is None and (mode == "on" or mode == "auto" and self._submitted >= ROW_PROCESS_AFTER):
            try:
                self._row_process = RowProcess(self.path, self._key, self.capture_id, self._store_bodies)
            except (OSError, RowProcessError) as exc:
                logger.warning("hoptrace: could not start the row process (%s); writing from the writer thread", exc)
                self._row_process_mode = "off"
            else:
                self._row_process_mode = "on"
        return self._row_process

    def _update_capture(self, ended_at: float | None = None) -> None:
        c = self.counters
        self._conn.execute(
            _CAPTURE_UPDATE, (c.seen, c.recorded, c.dropped, c.addon_errors, c.write_errors, ended_at, self.capture_id)
        )


def write_rows(
    conn: sqlite3.Connection, path, capture_id: int, hops: list, tokens: list, links: list, counts: list
) -> tuple[int, int, int, str | None]:
    """One batch, one transaction; returns (recorded, dropped, write errors, error message or None).

    ``counts`` are the capture's counters before this batch (see TraceWriter._capture_counts);
    the capture row is updated in the same transaction. Runs in the writer thread or the row process.
    """
    seen, recorded, dropped, addon_errors, write_errors = counts
    try:
        conn.execute("BEGIN IMMEDIATE")
        first_id = conn.execute("SELECT coalesce(max(id), 0) + 1 FROM hops").fetchone()[0]
        conn.executemany(_HOP_INSERT, ((first_id + i, *row) for i, row in enumerate(hops)))
        conn.executemany(_TOKEN_INSERT, tokens)
        conn.executemany(_LINK_INSERT, ((first_id + i, *link) for i, link in links))
        conn.execute(_CAPTURE_UPDATE, (seen, recorded + len(hops), dropped, addon_errors, write_errors, None, capture_id))
        conn.execute("COMMIT")
    except sqlite3.Error as exc:
        if conn.in_transaction:
            conn.rollback()
        return 0, len(hops), 1, f"{path}: {exc}"
    return len(hops), 0, 0, None


def build_rows(
    items: list[tuple[str, tuple | dict]], key: bytes, store_bodies: bool, capture_id: int, known: set[str]
) -> tuple[list[tuple], list[tuple], list[tuple[int, tuple]], int]:
    """Snapshots in; hop rows, rows of tokens not in ``known``, hop-token links and an error count out.

    An item is (service, snapshot), or (service, row) for a flow already reduced to a bare row.
    Runs in the writer thread or in the row process: no state but its arguments.
    """
    hops, tokens, links = [], [], []
    errors = 0
    new_tokens: set[str] = set()
    for service, snap in items:
        if isinstance(snap, dict):
            row, sightings = snap, []
        else:
            try:
                row, sightings = snapshot_row(snap, key, store_bodies)
            except Exception:  # hostile input we did not foresee must not lose the hop
                errors += 1
                logger.exception("hoptrace: could not read flow %s; recorded without details", snap[0])
                row, sightings = _bare_snapshot_row(snap), []
        index = len(hops)
        hops.append((capture_id, row["flow_id"], service, *(row[name] for name in _HOP_FIELDS)))
        seen_here = set()
        for sighting in sightings:
            fp = fingerprint(key, sighting.token)
            if fp not in known and fp not in new_tokens:
                new_tokens.add(fp)
                tokens.append(_token_row(fp, capture_id, decode(sighting.token), row["started_at"]))
            if (fp, sighting.role, sighting.location) not in seen_here:
                seen_here.add((fp, sighting.role, sighting.location))
                links.append((index, (fp, sighting.role, sighting.location)))
    return hops, tokens, links, errors


def _token_row(fp: str, capture_id: int, info: TokenInfo, seen_at: float) -> tuple:
    values = {"fingerprint": fp, "capture_id": capture_id, "first_seen_at": seen_at}
    return tuple(values[name] if name in values else getattr(info, name) for name in TOKEN_COLUMNS)


def _bare_snapshot_row(snap: tuple) -> dict:
    """The little we can say of a snapshot whose details would not parse."""
    started = snap[_hop._REQ_START]
    if isinstance(started, bool) or not isinstance(started, int | float):
        started = None
    return _bare(snap[_hop._FLOW_ID], snap[_hop._METHOD], str(snap[_hop._PATH]), started)


def _bare_row(flow) -> dict:
    """The little we can say of a flow whose details would not parse."""
    request = flow.request
    return _bare(flow.id, getattr(request, "method", None), getattr(request, "path", ""), getattr(request, "timestamp_start", None))


def _bare(flow_id: str, method: str | None, path: str, started: float | None) -> dict:
    started = started or time.time()
    row = dict.fromkeys(HOP_COLUMNS)
    row.update(
        flow_id=flow_id,
        method=method,
        path=path.partition("?")[0],
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


# -- the row process ---------------------------------------------------------------


class RowProcessError(Exception):
    pass


# Runs the row process without importing hoptrace.addons' __init__, which imports
# the recorder and with it mitmproxy: 0.2 s and 20 MB the child never uses.
_BOOTSTRAP = """
import sys, types
package = types.ModuleType("hoptrace.addons")
package.__path__ = [sys.argv[1]]
sys.modules["hoptrace.addons"] = package
from hoptrace.addons._writer import serve_rows
serve_rows()
"""
_FRAME = struct.Struct("<I")


class RowProcess:
    """A child process that turns snapshots into rows and writes them, off the proxy's core and GIL.

    One request at a time over its stdin, one reply on its stdout, each a
    length-prefixed ``marshal`` frame: a batch of snapshots in, its outcome
    (committed or not) out, so the writer thread knows what is on disk before it
    tells anyone. The fingerprint key goes over the pipe, never on a command line.
    The child ignores SIGINT/SIGTERM (in its own session, Ctrl-C never reaches it)
    and exits when its stdin closes: when the writer closes it, or when the proxy dies.
    """

    def __init__(self, path: Path, key: bytes, capture_id: int, store_bodies: bool, timeout: float = 30.0) -> None:
        if getattr(sys, "frozen", False):
            raise RowProcessError("a frozen mitmproxy cannot run Python modules")
        self._timeout = timeout
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(Path(__file__).resolve().parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self._send(("init", str(path), key, capture_id, store_bodies))

    def write(self, items: list, counts: list) -> tuple[int, int, int, int, str | None]:
        """Build and commit one batch; (addon errors, recorded, dropped, write errors, error message)."""
        self._send(("write", items, counts))
        return self._receive()

    def close(self) -> None:
        if self._proc.stdin and not self._proc.stdin.closed:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        try:
            self._proc.wait(5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout:
            self._proc.stdout.close()

    def _send(self, message: tuple) -> None:
        data = marshal.dumps(message)
        try:
            self._proc.stdin.write(_FRAME.pack(len(data)) + data)
            self._proc.stdin.flush()
        except (OSError, ValueError) as exc:
            raise RowProcessError(f"cannot write to it: {exc}") from None

    def _receive(self) -> tuple:
        size = _FRAME.unpack(self._read(_FRAME.size))[0]
        try:
            return marshal.loads(self._read(size))
        except (EOFError, ValueError, TypeError) as exc:
            raise RowProcessError(f"bad reply: {exc}") from None

    def _read(self, size: int) -> bytes:
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + self._timeout
        chunks, left = [], size
        while left:
            wait = deadline - time.monotonic()
            if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                self._proc.kill()
                raise RowProcessError(f"no reply within {self._timeout:.0f} s")
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                raise RowProcessError(f"it exited ({self._proc.poll()})")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)


def serve_rows() -> None:
    """The row process's main loop (see :class:`RowProcess`)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, format="hoptrace row process: %(message)s")
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    conn = None
    path, key, capture_id, store_bodies = "", b"", 0, False
    known: set[str] = set()
    try:
        while len(header := requests.read(_FRAME.size)) == _FRAME.size:
            message = marshal.loads(requests.read(_FRAME.unpack(header)[0]))
            if message[0] == "init":
                _, path, key, capture_id, store_bodies = message
                conn = open_for_writing(path)
                continue
            _, items, counts = message
            hops, tokens, links, errors = build_rows(items, key, store_bodies, capture_id, known)
            counts[3] += errors
            outcome = write_rows(conn, path, capture_id, hops, tokens, links, counts)
            if outcome[2] == 0:
                known.update(row[0] for row in tokens)
            reply = marshal.dumps((errors, *outcome))
            replies.write(_FRAME.pack(len(reply)) + reply)
            replies.flush()
    finally:
        if conn is not None:
            conn.close()


__all__ = ["Counters", "Route", "RowProcess", "TraceWriter", "build_rows", "write_rows"]
