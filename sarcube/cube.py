"""The datacube: one Zarr v3 group (local or object storage), opened as an xarray.Dataset.

```
hh_db    float32 (time, y, x)  HH backscatter in dB (σ⁰ for L1.5/L2.1, γ⁰ for mosaics),
                               NaN = no data
lulc     uint8   (y, x)        JAXA HR-LULC code, 0 = no data
time     acquisition date; y, x cell centres (degrees); spatial_ref (CRS, GeoTransform)
```
Chunks are one 256 × 256 patch; Zarr shards group ``shard_chunks``² chunks so that object counts
stay low on S3. Writes go through ``write_region``, which refuses any region not aligned to whole
shards (two writers touching one shard would silently lose data). All-NaN chunks are not stored.

The group attributes hold the grid, the calibration, and a registry of time slices
(``sarcube.registry``): for each acquisition date the time slot holding its complete mosaic
(``complete``, or ``empty``), the product ids and content hashes of its scenes; attempts in
progress and free slots are listed apart. ``open_cube`` shows only the registered slices, so a
half-written or abandoned slot never looks valid.
"""

from __future__ import annotations

import datetime as dt
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np
import rioxarray  # noqa: F401  (registers the .rio accessor)
import xarray as xr
import zarr
from pyproj import CRS

from . import __version__
from .classes import DEFAULT_TABLE
from .errors import InputError, SarcubeError
from .grid import CubeGrid
from .radiometry import CALIBRATION_FACTORS_DB, CALIBRATION_FORMULA
from .storage import is_remote, redact

# Zarr warns about any object it does not know when it lists a group; the write lock
# (sarcube.locking) is ours and is there only while a writer runs.
warnings.filterwarnings(
    "ignore", message=r"Object at \.sarcube-lock\.json is not recognized", category=UserWarning
)

EPOCH = dt.date(1970, 1, 1)
FORMAT = "sarcube-cube/1"
PREDICTIONS_FORMAT = (
    "sarcube-predictions/1"  # a separate store of predicted layers on a cube's grid
)


class CubeError(SarcubeError):
    """The cube is missing, malformed, or does not match the request."""


class MisalignedWriteError(SarcubeError):
    """A write region that does not cover whole shards."""


def zarr_store(url: str, storage_options: Mapping[str, Any] | None = None, read_only: bool = False):
    """A Zarr v3 store for a local path or an fsspec URL (``s3://…`` on any endpoint)."""
    url = str(url)
    if is_remote(url):
        return zarr.storage.FsspecStore.from_url(
            url, storage_options=dict(storage_options or {}), read_only=read_only
        )
    return zarr.storage.LocalStore(url.removeprefix("file://"), read_only=read_only)


def _crs_attrs(grid: CubeGrid) -> dict[str, Any]:
    crs = CRS.from_epsg(4326)
    t = grid.transform
    return {
        "crs_wkt": crs.to_wkt(),
        "spatial_ref": crs.to_wkt(),
        "epsg_code": "EPSG:4326",
        "grid_mapping_name": "latitude_longitude",
        "GeoTransform": f"{t.c!r} {t.a!r} {t.b!r} {t.f!r} {t.d!r} {t.e!r}",
    }


