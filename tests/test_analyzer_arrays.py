"""The array helpers give what the pandas operations they stand in for give."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from hoptrace.analyzer import _arrays
from hoptrace.analyzer._arrays import group_codes, group_keys, group_quantiles, run_starts, taken_text

_text = st.one_of(st.none(), st.sampled_from(["a", "b", "c", ""]))
_row = st.tuples(st.sampled_from([None, 1, 2, -3]), _text, st.sampled_from([0.5, float("nan"), -0.0, 0.0, 1.0]), _text)


@settings(max_examples=300, deadline=None)
@given(
    rows=st.lists(_row, max_size=40),
    keys=st.lists(st.sampled_from(list("abcd")), min_size=1, max_size=3, unique=True),
    categorical=st.booleans(),
)
def test_group_codes_number_the_groups_as_groupby_does(rows, keys, categorical):
    frame = pd.DataFrame(rows, columns=list("abcd")).astype({"a": "Int64", "d": "str"})
    if categorical:
        frame["b"] = frame["b"].astype("category")
    want = frame.groupby(keys, sort=False, dropna=False, observed=True).ngroup().to_numpy()
    np.testing.assert_array_equal(group_codes(frame, keys), want)


@settings(max_examples=200, deadline=None)
@given(
    rows=st.lists(st.tuples(st.sampled_from(["x", "y", ""]), st.sampled_from(["a", "b"]), st.sampled_from(["p", "q"])), max_size=30),
    categorical=st.booleans(),
)
def test_group_keys_are_the_factorized_keys(rows, categorical):
    """What the detectors and the UI's facets took from ``pd.factorize`` of a MultiIndex (keys never missing)."""
    frame = pd.DataFrame(rows, columns=["caller", "service", "endpoint"], dtype=object)
    if categorical:
        frame["service"] = frame["service"].astype("category")
    keys = list(frame.columns)
    codes, uniques = pd.factorize(pd.MultiIndex.from_arrays([frame[k].astype(object) for k in keys]))
    got_codes, got_keys = group_keys(frame, keys)
    np.testing.assert_array_equal(got_codes, codes)
    assert got_keys == list(uniques)


_QS = (0.0, 0.1, 0.5, 0.9, 0.95, 0.99, 1.0)
# Group codes close together (each group's values partitioned) or far apart (one sort of all values).
_codes = st.one_of(st.integers(-3, 6), st.sampled_from([-40_000, 0, 7_000, 90_000]))
_values = st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.just(float("nan")), st.sampled_from([0.0, 1.5, 2.0]))


@settings(max_examples=300, deadline=None)
@given(rows=st.lists(st.tuples(_codes, _values), max_size=60), qs=st.lists(st.sampled_from(_QS), min_size=1, max_size=4, unique=True))
def test_group_quantiles_are_the_groups_sorted_and_interpolated_as_pandas_does(rows, qs):
    codes = np.array([code for code, _ in rows], np.int64)
    values = np.array([value for _, value in rows], np.float64)
    got_codes, got = group_quantiles(codes, values, tuple(qs))
    # The definition: each group's values in order, linear interpolation between ranks.
    keep = ~np.isnan(values)
    order = np.lexsort((values[keep], codes[keep]))
    in_order, by_code = values[keep][order], codes[keep][order]
    starts = np.flatnonzero(run_starts(by_code))
    at = starts[:, None] + np.array(qs)[None, :] * (np.diff(np.r_[starts, len(by_code)])[:, None] - 1)
    low, high = np.floor(at).astype(np.int64), np.ceil(at).astype(np.int64)
    np.testing.assert_array_equal(got_codes, by_code[starts])
    np.testing.assert_array_equal(got, in_order[low] + (in_order[high] - in_order[low]) * (at - low))
    if len(got_codes):
        frame = pd.DataFrame({"code": codes, "value": values})
        want = frame.groupby("code")["value"].quantile(list(qs)).unstack().dropna(how="all")
        np.testing.assert_allclose(got, want.to_numpy(), rtol=1e-9, atol=1e-6)


def test_group_quantiles_take_the_sorting_path_past_the_partitioned_groups(monkeypatch):
    """Both ways of ordering the values give the same quantiles, bit for bit."""
    rng = np.random.default_rng(7)
    codes, values = rng.integers(0, 50, 5_000), rng.exponential(40.0, 5_000)
    partitioned = group_quantiles(codes, values, _QS)
    monkeypatch.setattr(_arrays, "_PARTITIONED_GROUPS", 10)
    sorted_all = group_quantiles(codes, values, _QS)
    np.testing.assert_array_equal(partitioned[0], sorted_all[0])
    np.testing.assert_array_equal(partitioned[1], sorted_all[1])


def test_group_quantiles_of_narrow_integer_codes_come_in_code_order():
    """Codes of a small integer type spanning more than it holds once shifted (int8 -100 and 100)."""
    codes = np.array([100, -100, 100, -100], np.int8)
    got_codes, got = group_quantiles(codes, np.array([1.0, 2.0, 3.0, 4.0]), (0.5,))
    np.testing.assert_array_equal(got_codes, [-100, 100])
    np.testing.assert_array_equal(got[:, 0], [3.0, 2.0])


@settings(max_examples=300, deadline=None)
@given(
    # Text or missing, as fingerprints and subjects are (pandas writes a Categorical of numbers
    # with a missing value as "0.0": not a case the analysis has).
    values=st.lists(st.one_of(st.none(), st.sampled_from(["alice", "bob", "é", "", "0"])), max_size=12),
    categorical=st.booleans(),
    data=st.data(),
)
def test_taken_text_is_what_pandas_gives_by_position_as_str(values, categorical, data):
    column = pd.Series(values, dtype="category" if categorical else object)
    positions = np.array(data.draw(st.lists(st.integers(-1, len(values) - 1), max_size=20)), dtype=np.int64)
    # What the analysis did before: a reindex by label (a label past the end where a position is -1), then astype.
    expected = column.reindex(np.where(positions >= 0, positions, len(column))).astype("str")
    got = pd.Series(taken_text(column, positions))
    assert got.dtype == "str" and got.isna().tolist() == expected.isna().tolist()
    assert got.fillna("<missing>").tolist() == expected.fillna("<missing>").tolist()
