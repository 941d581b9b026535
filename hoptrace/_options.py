"""Click options that several commands share, declared once (sqlite-utils style).

    @click.command()
    @trace_db_argument()
    @output_option(".png or .svg picks the format.", required=True)
    def plot(db, output): ...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import click


def trace_db_argument(*, must_exist: bool = True) -> Callable:
    """The trace file every reading command takes as its first argument (``DB``).

    ``must_exist=False`` leaves the check to the command, which then says more than
    "does not exist" (``hoptrace analyze`` names what is wrong with the file).
    """
    return click.argument("db", type=click.Path(exists=must_exist, dir_okay=False, path_type=Path))


def output_option(what: str, *, required: bool = False) -> Callable:
    """``-o/--output FILE``: where a command writes its report or chart."""
    return click.option("-o", "--output", required=required, type=click.Path(dir_okay=False, path_type=Path), help=what)


def out_folder_option(default: str, what: str) -> Callable:
    """``--out FOLDER``: where a command that writes several files puts them."""
    return click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path(default),
                        show_default=True, help=what)  # fmt: skip
