"""The shard destination's state across a run: writable, nothing looks complete while it runs,
the previous manifest's hashes kept until the new manifest commits.

A run starts by deleting any manifest at the destination (after reading the shard hashes it
recorded), so while it runs, and after it fails, nothing there looks complete. The previous
manifest's hashes survive a re-run that is itself killed (``.sarcube-previous-manifest.json``,
removed when the new manifest is written). Files named like shards of the written splits that
are not in the plan (left by an earlier run with other parameters), and temporary files of killed
local writes, are deleted before the manifest is written.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..storage import is_local_fs, join_url, put_bytes, redact, url_to_fs
from .layout import MANIFEST, PARTIAL_RE, PREVIOUS_MANIFEST, SHARD_RE, ShardError, read_bytes
from .manifest import manifest_bytes, recorded_hashes
from .plan import ShardPlan


def check_destination(out_url: str, storage_options: Mapping[str, Any]) -> None:
    """Create the destination and prove it writable (before taking its lock, which is written
    there too): a file, a missing bucket or no permission is one ShardError naming it."""
    fs, path = url_to_fs(out_url, storage_options)
    where = f"{out_url} (storage options {redact(storage_options)})" if storage_options else out_url
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


def prepare_destination(out_url: str, storage_options: Mapping[str, Any]) -> dict[str, str]:
    """Remove any manifest (nothing looks complete while this run writes), returning the shard
    hashes it recorded (``recorded_hashes``). Runs under the prefix's lock.

    The removed manifest is first kept as ``PREVIOUS_MANIFEST`` (never read as a manifest), so
    that a re-run killed before its own manifest does not lose the recorded hashes: the run
    after it still compares kept shards with them. The new manifest's commit removes it."""
    fs, path = url_to_fs(out_url, storage_options)
    manifest = join_url(path, MANIFEST)
    kept = join_url(path, PREVIOUS_MANIFEST)
    fs.invalidate_cache()
    previous = None
    if fs.exists(manifest):
        previous = read_bytes(fs, manifest) or b""
        put_bytes(fs, kept, previous)  # before the manifest goes: one of the two always exists
        fs.rm_file(manifest)
    elif fs.exists(kept):  # an earlier re-run was killed after removing the manifest
        previous = read_bytes(fs, kept)
    item = join_url(path, "item.json")  # the STAC record (sarcube.stac) goes with the manifest
    if fs.exists(item):
        fs.rm_file(item)
    return recorded_hashes(previous)


def remove_stale(
    out_url: str, storage_options: Mapping[str, Any], plans: Mapping[str, list[ShardPlan]]
) -> list[str]:
    """Delete shard-named files of the planned splits that are not in the plan, and temporary
    files of killed local writes; returns their names, sorted."""
    fs, path = url_to_fs(out_url, storage_options)
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


def commit_manifest(
    out_url: str, storage_options: Mapping[str, Any], manifest: Mapping[str, Any]
) -> None:
    """Write ``manifest.json`` (the commit point), then drop the previous manifest's copy."""
    fs, path = url_to_fs(join_url(out_url, MANIFEST), storage_options)
    put_bytes(fs, path, manifest_bytes(manifest))
    previous_copy = join_url(url_to_fs(out_url, storage_options)[1], PREVIOUS_MANIFEST)
    if fs.exists(previous_copy):
        fs.rm_file(previous_copy)
