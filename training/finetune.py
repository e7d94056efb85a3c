"""Fine-tuning the refined UPerNet for LULC segmentation or water detection (docs/design.md).

::

    sarcube finetune --task lulc --config finetune_tiny --manifest shards/ \\
        --pretrained runs/simmim/encoder.pth --out runs/lulc [--nproc 2] [--resume] [key=value ...]
    python -m training.finetune ...                               # the same, one process
    torchrun --nproc_per_node 8 -m training.finetune --config finetune_paper ...

What a run does, on the engine of pretraining (:class:`training.engine.Trainer`):

1. Streams the manifest's ``train`` split (:class:`training.data.ShardStream`, task ``lulc``:
   the 9 classes of Table II, JAXA code 0 → ignore; task ``water``: 1 water, 0 not water) with
   joint flips/rot90, z-scored with the train split's statistics.
2. Model (:func:`build_segmentation_model`): the Swin encoder (random init, or an encoder
   exported by SAR-W-SimMIM / SAR-W-MixMAE, loaded exactly or not at all) + UPerNet with the
   refinements of arXiv 2601.15705 switchable in ``seg``: ``hires_injection`` (i),
   ``refine_up`` (ii). 9 output channels (LULC) or one logit (water).
3. Loss (:func:`build_loss`): LULC: α-scaled focal + dice, α_k = (1 − f_k)/Σ(1 − f_j) from the
   train split's class frequencies in the manifest (``seg.alpha_scaled``, refinement iii; off:
   the same focal + dice with α ≡ 1 and α_scale 1), or plain cross-entropy (``seg.loss: ce``);
   water: BCE + soft dice. Ignored pixels are left out of every term.
4. Optimiser: AdamW with layer-wise lr decay by Swin depth (``optim.layer_decay``,
   :func:`training.layer_decay.param_groups_layer_decay`; patch embedding deepest-decayed, the
   decoder undecayed), warm-up + cosine to ``schedule.min_lr``.
5. After every epoch: the ``val`` split, every sample once over all ranks, confusion matrix summed
   across ranks (:func:`training.evaluation.evaluate_model`); ``best.pt`` keeps the weights of
   the best val mIoU (water: val water IoU).
6. At the end: the ``test`` split with the best weights, and a report in ``{out}/test/``
   (:func:`training.reports.write_evaluation_report`: JSON, the Table II Markdown, PNGs).

``sarcube evaluate --checkpoint CKPT --manifest URL --split test --out DIR``
(:func:`training.evaluation.evaluate`)
makes the same report for any checkpoint (``best.pt`` or ``checkpoint.pt``) and split.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sarcube.classes import NINE_CLASS_NAMES, segmentation_task
from sarcube.storage import is_remote, join_url
from training.arguments import add_finetune_arguments

from .config import Config, ConfigError
from .distributed import env_rank
from .engine import Trainer
from .evaluation import (
    EvalResult,
    evaluate_model,
    scalar_scores,
    segmentation_stream,
    write_report,
)
from .layer_decay import param_groups_layer_decay
from .loop_state import NonFiniteLossError, TrainResult
from .models.pretrained import EncoderWeightsError
from .models.upernet import UPerNetSegmenter
from .optim import NO_WEIGHT_DECAY_NAMES
from .seg_losses import CELoss, FocalDiceLoss, WaterLoss
from .segmenter import (
    TASK_CLASSES,
    build_segmentation_model,
    load_model_checkpoint,
)
from .tasks import Task

__all__ = [
    "FinetuneResult",
    "SegmentationTask",
    "build_loss",
    "class_frequencies",
    "main",
    "run",
]

log = logging.getLogger("training.finetune")


# ---------------------------------------------------------------------------------------------
# Model and loss


def class_frequencies(manifest: Mapping[str, Any], split: str = "train") -> list[float]:
    """Pixel frequencies of the 9 classes (Table II order) in ``split``, from the manifest."""
    try:
        frac = manifest["splits"][split]["classes"]["nine_class_fraction"]
    except KeyError:
        raise ValueError(
            f"the manifest has no class frequencies for split {split!r} "
            "(splits.<split>.classes.nine_class_fraction)"
        ) from None
    f = [float(frac.get(name, 0.0)) for name in NINE_CLASS_NAMES]
    if not math.isclose(sum(f), 1.0, abs_tol=1e-4):
        raise ValueError(f"split {split!r} has no labelled pixels (class fractions {f})")
    return f


def build_loss(cfg: Config, class_freqs: Sequence[float] | None = None) -> nn.Module:
    """The loss of ``cfg.seg`` (see the module docstring); ``class_freqs`` (9 train-split pixel
    frequencies) are needed for the α-scaled focal + dice loss."""
    s = cfg.seg
    if s.task == "water":
        return WaterLoss(lambda_dice=s.water_lambda_dice)
    if s.loss == "ce":
        return CELoss()
    if s.alpha_scaled:
        if class_freqs is None:
            raise ValueError("the α-scaled focal + dice loss needs the train class frequencies")
        return FocalDiceLoss(
            class_freqs=class_freqs,
            lambda_focal=s.lambda_focal,
            lambda_dice=s.lambda_dice,
            gamma=s.gamma,
            alpha_scale=s.alpha_scale,
        )
    return FocalDiceLoss(
        alpha=[1.0] * 9,
        lambda_focal=s.lambda_focal,
        lambda_dice=s.lambda_dice,
        gamma=s.gamma,
        alpha_scale=1.0,
    )


# ---------------------------------------------------------------------------------------------
# The task for the engine


class SegmentationTask(Task):
    """Loss, layer-decay groups and per-epoch validation of the segmenter (engine hooks)."""

    def __init__(
        self, cfg: Config, model: UPerNetSegmenter, loss_fn: nn.Module, val_stream: Any = None
    ) -> None:
        self.cfg, self.raw, self.val_stream = cfg, model, val_stream
        self.loss_fn = loss_fn
        self.task = cfg.seg.task
        self.best_metric = (
            segmentation_task(self.task).best_metric if val_stream is not None else None
        )

    def loss(self, model: nn.Module, batch: Mapping[str, Any], *, step: int, rank: int) -> Tensor:
        logits = model(batch["image"])  # (B, K, H, W)
        self.loss_fn.to(logits.device)
        return self.loss_fn(logits.float(), batch["label"])

    def encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder

    def param_groups(
        self, model: nn.Module, weight_decay: float, lr: float
    ) -> list[dict[str, Any]]:
        names = {n.rsplit(".", 1)[-1] for n in self.raw.no_weight_decay()}
        return param_groups_layer_decay(
            model,
            lr,
            weight_decay,
            self.cfg.optim.layer_decay,
            no_weight_decay_names=names | set(NO_WEIGHT_DECAY_NAMES),
        )

    def validate(self, model: nn.Module, *, epoch: int, device: torch.device) -> dict[str, float]:
        if self.val_stream is None:
            return {}
        res = evaluate_model(model, self.val_stream, self.task, device, self.cfg.seg.threshold)
        out = scalar_scores(self.task, res.scores)
        if self.task == "lulc":
            out.update({f"iou_{k.replace(' ', '_')}": v for k, v in res.scores["iou"].items()})
        return out


# ---------------------------------------------------------------------------------------------
# Running


@dataclass
class FinetuneResult:
    train: TrainResult
    test: EvalResult | None
    report: dict[str, Any] | None  # paths of the test report (rank 0)


def run(
    cfg: Config,
    manifest: str,
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    resume: bool = False,
    allow_changes: Sequence[str] = (),
) -> FinetuneResult:
    """Fine-tune under ``cfg`` on ``manifest``'s train split, validate each epoch, test the best
    weights; writes to ``out`` (see the module docstring). Joins the process group under
    torchrun / mpirun and leaves it at the end."""
    from sarcube.shards import read_manifest

    from . import distributed as tdist

    if cfg.method != "finetune":
        raise ConfigError(f"fine-tuning needs method: finetune, the config has {cfg.method!r}")
    storage_options = dict(storage_options or {})
    started = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info, device = tdist.init_distributed(cfg.train.device)
    succeeded = False
    try:
        man = read_manifest(manifest, storage_options)
        splits = man["splits"]
        freqs = class_frequencies(man, "train") if cfg.seg.task == "lulc" else None
        data = segmentation_stream(
            cfg,
            manifest,
            "train",
            storage_options,
            info.rank,
            info.world_size,
            train=True,
            pin_memory=device.type == "cuda",
        )
        val = None
        if cfg.seg.val_split and cfg.seg.val_split in splits:
            val = segmentation_stream(
                cfg,
                manifest,
                cfg.seg.val_split,
                storage_options,
                info.rank,
                info.world_size,
                train=False,
            )
        elif cfg.seg.val_split:
            log.warning(
                "no %r split in %s: no validation, best.pt not written", cfg.seg.val_split, manifest
            )
        model = build_segmentation_model(cfg, storage_options)
        task = SegmentationTask(cfg, model, build_loss(cfg, freqs), val)
        extra = {
            "manifest": str(manifest),
            "task": cfg.seg.task,
            "num_classes": len(TASK_CLASSES[cfg.seg.task]),
            "classes": list(TASK_CLASSES[cfg.seg.task]),
            "pretrained": cfg.seg.pretrained,
            "db_stats": [data.mean, data.std],
        }
        trainer = Trainer(
            cfg, model, task, data, out, storage_options, info, device, extra_state=extra
        )
        if trainer.main:
            log.info(
                "finetune %s: %s encoder (%s), %d rank(s), %d steps/epoch, global batch %d, "
                "peak lr %.3g, layer decay %.2f",
                cfg.seg.task,
                cfg.model.size,
                cfg.seg.pretrained or "random init",
                info.world_size,
                trainer.steps_per_epoch,
                trainer.global_batch,
                trainer.lr,
                cfg.optim.layer_decay,
            )
        res = trainer.fit(resume=resume, allow_changes=allow_changes)

        test = report = None
        test_split = cfg.seg.test_split
        if test_split and test_split in splits:
            if res.best is not None:  # the best validated weights
                model.load_state_dict(load_model_checkpoint(res.best, storage_options)["model"])
            stream = segmentation_stream(
                cfg, manifest, test_split, storage_options, info.rank, info.world_size, train=False
            )
            test = evaluate_model(
                model,
                stream,
                cfg.seg.task,
                device,
                cfg.seg.threshold,
                panels=cfg.seg.panels if trainer.main else 0,
                amp_dtype=trainer.amp_dtype,
            )
            if trainer.main:
                weights = res.best or res.checkpoint
                report = write_report(
                    test,
                    cfg,
                    join_url(out, test_split),
                    storage_options,
                    test_split,
                    extra={
                        "checkpoint": weights,
                        "manifest": str(manifest),
                        "best_epoch": res.best_epoch,
                        "best_val": res.best_value,
                    },
                )
        succeeded = True
        return FinetuneResult(train=res, test=test, report=report)
    finally:
        if started:
            tdist.cleanup(succeeded)


# ---------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.finetune",
        description="Fine-tune the refined UPerNet (LULC or water) on sarcube shards, validate "
        "each epoch, test the best weights (one process, or one per rank under torchrun / mpirun).",
    )
    add_finetune_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> Config:
    """What can be checked before a rank starts
    (:func:`training.arguments.check_finetune_args`); returns the config."""
    from training.arguments import check_finetune_args

    return check_finetune_args(args)


def main(argv: Sequence[str] | None = None, prog: str | None = None, verbose: bool = False) -> int:
    """Command-line entry point; 0 ok, 2 bad input, 3 non-finite loss. ``prog`` names the
    command in error lines (``sarcube finetune``); ``verbose``: tracebacks too."""
    from sarcube.errors import run_command
    from sarcube.storage import storage_error_message

    from .pretrain import BAD_INPUT, peer_failure_message

    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rank = env_rank()
    main_rank = rank == 0
    name = prog or os.environ.get("SARCUBE_PROG") or "finetune"
    prefix = name if main_rank else f"{name}[rank {rank}]"
    return run_command(
        lambda: _run_command_line(args, prefix, main_rank),
        prefix,
        verbose,
        bad_input=(*BAD_INPUT, EncoderWeightsError),
        statuses={NonFiniteLossError: 3},
        describe=[storage_error_message, peer_failure_message],
    )


def _run_command_line(args: argparse.Namespace, prefix: str, main_rank: bool) -> int:
    from training.arguments import run_keywords

    cfg = check_args(args)
    res = run(cfg, **run_keywords(args))
    if main_rank:
        t = res.train
        best = (
            ""
            if t.best is None
            else f"; best val {segmentation_task(cfg.seg.task).best_metric} {t.best_value:.4f} "
            f"(epoch {t.best_epoch}) in {t.best}"
        )
        print(f"{prefix}: {cfg.seg.task}, {t.step} steps ({t.epoch} epochs){best}")
        if res.report is not None:  # the tables; the confusion matrix stays in the file
            md = Path(res.report["markdown"]).read_text().split("## Confusion matrix")[0]
            where = (
                join_url(args.out, str(cfg.seg.test_split))
                if is_remote(args.out)
                else Path(res.report["markdown"]).parent
            )
            print(md.rstrip() + f"\n\n(full report: {where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
