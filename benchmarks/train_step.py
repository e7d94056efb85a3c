"""Training-step throughput (forward + backward + optimiser) and model FLOP utilisation.

    python benchmarks/train_step.py [--quick] [--profiles simmim_tiny finetune_paper ...]
                                    [--batch N] [--steps N] [--compile]

Pretraining and fine-tuning. For each profile (default: simmim_tiny, mixmae_tiny,
finetune_tiny, finetune_tiny_water, simmim_paper, mixmae_paper, finetune_paper) the model is
built from the profile and one optimiser step is the engine's own ``Trainer.train_step``:
autocast (bf16 on CUDA), loss, backward, gradient clipping (as configured), AdamW and the lr
schedule. The batch is one pre-generated z-scored SAR-like batch already on the device, so the
numbers are the model's, not the loader's.

- pretraining (``simmim_*``, ``mixmae_*``): :func:`training.pretrain.build_model` and its task
  (masks from (seed, step, rank), the SAR-weighted reconstruction loss);
- fine-tuning (``finetune_tiny``, ``finetune_paper``: LULC, 9 classes; ``finetune_tiny_water``:
  ``finetune_tiny`` with ``seg.task=water``): the segmenter of
  :func:`training.finetune.build_segmentation_model` (Swin + refined UPerNet, random init),
  :class:`training.finetune.SegmentationTask` with layer-wise lr decay, and the loss of
  :func:`training.finetune.build_loss` (LULC: α-scaled focal + dice from the fixed, Japan-like
  class frequencies :data:`CLASS_FREQS`; water: BCE + dice); the batch adds ``label``
  (B, 256, 256) int64 with classes drawn in 16-pixel blocks and an ignored (255) strip.

- images/s = batch / median step time over ``--steps`` timed steps (after warm-up steps);
- FLOPs of one forward + backward pass counted with ``torch.utils.flop_counter.FlopCounterMode``
  (matmuls and convolutions; one multiply-add = 2 FLOPs; None where counting fails); achieved
  FLOP/s = FLOPs / median step;
- on CUDA, MFU = achieved FLOP/s / the GPU's dense bf16 peak from :data:`PEAK_BF16` (by device
  name; no MFU for an unknown GPU, or on the CPU).

On the CPU the paper profiles (Swin-B) run with batch 2 (``--batch`` overrides) and few steps;
on CUDA they use the profile's batch (256 pretraining, 64 fine-tuning), halved until it fits.
Writes benchmarks/results/train_step.json (train_step-quick.json with --quick). On a CPU
shared with other work, ``--threads 1`` gives much steadier numbers than torch's default.
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

from sarcube.classes import IGNORE_INDEX
from training.config import ConfigError, load_config
from training.distributed import DistInfo
from training.engine import Trainer
from training.finetune import SegmentationTask, build_loss
from training.pretrain import build_model, make_task
from training.sar_weight import sar_intensity_weight
from training.segmenter import build_segmentation_model

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
PROFILES = [
    "simmim_tiny",
    "mixmae_tiny",
    "finetune_tiny",
    "finetune_tiny_water",
    "simmim_paper",
    "mixmae_paper",
    "finetune_paper",
]
# Benchmark names that are a profile with overrides.
VARIANTS: dict[str, tuple[str, list[str]]] = {
    "finetune_tiny_water": ("finetune_tiny", ["seg.task=water"])
}
# Plausible train-split pixel frequencies of the 9 LULC classes (Table II order: water, built-up,
# cropland, grassland, forest, bare, solar panel, wetland, greenhouse), Japan-like: forest-heavy.
CLASS_FREQS = [0.04, 0.10, 0.13, 0.06, 0.64, 0.015, 0.005, 0.005, 0.005]


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
    return {
        "image": image.float().to(device),
        "weight": sar_intensity_weight(db).to(device),
        "key": [str(i) for i in range(n)],
    }


def seg_batch(n: int, device: torch.device, task: str, seed: int = 0) -> dict:
    """:func:`sar_batch` with ``valid`` (B, 1, 256, 256) and ``label`` (B, 256, 256) int64: LULC
    classes 0..8 drawn from :data:`CLASS_FREQS` (water: 0/1) in 16-pixel blocks, and a strip of
    no data (``valid`` false, label 255 = ignore)."""
    b = sar_batch(n, device, seed)
    g = torch.Generator().manual_seed(seed + 1)
    probs = torch.tensor(CLASS_FREQS) if task == "lulc" else torch.tensor([0.9, 0.1])
    blocks = torch.multinomial(probs, n * 16 * 16, replacement=True, generator=g).view(n, 16, 16)
    label = blocks.repeat_interleave(16, 1).repeat_interleave(16, 2)  # (B, 256, 256) int64
    valid = torch.ones(n, 1, 256, 256, dtype=torch.bool)
    valid[..., :8] = False
    label.masked_fill_(~valid[:, 0], IGNORE_INDEX)
    return {**b, "valid": valid.to(device), "label": label.to(device)}


def build(cfg, n: int, device: torch.device):
    """(model, task, batch) of a pretraining or fine-tuning profile."""
    if cfg.method == "finetune":
        model = build_segmentation_model(cfg)
        freqs = CLASS_FREQS if cfg.seg.task == "lulc" else None
        task = SegmentationTask(cfg, model, build_loss(cfg, freqs))
        return model, task, seg_batch(n, device, cfg.seg.task)
    model = build_model(cfg)
    return model, make_task(cfg, model, (-12.0, 5.0)), sar_batch(n, device)


def count_flops(trainer: Trainer, batch: dict) -> int | None:
    """FLOPs of one forward + backward pass; None (with a note) if counting fails."""
    from torch.utils.flop_counter import FlopCounterMode

    trainer.wrapped_model.train()
    try:
        with FlopCounterMode(display=False) as fc:
            with trainer._autocast():
                loss = trainer.task.loss(trainer.wrapped_model, batch, step=0, rank=0)
            loss.float().backward()
        return int(fc.get_total_flops())
    except torch.OutOfMemoryError:
        raise
    except Exception as e:  # a benchmark: report no FLOPs rather than fail
        print(f"  FLOP counting failed ({type(e).__name__}: {e}); FLOPs not reported", flush=True)
        return None
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)


def bench(
    profile: str, device: torch.device, batch: int | None, steps: int, warmup: int, compile_: bool
) -> dict:
    base, extra = VARIANTS.get(profile, (profile, []))
    over = [*extra, "train.progress=false", "train.tensorboard=false", f"train.device={device}"]
    if compile_:
        over.append("train.compile=true")
    cfg = load_config(base, over)
    n = batch or cfg.data.batch_size
    while True:
        cfg = load_config(base, [*over, f"data.batch_size={n}"])
        model, task, one = build(cfg, n, device)
        params = sum(p.numel() for p in model.parameters())
        data = OneBatch(one, warmup + steps + 1)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = Trainer(cfg, model, task, data, tmp, dist_info=DistInfo(), device=device)
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
                del trainer, model, task, data, one
                torch.cuda.empty_cache()
                n //= 2
                print(f"  {profile}: out of memory, retrying with batch {n}", flush=True)
    step_s = statistics.median(times)
    name, peak = peak_flops(device)
    achieved = None if flops is None else flops / step_s
    row = {
        "profile": profile,
        "method": cfg.method,
        "task": cfg.seg.task if cfg.method == "finetune" else "pretrain",
        "model": cfg.model.size,
        "device": name,
        "amp": str(trainer.amp_dtype).replace("torch.", "") if trainer.amp_dtype else "fp32",
        "batch": n,
        "params_M": round(params / 1e6, 1),
        "steps": steps,
        "step_s": round(step_s, 4),
        "img/s": round(n / step_s, 2),
        "GFLOP/img": None if flops is None else round(flops / n / 1e9, 1),
        "TFLOP/s": None if achieved is None else round(achieved / 1e12, 3),
        "MFU": None if peak is None or achieved is None else round(achieved / peak, 3),
        "loss": round(loss, 4),
    }
    if device.type == "cuda":
        row["max_mem_GB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 1)
        torch.cuda.reset_peak_memory_stats(device)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--profiles",
        nargs="+",
        default=PROFILES,
        metavar="PROFILE",
        help=f"profiles or variants (default: {' '.join(PROFILES)})",
    )
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

    device = (
        torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if args.device == "auto"
        else torch.device(args.device)
    )
    for profile in args.profiles:  # fail on a bad name now, not after the first rows
        base, extra = VARIANTS.get(profile, (profile, []))
        try:
            load_config(base, extra)
        except ConfigError as e:
            ap.error(f"--profiles {profile}: {e}")
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
    cols = [
        "profile",
        "device",
        "amp",
        "batch",
        "params_M",
        "step_s",
        "img/s",
        "GFLOP/img",
        "TFLOP/s",
        "MFU",
    ] + (["max_mem_GB"] if device.type == "cuda" else [])
    print_table(rows, cols)
    write_results(
        "train_step-quick" if args.quick else "train_step",
        {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "compile": args.compile,
            "rows": rows,
        },
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
