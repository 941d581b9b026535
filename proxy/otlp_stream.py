"""`hoptrace proxy --otlp-endpoint URL`: the capture's spans, streamed to an OTLP/HTTP receiver as requests complete.

The spans are those of ``hoptrace export --otlp`` (built by
:func:`hoptrace.exchange._otlp.request_message` from the analysis of the trace file),
sent as protobuf (``POST URL/v1/traces``, ``Content-Type: application/x-protobuf``).

Everything happens in a process of its own, started by the proxy (with ``--workers``, one
for all the shards, started by the parent): never on mitmproxy's event loop nor under its
GIL, and at a lower priority (nice ``NICE``; its analyses during the capture at SCHED_IDLE,
only on CPU nothing else wants: :func:`_on_idle_cpu`). Every tick it copies the rows recorded since
the last one (read-only, by id: in WAL mode a reader does not block the recorder) into a
private window file (:class:`hoptrace.proxy.otlp_window.Window`), analyses the requests that
started in that window, and hands each complete request's spans to a sender thread, in batches.

When a request is complete: a hop is a row only once it ended, a caller's hop ends
after its callees' hops, and the recorder commits a hop within its batching delay
(0.1 s, a batch). So a request is sent once its root hop ended ``SETTLE`` (2 s) ago
and the root is a hop on the entry service, at the next analysis (every second, or
every 10x the CPU time the last one took: the analysis's fixed cost stays under a tenth of
a core; each hop adds its read and span, ~55 µs, and its copy). A root on another service
may be a call whose caller is still open (its parent is not in the file yet): it waits
``ORPHAN_SETTLE`` (10 s) before it is sent on its own. At the proxy's stop, after the
recorder closed the file, everything left is sent at once.

The queue between the analysis and the sender holds ``QUEUE_BATCHES`` batches; a batch
that does not fit, or that the receiver refuses twice, is dropped and its spans counted
(the proxy's summary says how many spans were streamed and dropped).

The counts are also kept in the trace file, on the capture row (``captures.otlp_endpoint``,
``otlp_spans_sent``, ``otlp_spans_dropped``; :func:`record_counts`), once the stream has
finished, so that whoever opens the file later can tell whether their receiver got every span.
"""

from __future__ import annotations

import base64
import logging
import multiprocessing
import os
import queue
import signal
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from hoptrace._errors import TraceFileError
from hoptrace._format import url_without_secrets
from hoptrace.db import SQLITE_ERRORS, open_for_saving

logger = logging.getLogger("hoptrace")

SETTLE = 2.0
ORPHAN_SETTLE = 10.0
INTERVAL = 1.0
CPU_SHARE_INVERSE = 10
BATCH_SPANS = 512
NICE = 10
QUEUE_BATCHES = 256
# A request whose root is not complete after this long is sent as it stands: the window never reaches further back.
HORIZON = 120.0
# A hop that lands up to this long after it ended (its recorder behind) is still sent under its parent: the
# window keeps its request's hops (longer once hops were seen landing later; Follower.reach).
LATE = 30.0


def traces_url(endpoint: str) -> str:
    """``URL/v1/traces`` for an OTLP/HTTP base URL (kept as is when it already names the path); ValueError if not http(s)."""
    parts = urllib.parse.urlsplit(endpoint)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--otlp-endpoint: expected an http:// or https:// URL, got {endpoint!r}")
    try:
        parts.port  # noqa: B018 -- urlsplit checks the port only when asked: a bad one raises here, not in the stream
    except ValueError as exc:  # "Port out of range 0-65535", "Port could not be cast to integer value as 'x'"
        raise ValueError(f"--otlp-endpoint: {exc}") from None
    path = parts.path.rstrip("/")
    return urllib.parse.urlunsplit(
        (parts.scheme, parts.netloc, path if path.endswith("/v1/traces") else f"{path}/v1/traces", "", "")
    )


def shown_url(endpoint: str) -> str:
    """:func:`traces_url` without what may be a secret (user and password, query string, fragment): what is stored and printed."""
    return url_without_secrets(traces_url(endpoint))


@dataclass(frozen=True)
class StreamInput:
    """A live file the capture records into, and which capture of it: by id (one proxy), or by
    ``captures.source`` (a shard of ``--workers``: its worker names it before its first hop)."""

    db: Path
    capture_id: int | None = None
    source: str | None = None


