"""The live view's tail process: calls and errors come back, a dead process is named and replaced,
and the process never outlives the server."""

from __future__ import annotations

import operator
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hoptrace.ui._worker import Worker, WorkerDiedError, _portable


def _ended(pid: int) -> bool:
    """Gone, or a zombie nobody reaped yet (a container's init may not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def _wait_until_ended(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _ended(pid):
            return True
        time.sleep(0.05)
    return False


def test_a_call_runs_in_another_process_and_its_errors_are_raised_here():
    worker = Worker(preload="json")
    try:
        pid = worker.run(os.getpid)
        assert pid != os.getpid()
        assert worker.run(operator.add, 2, 3) == 5
        with pytest.raises(ZeroDivisionError):
            worker.run(operator.truediv, 1, 0)
        assert worker.run(os.getpid) == pid  # one process serves every call
    finally:
        worker.close()
    assert _wait_until_ended(pid, 5)
    with pytest.raises(WorkerDiedError):  # a pass still running when the server stops starts no process
        worker.run(os.getpid)


def test_what_a_call_prints_does_not_reach_the_answers():
    worker = Worker(preload="json")
    try:
        assert worker.run(print, "noise on stdout") is None
        assert worker.run(os.write, 1, b"noise on descriptor 1\n") == 22
        assert worker.run(operator.add, 1, 2) == 3
    finally:
        worker.close()


def test_an_error_that_does_not_survive_a_pickle_comes_back_as_its_words():
    class Odd(Exception):
        def __init__(self, a, b):
            super().__init__(f"{a}/{b}")

    words = _portable(Odd(1, 2))
    assert type(words) is RuntimeError and str(words) == "Odd: 1/2"
    plain = ValueError("x")
    assert _portable(plain) is plain


def test_a_process_killed_mid_call_is_named_and_the_next_call_starts_another():
    worker = Worker(preload="json")
    try:
        first = worker.run(os.getpid)
        caught: list[BaseException] = []

        def call() -> None:
            try:
                worker.run(time.sleep, 30)
            except BaseException as exc:  # noqa: BLE001 - the test looks at what it was
                caught.append(exc)

        thread = threading.Thread(target=call)
        thread.start()
        time.sleep(0.3)
        os.kill(first, signal.SIGKILL)
        thread.join(10)
        assert not thread.is_alive() and len(caught) == 1 and isinstance(caught[0], WorkerDiedError)
        second = worker.run(os.getpid)
        assert second not in (first, os.getpid())
        os.kill(second, signal.SIGKILL)  # between calls: the next one just starts another
        assert _wait_until_ended(second, 5)
        assert worker.run(os.getpid) not in (first, second, os.getpid())
    finally:
        worker.close()


def test_ctrl_c_to_the_process_group_leaves_the_process_answering():
    worker = Worker(preload="json")
    try:
        pid = worker.run(os.getpid)
        os.kill(pid, signal.SIGINT)
        time.sleep(0.2)
        assert worker.run(operator.mul, 6, 7) == 42 and worker.run(os.getpid) == pid
    finally:
        worker.close()


def test_the_process_ends_with_a_server_that_was_killed():
    server = subprocess.Popen(
        [sys.executable, "-c", (
            "import os, time; from hoptrace.ui._worker import Worker\n"
            "w = Worker(preload='json'); print(w.run(os.getpid), flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        pid = int(server.stdout.readline())
        assert not _ended(pid)
        server.kill()
        server.wait(10)
        assert _wait_until_ended(pid, 10), "the tail process outlived its server"
    finally:
        server.kill()
        server.stdout.close()
