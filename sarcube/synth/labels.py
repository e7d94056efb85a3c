"""Synthetic HR-LULC labels at 10 m (1/12000°) that look like Japan.

A coarse class map — the real national 250 m HR-LULC map (1/480°, 25 × 25 fine pixels per cell)
or a procedural stand-in with Japan's land class shares — is refined to the 10 m grid:

1. **Domain warping**: each fine pixel takes the coarse class found at its own position displaced
   by smooth multi-octave noise (up to ~0.6 coarse cells). Block edges of the coarse map become
   organic, fractal boundaries (forest edges, coastlines) while class areas are kept on average.
2. **Field mosaics**: paddy and cropland are cut into parcels (~120 m × 180 m, rows of parcels
   offset from each other); a few parcels switch between paddy, cropland and grassland.
3. **Thin rivers** (water, 1–3 px): the zero contour of a smooth noise field, away from forest.
4. **Roads** (built-up, 1–2 px): farm tracks along parcel rows, and a few meandering main roads.

Every field is a function of global pixel coordinates, so windows are seamless and deterministic.
Global fine-grid pixel (row, col) covers latitude 90 − (row+1)/12000 … 90 − row/12000 and
longitude −180 + col/12000 … −180 + (col+1)/12000.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import rasterio
from rasterio.windows import Window

from ..classes import JAPAN_LAND_SHARES_PCT
from ..errors import InputError
from .noise import cell_hash, fractal_noise

FINE_PER_DEG = 12000  # HR-LULC pixel: 1/12000°
COARSE_FACTOR = 25  # 250 m map pixel (1/480°) = 25 fine pixels
COARSE_PER_DEG = FINE_PER_DEG // COARSE_FACTOR

WARP_AMPLITUDE_PX = 15.0
AGRI_CODES = (3, 4)
FOREST = (6, 7, 8, 9, 11)
PARCEL_H, PARCEL_W = 12, 18  # fine pixels (~110 m × 135 m at 36°N)


class TemplateError(InputError):
    """The LULC template cannot serve the requested area."""


@dataclass
class CoarseTemplate:
    """Coarse class map on the global 1/480° lattice: cell (i, j) = global coarse
    (row0+i, col0+j)."""

    codes: np.ndarray  # (H, W) uint8 JAXA codes, 0 = no data (open sea)
    row0: int
    col0: int
    source: str

    def lookup(self, crow: np.ndarray, ccol: np.ndarray) -> np.ndarray:
        i = crow - self.row0
        j = ccol - self.col0
        h, w = self.codes.shape
        inside = (i >= 0) & (i < h) & (j >= 0) & (j < w)
        out = np.zeros(i.shape, dtype=np.uint8)
        out[inside] = self.codes[i[inside], j[inside]]
        return out


def coarse_window(
    bounds: tuple[float, float, float, float], margin: int = 2
) -> tuple[int, int, int, int]:
    """(row0, col0, h, w) on the global coarse lattice covering lon/lat bounds plus a margin."""
    west, south, east, north = bounds
    r0 = int(np.floor((90.0 - north) * COARSE_PER_DEG)) - margin
    r1 = int(np.ceil((90.0 - south) * COARSE_PER_DEG)) + margin
    c0 = int(np.floor((west + 180.0) * COARSE_PER_DEG)) - margin
    c1 = int(np.ceil((east + 180.0) * COARSE_PER_DEG)) + margin
    return r0, c0, r1 - r0, c1 - c0


def read_template(
    path: str | Path,
    world: tuple[float, float, float, float],
    region: tuple[float, float, float, float],
) -> CoarseTemplate:
    """Read the real 250 m HR-LULC map (or any EPSG:4326 map on the 1/480° lattice) for ``world``.

    ``region`` (the area to generate) must lie inside the map; ``world`` (region plus scene
    footprints) may extend beyond it and is filled with 0 there.
    """
    path = str(path)
    try:
        ds = rasterio.open(path)
    except rasterio.errors.RasterioIOError as e:
        raise TemplateError(f"{path}: cannot open the LULC template ({e})") from None
    with ds:
        if ds.crs is None or ds.crs.to_epsg() != 4326:
            raise TemplateError(f"{path}: LULC template must be in EPSG:4326, found {ds.crs}")
        a, _, x0, _, e_y, y0 = ds.transform[:6]
        if not (
            np.isclose(a * COARSE_PER_DEG, 1, atol=1e-6)
            and np.isclose(-e_y * COARSE_PER_DEG, 1, atol=1e-6)
        ):
            raise TemplateError(
                f"{path}: LULC template pixel must be 1/{COARSE_PER_DEG}° (the 250 m HR-LULC map), "
                f"found {a:.8f}° × {-e_y:.8f}°"
            )
        trow0 = round((90.0 - y0) * COARSE_PER_DEG)
        tcol0 = round((x0 + 180.0) * COARSE_PER_DEG)
        west, south, east, north = region
        b = ds.bounds
        tol = 1e-6
        if (
            west < b.left - tol
            or east > b.right + tol
            or south < b.bottom - tol
            or north > b.top + tol
        ):
            raise TemplateError(
                f"bbox {region} is outside the LULC template {path} "
                f"(which covers W {b.left:.4f} S {b.bottom:.4f} E {b.right:.4f} N {b.top:.4f})"
            )
        r0, c0, h, w = coarse_window(world)
        win = Window(c0 - tcol0, r0 - trow0, w, h)
        codes = ds.read(1, window=win, boundless=True, fill_value=0).astype(np.uint8)
    codes[codes > 14] = 0
    return CoarseTemplate(codes, r0, c0, source=Path(path).name)


def _quantile_assign(
    score: np.ndarray, ref: np.ndarray, codes: list[int], shares: list[float]
) -> np.ndarray:
    """Assign ``codes`` by increasing ``score``, with cut points at the quantiles of ``ref`` (the
    cells inside the region) so that, inside the region, each code gets its share of cells."""
    cuts = (
        np.quantile(ref, np.cumsum(shares)[:-1] / sum(shares))
        if ref.size
        else np.zeros(len(codes) - 1)
    )
    return np.asarray(codes, dtype=np.uint8)[np.searchsorted(cuts, score, side="right")]


def procedural_template(
    world: tuple[float, float, float, float],
    region: tuple[float, float, float, float],
    seed: int,
) -> CoarseTemplate:
    """A coarse class map with Japan's land class shares (``JAPAN_LAND_SHARES_PCT``) in ``region``.

    An 'elevation' noise field splits lowland from upland (forest, 70 % of land in Japan); lakes
    take the lowest ground; a second 'urban' field clusters built-up, greenhouses and solar farms
    apart from paddy and cropland; a third mixes the forest types. Cut points are quantiles over
    the cells inside ``region``, so the shares hold there; the rest of ``world`` (scene margins)
    follows the same cut points.
    """
    r0, c0, h, w = coarse_window(world)
    elev = fractal_noise(r0, c0, h, w, (64, 32, 16, 8), seed + 11)
    urban = fractal_noise(r0, c0, h, w, (16, 8, 4), seed + 12)
    mix = fractal_noise(r0, c0, h, w, (24, 12, 6), seed + 13)
    rr0, rc0, rh, rw = coarse_window(region, margin=0)
    inside = np.zeros((h, w), dtype=bool)
    inside[rr0 - r0 : rr0 - r0 + rh, rc0 - c0 : rc0 - c0 + rw] = True
    s = JAPAN_LAND_SHARES_PCT
    upland_codes = [11, 6, 8, 9, 7]
    low_codes_by_urban = [13, 10, 5, 3, 4, 12, 14, 2]  # low urban score -> wetland ... built-up
    up_share = sum(s[c] for c in upland_codes)
    low_share = sum(s[c] for c in low_codes_by_urban)
    # 0 water, 1 lowland, 2 upland by elevation
    zone = _quantile_assign(elev, elev[inside], [0, 1, 2], [s[1], low_share, up_share])
    out = np.ones((h, w), dtype=np.uint8)  # zone 0 -> water (code 1)
    low, up = zone == 1, zone == 2
    out[low] = _quantile_assign(
        urban[low], urban[low & inside], low_codes_by_urban, [s[c] for c in low_codes_by_urban]
    )
    out[up] = _quantile_assign(
        mix[up], mix[up & inside], upland_codes, [s[c] for c in upland_codes]
    )
    return CoarseTemplate(out, r0, c0, source="procedural")


@dataclass
class LabelModel:
    """Refines a coarse template to fine 10 m labels, window by window."""

    template: CoarseTemplate
    seed: int

    def window(self, row0: int, col0: int, h: int, w: int, texture: bool = False):
        """Fine labels for global fine pixels [row0, row0+h) × [col0, col0+w): (h, w) uint8.

        With ``texture=True`` also return a (h, w) float32 field in [0, 1) that is constant
        per field parcel (used by the scene generator for parcel-to-parcel backscatter changes).
        """
        s = self.seed
        rows = np.arange(row0, row0 + h, dtype=np.int64)[:, None]
        cols = np.arange(col0, col0 + w, dtype=np.int64)[None, :]
        cells = (64, 32, 16, 8)
        dy = fractal_noise(row0, col0, h, w, cells, s + 1) * np.float32(WARP_AMPLITUDE_PX * 1.6)
        dx = fractal_noise(row0, col0, h, w, cells, s + 2) * np.float32(WARP_AMPLITUDE_PX * 1.6)
        crow = np.floor((rows + 0.5 + dy) / COARSE_FACTOR).astype(np.int64)
        ccol = np.floor((cols + 0.5 + dx) / COARSE_FACTOR).astype(np.int64)
        del dy, dx
        lab = self.template.lookup(crow, ccol)
        del crow, ccol

        # Field parcels: rows of parcels, each row shifted by a random offset; one uniform
        # value per parcel, hashed on the (small) parcel lattice and gathered per pixel.
        prow = rows // PARCEL_H  # (h, 1)
        p0 = int(prow[0, 0])
        prows = np.arange(p0, int(prow[-1, 0]) + 1)
        shift = (cell_hash(prows, 0, s + 3) * PARCEL_W).astype(np.int64)  # per parcel row
        pcol = (cols + shift[prow[:, 0] - p0][:, None]) // PARCEL_W  # (h, w)
        q0 = (col0 // PARCEL_W) - 1
        lattice = cell_hash(prows[:, None], np.arange(q0, q0 + w // PARCEL_W + 4)[None, :], s + 4)
        u = lattice[prow - p0, pcol - q0]  # (h, w)
        del pcol
        agri = np.isin(lab, AGRI_CODES)
        swap = agri & (u < 0.08)
        lab[swap] = np.where(lab[swap] == 3, 4, 3).astype(np.uint8)
        lab[agri & (u >= 0.08) & (u < 0.10)] = 5
        # Farm tracks: the first pixel row of every 4th parcel row, inside fields.
        track = ((rows % PARCEL_H) == 0) & ((prow % 4) == 0)
        lab[agri & track] = 2

        land = lab > 0
        # Rivers: a band around the zero contour of a smooth field, through open land only.
        river = np.abs(fractal_noise(row0, col0, h, w, (400, 200, 100), s + 5))
        open_land = land & ~np.isin(lab, FOREST)
        lab[open_land & (river < 0.004)] = 1
        # Main roads: the zero contour of another field, across everything but water.
        road = np.abs(fractal_noise(row0, col0, h, w, (300, 150), s + 6))
        lab[land & (lab != 1) & (road < 0.0025)] = 2
        if not texture:
            return lab
        return lab, u

    def texture_noise(self, row0: int, col0: int, h: int, w: int) -> np.ndarray:
        """Within-class backscatter texture in [-1, 1] on the fine grid (forest canopy, grass)."""
        return fractal_noise(row0, col0, h, w, (24, 8), self.seed + 7)

    def bright_points(self, row0: int, col0: int, h: int, w: int) -> np.ndarray:
        """Uniform [0, 1) per fine pixel, for sparse strong scatterers (double bounce)."""
        rows = np.arange(row0, row0 + h, dtype=np.int64)[:, None]
        cols = np.arange(col0, col0 + w, dtype=np.int64)[None, :]
        return cell_hash(rows, cols, self.seed + 8)
