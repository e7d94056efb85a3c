"""One layer of a cube or predictions store as a file that GIS tools open as is.

``sarcube export --cube URL --var hh_db|lulc|pred_* [--time DATE] [--bbox W S E N] --out F``:

- ``.tif`` (``--format cog``): a Cloud-Optimized GeoTIFF of one date (EPSG:4326, 512² tiles,
  deflate, overviews). Backscatter and probabilities: float32, nodata NaN, the band's
  description and unit. Class layers (a ``flag_values`` attribute: ``lulc``, ``pred_*``): uint8
  with their own nodata (0 / 255), the class colours as a colour table and the class names as
  GDAL category names in the ``.aux.xml`` sidecar (GDAL, QGIS and ArcGIS show them as the legend).
- ``.nc`` (``--format netcdf``): netCDF-4 (h5netcdf), every selected date, CF-1.8 attributes as
  the cube has them (``standard_name``, ``units``, ``grid_mapping``, ``flag_values`` of the
  variable's own dtype), compressed, chunked like the cube.

The bbox takes every cube cell it touches (``CubeGrid.bbox_window``), so the file's pixels are
exactly the cube's: no resampling. Written beside the target and moved into place at the end,
so a failed export leaves no partial file; remote outputs are written locally, then uploaded.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .storage import is_remote, write_bytes

FORMATS = {".tif": "cog", ".tiff": "cog", ".nc": "netcdf"}
BLOCK = 1024  # pixels per side read from the cube at a time (memory: one block)


class ExportError(InputError):
    """An export request that names something the store does not hold."""


@dataclass(frozen=True)
class BandStyle:
    """How one layer is written as a GeoTIFF band.

    Attributes:
        dtype: the band's data type ("uint8" for class layers, "float32" otherwise).
        nodata: the no-data value (NaN for floats).
        description: the band description (GDAL ``GetDescription``).
        units: the band's unit (e.g. "dB"), or "".
        colors: pixel value -> RGBA colour table, or None.
        category_names: pixel value i -> name (GDAL category names), or None.
        overview_resampling: GDAL resampling of the overviews.
    """

    dtype: str
    nodata: float | int
    description: str
    units: str = ""
    colors: dict[int, tuple[int, int, int, int]] | None = None
    category_names: tuple[str, ...] | None = None
    overview_resampling: str = "AVERAGE"


def band_style(attrs: Mapping[str, Any], name: str) -> BandStyle:
    """The band style of a cube or predictions variable, from its own attributes."""
    from .classes import CLASS_TABLES, segmentation_task

    description = str(attrs.get("long_name", name))
    if "flag_values" not in attrs:
        return BandStyle("float32", np.nan, description, str(attrs.get("units", "")))
    values = [int(v) for v in np.atleast_1d(attrs["flag_values"])]
    meanings = str(attrs.get("flag_meanings", "")).split()
    names = [""] * (max(values) + 1)
    for v, m in zip(values, meanings, strict=False):  # meanings may be fewer
        names[v] = m.replace("_", " ")
    colors: dict[int, tuple[int, int, int, int]] | None = None
    nodata = int(np.asarray(attrs.get("_FillValue", 255)))
    if attrs.get("class_table") in CLASS_TABLES:
        colors = CLASS_TABLES[attrs["class_table"]].colormap()
    elif "task" in attrs:
        colors = {i: (*rgb, 255) for i, rgb in enumerate(segmentation_task(attrs["task"]).rgb)}
        colors[nodata] = (0, 0, 0, 0)
    return BandStyle("uint8", nodata, description, "", colors, tuple(names), "MODE")


def _write_category_names(tif: Path, names: Sequence[str]) -> None:
    """GDAL category names (pixel value i -> ``names[i]``) for band 1 of ``tif``, in its PAM
    sidecar ``<tif>.aux.xml``. Written by hand because rasterio has no API for
    ``GDALSetRasterCategoryNames``; GDAL's COG driver carries the sidecar over to the COG."""
    from xml.etree import ElementTree as ET

    root = ET.Element("PAMDataset")
    band = ET.SubElement(root, "PAMRasterBand", band="1")
    cats = ET.SubElement(band, "CategoryNames")
    for name in names:
        ET.SubElement(cats, "Category").text = str(name)
    ET.ElementTree(root).write(str(tif) + ".aux.xml", encoding="UTF-8", xml_declaration=False)


