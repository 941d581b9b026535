"""The web view's benchmark: `hoptrace ui` on a synthetic trace DB (``synth.py``), as a person meets it.

Each figure is taken from a real ``hoptrace ui DB --port 0`` process over HTTP on 127.0.0.1:

    first page    from spawning the process to the request list's first page answered with rows
    analysed      from spawning to the status saying the analysis is loaded (findings known)
    waterfall     ``/api/request/ID`` once analysed: the 20 worst requests, the 20 with the most
                  hops and 20 more spread over the list (max and median)
    live listed   rows copied into a DB being watched at 500 hops/s, in batches every 0.1 s: from a
                  request's root hop committed to its row in ``/api/requests`` (polled every 50 ms)
    live analysed the same, to its row carrying its analysis (hops counted, findings known);
                  meanwhile a list page is open as in a browser, asking for the filters' values and
                  the first page on every server-sent event

The live DB is the synthetic DB with its last hops cut off, then written back at that rate.
Correctness is checked, speed never is: the list's total must equal the DB's entry-route hops,
each waterfall must hold as many hops as its row says, every request written live must be
listed and analysed.

    python benchmarks/ui.py --hops 1000000        (also: python3 dev.py bench --only ui)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import synth
from common import fmt, machine, work_folder

# Targets from issue 12 (a 1M-hop DB; live at 500 hops/s).
FIRST_PAGE_S, WATERFALL_MS, LIVE_LISTED_S, LIVE_ANALYSED_S = 3.0, 300.0, 1.0, 1.0
RATE = 500  # hops per second written live
BATCH_S = 0.1
POLL_S = 0.05
WAIT_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("ui")
    group.add_argument("--ui-hops", type=int, default=None, help="hops in the UI's DB (default 1000000; --quick: 10000)")
    group.add_argument("--live-s", type=float, default=None, help="seconds of live writing (default 20; --quick: 4)")


def bench_ui(args: argparse.Namespace, log=print) -> dict:
    quick = getattr(args, "quick", False)
    hops = args.ui_hops or (10_000 if quick else 1_000_000)
    live_s = args.live_s or (4.0 if quick else 20.0)
    started = time.monotonic()
    with work_folder(args.workdir, args.keep, "hoptrace-bench-ui-") as folder:
        db = synth.write(folder / f"ui-{hops}.db", hops)
        os.sync()
        log(f"  {db.hops:,} hops written, {db.path.stat().st_size / 1e6:,.0f} MB")
        opened = measure_open(db.path, log)
        live = measure_live(db.path, folder / "live.db", live_s, log)
    result = {"meta": {**machine(), "hops": db.hops, "seconds": round(time.monotonic() - started, 1)},
              "open": opened, "live": live}  # fmt: skip
    result["targets"] = targets(result)
    result["table"] = render(result)
    return result


class UI:
    """`hoptrace ui DB --port 0` as a child process, and GETs against it."""

    def __init__(self, db: Path, live: bool) -> None:
        self.spawned = time.monotonic()
        cmd = [sys.executable, "-m", "hoptrace", "ui", str(db), "--port", "0", *([] if live else ["--no-live"])]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        found = re.search(r"at (http://\S+)", line)
        if not found:
            self.stop()
            raise RuntimeError(f"hoptrace ui did not start: {line.strip() or self.proc.stdout.read()[-300:]}")
        self.url = found.group(1)

    def get(self, path: str) -> tuple[int, dict]:
        try:
            with urllib.request.urlopen(self.url + path, timeout=60) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    def until(self, check, what: str) -> float:
        """Seconds since the spawn at which ``check()`` first held (polled every ``POLL_S``)."""
        deadline = time.monotonic() + WAIT_S
        while not check():
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"hoptrace ui: {what} never happened")
            time.sleep(POLL_S)
        return time.monotonic() - self.spawned

    def cpu_s(self) -> float:
        """CPU seconds the process and its children (the live passes' worker) have used (user + system,
        from /proc: the machine is shared, wall time is not all ours)."""
        ticks = 0
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except OSError:  # a process that ended meanwhile
                continue
            if stat.parent.name == str(self.proc.pid) or fields[1] == str(self.proc.pid):  # itself, or a child of it
                ticks += int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
        return ticks / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _analysed(ui: UI) -> bool:
    status, body = ui.get("api/status")
    return status == 200 and body["version"] > 0 and not any(d["analysing"] for d in body["dbs"]) and body["dbs"][0]["hops"] > 0


def measure_open(db: Path, log) -> dict:
    """First page, analysis, waterfalls of a `hoptrace ui` on ``db`` (not live)."""
    entries = _sql(db, "SELECT count(*) FROM hops h JOIN captures c ON c.id = h.capture_id WHERE h.service = c.entry")[0][0]
    ui = UI(db, live=False)
    try:
        first = ui.until(lambda: ui.get("api/requests?limit=50")[1].get("items"), "a first page")
        first_cpu = ui.cpu_s()
        analysed = ui.until(lambda: _analysed(ui), "the analysis")
        _, listing = ui.get("api/requests?limit=20")  # the worst first
        total = listing["total"]
        rows = listing["items"] + ui.get("api/requests?limit=20&sort=hops")[1]["items"]
        for offset in range(0, total, max(1, total // 20)):
            rows += ui.get(f"api/requests?limit=1&offset={offset}")[1]["items"]
        expected = {r["trace"]: r["hops"] for r in rows}
        times, wrong = [], 0
        for trace, hops in expected.items():
            before = time.perf_counter()
            status, request = ui.get(f"api/request/{trace}")
            times.append((time.perf_counter() - before) * 1000)
            wrong += status != 200 or len(request["hops"]) != hops
    finally:
        ui.stop()
    log(f"  first page {first:.2f} s ({first_cpu:.2f} s CPU), analysed {analysed:.1f} s, waterfall max {max(times):.0f} ms"
        f" over {len(times)}")  # fmt: skip
    return {"first_page_s": first, "first_page_cpu_s": first_cpu, "analysed_s": analysed, "waterfall_ms": {"max": max(times), "median": statistics.median(times),
            "n": len(times)}, "listed": total, "entries": entries, "wrong_waterfalls": wrong}  # fmt: skip


def measure_live(source: Path, live_db: Path, seconds: float, log) -> dict:
    """Lags of a live `hoptrace ui` while the last ``seconds * RATE`` hops of ``source`` are written back."""
    (last,) = _sql(source, "SELECT max(id) FROM hops")[0]
    cut = max(1, last - int(seconds * RATE))
    shutil.copy(source, live_db)
    with sqlite3.connect(live_db) as conn:
        conn.execute("DELETE FROM hop_tokens WHERE hop_id > ?", (cut,))
        conn.execute("DELETE FROM hops WHERE id > ?", (cut,))
    ui = UI(live_db, live=True)
    committed: dict[int, float] = {}
    started: dict[int, float] = {}  # each written request's start (its root hop's started_at)
    listed: dict[int, float] = {}
    analysed: dict[int, float] = {}
    refreshes = [0, 0]
    try:
        ui.until(lambda: _analysed(ui), "the first analysis")
        since = _sql(source, "SELECT min(started_at) FROM hops WHERE id > ?", (cut,))[0][0]
        writer = threading.Thread(target=_write_back, args=(source, live_db, cut, last, committed, started), daemon=True)
        writer.start()
        threading.Thread(target=_watch_like_a_page, args=(ui, refreshes), daemon=True).start()
        cpu, wall = ui.cpu_s(), time.monotonic()
        deadline = time.monotonic() + seconds + 60
        while time.monotonic() < deadline:
            now = time.monotonic()
            # Only the rows still to be seen analysed: re-reading every row written so far, four pages
            # every 50 ms, cost the ui process more CPU than its analysis and delayed what it measured.
            waiting = [started[t] for t in list(committed) if t not in analysed]
            for row in _rows_since(ui, min(waiting) if waiting else max(started.values(), default=since)):
                listed.setdefault(row["trace"], now)
                if row["hops"] is not None:
                    analysed.setdefault(row["trace"], now)
            if not writer.is_alive() and committed and set(committed) <= set(analysed):
                break
            time.sleep(POLL_S)
        cpu, wall = ui.cpu_s() - cpu, time.monotonic() - wall
    finally:
        ui.stop()
    lag = lambda seen: sorted(seen[t] - committed[t] for t in committed if t in seen)  # noqa: E731
    listed_lag, analysed_lag = lag(listed), lag(analysed)
    out = {"hops": last - cut, "requests": len(committed), "listed": len(listed_lag), "analysed": len(analysed_lag),
           "listed_s": _spread(listed_lag), "analysed_s": _spread(analysed_lag),
           "never_analysed": sorted(set(committed) - set(analysed))[:20], "cpu_s": cpu, "wall_s": wall,
           "page_refreshes": refreshes[0], "page_errors": refreshes[1]}  # fmt: skip
    log(f"  live: {out['requests']} requests written; listed {_p(out['listed_s'])}; analysed {_p(out['analysed_s'])}")
    return out


def _watch_like_a_page(ui: UI, refreshes: list[int]) -> None:
    """What the list page open in a browser does while the view is live (app.js): on each server-sent
    event, ask for the filters' values and the first page again (``refreshes``: how many times, and
    how many answers were not a 200). Until the UI stops."""
    try:
        with urllib.request.urlopen(ui.url + "api/events", timeout=60) as events:
            for line in events:
                if line.startswith(b"data:"):
                    refreshes[0] += 1
                    refreshes[1] += sum(ui.get(path)[0] != 200 for path in ("api/facets", "api/requests?limit=50"))
    except OSError:  # the UI stopped, and its event stream with it: the refreshes are counted
        return


def _write_back(source: Path, live_db: Path, cut: int, last: int, committed: dict[int, float], started: dict[int, float]) -> None:
    """Copy the hops after ``cut`` from ``source`` into ``live_db``, ``RATE * BATCH_S`` every ``BATCH_S``,
    noting when each request's root hop (the entry route's) was committed."""
    step = int(RATE * BATCH_S)
    conn = sqlite3.connect(live_db, isolation_level=None)
    conn.execute("ATTACH ? AS src", (f"file:{source}?mode=ro",))
    entry = conn.execute("SELECT entry FROM captures LIMIT 1").fetchone()[0]
    try:
        tick = time.monotonic()
        for low in range(cut, last, step):
            high = min(low + step, last)
            conn.execute("BEGIN")
            conn.execute("INSERT INTO hops SELECT * FROM src.hops WHERE id > ? AND id <= ?", (low, high))
            conn.execute("INSERT INTO hop_tokens SELECT * FROM src.hop_tokens WHERE hop_id > ? AND hop_id <= ?", (low, high))
            roots = conn.execute("SELECT id, started_at FROM hops WHERE id > ? AND id <= ? AND service = ?", (low, high, entry)).fetchall()
            conn.execute("COMMIT")
            now = time.monotonic()
            started.update(roots)
            committed.update({r: now for r, _ in roots})
            tick += BATCH_S
            time.sleep(max(0.0, tick - time.monotonic()))
    finally:
        conn.close()


def _rows_since(ui: UI, since: float) -> list[dict]:
    rows: list[dict] = []
    while True:
        status, page = ui.get(f"api/requests?sort=started&limit=500&since={since}&offset={len(rows)}")
        if status != 200 or not page["items"]:
            return rows
        rows += page["items"]
        if len(rows) >= page["total"]:
            return rows


def _spread(values: list[float]) -> dict | None:
    if not values:
        return None
    return {"median": statistics.median(values), "p95": values[int(0.95 * (len(values) - 1))], "max": values[-1]}


def _p(spread: dict | None) -> str:
    return "never" if spread is None else f"median {spread['median']:.2f} s, p95 {spread['p95']:.2f} s, max {spread['max']:.2f} s"


def _sql(db: Path, query: str, args: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute(query, args).fetchall()
    finally:
        conn.close()


def targets(result: dict) -> list[dict]:
    o, live, hops = result["open"], result["live"], result["meta"]["hops"]
    size = f"{hops / 1e6:.0f}M" if hops >= 900_000 else f"{hops / 1e3:.0f}k"
    rows = [
        (f"{size} hops: first page <= {FIRST_PAGE_S:g} s after start", f"{o['first_page_s']:.2f} s",
         o["first_page_s"] <= FIRST_PAGE_S),
        (f"{size} hops: any waterfall <= {WATERFALL_MS:g} ms", f"max {o['waterfall_ms']['max']:.0f} ms, median "
         f"{o['waterfall_ms']['median']:.0f} ms", o["waterfall_ms"]["max"] <= WATERFALL_MS),
        (f"live at {RATE} hops/s: listed <= {LIVE_LISTED_S:g} s", _p(live["listed_s"]),
         live["listed_s"] is not None and live["listed_s"]["p95"] <= LIVE_LISTED_S),
        (f"live at {RATE} hops/s: findings ~ {LIVE_ANALYSED_S:g} s", _p(live["analysed_s"]),
         live["analysed_s"] is not None and live["analysed_s"]["p95"] <= LIVE_ANALYSED_S),
        ("listed == entry-route hops; waterfalls whole", f"{o['listed']:,} of {o['entries']:,}; {o['wrong_waterfalls']} wrong",
         o["listed"] == o["entries"] and o["wrong_waterfalls"] == 0),
        ("requests written live: all listed and analysed", (f"{live['listed']}/{live['analysed']} of {live['requests']};"
         f" page refreshed {live['page_refreshes']} times, {live['page_errors']} answers not a 200"),
         live["requests"] > 0 and live["listed"] == live["analysed"] == live["requests"]
         and live["page_refreshes"] > 0 and live["page_errors"] == 0),
    ]  # fmt: skip
    return [{"target": t, "measured": m, "result": "PASS" if ok else "MISS"} for t, m, ok in rows]


def render(result: dict) -> str:
    meta, o = result["meta"], result["open"]
    lines = [
        f"UI benchmark, {meta['date']}: `hoptrace ui` on a synthetic {meta['hops']:,}-hop DB; took {meta['seconds']:.0f} s.",
        f"Machine: {meta['cores']} cores ({meta['cpu']}), Python {meta['python']}.",
        f"first page: {o['first_page_cpu_s']:.2f} s of CPU in the ui process; analysed (all findings known)"
        f" {fmt(o['analysed_s'], '.1f')} s after start; waterfalls timed: {o['waterfall_ms']['n']}.",
        f"live: {result['live']['hops']:,} hops written back at {RATE} hops/s; lags from a root hop's commit (polled every"
        f" {POLL_S * 1000:.0f} ms), while a list page refreshed as a browser's does ({result['live']['page_refreshes']}"
        f" times, {result['live']['page_errors']} answers not a 200); the ui process and its worker used {result['live']['cpu_s']:.1f} s of CPU in {result['live']['wall_s']:.1f} s.",
        "",
        f"{'target':<46} {'measured':<58} result",
        "-" * 112,
    ]
    lines += [f"{t['target']:<46} {t['measured']:<58} {t['result']}" for t in result["targets"]]
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--workdir", type=Path, default=None)
    add_arguments(parser)
    result = bench_ui(parser.parse_args())
    print(result["table"])
