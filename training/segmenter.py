"""Build a segmentation model, or load one from a fine-tuning checkpoint.

The layer below both fine-tuning (:mod:`training.finetune`, which trains and evaluates the
segmenter) and large-area inference (:mod:`training.predict`, which only applies it): the
classes of each task, the refined UPerNet of a config (with pretrained encoder weights when the
config names them), and the checked loading of ``best.pt`` / ``checkpoint.pt``. Nothing here
needs the training engine, so inference does not import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from sarcube.classes import SEGMENTATION_TASKS, segmentation_task

from .checkpoint import CheckpointError, load_checkpoint, read_bytes, torch_load_safe
from .config import Config, config_from_dict
from .models.pretrained import EncoderWeightsError, load_encoder_weights
from .models.upernet import UPerNetSegmenter, build_segmenter

__all__ = [
    "TASK_CLASSES",
    "build_segmentation_model",
    "load_model_checkpoint",
    "segmenter_from_checkpoint",
]

# Class names per task (a view of sarcube.classes.SEGMENTATION_TASKS, kept for its importers).
TASK_CLASSES: dict[str, tuple[str, ...]] = {
    name: t.class_names for name, t in SEGMENTATION_TASKS.items()
}


def build_segmentation_model(
    cfg: Config, storage_options: Mapping[str, Any] | None = None
) -> UPerNetSegmenter:
    """The segmenter of ``cfg`` (``model`` + ``seg``), initialised from ``cfg.seed`` (the same
    on every rank), with the encoder weights of ``cfg.seg.pretrained`` when set (a local path or
    fsspec URL of ``encoder.pth`` or a pretraining checkpoint; every encoder tensor is loaded or
    :class:`~training.models.pretrained.EncoderWeightsError` lists what does not fit)."""
    s, m = cfg.seg, cfg.model
    torch.manual_seed(cfg.seed)
    model = build_segmenter(
        m.size,
        num_classes=segmentation_task(s.task).num_outputs,
        hires_injection=s.hires_injection,
        refine_up=s.refine_up,
        drop_path_rate=m.drop_path_rate,
        channels=s.channels,
        dropout=s.dropout,
        img_size=m.img_size,
        window_size=m.window_size,
    )
    if s.pretrained:
        url = s.pretrained
        try:
            data = read_bytes(url, storage_options)
        except FileNotFoundError:
            raise FileNotFoundError(f"seg.pretrained: no encoder weights at {url}") from None
        try:
            obj = torch_load_safe(data, url)
        except CheckpointError as e:
            raise EncoderWeightsError(url, [], [], {}, reason=str(e)) from None
        load_encoder_weights(model.encoder, obj, source=url)
    if m.grad_checkpointing:
        model.encoder.set_grad_checkpointing(True)
    return model


def load_model_checkpoint(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """``best.pt`` or ``checkpoint.pt`` of a fine-tuning run (``weights_only=True``), checked:
    a mapping with ``model`` weights and the run's ``config`` (method ``finetune``)."""
    ck = load_checkpoint(url, storage_options)
    if not isinstance(ck, Mapping) or "model" not in ck or "config" not in ck:
        raise ValueError(
            f"{url}: not a sarcube fine-tuning checkpoint (expected the keys "
            "'model' and 'config', got "
            f"{sorted(ck)[:8] if isinstance(ck, Mapping) else type(ck).__name__})"
        )
    method = (ck["config"] or {}).get("method")
    if method != "finetune":
        raise ValueError(
            f"{url}: a {method!r} checkpoint, not a fine-tuned segmenter (evaluate "
            "the best.pt / checkpoint.pt of `sarcube finetune`)"
        )
    return dict(ck)


def segmenter_from_checkpoint(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[UPerNetSegmenter, Config, dict[str, Any]]:
    """The fine-tuned segmenter of ``best.pt`` / ``checkpoint.pt`` at ``url``, weights loaded.

    Returns:
        ``(model, its config, the checkpoint)``; the config's ``seg.pretrained`` is cleared (the
        checkpoint holds every weight: no encoder file is read).

    Raises:
        ValueError: not a fine-tuning checkpoint, or weights that do not fit its own config.
        FileNotFoundError: nothing at ``url``.
    """
    ck = load_model_checkpoint(url, storage_options)
    cfg = config_from_dict(ck["config"])
    cfg.seg.pretrained = None
    model = build_segmentation_model(cfg)
    try:
        model.load_state_dict(ck["model"])
    except RuntimeError as e:
        raise ValueError(
            f"{url}: the weights do not fit the model of its own config ({str(e).splitlines()[0]})"
        ) from None
    return model, cfg, ck
