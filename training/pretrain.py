"""Self-supervised pretraining of the Swin encoder: SAR-W-SimMIM and SAR-W-MixMAE (docs/design.md).

::

    python -m training.pretrain --config simmim_tiny --manifest s3://bucket/shards \\
        --out s3://bucket/runs/simmim-tiny [--resume] [--storage-option endpoint_url=...] \\
        [optim.base_lr=1e-3 train.max_steps=100 ...]

    torchrun --nproc_per_node 8 -m training.pretrain --config simmim_paper ...   # one node, DDP
    mpirun -np 8 python -m training.pretrain --config mixmae_paper ...           # ABCI style

(``sarcube pretrain ... --nproc N`` launches the torchrun form.)

Streams the manifest's ``pretrain`` split with :class:`training.data.ShardStream` (z-scored
images, and the SAR intensity weight computed by the loader after augmentation), builds the model
of ``method`` and trains it with :class:`training.engine.Trainer`.

- **SimMIM** (:class:`SimMIMTask`): per micro-step, independent masks for the ``B`` images from
  ``simmim_mask`` (``mask.ratio`` of ``mask.unit``-px units, on the 4-px token grid) drawn from a
  generator seeded by ``(seed, micro-step, rank)``; loss ``l1`` / ``mse`` / ``huber`` over the
  masked pixels, times the SAR weight when ``loss.sar_weight`` (SAR-W-SimMIM) — the loader's
  weight (``loss.weight_source: batch``) or recomputed here from the image (``model``).
- **MixMAE** (:class:`MixMAETask`): one ``mixmae_mask`` per micro-batch from the same kind of
  generator; the MixMAE loss with the SAR weight of the original images (loader's, or
  ``model.sar_weight`` of the dB / z-scored image) or none.

At the end the encoder alone is exported (``encoder.pth``, SwinEncoder keys) and a
reconstruction figure (``reconstruction.png``) is written next to the checkpoints.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from training.arguments import (
    add_pretrain_arguments,
    check_pretrain_args,
    run_keywords,
)

from .config import Config, ConfigError
from .distributed import env_rank
from .engine import Trainer
from .loop_state import NonFiniteLossError, TrainResult
from .masking import mask_to_pixels, simmim_mask
from .mixing import mixmae_mask, plot_mixmae_reconstruction
from .models.mixmae import MixMAE, mixmae_base, mixmae_tiny
from .models.simmim import SimMIM
from .models.swin import swin_base, swin_tiny
from .reproducibility import TAG_FIGURE, step_generator
from .sar_weight import sar_intensity_weight
from .tasks import Task

__all__ = [
    "MixMAETask",
    "SimMIMTask",
    "build_data",
    "build_model",
    "main",
    "make_task",
    "plot_simmim_reconstruction",
    "run",
]

log = logging.getLogger("training.pretrain")


def build_model(cfg: Config) -> nn.Module:
    """The pretraining model of ``cfg.method`` and ``cfg.model``, initialised from ``cfg.seed``
    (identical on every rank)."""
    m = cfg.model
    torch.manual_seed(cfg.seed)
    common = {
        "img_size": m.img_size,
        "window_size": m.window_size,
        "drop_path_rate": m.drop_path_rate,
    }
    if cfg.method == "simmim":
        encoder = (swin_base if m.size == "base" else swin_tiny)(**common)
        model: nn.Module = SimMIM(encoder, loss=cfg.loss.kind, huber_delta=cfg.loss.huber_delta)
        if m.grad_checkpointing:
            encoder.set_grad_checkpointing(True)
    elif cfg.method == "mixmae":
        decoder = {
            k: v
            for k, v in (
                ("decoder_dim", m.decoder_dim),
                ("decoder_depth", m.decoder_depth),
                ("decoder_heads", m.decoder_heads),
            )
            if v is not None
        }
        builder = mixmae_base if m.size == "base" else mixmae_tiny
        model = builder(
            **common,
            **decoder,
            mask_ratio=cfg.mask.ratio,
            mask_unit=cfg.mask.unit,
            weight_domain=cfg.loss.weight_domain,
            weight_k=cfg.loss.weight_k,
            norm_pix_loss=cfg.loss.norm_pix,
        )
        if m.grad_checkpointing:
            model.set_grad_checkpointing(True)
    else:  # pragma: no cover - the config type admits only the two
        raise ConfigError(f"unknown method {cfg.method!r}")
    return model


def _weight(
    cfg: Config,
    batch: Mapping[str, Any],
    db_stats: tuple[float, float] | None,
    weight_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor | None:
    """The SAR intensity weight for the loss, or None (plain SimMIM / MixMAE).

    ``loss.weight_source: batch`` takes the loader's weight (computed after augmentation);
    ``model`` recomputes it from the z-scored image, mapped back to dB with the manifest's
    statistics for ``weight_domain: db``, with ``weight_fn`` (default ``sar_intensity_weight``
    with ``loss.weight_k`` / ``loss.weight_domain``; MixMAE passes its ``model.sar_weight``).
    """
    if not cfg.loss.sar_weight:
        return None
    if cfg.loss.weight_source == "batch":
        return batch["weight"]
    x = batch["image"].float()
    if cfg.loss.weight_domain == "db":
        if db_stats is None:
            raise ValueError(
                "loss.weight_source=model with weight_domain=db needs the dB statistics"
            )
        mean, std = db_stats
        x = x * std + mean  # back to dB (no-data pixels were filled with the mean)
    if weight_fn is None:
        return sar_intensity_weight(x, k=cfg.loss.weight_k, domain=cfg.loss.weight_domain)
    return weight_fn(x)


class SimMIMTask(Task):
    """SAR-W-SimMIM loss of a batch (see the module docstring), the encoder to export and the
    reconstruction figure."""

    def __init__(self, cfg: Config, model: SimMIM, db_stats: tuple[float, float] | None = None):
        self.cfg, self.db_stats = cfg, db_stats
        self.token = model.patch_size

    def mask(self, batch_size: int, step: int, rank: int, tag: int = 0) -> Tensor:
        g = step_generator(self.cfg.seed, step, rank, tag)
        return simmim_mask(
            batch_size,
            self.cfg.model.img_size,
            self.cfg.mask.unit,
            self.token,
            self.cfg.mask.ratio,
            generator=g,
        )

    def loss(self, model: nn.Module, batch: Mapping[str, Any], *, step: int, rank: int) -> Tensor:
        x = batch["image"]
        mask = self.mask(x.shape[0], step, rank).to(x.device, non_blocking=True)
        loss, _ = model(x, mask, _weight(self.cfg, batch, self.db_stats))
        return loss

    def encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder

    @torch.no_grad()
    def figure(self, model: nn.Module, batch: Mapping[str, Any], path: str) -> bool:
        was = model.training
        model.eval()
        x = batch["image"][:1].float()
        mask = self.mask(1, 0, 0, TAG_FIGURE).to(x.device)
        w = _weight(
            self.cfg,
            {k: (v[:1] if torch.is_tensor(v) else v) for k, v in batch.items()},
            self.db_stats,
        )
        _, x_rec = model(x, mask, w)
        weight = w if w is not None else batch.get("weight")
        if weight is None:
            weight = sar_intensity_weight(x, k=self.cfg.loss.weight_k, domain="normalized")
        plot_simmim_reconstruction(
            x[0],
            mask_to_pixels(mask, self.token)[0],
            x_rec[0].float(),
            weight[0],
            path,
            weighted=w is not None,
        )
        model.train(was)
        return True


class MixMAETask(Task):
    """SAR-W-MixMAE loss of a batch (see the module docstring), the encoder to export and the
    reconstruction figure."""

    def __init__(self, cfg: Config, model: MixMAE, db_stats: tuple[float, float] | None = None):
        self.cfg, self.db_stats = cfg, db_stats
        # the model itself, for its sar_weight settings (loss() is given the wrapped model:
        # DDP, torch.compile), as Trainer.model vs Trainer.wrapped_model
        self.model = model

    def mask(self, step: int, rank: int, tag: int = 0) -> Tensor:
        g = step_generator(self.cfg.seed, step, rank, tag)
        return mixmae_mask(self.cfg.model.img_size, self.cfg.mask.unit, self.cfg.mask.ratio, g)

    def _weight(self, batch: Mapping[str, Any]) -> Tensor | None:
        return _weight(self.cfg, batch, self.db_stats, self.model.sar_weight)

    def loss(self, model: nn.Module, batch: Mapping[str, Any], *, step: int, rank: int) -> Tensor:
        x = batch["image"]
        mask = self.mask(step, rank).to(x.device, non_blocking=True)
        loss, _, _ = model(x, self._weight(batch), mask)
        return loss

    def encoder(self, model: nn.Module) -> nn.Module:
        return model.encoder

    @torch.no_grad()
    def figure(self, model: nn.Module, batch: Mapping[str, Any], path: str) -> bool:
        was = model.training
        model.eval()
        x = batch["image"].float()
        mask = self.mask(0, 0, TAG_FIGURE).to(x.device)
        _, pred, mask = model(x, self._weight(batch), mask)
        x_pair, mixed, recon = model.figure_pair(x, pred.float(), mask, 0)
        plot_mixmae_reconstruction(x_pair.cpu(), mixed.cpu(), recon.cpu(), path)
        model.train(was)
        return True


def make_task(cfg: Config, model: Any, db_stats: tuple[float, float] | None = None):
    """The :class:`SimMIMTask` or :class:`MixMAETask` of ``cfg.method``."""
    return (SimMIMTask if cfg.method == "simmim" else MixMAETask)(cfg, model, db_stats)


def plot_simmim_reconstruction(
    x: Tensor,
    mask_px: Tensor,
    x_rec: Tensor,
    weight: Tensor,
    path: str | Path,
    weighted: bool = True,
) -> Path:
    """PNG: input | masked input | reconstruction (masked units predicted, visible copied) |
    weight map; one ``(C, H, W)`` image (first channel drawn), z-scored units."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    img = x[0].detach().cpu().numpy()
    m = mask_px[0].detach().cpu().numpy().astype(bool)
    rec = x_rec[0].detach().cpu().numpy()
    w = weight[0].detach().cpu().numpy()
    lo, hi = np.percentile(img, [2, 98])
    masked = np.where(m, np.nan, img)
    pasted = np.where(m, rec, img)
    panels = [
        (img, "input (z-scored dB)", lo, hi, "gray"),
        (masked, f"masked input ({m.mean():.0%} masked)", lo, hi, "gray"),
        (pasted, "reconstruction", lo, hi, "gray"),
        (w, "SAR weight" if weighted else "SAR weight (not used)", 1.0, float(w.max()), "magma"),
    ]
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.6))
    for ax, (a, title, vmin, vmax, cmap) in zip(axes, panels, strict=True):
        cm = plt.get_cmap(cmap).with_extremes(bad="#3b7dd8")
        im = ax.imshow(a, cmap=cm, vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.axis("off")
    fig.colorbar(im, ax=axes[-1], fraction=0.046, pad=0.04)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def build_data(
    cfg: Config,
    manifest: str,
    storage_options: Mapping[str, Any] | None = None,
    rank: int = 0,
    world_size: int = 1,
    pin_memory: bool = False,
):
    """This rank's :class:`training.data.ShardStream` of ``cfg.data.split``."""
    from .data import ShardStream

    return ShardStream.from_config(
        manifest,
        cfg.data.split,
        cfg.data,
        rank=rank,
        world_size=world_size,
        seed=cfg.seed,
        task="pretrain",
        storage_options=storage_options,
        pin_memory=pin_memory,
        weight_domain=cfg.loss.weight_domain,
        weight_k=cfg.loss.weight_k,
    )


def run(
    cfg: Config,
    manifest: str,
    out: str,
    storage_options: Mapping[str, Any] | None = None,
    resume: bool = False,
    data: Any = None,
    allow_changes: Sequence[str] = (),
) -> TrainResult:
    """Pretrain under ``cfg`` on the shards of ``manifest``, writing to ``out``.

    Joins the process group when launched with several ranks (torchrun / mpirun) and leaves it
    at the end. ``data`` replaces the ShardStream (tests). ``allow_changes``: config keys named
    as overrides that a resume may change (:data:`training.config.RESUME_MAY_OVERRIDE`).
    """
    from . import distributed as tdist

    started = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    info, device = tdist.init_distributed(cfg.train.device)
    succeeded = False
    try:
        if data is None:
            data = build_data(
                cfg,
                manifest,
                storage_options,
                info.rank,
                info.world_size,
                pin_memory=device.type == "cuda",
            )
        model = build_model(cfg)
        stats = (data.mean, data.std) if hasattr(data, "mean") and hasattr(data, "std") else None
        task = make_task(cfg, model, stats)
        trainer = Trainer(
            cfg,
            model,
            task,
            data,
            out,
            storage_options,
            info,
            device,
            extra_state={"manifest": str(manifest)},
        )
        if trainer.main:
            log.info(
                "%s: %s on %s, %d rank(s), %d steps/epoch, global batch %d, peak lr %.3g",
                cfg.method,
                type(model).__name__,
                device,
                info.world_size,
                trainer.steps_per_epoch,
                trainer.global_batch,
                trainer.lr,
            )
        result = trainer.fit(resume=resume, allow_changes=allow_changes)
        succeeded = True
        return result
    finally:
        if started:
            tdist.cleanup(succeeded)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.pretrain",
        description="Pretrain the Swin encoder with SAR-W-SimMIM or SAR-W-MixMAE on sarcube shards "
        "(one process, or one per rank under torchrun / mpirun).",
    )
    add_pretrain_arguments(p)
    return p


