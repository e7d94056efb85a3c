"""The shard task: writes (or keeps) one planned shard; one Dask task per shard, run in a worker.

Each task opens the cube itself, reads every patch as whole Zarr chunks
(``hh_db[t, r·256:(r+1)·256, c·256:(c+1)·256]`` and the same window of ``lulc``), builds the
whole tar in memory and writes it in one go, so a shard either exists complete or not at all:

- local paths: a temporary file in the destination directory, then ``os.replace`` (atomic);
- object stores: one ``pipe_file`` of the finished bytes: a single PUT below 100 MiB, above it an
  S3 multipart upload, which is just as atomic (the object appears only when the upload is
  completed; s3fs aborts it on error).

Resuming: a task keeps an existing shard only when it parses as a tar whose member names are
exactly the planned ones, in order, whose JSON members equal the planned bytes (same index rows,
same cube fingerprint), whose arrays decode with the right shape and dtype (and labels match the
index histograms), whose bytes hash to the sha256 the previous manifest recorded for it (when the
destination had one: a run that completed before), and whose spot-checked samples (two per
shard, chosen by ``spot_checks`` from the shard's name; all of them with ``verify=True`` /
``sarcube shards --verify``) are byte-equal to a fresh cut from the cube; otherwise it rewrites
the shard from the cube. Without any previous manifest (a first run that crashed) a damaged
payload outside the spot checks is only found with ``verify``. Kept shards are hashed and their
statistics recomputed from their payload, so the manifest equals that of an uninterrupted run.
Memory per task: about twice the shard size.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..index import CODES
from ..storage import join_url, put_bytes, url_to_fs
from .layout import ShardError, members_of, npy_bytes, npy_load, read_bytes, tarinfo
from .plan import SampleSpec, ShardPlan, spot_checks


class ShardStats:
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


def label_hist(lab: np.ndarray) -> tuple[int, ...]:
    """Pixel counts of the JAXA codes 1..14 in a label patch."""
    counts = np.bincount(lab.ravel(), minlength=256)
    return tuple(int(counts[c]) for c in CODES)


def read_patch(
    hh, lulc, t: int, row: int, col: int, patch: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """(float16 dB, uint8 codes) of patch (t, row, col): whole chunks of the Zarr arrays.
    ``lulc`` None skips the labels."""
    ys, xs = slice(row * patch, (row + 1) * patch), slice(col * patch, (col + 1) * patch)
    sar = np.asarray(hh[t, ys, xs]).astype(np.float16)
    return sar, None if lulc is None else np.asarray(lulc[ys, xs], dtype=np.uint8)


def _open_cube_arrays(cube_url: str, storage_options: Mapping[str, Any]):
    """(hh_db, lulc) of the cube, read-only."""

    from ..cube import open_zarr_group

    root = open_zarr_group(cube_url, storage_options)
    return root["hh_db"], root["lulc"]


def _existing_shard(
    data: bytes, plan: ShardPlan, patch: int, keep: Sequence[int] = ()
) -> tuple[ShardStats, dict[int, dict[str, bytes]]] | None:
    """Statistics of an existing shard when it holds exactly the planned samples (and the
    members of the samples numbered ``keep``), else None."""
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
            if [m.name for m in members] != plan.member_names() or not all(
                m.isreg() for m in members
            ):
                return None
            stats = ShardStats()
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
                        or label_hist(lab) != spec.hist
                    ):
                        return None
                stats.add(sar)
                if i in keep:
                    kept[i] = got
            return stats, kept
    except Exception:  # truncated, not a tar, undecodable member: rewrite it
        return None


def _differs_from_cube(
    cube_url: str,
    storage_options: Mapping[str, Any],
    plan: ShardPlan,
    patch: int,
    payloads: Mapping[int, Mapping[str, bytes]],
) -> str | None:
    """The first of ``payloads`` (sample number -> members) whose npy bytes differ from the
    same patch cut from the cube now, as a message; None when all are equal."""
    hh, lulc = _open_cube_arrays(cube_url, storage_options)
    for i in sorted(payloads):
        spec = plan.samples[i]
        sar, lab = read_patch(
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


def _check_existing(
    existing: bytes,
    cube_url: str,
    storage_options: Mapping[str, Any],
    plan: ShardPlan,
    patch: int,
    expected_sha256: str | None,
    verify: bool,
) -> tuple[ShardStats | None, str | None]:
    """(statistics, None) of an existing shard that can be kept, else (None, why it cannot)."""
    sha = hashlib.sha256(existing).hexdigest()
    checks = range(len(plan.samples)) if verify else spot_checks(plan)
    got = _existing_shard(existing, plan, patch, checks)
    if got is None:
        return None, "not the planned samples (unreadable, truncated or of another plan)"
    if expected_sha256 and sha != expected_sha256:
        return None, f"of sha256 {sha[:12]}…, not the previous manifest's {expected_sha256[:12]}…"
    damaged = _differs_from_cube(cube_url, storage_options, plan, patch, got[1])
    return (None, damaged) if damaged else (got[0], None)


def _check_labels(spec: SampleSpec, hist: tuple[int, ...]) -> None:
    """Raises ShardError when the cube's labels of a patch disagree with the index."""
    if hist != spec.hist:
        raise ShardError(
            f"patch {spec.key}: the cube's labels count "
            f"{dict(zip(CODES, hist, strict=True))} "
            "pixels per code but the index says "
            f"{dict(zip(CODES, spec.hist, strict=True))}: "
            "the index was not made from this cube's labels"
        )


