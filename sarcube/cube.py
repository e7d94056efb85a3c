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

**Conventions a plain reader sees** (``xr.open_zarr``, netCDF export, rioxarray): the root
group's attributes are flat (CF ``Conventions``, ``title``, ``format``, the grid as a JSON
string ``sarcube_grid``); every variable has ``_FillValue`` (xarray's encoding of the Zarr fill
value), ``units``/``long_name`` and ``grid_mapping``; ``slice_status`` (time,) is a CF flag
coordinate (0 not valid, 1 complete, 2 empty) telling complete slices from slots being written or
free; the metadata is consolidated at every commit, so plain readers open without a warning and
see the last committed shapes.

**sarcube's structured metadata** (the slice registry of ``sarcube.registry``, labels,
calibration, provenance: nested mappings that netCDF cannot hold) lives in the attributes of the
sidecar group ``sarcube/`` (:func:`metadata`), which ``xr.open_zarr`` of the cube does not read.
For each acquisition date the registry names the time slot holding its complete mosaic
(``complete``, or ``empty``), the product ids and content hashes of its scenes; attempts in
progress and free slots are listed apart. ``open_cube`` shows only the registered slices, so a
half-written or abandoned slot never looks valid.
"""

from __future__ import annotations

import datetime as dt
import json
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
# (sarcube.locking, there only while a writer runs) and the STAC record (sarcube.stac) are ours.
warnings.filterwarnings(
    "ignore",
    message=r"Object at (\.sarcube-lock|collection|item)\.json is not recognized",
    category=UserWarning,
)

# Zarr v3 consolidated metadata is not in the v3 spec yet; zarr says so on every write of it.
# It is what plain xarray readers look for (and what keeps them from warning), so we write it.
warnings.filterwarnings(
    "ignore", message=r"Consolidated metadata is currently not part", category=UserWarning
)

EPOCH = dt.date(1970, 1, 1)
# /2: structured metadata moved to the sidecar group, CF conventions, slice_status
FORMAT = "sarcube-cube/2"
PREDICTIONS_FORMAT = "sarcube-predictions/2"  # a separate store of predicted layers on a grid
OLD_FORMATS = ("sarcube-cube/1", "sarcube-predictions/1")
METADATA_GROUP = "sarcube"
SLICE_STATUS = "slice_status"
# the CF flags of slice_status: what a plain reader needs to pick complete slices
SLICE_STATUS_FLAGS = {"not_valid": 0, "complete": 1, "empty": 2}


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
    gm = {"grid_mapping": "spatial_ref", "coordinates": f"spatial_ref {SLICE_STATUS}"}
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
            "standard_name": "surface_backwards_scattering_coefficient_of_radar_wave",
            "long_name": "HH backscatter (sigma0 for L1.5/L2.1 scenes, gamma0 for yearly mosaics)",
            "polarization": "HH",
            "_FillValue": fill_value_attr(np.nan, np.float32),
            "calibration_formula": CALIBRATION_FORMULA,
            "calibration_factor_db": json.dumps(CALIBRATION_FACTORS_DB, sort_keys=True),
            "resampling": (
                "area-weighted average of linear power (GDAL 'average'), one step; dB taken once"
            ),
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
            "_FillValue": 0,
            "resampling": (
                "mode of HR-LULC pixels when downsampling (GDAL 'mode'), nearest otherwise"
            ),
            "grid_mapping": "spatial_ref",
            "coordinates": "spatial_ref",
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
    _create_slice_status(root)
    root.attrs.update(root_attrs(FORMAT, grid, "ALOS-2 PALSAR-2 HH backscatter datacube"))
    meta = root.create_group(METADATA_GROUP)
    meta.attrs.update(
        {
            "calibration": {"formula": CALIBRATION_FORMULA, "cf_db": CALIBRATION_FACTORS_DB},
            "slices": {},
            "labels": {},
            "provenance": redact(dict(provenance or {})),
        }
    )
    publish_view(root)
    return root


def fill_value_attr(value: float | int, dtype: Any) -> Any:
    """The ``_FillValue`` attribute as xarray's Zarr backend reads it (floats: base64 of the
    little-endian double, so NaN survives JSON), so that plain readers mask no-data."""
    from xarray.backends.zarr import FillValueCoder

    return FillValueCoder.encode(value, np.dtype(dtype))


def root_attrs(format: str, grid: CubeGrid, title: str) -> dict[str, Any]:
    """The flat, netCDF-safe attributes of a cube's or a predictions store's root group."""
    west, south, east, north = grid.bounds
    return {
        "format": format,
        "title": title,
        "Conventions": "CF-1.8",
        "sarcube_version": __version__,
        "crs": "EPSG:4326",
        "sarcube_grid": json.dumps(grid.to_attrs(), sort_keys=True),
        "geospatial_lon_min": west,
        "geospatial_lon_max": east,
        "geospatial_lat_min": south,
        "geospatial_lat_max": north,
        "sarcube_metadata": f"in the attributes of the {METADATA_GROUP!r} group",
    }


def _create_slice_status(root: zarr.Group) -> zarr.Array:
    a = root.create_array(
        SLICE_STATUS,
        shape=(root["time"].shape[0],),
        chunks=(1024,),
        dtype="uint8",
        fill_value=0,
        dimension_names=("time",),
    )
    a.attrs.update(
        {
            "long_name": "status of the time slice (only complete slices hold valid data)",
            "flag_values": list(SLICE_STATUS_FLAGS.values()),
            "flag_meanings": " ".join(SLICE_STATUS_FLAGS),
        }
    )
    return a


def metadata(root: zarr.Group) -> zarr.Group:
    """The sidecar group whose attributes hold sarcube's structured metadata (the slice registry,
    labels, calibration, provenance). Its ``zarr.json`` is one object: updating its attributes is
    the atomic commit of ``sarcube.registry``."""
    try:
        group = root[METADATA_GROUP]
    except KeyError:
        raise CubeError(f"{root.store}: no {METADATA_GROUP!r} metadata group") from None
    assert isinstance(group, zarr.Group)
    return group


def cube_attrs(root: zarr.Group) -> dict[str, Any]:
    """sarcube's metadata of a cube or predictions store as one mapping: the sidecar group's
    attributes plus ``grid`` (:meth:`CubeGrid.to_attrs`)."""
    return {**metadata(root).attrs.asdict(), "grid": cube_grid(root).to_attrs()}


def publish_view(root: zarr.Group) -> None:
    """Make the committed state what plain readers see: ``slice_status`` from the registry's
    slices (the array grown to the time axis), then the consolidated metadata.

    Called after each commit of the registry (or of the labels). A crash between the commit and
    this leaves plain readers the previous view, which still holds only valid data: freed slots
    are cleared only after it (``sarcube.ingestion.transaction.reclaim``)."""
    n = root["time"].shape[0]
    status = root[SLICE_STATUS] if SLICE_STATUS in root else _create_slice_status(root)
    assert isinstance(status, zarr.Array)
    values = np.zeros(n, dtype=np.uint8)
    for entry in (metadata(root).attrs.get("slices") or {}).values():
        t = int(entry["time_index"])
        if t < n and entry.get("status") in SLICE_STATUS_FLAGS:
            values[t] = SLICE_STATUS_FLAGS[entry["status"]]
    if status.shape[0] != n:
        status.resize((n,))
    if n:
        status[:] = values
    zarr.consolidate_metadata(root.store, path=root.path or "", zarr_format=3)


def open_group(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    mode: str = "r",
    formats: tuple[str, ...] = (FORMAT,),
) -> zarr.Group:
    """Open an existing cube's Zarr group (or another of ``formats``); CubeError when none."""
    try:
        root = open_zarr_group(url, storage_options, mode)
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, KeyError):
        raise CubeError(
            f"{url}: no sarcube cube here (expected a Zarr v3 group made by `sarcube ingest`)"
        ) from None
    if root.attrs.get("format") in OLD_FORMATS:
        raise CubeError(
            f"{url}: made by an older sarcube (format {root.attrs.get('format')!r}, before the "
            f"CF conventions and the {METADATA_GROUP!r} metadata group); re-run `sarcube "
            "ingest` (or `sarcube predict`) into a new store"
        )
    if root.attrs.get("format") not in formats:
        raise CubeError(
            f"{url}: a Zarr group but not a sarcube cube "
            f"(format attribute {root.attrs.get('format')!r})"
        )
    return root


