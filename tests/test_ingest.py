"""Ingest correctness against independent computations.

- SAR: the cube's hh_db equals GDAL warping each WHOLE scene's linear power (average, one step)
  onto the cube grid, then 10·log10 — while sarcube warps shard by shard, strip by strip.
- A hand-made EPSG:4326 scene on the 1/12000° grid: each cube cell is the numpy mean of its 2×2
  source pixels in linear power, with the footprint-edge rule (< 50 % no data -> mean of the
  valid ones).
- The real PALSAR-2 mosaic tile: on its own grid, hh_db == 20·log10(DN) − 83 exactly.
- Labels: an exact copy on coinciding grids; the mode rule on a hand-made example.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest
import rasterio
import xarray as xr
import zarr
from affine import Affine
from rasterio.warp import Resampling, reproject

from sarcube.cube import MisalignedWriteError, open_cube, open_group, write_region
from sarcube.grid import CubeGrid
from sarcube.ingestion import ingest

MOSAIC = "alos2_mosaic_N23W161_2020/N23W161_20_sl_HH_F02DAR.tif"


def reference_db(scene_url: str, grid: CubeGrid) -> np.ndarray:
    """GDAL warp of the whole scene's linear power onto the whole cube grid, then dB."""
    with rasterio.open(scene_url) as ds:
        dn = ds.read(1).astype(np.float64)
        power = np.where(dn == 0, np.nan, dn**2 * 10 ** (-83.0 / 10))
        out = np.full(grid.shape, np.nan, dtype=np.float64)
        reproject(
            power,
            out,
            src_transform=ds.transform,
            src_crs=ds.crs,
            dst_transform=grid.transform,
            dst_crs="EPSG:4326",
            resampling=Resampling.average,
            src_nodata=np.nan,
            dst_nodata=np.nan,
            NODATA_VALUES_PCT_THRESHOLD=50,
        )
    return 10 * np.log10(out)


def test_hh_db_equals_whole_scene_gdal_warp(small_synth, small_cube):
    cube = open_cube(small_cube)
    grid = cube.sarcube.grid
    assert cube.sizes["time"] == 3
    for url, t in zip(small_synth.scene_urls, cube.time.values, strict=True):
        ref = reference_db(url, grid)
        got = cube.hh_db.sel(time=t).values
        assert np.array_equal(np.isnan(got), np.isnan(ref)), "no-data masks differ"
        valid = ~np.isnan(ref)
        assert valid.mean() > 0.5
        assert np.abs(got[valid] - ref[valid]).max() < 0.05


