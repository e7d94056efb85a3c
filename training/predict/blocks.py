"""One block of a prediction run: read it with its halo, blend the windows, write its pixels.

A block (a chunk-aligned tile of the region) reads its pixels plus a halo of ``256 − stride`` …
``256`` px (the lattice windows that overlap it, :mod:`training.predict.windows`), predicts, and
writes only its own pixels, then its resume marker (:mod:`training.predict.store`); memory is that
of one block (input, accumulators, a batch of windows), independent of the region's size.
:func:`run_block` is what a Dask worker runs; :class:`BlockJob` is all it is sent.

**No data.** The model sees no-data pixels filled with the training mean (as in training). A
window's weight is also scaled by its share of valid pixels, so a window that is mostly no data
(a swath edge) counts little where it overlaps valid windows. Output pixels whose input is no
data, and pixels outside the cube, are no data (255).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from sarcube.classes import IGNORE_INDEX, segmentation_task
from sarcube.cube import FORMAT, PREDICTIONS_FORMAT, open_group

from .predictor import Predictor, cached_predictor
from .scoring import confusion_matrix
from .store import NODATA, Placement, write_marker
from .windows import WINDOW, blend_weight, read_window, window_starts

__all__ = ["BlockJob", "predict_array", "run_block"]


def predict_array(
    predictor: Predictor,
    db: np.ndarray,
    origin: tuple[int, int],
    block: tuple[int, int, int, int],
    stride: int,
    batch_size: int = 16,
    window: int = WINDOW,
) -> tuple[np.ndarray, np.ndarray]:
    """Blend the lattice windows over ``block`` = (r0, r1, c0, c1).

    Args:
        db: float32 dB with NaN, covering at least every window that overlaps the block, its
            top-left pixel at cube pixel ``origin`` = (row, col).
    Returns:
        ``(prob (C, h, w) float32, valid (h, w) bool)`` for the block's own pixels; ``prob`` is
        NaN where no window gave a weight (never, for stride ≤ window).
    """
    r0, r1, c0, c1 = block
    rows, cols = window_starts(r0, r1, stride, window), window_starts(c0, c1, stride, window)
    g0, g1 = rows[0], rows[-1] + window
    h0, h1 = cols[0], cols[-1] + window
    oy, ox = origin
    sub = db[g0 - oy : g1 - oy, h0 - ox : h1 - ox]
    if sub.shape != (g1 - g0, h1 - h0):
        raise ValueError(
            f"db covers {db.shape} from {origin}, windows need rows {g0}:{g1}, cols {h0}:{h1}"
        )
    c = predictor.channels
    acc = np.zeros((c, g1 - g0, h1 - h0), np.float32)
    wsum = np.zeros((g1 - g0, h1 - h0), np.float32)
    w2 = blend_weight(window)
    starts = [(r, q) for r in rows for q in cols]
    for i in range(0, len(starts), batch_size):
        part = starts[i : i + batch_size]
        x = np.stack([sub[r - g0 : r - g0 + window, q - h0 : q - h0 + window] for r, q in part])
        ok = np.isfinite(x)
        frac = ok.reshape(len(part), -1).mean(1)
        todo = [j for j in range(len(part)) if frac[j] > 0]  # an all-no-data window adds nothing
        if not todo:
            continue
        p = predictor.probabilities(torch.from_numpy(x[todo][:, None])).numpy()  # (n, C, W, W)
        for j, pj in zip(todo, p, strict=True):
            r, q = part[j]
            w = w2 * np.float32(frac[j])
            sl = (slice(r - g0, r - g0 + window), slice(q - h0, q - h0 + window))
            acc[(slice(None), *sl)] += pj * w
            wsum[sl] += w
    own = (slice(r0 - g0, r1 - g0), slice(c0 - h0, c1 - h0))
    with np.errstate(invalid="ignore", divide="ignore"):
        prob = acc[(slice(None), *own)] / wsum[own]
    valid = np.isfinite(sub[own])
    return prob, valid


@dataclass(frozen=True)
class BlockJob:
    """One block to predict at one time index, and where its pixels and marker go."""

    cube: str
    out: str
    storage_options: Mapping[str, Any]
    layer: str
    prob_layer: str | None
    t: int
    block: tuple[int, int, int, int]
    stride: int
    batch_size: int
    labels: bool
    marker: str
    slice_id: str = (
        ""  # the cube slice's identity (its slot and scenes): markers of another are stale
    )
    placement: Placement = field(default_factory=Placement)  # cube pixels, slots -> ``out``


def _write_pixels(job: BlockJob, task: str, cls: np.ndarray, prob: np.ndarray, valid) -> None:
    """The block's classes (and uint8 probabilities) into the output layer(s)."""
    r0, r1, c0, c1 = job.placement.region(job.block)
    t = job.placement.t(job.t)
    dst = open_group(job.out, job.storage_options, mode="r+", formats=(PREDICTIONS_FORMAT, FORMAT))
    dst[job.layer][t, r0:r1, c0:c1] = cls
    if job.prob_layer:
        q = np.where(np.isfinite(prob), np.rint(np.clip(prob, 0, 1) * 254), NODATA).astype(np.uint8)
        q[:, ~valid] = NODATA
        if segmentation_task(task).binary:
            dst[job.prob_layer][t, r0:r1, c0:c1] = q[0]
        else:
            dst[job.prob_layer][t, :, r0:r1, c0:c1] = q


def run_block(
    spec: Predictor | tuple[str, Mapping[str, Any], str], job: BlockJob
) -> dict[str, Any]:
    """Predict one block and write it (pixels, then the marker); returns the marker's content.

    Args:
        spec: the Predictor, or (checkpoint, storage options, device) to load it from once per
            process (:func:`~training.predict.predictor.cached_predictor`).
        job: the block.
    """
    pr = cached_predictor(spec)
    src = open_group(job.cube, job.storage_options)
    r0, r1, c0, c1 = job.block
    rows, cols = window_starts(r0, r1, job.stride), window_starts(c0, c1, job.stride)
    g0, g1, h0, h1 = rows[0], rows[-1] + WINDOW, cols[0], cols[-1] + WINDOW  # block + halo
    db = read_window(src["hh_db"], job.t, g0, g1, h0, h1)
    prob, valid = predict_array(pr, db, (g0, h0), job.block, job.stride, job.batch_size)
    cls = pr.classes(np.nan_to_num(prob, nan=0.0))
    cls[~valid | ~np.isfinite(prob[0])] = NODATA
    _write_pixels(job, pr.task, cls, prob, valid)
    info: dict[str, Any] = {
        "block": list(job.block),
        "t": job.t,
        "sha256": pr.sha256,
        "slice": job.slice_id,
        "valid_pixels": int(valid.sum()),
    }
    if job.labels:
        task = segmentation_task(pr.task)
        truth = task.label_lut()[np.asarray(src["lulc"][r0:r1, c0:c1])]
        truth = np.where(valid, truth, IGNORE_INDEX)
        info["cm"] = confusion_matrix(cls, truth, task.num_classes).tolist()
    write_marker(job.marker, job.storage_options, info)
    return info
