"""``hoptrace coverage``: which endpoints and service-to-service calls a recorded run exercised."""

from __future__ import annotations

from pathlib import Path

import click

from hoptrace._click import OneLineCommand, PathArg, exit_2_on_bad_input

FORMATS = ("text", "markdown", "json")


@click.command(
    "coverage",
    cls=OneLineCommand,
    # \b keeps click from re-wrapping the examples across lines.
    epilog="\b\nExamples:\n  hoptrace coverage traces.db --openapi gateway=openapi/gateway.yaml --openapi auth=openapi/auth.yaml\n"
    "  hoptrace coverage after.db --compare before.db --format markdown",
)
@click.argument("db", type=PathArg())
@click.option(
    "--openapi",
    "specs",
    multiple=True,
    metavar="SERVICE=FILE",
    help="An OpenAPI 3 document (YAML or JSON) of a service, by its route name (repeatable).",
)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="text", show_default=True, help="Report format.")
@click.option(
    "--compare",
    "base",
    type=PathArg(),
    metavar="OTHER_DB",
    help="Show what DB exercised that OTHER_DB did not, and what it lost.",
)
@click.option(
    "--output", "-o", type=PathArg(dir_okay=False, writable=True), help="Write here instead of stdout."
)
def coverage(db: Path, specs: tuple[str, ...], fmt: str, base: Path | None, output: Path | None) -> None:
    """Interaction coverage of a trace file: endpoints exercised per service with the status
    classes seen, each caller -> callee call, and, given OpenAPI documents, the operations
    never called and the documented responses never seen.
    """
    from hoptrace import coverage as cov

    with exit_2_on_bad_input():
        operations = cov.load_specs(specs)
        report = cov.coverage_of_db(db, operations)
        if base is not None:
            text = cov.render_comparison(cov.compare(cov.coverage_of_db(base, operations), report), str(base), str(db), fmt)
        else:
            text = {"text": cov.render_text, "markdown": cov.render_markdown, "json": cov.render_json}[fmt](report)
    if output is None:
        click.echo(text, nl=False)
    else:
        output.write_text(text, encoding="utf-8")
