"""One training engine for pretraining (SAR-W-SimMIM, SAR-W-MixMAE) and fine-tuning.

A readable, nanoGPT-style loop (:meth:`Trainer.fit`) around three pluggable parts::

    model   an nn.Module (SimMIM, MixMAE, a segmenter ...): what is optimised and checkpointed
    task    a training.tasks.Task: task.loss(model, batch, step=, rank=) -> scalar loss, and
            hooks for parameter groups, per-epoch validation, encoder export and a figure
    data    a training.tasks.DataSource: steps_per_epoch and the batches of one epoch from a
            given step on, deterministic in (seed, epoch), identical step counts on every rank
            (``training.data.ShardStream``)

Per optimiser step: ``optim.accum_steps`` micro-batches (DDP gradient sync only on the last),
bf16 autocast on CUDA only (fp16 with a GradScaler on request), the loss averaged over
micro-batches and ranks, a non-finite guard, gradient clipping, AdamW, then the learning-rate
schedule (:mod:`training.optim`: lr scaling, warm-up + cosine, weight-decay groups).

**Exact resume.** A checkpoint (``{out}/checkpoint.pt``) holds the model, optimiser, scheduler
and scaler state, the step, epoch and position in the epoch (optimiser steps done in it; the data
position is that × ``accum_steps`` batches), the running epoch loss, every rank's RNG states
(torch CPU/CUDA, numpy, Python; as tensors and lists) and the config. Resuming restores them all
and asks the data for the epoch's batches from that position on. Nothing random depends on
history that a checkpoint cannot carry (:mod:`training.reproducibility`: per-step mask
generators, a forked RNG per epoch for batch fetching). On CPU the per-step losses after a resume
equal those of an uninterrupted run bit for bit.

**Outputs** under ``out`` (local directory or ``s3://...``), written atomically by rank 0:
``checkpoint.pt`` (+ kept snapshots), ``best.pt``, ``encoder.pth``, ``config.yaml``,
``history.jsonl``, ``metrics.jsonl``, ``tb/``, the figure and ``ranks/rank-NNNNN.json``; their
names, writes and the one-writer lock: :mod:`training.run_folder`. The loop's state and result
types: :mod:`training.loop_state`.

**Changes on a resume.** Besides ``train.*`` and the data loader settings, the keys of
:data:`training.config.RESUME_MAY_OVERRIDE` (``optim.base_lr``, ``schedule.epochs``) may
differ from the checkpoint's when named as overrides of the resuming command
(``Trainer.fit(allow_changes=…)``): the restored schedule is rescaled / extended, and the
change is recorded in ``history.jsonl``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import distributed as tdist
from .checkpoint import (
    check_resume_config,
    rng_state,
    set_rng_state,
)
from .config import Config
from .loop_state import CallRecord, LoopState, NonFiniteLossError, TrainResult, step_and_epoch
from .metrics_log import MetricsLog, loader_stats, write_rank_summary
from .optim import (
    apply_schedule_changes,
    build_optimizer,
    build_scheduler,
    scaled_lr,
    setup_precision,
)
from .reproducibility import TAG_DATA, param_checksum, seed_rank_rngs, step_seed
from .run_folder import BEST, ENCODER, FORMAT, MODEL_FORMAT, RunFolder
from .tasks import DataHooks, DataSource, Task, as_task

__all__ = ["Trainer"]

log = logging.getLogger("training.engine")


class Trainer:
    """Trains ``model`` on ``data`` with ``task`` under ``cfg`` (see the module docstring).

    Args:
        cfg: the run's :class:`~training.config.Config` (``optim``, ``schedule``, ``train``,
            ``seed`` and ``data.batch_size`` are read here).
        model: the module to train, on the CPU or already on ``device``.
        task: a :class:`~training.tasks.Task` (or an object with its ``loss`` and any of its
            hooks by name: :func:`~training.tasks.as_task`).
        data: a :class:`~training.tasks.DataSource` of this rank.
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
        self.task = as_task(task)
        self.data = data
        self.data_hooks = DataHooks(data)
        self.info = dist_info or tdist.detect()
        self.rank, self.world = self.info.rank, self.info.world_size
        self.main = self.rank == 0
        self.folder = RunFolder(out, storage_options, self.main, cfg.train.log_dir)
        self.out = self.folder.out
        self.device = device or tdist.select_device(self.info, cfg.train.device)
        self.extra_state = dict(extra_state or {})
        if self.world > 1 and not tdist.get_world_size() == self.world:
            raise RuntimeError(
                f"world size {self.world} but no matching process group: call "
                "training.distributed.init_distributed() first"
            )
        self.amp_dtype, self.scaler = setup_precision(
            self.device, cfg.train.amp, cfg.train.deterministic
        )
        # model -> device (-> channels_last) ; optimiser on the raw parameters ; DDP ; compile
        self.model = model.to(self.device)
        self.channels_last = bool(cfg.train.channels_last and self.device.type == "cuda")
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._setup_optimisation()
        # the module the loop calls (DDP, compiled) around self.model (what is saved)
        self.wrapped_model: nn.Module = tdist.wrap_model(
            self.model, self.device, self.world, cfg.train.compile
        )

        self.last_checkpoint: str | None = None
        self.history: list[dict[str, Any]] = []  # starts and resumes of the run (checkpointed)
        self.resume_changes: dict[str, Any] = {}  # config keys a resume changed
        self._pending_rng: dict[str, Any] | None = None  # a resume's RNG state, set in _fit

    # -- set-up -------------------------------------------------------------------------------

    def _setup_optimisation(self) -> None:
        """Peak lr, the task's parameter groups under AdamW, steps per epoch and the schedule."""
        cfg = self.cfg
        self.accum = cfg.optim.accum_steps
        self.global_batch = cfg.data.batch_size * self.world * self.accum
        self.lr = scaled_lr(
            cfg.optim.base_lr, cfg.data.batch_size, self.world, self.accum, cfg.optim.lr_batch_base
        )
        groups = self.task.param_groups(self.model, cfg.optim.weight_decay, self.lr)
        fused = True if self.device.type == "cuda" else None
        self.optimizer = build_optimizer(
            groups, self.lr, cfg.optim.betas, cfg.optim.eps, fused=fused
        )
        self.steps_per_epoch = int(self.data.steps_per_epoch) // self.accum
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the data gives {self.data.steps_per_epoch} batches per epoch, fewer "
                f"than optim.accum_steps = {self.accum}"
            )
        self.total_steps = cfg.schedule.epochs * self.steps_per_epoch
        self.warmup_steps = min(
            round(cfg.schedule.warmup_epochs * self.steps_per_epoch), self.total_steps
        )
        self.scheduler = build_scheduler(
            self.optimizer, self.warmup_steps, self.total_steps, self.lr, cfg.schedule.min_lr
        )

    # -- small helpers ------------------------------------------------------------------------

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _to_device(self, batch: Mapping[str, Any]) -> dict[str, Any]:
        # a compact loader batch: z-score, weight map, labels on the device
        batch = self.data_hooks.finish(batch, self.device)
        out = {}
        for k, v in batch.items():
            if torch.is_tensor(v):
                v = v.to(self.device, non_blocking=True)
                if self.channels_last and v.ndim == 4:
                    v = v.contiguous(memory_format=torch.channels_last)
            out[k] = v
        return out

    def _loader_stats(self) -> dict[str, Any]:
        return loader_stats(self.data_hooks.io_counters, self.rank)

    def _fetch(self, it: Iterator[dict[str, Any]], epoch: int) -> dict[str, Any]:
        """Next batch, under a forked RNG seeded by (seed, epoch, rank): whatever the loader
        draws from the global torch RNG (DataLoader start-up) is the same on a resume and does
        not shift the training RNG."""
        with torch.random.fork_rng(devices=[]):  # CPU generator only: leave CUDA's alone
            torch.default_generator.manual_seed(
                step_seed(self.cfg.seed, epoch, self.rank, TAG_DATA)
            )
            return next(it)

    def _lr_of_step(self, step: int) -> float:
        """Peak-group lr used by (0-based) update ``step``."""
        base = max(self.scheduler.base_lrs)
        return float(base * self.scheduler.lr_lambdas[0](step))

    # -- checkpoints --------------------------------------------------------------------------

    def state_dict(self, state: LoopState) -> dict[str, Any]:
        """The checkpoint of the current state (RNG states of every rank; a collective call)."""
        rngs = tdist.all_gather_object(rng_state())
        return {
            "format": FORMAT,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "step": int(state.step),
            "epoch": int(state.epoch),
            "step_in_epoch": int(state.step_in_epoch),
            "data_position": {
                "epoch": int(state.epoch),
                "batch": int(state.step_in_epoch) * self.accum,
            },
            "epoch_loss_sum": float(state.epoch_loss_sum),
            "epoch_steps": int(state.epoch_steps),
            "best": {"value": state.best_value, "epoch": state.best_epoch},
            "steps_per_epoch": self.steps_per_epoch,
            "world_size": self.world,
            "global_batch": self.global_batch,
            "rng": rngs,
            "config": self.cfg.to_dict(),
            "extra": self.extra_state,
            "history": list(self.history),
            "time": time.time(),
        }

    def save(self, state: LoopState, snapshot: str | None = None) -> str:
        """Write ``checkpoint.pt`` (and a snapshot copy) atomically from rank 0; all ranks wait."""
        ck = self.state_dict(state)
        if self.main:
            self.folder.write_checkpoint(ck, snapshot)
        tdist.barrier()
        self.last_checkpoint = self.folder.checkpoint
        return self.folder.checkpoint

    def save_model(self, name: str, state: LoopState, scores: Mapping[str, Any]) -> str:
        """Weights-only file ``name`` (rank 0): model state dict, config, extra state, step,
        epoch and scores; ``torch.load(weights_only=True)`` safe. All ranks wait."""
        url = self.folder.url(name)
        if self.main:
            self.folder.write_weights(
                name,
                {
                    "format": MODEL_FORMAT,
                    "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
                    "config": self.cfg.to_dict(),
                    "extra": self.extra_state,
                    "step": int(state.step),
                    "epoch": int(state.epoch),
                    "scores": {
                        k: v for k, v in scores.items() if isinstance(v, (int, float, type(None)))
                    },
                },
            )
        tdist.barrier()
        return url

    def _checkpoint_if_due(self, state: LoopState, epoch_end: bool, last: bool) -> None:
        """Save after a step when ``train.ckpt_every_steps`` / ``ckpt_every_epochs`` say so, or
        at the ``last`` step of this call; a kept snapshot every ``keep_every_epochs``."""
        t = self.cfg.train
        due = (
            last
            or (t.ckpt_every_steps and state.step % t.ckpt_every_steps == 0)
            or (epoch_end and state.epoch % max(t.ckpt_every_epochs, 1) == 0)
        )
        if not due:
            return
        keep = epoch_end and t.keep_every_epochs and state.epoch % t.keep_every_epochs == 0
        self.save(state, f"checkpoint-epoch{state.epoch:04d}.pt" if keep else None)

    # -- start and resume ---------------------------------------------------------------------

    def _begin(self, resume: bool, allow_changes: Sequence[str] = ()) -> LoopState:
        """The loop state: restored from the checkpoint, or fresh (with per-rank RNG seeds)."""
        self._pending_rng = None
        if resume:
            return self._restore(self.folder.load_checkpoint(), allow_changes)
        if self.folder.has_checkpoint():
            raise FileExistsError(
                f"{self.folder.checkpoint} exists: pass --resume to continue that run, "
                "or choose another output"
            )
        seed_rank_rngs(self.cfg.seed, self.rank)  # per-rank training RNG
        return LoopState()

    def _restore(self, ck: Mapping[str, Any], allow_changes: Sequence[str] = ()) -> LoopState:
        """Model, optimiser, schedule, scaler and history from checkpoint ``ck``; its loop state
        (the RNG states are set later: :meth:`_fit`)."""
        url = self.folder.checkpoint
        if ck.get("format") != FORMAT:
            raise ValueError(f"{url}: not a sarcube checkpoint (format {ck.get('format')!r})")
        self.resume_changes = check_resume_config(ck["config"], self.cfg, url, allow_changes)
        if ck["world_size"] != self.world or ck["steps_per_epoch"] != self.steps_per_epoch:
            raise ValueError(
                f"cannot resume from {url} exactly: it was written by "
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
        self.last_checkpoint = url
        self._pending_rng = ck["rng"][self.rank]  # set once nothing else draws (_fit)
        return LoopState.from_checkpoint(ck)

    def _apply_schedule_changes(self, old: Mapping[str, Any]) -> None:
        """A resume's new ``optim.base_lr`` / ``schedule.epochs`` applied to the restored
        schedule (:func:`training.optim.apply_schedule_changes`)."""
        apply_schedule_changes(
            self.scheduler,
            self.optimizer,
            old_base_lr=float(old.get("optim", {}).get("base_lr", self.cfg.optim.base_lr)),
            base_lr=self.cfg.optim.base_lr,
            peak_lr=self.lr,
            warmup_steps=self.warmup_steps,
            total_steps=self.total_steps,
            min_lr=self.cfg.schedule.min_lr,
        )

    def _record_history(self, resume: bool, state: LoopState) -> None:
        """Append this start or resume (with the config keys that changed) to the run's history:
        ``history.jsonl`` next to the checkpoints (rank 0; every attempt) and the checkpoint's
        ``history`` (the attempts that led to it)."""
        event: dict[str, Any] = {
            "event": "resume" if resume else "start",
            "step": int(state.step),
            "epoch": int(state.epoch),
            "time": time.time(),
        }
        if resume:
            event["changes"] = dict(self.resume_changes)
        self.history.append(event)  # this checkpoint lineage's
        if self.main:  # history.jsonl: every attempt, also those that ended before a checkpoint
            self.folder.append_history(event, resume)

    def _open_logs(self, resume: bool, state: LoopState) -> MetricsLog:
        """Write ``config.yaml``; open the metrics log (on a resume of a remote run, from the
        uploaded ``metrics.jsonl``, cut back to the checkpoint's step)."""
        if self.main:
            self.folder.write_config(self.cfg.to_yaml(), resume)
        resume_step = state.step if resume else None
        return MetricsLog(self.folder.log_dir, self.cfg.train.tensorboard, resume_step)

    def _progress_bar(self, state: LoopState) -> Any:
        """A tqdm bar over all optimiser steps (rank 0, ``train.progress``), else ``None``."""
        if not (self.main and self.cfg.train.progress):
            return None
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=state.step,
            desc=self.cfg.method,
            dynamic_ncols=True,
            leave=False,
        )

    # -- one optimiser step -------------------------------------------------------------------

    def train_step(
        self, it: Iterator[dict[str, Any]], state: LoopState | Mapping[str, Any]
    ) -> tuple[float, float | None, dict[str, Any]]:
        """Accumulate ``accum_steps`` micro-batches, check, clip and update.

        Args:
            it: the epoch's batches.
            state: the loop state (or a mapping with ``step`` and ``epoch``), not changed here.

        Returns:
            ``(loss averaged over micro-batches and ranks, grad norm or None, last batch)``.

        Raises:
            NonFiniteLossError: before the update, on every rank alike.
        """
        self.wrapped_model.train()
        step, epoch = step_and_epoch(state)
        loss_sum = torch.zeros((), device=self.device, dtype=torch.float32)
        batch: dict[str, Any] = {}
        for micro in range(self.accum):
            batch = self._to_device(self._fetch(it, epoch))
            sync = micro == self.accum - 1 or self.world == 1
            ctx = (
                self.wrapped_model.no_sync()
                if not sync and hasattr(self.wrapped_model, "no_sync")
                else contextlib.nullcontext()
            )
            with ctx:
                with self._autocast():
                    loss = self.task.loss(
                        self.wrapped_model, batch, step=step * self.accum + micro, rank=self.rank
                    )
                scaled = loss.float() / self.accum
                (self.scaler.scale(scaled) if self.scaler is not None else scaled).backward()
            loss_sum += loss.detach().float()
        loss_avg = tdist.all_reduce_mean(loss_sum / self.accum)
        value = float(loss_avg)
        if not math.isfinite(value):
            self._non_finite(step, epoch, value, "loss")
        grad_norm = None
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.cfg.optim.grad_clip is not None:
            params = [p for g in self.optimizer.param_groups for p in g["params"]]
            gn = torch.nn.utils.clip_grad_norm_(params, self.cfg.optim.grad_clip)
            grad_norm = float(gn)
            if not math.isfinite(grad_norm) and self.scaler is None:
                self._non_finite(step, epoch, grad_norm, "gradient norm")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return value, grad_norm, batch

    def _non_finite(self, step: int, epoch: int, value: float, what: str) -> None:
        """Drop the step's gradients and stop (the update of 0-based ``step`` is not applied)."""
        self.optimizer.zero_grad(set_to_none=True)
        raise NonFiniteLossError(
            step + 1, epoch, value, what, self.last_checkpoint, self.cfg.optim.base_lr
        )

    # -- the loop -----------------------------------------------------------------------------

    def fit(self, resume: bool = False, allow_changes: Sequence[str] = ()) -> TrainResult:
        """Train to the end of ``schedule.epochs`` (or ``train.max_steps``); see the module doc.

        Args:
            resume: continue from ``{out}/checkpoint.pt`` exactly. Without it, an existing
                checkpoint there is an error (nothing is overwritten by accident).
            allow_changes: config keys named as overrides on the resume's command line; those
                in :data:`training.config.RESUME_MAY_OVERRIDE` (``optim.base_lr``,
                ``schedule.epochs``) may differ from the checkpoint's (recorded in
                ``history.jsonl``).

        Returns:
            What this call did (:class:`TrainResult`).
        """
        # One writer per run folder: rank 0 holds its lock for all ranks.
        if self.main:
            self.folder.acquire(command=f"sarcube {self.cfg.method}")
        try:
            return self._fit(resume, allow_changes)
        finally:
            self.folder.release()

    def _fit(self, resume: bool, allow_changes: Sequence[str]) -> TrainResult:
        # -- start: a fresh or restored loop state, the run's history, config and logs
        state = self._begin(resume, allow_changes)
        self._record_history(resume, state)
        metrics = self._open_logs(resume, state)
        if self._pending_rng is not None:  # after everything that may draw from the RNGs
            set_rng_state(self._pending_rng)
            self._pending_rng = None
        bar = self._progress_bar(state)
        calls = CallRecord()

        # -- train: epoch after epoch until the schedule ends or train.max_steps is reached
        stopped = self._max_steps_reached(state)  # a resume with nothing left to do
        try:
            while state.epoch < self.cfg.schedule.epochs and not stopped:
                stopped = self._run_epoch(state, calls, metrics, bar)
        finally:
            if bar is not None:
                bar.close()
            metrics.close()

        # -- end: the result, encoder, figure, uploads and rank summaries
        result = self._result(state, calls, stopped, metrics)
        self._end_run(result, calls)
        return result

    def _max_steps_reached(self, state: LoopState) -> bool:
        max_steps = self.cfg.train.max_steps
        return max_steps is not None and state.step >= max_steps

    def _run_epoch(
        self, state: LoopState, calls: CallRecord, metrics: MetricsLog, bar: Any
    ) -> bool:
        """The rest of the current epoch, from its checkpointed position.

        Returns:
            Whether the run stopped at ``train.max_steps`` before the schedule's end.
        """
        epoch, first = state.epoch, state.step_in_epoch
        it = self.data_hooks.epoch_batches(epoch, first * self.accum)
        t_epoch = time.perf_counter()
        try:
            for _ in range(first, self.steps_per_epoch):
                # -- one optimiser step
                t0 = time.perf_counter()
                lr = self._lr_of_step(state.step)  # the lr this update uses
                loss, gnorm, calls.last_batch = self.train_step(it, state)
                dt = time.perf_counter() - t0
                state.add_step(loss)
                calls.add_step(epoch, loss)
                epoch_end = state.step_in_epoch == self.steps_per_epoch
                # -- metrics, progress
                self._log_step(state, metrics, bar, loss, lr, gnorm, dt, epoch_end)
                # -- epoch end: its metrics line, validation (and best.pt)
                if epoch_end:
                    self._end_epoch(state, calls, metrics, bar, first, t_epoch)
                # -- checkpoint, stop
                finished = state.epoch >= self.cfg.schedule.epochs
                stopped = not finished and self._max_steps_reached(state)
                self._checkpoint_if_due(state, epoch_end, finished or stopped)
                if stopped:
                    return True
        finally:
            close = getattr(it, "close", None)  # a generator or the loader's worker processes
            if callable(close):
                close()
        return False

    def _log_step(
        self,
        state: LoopState,
        metrics: MetricsLog,
        bar: Any,
        loss: float,
        lr: float,
        gnorm: float | None,
        seconds: float,
        epoch_end: bool,
    ) -> None:
        """A ``step`` metrics line every ``train.log_every`` steps and at the epoch's end; the
        progress bar."""
        if state.step % self.cfg.train.log_every == 0 or epoch_end:
            metrics.write(
                {
                    "kind": "step",
                    "step": state.step,
                    "epoch": state.epoch,
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": gnorm,
                    "img_per_s": self.global_batch / seconds,
                    "time": time.time(),
                }
            )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(epoch=state.epoch, loss=f"{loss:.4f}", lr=f"{lr:.2e}")

    def _end_epoch(
        self,
        state: LoopState,
        calls: CallRecord,
        metrics: MetricsLog,
        bar: Any,
        first: int,
        t_epoch: float,
    ) -> None:
        """The ``epoch`` metrics line of the epoch just completed (``first``: the step this call
        began it at, ``t_epoch``: when), the move to the next epoch, then the validation."""
        epoch = state.epoch
        secs = time.perf_counter() - t_epoch
        done = self.steps_per_epoch - first
        metrics.write(
            {
                "kind": "epoch",
                "step": state.step,
                "epoch": epoch,
                "loss": state.epoch_loss_sum / state.epoch_steps,
                "img_per_s": self.global_batch * done / secs,
                "seconds": secs,
                "time": time.time(),
                **self._loader_stats(),
            }
        )
        state.next_epoch()
        val = self._validate(state, epoch, metrics, bar)
        if val is not None:
            calls.val.append(val)

    def _validate(
        self, state: LoopState, epoch: int, metrics: MetricsLog, bar: Any
    ) -> dict[str, Any] | None:
        """The task's validation after ``epoch`` (every rank); writes a ``val`` metrics line and,
        when ``task.best_metric`` improved, ``best.pt``. ``None`` when the task does not
        validate."""
        t0 = time.perf_counter()
        scores = self.task.validate(self.model, epoch=epoch, device=self.device)
        if scores is None:
            return None
        record: dict[str, Any] = {"kind": "val", "step": state.step, "epoch": epoch}
        for k, v in scores.items():  # scalars only; NaN (undefined score) as null
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            record[k] = v if math.isfinite(v) else None
        record["seconds"] = time.perf_counter() - t0
        record["time"] = time.time()
        key = self.task.best_metric
        value = record.get(key) if key else None
        if value is not None and (state.best_value is None or value > state.best_value):
            state.best_value, state.best_epoch = float(value), int(epoch)
            self.save_model(BEST, state, record)
        record["best"] = state.best_value
        metrics.write(record)
        if self.main:

            def fmt(v: float | None) -> str:
                return "n/a" if v is None else f"{v:.4f}"

            msg = (
                f"epoch {epoch}: val {key} {fmt(value)} (best {fmt(state.best_value)} at "
                f"epoch {state.best_epoch})"
            )
            (bar.write if bar is not None else log.info)(msg)
        return record

    # -- the end ------------------------------------------------------------------------------

    def _result(
        self, state: LoopState, calls: CallRecord, stopped: bool, metrics: MetricsLog
    ) -> TrainResult:
        return TrainResult(
            step=state.step,
            epoch=state.epoch,
            steps_taken=len(calls.losses),
            finished=not stopped,
            last_loss=calls.losses[-1] if calls.losses else None,
            checkpoint=self.last_checkpoint,
            metrics=self.folder.metrics_url(metrics.path),
            losses=calls.losses,
            best=self.folder.url(BEST) if state.best_epoch is not None else None,
            best_value=state.best_value,
            best_epoch=state.best_epoch,
            val=calls.val,
        )

    def _end_run(self, result: TrainResult, calls: CallRecord) -> None:
        """Encoder export, figure, log uploads (rank 0); per-rank summary. All ranks wait."""
        if self.main:
            result.encoder = self._export_encoder()
            result.figure = self._draw_figure(calls.last_batch)
            self.folder.upload_logs()
        if self.cfg.train.rank_summary:
            summary = self._rank_summary(result, calls)
            write_rank_summary(self.out, self.rank, summary, self.folder.storage_options)
        tdist.barrier()

    def _export_encoder(self) -> str | None:
        """``encoder.pth``: the state dict of ``task.encoder(model)``, if it gives a module."""
        encoder = self.task.encoder(self.model)
        if not isinstance(encoder, nn.Module):
            return None
        weights = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
        return self.folder.write_weights(ENCODER, weights)

    def _draw_figure(self, last_batch: Mapping[str, Any] | None) -> str | None:
        """``reconstruction.png`` of the last batch (``train.figure``), if the task draws one."""
        if not self.cfg.train.figure or last_batch is None:
            return None
        local = self.folder.figure_path()
        if local is None:  # only rank 0 keeps a log folder
            return None
        if not self.task.figure(self.model, last_batch, str(local)):
            return None
        return self.folder.publish_figure(local)

    def _rank_summary(self, result: TrainResult, calls: CallRecord) -> dict[str, Any]:
        """This rank's ``ranks/rank-NNNNN.json``: what it did, and a checksum of its weights."""
        return {
            "rank": self.rank,
            "world_size": self.world,
            "host": socket.gethostname(),
            "device": str(self.device),
            "step": result.step,
            "epoch": result.epoch,
            "steps_taken": result.steps_taken,
            "steps_per_epoch": dict(calls.per_epoch),
            "samples": len(calls.losses) * self.cfg.data.batch_size * self.accum,
            "last_loss": result.last_loss,
            "param_sha256": param_checksum(self.model),
            **self._loader_stats(),
        }
