"""Category-aware sampling at national scale: time and peak memory, with an in-memory baseline.

    python benchmarks/sampling.py [--factor 4] [--anchors 1000000] [--quick]

The real national HR-LULC 250 m map (../shared/realdata; a procedural label map of the same size
when it is absent) is upsampled lazily ×factor per axis with Dask (×4: 61,440 × 49,920 =
3.07·10⁹ cells, Japan's size at ~20 m), then sampled exactly as ``sarcube sample`` does: per-patch
histograms over 256² patches in Dask blocks, inverse-frequency anchors, kept patches.

Baseline in the same run: the same per-patch histograms with plain numpy on the raster held in
memory, at the map's own size (it would need factor² × as much memory at national size).
``--quick`` (a smoke run, not the target): the central 2048 × 2048 cells of the map, upsampled ×2.
Writes benchmarks/results/sampling.json (sampling-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

from sarcube.sampling import _block_hist, balance_patches, patch_histograms

REAL = (
    Path(__file__).resolve().parents[2]
    / "shared/realdata/hrlulc_japan_v23.12_250m/JAXA_HRLULC_Japan_v23.12_250m.tif"
)


class PeakRSS:
    """Peak RSS of this process (sampled every 20 ms) while the block runs."""

    def __enter__(self):
        self.proc = psutil.Process(os.getpid())
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.proc.memory_info().rss)

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def growth_mb(self) -> float:
        return (self.peak - self.base) / 2**20


def load_map() -> tuple[np.ndarray, str]:
    if REAL.exists():
        import rasterio

        with rasterio.open(REAL) as ds:
            return ds.read(1), REAL.name
    from sarcube.synth.labels import procedural_template

    t = procedural_template((122.0, 20.0, 154.0, 46.0), (122.0, 20.0, 154.0, 46.0), seed=0)
    return t.codes[:12480, :15360], "procedural (real map not found)"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--anchors", type=int, default=1_000_000)
    ap.add_argument(
        "--quick", action="store_true", help="the central 2048² ×2; results to sampling-quick.json"
    )
    args = ap.parse_args()
    import dask
    import dask.array as da

    codes, source = load_map()
    if args.quick:
        r, c = codes.shape[0] // 2 - 1024, codes.shape[1] // 2 - 1024
        codes, args.factor, args.anchors = codes[r : r + 2048, c : c + 2048].copy(), 2, 10_000
    f = args.factor
    rows = []

    # Baseline: numpy, raster in memory, the map's own size.
    with PeakRSS() as m0:
        t0 = time.perf_counter()
        nr, nc = codes.shape[0] // 256, codes.shape[1] // 256
        hist0 = _block_hist(codes[: nr * 256, : nc * 256].copy(), 256)
        bal0 = balance_patches(hist0, args.anchors, seed=0)
        t_base = time.perf_counter() - t0
    rows.append(
        {
            "method": "numpy in memory",
            "cells": f"{codes.size:.3g}",
            "seconds": round(t_base, 2),
            "Mcells/s": round(codes.size / 1e6 / t_base),
            "peak_rss_growth_mb": round(m0.growth_mb),
            "patches_kept": int(bal0["kept"].sum()),
        }
    )

    # The same on the same map through Dask blocks (a ratio at equal size).
    lazy = da.from_array(codes, chunks=2048)
    with dask.config.set(scheduler="threads", num_workers=2), PeakRSS() as m1:
        t0 = time.perf_counter()
        hist1 = patch_histograms(lazy, 256)
        balance_patches(hist1, args.anchors, seed=0)
        t_same = time.perf_counter() - t0
    assert (hist1 == hist0).all()
    rows.append(
        {
            "method": "sarcube (Dask blocks), same map",
            "cells": f"{codes.size:.3g}",
            "seconds": round(t_same, 2),
            "Mcells/s": round(codes.size / 1e6 / t_same),
            "peak_rss_growth_mb": round(m1.growth_mb),
            "patches_kept": "same",
        }
    )

    # National size: upsampled lazily, never materialised.
    big = da.repeat(da.repeat(lazy, f, axis=0), f, axis=1)
    big = big.rechunk(2048)
    del codes
    with dask.config.set(scheduler="threads", num_workers=2), PeakRSS() as m2:
        t0 = time.perf_counter()
        hist2 = patch_histograms(big, 256)
        bal2 = balance_patches(hist2, args.anchors, seed=0)
        t_big = time.perf_counter() - t0
    cells = big.shape[0] * big.shape[1]
    rows.append(
        {
            "method": f"sarcube (Dask blocks), ×{f} upsampled",
            "cells": f"{cells:.3g}",
            "seconds": round(t_big, 1),
            "Mcells/s": round(cells / 1e6 / t_big),
            "peak_rss_growth_mb": round(m2.growth_mb),
            "patches_kept": int(bal2["kept"].sum()),
        }
    )
    print(f"label map: {source}")
    print_table(
        rows, ["method", "cells", "seconds", "Mcells/s", "peak_rss_growth_mb", "patches_kept"]
    )
    print(
        f"\nholding the national-size raster would need {cells / 2**30:.1f} GiB; "
        "sampling grew RSS by "
        f"{m2.growth_mb:.0f} MB; Dask/numpy time ratio at equal size: {t_same / t_base:.2f}"
    )
    write_results(
        "sampling" + ("-quick" if args.quick else ""),
        {
            "label_map": source,
            "factor": f,
            "anchors": args.anchors,
            "rows": rows,
            "national_cells": cells,
            "raster_in_memory_gib": round(cells / 2**30, 2),
        },
    )


if __name__ == "__main__":
    main()
