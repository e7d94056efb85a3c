"""Large-area inference (``training.predict``): the window lattice and blending weights against
hand values, exact stitching for a pointwise model (= the model on the whole region at once),
block-partition independence for the real segmenter, no-data handling, resume after a kill,
bounded memory (a region 16× larger; a region that would not fit whole under a worker memory
limit), the COG and Zarr layer, region metrics, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
from torch import nn

from sarcube.cube import PREDICTIONS_FORMAT, create_cube, open_cube, open_group, publish_view
from sarcube.grid import CubeGrid
from training.predict import (
    NODATA,
    PredictError,
    Predictor,
    blend_weight,
    load_predictor,
    predict,
    window_starts,
)

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = -12.0, 5.0


def pointwise_model(seed: int = 0) -> nn.Module:
    """A stack of 1×1 convolutions: each output pixel depends on its own input pixel only."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 8, 1), nn.GELU(), nn.Conv2d(8, 9, 1)).eval()


def whole_region(model: nn.Module, db: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The model on the whole image at once: (classes with 255 for no data, probabilities)."""
    x = torch.from_numpy(np.nan_to_num(db, nan=MEAN))[None, None]
    with torch.no_grad():
        p = torch.softmax(model((x - MEAN) / STD), 1)[0].numpy()
    cls = p.argmax(0).astype(np.uint8)
    cls[~np.isfinite(db)] = 255
    return cls, p


def random_cube(url: Path, size: int, seed: int = 0, nodata_box: bool = True) -> np.ndarray:
    """A one-date cube of ``size``² random dB (smooth fields + noise, a no-data box); the data."""
    grid = CubeGrid.from_bounds((140.0, 35.0, 140.0 + size / 6000, 35.0 + size / 6000))
    root = create_cube(str(url), grid)
    rng = np.random.default_rng(seed)
    coarse = rng.normal(MEAN, 4.0, (size // 64 + 1, size // 64 + 1)).astype(np.float32)
    db = np.kron(coarse, np.ones((64, 64), np.float32))[:size, :size]
    db += rng.normal(0, 1.0, (size, size)).astype(np.float32)
    if nodata_box:
        db[100:400, 50:300] = np.nan  # a swath gap crossing window and block edges
        db[:, size - 37 :] = np.nan  # the swath edge
    root["hh_db"].resize((1, size, size))
    root["time"].resize((1,))
    root["time"][0] = 19247  # 2022-09-12
    root["hh_db"][0] = db
    root["sarcube"].attrs["slices"] = {"2022-09-12": {"time_index": 0, "status": "complete"}}
    publish_view(root)
    return db


@pytest.fixture(scope="module")
def cube1k(tmp_path_factory):
    url = tmp_path_factory.mktemp("pcube") / "cube.zarr"
    return url, random_cube(url, 1024)


# ---------------------------------------------------------------------------------------------
# The lattice and the weights


def test_window_starts_hand_example():
    # block [0, 1024), stride 128: windows k = -1 .. 7 (k·128 < 1024 and k·128 + 256 > 0)
    assert window_starts(0, 1024, 128) == list(range(-128, 1024 - 128 + 1, 128))
    assert window_starts(1024, 1280, 128) == [896, 1024, 1152]
    assert window_starts(0, 256, 256) == [0]  # no overlap: one window per 256 px
    for b0, b1, s in [(0, 1024, 128), (512, 768, 64), (256, 512, 200)]:
        starts = window_starts(b0, b1, s)
        covered = np.zeros(b1 - b0, int)
        for st in starts:
            assert st < b1 and st + 256 > b0  # every window overlaps the block
            covered[max(st, b0) - b0 : min(st + 256, b1) - b0] += 1
        assert covered.min() >= 1  # and every pixel is covered
        assert window_starts(b0, b1, s)[0] - s + 256 <= b0  # the window before does not overlap


def test_blend_weight_is_a_partition_of_unity_at_half_overlap():
    w = blend_weight(256).astype(np.float64)
    i = np.arange(256)
    np.testing.assert_allclose(
        w,
        np.outer(np.sin(np.pi * (i + 0.5) / 256) ** 2, np.sin(np.pi * (i + 0.5) / 256) ** 2),
        rtol=1e-6,
    )
    assert w.min() > 0
    total = np.zeros((512, 512))
    for r in range(0, 512 - 255, 128):
        for c in range(0, 512 - 255, 128):
            total[r : r + 256, c : c + 256] += w
    np.testing.assert_allclose(total[128:384, 128:384], 1.0, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Seamlessness


def test_pointwise_model_stitches_exactly_to_the_whole_region(cube1k, tmp_path):
    url, db = cube1k
    model = pointwise_model()
    pr = Predictor(model, "lulc", MEAN, STD, sha256="pointwise")
    out = tmp_path / "pred.zarr"
    res = predict(
        str(url), pr, str(out), block=512, probabilities=True, progress=False, panel=False
    )
    assert res.blocks == 4 and res.skipped == 0
    want_cls, want_p = whole_region(model, db)
    got = open_group(str(out), formats=(PREDICTIONS_FORMAT,))
    np.testing.assert_array_equal(got["pred_lulc"][0], want_cls)
    q = got["prob_lulc"][0].astype(np.float64)  # (9, H, W) uint8 = round(254 p)
    ok = np.isfinite(db)
    np.testing.assert_allclose(q[:, ok] / 254, want_p[:, ok], atol=0.5 / 254 + 1e-6)
    assert (q[:, ~ok] == NODATA).all()
    # the layer opens with open_cube, aligned to hh_db
    ds, cube = open_cube(str(out)), open_cube(str(url))
    assert ds.pred_lulc.dims == ("time", "y", "x")
    np.testing.assert_array_equal(ds.y.values, cube.y.values)
    np.testing.assert_array_equal(ds.x.values, cube.x.values)
    assert list(ds.time.values) == list(cube.time.values)
    assert ds.pred_lulc.attrs["checkpoint_sha256"] == "pointwise"


def test_segmenter_map_does_not_depend_on_the_block_partition(small_cube, tmp_path):
    """The real (tiny Swin UPerNet) model: a region cut into 256-px blocks equals the same region
    predicted as one block — no block-boundary artefacts."""
    from training.config import load_config
    from training.segmenter import build_segmentation_model

    cfg = load_config("finetune_tiny", method="finetune")
    pr = Predictor(build_segmentation_model(cfg).eval(), "lulc", MEAN, STD, sha256="tiny")
    bbox = (140.30, 36.00 + 1024 / 12000, 140.30 + 1024 / 12000, 36.00 + 2048 / 12000)  # 512² px
    kw = {"bbox": bbox, "time": "2022-09-12", "progress": False, "panel": False, "batch_size": 4}
    a = predict(small_cube, pr, str(tmp_path / "a.zarr"), block=256, **kw)
    b = predict(small_cube, pr, str(tmp_path / "b.zarr"), block=512, **kw)
    assert a.region == b.region and a.blocks > b.blocks
    r0, r1, c0, c1 = a.region
    pa = open_group(str(tmp_path / "a.zarr"), formats=(PREDICTIONS_FORMAT,))["pred_lulc"]
    pb = open_group(str(tmp_path / "b.zarr"), formats=(PREDICTIONS_FORMAT,))["pred_lulc"]
    # each store holds the region and the date only
    assert pa.shape == pb.shape == (1, r1 - r0, c1 - c0)
    ma, mb = pa[0], pb[0]
    assert (ma != NODATA).mean() > 0.5
    # equal up to windows batched differently (float32 sums in another order): ≤ 0.05 % of pixels
    assert (ma != mb).mean() <= 5e-4, (ma != mb).sum()


def test_a_predictions_store_is_sized_to_the_bbox_and_dates(small_cube, tmp_path):
    """Plain xarray on a store of a small bbox and one date: that window of the cube's grid and
    that date; values equal the pointwise model on the cube's pixels there; a later date is
    appended; a bbox outside the store is refused and changes nothing."""
    import xarray as xr

    model = pointwise_model(4)
    pr = Predictor(model, "lulc", MEAN, STD, sha256="pw4")
    out = tmp_path / "s.zarr"
    bbox = (140.31, 36.14, 140.33, 36.16)
    kw = {"bbox": bbox, "progress": False, "panel": False}
    res = predict(small_cube, pr, str(out), time="2022-10-10", **kw)
    ds, cube = xr.open_zarr(out), xr.open_zarr(small_cube)
    r0, r1, c0, c1 = res.region
    assert r0 % 256 == c0 % 256 == 0 and (r1 - r0, c1 - c0) == (256, 256)  # one chunk holds it
    assert ds.pred_lulc.shape == (1, 256, 256)
    np.testing.assert_array_equal(ds.y.values, cube.y.values[r0:r1])
    np.testing.assert_array_equal(ds.x.values, cube.x.values[c0:c1])
    assert ds.y.values.min() < bbox[1] < bbox[3] < ds.y.values.max()
    assert ds.x.values.min() < bbox[0] < bbox[2] < ds.x.values.max()
    assert [str(t)[:10] for t in ds.time.values] == ["2022-10-10"]
    db = open_cube(small_cube).hh_db.sel(time="2022-10-10").values[r0:r1, c0:c1]
    want, _ = whole_region(model, db)
    want = np.where(np.isfinite(db), want, NODATA)
    raw = xr.open_zarr(out, mask_and_scale=False).pred_lulc.values[0]
    np.testing.assert_array_equal(raw, want)

    predict(small_cube, pr, str(out), time="2022-09-12", **kw)
    ds = open_cube(str(out))
    assert [str(t)[:10] for t in ds.time.values] == ["2022-09-12", "2022-10-10"]
    assert ds.pred_lulc.shape == (2, 256, 256)
    before = sorted(
        (p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file()
    )
    with pytest.raises(PredictError, match=r"the store covers W 140\.3[0-9]* .* and cannot grow"):
        predict(small_cube, pr, str(out), bbox=(140.41, 36.11, 140.42, 36.12), progress=False)
    assert (
        sorted((p.relative_to(out), p.stat().st_mtime_ns) for p in out.rglob("*") if p.is_file())
        == before
    )


def test_nodata_stays_nodata_and_does_not_smear(cube1k, tmp_path):
    url, db = cube1k
    pr = Predictor(pointwise_model(1), "lulc", MEAN, STD, sha256="pw1")
    predict(str(url), pr, str(tmp_path / "p.zarr"), block=1024, progress=False, panel=False)
    m = open_group(str(tmp_path / "p.zarr"), formats=(PREDICTIONS_FORMAT,))["pred_lulc"][0]
    assert (m[~np.isfinite(db)] == NODATA).all()
    assert (m[np.isfinite(db)] != NODATA).all()


# ---------------------------------------------------------------------------------------------
# Resume, memory


SCRIPT = """
import sys, time, resource, threading
import numpy as np, psutil, torch
from torch import nn
sys.path.insert(0, {root!r})
from training.predict import Predictor, predict

class Slow(nn.Module):
    def __init__(self, delay):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Conv2d(1, 8, 1), nn.GELU(), nn.Conv2d(8, 9, 1))
        self.delay = delay
    def forward(self, x):
        time.sleep(self.delay)
        return self.net(x)

