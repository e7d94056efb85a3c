"""The inputs of a shard run: the patch index, loaded from its forms and checked against the cube
it is cut from (fingerprint, columns, splits, patch ids, grid, complete dates)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..cube import cube_attrs, metadata
from ..errors import InputError
from ..index import HIST_COLUMNS, SPLITS, cube_fingerprint, patch_id, read_index
from .layout import ShardError


def load_index(index_url_or_df, storage_options) -> tuple[pd.DataFrame, dict[str, Any], str | None]:
    """(rows, metadata, URL or None) of an index given as a URL, ``(df, meta)`` or a DataFrame
    carrying its metadata in ``df.attrs["sarcube"]``; InputError for anything else."""
    if isinstance(index_url_or_df, str | os.PathLike):
        df, meta = read_index(str(index_url_or_df), storage_options)
        return df, meta, str(index_url_or_df)
    if isinstance(index_url_or_df, tuple) and len(index_url_or_df) == 2:
        df, meta = index_url_or_df
        return df.copy(), dict(meta), None
    if isinstance(index_url_or_df, pd.DataFrame):
        meta = index_url_or_df.attrs.get("sarcube")
        if not isinstance(meta, Mapping):
            raise InputError(
                "a DataFrame index needs its metadata for the cube check: pass (df, meta) as "
                "returned by sarcube.index.read_index, or an index URL"
            )
        return index_url_or_df.copy(), dict(meta), None
    raise InputError(
        f"index: expected a URL, a DataFrame or (df, meta), got {type(index_url_or_df).__name__}"
    )


def check_index(
    df: pd.DataFrame,
    meta: Mapping[str, Any],
    root,
    cube_url: str,
    index_name: str,
    splits: Sequence[str],
) -> dict[str, int]:
    """Validate the index against the cube; returns date -> raw time index of the dates used.

    Raises ShardError for an index of another cube, an empty index or split, or dates that are
    not complete slices; InputError for a malformed index."""
    fp = cube_fingerprint(cube_attrs(root))
    fp_index = meta.get("cube_fingerprint")
    if fp_index != fp:
        raise ShardError(
            f"the index {index_name} was made from cube {meta.get('cube_url')!r} (fingerprint "
            f"{fp_index}) but the cube {cube_url} has fingerprint {fp}: sample this cube again "
            "(sarcube sample) before cutting shards from it"
        )
    _check_rows(df, index_name, splits)
    used = df[df["split"].isin(list(splits))]
    _check_patches(used, root, index_name)
    return _complete_dates(used, root, cube_url, index_name)


def _check_rows(df: pd.DataFrame, index_name: str, splits: Sequence[str]) -> None:
    """Columns, split values and patch id uniqueness of the index."""
    missing = [c for c in ("patch_id", "time", "row", "col", "split", *HIST_COLUMNS) if c not in df]
    if missing:
        raise InputError(f"index {index_name}: missing columns {missing}")
    if df.empty:
        raise ShardError(f"index {index_name} has no rows: nothing to shard")
    unknown = sorted(set(df["split"]) - set(SPLITS))
    if unknown:
        raise InputError(f"index {index_name}: unknown split values {unknown} (expected {SPLITS})")
    bad = [s for s in splits if s not in SPLITS]
    if bad:
        raise InputError(f"splits {bad}: expected some of {SPLITS}")
    counts = df["split"].value_counts()
    empty = [s for s in splits if counts.get(s, 0) == 0]
    if empty:
        raise ShardError(
            f"index {index_name}: no patches in split(s) {empty} (rows per split: "
            f"{ {s: int(counts.get(s, 0)) for s in SPLITS} }); "
            "pass splits=... to shard only the others"
        )
    dup = df["patch_id"][df["patch_id"].duplicated()].unique()
    if len(dup):
        raise InputError(f"index {index_name}: duplicate patch ids, e.g. {list(dup[:3])}")


def _check_patches(used: pd.DataFrame, root, index_name: str) -> None:
    """The used rows' patch ids match their time/row/col, inside the cube's grid and bounds."""
    from ..cube import cube_grid

    ids = [
        patch_id(t, r, c) for t, r, c in zip(used["time"], used["row"], used["col"], strict=True)
    ]
    wrong = [(a, b) for a, b in zip(used["patch_id"], ids, strict=True) if a != b]
    if wrong:
        raise InputError(
            f"index {index_name}: patch_id disagrees with time/row/col, "
            f"e.g. {wrong[0][0]!r} vs {wrong[0][1]!r}"
        )
    grid = cube_grid(root)
    nr, nc = grid.height // grid.chunk, grid.width // grid.chunk
    out = used[(used["row"] < 0) | (used["row"] >= nr) | (used["col"] < 0) | (used["col"] >= nc)]
    if len(out):
        raise InputError(
            f"index {index_name}: patch {out['patch_id'].iloc[0]} "
            f"is outside the cube's {nr} × {nc} patch grid"
        )
    if {"lon_min", "lat_min", "lon_max", "lat_max"} <= set(used.columns):
        c = grid.chunk
        for r in used.head(1000).to_dict("records"):  # enough rows to catch a wrong grid
            expect = grid.window_bounds(
                r["row"] * c, (r["row"] + 1) * c, r["col"] * c, (r["col"] + 1) * c
            )
            got = (r["lon_min"], r["lat_min"], r["lon_max"], r["lat_max"])
            if not np.allclose(got, expect, rtol=0, atol=1e-9):
                raise InputError(
                    f"index {index_name}: patch {r['patch_id']} has bounds {got}, "
                    f"the cube grid puts it at {expect}"
                )


def _complete_dates(used: pd.DataFrame, root, cube_url: str, index_name: str) -> dict[str, int]:
    """Date -> raw time index of the used dates, each a complete slice of the cube."""
    slices = metadata(root).attrs.get("slices") or {}
    complete = {d: int(v["time_index"]) for d, v in slices.items() if v.get("status") == "complete"}
    dates = sorted({pd.Timestamp(t).strftime("%Y-%m-%d") for t in used["time"]})
    absent = [d for d in dates if d not in complete]
    if absent:
        raise ShardError(
            f"index {index_name}: dates {absent} are not complete slices of the cube {cube_url} "
            f"(complete: {sorted(complete)})"
        )
    return {d: complete[d] for d in dates}
