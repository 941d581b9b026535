"""The analysis benchmark: how the analyzer scales, on synthetic trace DBs of 10k, 100k and 1M hops.

For each size, ``synth.py`` writes a DB (``write s``). Then each round runs in a
fresh process, so that its peak RSS is the analysis's own, and does what
``hoptrace analyze`` and ``hoptrace report`` do:

    load        hoptrace.analyzer.load: the file checked, the columns read
    rebuild     requests rebuilt (parent links), token uses, sessions
    detectors   every detector of DETECTORS
    tables      latency per service, endpoint and call edge
    waterfall   the worst request's waterfall, saved as PNG (matplotlib's import included)
    report      the HTML report (hoptrace.plot.write_report)

``analysis s`` is the wall time from the start of the load to the end of the
analysis (the tables are computed beside the detectors, so it is less than the sum
of the stages): the DB loaded, rebuilt and analyzed. Peak RSS is the process's ``ru_maxrss`` after the analysis, and after
the charts (the Arrow reader's child apart: it has ended before the analysis grows). Figures are medians of the rounds.

Correctness is checked, speed never is: the hops read must equal the hops
written, and the findings must be the same for every cohort at every size (each
finding reduced to its kind and its hops' positions within their cohort; the
findings about a service over the whole capture, such as clock skew, once per DB).

At the largest size, the loader is also compared with the usual ways of reading
SQLite into pandas (one fresh process each, the same hop columns):
``pandas.read_sql``, ``sqlite3`` ``fetchall`` into ``DataFrame.from_records``, and the
ADBC SQLite driver's plain ``fetch_arrow_table`` (what hoptrace's loader builds on, in a
child process, from ``ARROW_MIN_HOPS`` hops), and hoptrace's loader with its ``sqlite3`` reads
only. CPU times include the children's (the Arrow reader).

    python benchmarks/analysis.py --measure DB --per-cohort N --out DIR   (one round; JSON on stdout)
    python benchmarks/analysis.py --measure-load DB --how read_sql         (one way of loading)
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import synth
from common import fmt, machine, median, work_folder

STAGES = ("load", "rebuild", "detectors", "tables")
SIZES = "10000,100000,1000000"
# Targets from issue 14: 10 x the hops in at most 11 x the time; a million hops loaded in 2.5 s,
# analyzed in 6 s within 1 GB (the charts and report after it: 2 GB, the earlier target).
SCALING_SLACK = 1.1
MILLION_LOAD_S = 2.5
MILLION_S = 6.0
MILLION_RSS_MB = 1024
MILLION_ALL_RSS_MB = 2048
# Issue 12: the report in <= 2 s at 10k hops, <= 8 s at 1M.
REPORT_S = {"10k": 2.0, "1.0M": 8.0}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("analysis")
    group.add_argument(
        "--sizes", default=None, help=f"hops per synthetic DB, comma-separated (default {SIZES}; --quick: 10000,100000)"
    )
    group.add_argument("--analysis-rounds", type=int, default=None, help="rounds per size (default 3; --quick: 1)")


def bench_analysis(args: argparse.Namespace, log=print) -> dict:
    """Run the analysis benchmark; returns the JSON-able result (meta, sizes, targets, table)."""
    quick = getattr(args, "quick", False)
    sizes = sorted(int(s) for s in (args.sizes or ("10000,100000" if quick else SIZES)).split(",") if s.strip())
    rounds = args.analysis_rounds or (1 if quick else 3)
    if not sizes or min(sizes) < 1 or rounds < 1:
        raise SystemExit("bench: --sizes and --analysis-rounds must be positive")
    started = time.monotonic()
    results = []
    with work_folder(args.workdir, args.keep, "hoptrace-bench-analysis-") as folder:
        for size in sizes:
            before = time.monotonic()
            db = synth.write(folder / f"synth-{size}.db", size)
            # Flushed before any round: the kernel writing back a fresh GB would run during the first ones.
            os.sync()
            written_s = time.monotonic() - before
            log(
                f"  {db.hops:>9,} hops ({db.cohorts} cohorts) written in {written_s:.1f} s, {db.path.stat().st_size / 1e6:,.0f} MB"
            )
            runs = []
            for round_ in range(rounds):
                run = _run_child(db, folder / f"out-{size}-{round_}")
                runs.append(run)
                log(
                    f"  {db.hops:>9,} hops  round {round_ + 1}/{rounds}  "
                    + (f"!! {run['problem']}" if "problem" in run else _run_line(run))
                )
            results.append(_summarize(db, written_s, runs))
            if size == sizes[-1]:
                results[-1]["loading"] = {how: _load_child(db, how) for how in LOADERS}
                log("  loading alternatives: " + _loading_line(results[-1]["loading"]))
            if not args.keep:
                db.path.unlink(missing_ok=True)
    result = {
        "meta": {**machine(), "rounds": rounds, "users_per_cohort": synth.USERS, "seconds": round(time.monotonic() - started, 1)},
        "sizes": results,
    }
    result["targets"] = targets(results)
    result["table"] = render(result)
    return result


def _run_line(run: dict) -> str:
    s = run["stages"]
    return (
        f"analysis {s['analysis']:6.2f} s, CPU {s['analysis_cpu']:.2f} s (load {s['load']:.2f}, CPU {s['load_cpu']:.2f}; rebuild {s['rebuild']:.2f},"
        f" detectors {s['detectors']:.2f}, tables {s['tables']:.2f})  waterfall {s['waterfall']:.2f} s"
        f"  report {s['report']:.2f} s  peak RSS {run['peak_rss_mb']['all']:,.0f} MB"
    )


def _run_child(db: synth.SynthDB, out: Path) -> dict:
    """One round in a fresh interpreter; a crash is recorded as a problem, not raised."""
    cmd = [sys.executable, __file__, "--measure", str(db.path), "--per-cohort", str(db.hops_per_cohort), "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        return {"problem": f"exit {done.returncode}: {last}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _load_child(db: synth.SynthDB, how: str) -> dict:
    cmd = [sys.executable, __file__, "--measure-load", str(db.path), "--how", how]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
    if done.returncode != 0:
        return {"problem": f"exit {done.returncode}: {(done.stderr.strip().splitlines() or ['no output'])[-1]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def _loading_line(loading: dict) -> str:
    return ", ".join(
        f"{how} {r['seconds']:.2f} s (CPU {r['cpu_seconds']:.2f}) / {r['peak_rss_mb']:,.0f} MB"
        + (f" + child {r['child_peak_rss_mb']:,.0f} MB" if r.get("child_peak_rss_mb") else "")
        if "problem" not in r
        else f"{how} !! {r['problem']}"
        for how, r in loading.items()
    )


def _summarize(db: synth.SynthDB, written_s: float, runs: list[dict]) -> dict:
    good = [r for r in runs if "problem" not in r]
    stages = {
        k: median([r["stages"][k] for r in good])
        for k in (*STAGES, "load_cpu", "analysis", "analysis_cpu", "waterfall", "report", "report_cpu")
    }
    return {
        "hops": db.hops,
        "cohorts": db.cohorts,
        "hops_per_cohort": db.hops_per_cohort,
        "db_mb": round(db.path.stat().st_size / 1e6, 1),
        "write_s": written_s,
        "stages": stages,
        "analysis_s": stages["analysis"],
        "peak_rss_mb": {k: median([r["peak_rss_mb"][k] for r in good]) for k in ("analysis", "all")},
        "hops_read": [r["hops"] for r in good],
        "findings": good[0]["findings"] if good else None,
        "signatures": [r["signature"] for r in good],
        "problems": [r["problem"] for r in runs if "problem" in r],
    }


# -- one round (the child process) ----------------------------------------------------------


def measure(db: Path, per_cohort: int, out: Path) -> dict:
    from hoptrace import plot
    from hoptrace.analyzer import analyze_tables, load

    out.mkdir(parents=True, exist_ok=True)
    clock, cpu = time.perf_counter, _cpu
    started, cpu_started = clock(), cpu()
    tables = load(db)
    stages = {"load": clock() - started, "load_cpu": cpu() - cpu_started}
    analysis = analyze_tables(tables)
    stages.update(analysis.timings, analysis=clock() - started, analysis_cpu=cpu() - cpu_started)
    rss_analysis = _peak_rss_mb()
    started = clock()
    trace, _why = plot.pick_worst_trace(analysis)
    plot.save_figure(plot.waterfall(analysis, trace), out / "waterfall.png")
    stages["waterfall"] = clock() - started
    started, cpu_started = clock(), cpu()
    plot.write_report(analysis, out / "report.html")
    stages["report"], stages["report_cpu"] = clock() - started, cpu() - cpu_started
    return {
        "stages": stages,
        "peak_rss_mb": {"analysis": rss_analysis, "all": _peak_rss_mb()},
        "hops": len(analysis.hops),
        "findings": dict(Counter(analysis.findings["kind"])),
        "signature": cohort_signature(analysis.findings, per_cohort),
    }


def _hop_columns() -> tuple[str, ...]:
    from hoptrace.analyzer._load import CORE_HOP_COLUMNS

    return ("id", *CORE_HOP_COLUMNS)


def _load_with_read_sql(db: Path) -> int:
    import pandas as pd

    with sqlite3.connect(db) as conn:
        return len(pd.read_sql(f"SELECT {', '.join(_hop_columns())} FROM hops", conn, index_col="id"))


def _load_with_fetchall(db: Path) -> int:
    import pandas as pd

    with sqlite3.connect(db) as conn:
        rows = conn.execute(f"SELECT {', '.join(_hop_columns())} FROM hops").fetchall()
    return len(pd.DataFrame.from_records(rows, columns=_hop_columns(), index="id"))


def _load_with_adbc(db: Path) -> int:
    import adbc_driver_sqlite.dbapi

    with adbc_driver_sqlite.dbapi.connect(f"file:{db}?mode=ro") as conn, conn.cursor() as cur:
        cur.execute(f"SELECT {', '.join(_hop_columns())} FROM hops")
        return len(cur.fetch_arrow_table().to_pandas().set_index("id"))


def _load_with_hoptrace(db: Path, reader: str = "auto") -> int:
    from hoptrace.analyzer import load

    return len(load(db, reader=reader).hops)


# The loader against the usual ways of getting SQLite rows into pandas (the same hop columns;
# hoptrace's also checks the file and reads the tokens and the token sightings), and against
# itself reading through sqlite3 alone (what it does below ARROW_MIN_HOPS).
LOADERS = {
    "pandas.read_sql": _load_with_read_sql,
    "fetchall+from_records": _load_with_fetchall,
    "adbc fetch_arrow_table": _load_with_adbc,
    "hoptrace load, sqlite3 reads": lambda db: _load_with_hoptrace(db, "sqlite"),
    "hoptrace load": _load_with_hoptrace,
}


def measure_load(db: Path, how: str) -> dict:
    import pandas  # noqa: F401  (imported before the clock starts, as for every loader)

    started, cpu_started = time.perf_counter(), _cpu()
    rows = LOADERS[how](db)
    return {
        "seconds": time.perf_counter() - started,
        "cpu_seconds": _cpu() - cpu_started,
        "peak_rss_mb": _peak_rss_mb(),
        # A child's peak counts what it shared with this process when it started (the kernel keeps
        # the larger): here, pandas imported and little else.
        "child_peak_rss_mb": _peak_rss_mb(resource.RUSAGE_CHILDREN),
        "rows": rows,
        "columns": len(_hop_columns()) - 1,
    }


def _peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def _cpu() -> float:
    """CPU seconds of this process and of its children that ended (the loader's Arrow reader is one)."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + children.ru_utime + children.ru_stime


def cohort_signature(findings, per_cohort: int) -> dict:
    """The findings as they must repeat: ``cohort`` (one cohort's, as sorted [kind, positions, count]),
    ``differing`` (how many cohorts found otherwise), ``capture_wide`` (findings with no request)."""
    by_cohort: dict[int, Counter] = {}
    capture_wide: Counter = Counter()
    rows = zip(findings["kind"], findings["trace"].isna(), findings["service"], findings["hop_ids"])
    for kind, no_request, service, hop_ids in rows:
        if no_request:  # about a service over the whole capture
            capture_wide[f"{kind} {service}"] += 1
            continue
        cohort = (min(hop_ids) - 1) // per_cohort
        positions = tuple(int(h) - cohort * per_cohort for h in hop_ids)
        by_cohort.setdefault(cohort, Counter())[(kind, positions)] += 1
    first = by_cohort.get(0, Counter())
    cohorts = max(by_cohort, default=-1) + 1
    differing = sum(by_cohort.get(c, Counter()) != first for c in range(cohorts))
    return {
        "cohort": sorted([kind, list(positions), n] for (kind, positions), n in first.items()),
        "differing": differing,
        "capture_wide": dict(capture_wide),
    }


# -- targets and the table ------------------------------------------------------------------


def targets(sizes: list[dict]) -> list[dict]:
    out = []

    def add(name: str, measured: str, ok: bool | None) -> None:
        out.append({"target": name, "measured": measured, "result": None if ok is None else ("PASS" if ok else "MISS")})

    for small, large in itertools.pairwise(sizes):
        if small["analysis_s"] and large["analysis_s"]:
            hops, took = large["hops"] / small["hops"], large["analysis_s"] / small["analysis_s"]
            add(
                f"{_short(large['hops'])} vs {_short(small['hops'])}: time x <= {SCALING_SLACK} x hops x",
                f"hops x{hops:.1f}, time x{took:.1f}",
                took <= SCALING_SLACK * hops,
            )
    million = [s for s in sizes if s["hops"] >= 900_000 and s["analysis_s"] is not None]
    for s in million:
        name, load = _short(s["hops"]), s["stages"]["load"]
        add(f"{name} hops loaded in <= {MILLION_LOAD_S} s", f"{load:.1f} s", load <= MILLION_LOAD_S)
        add(f"{name} hops analyzed in <= {MILLION_S:.0f} s", f"{s['analysis_s']:.1f} s", s["analysis_s"] <= MILLION_S)
        rss, rss_all = s["peak_rss_mb"]["analysis"], s["peak_rss_mb"]["all"]
        add(f"{name} hops: peak RSS <= 1 GB (analysis)", f"{rss:,.0f} MB", rss <= MILLION_RSS_MB)
        add(f"{name} hops: peak RSS <= 2 GB (charts too)", f"{rss_all:,.0f} MB", rss_all <= MILLION_ALL_RSS_MB)
    if not million:
        add("1M hops loaded <= 2.5 s, analyzed <= 6 s, <= 1 GB", "not run (no size of 1M)", None)
    for s in sizes:  # issue 12: the report in <= 2 s at 10k hops, <= 8 s at 1M (process CPU time beside)
        limit = REPORT_S.get(_short(s["hops"]))
        if limit and s["stages"]["report"] is not None:
            st = s["stages"]
            add(f"{_short(s['hops'])} hops: report in <= {limit:g} s", f"{st['report']:.2f} s ({st['report_cpu']:.2f} s CPU)",
                st["report"] <= limit)  # fmt: skip
    alike, why = same_findings(sizes)
    add("same findings in every cohort, at every size", why, alike)
    read = all(s["hops_read"] and set(s["hops_read"]) == {s["hops"]} and not s["problems"] for s in sizes)
    add("hops read == hops written, every round", "yes" if read else _unread(sizes), read)
    return out


def same_findings(sizes: list[dict]) -> tuple[bool, str]:
    signatures = [sig for s in sizes for sig in s["signatures"]]
    if not signatures:
        return False, "no round finished"
    differing = sum(sig["differing"] for sig in signatures)
    if differing:
        return False, f"{differing} cohort(s) found otherwise than the first"
    first = signatures[0]
    if any(sig["cohort"] != first["cohort"] or sig["capture_wide"] != first["capture_wide"] for sig in signatures):
        return False, "a size found otherwise than another"
    per_cohort = sum(n for _, _, n in first["cohort"])
    return True, f"yes: {per_cohort} per cohort + {sum(first['capture_wide'].values())} capture-wide"


def _unread(sizes: list[dict]) -> str:
    for s in sizes:
        if s["problems"]:
            return s["problems"][0]
        if set(s["hops_read"]) != {s["hops"]}:
            return f"{_short(s['hops'])}: read {s['hops_read']}"
    return "no round finished"


def _short(hops: int) -> str:
    return f"{hops / 1e6:.1f}M" if hops >= 950_000 else f"{hops / 1e3:.0f}k"


def render(result: dict) -> str:
    meta, sizes = result["meta"], result["sizes"]
    per_cohort = sizes[0]["hops_per_cohort"] if sizes else 0
    lines = [
        (
            f"Analysis benchmark, {meta['date']}: synthetic trace DBs (cohorts of {meta['users_per_cohort']} concurrent users,"
            f" {per_cohort} hops, 5-8 hops a request), {meta['rounds']} round(s) per size, medians; took {meta['seconds']:.0f} s."
        ),
        f"Machine: {meta['cores']} cores ({meta['cpu']}), Python {meta['python']}.",
        "",
    ]
    header = (
        f"{'hops':>9} {'cohorts':>7} {'DB MB':>6} {'write s':>7} {'load s':>6} {'(CPU)':>6} {'rebuild s':>9} {'detectors s':>11}"
        f" {'tables s':>8} {'analysis s':>10} {'(CPU)':>6} {'waterfall s':>11} {'report s':>8} {'RSS MB':>7} {'(all)':>6}"
        f" {'findings':>8}"
    )
    lines += [header, "-" * len(header)]
    for s in sizes:
        st = s["stages"]
        lines.append(
            f"{s['hops']:>9,} {s['cohorts']:>7,} {s['db_mb']:>6,.0f} {s['write_s']:>7.1f} {fmt(st['load'], '.2f'):>6}"
            f" {fmt(st['load_cpu'], '.2f'):>6} {fmt(st['rebuild'], '.2f'):>9} {fmt(st['detectors'], '.2f'):>11}"
            f" {fmt(st['tables'], '.2f'):>8} {fmt(s['analysis_s'], '.2f'):>10} {fmt(st['analysis_cpu'], '.2f'):>6}"
            f" {fmt(st['waterfall'], '.2f'):>11} {fmt(st['report'], '.2f'):>8}"
            f" {fmt(s['peak_rss_mb']['analysis']):>7} {fmt(s['peak_rss_mb']['all']):>6}"
            f" {fmt(sum((s['findings'] or {}).values()) or None, ',d'):>8}"
        )
    lines += [
        "",
        "analysis s: wall time from the start of the load to the end of the analysis (tables run beside the",
        "detectors); (CPU): the process's CPU time (all threads) for the load and for the whole analysis.",
        "RSS MB: the process's peak after the analysis; (all): after the waterfall and the report too.",
        "write s: synth.py writing the DB, then the file flushed to disk (not part of the analysis).",
    ]
    if sizes and sizes[0]["findings"]:
        cohort = Counter(kind for kind, _, n in sizes[0]["signatures"][0]["cohort"] for _ in range(n))
        wide = sizes[0]["signatures"][0]["capture_wide"]
        lines += [
            "findings per cohort: " + ", ".join(f"{k} {n}" for k, n in cohort.most_common()),
            "findings per DB (about the whole capture): " + (", ".join(f"{k} {n}" for k, n in wide.items()) or "none"),
        ]
    loading = sizes[-1].get("loading") if sizes else None
    if loading:
        columns = max((r.get("columns", 0) for r in loading.values()), default=0)
        lines += [
            "",
            f"loading the {_short(sizes[-1]['hops'])}-hop DB's {columns} hop columns, each way in a fresh process",
            "(seconds, CPU seconds / peak RSS; hoptrace's load also checks the file, reads the tokens and their",
            "sightings and the root trace ids; 'adbc' is the ADBC driver's plain read of the same columns):",
            "  " + _loading_line(loading),
        ]
    lines += ["", f"{'target':<52} {'measured':<40} result", "-" * 100]
    for t in result["targets"]:
        lines.append(f"{t['target']:<52} {t['measured']:<40} {t['result'] or '-'}")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--measure", type=Path, metavar="DB", help="one round on DB")
    parser.add_argument("--per-cohort", type=int, help="hops per cohort of DB")
    parser.add_argument("--out", type=Path, metavar="DIR", help="where the waterfall and the report go")
    parser.add_argument("--measure-load", type=Path, metavar="DB", help="one way of loading DB")
    parser.add_argument("--how", choices=LOADERS)
    args = parser.parse_args()
    if args.measure_load:
        print(json.dumps(measure_load(args.measure_load, args.how)))
    elif args.measure and args.per_cohort and args.out:
        print(json.dumps(measure(args.measure, args.per_cohort, args.out)))
    else:
        parser.error("give --measure DB --per-cohort N --out DIR, or --measure-load DB --how NAME")
