"""SimMIM random masking on a coarse mask-unit grid, expressed on the encoder's token grid.

SimMIM masks square *mask units* (16 or 32 px) rather than single 4-px tokens: masking at the token
size leaves too many visible neighbours and makes reconstruction trivial interpolation. A mask is
drawn on the ``(img / mask_unit)^2`` unit grid with exactly ``ceil(ratio * units)`` masked units per
image (as SimMIM's ``MaskGenerator``), then repeated to the ``(img / token_size)^2`` token grid that
the encoder's mask token replaces, and to pixels for the loss.

Masks are bool tensors, ``True`` = masked.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["mask_to_pixels", "num_masked_units", "simmim_mask"]


def num_masked_units(units: int, ratio: float) -> int:
    """Number of masked units, ``ceil(ratio * units)``.

    A product within 1e-9 of an integer is taken as that integer, so float round-off cannot push
    the ceiling up by one (``0.07 * 100`` is ``7.000000000000001`` in floating point, and must
    give 7, not 8).
    """
    r = ratio * units
    nearest = round(r)
    return nearest if abs(r - nearest) < 1e-9 * max(1, units) else math.ceil(r)


def simmim_mask(
    batch: int,
    img_size: int = 256,
    mask_unit: int = 16,
    token_size: int = 4,
    ratio: float = 0.6,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Random SimMIM masks on the token grid.

    Args:
        batch: number of masks ``B`` (one independent mask per image).
        img_size: image side in pixels (square images).
        mask_unit: side of a mask unit in pixels (16 for SAR-W-SimMIM; 32 also supported).
        token_size: encoder patch size in pixels (4 for Swin); the mask is returned at this
            resolution.
        ratio: fraction of mask units to mask, in ``[0, 1]``; exactly ``ceil(ratio * units)`` units
            are masked in every image.
        generator: torch random generator for reproducible masks (draws happen on its device);
            ``None`` uses the global RNG.
        device: device of the returned mask (default: the generator's device, else CPU).

    Returns:
        Bool tensor ``(B, img_size / token_size, img_size / token_size)``, ``True`` = masked;
        constant within each ``(mask_unit / token_size)^2`` block of tokens.

    Raises:
        ValueError: non-positive sizes, ``img_size`` not divisible by ``mask_unit``, ``mask_unit``
            not divisible by ``token_size``, or ``ratio`` outside ``[0, 1]``.
    """
    if batch < 0:
        raise ValueError(f"batch must be >= 0, got {batch}")
    if min(img_size, mask_unit, token_size) <= 0:
        raise ValueError(
            f"img_size, mask_unit and token_size must be positive, got "
            f"{img_size}, {mask_unit}, {token_size}"
        )
    if img_size % mask_unit:
        raise ValueError(f"img_size ({img_size}) must be divisible by mask_unit ({mask_unit})")
    if mask_unit % token_size:
        raise ValueError(f"mask_unit ({mask_unit}) must be divisible by token_size ({token_size})")
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")

    grid = img_size // mask_unit  # mask units per side
    scale = mask_unit // token_size  # tokens per mask unit side
    units = grid * grid
    count = num_masked_units(units, ratio)

    gen_device = generator.device if generator is not None else torch.device("cpu")
    # A uniform random permutation per image: argsort of i.i.d. uniforms; the first `count` ranks
    # are masked. Vectorised over the batch (no Python loop) and reproducible with `generator`.
    noise = torch.rand(batch, units, generator=generator, device=gen_device)  # (B, units)
    idx = noise.argsort(dim=1)[:, :count]  # (B, count)
    mask = torch.zeros(batch, units, dtype=torch.bool, device=gen_device)  # (B, units)
    mask.scatter_(1, idx, True)
    mask = mask.view(batch, grid, grid)  # (B, g, g) unit grid
    mask = mask.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)  # (B, G, G) tokens
    return mask if device is None else mask.to(device)


def mask_to_pixels(mask: Tensor, token_size: int = 4) -> Tensor:
    """Upsample a token mask to pixels.

    Args:
        mask: ``(B, Ht, Wt)`` token mask (any dtype, typically bool).
        token_size: pixels per token side.

    Returns:
        ``(B, 1, Ht * token_size, Wt * token_size)`` pixel mask, same dtype as ``mask``; the channel
        axis of size 1 broadcasts over image channels in the loss.
    """
    if mask.ndim != 3:
        raise ValueError(f"mask must have shape (B, Ht, Wt), got {tuple(mask.shape)}")
    if token_size <= 0:
        raise ValueError(f"token_size must be positive, got {token_size}")
    px = mask.repeat_interleave(token_size, dim=1).repeat_interleave(token_size, dim=2)
    return px.unsqueeze(1)  # (B, 1, H, W)
