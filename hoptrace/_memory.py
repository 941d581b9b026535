"""Freed memory given back to the system after the load; the collector paused during the analysis.

The load frees large temporaries (the Arrow buffers and parsed strings its frames were made
from), but neither allocator returns them at once: pyarrow's pool (mimalloc) keeps freed pages
for reuse, and glibc's ``malloc`` keeps freed space below the top of its heaps. The analysis then
allocates beside memory no one uses. Measured at 1M hops read as rows: peak RSS 1,130 MB
without it, 970 MB with it.

Not after the later stages: what they free is ``malloc``'s, reused by the next stage as it is,
while memory given back has to be faulted in and zeroed by the kernel again. Giving back after
the rebuild, the per-hop facts and the latency tables as well cost 0.5-0.9 s at 1M hops (sys
time 1.4 -> 2.3 s) for a peak lower by 0-30 MB.

The cyclic garbage collector is off while the analysis runs (:func:`collector_paused`).
"""

from __future__ import annotations

import ctypes
import functools
import gc
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow as pa


def give_back() -> None:
    """Return the memory pyarrow's pool and ``malloc`` hold free to the system."""
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


@contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block, back on after it if it was on.

    The analysis makes hundreds of thousands of lists and dicts (each group's values, each
    finding) and no reference cycles: each allocation count past the collector's thresholds made
    it traverse every live object. At 1M hops that was six full collections (0.03-0.06 s each,
    0.29 s in all), none of which found anything to free. Reference counting still frees all
    the rest as it is let go; a cycle made meanwhile waits for the next collection after the block.
    """
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()