def _publish(built: Path, path: str, storage_options: Mapping[str, Any] | None) -> None:
    """Move a finished file (and its ``.aux.xml``) to ``path``: upload for a URL, else a rename
    (the sidecar first, so that a reader never sees the file without its legend)."""
    sidecar = Path(f"{built}.aux.xml")
    if is_remote(path):
        if sidecar.exists():
            write_bytes(f"{path}.aux.xml", sidecar.read_bytes(), storage_options)
        write_bytes(path, built.read_bytes(), storage_options)
        return
    if sidecar.exists():
        os.replace(sidecar, f"{path}.aux.xml")
    elif Path(f"{path}.aux.xml").exists():
        os.remove(f"{path}.aux.xml")  # a stale legend of an earlier file
    os.replace(built, path)


def _work_dir(path: str) -> Path:
    """A temporary folder on the target's file system (local) or in the system's (remote)."""
    if is_remote(path):
        return Path(tempfile.mkdtemp(prefix="sarcube-export-"))
    parent = Path(path).resolve().parent
    parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{Path(path).name}.partial-", dir=parent))


def write_cog(
    path: str,
    read: Callable[[int, int, int, int], np.ndarray],
    shape: tuple[int, int],
    transform: Any,
    style: BandStyle,
    *,
    tags: Mapping[str, str] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    block: int = BLOCK,
) -> str:
    """Write one band as a Cloud-Optimized GeoTIFF at ``path`` (local or a URL).

    Args:
        path: the output file.
        read: ``read(row0, row1, col0, col1)`` returns that window of the band (2-D).
        shape: (height, width) of the band in pixels.
        transform: the affine transform of pixel (0, 0) (EPSG:4326 degrees).
        style: dtype, nodata, description, colours and category names.
        tags: band metadata (GDAL ``GetMetadata``).
        storage_options: fsspec options of a remote ``path``.
        block: pixels per side read at a time.

    Returns:
        ``path``.
    """
    import rasterio
    from rasterio.shutil import copy as rio_copy
    from rasterio.windows import Window

    height, width = shape
    work = _work_dir(path)
    try:
        tiled = work / "tiled.tif"
        profile = {
            "driver": "GTiff",
            "width": width,
            "height": height,
            "count": 1,
            "dtype": style.dtype,
            "crs": "EPSG:4326",
            "transform": transform,
            "nodata": style.nodata,
            "tiled": True,
            "blockxsize": 512,
            "blockysize": 512,
            "compress": "deflate",
        }
        with rasterio.open(tiled, "w", **profile) as dst:
            for r in range(0, height, block):
                for c in range(0, width, block):
                    rr, cc = min(r + block, height), min(c + block, width)
                    data = np.asarray(read(r, rr, c, cc)).astype(style.dtype, copy=False)
                    dst.write(data, 1, window=Window(c, r, cc - c, rr - r))
            if style.colors:
                dst.write_colormap(1, style.colors)
            dst.set_band_description(1, style.description)
            if style.units:
                dst.set_band_unit(1, style.units)
            if tags:
                dst.update_tags(1, **{k: str(v) for k, v in tags.items()})
        if style.category_names:
            _write_category_names(tiled, style.category_names)
        built = work / Path(path).name
        rio_copy(
            str(tiled),
            str(built),
            driver="COG",
            COMPRESS="DEFLATE",
            BLOCKSIZE=512,
            OVERVIEW_RESAMPLING=style.overview_resampling,
            RESAMPLING="NEAREST",
        )
        _publish(built, path, storage_options)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return path


def _select(ds, cube: str, var: str, time: str | None, bbox, grid):
    """``ds[var]`` at ``time`` (a date; all dates when None) over ``bbox``; (DataArray, window)."""
    if var not in ds.data_vars:
        raise ExportError(
            f"{cube}: no variable {var!r}; expected one of {', '.join(sorted(ds.data_vars))}"
        )
    da = ds[var]
    if time is not None and "time" in da.dims:
        days = [str(t)[:10] for t in da.time.values]
        if time not in days:
            raise ExportError(
                f"{cube}: --time {time}: no complete slice of that date; the dates are "
                f"{', '.join(days) or 'none'} (YYYY-MM-DD)"
            )
        da = da.isel(time=[days.index(time)])
    window = grid.bbox_window(tuple(bbox)) if bbox is not None else (0, grid.height, 0, grid.width)
    r0, r1, c0, c1 = window
    return da.isel(y=slice(r0, r1), x=slice(c0, c1)), window


