"""Layer-wise learning-rate decay for fine-tuning a Swin encoder (+ any decoder), by encoder depth.

Layer ids (``L = sum(depths)`` Swin blocks; BEiT/SimMIM rule ``scale = decay ** (L + 1 - id)``)::

    0            patch_embed.*, absolute_pos_embed                    decay ** (L + 1)
    1 .. L       the Swin blocks in order over all stages: block j of stage i has id
                 sum(depths[:i]) + j + 1; a stage's PatchMerging (timm layout:
                 layers.{i}.downsample, at the *start* of stage i) shares the id of that stage's
                 first block, as timm's own Swin group matcher does
    L + 1        the encoder's final norm and everything outside the encoder (decode head,
                 refine-up head, classifier)                          1.0

For Swin-B (depths 2/2/18/2, L = 24) the patch embedding trains at 0.7**25 ~ 1.3e-4 of the base lr.
(The Microsoft SimMIM code, Microsoft layout, puts layers.{i}.downsample, at the *end* of stage i,
with the last block of stage i: one step, x0.7, lower than here for the merging layers.)

Encoder parameters are found by locating the :class:`SwinEncoder` *module* inside the model, not
by name patterns on the full name: the authors' SimMIM fine-tuning matched ``patch_embed`` /
``layers`` at the start of names that actually begin with ``encoder.``, so every parameter fell
through to the top id and layer decay was silently off. Here a model without a SwinEncoder, or an
encoder parameter whose name fits no rule, raises instead.

Why not timm's ``param_groups_layer_decay``: with a model-level group matcher it gives the
encoder's final norm and the (unmatched) decoder two different top ids, so the final norm would
train at ``decay`` x base lr, not 1.0, and it needs regexes rewritten for the ``encoder.`` prefix.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from training.models.swin import SwinEncoder
from training.optim import NO_WEIGHT_DECAY_NAMES

__all__ = [
    "NO_WEIGHT_DECAY_NAMES",
    "layer_id_table",
    "param_groups_layer_decay",
    "swin_layer_id",
]

_BLOCK = re.compile(r"^layers\.(\d+)\.blocks\.(\d+)\.")
_DOWNSAMPLE = re.compile(r"^layers\.(\d+)\.downsample\.")


def swin_layer_id(name: str, depths: Sequence[int]) -> int:
    """Layer id of an encoder-relative Swin parameter name (see the module docstring).

    Args:
        name: name inside the encoder, e.g. ``"layers.2.blocks.1.attn.qkv.weight"`` (no
            ``encoder.`` prefix).
        depths: blocks per stage.

    Returns:
        An id in ``[0, sum(depths) + 1]``.

    Raises:
        ValueError: a name that fits no rule (so new parameters cannot silently get the top id).
    """
    num_layers = sum(depths)
    if name.startswith("patch_embed.") or name == "absolute_pos_embed":
        return 0
    if name.startswith("norm."):
        return num_layers + 1
    m = _BLOCK.match(name)
    if m:
        stage, block = int(m.group(1)), int(m.group(2))
        if stage >= len(depths) or block >= depths[stage]:
            raise ValueError(f"{name!r} is outside the encoder's depths {list(depths)}")
        return sum(depths[:stage]) + block + 1
    m = _DOWNSAMPLE.match(name)
    if m:
        stage = int(m.group(1))
        if stage >= len(depths):
            raise ValueError(f"{name!r} is outside the encoder's depths {list(depths)}")
        return sum(depths[:stage]) + 1  # with the stage's first block
    raise ValueError(f"no layer-decay rule for encoder parameter {name!r}")


def _find_encoder(model: nn.Module) -> tuple[str, SwinEncoder]:
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, SwinEncoder)]
    if not found:
        raise ValueError(
            f"no SwinEncoder inside {type(model).__name__}: layer decay would be silently off"
        )
    if len(found) > 1:
        raise ValueError(f"more than one SwinEncoder: {[n or '<root>' for n, _ in found]}")
    name, enc = found[0]
    return (f"{name}." if name else ""), enc


def layer_id_table(model: nn.Module) -> tuple[dict[str, int], int]:
    """Layer id of every trainable parameter of ``model``.

    Returns:
        ``({full parameter name: layer id}, top id)``; ``top id = sum(depths) + 1``.
    """
    prefix, encoder = _find_encoder(model)
    top = sum(encoder.depths) + 1
    table: dict[str, int] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if prefix == "" or name.startswith(prefix):
            table[name] = swin_layer_id(name[len(prefix) :], encoder.depths)
        else:
            table[name] = top  # decoder, heads: undecayed
    return table, top


def param_groups_layer_decay(
    model: nn.Module,
    base_lr: float,
    weight_decay: float = 0.05,
    layer_decay: float = 0.7,
    no_weight_decay_names: Iterable[str] = NO_WEIGHT_DECAY_NAMES,
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise lr decay by Swin depth and weight-decay exclusions.

    Args:
        model: a model containing exactly one :class:`SwinEncoder` (at any prefix, e.g.
            ``encoder.`` of the segmenter or ``module.encoder.`` under DDP), or the encoder.
        base_lr: learning rate of the top id (decoder, final norm).
        weight_decay: decay of the decayed groups.
        layer_decay: per-layer factor; ``scale = layer_decay ** (top - layer_id)``. 1.0 turns
            layer decay off (every scale 1).
        no_weight_decay_names: parameter names (full name, or its last dotted component) that
            skip weight decay (default: the engine's
            :data:`training.optim.NO_WEIGHT_DECAY_NAMES`); every parameter with ``ndim <= 1``
            (norms, biases) skips it too.

    Returns:
        One dict per (layer id, decay / no decay) present, ordered by id, with ``params``,
        ``param_names`` (the optimiser's own key in torch >= 2.6), ``lr`` (already
        ``base_lr * lr_scale``), ``lr_scale`` (for schedulers that set ``lr = value * lr_scale``,
        as timm's; do not apply both), ``weight_decay``, ``layer_id`` and ``group_name``.
        Frozen parameters are left out.
    """
    if not 0.0 < layer_decay <= 1.0:
        raise ValueError(f"layer_decay must be in (0, 1], got {layer_decay}")
    skip = set(no_weight_decay_names)
    table, top = layer_id_table(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if name not in table:  # frozen
            continue
        layer_id = table[name]
        no_wd = p.ndim <= 1 or name in skip or name.rsplit(".", 1)[-1] in skip
        key = (layer_id, no_wd)
        if key not in groups:
            scale = layer_decay ** (top - layer_id)
            groups[key] = {
                "params": [],
                "param_names": [],
                "lr": base_lr * scale,
                "lr_scale": scale,
                "weight_decay": 0.0 if no_wd else weight_decay,
                "layer_id": layer_id,
                "group_name": f"layer_{layer_id}_{'no_decay' if no_wd else 'decay'}",
            }
        groups[key]["params"].append(p)
        groups[key]["param_names"].append(name)
    return [groups[k] for k in sorted(groups)]
