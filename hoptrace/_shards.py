"""How the shards of one ``hoptrace proxy --workers N`` capture are named and labelled.

Apart from :mod:`hoptrace.proxy.workers` (which imports mitmproxy) so that the analysis,
which joins shards, can read the labels without loading the proxy.
"""

from __future__ import annotations

import re
from pathlib import Path

_SOURCE = re.compile(r"^hoptrace proxy --workers (\d+): capture ([0-9a-f]{32}), worker (\d+)$")


def shard_path(db: Path, worker: int) -> Path:
    """The shard worker ``worker`` (1-based) of a capture into ``db`` records into."""
    return db.with_name(f"{db.stem}.w{worker}{db.suffix}")


def capture_shards(db: Path) -> list[Path]:
    """The shard files of the last ``--workers`` capture into ``db``, in worker order (existing files only)."""
    pattern = re.compile(rf"^{re.escape(db.stem)}\.w(\d+){re.escape(db.suffix)}$")
    found = [(int(m.group(1)), p) for p in db.parent.glob(f"{db.stem}.w*{db.suffix}") if (m := pattern.match(p.name))]
    return [path for _, path in sorted(found)]


def worker_source(workers: int, capture: str, worker: int) -> str:
    """What ``captures.source`` says in a shard: how many workers, the shared capture uuid, which worker."""
    return f"hoptrace proxy --workers {workers}: capture {capture}, worker {worker}"


def parse_worker_source(source: str | None) -> tuple[int, str, int] | None:
    """``(workers, capture uuid, worker)`` from a shard's ``captures.source``, or None for a single-process capture."""
    match = _SOURCE.match(source or "")
    return (int(match.group(1)), match.group(2), int(match.group(3))) if match else None
