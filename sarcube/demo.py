"""``sarcube demo``: the end-to-end pipeline on built-in synthetic data.

Stages run in order and each writes under ``out``. Re-running is cheap: the synthetic inputs are
regenerated only when missing, and ingest skips scenes already in the cube.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from .cube import open_cube
from .ingestion import ingest
from .plots import plot_cube_overview, plot_synth_overview
from .sampling import SamplingParams, sample_patches
from .shards import write_shards
from .synth import synthesize

STAGES = ("synth", "ingest", "sample", "shards", "pretrain", "finetune", "predict")
# The paper draws 1,000,000 anchors over Japan (~4·10⁹ cells per slice); the demo area has
# 6.6·10⁶ cells, so ~2,000 anchors keep a comparable density (and leave room for balancing).
DEMO_ANCHORS = 2000
DEMO_SPLIT_BLOCK = 2


def _synth_is_current(record_path: Path, synth_kwargs: dict[str, Any]) -> bool:
    """True when synth.json exists and was made with the same settings."""
    import datetime as dt

    from .synth import DEFAULT_BBOX, DEFAULT_DATES

    if not record_path.exists():
        return False
    rec = json.loads(record_path.read_text())
    want = {
        "bbox": [float(v) for v in synth_kwargs.get("bbox", DEFAULT_BBOX)],
        "dates": sorted(
            str(dt.date.fromisoformat(str(d))) for d in synth_kwargs.get("dates", DEFAULT_DATES)
        ),
        "seed": int(synth_kwargs.get("seed", 0)),
        "scenes_per_date": int(synth_kwargs.get("scenes_per_date", 1)),
        "looks": float(synth_kwargs.get("looks", 3.0)),
        "lulc_template": Path(t).name if (t := synth_kwargs.get("lulc_template")) else "procedural",
    }
    return all(rec.get(k) == v for k, v in want.items())


def run_demo(
    out: str | Path = "demo-output", workers: int = 2, **synth_kwargs: Any
) -> dict[str, Any]:
    """Run the demo; returns a summary dict (also written to ``out/summary.json``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {"stages": {}}
    n = len(STAGES)

    t0 = time.perf_counter()
    print(f"[1/{n}] synth: synthetic HR-LULC tiles and ALOS-2 scenes", flush=True)
    if _synth_is_current(out / "synth" / "synth.json", synth_kwargs):
        res_lulc = sorted(str(p) for p in (out / "synth" / "lulc").glob("*.tif"))
        res_scenes = sorted(str(p) for p in (out / "synth" / "scenes").glob("*.tif"))
        print(f"  synthetic inputs for these settings are already in {out / 'synth'}")
    else:
        for stale in ("synth", "cube.zarr"):  # outputs of other settings: start clean
            shutil.rmtree(out / stale, ignore_errors=True)
        res = synthesize(str(out / "synth"), **synth_kwargs)
        res_lulc, res_scenes = res.lulc_urls, res.scene_urls
    overview = plot_synth_overview(res_lulc, res_scenes, out / "synth_overview.png")
    summary["stages"]["synth"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "lulc_tiles": res_lulc,
        "scenes": res_scenes,
        "overview_png": str(overview),
    }

    t0 = time.perf_counter()
    print(f"[2/{n}] ingest: calibrate, resample and mosaic into the Zarr datacube", flush=True)
    cube_url = str(out / "cube.zarr")
    report = ingest(
        [str(out / "synth" / "scenes")],
        cube_url,
        lulc=[str(out / "synth" / "lulc")],
        workers=workers,
    )
    print(report.summary())
    cube_png = plot_cube_overview(open_cube(cube_url), out / "cube_overview.png")
    summary["stages"]["ingest"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "cube": cube_url,
        "slices": report.slices,
        "problems": report.problems,
        "overview_png": str(cube_png),
    }

    t0 = time.perf_counter()
    print(f"[3/{n}] sample: category-aware patch sampling, month and block splits", flush=True)
    sampled = sample_patches(
        cube_url,
        str(out / "index.parquet"),
        SamplingParams(n_anchors=DEMO_ANCHORS, block=DEMO_SPLIT_BLOCK),
    )
    counts = sampled.index.groupby("split").size().to_dict()
    print("  patches per split: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    summary["stages"]["sample"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "patches": counts,
        **sampled.files,
    }

    t0 = time.perf_counter()
    print(f"[4/{n}] shards: WebDataset shards per split and manifest.json", flush=True)
    present = tuple(
        s for s in ("pretrain", "train", "val", "test") if s in counts
    )  # a small area may lack one
    manifest = write_shards(
        cube_url,
        str(out / "index.parquet"),
        str(out / "shards"),
        min_shards_per_split=4,
        workers=workers,
        splits=present,
    )
    shard_counts = {k: len(v["shards"]) for k, v in manifest["splits"].items()}
    print("  shards per split: " + ", ".join(f"{k} {v}" for k, v in shard_counts.items()))
    summary["stages"]["shards"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "shards": shard_counts,
        "manifest": str(out / "shards" / "manifest.json"),
    }

    t0 = time.perf_counter()
    print(
        f"[5/{n}] pretrain: SAR-W-SimMIM, tiny Swin, on the pretrain shards (a few minutes on CPU)",
        flush=True,
    )
    # The model side is imported only here: the sarcube library itself never imports training.
    from training.pretrain import main as pretrain_main

    run_dir = out / "pretrain"
    argv = [
        "--config",
        "simmim_tiny",
        "--manifest",
        str(out / "shards" / "manifest.json"),
        "--out",
        str(run_dir),
        "schedule.epochs=3",
        "data.num_workers=0",
    ]
    if (run_dir / "checkpoint.pt").exists():
        argv.append(
            "--resume"
        )  # a finished run resumes to "finished" at once; an interrupted one goes on
    status = pretrain_main(argv)
    if status != 0:
        raise RuntimeError(f"pretraining failed (exit status {status}); see the messages above")
    summary["stages"]["pretrain"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "run": str(run_dir),
        "encoder": str(run_dir / "encoder.pth"),
        "figure": str(run_dir / "reconstruction.png"),
    }

    t0 = time.perf_counter()
    print(
        f"[6/{n}] finetune: refined UPerNet (LULC, 9 classes) on the pretrained encoder; "
        "validation each epoch, test with the best weights",
        flush=True,
    )
    from training.finetune import main as finetune_main

    ft_dir = out / "finetune"
    n_train = manifest["splits"].get("train", {}).get("samples", 0)
    if n_train < 2:
        raise RuntimeError(
            f"the demo area gave {n_train} train patches: too small to fine-tune "
            "(use a larger --bbox)"
        )
    # a small --bbox may give fewer train patches than the profile's batch of 8
    argv = [
        "--task",
        "lulc",
        "--config",
        "finetune_tiny",
        "--manifest",
        str(out / "shards" / "manifest.json"),
        "--pretrained",
        str(run_dir / "encoder.pth"),
        "--out",
        str(ft_dir),
        "data.num_workers=0",
        "schedule.epochs=8",
        f"data.batch_size={min(8, n_train)}",
        f"optim.lr_batch_base={min(8, n_train)}",
    ]
    if (ft_dir / "checkpoint.pt").exists():
        argv.append("--resume")
    status = finetune_main(argv)
    if status != 0:
        raise RuntimeError(f"fine-tuning failed (exit status {status}); see the messages above")
    print(
        "  (synthetic demo data: the table shows the pipeline works, not ALOS-2 accuracy; "
        "the papers' figures are in docs/design.md)"
    )
    summary["stages"]["finetune"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "run": str(ft_dir),
        "best": str(ft_dir / "best.pt"),
        "report": str(ft_dir / "test" / "report.md"),
    }

    t0 = time.perf_counter()
    first = sorted(open_cube(cube_url).time.dt.strftime("%Y-%m-%d").values)[0]
    print(
        f"[7/{n}] predict: the demo area on {first} with the best weights (seamless sliding "
        "windows, out of core), map PNG + Cloud-Optimized GeoTIFF",
        flush=True,
    )
    from training.predict import predict

    pred = predict(
        cube_url,
        str(ft_dir / "best.pt"),
        str(out / "predictions.zarr"),
        time=first,
        cog=str(out / "map_lulc.tif"),
        workers=workers,
    )
    s = pred.scores.get(first, {})
    print(
        f"  {pred.megapixels:.1f} Mpx in {pred.seconds:.1f} s; vs the labels: mIoU "
        f"{s.get('miou', float('nan')):.3f}, pixel accuracy {s.get('pixel_acc', float('nan')):.3f}"
    )
    summary["stages"]["predict"] = {
        "seconds": round(time.perf_counter() - t0, 1),
        "zarr": str(out / "predictions.zarr"),
        "cog": pred.cog,
        "panels": pred.panels,
        "miou": s.get("miou"),
    }

    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"\ndemo outputs under {out}/:")
    print(
        f"  synth/lulc/, synth/scenes/  {len(res_lulc)} HR-LULC tiles, "
        f"{len(res_scenes)} ALOS-2 L2.1 HH scenes"
    )
    print("  synth_overview.png          labels and scenes at a glance")
    print(f"  cube.zarr                   the datacube: sarcube.open_cube('{cube_url}')")
    print("  cube_overview.png           the cube: SAR dB per date and the labels")
    print(
        "  index.parquet               the patch index; index_report.{md,json,png}: "
        "class shares, anchors, α"
    )
    print("  shards/                     WebDataset shards ({split}-NNNNNN.tar) and manifest.json")
    print(
        "  pretrain/                   checkpoint.pt, encoder.pth, metrics.jsonl, tb/, "
        "reconstruction.png"
    )
    print(
        "  finetune/                   best.pt (best val mIoU), checkpoint.pt, metrics.jsonl, "
        "test/ report:"
    )
    print(
        "                              report.md (Table II layout), report.json, "
        "confusion_matrix.png,"
    )
    print("                              per_class.png, panels.png (SAR | prediction | truth)")
    print(
        "  predictions.zarr            pred_lulc of the predicted date: sarcube.open_cube('"
        + str(out / "predictions.zarr")
        + "')"
    )
    print(
        "  map_lulc.tif                the map as a Cloud-Optimized GeoTIFF "
        "(overviews, colour table)"
    )
    print(f"  predictions_pred_lulc_{first}.png   SAR | prediction | truth | errors")
    print("  summary.json                what each stage wrote and how long it took")
    return summary
