"""mitmproxy addons of hoptrace. :class:`Recorder` writes every hop to a SQLite trace file;
:class:`UpstreamTimeout` cuts a request whose upstream hangs.

For importers (HAR, flow files) that write rows the way the recorder does:
:func:`snapshot` copies a mitmproxy flow, :func:`build_rows` turns ``(service, snapshot)``
items into rows, :func:`write_batch` inserts them.
"""

from hoptrace.addons._hop import snapshot
from hoptrace.addons._rows import Built, HopRows, build_rows, clean
from hoptrace.addons._store import Counts, Written, write_batch
from hoptrace.addons.recorder import Recorder
from hoptrace.addons.upstream_timeout import UpstreamTimeout

__all__ = ["Built", "Counts", "HopRows", "Recorder", "UpstreamTimeout", "Written", "build_rows", "clean", "snapshot", "write_batch"]
