"""Shard-writing throughput: patches/s and MB/s to local disk and to an S3 server, 1 and 2 workers.

    python benchmarks/shards.py [--work DIR] [--quick]

1. Synthesises a region (default: sarcube's 10 × 10-patch demo area, 3 dates) and ingests it into
   a cube under ``--work`` (both kept between runs).
2. Builds a patch index of every patch with valid SAR (Oct/Nov -> pretrain, Sep -> train/val/test
   by 2 × 2-patch blocks, 1 × 1 on a tiny area) — not the category-aware sampler, whose benchmark
   is ``sampling_benchmark``.
3. ``write_shards`` with 1 and with 2 Dask worker processes (cluster started beforehand, not
   timed) to a fresh local directory and to a fresh prefix on a moto S3 server started here on
   127.0.0.1 (an in-process Python server: it shares the CPU with the workers, so the S3 numbers
   are a lower bound for a real endpoint). Then a re-run over the complete local output, in which
   every shard is verified and kept (the resume path).
Throughput: samples and shard bytes written / wall time of the call. Writes
benchmarks/results/shards.json (shards-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

from sarcube.cube import cube_attrs, open_cube, open_group
from sarcube.index import CODES, COLUMNS, HIST_COLUMNS, cube_fingerprint, patch_id, write_index
from sarcube.ingestion import ingest
from sarcube.shards import write_shards
from sarcube.synth import DEFAULT_BBOX, synthesize

QUICK_BBOX = (140.30, 36.02, 140.30 + 1024 / 12000, 36.02 + 896 / 12000)
BLOCK_SPLIT = {(0, 0): "train", (0, 1): "val", (1, 0): "test", (1, 1): "train"}


def sampling_benchmark() -> dict | None:
    """Category-aware sampling throughput (to be filled in with the sampling module)."""
    return None


def build_index(cube_url: str, index_url: str) -> pd.DataFrame:
    """Every patch with some valid SAR, as a patch index (one chunk at a time)."""
    cube = open_cube(cube_url)
    grid = cube.sarcube.grid
    nr, nc = cube.sarcube.patch_shape
    lulc = cube.lulc.values
    block = 2 if min(nr, nc) >= 4 else 1
    rows = []
    for ti, t in enumerate(pd.DatetimeIndex(cube.time.values)):
        hh = cube.hh_db.isel(time=ti).values
        for r in range(nr):
            for c in range(nc):
                ys, xs = slice(r * 256, (r + 1) * 256), slice(c * 256, (c + 1) * 256)
                sar, lab = hh[ys, xs], lulc[ys, xs]
                if np.isnan(sar).all():
                    continue
                w, s, e, n = grid.window_bounds(r * 256, (r + 1) * 256, c * 256, (c + 1) * 256)
                counts = np.bincount(lab.ravel(), minlength=256)
                split = (
                    "pretrain"
                    if t.month in (10, 11)
                    else BLOCK_SPLIT[(r // block % 2, c // block % 2)]
                )
                rows.append(
                    {
                        "patch_id": patch_id(t, r, c),
                        "time": t,
                        "row": np.int32(r),
                        "col": np.int32(c),
                        "lon_min": w,
                        "lat_min": s,
                        "lon_max": e,
                        "lat_max": n,
                        "split": split,
                        **{
                            h: np.int32(counts[k]) for h, k in zip(HIST_COLUMNS, CODES, strict=True)
                        },
                        "nodata_frac": np.float32((np.isnan(sar) | (lab == 0)).mean()),
                        "anchors": np.int32(1),
                        "shard": "",
                    }
                )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    meta = {
        "cube_url": cube_url,
        "cube_fingerprint": cube_fingerprint(cube_attrs(open_group(cube_url))),
        "seed": 0,
        "params": {"rule": "benchmark: every patch with valid SAR"},
    }
    write_index(df, index_url, meta)
    return df


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    cube: str,
    index: str,
    out: str,
    workers: int,
    shard_mb: float,
    storage_options=None,
    update=False,
):
    from distributed import Client, LocalCluster

    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address="127.0.0.1:0",
            silence_logs=40,
        ) as cluster,
        Client(cluster) as client,
    ):
        client.run(lambda: __import__("sarcube.shards"))  # imports done before the clock starts
        t0 = time.perf_counter()
        manifest = write_shards(
            cube,
            index,
            out,
            shard_size_mb=shard_mb,
            min_shards_per_split=8,
            storage_options=storage_options,
            client=client,
            progress=False,
            update_index=update,
        )
        seconds = time.perf_counter() - t0
    splits = manifest["splits"].values()
    return {
        "samples": sum(s["samples"] for s in splits),
        "mb": sum(s["bytes"] for s in splits) / 2**20,
        "shards": sum(len(s["shards"]) for s in splits),
        "seconds": seconds,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sarcube-bench-shards")
    ap.add_argument("--quick", action="store_true", help="a small area (a smoke run)")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    bbox = QUICK_BBOX if args.quick else DEFAULT_BBOX
    tag = "quick" if args.quick else "default"
    synth_dir, cube = work / f"synth-{tag}", str(work / f"cube-{tag}.zarr")
    if not (synth_dir / "synth.json").exists():
        print(f"synthesising {bbox} ...", flush=True)
        synthesize(str(synth_dir), bbox=bbox, seed=1, progress=True)
    if not Path(cube, "zarr.json").exists():
        print("ingesting ...", flush=True)
        report = ingest(
            [str(synth_dir / "scenes")], cube, lulc=[str(synth_dir / "lulc")], progress=True
        )
        assert report.ok, report.problems
    index = str(work / f"index-{tag}.parquet")
    df = build_index(cube, index)
    shard_mb = 2.0 if args.quick else 8.0
    print(
        f"{len(df)} patches ({df['split'].value_counts().to_dict()}); shard size {shard_mb} MiB",
        flush=True,
    )

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    storage_options = {
        "key": "bench",
        "secret": "bench",
        "client_kwargs": {"endpoint_url": f"http://{host}:{port}"},
    }
    import s3fs

    s3fs.S3FileSystem(**storage_options, skip_instance_cache=True).mkdir("bench")
    rows = []
    try:
        for target in ("local", "s3"):
            for workers in (1, 2):
                if target == "local":
                    out = work / f"shards-{workers}"
                    shutil.rmtree(out, ignore_errors=True)
                    res = run(cube, index, str(out), workers, shard_mb)
                else:
                    res = run(
                        cube,
                        index,
                        f"s3://bench/shards-{workers}",
                        workers,
                        shard_mb,
                        storage_options,
                    )
                rows.append({"target": target, "workers": workers, **res})
                print(rows[-1], flush=True)
        for workers in (1, 2):  # everything present: verify-and-keep path
            res = run(cube, index, str(work / f"shards-{workers}"), workers, shard_mb)
            rows.append({"target": "local, all kept (resume check)", "workers": workers, **res})
            print(rows[-1], flush=True)
    finally:
        server.stop()
    for r in rows:
        r["patches/s"] = round(r["samples"] / r["seconds"], 1)
        r["MB/s"] = round(r["mb"] / r["seconds"], 1)
        r["seconds"] = round(r["seconds"], 2)
        r["mb"] = round(r["mb"], 1)
    print()
    print_table(
        rows, ["target", "workers", "samples", "shards", "mb", "seconds", "patches/s", "MB/s"]
    )
    scaling = {
        t: round(rows[i + 1]["patches/s"] / rows[i]["patches/s"], 2)
        for i, t in ((0, "local"), (2, "s3"), (4, "kept"))
    }
    print(f"\nscaling 1 -> 2 workers: {scaling}")
    write_results(
        "shards" + ("-quick" if args.quick else ""),
        {
            "bbox": list(bbox),
            "patches": len(df),
            "shard_size_mb": shard_mb,
            "rows": rows,
            "scaling_1_to_2_workers": scaling,
            "sampling": sampling_benchmark(),
            "notes": "S3 = moto ThreadedMotoServer in the benchmark process (shares the 2 cores)",
        },
    )


if __name__ == "__main__":
    main()
