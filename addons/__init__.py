"""mitmproxy addons of hoptrace. :class:`Recorder` writes every hop to a SQLite trace file."""

from hoptrace.addons.recorder import Recorder

__all__ = ["Recorder"]
