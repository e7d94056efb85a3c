"""Training-loader throughput: WebDataset shards (local disk, S3) vs TorchGeo on GeoTIFFs.

    python benchmarks/loader.py [--work DIR] [--quick] [--batch 32]

1. Data, made with sarcube and kept under ``--work`` between runs: ``synthesize`` (default: the
   10 × 10-patch demo area, 3 dates; ``--quick``: a small area) → ``ingest`` → ``sample_patches``
   → ``write_shards`` (8+ shards a split). For long enough epochs a second manifest,
   ``manifest-bench.json``, lists every shard of the split several times (the loader reads only
   what a manifest lists; repeated shards just repeat samples).
2. The same patches of the pretraining split as GeoTIFFs, one 256 × 256 float32 file per patch
   (``hh_YYYYMMDD_<patch id>.tif``, EPSG:4326, its bounds from the sample's JSON): the input a
   ``torchgeo.datasets.RasterDataset`` indexes.
3. Loaders, each producing the same batches of ``--batch`` patches, in the two places the
   per-sample arithmetic can happen (``prepare``):

   - ``device`` (what training uses): the loader decodes and applies random rot90/flips and ships
     the augmented dB (float16 for the shards, float32 as TorchGeo reads it); z-score, no-data
     fill and SAR weight happen in the training step on the accelerator. The CPU cost of that
     step when there is no accelerator is measured separately ("finish on CPU").
   - ``worker``: the loader also makes the float32 image (z-scored with the manifest's
     statistics) and SAR intensity weight.

   The loaders:

   - ``training.data.ShardStream`` (task "pretrain") over local shards and over an S3 server
     (moto ``ThreadedMotoServer`` started here, in this process: it shares the 2 cores with the
     loader workers, so the S3 rows are a lower bound for a real endpoint);
   - TorchGeo 0.8.1: ``RasterDataset`` + ``RandomGeoSampler(size=256)`` + ``stack_samples`` with
     the same per-sample transform, when TorchGeo is installed (it is not a dependency: the row
     is skipped with the command that installs it);
   - a reference without TorchGeo: rasterio reading the same GeoTIFFs (one file per sample, the
     read TorchGeo's RasterDataset does underneath, without its index query and merge), same
     transform. It bounds TorchGeo's throughput from above.

   with ``num_workers`` 1 and 2 (DataLoader worker processes; the epoch's start-up included).
Throughput = samples / wall seconds; "per process" = total / loader processes; "per CPU-s" =
samples / CPU seconds of the loader processes (the DataLoader workers, or this process with 0
workers): the per-process rate on a core of its own, the fair figure on a shared machine. The
ratios compare per-CPU-second rates at the same worker count. Local files are read from the
page cache (they were just written or read). Writes benchmarks/results/loader.json
(loader-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import resource
import socket
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

from training.data import ShardStream, apply_augmentation, augmentation, intensity_weight

QUICK_BBOX = (140.30, 36.02, 140.30 + 1024 / 6000, 36.02 + 1024 / 6000)  # 4 × 4 patches
TORCHGEO_HINT = (
    "TorchGeo is not installed (it is not a sarcube dependency). To add its row, install it "
    "into this environment without letting it change torch:\n"
    "    uv pip install torchgeo==0.8.1 "
    "\"torch==$(python -c 'import torch; print(torch.__version__)')\"\n"
    "(or: python -m pip install torchgeo==0.8.1 --constraint <(pip freeze | grep '^torch=='))"
)


# ---------------------------------------------------------------------------------------------
# Data


def make_data(work: Path, quick: bool) -> Path:
    """Synthesize → ingest → sample → shards (cached); returns the shard directory."""
    from sarcube.ingestion import ingest
    from sarcube.sampling import SamplingParams, sample_patches
    from sarcube.shards import MANIFEST, write_shards
    from sarcube.synth import DEFAULT_BBOX, synthesize

    tag = "quick" if quick else "default"
    bbox = QUICK_BBOX if quick else DEFAULT_BBOX
    synth_dir, cube = work / f"synth-{tag}", work / f"cube-{tag}.zarr"
    index, shards = work / f"index-{tag}.parquet", work / f"shards-{tag}"
    if (shards / MANIFEST).exists():
        return shards
    if not (synth_dir / "synth.json").exists():
        print(f"synthesising {bbox} ...", flush=True)
        synthesize(str(synth_dir), bbox=bbox, seed=1, progress=True)
    if not (cube / "zarr.json").exists():
        print("ingesting ...", flush=True)
        report = ingest(
            [str(synth_dir / "scenes")], str(cube), lulc=[str(synth_dir / "lulc")], progress=True
        )
        assert report.ok, report.problems
    print("sampling ...", flush=True)
    # every patch with valid SAR (the benchmark needs many, not a balanced few)
    params = SamplingParams(block=1 if quick else 2, max_nodata=0.05, exclude_full=())
    sample_patches(str(cube), str(index), params, progress=False)
    print("writing shards ...", flush=True)
    write_shards(
        str(cube),
        str(index),
        str(shards),
        shard_size_mb=4,
        min_shards_per_split=8,
        splits=("pretrain",),
        progress=True,
    )
    return shards


def bench_manifest(shards: Path, split: str, min_samples: int) -> tuple[Path, int]:
    """``manifest-bench.json``: the manifest with the split's shard list repeated; (path, reps)."""
    manifest = json.loads((shards / "manifest.json").read_text())
    entry = manifest["splits"][split]
    reps = max(1, math.ceil(min_samples / entry["samples"]))
    entry["shards"] = entry["shards"] * reps
    entry["samples"] *= reps
    entry["bytes"] *= reps
    path = shards / "manifest-bench.json"
    path.write_text(json.dumps(manifest, indent=1))
    return path, reps


