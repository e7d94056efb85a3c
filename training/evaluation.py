"""Evaluating a segmenter: the confusion matrix of a split over all ranks, and its report.

::

    sarcube evaluate --checkpoint runs/lulc/best.pt --manifest shards/ --split test --out DIR

:func:`evaluate_model` streams every sample of a split exactly once over all ranks
(:meth:`training.data.ShardStream.eval_batches`: shards dealt to ranks, no padding) and sums the
confusion matrix across ranks; fine-tuning calls it after every epoch (validation) and at the
end (the test split). :func:`evaluate` does the same for any fine-tuning checkpoint
(``best.pt`` or ``checkpoint.pt``) and split, and writes the report
(:func:`training.reports.write_evaluation_report`: JSON, the Table II Markdown, PNGs).
"""

from __future__ import annotations

import argparse
import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sarcube.classes import IGNORE_INDEX, segmentation_task
from sarcube.storage import is_remote, join_url

from .checkpoint import write_bytes
from .config import Config, ConfigError
from .distributed import all_reduce_sum
from .metrics import ConfusionMatrix, binary_scores, segmentation_scores
from .segmenter import TASK_CLASSES, segmenter_from_checkpoint

__all__ = [
    "EvalResult",
    "evaluate",
    "evaluate_model",
    "predict_classes",
    "run_evaluate_args",
    "scalar_scores",
    "segmentation_stream",
    "write_report",
]


def predict_classes(logits: Tensor, task: str, threshold: float = 0.5) -> Tensor:
    """``(B, K, H, W)`` logits → ``(B, H, W)`` int64 classes (water: sigmoid ≥ threshold)."""
    if task == "water":
        return (torch.sigmoid(logits[:, 0].float()) >= threshold).long()
    return logits.argmax(1)


@dataclass
class EvalResult:
    """A split's evaluation: the confusion matrix summed over ranks, scores, a few panels."""

    cm: Tensor  # (K, K) int64, rows truth, columns prediction
    scores: dict[str, Any]  # segmentation_scores (LULC) or binary_scores (+ "segmentation")
    panels: list[dict[str, Any]]  # rank 0's first samples: key, sar_db, pred, truth
    samples: int  # over all ranks


@torch.no_grad()
def evaluate_model(
    model: nn.Module,
    stream: Any,
    task: str,
    device: torch.device | str = "cpu",
    threshold: float = 0.5,
    panels: int = 0,
    amp_dtype: torch.dtype | None = None,
) -> EvalResult:
    """Confusion matrix of ``model`` over this rank's share of ``stream``'s split
    (``stream.eval_batches()``: every sample once over all ranks), summed across ranks.

    A collective when a process group is initialised: every rank must call it. Pixels whose label
    is ignore (JAXA code 0, no SAR data) are not counted. Returns the same scores on every rank.
    """
    device = torch.device(device)
    was = model.training
    model.eval()
    k = segmentation_task(task).num_classes
    cm = ConfusionMatrix(k, IGNORE_INDEX, device=device)
    kept: list[dict[str, Any]] = []
    n = 0
    try:
        for raw in stream.eval_batches():
            batch = stream.finish(raw, device)
            ctx = (
                torch.autocast(device.type, dtype=amp_dtype)
                if amp_dtype is not None
                else torch.autocast(device.type, enabled=False)
            )
            with ctx:
                logits = model(batch["image"])
            pred = predict_classes(logits.float(), task, threshold)
            cm.update(pred, batch["label"])
            n += len(batch["key"])
            for i in range(len(batch["key"])):
                if len(kept) >= panels:
                    break
                db = batch["image"][i, 0].float() * stream.std + stream.mean
                db = torch.where(batch["valid"][i, 0], db, torch.nan)
                kept.append(
                    {
                        "key": batch["key"][i],
                        "sar_db": db.cpu().numpy(),
                        "pred": pred[i].cpu().numpy().astype(np.int64),
                        "truth": batch["label"][i].cpu().numpy().astype(np.int64),
                    }
                )
    finally:
        model.train(was)
    cm.all_reduce()
    total = all_reduce_sum(torch.tensor([n], dtype=torch.int64, device=device)).cpu()
    m = cm.compute()
    names = TASK_CLASSES[task]
    if task == "water":
        scores = {**binary_scores(m), "segmentation": segmentation_scores(m, names)}
    else:
        scores = segmentation_scores(m, names)
    return EvalResult(cm=m, scores=scores, panels=kept, samples=int(total.item()))


def scalar_scores(task: str, scores: Mapping[str, Any]) -> dict[str, float]:
    keys = (
        ("iou", "precision", "recall", "f1", "accuracy")
        if task == "water"
        else ("miou", "macc", "pixel_acc")
    )
    return {k: float(scores[k]) for k in keys}


