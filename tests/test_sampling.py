"""Category-aware sampling, splits and the patch index, against hand-worked and independent
checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import rasterio

from sarcube.classes import FOREST_CODES
from sarcube.errors import InputError
from sarcube.index import HIST_COLUMNS, read_index
from sarcube.sampling import (
    SamplingParams,
    allocate_anchors,
    alpha_from_counts,
    assign_blocks,
    balance_patches,
    class_weights,
    patch_histograms,
    sample_patches,
)


def test_hand_built_label_cube():
    """3 × 3 patches of 4 × 4 px. Each class sits in exactly one patch, so every anchor of a class
    lands in that patch and the kept set follows from the allocation alone."""
    p = 4
    lab = np.zeros((12, 12), dtype=np.uint8)
    lab[0:4, 0:4] = 1  # water: 16 px, patch (0, 0)
    lab[0:4, 4:8] = 2  # built-up: 16 px, patch (0, 1)
    lab[4:8, 0:4] = 12  # solar: 4 px ...
    lab[4:6, 0:2] = 6  # ... and forest 4 px in patch (1, 0)  -> mixed, not forest-only
    lab[4:8, 4:8] = 9  # ENF 16 px: patch (1, 1) entirely forest
    lab[8:12, 0:12] = 3  # paddy: 48 px over patches (2, 0), (2, 1), (2, 2)
    hist = patch_histograms(lab, patch=p)
    assert hist.shape == (3, 3, 16) and hist[1, 0, 12] == 12 and hist[1, 0, 6] == 4
    counts = hist.reshape(-1, 16).sum(0)
    # n = {1: 16, 2: 16, 3: 48, 6: 4, 9: 16, 12: 12}; total 112; w_k ∝ 112 / n_k
    inv = {1: 7.0, 2: 7.0, 3: 112 / 48, 6: 28.0, 9: 7.0, 12: 112 / 12}
    s = sum(inv.values())
    w = class_weights(counts)
    for c, v in inv.items():
        assert w[c] == pytest.approx(v / s)
    assert w[[0, 4, 5, 7, 8, 10, 11, 13, 14]].sum() == 0
    # N = 100: exact shares 11.6…, 11.6…, 3.88…, 46.6…, 11.6…, 15.5… -> floors
    # 11,11,3,46,11,15 (97); the 3 left go to the largest remainders: code 3 (.88), then codes 1
    # and 2 (.65, ties -> lower).
    alloc = allocate_anchors(100, w)
    assert {c: int(alloc[c]) for c in inv} == {1: 12, 2: 12, 3: 4, 6: 46, 9: 11, 12: 15}
    bal = balance_patches(hist, 100, seed=0, exclude_full=FOREST_CODES)
    anchors = bal["anchors"]
    assert (
        anchors[0, 0] == 12
        and anchors[0, 1] == 12
        and anchors[1, 0] == 46 + 15
        and anchors[1, 1] == 11
    )
    assert anchors[2].sum() == 4 and anchors.sum() == 100
    kept = bal["kept"]
    assert kept[0, 0] and kept[0, 1] and kept[1, 0]
    assert not kept[1, 1]  # only forest (ENF): dropped although it has anchors
    assert (not kept[0, 2] and not kept[1, 2]) or lab[
        0:8, 8:12
    ].any()  # empty patches get no anchor
    # with N = 10 the paddy allocation rounds to 0 -> no paddy patch is kept
    small = balance_patches(hist, 10, seed=0)
    assert small["allocation"][3] == 0 and not small["kept"][2].any()


def test_anchors_are_uniform_over_class_pixels():
    """Statistically: anchors of one class spread over patches in proportion to its pixels."""
    lab = np.zeros((8, 16), dtype=np.uint8)
    lab[:, 0:4] = 5  # 32 px in patch (0,0)... patch size 8 -> patches (0,0) and (0,1)
    lab[:, 8:16] = 5  # 64 px in patch (0,1)
    hist = patch_histograms(lab, patch=8)
    bal = balance_patches(hist, 30_000, seed=1)
    a = bal["anchors"][0]
    assert a.sum() == 30_000
    assert a[0] / a.sum() == pytest.approx(32 / 96, abs=0.01)


def test_block_split_rule():
    rows, cols = np.meshgrid(np.arange(12), np.arange(12), indexing="ij")
    rows, cols = rows.ravel(), cols.ravel()
    split = assign_blocks(rows, cols, (0.65, 0.18, 0.17), block=3, seed=0)
    # every block of 3 × 3 patches is in one split
    for br in range(4):
        for bc in range(4):
            sel = (rows // 3 == br) & (cols // 3 == bc)
            assert len(set(split[sel])) == 1
    frac = pd.Series(split).value_counts(normalize=True)
    assert frac["train"] == pytest.approx(0.65, abs=0.1) and set(frac.index) == {
        "train",
        "val",
        "test",
    }
    again = assign_blocks(rows, cols, (0.65, 0.18, 0.17), block=3, seed=0)
    assert (again == split).all()


@pytest.fixture(scope="module")
def index(small_cube, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("idx") / "index.parquet")
    res = sample_patches(
        small_cube, out, SamplingParams(n_anchors=400, seed=3, block=1, split=(0.5, 0.25, 0.25))
    )
    return res, out


def test_index_rules_hold(index, small_cube):
    from sarcube.cube import open_cube

    res, url = index
    df, meta = read_index(url)
    assert meta["params"]["n_anchors"] == 400 and meta["cube_url"] == small_cube
    pd.testing.assert_frame_equal(df, res.index, check_dtype=False)
    cube = open_cube(small_cube)
    assert set(df["split"]) <= {"pretrain", "train", "val", "test"} and len(df) > 0
    months = df["time"].dt.month
    assert (df.loc[months == 9, "split"] != "pretrain").all()
    assert (df.loc[months.isin([10, 11]), "split"] == "pretrain").all()
    for row in df.itertuples():
        patch = cube.sarcube.patch(pd.Timestamp(row.time), row.row, row.col)
        hh, lab = patch.hh_db.values, patch.lulc.values
        bad = ~np.isfinite(hh) | (lab == 0)
        assert bad.mean() == pytest.approx(row.nodata_frac) and bad.mean() <= 0.0  # max_nodata 0
        counts = np.bincount(lab.ravel(), minlength=16)
        np.testing.assert_array_equal([getattr(row, c) for c in HIST_COLUMNS], counts[1:15])
        assert set(np.unique(lab[lab > 0])) - set(FOREST_CODES), "a kept patch is entirely forest"
        assert row.anchors > 0
        w, s, e, n = cube.sarcube.patch_bbox(row.row, row.col)
        assert (row.lon_min, row.lat_min, row.lon_max, row.lat_max) == pytest.approx((w, s, e, n))


def test_fine_tuning_neighbours_share_a_split_within_blocks(small_cube, tmp_path):
    res = sample_patches(small_cube, None, SamplingParams(n_anchors=400, seed=3, block=2))
    ft = res.index[res.index["split"] != "pretrain"]
    by_pos = {(r, c): s for r, c, s in zip(ft["row"], ft["col"], ft["split"], strict=True)}
    for (r, c), s in by_pos.items():
        for dr, dc in ((0, 1), (1, 0)):
            other = by_pos.get((r + dr, c + dc))
            if other is not None and other != s:
                assert (r // 2, c // 2) != ((r + dr) // 2, (c + dc) // 2)  # only across block edges


def test_deterministic_from_the_seed(small_cube):
    a = sample_patches(small_cube, None, SamplingParams(n_anchors=60, seed=11)).index
    b = sample_patches(small_cube, None, SamplingParams(n_anchors=60, seed=11)).index
    c = sample_patches(small_cube, None, SamplingParams(n_anchors=60, seed=12)).index
    pd.testing.assert_frame_equal(a, b)
    assert not a[["row", "col", "anchors"]].equals(c[["row", "col", "anchors"]])


def test_report_alpha_matches_train_histograms(index):
    import json
    from pathlib import Path

    res, url = index
    report = json.loads(Path(url.replace(".parquet", "_report.json")).read_text())
    train = res.index[res.index["split"] == "train"]
    # independent: 9-class pixel frequencies from the train patches' code histograms
    groups = [(1,), (2,), (3, 4), (5,), (6, 7, 8, 9, 11), (10,), (12,), (13,), (14,)]
    nine = np.array([sum(train[f"hist_{c:02d}"].sum() for c in g) for g in groups], dtype=float)
    f = nine / nine.sum()
    expected = (1 - f) / (1 - f).sum()
    np.testing.assert_allclose(list(report["alpha_train_9class"].values()), expected, rtol=1e-9)
    assert Path(url.replace(".parquet", "_report.png")).stat().st_size > 10_000
    assert "α of the train split" in Path(url.replace(".parquet", "_report.md")).read_text()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(n_anchors=0), "--n-anchors must be > 0"),
        (dict(split=(0.5, 0.3, 0.3)), "summing to 1"),
        (dict(pretrain_months=(13,)), "not months"),
        (dict(pretrain_months=(9,), finetune_months=(9,)), "temporal leakage"),
        (dict(pretrain_months=(1, 2)), "no slice in those months"),
        (dict(exclude_full=(99,)), "not JAXA codes"),
    ],
)
def test_bad_parameters(small_cube, kwargs, message):
    with pytest.raises(InputError, match=message):
        sample_patches(small_cube, None, SamplingParams(**kwargs))


def test_cube_without_labels_or_valid_patches(small_synth, tmp_path, dask_client):
    from sarcube.cube import CubeError
    from sarcube.ingestion import ingest

    url = str(tmp_path / "nolabels.zarr")
    ingest(
        [small_synth.scene_urls[0]],
        url,
        bbox=tuple(small_synth.record["bbox"]),
        client=dask_client,
        progress=False,
    )
    with pytest.raises(CubeError, match="no labels"):
        sample_patches(url, None)
    url2 = str(tmp_path / "labelled.zarr")  # one September slice; every patch excluded by its codes
    ingest(
        [small_synth.scene_urls[0]],
        url2,
        lulc=small_synth.lulc_urls,
        client=dask_client,
        progress=False,
    )
    with pytest.raises(InputError, match="no valid patch"):
        sample_patches(
            url2, None, SamplingParams(pretrain_months=(), exclude_full=tuple(range(1, 15)))
        )


@pytest.mark.slow
def test_real_national_map_rare_classes_gain_share(hrlulc_250m):
    """Japan's real 250 m HR-LULC map as a label cube (Dask blocks). Patches of 20 px (5 km, the
    paper's 256 px at ~20 m) and the paper's 1,000,000 anchors. The map labels the sea near the
    coast as water (70 % of its pixels); SAR scenes cover land, so open sea — water connected to
    the map's no-data ocean — is set to no data first, as in
    sarcube.classes.JAPAN_LAND_SHARES_PCT."""
    import dask.array as da
    from scipy import ndimage

    with rasterio.open(hrlulc_250m) as ds:
        codes = ds.read(1)
    lab, _ = ndimage.label((codes == 1) | (codes == 0))
    sea = np.isin(lab, np.unique(lab[codes == 0])) & (codes == 1)
    codes[sea] = 0
    labels = da.from_array(codes, chunks=2000)
    hist = patch_histograms(labels, patch=20, block_patches=100)
    bal = balance_patches(hist, 1_000_000, seed=0)
    before = bal["counts"][1:15] / bal["counts"][1:15].sum()
    after_counts = hist[bal["kept"]].sum(axis=0)
    after = after_counts[1:15] / after_counts[1:15].sum()
    # the Dask block histograms add up to a plain count of the whole array
    full = np.bincount(codes[: hist.shape[0] * 20, : hist.shape[1] * 20].ravel(), minlength=16)
    np.testing.assert_array_equal(bal["counts"], full)
    share = dict(zip(range(1, 15), zip(before, after, strict=True), strict=True))
    for code in (12, 14, 13, 10):  # solar panel, greenhouse, wetland, bare
        assert share[code][1] > share[code][0], (code, share[code])
    forest_before = sum(share[c][0] for c in FOREST_CODES)
    forest_after = sum(share[c][1] for c in FOREST_CODES)
    assert forest_after < forest_before
    print("\nJapan, class share before -> after balancing (%):")
    for code, (b, a) in share.items():
        print(f"  {code:2d}: {100 * b:6.2f} -> {100 * a:6.2f}")
    alpha = alpha_from_counts(after_counts)
    assert np.isclose(sum(alpha), 1.0)
