"""JAXA delivery archives ingested in place (``.tar.gz`` mosaic tiles, ``.zip`` products), locally
and on S3: the cube equals the one ingested from the unpacked files, and the registry records the
same content hashes (the members' own bytes)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest

from sarcube.cube import open_cube
from sarcube.ingestion import ingest
from sarcube.products import parse_scene_name

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


def _summary(scene: str, **override: str) -> str:
    """A JAXA summary.txt for a scene (the keys and layout of the real CEOS product's)."""
    n = parse_scene_name(scene)
    fields = {
        "Scs_SceneID": n.scene_id,
        "Pds_ProductID": n.product_code,
        "Pds_PixelSpacing": "25.000000",
        "Img_SceneCenterDateTime": f"{n.date:%Y%m%d} 01:02:03.456",
        "Img_OffNadirAngle": "32.5",
        "Pdi_L21ProductFileName01": Path(scene).name,
        "Lbi_ProcessLevel": n.level,
        "Lbi_ObservationDate": f"{n.date:%Y%m%d}",
        **override,
    }
    return "".join(f'{k}="{v}"\n' for k, v in fields.items())


def _leader(cf_db: float) -> bytes:
    """A minimal CEOS leader file: a descriptor record, then the radiometric data record (type
    code 50) with CF as F16.7 at bytes 21-36, as in the real product's LED file."""
    descriptor = struct.pack(">IBBBBI", 1, 11, 192, 18, 18, 720) + b" " * 708
    body = b"   1   1" + f"{cf_db:16.7f}".encode() + b" " * 64
    radiometric = struct.pack(">IBBBBI", 2, 18, 50, 18, 20, 12 + len(body)) + body
    return descriptor + radiometric


def _zip_scenes(
    scenes: list[str], path: Path, leader_cf: float | None = None, **override: str
) -> Path:
    """One JAXA product folder per scene (the scene, its summary.txt, optionally its leader)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as z:
        for s in scenes:
            n = parse_scene_name(s)
            z.write(s, f"{n.product_id}/{Path(s).name}")
            z.writestr(f"{n.product_id}/summary.txt", _summary(s, **override))
            if leader_cf is not None:
                z.writestr(f"{n.product_id}/LED-{n.product_id}", _leader(leader_cf))
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


def test_the_product_metadata_is_recorded_and_its_leader_cf_used(
    small_synth, small_cube, tmp_path, dask_client
):
    """summary.txt's acquisition time and angle land in the registry; the leader file's CF
    replaces the table's (-83 dB): -80 dB makes every backscatter value 3 dB higher."""
    kw = dict(lulc=[f"{small_synth.out}/lulc"], client=dask_client, progress=False)
    zipped = _zip_scenes(small_synth.scene_urls, tmp_path / "own_cf.zip", leader_cf=-80.0)
    report = ingest([str(zipped)], str(tmp_path / "cf.zarr"), **kw)
    assert report.ok and len(report.ingested) == 3, report.problems
    got, want = open_cube(str(tmp_path / "cf.zarr")), open_cube(small_cube)
    valid = np.isfinite(want.hh_db.values)
    assert valid.sum() > 1000
    np.testing.assert_array_equal(np.isfinite(got.hh_db.values), valid)
    np.testing.assert_allclose(got.hh_db.values[valid], want.hh_db.values[valid] + 3.0, atol=1e-4)
    for date, entry in _registry(str(tmp_path / "cf.zarr")).items():
        (src,) = entry["sources"]
        meta = src["product_metadata"]
        assert src["cf_db"] == -80.0 and meta["cf_db_source"] == "leader file"
        assert meta["scene_center_time"] == f"{date}T01:02:03.456000Z"
        assert meta["off_nadir_deg"] == 32.5 and meta["pixel_spacing_m"] == 25.0
        assert meta["summary"].startswith("zip://") and meta["summary"].endswith("::" + str(zipped))
    # without a leader file: the table's CF, and the registry says so
    for entry in _registry(small_cube).values():
        assert entry["sources"][0]["product_metadata"] == {"cf_db_source": "table"}


def test_a_summary_of_another_product_is_one_line_and_writes_nothing(
    small_synth, tmp_path, dask_client
):
    first = small_synth.scene_urls[0]
    zipped = _zip_scenes([first], tmp_path / "wrong.zip", Lbi_ObservationDate="20200101")
    cube = tmp_path / "w.zarr"
    with pytest.raises(Exception) as info:
        ingest([str(zipped)], str(cube), client=dask_client, progress=False)
    n = parse_scene_name(first)
    summary = f"zip://{n.product_id}/summary.txt::{zipped}"
    assert (
        f"{summary}: field Lbi_ObservationDate is '20200101' but the scene beside it "
        f"(zip://{n.product_id}/{Path(first).name}::{zipped}) is named for '{n.date:%Y%m%d}'"
    ) in str(info.value)
    assert not cube.exists()


def test_a_ceos_format_product_is_one_line(realdata, tmp_path, dask_client):
    product = (
        realdata / "alos2_ceos_L15_brazil_2014" / "0000022708_001001_ALOS2015976960-140909.zip"
    )
    with pytest.raises(Exception) as info:
        ingest([str(product)], str(tmp_path / "c.zarr"), client=dask_client, progress=False)
    assert (
        f"{product}: IMG-HH-ALOS2015976960-140909-FBDR1.5GUA is a CEOS-format image; sarcube "
        "reads the GeoTIFF delivery (order the product as GeoTIFF)"
    ) in str(info.value)
    assert not (tmp_path / "c.zarr").exists()
