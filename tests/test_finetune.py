"""Fine-tuning end to end: ``training.finetune`` on real shards of a small synthetic cube, the
evaluation checked against an independent numpy recomputation, 2 gloo ranks against one process,
pretrained weights, bad input, the loss switch, the ablation runner, and the water head on the
real Sentinel-1 chip with its hand-drawn mask (Sen1Floods11)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from sarcube.classes import NINE_CLASS_NAMES, nine_class_lut, water_lut
from sarcube.shards import FORMAT, iter_samples, npy_bytes, read_manifest
from training.config import load_config
from training.evaluation import evaluate
from training.finetune import build_loss, run
from training.models.swin import swin_tiny
from training.segmenter import build_segmentation_model, load_model_checkpoint

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "data.batch_size=4",
    "seg.eval_batch_size=4",
    "schedule.epochs=2",
    "schedule.warmup_epochs=0",
    "train.progress=false",
    "train.tensorboard=false",
    "seg.panels=2",
]


def tiny_cfg(*overrides: str, task: str = "lulc"):
    return load_config("finetune_tiny", [*FAST, f"seg.task={task}", *overrides], method="finetune")


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory) -> Path:
    """An exported tiny-Swin encoder (what `sarcube pretrain` writes as encoder.pth)."""
    torch.manual_seed(123)
    enc = swin_tiny()
    path = tmp_path_factory.mktemp("enc") / "encoder.pth"
    torch.save({k: v.clone() for k, v in enc.state_dict().items()}, path)
    return path


@pytest.fixture(scope="module")
def lulc_run(small_shards, encoder_file, tmp_path_factory):
    cfg = tiny_cfg()
    cfg.seg.pretrained = str(encoder_file)
    out = tmp_path_factory.mktemp("ft") / "lulc"
    return cfg, out, run(cfg, str(small_shards), str(out))


def numpy_confusion(model, manifest_dir: Path, split: str, task: str, threshold: float = 0.5):
    """Confusion matrix of ``model`` over ``split`` computed without training.data: samples via
    sarcube.shards.iter_samples, z-score with the train split's statistics, labels via the LUT,
    counts with numpy."""
    man = read_manifest(str(manifest_dir))
    mean, std = (man["splits"]["train"]["db_stats"][k] for k in ("mean", "std"))
    lut = nine_class_lut() if task == "lulc" else water_lut()
    k = 9 if task == "lulc" else 2
    cm = np.zeros((k, k), np.int64)
    model.eval()
    for s in iter_samples(str(manifest_dir), split):
        db = s["sar"].astype(np.float32)
        ok = np.isfinite(db)
        x = np.where(ok, (db - mean) / std, 0.0).astype(np.float32)
        with torch.no_grad():
            logits = model(torch.from_numpy(x)[None, None])[0]
        if task == "lulc":
            pred = logits.argmax(0).numpy()
        else:
            pred = (torch.sigmoid(logits[0]) >= threshold).numpy().astype(np.int64)
        truth = lut[s["lulc"]].astype(np.int64)
        keep = ok & (truth != 255)
        cm += np.bincount(truth[keep] * k + pred[keep], minlength=k * k).reshape(k, k)
    return cm


def assert_same_confusion(got: np.ndarray, want: np.ndarray) -> None:
    """Equal truth rows (which pixels count, and as what) exactly; predictions equal up to a few
    near-tie pixels whose argmax flips with the batch size of the forward pass (float32 sums in
    another order: the oracle runs one image at a time)."""
    assert want.sum() > 0
    np.testing.assert_array_equal(got.sum(1), want.sum(1))
    assert np.abs(got - want).sum() <= max(4, 1e-4 * want.sum()), (got, want)


# ---------------------------------------------------------------------------------------------


def test_finetune_validates_keeps_best_and_reports_test(lulc_run, small_shards):
    _, out, res = lulc_run
    t = res.train
    assert t.finished and t.epoch == 2 and len(t.val) == 2
    # the best epoch is the one with the highest val mIoU (metrics.jsonl, written by rank 0)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in lines if r["kind"] == "val"]
    assert [r["epoch"] for r in val] == [0, 1]
    best = max(val, key=lambda r: r["miou"])
    assert t.best_epoch == best["epoch"] and t.best_value == pytest.approx(best["miou"])
    ck = load_model_checkpoint(str(out / "best.pt"))
    assert ck["epoch"] == best["epoch"] + 1 and ck["scores"]["miou"] == pytest.approx(best["miou"])
    assert ck["extra"]["task"] == "lulc" and ck["extra"]["num_classes"] == 9
    # the test report = an independent recomputation with best.pt's weights
    model = build_segmentation_model(tiny_cfg())
    model.load_state_dict(ck["model"])
    want = numpy_confusion(model, small_shards, "test", "lulc")
    report = json.loads((out / "test" / "report.json").read_text())
    got = np.array(report["confusion_matrix"])
    assert_same_confusion(got, want)
    tp = np.diag(got).astype(float)
    union = got.sum(0) + got.sum(1) - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    assert report["scores"]["miou"] == pytest.approx(np.nanmean(iou))
    md = (out / "test" / "report.md").read_text()
    assert "| Method | Water | Built-up |" in md and "mIoU" in md and "NaN" in md
    for png in ("confusion_matrix.png", "per_class.png", "panels.png"):
        assert (out / "test" / png).stat().st_size > 5000
    assert (out / "encoder.pth").exists() and (out / "checkpoint.pt").exists()


def test_evaluate_command_matches_the_runs_val_scores(lulc_run, small_shards, tmp_path):
    """`sarcube evaluate` of best.pt on val gives the val scores the run recorded for that epoch."""
    _, out, res = lulc_run
    from sarcube.cli import main

    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(out / "best.pt"),
            "--manifest",
            str(small_shards),
            "--split",
            "val",
            "--out",
            str(tmp_path / "ev"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    rep = json.loads((tmp_path / "ev" / "report.json").read_text())
    best = next(r for r in res.train.val if r["epoch"] == res.train.best_epoch)
    assert rep["scores"]["miou"] == pytest.approx(best["miou"], abs=1e-12)
    assert rep["scores"]["macc"] == pytest.approx(best["macc"], abs=1e-12)
    # the run was fine-tuned from a pretrained encoder (lulc_run): the report says so, as the
    # run's own test report does
    assert rep["method"] == "pretrained"
    assert json.loads((out / "test" / "report.json").read_text())["method"] == "pretrained"


def test_pretrained_encoder_is_loaded_exactly(encoder_file):
    cfg = tiny_cfg()
    cfg.seg.pretrained = str(encoder_file)
    got = build_segmentation_model(cfg).encoder.state_dict()
    want = torch.load(encoder_file, weights_only=True)
    assert set(got) == set(want)
    assert all(torch.equal(got[k], want[k]) for k in want)
    scratch = build_segmentation_model(tiny_cfg()).encoder.state_dict()
    assert not all(torch.equal(scratch[k], want[k]) for k in want)


def test_bad_pretrained_and_wrong_checkpoint_are_clear_errors(small_shards, tmp_path, capsys):
    from sarcube.cli import main

    bad = tmp_path / "bad.pth"
    sd = swin_tiny().state_dict()
    sd.pop("norm.weight")
    sd["head.weight"] = torch.zeros(2)
    torch.save(sd, bad)
    argv = [
        "finetune",
        "--manifest",
        str(small_shards),
        "--out",
        str(tmp_path / "o"),
        "--pretrained",
        str(bad),
        *FAST,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "norm.weight" in err and "head.weight" in err and str(bad) in err
    assert main([*argv[: -len(FAST)], "--pretrained", str(tmp_path / "missing.pth"), *FAST]) == 2
    assert "missing.pth" in capsys.readouterr().err
    # a pretraining checkpoint is not a segmenter
    ck = tmp_path / "pre.pt"
    torch.save({"model": {}, "config": {"method": "simmim"}}, ck)
    rc = main(
        [
            "evaluate",
            "--checkpoint",
            str(ck),
            "--manifest",
            str(small_shards),
            "--out",
            str(tmp_path / "ev"),
        ]
    )
    assert rc == 2 and "not a fine-tuned segmenter" in capsys.readouterr().err


def test_loss_switch_iii_changes_the_loss(small_shards):
    man = read_manifest(str(small_shards))
    freqs = [man["splits"]["train"]["classes"]["nine_class_fraction"][n] for n in NINE_CLASS_NAMES]
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 9, 32, 32, generator=g)
    target = torch.randint(0, 9, (2, 32, 32), generator=g)
    on = build_loss(tiny_cfg(), freqs)
    off = build_loss(tiny_cfg("seg.alpha_scaled=false"), freqs)
    ce = build_loss(tiny_cfg("seg.loss=ce"), freqs)
    a = (1 - np.array(freqs)) / (1 - np.array(freqs)).sum()
    np.testing.assert_allclose(on.alpha.numpy(), a, rtol=1e-6)
    assert (
        on.alpha_scale == 2.25 and off.alpha_scale == 1.0 and torch.equal(off.alpha, torch.ones(9))
    )
    values = {float(m(logits, target)) for m in (on, off, ce)}
    assert len(values) == 3
    assert float(ce(logits, target)) == pytest.approx(
        float(torch.nn.functional.cross_entropy(logits, target))
    )


def test_two_gloo_ranks_validate_like_one_process(small_shards, tmp_path):
    """torchrun, 2 ranks: each validates its own val shard; the all-reduced scores it records
    equal one process evaluating best.pt over the whole split."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "training.finetune",
        "--manifest",
        str(small_shards),
        "--pretrained",
        "none",
        "--out",
        str(out),
        *FAST,
        "schedule.epochs=1",
        "seg.test_split=null",
    ]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    ranks = [json.loads((out / "ranks" / f"rank-{r:05d}.json").read_text()) for r in (0, 1)]
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in val if r["kind"] == "val"]
    assert len(val) == 1
    res, _ = evaluate(str(out / "best.pt"), str(small_shards), "val", str(tmp_path / "ev"))
    assert res.samples == read_manifest(str(small_shards))["splits"]["val"]["samples"]
    assert val[0]["miou"] == pytest.approx(res.scores["miou"], abs=1e-12)
    assert val[0]["pixel_acc"] == pytest.approx(res.scores["pixel_acc"], abs=1e-12)


