"""The analysis runs with Python's cyclic collector paused and numpy's huge pages off, and leaves both as it found them."""

from __future__ import annotations

import gc
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest

from hoptrace._errors import AnalysisError
from hoptrace._memory import _huge_pages, analysis_memory
from hoptrace.analyzer import analyze
from hoptrace.analyzer._analysis import analyze_tables
from hoptrace.analyzer._detectors import Detector, empty_findings
from hoptrace.analyzer._load import load

SAMPLE = Path(__file__).resolve().parent.parent / "sample_traces" / "checkout-expiry.db"


ANALYZER = Path(analyze_tables.__wrapped__.__code__.co_filename).parent


def _in_analyzer() -> bool:
    frame = sys._getframe(2)
    while frame is not None:
        if Path(frame.f_code.co_filename).parent == ANALYZER:
            return True
        frame = frame.f_back
    return False


@pytest.fixture
def collections():
    """The collections that start inside the analyzer's code while the test runs, with the collector
    made to run at every allocation (so that any left on would run there)."""
    started: list[int] = []

    def count(phase: str, info: dict) -> None:
        if phase == "start" and _in_analyzer():
            started.append(info["generation"])

    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    gc.callbacks.append(count)
    try:
        yield started
    finally:
        gc.callbacks.remove(count)
        gc.set_threshold(*thresholds)
        gc.enable()


def test_the_analysis_runs_no_collection_and_turns_the_collector_back_on(collections):
    tables = load(SAMPLE)
    collections.clear()
    analysis = analyze_tables(tables)
    assert collections == [] and gc.isenabled()
    analyze(SAMPLE)
    assert collections == [] and gc.isenabled()
    assert len(analysis.findings)  # an analysis that did its work

    with_collector = analyze_tables.__wrapped__  # the same analysis, without the pause
    with_collector(tables)
    assert collections  # the collections the pause keeps from the analysis


def test_the_collector_is_back_on_after_an_analysis_that_failed(collections):
    with pytest.raises(AnalysisError):
        analyze(SAMPLE, since=20, until=10)
    assert gc.isenabled()


def test_a_collector_the_caller_turned_off_stays_off(collections):
    gc.disable()
    with analysis_memory():
        with analysis_memory():  # nested, as analyze calls analyze_tables
            assert not gc.isenabled()
        assert not gc.isenabled()
    analyze(SAMPLE)
    assert not gc.isenabled()
    gc.enable()
    with analysis_memory():
        with analysis_memory():
            pass
        assert not gc.isenabled()  # the inner block does not turn it on under the outer one
    assert gc.isenabled()


def _huge_pages_now() -> bool | None:
    was = _huge_pages(False)
    _huge_pages(was)
    return was


def test_the_analysis_runs_on_small_pages_and_puts_numpy_back_as_it_was():
    seen = []

    def probe(ctx) -> pd.DataFrame:
        seen.append((_huge_pages_now(), gc.isenabled()))
        return empty_findings()

    tables, original = load(SAMPLE), _huge_pages_now()
    for before in (True, False):
        _huge_pages(before)
        try:
            analyze_tables(tables, detectors=(Detector("probe", "info", probe),))
            assert _huge_pages_now() is before
        finally:
            _huge_pages(original)
    assert seen == [(False, False), (False, False)]


def test_analyses_overlapping_in_threads_put_both_back_when_the_last_ends(collections):
    """A starts, B starts, A ends, B ends: B runs its whole block paused, and both end as before A."""
    original = _huge_pages_now()
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first() -> None:
        with analysis_memory():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second() -> None:
        a_in.wait(10)
        with analysis_memory():
            b_in.set()
            a_out.wait(10)
            seen["B after A ended"] = (_huge_pages_now(), gc.isenabled())

    threads = [threading.Thread(target=run) for run in (first, second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"B after A ended": (False, False)}
    assert (_huge_pages_now(), gc.isenabled()) == (original, True)
