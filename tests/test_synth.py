"""The synthetic generator, checked against independent expectations:

- files parse with the JAXA naming rules and open with rasterio with the right CRS/grid/dtype;
- per-class median σ⁰ recovered from DN with the −83 dB formula, where the class of each scene
  pixel comes from GDAL's own (nearest) warp of the label tiles onto the scene grid;
- speckle statistics of homogeneous water match Gamma(L, 1/L);
- label tiles sit exactly on the 1/12000° grid and are named by their SW corner;
- byte-identical re-runs; class shares close to the real map's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from rasterio.warp import Resampling, reproject
from scipy import ndimage, stats

from sarcube.classes import JAPAN_LAND_SHARES_PCT
from sarcube.products import parse_lulc_name, parse_scene_name
from sarcube.synth import SynthError, synthesize

# West shore of Lake Kasumigaura: water, paddy, cropland, towns, forest (real template).
TEMPLATE_BBOX = (140.15, 36.03, 140.15 + 1800 / 12000, 36.03 + 1320 / 12000)
MEDIAN_TOL_DB = 1.5
LOOKS = 3.0


@pytest.fixture(scope="module")
def template_synth(tmp_path_factory, hrlulc_250m):
    out = tmp_path_factory.mktemp("template_synth")
    return synthesize(
        str(out), bbox=TEMPLATE_BBOX, lulc_template=hrlulc_250m, seed=5, looks=LOOKS, progress=False
    )


@pytest.fixture(params=["procedural", "template"])
def synth(request, small_synth):
    return (
        small_synth if request.param == "procedural" else request.getfixturevalue("template_synth")
    )


def labels_on_scene_grid(lulc_urls, scene_url) -> np.ndarray:
    """Nearest-neighbour warp of every label tile onto the scene grid, by GDAL (0 = none)."""
    with rasterio.open(scene_url) as sc:
        dst = np.zeros((sc.height, sc.width), dtype=np.uint8)
        for url in lulc_urls:
            with rasterio.open(url) as lt:
                part = np.zeros_like(dst)
                reproject(
                    rasterio.band(lt, 1),
                    part,
                    dst_transform=sc.transform,
                    dst_crs=sc.crs,
                    resampling=Resampling.nearest,
                    src_nodata=0,
                    dst_nodata=0,
                )
                dst = np.where(part > 0, part, dst)
    return dst


def sha256(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def test_scene_files_follow_the_naming_rule_and_grid(synth):
    rec = synth.record
    assert len(synth.scene_urls) == len(rec["dates"]) == 3
    for url, meta in zip(synth.scene_urls, rec["scenes"], strict=True):
        name = parse_scene_name(url)
        assert str(name.date) == meta["date"]
        assert (name.level, name.processing, name.projection, name.polarization) == (
            "2.1",
            "G",
            "U",
            "HH",
        )
        with rasterio.open(url) as ds:
            assert ds.crs.to_epsg() == 32654  # UTM 54N for 140°E
            assert ds.dtypes == ("uint16",) and ds.count == 1 and ds.nodata == 0
            assert ds.res == (6.25, 6.25)
            dn = ds.read(1)
        valid = dn > 0
        # a tilted swath: valid inside, DN 0 in the corners
        assert 0.5 < valid.mean() < 0.95
        assert not valid[0, 0] and not valid[-1, -1] and valid[dn.shape[0] // 2, dn.shape[1] // 2]


def test_label_tiles_on_the_hrlulc_grid_named_by_sw_corner(synth):
    west, _south, east, _north = synth.record["bbox"]
    for url in synth.lulc_urls:
        tile = parse_lulc_name(url)
        with rasterio.open(url) as ds:
            assert ds.crs.to_epsg() == 4326 and ds.dtypes == ("uint8",) and ds.nodata == 0
            t = ds.transform
            assert t.a == pytest.approx(1 / 12000, abs=1e-15) and t.e == pytest.approx(
                -1 / 12000, abs=1e-15
            )
            # origin exactly on the national 1/12000° grid
            for v in (t.c * 12000, t.f * 12000):
                assert abs(v - round(v)) < 1e-6
            b = ds.bounds
            # inside the 1° tile the name gives (SW corner), and cropped to the region
            assert tile.south <= b.bottom < b.top <= tile.south + 1 + 1e-9
            assert tile.west <= b.left < b.right <= tile.west + 1 + 1e-9
            assert b.left >= west - 1e-4 and b.right <= east + 1e-4
            assert ds.colormap(1)[1][:3] == (0, 0, 100)  # JAXA palette: water
            assert ds.profile["compress"] == "deflate" and ds.profile["tiled"]
            codes = np.unique(ds.read(1))
            assert set(codes.tolist()) <= set(range(15))


def test_per_class_median_sigma0_from_dn(synth):
    rec = synth.record
    checked = 0
    for url, meta in zip(synth.scene_urls, rec["scenes"], strict=True):
        table = rec["sigma0_db_by_date"][meta["date"]]
        labels = labels_on_scene_grid(synth.lulc_urls, url)
        with rasterio.open(url) as ds:
            dn = ds.read(1)
        db = 20 * np.log10(np.maximum(dn, 1).astype(np.float64)) - 83.0  # σ⁰ = 10·log10(DN²) − 83
        for code in range(1, 15):
            cls = ndimage.binary_erosion(labels == code, iterations=2) & (dn > 0)
            if cls.sum() < 2000:
                continue
            med = float(np.median(db[cls]))
            assert abs(med - table[str(code)]) <= MEDIAN_TOL_DB, (
                meta["date"],
                code,
                med,
                table[str(code)],
            )
            checked += 1
    assert checked >= 9  # at least 3 classes per date are big enough to check


@pytest.fixture(scope="module")
def lake_synth(tmp_path_factory):
    """A hand-made 250 m template: the west half of 140–141°E × 36–37°N is a lake (code 1),
    the east half forest (code 6); the synthetic scenes straddle the shore."""
    from affine import Affine

    tmp = tmp_path_factory.mktemp("lake")
    codes = np.full((480, 480), 6, dtype=np.uint8)
    codes[:, :240] = 1
    profile = dict(
        driver="GTiff",
        width=480,
        height=480,
        count=1,
        dtype="uint8",
        nodata=0,
        crs="EPSG:4326",
        transform=Affine(1 / 480, 0, 140.0, 0, -1 / 480, 37.0),
    )
    with rasterio.open(tmp / "template.tif", "w", **profile) as ds:
        ds.write(codes, 1)
    return synthesize(
        str(tmp / "out"),
        bbox=(140.42, 36.45, 140.58, 36.55),
        dates=["2022-10-10"],
        lulc_template=tmp / "template.tif",
        looks=LOOKS,
        progress=False,
    )


def test_speckle_of_homogeneous_water_is_gamma_with_L_looks(lake_synth):
    synth = lake_synth
    url = synth.scene_urls[0]
    labels = labels_on_scene_grid(synth.lulc_urls, url)
    with rasterio.open(url) as ds:
        dn = ds.read(1).astype(np.float64)
    water = ndimage.binary_erosion(labels == 1, iterations=4) & (dn > 0)
    assert water.sum() > 100_000, "not enough open water to test speckle"
    intensity = dn[water] ** 2
    norm = intensity / intensity.mean()
    cv = norm.std()
    assert cv == pytest.approx(1 / np.sqrt(LOOKS), rel=0.06)  # CV of intensity = 1/√L
    gamma = stats.gamma(a=LOOKS, scale=1 / LOOKS)
    for q in (0.1, 0.25, 0.5, 0.75, 0.9):
        assert np.quantile(norm, q) == pytest.approx(gamma.ppf(q), rel=0.05, abs=0.01)
    sample = np.random.default_rng(0).choice(norm, 3000, replace=False)
    assert stats.kstest(sample, gamma.cdf).pvalue > 1e-3


@pytest.mark.slow
def test_same_seed_byte_identical_other_seed_differs(tmp_path, small_synth):
    from conftest import SMALL_BBOX

    again = synthesize(str(tmp_path / "again"), bbox=SMALL_BBOX, seed=3, progress=False)
    other = synthesize(str(tmp_path / "other"), bbox=SMALL_BBOX, seed=4, progress=False)
    for a, b, c in zip(
        small_synth.lulc_urls + small_synth.scene_urls,
        again.lulc_urls + again.scene_urls,
        other.lulc_urls + other.scene_urls,
        strict=True,
    ):
        assert sha256(a) == sha256(b)
        assert sha256(a) != sha256(c)
    assert json.loads(Path(small_synth.out, "synth.json").read_text()) == json.loads(
        Path(again.out, "synth.json").read_text()
    )


def _shares(codes: np.ndarray) -> np.ndarray:
    counts = np.bincount(codes.ravel(), minlength=15)[1:15].astype(float)
    return counts / counts.sum() * 100


def test_class_shares_follow_the_real_map(template_synth, hrlulc_250m):
    """Generated 10 m shares vs the 250 m map's shares over the same area: ±2.5 points per class."""
    (url,) = template_synth.lulc_urls
    with rasterio.open(url) as ds:
        fine = ds.read(1)
        b = ds.bounds
    with rasterio.open(hrlulc_250m) as ds:
        win = rasterio.windows.from_bounds(b.left, b.bottom, b.right, b.top, ds.transform)
        coarse = ds.read(1, window=win.round_offsets().round_lengths())
    diff = _shares(fine) - _shares(coarse)
    assert np.abs(diff).max() <= 2.5, dict(zip(range(1, 15), diff.round(2), strict=True))


