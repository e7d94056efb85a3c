"""``sarcube synth``: realistic stand-ins for ALOS-2 scenes and HR-LULC tiles, in the real formats.

No real ALOS-2 scene over Japan can be downloaded here, so the demo, the tests and the benchmarks
run on this generator. It writes, under ``out``:

- ``lulc/LC_N{lat}E{lon}.tif`` — HR-LULC-format label tiles (uint8 JAXA codes, EPSG:4326, pixel
  1/12000°, nodata 0, 512² tiles, deflate, JAXA's palette), named by the SW corner of the 1°×1°
  tile they belong to. When the region is smaller than a tile, the file holds only the part of that
  tile inside the region (snapped outward to the 1/12000° grid); its georeferencing places it
  exactly on the national grid, so it mosaics with real tiles.
- ``scenes/IMG-HH-ALOS2{orbit}{frame}-{yymmdd}-FBSR2.1GUD.tif`` — L2.1-style HH scenes (uint16
  amplitude DN, UTM, 6.25 m, DN 0 outside a tilted swath footprint).
- ``synth.json`` — what was generated: region, seed, dates, σ⁰ table per date, scene footprints.

Deterministic: the same arguments give byte-identical files. Memory is bounded by a strip of rows
per thread, whatever the region or scene size.
"""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.windows import Window
from tqdm.auto import tqdm

from .. import __version__
from ..classes import DEFAULT_TABLE
from ..errors import InputError
from ..products import format_lulc_name
from ..storage import join_url, local_output, redact
from .labels import (
    FINE_PER_DEG,
    LabelModel,
    TemplateError,
    procedural_template,
    read_template,
)
from .scenes import (
    CLASS_SIGMA0_DB,
    SceneRenderer,
    plan_scenes,
    scene_lonlat_bounds,
    sigma0_table,
    write_scene,
)

# Tsukuba and Lake Kasumigaura (Ibaraki): paddy, cropland, towns, forest, a large lake, wetland,
# solar farms and greenhouses. 2560 px of 1/6000° a side -> 10 × 10 patches of 256² per date.
DEFAULT_BBOX = (140.0, 35.9, 140.0 + 2560 / 6000, 35.9 + 2560 / 6000)
DEFAULT_DATES = (dt.date(2022, 9, 12), dt.date(2022, 10, 10), dt.date(2022, 11, 7))
LABEL_STRIP_ROWS = 1024

__all__ = ["DEFAULT_BBOX", "DEFAULT_DATES", "SynthError", "SynthResult", "synthesize"]


class SynthError(InputError):
    """Invalid arguments for the synthetic generator."""


@dataclass
class SynthResult:
    out: str
    lulc_urls: list[str]
    scene_urls: list[str]
    record: dict[str, Any]


def _check_bbox(bbox: Sequence[float]) -> tuple[float, float, float, float]:
    if len(bbox) != 4:
        raise SynthError(f"bbox must be 4 numbers W S E N in degrees, got {list(bbox)}")
    west, south, east, north = (float(v) for v in bbox)
    if not (west < east and south < north):
        raise SynthError(
            f"bbox W {west} S {south} E {east} N {north} is empty (need W < E and S < N)"
        )
    if not (-180 <= west and east <= 180 and -84 <= south and north <= 84):
        raise SynthError(f"bbox {list(bbox)} must lie within lon −180…180 and lat −84…84 (UTM)")
    return west, south, east, north


def _check_dates(dates: Sequence[dt.date | str]) -> list[dt.date]:
    out = []
    for d in dates:
        if isinstance(d, str):
            try:
                d = dt.date.fromisoformat(d)
            except ValueError:
                raise SynthError(f"date {d!r} is not an ISO date (YYYY-MM-DD)") from None
        if d < dt.date(2014, 5, 24):
            raise SynthError(f"date {d} is before ALOS-2's launch (2014-05-24)")
        out.append(d)
    if not out:
        raise SynthError("at least one date is needed")
    if len(set(out)) != len(out):
        raise SynthError(f"dates must be distinct, got {[str(d) for d in out]}")
    return sorted(out)


def _write_label_tiles(out: str, bbox, model: LabelModel, storage_options, bar) -> list[str]:
    west, south, east, north = bbox
    # Snap outward to the 1/12000° grid: global fine rows/cols [r0, r1) × [c0, c1).
    r0 = int(np.floor((90.0 - north) * FINE_PER_DEG + 1e-6))
    r1 = int(np.ceil((90.0 - south) * FINE_PER_DEG - 1e-6))
    c0 = int(np.floor((west + 180.0) * FINE_PER_DEG + 1e-6))
    c1 = int(np.ceil((east + 180.0) * FINE_PER_DEG - 1e-6))
    urls = []
    cmap = DEFAULT_TABLE.colormap()
    for lat_s in range(int(np.floor(south)), int(np.ceil(north))):
        for lon_w in range(int(np.floor(west)), int(np.ceil(east))):
            tr0 = max(r0, (90 - (lat_s + 1)) * FINE_PER_DEG)
            tr1 = min(r1, (90 - lat_s) * FINE_PER_DEG)
            tc0 = max(c0, (lon_w + 180) * FINE_PER_DEG)
            tc1 = min(c1, (lon_w + 181) * FINE_PER_DEG)
            if tr1 <= tr0 or tc1 <= tc0:
                continue
            url = join_url(out, "lulc", format_lulc_name(lat_s, lon_w))
            profile = {
                "driver": "GTiff",
                "dtype": "uint8",
                "count": 1,
                "width": tc1 - tc0,
                "height": tr1 - tr0,
                "crs": "EPSG:4326",
                "nodata": 0,
                "tiled": True,
                "blockxsize": 512,
                "blockysize": 512,
                "compress": "deflate",
                "photometric": "palette",
                "transform": Affine(
                    1 / FINE_PER_DEG,
                    0,
                    tc0 / FINE_PER_DEG - 180.0,
                    0,
                    -1 / FINE_PER_DEG,
                    90.0 - tr0 / FINE_PER_DEG,
                ),
            }
            with (
                local_output(url, storage_options) as local,
                rasterio.open(local, "w", **profile) as ds,
            ):
                ds.write_colormap(1, cmap)
                ds.update_tags(
                    SARCUBE_SYNTHETIC="1", CLASS_TABLE=f"JAXA HR-LULC {DEFAULT_TABLE.version}"
                )
                for s in range(tr0, tr1, LABEL_STRIP_ROWS):
                    h = min(LABEL_STRIP_ROWS, tr1 - s)
                    lab = model.window(s, tc0, h, tc1 - tc0)
                    ds.write(lab, 1, window=Window(0, s - tr0, tc1 - tc0, h))
                    bar.update(h * (tc1 - tc0) / 1e6)
            urls.append(url)
    return urls


