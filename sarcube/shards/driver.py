"""``write_shards``: the run that cuts an index's patches into shards, driven from the client.

It checks the index against the cube, plans the shards (``sarcube.shards.plan``), takes the
destination's lock, submits one task per shard (``sarcube.shards.task``), then — only when all
of them succeeded — removes stale files, writes the index copies and commits the manifest.

Resuming: a re-run plans the same shards and each task keeps or rewrites its shard; the run logs
each shard it rewrote and reports how many.

The index: the patch index with its ``shard`` column filled (file names of the shards) is written
next to the shards as ``index.parquet`` (metadata preserved, plus ``shards_url``), and — when the
index was given as a URL and ``update_index`` is true — written back to that URL as well (the
index documents ``shard`` as "empty until ``sarcube shards``"). Both happen before the manifest.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from .. import defaults
from ..errors import InputError
from ..index import SPLITS, cube_fingerprint, write_index
from ..stac import write_shards_item, write_stac_record
from ..storage import RedactedOptions, is_remote, join_url
from .destination import check_destination, commit_manifest, prepare_destination, remove_stale
from .inputs import check_index, load_index
from .layout import INDEX_COPY, MANIFEST, ShardError
from .manifest import build_manifest
from .plan import ShardPlan, plan_shards
from .task import write_shard

log = logging.getLogger("sarcube.shards")


def _absolute(url: str) -> str:
    """A local path made absolute (``file://`` dropped); a remote URL as it is."""
    return url if is_remote(url) else os.path.abspath(url.removeprefix("file://"))


def _run_shard_tasks(
    client,
    plans: Sequence[ShardPlan],
    cube_url: str,
    storage_options: Mapping[str, Any],
    out_url: str,
    patch: int,
    previous: Mapping[str, str],
    verify: bool,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """Run ``write_shard`` for every plan; returns shard name -> its result.

    Raises the first ShardError a task raised, else one ShardError listing the failed tasks."""
    from ..cluster import run_tasks, task_key

    futures = {
        p.name: client.submit(
            write_shard,
            cube_url,
            storage_options,
            out_url,
            p,
            patch,
            previous.get(p.name),
            bool(verify),
            key=task_key(f"shard-{p.name}"),
            pure=False,
        )
        for p in plans
    }
    results = run_tasks(client, futures, "shards", progress)
    failed = {k: v for k, v in results.items() if isinstance(v, BaseException)}
    if failed:
        first = sorted(failed)[:5]
        lines = [f"  {k}: {type(failed[k]).__name__}: {failed[k]}" for k in first]
        if any(isinstance(v, ShardError) for v in failed.values()):
            raise next(v for v in failed.values() if isinstance(v, ShardError))
        raise ShardError(
            f"{len(failed)} of {len(plans)} shards failed (no manifest written; "
            "re-run to resume):\n" + "\n".join(lines)
        )
    return results


def _write_index_copies(
    df: pd.DataFrame,
    meta: Mapping[str, Any],
    plans: Sequence[ShardPlan],
    out_url: str,
    index_url: str | None,
    update_index: bool,
    storage_options: Mapping[str, Any],
) -> None:
    """Fill the index's ``shard`` column (in place) and write it next to the shards, and back to
    ``index_url`` with ``update_index``."""
    shard_of = {s.key: p.name for p in plans for s in p.samples}
    df["shard"] = [shard_of.get(k, "") for k in df["patch_id"]]
    index_meta = {**meta, "shards_url": out_url}
    write_index(df, join_url(out_url, INDEX_COPY), index_meta, storage_options)
    if update_index and index_url is not None:
        write_index(df, index_url, index_meta, storage_options)


def _summary(results: Mapping[str, Mapping[str, Any]], removed: Sequence[str], out_url: str) -> str:
    """The run's one-line report: shards written, rewritten, kept and removed."""
    written = sorted(k for k, v in results.items() if v["written"])
    rewritten = sorted(k for k, v in results.items() if v.get("damaged"))
    fixed = (
        (
            f" ({len(rewritten)} existing shard(s) damaged or stale, rewritten: "
            f"{', '.join(rewritten[:5])}{' …' if len(rewritten) > 5 else ''})"
        )
        if rewritten
        else ""
    )
    return (
        f"shards: {len(written)} written{fixed}, {len(results) - len(written)} kept"
        + (f", {len(removed)} stale removed" if removed else "")
        + f"; manifest {join_url(out_url, MANIFEST)}"
    )


def _log_rewritten(results: Mapping[str, Mapping[str, Any]]) -> None:
    for k in sorted(k for k, v in results.items() if v.get("damaged")):
        log.warning(
            "shard %s was rewritten from the cube: the existing file was %s",
            k,
            results[k]["damaged"],
        )


def write_shards(
    cube_url: str,
    index_url_or_df,
    out_url: str,
    shard_size_mb: float = defaults.SHARD_SIZE_MB,
    min_shards_per_split: int = defaults.MIN_SHARDS_PER_SPLIT,
    seed: int = defaults.SHARD_SEED,
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
        shard_size_mb: target shard size in MiB (the count rule is in ``sarcube.shards.plan``).
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
    Raises InputError for bad arguments or a malformed index, ShardError when the index does not
    fit the cube, the destination is unwritable or a shard failed, LockHeldError when another
    writer holds ``out_url``.
    """
    from ..cluster import check_cluster_arguments, dask_client
    from ..cube import cube_attrs, cube_grid, open_group
    from ..locking import StoreLock

    storage_options = RedactedOptions(
        storage_options or {}
    )  # Dask logs of a failed task show no secret
    check_cluster_arguments(workers)  # before anything is created at the destination
    splits = tuple(splits)
    if not shard_size_mb or shard_size_mb <= 0:
        raise InputError(f"shard_size_mb must be > 0, got {shard_size_mb}")
    if int(min_shards_per_split) < 1:
        raise InputError(f"min_shards_per_split must be ≥ 1, got {min_shards_per_split}")
    cube_url, out_url = _absolute(str(cube_url)), _absolute(str(out_url).rstrip("/"))

    df, meta, index_url = load_index(index_url_or_df, storage_options)
    meta.pop("shards_url", None)  # set by an earlier run of this function
    root = open_group(cube_url, storage_options)
    patch = cube_grid(root).chunk
    t_index = check_index(df, meta, root, cube_url, index_url or "(DataFrame)", splits)
    fingerprint = cube_fingerprint(cube_attrs(root))
    plans = plan_shards(
        df, t_index, fingerprint, splits, shard_size_mb, min_shards_per_split, seed, patch
    )
    check_destination(out_url, storage_options)
    # One writer per prefix: a second run would delete the first one's shards as stale and
    # commit a manifest naming shards the other removed (sarcube.locking).
    with StoreLock(
        out_url, storage_options, command="sarcube shards", wait=wait, break_stale=break_stale_lock
    ) as lock:
        previous = prepare_destination(out_url, storage_options)
        all_plans = [p for s in splits for p in plans[s]]
        with dask_client(client, scheduler, workers) as client:
            results = _run_shard_tasks(
                client,
                all_plans,
                cube_url,
                storage_options,
                out_url,
                patch,
                previous,
                verify,
                progress,
            )
        _log_rewritten(results)
        removed = remove_stale(out_url, storage_options, plans)
        _write_index_copies(df, meta, all_plans, out_url, index_url, update_index, storage_options)
        manifest = build_manifest(
            out_url=out_url,
            cube_url=cube_url,
            fingerprint=fingerprint,
            index_url=index_url,
            df=df,
            meta=meta,
            seed=seed,
            shard_size_mb=shard_size_mb,
            min_shards_per_split=min_shards_per_split,
            patch=patch,
            storage_options=storage_options,
            plans=plans,
            results=results,
        )
        lock.check()  # never commit a manifest after losing the lock
        commit_manifest(out_url, storage_options, manifest)
        # the STAC Item beside the manifest, rebuilt from it
        write_stac_record(lambda: write_shards_item(out_url, storage_options))
        msg = _summary(results, removed, out_url)
        log.info(msg)
        if progress:
            print(msg, flush=True)
    return manifest
