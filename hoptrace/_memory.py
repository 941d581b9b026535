"""Freed memory given back to the system after the load; the collector and huge pages off during the analysis;
a capture's start-up objects out of the collector's sight.

The load frees large temporaries (the Arrow buffers and parsed strings its frames were made
from), but neither allocator returns them at once: pyarrow's pool (mimalloc) keeps freed pages
for reuse, and glibc's ``malloc`` keeps freed space below the top of its heaps. The analysis then
allocates beside memory no one uses. Measured at 1M hops read as rows: peak RSS 1,130 MB
without it, 970 MB with it.

Not after the later stages: what they free is ``malloc``'s, reused by the next stage as it is,
while memory given back has to be faulted in and zeroed by the kernel again. Giving back after
the rebuild, the per-hop facts and the latency tables as well cost 0.5-0.9 s at 1M hops (sys
time 1.4 -> 2.3 s) for a peak lower by 0-30 MB. The latency tables' thread frees into a ``malloc``
arena of its own, which glibc hands to the next analysis's thread: four analyses of a 100k-hop
capture in one process held 215, 222, 227 and 228 MB after each.

The cyclic garbage collector is paused, and numpy's huge pages are off, while the analysis runs
(:func:`analysis_memory`). A capture freezes what its start-up made (:func:`freeze_start_up`).

pyarrow and numpy are imported where they are used: the proxy's process, which freezes, needs neither.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager


def give_back() -> None:
    """Return the memory pyarrow's pool and ``malloc`` hold free to the system."""
    import pyarrow as pa

    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        # The process's own symbols, the C library's among them (find_library would run ldconfig).
        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None


# How many analyses are running, and how the collector and numpy's huge pages were before the first.
_settings = threading.Lock()
_running = 0
_noted: tuple[bool, bool | None] = (True, None)


@contextmanager
def analysis_memory() -> Iterator[None]:
    """While any analysis runs: Python's cyclic garbage collector paused, and numpy's arrays on small pages.

    Both are process-wide, so every thread runs so meanwhile. The first analysis to start (of those
    running at once, in any threads, nested or not) notes how they were; the last to end puts them back.

    - The collector. The analysis makes hundreds of thousands of lists and dicts (each group's
      values, each finding) and no reference cycles: each allocation count past the collector's
      thresholds made it traverse every live object. At 1M hops that was six full collections
      (0.03-0.06 s each, 0.29 s in all), none of which found anything to free. Reference counting
      still frees all the rest as it is let go; a cycle made meanwhile waits for the next
      collection after the block.
    - Huge pages. numpy asks the kernel for 2 MB pages (``madvise(MADV_HUGEPAGE)``) for every array
      of 4 MB or more; the analysis's are temporaries of a few MB that live for milliseconds. On
      this project's 2-core VM (THP in ``madvise`` mode), the same 371 huge-page faults of a loop of
      such arrays cost 0.13-0.66 s of system time from run to run, against a steady 0.37 s on small
      pages. At 1M hops, six runs alternating: the whole analysis 4.87-5.31 s (median 4.99) without
      them, 5.24-5.75 s (5.42) with them; system time 1.4 against 2.0 s.
    """
    global _running, _noted
    with _settings:
        if not _running:
            _noted = (gc.isenabled(), _huge_pages(False))
            gc.disable()
        _running += 1
    try:
        yield
    finally:
        with _settings:
            _running -= 1
            if not _running:
                collector_was_on, huge_pages_were_on = _noted
                _huge_pages(huge_pages_were_on)
                if collector_was_on:
                    gc.enable()


def _huge_pages(on: bool | None) -> bool | None:
    """Set whether numpy asks for huge pages (None: leave it); returns what it was, None where numpy cannot say."""
    if on is None:
        return None
    try:
        from numpy._core.multiarray import _set_madvise_hugepage  # numpy 2
    except ImportError:
        try:
            from numpy.core.multiarray import _set_madvise_hugepage  # numpy 1
        except ImportError:
            return None
    return _set_madvise_hugepage(on)


def freeze_start_up() -> None:
    """Everything alive once a proxy runs (mitmproxy, its addons, options, certificates, hoptrace's modules)
    lives until exit: collected once, then frozen out of the collector's sight, so that its collections
    under load scan only what the traffic allocates.

    Measured in ``hoptrace proxy``: the worst GC pause fell from ~60 ms to a few ms, and it was what set
    p99. Under plain mitmdump with the addon (the capture benchmark's ``--configs be``, 3 rounds, two
    runs each way): the addon's cost in mitmdump's process 0.14-0.19 -> 0.05-0.06 ms a request at 16
    clients, e/b 0.85-0.87 -> 0.91-0.95, p99 84-87 -> 28-33 ms.
    """
    gc.collect()
    gc.freeze()
