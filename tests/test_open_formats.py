"""sarcube's artefacts read by other people's tools, with no sarcube code on the reading side:
plain xarray / rioxarray and zarr-python on the cube, netCDF (scipy, h5netcdf) and cf_xarray on a
subset, geopandas on the patch index, GDAL's command line on the COG (tests/test_predict.py), and
the newcomer's entry points (``python -m sarcube``, ``-v`` after the subcommand)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

BACKSCATTER = "surface_backwards_scattering_coefficient_of_radar_wave"


def _registry(cube: str) -> dict:
    """The slice registry straight from the metadata group's zarr.json (no sarcube code)."""
    return json.loads((Path(cube) / "sarcube" / "zarr.json").read_text())["attributes"]["slices"]


def test_plain_xarray_opens_the_cube_without_a_warning_and_sees_no_data(small_cube):
    import rioxarray  # noqa: F401  (the .rio accessor)
    import xarray as xr
    import zarr

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. xarray's "consolidated metadata" RuntimeWarning
        ds = xr.open_zarr(small_cube)
    assert ds.rio.crs.to_epsg() == 4326
    assert np.isnan(ds.hh_db.rio.nodata) and np.isnan(ds.hh_db.rio.encoded_nodata)
    assert ds.lulc.rio.encoded_nodata == 0
    assert ds.hh_db.attrs["standard_name"] == BACKSCATTER and ds.hh_db.attrs["units"] == "dB"
    # no-data as plain readers see it equals the raw Zarr arrays' fill values
    raw = zarr.open_group(small_cube, mode="r", use_consolidated=False)
    lulc_raw = np.asarray(raw["lulc"][:])
    np.testing.assert_array_equal(np.isnan(ds.lulc.values), lulc_raw == 0)
    np.testing.assert_array_equal(ds.lulc.values[lulc_raw > 0], lulc_raw[lulc_raw > 0])
    # the complete slices, told apart without sarcube: slice_status == 1 exactly at the
    # registry's complete slots
    complete = sorted(e["time_index"] for e in _registry(small_cube).values())
    assert "slice_status" in ds.coords
    assert list(np.flatnonzero(ds.slice_status.values == 1)) == complete
    assert ds.slice_status.attrs["flag_meanings"].split()[1] == "complete"


def test_a_slot_being_written_is_invisible_or_flagged_for_plain_readers(small_cube, tmp_path):
    import xarray as xr
    import zarr

    from sarcube.cube import publish_view

    cube = str(tmp_path / "cube.zarr")
    shutil.copytree(small_cube, cube)
    n = len(_registry(cube))
    root = zarr.open_group(cube, mode="r+", use_consolidated=False)
    root["hh_db"].resize((n + 1, *root["hh_db"].shape[1:]))
    root["time"].resize((n + 1,))
    root["hh_db"][n] = np.float32(-7.0)  # a writer's half-done slot, not committed
    plain = xr.open_zarr(cube)
    assert plain.sizes["time"] == n  # the consolidated view: the last commit's shapes
    publish_view(root)  # a later commit (of other dates) publishes the longer axis
    plain = xr.open_zarr(cube)
    assert plain.sizes["time"] == n + 1 and int(plain.slice_status[n]) == 0
    good = plain.hh_db.where(plain.slice_status == 1)
    assert np.isnan(good.isel(time=n)).all()


@pytest.mark.parametrize("engine", ["scipy", "h5netcdf"])
def test_a_subset_exports_to_netcdf_and_reads_back_with_cf_metadata(small_cube, tmp_path, engine):
    import cf_xarray  # noqa: F401  (the .cf accessor)
    import xarray as xr

    ds = xr.open_zarr(small_cube).isel(time=slice(0, 2), y=slice(0, 300), x=slice(100, 400))
    path = tmp_path / f"subset-{engine}.nc"
    ds.to_netcdf(path, engine=engine)
    back = xr.open_dataset(path, engine=engine)
    np.testing.assert_array_equal(back.hh_db.values, ds.hh_db.values)
    np.testing.assert_array_equal(back.lulc.values, ds.lulc.values)
    np.testing.assert_array_equal(back.time.values, ds.time.values)
    assert back.cf.standard_names[BACKSCATTER] == ["hh_db"]
    assert back.cf.axes["X"] == ["x"] and back.cf.axes["Y"] == ["y"]
    assert back.hh_db.attrs["grid_mapping"] == "spatial_ref"
    assert "crs_wkt" in back.spatial_ref.attrs
    assert back.attrs["Conventions"].startswith("CF-")


