"""The training engine: the lr schedule and weight-decay groups, launcher detection, exact
resume, the non-finite loss guard, and checkpoints on S3 (read back with ``weights_only=True``).
Configs and overrides are tested in test_config.py.

These tests drive :class:`training.engine.Trainer` in-process with the tiny SimMIM at 256 px on a
small deterministic in-memory data source (``helpers.engine_runs``; the shard stream is exercised
in test_pretrain.py).
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import pytest
import torch
from helpers.engine_runs import SynthData, make_trainer, tiny_cfg

from training import distributed as tdist
from training.checkpoint import load_checkpoint, rng_state, save_checkpoint, set_rng_state
from training.config import load_config
from training.engine import Trainer
from training.loop_state import NonFiniteLossError
from training.models import load_encoder_weights, swin_tiny
from training.models.mixmae import mixmae_tiny
from training.models.simmim import SimMIM
from training.optim import (
    WarmupCosine,
    build_optimizer,
    build_scheduler,
    param_groups_weight_decay,
    scaled_lr,
)
from training.pretrain import build_model, make_task
from training.reproducibility import step_generator

torch.set_num_threads(1)


def step_losses(metrics: Path) -> dict[int, float]:
    lines = [json.loads(ln) for ln in metrics.read_text().splitlines()]
    return {d["step"]: d["loss"] for d in lines if d["kind"] == "step"}


# -- learning rate, weight decay ----------------------------------------------------------------


def test_lr_scaling_and_schedule_by_hand():
    assert scaled_lr(1.5e-4, 256, 8, 1) == pytest.approx(1.2e-3)  # the papers' 8 x 256
    assert scaled_lr(1.5e-4, 64, 2, 4) == pytest.approx(1.5e-4 * 512 / 256)

    peak, floor, warm, total = 1e-3, 1e-5, 4, 12
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = build_optimizer([{"params": [p]}], peak)
    sched = build_scheduler(opt, warm, total, peak, floor)
    expect = [peak * (s + 1) / warm for s in range(warm)] + [
        floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * (s - warm) / (total - warm)))
        for s in range(warm, total)
    ]
    assert expect[warm] == pytest.approx(peak)  # the cosine starts at the peak
    got = []
    for s in range(total):
        got.append(opt.param_groups[0]["lr"])  # the lr update s uses
        opt.step()
        sched.step()
        if s == 6:  # restorable mid-way from the state dicts (as the engine does)
            opt2 = build_optimizer([{"params": [p]}], peak)
            sched2 = build_scheduler(opt2, warm, total, peak, floor)
            opt2.load_state_dict(opt.state_dict())
            sched2.load_state_dict(sched.state_dict())
            assert opt2.param_groups[0]["lr"] == sched.get_last_lr()[0] == expect[s + 1]
            opt2.step()
            sched2.step()
            assert opt2.param_groups[0]["lr"] == pytest.approx(expect[s + 2], rel=1e-12)
    assert got == pytest.approx(expect, rel=1e-12)
    assert opt.param_groups[0]["lr"] == pytest.approx(floor)  # at s = total: the floor
    f = WarmupCosine(0, 10)
    assert f(0) == 1.0 and f(10) == 0.0 and f(5) == pytest.approx(0.5)


def test_trainer_lr_comes_from_global_batch(tmp_path):
    cfg = tiny_cfg("optim.accum_steps=3", "optim.base_lr=0.1", "optim.lr_batch_base=100")
    tr = make_trainer(cfg, tmp_path / "o", data=SynthData(steps_per_epoch=7))
    assert tr.global_batch == 2 * 1 * 3 and tr.lr == pytest.approx(0.1 * 6 / 100)
    assert tr.steps_per_epoch == 2  # 7 batches // 3 per step
    assert tr.total_steps == 4 and tr.warmup_steps == 2


def _groups(model):
    groups = param_groups_weight_decay(model, 0.05)
    by = {g["group_name"]: (g["weight_decay"], set(g["param_names"])) for g in groups}
    return by["decay"], by["no_decay"]


def test_weight_decay_skips_norms_biases_positions_and_mask_tokens():
    model = SimMIM(swin_tiny())
    (wd, decay), (wd0, no_decay) = _groups(model)
    assert wd == 0.05 and wd0 == 0.0
    named = dict(model.named_parameters())
    assert decay | no_decay == set(named) and not decay & no_decay
    assert {"mask_token", "encoder.absolute_pos_embed"} <= no_decay
    assert all(named[n].ndim >= 2 for n in decay)
    for n in named:
        if n.endswith(".bias") or ".norm" in n or "norm1" in n or "norm2" in n:
            assert n in no_decay, n
        if "relative_position_bias_table" in n:
            assert n in no_decay, n
    assert "encoder.layers.2.blocks.0.attn.qkv.weight" in decay
    assert "encoder.patch_embed.proj.weight" in decay and "decoder.0.weight" in decay

    mix = mixmae_tiny()  # its sin-cos APE is frozen: in no group at all
    (_, d2), (_, n2) = _groups(mix)
    assert "encoder.absolute_pos_embed" not in d2 | n2
    assert "mask_token" in n2 and "decoder_pos_embed" not in d2 | n2


class LayerDecayTask:
    """A task with its own parameter groups (as fine-tuning will have: layer-wise lr decay)."""

    def __init__(self, task) -> None:
        self.task = task

    def loss(self, model, batch, *, step, rank):
        return self.task.loss(model, batch, step=step, rank=rank)

    def param_groups(self, model, weight_decay, lr):
        from training.layer_decay import param_groups_layer_decay

        return param_groups_layer_decay(model, lr, weight_decay, layer_decay=0.7)


def test_task_param_groups_keep_their_lr_scale_under_the_schedule(tmp_path):
    cfg = tiny_cfg()
    model = build_model(cfg)
    tr = Trainer(cfg, model, LayerDecayTask(make_task(cfg, model)), SynthData(), str(tmp_path))
    groups = tr.optimizer.param_groups
    assert len(groups) > 2 and {g["lr_scale"] for g in groups} > {1.0}
    first = 1 / tr.warmup_steps  # warm-up factor of update 0
    for g in groups:
        assert g["lr"] == pytest.approx(tr.lr * g["lr_scale"] * first)
    tr.fit()
    assert all(g["lr"] == pytest.approx(0.0, abs=1e-12) for g in groups)  # cosine to 0 at the end


# -- launchers and per-step randomness ---------------------------------------------------------


def test_rank_detection_from_launchers(tmp_path):
    assert tdist.detect({}) == tdist.DistInfo()
    t = tdist.detect(
        {
            "RANK": "3",
            "WORLD_SIZE": "4",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "h0",
            "MASTER_PORT": "1234",
        }
    )
    assert (t.rank, t.world_size, t.local_rank, t.master_addr, t.master_port, t.source) == (
        3,
        4,
        1,
        "h0",
        1234,
        "torchrun",
    )
    nodefile = tmp_path / "nodes"
    nodefile.write_text("\nabci-node-7\nabci-node-8\n")
    o = tdist.detect(
        {
            "OMPI_COMM_WORLD_RANK": "5",
            "OMPI_COMM_WORLD_SIZE": "8",
            "OMPI_COMM_WORLD_LOCAL_RANK": "1",
            "PBS_NODEFILE": str(nodefile),
        }
    )
    assert (o.rank, o.world_size, o.local_rank, o.master_addr, o.master_port, o.source) == (
        5,
        8,
        1,
        "abci-node-7",
        29500,
        "openmpi",
    )
    p = tdist.detect({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "m"})
    assert (p.rank, p.world_size, p.local_rank, p.master_addr, p.source) == (2, 4, 0, "m", "pmi")
    with pytest.raises(ValueError, match="rank 4 is not in"):
        tdist.detect({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="not an integer"):
        tdist.detect({"PMI_RANK": "x", "PMI_SIZE": "2"})
    # a single process: no process group, the helpers act locally
    info, dev = tdist.init_distributed("cpu", environ={})
    assert info.world_size == 1 and dev.type == "cpu" and tdist.is_main()
    assert tdist.all_reduce_mean(torch.tensor(3.0)).item() == 3.0


def test_masks_depend_only_on_seed_step_and_rank():
    a = torch.rand(5, generator=step_generator(0, 17, 1))
    assert torch.equal(a, torch.rand(5, generator=step_generator(0, 17, 1)))
    for other in ((1, 17, 1), (0, 18, 1), (0, 17, 0)):
        assert not torch.equal(a, torch.rand(5, generator=step_generator(*other)))


# -- exact resume ---------------------------------------------------------------------------------


@pytest.mark.parametrize("accum", [1, 2])
def test_resume_continues_exactly(tmp_path, accum):
    """Uninterrupted N steps vs k steps + resume: per-step losses and final weights equal. Drop
    path is on, so the restored RNG states matter as well as the per-step masks."""
    over = (f"optim.accum_steps={accum}", "model.drop_path_rate=0.1")
    spe = 3 * accum  # 3 optimiser steps per epoch, 2 epochs
    full = make_trainer(tiny_cfg(*over), tmp_path / "full", data=SynthData(spe)).fit()
    assert full.finished and full.step == 6 and len(full.losses) == 6

    first = make_trainer(
        tiny_cfg(*over, "train.max_steps=4"), tmp_path / "split", data=SynthData(spe)
    ).fit()
    assert not first.finished and first.step == 4 and first.epoch == 1  # stopped mid-epoch 1
    ck = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    assert (ck["step"], ck["epoch"], ck["step_in_epoch"]) == (4, 1, 1)
    assert ck["data_position"] == {"epoch": 1, "batch": accum}
    rest = make_trainer(tiny_cfg(*over), tmp_path / "split", data=SynthData(spe)).fit(resume=True)
    assert rest.finished and rest.steps_taken == 2

    assert first.losses + rest.losses == full.losses  # bit for bit
    assert step_losses(tmp_path / "split" / "metrics.jsonl") == step_losses(
        tmp_path / "full" / "metrics.jsonl"
    )
    s_full = json.loads((tmp_path / "full" / "ranks" / "rank-00000.json").read_text())
    s_split = json.loads((tmp_path / "split" / "ranks" / "rank-00000.json").read_text())
    assert s_full["param_sha256"] == s_split["param_sha256"]
    a = load_checkpoint(str(tmp_path / "full" / "checkpoint.pt"))
    b = load_checkpoint(str(tmp_path / "split" / "checkpoint.pt"))
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    assert a["scheduler"]["last_epoch"] == b["scheduler"]["last_epoch"] == 6


@pytest.mark.parametrize("method", ["simmim", "mixmae"])
def test_weight_recomputed_from_the_image_equals_the_loaders(tmp_path, method):
    losses = {}
    for src in ("batch", "model"):
        cfg = load_config(
            f"{method}_tiny",
            [
                "data.batch_size=2",
                "train.max_steps=1",
                f"loss.weight_source={src}",
                "train.progress=false",
                "train.tensorboard=false",
                "train.figure=false",
            ],
        )
        losses[src] = make_trainer(cfg, tmp_path / src).fit().losses
    assert losses["model"] == pytest.approx(losses["batch"], rel=1e-5)


def test_no_silent_overwrite_and_resume_checks(tmp_path):
    out = tmp_path / "run"
    make_trainer(tiny_cfg("train.max_steps=1"), out).fit()
    with pytest.raises(FileExistsError, match="pass --resume"):
        make_trainer(tiny_cfg(), out).fit()
    with pytest.raises(ValueError, match=r"optim\.base_lr: 0\.256 -> 0\.5"):
        make_trainer(tiny_cfg("optim.base_lr=0.5"), out).fit(resume=True)
    with pytest.raises(
        ValueError, match=r"1 rank.s. with 3 steps per epoch, this run has 1 rank.s. with 4"
    ):
        make_trainer(tiny_cfg(), out, data=SynthData(4)).fit(resume=True)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        make_trainer(tiny_cfg(), tmp_path / "empty").fit(resume=True)


def test_one_writer_per_run_folder(tmp_path):
    """A second run (or resume) of a folder that a live run holds is refused with the holder
    named, before it touches anything; the lock is gone when fit() ends, even on an error."""
    from sarcube.locking import LOCK_NAME, LockHeldError, StoreLock

    out = tmp_path / "run"
    with StoreLock(str(out), command="sarcube simmim (elsewhere)"):
        with pytest.raises(LockHeldError, match=r"locked by another writer.*elsewhere"):
            make_trainer(tiny_cfg("train.max_steps=1"), out).fit()
        assert not (out / "checkpoint.pt").exists()
    make_trainer(tiny_cfg("train.max_steps=1"), out).fit()
    assert (out / "checkpoint.pt").exists() and not (out / LOCK_NAME).exists()
    with pytest.raises(FileExistsError):
        make_trainer(tiny_cfg(), out).fit()
    assert not (out / LOCK_NAME).exists()


# -- non-finite guard ---------------------------------------------------------------------------


class NaNAt:
    """Wraps a task: the loss of micro-step ``at`` becomes NaN (a test hook)."""

    def __init__(self, task, at: int) -> None:
        self.task, self.at = task, at

    def loss(self, model, batch, *, step, rank):
        loss = self.task.loss(model, batch, step=step, rank=rank)
        return loss * float("nan") if step == self.at else loss


def test_non_finite_loss_stops_with_step_and_last_checkpoint(tmp_path):
    cfg = tiny_cfg("train.ckpt_every_steps=2")
    model = build_model(cfg)
    data = SynthData()
    tr = Trainer(cfg, model, NaNAt(make_task(cfg, model), at=4), data, str(tmp_path / "run"))
    with pytest.raises(NonFiniteLossError) as e:
        tr.fit()
    ck = str(tmp_path / "run" / "checkpoint.pt")
    msg = str(e.value)
    assert (
        "non-finite loss (nan) at step 5 (epoch 1)" in msg
        and f"last good checkpoint is {ck}" in msg
    )
    assert e.value.step == 5 and e.value.checkpoint == ck
    assert load_checkpoint(ck)["step"] == 4
    assert all(
        torch.isfinite(p).all() for p in model.parameters()
    )  # the bad update was not applied
    assert max(step_losses(tmp_path / "run" / "metrics.jsonl")) == 4

    tr = Trainer(
        cfg, build_model(cfg), NaNAt(make_task(cfg, model), at=0), data, str(tmp_path / "r2")
    )
    with pytest.raises(NonFiniteLossError, match=r"at step 1 .*no checkpoint was written yet"):
        tr.fit()


# -- checkpoints ----------------------------------------------------------------------------------


def test_rng_state_round_trip_is_weights_only_safe():
    import random

    import numpy as np

    torch.manual_seed(1)
    np.random.seed(2)  # noqa: NPY002
    random.seed(3)
    buf = io.BytesIO()
    torch.save(rng_state(), buf)
    expect = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    torch.rand(7), np.random.rand(9), random.random()  # noqa: NPY002
    set_rng_state(state)
    got = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(got[0], expect[0]) and (got[1] == expect[1]).all() and got[2] == expect[2]


def test_checkpoint_on_s3_round_trip_and_resume(s3, tmp_path):
    out = s3.url("runs/engine")
    storage_options = s3.storage_options
    cfg = tiny_cfg("train.max_steps=2", f"train.log_dir={tmp_path / 'logs'}", "train.figure=true")
    first = make_trainer(cfg, out, storage_options=storage_options).fit()
    fs = s3.fs()
    names = {p.rsplit("/", 1)[-1] for p in fs.find(f"{s3.bucket}/runs/engine")}
    assert {
        "checkpoint.pt",
        "encoder.pth",
        "config.yaml",
        "metrics.jsonl",
        "reconstruction.png",
        "rank-00000.json",
    } <= names
    raw = fs.cat_file(f"{s3.bucket}/runs/engine/checkpoint.pt")
    ck = torch.load(io.BytesIO(raw), weights_only=True)  # plain values only
    assert ck["step"] == 2 and ck["config"]["optim"]["base_lr"] == 0.256
    assert set(ck) >= {"model", "optimizer", "scheduler", "rng", "data_position", "config", "epoch"}
    assert isinstance(ck["rng"][0]["python"]["internal"], list)
    assert torch.is_tensor(ck["rng"][0]["numpy"]["keys"])
    enc = swin_tiny()
    enc_sd = torch.load(
        io.BytesIO(fs.cat_file(f"{s3.bucket}/runs/engine/encoder.pth")), weights_only=True
    )
    report = load_encoder_weights(enc, enc_sd)
    assert len(report.loaded) == len(enc.state_dict())

    # resume from S3 (metrics fetched back when the local log is gone)
    (tmp_path / "logs" / "metrics.jsonl").unlink()
    cfg2 = tiny_cfg(f"train.log_dir={tmp_path / 'logs'}")
    rest = make_trainer(cfg2, out, storage_options=storage_options).fit(resume=True)
    assert rest.step == 6 and rest.steps_taken == 4
    uploaded = fs.cat_file(f"{s3.bucket}/runs/engine/metrics.jsonl").decode()
    steps = [json.loads(ln)["step"] for ln in uploaded.splitlines() if '"kind": "step"' in ln]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (
        first.losses == make_trainer(tiny_cfg("train.max_steps=2"), tmp_path / "local").fit().losses
    )


def test_local_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    save_checkpoint({"a": torch.ones(3)}, str(path))
    import sarcube.storage as storage  # checkpoints are written by sarcube.storage.write_bytes

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(storage.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"a": torch.zeros(3)}, str(path))
    assert torch.equal(torch.load(path, weights_only=True)["a"], torch.ones(3))  # old one intact
    assert os.listdir(tmp_path) == ["ck.pt"]  # no temporary left


TEARDOWN_SCRIPT = """
import gc, sys, weakref
from pathlib import Path
import torch
from training import distributed as tdist

