"""``sarcube shards``: the patch index -> WebDataset tar shards + ``manifest.json``
(docs/design.md).

One Dask task per shard. Each task opens the cube itself, reads every patch as whole Zarr chunks
(``hh_db[t, r·256:(r+1)·256, c·256:(c+1)·256]`` and the same window of ``lulc``), builds the
whole tar in memory and writes it in one go, so a shard either exists complete or not at all:

- local paths: a temporary file in the destination directory, then ``os.replace`` (atomic);
- object stores: one ``pipe_file`` of the finished bytes: a single PUT below 100 MiB, above it an
  S3 multipart upload, which is just as atomic (the object appears only when the upload is
  completed; s3fs aborts it on error).

A sample (``__key__`` = patch id ``YYYYMMDD-rRRRR-cCCCC``)::

    {key}.json       id, time, row, col, bounds (W, S, E, N), crs "EPSG:4326", split,
                     class_histogram {"1": n, ..., "14": n}, nodata_frac, anchors, cube_fingerprint
    {key}.lulc.npy   uint8 (256, 256) JAXA codes, fine-tuning splits (train/val/test) only
    {key}.sar.npy    float16 (256, 256) HH dB (NaN = no data), ``np.load(..., allow_pickle=False)``

Shard layout (per split, named ``{split}-{n:06d}.tar``):

- the split's patches are sorted by id, then permuted by a generator seeded with
  ``(seed, split number)`` and cut into consecutive runs of near-equal length, so every shard
  holds patches from all over the area and all dates of the split (no shard is one small area);
- number of shards = ``min(max(ceil(bytes / shard_size), min_shards_per_split), samples)``,
  with ``bytes`` the exact tar size of the split (headers and padding included). Choose
  ``min_shards_per_split`` ≥ 4 × ranks × loader workers of the largest launch intended, so that
  every loader worker of every rank gets several shards (the default 8 suits 1 rank × 2 workers).

Determinism: the same cube content, index and seed give byte-identical shards, wherever the cube
and the shards live. Members are written in a fixed order within a sample (``json``,
``lulc.npy``, ``sar.npy``: sorted by extension, as WebDataset writes them), in the USTAR format
(no PAX headers) with mtime 0, uid/gid 0, empty uname/gname and mode 0644; npy payloads are
``np.save(..., allow_pickle=False)`` of C-ordered little-endian arrays; the JSON has sorted keys and
no whitespace. The standard ``tarfile`` module is used rather than ``webdataset.TarWriter``: that
writer stamps ``time.time()`` as mtime unless told otherwise, writes uname/gname "bigdata" and
mode 0444, and its default npy encoder saves with pickling allowed; the bytes are also needed in
memory anyway for the sha256 and the single atomic write.

The manifest (``manifest.json``, written LAST: the commit point) lists per split the shards
(name relative to the manifest, samples, bytes, sha256), the split's sample count, its members,
its normalisation statistics (mean / std of the float16 dB payload over its finite pixels,
combined from per-shard float64 sums, sums of squares and counts) and its class pixel
frequencies (14 JAXA codes and the 9-class map, from the index histograms, which every shard task
checks against the cube's labels), plus the seed, shard size, cube URL and fingerprint, the index
metadata (sampling parameters and seed), the sarcube version and the storage options with secrets
redacted. A run starts by deleting any manifest at the destination (after reading the shard
hashes it recorded, see Resuming), so while it runs, and after it fails, nothing there looks
complete. Readers (``iter_samples``, ``shard_urls``, the training loader) trust only the shards a
manifest lists, and only by relative names inside the manifest's folder: an entry that is an
absolute path, contains ``..`` or is a URL is refused (``ShardError`` naming the manifest and the
entry). ``iter_samples(verify=True)`` and the training loader check each shard's size, sha256
and sample count against the manifest.

Resuming: a re-run plans the same shards; a task keeps an existing shard only when it parses as
a tar whose member names are exactly the planned ones, in order, whose JSON members equal the
planned bytes (same index rows, same cube fingerprint), whose arrays decode with the right shape
and dtype (and labels match the index histograms), whose bytes hash to the sha256 the previous
manifest recorded for it (when the destination had one: a run that completed before), and
whose spot-checked samples (two per shard, chosen by ``spot_checks`` from the shard's name; all
of them with ``verify=True`` / ``sarcube shards --verify``) are byte-equal to a fresh cut from
the cube; otherwise it rewrites the shard from the cube, and the run logs each such shard and
reports how many it rewrote. The previous manifest's hashes survive a re-run that is itself
killed (``.sarcube-previous-manifest.json``, removed when the new manifest is written). Without
any previous manifest (a first run that crashed) a damaged payload outside the spot checks is
only found with ``verify``. Kept shards are hashed and their statistics recomputed from their
payload, so the manifest equals that of an uninterrupted run. Files named like shards of the
written splits that are not in the plan (left by an earlier run with other parameters), and
temporary files of killed local writes, are deleted before the manifest is written. Memory per
task: about twice the shard size.

The index: the patch index with its ``shard`` column filled (file names of the shards) is written
next to the shards as ``index.parquet`` (metadata preserved, plus ``shards_url``), and — when the
index was given as a URL and ``update_index`` is true — written back to that URL as well (the
index documents ``shard`` as "empty until ``sarcube shards``"). Both happen before the manifest.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
import re
import tarfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from . import __version__
from .classes import NINE_CLASS_NAMES, nine_class_lut
from .errors import InputError, SarcubeError
from .index import (
    CODES,
    FINETUNE_SPLITS,
    HIST_COLUMNS,
    SPLITS,
    cube_fingerprint,
    parse_patch_id,
    patch_id,
    read_index,
    write_index,
)
from .storage import RedactedOptions, is_local_fs, is_remote, join_url, put_bytes, redact, url_to_fs

log = logging.getLogger("sarcube.shards")

FORMAT = "sarcube-shards/1"
MANIFEST = "manifest.json"
PREVIOUS_MANIFEST = ".sarcube-previous-manifest.json"  # the last one, while a re-run writes
INDEX_COPY = "index.parquet"
CRS = "EPSG:4326"
MIB = 2**20
SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<n>\d{6})\.tar$")
PARTIAL_RE = re.compile(r"^\.(?P<split>[a-z]+)-\d{6}\.tar\..+\.partial$")  # a killed local write
TAR_BLOCK = 512


class ShardError(SarcubeError):
    """Shards could not be written or read (foreign index, unwritable destination, bad shard)."""


def shard_name(split: str, n: int) -> str:
    return f"{split}-{n:06d}.tar"


def members_of(split: str) -> tuple[str, ...]:
    """Member extensions of a sample of ``split``, in their order in the tar."""
    return ("json", "lulc.npy", "sar.npy") if split in FINETUNE_SPLITS else ("json", "sar.npy")


# ---------------------------------------------------------------------------------------------
# Encoding


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def _tarinfo(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def _tar_member_bytes(size: int) -> int:
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def sample_json(row: Mapping[str, Any], split: str, fingerprint: str) -> bytes:
    """The JSON member of one sample (deterministic bytes)."""
    meta = {
        "id": row["patch_id"],
        "time": pd.Timestamp(row["time"]).strftime("%Y-%m-%d"),
        "row": int(row["row"]),
        "col": int(row["col"]),
        "bounds": [
            float(row["lon_min"]),
            float(row["lat_min"]),
            float(row["lon_max"]),
            float(row["lat_max"]),
        ],
        "crs": CRS,
        "split": split,
        "class_histogram": {str(c): int(row[h]) for c, h in zip(CODES, HIST_COLUMNS, strict=True)},
        "nodata_frac": float(row["nodata_frac"]),
        "anchors": int(row["anchors"]),
        "cube_fingerprint": fingerprint,
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class SampleSpec:
    key: str
    t_index: int  # raw index on the cube's time axis (the slice registry's time_index)
    row: int
    col: int
    hist: tuple[int, ...]  # the index's counts of codes 1..14
    json: bytes


@dataclass
class ShardPlan:
    split: str
    name: str
    samples: list[SampleSpec] = field(default_factory=list)

    @property
    def with_lulc(self) -> bool:
        return self.split in FINETUNE_SPLITS

    def member_names(self) -> list[str]:
        return [f"{s.key}.{ext}" for s in self.samples for ext in members_of(self.split)]


def shard_count(total_bytes: int, n_samples: int, shard_size_mb: float, min_shards: int) -> int:
    """max(ceil(bytes / shard size), min_shards), capped at the number of samples (≥ 1)."""
    n = max(math.ceil(total_bytes / (shard_size_mb * MIB)), int(min_shards))
    return max(1, min(n, n_samples))


def plan_shards(
    df: pd.DataFrame,
    t_index: Mapping[str, int],
    fingerprint: str,
    splits: Sequence[str],
    shard_size_mb: float,
    min_shards_per_split: int,
    seed: int,
    patch: int = 256,
) -> dict[str, list[ShardPlan]]:
    """Deterministic assignment of the index rows to shards, per split (see the module doc)."""
    sar_size = len(npy_bytes(np.zeros((patch, patch), np.float16)))
    lulc_size = len(npy_bytes(np.zeros((patch, patch), np.uint8)))
    out: dict[str, list[ShardPlan]] = {}
    for split in splits:
        rows = df[df["split"] == split].sort_values("patch_id", kind="stable")
        specs = []
        for r in rows.to_dict("records"):
            date = pd.Timestamp(r["time"]).strftime("%Y-%m-%d")
            specs.append(
                SampleSpec(
                    key=r["patch_id"],
                    t_index=int(t_index[date]),
                    row=int(r["row"]),
                    col=int(r["col"]),
                    hist=tuple(int(r[h]) for h in HIST_COLUMNS),
                    json=sample_json(r, split, fingerprint),
                )
            )
        per_sample = _tar_member_bytes(sar_size) + (
            _tar_member_bytes(lulc_size) if split in FINETUNE_SPLITS else 0
        )
        total = sum(per_sample + _tar_member_bytes(len(s.json)) for s in specs)
        n = shard_count(total, len(specs), shard_size_mb, min_shards_per_split)
        rng = np.random.default_rng([int(seed), SPLITS.index(split)])
        order = rng.permutation(len(specs))
        out[split] = [
            ShardPlan(split, shard_name(split, k), [specs[i] for i in part])
            for k, part in enumerate(np.array_split(order, n))
        ]
    return out


# ---------------------------------------------------------------------------------------------
# The shard task (runs in a Dask worker)


class _Stats:
    """float64 sum, sum of squares and count of the finite dB values of a shard."""

    def __init__(self) -> None:
        self.sum = 0.0
        self.sumsq = 0.0
        self.count = 0

    def add(self, sar: np.ndarray) -> None:
        v = sar.astype(np.float64)
        v = v[np.isfinite(v)]
        self.sum += float(v.sum())
        self.sumsq += float(np.square(v).sum())
        self.count += int(v.size)


def _label_hist(lab: np.ndarray) -> tuple[int, ...]:
    counts = np.bincount(lab.ravel(), minlength=256)
    return tuple(int(counts[c]) for c in CODES)


def _read_patch(
    hh, lulc, t: int, row: int, col: int, patch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(float16 dB, uint8 codes) of patch (t, row, col): whole chunks of the Zarr arrays.
    ``lulc`` None skips the labels."""
    ys, xs = slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)
    sar = np.asarray(hh[t, ys, xs]).astype(np.float16)
    return sar, None if lulc is None else np.asarray(lulc[ys, xs], dtype=np.uint8)


