"""The model side of inference: a fine-tuned segmenter and what applying it to cube dB needs.

:func:`load_predictor` turns a ``best.pt`` / ``checkpoint.pt`` of ``sarcube finetune`` into a
:class:`Predictor` (checked against the task, its class count and the training dB statistics);
:func:`cached_predictor` keeps one per (checkpoint, device) in each process, so a Dask worker
loads a checkpoint once for all the blocks it runs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from sarcube.classes import segmentation_task
from sarcube.errors import InputError

from ..checkpoint import read_bytes
from ..segmenter import TASK_CLASSES, segmenter_from_checkpoint

__all__ = ["PredictError", "Predictor", "cached_predictor", "load_predictor"]


class PredictError(InputError):
    """Bad input to ``predict`` (region, dates, checkpoint, cube); the message says which."""


@dataclass
class Predictor:
    """A segmenter and what is needed to apply it to cube dB values.

    ``probabilities(db)``: ``(N, 1, H, W)`` float32 dB with NaN for no data →
    ``(N, C, H, W)`` float32 probabilities (C = 9 for LULC, softmax; 1 for water, sigmoid).
    """

    model: nn.Module
    task: str  # "lulc" | "water"
    mean: float  # the train split's dB statistics the model was trained with
    std: float
    threshold: float = 0.5
    checkpoint: str = "<in memory>"
    sha256: str = ""
    device: str = "cpu"

    @property
    def channels(self) -> int:
        return segmentation_task(self.task).num_outputs

    @torch.no_grad()
    def probabilities(self, db: torch.Tensor) -> torch.Tensor:
        dev = torch.device(self.device)
        x = torch.nan_to_num(db.to(dev, non_blocking=True), nan=self.mean)
        x = (x - self.mean) / self.std
        # bf16 autocast on CUDA as in training; fp32 on the CPU (exact, and CPU bf16 is slow)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            logits = self.model(x).float()
        if logits.shape[1] != self.channels:
            raise PredictError(
                f"{self.checkpoint}: the model gives {logits.shape[1]} channels, "
                f"task {self.task!r} needs {self.channels}"
            )
        binary = segmentation_task(self.task).binary
        p = torch.sigmoid(logits) if binary else torch.softmax(logits, 1)
        return p.cpu()

    def classes(self, prob: np.ndarray) -> np.ndarray:
        """``(C, H, W)`` blended probabilities → ``(H, W)`` uint8 classes."""
        if segmentation_task(self.task).binary:
            return (prob[0] >= self.threshold).astype(np.uint8)
        return prob.argmax(0).astype(np.uint8)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checked_db_stats(
    checkpoint: str, ck_task: str, extra: Mapping[str, Any], task: str | None
) -> tuple[float, float]:
    """The training dB (mean, std) of a checkpoint of task ``ck_task``, after checking that it
    is the asked-for ``task`` and has that task's class count; ``PredictError`` otherwise."""
    n_ck = int(extra.get("num_classes", segmentation_task(ck_task).num_classes))
    if task is not None and task != ck_task:
        raise PredictError(
            f"{checkpoint}: a {ck_task!r} checkpoint ({n_ck} classes), but "
            f"--task {task} was asked for"
        )
    want = len(TASK_CLASSES[ck_task])
    if n_ck != want:
        raise PredictError(
            f"{checkpoint}: made for {n_ck} classes; task {ck_task!r} maps "
            f"{want} ({', '.join(TASK_CLASSES[ck_task])})"
        )
    stats = extra.get("db_stats")
    if not stats or len(stats) != 2:
        raise PredictError(
            f"{checkpoint}: no 'db_stats' (the training dB mean/std) in its extra "
            "state; re-export it with `sarcube finetune`"
        )
    return float(stats[0]), float(stats[1])


def load_predictor(
    checkpoint: str,
    storage_options: Mapping[str, Any] | None = None,
    task: str | None = None,
    device: str = "cpu",
) -> Predictor:
    """The segmenter of a fine-tuning checkpoint (``best.pt`` / ``checkpoint.pt``), checked
    against ``task`` (its class count included); ``PredictError`` otherwise."""
    try:
        model, cfg, ck = segmenter_from_checkpoint(checkpoint, storage_options)
    except (ValueError, FileNotFoundError) as e:
        raise PredictError(str(e)) from None
    ck_task = cfg.seg.task
    mean, std = _checked_db_stats(checkpoint, ck_task, ck.get("extra") or {}, task)
    model.eval().to(device)
    sha = _sha256(read_bytes(checkpoint, storage_options))
    return Predictor(
        model, ck_task, mean, std, cfg.seg.threshold, str(checkpoint), sha, str(device)
    )


_PREDICTORS: dict[tuple[str, str], Predictor] = {}  # per process: (checkpoint, device) -> model


def cached_predictor(spec: Predictor | tuple[str, Mapping[str, Any], str]) -> Predictor:
    """``spec`` itself if a Predictor, else the Predictor of ``spec`` = (checkpoint, storage
    options, device), loaded once per process (a Dask worker reuses it for every block)."""
    if isinstance(spec, Predictor):
        return spec
    ckpt, storage_options, device = spec
    key = (ckpt, device)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = load_predictor(ckpt, storage_options, device=device)
    return _PREDICTORS[key]
