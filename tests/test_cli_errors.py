"""Bad input to the storage and training commands: one line ``sarcube <cmd>: error: …`` naming
the file, URL or argument, exit status 2, no traceback (``-v`` adds it), and before any long work.

``CASES`` is the table of inputs and the messages they give (the README's troubleshooting table
can be rendered from it): ``argv`` placeholders in braces are filled from fixtures —
``{shards}`` (local shards), ``{index}`` (their patch index), ``{cube}`` (local cube), ``{ckpt}``
(a fine-tuning checkpoint), ``{run}`` (a pretraining run stopped after one step), ``{nodata}``
(shards whose pretrain split is all no data), ``{pickled}`` (a torch file holding a Python
object), ``{garbage}`` (not a torch file), ``{file}`` (a regular file), ``{tmp}`` (an empty
directory), ``{endpoint}`` (the test S3 server).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SARCUBE = [sys.executable, "-m", "sarcube.cli"]
S3 = ["--storage-option", "endpoint_url={endpoint}"]
TINY = [
    "data.batch_size=2",
    "train.progress=false",
    "train.tensorboard=false",
    "train.figure=false",
]
NOBUCKET = "s3://no-such-bucket-sarcube"


@dataclass(frozen=True)
class BadInput:
    id: str
    argv: tuple[str, ...]
    expect: str  # regex searched in the one stderr line
    description: str
    setup: str = ""  # "forbidden": the S3 server refuses these credentials (403)


CASES = [
    # -- storage: a bucket that does not exist --------------------------------------------------
    BadInput(
        "sample-missing-bucket",
        ("sample", "--cube", f"{NOBUCKET}/cube.zarr", "--out", "{tmp}/index.parquet", *S3),
        rf"--cube {NOBUCKET}/cube\.zarr: the bucket 'no-such-bucket-sarcube' does not exist",
        "sample: the cube's bucket does not exist",
    ),
    BadInput(
        "shards-missing-bucket",
        ("shards", "--cube", "{cube}", "--index", "{index}", "--out", f"{NOBUCKET}/shards", *S3),
        rf"--out {NOBUCKET}/shards: the bucket 'no-such-bucket-sarcube' does not exist",
        "shards: the output bucket does not exist",
    ),
    BadInput(
        "pretrain-missing-bucket",
        ("pretrain", "--manifest", f"{NOBUCKET}/shards", "--out", "{tmp}/run", *S3, *TINY),
        rf"--manifest {NOBUCKET}/shards: the bucket 'no-such-bucket-sarcube' does not exist",
        "pretrain: the manifest's bucket does not exist",
    ),
    BadInput(
        "pretrain-nproc2-missing-bucket",
        (
            "pretrain",
            "--nproc",
            "2",
            "--manifest",
            "{shards}",
            "--out",
            f"{NOBUCKET}/run",
            *S3,
            *TINY,
        ),
        rf"--out {NOBUCKET}/run: the bucket 'no-such-bucket-sarcube' does not exist",
        "pretrain --nproc 2: checked before torchrun starts any rank",
    ),
    BadInput(
        "finetune-missing-bucket",
        (
            "finetune",
            "--manifest",
            "{shards}",
            "--pretrained",
            "none",
            "--out",
            f"{NOBUCKET}/ft",
            *S3,
        ),
        rf"--out {NOBUCKET}/ft: the bucket 'no-such-bucket-sarcube' does not exist",
        "finetune: the output bucket does not exist",
    ),
    BadInput(
        "evaluate-missing-bucket",
        (
            "evaluate",
            "--checkpoint",
            f"{NOBUCKET}/best.pt",
            "--manifest",
            "{shards}",
            "--out",
            "{tmp}/ev",
            *S3,
        ),
        rf"--checkpoint {NOBUCKET}/best\.pt: the bucket 'no-such-bucket-sarcube' does not exist",
        "evaluate: the checkpoint's bucket does not exist",
    ),
    BadInput(
        "predict-missing-bucket",
        ("predict", "--cube", f"{NOBUCKET}/cube.zarr", "--checkpoint", "{ckpt}", *S3),
        rf"--cube {NOBUCKET}/cube\.zarr: the bucket 'no-such-bucket-sarcube' does not exist",
        "predict: the cube's bucket does not exist",
    ),
    BadInput(
        "sample-missing-object",
        ("sample", "--cube", "s3://sarcube-test/nothing.zarr", "--out", "{tmp}/i.parquet", *S3),
        r"--cube s3://sarcube-test/nothing\.zarr: not found",
        "sample: nothing at the cube URL (bucket there)",
    ),
    BadInput(
        "predict-endpoint-down",
        (
            "predict",
            "--cube",
            "s3://sarcube-test/cube.zarr",
            "--checkpoint",
            "{ckpt}",
            "--storage-option",
            "endpoint_url=http://127.0.0.1:9",
        ),
        r"--cube s3://sarcube-test/cube\.zarr: cannot reach the storage endpoint: Could not "
        r"connect to the endpoint URL",
        "predict: the S3 endpoint does not answer (after botocore's retries, ~10 s)",
    ),
    BadInput(
        "sample-unknown-storage-option",
        (
            "sample",
            "--cube",
            "s3://sarcube-test/cube.zarr",
            "--out",
            "{tmp}/i.parquet",
            *S3,
            "--storage-option",
            "connect_timeout=1",
        ),
        r"--cube s3://sarcube-test/cube\.zarr: a --storage-option the S3 client does not "
        r"accept \(.*connect_timeout",
        "sample: a storage option s3fs does not take",
    ),
    # -- storage: the server refuses the credentials (403 Forbidden) ------------------------------
    BadInput(
        "sample-forbidden",
        ("sample", "--cube", "s3://sarcube-test/cube.zarr", "--out", "{tmp}/i.parquet", *S3),
        r"--cube s3://sarcube-test/cube\.zarr: access to the bucket 'sarcube-test' is denied",
        "sample: the server refuses the credentials (403)",
        "forbidden",
    ),
    BadInput(
        "shards-forbidden",
        (
            "shards",
            "--cube",
            "{cube}",
            "--index",
            "{index}",
            "--out",
            "s3://sarcube-test/shards",
            *S3,
        ),
        r"--out s3://sarcube-test/shards: access to the bucket 'sarcube-test' is denied",
        "shards: the server refuses the credentials (403)",
        "forbidden",
    ),
    BadInput(
        "finetune-forbidden",
        (
            "finetune",
            "--manifest",
            "s3://sarcube-test/shards",
            "--pretrained",
            "none",
            "--out",
            "{tmp}/ft",
            *S3,
        ),
        r"--manifest s3://sarcube-test/shards: access to the bucket 'sarcube-test' is denied",
        "finetune: the server refuses the credentials (403)",
        "forbidden",
    ),
    BadInput(
        "predict-forbidden",
        ("predict", "--cube", "{cube}", "--checkpoint", "s3://sarcube-test/best.pt", *S3),
        r"--checkpoint s3://sarcube-test/best\.pt: access to the bucket 'sarcube-test' is "
        r"denied",
        "predict: the server refuses the credentials (403)",
        "forbidden",
    ),
    # -- export ---------------------------------------------------------------------------------
    BadInput(
        "export-unknown-variable",
        ("export", "--cube", "{cube}", "--var", "sigma0", "--out", "{tmp}/x.tif"),
        r"\{cube\}: no variable 'sigma0'; expected one of hh_db, lulc",
        "export: a variable the cube does not hold",
    ),
    BadInput(
        "export-cog-of-several-dates",
        ("export", "--cube", "{cube}", "--var", "hh_db", "--out", "{tmp}/x.tif"),
        r"\{cube\}: hh_db has 3 dates \(2022-09-12, 2022-10-10, 2022-11-07\); a GeoTIFF holds "
        r"one: choose it with --time YYYY-MM-DD",
        "export: a COG of a layer with several dates and no --time",
    ),
    BadInput(
        "export-unknown-suffix",
        ("export", "--cube", "{cube}", "--var", "lulc", "--out", "{tmp}/x.png"),
        r"\{tmp\}/x\.png: cannot tell the format from the name; expected a \.tif \(COG\) or "
        r"\.nc \(netCDF\) file",
        "export: an output name that is neither .tif nor .nc",
    ),
    # -- numbers and devices ----------------------------------------------------------------------
    BadInput(
        "evaluate-batch-size-0",
        (
            "evaluate",
            "--checkpoint",
            "{ckpt}",
            "--manifest",
            "{shards}",
            "--out",
            "{tmp}/ev",
            "--batch-size",
            "0",
        ),
        r"--batch-size must be ≥ 1, got 0",
        "evaluate --batch-size 0",
    ),
    BadInput(
        "predict-batch-size-0",
        ("predict", "--cube", "{cube}", "--checkpoint", "{ckpt}", "--batch-size", "0"),
        r"--batch-size must be ≥ 1, got 0",
        "predict --batch-size 0",
    ),
    BadInput(
        "evaluate-device-banana",
        (
            "evaluate",
            "--checkpoint",
            "{ckpt}",
            "--manifest",
            "{shards}",
            "--out",
            "{tmp}/ev",
            "--device",
            "banana",
        ),
        r"--device 'banana': not a device; expected auto, cpu, cuda or cuda:N",
        "evaluate --device banana",
    ),
    BadInput(
        "predict-device-banana",
        ("predict", "--cube", "{cube}", "--checkpoint", "{ckpt}", "--device", "banana"),
        r"--device 'banana': not a device; expected auto, cpu, cuda or cuda:N",
        "predict --device banana",
    ),
    BadInput(
        "pretrain-device-banana",
        ("pretrain", "--manifest", "{shards}", "--out", "{tmp}/run", *TINY, "train.device=banana"),
        r"train\.device must be auto, cpu, cuda or cuda:N, got 'banana'",
        "pretrain train.device=banana",
    ),
    # -- outputs ----------------------------------------------------------------------------------
    BadInput(
        "pretrain-out-is-a-file",
        ("pretrain", "--manifest", "{shards}", "--out", "{file}", *TINY),
        r"--out \S+/a-file\.txt: an existing file, not a directory",
        "pretrain --out names an existing regular file",
    ),
    BadInput(
        "evaluate-out-is-a-file",
        ("evaluate", "--checkpoint", "{ckpt}", "--manifest", "{shards}", "--out", "{file}"),
        r"--out \S+/a-file\.txt: an existing file, not a directory",
        "evaluate --out names an existing regular file",
    ),
    BadInput(
        "predict-out-is-a-file",
        ("predict", "--cube", "{cube}", "--checkpoint", "{ckpt}", "--out", "{file}"),
        r"--out \S+/a-file\.txt: an existing file, not a directory",
        "predict --out names an existing regular file",
    ),
    BadInput(
        "predict-cog-missing-directory",
        (
            "predict",
            "--cube",
            "{cube}",
            "--checkpoint",
            "{ckpt}",
            "--out",
            "{tmp}/p.zarr",
            "--cog",
            "{tmp}/no/such/dir/map.tif",
        ),
        r"--cog \S+/no/such/dir/map\.tif: the directory \S+/no/such/dir does not exist",
        "predict --cog in a directory that does not exist (checked before predicting)",
    ),
    BadInput(
        "predict-cog-under-a-file",
        (
            "predict",
            "--cube",
            "{cube}",
            "--checkpoint",
            "{ckpt}",
            "--out",
            "{tmp}/p.zarr",
            "--cog",
            "{file}/map.tif",
        ),
        r"--cog \S+/a-file\.txt/map\.tif: \S+/a-file\.txt is a file, not a directory",
        "predict --cog below a regular file",
    ),
    # -- checkpoints ------------------------------------------------------------------------------
    BadInput(
        "evaluate-missing-checkpoint",
        (
            "evaluate",
            "--checkpoint",
            "{tmp}/missing.pt",
            "--manifest",
            "{shards}",
            "--out",
            "{tmp}/ev",
        ),
        r"--checkpoint \S+/missing\.pt: not found",
        "evaluate: no such checkpoint file",
    ),
    BadInput(
        "predict-missing-checkpoint",
        ("predict", "--cube", "{cube}", "--checkpoint", "{tmp}/missing.pt"),
        r"--checkpoint \S+/missing\.pt: not found",
        "predict: no such checkpoint file",
    ),
    BadInput(
        "evaluate-pickled-object",
        ("evaluate", "--checkpoint", "{pickled}", "--manifest", "{shards}", "--out", "{tmp}/ev"),
        r"\S+/pickled\.pt: not a sarcube checkpoint: it contains non-tensor objects "
        r"\(a argparse\.Namespace object\)",
        "evaluate: a checkpoint that torch.load(weights_only=True) refuses",
    ),
    BadInput(
        "predict-pickled-object",
        ("predict", "--cube", "{cube}", "--checkpoint", "{pickled}", "--out", "{tmp}/p.zarr"),
        r"\S+/pickled\.pt: not a sarcube checkpoint: it contains non-tensor objects",
        "predict: a checkpoint that torch.load(weights_only=True) refuses",
    ),
    BadInput(
        "evaluate-not-a-torch-file",
        ("evaluate", "--checkpoint", "{garbage}", "--manifest", "{shards}", "--out", "{tmp}/ev"),
        r"\S+/garbage\.pt: not a sarcube checkpoint: not a readable torch file",
        "evaluate: a file that is not a torch file at all",
    ),
    BadInput(
        "finetune-pretrained-pickled",
        (
            "finetune",
            "--manifest",
            "{shards}",
            "--pretrained",
            "{pickled}",
            "--out",
            "{tmp}/ft",
            "data.batch_size=4",
        ),
        r"\S+/pickled\.pt: .*not a sarcube checkpoint: it contains non-tensor objects",
        "finetune: --pretrained weights that a safe load refuses",
    ),
    BadInput(
        "finetune-missing-pretrained",
        (
            "finetune",
            "--manifest",
            "{shards}",
            "--pretrained",
            "{tmp}/enc.pth",
            "--out",
            "{tmp}/ft",
        ),
        r"--pretrained \S+/enc\.pth: not found",
        "finetune: no such encoder file",
    ),
    # -- runs -------------------------------------------------------------------------------------
    BadInput(
        "pretrain-all-nodata-split",
        ("pretrain", "--manifest", "{nodata}", "--out", "{tmp}/run", *TINY),
        r"the 'pretrain' split has no valid SAR pixel \(all \d+ samples are no data\)",
        "pretrain on a split whose samples are all no data",
    ),
    BadInput(
        "pretrain-resume-nothing",
        ("pretrain", "--manifest", "{shards}", "--out", "{tmp}/run", "--resume", *TINY),
        r"--resume: no checkpoint at \S+/run/checkpoint\.pt to resume from",
        "pretrain --resume where no run was written",
    ),
    BadInput(
        "pretrain-existing-run",
        ("pretrain", "--manifest", "{shards}", "--out", "{run}", *TINY),
        r"\S+/checkpoint\.pt exists: pass --resume to continue that run",
        "pretrain into a run folder without --resume",
    ),
    BadInput(
        "pretrain-resume-model-change",
        (
            "pretrain",
            "--manifest",
            "{shards}",
            "--out",
            "{run}",
            "--resume",
            *TINY,
            "model.window_size=4",
        ),
        r"cannot resume from \S+/checkpoint\.pt: the config differs from the run's in "
        r"model\.window_size: 8 -> 4",
        "--resume with a change that is not allowed on a resume",
    ),
    BadInput(
        "pretrain-nproc2-bad-override",
        (
            "pretrain",
            "--nproc",
            "2",
            "--manifest",
            "{shards}",
            "--out",
            "{tmp}/run",
            "optim.base_rate=1",
        ),
        r"unknown configuration key 'optim\.base_rate'",
        "pretrain --nproc 2 with a misspelt override: one line, no torchrun output",
    ),
    # -- ingest: arguments checked before any work ---------------------------------------------
    BadInput(
        "ingest-workers-negative",
        ("ingest", "--scenes", "{scene}", "--cube", "{tmp}/cube.zarr", "--workers", "-2"),
        r"--workers must be ≥ 1 \(worker processes\), got -2",
        "ingest: a cluster with no workers would hang for ever",
    ),
    BadInput(
        "ingest-bbox-out-of-range",
        (
            "ingest",
            "--scenes",
            "{scene}",
            "--cube",
            "{tmp}/cube.zarr",
            "--bbox",
            "-500",
            "35.9",
            "-499",
            "36",
            "--workers",
            "1",
        ),
        r"--bbox -500\.0 35\.9 -499\.0 36\.0: expected W < E within −180…180",
        "ingest: a longitude of −500",
    ),
    BadInput(
        "ingest-memory-limit",
        (
            "ingest",
            "--scenes",
            "{scene}",
            "--cube",
            "{tmp}/cube.zarr",
            "--memory-limit",
            "banana",
            "--workers",
            "1",
        ),
        r"--memory-limit 'banana': expected a size such as 2GB",
        "ingest: a memory limit that is not a size",
    ),
    BadInput(
        "ingest-scheduler-unreachable",
        (
            "ingest",
            "--scenes",
            "{scene}",
            "--cube",
            "{tmp}/cube.zarr",
            "--scheduler",
            "tcp://127.0.0.1:9",
        ),
        r"--scheduler tcp://127\.0\.0\.1:9: cannot connect to a Dask scheduler there",
        "ingest: no scheduler at that address",
    ),
    BadInput(
        "ingest-cube-is-a-file",
        ("ingest", "--scenes", "{scene}", "--cube", "{file}", "--workers", "1"),
        r"--cube .*a-file\.txt: is an existing file, not a cube",
        "ingest: --cube names a regular file",
    ),
    BadInput(
        "ingest-cube-is-another-folder",
        ("ingest", "--scenes", "{scene}", "--cube", "{shards}", "--workers", "1"),
        r"an existing folder that is not a sarcube cube",
        "ingest: --cube names a folder of other things",
    ),
    BadInput(
        "ingest-strict-corrupt-scene",
        (
            "ingest",
            "--scenes",
            "{scene}",
            "{corrupt}",
            "--cube",
            "{tmp}/cube.zarr",
            "--scheduler",
            "{scheduler}",
            "--strict",
        ),
        r"--strict: input problems \(nothing was written\):.*pixel data cannot be read at rows",
        "ingest --strict: a scene damaged in the middle; nothing is written",
    ),
    BadInput(
        "ingest-strict-label-codes",
        (
            "ingest",
            "--lulc",
            "{badlabels}",
            "--cube",
            "{tmp}/cube.zarr",
            "--scheduler",
            "{scheduler}",
            "--strict",
        ),
        r"label codes outside the HR-LULC class table: 15 \(100 px\), 200 \(50 px\)",
        "ingest --strict: label codes 15 and 200 (not in the class table)",
    ),
    BadInput(
        "ingest-locked-cube",
        ("ingest", "--scenes", "{scene}", "--cube", "{cube}", "--scheduler", "{scheduler}"),
        r"--cube|locked by another writer: sarcube test-holder \(pid N",
        "ingest: another writer holds the cube's lock",
        "cube_locked",
    ),
    # -- shards, predict, runs: one writer; verified shards ------------------------------------
    BadInput(
        "shards-workers-negative",
        (
            "shards",
            "--cube",
            "{cube}",
            "--index",
            "{index}",
            "--out",
            "{tmp}/shards",
            "--workers",
            "-1",
        ),
        r"--workers must be ≥ 1",
        "shards: a cluster with no workers",
    ),
    BadInput(
        "shards-out-is-a-file",
        ("shards", "--cube", "{cube}", "--index", "{index}", "--out", "{file}"),
        r"--out \{file\}: an existing file, not a directory",
        "shards: --out names a regular file",
    ),
    BadInput(
        "shards-locked-prefix",
        (
            "shards",
            "--cube",
            "{cube}",
            "--index",
            "{index}",
            "--out",
            "{shards}",
            "--scheduler",
            "{scheduler}",
        ),
        r"locked by another writer: sarcube test-holder",
        "shards: another writer holds the prefix's lock",
        "shards_locked",
    ),
    BadInput(
        "predict-locked-cube",
        ("predict", "--cube", "{cube}", "--checkpoint", "{ckpt}", "--out", "{cube}"),
        r"locked by another writer: sarcube test-holder",
        "predict into the cube while another writer holds it",
        "cube_locked",
    ),
    BadInput(
        "unlock-live-lock",
        ("unlock", "{cube}"),
        r"the lock is live \(sarcube test-holder .*refusing to break it without --force",
        "unlock: the holder still heart-beats",
        "cube_locked",
    ),
    BadInput(
        "evaluate-damaged-shard",
        (
            "evaluate",
            "--checkpoint",
            "{ckpt}",
            "--manifest",
            "{flipped}",
            "--split",
            "val",
            "--out",
            "{tmp}/ev",
        ),
        r"the shard differs from the manifest: sha256 .*val-000000\.tar",
        "evaluate: a byte flipped inside a shard (the manifest's sha256 differs)",
    ),
]


# ---------------------------------------------------------------------------------------------
# Inputs


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A best.pt-format checkpoint of an untrained tiny segmenter."""
    from training.config import load_config
    from training.run_folder import MODEL_FORMAT
    from training.segmenter import build_segmentation_model

    cfg = load_config("finetune_tiny", method="finetune")
    path = tmp_path_factory.mktemp("ck") / "best.pt"
    torch.save(
        {
            "format": MODEL_FORMAT,
            "model": build_segmentation_model(cfg).state_dict(),
            "config": cfg.to_dict(),
            "extra": {"task": "lulc", "num_classes": 9, "db_stats": [-12.0, 5.0]},
            "epoch": 1,
            "step": 1,
            "scores": {},
        },
        path,
    )
    return path


