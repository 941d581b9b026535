"""Giving freed memory back to the system between the analysis's stages.

The stages free large temporaries (the loader's Arrow buffers and parsed strings, the
rebuild's intermediate frames: ~500 MB at a million hops), but neither allocator returns
them at once: pyarrow's pool (mimalloc) keeps freed pages for reuse, and glibc's ``malloc``
keeps freed space below the top of its heaps. The next stage then allocates beside memory
no one uses, and the process's peak is the sum. Measured at 1M hops: the analysis peaked at
1,245 MB; returning the memory after the load, the rebuild, the per-hop facts and the
latency tables (~90 ms in all) took that to ~1,100 MB (1,060 MB with the clock-skew
samples kept as arrays).
"""

from __future__ import annotations

import ctypes
import functools

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
