"""``sarcube ingest``: ALOS-2 scenes + HR-LULC tiles -> the calibrated Zarr v3 datacube.

The job, on a Dask cluster (an address, or a LocalCluster it starts):

1. expand the input URLs; inspect every file in parallel (name, georeferencing, dtype, bands,
   readable pixels, content sha256) — each bad file is one line naming it, the rest go on;
2. create the cube (grid from ``bbox`` or the label tiles' extent) or open the existing one;
3. labels: one task per shard merges the HR-LULC tiles and aligns them to the cube grid (GDAL
   ``mode`` when downsampling, ``nearest`` otherwise, which copies exactly on coinciding grids);
4. SAR: one task per (date, shard). For each scene of that date it reads only the source window
   behind the shard, calibrates DN to linear power DN²·10^(CF/10) (no data -> NaN), and resamples
   it in ONE step to the cube grid by GDAL's area-weighted ``average`` (no data excluded); scenes of
   one date are averaged in linear power; dB is taken once, at the end. A cube cell at a footprint
   edge is no data when at least ``edge_nodata_pct`` % (default 50) of the source pixels under it
   are no data (GDAL's NODATA_VALUES_PCT_THRESHOLD); otherwise — a strict majority valid — it holds
   the mean of the valid ones. So no-data never bleeds in, and half-covered cells are dropped.
   Memory per task is bounded by one shard and one 512-row strip of source pixels, whatever the
   scene size.

Transactional, resumable and idempotent (``sarcube.registry``): under the cube's lock
(``sarcube.locking``), every new or changed date is built in a fresh time slot registered as an
attempt, and one registry write commits all of the run's dates at once; a failure leaves the
previous complete slices exactly as they were. A re-run skips dates whose scenes (product ids and
sha256) are unchanged, so a killed run re-runs to the same cube. ``strict`` is all-or-nothing:
every input is read in full before anything is written, and nothing is committed on any problem.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from affine import Affine

from .cluster import check_cluster_arguments, dask_client, run_tasks, task_key
from .cube import (
    CubeError,
    create_cube,
    cube_grid,
    date_to_days,
    open_group,
    write_region,
)
from .errors import InputError, SarcubeError
from .grid import DEFAULT_CELLS_PER_DEGREE, CubeGrid, parse_resolution
from .registry import SliceRegistry, clear_slots, time_layers
from .sources import LulcSource, SceneSource, SourceError, expand_urls, inspect_lulc, inspect_scene
from .storage import RedactedOptions, gdal_path, is_local_fs, rasterio_env, url_to_fs

log = logging.getLogger("sarcube.ingestion")

STRIP_ROWS = 512  # cube rows resampled at a time inside a shard task
EDGE_NODATA_PCT = 50.0
SOURCE_MARGIN_PX = 2


class IngestError(SarcubeError):
    """The ingest could not run (no usable input, unusable cube)."""


@dataclass
class IngestReport:
    cube: str
    ingested: list[str] = field(default_factory=list)  # product ids written in this run
    skipped: list[str] = field(default_factory=list)  # already in the cube, unchanged
    problems: list[str] = field(default_factory=list)  # one line per bad input
    slices: dict[str, str] = field(default_factory=dict)  # date -> status after this run
    labels: str = "none"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [
            f"ingest summary for {self.cube}:",
            f"  scenes ingested: {len(self.ingested)}, "
            f"skipped (already in the cube): {len(self.skipped)}, "
            f"problems: {len(self.problems)}",
            f"  labels: {self.labels}",
            "  slices: "
            + (", ".join(f"{d} {s}" for d, s in sorted(self.slices.items())) or "none"),
        ]
        lines += [f"  problem: {p}" for p in self.problems]
        lines.append(f"  time: {self.seconds:.1f} s")
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Tasks (run in Dask workers)


def local_frame(src: Affine, dst: Affine, cells_per_degree: int) -> tuple[Affine, Affine]:
    """Re-express two north-up EPSG:4326 transforms in cube-cell units with ``dst`` at (0, 0).

    In degrees, grid edges such as 140.5 − 2/12000 are not exact in binary, so GDAL sees a
    neighbouring source pixel overlap a cell by ~1e-12 of its width: ``mode`` then counts it and
    the no-data threshold tips on cells exactly half covered. In cube-cell units the nested
    grids' edges are small exact binary fractions (0.5, 2.0 …); values within 1e-9 are snapped.
    """
    n = cells_per_degree
    o = 1024.0  # GDAL takes a geotransform with origin (0, 0) and unit pixels for "none"

    def snap(v: float) -> float:
        return round(v * 1e9) / 1e9

    local_src = Affine(
        snap(src.a * n),
        0.0,
        o + snap((src.c - dst.c) * n),
        0.0,
        snap(src.e * n),
        o + snap((src.f - dst.f) * n),
    )
    return local_src, Affine(snap(dst.a * n), 0.0, o, 0.0, snap(dst.e * n), o)


def _intersects(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def resample_scene_power(
    scene: SceneSource,
    grid: CubeGrid,
    block: tuple[int, int, int, int],
    storage_options: Mapping[str, Any] | None = None,
    edge_nodata_pct: float = EDGE_NODATA_PCT,
) -> np.ndarray:
    """Linear power of one scene on the cube cells ``block`` = (row0, row1, col0, col1).

    (row1 − row0, col1 − col0) float32, NaN where the scene has no valid data. One resampling
    step from native pixels: GDAL ``average`` of DN²·10^(CF/10), no data excluded.
    """
    import rasterio
    from rasterio.crs import CRS
    from rasterio.warp import Resampling, reproject, transform_bounds
    from rasterio.windows import Window, from_bounds

    r0, r1, c0, c1 = block
    out = np.full((r1 - r0, c1 - c0), np.nan, dtype=np.float32)
    if not _intersects(scene.bounds_4326, grid.window_bounds(r0, r1, c0, c1)):
        return out
    scale = np.float32(10.0 ** (scene.cf_db / 10.0))
    src_crs = CRS.from_wkt(scene.crs_wkt)
    geographic = src_crs.to_epsg() == 4326 and scene.transform[1] == 0 and scene.transform[3] == 0
    with rasterio_env(storage_options), rasterio.open(gdal_path(scene.url)) as ds:
        full = Window(0, 0, ds.width, ds.height)
        for s0 in range(r0, r1, STRIP_ROWS):
            s1 = min(s0 + STRIP_ROWS, r1)
            bounds = grid.window_bounds(s0, s1, c0, c1)
            if not _intersects(scene.bounds_4326, bounds):
                continue
            src_bounds = transform_bounds("EPSG:4326", src_crs, *bounds, densify_pts=21)
            win = from_bounds(*src_bounds, transform=ds.transform)
            col_off = math.floor(win.col_off) - SOURCE_MARGIN_PX
            row_off = math.floor(win.row_off) - SOURCE_MARGIN_PX
            win = Window(
                col_off,
                row_off,
                math.ceil(win.col_off + win.width) + SOURCE_MARGIN_PX - col_off,
                math.ceil(win.row_off + win.height) + SOURCE_MARGIN_PX - row_off,
            )
            try:
                win = win.intersection(full)
            except rasterio.errors.WindowError:
                continue
            dn = ds.read(1, window=win)
            power = np.square(dn.astype(np.float32)) * scale
            power[dn == scene.nodata] = np.nan
            strip = out[s0 - r0 : s1 - r0]
            src_t, dst_t = ds.window_transform(win), grid.window_transform(s0, c0)
            if geographic:  # same CRS as the cube: warp in exact cube-cell units
                src_t, dst_t = local_frame(src_t, dst_t, grid.cells_per_degree)
            reproject(
                power,
                strip,
                src_transform=src_t,
                src_crs=src_crs,
                dst_transform=dst_t,
                dst_crs=src_crs if geographic else "EPSG:4326",
                resampling=Resampling.average,
                src_nodata=np.nan,
                dst_nodata=np.nan,
                NODATA_VALUES_PCT_THRESHOLD=edge_nodata_pct,
            )
    return out


def ingest_sar_block(
    cube_url: str,
    storage_options: Mapping[str, Any] | None,
    grid: CubeGrid,
    time_index: int,
    block: tuple[int, int, int, int],
    scenes: Sequence[SceneSource],
    edge_nodata_pct: float = EDGE_NODATA_PCT,
) -> dict[str, int]:
    """Mosaic the scenes of one date over one shard and write hh_db[time_index, block].

    Returns the number of valid cube cells each scene contributed.
    """
    import zarr

    from .cube import zarr_store

    r0, r1, c0, c1 = block
    total = np.zeros((r1 - r0, c1 - c0), dtype=np.float64)
    count = np.zeros((r1 - r0, c1 - c0), dtype=np.int32)
    contributed = {}
    for scene in scenes:
        try:
            p = resample_scene_power(scene, grid, block, storage_options, edge_nodata_pct)
        except Exception as e:  # e.g. a damaged tile that the inspection did not read
            raise SourceError(
                f"{scene.url}: pixel data cannot be read (corrupt file?): "
                f"{str(e).splitlines()[0][:160]}"
            ) from None
        valid = np.isfinite(p)
        total[valid] += p[valid]
        count += valid
        contributed[scene.product_id] = int(valid.sum())
    with np.errstate(divide="ignore", invalid="ignore"):
        db = (10.0 * np.log10(total / count)).astype(np.float32)
    db[count == 0] = np.nan
    root = zarr.open_group(zarr_store(cube_url, storage_options), mode="r+", zarr_format=3)
    write_region(
        root["hh_db"], (slice(time_index, time_index + 1), slice(r0, r1), slice(c0, c1)), db[None]
    )
    return contributed


def label_block(
    grid: CubeGrid,
    block: tuple[int, int, int, int],
    tiles: Sequence[LulcSource],
    storage_options: Mapping[str, Any] | None = None,
) -> np.ndarray:
    """HR-LULC codes on the cube cells ``block``: (rows, cols) uint8, 0 = no data.

    The tiles share the 1/12000° grid, so they are first merged into one array covering the block
    (plus a margin); GDAL then aligns it: ``mode`` when the cube is coarser (each cell the most
    frequent code of the HR-LULC pixels under it; no data ignored; on a tie, the code that reached
    the top count first in row-major order), ``nearest`` otherwise (an exact copy when grids
    coincide).
    """
    import rasterio
    from rasterio.warp import Resampling, reproject
    from rasterio.windows import Window

    r0, r1, c0, c1 = block
    west, south, east, north = grid.window_bounds(r0, r1, c0, c1)
    n = 12000
    m = 2
    lr0 = math.floor((90.0 - north) * n + 1e-6) - m
    lr1 = math.ceil((90.0 - south) * n - 1e-6) + m
    lc0 = math.floor((west + 180.0) * n + 1e-6) - m
    lc1 = math.ceil((east + 180.0) * n - 1e-6) + m
    mosaic = np.zeros((lr1 - lr0, lc1 - lc0), dtype=np.uint8)
    with rasterio_env(storage_options):
        for t in tiles:
            rr0, rr1 = max(lr0, t.row0), min(lr1, t.row0 + t.height)
            cc0, cc1 = max(lc0, t.col0), min(lc1, t.col0 + t.width)
            if rr1 <= rr0 or cc1 <= cc0:
                continue
            with rasterio.open(gdal_path(t.url)) as ds:
                part = ds.read(1, window=Window(cc0 - t.col0, rr0 - t.row0, cc1 - cc0, rr1 - rr0))
            dst = mosaic[rr0 - lr0 : rr1 - lr0, cc0 - lc0 : cc1 - lc0]
            np.copyto(dst, part, where=part > 0)
    out = np.zeros((r1 - r0, c1 - c0), dtype=np.uint8)
    if not mosaic.any():
        return out
    src_t = Affine(1 / n, 0, -180.0 + lc0 / n, 0, -1 / n, 90.0 - lr0 / n)
    src_t, dst_t = local_frame(src_t, grid.window_transform(r0, c0), grid.cells_per_degree)
    resampling = Resampling.mode if grid.label_factor() > 1 else Resampling.nearest
    reproject(
        mosaic,
        out,
        src_transform=src_t,
        src_crs="EPSG:4326",
        dst_transform=dst_t,
        dst_crs="EPSG:4326",
        resampling=resampling,
        src_nodata=0,
        dst_nodata=0,
    )
    return out


def ingest_label_block(cube_url: str, storage_options, grid: CubeGrid, block, tiles) -> int:
    """Write lulc[block]; returns the number of labelled cells."""
    import zarr

    from .cube import zarr_store

    r0, r1, c0, c1 = block
    codes = label_block(grid, block, tiles, storage_options)
    root = zarr.open_group(zarr_store(cube_url, storage_options), mode="r+", zarr_format=3)
    write_region(root["lulc"], (slice(r0, r1), slice(c0, c1)), codes)
    return int((codes > 0).sum())


# ---------------------------------------------------------------------------------------------
# The driver


def _bad_input_as_value(fn, *args, **kwargs):
    """Run ``fn`` in a worker; a bad input (InputError) comes back as a SourceError *value*.

    Raised, it would be logged by the worker with a traceback, and distributed would pickle its
    exception chain, in which GDAL's errors do not unpickle: the client would get a generic
    Exception holding a repr instead of the one-line message.
    """
    try:
        return fn(*args, **kwargs)
    except InputError as e:
        msg = str(e)
    return SourceError(msg)


def _slice_signature(scenes: Sequence[SceneSource]) -> dict[str, str]:
    return {s.product_id: s.sha256 for s in sorted(scenes, key=lambda s: s.product_id)}


def _source_to_json(s: SceneSource) -> dict[str, Any]:
    return {
        **s.__dict__,
        "date": s.date.isoformat(),
        "transform": list(s.transform),
        "bounds_4326": list(s.bounds_4326),
    }


def _source_from_json(d: Mapping[str, Any]) -> SceneSource:
    return SceneSource(
        **{
            **d,
            "date": dt.date.fromisoformat(d["date"]),
            "transform": tuple(d["transform"]),
            "bounds_4326": tuple(d["bounds_4326"]),
        }
    )


def check_bbox(bbox: Sequence[float], what: str = "--bbox") -> tuple[float, float, float, float]:
    """(W, S, E, N) in degrees within −180…180 / −90…90 with W < E and S < N, else InputError."""
    if len(bbox) != 4 or not all(math.isfinite(float(v)) for v in bbox):
        raise InputError(f"{what} {tuple(bbox)}: expected four finite numbers W S E N (degrees)")
    w, s, e, n = (float(v) for v in bbox)
    if not (-180 <= w < e <= 180 and -90 <= s < n <= 90):
        raise InputError(
            f"{what} {w} {s} {e} {n}: expected W < E within −180…180 and S < N within −90…90 "
            "(degrees, EPSG:4326)"
        )
    return (w, s, e, n)


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
    from .locking import StoreLock

    t0 = time.perf_counter()
    so = RedactedOptions(storage_options or {})  # Dask logs of a failed task show no secret
    report = IngestReport(cube=str(cube))
    if isinstance(mosaic_date, str):
        try:
            mosaic_date = dt.date.fromisoformat(mosaic_date)
        except ValueError:
            raise InputError(f"--mosaic-date {mosaic_date!r}: expected YYYY-MM-DD") from None
    if not (0 <= edge_nodata_pct <= 100):
        raise InputError(f"edge_nodata_pct must be within 0..100, got {edge_nodata_pct}")
    if bbox is not None:
        bbox = check_bbox(bbox)
    check_cluster_arguments(workers, memory_limit)

    scene_urls, problems = expand_urls(scenes, so)
    lulc_urls, lulc_problems = expand_urls(lulc, so) if lulc else ([], [])
    report.problems += problems + lulc_problems
    if not scene_urls and not lulc_urls:
        report.seconds = time.perf_counter() - t0
        raise IngestError(
            "nothing to ingest: " + ("; ".join(report.problems) or "no input URL given")
        )
    _check_cube_destination(cube, so)

    with (
        StoreLock(
            cube, so, command="sarcube ingest", wait=wait, break_stale=break_stale_lock
        ) as lock,
        dask_client(client, scheduler, workers, memory_limit) as client,
    ):
        # 1. inspect every input in parallel
        futs = {
            ("scene", u): client.submit(
                _bad_input_as_value,
                inspect_scene,
                u,
                so,
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
                    _bad_input_as_value,
                    inspect_lulc,
                    u,
                    so,
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
                report.problems.append(
                    f"{u}: {type(res).__name__}: {str(res).splitlines()[0][:200]}"
                )
            elif kind == "scene":
                good_scenes.append(res)
            else:
                tiles.append(res)
        if not good_scenes and not tiles:
            raise IngestError(_problem_lines("nothing was ingested", report.problems))
        if strict and report.problems:
            raise IngestError(
                _problem_lines("--strict: input problems (nothing was written)", report.problems)
            )

        # 2. the cube's grid (the cube itself is created only once everything checked out)
        root, grid = _existing_cube(cube, so, bbox, resolution)
        if grid is None and bbox is None and not tiles and report.problems:
            raise IngestError(
                _problem_lines(
                    "a new cube needs --bbox, or usable --lulc tiles to define its extent",
                    report.problems,
                )
            )
        if grid is None:
            grid = _new_grid(bbox, resolution, shard_chunks, tiles)
        coverage = [t.bounds for t in tiles] or (
            [tuple(root.attrs["labels"]["coverage"])]
            if root is not None and root.attrs.get("labels", {}).get("coverage")
            else []
        )
        by_date: dict[dt.date, list[SceneSource]] = defaultdict(list)
        for s in good_scenes:
            if not _intersects(s.bounds_4326, grid.bounds):
                report.problems.append(
                    f"{s.url}: outside the cube grid {tuple(round(b, 4) for b in grid.bounds)} "
                    f"(scene covers {tuple(round(b, 4) for b in s.bounds_4326)})"
                )
            elif coverage and not any(_intersects(s.bounds_4326, c) for c in coverage):
                report.problems.append(
                    f"{s.url}: no HR-LULC coverage under the scene "
                    f"(labels cover {[tuple(round(b, 3) for b in c) for c in coverage]})"
                )
            else:
                by_date[s.date].append(s)
        if strict and report.problems:
            raise IngestError(
                _problem_lines("--strict: input problems (nothing was written)", report.problems)
            )

        created = root is None
        if created:
            root = create_cube(cube, grid, so, provenance=_provenance(bbox, grid))
        try:
            report.labels = _ingest_labels(client, root, cube, so, grid, tiles, progress)
            # 3. SAR slices: each date built in a fresh slot, all committed in one registry write
            _ingest_slices(
                client,
                root,
                cube,
                so,
                grid,
                by_date,
                edge_nodata_pct,
                report,
                progress,
                lock,
                strict,
            )
        finally:
            if created and (not _has_content(root) or (strict and report.problems)):
                _remove_store(cube, so)  # a failed first run leaves nothing behind

    report.seconds = time.perf_counter() - t0
    if not report.ingested and not report.skipped and report.labels in ("none", "failed"):
        raise IngestError(_problem_lines("nothing was ingested", report.problems))
    if strict and report.problems:
        raise IngestError(
            _problem_lines("--strict: input problems (nothing was committed)", report.problems)
        )
    return report


def _problem_lines(what: str, problems: Sequence[str]) -> str:
    """One line for one problem (``what: problem``); a header and one line each for several."""
    if len(problems) == 1:
        return f"{what}: {problems[0]}"
    return f"{what}:\n" + "\n".join(f"  {p}" for p in problems)


def _check_cube_destination(cube: str, so: Mapping[str, Any]) -> None:
    """The cube URL is a cube, or nothing yet: never a file or a folder of other things."""
    from .locking import LOCK_NAME

    fs, path = url_to_fs(cube, so)
    try:
        if fs.isfile(path):
            raise InputError(
                f"--cube {cube}: is an existing file, not a cube (a Zarr folder/prefix)"
            )
        if fs.exists(f"{path.rstrip('/')}/zarr.json"):
            return
        if fs.isdir(path):
            others = [  # the lock object (and its private temp file while it is created)
                p
                for p in fs.ls(path, detail=False)
                if not p.rstrip("/").rsplit("/", 1)[-1].startswith(LOCK_NAME)
            ]
            if others:
                raise InputError(
                    f"--cube {cube}: an existing folder that is not a sarcube cube ({len(others)} "
                    "entries, no zarr.json); give a new path or an existing cube"
                )
    except PermissionError as e:
        raise InputError(f"--cube {cube}: access denied ({e})") from None


def _has_content(root) -> bool:
    attrs = root.attrs.asdict()
    return bool(attrs.get("slices")) or attrs.get("labels", {}).get("status") == "complete"


def _remove_store(cube: str, so: Mapping[str, Any]) -> None:
    """Delete a cube this run created and never committed to (the lock file stays: its
    owner removes it, and with it the empty folder)."""
    from .locking import LOCK_NAME

    fs, path = url_to_fs(cube, so)
    try:
        files = [p for p in fs.find(path) if not p.endswith(LOCK_NAME)]
        if files:
            fs.rm(files)
        if is_local_fs(fs):
            for d in sorted((p for p in fs.find(path, withdirs=True) if fs.isdir(p)), reverse=True):
                try:
                    fs.rmdir(d)
                except OSError:
                    pass
    except Exception as e:  # best effort: the run already failed for a reason worth showing
        log.warning("%s: could not remove the cube created by this failed run (%s)", cube, e)


def _existing_cube(cube, so, bbox, resolution):
    """(group, grid) of the cube at ``cube``, checked against the requested grid; (None, None)."""
    try:
        root = open_group(cube, so, mode="r+")
    except CubeError:
        return None, None
    grid = cube_grid(root)
    if resolution is not None and parse_resolution(resolution) != grid.cells_per_degree:
        raise InputError(
            f"{cube}: the cube exists with resolution 1/{grid.cells_per_degree}°; "
            f"--resolution {resolution} differs (new scenes are resampled to the cube's grid)"
        )
    if (
        bbox is not None
        and CubeGrid.from_bounds(bbox, grid.cells_per_degree, grid.chunk, grid.shard_chunks) != grid
    ):
        raise InputError(
            f"{cube}: the cube exists with bounds {grid.bounds}; --bbox {tuple(bbox)} differs"
        )
    return root, grid


def _new_grid(bbox, resolution, shard_chunks, tiles) -> CubeGrid:
    n = parse_resolution(resolution) if resolution is not None else DEFAULT_CELLS_PER_DEGREE
    if bbox is None:
        if not tiles:
            raise InputError(
                "a new cube needs --bbox W S E N, or --lulc tiles whose extent defines it"
            )
        b = [t.bounds for t in tiles]
        bbox = (
            min(x[0] for x in b),
            min(x[1] for x in b),
            max(x[2] for x in b),
            max(x[3] for x in b),
        )
    kw = {} if shard_chunks is None else {"shard_chunks": int(shard_chunks)}
    return CubeGrid.from_bounds(tuple(bbox), n, **kw)


def _provenance(bbox, grid: CubeGrid) -> dict[str, Any]:
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bbox": list(bbox if bbox is not None else grid.bounds),
    }


def _ingest_labels(client, root, cube, so, grid, tiles, progress) -> str:
    if not tiles:
        return "kept" if root.attrs.get("labels", {}).get("status") == "complete" else "none"
    sig = {t.name: t.sha256 for t in sorted(tiles, key=lambda t: t.name)}
    reg = dict(root.attrs.get("labels", {}))
    if reg.get("status") == "complete" and reg.get("tiles") == sig:
        return "unchanged"
    b = [t.bounds for t in tiles]
    coverage = [
        min(x[0] for x in b),
        min(x[1] for x in b),
        max(x[2] for x in b),
        max(x[3] for x in b),
    ]
    root.attrs["labels"] = {"status": "writing", "tiles": sig, "coverage": coverage}
    futs = {
        blk: client.submit(
            ingest_label_block, cube, so, grid, blk, tiles, key=task_key(f"lulc-{blk}"), pure=False
        )
        for blk in grid.shard_blocks()
    }
    results = run_tasks(client, futs, "labels", progress)
    errors = [r for r in results.values() if isinstance(r, Exception)]
    if errors:
        root.attrs["labels"] = {**root.attrs["labels"], "status": "failed"}
        raise IngestError(f"writing labels failed: {type(errors[0]).__name__}: {errors[0]}")
    labelled = sum(results.values())
    root.attrs["labels"] = {
        "status": "complete",
        "tiles": sig,
        "coverage": coverage,
        "labelled_cells": labelled,
    }
    return f"{len(tiles)} tiles, {labelled} labelled cells"


def _no_valid_pixel(s: SceneSource) -> str:
    return f"{s.url}: no valid pixel inside the cube (all no-data, or only outside the grid)"


def _ingest_slices(
    client, root, cube, so, grid, by_date, edge_nodata_pct, report, progress, lock, strict
) -> None:
    """Build each changed or new date in a fresh time slot, then commit all of them at once.

    See ``sarcube.registry``: what ``open_cube`` shows changes only at ``registry.commit()``;
    a date whose attempt failed keeps its previous complete slice, byte for byte.
    """
    registry = SliceRegistry(root)
    garbage = set(registry.free)
    pending = {}
    for date, new in sorted(by_date.items()):
        key = date.isoformat()
        entry = registry.slices.get(key)
        # A date already in the cube keeps its scenes: new ones join them (same id: replaced).
        merged = {d["product_id"]: _source_from_json(d) for d in (entry or {}).get("sources", [])}
        merged.update({s.product_id: s for s in new})
        scenes = sorted(merged.values(), key=lambda s: s.product_id)
        sig = _slice_signature(scenes)
        if entry and entry.get("inputs") == sig:
            # scenes that gave no valid pixel are reported again, not counted as in the cube
            used = set(entry.get("scenes", []))
            report.skipped += [pid for pid in sig if pid in used]
            report.problems += [_no_valid_pixel(s) for s in scenes if s.product_id not in used]
            report.slices[key] = entry["status"]
            continue
        t = registry.begin(key, {"inputs": sig, "sources": [_source_to_json(x) for x in scenes]})
        pending[key] = (t, scenes, entry)

    if not pending:
        if root.attrs.get("attempts") or garbage != set(root.attrs.get("free_slots", [])):
            lock.check()
            registry.commit()  # forget a dead run's attempts; their slots are free
        _reclaim(cube, root, so, registry, garbage)
        return
    # A slot may hold an abandoned attempt's pixels: clear it before writing (missing objects
    # read as NaN, so blocks the new mosaic leaves empty cannot show old data).
    clear_slots(cube, root, {t for t, _, _ in pending.values()}, so)
    # Register the attempts before touching the arrays: a crash at any point leaves them here
    # (never in ``slices``), and the next run frees their slots.
    registry.publish_attempts()
    n_slots = max(t for t, _, _ in pending.values()) + 1
    for name in time_layers(root):  # hh_db and any derived (time, ...) layer (predictions)
        arr = root[name]
        if arr.shape[0] < n_slots:
            arr.resize((n_slots, *arr.shape[1:]))
    if root["time"].shape[0] < n_slots:
        root["time"].resize((n_slots,))
    for key, (t, _, _) in pending.items():
        root["time"][t] = date_to_days(dt.date.fromisoformat(key))

    futs = {}
    for key, (t, scenes, _) in pending.items():
        for blk in grid.shard_blocks():
            here = [s for s in scenes if _intersects(s.bounds_4326, grid.window_bounds(*blk))]
            futs[(key, blk)] = client.submit(
                _bad_input_as_value,
                ingest_sar_block,
                cube,
                so,
                grid,
                t,
                blk,
                here,
                edge_nodata_pct,
                key=task_key(f"sar-{key}-{blk}"),
                pure=False,
            )
    results = run_tasks(client, futs, "sar", progress)

    outcome = {}
    for key, (_t, scenes, old) in pending.items():
        res = {blk: r for (k, blk), r in results.items() if k == key}
        errors = [r for r in res.values() if isinstance(r, Exception)]
        kept = (
            f"the previous slice ({len(old.get('scenes', []))} scenes) is kept unchanged"
            if old
            else "not written"
        )
        if errors:
            e = errors[0]
            if isinstance(e, SourceError):  # names the file
                report.problems.append(f"{e} (slice {key}: {kept})")
            else:
                report.problems.append(
                    f"date {key}: writing the slice failed "
                    f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); {kept}; re-run to retry"
                )
            outcome[key] = None
            continue
        per_scene = defaultdict(int)
        for r in res.values():
            for pid, n in r.items():
                per_scene[pid] += n
        report.problems += [_no_valid_pixel(s) for s in scenes if per_scene[s.product_id] == 0]
        used = sorted(pid for pid in per_scene if per_scene[pid] > 0)
        outcome[key] = (used, int(sum(per_scene.values())))

    all_or_nothing = strict and (report.problems or None in outcome.values())
    for key, result in outcome.items():
        if result is None or all_or_nothing:
            registry.abandon(key)
            old = registry.slices.get(key)
            report.slices[key] = f"{old['status']} (unchanged)" if old else "not written"
            continue
        used, cells = result
        status = "complete" if used else "empty"
        registry.succeed(key, status=status, scenes=used, valid_cells=cells)
        report.ingested += used
        report.slices[key] = status
    lock.check()  # never commit after losing the lock
    registry.commit()
    _reclaim(cube, root, so, registry, garbage | registry.free)
    log.info("slices: %s", {k: v["status"] for k, v in registry.slices.items()})


def _reclaim(cube, root, so, registry: SliceRegistry, slots: set[int]) -> None:
    """Free the space of abandoned attempts and replaced slices (best effort: a failure here
    loses nothing, the next run tries again)."""
    slots = set(slots) & registry.free
    if not slots:
        return
    try:
        clear_slots(cube, root, slots, so)
    except Exception as e:
        log.warning(
            "%s: reclaiming free time slots %s failed (%s); the next run retries",
            cube,
            sorted(slots),
            e,
        )
