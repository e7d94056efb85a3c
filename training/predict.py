"""Large-area inference: seamless, out-of-core land-cover and water maps from the cube.

::

    sarcube predict --cube cube.zarr --checkpoint runs/lulc/best.pt --out cube.zarr \\
        [--bbox W S E N] [--time 2022-09-12 | 2022-09-01/2022-10-31] [--task lulc|water] \\
        [--overlap 128] [--batch-size 16] [--device cpu|cuda] [--workers N] [--probabilities] \\
        [--cog map.tif]

**Windows and blending.** A fine-tuned segmenter sees 256² windows. Windows sit on one lattice
anchored at the cube's origin: window ``k`` covers rows ``[k·s, k·s + 256)`` with stride
``s = 256 − overlap`` (default overlap 128, i.e. 50 %), the same in x. Each window's class
probabilities (softmax; water: sigmoid) are weighted by ``w(i, j) = sin²(π(i + ½)/256) ·
sin²(π(j + ½)/256)`` — smooth, positive everywhere, and at 50 % overlap the weights of the four
windows over a pixel sum to exactly 1 — and the map is ``Σ w·p / Σ w``, then argmax (water:
``p ≥ threshold``). Because the lattice is global, the map does not depend on how the region is
cut into blocks: a block computes every window that touches it, whatever its neighbours do. A
model whose output at a pixel depends only on that pixel (1×1 convolutions) gives exactly the map
of the model applied to the whole region at once (tested).

**No data.** The model sees no-data pixels filled with the training mean (as in training). A
window's weight is also scaled by its share of valid pixels, so a window that is mostly no data
(a swath edge) counts little where it overlaps valid windows. Output pixels whose input is no
data, and pixels outside the cube, are no data (255).

**Out of core.** The region (bbox snapped outward to whole 256-px chunks) is cut into blocks of
``block`` × ``block`` pixels aligned to the chunks. A block reads its pixels plus a halo of
``256 − stride`` … ``256`` px (the windows that overlap it), predicts, and writes only its own
pixels; memory is that of one block per worker (input, accumulators, a batch of windows),
independent of the region's size. Blocks run in this process (``workers=0``, or on one GPU with
``device="cuda"``), or as tasks on a Dask cluster (``workers`` local processes or a scheduler).

**Resume.** After a block's pixels are written a marker
``<out>.predict/<layer>/t<T>-r<R>-c<C>.json`` (with the block's confusion matrix and the
checkpoint's sha256) is written beside the store (not inside it: Zarr would warn about a foreign
directory whenever the group is listed); a re-run skips blocks whose marker names the same
checkpoint, so an interrupted run finishes where it stopped and produces the same output.

**Outputs.** ``pred_lulc`` (uint8, 9 classes in Table II order, 255 no data) or ``pred_water``
(uint8 0/1, 255), shaped ``(time, y, x)`` like ``hh_db`` and chunked 256², either in the cube
itself (``out`` = the cube) or in a separate store on the cube's grid (``open_cube`` opens both;
``y``/``x`` equal the cube's); ``prob_lulc`` ``(time, class, y, x)`` / ``prob_water`` ``(time,
y, x)`` as uint8 ``round(254·p)`` with ``--probabilities``; the checkpoint and settings in the
layer's attributes. With labels in the cube: region-wide scores (the fine-tuning metric functions)
and a PNG panel SAR | prediction | truth | errors. ``--cog`` writes a Cloud-Optimized GeoTIFF
(EPSG:4326, overviews by mode, the JAXA-like colour table).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import time as _time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sarcube import __version__
from sarcube.classes import IGNORE_INDEX, NINE_CLASS_NAMES, nine_class_lut, water_lut
from sarcube.cube import PREDICTIONS_FORMAT, cube_grid, open_group, zarr_store
from sarcube.errors import InputError, SarcubeError
from sarcube.grid import CubeGrid
from sarcube.locking import StoreLock
from sarcube.storage import RedactedOptions, is_remote, join_url, put_bytes, url_to_fs

__all__ = [
    "LAYERS",
    "PredictError",
    "PredictResult",
    "Predictor",
    "blend_weight",
    "export_cog",
    "load_predictor",
    "predict",
    "window_starts",
]

log = logging.getLogger("training.predict")

LAYERS = {"lulc": "pred_lulc", "water": "pred_water"}
PROB_LAYERS = {"lulc": "prob_lulc", "water": "prob_water"}
NODATA = 255
WINDOW = 256


class PredictError(InputError):
    """Bad input to ``predict`` (region, dates, checkpoint, cube); the message says which."""


# ---------------------------------------------------------------------------------------------
# The model side


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
        return 9 if self.task == "lulc" else 1

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
        p = torch.softmax(logits, 1) if self.task == "lulc" else torch.sigmoid(logits)
        return p.cpu()

    def classes(self, prob: np.ndarray) -> np.ndarray:
        """``(C, H, W)`` blended probabilities → ``(H, W)`` uint8 classes."""
        if self.task == "lulc":
            return prob.argmax(0).astype(np.uint8)
        return (prob[0] >= self.threshold).astype(np.uint8)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def load_predictor(
    checkpoint: str,
    storage_options: Mapping[str, Any] | None = None,
    task: str | None = None,
    device: str = "cpu",
) -> Predictor:
    """The segmenter of a fine-tuning checkpoint (``best.pt`` / ``checkpoint.pt``), checked
    against ``task`` (its class count included); ``PredictError`` otherwise."""
    from .checkpoint import read_bytes
    from .config import config_from_dict
    from .finetune import TASK_CLASSES, build_segmentation_model, load_model_checkpoint

    try:
        ck = load_model_checkpoint(checkpoint, storage_options)
    except (ValueError, FileNotFoundError) as e:
        raise PredictError(str(e)) from None
    cfg = config_from_dict(ck["config"])
    cfg.seg.pretrained = None
    extra = ck.get("extra") or {}
    ck_task = cfg.seg.task
    n_ck = int(extra.get("num_classes", 9 if ck_task == "lulc" else 2))
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
    model = build_segmentation_model(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise PredictError(
            f"{checkpoint}: the weights do not fit the model of its config "
            f"({str(e).splitlines()[0]})"
        ) from None
    model.eval().to(device)
    sha = _sha256(read_bytes(checkpoint, storage_options))
    return Predictor(
        model,
        ck_task,
        float(stats[0]),
        float(stats[1]),
        cfg.seg.threshold,
        str(checkpoint),
        sha,
        str(device),
    )


# ---------------------------------------------------------------------------------------------
# Windows


def window_starts(b0: int, b1: int, stride: int, window: int = WINDOW) -> list[int]:
    """Starts ``k·stride`` of every lattice window ``[k·stride, k·stride + window)`` that
    overlaps ``[b0, b1)`` (pixels of the cube grid; may be negative or run past the cube)."""
    k0 = math.floor((b0 - window) / stride) + 1
    k1 = math.ceil(b1 / stride) - 1
    return [k * stride for k in range(k0, k1 + 1)]


def blend_weight(window: int = WINDOW) -> np.ndarray:
    """``(window, window)`` float32 ``sin²(π(i + ½)/W) · sin²(π(j + ½)/W)``: positive, smooth,
    a partition of unity at 50 % overlap (``sin² + cos² = 1``)."""
    w1 = np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2
    return np.outer(w1, w1).astype(np.float32)


def _read_window(arr, t: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """``hh_db[t, r0:r1, c0:c1]`` with NaN outside the array."""
    h, w = arr.shape[-2:]
    out = np.full((r1 - r0, c1 - c0), np.nan, np.float32)
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if rr0 < rr1 and cc0 < cc1:
        out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = arr[t, rr0:rr1, cc0:cc1]
    return out


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


# ---------------------------------------------------------------------------------------------
# Blocks


@dataclass(frozen=True)
class _Job:
    cube: str
    out: str
    so: Mapping[str, Any]
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


_PREDICTORS: dict[tuple[str, str], Predictor] = {}  # per process: (checkpoint, device) -> model


def _predictor(spec: Predictor | tuple[str, Mapping[str, Any], str]) -> Predictor:
    if isinstance(spec, Predictor):
        return spec
    ckpt, so, device = spec
    key = (ckpt, device)
    if key not in _PREDICTORS:
        _PREDICTORS[key] = load_predictor(ckpt, so, device=device)
    return _PREDICTORS[key]


def _confusion(pred: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    keep = truth != IGNORE_INDEX
    idx = truth[keep].astype(np.int64) * k + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=k * k).reshape(k, k)


def run_block(spec: Predictor | tuple[str, Mapping[str, Any], str], job: _Job) -> dict[str, Any]:
    """Predict one block and write it (pixels, then the marker); returns the marker's content."""
    pr = _predictor(spec)
    src = open_group(job.cube, job.so)
    hh = src["hh_db"]
    r0, r1, c0, c1 = job.block
    rows, cols = window_starts(r0, r1, job.stride), window_starts(c0, c1, job.stride)
    g0, g1, h0, h1 = rows[0], rows[-1] + WINDOW, cols[0], cols[-1] + WINDOW  # block + halo
    db = _read_window(hh, job.t, g0, g1, h0, h1)
    prob, valid = predict_array(pr, db, (g0, h0), job.block, job.stride, job.batch_size)
    cls = pr.classes(np.nan_to_num(prob, nan=0.0))
    cls[~valid | ~np.isfinite(prob[0])] = NODATA
    dst = open_group(job.out, job.so, mode="r+", formats=(PREDICTIONS_FORMAT, "sarcube-cube/1"))
    dst[job.layer][job.t, r0:r1, c0:c1] = cls
    if job.prob_layer:
        q = np.where(np.isfinite(prob), np.rint(np.clip(prob, 0, 1) * 254), NODATA).astype(np.uint8)
        q[:, ~valid] = NODATA
        if pr.task == "lulc":
            dst[job.prob_layer][job.t, :, r0:r1, c0:c1] = q
        else:
            dst[job.prob_layer][job.t, r0:r1, c0:c1] = q[0]
    info: dict[str, Any] = {
        "block": list(job.block),
        "t": job.t,
        "sha256": pr.sha256,
        "slice": job.slice_id,
        "valid_pixels": int(valid.sum()),
    }
    if job.labels:
        lut = nine_class_lut() if pr.task == "lulc" else water_lut()
        truth = lut[np.asarray(src["lulc"][r0:r1, c0:c1])]
        truth = np.where(valid, truth, IGNORE_INDEX)
        k = 9 if pr.task == "lulc" else 2
        info["cm"] = _confusion(cls, truth, k).tolist()
    fs, path = url_to_fs(job.marker, job.so)
    put_bytes(fs, path, json.dumps(info).encode())
    return info