def create_cube(
    url: str,
    grid: CubeGrid,
    storage_options: Mapping[str, Any] | None = None,
    provenance: Mapping[str, Any] | None = None,
) -> zarr.Group:
    """Create an empty cube (no time slices yet) with its coordinates, CRS and attributes.

    The caller holds the cube's lock (``sarcube.locking``), whose object may already be in the
    folder: so "create" means "no Zarr group here yet" rather than "empty folder"."""
    store = zarr_store(url, storage_options)
    try:
        zarr.open_group(store, mode="r", zarr_format=3)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        pass
    else:
        raise CubeError(f"{url}: a Zarr group exists here already")
    root = zarr.open_group(store, mode="a", zarr_format=3)
    h, w, c, s = grid.height, grid.width, grid.chunk, grid.shard
    shard_hw = (min(s, h), min(s, w))
    cfg = {"write_empty_chunks": False}
    gm = {
        "grid_mapping": "spatial_ref",
        "_CRS": {"url": "http://www.opengis.net/def/crs/EPSG/0/4326"},
    }
    hh = root.create_array(
        "hh_db",
        shape=(0, h, w),
        chunks=(1, c, c),
        shards=(1, *shard_hw),
        dtype="float32",
        fill_value=np.nan,
        dimension_names=("time", "y", "x"),
        config=cfg,
    )
    hh.attrs.update(
        {
            "units": "dB",
            "long_name": "HH backscatter (sigma0 for L1.5/L2.1 scenes, gamma0 for yearly mosaics)",
            "calibration_formula": CALIBRATION_FORMULA,
            "calibration_factor_db": CALIBRATION_FACTORS_DB,
            "resampling": (
                "area-weighted average of linear power (GDAL 'average'), one step; dB taken once"
            ),
            "coordinates": "spatial_ref",
            **gm,
        }
    )
    lulc = root.create_array(
        "lulc",
        shape=(h, w),
        chunks=(c, c),
        shards=shard_hw,
        dtype="uint8",
        fill_value=0,
        dimension_names=("y", "x"),
        config=cfg,
    )
    codes = [0, *DEFAULT_TABLE.codes]
    lulc.attrs.update(
        {
            "long_name": f"JAXA HR-LULC {DEFAULT_TABLE.version} class code",
            "flag_values": codes,
            "flag_meanings": " ".join(
                ["no_data", *(DEFAULT_TABLE.name(k).replace(" ", "_") for k in codes[1:])]
            ),
            "class_table": DEFAULT_TABLE.version,
            "resampling": (
                "mode of HR-LULC pixels when downsampling (GDAL 'mode'), nearest otherwise"
            ),
            "coordinates": "spatial_ref",
            **gm,
        }
    )
    t = root.create_array(
        "time", shape=(0,), chunks=(1024,), dtype="int64", fill_value=0, dimension_names=("time",)
    )
    t.attrs.update(
        {
            "units": "days since 1970-01-01",
            "calendar": "proleptic_gregorian",
            "standard_name": "time",
            "long_name": "acquisition date",
        }
    )
    y = root.create_array("y", shape=(h,), chunks=(h,), dtype="float64", dimension_names=("y",))
    y[:] = grid.y_coords()
    y.attrs.update({"units": "degrees_north", "standard_name": "latitude", "axis": "Y"})
    x = root.create_array("x", shape=(w,), chunks=(w,), dtype="float64", dimension_names=("x",))
    x[:] = grid.x_coords()
    x.attrs.update({"units": "degrees_east", "standard_name": "longitude", "axis": "X"})
    sr = root.create_array("spatial_ref", shape=(), dtype="int32", fill_value=0)
    sr[()] = 0
    sr.attrs.update(_crs_attrs(grid))
    root.attrs.update(
        {
            "format": FORMAT,
            "sarcube_version": __version__,
            "grid": grid.to_attrs(),
            "crs": "EPSG:4326",
            "calibration": {"formula": CALIBRATION_FORMULA, "cf_db": CALIBRATION_FACTORS_DB},
            "slices": {},
            "labels": {},
            "provenance": redact(dict(provenance or {})),
            "Conventions": "CF-1.8",
        }
    )
    return root


def open_group(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    mode: str = "r",
    formats: tuple[str, ...] = (FORMAT,),
) -> zarr.Group:
    """Open an existing cube's Zarr group (or another of ``formats``); CubeError when none."""
    try:
        root = zarr.open_group(
            zarr_store(url, storage_options, read_only=mode == "r"), mode=mode, zarr_format=3
        )
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        raise CubeError(
            f"{url}: no sarcube cube here (expected a Zarr v3 group made by `sarcube ingest`)"
        ) from None
    if root.attrs.get("format") not in formats:
        raise CubeError(
            f"{url}: a Zarr group but not a sarcube cube "
            f"(format attribute {root.attrs.get('format')!r})"
        )
    return root


def cube_grid(root: zarr.Group) -> CubeGrid:
    return CubeGrid.from_attrs(root.attrs["grid"])


