"""hoptrace's exceptions. Every one carries a one-line message fit for a terminal.

    HoptraceError
    ├── TraceFileError     a trace DB is missing, not SQLite, corrupt, foreign or newer
    ├── RouteError         a --route / --stack spec is malformed or a port is unusable
    ├── AnalysisError      an analysis cannot run on this input (unknown trace id, empty capture)
    └── ImportFileError    a HAR or flow file to import is unreadable, malformed or of a newer format

The CLI turns them into ``click.ClickException`` (exit 2) at the edge only.
"""


class HoptraceError(Exception):
    """Base of every error hoptrace raises on purpose."""


class TraceFileError(HoptraceError):
    """A trace database cannot be used."""


class RouteError(HoptraceError):
    """A proxy route cannot be parsed or served."""


class AnalysisError(HoptraceError):
    """The analysis cannot answer for this input."""


class ImportFileError(HoptraceError):
    """A capture file to import cannot be read; nothing of it was written."""
