"""A process of its own for the live view's tail analyses.

In the web server's process a pass shares the GIL with the threads that answer the browser:
with a list page refreshing on every event, a pass that takes 0.74 s alone took 1.25 s there.
In a process of its own it has a core to itself while the pages are answered.

The process is ``python -m hoptrace.ui._worker``, talking pickles over its stdin and stdout.
Not ``multiprocessing``: its spawn start method runs the parent's main script again in the
child, which a script that serves the UI without an ``if __name__ == "__main__"`` guard does
not survive, and a fork would copy the server's threads' locks in whatever state they are.
The child ignores SIGINT (a Ctrl-C reaches the whole process group; the server stops it) and
ends at the end of its stdin, so it ends with the server however the server ended.
"""

from __future__ import annotations

import os
import pickle
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import IO, Any, TypeVar

T = TypeVar("T")
_SIZE = struct.Struct("!Q")


class WorkerDiedError(RuntimeError):
    """The worker process ended in the middle of a call (killed, or out of memory)."""


class Worker:
    """One process that runs calls one at a time, started on first use and again after it ended.

    :meth:`submit` starts a call and :meth:`result` waits for it, so that the caller can do other
    work meanwhile; :meth:`run` does both. One call at a time: a call submitted while another is
    out has the other's answer read and dropped first.
    """

    def __init__(self, preload: str) -> None:
        """``preload``: a module the process imports as it starts (its imports take about a second)."""
        self.preload = preload
        self._process: subprocess.Popen | None = None
        self._out = False
        self._closed = False
        self._lock = threading.Lock()

    def start(self) -> None:
        """Start the process now, so that the first call does not wait for its imports."""
        with self._lock:
            self._current()

    @property
    def busy(self) -> bool:
        """A call was submitted and its result not read yet."""
        return self._out

    def run(self, func: Callable[..., T], *args: Any) -> T:
        """``func(*args)`` in the process (a module-level function, picklable arguments); what it
        raises is raised here."""
        self.submit(func, *args)
        return self.result()

    def submit(self, func: Callable[..., Any], *args: Any) -> None:
        with self._lock:
            if self._out:
                self._read()
            process = self._current()
            self._talk(lambda: _send(process.stdin, (func, args)))
            self._out = True

    def result(self) -> Any:
        """What the call submitted last returned; what it raised is raised here."""
        with self._lock:
            if not self._out:
                raise RuntimeError("no call was submitted")
            ok, value = self._read()
        if not ok:
            raise value
        return value

    def close(self) -> None:
        """Stop the process; a call submitted later (a pass still running in the server) raises."""
        with self._lock:
            self._closed = True
            self._stop()

    def _read(self) -> tuple[bool, Any]:
        try:
            return self._talk(lambda: _receive(self._process.stdout))
        finally:
            self._out = False

    def _talk(self, exchange: Callable[[], T]) -> T:
        try:
            return exchange()
        except (OSError, EOFError, pickle.UnpicklingError) as exc:
            self._stop()
            raise WorkerDiedError("the live analysis process ended; the next pass starts another") from exc

    def _current(self) -> subprocess.Popen:
        if self._process is not None and self._process.poll() is not None:
            self._stop()  # ended between calls: its pipes closed before another starts
        if self._closed:
            raise WorkerDiedError("the live analysis process was stopped with the server")
        if self._process is None:
            command = [sys.executable, "-m", __name__, self.preload]
            self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        return self._process

    def _stop(self) -> None:
        process, self._process, self._out = self._process, None, False
        if process is None:
            return
        # The end of its input, and of its output: an idle child returns at once, a busy one when
        # its answer finds no reader.
        process.stdin.close()
        process.stdout.close()
        try:
            process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _send(stream: IO[bytes], value: Any) -> None:
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(_SIZE.pack(len(data)) + data)
    stream.flush()


def _receive(stream: IO[bytes]) -> Any:
    head = stream.read(_SIZE.size)
    if len(head) < _SIZE.size:
        raise EOFError("the stream ended")
    (size,) = _SIZE.unpack(head)
    data = stream.read(size)
    if len(data) < size:
        raise EOFError("the stream ended")
    return pickle.loads(data)


def _serve(preload: str) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    __import__(preload)
    # The replies get a descriptor of their own, and descriptor 1 becomes stderr's: nothing a call
    # prints, from Python or from a C library, can corrupt them.
    requests, replies = sys.stdin.buffer, os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    while True:
        try:
            func, args = _receive(requests)
        except EOFError:
            return
        try:
            reply = (True, func(*args))
        except Exception as exc:  # noqa: BLE001 - the caller raises it, as if the call were its own
            reply = (False, _portable(exc))
        try:
            _send(replies, reply)
        except BrokenPipeError:  # the server stopped without waiting for this answer
            return


def _portable(exc: Exception) -> Exception:
    """``exc``, or its words in a RuntimeError when it would not survive the pickle (an exception
    class whose ``__init__`` takes other arguments than its ``args``)."""
    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - any failure to round-trip means the same: send the words
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc


if __name__ == "__main__":
    _serve(sys.argv[1])