class OtlpStream:
    """The proxy's handle on the streaming process.

    ``pause()`` before the recorder closes the file (a reader holding it open would
    keep it in WAL mode), ``finish()`` after: the last requests are sent then.
    """

    def __init__(self, inputs: list[StreamInput], endpoint: str, entry: str | None) -> None:
        self.inputs, self.endpoint = inputs, endpoint
        context = multiprocessing.get_context("spawn")
        self._stop, self._closed = context.Event(), context.Event()
        # Held by the streaming process while it reads the live files: pause() waits for it.
        self._reading = context.Lock()
        self._results = context.Queue()
        events = (self._stop, self._closed, self._reading)
        self._process = context.Process(
            target=_stream, args=(inputs, traces_url(endpoint), entry, events, self._results), name="hoptrace-otlp"
        )
        self._process.start()

    def pause(self, timeout: float = 10.0) -> None:
        """Stop reading the live files: returns once a copy under way ended (milliseconds), never during an analysis."""
        self._stop.set()
        if self._reading.acquire(timeout=timeout):
            self._reading.release()

    def finish(self, timeout: float = 60.0) -> tuple[int, int]:
        """The files are closed: send what is left and keep the counts on the capture row (:func:`record_counts`);
        returns (spans sent, spans dropped); -1 dropped if it never answered."""
        self._stop.set()
        self._closed.set()
        sent, dropped = self._result(time.monotonic() + timeout)
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
        record_counts(self.inputs, self.endpoint, sent, dropped)
        return sent, dropped

    def _result(self, deadline: float) -> tuple[int, int]:
        # A streaming process that died (its traceback is on stderr) never answers: say so
        # at once rather than holding the proxy's stop for the whole timeout.
        while True:
            alive = self._process.is_alive()
            try:
                return self._results.get(timeout=0.2)
            except queue.Empty:
                if not alive or time.monotonic() > deadline:
                    return 0, -1


def record_counts(inputs: list[StreamInput], endpoint: str, sent: int, dropped: int) -> bool:
    """Keep what the stream did on its capture's row, once the recorders closed the files; False (and one line on
    stderr) if no file would take it: the capture itself is whole either way, and the summary line has the counts.

    The row gets the receiver (:func:`shown_url`: no credentials) and the spans sent and dropped; a stream that
    died (``dropped`` -1: it never answered) leaves both counts NULL beside the endpoint, as how many spans it
    sent before it died is unknown (never a 0 that would read as "none lost").

    One stream follows every shard of a ``--workers`` capture, and its counts are written once: on the
    row of the first input (in worker order) whose file has the capture's row, not on each shard's. The
    other shards' rows stay NULL (not streamed, as far as they know), so an analysis of the shards
    together, which makes one capture of their rows, counts each span once; a shard analysed alone
    other than the first says nothing of the stream.
    """
    counts = (None, None) if dropped < 0 else (sent, dropped)
    problems = []
    for stream_input in inputs:
        where, key = ("id = ?", stream_input.capture_id) if stream_input.source is None else ("source = ?", stream_input.source)
        try:
            conn = open_for_saving(stream_input.db, doing="keep the OTLP counts")
        except TraceFileError as exc:
            problems.append(str(exc))
            continue
        try:  # one statement: its own short transaction (the connection autocommits; busy timeout 5 s)
            updated = conn.execute(
                f"UPDATE captures SET otlp_endpoint = ?, otlp_spans_sent = ?, otlp_spans_dropped = ? WHERE {where}",
                (shown_url(endpoint), *counts, key),
            ).rowcount
        except SQLITE_ERRORS as exc:
            problems.append(f"{stream_input.db}: cannot keep the OTLP counts: {exc}")
            continue
        finally:
            conn.close()
        if updated:
            return True
        problems.append(f"{stream_input.db}: no capture row to keep the OTLP counts on")
    print(f"hoptrace proxy: OTLP counts not kept in the trace file ({'; '.join(problems)})", file=sys.stderr, flush=True)
    return False