# ---------------------------------------------------------------------------------------------
# The run


@dataclass
class PredictResult:
    """What ``predict`` did."""

    out: str
    layer: str
    task: str
    dates: list[str]
    region: tuple[int, int, int, int]  # cube pixels (r0, r1, c0, c1), chunk-snapped
    bounds: tuple[float, float, float, float]  # W, S, E, N of the region
    blocks: int
    skipped: int  # blocks already done (resume)
    seconds: float
    megapixels: float  # predicted this run (valid or not), all dates
    scores: dict[str, Any] = field(default_factory=dict)  # date -> scores (labels present)
    panels: list[str] = field(default_factory=list)
    cog: str | None = None


def _slice_id(entry: Mapping[str, Any]) -> str:
    """Identity of a cube slice: its time slot and the scenes (ids, sha256) mosaicked in it. A
    date rebuilt copy-on-write (sarcube.registry) gets another, so its old markers are stale."""
    key = json.dumps({"t": int(entry["time_index"]), "inputs": entry.get("inputs")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def _select_dates(root, time: str | Sequence[str] | None) -> list[tuple[str, int]]:
    slices = root.attrs.get("slices", {})
    done = sorted(
        (d, int(v["time_index"])) for d, v in slices.items() if v.get("status") == "complete"
    )
    if not done:
        raise PredictError("the cube has no complete time slice (nothing to predict)")
    if time is None:
        return done
    items = [time] if isinstance(time, str) else list(time)
    out = []
    for item in items:
        s = str(item).strip()
        if "/" in s or ".." in s:
            a, b = s.replace("..", "/").split("/", 1)
            try:
                lo, hi = dt.date.fromisoformat(a.strip()), dt.date.fromisoformat(b.strip())
            except ValueError:
                raise PredictError(
                    f"--time {s!r}: expected DATE or DATE/DATE (YYYY-MM-DD)"
                ) from None
            got = [x for x in done if lo <= dt.date.fromisoformat(x[0]) <= hi]
        else:
            try:
                want = dt.date.fromisoformat(s)
            except ValueError:
                raise PredictError(
                    f"--time {s!r}: expected DATE or DATE/DATE (YYYY-MM-DD)"
                ) from None
            got = [x for x in done if x[0] == want.isoformat()]
        if not got:
            raise PredictError(
                f"--time {s}: no data for that date in the cube (dates: "
                f"{', '.join(d for d, _ in done)})"
            )
        out += got
    return sorted(set(out))


def _region(grid: CubeGrid, bbox: Sequence[float] | None) -> tuple[int, int, int, int]:
    if bbox is None:
        return 0, grid.height, 0, grid.width
    w, s, e, n = (float(v) for v in bbox)
    if not (w < e and s < n):
        raise PredictError(f"--bbox {w} {s} {e} {n}: empty (need W < E and S < N)")
    cpd = grid.cells_per_degree
    r0 = math.floor((90.0 - n) * cpd + 1e-7) - grid.row0
    r1 = math.ceil((90.0 - s) * cpd - 1e-7) - grid.row0
    c0 = math.floor((w + 180.0) * cpd + 1e-7) - grid.col0
    c1 = math.ceil((e + 180.0) * cpd - 1e-7) - grid.col0
    r0, r1, c0, c1 = max(r0, 0), min(r1, grid.height), max(c0, 0), min(c1, grid.width)
    if r0 >= r1 or c0 >= c1:
        raise PredictError(
            f"--bbox {w} {s} {e} {n} does not overlap the cube "
            f"(cube bounds W S E N: {' '.join(f'{v:.4f}' for v in grid.bounds)})"
        )
    ch = grid.chunk
    return (
        r0 // ch * ch,
        min(-(-r1 // ch) * ch, grid.height),
        c0 // ch * ch,
        min(-(-c1 // ch) * ch, grid.width),
    )


def _layer_attrs(pr: Predictor, overlap: int, stride: int) -> dict[str, Any]:
    names = list(NINE_CLASS_NAMES) if pr.task == "lulc" else ["not water", "water"]
    return {
        "long_name": (
            "predicted "
            f"{'9-class land cover' if pr.task == 'lulc' else 'water (1) / not water (0)'}"
        ),
        "flag_values": list(range(len(names))),
        "flag_meanings": " ".join(n.replace(" ", "_") for n in names),
        "nodata": NODATA,
        "task": pr.task,
        "checkpoint": pr.checkpoint,
        "checkpoint_sha256": pr.sha256,
        "window": WINDOW,
        "overlap": overlap,
        "stride": stride,
        "blend": "sin^2 window weight x valid share of the window; probabilities averaged",
        "sarcube_version": __version__,
        "coordinates": "spatial_ref",
        "grid_mapping": "spatial_ref",
    }


def _prepare_output(
    cube: str,
    out: str,
    so: Mapping[str, Any],
    grid: CubeGrid,
    pr: Predictor,
    dates: Sequence[tuple[str, int]],
    overlap: int,
    stride: int,
    probabilities: bool,
) -> tuple[str, str | None]:
    """Create (or check) the output layer(s); returns (layer, prob layer)."""
    import zarr

    src = open_group(cube, so)
    t_len = src["hh_db"].shape[0]
    same = (
        os.path.abspath(cube) == os.path.abspath(out)
        if not is_remote(out)
        else cube.rstrip("/") == out.rstrip("/")
    )
    if same:
        root = open_group(out, so, mode="r+")
    else:
        try:
            root = open_group(out, so, mode="r+", formats=(PREDICTIONS_FORMAT,))
        except Exception:
            fs, path = url_to_fs(out, so)
            if fs.exists(join_url(path, "zarr.json")):
                raise PredictError(
                    f"--out {out}: a Zarr store that is neither this cube nor a "
                    "sarcube predictions store; choose another path"
                ) from None
            # "a", not "w-": the folder may already hold this run's lock object
            root = zarr.open_group(zarr_store(out, so), mode="a", zarr_format=3)
            for name in ("y", "x", "spatial_ref"):
                a = src[name]
                dst = root.create_array(
                    name,
                    shape=a.shape,
                    chunks=a.chunks,
                    dtype=a.dtype,
                    fill_value=a.fill_value,
                    dimension_names=a.metadata.dimension_names,
                )
                dst[...] = a[...]
                dst.attrs.update(dict(a.attrs))
            root.attrs.update(
                {
                    "format": PREDICTIONS_FORMAT,
                    "sarcube_version": __version__,
                    "grid": grid.to_attrs(),
                    "crs": "EPSG:4326",
                    "slices": {},
                    "source_cube": cube if is_remote(cube) else os.path.abspath(cube),
                }
            )
        if root.attrs.get("grid") != grid.to_attrs():
            raise PredictError(f"--out {out}: a predictions store of another grid than {cube}")
        # time axis: the cube's raw axis (same indices), its predicted dates listed as slices
        if "time" not in root:
            tarr = root.create_array(
                "time",
                shape=(0,),
                chunks=(1024,),
                dtype="int64",
                fill_value=0,
                dimension_names=("time",),
            )
            tarr.attrs.update(dict(src["time"].attrs))
        if root["time"].shape[0] < t_len:
            root["time"].resize((t_len,))
        root["time"][:t_len] = src["time"][:t_len]
        slices = dict(root.attrs.get("slices", {}))
        for d, t in dates:
            slices[d] = {"time_index": t, "status": "complete"}
        root.attrs["slices"] = slices
    h, w = grid.height, grid.width
    layer, prob_layer = LAYERS[pr.task], PROB_LAYERS[pr.task] if probabilities else None
    attrs = _layer_attrs(pr, overlap, stride)
    specs = [(layer, (t_len, h, w), (1, grid.chunk, grid.chunk), ("time", "y", "x"))]
    if prob_layer:
        if pr.task == "lulc":
            specs.append(
                (
                    prob_layer,
                    (t_len, 9, h, w),
                    (1, 1, grid.chunk, grid.chunk),
                    ("time", "class", "y", "x"),
                )
            )
        else:
            specs.append(
                (prob_layer, (t_len, h, w), (1, grid.chunk, grid.chunk), ("time", "y", "x"))
            )
    for name, shape, chunks, dims in specs:
        if name in root:
            a = root[name]
            if a.shape[0] < t_len:
                a.resize((t_len, *a.shape[1:]))
            if a.attrs.get("checkpoint_sha256") != pr.sha256:
                a.attrs.update(attrs)  # another model: its blocks are redone (markers differ)
            continue
        a = root.create_array(
            name,
            shape=shape,
            chunks=chunks,
            dtype="uint8",
            fill_value=NODATA,
            dimension_names=dims,
            config={"write_empty_chunks": False},
        )
        a.attrs.update(
            attrs
            if name == layer
            else {**attrs, "long_name": f"probability × 254 ({pr.task})", "scale_factor": 1 / 254}
        )
    return layer, prob_layer


def _blocks(region: tuple[int, int, int, int], block: int) -> list[tuple[int, int, int, int]]:
    r0, r1, c0, c1 = region
    return [
        (r, min(r + block, r1), c, min(c + block, c1))
        for r in range(r0, r1, block)
        for c in range(c0, c1, block)
    ]


def _read_marker(url: str, so: Mapping[str, Any]) -> dict[str, Any] | None:
    fs, path = url_to_fs(url, so)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def predict(
    cube: str,
    checkpoint: str | Predictor,
    out: str | None = None,
    *,
    bbox: Sequence[float] | None = None,
    time: str | Sequence[str] | None = None,
    task: str | None = None,
    overlap: int = 128,
    batch_size: int = 16,
    device: str = "cpu",
    probabilities: bool = False,
    cog: str | None = None,
    workers: int = 0,
    client: Any = None,
    scheduler: str | None = None,
    block: int = 1024,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
    panel: bool = True,
    wait: float = 0.0,
    break_stale_lock: bool = False,
) -> PredictResult:
    """Map ``bbox`` × ``time`` of the cube with a fine-tuned segmenter (see the module doc).

    Args:
        cube: the cube URL.
        checkpoint: ``best.pt`` / ``checkpoint.pt`` of ``sarcube finetune``, or a ``Predictor``.
        out: where the layer goes: the cube itself (default) or a separate store.
        bbox: W S E N degrees (EPSG:4326); default the whole cube. Snapped out to 256-px chunks.
        time: a date, ``DATE/DATE`` range, or a list of them; default every complete slice.
        task: ``lulc`` / ``water``; checked against the checkpoint.
        overlap: pixels shared by neighbouring 256² windows (0 … 255; default 128 = 50 %).
        batch_size: windows per forward pass.
        device: ``cpu`` or ``cuda`` (``cuda``: blocks run in this process on the GPU).
        probabilities: also write uint8 class probabilities.
        cog: also export the map of the first date as a Cloud-Optimized GeoTIFF here.
        workers / client / scheduler: run blocks on a Dask cluster (``workers`` local processes,
            a client, or a scheduler address); default in this process.
        block: block edge in pixels (a multiple of 256; memory scales with its square).
        wait / break_stale_lock: wait this many seconds for another writer's lock on ``out``;
            break a lock whose holder stopped heart-beating (``sarcube.locking``).
    """
    so = RedactedOptions(storage_options or {})  # Dask's repr of a failed task shows no secret
    cube = str(cube)
    out = cube if out is None else str(out)
    if not 0 <= int(overlap) < WINDOW:
        raise PredictError(f"--overlap must be in [0, {WINDOW - 1}] pixels, got {overlap}")
    stride = WINDOW - int(overlap)
    if block < WINDOW or block % 256:
        raise PredictError(f"block must be a positive multiple of 256 pixels, got {block}")
    try:
        root = open_group(cube, so)
    except Exception as e:
        from sarcube.storage import storage_error_message

        raise PredictError(f"--cube {cube}: {storage_error_message(e) or e}") from None
    for var in ("hh_db", "time"):
        if var not in root:
            raise PredictError(f"{cube}: the cube has no {var!r} variable (not ingested?)")
    grid = cube_grid(root)
    dates = _select_dates(root, time)
    region = _region(grid, bbox)
    if isinstance(checkpoint, Predictor):
        pr = checkpoint
        if task is not None and task != pr.task:
            raise PredictError(f"the predictor is for {pr.task!r}, --task {task} was asked for")
        spec: Any = pr
    else:
        pr = load_predictor(str(checkpoint), so, task, device)
        spec = (str(checkpoint), so, device)
    labels = "lulc" in root and bool(root.attrs.get("labels"))
    slice_ids = {d: _slice_id(root.attrs["slices"][d]) for d, _ in dates}
    # One writer per output store (the cube itself by default: then ingest and predict exclude
    # each other too); the markers beside it are covered by the same lock.
    with StoreLock(out, so, command="sarcube predict", wait=wait, break_stale=break_stale_lock):
        layer, prob_layer = _prepare_output(
            cube, out, so, grid, pr, dates, overlap, stride, probabilities
        )
        blocks = _blocks(region, block)
        jobs, done = [], {}
        for d, t in dates:
            for b in blocks:
                marker = join_url(
                    out.rstrip("/") + ".predict", layer, f"t{t:04d}-r{b[0]:07d}-c{b[2]:07d}.json"
                )
                m = _read_marker(marker, so)
                if (
                    m is not None
                    and m.get("sha256") == pr.sha256
                    and m.get("block") == list(b)
                    and m.get("slice") == slice_ids[d]
                ):
                    done[marker] = m
                    continue
                jobs.append(
                    _Job(
                        cube,
                        out,
                        so,
                        layer,
                        prob_layer,
                        t,
                        b,
                        stride,
                        batch_size,
                        labels,
                        marker,
                        slice_ids[d],
                    )
                )
        t0 = _time.perf_counter()
        results = _run(pr, spec, jobs, device, workers, client, scheduler, progress)
        seconds = _time.perf_counter() - t0
    results.update(done)
    mpx = sum((j.block[1] - j.block[0]) * (j.block[3] - j.block[2]) for j in jobs) / 1e6
    res = PredictResult(
        out,
        layer,
        pr.task,
        [d for d, _ in dates],
        region,
        grid.window_bounds(*region),
        len(blocks) * len(dates),
        len(done),
        seconds,
        mpx,
    )
    if labels:
        res.scores = _scores(pr.task, dates, results)
    if panel:
        res.panels = [str(p) for p in _panels(cube, out, so, layer, dates, region, pr.task, labels)]
    if cog:
        export_cog(out, cog, layer=layer, time_index=dates[0][1], region=region, storage_options=so)
        res.cog = str(cog)
    return res


def _run(
    pr: Predictor,
    spec,
    jobs: list[_Job],
    device: str,
    workers: int,
    client,
    scheduler,
    progress: bool,
) -> dict[str, dict[str, Any]]:
    """In this process with the loaded ``pr``; on Dask with ``spec`` (a checkpoint path each
    worker loads once, or the Predictor itself, pickled)."""
    if not jobs:
        return {}
    if client is None and scheduler is None and (workers <= 0 or device != "cpu"):
        from tqdm import tqdm

        out = {}
        for job in tqdm(jobs, desc="predict", unit="block", disable=not progress):
            out[job.marker] = run_block(pr, job)
        return out
    from sarcube.cluster import dask_client, run_tasks, task_key

    with dask_client(client, scheduler, workers or None) as c:
        futs = {
            j.marker: c.submit(run_block, spec, j, key=task_key(f"predict-{i}"), pure=False)
            for i, j in enumerate(jobs)
        }
        res = run_tasks(c, futs, "predict", progress)
    failed = {k: v for k, v in res.items() if isinstance(v, BaseException)}
    if failed:
        k, e = next(iter(failed.items()))
        raise RuntimeError(
            f"{len(failed)} of {len(jobs)} blocks failed (re-run to resume); "
            f"first: {k}: {type(e).__name__}: {e}"
        )
    return res


def _scores(task: str, dates, results: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    from .metrics import binary_scores, segmentation_scores

    k = 9 if task == "lulc" else 2
    out = {}
    for d, t in dates:
        cm = np.zeros((k, k), np.int64)
        for m in results.values():
            if m.get("t") == t and "cm" in m:
                cm += np.asarray(m["cm"], np.int64)
        tcm = torch.from_numpy(cm)
        if task == "lulc":
            out[d] = segmentation_scores(tcm, NINE_CLASS_NAMES) | {"confusion_matrix": cm.tolist()}
        else:
            out[d] = binary_scores(tcm) | {"confusion_matrix": cm.tolist()}
    return out


# ---------------------------------------------------------------------------------------------
# Figures and the COG


def _decimated(arr, index: tuple, region: tuple[int, int, int, int], step: int, stripe: int = 1024):
    """``arr[index + (rows, cols)]`` every ``step`` pixels over ``region``, read in stripes."""
    r0, r1, c0, c1 = region
    parts = []
    for r in range(r0, r1, stripe):
        parts.append(
            np.asarray(arr[(*index, slice(r, min(r + stripe, r1), step), slice(c0, c1, step))])
        )
    return np.concatenate(parts, axis=0)


def _panels(
    cube: str, out: str, so, layer: str, dates, region, task: str, labels: bool
) -> list[Path | str]:
    """SAR | prediction | truth | errors PNG per date (at most ~1024 px wide), next to the layer
    (a local path, or for a remote ``out`` a URL beside the store: nothing in the cwd)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap

    from .reports import class_colors

    src = open_group(cube, so)
    dst = open_group(out, so, formats=(PREDICTIONS_FORMAT, "sarcube-cube/1"))
    r0, r1, c0, c1 = region
    step = max(1, math.ceil(max(r1 - r0, c1 - c0) / 1024))
    k = 9 if task == "lulc" else 2
    colors = class_colors(task, k)
    cmap = ListedColormap(colors).with_extremes(bad=(1, 1, 1), over=(1, 1, 1))
    remote = is_remote(out)
    tmpdir = Path(tempfile.mkdtemp(prefix="sarcube-panels-")) if remote else None
    base = tmpdir if tmpdir is not None else Path(out).parent
    base.mkdir(parents=True, exist_ok=True)
    paths: list = []
    for d, t in dates:
        sar = _decimated(src["hh_db"], (t,), region, step)
        pred = _decimated(dst[layer], (t,), region, step).astype(float)
        pred[pred == NODATA] = np.nan
        panels = [("SAR HH (dB)", sar, "gray"), ("prediction", pred, cmap)]
        if labels:
            lut = nine_class_lut() if task == "lulc" else water_lut()
            truth = lut[_decimated(src["lulc"], (), region, step)].astype(float)
            truth[truth == IGNORE_INDEX] = np.nan
            err = np.where(np.isnan(pred) | np.isnan(truth), np.nan, (pred != truth).astype(float))
            panels += [
                ("truth (HR-LULC)" if task == "lulc" else "truth", truth, cmap),
                ("errors (red)", err, ListedColormap([(0.85, 0.85, 0.85), (0.85, 0.1, 0.1)])),
            ]
        fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4))
        for ax, (title, a, cm) in zip(np.atleast_1d(axes), panels, strict=True):
            if title.startswith("SAR"):
                fin = a[np.isfinite(a)]
                lo, hi = np.percentile(fin, [2, 98]) if fin.size else (-25, 0)
                ax.imshow(a, cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
            elif title.startswith("errors"):
                ax.imshow(a, cmap=cm, vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(a, cmap=cm, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
        fig.suptitle(f"{task} map, {d} (1 px = {step} cube px)", fontsize=11)
        fig.tight_layout()
        path = base / f"{Path(out.rstrip('/')).stem}_{layer}_{d}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        if tmpdir is not None:  # beside the store, like a local one (nothing in the cwd)
            from sarcube.storage import write_bytes

            url = join_url(out.rstrip("/").rsplit("/", 1)[0], path.name)
            write_bytes(url, path.read_bytes(), so)
            path.unlink()
            paths.append(url)
        else:
            paths.append(path)
    if tmpdir is not None:
        tmpdir.rmdir()
    return paths


def export_cog(
    out: str,
    path: str,
    *,
    layer: str = "pred_lulc",
    time_index: int = 0,
    region: tuple[int, int, int, int] | None = None,
    storage_options: Mapping[str, Any] | None = None,
    block: int = 1024,
) -> str:
    """Write ``layer[time_index]`` over ``region`` as a Cloud-Optimized GeoTIFF at ``path``
    (local, or a URL: written locally then uploaded): EPSG:4326, 512² tiles, deflate, nodata 255,
    overviews by mode, a colour table of the class colours. Copied block by block into a tiled
    GeoTIFF, then through GDAL's COG driver (memory: one block)."""
    import rasterio
    from rasterio.shutil import copy as rio_copy
    from rasterio.windows import Window

    from .reports import class_colors

    so = dict(storage_options or {})
    root = open_group(out, so, formats=(PREDICTIONS_FORMAT, "sarcube-cube/1"))
    grid = cube_grid(root)
    arr = root[layer]
    r0, r1, c0, c1 = region or (0, grid.height, 0, grid.width)
    task = arr.attrs.get("task", "lulc")
    k = 9 if task == "lulc" else 2
    colors = {
        i: (*(round(255 * v) for v in c[:3]), 255) for i, c in enumerate(class_colors(task, k))
    }
    colors[NODATA] = (0, 0, 0, 0)
    tmpdir = Path(tempfile.mkdtemp(prefix="sarcube-cog-"))
    tmp = tmpdir / "map.tif"
    profile = {
        "driver": "GTiff",
        "width": c1 - c0,
        "height": r1 - r0,
        "count": 1,
        "dtype": "uint8",
        "crs": "EPSG:4326",
        "transform": grid.window_transform(r0, c0),
        "nodata": NODATA,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
        "compress": "deflate",
    }
    with rasterio.open(tmp, "w", **profile) as dst:
        for r in range(r0, r1, block):
            for c in range(c0, c1, block):
                rr, cc = min(r + block, r1), min(c + block, c1)
                dst.write(
                    np.asarray(arr[time_index, r:rr, c:cc]),
                    1,
                    window=Window(c - c0, r - r0, cc - c, rr - r),
                )
        dst.write_colormap(1, colors)
        dst.update_tags(
            1,
            **{
                k2: str(v)
                for k2, v in arr.attrs.items()
                if k2 in ("task", "checkpoint", "checkpoint_sha256", "flag_meanings")
            },
        )
    remote = is_remote(str(path))
    local = tmpdir / "cog.tif" if remote else Path(path)
    local.parent.mkdir(parents=True, exist_ok=True)
    rio_copy(
        str(tmp),
        str(local),
        driver="COG",
        COMPRESS="DEFLATE",
        BLOCKSIZE=512,
        OVERVIEW_RESAMPLING="MODE",
        RESAMPLING="NEAREST",
    )
    if remote:
        from sarcube.storage import write_bytes

        write_bytes(str(path), local.read_bytes(), so)
    import shutil

    shutil.rmtree(tmpdir, ignore_errors=True)
    return str(path)


# ---------------------------------------------------------------------------------------------
# Command line


def check_args(args: argparse.Namespace) -> None:
    """``predict``'s arguments before any work
    (:func:`sarcube.training_arguments.check_predict_args`)."""
    from sarcube.training_arguments import check_predict_args

    check_predict_args(args)


def run_args(args: argparse.Namespace) -> int:
    from sarcube.storage import parse_storage_options

    check_args(args)
    res = predict(
        args.cube,
        args.checkpoint,
        args.out,
        bbox=args.bbox,
        time=args.time,
        task=args.task,
        overlap=args.overlap,
        batch_size=args.batch_size,
        device=args.device,
        probabilities=args.probabilities,
        cog=args.cog,
        workers=args.workers,
        scheduler=args.scheduler,
        block=args.block,
        storage_options=parse_storage_options(args.storage_option),
        wait=args.wait,
        break_stale_lock=args.break_stale_lock,
    )
    print(
        f"predict: {res.task} → {res.out} [{res.layer}], dates {', '.join(res.dates)}; "
        f"{res.blocks} blocks ({res.skipped} done earlier), {res.megapixels:.1f} Mpx in "
        f"{res.seconds:.1f} s"
    )
    for d, s in res.scores.items():
        if res.task == "lulc":
            print(
                f"  {d}: mIoU {s['miou']:.3f}, mAcc {s['macc']:.3f}, "
                f"pixel accuracy {s['pixel_acc']:.3f} "
                "(vs the cube's HR-LULC labels)"
            )
        else:
            print(
                f"  {d}: water IoU {s['iou']:.3f}, precision {s['precision']:.3f}, "
                f"recall {s['recall']:.3f}"
            )
    for p in res.panels:
        print(f"  panel: {p}")
    if res.cog:
        print(f"  COG: {res.cog}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from sarcube.training_arguments import add_predict_arguments

    p = argparse.ArgumentParser(
        prog="python -m training.predict", description=__doc__.splitlines()[0]
    )
    add_predict_arguments(p)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return run_args(args)
    except SarcubeError as e:
        print(f"predict: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # a storage failure (denied, no credentials …) is one line too
        from sarcube.storage import storage_error_message

        msg = storage_error_message(e)
        if msg is None:
            raise
        print(f"predict: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
