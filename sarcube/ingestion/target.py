"""The cube an ingest writes: checking its URL, its grid (an existing cube's, checked against
the request, or a new one's from ``bbox`` or the label tiles) and removing a new cube that a
failed first run leaves without content."""

from __future__ import annotations

import datetime as dt
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

from ..cube import CubeError, cube_grid, metadata, open_group
from ..errors import InputError
from ..grid import DEFAULT_CELLS_PER_DEGREE, CubeGrid, parse_resolution
from ..storage import is_local_fs, url_to_fs

log = logging.getLogger("sarcube.ingestion")


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


def check_cube_destination(cube: str, storage_options: Mapping[str, Any]) -> None:
    """The cube URL is a cube, or nothing yet: never a file or a folder of other things."""
    from ..locking import LOCK_NAME

    fs, path = url_to_fs(cube, storage_options)
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


def has_content(root) -> bool:
    """True when the cube holds a slice or complete labels."""
    attrs = metadata(root).attrs.asdict()
    return bool(attrs.get("slices")) or attrs.get("labels", {}).get("status") == "complete"


def remove_store(cube: str, storage_options: Mapping[str, Any]) -> None:
    """Delete a cube this run created and never committed to (the lock file stays: its
    owner removes it, and with it the empty folder)."""
    from ..locking import LOCK_NAME

    fs, path = url_to_fs(cube, storage_options)
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


def existing_cube(cube, storage_options, bbox, resolution):
    """(group, grid) of the cube at ``cube``, checked against the requested grid; (None, None)."""
    try:
        root = open_group(cube, storage_options, mode="r+")
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


def new_grid(bbox, resolution, shard_chunks, tiles) -> CubeGrid:
    """The grid of a new cube: ``bbox``, else the label tiles' extent (InputError without)."""
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


def provenance(bbox, grid: CubeGrid) -> dict[str, Any]:
    """The creation record of a new cube."""
    return {
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "bbox": list(bbox if bbox is not None else grid.bounds),
    }