def _stream(inputs: list[StreamInput], url: str, entry: str | None, events, results) -> None:
    """The streaming process (see the module's docstring)."""
    stop, closed, reading = events
    # Ctrl-C reaches the whole process group: the proxy decides when we stop, through `stop`.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    # Below the proxy, its row process, and the service it fronts for the CPU (the proxy is
    # what the user waits on; a span may wait): a nice of NICE gets ~1/10 of the CPU share of a
    # nice-0 process it competes with on a core (Linux CFS weights 110 against 1024). The
    # analyses during the capture go lower still (:func:`_on_idle_cpu`).
    os.nice(NICE)
    # This process's warnings go to the proxy's stderr (inherited), where the user looks.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    parent = os.getppid()
    # The analysis' imports (pandas, ~1 s of CPU) now, while the proxy starts, not under load.
    from hoptrace.analyzer import analyze  # noqa: F401
    from hoptrace.proxy.otlp_window import Follower, Window

    sender = _Sender(url)
    with tempfile.TemporaryDirectory(prefix="hoptrace-otlp-") as folder:
        window = Window(inputs, Path(folder) / "window.db")
        follower = Follower(window, entry, sender)
        interval = INTERVAL
        while not stop.wait(interval):
            if os.getppid() != parent:  # the proxy died: nobody will read our counts
                return
            used = time.process_time()
            with reading:
                copied = 0 if stop.is_set() else window.copy()
            # An analysis costs ~0.2 s of CPU whatever the window holds (the load's and the
            # detectors' fixed cost, measured on a window of 2,000 hops): none when nothing is new
            # or held back, and no more often than every 10x the last one's CPU time: that cost
            # stays under a tenth of a core (the hops' own, ~55 µs each and their copy, is paid
            # whenever they are sent).
            if copied or follower.waiting:
                _on_idle_cpu(follower.tick, time.time())
            interval = max(INTERVAL, CPU_SHARE_INVERSE * (time.process_time() - used))
        closed.wait()
        window.copy()  # the recorders closed the files: every request is complete
        follower.tick(float("inf"))
        window.close()
    results.put(sender.close())


def _on_idle_cpu(function, *args) -> None:
    """``function(*args)`` in a thread of its own that takes only the CPU nothing else wants; returns when it did.

    Linux's SCHED_IDLE gives a thread the CPU weight 3 against a nice-0 one's 1024: it runs on an
    idle core, and beside a busy one it takes ~0.3 % of it. The process's nice alone (weight 110)
    still took ~1/10 of the core of whatever shared one with it, the proxy included: measured at
    ~2,400 req/s, (g) ran at 0.91-0.97 of (d), and at 1.00-1.07 with its analyses at SCHED_IDLE.
    A thread of its own, because an unprivileged thread cannot leave SCHED_IDLE again, and the
    rest must not starve on a busy machine: the copy, which holds a read snapshot of the live file
    (its WAL cannot restart meanwhile), and the last analysis after the stop, which the user waits
    on, run at the process's nice. Where SCHED_IDLE is missing (not Linux) or refused (a seccomp
    profile) the thread keeps that nice too.
    """
    failed: list[BaseException] = []

    def run() -> None:
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # 0: this thread
        except (AttributeError, OSError):
            pass
        try:
            function(*args)
        except BaseException as exc:  # noqa: BLE001 -- raised again in the caller's thread, as if it ran there
            failed.append(exc)

    thread = threading.Thread(target=run, name="hoptrace-otlp-analysis")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


class _Sender:
    """Batches messages and POSTs them from a thread, through a bounded queue; counts what it sent and dropped."""

    def __init__(self, url: str) -> None:
        # urllib would take a URL's user:password@ as part of the host name: sent as Basic credentials instead.
        parts = urllib.parse.urlsplit(url)
        self.url = shown_url(url)
        self._headers = {"Content-Type": "application/x-protobuf"}
        if parts.username is not None:
            credentials = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(credentials.encode()).decode("ascii")
        # A batch is its messages' encodings, joined: serialized messages concatenated parse as
        # one message holding all their resource spans (merging appends to a repeated field),
        # without copying each message into a batch message first.
        self._batch: list[bytes] = []
        self._batch_spans = 0
        self._queue: queue.Queue = queue.Queue(QUEUE_BATCHES)
        self.sent = self.dropped = 0
        self._said_at = 0.0
        self._thread = threading.Thread(target=self._run, name="hoptrace-otlp-sender", daemon=True)
        self._thread.start()

    def add(self, message, spans: int) -> None:
        self._batch.append(message.SerializeToString())
        self._batch_spans += spans
        if self._batch_spans >= BATCH_SPANS:
            self.flush()

    def flush(self) -> None:
        if not self._batch_spans:
            return
        try:
            self._queue.put_nowait((b"".join(self._batch), self._batch_spans))
        except queue.Full:
            self.dropped += self._batch_spans
            self._say(f"the queue is full ({QUEUE_BATCHES} batches): dropped {self._batch_spans} spans")
        self._batch, self._batch_spans = [], 0

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
        request = urllib.request.Request(self.url, data=body, method="POST", headers=self._headers)
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


__all__ = ["LATE", "ORPHAN_SETTLE", "SETTLE", "OtlpStream", "StreamInput", "record_counts", "shown_url", "traces_url"]
