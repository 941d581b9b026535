"""The array helpers give what the pandas operations they stand in for give."""

from __future__ import annotations

import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from hoptrace.analyzer._arrays import group_codes, group_keys

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
