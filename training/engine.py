"""One training engine for pretraining (SAR-W-SimMIM, SAR-W-MixMAE) and fine-tuning.

A readable, nanoGPT-style loop around three pluggable parts::

    model   an nn.Module (SimMIM, MixMAE, a segmenter ...): what is optimised and checkpointed
    task    task.loss(model, batch, step=, rank=) -> scalar loss; optional task.figure(...),
            task.encoder(model) (exported as encoder.pth), task.param_groups(model, wd, lr)
            (e.g. layer-wise lr decay for fine-tuning)
    data    data.steps_per_epoch and data.loader(epoch, start_step) (or .batches): the batches of
            one epoch from a given step on, deterministic in (seed, epoch), identical step
            counts on every rank (``training.data.ShardStream``)

Per optimiser step: ``optim.accum_steps`` micro-batches (DDP gradient sync only on the last),
bf16 autocast on CUDA only (fp16 with a GradScaler on request), the loss averaged over
micro-batches and ranks, a non-finite guard, gradient clipping, AdamW, then the learning-rate
schedule.

**Learning rate.** Peak ``lr = base_lr × (batch × world × accum) / lr_batch_base``. The schedule
is a ``LambdaLR`` stepped once per optimiser step (restorable from its state dict): update ``s``
(0-based) uses ``lr × f(s)`` with linear warm-up ``f(s) = (s + 1) / W`` for ``s < W`` and then
cosine ``f(s) = r + (1 - r) · ½ (1 + cos(π (s - W) / (T - W)))`` down to ``r = min_lr / lr``
at ``s = T``; ``W = round(warmup_epochs × steps/epoch)``, ``T = epochs × steps/epoch``.

**Weight decay** applies to weight matrices / conv kernels only: every parameter with
``ndim <= 1`` (norm weights, biases) and every name in ``model.no_weight_decay()`` (absolute and
relative position tables, mask tokens), plus any name ending in one of
:data:`NO_DECAY_SUFFIXES`, is in a ``weight_decay = 0`` group. Frozen parameters are left out.

**Exact resume.** A checkpoint (``{out}/checkpoint.pt``) holds the model, optimiser, scheduler
and scaler state, the step, epoch and position in the epoch (optimiser steps done in it; the data
position is that × ``accum_steps`` batches), the running epoch loss, every rank's RNG states
(torch CPU/CUDA, numpy, Python; as tensors and lists) and the config. Resuming restores them all
and asks the data for the epoch's batches from that position on. Nothing random depends on
history that a checkpoint cannot carry: masks come from generators seeded by
``(seed, micro-step, rank)`` (:func:`step_generator`), batch fetching runs under a forked RNG
seeded by ``(seed, epoch, rank)``, so DataLoader start-up does not consume the training RNG.
On CPU the per-step losses after a resume equal those of an uninterrupted run bit for bit.

**Outputs** under ``out`` (local directory or ``s3://...``), written atomically::

    checkpoint.pt           latest full state (rank 0; torch.load(weights_only=True) safe)
    checkpoint-epochNNNN.pt snapshots every ``train.keep_every_epochs`` epochs
    best.pt                 weights of the best ``task.validate`` score so far (tasks that validate:
                            fine-tuning; format sarcube-model/1: model, config, extra, scores)
    encoder.pth             encoder state dict (SwinEncoder keys) when the run ends
    config.yaml             the resolved config
    history.jsonl           one line per start / resume of the run, with the config keys a
                            resume changed (``--resume optim.base_lr=1e-5``; see below)
    metrics.jsonl           one line per logged step, per epoch and per validation (rank 0)
    tb/                     TensorBoard events (rank 0)
    reconstruction.png      the task's figure at the end (rank 0)
    ranks/rank-NNNNN.json   per rank: steps per epoch, samples, parameter checksum

Metrics and TensorBoard are written to a local directory (``out`` itself when local, else
``train.log_dir`` or a temporary directory removed at the end: nothing in the working directory)
and ``metrics.jsonl`` is uploaded with each checkpoint.

**Changes on a resume.** Besides ``train.*`` and the data loader settings, the keys of
:data:`RESUME_MAY_OVERRIDE` (``optim.base_lr``, ``schedule.epochs``) may differ from the
checkpoint's when named as overrides of the resuming command (``Trainer.fit(allow_changes=…)``):
the restored schedule is rescaled / extended, and the change is recorded in ``history.jsonl``.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import json
import logging
import math
import os
import random
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import LambdaLR

from sarcube.locking import StoreLock
from sarcube.storage import RedactedOptions, is_remote, join_url, url_to_fs

from . import distributed as tdist
from .checkpoint import (
    exists,
    load_checkpoint,
    read_bytes,
    rng_state,
    save_checkpoint,
    set_rng_state,
    write_bytes,
)
from .config import Config, config_diff

__all__ = [
    "BEST",
    "CHECKPOINT",
    "ENCODER",
    "MODEL_FORMAT",
    "NO_DECAY_SUFFIXES",
    "DataSource",
    "NonFiniteLossError",
    "Task",
    "TrainResult",
    "Trainer",
    "WarmupCosine",
    "build_optimizer",
    "build_scheduler",
    "param_checksum",
    "param_groups_weight_decay",
    "scaled_lr",
    "step_generator",
    "step_seed",
]

log = logging.getLogger("training.engine")

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
ENCODER = "encoder.pth"
METRICS = "metrics.jsonl"
FIGURE = "reconstruction.png"
FORMAT = "sarcube-checkpoint/1"
MODEL_FORMAT = "sarcube-model/1"  # best.pt: weights + config + scores, no optimiser state
NO_DECAY_SUFFIXES: tuple[str, ...] = (
    "absolute_pos_embed",
    "pos_embed",
    "relative_position_bias_table",
    "mask_token",
    "cls_token",
)
# Keys that may change between a run and its resume (everything else must match the checkpoint).
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "train",
    "data.num_workers",
    "data.retries",
    "data.timeout",
    "data.skip_errors",
    "data.max_bad_shards",
    "seg.pretrained",
    "seg.test_split",
    "seg.panels",
    "seg.eval_batch_size",
)
# Keys that may change on a resume when named as overrides on its command line (``--resume
# optim.base_lr=1e-5``): the change is applied to the restored optimiser and schedule and
# recorded in ``history.jsonl`` and the checkpoint's ``history``.
RESUME_MAY_OVERRIDE: tuple[str, ...] = ("optim.base_lr", "schedule.epochs")
HISTORY = "history.jsonl"
_TAG_MASK, _TAG_DATA = 0, 1


# ---------------------------------------------------------------------------------------------
# Protocols


@runtime_checkable
class Task(Protocol):
    """How a batch becomes a loss. Optional: ``figure(model, batch, path)``, ``encoder(model)``,
    ``param_groups(model, weight_decay, lr)`` (AdamW groups; a group's own ``lr``, e.g. from
    ``training.layer_decay.param_groups_layer_decay(model, lr, ...)``, is kept and scheduled),
    ``validate(model, epoch=, device=)`` (called on every rank at each epoch end, a collective:
    returns a dict of scores, the same on every rank) with ``best_metric`` (the score whose
    maximum selects ``best.pt``)."""

    def loss(self, model: nn.Module, batch: Mapping[str, Any], *, step: int, rank: int) -> Tensor:
        """Scalar loss of one micro-batch; ``model`` is the (DDP/compiled) module to call,
        ``step`` the global micro-step (seed masks with :func:`step_generator`)."""
        ...


class DataSource(Protocol):
    steps_per_epoch: int

    def loader(self, epoch: int, start_step: int = 0) -> Iterable[dict[str, Any]]: ...


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped before applying the update.

    Attributes:
        step: 1-based optimiser step whose loss was not finite.
        epoch: its epoch.
        checkpoint: URL of the last good checkpoint, or ``None`` if none was written.
    """

    def __init__(
        self,
        step: int,
        epoch: int,
        value: float,
        what: str,
        checkpoint: str | None,
        base_lr: float | None = None,
    ):
        self.step, self.epoch, self.value, self.checkpoint = step, epoch, value, checkpoint
        lower = f"{base_lr / 10:.3g}" if base_lr else "<lower>"
        last = (
            f"the last good checkpoint is {checkpoint}; to continue from it with a lower "
            f"learning rate, run the same command again with --resume optim.base_lr={lower} "
            "added"
            if checkpoint
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"non-finite {what} ({value}) at step {step} (epoch {epoch}); training "
            f"stopped before applying this update; {last}"
        )


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` did (on this rank)."""

    step: int  # optimiser steps completed in total
    epoch: int  # epochs completed
    steps_taken: int  # optimiser steps taken by this call
    finished: bool  # all epochs done (False: stopped at train.max_steps)
    last_loss: float | None
    checkpoint: str | None  # last checkpoint written
    encoder: str | None = None
    figure: str | None = None
    metrics: str | None = None  # local metrics.jsonl (rank 0)
    losses: list[float] = field(default_factory=list)  # per step, this call
    best: str | None = None  # best.pt (when the task validates)
    best_value: float | None = None  # its task.best_metric
    best_epoch: int | None = None
    val: list[dict[str, Any]] = field(default_factory=list)  # per validated epoch, this call


# ---------------------------------------------------------------------------------------------
# Learning rate, parameter groups, optimiser


def scaled_lr(
    base_lr: float,
    batch_size: int,
    world_size: int = 1,
    accum_steps: int = 1,
    lr_batch_base: int = 256,
) -> float:
    """``base_lr × batch_size × world_size × accum_steps / lr_batch_base`` (linear scaling)."""
    return base_lr * batch_size * world_size * accum_steps / lr_batch_base


class WarmupCosine:
    """LR factor of update ``step`` (0-based): linear warm-up ``(step + 1) / warmup``, then cosine
    from 1 to ``min_ratio`` at ``total``; ``min_ratio`` after ``total``.

    A callable object (not a closure) so that ``LambdaLR.state_dict()`` stores its numbers.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if total_steps < 1 or not 0 <= warmup_steps <= total_steps:
            raise ValueError(
                f"need 0 <= warmup_steps ({warmup_steps}) <= total_steps ({total_steps})"
            )
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_ratio
        span = max(self.total_steps - self.warmup_steps, 1)
        p = (step - self.warmup_steps) / span
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    warmup_steps: int,
    total_steps: int,
    peak_lr: float,
    min_lr: float = 0.0,
) -> LambdaLR:
    """Per-step warm-up + cosine ``LambdaLR`` (factor of each group's initial lr)."""
    ratio = min_lr / peak_lr if peak_lr > 0 else 0.0
    return LambdaLR(optimizer, WarmupCosine(warmup_steps, total_steps, ratio))


def _no_decay_names(model: nn.Module) -> set[str]:
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (matrices, kernels) and ``no_decay`` (``ndim <= 1``, names in
    ``model.no_weight_decay()`` or ``skip``, names ending in :data:`NO_DECAY_SUFFIXES`).

    Each group has ``params``, ``param_names``, ``weight_decay`` and ``group_name``; frozen
    parameters are left out; an empty group is dropped.
    """
    skip_names = _no_decay_names(model) | set(skip)
    decay: dict[str, Any] = {
        "params": [],
        "param_names": [],
        "weight_decay": weight_decay,
        "group_name": "decay",
    }
    no_decay: dict[str, Any] = {
        "params": [],
        "param_names": [],
        "weight_decay": 0.0,
        "group_name": "no_decay",
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        last = name.rsplit(".", 1)[-1]
        off = p.ndim <= 1 or name in skip_names or last in skip_names or last in NO_DECAY_SUFFIXES
        g = no_decay if off else decay
        g["params"].append(p)
        g["param_names"].append(name)
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(
    groups: list[dict[str, Any]],
    lr: float,
    betas: Sequence[float] = (0.9, 0.999),
    eps: float = 1e-8,
    fused: bool | None = None,
) -> torch.optim.AdamW:
    """AdamW over ``groups``; a group's own ``lr`` (layer decay) is kept, others get ``lr``."""
    for g in groups:
        g.setdefault("lr", lr)
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused)


# ---------------------------------------------------------------------------------------------
# Deterministic per-step randomness


def step_seed(seed: int, step: int, rank: int, tag: int = _TAG_MASK) -> int:
    """A 63-bit seed from ``(seed, step, rank, tag)`` (numpy SeedSequence hashing)."""
    words = np.random.SeedSequence([int(seed), int(step), int(rank), int(tag)]).generate_state(2)
    return (int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1)


def step_generator(
    seed: int, step: int, rank: int, tag: int = _TAG_MASK, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``(seed, step, rank, tag)``: the random masks of
    micro-step ``step`` on ``rank``, independent of anything drawn before (exact resume)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank, tag))


def param_checksum(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(_unwrap(model).state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def _unwrap(model: nn.Module) -> nn.Module:
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model


# ---------------------------------------------------------------------------------------------
# Metrics


class MetricsLog:
    """JSONL + TensorBoard on rank 0 (a no-op elsewhere)."""

    def __init__(self, log_dir: Path | None, tensorboard: bool, resume_step: int | None) -> None:
        self.path = None if log_dir is None else log_dir / METRICS
        self.tb = None
        if self.path is None:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:  # keep what the checkpointed part of the run logged; drop lines after it
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            keep = [
                ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(log_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )

    def write(self, record: Mapping[str, Any]) -> None:
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind, step = record["kind"], record["step"]
            for k, v in record.items():
                if k not in ("kind", "step", "epoch", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


# ---------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    """Trains ``model`` on ``data`` with ``task`` under ``cfg`` (see the module docstring).

    Args:
        cfg: the run's :class:`~training.config.Config` (``optim``, ``schedule``, ``train``,
            ``seed`` and ``data.batch_size`` are read here).
        model: the module to train, on the CPU or already on ``device``.
        task: a :class:`Task`.
        data: a :class:`DataSource` of this rank.
        out: output directory or URL (checkpoints, encoder, metrics, figure).
        storage_options: fsspec options for ``out``.
        dist_info: this process's place (default: detected; a world size above 1 needs an
            initialised process group, see :func:`training.distributed.init_distributed`).
        device: where to train (default: ``cfg.train.device`` resolved).
        extra_state: small plain values stored in every checkpoint (e.g. the manifest URL).
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        task: Task,
        data: DataSource,
        out: str,
        storage_options: Mapping[str, Any] | None = None,
        dist_info: tdist.DistInfo | None = None,
        device: torch.device | None = None,
        extra_state: Mapping[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self._lock: StoreLock | None = None  # the run folder's lock while fit() runs (rank 0)
        self.task = task
        self.data = data
        self.out = str(out).rstrip("/")
        if not is_remote(self.out):
            self.out = os.path.abspath(self.out.removeprefix("file://"))
        self.so = RedactedOptions(storage_options or {})
        self.info = dist_info or tdist.detect()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.main = self.rank == 0
        self.device = device or tdist.select_device(self.info, cfg.train.device)
        self.extra_state = dict(extra_state or {})
        if self.world > 1 and not tdist.get_world_size() == self.world:
            raise RuntimeError(
                f"world size {self.world} but no matching process group: call "
                "training.distributed.init_distributed() first"
            )

        t = cfg.train
        cuda = self.device.type == "cuda"
        amp = t.amp if t.amp != "auto" else ("bf16" if cuda else "off")
        if amp != "off" and not cuda:
            log.warning(
                "train.amp=%s ignored on %s: mixed precision is used on CUDA only", amp, self.device
            )
            amp = "off"
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(amp)
        self.scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
        if t.deterministic:
            if cuda:  # cuBLAS reads it when its first handle is made (the first matmul)
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)

        # model -> device (-> channels_last) ; optimiser on the raw parameters ; DDP ; compile
        self.model = model.to(self.device)
        self.channels_last = bool(t.channels_last and cuda)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.accum = cfg.optim.accum_steps
        self.global_batch = cfg.data.batch_size * self.world * self.accum
        self.lr = scaled_lr(
            cfg.optim.base_lr, cfg.data.batch_size, self.world, self.accum, cfg.optim.lr_batch_base
        )
        groups_fn = getattr(task, "param_groups", None)
        groups = (
            groups_fn(self.model, cfg.optim.weight_decay, self.lr)
            if callable(groups_fn)
            else param_groups_weight_decay(self.model, cfg.optim.weight_decay)
        )
        self.optimizer = build_optimizer(
            groups, self.lr, cfg.optim.betas, cfg.optim.eps, fused=True if cuda else None
        )
        self.steps_per_epoch = int(data.steps_per_epoch) // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the data gives {data.steps_per_epoch} batches per epoch, fewer "
                f"than optim.accum_steps = {self.accum}"
            )
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.warmup_steps = min(
            round(cfg.schedule.warmup_epochs * self.steps_per_epoch), self.total_steps
        )
        self.scheduler = build_scheduler(
            self.optimizer, self.warmup_steps, self.total_steps, self.lr, cfg.schedule.min_lr
        )
        self.net: nn.Module = self.model
        if self.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            # Swin's buffers (relative position index, window masks) are constant: no per-forward
            # buffer broadcast (the keyword was renamed in torch 2.12).
            sync_kw = (
                "forward_sync_buffers"
                if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters
                else "broadcast_buffers"
            )
            self.net = DDP(
                self.model, device_ids=[self.device.index] if cuda else None, **{sync_kw: False}
            )
        if t.compile:
            self.net = torch.compile(self.net)

        self.ckpt_url = join_url(self.out, CHECKPOINT)
        self.last_checkpoint: str | None = None
        self.history: list[dict[str, Any]] = []  # starts and resumes of the run (checkpointed)
        self._tmp_log_dir: Path | None = None
        self.log_dir = self._log_dir() if self.main else None

    # -- small helpers ------------------------------------------------------------------------

    def _log_dir(self) -> Path:
        if self.cfg.train.log_dir:
            return Path(self.cfg.train.log_dir).expanduser().absolute()
        if not is_remote(self.out):
            return Path(self.out)
        # a remote run: a private temporary directory (metrics.jsonl and tb/ are uploaded to
        # out; a resume fetches metrics.jsonl back), removed when fit() ends: nothing in the cwd
        import tempfile

        self._tmp_log_dir = Path(tempfile.mkdtemp(prefix="sarcube-run-"))
        return self._tmp_log_dir

    def _url(self, name: str) -> str:
        return join_url(self.out, name)

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        finish = getattr(self.data, "finish", None)
        if callable(finish):  # a compact loader batch: z-score, weight map, labels on the device
            batch = finish(batch, self.device)
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, non_blocking=True)
                if self.channels_last and v.ndim == 4:
                    v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    def _loader_stats(self) -> dict[str, Any]:
        """``{"loader": the data source's stats}`` (shards read, skipped, bad …) when it keeps
        any (``training.data.ShardStream.stats``: cumulative, this rank), else ``{}``."""
        stats = getattr(self.data, "stats", None)
        if not isinstance(stats, Mapping):
            return {}
        bad = int(stats.get("shards_bad", 0)) + int(stats.get("shards_skipped", 0))
        if bad:
            log.warning(
                "rank %d: the loader skipped %d shard(s) so far: %s",
                self.rank,
                bad,
                [*stats.get("bad_urls", []), *stats.get("skipped_urls", [])],
            )
        return {"loader": dict(stats)}

    def _fetch(self, it: Iterator[dict[str, Any]], epoch: int) -> dict[str, Any]:
        """Next batch, under a forked RNG seeded by (seed, epoch, rank): whatever the loader
        draws from the global torch RNG (DataLoader start-up) is the same on a resume and does
        not shift the training RNG."""
        with torch.random.fork_rng(devices=[]):  # CPU generator only: leave CUDA's alone
            torch.default_generator.manual_seed(
                step_seed(self.cfg.seed, epoch, self.rank, _TAG_DATA)
            )
            return next(it)

    def _epoch_batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        loader = getattr(self.data, "loader", None)
        src = (
            loader(epoch, start_step) if callable(loader) else self.data.batches(epoch, start_step)
        )
        return iter(src)

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self, state: Mapping[str, Any]) -> dict[str, Any]:
        """The checkpoint of the current state (RNG states of every rank; a collective call)."""
        rngs = tdist.all_gather_object(rng_state())
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": int(state["step"]),
            "epoch": int(state["epoch"]),
            "step_in_epoch": int(state["step_in_epoch"]),
            "data_position": {
                "epoch": int(state["epoch"]),
                "batch": int(state["step_in_epoch"]) * self.accum,
            },
            "epoch_loss_sum": float(state["epoch_loss_sum"]),
            "epoch_steps": int(state["epoch_steps"]),
            "best": {"value": state.get("best_value"), "epoch": state.get("best_epoch")},
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world,
            "global_batch": self.global_batch,
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "extra": self.extra_state,
            "history": list(self.history),
            "time": time.time(),
        }

    def save(self, state: Mapping[str, Any], snapshot: str | None = None) -> str:
        """Write ``checkpoint.pt`` (and a snapshot copy) atomically from rank 0; all ranks wait."""
        ck = self.state_dict(state)
        if self.main:
            if self._lock is not None:
                self._lock.check()  # never overwrite the checkpoint after losing the run's lock
            save_checkpoint(ck, self.ckpt_url, self.so)
            if snapshot:
                save_checkpoint(ck, self._url(snapshot), self.so)
            if self.log_dir is not None and is_remote(self.out):
                path = self.log_dir / METRICS
                if path.exists():
                    write_bytes(self._url(METRICS), path.read_bytes(), self.so)
        tdist.barrier()
        self.last_checkpoint = self.ckpt_url
        return self.ckpt_url

    def _restore(self, ck: Mapping[str, Any], allow_changes: Sequence[str] = ()) -> dict[str, Any]:
        if ck.get("format") != FORMAT:
            raise ValueError(
                f"{self.ckpt_url}: not a sarcube checkpoint (format {ck.get('format')!r})"
            )
        allowed = tuple(k for k in allow_changes if k in RESUME_MAY_OVERRIDE)
        diff = config_diff(ck["config"], self.cfg, ignore=(*RESUME_MAY_CHANGE, *allowed))
        if diff:
            lines = "; ".join(
                f"{k}: {a!r} -> {b!r}" for k, a, b in ((k, *v) for k, v in diff.items())
            )
            raise ValueError(
                f"cannot resume from {self.ckpt_url}: the config differs from the "
                f"checkpoint's in {lines} (only train.* and data loader settings "
                f"may change on a resume, and {' / '.join(RESUME_MAY_OVERRIDE)} "
                "when named as overrides, e.g. --resume optim.base_lr=1e-5)"
            )
        self.resume_changes = {k: list(v) for k, v in config_diff(ck["config"], self.cfg).items()}
        if ck["world_size"] != self.world or ck["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"cannot resume from {self.ckpt_url} exactly: it was written by "
                f"{ck['world_size']} rank(s) with {ck['steps_per_epoch']} steps per "
                f"epoch, this run has {self.world} rank(s) with {self.steps_per_epoch}"
            )
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        self._apply_schedule_changes(ck["config"])
        for group, lr in zip(
            self.optimizer.param_groups, self.scheduler.get_last_lr(), strict=True
        ):
            group["lr"] = lr  # LambdaLR.load_state_dict does not touch the optimiser
        self.history = [dict(h) for h in ck.get("history") or []]
        if self.scaler is not None and ck.get("scaler"):
            self.scaler.load_state_dict(ck["scaler"])
        self.last_checkpoint = self.ckpt_url
        self._pending_rng = ck["rng"][self.rank]
        best = ck.get("best") or {}
        return {
            **{
                k: ck[k]
                for k in ("step", "epoch", "step_in_epoch", "epoch_loss_sum", "epoch_steps")
            },
            "best_value": best.get("value"),
            "best_epoch": best.get("epoch"),
        }

    def _apply_schedule_changes(self, old: Mapping[str, Any]) -> None:
        """After the scheduler state is restored: a new ``optim.base_lr`` scales every group's
        base lr (the cosine floor stays ``schedule.min_lr``), a new ``schedule.epochs`` moves the
        end of the cosine; the lrs of the next update follow."""
        sched = self.scheduler
        fn = sched.lr_lambdas[0]
        changed = False
        old_base = float(old.get("optim", {}).get("base_lr", self.cfg.optim.base_lr))
        if old_base != self.cfg.optim.base_lr and old_base > 0:
            f = self.cfg.optim.base_lr / old_base
            sched.base_lrs = [b * f for b in sched.base_lrs]
            for g in self.optimizer.param_groups:
                g["initial_lr"] = g.get("initial_lr", g["lr"]) * f
            changed = True
        if isinstance(fn, WarmupCosine) and (fn.total_steps != self.total_steps or changed):
            fn.total_steps = self.total_steps
            fn.warmup_steps = self.warmup_steps
            fn.min_ratio = self.cfg.schedule.min_lr / self.lr if self.lr > 0 else 0.0
            changed = True
        if changed:  # the lr of the last update as the new schedule gives it
            sched._last_lr = [
                b * lam(sched.last_epoch)
                for b, lam in zip(sched.base_lrs, sched.lr_lambdas, strict=True)
            ]

    def _record_history(self, resume: bool, state: Mapping[str, Any]) -> None:
        """Append this start or resume (with the config keys that changed) to the run's history:
        ``history.jsonl`` next to the checkpoints (rank 0; every attempt) and the checkpoint's
        ``history`` (the attempts that led to it)."""
        event: dict[str, Any] = {
            "event": "resume" if resume else "start",
            "step": int(state["step"]),
            "epoch": int(state["epoch"]),
            "time": time.time(),
        }
        if resume:
            event["changes"] = dict(getattr(self, "resume_changes", {}) or {})
        self.history.append(event)  # this checkpoint lineage's
        if self.main:  # history.jsonl: every attempt, also those that ended before a checkpoint
            url = self._url(HISTORY)
            before = read_bytes(url, self.so).decode() if resume and exists(url, self.so) else ""
            if before and not before.endswith("\n"):
                before += "\n"
            line = json.dumps(event, default=str) + "\n"
            write_bytes(url, (before + line).encode(), self.so)

    # -- one optimiser step -------------------------------------------------------------------

    def train_step(
        self, it: Iterator[dict[str, Any]], state: Mapping[str, Any]
    ) -> tuple[float, float | None, dict[str, Any]]:
        """Accumulate ``accum_steps`` micro-batches, check, clip and update.

        Returns ``(loss averaged over micro-batches and ranks, grad norm or None, last batch)``.

        Raises:
            NonFiniteLossError: before the update, on every rank alike.
        """
        self.net.train()
        step, epoch = int(state["step"]), int(state["epoch"])
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        batch: dict[str, Any] = {}
        for micro in range(self.accum):
            batch = self._to_device(self._fetch(it, epoch))
            sync = micro == self.accum - 1 or self.world == 1
            ctx = (
                self.net.no_sync()
                if not sync and hasattr(self.net, "no_sync")
                else contextlib.nullcontext()
            )
            with ctx:
                with self._autocast():
                    loss = self.task.loss(
                        self.net, batch, step=step * self.accum + micro, rank=self.rank
                    )
                scaled = loss.float() / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        loss_avg = tdist.all_reduce_mean(loss_sum / self.accum)
        value = float(loss_avg)
        if not math.isfinite(value):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(
                step + 1, epoch, value, "loss", self.last_checkpoint, self.cfg.optim.base_lr
            )
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            grad_norm = float(gn)
            if not math.isfinite(grad_norm) and self.scaler is None:
                self.optimizer.zero_grad(set_to_none=True)
                raise NonFiniteLossError(
                    step + 1,
                    epoch,
                    grad_norm,
                    "gradient norm",
                    self.last_checkpoint,
                    self.cfg.optim.base_lr,
                )
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return value, grad_norm, batch

    # -- the loop -----------------------------------------------------------------------------

    def _begin(self, resume: bool, allow_changes: Sequence[str] = ()) -> dict[str, Any]:
        """The loop state: restored from the checkpoint, or fresh (with per-rank RNG seeds)."""
        cfg = self.cfg
        self._pending_rng = None
        if resume:
            ck = load_checkpoint(self.ckpt_url, self.so)
            return self._restore(ck, allow_changes)
        if exists(self.ckpt_url, self.so):
            raise FileExistsError(
                f"{self.ckpt_url} exists: pass --resume to continue that run, "
                "or choose another output"
            )
        torch.manual_seed(step_seed(cfg.seed, 0, self.rank, 2))  # per-rank training RNG
        np.random.seed(step_seed(cfg.seed, 0, self.rank, 3) % 2**32)  # noqa: NPY002
        random.seed(step_seed(cfg.seed, 0, self.rank, 4))
        return {
            "step": 0,
            "epoch": 0,
            "step_in_epoch": 0,
            "epoch_loss_sum": 0.0,
            "epoch_steps": 0,
            "best_value": None,
            "best_epoch": None,
        }

    def _checkpoint_due(self, state: Mapping[str, Any], epoch_end: bool, last: bool) -> bool:
        t = self.cfg.train
        return bool(
            last
            or (t.ckpt_every_steps and state["step"] % t.ckpt_every_steps == 0)
            or (epoch_end and state["epoch"] % max(t.ckpt_every_epochs, 1) == 0)
        )

    def fit(self, resume: bool = False, allow_changes: Sequence[str] = ()) -> TrainResult:
        """Train to the end of ``schedule.epochs`` (or ``train.max_steps``); see the module doc.

        Args:
            resume: continue from ``{out}/checkpoint.pt`` exactly. Without it, an existing
                checkpoint there is an error (nothing is overwritten by accident).
            allow_changes: config keys named as overrides on the resume's command line; those
                in :data:`RESUME_MAY_OVERRIDE` (``optim.base_lr``, ``schedule.epochs``) may
                differ from the checkpoint's (recorded in ``history.jsonl``).
        """
        # One writer per run folder (rank 0 holds the lock for all ranks): two runs, or two
        # resumes, of one --out would overwrite each other's checkpoints. A run killed on this
        # host leaves a lock that the next --resume breaks (its process is gone).
        self._lock = None
        if self.main:
            self._lock = StoreLock(
                self.out, self.so, command=f"sarcube {self.cfg.method}"
            ).acquire()
        try:
            return self._fit(resume, allow_changes)
        finally:
            if self._lock is not None:
                self._lock.release()
            if self._tmp_log_dir is not None:
                import shutil

                shutil.rmtree(self._tmp_log_dir, ignore_errors=True)

    def _fit(self, resume: bool, allow_changes: Sequence[str]) -> TrainResult:
        cfg, t = self.cfg, self.cfg.train
        state = self._begin(resume, allow_changes)
        self._record_history(resume, state)
        if self.main:
            write_bytes(self._url("config.yaml"), cfg.to_yaml().encode(), self.so)
            local = self.log_dir / METRICS
            if (
                resume
                and is_remote(self.out)
                and not local.exists()
                and exists(self._url(METRICS), self.so)
            ):
                local.parent.mkdir(parents=True, exist_ok=True)
                local.write_bytes(read_bytes(self._url(METRICS), self.so))
        metrics = MetricsLog(self.log_dir, t.tensorboard, state["step"] if resume else None)
        if self._pending_rng is not None:  # after everything that may draw from the RNGs
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        bar = None
        if self.main and t.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=state["step"],
                desc=cfg.method,
                dynamic_ncols=True,
                leave=False,
            )

        losses: list[float] = []  # this call's per-step losses
        val_records: list[dict[str, Any]] = []
        per_epoch: dict[str, int] = {}  # steps this process took per epoch
        last_batch: dict[str, Any] | None = None
        stopped = t.max_steps is not None and state["step"] >= t.max_steps  # nothing left to do
        try:
            while state["epoch"] < cfg.schedule.epochs and not stopped:
                epoch, first = state["epoch"], state["step_in_epoch"]
                it = self._epoch_batches(epoch, first * self.accum)
                t_epoch = time.perf_counter()
                try:
                    for _ in range(first, self.steps_per_epoch):
                        # -- one optimiser step
                        t0 = time.perf_counter()
                        lr = self._lr_of_step(state["step"])  # the lr this update uses
                        loss, gnorm, last_batch = self.train_step(it, state)
                        dt = time.perf_counter() - t0
                        state["step"] += 1
                        state["step_in_epoch"] += 1
                        state["epoch_loss_sum"] += loss
                        state["epoch_steps"] += 1
                        losses.append(loss)
                        per_epoch[str(epoch)] = per_epoch.get(str(epoch), 0) + 1
                        epoch_end = state["step_in_epoch"] == self.steps_per_epoch
                        # -- metrics
                        if state["step"] % t.log_every == 0 or epoch_end:
                            metrics.write(
                                {
                                    "kind": "step",
                                    "step": state["step"],
                                    "epoch": epoch,
                                    "loss": loss,
                                    "lr": lr,
                                    "grad_norm": gnorm,
                                    "img_per_s": self.global_batch / dt,
                                    "time": time.time(),
                                }
                            )
                        if bar is not None:
                            bar.update(1)
                            bar.set_postfix(epoch=epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}")
                        if epoch_end:
                            secs = time.perf_counter() - t_epoch
                            done = self.steps_per_epoch - first
                            metrics.write(
                                {
                                    "kind": "epoch",
                                    "step": state["step"],
                                    "epoch": epoch,
                                    "loss": state["epoch_loss_sum"] / state["epoch_steps"],
                                    "img_per_s": self.global_batch * done / secs,
                                    "seconds": secs,
                                    "time": time.time(),
                                    **self._loader_stats(),
                                }
                            )
                            state.update(
                                epoch=epoch + 1, step_in_epoch=0, epoch_loss_sum=0.0, epoch_steps=0
                            )
                            val = self._validate(state, epoch, metrics, bar)
                            if val is not None:
                                val_records.append(val)
                        # -- checkpoint, stop
                        finished = state["epoch"] >= cfg.schedule.epochs
                        stopped = (
                            not finished
                            and t.max_steps is not None
                            and state["step"] >= t.max_steps
                        )
                        if self._checkpoint_due(state, epoch_end, finished or stopped):
                            keep = (
                                epoch_end
                                and t.keep_every_epochs
                                and state["epoch"] % t.keep_every_epochs == 0
                            )
                            self.save(
                                state, f"checkpoint-epoch{state['epoch']:04d}.pt" if keep else None
                            )
                        if stopped:
                            break
                finally:
                    close = getattr(it, "close", None)
                    if callable(close):
                        close()
        finally:
            if bar is not None:
                bar.close()
            metrics.close()

        result = TrainResult(
            step=state["step"],
            epoch=state["epoch"],
            steps_taken=len(losses),
            finished=not stopped,
            last_loss=losses[-1] if losses else None,
            checkpoint=self.last_checkpoint,
            metrics=(
                self._url(METRICS)
                if self._tmp_log_dir is not None
                else str(metrics.path)
                if metrics.path
                else None
            ),
            losses=losses,
            best_value=state.get("best_value"),
            best_epoch=state.get("best_epoch"),
            val=val_records,
        )
        if state.get("best_epoch") is not None:
            result.best = self._url(BEST)
        samples = len(losses) * cfg.data.batch_size * self.accum
        self._finish(result, per_epoch, samples, last_batch)
        return result

    def _validate(
        self, state: dict[str, Any], epoch: int, metrics: MetricsLog, bar: Any
    ) -> dict[str, Any] | None:
        """The task's validation after ``epoch`` (every rank); writes a ``val`` metrics line and,
        when ``task.best_metric`` improved, ``best.pt``."""
        fn = getattr(self.task, "validate", None)
        if not callable(fn):
            return None
        t0 = time.perf_counter()
        scores = fn(self.model, epoch=epoch, device=self.device)
        record: dict[str, Any] = {"kind": "val", "step": state["step"], "epoch": epoch}
        for k, v in scores.items():  # scalars only; NaN (undefined score) as null
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            record[k] = v if math.isfinite(v) else None
        record["seconds"] = time.perf_counter() - t0
        record["time"] = time.time()
        key = getattr(self.task, "best_metric", None)
        value = record.get(key) if key else None
        improved = value is not None and (
            state["best_value"] is None or value > state["best_value"]
        )
        if improved:
            state["best_value"], state["best_epoch"] = float(value), int(epoch)
            self.save_model(BEST, state, record)
        record["best"] = state["best_value"]
        metrics.write(record)
        if self.main:

            def fmt(v: float | None) -> str:
                return "n/a" if v is None else f"{v:.4f}"

            msg = (
                f"epoch {epoch}: val {key} {fmt(value)} (best {fmt(state['best_value'])} at "
                f"epoch {state['best_epoch']})"
            )
            (bar.write if bar is not None else log.info)(msg)
        return record

    def save_model(self, name: str, state: Mapping[str, Any], scores: Mapping[str, Any]) -> str:
        """Weights-only file ``name`` (rank 0): model state dict, config, extra state, step,
        epoch and scores; ``torch.load(weights_only=True)`` safe. All ranks wait."""
        url = self._url(name)
        if self.main:
            save_checkpoint(
                {
                    "format": MODEL_FORMAT,
                    "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                    "config": self.cfg.to_dict(),
                    "extra": self.extra_state,
                    "step": int(state["step"]),
                    "epoch": int(state["epoch"]),
                    "scores": {
                        k: v for k, v in scores.items() if isinstance(v, (int, float, type(None)))
                    },
                },
                url,
                self.so,
            )
        tdist.barrier()
        return url

    def _lr_of_step(self, step: int) -> float:
        """Peak-group lr used by (0-based) update ``step``."""
        base = max(self.scheduler.base_lrs)
        return base * self.scheduler.lr_lambdas[0](step)

    def _finish(
        self,
        result: TrainResult,
        per_epoch: Mapping[str, int],
        samples: int,
        last_batch: Mapping[str, Any] | None,
    ) -> None:
        """Encoder export, figure, per-rank summary, TensorBoard upload."""
        t = self.cfg.train
        if self.main:
            enc_fn = getattr(self.task, "encoder", None)
            encoder = (
                enc_fn(self.model) if callable(enc_fn) else getattr(self.model, "encoder", None)
            )
            if isinstance(encoder, nn.Module):
                url = self._url(ENCODER)
                save_checkpoint(
                    {k: v.detach().cpu() for k, v in encoder.state_dict().items()}, url, self.so
                )
                result.encoder = url
            fig_fn = getattr(self.task, "figure", None)
            if t.figure and callable(fig_fn) and last_batch is not None:
                local = (Path(self.out) if not is_remote(self.out) else self.log_dir) / FIGURE
                local.parent.mkdir(parents=True, exist_ok=True)
                fig_fn(self.model, last_batch, str(local))
                if is_remote(self.out):
                    write_bytes(self._url(FIGURE), local.read_bytes(), self.so)
                result.figure = self._url(FIGURE)
            if is_remote(self.out) and self.log_dir is not None:
                path = self.log_dir / METRICS
                if path.exists():
                    write_bytes(self._url(METRICS), path.read_bytes(), self.so)
                tb = self.log_dir / "tb"
                if tb.is_dir():
                    fs, root = url_to_fs(self._url("tb"), self.so)
                    for f in tb.rglob("*"):
                        if f.is_file():
                            fs.pipe_file(f"{root}/{f.relative_to(tb).as_posix()}", f.read_bytes())
        if t.rank_summary:
            summary = {
                "rank": self.rank,
                "world_size": self.world,
                "host": socket.gethostname(),
                "device": str(self.device),
                "step": result.step,
                "epoch": result.epoch,
                "steps_taken": result.steps_taken,
                "steps_per_epoch": dict(per_epoch),
                "samples": samples,
                "last_loss": result.last_loss,
                "param_sha256": param_checksum(self.model),
                **self._loader_stats(),
            }
            write_bytes(
                self._url(f"ranks/rank-{self.rank:05d}.json"),
                json.dumps(summary, indent=1).encode(),
                self.so,
            )
        tdist.barrier()
