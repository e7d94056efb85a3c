"""The ingest's Dask tasks: per-block compute that runs in the workers, each opening the cube
and its sources itself.

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

(Steps 1–2, the inspection and the cube's grid, are in ``sarcube.ingestion.driver``.)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from affine import Affine

from .. import defaults
from ..cube import open_zarr_group, write_region
from ..errors import InputError
from ..grid import CubeGrid
from ..sources import LulcSource, SceneSource, SourceError
from ..storage import gdal_path, rasterio_env

STRIP_ROWS = 512  # cube rows resampled at a time inside a shard task
EDGE_NODATA_PCT = defaults.EDGE_NODATA_PCT
SOURCE_MARGIN_PX = 2


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


def intersects(a: tuple[float, ...], b: tuple[float, ...]) -> bool:
    """True when two (W, S, E, N) boxes overlap (touching edges do not)."""
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
    if not intersects(scene.bounds_4326, grid.window_bounds(r0, r1, c0, c1)):
        return out
    scale = np.float32(10.0 ** (scene.cf_db / 10.0))
    src_crs = CRS.from_wkt(scene.crs_wkt)
    geographic = src_crs.to_epsg() == 4326 and scene.transform[1] == 0 and scene.transform[3] == 0
    with rasterio_env(storage_options), rasterio.open(gdal_path(scene.url)) as ds:
        full = Window(0, 0, ds.width, ds.height)
        for s0 in range(r0, r1, STRIP_ROWS):
            s1 = min(s0 + STRIP_ROWS, r1)
            bounds = grid.window_bounds(s0, s1, c0, c1)
            if not intersects(scene.bounds_4326, bounds):
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
    root = open_zarr_group(cube_url, storage_options, mode="r+")
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
    r0, r1, c0, c1 = block
    codes = label_block(grid, block, tiles, storage_options)
    root = open_zarr_group(cube_url, storage_options, mode="r+")
    write_region(root["lulc"], (slice(r0, r1), slice(c0, c1)), codes)
    return int((codes > 0).sum())


def bad_input_as_value(fn, *args, **kwargs):
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
