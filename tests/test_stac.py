"""STAC records of the cube, a predictions store and a shard set, validated offline twice over:
against the STAC 1.1.0 JSON Schemas that pystac ships (``validate_dict``: its local copies of the
core schemas, no network) and with stac-pydantic's models; the extensions' fields are read back
through pystac's own extension classes (the extension JSON Schemas live only online, and this
machine has no network); their figures are checked against the artefacts' own files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("stac_pydantic")


def _valid_core_stac(d: dict) -> None:
    """The record against pystac's shipped STAC 1.1.0 core JSON Schemas (offline)."""
    from pystac.validation import validate_dict

    (schema,) = validate_dict(d, extensions=[])  # raises STACValidationError when invalid
    assert schema.startswith("https://schemas.stacspec.org/v1.1.0/")


def test_the_cube_collection_is_valid_stac_with_its_dates_and_grid(small_cube, tmp_path):
    import shutil

    from stac_pydantic import Collection

    from sarcube.stac import write_cube_collection

    cube = tmp_path / "cube.zarr"
    shutil.copytree(small_cube, cube)
    target = write_cube_collection(str(cube))
    d = json.loads(Path(target).read_text())
    Collection.model_validate(d)
    _valid_core_stac(d)
    import pystac
    from pystac.extensions.datacube import DatacubeExtension

    cube_ext = DatacubeExtension.ext(pystac.Collection.from_dict(d))
    assert cube_ext.dimensions["x"].step == pytest.approx(1 / 6000)
    assert cube_ext.variables["hh_db"].unit == "dB"
    registry = json.loads((cube / "sarcube" / "zarr.json").read_text())["attributes"]["slices"]
    dims = d["cube:dimensions"]
    assert [v[:10] for v in dims["time"]["values"]] == sorted(registry)
    root = json.loads((cube / "zarr.json").read_text())["attributes"]
    assert d["extent"]["spatial"]["bbox"][0] == pytest.approx(
        [root[f"geospatial_{k}"] for k in ("lon_min", "lat_min", "lon_max", "lat_max")]
    )
    assert dims["x"]["step"] == pytest.approx(1 / 6000) and dims["y"]["reference_system"] == 4326
    assert d["cube:variables"]["hh_db"]["unit"] == "dB"
    assert any("datacube" in e for e in d["stac_extensions"])
    from sarcube.cube import cube_attrs, open_group
    from sarcube.index import cube_fingerprint

    assert d["sarcube:fingerprint"] == cube_fingerprint(cube_attrs(open_group(str(cube))))
    assert write_cube_collection(str(cube)) == target  # rebuilt: the same bytes
    assert json.loads(Path(target).read_text()) == d


def test_a_predictions_store_gets_a_valid_item_with_its_classes(small_cube, tmp_path):
    import torch
    from stac_pydantic import Item

    from sarcube.classes import NINE_CLASS_NAMES
    from training.predict import Predictor, predict

    torch.manual_seed(0)
    pr = Predictor(torch.nn.Conv2d(1, 9, 1).eval(), "lulc", -12.0, 5.0, sha256="ab" * 32)
    out = tmp_path / "maps.zarr"
    cog = tmp_path / "map.tif"
    predict(small_cube, pr, str(out), time="2022-09-12", cog=str(cog), progress=False, panel=False)
    d = json.loads((out / "item.json").read_text())
    Item.model_validate(d)
    _valid_core_stac(d)
    import pystac
    from pystac.extensions.classification import ClassificationExtension
    from pystac.extensions.projection import ProjectionExtension
    from pystac.extensions.raster import RasterExtension

    item = pystac.Item.from_dict(d)
    assert ProjectionExtension.ext(item).code == "EPSG:4326"
    asset = item.assets["zarr"]
    assert RasterExtension.ext(asset).bands[0].nodata == 255
    classes = ClassificationExtension.ext(asset).classes or []
    assert [c.description for c in classes if not c.nodata] == list(NINE_CLASS_NAMES)
    assert d["properties"]["sarcube:dates"] == ["2022-09-12"]
    assert d["properties"]["datetime"].startswith("2022-09-12")
    zarr_asset, cog_asset = d["assets"]["zarr"], d["assets"]["cog"]
    assert cog_asset["href"] == str(cog) and cog.exists()
    names = [c["description"] for c in zarr_asset["classification:classes"] if not c.get("nodata")]
    assert names == list(NINE_CLASS_NAMES)
    assert zarr_asset["raster:bands"][0]["nodata"] == 255
    assert d["properties"]["proj:code"] == "EPSG:4326"
    shape = json.loads((out / "pred_lulc" / "zarr.json").read_text())["shape"][1:]
    assert d["properties"]["proj:shape"] == shape


def test_a_shard_set_gets_a_valid_item_that_lists_every_shard(small_shards, tmp_path):
    import shutil

    from stac_pydantic import Item

    from sarcube.stac import write_shards_item

    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    d = json.loads(Path(write_shards_item(str(shards))).read_text())
    Item.model_validate(d)
    _valid_core_stac(d)
    manifest = json.loads((shards / "manifest.json").read_text())
    listed = {s["name"] for sp in manifest["splits"].values() for s in sp["shards"]}
    assert {a["href"] for k, a in d["assets"].items() if k != "manifest"} == listed
    assert sorted(p.name for p in shards.glob("*.tar")) == sorted(listed)
    for name, sp in manifest["splits"].items():
        assert d["properties"]["sarcube:splits"][name]["samples"] == sp["samples"]
    assert d["properties"]["sarcube:cube"]["fingerprint"] == manifest["cube"]["fingerprint"]