def _existing_shard(
    data: bytes, plan: ShardPlan, patch: int, keep: Sequence[int] = ()
) -> tuple[_Stats, dict[int, dict[str, bytes]]] | None:
    """Statistics of an existing shard when it holds exactly the planned samples (and the
    members of the samples numbered ``keep``), else None."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            if [m.name for m in members] != plan.member_names() or not all(
                m.isreg() for m in members
            ):
                return None
            stats = _Stats()
            kept: dict[int, dict[str, bytes]] = {}
            it = iter(members)
            for i, spec in enumerate(plan.samples):
                got = {ext: tar.extractfile(next(it)).read() for ext in members_of(plan.split)}  # type: ignore[union-attr]
                if got["json"] != spec.json:
                    return None
                sar = npy_load(got["sar.npy"])
                if sar.dtype != np.float16 or sar.shape != (patch, patch):
                    return None
                if plan.with_lulc:
                    lab = npy_load(got["lulc.npy"])
                    if (
                        lab.dtype != np.uint8
                        or lab.shape != (patch, patch)
                        or _label_hist(lab) != spec.hist
                    ):
                        return None
                stats.add(sar)
                if i in keep:
                    kept[i] = got
            return stats, kept
    except Exception:  # truncated, not a tar, undecodable member: rewrite it
        return None


def spot_checks(plan: ShardPlan, n: int = 2) -> list[int]:
    """Indices of the ``n`` samples of a kept shard compared with a fresh cut from the cube:
    drawn from a generator seeded with the shard's name (the same on every run)."""
    k = len(plan.samples)
    if k <= n:
        return list(range(k))
    rng = np.random.default_rng(list(hashlib.sha256(plan.name.encode()).digest()[:8]))
    return sorted(int(i) for i in rng.choice(k, size=n, replace=False))


