"""JAXA delivery archives ingested in place (``.tar.gz`` mosaic tiles, ``.zip`` products), locally
and on S3: the cube equals the one ingested from the unpacked files, and the registry records the
same content hashes (the members' own bytes)."""

from __future__ import annotations

import hashlib
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sarcube.cube import open_cube
from sarcube.ingestion import ingest

MOSAIC_DIR = "alos2_mosaic_N23W161_2020"
# the tile's valid pixels lie in rows >= 3950 (see test_ingest.py): a small window of them
BBOX = (-161 + 1024 / 4500, 22.0, -161 + 2048 / 4500, 23 - 3840 / 4500)


def _registry(cube: str) -> dict:
    return json.loads((Path(cube) / "sarcube" / "zarr.json").read_text())["attributes"]["slices"]


def test_a_mosaic_tar_gz_ingests_in_place_like_its_unpacked_tile(realdata, tmp_path, dask_client):
    archive = realdata / MOSAIC_DIR / "N23W161_20_MOS_F02DAR.tar.gz"
    unpacked = realdata / MOSAIC_DIR / "N23W161_20_sl_HH_F02DAR.tif"
    before = sorted(os.listdir(realdata / MOSAIC_DIR))
    kw = dict(bbox=BBOX, resolution="1/4500", client=dask_client, progress=False)
    a = ingest([str(archive)], str(tmp_path / "a.zarr"), **kw)
    b = ingest([str(unpacked)], str(tmp_path / "b.zarr"), **kw)
    assert a.ok and a.ingested == b.ingested == ["N23W161_20_sl_HH_F02DAR"]
    got, want = open_cube(str(tmp_path / "a.zarr")), open_cube(str(tmp_path / "b.zarr"))
    np.testing.assert_array_equal(got.time.values, want.time.values)
    assert str(got.time.values[0])[:10] == "2020-09-09"  # the XML inside the archive
    np.testing.assert_array_equal(got.hh_db.values, want.hh_db.values)
    assert np.isfinite(got.hh_db.values).sum() > 10_000
    (ea,), (eb,) = (
        _registry(str(tmp_path / "a.zarr")).values(),
        _registry(str(tmp_path / "b.zarr")).values(),
    )
    sha = hashlib.sha256(unpacked.read_bytes()).hexdigest()
    assert ea["inputs"] == eb["inputs"] == {"N23W161_20_sl_HH_F02DAR": sha}
    # read in place: nothing written beside the archive (no GDAL .properties index)
    assert sorted(os.listdir(realdata / MOSAIC_DIR)) == before


def _zip_scenes(scenes: list[str], path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for s in scenes:
            z.write(s, f"product/{Path(s).name}")
        z.writestr("product/summary.txt", 'Odi_SceneId="synthetic"\n')
    return path


def test_a_zip_product_ingests_in_place_locally_and_on_s3(
    small_synth, small_cube, tmp_path, dask_client, s3
):
    zipped = _zip_scenes(small_synth.scene_urls, tmp_path / "delivery.zip")
    kw = dict(lulc=[f"{small_synth.out}/lulc"], client=dask_client, progress=False)
    report = ingest([str(zipped)], str(tmp_path / "z.zarr"), **kw)
    assert report.ok and len(report.ingested) == 3
    got, want = open_cube(str(tmp_path / "z.zarr")), open_cube(small_cube)
    np.testing.assert_array_equal(got.hh_db.values, want.hh_db.values)
    inputs = {d: e["inputs"] for d, e in _registry(str(tmp_path / "z.zarr")).items()}
    assert inputs == {d: e["inputs"] for d, e in _registry(small_cube).items()}
    # the same archive on S3, read in place through /vsizip//vsis3/
    fs = s3.fs()
    fs.put(str(zipped), f"{s3.bucket}/in/delivery.zip")
    fs.put(f"{small_synth.out}/lulc", f"{s3.bucket}/in/lulc", recursive=True)
    cube = s3.url("cubes/z.zarr")
    report = ingest(
        [s3.url("in/delivery.zip")],
        cube,
        lulc=[s3.url("in/lulc/*.tif")],
        storage_options=s3.storage_options,
        client=dask_client,
        progress=False,
    )
    assert report.ok and len(report.ingested) == 3, report.problems
    remote = open_cube(cube, storage_options=s3.storage_options)
    np.testing.assert_array_equal(remote.hh_db.values, want.hh_db.values)


def test_an_archive_without_an_hh_product_is_one_line(realdata, tmp_path, dask_client):
    from sarcube.sources import expand_urls

    fnf = realdata / "alos2_fnf_S16W150_2015" / "S16W150_15_FNF_F02DAR.tar.gz"
    urls, problems = expand_urls([str(fnf)])
    assert urls == [] and problems == [f"{fnf}: no HH scene or mosaic tile inside this archive"]
    with pytest.raises(Exception, match="no HH scene or mosaic tile inside this archive"):
        ingest([str(fnf)], str(tmp_path / "c.zarr"), bbox=BBOX, client=dask_client, progress=False)