def _netcdf(da, path: str, storage_options) -> None:
    """``da`` (with its CRS variable) as netCDF-4/CF at ``path``, chunked like the cube."""
    ds = da.to_dataset()
    v = ds[da.name]
    # the grid mapping and coordinates as CF readers (GDAL's netCDF driver) look for them:
    # open_cube moved them to the encoding, where the sidecar's slice_status is still named
    for key in ("grid_mapping", "coordinates"):
        v.encoding.pop(key, None)
        v.attrs.pop(key, None)
    if "spatial_ref" in ds.coords:
        v.attrs["grid_mapping"] = "spatial_ref"
    if "flag_values" in v.attrs:  # CF: flag_values of the variable's own type
        v.attrs["flag_values"] = np.asarray(v.attrs["flag_values"], dtype=v.dtype)
    fill = v.attrs.pop("_FillValue", None)  # class layers: kept as codes, stated as encoding
    chunks = tuple(min(256, n) if d != "time" else 1 for d, n in zip(v.dims, v.shape, strict=True))
    encoding: dict[str, Any] = {"compression": "gzip", "compression_opts": 4, "chunksizes": chunks}
    if fill is not None:
        encoding["_FillValue"] = np.asarray(fill, dtype=v.dtype)[()]
    work = _work_dir(path)
    try:
        built = work / Path(path).name
        coords = {c: {"_FillValue": None} for c in ("x", "y") if c in ds.coords}  # CF: none
        ds.to_netcdf(built, engine="h5netcdf", encoding={da.name: encoding, **coords})
        _publish(built, path, storage_options)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_layer(
    cube: str,
    var: str,
    out: str,
    *,
    time: str | None = None,
    bbox: Sequence[float] | None = None,
    format: str | None = None,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write variable ``var`` of a cube or predictions store to ``out`` (see the module doc).

    Args:
        cube: the cube or predictions store URL.
        var: the variable, e.g. ``hh_db``, ``lulc``, ``pred_lulc``.
        out: the output file (``.tif`` / ``.nc``, local or a URL).
        time: the date (YYYY-MM-DD); required for a COG of a layer with several dates.
        bbox: W, S, E, N degrees (EPSG:4326); default the whole store.
        format: ``cog`` | ``netcdf``; default from the suffix of ``out``.
        storage_options: fsspec options (S3 endpoint, credentials).

    Returns:
        What was written: path, format, variable, dates, shape and bounds.

    Raises:
        ExportError / InputError: an unknown variable, date, format or a bbox off the store.
    """
    from .cube import open_cube

    fmt = format or FORMATS.get(Path(str(out).split("?")[0]).suffix.lower())
    if fmt not in ("cog", "netcdf"):
        raise ExportError(
            f"{out}: cannot tell the format from the name; expected a .tif (COG) or .nc "
            "(netCDF) file, or --format cog|netcdf"
        )
    ds = open_cube(cube, storage_options)
    grid = ds.sarcube.grid
    da, (r0, r1, c0, c1) = _select(ds, cube, var, time, bbox, grid)
    dates = [str(t)[:10] for t in da.time.values] if "time" in da.dims else []
    if fmt == "netcdf":
        _netcdf(da, out, storage_options)
    else:
        if len(dates) > 1:
            raise ExportError(
                f"{cube}: {var} has {len(dates)} dates ({', '.join(dates)}); a GeoTIFF holds "
                "one: choose it with --time YYYY-MM-DD (or write every date to a .nc file)"
            )
        if "time" in da.dims and not dates:
            raise ExportError(f"{cube}: {var} has no complete slice to export")
        band = da.isel(time=0) if dates else da
        tags = {k: str(v) for k, v in da.attrs.items() if k in ("task", "checkpoint", "units")}
        if dates:
            tags["date"] = dates[0]
        write_cog(
            out,
            lambda a, b, c, d: band.isel(y=slice(a, b), x=slice(c, d)).values,
            (r1 - r0, c1 - c0),
            grid.window_transform(r0, c0),
            band_style(da.attrs, var),
            tags=tags,
            storage_options=storage_options,
        )
    return {
        "path": str(out),
        "format": fmt,
        "variable": var,
        "dates": dates,
        "shape": [r1 - r0, c1 - c0],
        "bounds": list(grid.window_bounds(r0, r1, c0, c1)),
    }
