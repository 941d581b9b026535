"""Per-hop facts every later step uses: the endpoint, validation hops, the token each hop carried."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from hoptrace.analyzer._arrays import run_starts

# A path segment that names one thing rather than a route: numbers, UUIDs, hex ids,
# prefixed ids (cart_abc123, ord_9f2), short ones like p1 (but not a version, v2),
# long base64-ish strings with a digit, and the stand-in the recorder wrote for a secret.
_ID_SEGMENT = re.compile(
    r"(?<=/)(?:"
    r"\d+"
    r"|[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
    r"|(?=[a-fA-F]*\d)[0-9a-fA-F]{8,}"
    r"|[A-Za-z]+_(?=[A-Za-z]*\d)[A-Za-z0-9]+"
    r"|(?![vV]\d+(?:/|$))[A-Za-z]{1,2}\d+"
    r"|(?=[A-Za-z_-]*\d)[A-Za-z0-9_-]{20,}"
    r"|\[redacted(?::[0-9a-f]{12})?\]"  # a secret the recorder replaced (a JWT in the path)
    r")(?=/|$)"
)
# An id this long names one resource (a cart, an order), not "product 1" that many share.
_STRONG_ID_LENGTH = 8
# Which token of a hop is "its" token: what it validates, else its Authorization header.
_ROLE_RANK = {"validated": 0, "presented": 1}


def normalise_path(path: str) -> str:
    """``/cart/cart_abc123/items/42`` -> ``/cart/{id}/items/{id}``."""
    return _ID_SEGMENT.sub("{id}", path)


@dataclass
class Paths:
    """What the analysis needs from the hops' paths, from one pass over the distinct ones."""

    code: np.ndarray  # per hop: its distinct path (-1: none)
    normalised: list[str]  # per distinct path, then "" for "no path"
    id_pos: np.ndarray  # (hop row, id code) for every long id segment of a hop's path
    id_code: np.ndarray

    def templates(self) -> tuple[np.ndarray, pd.Index]:
        """Per hop, a code for its normalised path (``/items/{id}``; "" without a path), and the paths by code."""
        norm_code, norms = pd.factorize(np.array(self.normalised, dtype=object))
        return norm_code[self.code], norms  # code -1 (no path) indexes the last, ""


def paths_of(paths: pd.Series) -> Paths:
    """Normalise each distinct path, and collect the long id segments it names.

    A gateway's GET /cart/cart_7f3a… and the cart call it makes, GET /cart/cart_7f3a…,
    name the same cart: evidence that they belong together even when their tokens differ.
    """
    if isinstance(paths.dtype, pd.CategoricalDtype):  # as loaded: already one code per distinct path
        code, uniques = paths.cat.codes.to_numpy(np.int64), paths.cat.categories
    else:
        code, uniques = pd.factorize(paths)
    normalised, rows, ids = [], [], []
    found: list[str] = []

    def keep(match: re.Match) -> str:  # one regex pass both normalises and collects the ids
        found.append(match[0])
        return "{id}"

    for i, path in enumerate(np.asarray(uniques, dtype=object).tolist()):
        found.clear()
        normalised.append(_ID_SEGMENT.sub(keep, str(path)))
        for segment in found:
            if len(segment) >= _STRONG_ID_LENGTH:
                rows.append(i)
                ids.append(segment)
    normalised.append("")
    id_pos, id_code = np.zeros(0, np.int64), np.zeros(0, np.int64)
    if rows:
        # From distinct paths to the hops that have them.
        per_path = pd.DataFrame({"path": rows, "id": pd.factorize(np.array(ids, dtype=object))[0]})
        joined = pd.DataFrame({"path": code, "pos": np.arange(len(code))}).merge(per_path, on="path")
        id_pos, id_code = joined["pos"].to_numpy(np.int64), joined["id"].to_numpy(np.int64)
    return Paths(code, normalised, id_pos, id_code)


def endpoints(hops: pd.DataFrame, paths: Paths) -> pd.Categorical:
    """``METHOD /normalised/{id}`` per hop."""
    method_code, methods = pd.factorize(hops["method"])
    methods = [*map(str, methods), "?"]  # code -1 (no method) indexes the last
    hop_norm, norms = paths.templates()
    width = len(norms)
    pair, pairs = pd.factorize(method_code.astype(np.int64) % len(methods) * width + hop_norm)
    names = [f"{methods[p // width]} {norms[p % width]}" for p in pairs]
    order = np.argsort(names, kind="stable") if names else np.zeros(0, np.int64)
    rank = np.empty(len(order), np.int64)
    rank[order] = np.arange(len(order))
    return pd.Categorical.from_codes(rank[pair], pd.Index(np.asarray(names, dtype=object)[order], dtype="str"))