info, _ = tdist.init_distributed("cpu")
ddp = tdist.wrap_model(torch.nn.Linear(2, 1), torch.device("cpu"), info.world_size, False)
ddp(torch.ones(4, 2)).sum().backward()  # a DDP gradient all-reduce, as in training
x = torch.tensor([float(info.rank + 1)])
alive = weakref.ref(x)
total = tdist.all_reduce_sum(x)
assert total.item() == 3.0, total  # 1 + 2
del x, total
gc.collect()
# the collective's tensor is still referenced from Python: a gloo worker thread can never be the
# one that frees it (which needs the GIL, held by the main thread while it destroys the group)
assert alive() is not None
tdist.cleanup(succeeded=True)
del ddp  # the DDP reducer holds the last reference to the group: its destructor runs here
# a file per rank, not stdout: torchrun interleaves the ranks' output mid-line
Path(sys.argv[1], f"rank{info.rank}").write_text("left the group")
"""


def test_two_ranks_tear_down_their_group_after_the_last_all_reduce(tmp_path):
    """torchrun, 2 gloo ranks: all_reduce_sum sums, keeps its tensor referenced past the
    collective, and both ranks leave the group and exit (CI once saw a rank stuck for ever in
    ~ProcessGroupGloo after a raw all_reduce of a temporary: see training/distributed.py)."""
    import subprocess
    import sys

    script = tmp_path / "teardown.py"
    script.write_text(TEARDOWN_SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    done = tmp_path / "done"
    done.mkdir()
    p = subprocess.run(
        [*cmd, str(script), str(done)], env=env, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stderr[-3000:]
    assert sorted(f.name for f in done.iterdir()) == ["rank0", "rank1"]
    assert {f.read_text() for f in done.iterdir()} == {"left the group"}
