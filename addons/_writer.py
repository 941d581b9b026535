"""The recorder's batching thread: finished flows in, batches handed to be built and written.

mitmproxy's hooks :meth:`TraceWriter.submit` a flow: it is copied into a snapshot of
plain values (~5 µs) and queued. This thread hands each batch of snapshots to the row
process (``_rowprocess.py``), or builds and writes it here (``_rows.py``, ``_store.py``)
for a short capture or when no process can run.

It cannot die: whatever a batch does, it is counted (recorded, bare, dropped) and the
next batch is taken. A dead row process is restarted, and the batch it died on is
written here. When the file refuses writes (disk full, I/O error), every lost hop is
counted and the proxy says so on stderr at once, then keeps proxying.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import sys
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from hoptrace._types import Counters, Route
from hoptrace.addons import _hop
from hoptrace.addons._rowprocess import RowProcess, RowProcessError
from hoptrace.addons._rows import read_flow
from hoptrace.addons._store import Counts, Written, build_and_write, finish, open_for_writing, start_capture, update_capture

logger = logging.getLogger("hoptrace")

# Where rows are built and inserted: "auto" moves that to a child process once a
# capture has seen ROW_PROCESS_AFTER flows (sustained load; a short capture never
# pays for a process), "on" from the start, "off" never (the writer thread).
ROW_PROCESS_MODES = ("auto", "on", "off")
ROW_PROCESS_AFTER = 100
# A row process that keeps dying is a bug, not bad luck: after this many restarts
# the writer thread builds the rows itself.
MAX_RESTARTS = 5
# The same failure is said again at most this often (seconds), with how many hops it cost.
_ALARM_EVERY = 5.0


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
        source: str = "mitmdump -s",
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
        self._alarmed: tuple[str, float] = ("", 0.0)
        self._conn = open_for_writing(self.path)
        self.capture_id = start_capture(self._conn, list(routes), entry, store_bodies, source)
        self.closed = False
        if row_process == "on":
            self._process()  # its start-up (~0.2 s) then overlaps the proxy's, not the first requests
        self._thread = threading.Thread(target=self._run, name="hoptrace-writer", daemon=True)
        self._thread.start()

    # -- any thread ---------------------------------------------------------

    def submit(self, service: str, flow) -> None:
        """Queue a finished flow's snapshot. Never blocks: past ``max_pending`` the flow is counted as dropped.

        The snapshot is taken here, on the caller's thread, and the flow is not kept: a backlog
        (a slow disk, a busy row process) then holds up to ``max_pending`` snapshots, not as many
        whole flows, whose bodies mitmproxy keeps in memory at any size. A snapshot holds headers
        and at most two bodies of up to 128 KiB each (longer ones are never read for tokens);
        most are a few KB.
        """
        if self.closed or self._queue.qsize() >= self._max_pending:
            self.counters.dropped += 1
            return
        self._queue.put((service, read_flow(flow)))

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything submitted so far is committed."""
        done = threading.Event()
        self._queue.put(done)
        self._wake.set()
        return done.wait(timeout)

    def close(self, timeout: float = 30.0) -> Counters:
        """Write what is queued, stamp the capture's end and counters, leave the file self-contained. Idempotent."""
        if self.closed:
            return self.counters
        self.closed = True
        self._queue.put(self._STOP)
        self._wake.set()
        self._thread.join(timeout)
        if self._row_process is not None:
            self._row_process.close()
        if self._thread.is_alive():
            self._alarm(f"the writer did not finish within {timeout:.0f} s; {self.path} may miss the last hops")
            return self.counters
        try:
            update_capture(self._conn, self.capture_id, self._counts(), ended_at=time.time())
        except sqlite3.Error as exc:
            self.counters.write_errors += 1
            self.counters.last_error = f"{self.path}: {exc}"
            self._alarm(f"could not stamp the end of the capture in {self.path}: {exc}")
        if (why := finish(self._conn)) is not None:
            logger.warning("hoptrace: %s left in WAL mode: %s", self.path, why)
        self._conn.close()
        return self.counters

    # -- writer thread ------------------------------------------------------

    def _run(self) -> None:
        while True:
            batch, markers, stop = self._next_batch()
            if batch:
                try:
                    self._write(batch)
                except Exception as exc:  # this thread must outlive any batch: count it and go on
                    logger.exception("hoptrace: writer failed on a batch")
                    self._account(Written(0, len(batch), 0, 1, f"{self.path}: {exc!r}"), len(batch))
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

    def _write(self, items: list) -> None:
        # A flow that could not be read arrives as its bare row, a dict (see read_flow).
        self.counters.addon_errors += sum(isinstance(snap, dict) for _, snap in items)
        self._submitted += len(items)
        self._account(self._write_items(items), len(items))

    def _write_items(self, items: list) -> Written:
        counts = self._counts()
        if (process := self._process()) is not None:
            try:
                return process.write(items, counts)
            except RowProcessError as exc:
                self._row_process_failed(exc)
                if self._committed(items):  # it died after its commit, before its reply
                    return Written(len(items), 0, 0, 0, None)
        return build_and_write(self._conn, self.path, self.capture_id, items, self._key, self._store_bodies, self._known_tokens, counts)

    def _counts(self) -> Counts:
        c = self.counters
        return Counts(c.seen, c.recorded, c.dropped, c.addon_errors, c.write_errors)

    def _account(self, written: Written, count: int) -> None:
        c = self.counters
        c.recorded += written.recorded
        c.dropped += written.dropped
        c.addon_errors += written.addon_errors
        c.write_errors += written.write_errors
        if written.error is not None:
            c.last_error = written.error
            self._alarm(f"could not write {written.dropped} of {count} hops ({c.dropped} lost so far): {written.error}", written.error)

    def _alarm(self, message: str, reason: str | None = None) -> None:
        """Say it on stderr now, whoever configured logging: the user is losing data.

        The same ``reason`` is repeated at most every few seconds; the counters keep the full count.
        """
        logger.error("hoptrace: %s", message)
        reason = reason or message
        said, said_at = self._alarmed
        now = time.monotonic()
        if reason != said or now - said_at > _ALARM_EVERY:
            self._alarmed = (reason, now)
            print(f"hoptrace: RECORDING FAILED: {message}", file=sys.stderr, flush=True)

    def _committed(self, items: list) -> bool:
        last = items[-1][1]
        flow_id = last["flow_id"] if isinstance(last, dict) else last[_hop._FLOW_ID]
        try:
            found = self._conn.execute("SELECT 1 FROM hops WHERE capture_id = ? AND flow_id = ?", (self.capture_id, flow_id))
            return found.fetchone() is not None
        except sqlite3.Error:
            return False

    def _row_process_failed(self, exc: RowProcessError) -> None:
        self._row_process.close()
        self._row_process = None
        self.counters.restarts += 1
        if self.counters.restarts >= MAX_RESTARTS:
            self._row_process_mode = "off"
            logger.warning("hoptrace: row process failed (%s) %d times; writing from the writer thread from now on", exc, MAX_RESTARTS)
        else:
            logger.warning("hoptrace: row process failed (%s); this batch written by the writer thread, a new process for the next", exc)
            self._process()  # started now, so that the next batch finds it ready

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


__all__ = ["MAX_RESTARTS", "ROW_PROCESS_AFTER", "ROW_PROCESS_MODES", "Counters", "Route", "TraceWriter"]
