"""What the pytest plugin says about a test: its requests, their findings, the failing request's tree.

Pure functions over an :class:`~hoptrace.analyzer.Analysis` and the entry hops of the
capture; :mod:`hoptrace.pytest_plugin` calls them from its hooks.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from hoptrace._format import clean, count, hop_ended, ms
from hoptrace.analyzer._model import model
from hoptrace.analyzer._render import request_tree
from hoptrace.coverage import CLIENT

_TREE_LINES = 40


def attribute(test, entry_hops: list[tuple[int, float, str | None]], analysis) -> None:
    """Fill ``test.roots`` (its requests' root hop ids), ``by``, ``foreign`` and ``findings``.

    A request is the test's when its entry hop carries the test's header, or when it
    carries no header and entered inside the test's window. ``by`` says which of the
    two found them: ``header``, ``window`` or ``header+window``.
    """
    tagged = [hop for hop, _, tag in entry_hops if tag == test.nodeid]
    in_window = [(hop, tag) for hop, started, tag in entry_hops if test.start <= started <= test.end]
    untagged = [hop for hop, tag in in_window if tag is None]
    test.foreign = sum(1 for _, tag in in_window if tag is not None and tag != test.nodeid)
    test.roots = sorted(tagged + untagged)
    test.by = "+".join(how for how, found in (("header", tagged), ("window", untagged)) if found) or "window"
    test.findings = findings_of(analysis, test.roots)


def findings_of(analysis, roots: Iterable[int]) -> list[dict]:
    f = analysis.findings
    mine = f[f["trace"].isin(list(roots)).fillna(False).to_numpy(bool)]
    return [
        {
            "kind": r.kind, "severity": r.severity, "trace": int(r.trace), "service": r.service,
            "caller": caller_of(r._asdict(), analysis.hops), "message": r.message,
        }
        for r in mine.itertuples(index=False)
    ]  # fmt: skip


def caller_of(finding: dict, hops: pd.DataFrame) -> str | None:
    """Who made the call a finding is about: its ``caller`` when the detector names one,
    else the service of the parent of the finding's first hop (``client`` for a request)."""
    caller = finding.get("caller")
    if isinstance(caller, str) and caller:
        return caller
    ids = finding.get("hop_ids")
    if ids is None or len(ids) == 0 or ids[0] not in hops.index:
        return None
    parent = hops.at[ids[0], "parent_id"]
    if pd.isna(parent):
        return CLIENT
    return str(hops.at[int(parent), "service"]) if int(parent) in hops.index else None


def _finding_line(f: dict) -> str:
    where = f"{f['caller']} -> {f['service']}" if f["caller"] else str(f["service"])
    return f"{f['severity']} {f['kind']} (request {f['trace']}, {clean(where, 80)}): {clean(f['message'], 400)}"


def _request_line(analysis, root: int) -> str:
    r = analysis.hops.loc[root]
    status = hop_ended(r["status"], r["failed"])
    return f"request {root}: {clean(r['service'], 40)} {clean(r['endpoint'], 80)} {status} in {ms(r['duration_ms'])}"


def token_story(analysis, root: int) -> str | None:
    """The request's token validations in order, who asked and with how much life left:
    ``POST /checkout 401: gateway validated the token (auth GET /verify) with 1.6 s left;
    payment validated it (auth POST /introspect) 0.6 s after exp``."""
    hops = analysis.trace_hops(root)
    checks = hops[hops["is_validation"].to_numpy(bool) & (hops["depth"].to_numpy() > 0)]
    steps = []
    for hop, service, endpoint, left in zip(checks.index, checks["service"], checks["endpoint"], checks["remaining_s"]):
        if pd.isna(left):
            continue
        caller = caller_of({"hop_ids": [hop]}, analysis.hops) or "?"
        when = f"with {left:.1f} s left" if left >= 0 else f"{-left:.1f} s after exp"
        steps.append(
            f"{clean(caller, 40)} validated {'it' if steps else 'the token'} ({clean(service, 40)} {clean(endpoint, 80)}) {when}"
        )
    if not steps:
        return None
    r = analysis.hops.loc[root]
    return f"{clean(r['endpoint'], 80)} {hop_ended(r['status'], r['failed'])}: " + "; ".join(steps)


def failing_request(test, analysis) -> int | None:
    """The request to draw: the test's last one answered >= 400 or not at all, else the one of its first error finding."""
    hops = analysis.hops
    roots = [r for r in test.roots if r in hops.index]
    failed = [r for r in roots if pd.isna(hops.at[r, "status"]) or hops.at[r, "status"] >= 400]
    if failed:
        return failed[-1]
    errors = [f["trace"] for f in test.findings if f["severity"] == "error" and f["trace"] in hops.index]
    return errors[0] if errors else None


def section(test, analysis, root: int | None = None) -> str:
    """The report section of a failing test; the tree drawn is ``root``'s, else :func:`failing_request`'s."""
    counts = pd.Series([f["severity"] for f in test.findings], dtype=object).value_counts()
    how = {"header": "by its X-Hoptrace-Test header", "window": "by the test's time window"}.get(
        test.by, "by its header, and untagged ones by the test's time window"
    )
    errors, warnings = count(int(counts.get("error", 0)), "error"), count(int(counts.get("warning", 0)), "warning")
    lines = [
        f"{count(len(test.roots), 'request')} of this test ({how}): {errors}, {warnings}, {int(counts.get('info', 0))} info"
    ]
    if not test.complete:
        lines.append("note: the proxy had not written all of them within 5 s; some may be missing")
    if "window" in test.by and test.foreign:
        lines.append(f"note: {count(test.foreign, 'request')} of other tests entered during this test's window")
    root = root if root is not None else failing_request(test, analysis)
    if root is not None:
        status = analysis.hops.at[root, "status"]
        lines += ["", ("Failing " if pd.isna(status) or status >= 400 else "") + _request_line(analysis, root)]
        if story := token_story(analysis, root):
            lines.append(f"  {story}")
        lines += [f"  {_finding_line(f)}" for f in test.findings if f["trace"] == root]
        lines += request_tree(model(analysis), root, _TREE_LINES)
    others = [f for f in test.findings if f["trace"] != root]
    if others:
        lines += ["", "Findings of its other requests:"]
        lines += [f"  {_finding_line(f)}" for f in others]
    return "\n".join(lines)


def matching(test, fail_on: frozenset[str]) -> list[dict]:
    return [f for f in test.findings if f["kind"] in fail_on or f["severity"] in fail_on]


def fail_on_message(test, hits: list[dict], fail_on: frozenset[str], analysis) -> str:
    head = f"hoptrace: --hoptrace-fail-on {','.join(sorted(fail_on))}: {count(len(hits), 'finding')} on this test's requests"
    return "\n".join([head, "", section(test, analysis, root=hits[0]["trace"])])


def properties(test) -> list[tuple[str, str]]:
    """JUnit XML properties: the test's requests, how they were attributed, one per finding."""
    props = [("hoptrace_requests", " ".join(map(str, test.roots))), ("hoptrace_attribution", test.by)]
    return props + [("hoptrace_finding", _finding_line(f)) for f in test.findings]


def write_attribution(tests, path: Path) -> Path:
    """``{"format": "hoptrace-tests", "tests": [{nodeid, start, end, by, requests, foreign, findings}]}``."""
    rows = [
        {"nodeid": t.nodeid, "start": t.start, "end": t.end, "by": t.by, "requests": t.roots, "foreign": t.foreign,
         "findings": t.findings}
        for t in tests
    ]  # fmt: skip
    path.write_text(
        json.dumps({"format": "hoptrace-tests", "version": 1, "tests": rows}, indent=1, default=str), encoding="utf-8"
    )
    return path


def summary(plugin, analysis) -> list[str]:
    """The terminal summary: capture, findings per test and unattributed, coverage."""
    from hoptrace.coverage import coverage_of, render_text

    f = analysis.findings
    counts = f["severity"].value_counts()
    lines = [
        f"trace: {plugin.capture.db} ({plugin.proxy_summary})",
        f"{count(int((analysis.hops['depth'] == 0).sum()), 'request')} from {count(len(plugin.tests), 'test')}; "
        + ("no error finding" if not counts.get("error", 0) else count(int(counts['error']), 'error finding'))
        + f", {count(int(counts.get('warning', 0)), 'warning')}, {int(counts.get('info', 0))} info",
    ]  # fmt: skip
    attributed: set[int] = set()
    for test in plugin.tests.values():
        attributed.update(f["trace"] for f in test.findings)
        if test.findings:
            kinds = pd.Series([x["kind"] for x in test.findings]).value_counts()
            lines.append(f"  {test.nodeid}: " + ", ".join(f"{k} x{n}" if n > 1 else k for k, n in kinds.items()))
    loose = f[~f["trace"].isin(list(attributed)).fillna(False).to_numpy(bool)]
    if len(loose):
        lines.append(f"  not from any test's requests: {', '.join(sorted(set(loose['kind'])))}")
    lines.append(f"each test's requests and findings: {plugin.attribution_path}")
    if plugin.settings.report is not None:
        lines.append(f"report: {plugin.settings.report}")
    lines += ["", *render_text(coverage_of(analysis, plugin.settings.openapi)).rstrip("\n").splitlines()]
    return lines


def write_report(analysis, tests, path: Path) -> Path:
    """The HTML report, each finding's message starting with the test whose request it is on."""
    from hoptrace.plot import write_report as write_html

    owner = {root: t.nodeid for t in tests for root in t.roots}
    f = analysis.findings
    labels = [f"[{owner[int(t)]}] " if not pd.isna(t) and int(t) in owner else "" for t in f["trace"]]
    labelled = dataclasses.replace(analysis, findings=f.assign(message=[a + m for a, m in zip(labels, f["message"])]))
    return write_html(labelled, path, title="hoptrace: pytest session")