def _differs_from_cube(
    cube_url: str,
    so: Mapping[str, Any],
    plan: ShardPlan,
    patch: int,
    payloads: Mapping[int, Mapping[str, bytes]],
) -> str | None:
    """The first of ``payloads`` (sample number -> members) whose npy bytes differ from the
    same patch cut from the cube now, as a message; None when all are equal."""
    import zarr

    from .cube import zarr_store

    root = zarr.open_group(zarr_store(cube_url, so, read_only=True), mode="r", zarr_format=3)
    hh, lulc = root["hh_db"], root["lulc"]
    for i in sorted(payloads):
        spec = plan.samples[i]
        sar, lab = _read_patch(
            hh, lulc if plan.with_lulc else None, spec.t_index, spec.row, spec.col, patch
        )
        fresh = {"sar.npy": npy_bytes(sar)}
        if lab is not None:
            fresh["lulc.npy"] = npy_bytes(lab)
        for ext, b in fresh.items():
            if payloads[i].get(ext) != b:
                return (
                    f"different from the cube (sample {spec.key}: {ext} differs from a fresh cut)"
                )
    return None


def _read_bytes(fs, path: str) -> bytes | None:
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def write_shard(
    cube_url: str,
    storage_options: Mapping[str, Any] | None,
    out_url: str,
    plan: ShardPlan,
    patch: int = 256,
    expected_sha256: str | None = None,
    verify: bool = False,
) -> dict[str, Any]:
    """Write (or keep) one shard; returns its name, samples, bytes, sha256, dB sums, whether it
    was written and, for an existing shard that was rewritten, why (``damaged``).

    An existing shard is kept only when it holds exactly the planned samples, its bytes hash to
    ``expected_sha256`` (the previous manifest's, when there was one) and its spot-checked
    samples (``spot_checks``; all of them with ``verify``) equal a fresh cut from the cube."""
    import zarr

    from .cube import zarr_store

    so = dict(storage_options or {})
    fs, path = url_to_fs(join_url(out_url, plan.name), so)
    existing = _read_bytes(fs, path)
    stats, damaged = None, None
    if existing is not None:
        sha = hashlib.sha256(existing).hexdigest()
        checks = range(len(plan.samples)) if verify else spot_checks(plan)
        got = _existing_shard(existing, plan, patch, checks)
        if got is None:
            damaged = "not the planned samples (unreadable, truncated or of another plan)"
        elif expected_sha256 and sha != expected_sha256:
            damaged = f"of sha256 {sha[:12]}…, not the previous manifest's {expected_sha256[:12]}…"
        else:
            damaged = _differs_from_cube(cube_url, so, plan, patch, got[1])
            stats = None if damaged else got[0]
    written = stats is None
    if written:
        root = zarr.open_group(zarr_store(cube_url, so, read_only=True), mode="r", zarr_format=3)
        hh, lulc = root["hh_db"], root["lulc"]
        stats = _Stats()
        labels: dict[tuple[int, int], np.ndarray] = {}
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for spec in plan.samples:
                # one Zarr chunk of hh_db and (once per place) one of lulc
                sar, lab = _read_patch(
                    hh,
                    lulc if (spec.row, spec.col) not in labels else None,
                    spec.t_index,
                    spec.row,
                    spec.col,
                    patch,
                )
                lab = labels.setdefault((spec.row, spec.col), lab)
                hist = _label_hist(lab)
                if hist != spec.hist:
                    raise ShardError(
                        f"patch {spec.key}: the cube's labels count "
                        f"{dict(zip(CODES, hist, strict=True))} "
                        "pixels per code but the index says "
                        f"{dict(zip(CODES, spec.hist, strict=True))}: "
                        "the index was not made from this cube's labels"
                    )
                stats.add(sar)
                payload = {"json": spec.json, "sar.npy": npy_bytes(sar)}
                if plan.with_lulc:
                    payload["lulc.npy"] = npy_bytes(lab)
                for ext in members_of(plan.split):
                    data = payload[ext]
                    tar.addfile(_tarinfo(f"{spec.key}.{ext}", len(data)), io.BytesIO(data))
        existing = buf.getvalue()
        put_bytes(fs, path, existing)
        sha = hashlib.sha256(existing).hexdigest()
    return {
        "name": plan.name,
        "split": plan.split,
        "samples": len(plan.samples),
        "bytes": len(existing),
        "sha256": sha,
        "sum": stats.sum,
        "sumsq": stats.sumsq,
        "count": stats.count,
        "written": written,
        "damaged": damaged,
    }


