"""Reading shards back: the decoded samples of a split (only those its manifest lists), and a
fresh cut of one patch from the cube to compare them with."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import InputError
from ..index import parse_patch_id
from ..storage import url_to_fs
from .layout import ShardError, npy_load
from .manifest import read_manifest, shard_urls
from .task import read_patch


def _samples_of_tar(fileobj, shard: str) -> Iterator[dict[str, Any]]:
    """The decoded samples of a tar stream, members grouped by key in their order."""

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

    Only shards listed in the manifest are read; ``verify`` checks each shard's size and sha256
    (ShardError when they differ).
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
    """Cut patch ``patch_id`` from the cube again: (sar float16 dB, lulc uint8), as in a shard.

    Raises CubeError when its date is not a complete slice, InputError when it is outside the
    cube's patch grid."""
    from ..cube import CubeError, cube_grid, metadata, open_group

    date, row, col = parse_patch_id(patch_id)
    root = open_group(cube_url, storage_options)
    slices = metadata(root).attrs.get("slices") or {}
    entry = slices.get(date.strftime("%Y-%m-%d"))
    if not entry or entry.get("status") != "complete":
        raise CubeError(
            f"{cube_url}: no complete time slice for {date:%Y-%m-%d} (patch {patch_id})"
        )
    grid = cube_grid(root)
    nr, nc = grid.height // grid.chunk, grid.width // grid.chunk
    if not (0 <= row < nr and 0 <= col < nc):
        raise InputError(f"patch {patch_id} is outside the cube's {nr} × {nc} patch grid")
    sar, lab = read_patch(
        root["hh_db"], root["lulc"], int(entry["time_index"]), row, col, grid.chunk
    )
    assert lab is not None  # the labels were asked for
    return sar, lab
