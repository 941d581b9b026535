from hoptrace.cli import cli

cli(prog_name="hoptrace")
