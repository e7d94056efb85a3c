"""A prediction layer as pictures: PNG panels for a look, a Cloud-Optimized GeoTIFF for GIS.

With every run, a PNG panel per date, SAR | prediction | truth | errors (truth and errors when
the cube has labels), at most ~1024 px wide, with a legend of the classes, beside the output
store. ``--cog`` writes a Cloud-Optimized GeoTIFF (EPSG:4326, overviews by mode, the JAXA-like
colour table, nodata 255, a band description, and the class names as GDAL category names in the
``<cog>.aux.xml`` sidecar, which GDAL, QGIS and ArcGIS read as the legend).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sarcube.classes import IGNORE_INDEX, segmentation_task
from sarcube.cube import FORMAT, PREDICTIONS_FORMAT, cube_grid, open_group
from sarcube.export import band_style, write_cog
from sarcube.storage import is_remote, join_url, write_bytes

from ..reports import class_colors
from .store import NODATA, Placement

__all__ = ["export_cog", "write_panels"]


# ---------------------------------------------------------------------------------------------
# PNG panels


def _decimated(arr, index: tuple, region: tuple[int, int, int, int], step: int, stripe: int = 1024):
    """``arr[index + (rows, cols)]`` every ``step`` pixels over ``region``, read in stripes."""
    r0, r1, c0, c1 = region
    parts = []
    for r in range(r0, r1, stripe):
        parts.append(
            np.asarray(arr[(*index, slice(r, min(r + stripe, r1), step), slice(c0, c1, step))])
        )
    return np.concatenate(parts, axis=0)


def _panel_images(
    src, dst, layer: str, t: int, region, step: int, task: str, labels: bool, cmap, placement
):
    """(title, image, colour map) of each panel of the cube's time index ``t``."""
    from matplotlib.colors import ListedColormap

    sar = _decimated(src["hh_db"], (t,), region, step)
    pred = _decimated(dst[layer], (placement.t(t),), placement.region(region), step)
    pred = pred.astype(float)
    pred[pred == NODATA] = np.nan
    panels = [("SAR HH (dB)", sar, "gray"), ("prediction", pred, cmap)]
    if labels:
        lut = segmentation_task(task).label_lut()
        truth = lut[_decimated(src["lulc"], (), region, step)].astype(float)
        truth[truth == IGNORE_INDEX] = np.nan
        err = np.where(np.isnan(pred) | np.isnan(truth), np.nan, (pred != truth).astype(float))
        panels += [
            ("truth (HR-LULC)" if task == "lulc" else "truth", truth, cmap),
            ("errors (red)", err, ListedColormap([(0.85, 0.85, 0.85), (0.85, 0.1, 0.1)])),
        ]
    return panels


def _save_figure(panels, k: int, title: str, path: Path, names: Sequence[str] = ()) -> None:
    """The panels side by side, as a PNG at ``path``; a legend of the class ``names``."""
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.4))
    for ax, (name, a, cm) in zip(np.atleast_1d(axes), panels, strict=True):
        if name.startswith("SAR"):
            fin = a[np.isfinite(a)]
            lo, hi = np.percentile(fin, [2, 98]) if fin.size else (-25, 0)
            ax.imshow(a, cmap=cm, vmin=lo, vmax=hi, interpolation="nearest")
        elif name.startswith("errors"):
            ax.imshow(a, cmap=cm, vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(a, cmap=cm, vmin=-0.5, vmax=k - 0.5, interpolation="nearest")
        ax.set_title(name, fontsize=10)
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    cmaps = [cm for name, _, cm in panels if name == "prediction"]
    if names and cmaps:
        handles = [Patch(color=cmaps[0](i), label=n) for i, n in enumerate(names)]
        handles.append(Patch(facecolor="white", edgecolor="0.6", label="no data"))
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=9)
        fig.tight_layout(rect=(0, 0.1, 1, 1))
    else:
        fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_panels(
    cube: str,
    out: str,
    storage_options: Mapping[str, Any],
    layer: str,
    dates: Sequence[tuple[str, int]],
    region: tuple[int, int, int, int],
    task: str,
    labels: bool,
    placement: Placement | None = None,
) -> list[Path | str]:
    """SAR | prediction | truth | errors PNG per date (at most ~1024 px wide), next to the layer
    (a local path, or for a remote ``out`` a URL beside the store: nothing in the cwd).
    ``dates`` and ``region`` are the cube's; ``placement`` maps them into ``out``."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.colors import ListedColormap

    src = open_group(cube, storage_options)
    dst = open_group(out, storage_options, formats=(PREDICTIONS_FORMAT, FORMAT))
    r0, r1, c0, c1 = region
    step = max(1, math.ceil(max(r1 - r0, c1 - c0) / 1024))
    k = segmentation_task(task).num_classes
    cmap = ListedColormap(class_colors(task, k)).with_extremes(bad=(1, 1, 1), over=(1, 1, 1))
    remote = is_remote(out)
    tmpdir = Path(tempfile.mkdtemp(prefix="sarcube-panels-")) if remote else None
    base = tmpdir if tmpdir is not None else Path(out).parent
    base.mkdir(parents=True, exist_ok=True)
    paths: list = []
    for d, t in dates:
        panels = _panel_images(
            src, dst, layer, t, region, step, task, labels, cmap, placement or Placement()
        )
        path = base / f"{Path(out.rstrip('/')).stem}_{layer}_{d}.png"
        names = segmentation_task(task).class_names
        _save_figure(panels, k, f"{task} map, {d} (1 px = {step} cube px)", path, names)
        if tmpdir is not None:  # beside the store, like a local one (nothing in the cwd)
            url = join_url(out.rstrip("/").rsplit("/", 1)[0], path.name)
            write_bytes(url, path.read_bytes(), storage_options)
            path.unlink()
            paths.append(url)
        else:
            paths.append(path)
    if tmpdir is not None:
        tmpdir.rmdir()
    return paths


# ---------------------------------------------------------------------------------------------
# The COG


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
    (local, or a URL: written locally then uploaded) with ``sarcube.export.write_cog``:
    EPSG:4326, 512² tiles, deflate, nodata 255, overviews by mode, a colour table of the class
    colours, the layer's ``long_name`` as band description and the class names as category names
    (``<path>.aux.xml``, uploaded beside a remote COG). Memory: one block."""
    storage_options = dict(storage_options or {})
    root = open_group(out, storage_options, formats=(PREDICTIONS_FORMAT, FORMAT))
    grid = cube_grid(root)
    r0, r1, c0, c1 = region or (0, grid.height, 0, grid.width)
    arr = root[layer]
    attrs = dict(arr.attrs)
    keep = ("task", "checkpoint", "checkpoint_sha256", "flag_meanings")
    return write_cog(
        str(path),
        lambda a, b, c, d: arr[time_index, r0 + a : r0 + b, c0 + c : c0 + d],
        (r1 - r0, c1 - c0),
        grid.window_transform(r0, c0),
        band_style(attrs, layer),
        tags={k: str(v) for k, v in attrs.items() if k in keep},
        storage_options=storage_options,
        block=block,
    )
