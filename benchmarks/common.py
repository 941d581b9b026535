"""What both halves of the benchmark share: the machine's description, medians, a work folder."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import shutil
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def median(values: list[float | None]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(value, spec: str = ",.0f", none: str = "-") -> str:
    return none if value is None else format(value, spec)


def machine() -> dict:
    """When and where: the figures mean nothing without it."""
    cpu = "?"
    with contextlib.suppress(OSError, TypeError):
        cpu = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)[1].strip()
    return {"date": time.strftime("%Y-%m-%d %H:%M"), "cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}


@contextlib.contextmanager
def work_folder(workdir: Path | None, keep: bool, prefix: str) -> Iterator[Path]:
    """``workdir`` if given (left in place), else a temporary folder removed afterwards unless ``keep``."""
    folder = Path(tempfile.mkdtemp(prefix=prefix)) if workdir is None else workdir
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield folder
    finally:
        if workdir is None and not keep:
            shutil.rmtree(folder, ignore_errors=True)
