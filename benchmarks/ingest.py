"""Ingest throughput and memory, against a GDAL warp baseline measured in the same run.

    python benchmarks/ingest.py [--work DIR] [--quick]

1. Synthesises full-size scenes (≥ 10,000² px at 6.25 m) over one region, 3 dates.
2. sarcube ingest with 1 and with 2 Dask worker processes: input megapixels per second
   (sum of scene width × height / wall time, including inspection and hashing).
3. Baseline at equal cores: GDAL's warp (rasterio.warp.reproject, ``average``) of each whole scene's
   linear power onto the same cube grid, then 10·log10, written to a GeoTIFF — with 1 and with 2
   warp threads. It holds each scene in memory, which sarcube does not.
4. Memory: one 20,000 × 20,000 px scene ingested with workers limited to 2 GB; peak RSS per worker.
Writes benchmarks/results/ingest.json.
"""

from __future__ import annotations

import argparse
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import rasterio
from rasterio.warp import Resampling, reproject

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

from sarcube.grid import CubeGrid
from sarcube.ingestion import ingest
from sarcube.synth import synthesize
from sarcube.synth.scenes import PIXEL_M


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def baseline(scene_urls: list[str], grid: CubeGrid, out: Path, threads: int) -> float:
    """Whole-scene GDAL warp of linear power + dB + GeoTIFF write; returns seconds."""
    t0 = time.perf_counter()
    for i, url in enumerate(scene_urls):
        with rasterio.open(url) as ds:
            dn = ds.read(1)
            power = np.square(dn.astype(np.float32)) * np.float32(10 ** (-8.3))
            power[dn == 0] = np.nan
            dst = np.full(grid.shape, np.nan, dtype=np.float32)
            reproject(
                power,
                dst,
                src_transform=ds.transform,
                src_crs=ds.crs,
                dst_transform=grid.transform,
                dst_crs="EPSG:4326",
                resampling=Resampling.average,
                src_nodata=np.nan,
                dst_nodata=np.nan,
                num_threads=threads,
                NODATA_VALUES_PCT_THRESHOLD=50,
            )
        with np.errstate(divide="ignore", invalid="ignore"):
            db = (10 * np.log10(dst)).astype(np.float32)
        prof = dict(
            driver="GTiff",
            width=grid.width,
            height=grid.height,
            count=1,
            dtype="float32",
            crs="EPSG:4326",
            transform=grid.transform,
            nodata=np.nan,
            tiled=True,
            blockxsize=256,
            blockysize=256,
            compress="zstd",
        )
        with rasterio.open(out / f"baseline-{threads}-{i}.tif", "w", **prof) as ds:
            ds.write(db, 1)
    return time.perf_counter() - t0


def _start_rss_sampler(interval: float = 0.05) -> None:
    """In a worker: a daemon thread that records the process's peak RSS (psutil, every 50 ms).

    ru_maxrss cannot be used: Linux keeps it across fork and exec, so a spawned worker reports
    its parent's peak.
    """
    import os
    import threading

    import psutil

    proc = psutil.Process(os.getpid())
    state = {"peak": 0}

    def loop() -> None:
        while True:
            state["peak"] = max(state["peak"], proc.memory_info().rss)
            threading.Event().wait(interval)

    threading.Thread(target=loop, daemon=True).start()
    import builtins

    builtins._sarcube_rss_state = state  # read back by _read_rss_peak


def _read_rss_peak() -> float:
    import builtins

    return builtins._sarcube_rss_state["peak"] / 2**20


