"""Pretraining end to end on real shards: 2-rank torchrun (gloo) streaming from the S3 server for
SimMIM and MixMAE, exact resume through the shard stream, the CLI (``sarcube pretrain``) and its
non-finite loss message.

Data: the session's small synthetic cube, sampled with ``sarcube.sampling`` and cut with
``sarcube.shards`` into 4 shards of the first 11 pretraining patches. 11 does not divide by
2 ranks × batch 2, so ``ShardStream`` gives each rank floor(11 / 4) = 2 steps per epoch (the
remainder policy leaves 3 samples out of each epoch) — both ranks must take exactly those steps.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers.engine_runs import jsonl_records

from sarcube.index import read_index
from sarcube.sampling import SamplingParams, sample_patches
from sarcube.shards import read_manifest, write_shards
from training.models import load_encoder_weights, swin_tiny
from training.pretrain import main
from training.reproducibility import param_checksum

REPO = Path(__file__).resolve().parents[1]
N_SAMPLES = 11
TINY = ["data.batch_size=2", "train.progress=false", "train.tensorboard=false"]


@pytest.fixture(scope="module")
def shards(small_cube, dask_cluster, tmp_path_factory) -> Path:
    from distributed import Client

    root = tmp_path_factory.mktemp("pretrain-data")
    params = SamplingParams(n_anchors=2000, seed=0, block=2)
    sample_patches(small_cube, str(root / "index.parquet"), params, progress=False)
    df, meta = read_index(str(root / "index.parquet"))
    pre = df[df["split"] == "pretrain"].sort_values("patch_id").head(N_SAMPLES)
    assert len(pre) == N_SAMPLES
    out = root / "shards"
    with Client(dask_cluster) as client:
        write_shards(
            small_cube,
            (pre, meta),
            str(out),
            shard_size_mb=64,
            min_shards_per_split=4,
            splits=("pretrain",),
            client=client,
            progress=False,
        )
    assert read_manifest(str(out))["splits"]["pretrain"]["samples"] == N_SAMPLES
    return out


# -- 2 ranks, gloo, shards on S3 -----------------------------------------------------------------


@pytest.mark.parametrize("method", ["simmim", "mixmae"])
def test_two_ranks_stream_from_s3_and_learn(method, shards, s3, tmp_path):
    fs = s3.fs()
    for f in shards.iterdir():
        fs.put_file(str(f), f"{s3.bucket}/shards/{f.name}")
    out = s3.url(f"runs/{method}")
    args = [
        "--config",
        f"{method}_tiny",
        "--manifest",
        s3.url("shards"),
        "--out",
        out,
        "--storage-option",
        f"endpoint_url={s3.endpoint}",
        *TINY,
        "schedule.epochs=4",
        "optim.base_lr=0.256",
        f"train.log_dir={tmp_path / 'logs'}",
    ]
    if method == "simmim":  # torchrun itself
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "training.pretrain",
            *args,
        ]
    else:  # the same through `sarcube pretrain --nproc 2`
        cmd = [sys.executable, "-m", "sarcube.cli", "pretrain", "--nproc", "2", *args]
    env = {**s3.subprocess_env(), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "2 rank(s), 2 steps/epoch, global batch 4" in proc.stderr

    base = f"{s3.bucket}/runs/{method}"
    ranks = [json.loads(fs.cat_file(f"{base}/ranks/rank-{r:05d}.json")) for r in (0, 1)]
    for r, s in enumerate(ranks):  # the same steps on both ranks, every epoch
        assert s["rank"] == r and s["world_size"] == 2
        assert s["steps_per_epoch"] == {"0": 2, "1": 2, "2": 2, "3": 2} and s["steps_taken"] == 8
        assert s["samples"] == 16
    assert ranks[0]["param_sha256"] == ranks[1]["param_sha256"]  # DDP kept them identical

    lines = jsonl_records(fs.cat_file(f"{base}/metrics.jsonl").decode())
    steps = [d for d in lines if d["kind"] == "step"]
    epochs = [d for d in lines if d["kind"] == "epoch"]
    assert [d["step"] for d in steps] == list(range(1, 9))
    assert [(d["epoch"], d["step"]) for d in epochs] == [(0, 2), (1, 4), (2, 6), (3, 8)]
    assert all(d["img_per_s"] > 0 and d["lr"] > 0 for d in steps)
    assert epochs[-1]["loss"] < epochs[0]["loss"] and epochs[-1]["loss"] < steps[0]["loss"]

    ck = torch.load(io.BytesIO(fs.cat_file(f"{base}/checkpoint.pt")), weights_only=True)
    assert ck["world_size"] == 2 and len(ck["rng"]) == 2 and ck["step"] == 8
    assert ck["config"]["method"] == method and ck["global_batch"] == 4
    model_sd = ck["model"]
    enc = swin_tiny()
    load_encoder_weights(
        enc, torch.load(io.BytesIO(fs.cat_file(f"{base}/encoder.pth")), weights_only=True)
    )
    for k, v in enc.state_dict().items():
        assert torch.equal(v, model_sd[f"encoder.{k}"]), k
    assert fs.cat_file(f"{base}/reconstruction.png")[:4] == b"\x89PNG"


# -- exact resume through the shard stream ---------------------------------------------------------


@pytest.mark.parametrize("method", ["simmim", "mixmae"])
def test_resume_through_the_stream_is_exact(method, shards, tmp_path):
    """10 steps (2 epochs of 5) vs 7 steps + resume (from step 2 of epoch 1)."""
    args = [
        "--config",
        f"{method}_tiny",
        "--manifest",
        str(shards),
        *TINY,
        "schedule.epochs=2",
        "train.figure=false",
        "data.shuffle_buffer=4",
    ]
    assert main([*args, "--out", str(tmp_path / "full")]) == 0
    assert main([*args, "--out", str(tmp_path / "split"), "train.max_steps=7"]) == 0
    ck = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    assert ck["data_position"] == {"epoch": 1, "batch": 2}
    assert main([*args, "--out", str(tmp_path / "split"), "--resume"]) == 0

    def losses(run):
        d = jsonl_records((tmp_path / run / "metrics.jsonl").read_text())
        return [(x["kind"], x["step"], x["loss"]) for x in d]

    full, split = losses("full"), losses("split")
    assert len([x for x in full if x[0] == "step"]) == 10
    assert split == full  # every step and epoch loss, bit for bit
    a = json.loads((tmp_path / "full" / "ranks" / "rank-00000.json").read_text())
    b = json.loads((tmp_path / "split" / "ranks" / "rank-00000.json").read_text())
    assert a["param_sha256"] == b["param_sha256"]


# -- the CLI ---------------------------------------------------------------------------------------


def test_sarcube_pretrain_cli(shards, tmp_path, capsys):
    from sarcube.cli import main as sarcube_main

    out = tmp_path / "cli"
    rc = sarcube_main(
        [
            "pretrain",
            "--config",
            "tiny",
            "--method",
            "mixmae",
            "--manifest",
            str(shards),
            "--out",
            str(out),
            *TINY,
            "train.max_steps=1",
        ]
    )
    assert rc == 0
    assert {
        "checkpoint.pt",
        "encoder.pth",
        "config.yaml",
        "metrics.jsonl",
        "reconstruction.png",
    } <= {p.name for p in out.iterdir()}
    assert "stopped at train.max_steps after step 1" in capsys.readouterr().out
    enc = swin_tiny()
    load_encoder_weights(enc, str(out / "encoder.pth"))
    assert param_checksum(enc)

    assert (
        sarcube_main(
            [
                "pretrain",
                "--manifest",
                str(shards),
                "--out",
                str(tmp_path / "x"),
                "optim.base_rate=1",
            ]
        )
        == 2
    )
    assert "unknown configuration key 'optim.base_rate'" in capsys.readouterr().err

    # a diverging run stops with the step and the last good checkpoint
    bad = tmp_path / "nan"
    rc = sarcube_main(
        [
            "pretrain",
            "--config",
            "simmim_tiny",
            "--manifest",
            str(shards),
            "--out",
            str(bad),
            *TINY,
            "optim.base_lr=1e30",
            "optim.grad_clip=null",
            "schedule.warmup_epochs=0",
            "train.ckpt_every_steps=1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 3, err
    assert "non-finite loss (nan) at step 2 (epoch 0)" in err
    assert f"last good checkpoint is {bad / 'checkpoint.pt'}" in err
