"""Array helpers shared by the analysis steps."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa


def run_starts(*keys: np.ndarray) -> np.ndarray:
    """True where a run of equal keys begins (keys sorted so that equal ones are adjacent)."""
    n = len(keys[0])
    first = np.zeros(n, bool)
    if n:
        first[0] = True
        for key in keys:
            first[1:] |= key[1:] != key[:-1]
    return first


# Up to this many group codes, each group's order statistics come from a partition of its values
# (O(n), a Python step per group); past it, one sort of all values is cheaper.
_PARTITIONED_GROUPS = 5_000


def group_quantiles(codes: np.ndarray, values: np.ndarray, qs: tuple[float, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Quantiles of ``values`` per group code, interpolated linearly as pandas does.

    Returns (group codes present, array of shape (groups, len(qs))). NaN values are left
    out, as pandas leaves them out. For the few groups the analysis has (services, endpoints,
    edges), the values are ordered by group with one stable sort of the codes, and only the
    ranks the quantiles read are put in place, by ``np.partition`` of each group's values: at a
    million values in 24 to 2,000 groups, 55-120 ms against ~200 ms for sorting them all. Past
    :data:`_PARTITIONED_GROUPS` group codes, all the values are sorted, by value then by group.
    """
    keep = ~np.isnan(values)
    if not keep.all():
        codes, values = codes[keep], values[keep]
    lowest = int(codes.min()) if len(codes) else 0
    span = int(codes.max()) - lowest if len(codes) else 0  # bounds the number of groups
    # The codes shifted to start at 0: spanning under 2**15, they sort stably as int16, a radix sort, 5x faster.
    by_group = codes.astype(np.int64) - lowest
    if span < 2**15:
        by_group = by_group.astype(np.int16)
    few = span < _PARTITIONED_GROUPS
    if few:
        order = np.argsort(by_group, kind="stable")
    else:
        order = np.argsort(values)  # by value, then stably by group: every group's values in order
        order = order[np.argsort(by_group[order], kind="stable")]
    del by_group
    # One array at a time: at a million values each copy is 8 MB, and this runs at the analysis's peak.
    codes = codes[order]
    values = values[order]
    del order
    starts = np.flatnonzero(run_starts(codes))
    counts = np.diff(np.r_[starts, len(codes)])
    at = starts[:, None] + np.asarray(qs, np.float64)[None, :] * (counts[:, None] - 1)
    low = np.floor(at).astype(np.int64)
    high = np.ceil(at).astype(np.int64)
    if few:  # each group's values partitioned in place around the ranks read below
        for start, count, ranks in zip(starts, counts, np.concatenate([low, high], axis=1) - starts[:, None], strict=True):
            values[start : start + count].partition(np.unique(ranks))
    return codes[starts], values[low] + (values[high] - values[low]) * (at - low)


def group_codes(frame: pd.DataFrame, keys: list[str]) -> np.ndarray:
    """A code per row for its combination of ``keys``, numbered in order of first appearance with a
    missing value a key of its own: ``groupby(keys, sort=False, dropna=False).ngroup()``.

    One ``factorize`` per key, not a groupby: on a live view's few thousand rows a groupby on
    two or three keys cost 5 to 12 ms, mostly pandas' fixed cost, and the detectors make ~20.
    """
    codes = np.zeros(len(frame), dtype=np.int64)
    for key in keys:
        column, _ = pd.factorize(frame[key], use_na_sentinel=False)
        # Each pair (code so far, this key's code) once: factorizing the pairs renumbers them in
        # order of first appearance, and keeps the codes below len(frame) for the next key.
        codes, _ = pd.factorize(codes * (int(column.max(initial=0)) + 1) + column)
    return codes


def group_keys(frame: pd.DataFrame, keys: list[str]) -> tuple[np.ndarray, list[tuple]]:
    """:func:`group_codes`, and each code's values of ``keys`` as a tuple, in code order: what
    ``pd.factorize`` of the keys' MultiIndex gives, without building one (~2-4 ms on a few rows)."""
    codes = group_codes(frame, keys)
    _, first = np.unique(codes, return_index=True)  # the codes count up from 0 in order of appearance
    return codes, list(zip(*(frame[key].to_numpy()[first].tolist() for key in keys)))


def taken(values: np.ndarray, positions: np.ndarray, missing) -> np.ndarray:
    """``values`` at ``positions``, ``missing`` where a position is -1 (a label ``get_indexer`` did not find)."""
    return np.append(values, missing)[positions]  # -1 takes the value appended


def taken_text(column: pd.Series, positions: np.ndarray) -> pd.api.extensions.ExtensionArray:
    """``column``'s values at ``positions`` (-1: missing) as text, pandas' ``str`` dtype: what
    ``column.iloc``-by-position then ``.astype("str")`` gives.

    A Categorical's values are taken by Arrow from its codes and categories: pandas' ``astype``
    makes a Python object per value, 0.2 s for a million subjects of 35k categories (0.03 s so).
    """
    if not isinstance(column.dtype, pd.CategoricalDtype):
        return column.array.take(positions, allow_fill=True).astype("str")
    codes = taken(column.cat.codes.to_numpy(), positions, -1)
    categories = pa.array(column.cat.categories.astype("str").to_numpy(object), pa.large_string())
    values = pa.DictionaryArray.from_arrays(pa.array(codes, mask=codes < 0), categories).dictionary_decode()
    return pd.array(values, dtype="str")
