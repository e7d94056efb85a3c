"""Segmentation metrics (docs/design.md §4): a confusion matrix accumulated over the whole split
and summed across DDP ranks, and the scores derived from it.

Everything is derived from one integer confusion matrix ``cm`` of shape ``(K, K)``: rows are the
truth, columns the prediction, ``cm[i, j]`` = number of valid pixels of true class i predicted as
j. Pixels whose target is ``ignore_index`` (JAXA "no data") are never counted. Scores are computed
in float64 from the integer counts, so two runs with equal matrices report bit-identical scores.

Absent-class convention (stated in every score dict under ``"note"``):

- IoU_k = TP / (TP + FP + FN) is NaN when TP + FP + FN == 0 (class in neither truth nor
  prediction) and that class is left out of mIoU;
- Acc_k = TP / (TP + FN) (per-class recall) is NaN when TP + FN == 0 (class absent from the truth,
  whether or not it is predicted) and that class is left out of mAcc.

torchmetrics 1.9 (``MulticlassJaccardIndex`` / ``MulticlassAccuracy``, default ``zero_division=0``)
agrees on mIoU but reports 0 instead of NaN per class, and for mAcc it keeps a class that is
predicted but absent from the truth in the mean with accuracy 0 (its macro weight is zero only when
TP + FP + FN == 0). Ours leaves such a class out: its recall is undefined, not 0. The tests pin both
the agreement and this difference.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from sarcube.classes import IGNORE_INDEX

from .distributed import all_reduce_sum

ABSENT_CLASS_NOTE = (
    "Per-class IoU is NaN for a class absent from both truth and prediction (TP+FP+FN = 0); "
    "per-class accuracy is NaN for a class absent from the truth (TP+FN = 0). NaN classes are "
    "left out of mIoU / mAcc."
)


def confusion_matrix(
    pred: Tensor, target: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> Tensor:
    """Confusion matrix of one batch.

    Args:
        pred: ``(...)`` integer predicted class ids in ``[0, K)`` (e.g. ``logits.argmax(1)``).
        target: ``(...)`` integer true class ids in ``[0, K)`` or ``ignore_index``; same shape.
        num_classes: K.
        ignore_index: target value of pixels left out (never counted, whatever the prediction).

    Returns:
        ``(K, K)`` int64 tensor on ``pred``'s device; rows = truth, columns = prediction.

    Raises:
        ValueError: on shape mismatch, or a valid target / a prediction outside ``[0, K)`` (which
        would otherwise silently land in another cell of the flattened matrix).
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} differ")
    if pred.is_floating_point() or target.is_floating_point():
        raise TypeError("pred and target must be integer class ids (take argmax of the logits)")
    k = int(num_classes)
    pred = pred.reshape(-1).long()
    target = target.reshape(-1).long().to(pred.device)
    valid = target != ignore_index
    pred, target = pred[valid], target[valid]
    if pred.numel():
        if int(target.min()) < 0 or int(target.max()) >= k:
            raise ValueError(f"target holds values outside [0, {k}) other than {ignore_index}")
        if int(pred.min()) < 0 or int(pred.max()) >= k:
            raise ValueError(f"pred holds values outside [0, {k})")
    return torch.bincount(target * k + pred, minlength=k * k).reshape(k, k)


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` int64 confusion matrix over batches (and over DDP ranks).

    Use: ``update(pred, target)`` for every batch of the split on every rank; then
    ``all_reduce()`` on *every* rank (a collective); then ``compute()`` or ``scores()``.
    Each rank must have seen a disjoint part of the split: a sampler that pads by repeating
    samples would count those pixels twice.
    """

    def __init__(
        self,
        num_classes: int,
        ignore_index: int = IGNORE_INDEX,
        device: torch.device | str | None = None,
    ) -> None:
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(
            self.num_classes, self.num_classes, dtype=torch.int64, device=device
        )
        self.reduced = False

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add one batch: ``pred``/``target`` as in :func:`confusion_matrix`."""
        if self.reduced:
            raise RuntimeError("update() after all_reduce(): call reset() to start a new split")
        cm = confusion_matrix(pred, target, self.num_classes, self.ignore_index)
        self.matrix += cm.to(self.matrix.device)

    def all_reduce(self) -> None:
        """Sum the matrix over all ranks, in place; a no-op when torch.distributed is not
        initialised. Must be called by every rank. A second call raises, since it would
        multiply the counts by the world size."""
        if self.reduced:
            raise RuntimeError("all_reduce() called twice: the counts would be summed again")
        self.matrix = all_reduce_sum(self.matrix)
        self.reduced = True

    def compute(self) -> Tensor:
        """A copy of the accumulated ``(K, K)`` int64 matrix, on the CPU."""
        return self.matrix.detach().cpu().clone()

    def scores(self, class_names: Sequence[str] | None = None) -> dict[str, Any]:
        """:func:`segmentation_scores` of the accumulated matrix."""
        return segmentation_scores(self.compute(), class_names)

    def reset(self) -> None:
        self.matrix.zero_()
        self.reduced = False


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def segmentation_scores(cm: Tensor, class_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Per-class IoU and accuracy, mIoU, mAcc and pixel accuracy of a confusion matrix.

    Args:
        cm: ``(K, K)`` integer confusion matrix, rows = truth, columns = prediction.
        class_names: K names (default ``"0" … "K-1"``), e.g. ``sarcube.classes.NINE_CLASS_NAMES``.

    Returns:
        A JSON-ready dict (Python floats; NaN where undefined):
        ``iou`` / ``acc``: {name: value} in class order; ``miou`` / ``macc``: means over the
        classes where defined; ``pixel_acc``: trace / total; ``iou_excluded`` /
        ``acc_excluded``: names left out of the means; ``support``: {name: true-pixel count};
        ``total_pixels``; ``note``: the absent-class convention (see module docstring).
    """
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"cm must be a square (K, K) matrix, got {tuple(cm.shape)}")
    k = cm.shape[0]
    names = [str(i) for i in range(k)] if class_names is None else [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names for a {k}-class confusion matrix")
    m = cm.detach().cpu().to(torch.float64)
    tp = m.diagonal()
    truth = m.sum(1)  # TP + FN
    predicted = m.sum(0)  # TP + FP
    union = truth + predicted - tp  # TP + FP + FN
    iou = [float(t / u) if u > 0 else math.nan for t, u in zip(tp, union, strict=True)]
    acc = [float(t / s) if s > 0 else math.nan for t, s in zip(tp, truth, strict=True)]
    total = float(m.sum())
    return {
        "iou": dict(zip(names, iou, strict=True)),
        "acc": dict(zip(names, acc, strict=True)),
        "miou": _nanmean(iou),
        "macc": _nanmean(acc),
        "pixel_acc": float(tp.sum()) / total if total > 0 else math.nan,
        "iou_excluded": [n for n, v in zip(names, iou, strict=True) if math.isnan(v)],
        "acc_excluded": [n for n, v in zip(names, acc, strict=True) if math.isnan(v)],
        "support": {n: int(s) for n, s in zip(names, truth, strict=True)},
        "total_pixels": int(total),
        "note": ABSENT_CLASS_NOTE,
    }


def binary_scores(cm: Tensor) -> dict[str, float]:
    """Water-detection scores of a ``(2, 2)`` confusion matrix (rows truth, columns prediction;
    positive class = 1 = water).

    Returns a dict of floats: ``iou`` = TP/(TP+FP+FN), ``precision`` = TP/(TP+FP),
    ``recall`` = TP/(TP+FN), ``f1`` = 2TP/(2TP+FP+FN), ``accuracy`` = (TP+TN)/total, and the counts
    ``tp``, ``fp``, ``fn``, ``tn``. A 0/0 score is NaN (torchmetrics returns 0 there).
    """
    if tuple(cm.shape) != (2, 2):
        raise ValueError(f"binary_scores needs a (2, 2) confusion matrix, got {tuple(cm.shape)}")
    c = cm.detach().cpu().to(torch.int64)
    tn, fp, fn, tp = (int(v) for v in c.reshape(-1))

    def ratio(num: int, den: int) -> float:
        return num / den if den > 0 else math.nan

    return {
        "iou": ratio(tp, tp + fp + fn),
        "precision": ratio(tp, tp + fp),
        "recall": ratio(tp, tp + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
        "accuracy": ratio(tp + tn, tp + tn + fp + fn),
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "tn": tn,
    }


def format_table(
    scores: dict[str, Any],
    class_names: Sequence[str],
    method: str = "this run",
    digits: int = 2,
) -> str:
    """Markdown table in the layout of Table II of arXiv 2601.15705: one row, per-class IoU in
    ``class_names`` order (water … greenhouse), then mIoU; values as fractions (0.xx). A NaN
    IoU prints as ``—``. Followed by a line with mAcc, pixel accuracy and the excluded classes.

    Args:
        scores: a dict from :func:`segmentation_scores`.
        class_names: the columns, each a key of ``scores["iou"]``.
        method: text of the first ("Method") cell.
        digits: decimals.
    """
    missing = [n for n in class_names if n not in scores["iou"]]
    if missing:
        raise KeyError(f"classes {missing} are not in the scores ({list(scores['iou'])})")

    def fmt(v: float) -> str:
        return "—" if math.isnan(v) else f"{v:.{digits}f}"

    def title(name: str) -> str:  # "solar panel" -> "Solar Panel", "built-up" -> "Built-up"
        return " ".join(w[:1].upper() + w[1:] for w in name.split(" "))

    header = ["Method", *(title(n) for n in class_names), "mIoU"]
    row = [method, *(fmt(scores["iou"][n]) for n in class_names), fmt(scores["miou"])]
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
        "| " + " | ".join(row) + " |",
        "",
        f"mAcc {fmt(scores['macc'])} · pixel accuracy {fmt(scores['pixel_acc'])}",
    ]
    if scores["iou_excluded"] or scores["acc_excluded"]:
        lines.append(
            f"Left out of the means (absent): IoU {scores['iou_excluded']}, "
            f"accuracy {scores['acc_excluded']}. {scores['note']}"
        )
    return "\n".join(lines) + "\n"