def open_zarr_group(
    url: str, storage_options: Mapping[str, Any] | None = None, mode: str = "r"
) -> zarr.Group:
    """A Zarr v3 group read from its own metadata objects, never from the consolidated copy:
    that copy is the view published for plain readers at the last commit
    (:func:`publish_view`), stale while a writer works."""
    store = zarr_store(url, storage_options, read_only=mode == "r")
    return zarr.open_group(store, mode=mode, zarr_format=3, use_consolidated=False)


def cube_grid(root: zarr.Group) -> CubeGrid:
    return CubeGrid.from_attrs(json.loads(str(root.attrs["sarcube_grid"])))


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

    Only complete time slices are shown (sorted by date) unless ``include_incomplete``. Class
    layers keep their integer codes (``lulc`` 0 and predictions 255 = no data); ``xr.open_zarr``
    without sarcube masks them to NaN instead (CF ``_FillValue``). Select by
    place and date as usual:
    ``cube.sel(time="2022-09", y=slice(36.2, 36.0), x=slice(140.0, 140.3))``
    (y decreases: north first). ``cube.sarcube`` gives patch access by (time, row, col) and bbox.
    A separate store of predictions (``sarcube predict``) opens the same way, on a window of the
    cube's grid: its ``y``/``x`` equal the cube's there (``cube.sel(y=pred.y, x=pred.x)`` lines
    them up), its slices are the predicted dates.
    """
    root = open_group(url, storage_options, formats=(FORMAT, PREDICTIONS_FORMAT))
    slices = metadata(root).attrs.get("slices", {})
    # class layers (lulc 0, predictions 255) keep their integer codes here, as the library has
    # always shown them; plain CF readers mask them to NaN through _FillValue
    codes = {
        name: False
        for name, arr in root.arrays()
        if arr.dtype.kind in "iu" and "_FillValue" in arr.attrs and "scale_factor" not in arr.attrs
    }
    ds = xr.open_zarr(
        zarr_store(url, storage_options, read_only=True),
        consolidated=False,
        zarr_format=3,
        decode_coords="all",
        mask_and_scale=codes or None,
        # the registry decides what is shown here; slice_status is the plain readers' copy of it,
        # published after each commit (shorter than the time axis while a writer works)
        drop_variables=[SLICE_STATUS],
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
        return CubeGrid.from_attrs(json.loads(self._ds.attrs["sarcube_grid"]))

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