def write_geotiffs(shards: Path, split: str, out: Path) -> list[Path]:
    """One float32 GeoTIFF per patch of ``split`` (cached)."""
    import rasterio
    from rasterio.transform import from_bounds

    from sarcube.shards import iter_samples

    done = out / "done.json"
    if done.exists():
        return sorted(out.glob("hh_*.tif"))
    out.mkdir(parents=True, exist_ok=True)
    for s in iter_samples(str(shards), split):
        meta = s["meta"]
        w, south, e, n = meta["bounds"]
        sar = s["sar"].astype(np.float32)
        path = out / f"hh_{meta['time'].replace('-', '')}_{s['key']}.tif"
        profile = {
            "driver": "GTiff",
            "width": sar.shape[1],
            "height": sar.shape[0],
            "count": 1,
            "dtype": "float32",
            "crs": meta["crs"],
            "nodata": float("nan"),
            "transform": from_bounds(w, south, e, n, sar.shape[1], sar.shape[0]),
            "tiled": True,
            "blockxsize": 256,
            "blockysize": 256,
        }
        with rasterio.open(path, "w", **profile) as dst:
            dst.write(sar, 1)
    done.write_text("{}")
    return sorted(out.glob("hh_*.tif"))


# ---------------------------------------------------------------------------------------------
# The same per-sample transform for the GeoTIFF loaders


class Transform:
    """rot90/flips keyed by a counter (``prepare="device"``: only that), then z-score, no-data
    fill, weight (``prepare="worker"``): as ``ShardStream`` does."""

    def __init__(self, mean: float, std: float, prepare: str = "worker"):
        self.mean, self.std, self.prepare = mean, std, prepare
        self.n = 0

    def tensors(self, db: np.ndarray) -> dict[str, torch.Tensor]:
        self.n += 1
        db = np.ascontiguousarray(apply_augmentation(db, *augmentation(0, 0, str(self.n))))
        if self.prepare == "device":
            return {"sar": torch.from_numpy(db)[None]}  # (1, H, W) dB
        x = torch.from_numpy(db).float()[None]  # (1, H, W)
        valid = torch.isfinite(x)
        x.masked_fill_(~valid, self.mean)
        return {"image": (x - self.mean) / self.std, "weight": intensity_weight(x), "valid": valid}

    def __call__(self, sample: dict) -> dict:  # TorchGeo transforms take and return the dict
        out = self.tensors(sample["image"][0].numpy())
        sample.update(out)
        return sample


class RasterioPatches(torch.utils.data.Dataset):
    """Random patch files read with rasterio (the reading layer under TorchGeo)."""

    def __init__(self, paths: list[Path], length: int, transform: Transform):
        self.paths, self.length, self.transform = [str(p) for p in paths], length, transform

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        import rasterio
        from rasterio.windows import Window

        rng = np.random.default_rng(i)
        path = self.paths[rng.integers(len(self.paths))]
        with rasterio.open(path) as src:
            r = rng.integers(src.height - 256 + 1)
            c = rng.integers(src.width - 256 + 1)
            db = src.read(1, window=Window(c, r, 256, 256))
        return self.transform.tensors(db)


# ---------------------------------------------------------------------------------------------
# Runs


def _cpu(who: int) -> float:
    r = resource.getrusage(who)
    return r.ru_utime + r.ru_stime


def timed(loader, workers: int) -> tuple[int, float, float]:
    """(samples, wall seconds, CPU seconds of the loader processes): this process's CPU when
    ``workers`` is 0, else that of the DataLoader workers (children, counted once they exit)."""
    who = resource.RUSAGE_CHILDREN if workers else resource.RUSAGE_SELF
    c0, t0 = _cpu(who), time.perf_counter()
    n = 0
    for b in loader:
        x = b["sar"] if "sar" in b else b["image"]
        n += len(x)
        assert x.shape[1:] == (1, 256, 256) and ("sar" in b or b["weight"].dtype == torch.float32)
    seconds = time.perf_counter() - t0
    del loader  # workers joined (DataLoader iterators shut down at the end of the epoch)
    return n, seconds, _cpu(who) - c0