@pytest.mark.slow
def test_procedural_shares_match_japan_table(tmp_path):
    """Without a template, a 0.3° area gets Japan's land shares within ±3 points per class."""
    res = synthesize(
        str(tmp_path / "p"),
        bbox=(139.0, 35.0, 139.3, 35.3),
        dates=["2022-09-12"],
        seed=1,
        progress=False,
    )
    codes = np.concatenate([rasterio.open(u).read(1).ravel() for u in res.lulc_urls])
    table = np.array([JAPAN_LAND_SHARES_PCT[c] for c in range(1, 15)])
    diff = _shares(codes) - table
    assert np.abs(diff).max() <= 3.0, dict(zip(range(1, 15), diff.round(2), strict=True))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(bbox=(140.2, 36.0, 140.1, 36.1)), "is empty"),
        (dict(bbox=(140.0, 36.0, 140.1)), "must be 4 numbers"),
        (dict(dates=["2022-13-01"]), "not an ISO date"),
        (dict(dates=["2013-01-01"]), "before ALOS-2's launch"),
        (dict(dates=["2022-09-01", "2022-09-01"]), "distinct"),
        (dict(scenes_per_date=0), "scenes_per_date"),
        (dict(looks=0), "looks"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    with pytest.raises(SynthError, match=message):
        synthesize(str(tmp_path / "x"), progress=False, **kwargs)
    assert not (tmp_path / "x").exists()  # nothing written


def test_bbox_outside_the_template(tmp_path, hrlulc_250m):
    with pytest.raises(SynthError, match="outside the LULC template") as e:
        synthesize(
            str(tmp_path / "x"),
            bbox=(10.0, 45.0, 10.1, 45.1),
            lulc_template=hrlulc_250m,
            progress=False,
        )
    assert hrlulc_250m.name in str(e.value)


def test_synth_writes_to_s3(s3):
    url = s3.url("synth")
    res = synthesize(
        url,
        bbox=(140.30, 36.02, 140.33, 36.04),
        dates=["2022-09-12"],
        storage_options=s3.storage_options,
        progress=False,
    )
    fs = s3.fs()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{s3.bucket}/synth"))
    assert names == sorted(
        ["synth.json", *(u.rsplit("/", 1)[-1] for u in res.lulc_urls + res.scene_urls)]
    )
    from sarcube.storage import gdal_path

    with s3.rasterio_env(), rasterio.open(gdal_path(res.scene_urls[0])) as ds:
        assert ds.crs.to_epsg() == 32654 and ds.read(1).max() > 0