def test_ablation_runner_writes_table_i_and_resumes(small_shards, encoder_file, tmp_path):
    from training.ablation import TABLE_I, run_ablation

    out = tmp_path / "abl"
    variants = [TABLE_I[0], TABLE_I[3]]  # pretrained baseline, scratch with every refinement
    args = (
        str(small_shards),
        str(encoder_file),
        str(out),
        "finetune_tiny",
        [*FAST, "schedule.epochs=1"],
    )
    res = run_ablation(*args, variants=variants)
    md = res["markdown"]
    assert "reproduction of the *procedure*" in md and "synthetic" in md
    assert "| ✓ | ✗ | ✗ | ✗ |" in md and "| ✗ | ✓ | ✓ | ✓ |" in md
    for row, v in zip(res["rows"], variants, strict=True):
        ck = load_model_checkpoint(str(out / v.name / "best.pt"))
        assert row["miou"] == pytest.approx(ck["scores"]["miou"])
        assert ck["config"]["seg"]["hires_injection"] == v.hires_injection
        assert ck["config"]["seg"]["refine_up"] == v.refine_up
        assert ck["config"]["seg"]["alpha_scaled"] == v.alpha_scaled
        assert (ck["config"]["seg"]["pretrained"] is not None) == v.pretraining
    mtime = (out / variants[0].name / "best.pt").stat().st_mtime_ns
    again = run_ablation(*args, variants=variants)  # finished variants are kept
    assert again["rows"] == res["rows"]
    assert (out / variants[0].name / "best.pt").stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------
