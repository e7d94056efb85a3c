"""MixMAE mixing, unmixing and loss (Liu et al. 2023; SAR weighting per docs/design.md §4).

MixMAE replaces the masked tokens of one image by the visible tokens of another instead of by a
mask token, so the encoder never sees a mask token and no compute is spent on them::

    m      (g, g) bool, ONE random mask per batch on the mask-unit grid (32 px), True = 1
    x_mix[i] = x[i] * (1 - m) + x[B-1-i] * m          (image i paired with image B-1-i)

Mixed sample ``i`` therefore holds image ``i`` where ``m = 0`` and image ``B-1-i`` where ``m = 1``.
Because the mask is shared by the batch and the pairing is the batch flip, mixing is an
*involution*: ``mix_pairs(mix_pairs(x, m), m) == x``, which is also how the inputs are unmixed.

Dual reconstruction (decoder side). The decoder gets every encoder token twice, in two
complementary *branches*, stacked on the batch axis as ``(2B, L, D)``::

    branch A (rows 0..B-1):   keep the tokens at m = 0, mask token at m = 1  -> predicts image i
    branch B (rows B..2B-1):  keep the tokens at m = 1, mask token at m = 0  -> predicts image B-1-i

``unmix_reconstruction`` puts, for every image ``i`` and position ``p``, the prediction made by the
branch in which image ``i`` was *masked* at ``p``: ``A[i]`` where ``m = 1``, ``B[B-1-i]`` where
``m = 0``. So both images of a pair are reconstructed at every position, and no loss position was
visible to the branch that predicted it.

Loss (SAR-W-MixMAE): ``mean(W * (x_hat - t)^2)`` over all images, positions and pixels, with
``t`` the per-32-px-patch normalised pixels (MAE's ``norm_pix_loss``) and ``W`` the SAR intensity
weight (``training.sar_weight``) patchified the same way. ``W = 1`` is plain MixMAE. As in
``training.reconstruction`` the weight is *not* in the denominator.

Patch layout (``patchify``) is MAE's: ``(B, C, H, W) -> (B, L, p*p*C)``, tokens row-major, pixels
row-major inside a patch with the channel last (``nhwpqc``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from training.masking import num_masked_units

__all__ = [
    "dual_mask_fill",
    "mask_to_grid",
    "mix_pairs",
    "mixmae_loss",
    "mixmae_mask",
    "normalize_patches",
    "patchify",
    "plot_mixmae_reconstruction",
    "unmix_reconstruction",
    "unpatchify",
]


# -- masks -----------------------------------------------------------------------------------------


def mixmae_mask(
    img_size: int = 256,
    mask_unit: int = 32,
    ratio: float | Sequence[float] = 0.5,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """One random MixMAE mask for a whole batch, on the mask-unit grid.

    Args:
        img_size: image side in pixels (square images).
        mask_unit: side of a mask unit in pixels (32: the encoder's output stride, so that patch
            merging never merges tokens of two images).
        ratio: fraction of units with ``m = 1`` (taken from the partner image), in ``[0, 1]``; or a
            ``(low, high)`` range from which one ratio is drawn uniformly per call (MixMAE's
            ``range_mask_ratio`` is ``(r, r + range)``). Exactly ``ceil(ratio * units)`` units are
            set (``training.masking.num_masked_units``).
        generator: torch random generator for reproducible masks; ``None`` uses the global RNG.
        device: device of the returned mask (default: the generator's device, else CPU).

    Returns:
        Bool tensor ``(g, g)``, ``g = img_size / mask_unit``; ``True`` = the token comes from the
        partner image ``B-1-i`` (= masked for image ``i``).
    """
    if min(img_size, mask_unit) <= 0 or img_size % mask_unit:
        raise ValueError(
            f"img_size ({img_size}) must be a positive multiple of mask_unit ({mask_unit})"
        )
    gen_device = generator.device if generator is not None else torch.device("cpu")
    if isinstance(ratio, (int, float)):
        r = float(ratio)
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    else:
        low, high = (float(v) for v in ratio)
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"ratio range must satisfy 0 <= low <= high <= 1, got {ratio}")
        u = torch.rand((), generator=generator, device=gen_device).item()
        r = low + (high - low) * u
    g = img_size // mask_unit
    units = g * g
    count = num_masked_units(units, r)
    noise = torch.rand(units, generator=generator, device=gen_device)  # (units,)
    mask = torch.zeros(units, dtype=torch.bool, device=gen_device)
    mask[noise.argsort()[:count]] = True  # a uniform random subset of exactly `count` units
    mask = mask.view(g, g)
    return mask if device is None else mask.to(device)


def mask_to_grid(mask: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Nearest-neighbour upsampling of a ``(g, g)`` unit mask to a ``(G, G)`` token/pixel grid.

    ``G`` must be a multiple of ``g`` (each unit becomes a ``G/g``-square block); dtype is kept.
    """
    gh, gw = mask.shape[-2:]
    sh, sw = (size, size) if isinstance(size, int) else size
    if sh % gh or sw % gw:
        raise ValueError(f"grid {(sh, sw)} is not a multiple of the mask grid {(gh, gw)}")
    return mask.repeat_interleave(sh // gh, dim=-2).repeat_interleave(sw // gw, dim=-1)


# -- mixing ----------------------------------------------------------------------------------------


def mix_pairs(x: Tensor, mask: Tensor) -> Tensor:
    """Mix image ``i`` with image ``B-1-i``: ``x * (1 - m) + flip(x) * m``.

    Args:
        x: batch ``(B, ...)``: NHWC tokens ``(B, H, W, C)`` or NCHW images ``(B, C, H, W)``.
        mask: bool (or {0, 1}) mask broadcastable to ``x.shape[1:]``: ``(H, W, 1)`` for NHWC
            tokens, ``(H, W)`` for NCHW images. One mask for the whole batch.

    Returns:
        Mixed batch, same shape and dtype as ``x``. Exact selection (``torch.where``), identical to
        the arithmetic form for a {0, 1} mask but without propagating non-finite values from the
        unused image. Applying it twice with the same mask gives ``x`` back (involution), so this is
        also the input "unmix". With odd ``B`` the middle image is paired with itself.
    """
    m = mask.to(device=x.device, dtype=torch.bool)
    return torch.where(m, x.flip(0), x)


def dual_mask_fill(tokens: Tensor, mask: Tensor, mask_token: Tensor) -> Tensor:
    """The two complementary decoder inputs of MixMAE's dual reconstruction.

    Args:
        tokens: ``(B, L, D)`` decoder-embedded encoder tokens of the mixed batch.
        mask: ``(L,)`` bool token mask (the unit mask, flattened row-major).
        mask_token: ``(D,)`` or broadcastable, e.g. ``(1, 1, D)``.

    Returns:
        ``(2B, L, D)``: rows ``0..B-1`` (branch A) keep the ``m = 0`` tokens and carry the mask
        token at ``m = 1``; rows ``B..2B-1`` (branch B) keep the ``m = 1`` tokens and carry the
        mask token at ``m = 0``.
    """
    if mask.ndim != 1 or mask.shape[0] != tokens.shape[1]:
        raise ValueError(f"mask must be (L,) = ({tokens.shape[1]},), got {tuple(mask.shape)}")
    m = mask.to(device=tokens.device, dtype=torch.bool)[None, :, None]  # (1, L, 1)
    t = mask_token.to(tokens.dtype).expand_as(tokens)  # (B, L, D)
    branch_a = torch.where(m, t, tokens)  # sees image i (m = 0)
    branch_b = torch.where(m, tokens, t)  # sees image B-1-i (m = 1)
    return torch.cat([branch_a, branch_b], dim=0)  # (2B, L, D)


def unmix_reconstruction(
    pred: Tensor, mask: Tensor, take: Literal["masked", "visible"] = "masked"
) -> Tensor:
    """Per-image reconstruction from the two decoder branches.

    Args:
        pred: ``(2B, L, P)`` branch predictions, branch A then branch B (see
            :func:`dual_mask_fill`).
        mask: ``(L,)`` bool token mask.
        take: ``"masked"`` (the loss): for image ``i`` at position ``p`` use the branch that did
            *not* see image ``i`` at ``p``: ``A[i]`` where ``m = 1``, ``B[B-1-i]`` where ``m = 0``.
            ``"visible"``: the complement (``A[i]`` where ``m = 0``, ``B[B-1-i]`` where ``m = 1``):
            the positions where each branch *saw* image ``i``; an identity model gives back
            the targets exactly this way (used to check the bookkeeping).

    Returns:
        ``(B, L, P)``: reconstruction of image ``i`` at every position, in image order.
    """
    if pred.shape[0] % 2:
        raise ValueError(f"pred must stack two branches on dim 0, got batch {pred.shape[0]}")
    if take not in ("masked", "visible"):
        raise ValueError(f"take must be 'masked' or 'visible', got {take!r}")
    branch_a, branch_b = pred.chunk(2, dim=0)  # (B, L, P) each
    m = mask.to(device=pred.device, dtype=torch.bool)[None, :, None]  # (1, L, 1)
    if take == "visible":
        m = ~m
    # branch_b.flip(0)[i] = branch B of sample B-1-i, which saw image i where m = 1
    return torch.where(m, branch_a, branch_b.flip(0))


# -- targets and loss ------------------------------------------------------------------------------


def patchify(x: Tensor, patch: int) -> Tensor:
    """``(B, C, H, W) -> (B, (H/p)(W/p), p*p*C)`` (MAE layout: row-major tokens, ``nhwpqc``)."""
    b, c, h, w = x.shape
    if h % patch or w % patch:
        raise ValueError(f"image {(h, w)} is not divisible by patch {patch}")
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(tokens: Tensor, patch: int, channels: int) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, L, p*p*C) -> (B, C, H, W)`` for a square grid."""
    b, n, d = tokens.shape
    g = math.isqrt(n)
    if g * g != n or d != patch * patch * channels:
        raise ValueError(f"tokens {tuple(tokens.shape)} do not match patch {patch}, C {channels}")
    x = tokens.reshape(b, g, g, patch, patch, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(b, channels, g * patch, g * patch)


def normalize_patches(target: Tensor, eps: float = 1e-6) -> tuple[Tensor, Tensor, Tensor]:
    """MAE's ``norm_pix_loss`` target: ``(t - mean) / sqrt(var + eps)`` per patch.

    Args:
        target: ``(B, L, P)`` patchified pixels.
        eps: added to the variance.

    Returns:
        ``(normalised, mean, std)``; ``mean`` and ``std = sqrt(var + eps)`` are ``(B, L, 1)`` (to
        map predictions back to pixels). ``var`` is the unbiased variance over the ``P`` pixels of
        a patch (``torch.var`` default, as in MAE).
    """
    mean = target.mean(dim=-1, keepdim=True)
    std = (target.var(dim=-1, keepdim=True) + eps).sqrt()
    return (target - mean) / std, mean, std


def mixmae_loss(pred: Tensor, target: Tensor, weight: Tensor | None = None) -> Tensor:
    """SAR-W-MixMAE loss ``mean(W * (pred - target)^2)``.

    Args:
        pred: ``(B, L, P)`` unmixed reconstruction (:func:`unmix_reconstruction`).
        target: ``(B, L, P)`` targets (e.g. :func:`normalize_patches` of :func:`patchify`).
        weight: ``(B, L, P)`` SAR intensity weight patchified like the target, or ``None``
            (``W = 1``: plain MixMAE). Treated as a constant (no gradient).

    Returns:
        Scalar mean over all ``B * L * P`` elements, in at least float32. Every position counts:
        after unmixing each was predicted by a branch that did not see it.
    """
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} != target {tuple(target.shape)}")
    dtype = torch.promote_types(torch.promote_types(pred.dtype, target.dtype), torch.float32)
    err = (pred.to(dtype) - target.to(dtype)) ** 2  # (B, L, P)
    if weight is not None:
        if weight.shape != pred.shape:
            raise ValueError(f"weight {tuple(weight.shape)} != pred {tuple(pred.shape)}")
        err = err * weight.detach().to(dtype)
    return err.mean()


# -- figure ----------------------------------------------------------------------------------------


def _as_image(a: Tensor | np.ndarray) -> np.ndarray:
    """``(C, H, W)``/``(H, W)`` tensor or array -> ``(H, W)`` float array (first channel)."""
    arr = a.detach().float().cpu().numpy() if isinstance(a, Tensor) else np.asarray(a, float)
    if arr.ndim == 3:
        arr = arr[0]
    if arr.ndim != 2:
        raise ValueError(f"expected an (H, W) or (C, H, W) image, got shape {arr.shape}")
    return arr


def plot_mixmae_reconstruction(
    x_pair: Sequence[Tensor | np.ndarray] | Tensor,
    mixed: Tensor | np.ndarray,
    recon_pair: Sequence[Tensor | np.ndarray] | Tensor,
    path: str | Path,
    titles: Sequence[str] = ("image i", "image B-1-i"),
) -> Path:
    """PNG of one MixMAE pair: both images, the mixed input, both reconstructions.

    Args:
        x_pair: the two original images, ``(2, C, H, W)`` or two ``(C, H, W)``/``(H, W)``.
        mixed: the mixed input of sample ``i``, ``(C, H, W)`` or ``(H, W)``.
        recon_pair: the two unmixed reconstructions in pixel units, like ``x_pair``.
        path: output PNG path (parent directories are created).
        titles: names of the two images.

    Returns:
        ``Path(path)``. Originals and reconstructions of an image share one grey scale (2-98 %
        of the original), so a faithful reconstruction looks the same; only the first channel is
        drawn.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [_as_image(a) for a in x_pair]
    rs = [_as_image(a) for a in recon_pair]
    if len(xs) != 2 or len(rs) != 2:
        raise ValueError("x_pair and recon_pair must hold two images each")
    mix = _as_image(mixed)
    limits = [tuple(np.percentile(a, [2, 98])) for a in xs]
    panels = [
        (xs[0], f"{titles[0]}", limits[0]),
        (xs[1], f"{titles[1]}", limits[1]),
        (mix, "mixed input", tuple(np.percentile(mix, [2, 98]))),
        (rs[0], f"reconstruction of {titles[0]}", limits[0]),
        (rs[1], f"reconstruction of {titles[1]}", limits[1]),
    ]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.5))
    for ax, (img, title, (lo, hi)) in zip(axes, panels, strict=True):
        ax.imshow(img, cmap="gray", vmin=lo, vmax=hi, interpolation="nearest")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out