@pytest.fixture(scope="module")
def nodata_shards(small_shards, tmp_path_factory) -> Path:
    """``small_shards`` with a manifest that says the pretrain split holds no valid pixel (what
    `sarcube shards` writes for patches that are all no data: ``db_stats.pixels`` 0)."""
    out = tmp_path_factory.mktemp("nodata") / "shards"
    shutil.copytree(small_shards, out)
    man = json.loads((out / "manifest.json").read_text())
    man["splits"]["pretrain"]["db_stats"].update(mean=None, std=None, pixels=0, sum=0.0, sum_sq=0.0)
    (out / "manifest.json").write_text(json.dumps(man))
    return out


@pytest.fixture(scope="module")
def run_dir(small_shards, tmp_path_factory) -> Path:
    """A pretraining run stopped after one step (checkpoint.pt, config.yaml)."""
    from training.pretrain import main

    out = tmp_path_factory.mktemp("run") / "run"
    assert (
        main(["--manifest", str(small_shards), "--out", str(out), *TINY, "train.max_steps=1"]) == 0
    )
    return out


@pytest.fixture(scope="module")
def damaged_inputs(small_synth, small_shards, tmp_path_factory) -> dict[str, str]:
    """A scene damaged in the middle, a label tile with codes 15 and 200, shards with a flipped
    byte inside one shard."""
    import rasterio
    from helpers.bad_scenes import corrupt_middle_tile, with_date

    d = tmp_path_factory.mktemp("damaged")
    scene = small_synth.scene_urls[0]
    corrupt = corrupt_middle_tile(scene, d / with_date(scene, "220916"))
    lab = small_synth.lulc_urls[0]
    with rasterio.open(lab) as ds:
        profile, codes = ds.profile, ds.read()
    codes[0, 10:20, 10:20], codes[0, 100:105, 200:210] = 15, 200
    (d / "labels").mkdir()
    badlabels = d / "labels" / Path(lab).name
    with rasterio.open(badlabels, "w", **profile) as out:
        out.write(codes)
    flipped = d / "shards"
    shutil.copytree(small_shards, flipped)
    tar = flipped / "val-000000.tar"
    raw = bytearray(tar.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    tar.write_bytes(bytes(raw))
    return {
        "corrupt": corrupt,
        "badlabels": str(badlabels),
        "flipped": str(flipped),
        "scene": scene,
    }


def _held_lock(url: str):
    from sarcube.locking import StoreLock

    return StoreLock(url, command="sarcube test-holder")


@pytest.fixture
def cube_locked(small_cube):
    with _held_lock(small_cube):
        yield


@pytest.fixture
def shards_locked(small_shards):
    with _held_lock(str(small_shards)):
        yield


@pytest.fixture
def fill(
    small_shards,
    small_cube,
    ckpt,
    run_dir,
    nodata_shards,
    damaged_inputs,
    dask_cluster,
    s3,
    tmp_path,
):
    """``{name}`` placeholders -> the fixtures' paths (``fill.values`` holds them)."""
    (tmp_path / "a-file.txt").write_text("not a directory\n")
    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "pickled.pt")
    (tmp_path / "garbage.pt").write_bytes(b"this is not a torch file\n" * 4)
    work = tmp_path / "work"
    work.mkdir()
    values = {
        "shards": str(small_shards),
        "index": str(small_shards.parent / "index.parquet"),
        "cube": str(small_cube),
        "ckpt": str(ckpt),
        "run": str(run_dir),
        "nodata": str(nodata_shards),
        "pickled": str(tmp_path / "pickled.pt"),
        "garbage": str(tmp_path / "garbage.pt"),
        "file": str(tmp_path / "a-file.txt"),
        "tmp": str(work),
        "endpoint": s3.endpoint,
        "scheduler": dask_cluster.scheduler_address,
        **damaged_inputs,
    }

    def fill_in(argv):
        return [a.format(**values) for a in argv]

    fill_in.values = values
    return fill_in


