"""The coverage command's one error: a bad --openapi argument or document."""

from hoptrace._errors import HoptraceError


class CoverageError(HoptraceError):
    """An OpenAPI document or a coverage argument cannot be used."""
