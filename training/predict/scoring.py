"""Region-wide scores of a prediction against the cube's labels.

With labels in the cube (``lulc``, HR-LULC), each block's marker holds the confusion matrix of
its valid pixels (:func:`confusion_matrix`); the region's scores per date are those of the summed
matrices, computed by the fine-tuning metric functions (:mod:`training.metrics`), so a map and a
test split are scored alike.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from sarcube.classes import IGNORE_INDEX, segmentation_task

from ..metrics import binary_scores, segmentation_scores

__all__ = ["confusion_matrix", "region_scores"]


def confusion_matrix(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """``(k, k)`` int64 counts, rows truth, columns prediction; ignored truth pixels left out."""
    keep = truth != IGNORE_INDEX
    idx = truth[keep].astype(np.int64) * k + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=k * k).reshape(k, k)


def region_scores(
    task: str, dates: Sequence[tuple[str, int]], results: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """Date → scores (with the ``confusion_matrix``) from the markers ``results`` of a run."""
    spec = segmentation_task(task)
    k = spec.num_classes
    out = {}
    for d, t in dates:
        cm = np.zeros((k, k), np.int64)
        for m in results.values():
            if m.get("t") == t and "cm" in m:
                cm += np.asarray(m["cm"], np.int64)
        tcm = torch.from_numpy(cm)
        if spec.binary:
            out[d] = binary_scores(tcm) | {"confusion_matrix": cm.tolist()}
        else:
            out[d] = segmentation_scores(tcm, spec.class_names) | {"confusion_matrix": cm.tolist()}
    return out