def _build_shard(
    cube_url: str, storage_options: Mapping[str, Any], plan: ShardPlan, patch: int
) -> tuple[bytes, ShardStats]:
    """The tar bytes of a shard cut fresh from the cube, and its statistics."""
    hh, lulc = _open_cube_arrays(cube_url, storage_options)
    stats = ShardStats()
    labels: dict[tuple[int, int], np.ndarray] = {}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for spec in plan.samples:
            # one Zarr chunk of hh_db and (once per place) one of lulc
            sar, lab = read_patch(
                hh,
                lulc if (spec.row, spec.col) not in labels else None,
                spec.t_index,
                spec.row,
                spec.col,
                patch,
            )
            if lab is not None:  # read for the first sample at this place
                labels[(spec.row, spec.col)] = lab
            lab = labels[(spec.row, spec.col)]
            _check_labels(spec, label_hist(lab))
            stats.add(sar)
            payload = {"json": spec.json, "sar.npy": npy_bytes(sar)}
            if plan.with_lulc:
                payload["lulc.npy"] = npy_bytes(lab)
            for ext in members_of(plan.split):
                data = payload[ext]
                tar.addfile(tarinfo(f"{spec.key}.{ext}", len(data)), io.BytesIO(data))
    return buf.getvalue(), stats


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
    samples (``spot_checks``; all of them with ``verify``) equal a fresh cut from the cube.

    Raises ShardError when the cube's labels disagree with the index."""
    storage_options = dict(storage_options or {})
    fs, path = url_to_fs(join_url(out_url, plan.name), storage_options)
    existing = read_bytes(fs, path)
    kept, damaged = None, None
    if existing is not None:
        kept, damaged = _check_existing(
            existing, cube_url, storage_options, plan, patch, expected_sha256, verify
        )
    written = existing is None or kept is None
    if existing is None or kept is None:
        data, stats = _build_shard(cube_url, storage_options, plan, patch)
        put_bytes(fs, path, data)
    else:
        data, stats = existing, kept
    return {
        "name": plan.name,
        "split": plan.split,
        "samples": len(plan.samples),
        "bytes": len(data),
        "sha256": hashlib.sha256(data).hexdigest(),
        "sum": stats.sum,
        "sumsq": stats.sumsq,
        "count": stats.count,
        "written": written,
        "damaged": damaged,
    }