def test_the_patch_index_is_geoparquet_for_geopandas(small_cube, tmp_path):
    import geopandas as gpd
    from helpers.shard_index import build_index

    from sarcube.index import write_index

    df, meta = build_index(small_cube)
    write_index(df, str(tmp_path / "index.parquet"), meta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "Missing geo metadata"
        gdf = gpd.read_parquet(tmp_path / "index.parquet")
    assert gdf.crs.to_epsg() == 4326 and len(gdf) == len(df)
    bounds = gdf.geometry.bounds.to_numpy()
    np.testing.assert_allclose(bounds, df[["lon_min", "lat_min", "lon_max", "lat_max"]].to_numpy())
    # a 256-pixel patch at 1/6000 degree: every footprint is a 256/6000-degree square
    np.testing.assert_allclose(bounds[:, 2] - bounds[:, 0], 256 / 6000)
    np.testing.assert_allclose(bounds[:, 3] - bounds[:, 1], 256 / 6000)
    assert gdf.geometry.geom_type.eq("Polygon").all()


def test_a_cube_of_the_old_format_is_one_clear_line(tmp_path):
    import zarr

    from sarcube.cube import CubeError, open_cube

    root = zarr.open_group(str(tmp_path / "old.zarr"), mode="w", zarr_format=3)
    root.attrs.update({"format": "sarcube-cube/1", "grid": {}})
    with pytest.raises(CubeError, match=r"older sarcube \(format 'sarcube-cube/1'"):
        open_cube(str(tmp_path / "old.zarr"))


def test_python_m_sarcube_and_verbose_after_the_subcommand(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "sarcube", "--version"], capture_output=True, text=True
    )
    assert p.returncode == 0 and p.stdout.startswith("sarcube ")
    p = subprocess.run(
        [sys.executable, "-m", "sarcube", "unlock", str(tmp_path / "nothing.zarr"), "-v"],
        capture_output=True,
        text=True,
    )
    assert p.returncode == 0, p.stderr
    assert "not locked" in p.stdout


@pytest.mark.skipif(
    shutil.which("gdalinfo") is None, reason="needs GDAL's command line: apt-get install gdal-bin"
)
def test_gdalinfo_reads_the_cube_grid_of_an_exported_subset(small_cube, tmp_path):
    """The netCDF export of a subset, read by GDAL's own command line (not rasterio)."""
    import xarray as xr

    ds = xr.open_zarr(small_cube)[["hh_db"]].isel(time=[0], y=slice(0, 256), x=slice(0, 256))
    path = tmp_path / "subset.nc"
    ds.to_netcdf(path, engine="h5netcdf")
    info = json.loads(
        subprocess.run(
            ["gdalinfo", "-json", f"NETCDF:{path}:hh_db"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert info["size"] == [256, 256]
    gt = info["geoTransform"]
    assert gt[1] == pytest.approx(1 / 6000) and gt[5] == pytest.approx(-1 / 6000)
    assert gt[0] == pytest.approx(float(ds.x[0]) - 0.5 / 6000)
    assert gt[3] == pytest.approx(float(ds.y[0]) + 0.5 / 6000)


def test_the_readmes_geotiff_snippet_writes_one_date_with_nodata(small_cube, tmp_path):
    """README (Ingest, troubleshooting): one date of the cube as a GeoTIFF, read by rasterio."""
    import rasterio

    from sarcube import open_cube

    path = tmp_path / "hh.tif"
    hh = open_cube(small_cube).hh_db.isel(time=0)
    hh.rio.write_nodata(np.nan, encoded=True).rio.to_raster(path)
    with rasterio.open(path) as src:
        assert np.isnan(src.nodata) and src.crs.to_epsg() == 4326
        data = src.read(1)
        assert src.transform.a == pytest.approx(1 / 6000)
    np.testing.assert_array_equal(data, hh.values)


def test_webdataset_reads_the_shards_as_the_manifest_schema_says(small_shards):
    """webdataset's own pipeline (and numpy, json) on the shards; the manifest's sample_schema
    is what the samples hold."""
    import io

    import webdataset as wds

    manifest = json.loads((Path(small_shards) / "manifest.json").read_text())
    schema = manifest["sample_schema"]
    for split in ("pretrain", "train"):
        urls = [str(Path(small_shards) / s["name"]) for s in manifest["splits"][split]["shards"]]
        n = 0
        for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
            n += 1
            meta = json.loads(sample["json"])
            assert sorted(meta) == schema["json"]["keys"]
            sar = np.load(io.BytesIO(sample["sar.npy"]), allow_pickle=False)
            assert sar.dtype == np.dtype(schema["sar.npy"]["dtype"]) and sar.shape == (256, 256)
            assert sample["__key__"] == meta["id"]
            if split in schema["lulc.npy"]["splits"]:
                lulc = np.load(io.BytesIO(sample["lulc.npy"]), allow_pickle=False)
                assert lulc.dtype == np.uint8 and lulc.shape == (256, 256) and lulc.max() <= 14
            else:
                assert "lulc.npy" not in sample
        assert n == manifest["splits"][split]["samples"]