def _write(
    path: Path, data: np.ndarray, transform: Affine, crs="EPSG:4326", nodata=0, **extra
) -> Path:
    prof = dict(
        driver="GTiff",
        width=data.shape[1],
        height=data.shape[0],
        count=1,
        dtype=data.dtype.name,
        crs=crs,
        transform=transform,
        nodata=nodata,
        **extra,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    with rasterio.open(path, "w", **prof) as ds:
        ds.write(data, 1)
    return path


def test_hand_made_scene_two_by_two_means_and_edge_rule(tmp_path, dask_client):
    """Source pixel 1/12000°, cube cell 1/6000°: each cell averages a 2×2 block in linear power."""
    rng = np.random.default_rng(7)
    h, w = 512, 512  # source pixels -> 256 × 256 cube cells
    dn = rng.integers(200, 5000, size=(h, w)).astype(np.uint16)
    # Footprint edge: in the first cube row, cell j has (j % 5) of its 4 source pixels at no data
    # (0..4), laid out in raster order.
    for j in range(256):
        k = j % 5
        block = dn[0:2, 2 * j : 2 * j + 2].reshape(-1)
        block[:k] = 0
        dn[0:2, 2 * j : 2 * j + 2] = block.reshape(2, 2)
    west, north = 140.0, 36.0
    scene = _write(
        tmp_path / "in" / "IMG-HH-ALOS2448450000-220912-FBSR2.1GUD.tif",
        dn,
        Affine(1 / 12000, 0, west, 0, -1 / 12000, north),
    )
    cube_url = str(tmp_path / "cube.zarr")
    ingest(
        [str(scene)],
        cube_url,
        bbox=(west, north - h / 12000, west + w / 12000, north),
        client=dask_client,
        progress=False,
    )
    got = open_cube(cube_url).hh_db.isel(time=0).values
    p = np.where(dn == 0, np.nan, dn.astype(np.float64) ** 2 * 10 ** (-8.3))
    blocks = p.reshape(256, 2, 256, 2)
    valid_n = np.isfinite(blocks).sum(axis=(1, 3))
    mean = np.nansum(blocks, axis=(1, 3)) / np.maximum(valid_n, 1)
    expected = np.where(
        valid_n >= 3, 10 * np.log10(np.where(valid_n > 0, mean, 1)), np.nan
    )  # < 50 % no data
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    np.testing.assert_allclose(got, expected, atol=1e-4, equal_nan=True)
    # the rule on the edge row, by hand: 0 or 1 no-data pixels of 4 -> valid; 2, 3, 4 -> no data
    assert [bool(np.isfinite(got[0, j])) for j in range(5)] == [True, True, False, False, False]


def test_real_palsar2_mosaic_on_its_own_grid(realdata, tmp_path, dask_client):
    tif = realdata / MOSAIC
    # The tile's valid pixels (4.4 %) lie in rows ≥ 3950: take rows 3840..4500, cols 1024..4352.
    n = 4500
    bbox = (-161 + 1024 / n, 22.0, -161 + 4352 / n, 23 - 3840 / n)
    cube_url = str(tmp_path / "mosaic.zarr")
    report = ingest(
        [str(tif)], cube_url, bbox=bbox, resolution="1/4500", client=dask_client, progress=False
    )
    assert report.ingested == ["N23W161_20_sl_HH_F02DAR"] and report.ok
    cube = open_cube(cube_url)
    assert str(cube.time.values[0])[:10] == "2020-09-09"  # from the JAXA XML beside the tile
    with rasterio.open(tif) as ds:
        dn = ds.read(1)[3840:4500, 1024:4352].astype(np.float64)
    expected = np.where(dn == 1, np.nan, 20 * np.log10(dn) - 83.0)  # mosaic no data is DN 1
    got = cube.hh_db.isel(time=0).values[: dn.shape[0], : dn.shape[1]]
    assert np.array_equal(np.isnan(got), np.isnan(expected))
    assert np.isfinite(expected).sum() > 800_000
    np.testing.assert_allclose(got, expected, atol=1e-4, equal_nan=True)
    assert np.isnan(cube.hh_db.isel(time=0).values[dn.shape[0] :]).all()  # chunk padding is no data


def test_labels_exact_copy_on_coinciding_grids(small_synth, tmp_path, dask_client):
    cube_url = str(tmp_path / "native.zarr")
    ingest(
        [],
        cube_url,
        lulc=[f"{small_synth.out}/lulc"],
        resolution="1/12000",
        client=dask_client,
        progress=False,
    )
    cube = open_cube(cube_url)
    (tile,) = small_synth.lulc_urls
    with rasterio.open(tile) as ds:
        codes = ds.read(1)
        assert cube.rio.transform().c == pytest.approx(ds.transform.c, abs=1e-12)
        assert cube.rio.transform().f == pytest.approx(ds.transform.f, abs=1e-12)
    got = cube.lulc.values
    np.testing.assert_array_equal(got[: codes.shape[0], : codes.shape[1]], codes)
    assert (got[codes.shape[0] :] == 0).all() and (got[:, codes.shape[1] :] == 0).all()


def test_label_mode_on_a_hand_made_example(tmp_path, dask_client):
    # 4 × 8 HR-LULC pixels -> 2 × 4 cube cells of 2 × 2 pixels each.
    codes = np.array(
        [
            [3, 3, 2, 4, 0, 0, 1, 6],
            [3, 5, 4, 2, 0, 7, 6, 1],
            [9, 9, 5, 5, 0, 0, 8, 8],
            [9, 1, 6, 6, 0, 0, 8, 8],
        ],
        dtype=np.uint8,
    )
    expected = np.array(
        [
            [
                3,  # three 3s
                4,  # 2 and 4 tie at 2; 4 reaches two first in raster order (2, 4, 4 ...)
                7,  # no data ignored: only 7 is left
                6,
            ],  # 1 and 6 tie; 6 reaches two first (1, 6, 6)
            [9, 5, 0, 8],
        ],
        dtype=np.uint8,
    )
    # place it at 140.5°E, 36.5°N inside an otherwise empty 1/12000° tile window
    tile = _write(
        tmp_path / "lulc" / "LC_N36E140.tif",
        codes,
        Affine(1 / 12000, 0, 140.5, 0, -1 / 12000, 36.5),
    )
    cube_url = str(tmp_path / "mode.zarr")
    ingest([], cube_url, lulc=[str(tile)], client=dask_client, progress=False)
    got = open_cube(cube_url).lulc.values[:2, :4]
    np.testing.assert_array_equal(got, expected)


def test_s3_round_trip_through_a_process_cluster(s3, small_synth, small_cube, dask_client):
    fs = s3.fs()
    fs.put(f"{small_synth.out}/scenes", f"{s3.bucket}/in/scenes", recursive=True)
    fs.put(f"{small_synth.out}/lulc", f"{s3.bucket}/in/lulc", recursive=True)
    cube_url = s3.url("cubes/small.zarr")
    report = ingest(
        [s3.url("in/scenes/")],
        cube_url,
        lulc=[s3.url("in/lulc/*.tif")],
        storage_options=s3.storage_options,
        client=dask_client,
        progress=False,
    )
    assert report.ok and len(report.ingested) == 3
    remote = open_cube(cube_url, storage_options=s3.storage_options)
    local = open_cube(small_cube)
    xr.testing.assert_equal(remote.hh_db.load(), local.hh_db.load())
    np.testing.assert_array_equal(remote.lulc.values, local.lulc.values)
    assert fs.exists(f"{s3.bucket}/cubes/small.zarr/zarr.json")


def test_open_cube_selection_crs_and_patch_access(small_cube):
    cube = open_cube(small_cube)
    assert cube.rio.crs.to_epsg() == 4326
    assert cube.hh_db.attrs["units"] == "dB"
    grid = cube.sarcube.grid
    t = cube.rio.transform()
    assert (t.a, t.e) == pytest.approx((1 / 6000, -1 / 6000))
    sub = cube.sel(time="2022-09", y=slice(36.08, 36.03), x=slice(140.31, 140.36))
    assert sub.sizes["time"] == 1 and sub.sizes["y"] == 300 and sub.sizes["x"] == 300
    assert sub.x.min() >= 140.31 and sub.y.max() <= 36.08
    p = cube.sarcube.patch(0, 1, 0)
    np.testing.assert_array_equal(p.hh_db.values, cube.hh_db.isel(time=0).values[256:512, 0:256])
    assert cube.sarcube.patch_shape == (grid.height // 256, grid.width // 256)
    w, s, e, n = cube.sarcube.patch_bbox(0, 0)
    assert cube.sarcube.patches_in_bbox((w, s, e, n)) == [(0, 0)]
    # the GeoTIFF rioxarray writes from the cube carries the CRS and grid GDAL reads back
    path = Path(small_cube).parent / "slice.tif"
    cube.hh_db.isel(time=0).rio.to_raster(path)
    with rasterio.open(path) as ds:
        assert ds.crs.to_epsg() == 4326 and ds.transform.almost_equals(grid.transform)


def test_misaligned_writes_are_refused(tmp_path):
    arr = zarr.create_array(
        str(tmp_path / "a.zarr"),
        shape=(1, 1024, 1024),
        chunks=(1, 256, 256),
        shards=(1, 512, 512),
        dtype="float32",
        fill_value=np.nan,
    )
    with pytest.raises(MisalignedWriteError, match="not aligned"):
        write_region(
            arr, (slice(0, 1), slice(256, 768), slice(0, 512)), np.ones((1, 512, 512), "f4")
        )
    assert np.isnan(arr[:]).all()  # nothing written
    write_region(arr, (slice(0, 1), slice(512, 1024), slice(0, 512)), np.ones((1, 512, 512), "f4"))
    assert arr[0, 512:, :512].min() == 1.0


def test_all_nan_chunks_are_not_stored(small_synth, tmp_path, dask_client):
    cube_url = tmp_path / "unsharded.zarr"
    w, s, e, n = small_synth.record["bbox"]
    # the cube reaches 0.15° east of the scene's footprint: chunks there are all NaN
    ingest(
        [small_synth.scene_urls[0]],
        str(cube_url),
        bbox=(w, s, e + 0.15, n),
        shard_chunks=1,
        client=dask_client,
        progress=False,
    )
    hh = open_cube(str(cube_url)).hh_db.isel(time=0).values
    chunks_with_data = {
        (r, c)
        for r in range(hh.shape[0] // 256)
        for c in range(hh.shape[1] // 256)
        if np.isfinite(hh[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]).any()
    }
    stored = {
        tuple(int(v) for v in p.relative_to(cube_url / "hh_db" / "c" / "0").parts)
        for p in (cube_url / "hh_db" / "c" / "0").rglob("*")
        if p.is_file()
    }
    assert stored == chunks_with_data
    assert len(stored) < (hh.shape[0] // 256) * (hh.shape[1] // 256)  # some chunk is all NaN


def test_registry_records_scenes_and_hashes(small_synth, small_cube):
    import hashlib

    slices = open_group(small_cube)["sarcube"].attrs["slices"]
    assert sorted(slices) == ["2022-09-12", "2022-10-10", "2022-11-07"]
    for url in small_synth.scene_urls:
        date = dt.datetime.strptime(Path(url).name.split("-")[3], "%y%m%d").date().isoformat()
        entry = slices[date]
        assert entry["status"] == "complete"
        (pid,) = entry["scenes"]
        assert Path(url).name == f"IMG-HH-{pid}.tif"
        assert entry["inputs"][pid] == hashlib.sha256(Path(url).read_bytes()).hexdigest()