def run_shards(manifest: str, workers: int, batch: int, prepare: str, storage_options=None):
    s = ShardStream(
        manifest,
        "pretrain",
        batch_size=batch,
        num_workers=workers,
        task="pretrain",
        storage_options=storage_options,
        shuffle_buffer=256,
        prepare=prepare,
    )
    return timed(s.loader(0), workers)


def run_finish(manifest: str, batch: int, steps: int = 40) -> tuple[int, float, float]:
    """``ShardStream.finish`` on CPU in this process (what ``prepare="device"`` leaves to the
    training step; on a GPU it is a few element-wise kernels)."""
    s = ShardStream(manifest, "pretrain", batch_size=batch, task="pretrain", prepare="device")
    compact = []
    for b in s.batches(0):
        compact.append(b)
        if len(compact) == steps:
            break
    c0, t0 = _cpu(resource.RUSAGE_SELF), time.perf_counter()
    n = sum(len(s.finish(b)["image"]) for b in compact)
    return n, time.perf_counter() - t0, _cpu(resource.RUSAGE_SELF) - c0


def run_rasterio(paths, workers: int, batch: int, n: int, mean: float, std: float, prepare: str):
    ds = RasterioPatches(paths, n, Transform(mean, std, prepare))
    dl = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True
    )
    return timed(dl, workers)


