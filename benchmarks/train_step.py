"""Training-step throughput (forward + backward + optimiser) and model FLOP utilisation.

    python benchmarks/train_step.py [--quick] [--profiles simmim_tiny mixmae_paper ...]
                                    [--batch N] [--steps N] [--compile]

For each profile (default: simmim_tiny, mixmae_tiny, simmim_paper, mixmae_paper) the model is
built from the profile and one optimiser step is the engine's own ``Trainer.train_step``: the
masks from (seed, step, rank), autocast (bf16 on CUDA), loss, backward, gradient clipping (as
configured), AdamW and the lr schedule. The batch is one pre-generated z-scored SAR-like batch
already on the device, so the numbers are the model's, not the loader's.

- images/s = batch / median step time over ``--steps`` timed steps (after warm-up steps);
- FLOPs of one forward + backward pass counted with ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls and convolutions; one multiply-add = 2 FLOPs); achieved FLOP/s = FLOPs / median step;
- on CUDA, MFU = achieved FLOP/s / the GPU's dense bf16 peak from :data:`PEAK_BF16` (by device
  name; no MFU for an unknown GPU, or on the CPU).

On the CPU the paper profiles (Swin-B) run with batch 2 (``--batch`` overrides) and few steps;
on CUDA they use the profile's batch (256), halved until it fits. Writes
benchmarks/results/train_step.json (train_step-quick.json with --quick).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import print_table, write_results

from training.config import load_config
from training.distributed import DistInfo
from training.engine import Trainer
from training.pretrain import build_model, make_task
from training.sar_weight import sar_intensity_weight

# Dense bf16 tensor-core peaks (FLOP/s), most specific name first.
PEAK_BF16: list[tuple[str, float]] = [
    ("GH200", 989e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("V100", 125e12),  # fp16
]
PROFILES = ["simmim_tiny", "mixmae_tiny", "simmim_paper", "mixmae_paper"]


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16:
        if key in name:
            return name, peak
    return name, None


class OneBatch:
    """The same device-resident batch for every step (no loader cost)."""

    def __init__(self, batch: dict, steps: int) -> None:
        self.batch, self.steps_per_epoch = batch, steps

    def batches(self, epoch: int, start_step: int = 0):
        for _ in range(start_step, self.steps_per_epoch):
            yield self.batch


def sar_batch(n: int, device: torch.device, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    yy = torch.arange(256).view(1, 1, 256, 1).expand(n, 1, 256, 256)
    level = torch.where(yy < 128, -20.0, -7.0)
    db = level + 10 * torch.log10(torch.empty(level.shape).exponential_(generator=g) + 1e-3)
    image = (db + 12.0) / 5.0
    return {"image": image.float().to(device), "weight": sar_intensity_weight(db).to(device),
            "key": [str(i) for i in range(n)]}  # fmt: skip


def count_flops(trainer: Trainer, batch: dict) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    trainer.net.train()
    with FlopCounterMode(display=False) as fc:
        with trainer._autocast():
            loss = trainer.task.loss(trainer.net, batch, step=0, rank=0)
        loss.float().backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return int(fc.get_total_flops())


def bench(profile: str, device: torch.device, batch: int | None, steps: int, warmup: int,
          compile_: bool) -> dict:  # fmt: skip
    over = ["train.progress=false", "train.tensorboard=false", f"train.device={device}"]
    if compile_:
        over.append("train.compile=true")
    cfg = load_config(profile, over)
    n = batch or cfg.data.batch_size
    while True:
        cfg = load_config(profile, [*over, f"data.batch_size={n}"])
        model = build_model(cfg)
        params = sum(p.numel() for p in model.parameters())
        data = OneBatch(sar_batch(n, device), warmup + steps + 1)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, model, make_task(cfg, model, (-12.0, 5.0)), data, tmp,
                              dist_info=DistInfo(), device=device)  # fmt: skip
            try:
                flops = count_flops(trainer, data.batch)
                it = iter(data.batches(0))
                times = []
                for i in range(warmup + steps):
                    state = {"step": i, "epoch": 0}
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    loss, _, _ = trainer.train_step(it, state)
                    if device.type == "cuda":
                        torch.cuda.synchronize(device)
                    if i >= warmup:
                        times.append(time.perf_counter() - t0)
                break
            except torch.OutOfMemoryError:
                if n == 1:
                    raise
                del trainer, model
                torch.cuda.empty_cache()
                n //= 2
                print(f"  {profile}: out of memory, retrying with batch {n}", flush=True)
    step_s = statistics.median(times)
    name, peak = peak_flops(device)
    achieved = flops / step_s
    row = {"profile": profile, "method": cfg.method, "model": cfg.model.size, "device": name,
           "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32",
           "batch": n, "params_M": round(params / 1e6, 1), "steps": steps,
           "step_s": round(step_s, 4), "img/s": round(n / step_s, 2),
           "GFLOP/img": round(flops / n / 1e9, 1), "TFLOP/s": round(achieved / 1e12, 3),
           "MFU": None if peak is None else round(achieved / peak, 3),
           "loss": round(loss, 4)}  # fmt: skip
    if device.type == "cuda":
        row["max_mem_GB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profiles", nargs="+", default=PROFILES)
    ap.add_argument("--batch", type=int, default=None, help="batch per step (default: see doc)")
    ap.add_argument(
        "--steps", type=int, default=None, help="timed steps (default: 5 tiny, 2 paper on CPU)"
    )
    ap.add_argument("--device", default="auto")
    ap.add_argument("--compile", action="store_true", help="torch.compile the model")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="fewer steps; results to train_step-quick.json"
    )
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else torch.device(args.device)  # fmt: skip
    rows = []
    for profile in args.profiles:
        paper = "paper" in profile
        batch = args.batch or (2 if paper and device.type == "cpu" else None)
        steps = args.steps or (1 if args.quick else (2 if paper and device.type == "cpu" else 5))
        warmup = 1 if device.type == "cpu" else 3
        print(
            f"{profile}: batch {batch or 'profile'}, {steps} timed step(s) on {device} ...",
            flush=True,
        )
        rows.append(bench(profile, device, batch, steps, warmup, args.compile))
    print()
    cols = ["profile", "device", "amp", "batch", "params_M", "step_s", "img/s", "GFLOP/img",
            "TFLOP/s", "MFU"] + (["max_mem_GB"] if device.type == "cuda" else [])  # fmt: skip
    print_table(rows, cols)
    write_results("train_step-quick" if args.quick else "train_step",
                  {"torch": torch.__version__, "threads": torch.get_num_threads(),
                   "compile": args.compile, "rows": rows})  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