# ---------------------------------------------------------------------------------------------
# The driver


def _load_index(
    index_url_or_df, storage_options
) -> tuple[pd.DataFrame, dict[str, Any], str | None]:
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


def _check_index(
    df: pd.DataFrame,
    meta: Mapping[str, Any],
    root,
    cube_url: str,
    index_name: str,
    splits: Sequence[str],
) -> dict[str, int]:
    """Validate the index against the cube; returns date -> raw time index of the dates used."""
    from .cube import cube_grid

    fp = cube_fingerprint(root.attrs)
    fp_index = meta.get("cube_fingerprint")
    if fp_index != fp:
        raise ShardError(
            f"the index {index_name} was made from cube {meta.get('cube_url')!r} (fingerprint "
            f"{fp_index}) but the cube {cube_url} has fingerprint {fp}: sample this cube again "
            "(sarcube sample) before cutting shards from it"
        )
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
    used = df[df["split"].isin(list(splits))]
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
    slices = root.attrs.get("slices") or {}
    complete = {d: int(v["time_index"]) for d, v in slices.items() if v.get("status") == "complete"}
    dates = sorted({pd.Timestamp(t).strftime("%Y-%m-%d") for t in used["time"]})
    absent = [d for d in dates if d not in complete]
    if absent:
        raise ShardError(
            f"index {index_name}: dates {absent} are not complete slices of the cube {cube_url} "
            f"(complete: {sorted(complete)})"
        )
    return {d: complete[d] for d in dates}


