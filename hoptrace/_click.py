"""What every hoptrace command shares at the CLI edge: bad input becomes one line and exit 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import click

from hoptrace._errors import HoptraceError


class BadInput(click.ClickException):
    """A one-line error about the user's input; exit 2, like click's own usage errors."""

    exit_code = 2


@contextlib.contextmanager
def exit_2_on_bad_input() -> Iterator[None]:
    """Turn hoptrace's own errors into :class:`BadInput`, here at the edge and nowhere else."""
    try:
        yield
    except HoptraceError as exc:
        raise BadInput(str(exc)) from None
