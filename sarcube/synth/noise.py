"""Deterministic, block-seamless value noise on a global pixel lattice.

The generator works window by window (one strip of a tile or scene at a time, bounded memory), so
every random field must be a pure function of *global* pixel coordinates and the seed: two windows
that overlap see identical values, and a re-run is bit-identical. numpy's Generators cannot do that
(their streams depend on the order of draws), so lattice values come from a counter-based hash
(splitmix64 finaliser) and are interpolated separably (smoothstep weights).
"""

from __future__ import annotations

import numpy as np

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xBF58476D1CE4E5B9)
_M3 = np.uint64(0x94D049BB133111EB)
_P1 = np.uint64(0xD6E8FEB86659FD93)
_P2 = np.uint64(0xCA5A826395121157)


def hash_uniform(iy: np.ndarray | int, ix: np.ndarray | int, seed: int) -> np.ndarray:
    """Uniform [0, 1) float64 from integer lattice coordinates (broadcast) and a seed."""
    iy = np.asarray(iy, dtype=np.int64).astype(np.uint64)
    ix = np.asarray(ix, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        z = iy * _P1 ^ ix * _P2 ^ (np.uint64(seed & 0xFFFFFFFFFFFF) + np.uint64(1)) * _M1
        z = (z ^ (z >> np.uint64(30))) * _M2
        z = (z ^ (z >> np.uint64(27))) * _M3
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def _axis_weights(start: int, n: int, cell: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Lattice index (relative), smoothstep weight, first lattice index and lattice count."""
    pos = (np.arange(start, start + n, dtype=np.float64) + 0.5) / cell
    base = np.floor(pos).astype(np.int64)
    t = pos - base
    w = t * t * (3.0 - 2.0 * t)
    first = int(base[0])
    return base - first, w, first, int(base[-1]) - first + 2


def value_noise(row0: int, col0: int, h: int, w: int, cell: int, seed: int) -> np.ndarray:
    """Smooth noise in [-1, 1], (h, w) float32, lattice spacing ``cell`` pixels.

    Pixel (r, c) of the window is global pixel (row0 + r, col0 + c).
    """
    ry, wy, fy, ny = _axis_weights(row0, h, cell)
    rx, wx, fx, nx = _axis_weights(col0, w, cell)
    lattice = hash_uniform(
        np.arange(fy, fy + ny)[:, None], np.arange(fx, fx + nx)[None, :], seed
    ).astype(np.float32)
    # Interpolate along columns on the few lattice rows first, then along rows by whole-row
    # gathers (contiguous copies): ~5 passes over the output instead of scattered gathers.
    wxf = wx.astype(np.float32)
    cols = lattice[:, rx] * (1 - wxf) + lattice[:, rx + 1] * wxf  # (ny, w)
    wyf = wy.astype(np.float32)[:, None]
    out = cols[ry]
    out *= 1 - wyf
    nxt = cols[ry + 1]
    nxt *= wyf
    out += nxt  # (h, w)
    return out * 2.0 - 1.0


def fractal_noise(
    row0: int, col0: int, h: int, w: int, cells: tuple[int, ...], seed: int
) -> np.ndarray:
    """Sum of value-noise octaves (amplitude halves with each cell size), scaled to about
    [-1, 1]."""
    out = np.zeros((h, w), dtype=np.float32)
    amp, total = 1.0, 0.0
    for i, cell in enumerate(cells):
        out += np.float32(amp) * value_noise(row0, col0, h, w, cell, seed * 1000003 + i)
        total += amp
        amp *= 0.5
    out /= np.float32(total)
    return out


def cell_hash(iy: np.ndarray | int, ix: np.ndarray | int, seed: int) -> np.ndarray:
    """Uniform [0, 1) per integer cell (parcels, point scatterers), float32."""
    return hash_uniform(iy, ix, seed).astype(np.float32)
