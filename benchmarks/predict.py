"""Large-area inference (``training.predict.predict``): megapixels/s, windows/s and peak memory.

    python benchmarks/predict.py [--work DIR] [--quick] [--paper-device auto|cuda|cpu|skip]

Data, made here and kept under ``--work`` (default /tmp/sarcube-bench-predict) between runs: a
one-date cube of random dB (smooth 64-px fields + noise, no no-data, so every window is
computed), 2048² px (``--quick``: 1024²), and best.pt-format checkpoints of the *untrained*
``finetune_tiny`` segmenter (Swin-T-like tiny UPerNet, 9 LULC classes) and, for the GPU rows,
of ``finetune_paper`` (Swin-B UPerNet). Speed does not depend on the weights.

Rows (each run writes a fresh predictions store; blocks of 1024² px, ``--quick``: 512²):

- ``tiny cpu`` in this machine's processes, 1 torch thread, over the whole cube with the default
  50 % overlap (128 px, stride 128) — and the **baseline** measured in the same run: the same
  with overlap 0 (plain 256² tiling, stride 256: one window per pixel, seams between windows);
- the same with 2 torch threads (one process using both cores);
- on a Dask ``LocalCluster`` of 1 and 2 single-threaded worker processes (overlap 128);
- ``memory``: the 1-thread overlap-128 run over a region 4× smaller (one block) than the whole
  cube, to show that the peak memory does not grow with the region;
- ``paper cuda`` (batch 16 and 32, overlap 128, in one process on the GPU, over a cube 4× the
  area: 4096² px, ``--quick`` 2048²) when ``torch.cuda.is_available()``; otherwise the rows are
  skipped and the JSON says why. ``--paper-device cpu`` runs them on the CPU over one 256²
  chunk (9 windows, ~1 min each on 2 cores: a check of the code path, not a figure to quote).

Measured:

- seconds = ``PredictResult.seconds`` (``predict``'s own timer around the block loop / the Dask
  tasks: reading the cube, the model, blending, writing the layer and the resume markers; not
  opening the cube, loading the checkpoint or starting the cluster). The model is loaded and run
  once on a dummy window before timing (in each Dask worker via ``client.run``), so the first
  block does not pay for it;
- Mpx/s = region pixels / seconds; windows = Σ over blocks of the lattice windows touching the
  block (``training.predict.window_starts``; a block also computes the windows of its halo, so at
  50 % overlap a 1024² block runs 9² = 81 windows, not (1024/128)² = 64); windows/s likewise;
- CPU s = CPU seconds (user + system) of the predicting process(es) over the run; Mpx/CPU-s is
  the figure to compare on a machine shared with other work;
- peak RSS = the highest resident set of a predicting process (psutil, sampled every 10 ms from a
  thread; the in-process rows run in a fresh subprocess of their own, as in
  ``tests/test_predict.py``); growth = peak − its RSS just before ``predict`` (model loaded and
  warmed). For Dask the worker processes are sampled from this process (their pids from
  ``client.run(os.getpid)``) and the largest worker is reported;
- on CUDA also ``torch.cuda.max_memory_allocated``;
- ratio = Mpx/s ÷ the baseline's Mpx/s (overlap 0, in-process, 1 thread); its inverse for the
  50 % overlap row is what seamless blending costs vs plain tiling. ``windows ratio`` (JSON) =
  windows per pixel ÷ the baseline's.

Writes benchmarks/results/predict.json (predict-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

from training.predict import WINDOW, window_starts

ROOT = Path(__file__).resolve().parents[1]
MEAN, STD = -12.0, 5.0
CPD = 6000  # cells per degree of the synthetic cube's grid

# ---------------------------------------------------------------------------------------------
# Data


def random_cube(url: Path, size: int, seed: int = 0) -> None:
    """A one-date cube of ``size``² random dB (as ``tests/test_predict.py``), without no data."""
    from sarcube.cube import create_cube, publish_view
    from sarcube.grid import CubeGrid

    grid = CubeGrid.from_bounds((140.0, 35.0, 140.0 + size / CPD, 35.0 + size / CPD))
    root = create_cube(str(url), grid)
    rng = np.random.default_rng(seed)
    coarse = rng.normal(MEAN, 4.0, (size // 64 + 1, size // 64 + 1)).astype(np.float32)
    db = np.kron(coarse, np.ones((64, 64), np.float32))[:size, :size]
    db += rng.normal(0, 1.0, (size, size)).astype(np.float32)
    root["hh_db"].resize((1, size, size))
    root["time"].resize((1,))
    root["time"][0] = 19247  # 2022-09-12
    root["hh_db"][0] = db
    root["sarcube"].attrs["slices"] = {"2022-09-12": {"time_index": 0, "status": "complete"}}
    publish_view(root)


def cube(work: Path, size: int) -> Path:
    url = work / f"cube-{size}.zarr"
    done = work / f"cube-{size}.done"
    if not done.exists():
        shutil.rmtree(url, ignore_errors=True)
        print(f"making a {size}² random cube ...", flush=True)
        random_cube(url, size)
        done.write_text("ok")
    return url


def checkpoint(work: Path, profile: str) -> Path:
    """A best.pt-format checkpoint of the untrained segmenter of ``profile`` (cached)."""
    from training.config import load_config
    from training.run_folder import MODEL_FORMAT
    from training.segmenter import build_segmentation_model

    path = work / f"{profile}.pt"
    if not path.exists():
        cfg = load_config(profile, method="finetune")
        cfg.seg.pretrained = None
        torch.manual_seed(0)
        model = build_segmentation_model(cfg)
        tmp = path.with_suffix(".tmp")
        torch.save(
            {
                "format": MODEL_FORMAT,
                "model": model.state_dict(),
                "config": cfg.to_dict(),
                "extra": {"task": "lulc", "num_classes": 9, "db_stats": [MEAN, STD]},
                "epoch": 0,
                "step": 0,
                "scores": {},
            },
            tmp,
        )
        tmp.replace(path)
    return path


def corner_bbox(size: int, sub: int) -> tuple[float, float, float, float]:
    """W S E N of the top-left ``sub``² pixels of a ``size``² cube."""
    return (140.0, 35.0 + (size - sub) / CPD, 140.0 + sub / CPD, 35.0 + size / CPD)


def count_windows(region: tuple[int, int, int, int], block: int, overlap: int) -> int:
    """The windows ``predict`` runs over ``region``: those touching each block (halo included)."""
    stride = WINDOW - overlap
    r0, r1, c0, c1 = region
    n = 0
    for r in range(r0, r1, block):
        for c in range(c0, c1, block):
            n += len(window_starts(r, min(r + block, r1), stride)) * len(
                window_starts(c, min(c + block, c1), stride)
            )
    return n


def fresh(out: Path) -> str:
    """An empty output path (a store left by an earlier run would be resumed, i.e. skipped)."""
    shutil.rmtree(out, ignore_errors=True)
    shutil.rmtree(Path(f"{out}.predict"), ignore_errors=True)
    return str(out)


# ---------------------------------------------------------------------------------------------
# One in-process run, in a subprocess of its own (clean RSS)

SCRIPT = """
import json, sys, threading, time
import psutil, torch
sys.path.insert(0, {root!r})
torch.set_num_threads({threads})
from training.predict import load_predictor, predict

