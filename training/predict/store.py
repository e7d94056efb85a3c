"""The prediction layers' Zarr schema and the per-block resume markers.

**Outputs.** ``pred_lulc`` (uint8, 9 classes in Table II order, 255 no data) or ``pred_water``
(uint8 0/1, 255), shaped ``(time, y, x)`` like ``hh_db`` and chunked 256², either in the cube
itself (``out`` = the cube) or in a separate store on the cube's grid (``open_cube`` opens both;
``y``/``x`` equal the cube's); ``prob_lulc`` ``(time, class, y, x)`` / ``prob_water`` ``(time,
y, x)`` as uint8 ``round(254·p)`` with ``--probabilities``; the checkpoint and settings in the
layer's attributes.

**Resume.** After a block's pixels are written a marker
``<out>.predict/<layer>/t<T>-r<R>-c<C>.json`` (with the block's confusion matrix and the
checkpoint's sha256) is written beside the store (not inside it: Zarr would warn about a foreign
directory whenever the group is listed); a re-run skips blocks whose marker names the same
checkpoint, so an interrupted run finishes where it stopped and produces the same output.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

from sarcube import __version__
from sarcube.classes import segmentation_task
from sarcube.cube import (
    PREDICTIONS_FORMAT,
    SLICE_STATUS,
    cube_grid,
    metadata,
    open_group,
    root_attrs,
    zarr_store,
)
from sarcube.grid import CubeGrid
from sarcube.storage import is_remote, join_url, put_bytes, url_to_fs

from .predictor import PredictError, Predictor
from .windows import WINDOW

__all__ = [
    "LAYERS",
    "NODATA",
    "PROB_LAYERS",
    "marker_is_current",
    "marker_url",
    "prepare_output",
    "read_marker",
    "same_store",
    "slice_id",
    "write_marker",
]

LAYERS = {"lulc": "pred_lulc", "water": "pred_water"}
PROB_LAYERS = {"lulc": "prob_lulc", "water": "prob_water"}
NODATA = 255


# ---------------------------------------------------------------------------------------------
# The layers


def layer_attrs(pr: Predictor, overlap: int, stride: int) -> dict[str, Any]:
    """The attributes of a prediction layer: its classes, the model and the window settings."""
    names = list(segmentation_task(pr.task).class_names)
    return {
        "long_name": (
            "predicted "
            f"{'9-class land cover' if pr.task == 'lulc' else 'water (1) / not water (0)'}"
        ),
        "flag_values": list(range(len(names))),
        "flag_meanings": " ".join(n.replace(" ", "_") for n in names),
        "nodata": NODATA,
        "_FillValue": NODATA,
        "task": pr.task,
        "checkpoint": pr.checkpoint,
        "checkpoint_sha256": pr.sha256,
        "window": WINDOW,
        "overlap": overlap,
        "stride": stride,
        "blend": "sin^2 window weight x valid share of the window; probabilities averaged",
        "sarcube_version": __version__,
        "coordinates": f"spatial_ref {SLICE_STATUS}",
        "grid_mapping": "spatial_ref",
    }


def same_store(cube: str, out: str) -> bool:
    if is_remote(out):
        return cube.rstrip("/") == out.rstrip("/")
    return os.path.abspath(cube) == os.path.abspath(out)


def _open_predictions_store(
    cube: str, out: str, storage_options: Mapping[str, Any], src, grid: CubeGrid
):
    """The separate predictions store ``out`` on the cube's grid, created (with the cube's
    ``y``/``x``/``spatial_ref``) if it does not exist; ``PredictError`` if it is another store."""
    import zarr

    try:
        root = open_group(out, storage_options, mode="r+", formats=(PREDICTIONS_FORMAT,))
    except Exception:
        fs, path = url_to_fs(out, storage_options)
        if fs.exists(join_url(path, "zarr.json")):
            raise PredictError(
                f"--out {out}: a Zarr store that is neither this cube nor a "
                "sarcube predictions store; choose another path"
            ) from None
        # "a", not "w-": the folder may already hold this run's lock object
        root = zarr.open_group(
            zarr_store(out, storage_options), mode="a", zarr_format=3, use_consolidated=False
        )
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
        root.attrs.update(root_attrs(PREDICTIONS_FORMAT, grid, "sarcube predicted maps"))
        root.create_group("sarcube").attrs.update(
            {
                "slices": {},
                "source_cube": cube if is_remote(cube) else os.path.abspath(cube),
            }
        )
    if cube_grid(root) != grid:
        raise PredictError(f"--out {out}: a predictions store of another grid than {cube}")
    return root


def _sync_time_axis(root, src, t_len: int, dates: Sequence[tuple[str, int]]) -> None:
    """A separate store's time axis: the cube's raw axis (same indices), its predicted dates
    listed as complete slices."""
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
    meta = metadata(root)
    slices = dict(meta.attrs.get("slices", {}))
    for d, t in dates:
        slices[d] = {"time_index": t, "status": "complete"}
    meta.attrs["slices"] = slices


def _layer_specs(
    task: str, layer: str, prob_layer: str | None, t_len: int, grid: CubeGrid
) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[str, ...]]]:
    """(name, shape, chunks, dimension names) of the class layer and the probability layer."""
    h, w, ch = grid.height, grid.width, grid.chunk
    specs: list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[str, ...]]] = [
        (layer, (t_len, h, w), (1, ch, ch), ("time", "y", "x"))
    ]
    if prob_layer:
        spec = segmentation_task(task)
        if spec.binary:  # P(water)
            specs.append((prob_layer, (t_len, h, w), (1, ch, ch), ("time", "y", "x")))
        else:  # one probability per class
            shape = (t_len, spec.num_classes, h, w)
            specs.append((prob_layer, shape, (1, 1, ch, ch), ("time", "class", "y", "x")))
    return specs


def prepare_output(
    cube: str,
    out: str,
    storage_options: Mapping[str, Any],
    grid: CubeGrid,
    pr: Predictor,
    dates: Sequence[tuple[str, int]],
    overlap: int,
    stride: int,
    probabilities: bool,
) -> tuple[str, str | None]:
    """Create (or check) the output layer(s); returns (layer, prob layer)."""
    src = open_group(cube, storage_options)
    t_len = src["hh_db"].shape[0]
    if same_store(cube, out):
        root = open_group(out, storage_options, mode="r+")
    else:
        root = _open_predictions_store(cube, out, storage_options, src, grid)
        _sync_time_axis(root, src, t_len, dates)
    layer, prob_layer = LAYERS[pr.task], PROB_LAYERS[pr.task] if probabilities else None
    attrs = layer_attrs(pr, overlap, stride)
    for name, shape, chunks, dims in _layer_specs(pr.task, layer, prob_layer, t_len, grid):
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


# ---------------------------------------------------------------------------------------------
# Resume markers


def slice_id(entry: Mapping[str, Any]) -> str:
    """Identity of a cube slice: its time slot and the scenes (ids, sha256) mosaicked in it. A
    date rebuilt copy-on-write (sarcube.registry) gets another, so its old markers are stale."""
    key = json.dumps({"t": int(entry["time_index"]), "inputs": entry.get("inputs")}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def marker_url(out: str, layer: str, t: int, block: tuple[int, int, int, int]) -> str:
    """Where the marker of ``block`` at time index ``t`` goes: beside the store, not in it."""
    return join_url(
        out.rstrip("/") + ".predict", layer, f"t{t:04d}-r{block[0]:07d}-c{block[2]:07d}.json"
    )


def read_marker(url: str, storage_options: Mapping[str, Any]) -> dict[str, Any] | None:
    """The marker at ``url``, or None if there is none (or it is unreadable: redo the block)."""
    fs, path = url_to_fs(url, storage_options)
    try:
        return json.loads(fs.cat_file(path))
    except (FileNotFoundError, ValueError):
        return None


def write_marker(url: str, storage_options: Mapping[str, Any], info: Mapping[str, Any]) -> None:
    """Write a block's marker (after its pixels: a marker means the block is done)."""
    fs, path = url_to_fs(url, storage_options)
    put_bytes(fs, path, json.dumps(info).encode())


def marker_is_current(
    marker: Mapping[str, Any] | None,
    sha256: str,
    block: tuple[int, int, int, int],
    slice_identity: str,
) -> bool:
    """Whether ``marker`` records ``block`` done by the checkpoint ``sha256`` on the slice
    ``slice_identity`` (a marker of another model or of a rebuilt date is stale)."""
    return (
        marker is not None
        and marker.get("sha256") == sha256
        and marker.get("block") == list(block)
        and marker.get("slice") == slice_identity
    )
