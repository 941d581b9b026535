"""Free TCP ports on 127.0.0.1 for processes that bind them later (the demo's stack, tests).

A port from ``bind(("127.0.0.1", 0))`` comes from the kernel's ephemeral range, the range
it also draws the local port of every outgoing connection from: between the probe and a
child process binding it, any client connection on the machine may take it (a stack then
fails with "port in use" when tests run in parallel). Ports below that range are taken
only by an explicit bind, so they are handed out from there: each process walks the range
from its own random start, never hands a port out twice, and skips ports bound right now.
"""

from __future__ import annotations

import itertools
import random
import socket
from collections.abc import Iterator
from pathlib import Path

__all__ = ["free_port"]

_LOWEST = 10_000  # below: well-known and registered services a developer may run


def _ephemeral_start() -> int:
    """The first port of the kernel's ephemeral range (Linux's default when it cannot be read)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def _candidates() -> Iterator[int]:
    top = max(_ephemeral_start(), _LOWEST + 1_000)
    start = random.randrange(_LOWEST, top)
    return itertools.chain(range(start, top), range(_LOWEST, start))


_next_candidates = _candidates()


def free_port() -> int:
    """A 127.0.0.1 port outside the ephemeral range that nothing is bound to now."""
    for port in _next_candidates:
        with socket.socket() as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise OSError("no free port left below the ephemeral range on 127.0.0.1")