peak = [0]
def watch():
    p = psutil.Process()
    while True:
        peak[0] = max(peak[0], p.memory_info().rss)
        time.sleep(0.01)
torch.set_num_threads(1)
pr = Predictor(Slow({delay}).eval(), "lulc", {mean}, {std}, sha256="slow")
base = psutil.Process().memory_info().rss
threading.Thread(target=watch, daemon=True).start()
bbox = {bbox}
predict({cube!r}, pr, {out!r}, bbox=bbox, block={block}, overlap={overlap}, progress=False,
        panel=False, batch_size=16)
time.sleep(0.05)
print("PEAK_GROWTH_MB", (peak[0] - base) / 2**20)
"""


def run_script(tmp_path: Path, name: str, **kw) -> subprocess.Popen:
    path = tmp_path / f"{name}.py"
    path.write_text(textwrap.dedent(SCRIPT).format(root=str(ROOT), mean=MEAN, std=STD, **kw))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )


def test_killed_run_resumes_to_identical_output(cube1k, tmp_path):
    url, _ = cube1k
    out = tmp_path / "r.zarr"
    kw = {
        "cube": str(url),
        "out": str(out),
        "delay": 0.05,
        "bbox": None,
        "block": 256,
        "overlap": 128,
    }
    p = run_script(tmp_path, "first", **kw)
    markers = tmp_path / "r.zarr.predict" / "pred_lulc"
    for _ in range(1200):  # poll (up to 2 min) until 3 of the 16 blocks are done
        if markers.exists() and len(list(markers.glob("*.json"))) >= 3:
            break
        time.sleep(0.1)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    done = len(list(markers.glob("*.json")))
    assert 3 <= done < 16, done  # killed mid-run
    p2 = run_script(tmp_path, "second", **{**kw, "delay": 0.0})
    _, err = p2.communicate(timeout=300)
    assert p2.returncode == 0, err[-2000:]
    ref = tmp_path / "ref.zarr"
    p3 = run_script(tmp_path, "ref", **{**kw, "out": str(ref), "delay": 0.0})
    _, err = p3.communicate(timeout=300)
    assert p3.returncode == 0, err[-2000:]
    a = open_group(str(out), formats=(PREDICTIONS_FORMAT,))["pred_lulc"][0]
    b = open_group(str(ref), formats=(PREDICTIONS_FORMAT,))["pred_lulc"][0]
    np.testing.assert_array_equal(a, b)
    assert len(list(markers.glob("*.json"))) == 16


def test_peak_memory_does_not_grow_with_the_region(tmp_path):
    """16× the area (1024² → 4096² px) adds less than 64 MB to the peak RSS; holding the larger
    region's class probabilities alone would take 9 × 4096² × 4 B = 604 MB. (Windows without
    overlap, to keep the test short: memory is per block either way.)"""
    url = tmp_path / "big.zarr"
    random_cube(url, 4096, seed=2, nodata_box=False)
    small = (140.0, 35.0 + 3072 / 6000, 140.0 + 1024 / 6000, 35.0 + 4096 / 6000)
    growth = {}
    for name, bbox in (("small", small), ("large", None)):
        p = run_script(
            tmp_path,
            name,
            cube=str(url),
            out=str(tmp_path / f"{name}.zarr"),
            delay=0.0,
            bbox=bbox,
            block=1024,
            overlap=0,
        )
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
        growth[name] = float(out.split("PEAK_GROWTH_MB")[1])
    print(
        f"\npeak RSS growth: 1024² region {growth['small']:.0f} MB, "
        f"4096² region {growth['large']:.0f} MB"
    )
    assert growth["large"] - growth["small"] < 64, growth
    assert growth["large"] < 604


def test_region_larger_than_a_worker_memory_limit(tmp_path, dask_cluster):
    """A Dask worker process limited to 1.2 GB maps a region whose probabilities alone, held
    whole, would need 1.36 GB (9 classes × 6144² px × 4 B); no worker is restarted."""
    from distributed import Client, LocalCluster

    url = tmp_path / "big.zarr"
    random_cube(url, 6144, seed=3, nodata_box=False)
    pr = Predictor(pointwise_model(), "lulc", MEAN, STD, sha256="pw")
    with (
        LocalCluster(
            n_workers=1,
            threads_per_worker=1,
            processes=True,
            memory_limit="1.2GB",
            dashboard_address=None,
        ) as cluster,
        Client(cluster) as client,
    ):
        pid0 = list(client.run(os.getpid).values())
        res = predict(
            str(url),
            pr,
            str(tmp_path / "p.zarr"),
            client=client,
            progress=False,
            panel=False,
            block=1024,
            overlap=0,
        )
        assert list(client.run(os.getpid).values()) == pid0  # the same worker process throughout
    assert res.blocks == 36 and res.megapixels == pytest.approx(6144**2 / 1e6)
    m = open_group(str(tmp_path / "p.zarr"), formats=(PREDICTIONS_FORMAT,))["pred_lulc"]
    assert (m[0, ::512, ::512] != NODATA).all()


# ---------------------------------------------------------------------------------------------
# COG, metrics, errors


def test_cog_layout_crs_overviews_colours(cube1k, tmp_path):
    url, db = cube1k
    pr = Predictor(pointwise_model(), "lulc", MEAN, STD, sha256="pw")
    cog = tmp_path / "map.tif"
    predict(str(url), pr, str(tmp_path / "p.zarr"), cog=str(cog), progress=False, panel=False)
    with rasterio.open(cog) as src:
        assert src.crs.to_epsg() == 4326 and src.nodata == 255
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        assert src.overviews(1) and src.block_shapes[0] == (512, 512)
        cmap = src.colormap(1)
        assert cmap[0][:3] != cmap[4][:3] and cmap[255][3] == 0
        data = src.read(1)
        t = src.transform
    want, _ = whole_region(pointwise_model(), db)
    np.testing.assert_array_equal(data, want)
    assert t.a == pytest.approx(1 / 6000) and t.c == pytest.approx(140.0)


@pytest.mark.skipif(
    shutil.which("gdalinfo") is None, reason="needs GDAL's command line: apt-get install gdal-bin"
)
def test_gdal_reads_the_cog_class_names_description_and_nodata(cube1k, tmp_path):
    """GDAL's own command line (not rasterio) on the COG: the legend a GIS shows."""
    from sarcube.classes import NINE_CLASS_NAMES

    url, _ = cube1k
    pr = Predictor(pointwise_model(), "lulc", MEAN, STD, sha256="pw")
    cog = tmp_path / "map.tif"
    predict(str(url), pr, str(tmp_path / "p.zarr"), cog=str(cog), progress=False, panel=False)
    p = subprocess.run(["gdalinfo", "-json", str(cog)], capture_output=True, text=True, check=True)
    (band,) = json.loads(p.stdout)["bands"]
    assert band["categories"] == list(NINE_CLASS_NAMES)
    assert band["description"].startswith("predicted 9-class land cover")
    assert band["noDataValue"] == 255 and band["colorInterpretation"] == "Palette"
    assert json.loads(p.stdout)["metadata"]["IMAGE_STRUCTURE"]["LAYOUT"] == "COG"


