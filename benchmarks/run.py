#!/usr/bin/env python3
"""hoptrace's benchmark, from one command: ``python3 dev.py bench [OPTIONS]``.

    .venv/bin/python benchmarks/run.py                 # the full run (about 5 minutes)
    .venv/bin/python benchmarks/run.py --quick         # a smoke run (about a minute)
    .venv/bin/python benchmarks/run.py --rounds 5 --requests 5000 --json bench.json

Prints a table of medians, ratios and targets (PASS/MISS); ``--json FILE`` also
writes every run. What is measured and how: benchmarks/README.md. Exits 1 when
hops were lost (a correctness failure), never because of a speed target.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import capture  # benchmarks/ is a folder of scripts, not a package


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dev.py bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one short round: checks that everything runs, not for figures")
    parser.add_argument("--json", type=Path, metavar="FILE", help="also write the results as JSON")
    capture.add_arguments(parser)
    args = parser.parse_args(argv)

    print("== capture: what recording costs (2 cores shared by load generator, service and proxy) ==", flush=True)
    results = {"capture": capture.bench_capture(args, log=lambda line: print(line, flush=True))}
    print()
    print(results["capture"]["table"], flush=True)

    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
        print(f"\nwrote {args.json}")
    lost = any(t["result"] == "MISS" for t in results["capture"]["targets"] if t["target"].startswith("0 hops lost"))
    return 1 if lost else 0


if __name__ == "__main__":
    sys.exit(main())
