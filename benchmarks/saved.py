"""What reusing a saved analysis (`hoptrace analyze --save`) saves the report and the web view.

    python benchmarks/saved.py [--hops 100000] [--rounds 3]

Writes a synthetic trace DB (benchmarks/synth.py), then times in a fresh process per round:
the fresh analysis (load, rebuild, detectors, tables: what `hoptrace report` and `hoptrace ui`
did before), `save` (the one transaction of `--save`), and `analysis_for` on the saved file
(load, the saved links and findings read back, the tables). Prints medians as JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import synth

_ROUND = """
import json, sys, time
from hoptrace.analyzer import analysis_for, analyze, save
db, step = sys.argv[1], sys.argv[2]
clock = time.perf_counter
started = clock()
a = analyze(db) if step in ("fresh", "save") else analysis_for(db)
took = {"analysis_s": clock() - started, **{k + "_s": v for k, v in a.timings.items()}}
if step == "save":
    started = clock()
    save(db, a)
    took = {"save_s": clock() - started}
print(json.dumps(took))
"""


def _round(db: Path, step: str) -> dict:
    done = subprocess.run([sys.executable, "-c", _ROUND, str(db), step], capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hops", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hoptrace-bench-saved-") as folder:
        db = Path(folder) / "synth.db"
        synth.write(db, args.hops)
        fresh = [_round(db, "fresh") for _ in range(args.rounds)]
        saved = [_round(db, "save") for _ in range(args.rounds)]
        reused = [_round(db, "reuse") for _ in range(args.rounds)]
        size_mb = db.stat().st_size / 1e6
    stats = {name: {k: round(median(r[k] for r in runs), 3) for k in runs[0]}
             for name, runs in (("fresh", fresh), ("save", saved), ("reuse", reused))}  # fmt: skip
    print(
        json.dumps(
            {"hops": args.hops, "db_mb_after_save": round(size_mb, 1), "when": time.strftime("%Y-%m-%d"), **stats}, indent=2
        )
    )


if __name__ == "__main__":
    main()
