"""JAXA product metadata files, parsed from the real ALOS-2 CEOS L1.5 product (its summary.txt and
leader file) and compared with values read off the files by hand."""

from __future__ import annotations

import datetime as dt
import re
import zipfile

import pytest

from sarcube.product_metadata import (
    ProductMetadataError,
    calibration_factor_from_leader,
    parse_summary,
    sibling_url,
)

PRODUCT = "alos2_ceos_L15_brazil_2014/0000022708_001001_ALOS2015976960-140909.zip"


@pytest.fixture(scope="module")
def product(realdata):
    return zipfile.ZipFile(realdata / PRODUCT)


def test_the_real_summary(product):
    s = parse_summary(product.read("summary.txt").decode(), "summary.txt")
    # the values as they stand in the file (see `unzip -p ... summary.txt`)
    assert (s.scene_id, s.product_code, s.level) == ("ALOS2015976960-140909", "FBDR1.5GUA", "1.5")
    assert s.observation_date == dt.date(2014, 9, 9)
    assert s.scene_center_time == dt.datetime(2014, 9, 9, 4, 33, 47, 52000)
    assert (s.off_nadir_deg, s.pixel_spacing_m, s.utm_zone) == (36.6, 6.25, 20)
    assert "IMG-HH-ALOS2015976960-140909-FBDR1.5GUA" in s.file_names
    assert len(s.file_names) == 5


def test_the_real_leader_files_calibration_factor(product):
    # PROVENANCE.md: "The LED radiometric record holds CF = -83.0"
    led = product.read("LED-ALOS2015976960-140909-FBDR1.5GUA")
    assert calibration_factor_from_leader(led, "LED") == -83.0
    # the volume directory file is CEOS too but has no radiometric record
    assert (
        calibration_factor_from_leader(product.read("VOL-ALOS2015976960-140909-FBDR1.5GUA"), "VOL")
        is None
    )
    assert calibration_factor_from_leader(b"not a CEOS file at all", "x") is None


def test_a_broken_calibration_field_names_the_file(product):
    led = bytearray(product.read("LED-ALOS2015976960-140909-FBDR1.5GUA"))
    at = led.index(b"     -83.0000000")
    led[at : at + 16] = b"       not-a-num"
    with pytest.raises(ProductMetadataError, match=r"^LED: the radiometric data record's "):
        calibration_factor_from_leader(bytes(led), "LED")


@pytest.mark.parametrize(
    "drop, message",
    [
        ("Scs_SceneID", "s.txt: field Scs_SceneID is missing (expected a JAXA product summary)"),
        ("Lbi_ObservationDate", "s.txt: field Lbi_ObservationDate is missing"),
    ],
)
def test_a_summary_without_a_required_field_names_it(product, drop, message):
    text = "\n".join(
        line
        for line in product.read("summary.txt").decode().splitlines()
        if not line.startswith(drop)
    )
    with pytest.raises(ProductMetadataError, match="^" + re.escape(message)):
        parse_summary(text, "s.txt")


def test_a_malformed_date_names_the_field(product):
    text = product.read("summary.txt").decode().replace('"20140909"', '"2014-09-09"')
    with pytest.raises(ProductMetadataError, match="field Lbi_ObservationDate is '2014-09-09'"):
        parse_summary(text, "s.txt")


def test_sibling_urls():
    assert sibling_url("/d/IMG-HH-x.tif", "summary.txt") == "/d/summary.txt"
    assert sibling_url("s3://b/p/IMG-HH-x.tif", "summary.txt") == "s3://b/p/summary.txt"
    assert sibling_url("zip://p/IMG-HH-x.tif::s3://b/a.zip", "summary.txt") == (
        "zip://p/summary.txt::s3://b/a.zip"
    )
    assert sibling_url("zip://IMG-HH-x.tif::/a.zip", "LED-x") == "zip://LED-x::/a.zip"
