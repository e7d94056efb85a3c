"""``ingest``: the run, driven from the client, on a Dask cluster (an address, or a
LocalCluster it starts):

1. expand the input URLs; inspect every file in parallel (name, georeferencing, dtype, bands,
   readable pixels, content sha256) — each bad file is one line naming it, the rest go on;
2. create the cube (grid from ``bbox`` or the label tiles' extent) or open the existing one;
3. labels and 4. SAR slices: Dask tasks per block (``sarcube.ingestion.tasks``), written and
   committed as one transaction (``sarcube.ingestion.transaction``).

``strict`` is all-or-nothing: every input is read in full before anything is written, and
nothing is committed on any problem.
"""

from __future__ import annotations

import datetime as dt
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

from ..cluster import check_cluster_arguments, dask_client, run_tasks, task_key
from ..cube import create_cube, metadata
from ..errors import InputError
from ..grid import CubeGrid
from ..sources import LulcSource, SceneSource, SourceError, expand_urls, inspect_lulc, inspect_scene
from ..stac import write_cube_collection, write_stac_record
from ..storage import RedactedOptions
from .report import IngestError, IngestReport, problem_lines
from .target import (
    check_bbox,
    check_cube_destination,
    existing_cube,
    has_content,
    new_grid,
    provenance,
    remove_store,
)
from .tasks import EDGE_NODATA_PCT, bad_input_as_value, intersects
from .transaction import ingest_labels, ingest_slices


def _inspect_inputs(
    client,
    scene_urls: Sequence[str],
    lulc_urls: Sequence[str],
    storage_options: Mapping[str, Any],
    mosaic_date: dt.date | None,
    strict: bool,
    progress: bool,
    report: IngestReport,
) -> tuple[list[SceneSource], list[LulcSource]]:
    """Inspect every input in parallel; returns the good scenes and label tiles, each bad input
    one line in ``report.problems``."""
    futs = {
        ("scene", u): client.submit(
            bad_input_as_value,
            inspect_scene,
            u,
            storage_options,
            mosaic_date,
            strict,
            key=task_key(f"inspect-{i}-{u}"),
            pure=False,
        )
        for i, u in enumerate(scene_urls)
    }
    futs.update(
        {
            ("lulc", u): client.submit(
                bad_input_as_value,
                inspect_lulc,
                u,
                storage_options,
                key=task_key(f"inspect-lulc-{i}-{u}"),
                pure=False,
            )
            for i, u in enumerate(lulc_urls)
        }
    )
    inspected = run_tasks(client, futs, "inspect", progress)
    good_scenes: list[SceneSource] = []
    tiles: list[LulcSource] = []
    for (kind, u), res in sorted(inspected.items()):
        if isinstance(res, SourceError):
            report.problems.append(str(res))
        elif isinstance(res, Exception):
            report.problems.append(f"{u}: {type(res).__name__}: {str(res).splitlines()[0][:200]}")
        elif kind == "scene":
            good_scenes.append(res)
        else:
            tiles.append(res)
    return good_scenes, tiles


def _scenes_by_date(
    scenes: Sequence[SceneSource],
    grid: CubeGrid,
    root,
    tiles: Sequence[LulcSource],
    report: IngestReport,
) -> dict[dt.date, list[SceneSource]]:
    """The scenes that fall on the cube grid and on label coverage, by date; each other scene
    one line in ``report.problems``."""
    labels = metadata(root).attrs.get("labels", {}) if root is not None else {}
    coverage = [t.bounds for t in tiles] or (
        [tuple(labels["coverage"])] if labels.get("coverage") else []
    )
    by_date: dict[dt.date, list[SceneSource]] = defaultdict(list)
    for s in scenes:
        if not intersects(s.bounds_4326, grid.bounds):
            report.problems.append(
                f"{s.url}: outside the cube grid {tuple(round(b, 4) for b in grid.bounds)} "
                f"(scene covers {tuple(round(b, 4) for b in s.bounds_4326)})"
            )
        elif coverage and not any(intersects(s.bounds_4326, c) for c in coverage):
            report.problems.append(
                f"{s.url}: no HR-LULC coverage under the scene "
                f"(labels cover {[tuple(round(b, 3) for b in c) for c in coverage]})"
            )
        else:
            by_date[s.date].append(s)
    return by_date


def _raise_if_strict(strict: bool, report: IngestReport, what: str) -> None:
    if strict and report.problems:
        raise IngestError(problem_lines(f"--strict: input problems ({what})", report.problems))


def _parse_mosaic_date(mosaic_date: dt.date | str | None) -> dt.date | None:
    if isinstance(mosaic_date, str):
        try:
            return dt.date.fromisoformat(mosaic_date)
        except ValueError:
            raise InputError(f"--mosaic-date {mosaic_date!r}: expected YYYY-MM-DD") from None
    return mosaic_date