def run_sarcube(scenes: list[str], cube: Path, bbox, workers: int, memory_limit: str | None = None):
    from distributed import Client, LocalCluster

    shutil.rmtree(cube, ignore_errors=True)
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=memory_limit or "auto",
            dashboard_address="127.0.0.1:0",
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(_start_rss_sampler)
        t0 = time.perf_counter()
        report = ingest(scenes, str(cube), bbox=bbox, client=client, progress=False)
        seconds = time.perf_counter() - t0
        rss = sorted(client.run(_read_rss_peak).values())
    assert report.ok, report.problems
    return seconds, rss


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sarcube-bench-ingest")
    ap.add_argument(
        "--quick", action="store_true", help="smaller scenes (a smoke run, not the target)"
    )
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    side = 0.25 if args.quick else 0.62  # degrees: 0.62° -> scenes of ~10,000 × 12,000 px
    bbox = (140.0, 35.8, 140.0 + side, 35.8 + side)
    synth_dir = work / f"synth-{side}"
    if not (synth_dir / "synth.json").exists():
        print(f"synthesising 3 scenes over {bbox} ...", flush=True)
        synthesize(str(synth_dir), bbox=bbox, seed=1, progress=True)
    scenes = sorted(str(p) for p in (synth_dir / "scenes").glob("*.tif"))
    mpx = 0.0
    for s in scenes:
        with rasterio.open(s) as ds:
            mpx += ds.width * ds.height / 1e6
            size = (ds.width, ds.height)
    grid = CubeGrid.from_bounds(bbox)
    print(
        f"{len(scenes)} scenes, {mpx:.0f} Mpx in total "
        f"(last {size[0]} × {size[1]} px at {PIXEL_M} m); "
        f"cube grid {grid.width} × {grid.height}",
        flush=True,
    )

    rows = []
    base = {}
    for cores in (1, 2):
        b = baseline(scenes, grid, work, threads=cores)
        base[cores] = b
        rows.append(
            {
                "method": f"GDAL warp, {cores} thread(s)",
                "cores": cores,
                "seconds": round(b, 1),
                "Mpx/s": round(mpx / b, 1),
                "ratio_vs_baseline": 1.0,
            }
        )
        print(rows[-1], flush=True)
    ours = {}
    for workers in (1, 2):
        s, rss = run_sarcube(scenes, work / f"cube-{workers}.zarr", bbox, workers)
        ours[workers] = s
        rows.append(
            {
                "method": f"sarcube ingest, {workers} worker(s)",
                "cores": workers,
                "seconds": round(s, 1),
                "Mpx/s": round(mpx / s, 1),
                "ratio_vs_baseline": round(base[workers] / s, 2),
                "peak_worker_rss_mb": round(max(rss)),
            }
        )
        print(rows[-1], flush=True)
    scaling = ours[1] / ours[2]

    # Memory: a 20,000² scene with 2 GB workers.
    big = work / "big"
    big_scene = big / "scenes"
    if not big_scene.exists() or not list(big_scene.glob("*.tif")):
        # ~20,000 px of 6.25 m = 125 km; a 1.12° bbox at 36°N gives a ~20,000² px footprint box
        synthesize(
            str(big), bbox=(139.5, 35.5, 140.62, 36.45), dates=["2022-10-10"], seed=2, progress=True
        )
    (scene,) = sorted(str(p) for p in big_scene.glob("*.tif"))
    with rasterio.open(scene) as ds:
        big_size = (ds.width, ds.height)
    s_big, rss_big = run_sarcube(
        [scene], big / "cube.zarr", (139.5, 35.5, 140.62, 36.45), 2, memory_limit="2GB"
    )
    memory = {
        "scene_px": big_size,
        "workers": 2,
        "memory_limit": "2GB",
        "seconds": round(s_big, 1),
        "peak_worker_rss_mb": [round(r) for r in rss_big],
        "target_met": max(rss_big) <= 2048,
    }

    print()
    print_table(
        rows, ["method", "cores", "seconds", "Mpx/s", "ratio_vs_baseline", "peak_worker_rss_mb"]
    )
    print(f"\nscaling 1 -> 2 workers: {scaling:.2f}x (target ≥ 1.7x)")
    print(
        f"ratio vs GDAL warp at equal cores: 1 core {base[1] / ours[1]:.2f}, "
        f"2 cores {base[2] / ours[2]:.2f} "
        f"(target ≥ 1.0)"
    )
    print(
        f"{big_size[0]} × {big_size[1]} px scene with 2 GB workers: peak worker RSS "
        f"{[round(r) for r in rss_big]} MB (target ≤ 2048 MB); {s_big:.1f} s"
    )
    write_results(
        "ingest" + ("-quick" if args.quick else ""),
        {
            "input_megapixels": round(mpx, 1),
            "scene_size_px": size,
            "rows": rows,
            "scaling_1_to_2_workers": round(scaling, 2),
            "ratio_vs_baseline": {
                "1": round(base[1] / ours[1], 2),
                "2": round(base[2] / ours[2], 2),
            },
            "memory_20000px_scene": memory,
            "driver_peak_rss_mb": round(peak_rss_mb()),
            "targets": {
                "ratio_vs_baseline": ">= 1.0",
                "scaling": ">= 1.7",
                "peak_worker_rss_mb": "<= 2048",
            },
        },
    )


if __name__ == "__main__":
    main()