def _previous_hashes(data: bytes | None) -> dict[str, str]:
    """Shard name -> sha256 recorded by a previous manifest (empty when there is none usable)."""
    try:
        manifest = json.loads(data) if data else {}
        if manifest.get("format") != FORMAT:
            return {}
        return {
            str(e["name"]): str(e["sha256"])
            for sp in manifest["splits"].values()
            for e in sp["shards"]
            if e.get("sha256")
        }
    except Exception:  # unreadable: nothing to compare with (kept shards are still checked)
        return {}


def _check_destination(out_url: str, so: Mapping[str, Any]) -> None:
    """Create the destination and prove it writable (before taking its lock, which is written
    there too): a file, a missing bucket or no permission is one ShardError naming it."""
    fs, path = url_to_fs(out_url, so)
    where = f"{out_url} (storage options {redact(so)})" if so else out_url
    try:
        if is_local_fs(fs):
            if os.path.exists(path) and not os.path.isdir(path):
                raise NotADirectoryError(f"{path} is a file")
            os.makedirs(path, exist_ok=True)
        probe = join_url(path, ".sarcube-write-probe")
        put_bytes(fs, probe, b"")
        fs.rm_file(probe)
    except Exception as e:
        raise ShardError(f"{where}: cannot write shards there ({type(e).__name__}: {e})") from None


def _prepare_destination(out_url: str, so: Mapping[str, Any]) -> dict[str, str]:
    """Remove any manifest (nothing looks complete while this run writes), returning the shard
    hashes it recorded (``_previous_hashes``). Runs under the prefix's lock.

    The removed manifest is first kept as ``PREVIOUS_MANIFEST`` (never read as a manifest), so
    that a re-run killed before its own manifest does not lose the recorded hashes: the run
    after it still compares kept shards with them. The new manifest's commit removes it."""
    fs, path = url_to_fs(out_url, so)
    manifest = join_url(path, MANIFEST)
    kept = join_url(path, PREVIOUS_MANIFEST)
    fs.invalidate_cache()
    previous = None
    if fs.exists(manifest):
        previous = _read_bytes(fs, manifest)
        put_bytes(fs, kept, previous)  # before the manifest goes: one of the two always exists
        fs.rm_file(manifest)
    elif fs.exists(kept):  # an earlier re-run was killed after removing the manifest
        previous = _read_bytes(fs, kept)
    return _previous_hashes(previous)


def _remove_stale(
    out_url: str, so: Mapping[str, Any], plans: Mapping[str, list[ShardPlan]]
) -> list[str]:
    fs, path = url_to_fs(out_url, so)
    fs.invalidate_cache()
    keep = {p.name for ps in plans.values() for p in ps}
    removed = []
    for entry in fs.ls(path, detail=False):
        name = entry.rstrip("/").rsplit("/", 1)[-1]
        m = SHARD_RE.match(name) or PARTIAL_RE.match(name)
        if m and m["split"] in plans and name not in keep:
            fs.rm_file(entry)
            removed.append(name)
    return sorted(removed)


