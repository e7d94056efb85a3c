"""``sarcube export``: a layer of the cube as a COG or a netCDF file, read back by other people's
tools (rasterio, GDAL's command line, xarray's h5netcdf/scipy-free path, cf_xarray) and compared
with the cube read by plain xarray, the pixel window worked out by hand from the coordinates."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SARCUBE = [sys.executable, "-m", "sarcube"]
BBOX = (140.3501, 36.0502, 140.4003, 36.1004)  # W S E N inside SMALL_BBOX, off the cell edges
needs_gdal = pytest.mark.skipif(
    shutil.which("gdalinfo") is None, reason="needs GDAL's command line: apt-get install gdal-bin"
)


def _plain(cube: str):
    import xarray as xr

    return xr.open_zarr(cube, mask_and_scale=False)


def _window(ds, bbox):
    """Rows/cols of the cells the bbox touches, from the cell-centre coordinates (cell 1/6000°)."""
    half = 0.5 / 6000
    w, s, e, n = bbox
    rows = np.flatnonzero((ds.y.values + half > s) & (ds.y.values - half < n))
    cols = np.flatnonzero((ds.x.values + half > w) & (ds.x.values - half < e))
    return slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1)


def _export(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*SARCUBE, "export", *argv], capture_output=True, text=True, timeout=300)


def test_a_backscatter_cog_of_one_date_and_bbox(small_cube, tmp_path):
    import rasterio

    out = tmp_path / "hh.tif"
    argv = ["--cube", small_cube, "--var", "hh_db", "--time", "2022-10-10", "--out", str(out)]
    p = _export(*argv, "--bbox", *map(str, BBOX))
    assert p.returncode == 0, p.stderr
    ds = _plain(small_cube)
    rows, cols = _window(ds, BBOX)
    t = [str(v)[:10] for v in ds.time.values].index("2022-10-10")
    want = ds.hh_db.isel(time=t, y=rows, x=cols).values
    with rasterio.open(out) as src:
        got = src.read(1)
        assert src.crs.to_epsg() == 4326 and src.nodata is not None and math.isnan(src.nodata)
        assert src.descriptions[0].startswith("HH backscatter") and src.units == ("dB",)
        assert src.tags(1)["date"] == "2022-10-10"
        # the top-left corner is the first touched cell's edge
        assert src.transform.c == pytest.approx(float(ds.x[cols.start]) - 0.5 / 6000, abs=1e-12)
        assert src.transform.f == pytest.approx(float(ds.y[rows.start]) + 0.5 / 6000, abs=1e-12)
        assert src.tags(ns="IMAGE_STRUCTURE")["LAYOUT"] == "COG"  # (too small for overviews)
    np.testing.assert_array_equal(got, want)
    h, w = rows.stop - rows.start, cols.stop - cols.start
    assert got.shape == (h, w) == (round(0.0502 * 6000) + 1, round(0.0502 * 6000) + 1)
    assert f"wrote {out} (cog, hh_db, 2022-10-10, {h} x {w} px)" in p.stdout
    assert sorted(q.name for q in tmp_path.iterdir()) == ["hh.tif"]  # nothing else left


@needs_gdal
def test_gdal_reads_the_label_cogs_class_names_colours_and_nodata(small_cube, tmp_path):
    from sarcube.classes import DEFAULT_TABLE

    out = tmp_path / "lulc.tif"
    assert _export("--cube", small_cube, "--var", "lulc", "--out", str(out)).returncode == 0
    info = json.loads(
        subprocess.run(
            ["gdalinfo", "-json", str(out)], capture_output=True, text=True, check=True
        ).stdout
    )
    (band,) = info["bands"]
    assert band["type"] == "Byte" and band["noDataValue"] == 0
    cats = band["categories"]
    for c in DEFAULT_TABLE.classes:  # category i is the name of code i, as GDAL indexes them
        assert cats[c.code] == c.name
    entries = band["colorTable"]["entries"]
    assert entries[1][:3] == list(DEFAULT_TABLE.lookup(1).rgb) and entries[0][3] == 0
    assert info["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"
    ds = _plain(small_cube)
    import rasterio

    with rasterio.open(out) as src:
        np.testing.assert_array_equal(src.read(1), ds.lulc.values)


def test_netcdf_of_every_date_with_cf_metadata(small_cube, tmp_path):
    import cf_xarray  # noqa: F401  (the .cf accessor)
    import xarray as xr

    out = tmp_path / "lulc.nc"
    p = _export("--cube", small_cube, "--var", "lulc", "--out", str(out), "--bbox", *map(str, BBOX))
    assert p.returncode == 0, p.stderr
    back = xr.open_dataset(out, engine="h5netcdf", mask_and_scale=False)
    ds = _plain(small_cube)
    rows, cols = _window(ds, BBOX)
    np.testing.assert_array_equal(back.lulc.values, ds.lulc.isel(y=rows, x=cols).values)
    # CF: flag_values of the variable's own type (uint8), the fill value, the grid mapping
    assert back.lulc.dtype == np.uint8 and back.lulc.attrs["flag_values"].dtype == np.uint8
    assert back.lulc.attrs["_FillValue"] == 0
    assert back.lulc.attrs["grid_mapping"] == "spatial_ref" and "crs_wkt" in back.spatial_ref.attrs
    assert back.cf.axes["X"] == ["x"] and back.cf.axes["Y"] == ["y"]

    out = tmp_path / "hh.nc"
    assert _export("--cube", small_cube, "--var", "hh_db", "--out", str(out)).returncode == 0
    hh = xr.open_dataset(out, engine="h5netcdf")
    plain = xr.open_zarr(small_cube)
    np.testing.assert_array_equal(hh.time.values, plain.time.values)
    np.testing.assert_array_equal(hh.hh_db.values, plain.hh_db.values)  # NaN where no data
    assert np.isnan(hh.hh_db.values).any()
    assert hh.cf.standard_names["surface_backwards_scattering_coefficient_of_radar_wave"] == [
        "hh_db"
    ]


@needs_gdal
def test_gdal_reads_the_netcdf_export(small_cube, tmp_path):
    out = tmp_path / "hh.nc"
    argv = ("--cube", small_cube, "--var", "hh_db", "--time", "2022-09-12", "--out", str(out))
    assert _export(*argv).returncode == 0
    info = json.loads(
        subprocess.run(
            ["gdalinfo", "-json", f"NETCDF:{out}:hh_db"], capture_output=True, text=True, check=True
        ).stdout
    )
    shape = _plain(small_cube).hh_db.shape[1:]
    assert info["size"] == [shape[1], shape[0]] and info["coordinateSystem"]["wkt"].startswith(
        "GEOGCRS"
    )
    assert info["geoTransform"][1] == pytest.approx(1 / 6000)


def test_a_failed_export_leaves_the_previous_file(tmp_path):
    from affine import Affine

    from sarcube.export import BandStyle, write_cog

    out = tmp_path / "map.tif"
    out.write_bytes(b"the previous map")

    def read(r0, r1, c0, c1):
        if r0 > 0:
            raise OSError("the store went away")
        return np.zeros((r1 - r0, c1 - c0), np.float32)

    with pytest.raises(OSError, match="went away"):
        transform = Affine(1e-4, 0, 140, 0, -1e-4, 36)
        style = BandStyle("float32", np.nan, "x")
        write_cog(str(out), read, (2048, 512), transform, style, block=1024)
    assert out.read_bytes() == b"the previous map"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.tif"]


def test_export_to_s3(small_cube, s3, tmp_path):
    import rasterio

    from sarcube.export import export_layer

    url = s3.url("maps/lulc.tif")
    done = export_layer(small_cube, "lulc", url, storage_options=s3.storage_options)
    assert done["path"] == url
    fs = s3.fs()
    local = tmp_path / "lulc.tif"
    local.write_bytes(fs.cat_file(url))
    (tmp_path / "lulc.tif.aux.xml").write_bytes(fs.cat_file(url + ".aux.xml"))
    with rasterio.open(local) as src:
        np.testing.assert_array_equal(src.read(1), _plain(small_cube).lulc.values)
    assert "water" in (tmp_path / "lulc.tif.aux.xml").read_text()


def test_bad_requests_name_what_was_expected(small_cube, tmp_path):
    from sarcube.errors import InputError
    from sarcube.export import export_layer

    with pytest.raises(InputError, match=r"--time 2030-01-01: no complete slice of that date; "):
        export_layer(small_cube, "hh_db", str(tmp_path / "a.tif"), time="2030-01-01")
    with pytest.raises(InputError, match="does not overlap the cube"):
        export_layer(small_cube, "lulc", str(tmp_path / "a.tif"), bbox=(10, 10, 11, 11))
    assert not any(Path(tmp_path).iterdir())
