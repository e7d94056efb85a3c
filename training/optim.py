"""The optimiser side of training: learning-rate scaling and schedule, AdamW parameter groups.

**Learning rate.** Peak ``lr = base_lr × (batch × world × accum) / lr_batch_base``
(:func:`scaled_lr`). The schedule is a ``LambdaLR`` stepped once per optimiser step (restorable
from its state dict): update ``s`` (0-based) uses ``lr × f(s)`` with linear warm-up
``f(s) = (s + 1) / W`` for ``s < W`` and then cosine
``f(s) = r + (1 - r) · ½ (1 + cos(π (s - W) / (T - W)))`` down to ``r = min_lr / lr`` at
``s = T``; ``W = round(warmup_epochs × steps/epoch)``, ``T = epochs × steps/epoch``
(:class:`WarmupCosine`). A resume may change ``optim.base_lr`` or ``schedule.epochs``: the
restored schedule is then rescaled / extended (:func:`apply_schedule_changes`).

**Weight decay** applies to weight matrices / conv kernels only: every parameter with
``ndim <= 1`` (norm weights, biases) and every name in ``model.no_weight_decay()`` (absolute and
relative position tables, mask tokens), plus any name ending in one of
:data:`NO_WEIGHT_DECAY_NAMES`, is in a ``weight_decay = 0`` group. Frozen parameters are left
out. The same names are the default exclusions of the layer-decay groups of fine-tuning
(:func:`training.layer_decay.param_groups_layer_decay`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

log = logging.getLogger("training.optim")

__all__ = [
    "NO_WEIGHT_DECAY_NAMES",
    "WarmupCosine",
    "apply_schedule_changes",
    "build_optimizer",
    "build_scheduler",
    "model_no_weight_decay",
    "param_groups_weight_decay",
    "scaled_lr",
    "setup_precision",
]

# Parameter names (last dotted component) that skip weight decay whatever their shape, besides
# every <= 1-D tensor (norm weights, biases): position embeddings / tables and learned tokens,
# as in Swin / SimMIM / MixMAE. The one definition for the engine and for layer decay.
NO_WEIGHT_DECAY_NAMES: tuple[str, ...] = (
    "absolute_pos_embed",
    "pos_embed",
    "relative_position_bias_table",
    "mask_token",
    "cls_token",
)


# ---------------------------------------------------------------------------------------------
# Learning rate


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


def apply_schedule_changes(
    scheduler: LambdaLR,
    optimizer: torch.optim.Optimizer,
    *,
    old_base_lr: float,
    base_lr: float,
    peak_lr: float,
    warmup_steps: int,
    total_steps: int,
    min_lr: float,
) -> None:
    """Fit a restored schedule to a resume's new ``optim.base_lr`` / ``schedule.epochs``.

    Called after the scheduler state is restored: a new base lr scales every group's base lr
    (the cosine floor stays ``min_lr``), a new total moves the end of the cosine; the lrs of the
    next update follow. Nothing changes when both are as before.

    Args:
        scheduler: the restored :func:`build_scheduler` schedule.
        optimizer: its optimiser (restored).
        old_base_lr: ``optim.base_lr`` of the checkpoint's config.
        base_lr: ``optim.base_lr`` of this run.
        peak_lr: this run's scaled peak lr (:func:`scaled_lr`).
        warmup_steps: this run's warm-up steps.
        total_steps: this run's total optimiser steps.
        min_lr: this run's ``schedule.min_lr``.
    """
    fn = scheduler.lr_lambdas[0]
    changed = False
    if old_base_lr != base_lr and old_base_lr > 0:
        f = base_lr / old_base_lr
        scheduler.base_lrs = [b * f for b in scheduler.base_lrs]
        for g in optimizer.param_groups:
            g["initial_lr"] = g.get("initial_lr", g["lr"]) * f
        changed = True
    if isinstance(fn, WarmupCosine) and (fn.total_steps != total_steps or changed):
        fn.total_steps = total_steps
        fn.warmup_steps = warmup_steps
        fn.min_ratio = min_lr / peak_lr if peak_lr > 0 else 0.0
        changed = True
    if changed:  # the lr of the last update as the new schedule gives it
        scheduler._last_lr = [
            b * lam(scheduler.last_epoch)
            for b, lam in zip(scheduler.base_lrs, scheduler.lr_lambdas, strict=True)
        ]


# ---------------------------------------------------------------------------------------------
# Parameter groups, optimiser


def model_no_weight_decay(model: nn.Module) -> set[str]:
    """The names ``model.no_weight_decay()`` lists (timm's convention), or none."""
    fn = getattr(model, "no_weight_decay", None)
    return set(fn()) if callable(fn) else set()


def param_groups_weight_decay(
    model: nn.Module, weight_decay: float, skip: Iterable[str] = ()
) -> list[dict[str, Any]]:
    """Two AdamW groups: ``decay`` (matrices, kernels) and ``no_decay`` (``ndim <= 1``, names in
    ``model.no_weight_decay()`` or ``skip``, names ending in :data:`NO_WEIGHT_DECAY_NAMES`).

    Args:
        model: the module whose trainable parameters are grouped.
        weight_decay: the decay of the ``decay`` group.
        skip: more parameter names (full, or last dotted component) without decay.

    Returns:
        Groups with ``params``, ``param_names``, ``weight_decay`` and ``group_name``; frozen
        parameters are left out; an empty group is dropped.
    """
    skip_names = model_no_weight_decay(model) | set(skip)
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
        off = (
            p.ndim <= 1 or name in skip_names or last in skip_names or last in NO_WEIGHT_DECAY_NAMES
        )
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
    b1, b2 = betas
    return torch.optim.AdamW(groups, lr=lr, betas=(b1, b2), eps=eps, fused=fused)


def setup_precision(
    device: torch.device, amp: str, deterministic: bool
) -> tuple[torch.dtype | None, torch.amp.GradScaler | None]:
    """The autocast dtype and grad scaler of ``train.amp`` (mixed precision on CUDA only), and
    deterministic kernels when ``train.deterministic``.

    Args:
        device: where the model trains.
        amp: ``auto`` (bf16 on CUDA, off elsewhere), ``bf16``, ``fp16`` or ``off``.
        deterministic: ``torch.use_deterministic_algorithms(True)``.

    Returns:
        ``(autocast dtype or None, GradScaler for fp16 or None)``.
    """
    cuda = device.type == "cuda"
    mode = amp if amp != "auto" else ("bf16" if cuda else "off")
    if mode != "off" and not cuda:
        log.warning(
            "train.amp=%s ignored on %s: mixed precision is used on CUDA only", mode, device
        )
        mode = "off"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mode)
    scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None
    if deterministic:
        if cuda:  # cuBLAS reads it when its first handle is made (the first matmul)
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
    return dtype, scaler