p = psutil.Process()
pr = load_predictor({ckpt!r}, device={device!r})
with torch.no_grad():  # load + first call outside the timing, as for the Dask workers
    pr.probabilities(torch.full((1, 1, 256, 256), {mean}))
if {device!r} == "cuda":
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
peak, stop = [0], [False]
def watch():
    while not stop[0]:
        peak[0] = max(peak[0], p.memory_info().rss)
        time.sleep(0.01)
base = p.memory_info().rss
cpu0 = sum(p.cpu_times()[:2])
th = threading.Thread(target=watch, daemon=True)
th.start()
res = predict({cube!r}, pr, {out!r}, bbox={bbox}, overlap={overlap}, block={block},
              batch_size={batch}, device={device!r}, progress=False, panel=False)
stop[0] = True
th.join()
peak[0] = max(peak[0], p.memory_info().rss)
out = {{"seconds": res.seconds, "megapixels": res.megapixels, "region": list(res.region),
        "blocks": res.blocks, "cpu_s": sum(p.cpu_times()[:2]) - cpu0,
        "peak_rss_mb": peak[0] / 2**20, "growth_mb": (peak[0] - base) / 2**20,
        "threads": torch.get_num_threads()}}
if {device!r} == "cuda":
    out["gpu_max_alloc_mb"] = torch.cuda.max_memory_allocated() / 2**20
    out["gpu"] = torch.cuda.get_device_name()