def run_torchgeo(
    tiff_dir: Path, workers: int, batch: int, n: int, mean: float, std: float, prepare: str
):
    try:
        import torchgeo
        from torchgeo.datasets import RasterDataset, stack_samples
        from torchgeo.samplers import RandomGeoSampler
    except ImportError:
        return None
    version = torchgeo.__version__

    class SarPatches(RasterDataset):
        filename_glob = "hh_*.tif"
        filename_regex = r"^hh_(?P<date>\d{8})_"
        date_format = "%Y%m%d"
        is_image = True

    ds = SarPatches(paths=str(tiff_dir), transforms=Transform(mean, std, prepare))
    sampler = RandomGeoSampler(ds, size=256, length=n)
    dl = torch.utils.data.DataLoader(
        ds,
        batch_size=batch,
        sampler=sampler,
        num_workers=workers,
        collate_fn=stack_samples,
        drop_last=True,
    )
    return (*timed(dl, workers), version)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sarcube-bench-loader")
    ap.add_argument("--quick", action="store_true", help="a small area (a smoke run)")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(1)  # DataLoader workers use 1 thread; the in-process row too
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    shards = make_data(work, args.quick)
    manifest = json.loads((shards / "manifest.json").read_text())
    pre = manifest["splits"]["pretrain"]
    mean, std = pre["db_stats"]["mean"], pre["db_stats"]["std"]
    epoch_samples = 1024 if args.quick else 4096
    bench, reps = bench_manifest(shards, "pretrain", epoch_samples)
    tiffs = write_geotiffs(
        shards, "pretrain", work / f"tiffs-{'quick' if args.quick else 'default'}"
    )
    n_tiff = 256 if args.quick else 1024
    print(
        f"pretrain split: {pre['samples']} patches in {len(pre['shards'])} shards "
        f"({pre['bytes'] / 2**20:.1f} MiB), listed {reps}× per epoch; {len(tiffs)} GeoTIFFs",
        flush=True,
    )

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

    fs = s3fs.S3FileSystem(**storage_options, skip_instance_cache=True)
    fs.mkdir("bench")
    for p in [*sorted(shards.glob("*.tar")), bench]:
        fs.put_file(str(p), f"bench/shards/{p.name}")

    rows = []
    torchgeo_missing = False

    def add(source, loader, prepare, workers, res):
        n, secs, cpu = res[0], res[1], res[2]
        procs = max(workers, 1)
        rows.append(
            {
                "source": source,
                "loader": loader,
                "prepare": prepare,
                "workers": workers,
                "samples": n,
                "seconds": round(secs, 2),
                "samples/s": round(n / secs, 1),
                "per process": round(n / secs / procs, 1),
                "loader CPU s": round(cpu, 2),
                "per CPU-s": round(n / cpu, 1),
            }
        )
        print(rows[-1], flush=True)

    try:
        for prepare in ("device", "worker"):
            for workers in (0, 1, 2):
                add(
                    "shards, local disk",
                    "ShardStream",
                    prepare,
                    workers,
                    run_shards(str(bench), workers, args.batch, prepare),
                )
            for workers in (1, 2):
                add(
                    "shards, S3 (moto, in-process)",
                    "ShardStream",
                    prepare,
                    workers,
                    run_shards(
                        "s3://bench/shards/manifest-bench.json",
                        workers,
                        args.batch,
                        prepare,
                        storage_options,
                    ),
                )
            for workers in (1, 2):
                res = run_torchgeo(tiffs[0].parent, workers, args.batch, n_tiff, mean, std, prepare)
                if res is None:
                    torchgeo_missing = True
                    break
                add(
                    "GeoTIFF per patch, local",
                    f"TorchGeo {res[3]} RasterDataset+RandomGeoSampler",
                    prepare,
                    workers,
                    res,
                )
            for workers in (1, 2):
                add(
                    "GeoTIFF per patch, local",
                    "rasterio windows (no TorchGeo)",
                    prepare,
                    workers,
                    run_rasterio(tiffs, workers, args.batch, n_tiff, mean, std, prepare),
                )
        add(
            "compact batches in memory",
            "ShardStream.finish on CPU (no GPU here)",
            "device",
            0,
            run_finish(str(bench), args.batch),
        )
    finally:
        server.stop()

    def rate(source_prefix, loader_prefix, workers, key="per CPU-s", prepare="device"):
        for r in rows:
            if (
                r["source"].startswith(source_prefix)
                and r["loader"].startswith(loader_prefix)
                and r["workers"] == workers
                and r["prepare"] == prepare
            ):
                return r[key]
        return None

    for r in rows:  # ratios of per-process throughput per CPU-second, same prepare mode
        w, prep = max(r["workers"], 1), r["prepare"]
        tg = rate("GeoTIFF", "TorchGeo", w, prepare=prep)
        rio = rate("GeoTIFF", "rasterio", w, prepare=prep)
        loader_row = r["source"].startswith(("shards", "GeoTIFF"))
        r["× TorchGeo"] = round(r["per CPU-s"] / tg, 1) if tg and loader_row else ""
        r["× rasterio"] = round(r["per CPU-s"] / rio, 1) if rio and loader_row else ""
    print()
    print_table(
        rows,
        [
            "source",
            "loader",
            "prepare",
            "workers",
            "samples",
            "seconds",
            "samples/s",
            "per process",
            "loader CPU s",
            "per CPU-s",
            "× TorchGeo",
            "× rasterio",
        ],
    )
    targets = {}
    for prep in ("device", "worker"):
        local1 = rate("shards, local", "ShardStream", 1, prepare=prep)
        local1_wall = rate("shards, local", "ShardStream", 1, "per process", prep)
        tg1 = rate("GeoTIFF", "TorchGeo", 1, prepare=prep)
        local0 = rate("shards, local", "ShardStream", 0, prepare=prep)
        targets[prep] = {
            "in_process_local_per_cpu_s": local0,
            "worker_process_local_per_cpu_s": local1,
            "worker_process_local_wall_per_s": local1_wall,
            "per_process_local_ge_1000_per_cpu_s": local1 >= 1000,
            "per_process_local_ge_1000_wall": local1_wall >= 1000,
            "x_torchgeo_per_process": round(local1 / tg1, 1) if tg1 else None,
            "ge_10x_torchgeo_per_process": (local1 / tg1 >= 10) if tg1 else None,
        }
        print(
            f"\ntargets, prepare={prep} (1 worker process): local shards {local1} patches per "
            f"CPU-second ({local1_wall}/s wall on this shared machine; target ≥ 1000), {local0} "
            f"in-process (no DataLoader transfer); vs TorchGeo: "
            f"{'%.1f×' % (local1 / tg1) if tg1 else 'not measured'} (target ≥ 10×)"
        )
    fin = rows[-1]
    print(
        f"finish on CPU (z-score + weight + fill, the training step's share with "
        f"prepare=device when there is no GPU): {fin['per CPU-s']} patches per CPU-second"
    )
    if torchgeo_missing:
        print("\n" + TORCHGEO_HINT)
    write_results(
        "loader" + ("-quick" if args.quick else ""),
        {
            "batch_size": args.batch,
            "pretrain_patches": pre["samples"],
            "shards": len(pre["shards"]),
            "epoch_listing_repeats": reps,
            "geotiffs": len(tiffs),
            "rows": rows,
            "targets": targets,
            "torchgeo": "not installed: row skipped" if torchgeo_missing else "measured",
            "notes": "2 shared CPU cores; S3 = moto ThreadedMotoServer in the benchmark process; "
            "local reads from the page cache; seconds include DataLoader start-up and the "
            "shuffle buffer fill; torch intra-op threads = 1",
        },
    )


if __name__ == "__main__":
    main()
