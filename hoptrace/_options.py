"""Click options that several commands share, declared once (sqlite-utils style).

    @click.command()
    @trace_dbs_argument()
    @output_option(".png or .svg picks the format.", required=True)
    def plot(dbs, output): ...
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import click

from hoptrace._click import BadInput, PathArg


def trace_dbs_argument() -> Callable:
    """``DB...``: the trace files one analysis joins, as the tuple ``dbs``.

    A file, several (the shards of one ``hoptrace proxy --workers`` capture, or captures
    of one stack on several hosts recorded with one fingerprint key), or a folder, which
    stands for its ``*.db`` files in name order (``traces.w2.db`` before ``traces.w10.db``).
    A path that does not exist, a folder with no ``*.db`` file and a file given twice are
    refused here, each as one line; what is wrong inside a file the analysis says.
    """
    return click.argument("dbs", nargs=-1, required=True, metavar="DB...", type=PathArg(), callback=_trace_files)


def _trace_files(ctx: click.Context, param: click.Parameter, paths: tuple[Path, ...]) -> tuple[Path, ...]:
    files: list[Path] = []
    seen: dict[Path, Path] = {}
    for path in paths:
        for file in _expand(path):
            try:
                same = file.resolve(strict=True)
            except (OSError, RuntimeError) as exc:  # a dangling link, a loop of links
                raise BadInput(f"{file}: cannot open ({getattr(exc, 'strerror', None) or exc})") from None
            if same in seen:
                raise BadInput(f"{file}: given twice (also as {seen[same]}); each trace file is read once")
            seen[same] = file
            files.append(file)
    return tuple(files)


def _expand(path: Path) -> list[Path]:
    try:
        if path.is_dir():
            found = sorted((p for p in path.glob("*.db") if p.is_file()), key=_natural)
            if not found:
                raise BadInput(f"{path}: a folder with no trace file (*.db) in it")
            return found
        exists = path.exists()
    except OSError as exc:  # a folder we may not enter, a name too long (is_dir() and exists() raise them)
        raise BadInput(f"{path}: cannot reach the file: {exc.strerror or exc}") from None
    if not exists:
        raise BadInput(f"{path}: no such file")
    return [path]


def _natural(path: Path) -> list:
    """Names by their text, numbers in them by value: w2 before w10."""
    return [int(part) if part.isdecimal() else part for part in re.split(r"(\d+)", path.name)]


def one_trace_file(dbs: tuple[Path, ...], option: str) -> Path:
    """The one file of ``dbs``, for an option that writes into the file it read (``analyze --save``):
    with several, one line saying so (the joined analysis belongs to no one file)."""
    if len(dbs) != 1:
        raise BadInput(f"{option} takes one trace file; {len(dbs)} were given ({', '.join(map(str, dbs))})")
    return dbs[0]


def output_option(what: str, *, required: bool = False) -> Callable:
    """``-o/--output FILE``: where a command writes its report or chart."""
    return click.option("-o", "--output", required=required, type=PathArg(dir_okay=False), help=what)


def out_folder_option(default: str, what: str) -> Callable:
    """``--out FOLDER``: where a command that writes several files puts them."""
    return click.option("--out", type=PathArg(file_okay=False), default=Path(default),
                        show_default=True, help=what)  # fmt: skip