print("RESULT", json.dumps(out))
"""


def run_inprocess(
    work: Path,
    name: str,
    *,
    cube_url: Path,
    ckpt: Path,
    overlap: int,
    block: int,
    threads: int = 1,
    bbox=None,
    batch: int = 16,
    device: str = "cpu",
) -> dict:
    script = work / f"run-{name}.py"
    out = fresh(work / f"out-{name}.zarr")
    script.write_text(
        textwrap.dedent(SCRIPT).format(
            root=str(ROOT),
            threads=threads,
            ckpt=str(ckpt),
            device=device,
            mean=MEAN,
            cube=str(cube_url),
            out=out,
            bbox=bbox,
            overlap=overlap,
            block=block,
            batch=batch,
        )
    )
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    p = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env)
    if p.returncode != 0 or "RESULT" not in p.stdout:
        raise RuntimeError(f"{name}: the run failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.split("RESULT", 1)[1])


# ---------------------------------------------------------------------------------------------
# A Dask run: the workers sampled from here


def _warm_worker(ckpt: str) -> tuple[int, int]:
    """Load the checkpoint into the worker's predictor cache (the key ``predict`` uses) and run
    it once; returns (pid, torch threads)."""
    from training.predict.predictor import cached_predictor as _predictor

    pr = _predictor((ckpt, {}, "cpu"))
    with torch.no_grad():
        pr.probabilities(torch.full((1, 1, 256, 256), MEAN))
    return os.getpid(), torch.get_num_threads()


def run_dask(
    work: Path,
    name: str,
    *,
    workers: int,
    cube_url: Path,
    ckpt: Path,
    overlap: int,
    block: int,
    batch: int = 16,
) -> dict:
    import logging

    from distributed import Client, LocalCluster

    from training.predict import predict

    logging.getLogger("distributed").setLevel(logging.ERROR)
    out = fresh(work / f"out-{name}.zarr")
    with (
        LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        info = client.run(_warm_worker, str(ckpt))
        procs = [psutil.Process(pid) for pid, _ in info.values()]
        threads = sorted({t for _, t in info.values()})
        base = {q.pid: q.memory_info().rss for q in procs}
        peak = dict(base)
        cpu0 = {q.pid: sum(q.cpu_times()[:2]) for q in procs}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for q in procs:
                    peak[q.pid] = max(peak[q.pid], q.memory_info().rss)
                time.sleep(0.01)

        th = threading.Thread(target=watch, daemon=True)
        th.start()
        res = predict(
            str(cube_url),
            str(ckpt),
            out,
            overlap=overlap,
            block=block,
            batch_size=batch,
            client=client,
            progress=False,
            panel=False,
        )
        stop.set()
        th.join()
        cpu = sum(sum(q.cpu_times()[:2]) - cpu0[q.pid] for q in procs)
        same = sorted(v for v in client.run(os.getpid).values()) == sorted(q.pid for q in procs)
    if not same:
        print(f"  {name}: a worker was restarted during the run (memory figures incomplete)")
    return {
        "seconds": res.seconds,
        "megapixels": res.megapixels,
        "region": list(res.region),
        "blocks": res.blocks,
        "cpu_s": cpu,
        "peak_rss_mb": max(peak.values()) / 2**20,
        "growth_mb": max(peak[p] - base[p] for p in peak) / 2**20,
        "threads": threads[0] if len(threads) == 1 else threads,
    }


# ---------------------------------------------------------------------------------------------


def row(
    label: str, r: dict, *, workers: str, overlap: int, block: int, batch: int, device: str = "cpu"
) -> dict:
    win = count_windows(tuple(r["region"]), block, overlap)
    rr = r["region"]
    out = {
        "config": label,
        "device": r.get("gpu", device),
        "workers": workers,
        "threads": r["threads"],
        "overlap": overlap,
        "block": block,
        "batch": batch,
        "region": f"{rr[1] - rr[0]}x{rr[3] - rr[2]}",
        "Mpx": round(r["megapixels"], 2),
        "windows": win,
        "seconds": round(r["seconds"], 2),
        "Mpx/s": round(r["megapixels"] / r["seconds"], 4),
        "windows/s": round(win / r["seconds"], 2),
        "CPU s": round(r["cpu_s"], 1),
        "Mpx/CPU-s": round(r["megapixels"] / r["cpu_s"], 4) if r["cpu_s"] > 0 else None,
        "peak RSS MB": round(r["peak_rss_mb"]),
        "growth MB": round(r["growth_mb"]),
    }
    if "gpu_max_alloc_mb" in r:
        out["GPU MB"] = round(r["gpu_max_alloc_mb"])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/sarcube-bench-predict", help="data directory (kept)")
    ap.add_argument(
        "--quick", action="store_true", help="a 1024² cube; results to predict-quick.json"
    )
    ap.add_argument(
        "--paper-device",
        default="auto",
        choices=["auto", "cuda", "cpu", "skip"],
        help="where the finetune_paper rows run (auto: cuda if available, else "
        "skipped; cpu: one 256² chunk, a slow check of the code path)",
    )
    args = ap.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)

    size, block = (1024, 512) if args.quick else (2048, 1024)
    cube_url = cube(work, size)
    tiny = checkpoint(work, "finetune_tiny")
    kw = {"cube_url": cube_url, "ckpt": tiny, "block": block}
    rows: list[dict] = []
    t_start = time.perf_counter()

    def add(label, r, **k):
        rows.append(row(label, r, block=block, batch=16, **k))
        x = rows[-1]
        print(
            f"  {label}: {x['Mpx']} Mpx in {x['seconds']} s = {x['Mpx/s']} Mpx/s, "
            f"{x['windows/s']} windows/s, peak RSS {x['peak RSS MB']} MB "
            f"(+{x['growth MB']})",
            flush=True,
        )

    print(f"tiny, CPU, in-process, {size}² px, blocks {block}² ...", flush=True)
    add(
        "tiny, no overlap (baseline)",
        run_inprocess(work, "tiny-ov0", overlap=0, **kw),
        workers="0",
        overlap=0,
    )
    add(
        "tiny, 50% overlap",
        run_inprocess(work, "tiny-ov128", overlap=128, **kw),
        workers="0",
        overlap=128,
    )
    add(
        "tiny, 50% overlap, 2 threads",
        run_inprocess(work, "tiny-ov128-t2", overlap=128, threads=2, **kw),
        workers="0",
        overlap=128,
    )
    sub = size // 2
    add(
        f"tiny, 50% overlap, {sub}² region (memory)",
        run_inprocess(work, "tiny-ov128-small", overlap=128, bbox=corner_bbox(size, sub), **kw),
        workers="0",
        overlap=128,
    )
    for n in (1, 2):
        print(f"tiny, CPU, Dask LocalCluster of {n} worker(s) ...", flush=True)
        add(
            f"tiny, 50% overlap, Dask {n}w",
            run_dask(work, f"tiny-dask{n}", workers=n, overlap=128, **kw),
            workers=str(n),
            overlap=128,
        )

    # paper profile
    paper_dev = args.paper_device
    if paper_dev == "auto":
        paper_dev = "cuda" if torch.cuda.is_available() else "skip"
    paper: dict = {"device": paper_dev}
    if paper_dev == "skip":
        why = (
            "no GPU present (torch.cuda.is_available() is False)"
            if args.paper_device == "auto"
            else "--paper-device skip"
        )
        print(f"paper profile (finetune_paper, Swin-B UPerNet): skipped: {why}", flush=True)
        paper["skipped"] = why
    else:
        if paper_dev == "cuda" and not torch.cuda.is_available():
            ap.error("--paper-device cuda: no GPU (torch.cuda.is_available() is False)")
        ck = checkpoint(work, "finetune_paper")
        if paper_dev == "cuda":
            psize = 2 * size
            pcube, pbbox = cube(work, psize), None
        else:
            psize = size
            pcube, pbbox = cube_url, corner_bbox(size, WINDOW)
        for batch in (16, 32):
            print(f"paper, {paper_dev}, batch {batch} ...", flush=True)
            r = run_inprocess(
                work,
                f"paper-{paper_dev}-b{batch}",
                cube_url=pcube,
                ckpt=ck,
                overlap=128,
                block=block,
                bbox=pbbox,
                batch=batch,
                threads=os.cpu_count() or 1,
                device=paper_dev,
            )
            rows.append(
                row(
                    f"paper, 50% overlap, {paper_dev}",
                    r,
                    workers="0",
                    overlap=128,
                    block=block,
                    batch=batch,
                    device=paper_dev,
                )
            )
            print(f"  {rows[-1]['Mpx/s']} Mpx/s, {rows[-1]['windows/s']} windows/s", flush=True)

    base = rows[0]
    for r in rows:
        r["ratio"] = round(r["Mpx/s"] / base["Mpx/s"], 3)
        r["windows ratio"] = round(r["windows"] / base["windows"] * base["Mpx"] / r["Mpx"], 2)
    print()
    cols = [
        "config",
        "device",
        "workers",
        "threads",
        "overlap",
        "batch",
        "region",
        "Mpx",
        "windows",
        "seconds",
        "Mpx/s",
        "windows/s",
        "CPU s",
        "Mpx/CPU-s",
        "peak RSS MB",
        "growth MB",
        "ratio",
    ] + (["GPU MB"] if any("GPU MB" in r for r in rows) else [])
    print_table(rows, cols)
    full = rows[1]
    small = next(r for r in rows if r["config"].endswith("(memory)"))
    memory = {
        "small_region": small["region"],
        "large_region": full["region"],
        "area_ratio": round(full["Mpx"] / small["Mpx"], 2),
        "growth_small_MB": small["growth MB"],
        "growth_large_MB": full["growth MB"],
        "peak_small_MB": small["peak RSS MB"],
        "peak_large_MB": full["peak RSS MB"],
    }
    cost = round(base["Mpx/s"] / full["Mpx/s"], 2)
    print(
        f"\n50% overlap costs {cost}× the time of plain tiling "
        f"({full['windows'] / base['windows']:.2f}× the windows); peak RSS growth "
        f"{memory['growth_small_MB']} MB for {small['region']} vs {memory['growth_large_MB']} MB "
        f"for {full['region']} ({memory['area_ratio']}× the area)"
    )
    print(f"total {time.perf_counter() - t_start:.0f} s")
    notes = [
        "untrained weights: speed and memory do not depend on them",
        "CPU rows on a small shared machine: other processes may have used the cores during the "
        "run, so seconds are noisy; Mpx/CPU-s is the steadier figure",
        "windows include each block's halo (the lattice windows touching the block)",
        "Dask workers: single-threaded processes (Dask sets OMP_NUM_THREADS=1); cluster start-up "
        "and model loading are not timed",
        "Dask's nanny starts workers with MALLOC_TRIM_THRESHOLD_=65536: glibc then returns freed "
        "memory at once and re-faults it, which cost ~1.5x the CPU per window (and ~25% less "
        "peak RSS) in a separate in-process check; hence the lower Mpx/CPU-s of the Dask rows",
    ]
    write_results(
        "predict-quick" if args.quick else "predict",
        {
            "torch": torch.__version__,
            "cube_px": size,
            "block": block,
            "overlap_cost_x": cost,
            "memory_flat": memory,
            "paper": paper,
            "notes": notes,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
