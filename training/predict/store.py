"""The prediction layers' Zarr schema and the per-block resume markers.

**Outputs.** ``pred_lulc`` (uint8, 9 classes in Table II order, 255 no data) or ``pred_water``
(uint8 0/1, 255), shaped ``(time, y, x)`` and chunked 256², either in the cube itself (``out`` =
the cube: the cube's shape and time slots) or in a separate predictions store sized to what was
asked: its grid is the requested region (chunk-snapped, a window of the cube's grid: its
``y``/``x`` equal the cube's there) and its time axis holds the predicted dates only
(``open_cube`` opens both). A later run into the same store may add dates (appended) and predict
any region inside the store's grid; a region outside it is refused (the grid of a store is fixed
at creation). ``prob_lulc`` ``(time, class, y, x)`` / ``prob_water`` ``(time, y, x)`` as uint8
``round(254·p)`` with ``--probabilities``; the checkpoint and settings in the layer's attributes.
A :class:`Placement` maps cube pixels and time slots to the store's.

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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

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
    "Placement",
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


@dataclass(frozen=True)
class Placement:
    """Where cube pixels and time slots land in the output store.

    Attributes:
        row, col: the cube pixel (row, col) of the store's pixel (0, 0).
        times: cube time index -> the store's time index (identity when absent: the cube).
    """

    row: int = 0
    col: int = 0
    times: Mapping[int, int] = field(default_factory=dict)

    def t(self, cube_t: int) -> int:
        return int(self.times.get(cube_t, cube_t))

    def region(self, region: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
        """A region in cube pixels (r0, r1, c0, c1) as the store's pixels."""
        r0, r1, c0, c1 = region
        return r0 - self.row, r1 - self.row, c0 - self.col, c1 - self.col


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


def _region_grid(grid: CubeGrid, region: tuple[int, int, int, int]) -> CubeGrid:
    """The window ``region`` (cube pixels, chunk-snapped) of the cube's grid, as a grid."""
    r0, r1, c0, c1 = region
    return CubeGrid(
        grid.cells_per_degree,
        grid.row0 + r0,
        grid.col0 + c0,
        r1 - r0,
        c1 - c0,
        grid.chunk,
        grid.shard_chunks,
    )


def _create_predictions_store(cube: str, out: str, storage_options, src, grid: CubeGrid):
    """A new predictions store on ``grid`` (a window of the cube's), with ``y``/``x``, the
    cube's ``spatial_ref`` and an empty time axis."""
    import zarr

    # "a", not "w-": the folder may already hold this run's lock object
    root = zarr.open_group(
        zarr_store(out, storage_options), mode="a", zarr_format=3, use_consolidated=False
    )
    for name, values in (("y", grid.y_coords()), ("x", grid.x_coords())):
        a = root.create_array(
            name, shape=values.shape, chunks=values.shape, dtype="float64", dimension_names=(name,)
        )
        a[:] = values
        a.attrs.update(dict(src[name].attrs))
    sr = src["spatial_ref"]
    dst = root.create_array("spatial_ref", shape=(), dtype=sr.dtype, fill_value=sr.fill_value)
    dst[()] = sr[()]
    dst.attrs.update(dict(sr.attrs))
    tarr = root.create_array(
        "time", shape=(0,), chunks=(1024,), dtype="int64", fill_value=0, dimension_names=("time",)
    )
    tarr.attrs.update(dict(src["time"].attrs))
    root.attrs.update(root_attrs(PREDICTIONS_FORMAT, grid, "sarcube predicted maps"))
    root.create_group("sarcube").attrs.update(
        {"slices": {}, "source_cube": cube if is_remote(cube) else os.path.abspath(cube)}
    )
    return root


def _open_predictions_store(
    cube: str,
    out: str,
    storage_options: Mapping[str, Any],
    src,
    grid: CubeGrid,
    region: tuple[int, int, int, int],
):
    """The separate predictions store ``out``: opened, or created on ``region`` of the cube's
    grid; ``PredictError`` if it is another kind of store, of another grid, or does not hold
    ``region``. Returns (root, placement's row, col)."""
    try:
        root = open_group(out, storage_options, mode="r+", formats=(PREDICTIONS_FORMAT,))
    except Exception:
        fs, path = url_to_fs(out, storage_options)
        if fs.exists(join_url(path, "zarr.json")):
            raise PredictError(
                f"--out {out}: a Zarr store that is neither this cube nor a "
                "sarcube predictions store; choose another path"
            ) from None
        root = _create_predictions_store(
            cube, out, storage_options, src, _region_grid(grid, region)
        )
    have = cube_grid(root)
    row, col = have.row0 - grid.row0, have.col0 - grid.col0
    r0, r1, c0, c1 = region
    same_lattice = (have.cells_per_degree, have.chunk) == (grid.cells_per_degree, grid.chunk)
    if not same_lattice or row % grid.chunk or col % grid.chunk:
        raise PredictError(f"--out {out}: a predictions store of another grid than {cube}")
    if not (row <= r0 and r1 <= row + have.height and col <= c0 and c1 <= col + have.width):
        w, s, e, n = have.bounds
        raise PredictError(
            f"--out {out}: the store covers W {w:.4f} S {s:.4f} E {e:.4f} N {n:.4f} and cannot "
            "grow; predict this --bbox into another store (--out), or delete this one"
        )
    return root, row, col


def _sync_time_axis(root, src, dates: Sequence[tuple[str, int]]) -> dict[int, int]:
    """A separate store's time axis: the dates it already holds keep their slots, new ones are
    appended; returns cube time index -> store time index for ``dates``."""
    meta = metadata(root)
    slices = dict(meta.attrs.get("slices", {}))
    tarr = root["time"]
    times = {}
    for d, t in dates:
        if d not in slices:
            slot = tarr.shape[0]
            tarr.resize((slot + 1,))
            tarr[slot] = int(np.asarray(src["time"][t]))
            slices[d] = {"time_index": slot, "status": "complete"}
        slices[d]["cube_time_index"] = t
        times[t] = int(slices[d]["time_index"])
    meta.attrs["slices"] = slices
    return times


def _layer_specs(
    task: str, layer: str, prob_layer: str | None, t_len: int, grid: CubeGrid
) -> list[tuple[str, tuple[int, ...], tuple[int, ...], tuple[str, ...]]]:
    """(name, shape, chunks, dimension names) of the class layer and the probability layer on
    the output store's grid."""
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
    region: tuple[int, int, int, int] | None = None,
) -> tuple[str, str | None, Placement]:
    """Create (or check) the output layer(s) for ``dates`` × ``region`` (cube pixels, chunk
    snapped; default the whole cube); returns (layer, prob layer, placement)."""
    src = open_group(cube, storage_options)
    region = region or (0, grid.height, 0, grid.width)
    if same_store(cube, out):
        root = open_group(out, storage_options, mode="r+")
        t_len, placement, out_grid = src["hh_db"].shape[0], Placement(), grid
    else:
        root, row, col = _open_predictions_store(cube, out, storage_options, src, grid, region)
        times = _sync_time_axis(root, src, dates)
        t_len, placement, out_grid = (
            root["time"].shape[0],
            Placement(row, col, times),
            cube_grid(root),
        )
    layer, prob_layer = LAYERS[pr.task], PROB_LAYERS[pr.task] if probabilities else None
    attrs = layer_attrs(pr, overlap, stride)
    for name, shape, chunks, dims in _layer_specs(pr.task, layer, prob_layer, t_len, out_grid):
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
    return layer, prob_layer, placement


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