def without_progress_bars(text: str) -> str:
    """stderr without tqdm's progress lines ("inspect: 100%|███| 2/2 …"): progress is shown on
    purpose, the error itself must be one line."""
    return "\n".join(
        ln for ln in text.replace("\r", "\n").splitlines() if not re.match(r"^[\w ]+:\s+\d+%\|", ln)
    )


def run(argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [*SARCUBE, *argv], capture_output=True, text=True, timeout=300, env=env, cwd=cwd
    )


@pytest.fixture
def forbidden(s3):
    """Make the S3 server check credentials (moto's IAM auth on): unknown keys get 403."""
    import urllib.request

    def set_count(n: str) -> None:
        req = urllib.request.Request(
            f"{s3.endpoint}/moto-api/reset-auth",
            data=n.encode(),
            headers={"Content-Type": "text/plain"},
            method="POST",
        )
        urllib.request.urlopen(req, timeout=10).read()

    set_count("0")
    try:
        yield
    finally:
        set_count("inf")


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line(case, fill, tmp_path, request):
    argv = fill(case.argv)
    if case.setup:
        request.getfixturevalue(case.setup)
    p = run(argv, tmp_path / "work")
    cmd = case.argv[0]
    err = without_progress_bars(p.stderr).strip()
    assert p.returncode == 2, (p.returncode, p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr, p.stderr[-3000:]
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"sarcube {cmd}: error: "), err
    shown = normalise(err, fill.values)
    assert re.search(case.expect, err) or re.search(case.expect, shown), (case.expect, err)
    assert "weights_only=False" not in err and "launching" not in p.stdout
    assert not any((tmp_path / "work").iterdir())  # nothing was written
    SEEN[case.id] = shown