def write_region(array: zarr.Array, selection: tuple[slice | int, ...], data: np.ndarray) -> None:
    """Write ``data`` at ``selection``, refusing regions that do not cover whole shards.

    A region that cuts a shard would make its writer read-modify-write that shard; two such
    writers running at once (two Dask tasks) would silently drop one another's chunks.
    """
    shards = array.shards or array.chunks
    for axis, (sel, size, n) in enumerate(zip(selection, shards, array.shape, strict=True)):
        if isinstance(sel, int):
            if size != 1:
                raise MisalignedWriteError(
                    f"{array.path}: integer index on axis {axis} whose shard is {size} wide"
                )
            continue
        start, stop = sel.start or 0, n if sel.stop is None else sel.stop
        if start % size or (stop % size and stop != n):
            raise MisalignedWriteError(
                f"{array.path}: write region {start}:{stop} on axis {axis} is not aligned to its "
                f"{size}-cell shards (array length {n}); "
                "refusing a write that could corrupt a shard"
            )
    array[selection] = data


def date_to_days(date: dt.date) -> int:
    return (date - EPOCH).days


def open_cube(
    url: str, storage_options: Mapping[str, Any] | None = None, include_incomplete: bool = False
) -> xr.Dataset:
    """Open a cube as a lazy ``xarray.Dataset`` with a CRS (``.rio`` works).

    Only complete time slices are shown (sorted by date) unless ``include_incomplete``. Select by
    place and date as usual:
    ``cube.sel(time="2022-09", y=slice(36.2, 36.0), x=slice(140.0, 140.3))``
    (y decreases: north first). ``cube.sarcube`` gives patch access by (time, row, col) and bbox.
    A separate store of predictions (``sarcube predict --out``) opens the same way, on the same
    grid: its ``y``/``x`` equal the cube's, its slices are the predicted dates.
    """
    root = open_group(url, storage_options, formats=(FORMAT, PREDICTIONS_FORMAT))
    slices = root.attrs.get("slices", {})
    ds = xr.open_zarr(
        zarr_store(url, storage_options, read_only=True),
        consolidated=False,
        zarr_format=3,
        decode_coords="all",
    )
    if not include_incomplete:
        keep = sorted(v["time_index"] for v in slices.values() if v.get("status") == "complete")
        ds = ds.isel(time=keep)
    ds = ds.sortby("time")
    ds.attrs["source"] = str(url)
    return ds.rio.write_crs("EPSG:4326")


@xr.register_dataset_accessor("sarcube")
class CubeAccessor:
    """Patch access on an opened cube: ``cube.sarcube.patch(time, row, col)``."""

    def __init__(self, ds: xr.Dataset):
        self._ds = ds

    @property
    def grid(self) -> CubeGrid:
        return CubeGrid.from_attrs(self._ds.attrs["grid"])

    @property
    def patch_shape(self) -> tuple[int, int]:
        g = self.grid
        return g.height // g.chunk, g.width // g.chunk

    def patch(self, time: int | str | np.datetime64, row: int, col: int) -> xr.Dataset:
        """The 256 × 256 patch at patch-grid (row, col) for a date (index or label)."""
        g = self.grid
        nr, nc = self.patch_shape
        if not (0 <= row < nr and 0 <= col < nc):
            raise InputError(
                f"patch (row {row}, col {col}) is outside the cube's {nr} × {nc} patch grid"
            )
        ds = self._ds.isel(time=time) if isinstance(time, int) else self._ds.sel(time=time)
        c = g.chunk
        return ds.isel(y=slice(row * c, (row + 1) * c), x=slice(col * c, (col + 1) * c))

    def patches_in_bbox(self, bbox: tuple[float, float, float, float]) -> list[tuple[int, int]]:
        """(row, col) of every patch lying entirely inside bbox (W, S, E, N degrees)."""
        g = self.grid
        west, south, east, north = bbox
        n, c = g.cells_per_degree, g.chunk
        r_lo = int(np.ceil(((90.0 - north) * n - g.row0) / c - 1e-9))
        r_hi = int(np.floor(((90.0 - south) * n - g.row0) / c + 1e-9))
        c_lo = int(np.ceil(((west + 180.0) * n - g.col0) / c - 1e-9))
        c_hi = int(np.floor(((east + 180.0) * n - g.col0) / c + 1e-9))
        nr, nc = self.patch_shape
        return [
            (r, k)
            for r in range(max(r_lo, 0), min(r_hi, nr))
            for k in range(max(c_lo, 0), min(c_hi, nc))
        ]

    def patch_bbox(self, row: int, col: int) -> tuple[float, float, float, float]:
        g, c = self.grid, self.grid.chunk
        return g.window_bounds(row * c, (row + 1) * c, col * c, (col + 1) * c)
