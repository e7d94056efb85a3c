"""The cube grid: one regular EPSG:4326 grid nested in the HR-LULC 1/12000° grid.

Cells are indexed globally from (90°N, 180°W): global cell (R, C) at ``cells_per_degree`` n covers
latitude 90 − (R+1)/n … 90 − R/n and longitude −180 + C/n … −180 + (C+1)/n. Integer indices keep
everything exact: the default n = 6000 (1/6000°, ≈ 18 m × 15 m over Japan) makes each cube cell
exactly 2 × 2 HR-LULC pixels; n = 12000 keeps labels native.

A cube covers global cells [row0, row0 + height) × [col0, col0 + width). Its height and width are
padded up to whole chunks (256), so patch (row, col) = cube pixels [row·256, (row+1)·256) ×
[col·256, (col+1)·256) is always one whole Zarr chunk. Zarr shards group ``shard_chunks``² chunks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from fractions import Fraction
from typing import Any

import numpy as np
from affine import Affine

from .errors import InputError

HRLULC_CELLS_PER_DEGREE = 12000
DEFAULT_CELLS_PER_DEGREE = 6000
CHUNK = 256
DEFAULT_SHARD_CHUNKS = 8  # 2048² px shards: ~16 MB of float32, a few hundred objects per 1° slice


def parse_resolution(value: str | float | int) -> int:
    """``"1/6000"``, ``0.000166666…`` or ``6000`` (cells per degree) -> cells per degree (int).

    The resolution must be 1/n degree for an integer n, so that the grid is exact.
    """
    try:
        if isinstance(value, str) and "/" in value:
            res = Fraction(value)
        else:
            v = float(value)
            res = Fraction(1, round(v)) if v >= 1 else Fraction(v).limit_denominator(1_000_000)
    except (ValueError, ZeroDivisionError):
        raise InputError(
            f"--resolution {value!r}: expected degrees per cell such as 1/6000"
        ) from None
    if res <= 0 or res.numerator != 1:
        raise InputError(
            f"--resolution {value!r}: must be 1/n degree for a whole number n (e.g. 1/6000)"
        )
    return res.denominator


@dataclass(frozen=True)
class CubeGrid:
    """A chunk-padded window of the global 1/n° grid (EPSG:4326)."""

    cells_per_degree: int
    row0: int
    col0: int
    height: int
    width: int
    chunk: int = CHUNK
    shard_chunks: int = DEFAULT_SHARD_CHUNKS

    @classmethod
    def from_bounds(
        cls,
        bounds: tuple[float, float, float, float],
        cells_per_degree: int = DEFAULT_CELLS_PER_DEGREE,
        chunk: int = CHUNK,
        shard_chunks: int = DEFAULT_SHARD_CHUNKS,
    ) -> CubeGrid:
        """Smallest grid covering ``bounds`` (W, S, E, N degrees), snapped outward to cells,
        padded east and south to whole chunks."""
        west, south, east, north = bounds
        if not (west < east and south < north):
            raise InputError(
                f"bbox W {west} S {south} E {east} N {north} is empty (need W < E, S < N)"
            )
        n = cells_per_degree
        eps = 1e-7  # bounds given on the grid (e.g. 140.0) must not snap a whole cell outward
        r0 = math.floor((90.0 - north) * n + eps)
        r1 = math.ceil((90.0 - south) * n - eps)
        c0 = math.floor((west + 180.0) * n + eps)
        c1 = math.ceil((east + 180.0) * n - eps)
        h = -(-(r1 - r0) // chunk) * chunk
        w = -(-(c1 - c0) // chunk) * chunk
        return cls(n, r0, c0, h, w, chunk, shard_chunks)

    @property
    def res(self) -> float:
        return 1.0 / self.cells_per_degree

    @property
    def shard(self) -> int:
        return self.chunk * self.shard_chunks

    @property
    def transform(self) -> Affine:
        n = self.cells_per_degree
        return Affine(1.0 / n, 0.0, -180.0 + self.col0 / n, 0.0, -1.0 / n, 90.0 - self.row0 / n)

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        n = self.cells_per_degree
        return (
            -180.0 + self.col0 / n,
            90.0 - (self.row0 + self.height) / n,
            -180.0 + (self.col0 + self.width) / n,
            90.0 - self.row0 / n,
        )

    @property
    def shape(self) -> tuple[int, int]:
        return self.height, self.width

    def x_coords(self) -> np.ndarray:
        """Longitudes of cell centres (degrees east), (width,)."""
        return -180.0 + (self.col0 + np.arange(self.width) + 0.5) / self.cells_per_degree

    def y_coords(self) -> np.ndarray:
        """Latitudes of cell centres (degrees north, decreasing), (height,)."""
        return 90.0 - (self.row0 + np.arange(self.height) + 0.5) / self.cells_per_degree

    def window_transform(self, row: int, col: int) -> Affine:
        """Affine of the sub-grid whose top-left cube pixel is (row, col)."""
        n = self.cells_per_degree
        return Affine(
            1.0 / n,
            0.0,
            -180.0 + (self.col0 + col) / n,
            0.0,
            -1.0 / n,
            90.0 - (self.row0 + row) / n,
        )

    def window_bounds(
        self, row0: int, row1: int, col0: int, col1: int
    ) -> tuple[float, float, float, float]:
        n = self.cells_per_degree
        return (
            -180.0 + (self.col0 + col0) / n,
            90.0 - (self.row0 + row1) / n,
            -180.0 + (self.col0 + col1) / n,
            90.0 - (self.row0 + row0) / n,
        )

    def bbox_window(
        self, bbox: tuple[float, float, float, float], snap_to_chunks: bool = False
    ) -> tuple[int, int, int, int]:
        """The cube pixels (row0, row1, col0, col1) of every cell that ``bbox`` (W, S, E, N
        degrees) touches, clipped to the cube; ``snap_to_chunks`` widens them to whole chunks.

        Raises InputError when the bbox is empty or does not overlap the cube.
        """
        w, s, e, n = (float(v) for v in bbox)
        if not (w < e and s < n):
            raise InputError(f"--bbox {w} {s} {e} {n}: empty (need W < E and S < N)")
        cpd, eps = self.cells_per_degree, 1e-7  # a bbox on the grid lines takes no extra cell
        r0 = math.floor((90.0 - n) * cpd + eps) - self.row0
        r1 = math.ceil((90.0 - s) * cpd - eps) - self.row0
        c0 = math.floor((w + 180.0) * cpd + eps) - self.col0
        c1 = math.ceil((e + 180.0) * cpd - eps) - self.col0
        r0, r1, c0, c1 = max(r0, 0), min(r1, self.height), max(c0, 0), min(c1, self.width)
        if r0 >= r1 or c0 >= c1:
            raise InputError(
                f"--bbox {w} {s} {e} {n} does not overlap the cube "
                f"(cube bounds W S E N: {' '.join(f'{v:.4f}' for v in self.bounds)})"
            )
        if not snap_to_chunks:
            return r0, r1, c0, c1
        ch = self.chunk
        return (
            r0 // ch * ch,
            min(-(-r1 // ch) * ch, self.height),
            c0 // ch * ch,
            min(-(-c1 // ch) * ch, self.width),
        )

    def shard_blocks(self) -> list[tuple[int, int, int, int]]:
        """(row0, row1, col0, col1) of every shard, in row-major order."""
        s = self.shard
        return [
            (r, min(r + s, self.height), c, min(c + s, self.width))
            for r in range(0, self.height, s)
            for c in range(0, self.width, s)
        ]

    def label_factor(self) -> Fraction:
        """HR-LULC pixels per cube cell along an axis (2 for the default grid)."""
        return Fraction(HRLULC_CELLS_PER_DEGREE, self.cells_per_degree)

    def to_attrs(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any]) -> CubeGrid:
        return cls(
            **{
                k: int(attrs[k])
                for k in (
                    "cells_per_degree",
                    "row0",
                    "col0",
                    "height",
                    "width",
                    "chunk",
                    "shard_chunks",
                )
            }
        )
