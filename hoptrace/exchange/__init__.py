"""Captures in and analyses out: HAR and mitmproxy flow files imported through the live
recorder's row builder; a trace DB exported as HAR 1.2, OTLP/JSON or Parquet."""

from hoptrace.exchange._cli import export, import_
from hoptrace.exchange._import import ServiceNames, import_file
from hoptrace.exchange._otlp import from_otlp_json, to_otlp_json

__all__ = ["ServiceNames", "export", "from_otlp_json", "import_", "import_file", "to_otlp_json"]