def check_args(args: argparse.Namespace) -> Config:
    """Everything about the arguments that can be checked before a rank starts
    (:func:`training.arguments.check_pretrain_args`); returns the config."""
    return check_pretrain_args(args)


def peer_failure_message(e: BaseException) -> str | None:
    """One line for a collective that failed because another rank stopped (its own error line
    says why), instead of gloo's / NCCL's traceback; ``None`` for other errors."""
    text = str(e)
    dist_error = getattr(torch.distributed, "DistError", ())
    if (dist_error and isinstance(e, dist_error)) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe")
    ):
        return "stopped: another rank failed (its message says why)"
    return None


def main(argv: Sequence[str] | None = None, prog: str | None = None, verbose: bool = False) -> int:
    """Command-line entry point; returns the exit status (2: bad input, 3: non-finite loss).
    ``prog`` names the command in error lines (``sarcube pretrain``); ``verbose``: tracebacks."""
    from sarcube.errors import run_command
    from sarcube.storage import storage_error_message

    args = build_parser().parse_intermixed_args(argv)  # overrides may come between options
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    rank = env_rank()
    name = prog or os.environ.get("SARCUBE_PROG") or "pretrain"
    prefix = f"{name}[rank {rank}]" if rank else name
    return run_command(
        lambda: _run_command_line(args, prefix, rank),
        prefix,
        verbose,
        bad_input=BAD_INPUT,
        statuses={NonFiniteLossError: 3},
        describe=[storage_error_message, peer_failure_message],
    )


# What the training entry points report as bad input (one line, exit status 2).
BAD_INPUT: tuple[type[BaseException], ...] = (
    ConfigError,
    FileExistsError,
    FileNotFoundError,
    ValueError,
)


def _run_command_line(args: argparse.Namespace, prefix: str, rank: int) -> int:
    res = run(check_args(args), **run_keywords(args))
    if rank == 0:
        state = "finished" if res.finished else "stopped at train.max_steps"
        print(
            f"{prefix}: {state} after step {res.step} (epoch {res.epoch}), last loss "
            f"{res.last_loss if res.last_loss is None else f'{res.last_loss:.5f}'}; "
            f"checkpoint {res.checkpoint}, encoder {res.encoder}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
