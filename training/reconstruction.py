"""Masked reconstruction loss of (SAR-W-)SimMIM.

Following the official SimMIM implementation::

    loss_recon = F.l1_loss(x, x_rec, reduction="none")            # (B, C, H, W)
    loss = (loss_recon * mask).sum() / (mask.sum() + 1e-5) / in_chans

with ``mask`` the ``(B, 1, H, W)`` pixel mask broadcast over channels, so the denominator counts
each masked image pixel once and the division by ``C`` makes it a per-channel mean. SAR-W-SimMIM
multiplies the per-pixel error by the SAR intensity weight ``w`` (``training.sar_weight``)::

    loss = sum(M * w * err(x, x_rec)) / (sum(M) + 1e-5) / C

Note that ``w`` is *not* in the denominator (docs/design.md §4): since ``w >= 1`` it also scales the
loss up, by about the mean weight over masked pixels. ``w = 1`` is plain SimMIM.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["LOSS_KINDS", "masked_reconstruction_loss", "pixel_error"]

LOSS_KINDS: tuple[str, ...] = ("l1", "mse", "huber")
_DENOM_EPS = 1e-5  # SimMIM's constant: keeps an all-visible mask finite (loss 0)


def pixel_error(
    x: Tensor, x_rec: Tensor, kind: Literal["l1", "mse", "huber"] = "l1", huber_delta: float = 1.0
) -> Tensor:
    """Element-wise reconstruction error, same shape as ``x``.

    ``l1``: ``|d|``; ``mse``: ``d^2``; ``huber``: ``0.5 d^2`` if ``|d| <= delta`` else
    ``delta (|d| - 0.5 delta)``, with ``d = x_rec - x`` (units of ``x``, or squared).
    """
    if kind == "l1":
        return F.l1_loss(x_rec, x, reduction="none")
    if kind == "mse":
        return F.mse_loss(x_rec, x, reduction="none")
    if kind == "huber":
        if huber_delta <= 0:
            raise ValueError(f"huber_delta must be positive, got {huber_delta}")
        return F.huber_loss(x_rec, x, reduction="none", delta=huber_delta)
    raise ValueError(f"kind must be one of {LOSS_KINDS}, got {kind!r}")


def masked_reconstruction_loss(
    x: Tensor,
    x_rec: Tensor,
    mask_px: Tensor,
    weight: Tensor | None = None,
    kind: Literal["l1", "mse", "huber"] = "l1",
    huber_delta: float = 1.0,
) -> Tensor:
    """SimMIM loss over masked pixels, optionally SAR-intensity weighted.

    Args:
        x: ``(B, C, H, W)`` target (the normalised encoder input).
        x_rec: ``(B, C, H, W)`` reconstruction.
        mask_px: ``(B, 1, H, W)`` or ``(B, H, W)`` pixel mask, bool or {0, 1} float, 1 = masked
            (e.g. ``training.masking.mask_to_pixels``). One channel: it is broadcast over ``C`` and
            counts every masked image pixel once.
        weight: per-pixel weight broadcastable to ``(B, C, H, W)`` (e.g. ``(B, C, H, W)`` or
            ``(B, 1, H, W)`` from ``sar_intensity_weight``); ``None`` means 1 (plain SimMIM).
            Treated as a constant (no gradient flows into it).
        kind: ``"l1"`` (SimMIM), ``"mse"`` or ``"huber"``.
        huber_delta: Huber transition point, in units of ``x``.

    Returns:
        Scalar ``sum(M * w * err) / (sum(M) + 1e-5) / C``, computed in float32 (or float64).
    """
    if x.ndim != 4 or x_rec.shape != x.shape:
        raise ValueError(
            f"x and x_rec must both be (B, C, H, W) of equal shape, got "
            f"{tuple(x.shape)} and {tuple(x_rec.shape)}"
        )
    b, c, h, w = x.shape
    if mask_px.ndim == 3:
        mask_px = mask_px.unsqueeze(1)
    if tuple(mask_px.shape) != (b, 1, h, w):
        raise ValueError(
            f"mask_px must be (B, 1, H, W) = {(b, 1, h, w)}, got {tuple(mask_px.shape)}"
        )
    # Sums over ~B*H*W terms: accumulate in at least float32 even under autocast.
    dtype = torch.promote_types(torch.promote_types(x.dtype, x_rec.dtype), torch.float32)
    err = pixel_error(x.to(dtype), x_rec.to(dtype), kind, huber_delta)  # (B, C, H, W)
    if weight is not None:
        try:
            ok = torch.broadcast_shapes(weight.shape, x.shape) == x.shape
        except RuntimeError:
            ok = False
        if not ok:
            raise ValueError(
                f"weight {tuple(weight.shape)} does not broadcast to x {tuple(x.shape)}"
            )
        err = err * weight.detach().to(dtype)
    m = mask_px.to(dtype)  # (B, 1, H, W)
    return (err * m).sum() / (m.sum() + _DENOM_EPS) / c
