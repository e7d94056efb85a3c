"""Loading pretrained Swin encoder weights for fine-tuning, all or nothing.

Accepted inputs (a mapping, or a path/URL to one saved with ``torch.save``):

- an **exported encoder state dict** (what SimMIM / MixMAE pretraining writes for fine-tuning:
  ``SimMIM(...).encoder.state_dict()``), keys ``patch_embed.*``, ``absolute_pos_embed``,
  ``layers.*``, ``norm.*``;
- a **checkpoint** dict whose ``"encoder"``, ``"model"`` or ``"state_dict"`` entry holds either of
  the above or a whole pretraining model's state dict, whose encoder keys are prefixed
  ``encoder.`` (``encoder.patch_embed.proj.weight``; the mask token and the pretraining decoder
  are then ignored); a DDP ``module.`` or ``torch.compile`` ``_orig_mod.`` prefix is removed first.

Anything short of an exact match of every key and shape raises :class:`EncoderWeightsError`,
listing missing keys, unexpected keys and shape mismatches (both shapes) and naming the file:
a silent partial load would quietly turn a "pretrained" run into a partly-scratch run.
Files are read with ``torch.load(..., weights_only=True, map_location="cpu")``: no pickled code
runs on load.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

__all__ = [
    "EncoderLoadReport",
    "EncoderWeightsError",
    "extract_encoder_state_dict",
    "load_encoder_weights",
]

_CHECKPOINT_ENTRIES = ("encoder", "model", "state_dict")  # looked up in this order
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP, torch.compile
_ENCODER_PREFIX = "encoder."
_MAX_LISTED = 20  # keys listed per category in an error message


class EncoderWeightsError(RuntimeError):
    """Pretrained encoder weights do not match the encoder; nothing was loaded.

    Attributes:
        source: where the weights came from (file name or caller's label).
        missing: keys the encoder has and the weights lack.
        unexpected: keys the weights have and the encoder lacks.
        mismatched: ``{key: (weights shape, encoder shape)}``.
    """

    def __init__(
        self,
        source: str,
        missing: list[str] | None = None,
        unexpected: list[str] | None = None,
        mismatched: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
        notes: list[str] | None = None,
        reason: str | None = None,
    ) -> None:
        self.source = source
        self.missing = sorted(missing or [])
        self.unexpected = sorted(unexpected or [])
        self.mismatched = dict(sorted((mismatched or {}).items()))
        self.notes = list(notes or [])
        super().__init__(self._message(reason))

    def _message(self, reason: str | None) -> str:
        head = f"cannot load pretrained encoder weights from {self.source}"
        if reason is not None:
            return f"{head}: {reason}"
        lines = [
            f"{head}: {len(self.missing)} missing key(s), {len(self.unexpected)} unexpected "
            f"key(s), {len(self.mismatched)} shape mismatch(es); nothing was loaded."
        ]
        if self.missing:
            lines.append(
                f"  missing keys (in the encoder, not in the weights): {_cap(self.missing)}"
            )
        if self.unexpected:
            lines.append(
                f"  unexpected keys (in the weights, not in the encoder): {_cap(self.unexpected)}"
            )
        if self.mismatched:
            lines.append("  shape mismatches (key: weights shape vs encoder shape):")
            items = list(self.mismatched.items())
            for k, (got, want) in items[:_MAX_LISTED]:
                lines.append(f"    {k}: {list(got)} vs {list(want)}")
            if len(items) > _MAX_LISTED:
                lines.append(f"    ... and {len(items) - _MAX_LISTED} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _cap(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED])
    more = f", ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
    return f"[{shown}{more}]"


@dataclass(frozen=True)
class EncoderLoadReport:
    """What :func:`load_encoder_weights` did: every encoder tensor in ``loaded``; ``ignored`` are
    non-encoder entries of a whole pretraining model (mask token, decoder)."""

    source: str
    loaded: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)


def _strip_wrappers(sd: Mapping[str, Any]) -> dict[str, Any]:
    out = {}
    for k, v in sd.items():
        for p in _WRAPPER_PREFIXES:
            while k.startswith(p):
                k = k[len(p) :]
        out[k] = v
    return out


def extract_encoder_state_dict(
    obj: Mapping[str, Any], source: str = "<state dict>"
) -> tuple[dict[str, Tensor], list[str]]:
    """Find the encoder tensors in an exported state dict or a checkpoint (see module docstring).

    Args:
        obj: the loaded object.
        source: label for error messages.

    Returns:
        ``(state_dict, ignored)``: encoder-relative keys -> tensors, and the names of the entries
        dropped because they are not under ``encoder.`` in a whole-model state dict.
    """
    if not isinstance(obj, Mapping):
        raise EncoderWeightsError(
            source, reason=f"expected a state dict (a mapping), got {type(obj).__name__}"
        )
    sd: Mapping[str, Any] = obj
    for entry in _CHECKPOINT_ENTRIES:
        if isinstance(obj.get(entry), Mapping):
            sd = obj[entry]
            break
    sd = _strip_wrappers(sd)
    ignored: list[str] = []
    if any(k.startswith(_ENCODER_PREFIX) for k in sd):
        # A whole pretraining model: keep `encoder.*`, drop mask token / decoder.
        ignored = sorted(k for k in sd if not k.startswith(_ENCODER_PREFIX))
        sd = {k[len(_ENCODER_PREFIX) :]: v for k, v in sd.items() if k.startswith(_ENCODER_PREFIX)}
    not_tensors = sorted(k for k, v in sd.items() if not torch.is_tensor(v))
    if not_tensors:
        raise EncoderWeightsError(
            source,
            reason=(
                f"entries that are not tensors: {_cap(not_tensors)} (expected an encoder state "
                f"dict, or a checkpoint with one of the entries {list(_CHECKPOINT_ENTRIES)})"
            ),
        )
    return dict(sd), ignored


def _notes(missing: list[str], unexpected: list[str], mismatched: dict[str, Any]) -> list[str]:
    """Explanations of the common mismatches."""
    notes = []
    if "absolute_pos_embed" in missing:
        notes.append(
            "absolute_pos_embed: the weights have none but the encoder was built with an "
            "absolute position embedding (build it with absolute_pos_embed=False if the "
            "pretraining encoder had none)"
        )
    if "absolute_pos_embed" in unexpected:
        notes.append(
            "absolute_pos_embed: the weights have one but the encoder was built without it "
            "(absolute_pos_embed=False); build it with absolute_pos_embed=True"
        )
    if "absolute_pos_embed" in mismatched:
        notes.append(
            "absolute_pos_embed has a different token count: the weights were pretrained at "
            "another img_size / patch_size (no interpolation is done)"
        )
    if any(k.startswith("layers.0.downsample.") for k in unexpected):
        notes.append(
            "the weights have a downsample in stage 0: a Microsoft-layout Swin checkpoint "
            "(PatchMerging at the end of stages 0..2); this encoder uses timm's layout"
        )
    return notes


def load_encoder_weights(
    encoder: nn.Module,
    state_dict_or_path: Mapping[str, Any] | str | os.PathLike[str],
    source: str | None = None,
) -> EncoderLoadReport:
    """Load pretrained weights into ``encoder``, exactly or not at all.

    Args:
        encoder: the :class:`~training.models.swin.SwinEncoder` to fill (in place).
        state_dict_or_path: an exported encoder state dict / checkpoint mapping, or a local path or
            fsspec URL (``s3://...``) of one saved with ``torch.save``; read with
            ``weights_only=True`` on the CPU.
        source: label of the weights for messages (e.g. ``"SAR-W-MixMAE ep600"``); the path is
            always added when one is given.

    Returns:
        An :class:`EncoderLoadReport` (every encoder key is in ``loaded``).

    Raises:
        EncoderWeightsError: missing keys, unexpected keys or shape mismatches (all listed, with
            both shapes), or a file that is not a state dict. The encoder is left untouched.
    """
    if isinstance(state_dict_or_path, (str, os.PathLike)):
        path = os.fspath(state_dict_or_path)
        label = f"file '{path}'" + (f" ({source})" if source and source != path else "")
        if "://" in path:
            import fsspec

            with fsspec.open(path, "rb") as f:
                obj = torch.load(f, weights_only=True, map_location="cpu")
        else:
            obj = torch.load(path, weights_only=True, map_location="cpu")
    else:
        obj = state_dict_or_path
        label = source or "<in-memory state dict>"

    sd, ignored = extract_encoder_state_dict(obj, label)
    expected = encoder.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    mismatched = {
        k: (tuple(sd[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if k in sd and tuple(sd[k].shape) != tuple(v.shape)
    }
    if missing or unexpected or mismatched:
        raise EncoderWeightsError(
            label, missing, unexpected, mismatched, _notes(missing, unexpected, mismatched)
        )
    encoder.load_state_dict(sd, strict=True)  # cannot fail now; strict as a second guard
    return EncoderLoadReport(source=label, loaded=sorted(sd), ignored=ignored)