def synthesize(
    out: str,
    bbox: Sequence[float] = DEFAULT_BBOX,
    dates: Sequence[dt.date | str] = DEFAULT_DATES,
    scenes_per_date: int = 1,
    seed: int = 0,
    lulc_template: str | Path | None = None,
    looks: float = 3.0,
    direction: str = "D",
    storage_options: dict[str, Any] | None = None,
    threads: int = 2,
    progress: bool = True,
) -> SynthResult:
    """Generate HR-LULC-format label tiles and ALOS-2 L2.1-style HH scenes for a region.

    Args:
        out: output directory or URL (local path, ``file://`` or ``s3://bucket/prefix``).
        bbox: region (W, S, E, N) in degrees, EPSG:4326.
        dates: acquisition dates (one pass per date; default September–November 2022).
        scenes_per_date: consecutive frames per pass, overlapping along track.
        seed: everything random derives from it; same seed, same bytes.
        lulc_template: the real national 250 m HR-LULC map; its classes are refined to 10 m.
            Without it, a procedural layout with Japan's land class shares is used.
        looks: equivalent number of looks of the speckle (intensity ~ Gamma(L, 1/L)).
        direction: "D" descending or "A" ascending passes.
    """
    bbox = _check_bbox(bbox)
    dates = _check_dates(dates)
    if scenes_per_date < 1:
        raise SynthError(f"scenes_per_date must be ≥ 1, got {scenes_per_date}")
    if looks <= 0:
        raise SynthError(f"looks must be > 0, got {looks}")
    if direction not in ("A", "D"):
        raise SynthError(f"direction must be 'A' or 'D', got {direction!r}")
    seed = int(seed)
    specs = plan_scenes(bbox, dates, scenes_per_date, seed, direction)
    sw, ss, se, sn = scene_lonlat_bounds(specs)
    world = (
        min(sw, bbox[0]) - 0.01,
        min(ss, bbox[1]) - 0.01,
        max(se, bbox[2]) + 0.01,
        max(sn, bbox[3]) + 0.01,
    )
    if lulc_template is not None:
        try:
            template = read_template(lulc_template, world, bbox)
        except TemplateError as e:
            raise SynthError(str(e)) from None
    else:
        template = procedural_template(world, bbox, seed)
    model = LabelModel(template, seed)

    total_mpx = (bbox[2] - bbox[0]) * (bbox[3] - bbox[1]) * FINE_PER_DEG**2 / 1e6
    total_mpx += sum(s.width * s.height for s in specs) / 1e6
    bar = tqdm(
        total=total_mpx,
        unit="Mpx",
        desc="synth",
        disable=not progress,
        bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} Mpx [{elapsed}<{remaining}]",
    )
    lulc_urls = _write_label_tiles(out, bbox, model, storage_options, bar)
    scene_urls = []
    for i, spec in enumerate(specs):
        url = join_url(out, "scenes", spec.filename)
        renderer = SceneRenderer(spec, model, looks, seed, i)
        with local_output(url, storage_options) as local:
            write_scene(str(local), renderer, threads, on_strip=lambda n: bar.update(n / 1e6))
        scene_urls.append(url)
    bar.close()

    record = {
        "generator": "sarcube synth",
        "sarcube_version": __version__,
        "bbox": list(bbox),
        "seed": seed,
        "dates": [str(d) for d in dates],
        "scenes_per_date": scenes_per_date,
        "looks": looks,
        "lulc_template": Path(lulc_template).name if lulc_template else "procedural",
        "class_table": DEFAULT_TABLE.version,
        "sigma0_db_by_date": {
            str(d): {str(c): float(sigma0_table(d)[c]) for c in CLASS_SIGMA0_DB} for d in dates
        },
        "lulc_tiles": [u.rsplit("/", 1)[-1] for u in lulc_urls],
        "scenes": [
            {
                "file": s.filename,
                "product_id": s.name.product_id,
                "date": str(s.name.date),
                "epsg": s.epsg,
                "width": s.width,
                "height": s.height,
                "footprint_lonlat": s.footprint_lonlat,
            }
            for s in specs
        ],
        "storage_options": redact(storage_options),
    }
    with local_output(join_url(out, "synth.json"), storage_options) as local:
        local.write_text(json.dumps(record, indent=1))
    return SynthResult(str(out), lulc_urls, scene_urls, record)
