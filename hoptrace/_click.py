"""What every hoptrace command shares at the CLI edge: bad input is one line on stderr and exit 2."""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click

from hoptrace._errors import HoptraceError


class OwnProcess:
    """The context object when hoptrace runs as its own program (the console script, ``python -m
    hoptrace``) rather than called inside another program's process: a command may then replace
    the process, as `hoptrace proxy` does to run under ``python -O``."""


class BadInput(click.ClickException):
    """A one-line error about the user's input; exit 2, like click's own usage errors."""

    exit_code = 2


class PathArg(click.Path):
    """``click.Path`` giving a :class:`~pathlib.Path`, refusing an empty name: ``Path("")`` is ``"."``,
    so ``--db ''`` would mean the current folder."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(path_type=Path, **kwargs)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, str) and not value:
            self.fail("an empty name is no file or folder", param, ctx)
        return super().convert(value, param, ctx)


class OneLineCommand(click.Command):
    """Click prints usage and a hint above a bad option's message; we print only the message."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise BadInput(exc.format_message()) from None


class OneLineGroup(click.Group):
    command_class = OneLineCommand

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent, **extra)
        except click.UsageError as exc:
            raise BadInput(exc.format_message()) from None

    def resolve_command(self, ctx: click.Context, args: list[str]):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as exc:  # "No such command 'x'."
            raise BadInput(exc.format_message()) from None


class LazyGroup(OneLineGroup):
    """A group whose commands are imported when one runs (or when ``--help`` lists them), from
    ``lazy``: name -> ``"module:attribute"``. The modules import what their command drives:
    mitmproxy and aiohttp cost `hoptrace analyze` 0.6 s of a 2 s start before they were lazy."""

    def __init__(self, *args: Any, lazy: dict[str, str], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lazy = lazy

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self.lazy})

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in self.commands and name in self.lazy:
            module, _, attribute = self.lazy[name].partition(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)


@contextlib.contextmanager
def exit_2_on_bad_input() -> Iterator[None]:
    """Turn hoptrace's own errors into :class:`BadInput`, here at the edge and nowhere else."""
    try:
        yield
    except HoptraceError as exc:
        raise BadInput(str(exc)) from None
