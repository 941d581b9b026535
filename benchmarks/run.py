#!/usr/bin/env python3
"""hoptrace's benchmark, from one command: ``python3 dev.py bench [OPTIONS]``.

    .venv/bin/python benchmarks/run.py                  # the full run (about 7 minutes)
    .venv/bin/python benchmarks/run.py --quick          # a smoke run (about a minute)
    .venv/bin/python benchmarks/run.py --only analysis --sizes 10000,1000000 --json bench.json
    .venv/bin/python benchmarks/run.py --only ui --ui-hops 1000000

Three parts: capture (what recording costs, against mitmproxy), analysis (how the
analyzer scales to a million hops) and ui (`hoptrace ui` on a million hops, and live).
Each prints a table of medians and targets
(PASS/MISS); ``--json FILE`` also writes every run. What is measured and how:
benchmarks/README.md. Exits 1 on a correctness failure (hops lost, findings that
differ between sizes), never because of a speed target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

# benchmarks/ is a folder of scripts, not a package
import analysis
import capture
import ui

HALVES = ("capture", "analysis", "ui")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev.py bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs: checks that everything runs, not for figures")
    parser.add_argument("--only", choices=HALVES, help="run one part")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--keep", action="store_true", help="keep the trace files, reports and logs (in --workdir)")
    parser.add_argument("--workdir", type=Path, default=None, help="where they go (default: a temporary folder)")
    capture.add_arguments(parser)
    analysis.add_arguments(parser)
    ui.add_arguments(parser)
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    results = {}
    if args.only in (None, "capture"):
        log("== capture: what recording costs (2 cores shared by load generator, service and proxy) ==")
        results["capture"] = capture.bench_capture(args, log=log)
        log("\n" + results["capture"]["table"] + "\n")
    if args.only in (None, "analysis"):
        log("== analysis: how the analyzer scales (synthetic trace DBs) ==")
        results["analysis"] = analysis.bench_analysis(args, log=log)
        log("\n" + results["analysis"]["table"] + "\n")
    if args.only in (None, "ui"):
        log("== ui: `hoptrace ui` on a large DB, and live (a synthetic trace DB) ==")
        results["ui"] = ui.bench_ui(args, log=log)
        log("\n" + results["ui"]["table"] + "\n")

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        log(f"wrote {args.json}")
    correctness = ("0 hops lost", "same findings", "hops read", "listed == entry-route", "requests written live")
    failed = [
        t for half in results.values() for t in half["targets"] if t["target"].startswith(correctness) and t["result"] != "PASS"
    ]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
