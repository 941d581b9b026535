"""The row process: a child that builds and writes rows, off the proxy's core and GIL.

Turning a flow into a row (headers, tokens, redaction, JSON) takes ~110 µs and
inserting it ~25 µs, measured on a 2-core box; in a thread, that work also makes
mitmproxy's event loop wait for the GIL after its socket calls. So under load the
writer thread only hands batches of flow snapshots over a pipe.

The protocol, one request at a time: a length-prefixed ``marshal`` frame in on the
child's stdin, one out on its stdout. Only plain tuples cross (``marshal`` knows no
named tuples): ``("init", path, key, capture_id, store_bodies)``, then
``("write", items, counts)`` answered by a :class:`~hoptrace.addons._store.Written`
as a plain tuple. The fingerprint key goes over the pipe, never on a command line.
The child ignores SIGINT/SIGTERM (in its own session, Ctrl-C never reaches it) and
exits when its stdin closes: when the writer closes it, or when the proxy dies.

It starts under load (see ``_writer.py``), on cores the proxy shares, so its start-up
is kept small: 0.18-0.23 s of CPU instead of 0.52-0.64 s. pyarrow imports numpy when
it is installed (60 ms) and its first ``pa.array`` imports pandas to check for pandas
types (230 ms); the child refuses both imports, which pyarrow (18 and later) treats as
the packages being absent. The Arrow streams it writes are the same bytes.
"""

from __future__ import annotations

import logging
import marshal
import os
import select
import signal
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

from hoptrace import _hop_columns as hop_columns
from hoptrace.addons._store import Counts, Written, build_and_write, open_for_writing

# Runs the row process without importing hoptrace.addons' __init__, which imports
# the recorder and with it mitmproxy: 0.2 s and 20 MB the child never uses.
_BOOTSTRAP = """
import sys, types
package = types.ModuleType("hoptrace.addons")
package.__path__ = [sys.argv[1]]
sys.modules["hoptrace.addons"] = package
from hoptrace.addons._rowprocess import serve_rows
serve_rows()
"""
_FRAME = struct.Struct("<I")
# Never imported in the child: nothing there uses them (see the module's docstring).
NOT_IMPORTED = frozenset({"numpy", "pandas"})


class RowProcessError(Exception):
    pass


class RowProcess:
    """The parent's end of the pipe (see the module's docstring)."""

    def __init__(self, path: Path, key: bytes, capture_id: int, store_bodies: bool, timeout: float = 30.0) -> None:
        if getattr(sys, "frozen", False):
            raise RowProcessError("a frozen mitmproxy cannot run Python modules")
        self._timeout = timeout
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _BOOTSTRAP, str(Path(__file__).resolve().parent)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        self._send(("init", str(path), key, capture_id, store_bodies))

    def write(self, items: list, counts: Counts) -> Written:
        """Build and commit one batch in the child; raises RowProcessError if it cannot answer."""
        self._send(("write", items, tuple(counts)))
        reply = self._receive()
        if len(reply) != len(Written._fields):
            raise RowProcessError(f"it failed: {reply[-1]}")
        return Written(*reply)

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
        try:
            data = marshal.dumps(message)
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


class _Refuse:
    """A ``sys.meta_path`` finder that fails the import of the packages it names, as if they were not
    installed (a plain class: importing ``importlib.abc`` for its base would cost the start-up 5 ms)."""

    def __init__(self, names: frozenset[str]) -> None:
        self.names = names

    def find_spec(self, fullname: str, path, target=None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(f"{fullname} is not imported by hoptrace's row process", name=fullname)


def serve_rows() -> None:
    """The child's main loop: one reply per request; a failure is a reply, not an exit."""
    sys.meta_path.insert(0, _Refuse(NOT_IMPORTED))
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    logging.basicConfig(stream=sys.stderr, format="hoptrace row process: %(message)s")
    requests, replies = sys.stdin.buffer, sys.stdout.buffer
    state: dict = {"known": set()}
    try:
        while len(header := requests.read(_FRAME.size)) == _FRAME.size:
            try:
                reply = _handle(marshal.loads(requests.read(_FRAME.unpack(header)[0])), state)
            except Exception as exc:  # told to the parent, which writes the batch itself
                reply = ("error", repr(exc)[:500])
            if reply is not None:
                data = marshal.dumps(reply)
                replies.write(_FRAME.pack(len(data)) + data)
                replies.flush()
    finally:
        if "conn" in state:
            state["conn"].close()


def _prepare_columns(ready: threading.Event) -> None:
    try:
        hop_columns.prepare()
    except Exception:  # noqa: BLE001 -- no columns then: the hops are read as rows
        return
    ready.set()


def _handle(message: tuple, state: dict) -> tuple | None:
    if message[0] == "init":
        _, state["path"], state["key"], state["capture_id"], state["store_bodies"] = message
        state["conn"] = open_for_writing(state["path"])
        # pyarrow's import and first use take ~0.35 s: beside the first batches, which go without their
        # Arrow columns until it is done, rather than in front of the first (its hops had shown 0.3 s late).
        state["columns"] = threading.Event()
        threading.Thread(target=_prepare_columns, args=(state["columns"],), name="hoptrace-columns", daemon=True).start()
        return None
    _, items, counts = message
    written = build_and_write(
        state["conn"], state["path"], state["capture_id"], items, state["key"], state["store_bodies"], state["known"], Counts(*counts),
        columns=state["columns"].is_set(),
    )
    return tuple(written)


__all__ = ["RowProcess", "RowProcessError", "serve_rows"]