def test_region_scores_equal_an_independent_confusion_matrix(small_cube, tmp_path):
    from sarcube.classes import nine_class_lut

    pr = Predictor(pointwise_model(4), "lulc", MEAN, STD, sha256="pw4")
    res = predict(small_cube, pr, str(tmp_path / "p.zarr"), time="2022-09-12", progress=False)
    s = res.scores["2022-09-12"]
    cube = open_cube(small_cube).sel(time="2022-09-12")
    db = cube.hh_db.values
    pred, _ = whole_region(pr.model, db)
    truth = nine_class_lut()[cube.lulc.values]
    keep = np.isfinite(db) & (truth != 255)
    cm = np.bincount(truth[keep] * 9 + pred[keep], minlength=81).reshape(9, 9)
    np.testing.assert_array_equal(np.array(s["confusion_matrix"]), cm)
    assert len(res.panels) == 1 and Path(res.panels[0]).stat().st_size > 10_000


def test_bad_input_is_a_clear_error(cube1k, tmp_path, lulc_checkpoint):
    url, _ = cube1k
    pr = Predictor(pointwise_model(), "lulc", MEAN, STD)
    with pytest.raises(PredictError, match="does not overlap the cube"):
        predict(str(url), pr, str(tmp_path / "p"), bbox=(10, 10, 11, 11), progress=False)
    with pytest.raises(PredictError, match=r"no data for that date.*2022-09-12"):
        predict(str(url), pr, str(tmp_path / "p"), time="2023-01-01", progress=False)
    with pytest.raises(PredictError, match=r"water.*asked"):
        predict(str(url), pr, str(tmp_path / "p"), task="water", progress=False)
    with pytest.raises(PredictError, match=r"'lulc' checkpoint.*--task water"):
        load_predictor(str(lulc_checkpoint), task="water")
    ck = torch.load(lulc_checkpoint, weights_only=True)
    ck["extra"]["num_classes"] = 5
    bad = tmp_path / "bad.pt"
    torch.save(ck, bad)
    with pytest.raises(PredictError, match="made for 5 classes"):
        load_predictor(str(bad))
    nohh = tmp_path / "nohh.zarr"
    random_cube(nohh, 256)
    import shutil

    shutil.rmtree(nohh / "hh_db")
    with pytest.raises(PredictError, match="no 'hh_db'"):
        predict(str(nohh), pr, str(tmp_path / "p2"), progress=False)
    from sarcube.cli import main

    assert (
        main(
            [
                "predict",
                "--cube",
                str(url),
                "--checkpoint",
                str(lulc_checkpoint),
                "--bbox",
                "10",
                "10",
                "11",
                "11",
            ]
        )
        == 2
    )


