"""`hoptrace proxy --otlp-endpoint URL`: the capture's spans, streamed to an OTLP/HTTP receiver as requests complete.

The spans are those of ``hoptrace export --otlp`` (built by
:func:`hoptrace.exchange._otlp.request_message` from the analysis of the trace file),
sent as protobuf (``POST URL/v1/traces``, ``Content-Type: application/x-protobuf``).

Everything happens in a process of its own, started by the proxy: never on mitmproxy's
event loop nor under its GIL. Every second it analyses the requests that started in a
sliding window of the trace file (read-only; in WAL mode a reader does not block the
recorder), and hands each complete request's spans to a sender thread, in batches.

When a request is complete: a hop is a row only once it ended, a caller's hop ends
after its callees' hops, and the recorder commits a hop within its batching delay
(0.1 s, a batch). So a request is sent once its root hop ended ``SETTLE`` (2 s) ago
and the root is a hop on the entry service, at the next analysis (every second, or
every 10x the CPU time the last one took, ~5 s: this process keeps under a tenth of a core). A root on another service may be a call
whose caller is still open (its parent is not in the file yet): it waits
``ORPHAN_SETTLE`` (10 s) before it is sent on its own. At the proxy's stop, after the
recorder closed the file, everything left is sent at once.

The queue between the analysis and the sender holds ``QUEUE_BATCHES`` batches; a batch
that does not fit, or that the receiver refuses twice, is dropped and its spans counted
(the proxy's summary says how many spans were streamed and dropped).
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import sqlite3
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from hoptrace._errors import HoptraceError

logger = logging.getLogger("hoptrace")

SETTLE = 2.0
ORPHAN_SETTLE = 10.0
INTERVAL = 1.0
CPU_SHARE_INVERSE = 10
BATCH_SPANS = 512
QUEUE_BATCHES = 256
# A request whose root is not complete after this long is sent as it stands: the window never reaches further back.
HORIZON = 120.0


def traces_url(endpoint: str) -> str:
    """``URL/v1/traces`` for an OTLP/HTTP base URL (kept as is when it already names the path); ValueError if not http(s)."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--otlp-endpoint: expected an http:// or https:// URL, got {endpoint!r}")
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, path if path.endswith("/v1/traces") else f"{path}/v1/traces", "", "")
    )


class OtlpStream:
    """The proxy's handle on the streaming process.

    ``pause()`` before the recorder closes the file (a reader holding it open would
    keep it in WAL mode), ``finish()`` after: the last requests are sent then.
    """

    def __init__(self, db: Path, endpoint: str, capture_id: int, entry: str | None) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop, self._paused, self._closed = context.Event(), context.Event(), context.Event()
        self._results = context.Queue()
        events = (self._stop, self._paused, self._closed)
        self._process = context.Process(
            target=_stream, args=(str(db), traces_url(endpoint), capture_id, entry, events, self._results), name="hoptrace-otlp"
        )
        self._process.start()

    def pause(self, timeout: float = 30.0) -> None:
        """Stop reading the file (the tick under way ends first)."""
        self._stop.set()
        self._paused.wait(timeout)

    def finish(self, timeout: float = 30.0) -> tuple[int, int]:
        """The file is closed: send what is left; returns (spans sent, spans dropped); -1 dropped if it never answered."""
        self._stop.set()
        self._closed.set()
        try:
            sent, dropped = self._results.get(timeout=timeout)
        except queue.Empty:
            sent, dropped = 0, -1
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
        return sent, dropped


def _stream(db: str, url: str, capture_id: int, entry: str | None, events, results) -> None:
    """The streaming process (see the module's docstring)."""
    stop, paused, closed = events
    # Ctrl-C reaches the whole process group: the proxy decides when we stop, through `stop`.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # This process's warnings go to the proxy's stderr (inherited), where the user looks.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parent = os.getppid()
    # The analysis' imports (pandas, ~1 s of CPU) now, while the proxy starts, not under load.
    from hoptrace.analyzer import analyze  # noqa: F401

    sender = _Sender(url)
    follower = _Follower(Path(db), capture_id, entry, sender)
    interval = INTERVAL
    while not stop.wait(interval):
        if os.getppid() != parent:  # the proxy died: nobody will read our counts
            return
        used = time.process_time()
        follower.tick(time.time())
        # An analysis costs ~0.5 s of CPU whatever the window (its detectors' fixed cost,
        # measured on 2 cores): ticking no more often than 10x that keeps this process
        # under a tenth of a core, which the proxy shares the machine with (at 1 s per
        # tick and a fifth of a core, the benchmark lost a third of its throughput).
        interval = max(INTERVAL, CPU_SHARE_INVERSE * (time.process_time() - used))
    paused.set()
    closed.wait()
    follower.tick(float("inf"))  # the recorder closed the file: every request is complete
    results.put(sender.close())


