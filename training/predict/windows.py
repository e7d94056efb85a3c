"""The window lattice and its blending weights (pure numpy).

**Windows and blending.** A fine-tuned segmenter sees 256² windows. Windows sit on one lattice
anchored at the cube's origin: window ``k`` covers rows ``[k·s, k·s + 256)`` with stride
``s = 256 − overlap`` (default overlap 128, i.e. 50 %), the same in x. Each window's class
probabilities (softmax; water: sigmoid) are weighted by ``w(i, j) = sin²(π(i + ½)/256) ·
sin²(π(j + ½)/256)`` — smooth, positive everywhere, and at 50 % overlap the weights of the four
windows over a pixel sum to exactly 1 — and the map is ``Σ w·p / Σ w``, then argmax (water:
``p ≥ threshold``). Because the lattice is global, the map does not depend on how the region is
cut into blocks: a block computes every window that touches it, whatever its neighbours do. A
model whose output at a pixel depends only on that pixel (1×1 convolutions) gives exactly the map
of the model applied to the whole region at once (tested).

The blending itself (a model applied to the windows of one block) is
:func:`training.predict.blocks.predict_array`.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["WINDOW", "blend_weight", "read_window", "region_blocks", "window_starts"]

WINDOW = 256


def window_starts(b0: int, b1: int, stride: int, window: int = WINDOW) -> list[int]:
    """Starts ``k·stride`` of every lattice window ``[k·stride, k·stride + window)`` that
    overlaps ``[b0, b1)`` (pixels of the cube grid; may be negative or run past the cube)."""
    k0 = math.floor((b0 - window) / stride) + 1
    k1 = math.ceil(b1 / stride) - 1
    return [k * stride for k in range(k0, k1 + 1)]


def blend_weight(window: int = WINDOW) -> np.ndarray:
    """``(window, window)`` float32 ``sin²(π(i + ½)/W) · sin²(π(j + ½)/W)``: positive, smooth,
    a partition of unity at 50 % overlap (``sin² + cos² = 1``)."""
    w1 = np.sin(np.pi * (np.arange(window) + 0.5) / window) ** 2
    return np.outer(w1, w1).astype(np.float32)


def read_window(arr, t: int, r0: int, r1: int, c0: int, c1: int) -> np.ndarray:
    """``hh_db[t, r0:r1, c0:c1]`` with NaN outside the array."""
    h, w = arr.shape[-2:]
    out = np.full((r1 - r0, c1 - c0), np.nan, np.float32)
    rr0, rr1, cc0, cc1 = max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)
    if rr0 < rr1 and cc0 < cc1:
        out[rr0 - r0 : rr1 - r0, cc0 - c0 : cc1 - c0] = arr[t, rr0:rr1, cc0:cc1]
    return out


def region_blocks(region: tuple[int, int, int, int], block: int) -> list[tuple[int, int, int, int]]:
    """``region`` = (r0, r1, c0, c1) cut into ``block`` × ``block`` tiles (the last row and
    column of tiles clipped to the region), row by row."""
    r0, r1, c0, c1 = region
    return [
        (r, min(r + block, r1), c, min(c + block, c1))
        for r in range(r0, r1, block)
        for c in range(c0, c1, block)
    ]
