"""`hoptrace ui`: a local web view of trace DBs, live while the proxy writes them.

    >>> url, runner = await start_ui(["traces.db"], "127.0.0.1", 0)   # in a running event loop
    >>> await runner.cleanup()

``start_ui`` loads on first use, so that ``hoptrace --help`` (which imports the ``ui``
command from ``hoptrace.ui._cli``) does not pay for aiohttp and pandas.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from hoptrace.ui._server import start_ui

__all__ = ["start_ui"]


def __getattr__(name: str):
    if name != "start_ui":
        raise AttributeError(f"module 'hoptrace.ui' has no attribute {name!r}")
    from hoptrace.ui._server import start_ui

    return start_ui