def ingest(
    scenes: Sequence[str],
    cube: str,
    lulc: Sequence[str] = (),
    bbox: tuple[float, float, float, float] | None = None,
    resolution: str | float | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    strict: bool = False,
    storage_options: Mapping[str, Any] | None = None,
    mosaic_date: dt.date | str | None = None,
    edge_nodata_pct: float = EDGE_NODATA_PCT,
    shard_chunks: int | None = None,
    memory_limit: str | None = None,
    progress: bool = True,
    client=None,
    wait: float = 0.0,
    break_stale_lock: bool = False,
) -> IngestReport:
    """Ingest SAR scenes and HR-LULC tiles into the cube at ``cube`` (created if absent).

    Args:
        scenes: URLs of scenes: files, globs, directories or ``s3://`` prefixes.
        cube: the cube's URL (local path or ``s3://bucket/prefix.zarr``).
        lulc: URLs of HR-LULC tiles (optional; without them the cube has no labels).
        bbox: (W, S, E, N) in degrees for a new cube; default: the label tiles' extent.
        resolution: cube cell size for a new cube, 1/n degree (default 1/6000).
        scheduler: address of a running Dask scheduler; else a LocalCluster of ``workers``.
        strict: all or nothing: every input is checked in full (every pixel decoded) before
            anything is written, and nothing is written (or committed) if any has a problem.
        storage_options: fsspec/s3fs options (endpoint_url, key, secret, ...).
        mosaic_date: acquisition date for yearly mosaic tiles without their JAXA XML.
        edge_nodata_pct: a cube cell is no data when at least this % of its source pixels are.
        wait: seconds to wait for another writer's lock on the cube (0: fail at once).
        break_stale_lock: break the cube's lock if its holder stopped heart-beating.
    Returns an IngestReport; raises IngestError when nothing could be ingested, LockHeldError when
    another run writes the cube.
    """
    from ..locking import StoreLock

    t0 = time.perf_counter()
    storage_options = RedactedOptions(
        storage_options or {}
    )  # Dask logs of a failed task show no secret
    report = IngestReport(cube=str(cube))
    mosaic_date = _parse_mosaic_date(mosaic_date)
    if not (0 <= edge_nodata_pct <= 100):
        raise InputError(f"edge_nodata_pct must be within 0..100, got {edge_nodata_pct}")
    if bbox is not None:
        bbox = check_bbox(bbox)
    check_cluster_arguments(workers, memory_limit)

    scene_urls, problems = expand_urls(scenes, storage_options)
    lulc_urls, lulc_problems = expand_urls(lulc, storage_options) if lulc else ([], [])
    report.problems += problems + lulc_problems
    if not scene_urls and not lulc_urls:
        report.seconds = time.perf_counter() - t0
        raise IngestError(
            "nothing to ingest: " + ("; ".join(report.problems) or "no input URL given")
        )
    check_cube_destination(cube, storage_options)

    with (
        StoreLock(
            cube, storage_options, command="sarcube ingest", wait=wait, break_stale=break_stale_lock
        ) as lock,
        dask_client(client, scheduler, workers, memory_limit) as client,
    ):
        # 1. inspect every input in parallel
        good_scenes, tiles = _inspect_inputs(
            client, scene_urls, lulc_urls, storage_options, mosaic_date, strict, progress, report
        )
        if not good_scenes and not tiles:
            raise IngestError(problem_lines("nothing was ingested", report.problems))
        _raise_if_strict(strict, report, "nothing was written")

        # 2. the cube's grid (the cube itself is created only once everything checked out)
        root, grid = existing_cube(cube, storage_options, bbox, resolution)
        if grid is None and bbox is None and not tiles and report.problems:
            raise IngestError(
                problem_lines(
                    "a new cube needs --bbox, or usable --lulc tiles to define its extent",
                    report.problems,
                )
            )
        if grid is None:
            grid = new_grid(bbox, resolution, shard_chunks, tiles)
        by_date = _scenes_by_date(good_scenes, grid, root, tiles, report)
        _raise_if_strict(strict, report, "nothing was written")

        created = root is None
        if created:
            root = create_cube(cube, grid, storage_options, provenance=provenance(bbox, grid))
        try:
            report.labels = ingest_labels(
                client, root, cube, storage_options, grid, tiles, progress
            )
            # 3. SAR slices: each date built in a fresh slot, all committed in one registry write
            ingest_slices(
                client,
                root,
                cube,
                storage_options,
                grid,
                by_date,
                edge_nodata_pct,
                report,
                progress,
                lock,
                strict,
            )
            # 4. the STAC Collection beside the data, rebuilt from what is now committed
            lock.check()
            write_stac_record(lambda: write_cube_collection(cube, storage_options))
        finally:
            if created and (not has_content(root) or (strict and report.problems)):
                remove_store(cube, storage_options)  # a failed first run leaves nothing behind

    report.seconds = time.perf_counter() - t0
    if not report.ingested and not report.skipped and report.labels in ("none", "failed"):
        raise IngestError(problem_lines("nothing was ingested", report.problems))
    _raise_if_strict(strict, report, "nothing was committed")
    return report
