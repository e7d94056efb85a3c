"""Quick-look figures (PNG) for people who would rather look than read."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .classes import DEFAULT_TABLE, ClassTable

DB_RANGE = (-25.0, 5.0)  # display range for L-band HH backscatter


def lulc_colormap(table: ClassTable = DEFAULT_TABLE):
    """Matplotlib (cmap, norm) showing JAXA codes 0..max in JAXA's palette (0 transparent)."""
    from matplotlib.colors import BoundaryNorm, ListedColormap

    n = max(table.codes) + 1
    rgba = table.colormap()
    colors = [np.array(rgba.get(i, (0, 0, 0, 0))) / 255.0 for i in range(n)]
    return ListedColormap(colors), BoundaryNorm(np.arange(-0.5, n + 0.5), n)


def plot_synth_overview(
    lulc_urls: Sequence[str], scene_urls: Sequence[str], path: str | Path
) -> Path:
    """One figure: each label tile and each scene (decimated, in dB), saved as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import rasterio
    from rasterio.enums import Resampling

    from .radiometry import calibration_factor, dn_to_db

    n = len(lulc_urls) + len(scene_urls)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4.4), squeeze=False)
    cmap, norm = lulc_colormap()
    for ax, url in zip(axes[0], lulc_urls, strict=False):
        with rasterio.open(url) as ds:
            f = max(1, max(ds.width, ds.height) // 1000)
            lab = ds.read(
                1, out_shape=(ds.height // f, ds.width // f), resampling=Resampling.nearest
            )
        ax.imshow(np.ma.masked_equal(lab, 0), cmap=cmap, norm=norm, interpolation="nearest")
        ax.set_title(Path(url).name, fontsize=9)
    cf = calibration_factor("L2.1")
    for ax, url in zip(axes[0][len(lulc_urls) :], scene_urls, strict=False):
        with rasterio.open(url) as ds:
            f = max(1, max(ds.width, ds.height) // 1000)
            dn = ds.read(
                1, out_shape=(ds.height // f, ds.width // f), resampling=Resampling.nearest
            )
        im = ax.imshow(dn_to_db(dn, cf), cmap="gray", vmin=DB_RANGE[0], vmax=DB_RANGE[1])
        ax.set_title(Path(url).name.replace("IMG-HH-", ""), fontsize=8)
    for ax in axes[0]:
        ax.set_xticks([])
        ax.set_yticks([])
    if scene_urls:
        fig.colorbar(im, ax=axes[0][-1], fraction=0.04, label="HH σ⁰ [dB]")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def plot_cube_overview(cube, path: str | Path, max_px: int = 900) -> Path:
    """The cube at a glance: hh_db for each date (dB, grey) and the labels (JAXA palette)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, max(cube.sizes["y"], cube.sizes["x"]) // max_px)
    nt = cube.sizes["time"]
    fig, axes = plt.subplots(1, nt + 1, figsize=(4.2 * (nt + 1), 4.4), squeeze=False)
    extent = [float(cube.x[0]), float(cube.x[-1]), float(cube.y[-1]), float(cube.y[0])]
    for i in range(nt):
        db = cube.hh_db.isel(time=i, y=slice(None, None, step), x=slice(None, None, step)).values
        im = axes[0][i].imshow(db, cmap="gray", vmin=DB_RANGE[0], vmax=DB_RANGE[1], extent=extent)
        axes[0][i].set_title(f"hh_db {str(cube.time.values[i])[:10]}", fontsize=9)
    fig.colorbar(im, ax=axes[0][nt - 1] if nt else axes[0][0], fraction=0.04, label="HH [dB]")
    cmap, norm = lulc_colormap()
    lab = cube.lulc.isel(y=slice(None, None, step), x=slice(None, None, step)).values
    axes[0][nt].imshow(
        np.ma.masked_equal(lab, 0), cmap=cmap, norm=norm, interpolation="nearest", extent=extent
    )
    axes[0][nt].set_title("lulc (JAXA codes)", fontsize=9)
    for ax in axes[0]:
        ax.tick_params(labelsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