def segmentation_stream(
    cfg: Config,
    manifest: str,
    split: str,
    storage_options: Mapping[str, Any] | None,
    rank: int,
    world: int,
    *,
    train: bool,
    pin_memory: bool = False,
):
    from .data import ShardStream

    d = cfg.data
    bs = d.batch_size if train else (cfg.seg.eval_batch_size or d.batch_size)
    return ShardStream.from_config(
        manifest,
        split,
        d,
        rank=rank,
        world_size=world,
        seed=cfg.seed,
        task=cfg.seg.task,
        storage_options=storage_options,
        pin_memory=pin_memory,
        batch_size=bs,
        augment=d.augment and train,
        stats_split="train",
        evaluation=not train,
    )


def _upload_dir(local: Path, url: str, storage_options: Mapping[str, Any] | None) -> None:
    for f in sorted(local.iterdir()):
        if f.is_file():
            write_bytes(join_url(url, f.name), f.read_bytes(), storage_options)


def write_report(
    res: EvalResult,
    cfg: Config,
    target: str,
    storage_options: Mapping[str, Any] | None,
    split: str,
    extra: Mapping[str, Any],
    method: str | None = None,
    note: str | None = None,
) -> dict[str, Any]:
    """The report of ``res`` at ``target`` (a local directory, or a URL: written to a temporary
    directory and uploaded)."""
    from .reports import write_evaluation_report

    remote = is_remote(target)
    local = Path(tempfile.mkdtemp(prefix="sarcube-report-")) if remote else Path(target)
    method = method or ("pretrained" if cfg.seg.pretrained else "no pretraining")
    report = write_evaluation_report(
        local,
        res.cm,
        task=cfg.seg.task,
        split=split,
        method=method,
        panels=res.panels,
        synthetic_note=note,
        extra={**extra, "samples": res.samples},
    )
    if remote:
        _upload_dir(local, target, storage_options)
    return report


def evaluate(
    checkpoint: str,
    manifest: str,
    split: str,
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    *,
    batch_size: int | None = None,
    device: str = "auto",
    num_workers: int = 0,
    panels: int = 4,
    method: str | None = None,
    note: str | None = None,
) -> tuple[EvalResult, dict[str, Any]]:
    """Evaluate a fine-tuning checkpoint on one split of ``manifest`` and write the report to
    ``out`` (local directory or URL): ``report.json``, ``report.md`` (Table II layout),
    ``confusion_matrix.png``, ``per_class.png``, ``panels.png``. One process (or every rank of
    an initialised process group)."""
    from sarcube.shards import read_manifest

    from . import distributed as tdist

    storage_options = dict(storage_options or {})
    model, cfg, ck = segmenter_from_checkpoint(checkpoint, storage_options)
    cfg.data.num_workers = num_workers
    if batch_size:
        cfg.seg.eval_batch_size = batch_size
    man = read_manifest(manifest, storage_options)
    if split not in man["splits"]:
        raise ValueError(f"{manifest}: no split {split!r} (splits {sorted(man['splits'])})")
    info = tdist.detect()
    dev = tdist.select_device(info, device)
    model.to(dev)
    stream = segmentation_stream(
        cfg, manifest, split, storage_options, info.rank, info.world_size, train=False
    )
    res = evaluate_model(
        model, stream, cfg.seg.task, dev, cfg.seg.threshold, panels=panels if info.rank == 0 else 0
    )
    listed = int(man["splits"][split].get("samples", stream.total_samples))
    if res.samples != listed:  # the loader verifies every shard; this is the last guard
        from sarcube.shards import ShardError

        raise ShardError(
            f"evaluated {res.samples} samples of split {split!r} but the manifest "
            f"lists {listed} ({manifest})"
        )
    report: dict[str, Any] = {}
    if method is None:  # from the run's own config: segmenter_from_checkpoint clears it in cfg
        trained_from = (ck.get("config") or {}).get("seg", {}).get("pretrained")
        method = "pretrained" if trained_from else "no pretraining"
    if info.rank == 0:
        report = write_report(
            res,
            cfg,
            out,
            storage_options,
            split,
            extra={
                "checkpoint": checkpoint,
                "manifest": str(manifest),
                "epoch": ck.get("epoch"),
                "step": ck.get("step"),
            },
            method=method,
            note=note,
        )
    return res, report


# ---------------------------------------------------------------------------------------------
# Command line


def run_evaluate_args(args: argparse.Namespace) -> int:
    """``sarcube evaluate`` (arguments: ``training.arguments.add_evaluate_arguments``)."""
    from sarcube.errors import run_command
    from sarcube.storage import storage_error_message

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return run_command(
        lambda: _evaluate_command_line(args),
        "sarcube evaluate",
        getattr(args, "verbose", False),
        bad_input=(ConfigError, FileNotFoundError, ValueError),
        describe=[storage_error_message],
    )


def _evaluate_command_line(args: argparse.Namespace) -> int:
    from sarcube.storage import parse_storage_options

    res, report = evaluate(
        args.checkpoint,
        args.manifest,
        args.split,
        args.out,
        parse_storage_options(args.storage_option),
        batch_size=args.batch_size,
        device=args.device,
        num_workers=args.num_workers,
        panels=args.panels,
        method=args.method,
    )
    if report:
        print(Path(report["markdown"]).read_text())
        print(f"evaluate: {res.samples} samples of {args.split}; report in {args.out}")
    return 0