# Real data: Sen1Floods11 (Sentinel-1 VV, hand-drawn water mask)


def _tar(samples) -> bytes:
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for key, members in samples:
            for ext, data in members.items():
                ti = tarfile.TarInfo(f"{key}.{ext}")
                ti.size = len(data)
                tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue()


def sen1floods11_shards(chip: Path, out: Path) -> dict[str, list[str]]:
    """The 512² chip cut into four 256² patches: three train, the fourth val and test.

    SAR = the VV band (dB, NaN no data) as float16; the water label is stored the way sarcube
    shards store labels, as JAXA codes: water 1 -> code 1 (water), land 0 -> code 5 (grassland,
    any non-water code), no data -1 -> code 0 (ignored)."""
    import rasterio

    with rasterio.open(chip / "Spain_7370579_S1Hand.tif") as src:
        vv = src.read(1).astype(np.float32)
    with rasterio.open(chip / "Spain_7370579_LabelHand.tif") as src:
        lab = src.read(1)
    code = np.select([lab == 1, lab == 0], [1, 5], 0).astype(np.uint8)
    quads = {
        (r, c): (slice(r * 256, r * 256 + 256), slice(c * 256, c * 256 + 256))
        for r in (0, 1)
        for c in (0, 1)
    }
    plan = {"train": [(0, 0), (0, 1), (1, 0)], "val": [(1, 1)], "test": [(1, 1)]}
    out.mkdir(parents=True)
    splits, keys = {}, {}
    for split, qs in plan.items():
        samples, vals = [], []
        for r, c in qs:
            key = f"20190919-r{r:04d}-c{c:04d}"
            sar = vv[quads[r, c]].astype(np.float16)
            vals.append(sar[np.isfinite(sar)].astype(np.float64))
            samples.append(
                (
                    key,
                    {
                        "json": json.dumps({"id": key}).encode(),
                        "lulc.npy": npy_bytes(code[quads[r, c]]),
                        "sar.npy": npy_bytes(sar),
                    },
                )
            )
        data = _tar(samples)
        (out / f"{split}-000000.tar").write_bytes(data)
        v = np.concatenate(vals)
        splits[split] = {
            "samples": len(samples),
            "bytes": len(data),
            "members": ["json", "lulc.npy", "sar.npy"],
            "shards": [
                {
                    "name": f"{split}-000000.tar",
                    "samples": len(samples),
                    "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
            ],
            "db_stats": {"mean": float(v.mean()), "std": float(v.std()), "pixels": v.size},
            "classes": {},
        }
        keys[split] = [k for k, _ in samples]
    manifest = {
        "format": FORMAT,
        "patch_size": 256,
        "splits": splits,
        "cube": {"url": str(chip)},
        "note": "Sen1Floods11 Spain_7370579, VV",
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    return keys


def test_water_head_on_real_sen1floods11_chip(realdata, tmp_path):
    chip = realdata / "sen1floods11_Spain_7370579"
    if not chip.is_dir():
        pytest.skip(f"{chip} not present")
    shards = tmp_path / "s1f11"
    sen1floods11_shards(chip, shards)
    cfg = tiny_cfg(
        "data.batch_size=3",
        "schedule.epochs=8",
        "schedule.warmup_epochs=1",
        "optim.lr_batch_base=3",
        "seg.eval_batch_size=1",
        task="water",
    )
    out = tmp_path / "water"
    res = run(cfg, str(shards), str(out))
    assert res.train.finished and res.test is not None
    rep = json.loads((out / "test" / "report.json").read_text())
    # independent recomputation of the test confusion matrix with best.pt
    model = build_segmentation_model(tiny_cfg(task="water"))
    model.load_state_dict(load_model_checkpoint(str(out / "best.pt"))["model"])
    want = numpy_confusion(model, shards, "test", "water", cfg.seg.threshold)
    assert_same_confusion(np.array(rep["confusion_matrix"]), want)
    # the hand-drawn mask's no-data (-1) pixels are ignored: counted pixels = valid labels
    import rasterio

    with rasterio.open(chip / "Spain_7370579_LabelHand.tif") as src:
        lab = src.read(1)[256:, 256:]
    with rasterio.open(chip / "Spain_7370579_S1Hand.tif") as src:
        vv = src.read(1)[256:, 256:]
    assert want.sum() == int(((lab >= 0) & np.isfinite(vv)).sum())
    assert want[1].sum() == int(((lab == 1) & np.isfinite(vv)).sum())  # true water pixels
    s = rep["scores"]
    for k in ("iou", "precision", "recall", "f1"):
        assert s[k] is None or 0.0 <= s[k] <= 1.0
    print(
        f"\nSen1Floods11 Spain_7370579 (test quadrant, tiny model, 8 epochs on 3 patches): water "
        f"IoU {s['iou']}, precision {s['precision']}, recall {s['recall']}, F1 {s['f1']}"
    )
    (tmp_path / "water_scores.json").write_text(json.dumps(s))
