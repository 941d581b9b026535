"""Captures in and analyses out: HAR and mitmproxy flow files imported through the live
recorder's row builder; a trace DB exported as HAR 1.2, OTLP/JSON or Parquet.

The names load on first use, so that ``hoptrace --help`` (which imports the commands
from ``hoptrace.exchange._cli``) does not pay for mitmproxy, pyarrow or protobuf.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from hoptrace._lazy import lazy_exports

if TYPE_CHECKING:
    from hoptrace.exchange._cli import export, import_
    from hoptrace.exchange._import import ServiceNames, import_file
    from hoptrace.exchange._otlp import from_otlp_json, to_otlp_json

_WHERE = {
    "export": "_cli", "import_": "_cli",
    "ServiceNames": "_import", "import_file": "_import",
    "from_otlp_json": "_otlp", "to_otlp_json": "_otlp",
}  # fmt: skip

__all__ = ["ServiceNames", "export", "from_otlp_json", "import_", "import_file", "to_otlp_json"]


__getattr__, __dir__ = lazy_exports(__name__, _WHERE, globals())