class _Follower:
    """Which requests of the file are complete and not sent yet."""

    def __init__(self, db: Path, capture_id: int, entry: str | None, sender: _Sender) -> None:
        self.db, self.capture_id, self.entry, self.sender = db, capture_id, entry, sender
        # Requests that started before this are all sent; None before the first tick.
        self.frontier: float | None = None
        self.sent: dict[int, float] = {}  # hop id -> started_at, for hops already sent
        self.longest = 0.0  # the longest hop of the capture so far, seconds
        self._last_id = 0

    def tick(self, now: float) -> None:
        from hoptrace.exchange._otlp import request_message, requests
        from hoptrace.exchange._select import select

        until = now - SETTLE
        try:
            self._grow_longest()
            # A request is in the file only once it ended: one that started before the
            # frontier may land now, at most the longest hop so far earlier than that.
            since = None if self.frontier is None else self.frontier - self.longest - 0.5
            selection = select(self.db, since=since, until=None if now == float("inf") else until)
            hops = [hop for hop in selection.hops() if hop["capture_id"] == self.capture_id]
            tokens = selection.tokens() if hops else {}
        except (
            HoptraceError,
            sqlite3.Error,
            OSError,
        ) as exc:  # a file still being created, a busy moment: the next tick tries again
            logger.warning("hoptrace: OTLP stream could not read %s: %s", self.db, exc)
            return
        pending_from = until
        for request in requests(hops):
            root = request[0]
            wait = SETTLE if root["service"] == self.entry else ORPHAN_SETTLE
            if root["ended_at"] > now - wait and root["started_at"] > now - HORIZON:
                pending_from = min(pending_from, root["started_at"])
                continue
            unsent = [hop for hop in request if hop["id"] not in self.sent]
            if unsent:
                self.sender.add(request_message(unsent, tokens), len(unsent))
                self.sent.update((hop["id"], hop["started_at"]) for hop in unsent)
        self.sender.flush()
        self.frontier = pending_from
        self.sent = {hop: started for hop, started in self.sent.items() if started >= pending_from - self.longest - HORIZON}

    def _grow_longest(self) -> None:
        """The longest hop so far, from the rows written since the last tick (by id: an index range, not a scan)."""
        conn = sqlite3.connect(f"{self.db.resolve().as_uri()}?mode=ro", uri=True)
        try:
            last, longest = conn.execute(
                "SELECT max(id), max(ended_at - started_at) FROM hops WHERE id > ? AND capture_id = ?",
                (self._last_id, self.capture_id),
            ).fetchone()
        finally:
            conn.close()
        if last is not None:
            self._last_id, self.longest = last, max(self.longest, min(longest, HORIZON))


class _Sender:
    """Batches messages and POSTs them from a thread, through a bounded queue; counts what it sent and dropped."""

    def __init__(self, url: str) -> None:
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

        self.url = url
        self._message_type = ExportTraceServiceRequest
        self._batch = ExportTraceServiceRequest()
        self._batch_spans = 0
        self._queue: queue.Queue = queue.Queue(QUEUE_BATCHES)
        self.sent = self.dropped = 0
        self._said_at = 0.0
        self._thread = threading.Thread(target=self._run, name="hoptrace-otlp-sender", daemon=True)
        self._thread.start()

    def add(self, message, spans: int) -> None:
        self._batch.resource_spans.extend(message.resource_spans)
        self._batch_spans += spans
        if self._batch_spans >= BATCH_SPANS:
            self.flush()

    def flush(self) -> None:
        if not self._batch_spans:
            return
        try:
            self._queue.put_nowait((self._batch.SerializeToString(), self._batch_spans))
        except queue.Full:
            self.dropped += self._batch_spans
            self._say(f"the queue is full ({QUEUE_BATCHES} batches): dropped {self._batch_spans} spans")
        self._batch, self._batch_spans = self._message_type(), 0

    def close(self, timeout: float = 20.0) -> tuple[int, int]:
        self.flush()
        self._queue.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():  # the receiver hangs: what is still queued will not be sent
            self.dropped += sum(spans for body, spans in list(self._queue.queue) if body is not None)
        return self.sent, self.dropped

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            body, spans = item
            if self._post(body) or self._post(body):  # one retry: a receiver restarting, a connection reset
                self.sent += spans
            else:
                self.dropped += spans

    def _post(self, body: bytes) -> bool:
        request = urllib.request.Request(self.url, data=body, method="POST", headers={"Content-Type": "application/x-protobuf"})
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                return 200 <= response.status < 300
        except (OSError, urllib.error.URLError) as exc:
            self._say(f"{self.url} refused a batch: {exc}")
            return False

    def _say(self, message: str) -> None:
        # At most every 5 s: a receiver that is down would otherwise fill stderr.
        if time.monotonic() - self._said_at > 5:
            self._said_at = time.monotonic()
            print(f"hoptrace: OTLP stream: {message}", file=sys.stderr, flush=True)


__all__ = ["ORPHAN_SETTLE", "SETTLE", "OtlpStream", "traces_url"]