def _class_frequencies(df: pd.DataFrame) -> dict[str, Any]:
    counts = np.array([int(df[h].sum()) for h in HIST_COLUMNS], dtype=np.int64)
    total = int(counts.sum())
    lut = nine_class_lut()
    nine = np.zeros(len(NINE_CLASS_NAMES), dtype=np.int64)
    for code, n in zip(CODES, counts, strict=True):
        if lut[code] < len(nine):
            nine[lut[code]] += n
    nine_total = int(nine.sum())
    return {
        "source": "index histograms (labelled pixels of the split's patches; no data excluded)",
        "pixels": {str(c): int(n) for c, n in zip(CODES, counts, strict=True)},
        "fraction": {
            str(c): (int(n) / total if total else 0.0) for c, n in zip(CODES, counts, strict=True)
        },
        "nine_class_pixels": {k: int(n) for k, n in zip(NINE_CLASS_NAMES, nine, strict=True)},
        "nine_class_fraction": {
            k: (int(n) / nine_total if nine_total else 0.0)
            for k, n in zip(NINE_CLASS_NAMES, nine, strict=True)
        },
    }


def _db_stats(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    s = ss = 0.0
    n = 0
    for r in results:  # plan order: the same float sum on every run
        s += r["sum"]
        ss += r["sumsq"]
        n += r["count"]
    mean = s / n if n else None  # None (JSON null): no finite pixel at all
    std = math.sqrt(max(ss / n - s / n * (s / n), 0.0)) if n else None
    return {
        "mean": mean,
        "std": std,
        "pixels": n,
        "sum": s,
        "sum_sq": ss,
        "of": "float16 dB payload, finite pixels",
    }


def write_shards(
    cube_url: str,
    index_url_or_df,
    out_url: str,
    shard_size_mb: float = 256,
    min_shards_per_split: int = 8,
    seed: int = 0,
    storage_options: Mapping[str, Any] | None = None,
    client=None,
    workers: int | None = None,
    progress: bool = True,
    splits: Sequence[str] = SPLITS,
    update_index: bool = True,
    scheduler: str | None = None,
    verify: bool = False,
    wait: float = 0.0,
    break_stale_lock: bool = False,
) -> dict[str, Any]:
    """Cut the patches of an index out of the cube into WebDataset shards under ``out_url``.

    Args:
        cube_url: the cube (local path or ``s3://…``) the index was sampled from.
        index_url_or_df: the patch index: a URL, ``(df, meta)`` as from ``read_index``, or a
            DataFrame carrying its metadata in ``df.attrs["sarcube"]``.
        out_url: destination directory (local path or ``s3://bucket/prefix``).
        shard_size_mb: target shard size in MiB (the count rule is in the module doc).
        min_shards_per_split: at least this many shards per split (≥ 4 × ranks × loader workers).
        seed: seeds the assignment of patches to shards.
        storage_options: fsspec/s3fs options for the cube, the index and the destination.
        client / scheduler / workers: a Dask client, or a scheduler address, or else a
            LocalCluster of ``workers`` processes (default 2) started for this call.
        splits: the splits to write; each must have patches in the index.
        update_index: write the index URL back with its ``shard`` column filled.
        verify: compare every sample of a kept shard with a fresh cut from the cube (default:
            two per shard, ``spot_checks``); a shard that differs is rewritten.
        wait / break_stale_lock: wait this many seconds for another writer's lock on
            ``out_url``; break a lock whose holder stopped heart-beating.
    Returns the manifest (also written to ``{out_url}/manifest.json``, last).
    """
    from .cluster import check_cluster_arguments, dask_client, run_tasks, task_key
    from .cube import open_group
    from .locking import StoreLock

    so = RedactedOptions(storage_options or {})  # Dask logs of a failed task show no secret
    check_cluster_arguments(workers)  # before anything is created at the destination
    splits = tuple(splits)
    if not shard_size_mb or shard_size_mb <= 0:
        raise InputError(f"shard_size_mb must be > 0, got {shard_size_mb}")
    if int(min_shards_per_split) < 1:
        raise InputError(f"min_shards_per_split must be ≥ 1, got {min_shards_per_split}")
    cube_url, out_url = str(cube_url), str(out_url).rstrip("/")
    if not is_remote(cube_url):
        cube_url = os.path.abspath(cube_url.removeprefix("file://"))
    if not is_remote(out_url):
        out_url = os.path.abspath(out_url.removeprefix("file://"))

    df, meta, index_url = _load_index(index_url_or_df, so)
    meta.pop("shards_url", None)  # set by an earlier run of this function
    index_name = index_url or "(DataFrame)"
    root = open_group(cube_url, so)
    patch = int(root.attrs["grid"].get("chunk", 256))
    t_index = _check_index(df, meta, root, cube_url, index_name, splits)
    fingerprint = cube_fingerprint(root.attrs)
    plans = plan_shards(
        df, t_index, fingerprint, splits, shard_size_mb, min_shards_per_split, seed, patch
    )
    _check_destination(out_url, so)
    # One writer per prefix: a second run would delete the first one's shards as stale and
    # commit a manifest naming shards the other removed (sarcube.locking).
    with StoreLock(
        out_url, so, command="sarcube shards", wait=wait, break_stale=break_stale_lock
    ) as lock:
        previous = _prepare_destination(out_url, so)

        all_plans = [p for s in splits for p in plans[s]]
        with dask_client(client, scheduler, workers) as client:
            futures = {
                p.name: client.submit(
                    write_shard,
                    cube_url,
                    so,
                    out_url,
                    p,
                    patch,
                    previous.get(p.name),
                    bool(verify),
                    key=task_key(f"shard-{p.name}"),
                    pure=False,
                )
                for p in all_plans
            }
            results = run_tasks(client, futures, "shards", progress)
        failed = {k: v for k, v in results.items() if isinstance(v, BaseException)}
        if failed:
            first = sorted(failed)[:5]
            lines = [f"  {k}: {type(failed[k]).__name__}: {failed[k]}" for k in first]
            if any(isinstance(v, ShardError) for v in failed.values()):
                raise next(v for v in failed.values() if isinstance(v, ShardError))
            raise ShardError(
                f"{len(failed)} of {len(all_plans)} shards failed (no manifest written; "
                "re-run to resume):\n" + "\n".join(lines)
            )
        written = sorted(k for k, v in results.items() if v["written"])
        rewritten = sorted(k for k, v in results.items() if v.get("damaged"))
        for k in rewritten:
            log.warning(
                "shard %s was rewritten from the cube: the existing file was %s",
                k,
                results[k]["damaged"],
            )
        removed = _remove_stale(out_url, so, plans)

        # the index with its shard column, next to the shards (and back at its URL)
        shard_of = {s.key: p.name for p in all_plans for s in p.samples}
        df["shard"] = [shard_of.get(k, "") for k in df["patch_id"]]
        index_meta = {**meta, "shards_url": out_url}
        write_index(df, join_url(out_url, INDEX_COPY), index_meta, so)
        if update_index and index_url is not None:
            write_index(df, index_url, index_meta, so)

        manifest: dict[str, Any] = {
            "format": FORMAT,
            "sarcube_version": __version__,
            "url": out_url,
            "cube": {"url": cube_url, "fingerprint": fingerprint},
            "index": {"url": index_url, "copy": INDEX_COPY, "rows": len(df)},
            "sampling": redact(meta),
            "seed": int(seed),
            "shard_size_mb": shard_size_mb,
            "min_shards_per_split": int(min_shards_per_split),
            "shard_count_rule": (
                "min(max(ceil(split bytes / shard size), min_shards_per_split), samples)"
            ),
            "patch_size": patch,
            "crs": CRS,
            "storage_options": redact(so),
            "splits": {},
        }
        for split in splits:
            res = [results[p.name] for p in plans[split]]
            manifest["splits"][split] = {
                "samples": sum(r["samples"] for r in res),
                "bytes": sum(r["bytes"] for r in res),
                "members": list(members_of(split)),
                "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in res],
                "db_stats": _db_stats(res),
                "classes": _class_frequencies(df[df["split"] == split]),
            }
        lock.check()  # never commit a manifest after losing the lock
        fs, path = url_to_fs(join_url(out_url, MANIFEST), so)
        put_bytes(fs, path, (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode())
        previous_copy = join_url(url_to_fs(out_url, so)[1], PREVIOUS_MANIFEST)
        if fs.exists(previous_copy):
            fs.rm_file(previous_copy)
        fixed = (
            (
                f" ({len(rewritten)} existing shard(s) damaged or stale, rewritten: "
                f"{', '.join(rewritten[:5])}{' …' if len(rewritten) > 5 else ''})"
            )
            if rewritten
            else ""
        )
        msg = (
            f"shards: {len(written)} written{fixed}, {len(all_plans) - len(written)} kept"
            + (f", {len(removed)} stale removed" if removed else "")
            + f"; manifest {join_url(out_url, MANIFEST)}"
        )
        log.info(msg)
        if progress:
            print(msg, flush=True)
    return manifest


# ---------------------------------------------------------------------------------------------
# Readers


def _manifest_url(url: str) -> str:
    url = str(url).rstrip("/")
    return url if url.endswith(".json") else join_url(url, MANIFEST)


def read_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest at ``url`` (its file URL or the shard directory)."""
    murl = _manifest_url(url)
    fs, path = url_to_fs(murl, storage_options)
    data = _read_bytes(fs, path)
    if data is None:
        raise ShardError(
            f"{murl}: no manifest: shards absent or not completely written "
            "(readers trust only shards listed in a manifest)"
        )
    try:
        manifest = json.loads(data)
    except ValueError as e:
        raise ShardError(f"{murl}: not a JSON manifest ({e})") from None
    if manifest.get("format") != FORMAT:
        raise ShardError(
            f"{murl}: not a sarcube shard manifest (format {manifest.get('format')!r})"
        )
    return manifest


def shard_urls(
    manifest_url: str,
    split: str,
    storage_options: Mapping[str, Any] | None = None,
    manifest: Mapping[str, Any] | None = None,
) -> list[str]:
    """URLs of the shards of ``split`` listed in the manifest (names resolved next to it)."""
    manifest = manifest or read_manifest(manifest_url, storage_options)
    if split not in manifest["splits"]:
        raise ShardError(
            f"split {split!r} is not in the manifest (splits: {sorted(manifest['splits'])})"
        )
    murl = _manifest_url(manifest_url)
    base = murl.rsplit("/", 1)[0]
    out = []
    for s in manifest["splits"][split]["shards"]:
        name = s.get("name") if isinstance(s, Mapping) else None
        if not _inside(name):
            raise ShardError(
                f"{murl}: split {split!r} lists the shard {name!r}, which is not a "
                "file inside the manifest's folder (absolute paths, '..' and URLs "
                "are refused)"
            )
        out.append(join_url(base, name))
    return out


_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def _inside(name: Any) -> bool:
    """True for a relative shard name that stays inside the manifest's folder."""
    if not isinstance(name, str) or not name or "\\" in name or _SCHEME_RE.match(name):
        return False
    return not name.startswith("/") and all(p not in ("", ".", "..") for p in name.split("/"))


def _samples_of_tar(fileobj, shard: str) -> Iterator[dict[str, Any]]:
    def finish(key: str, parts: dict[str, bytes]) -> dict[str, Any]:
        return {
            "key": key,
            "sar": npy_load(parts["sar.npy"]),
            "lulc": npy_load(parts["lulc.npy"]) if "lulc.npy" in parts else None,
            "meta": json.loads(parts["json"]),
            "shard": shard,
        }

    key, parts = None, {}
    with tarfile.open(fileobj=fileobj, mode="r|") as tar:
        for m in tar:
            if not m.isreg():
                continue
            k, ext = m.name.rsplit("/", 1)[-1].split(".", 1)
            if k != key and key is not None:
                yield finish(key, parts)
                parts = {}
            key = k
            parts[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    if key is not None:
        yield finish(key, parts)


def iter_samples(
    manifest_url: str,
    split: str,
    storage_options: Mapping[str, Any] | None = None,
    verify: bool = False,
) -> Iterator[dict[str, Any]]:
    """Decoded samples of a split, shard by shard in manifest order:
    ``{key, sar (float16), lulc (uint8 or None), meta (dict), shard}``.

    Only shards listed in the manifest are read; ``verify`` checks each shard's size and sha256.
    """
    manifest = read_manifest(manifest_url, storage_options)
    entries = manifest["splits"].get(split, {}).get("shards", [])
    for url, entry in zip(
        shard_urls(manifest_url, split, storage_options, manifest), entries, strict=True
    ):
        fs, path = url_to_fs(url, storage_options)
        if verify:
            data = fs.cat_file(path)
            if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
                raise ShardError(f"{url}: content differs from the manifest (size or sha256)")
            yield from _samples_of_tar(io.BytesIO(data), entry["name"])
        else:
            with fs.open(path, "rb") as f:
                yield from _samples_of_tar(f, entry["name"])


def recut_patch(
    cube_url: str,
    patch_id: str,
    storage_options: Mapping[str, Any] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut patch ``patch_id`` from the cube again: (sar float16 dB, lulc uint8), as in a shard."""
    from .cube import CubeError, cube_grid, open_group

    date, row, col = parse_patch_id(patch_id)
    root = open_group(cube_url, storage_options)
    slices = root.attrs.get("slices") or {}
    entry = slices.get(date.strftime("%Y-%m-%d"))
    if not entry or entry.get("status") != "complete":
        raise CubeError(
            f"{cube_url}: no complete time slice for {date:%Y-%m-%d} (patch {patch_id})"
        )
    grid = cube_grid(root)
    nr, nc = grid.height // grid.chunk, grid.width // grid.chunk
    if not (0 <= row < nr and 0 <= col < nc):
        raise InputError(f"patch {patch_id} is outside the cube's {nr} × {nc} patch grid")
    return _read_patch(root["hh_db"], root["lulc"], int(entry["time_index"]), row, col, grid.chunk)