def validation_mask(endpoint: pd.Categorical, regex: str) -> np.ndarray:
    """Hops whose (normalised) path matches a validation pattern."""
    pattern = re.compile(regex, re.IGNORECASE)
    hit = np.array([bool(pattern.search(e.partition(" ")[2])) for e in endpoint.categories], dtype=bool)
    return hit[endpoint.codes] if len(hit) else np.zeros(len(endpoint), bool)


def token_uses(hop_tokens: pd.DataFrame, tokens: pd.DataFrame) -> pd.DataFrame:
    """Every token a hop presented or validated (one row each), with its subject and expiry."""
    uses = hop_tokens[hop_tokens["role"].isin(tuple(_ROLE_RANK)).to_numpy()]
    token = token_positions(uses["fingerprint"], tokens)
    # A hop carrying one token in two places (header and cookie) uses it once: keep the best place.
    rank = _rank(uses)
    order = np.lexsort((rank, token, uses["hop_id"].to_numpy()))
    hop, token, rank = uses["hop_id"].to_numpy()[order], token[order], rank[order]
    first = run_starts(hop, token)
    rows = order[first]
    token = token[first]
    # The loader gives every sighted fingerprint a tokens row; hand-made tables may not.
    known, at = token >= 0, np.maximum(token, 0)
    sub_code, subjects = subject_codes(tokens, token)

    exp = tokens["exp"].to_numpy(np.float64, na_value=np.nan)  # one value per token, not per use
    exp = np.where(known, exp[at], np.nan) if len(exp) else np.full(len(token), np.nan)

    # Only what the detectors read, text as codes: every column here is copied again into each
    # use's hop facts (Context.used), and a text column costs ~25-50 MB per copy at a million uses.
    return pd.DataFrame({
        "hop_id": hop[first],
        "fp": _objects(uses["fingerprint"], rows),
        # The role from the rank (0: validated; the uses are validated or presented), as codes: a
        # Categorical of a million role names cost 0.14 s, these 2 ms.
        "role": pd.Categorical.from_codes(
            np.where(rank[first] == 0, _ROLE_RANK["validated"], _ROLE_RANK["presented"]), categories=tuple(_ROLE_RANK)
        ),
        "rank": rank[first],
        # The subject as codes into the capture's subjects (the same as sub_code): no text per use.
        "sub": pd.Categorical.from_codes(sub_code, categories=subjects),
        "sub_code": sub_code,
        "exp": exp,
    })  # fmt: skip


def _objects(column: pd.Series, rows: np.ndarray) -> np.ndarray:
    """``column``'s values at ``rows``, as objects (NaN for none). A Categorical's come from its
    categories by code: converting each row's category costs 0.2 s per million rows."""
    if not isinstance(column.dtype, pd.CategoricalDtype):
        return column.to_numpy(object, na_value=np.nan)[rows]
    categories = np.append(column.cat.categories.to_numpy(object, na_value=np.nan), np.nan)  # code -1: the last
    return categories[column.cat.codes.to_numpy()[rows]]


def token_positions(fingerprints: pd.Series, tokens: pd.DataFrame) -> np.ndarray:
    """Row of each fingerprint in ``tokens`` (-1: none); one lookup per distinct fingerprint."""
    if isinstance(fingerprints.dtype, pd.CategoricalDtype):
        at = tokens.index.get_indexer(fingerprints.cat.categories)
        codes = fingerprints.cat.codes.to_numpy()
        return np.where(codes >= 0, at[np.maximum(codes, 0)] if len(at) else -1, -1)
    return tokens.index.get_indexer(fingerprints)


def subject_codes(tokens: pd.DataFrame, token: np.ndarray) -> tuple[np.ndarray, pd.Index]:
    """The subject of the token row each of ``token`` points at (-1: no row), as a code into the
    capture's subjects (-1: none; equal subjects, equal codes), and those subjects."""
    codes, subjects = pd.factorize(tokens["sub"])
    at = np.where(token >= 0, codes[np.maximum(token, 0)], -1) if len(codes) else np.full(len(token), -1)
    return at, pd.Index(subjects)


def _rank(uses: pd.DataFrame) -> np.ndarray:
    validated = (uses["role"] == "validated").to_numpy()
    authorization = (uses["location"] == "header:authorization").to_numpy()
    return np.where(validated, 0, np.where(authorization, 1, 2))


def primary_tokens(uses: pd.DataFrame) -> pd.DataFrame:
    """One token per hop: the validated one, else the Authorization header's, else any presented."""
    order = np.lexsort((uses["rank"].to_numpy(), uses["hop_id"].to_numpy()))
    hop = uses["hop_id"].to_numpy()[order]
    first = order[run_starts(hop)]
    return uses.iloc[first].set_index("hop_id")[["fp", "sub", "exp"]]
