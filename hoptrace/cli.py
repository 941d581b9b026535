"""The `hoptrace` command group. Each command lives beside the package it drives, imported only
when it runs (see :class:`~hoptrace._click.LazyGroup`)."""

from __future__ import annotations

import click

from hoptrace import __version__
from hoptrace._click import LazyGroup, OwnProcess

COMMANDS = {
    "proxy": "hoptrace.proxy._cli:proxy",
    "addon-path": "hoptrace.proxy._cli:addon_path",
    "analyze": "hoptrace.analyzer._cli:analyze",
    "plot": "hoptrace.plot._cli:plot",
    "report": "hoptrace.plot._cli:report",
    "ui": "hoptrace.ui._cli:ui",
    "import": "hoptrace.exchange._cli:import_",
    "export": "hoptrace.exchange._cli:export",
    "coverage": "hoptrace._coverage_cli:coverage",
    "stack": "hoptrace.stack._cli:stack",
    "demo": "hoptrace.stack._cli:demo",
    "record-samples": "hoptrace.stack._cli:record_samples",
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hoptrace")
def cli() -> None:
    """Find what breaks between microservices, from the traffic between them.

    Record a stack with `hoptrace proxy`, then `hoptrace analyze` the trace file,
    `hoptrace plot` a request, `hoptrace report` it all into one HTML file, or
    browse it with `hoptrace ui`. `hoptrace demo` shows the whole job on the
    bundled sample stack.
    """


def main() -> None:
    """The `hoptrace` program: the console script and ``python -m hoptrace``."""
    cli(prog_name="hoptrace", obj=OwnProcess())
