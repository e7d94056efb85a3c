"""JAXA product names, checked against the published examples and the real CEOS product."""

from __future__ import annotations

import datetime as dt
import zipfile

import pytest

from sarcube.products import (
    ProductNameError,
    format_lulc_name,
    parse_lulc_name,
    parse_mosaic_name,
    parse_scene_name,
)


def test_design_example_scene_name():
    n = parse_scene_name("s3://bucket/x/IMG-HH-ALOS2237752900-181018-UBSR2.1GUD.tif")
    assert (n.orbit, n.frame, n.date) == (23775, 2900, dt.date(2018, 10, 18))
    assert (n.mode, n.look, n.level, n.processing, n.projection, n.direction) == (
        "UBS",
        "R",
        "2.1",
        "G",
        "U",
        "D",
    )
    assert n.filename() == "IMG-HH-ALOS2237752900-181018-UBSR2.1GUD.tif"


def test_real_ceos_product_names(realdata):
    z = zipfile.ZipFile(
        realdata / "alos2_ceos_L15_brazil_2014" / "0000022708_001001_ALOS2015976960-140909.zip"
    )
    summary = dict(
        line.split("=", 1) for line in z.read("summary.txt").decode().splitlines() if "=" in line
    )
    imgs = [n for n in z.namelist() if n.startswith("IMG-")]
    assert len(imgs) == 2
    for name in imgs:
        p = parse_scene_name(name)
        assert p.scene_id == summary["Scs_SceneID"].strip('"')
        assert p.product_code == summary["Pds_ProductID"].strip('"')
        assert p.level == summary["Lbi_ProcessLevel"].strip('"')
        assert f"{p.date:%Y%m%d}" == summary["Lbi_ObservationDate"].strip('"')
    assert {parse_scene_name(n).polarization for n in imgs} == {"HH", "HV"}


@pytest.mark.parametrize(
    "bad, fragment",
    [
        ("IMG-HH-ALOS2237752900-181018-UBSR2.1GUD.jp2", "naming rule"),
        ("scene.tif", "naming rule"),
        ("IMG-HH-ALOS2237752900-181318-UBSR2.1GUD.tif", "not a valid yymmdd"),
        ("IMG-HH-ALOS2237752900-181018-XYZR2.1GUD.tif", "unknown observation mode"),
    ],
)
def test_bad_scene_names_name_the_file(bad, fragment):
    with pytest.raises(ProductNameError) as e:
        parse_scene_name(f"/data/{bad}")
    assert bad in str(e.value) and fragment in str(e.value)


def test_mosaic_name_is_north_west_corner(realdata):
    tif = realdata / "alos2_mosaic_N23W161_2020" / "N23W161_20_sl_HH_F02DAR.tif"
    m = parse_mosaic_name(tif.name)
    assert (m.north, m.west, m.year, m.polarization, m.version) == (23, -161, 2020, "HH", "F02DAR")
    import rasterio

    with rasterio.open(tif) as ds:  # the tile's NW corner is what the name says
        assert ds.bounds.top == pytest.approx(23.0) and ds.bounds.left == pytest.approx(-161.0)


def test_lulc_names_round_trip():
    assert format_lulc_name(36, 140) == "LC_N36E140.tif"
    assert parse_lulc_name("LC_N36E140.tif").south == 36
    assert parse_lulc_name("gs://b/LC_S05W070.tif").west == -70
    with pytest.raises(ProductNameError, match="HR-LULC tile naming rule"):
        parse_lulc_name("LC_36_140.tif")
