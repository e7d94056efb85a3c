"""Synthetic ALOS-2 PALSAR-2 L2.1-style HH scenes (uint16 amplitude DN GeoTIFFs in UTM).

Each scene is a north-up UTM raster with ~6.25 m pixels, holding a tilted swath footprint (a
rotated rectangle along the satellite track) and DN 0 outside it. Backscatter follows the 10 m
labels of the same area: a per-class σ⁰ table with seasonal change (``sigma0_table``), texture
within classes (forest canopy, parcel-to-parcel differences, some parcels changing between dates),
sparse bright double-bounce points in built-up areas, a small incidence-angle trend across the
swath, and multiplicative gamma speckle with ``looks`` looks (intensity ~ Gamma(L, 1/L)).
DN = round(sqrt(σ⁰_linear · speckle / 10^(CF/10))), inverting σ⁰ = 10·log10(DN²) + CF, CF = −83 dB.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import rasterio
from affine import Affine
from pyproj import Transformer
from rasterio.windows import Window

from ..products import SceneName
from ..radiometry import calibration_factor
from .labels import FINE_PER_DEG, FOREST, LabelModel
from .noise import hash_uniform

PIXEL_M = 6.25
STRIP_ROWS = 512
NODE_STEP = 64  # exact projection every 64 px, bilinear in between (error ≪ 1 mm)
ALOS2_LAUNCH = dt.date(2014, 5, 24)
ORBITS_PER_14_DAYS = 207  # ALOS-2 repeat cycle: 207 revolutions in 14 days

# Typical L-band HH σ⁰ (dB) per JAXA code; 0 = open sea outside the land-cover map.
CLASS_SIGMA0_DB: dict[int, float] = {
    0: -24.0,
    1: -22.0,
    2: 0.0,
    3: -12.5,
    4: -13.0,
    5: -16.0,
    6: -8.0,
    7: -8.5,
    8: -7.5,
    9: -8.0,
    10: -17.0,
    11: -8.0,
    12: -19.0,
    13: -18.0,
    14: -3.0,
}
# Seasonal change by month (dB): paddy fields are harvested in September and left bare and wet;
# cropland is harvested later; deciduous canopies thin out in November.
SEASONAL_DELTA_DB: dict[int, dict[int, float]] = {
    3: {8: 1.5, 9: 0.5, 10: -1.5, 11: -2.5},
    4: {10: -0.5, 11: -1.0},
    6: {11: -0.7},
    7: {11: -1.0},
}
TEXTURE_DB = {c: 1.2 for c in FOREST} | {3: 1.0, 4: 1.0, 5: 1.0, 10: 1.0, 13: 1.0}
PARCEL_CODES = (3, 4, 5)  # managed fields: parcel-to-parcel offsets and changes between dates
PARCEL_CHANGE_PROB = 0.15  # share of parcels whose backscatter changes ±3 dB at each date
BRIGHT_POINT_PROB = 0.06  # built-up pixels with a strong double-bounce return (+10 dB)
INCIDENCE_TREND_DB = 0.5  # ± across the swath, near range brighter


def sigma0_table(date: dt.date) -> np.ndarray:
    """(256,) float32: the mean-intensity σ⁰ in dB for each JAXA code on a date (NaN: unused)."""
    lut = np.full(256, np.nan, dtype=np.float32)
    for code, base in CLASS_SIGMA0_DB.items():
        lut[code] = base + SEASONAL_DELTA_DB.get(code, {}).get(date.month, 0.0)
    return lut


@dataclass(frozen=True)
class SceneSpec:
    """Geometry and identity of one synthetic scene."""

    name: SceneName
    epsg: int
    transform: Affine
    width: int
    height: int
    center: tuple[float, float]  # UTM metres
    heading_deg: float  # track direction, clockwise from north
    swath_m: float
    length_m: float
    footprint_lonlat: list[tuple[float, float]] = field(default_factory=list)

    @property
    def filename(self) -> str:
        return self.name.filename(".tif")


def utm_epsg(lon: float, lat: float) -> int:
    zone = int(np.floor((lon + 180.0) / 6.0)) % 60 + 1
    return (32600 if lat >= 0 else 32700) + zone


def orbit_number(date: dt.date) -> int:
    """Approximate ALOS-2 absolute orbit on a date (matches JAXA's numbering within a few)."""
    return round((date - ALOS2_LAUNCH).days * ORBITS_PER_14_DAYS / 14)


def frame_number(lat: float, direction: str) -> int:
    """ALOS-2 frame (0–7199, 0.05° of orbit each) of a scene centre latitude."""
    frame = (180.0 - lat) / 360.0 * 7200 if direction == "D" else lat / 360.0 * 7200
    return round(frame) % 7200


def _corners(cx, cy, heading_deg, swath, length):
    h = np.deg2rad(heading_deg)
    u = np.array([np.sin(h), np.cos(h)])  # along track
    v = np.array([np.cos(h), -np.sin(h)])  # cross track (to the right of the track)
    c = np.array([cx, cy])
    return [
        tuple(c + a * u * length / 2 + b * v * swath / 2)
        for a, b in ((1, -1), (1, 1), (-1, 1), (-1, -1))
    ]


def plan_scenes(
    bbox: tuple[float, float, float, float],
    dates: list[dt.date],
    scenes_per_date: int,
    seed: int,
    direction: str = "D",
    mode: str = "FBS",
    coverage: tuple[float, float] = (1.0, 1.15),
) -> list[SceneSpec]:
    """Lay out scene footprints over a bbox: per date, ``scenes_per_date`` consecutive frames
    along one descending (or ascending) pass, overlapping by 8 %; the pass shifts a little from
    date to date (orbit tube). The swath covers ``coverage`` × the bbox's width × height, so the
    tilted footprint leaves no-data corners."""
    west, south, east, north = bbox
    lon_c, lat_c = (west + east) / 2, (south + north) / 2
    epsg = utm_epsg(lon_c, lat_c)
    to_utm = Transformer.from_crs(4326, epsg, always_xy=True)
    to_ll = Transformer.from_crs(epsg, 4326, always_xy=True)
    t = np.linspace(0, 1, 21)
    ex = np.concatenate(
        [west + (east - west) * t, np.full(21, east), west + (east - west) * t, np.full(21, west)]
    )
    ey = np.concatenate(
        [
            np.full(21, south),
            south + (north - south) * t,
            np.full(21, north),
            south + (north - south) * t,
        ]
    )
    ux, uy = to_utm.transform(ex, ey)
    cx, cy = to_utm.transform(lon_c, lat_c)
    width_m, height_m = float(np.ptp(ux)), float(np.ptp(uy))
    swath = coverage[0] * width_m
    total = coverage[1] * height_m
    overlap = 0.08
    frame_len = total / (scenes_per_date - (scenes_per_date - 1) * overlap)
    heading = 190.0 if direction == "D" else 350.0
    h = np.deg2rad(heading)
    u = np.array([np.sin(h), np.cos(h)])
    v = np.array([np.cos(h), -np.sin(h)])
    specs = []
    for di, date in enumerate(dates):
        jitter = (hash_uniform(di, 0, seed + 97).item() - 0.5) * 0.06 * swath
        for k in range(scenes_per_date):
            along = (k - (scenes_per_date - 1) / 2) * frame_len * (1 - overlap)
            if direction == "D":
                along = -along  # frames of a descending pass run north to south
            c = np.array([cx, cy]) + u * along + v * jitter
            corners = _corners(c[0], c[1], heading, swath, frame_len)
            xs, ys = zip(*corners, strict=True)
            x0 = np.floor(min(xs) / PIXEL_M) * PIXEL_M
            y1 = np.ceil(max(ys) / PIXEL_M) * PIXEL_M
            w = int(np.ceil((max(xs) - x0) / PIXEL_M))
            hgt = int(np.ceil((y1 - min(ys)) / PIXEL_M))
            _lon, lat = to_ll.transform(*c)
            name = SceneName(
                "HH",
                orbit_number(date),
                frame_number(lat, direction),
                date,
                mode,
                "R",
                "2.1",
                "G",
                "U",
                direction,
            )
            flon, flat = to_ll.transform(xs, ys)
            specs.append(
                SceneSpec(
                    name=name,
                    epsg=epsg,
                    transform=Affine(PIXEL_M, 0, x0, 0, -PIXEL_M, y1),
                    width=w,
                    height=hgt,
                    center=(float(c[0]), float(c[1])),
                    heading_deg=heading,
                    swath_m=swath,
                    length_m=frame_len,
                    footprint_lonlat=[
                        (float(a), float(b)) for a, b in zip(flon, flat, strict=True)
                    ],
                )
            )
    return specs


def scene_lonlat_bounds(specs: list[SceneSpec]) -> tuple[float, float, float, float]:
    lons = [p[0] for s in specs for p in s.footprint_lonlat]
    lats = [p[1] for s in specs for p in s.footprint_lonlat]
    return min(lons), min(lats), max(lons), max(lats)


def _bilinear_nodes(nodes: np.ndarray, n_rows: int, n_cols: int, step: int) -> np.ndarray:
    """Upsample values at pixel (i·step, j·step) to every pixel of an (n_rows, n_cols) block."""
    pr = np.arange(n_rows) / step
    pc = np.arange(n_cols) / step
    ir, ic = np.floor(pr).astype(int), np.floor(pc).astype(int)
    wr, wc = (pr - ir)[:, None], pc - ic
    cols = nodes[:, ic] * (1 - wc) + nodes[:, ic + 1] * wc
    return cols[ir] * (1 - wr) + cols[ir + 1] * wr


class SceneRenderer:
    """Renders one scene strip by strip (bounded memory: one strip per worker thread)."""

    def __init__(
        self, spec: SceneSpec, labels: LabelModel, looks: float, seed: int, scene_index: int
    ):
        self.spec, self.labels, self.looks = spec, labels, looks
        self.seed, self.scene_index = seed, scene_index
        self.to_ll = Transformer.from_crs(spec.epsg, 4326, always_xy=True)
        self.sigma0 = sigma0_table(spec.name.date)
        self.cf = calibration_factor("L2.1")
        self.texture_db = np.zeros(256, dtype=np.float32)
        for code, amp in TEXTURE_DB.items():
            self.texture_db[code] = amp
        self.is_parcel = np.zeros(256, dtype=bool)
        self.is_parcel[list(PARCEL_CODES)] = True
        self.month_key = spec.name.date.toordinal() * 0.6180339887

    def strip(self, row0: int) -> tuple[int, np.ndarray]:
        spec = self.spec
        h = min(STRIP_ROWS, spec.height - row0)
        w = spec.width
        x0, y0 = spec.transform.c, spec.transform.f
        # Map coordinates of pixel centres, and lon/lat from exact nodes + bilinear.
        nr, nc = h // NODE_STEP + 2, w // NODE_STEP + 2
        nx = x0 + (np.arange(nc) * NODE_STEP + 0.5) * PIXEL_M
        ny = y0 - (row0 + np.arange(nr) * NODE_STEP + 0.5) * PIXEL_M
        gx, gy = np.meshgrid(nx, ny)
        glon, glat = self.to_ll.transform(gx, gy)
        lon = _bilinear_nodes(np.asarray(glon), h, w, NODE_STEP)
        lat = _bilinear_nodes(np.asarray(glat), h, w, NODE_STEP)
        # Footprint (rotated rectangle) and cross-track position for the incidence trend.
        xs = (x0 + (np.arange(w) + 0.5) * PIXEL_M - spec.center[0])[None, :]
        ys = (y0 - (row0 + np.arange(h) + 0.5) * PIXEL_M - spec.center[1])[:, None]
        hd = np.deg2rad(spec.heading_deg)
        along = xs * np.sin(hd) + ys * np.cos(hd)
        cross = xs * np.cos(hd) - ys * np.sin(hd)
        inside = (np.abs(along) <= spec.length_m / 2) & (np.abs(cross) <= spec.swath_m / 2)
        dn = np.zeros((h, w), dtype=np.uint16)
        if not inside.any():
            return row0, dn
        frow = np.floor((90.0 - lat) * FINE_PER_DEG).astype(np.int64)
        fcol = np.floor((lon + 180.0) * FINE_PER_DEG).astype(np.int64)
        del lon, lat
        r0, c0 = int(frow[inside].min()), int(fcol[inside].min())
        lh, lw = int(frow[inside].max()) - r0 + 1, int(fcol[inside].max()) - c0 + 1
        lab, parcel = self.labels.window(r0, c0, lh, lw, texture=True)
        tex = self.labels.texture_noise(r0, c0, lh, lw)
        pts = self.labels.bright_points(r0, c0, lh, lw)
        ri = np.clip(frow - r0, 0, lh - 1)
        ci = np.clip(fcol - c0, 0, lw - 1)
        del frow, fcol
        cls = lab[ri, ci]
        # Backscatter in dB: class table + texture + parcel changes + bright points + trend.
        db = self.sigma0[cls]
        tex_amp = self.texture_db[cls]
        u = parcel[ri, ci]
        fields = self.is_parcel[cls]
        db += tex_amp * tex[ri, ci] * np.where(fields, 0.6, 1.0).astype(np.float32)
        db += np.where(fields, (u - 0.5) * 1.6, 0).astype(np.float32)
        change = np.modf(u * 9973.0 + self.month_key)[0]
        changed = fields & (change < PARCEL_CHANGE_PROB)
        db[changed] += np.where(change[changed] < PARCEL_CHANGE_PROB / 2, 3.0, -3.0).astype(
            np.float32
        )
        bright = (cls == 2) & (pts[ri, ci] < BRIGHT_POINT_PROB)
        db[bright] += 10.0
        db -= (cross * (2 * INCIDENCE_TREND_DB / spec.swath_m)).astype(np.float32)
        # Speckle: intensity × Gamma(L, 1/L); a generator per (seed, scene, strip) for determinism.
        rng = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, self.scene_index, row0]))
        )
        speckle = rng.standard_gamma(self.looks, size=(h, w), dtype=np.float32) / np.float32(
            self.looks
        )
        power = np.power(np.float32(10.0), (db - np.float32(self.cf)) / np.float32(10.0)) * speckle
        amp = np.sqrt(power)
        np.clip(np.rint(amp), 1, 65535, out=amp)
        dn = np.where(inside, amp, 0).astype(np.uint16)
        return row0, dn

    def strips(self, threads: int = 2) -> Iterator[tuple[int, np.ndarray]]:
        starts = list(range(0, self.spec.height, STRIP_ROWS))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            # Bounded look-ahead keeps at most ~2 strips per thread in memory.
            for i in range(0, len(starts), 2 * threads):
                yield from pool.map(self.strip, starts[i : i + 2 * threads])


def write_scene(path: str, renderer: SceneRenderer, threads: int = 2, on_strip=None) -> None:
    """Write a scene GeoTIFF (tiled, uncompressed like JAXA's L2.1 products, nodata 0)."""
    spec = renderer.spec
    profile = {
        "driver": "GTiff",
        "dtype": "uint16",
        "count": 1,
        "width": spec.width,
        "height": spec.height,
        "crs": f"EPSG:{spec.epsg}",
        "transform": spec.transform,
        "nodata": 0,
        "tiled": True,
        "blockxsize": 512,
        "blockysize": 512,
    }
    with rasterio.open(path, "w", **profile) as ds:
        ds.update_tags(
            PRODUCT_ID=spec.name.product_id,
            SARCUBE_SYNTHETIC="1",
            CALIBRATION="sigma0_db = 10*log10(DN^2) + CF, CF = -83.0 dB",
        )
        for row0, dn in renderer.strips(threads):
            ds.write(dn, 1, window=Window(0, row0, spec.width, dn.shape[0]))
            if on_strip is not None:
                on_strip(dn.size)