@pytest.fixture(scope="module")
def lulc_checkpoint(tmp_path_factory) -> Path:
    """A best.pt-format checkpoint of an untrained tiny segmenter (what `sarcube finetune`
    writes), without running a fine-tuning."""
    from training.config import load_config
    from training.run_folder import MODEL_FORMAT
    from training.segmenter import build_segmentation_model

    cfg = load_config("finetune_tiny", method="finetune")
    model = build_segmentation_model(cfg)
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    torch.save(
        {
            "format": MODEL_FORMAT,
            "model": model.state_dict(),
            "config": cfg.to_dict(),
            "extra": {"task": "lulc", "num_classes": 9, "db_stats": [MEAN, STD]},
            "epoch": 1,
            "step": 1,
            "scores": {},
        },
        path,
    )
    return path


def test_cli_predicts_beside_the_cube_by_default_and_into_it_when_asked(
    small_cube, lulc_checkpoint, tmp_path
):
    import shutil

    from sarcube.cli import main

    cube = tmp_path / "cube.zarr"
    shutil.copytree(small_cube, cube)
    bbox = ["140.30", str(36.00 + 1792 / 12000), str(140.30 + 256 / 12000), "36.1706"]
    argv = ["predict", "--cube", str(cube), "--checkpoint", str(lulc_checkpoint), "--bbox", *bbox]
    argv += ["--time", "2022-09-01/2022-09-30", "--batch-size", "4"]
    assert main(argv) == 0
    assert "pred_lulc" not in open_cube(str(cube))  # a shared cube is not written by default
    beside = open_cube(str(tmp_path / "cube.predictions.zarr"))
    assert "pred_lulc" in beside
    rc = main([*argv, "--out", str(cube)])
    assert rc == 0
    ds = open_cube(str(cube))
    assert "pred_lulc" in ds and ds.pred_lulc.shape == ds.hh_db.shape
    # the store beside holds the bbox's window of the cube's grid; the same pixels as in the cube
    assert beside.pred_lulc.shape == (1, 256, 256)
    window = ds.pred_lulc.sel(time="2022-09-12", y=beside.y, x=beside.x)
    np.testing.assert_array_equal(window.values, beside.pred_lulc.sel(time="2022-09-12").values)
    assert ds.pred_lulc.attrs["task"] == "lulc"
    sep = ds.pred_lulc.sel(time="2022-09-12").values
    assert (sep != NODATA).any() and (ds.pred_lulc.sel(time="2022-10-10").values == NODATA).all()