def test_no_credentials_is_one_line(fill, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        PYTHONPATH=str(REPO),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"),
        AWS_CONFIG_FILE=str(tmp_path / "none"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    argv = fill(
        [
            "shards",
            "--cube",
            "s3://sarcube-test/cube.zarr",
            "--index",
            "{index}",
            "--out",
            "{tmp}/shards",
            *S3,
        ]
    )
    p = subprocess.run([*SARCUBE, *argv], capture_output=True, text=True, timeout=120, env=env)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr[-3000:]
    assert p.stderr.strip() == (
        "sarcube shards: error: --cube s3://sarcube-test/cube.zarr: no S3 "
        "credentials (pass --storage-option key=... --storage-option "
        "secret=..., set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or "
        "--storage-option anon=true)"
    )


def test_verbose_adds_the_traceback(fill, tmp_path):
    case = next(c for c in CASES if c.id == "evaluate-pickled-object")
    p = run(["-v", *fill(case.argv)], tmp_path / "work")
    assert p.returncode == 2
    assert "Traceback" in p.stderr
    assert p.stderr.strip().splitlines()[-1].startswith("sarcube evaluate: error: ")


def test_cases_cover_every_command():
    assert {c.argv[0] for c in CASES} == {
        "ingest",
        "sample",
        "shards",
        "pretrain",
        "finetune",
        "evaluate",
        "predict",
        "unlock",
        "export",
    }


# ---------------------------------------------------------------------------------------------
# The README's table of bad inputs is these cases and the messages they gave, so it cannot drift


SEEN: dict[str, str] = {}  # case id -> the normalised message this session printed
README = REPO / "README.md"
TABLE_START = "<!-- bad-input-table:start"
TABLE_END = "<!-- bad-input-table:end -->"


def normalise(line: str, values: dict[str, str]) -> str:
    """The message with this session's paths, ports, pids and ages replaced by placeholders."""
    for name, value in sorted(values.items(), key=lambda kv: -len(kv[1])):
        line = line.replace(value, "{" + name + "}")
    line = re.sub(r"pid \d+, [^)@]+@[^)]+\)", "pid N, user@host)", line)
    line = re.sub(r"\d+(\.\d+)? (s|min|h) ago", "N s ago", line)
    # shard bytes hold this session's cube fingerprint, so their digests differ between runs
    line = re.sub(r"\b[0-9a-f]{12}…", "HEX…", line)
    return line


def _code(text: str) -> str:
    """A Markdown code span, doubled backticks when the text holds one."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def render_table(seen: dict[str, str]) -> str:
    rows = [
        "| # | input (`sarcube …`) | what it is | message (stderr, exit status 2) |",
        "|---|---|---|---|",
    ]
    for i, case in enumerate(CASES, 1):
        cmd = " ".join(case.argv).replace("|", "\\|")
        msg = seen[case.id].replace("|", "\\|")
        rows.append(f"| {i} | {_code(cmd)} | {case.description} | {_code(msg)} |")
    return "\n".join(rows)


def test_readme_bad_input_table_is_current():
    """Runs after every case above (file order): the README table equals what they printed.
    ``SARCUBE_UPDATE_README=1`` rewrites it instead (``python tools/bad_input_table.py``)."""
    if set(SEEN) != {c.id for c in CASES}:
        pytest.skip("needs every case of test_bad_input_is_one_line in this session")
    text = README.read_text()
    start = text.index(TABLE_START)
    body_start = text.index("\n", start) + 1
    end = text.index(TABLE_END)
    table = render_table(SEEN) + "\n"
    if os.environ.get("SARCUBE_UPDATE_README") == "1":
        README.write_text(text[:body_start] + table + text[end:])
        return
    assert text[body_start:end] == table, (
        "README's bad-input table is stale: run `python tools/bad_input_table.py`"
    )


# ---------------------------------------------------------------------------------------------
# The non-finite-loss advice works as printed; --resume takes allowed overrides, recorded


def test_nonfinite_advice_and_resume_with_a_new_base_lr(small_shards, tmp_path, capsys):
    """A run stopped after one good step; resumed with a huge lr it diverges, and the advice it
    prints (``--resume optim.base_lr=…``) is accepted as printed; a sane value finishes the run.
    Every attempt is in history.jsonl; a change not allowed on a resume is refused."""
    from sarcube.cli import main

    out = tmp_path / "run"
    argv = [
        "pretrain",
        "--manifest",
        str(small_shards),
        "--out",
        str(out),
        *TINY,
        "schedule.warmup_epochs=0",
        "schedule.epochs=1",
    ]
    assert main([*argv, "train.max_steps=1"]) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main([*argv, "--resume", "optim.base_lr=1e30"]) == 3
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sarcube pretrain: error: non-finite"), err
    assert f"the last good checkpoint is {out / 'checkpoint.pt'}" in err
    m = re.search(r"run the same command again with (--resume optim\.base_lr=(\S+)) added", err)
    assert m, err
    assert float(m.group(2)) == pytest.approx(1e29)
    # the advice as printed is accepted (at that lr it may diverge again: exit 3, not 2)
    assert main([*argv, "--resume", "optim.base_lr=1e30", *m.group(1).split()]) in (0, 3)
    capsys.readouterr()
    # a sane value goes on to the end of the schedule
    assert main([*argv, "--resume", "optim.base_lr=1e-5"]) == 0, capsys.readouterr().err
    hist = [json.loads(x) for x in (out / "history.jsonl").read_text().splitlines()]
    assert [h["event"] for h in hist] == ["start", "resume", "resume", "resume"]
    assert hist[1]["changes"] == {"optim.base_lr": [0.032, 1e30], "train.max_steps": [1, None]}
    assert hist[2]["changes"]["optim.base_lr"] == [0.032, 1e29]
    assert hist[3]["changes"]["optim.base_lr"] == [0.032, 1e-5]
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["config"]["optim"]["base_lr"] == 1e-5
    assert [h["event"] for h in ck["history"]] == ["start", "resume"]  # this checkpoint's lineage
    steps = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    lrs = [s["lr"] for s in steps if s["kind"] == "step" and s["step"] > 1]
    assert lrs and all(0 < lr <= 1e-5 * 2 / 256 * (1 + 1e-9) for lr in lrs)  # the new peak

    # a finished run extended by one epoch: schedule.epochs named on the resume
    done = ck["step"]
    assert main([*argv, "--resume", "optim.base_lr=1e-5", "schedule.epochs=2"]) == 0
    capsys.readouterr()
    ck = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ck["epoch"] == 2 and ck["step"] == 2 * done
    last = json.loads((out / "history.jsonl").read_text().splitlines()[-1])
    assert last["changes"] == {"schedule.epochs": [1, 2]}

    # a change that is not allowed on a resume is still refused, in one line
    assert main([*argv, "--resume", "model.window_size=4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "model.window_size: 8 -> 4" in err, err
