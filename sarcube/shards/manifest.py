"""``manifest.json``: what a shard run wrote, built by the driver and read by every reader.

The manifest (``manifest.json``, written LAST: the commit point) lists per split the shards
(name relative to the manifest, samples, bytes, sha256), the split's sample count, its members,
its normalisation statistics (mean / std of the float16 dB payload over its finite pixels,
combined from per-shard float64 sums, sums of squares and counts) and its class pixel
frequencies (14 JAXA codes and the 9-class map, from the index histograms, which every shard task
checks against the cube's labels), plus the seed, shard size, cube URL and fingerprint, the index
metadata (sampling parameters and seed), the sarcube version and the storage options with secrets
redacted.

Readers (``iter_samples``, ``shard_urls``, the training loader) trust only the shards a manifest
lists, and only by relative names inside the manifest's folder: an entry that is an absolute
path, contains ``..`` or is a URL is refused (``ShardError`` naming the manifest and the entry).
``iter_samples(verify=True)`` and the training loader check each shard's size, sha256 and sample
count against the manifest.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from .. import __version__
from ..classes import NINE_CLASS_NAMES, nine_class_lut
from ..index import CODES, HIST_COLUMNS
from ..storage import join_url, redact, url_to_fs
from .layout import (
    CRS,
    FORMAT,
    INDEX_COPY,
    MANIFEST,
    SAMPLE_SCHEMA,
    ShardError,
    members_of,
    read_bytes,
)
from .plan import ShardPlan

# ---------------------------------------------------------------------------------------------
# Building


def class_frequencies(df: pd.DataFrame) -> dict[str, Any]:
    """Pixel counts and fractions per JAXA code and per 9-class name, from the index rows."""
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


def db_stats(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean and std of a split's finite dB pixels, combined from its shards' sums."""
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


def build_manifest(
    *,
    out_url: str,
    cube_url: str,
    fingerprint: str,
    index_url: str | None,
    df: pd.DataFrame,
    meta: Mapping[str, Any],
    seed: int,
    shard_size_mb: float,
    min_shards_per_split: int,
    patch: int,
    storage_options: Mapping[str, Any],
    plans: Mapping[str, list[ShardPlan]],
    results: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """The manifest of a run: its parameters, and per split its shards (``results``: shard name
    -> what ``write_shard`` returned), statistics and class frequencies."""
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
        "sample_schema": SAMPLE_SCHEMA,
        "crs": CRS,
        "storage_options": redact(storage_options),
        "splits": {},
    }
    for split, split_plans in plans.items():
        res = [results[p.name] for p in split_plans]
        manifest["splits"][split] = {
            "samples": sum(r["samples"] for r in res),
            "bytes": sum(r["bytes"] for r in res),
            "members": list(members_of(split)),
            "shards": [{k: r[k] for k in ("name", "samples", "bytes", "sha256")} for r in res],
            "db_stats": db_stats(res),
            "classes": class_frequencies(df[df["split"] == split]),
        }
    return manifest


def manifest_bytes(manifest: Mapping[str, Any]) -> bytes:
    """The bytes of ``manifest.json``."""
    return (json.dumps(manifest, indent=1, sort_keys=True) + "\n").encode()


def recorded_hashes(data: bytes | None) -> dict[str, str]:
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


# ---------------------------------------------------------------------------------------------
# Reading


def manifest_file_url(url: str) -> str:
    """The manifest file's URL, given it or the shard directory."""
    url = str(url).rstrip("/")
    return url if url.endswith(".json") else join_url(url, MANIFEST)


def read_manifest(url: str, storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The manifest at ``url`` (its file URL or the shard directory).

    Raises ShardError when there is none, or it is not a sarcube shard manifest."""
    murl = manifest_file_url(url)
    fs, path = url_to_fs(murl, storage_options)
    data = read_bytes(fs, path)
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
    """URLs of the shards of ``split`` listed in the manifest (names resolved next to it).

    Raises ShardError for a split not in the manifest, or an entry outside its folder."""
    manifest = manifest or read_manifest(manifest_url, storage_options)
    if split not in manifest["splits"]:
        raise ShardError(
            f"split {split!r} is not in the manifest (splits: {sorted(manifest['splits'])})"
        )
    murl = manifest_file_url(manifest_url)
    base = murl.rsplit("/", 1)[0]
    out = []
    for s in manifest["splits"][split]["shards"]:
        name: str | None = s.get("name") if isinstance(s, Mapping) else None
        if name is None or not _inside(name):
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