def test_markers_follow_the_slice_and_one_writer_per_store(tmp_path):
    """A date rebuilt copy-on-write (new slot/scenes in the registry) is predicted again, not
    skipped by markers of its old content; a second writer of the store is refused."""
    import zarr

    from sarcube.locking import LockHeldError, StoreLock

    url = tmp_path / "cube.zarr"
    random_cube(url, 512)
    pr = Predictor(pointwise_model(), "lulc", MEAN, STD, sha256="pointwise")
    out = str(tmp_path / "pred.zarr")
    kw = dict(block=256, progress=False, panel=False)
    assert predict(str(url), pr, out, **kw).skipped == 0
    assert predict(str(url), pr, out, **kw).skipped == 4  # unchanged: every block done
    meta = zarr.open_group(str(url), mode="r+", use_consolidated=False)["sarcube"]
    entry = meta.attrs["slices"]["2022-09-12"]
    meta.attrs["slices"] = {"2022-09-12": {**entry, "inputs": {"another-scene": "ab12"}}}
    assert predict(str(url), pr, out, **kw).skipped == 0  # the slice changed: all redone

    with StoreLock(out, command="sarcube predict (other)"):
        with pytest.raises(LockHeldError, match=r"locked by another writer.*\(other\)"):
            predict(str(url), pr, out, **kw)
    with StoreLock(str(url)):  # into the cube itself: the cube's lock (ingest excludes it)
        with pytest.raises(LockHeldError):
            predict(str(url), pr, str(url), **kw)
