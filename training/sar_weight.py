"""SAR intensity weight map for SAR-W-SimMIM / SAR-W-MixMAE reconstruction losses.

The weight favours dark, low-backscatter pixels (water, shadow, smooth surfaces) over bright speckle
and double-bounce returns, which otherwise dominate an unweighted pixel loss:

    P = 10^(x / 10)                                  # dB -> linear power
    n = (P - min P) / (max P - min P + eps)          # min-max per image and channel, over H x W
    w = exp(k * (1 - n))                             # w in [1, e^k]: dark pixels weigh more

It is computed from the *un-normalised* dB input, after geometric augmentation (so the weight moves
with the pixels), and before any z-scoring.

``domain="normalized"`` reproduces the authors' released code, which applies the same formula to the
z-scored input z = (x - mu) / sigma. Since 10^(z/10) = P^(1/sigma) * 10^(-mu/(10 sigma)) and min-max
normalisation removes the constant factor, that variant equals the min-max of P^(1/sigma): a softer
(sigma > 1) contrast than the dB-domain weight. Offered only to reproduce their checkpoints.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

__all__ = ["WEIGHT_DOMAINS", "sar_intensity_weight"]

WEIGHT_DOMAINS: tuple[str, ...] = ("db", "normalized")


def sar_intensity_weight(
    x_db: Tensor,
    k: float = 1.0,
    domain: Literal["db", "normalized"] = "db",
    eps: float = 1e-6,
) -> Tensor:
    """Per-pixel SAR intensity weight ``w = exp(k * (1 - minmax(10^(x/10))))``.

    Args:
        x_db: backscatter image(s), shape ``(..., H, W)``: typically ``(B, C, H, W)`` for a batch or
            ``(C, H, W)`` for one sample in a data loader. With ``domain="db"`` the values are
            un-normalised decibels (e.g. sigma0/gamma0 in dB, roughly -30..+10); with
            ``domain="normalized"`` they are the z-scored input ``(x_dB - mu) / sigma`` (unitless).
            Must be free of NaN/inf (fill no-data before calling).
        k: contrast exponent (unitless); ``k = 1`` gives ``w`` in ``[1, e]``, ``k = 0`` gives all
            ones.
        domain: ``"db"`` (the default) or ``"normalized"`` (the authors' released code); both
            apply ``P = 10^(v/10)`` to the given values ``v``, they differ only in what the caller
            passes.
        eps: added to the min-max denominator; a constant image gives ``n = 0`` and ``w = e^k``.

    Returns:
        Weight map of the same shape as ``x_db``, dtype float32 (or float64 for float64 input),
        no gradient. Min and max are taken independently for every image and channel over the
        last two dimensions.

    Raises:
        ValueError: unknown ``domain``, fewer than 2 dimensions, or non-finite values in ``x_db``.
    """
    if domain not in WEIGHT_DOMAINS:
        raise ValueError(f"domain must be one of {WEIGHT_DOMAINS}, got {domain!r}")
    if x_db.ndim < 2:
        raise ValueError(f"x_db must have shape (..., H, W), got {tuple(x_db.shape)}")
    # Low-precision inputs (AMP) would lose the min-max contrast; compute in >= float32.
    dtype = torch.promote_types(x_db.dtype, torch.float32)
    x = x_db.detach().to(dtype)
    if not torch.isfinite(x).all():
        raise ValueError(
            "sar_intensity_weight needs finite inputs: x_db contains NaN or inf "
            "(fill or mask no-data pixels before computing the weight)"
        )
    # "db": x is dB; "normalized": x is z-scored dB. Same formula either way (see module docstring).
    p = torch.pow(10.0, x / 10.0)  # (..., H, W) linear power (or P^(1/sigma) up to a factor)
    p_min = p.amin(dim=(-2, -1), keepdim=True)  # (..., 1, 1) per image & channel
    p_max = p.amax(dim=(-2, -1), keepdim=True)  # (..., 1, 1)
    n = (p - p_min) / (p_max - p_min + eps)  # (..., H, W) in [0, 1)
    return torch.exp(k * (1.0 - n))  # (..., H, W) in (1, e^k]
