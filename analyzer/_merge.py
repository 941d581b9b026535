"""Several trace files, one analysis: the shards of ``hoptrace proxy --workers N``, or captures of
one stack taken on several hosts with one fingerprint key.

Each file is read by :func:`hoptrace.analyzer._load.load` as it would be alone (untrusted, one
snapshot, its structure checked), the files in threads of their own; then their tables are
put together into one :class:`~hoptrace.analyzer._load.Tables`:

- **hops**: hop ``i`` of file ``k`` (of ``K``, 0-based) becomes hop ``i * K + k``. No two files'
  ids collide; the id alone says which file (``id % K``) and which hop in it (``id // K``); it
  keeps its value while the files grow (a live view); and hops keep their ids' order, so
  hops split over files by id come back in their old order. One file: ids unchanged.
  Each hop carries ``file`` (its path) and ``file_hop`` (its id there). The hops are ordered by
  start time across files (the loader's order within one).
- **captures**: the shards of one ``--workers`` capture (one capture uuid in ``captures.source``)
  and copies of one capture row (same start, source, entry, routes) are one capture; a capture
  found in one file only (one host's proxy) joins those of other files whose time it overlaps:
  the files are taken to be the same stack at the same time, so a call from one host's hop to
  another host's is linked as within one capture. Captures of one file are never joined.
- **tokens**: keyed by fingerprint, so a token seen in several files is one token, provided the
  files were recorded with one fingerprint key (shards always are; hosts: the same
  ``--fingerprint-key``). Its sightings (``hop_tokens``) take the new hop ids.

Each file's notes are kept, prefixed by its path (a capture that did not end cleanly is
named per file), after one note naming the files and the captures joined.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pandas as pd

from hoptrace._shards import parse_worker_source
from hoptrace.analyzer._headers import HeaderReader, empty_lines
from hoptrace.analyzer._load import Tables, load

_MAX_ID = np.iinfo(np.int64).max
_COUNTERS = ("hops_seen", "hops_recorded", "hops_dropped", "addon_errors", "write_errors")
# What makes two capture rows (of different files) copies of one capture.
_SAME_CAPTURE = ("started_at", "source", "entry", "routes")


def load_files(paths: Sequence[str | Path], *, checks: ExitStack | None = None, **options) -> Tables:
    """Read every file of ``paths`` (:func:`load`'s ``options`` apply to each) and join them.

    Raises the :class:`~hoptrace._errors.TraceFileError` of the first unusable file, in the
    order given: one line, naming it. ``checks``: one file's structure check is left to that
    stack, as :func:`load` does; several files are each checked before they are joined.
    """
    paths = [Path(p) for p in paths]
    if len(paths) == 1:
        return load(paths[0], checks=checks, **options)
    # Each load runs its own reads in threads; a file at a time per core keeps them from queueing.
    with ThreadPoolExecutor(max_workers=min(len(paths), len(os.sched_getaffinity(0)))) as pool:
        running = [pool.submit(load, path, **options) for path in paths]
        parts = [future.result() for future in running]
    return join(parts, paths)


def join(parts: Sequence[Tables], paths: Sequence[Path]) -> Tables:
    """The tables of several files as one (see the module's docstring)."""
    count = len(parts)
    notes: list[str] = []
    hops, hop_tokens, captures = [], [], []
    names = [str(p) for p in paths]
    for k, (part, path) in enumerate(zip(parts, paths, strict=True)):
        kept, dropped = _in_id_range(part.hops, count)
        if dropped:
            notes.append(f"{path}: {dropped} hops with ids too large to join with {count - 1} other files were ignored")
        file = pd.Categorical.from_codes(np.full(len(kept), k), categories=names)
        kept = kept.assign(file=file, file_hop=kept.index.to_numpy(), capture_id=joined_ids(kept["capture_id"], k, count))
        hops.append(kept.set_axis(pd.Index(joined_ids(kept.index, k, count), name="id")))
        sightings = part.hop_tokens[part.hop_tokens["hop_id"].isin(kept.index)]
        hop_tokens.append(sightings.assign(hop_id=joined_ids(sightings["hop_id"], k, count)))
        captures.append(
            part.captures.assign(file=str(path)).set_axis(pd.Index(joined_ids(part.captures.index, k, count), name="id"))
        )
        notes += [f"{path}: {note}" for note in part.notes]
    captures_joined, capture_of, summary = _join_captures(captures, count)
    hops_all = _concat(hops)
    hops_all["capture_id"] = hops_all["capture_id"].map(capture_of).fillna(-1).astype("int64")
    # By start across files, the longest first on a tie (as the loader orders one file), then by id.
    hops_all = (
        hops_all.assign(_id=hops_all.index.to_numpy())
        .sort_values(["started_at", "ended_at", "_id"], ascending=[True, False, True], kind="stable")
        .drop(columns="_id")
    )
    apart = ""
    if len(captures_joined) > 1:
        apart = (
            f"; {len(captures_joined)} different captures: hops of two are never linked, a token or subject joins their sessions"
        )
    return Tables(
        captures=captures_joined,
        hops=hops_all,
        tokens=_join_tokens([part.tokens for part in parts], capture_of),
        hop_tokens=_concat(hop_tokens).reset_index(drop=True),
        notes=[f"joined {count} trace files into one analysis ({', '.join(map(str, paths))}): {summary}{apart}", *notes],
    )


def joined_ids(ids, k: int, count: int) -> np.ndarray:
    """File ``k``'s hop (or capture) ids in the joined tables."""
    return np.asarray(ids, np.int64) * count + k


def file_of(ids, count: int) -> tuple[np.ndarray, np.ndarray]:
    """``(file index, id in that file)`` of joined ids (floor division: negative ids too)."""
    ids = np.asarray(ids, np.int64)
    return ids % count, ids // count


def by_file(files: Sequence, ids, read: Callable[[object, list[int]], dict]) -> dict:
    """``read(file, ids in that file)`` for each of ``files`` (an analysis's) the joined ``ids`` fall in,
    keyed by joined id; one file: ``read(file, ids)``.

    ``read`` answers ``{id in its file: value}``, as :func:`hoptrace.plot._detail.hop_details` does.
    """
    if len(files) == 1:
        return read(files[0], list(ids))
    k_of, local = file_of(list(ids), len(files))
    out = {}
    for k, path in enumerate(files):
        found = read(path, [int(i) for i in local[k_of == k]])
        out.update(zip(joined_ids(list(found), k, len(files)).tolist(), found.values(), strict=True))
    return out


class JoinedHeaders:
    """:class:`HeaderReader` over several files: each file asked for its own hops."""

    def __init__(self, paths: Sequence[str | Path]) -> None:
        self.readers = [HeaderReader(path) for path in paths]

    def lines(self, hop_ids, side: str, **options) -> pd.DataFrame:
        count = len(self.readers)
        k_of, local = file_of(list(hop_ids), count)
        frames = []
        for k, reader in enumerate(self.readers):
            lines = reader.lines(local[k_of == k], side, **options)
            if len(lines):
                frames.append(lines.assign(hop_id=joined_ids(lines["hop_id"], k, count)))
        return pd.concat(frames, ignore_index=True) if frames else empty_lines()


def _in_id_range(hops: pd.DataFrame, count: int) -> tuple[pd.DataFrame, int]:
    """The hops whose joined id fits in 64 bits (a hostile file's can be any integer)."""
    bound = (_MAX_ID - count) // count
    ids = hops.index.to_numpy()
    fits = (ids >= -bound) & (ids <= bound)
    return (hops, 0) if fits.all() else (hops[fits], int((~fits).sum()))


def _concat(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Frames of one shape; Categorical columns keep a category type (the union of theirs)."""
    frames = [f for f in frames if len(f)] or frames[:1]
    categorical = [c for c in frames[0].columns if isinstance(frames[0][c].dtype, pd.CategoricalDtype)]
    if categorical and len(frames) > 1:
        from pandas.api.types import union_categoricals

        for column in categorical:
            if all(f[column].dtype == frames[0][column].dtype for f in frames):
                continue  # one category list already (the files, in the order given): concat keeps it
            # union_categoricals sorts the categories as the loader does (sort_categories).
            union = union_categoricals([f[column].astype("category") for f in frames], sort_categories=True)
            frames = [f.assign(**{column: f[column].astype(union.dtype)}) for f in frames]
    return pd.concat(frames)


def _join_captures(captures: list[pd.DataFrame], count: int) -> tuple[pd.DataFrame, pd.Series, str]:
    """One row per joined capture; the joined id (the first row's) of each file's capture; what was joined, in words."""
    rows = pd.concat(captures)
    group = _capture_groups(rows)
    first = pd.Series(rows.index.to_numpy(), index=rows.index).groupby(group).transform("first")
    capture_of = pd.Series(first.to_numpy(), index=rows.index)
    joined = rows.groupby(group.to_numpy(), sort=False).agg(
        started_at=("started_at", "min"),
        # NaN (no clean end) in any file stays NaN: the capture as a whole did not end cleanly.
        ended_at=("ended_at", lambda v: v.max() if v.notna().all() else np.nan),
        **{name: (name, "first") for name in rows.columns if name not in ("started_at", "ended_at", *_COUNTERS, "file")},
        **{name: (name, lambda v: pd.to_numeric(v, errors="coerce").sum(min_count=1)) for name in _COUNTERS if name in rows},
        file=("file", lambda v: ", ".join(dict.fromkeys(v))),
    )
    joined.index = pd.Index(capture_of.groupby(group.to_numpy(), sort=False).first().to_numpy(), name=rows.index.name)
    return joined.sort_index(), capture_of, _describe(rows, group, count)


def _texts(column: pd.Series) -> list[str | None]:
    """A column's text values, None for anything else: Series.map would turn the Nones back into NaN
    (pandas 3's text columns), and a NaN source reached the source parser as a float."""
    return [value if isinstance(value, str) else None for value in column.tolist()]


def _capture_groups(rows: pd.DataFrame) -> pd.Series:
    """A group number per capture row: the rows that are one capture (see the module's docstring)."""
    keys = [
        ("uuid", label[1])
        if (label := parse_worker_source(source))
        else ("row", *(str(row[c]) for c in _SAME_CAPTURE if c in row))
        for source, (_, row) in zip(_texts(rows["source"]), rows.iterrows(), strict=True)
    ]
    group = pd.Series(pd.factorize(pd.Series(keys, dtype=object))[0], index=rows.index)
    # A capture row found in one file only joins the like ones of other files whose time it overlaps.
    files_per_group = rows["file"].groupby(group.to_numpy()).nunique()
    alone = group.map(files_per_group).to_numpy() == 1
    span = rows[["started_at", "ended_at", "file"]].assign(group=group.to_numpy())[alone]
    span["ended_at"] = span["ended_at"].fillna(np.inf)  # still recording, or crashed: open-ended
    parent = {int(g): int(g) for g in group}

    def root(g: int) -> int:
        while parent[g] != g:
            g = parent[g]
        return g

    spans = span.to_dict("records")  # captures are few: pairs are cheap
    for i, a in enumerate(spans):
        for b in spans[i + 1 :]:
            if a["file"] != b["file"] and a["started_at"] <= b["ended_at"] and b["started_at"] <= a["ended_at"]:
                parent[root(int(b["group"]))] = root(int(a["group"]))
    return group.map(lambda g: root(int(g)))


def _describe(rows: pd.DataFrame, group: pd.Series, count: int) -> str:
    """The joined captures in words: a --workers capture by its uuid, any other by its files."""
    words = []
    for _, members in rows.groupby(group.to_numpy(), sort=False):
        label = parse_worker_source(members["source"].iloc[0] if isinstance(members["source"].iloc[0], str) else None)
        files = list(dict.fromkeys(members["file"]))
        if label:
            words.append(f"--workers capture {label[1][:12]} ({len(files)} shard{'s' * (len(files) != 1)})")
        elif len(files) > 1:
            words.append(f"one capture in {len(files)} files ({', '.join(Path(f).name for f in files)})")
        else:
            words.append(f"capture {int(members.index[0]) // count} of {Path(files[0]).name}")
    return "; ".join(words) or "no capture rows"


def _join_tokens(tokens: list[pd.DataFrame], capture_of: pd.Series) -> pd.DataFrame:
    """One row per fingerprint: the most complete row (a file lacking the row has a bare 'opaque' one)."""
    count = len(tokens)
    frames = []
    for k, frame in enumerate(tokens):
        frame = frame.copy()
        if "capture_id" in frame:
            local = pd.to_numeric(frame["capture_id"], errors="coerce")
            ok = local.notna() & (local.abs() <= (_MAX_ID - count) // count)
            frame["capture_id"] = (local.where(ok) * count + k).map(capture_of)
        frames.append(frame)
    joined = pd.concat(frames)
    known = joined.notna().sum(axis=1).to_numpy()
    order = np.argsort(-known, kind="stable")
    joined = joined.iloc[order]
    joined = joined[~joined.index.duplicated(keep="first")]
    return joined
