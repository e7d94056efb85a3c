"""Deterministic randomness and parameter checksums: what makes a run, and its resume, repeatable.

Nothing random in training depends on history that a checkpoint cannot carry: masks come from
generators seeded by ``(seed, micro-step, rank)`` (:func:`step_generator`), batch fetching runs
under a forked RNG seeded by ``(seed, epoch, rank)`` (tag :data:`TAG_DATA`), so DataLoader
start-up does not consume the training RNG, and each rank's global RNGs start from
``(seed, rank)`` (:func:`seed_rank_rngs`). The global RNG states themselves are checkpointed
(:func:`training.checkpoint.rng_state`). :func:`param_checksum` is how the per-rank summaries
show that every rank ended with the same weights.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch
from torch import nn

__all__ = [
    "TAG_DATA",
    "TAG_FIGURE",
    "TAG_MASK",
    "TAG_SHARD_ORDER",
    "TAG_SHUFFLE_BUFFER",
    "param_checksum",
    "seed_rank_rngs",
    "step_generator",
    "step_seed",
    "unwrap_model",
]

# The registry of random-stream tags: each keeps one use's seeds apart from the others' (the same
# (seed, step, rank) gives unrelated seeds under different tags). A new use takes a new value
# here; changing a value changes every run's random draws.
TAG_MASK, TAG_DATA = 0, 1  # step_seed: training masks; the loader's forked RNG
_TAG_TORCH, _TAG_NUMPY, _TAG_PYTHON = 2, 3, 4  # the per-rank global RNGs of a fresh run
TAG_FIGURE = 7  # step_seed: the mask of a pretraining run's reconstruction figure
# numpy SeedSequence entropy words of the epoch plan (training/data/plan.py)
TAG_SHARD_ORDER, TAG_SHUFFLE_BUFFER = 0x5A4D, 0x5B0F


def step_seed(seed: int, step: int, rank: int, tag: int = TAG_MASK) -> int:
    """A 63-bit seed from ``(seed, step, rank, tag)`` (numpy SeedSequence hashing)."""
    words = np.random.SeedSequence([int(seed), int(step), int(rank), int(tag)]).generate_state(2)
    return (int(words[0]) << 32 | int(words[1])) & ((1 << 63) - 1)


def step_generator(
    seed: int, step: int, rank: int, tag: int = TAG_MASK, device: str | torch.device = "cpu"
) -> torch.Generator:
    """A fresh ``torch.Generator`` seeded from ``(seed, step, rank, tag)``: the random masks of
    micro-step ``step`` on ``rank``, independent of anything drawn before (exact resume)."""
    return torch.Generator(device=device).manual_seed(step_seed(seed, step, rank, tag))


def seed_rank_rngs(seed: int, rank: int) -> None:
    """Seed this process's global torch, numpy and Python RNGs from ``(seed, rank)`` (a fresh
    run; a resume restores the checkpointed states instead)."""
    torch.manual_seed(step_seed(seed, 0, rank, _TAG_TORCH))
    np.random.seed(step_seed(seed, 0, rank, _TAG_NUMPY) % 2**32)  # noqa: NPY002
    random.seed(step_seed(seed, 0, rank, _TAG_PYTHON))


def param_checksum(model: nn.Module) -> str:
    """sha256 over the model's state dict (names, dtypes, shapes and bytes, sorted by name)."""
    h = hashlib.sha256()
    for name, t in sorted(unwrap_model(model).state_dict().items()):
        a = t.detach().cpu().contiguous()
        h.update(f"{name}:{a.dtype}:{tuple(a.shape)}".encode())
        h.update(a.view(torch.uint8).numpy().tobytes() if a.numel() else b"")
    return h.hexdigest()


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP (``.module``) and ``torch.compile`` (``._orig_mod``) wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP
            model = model.module
        elif hasattr(model, "_orig_mod"):  # torch.compile
            model = model._orig_mod
        else:
            return model
