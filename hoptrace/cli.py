"""The `hoptrace` command group. Each command lives beside the package it drives."""

from __future__ import annotations

import click

from hoptrace import __version__
from hoptrace._click import OneLineGroup
from hoptrace._coverage_cli import coverage
from hoptrace.analyzer._cli import analyze
from hoptrace.exchange._cli import export, import_
from hoptrace.plot._cli import plot, report
from hoptrace.proxy._cli import addon_path, proxy
from hoptrace.stack._cli import demo, record_samples, stack
from hoptrace.ui._cli import ui


@click.group(cls=OneLineGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="hoptrace")
def cli() -> None:
    """Find what breaks between microservices, from the traffic between them.

    Record a stack with `hoptrace proxy`, then `hoptrace analyze` the trace file,
    `hoptrace plot` a request, `hoptrace report` it all into one HTML file, or
    browse it with `hoptrace ui`. `hoptrace demo` shows the whole job on the
    bundled sample stack.
    """


for command in (proxy, addon_path, analyze, plot, report, ui, import_, export, coverage, stack, demo, record_samples):
    cli.add_command(command)
