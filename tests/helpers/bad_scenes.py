"""Damaged copies of good GeoTIFF scenes, for the tests of bad ingest inputs.

The copies are made with rasterio from the session's synthetic scenes and given valid JAXA names
with a date of their own (so that a bad scene would form a time slice of its own).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import rasterio


def with_date(scene: str, yymmdd: str) -> str:
    """The file name of ``scene`` with another acquisition date (a valid JAXA name).

    Args:
        scene: path or URL of a JAXA-named scene.
        yymmdd: the new date.

    Returns:
        The new file name (no directory).
    """
    name = Path(scene).name
    new = re.sub(r"-(\d{6})-", f"-{yymmdd}-", name, count=1)
    assert new != name
    return new


def rewrite_geotiff(src: str, dst: Path, *, data=None, transform=None, **profile_changes) -> str:
    """Copy a GeoTIFF with rasterio, optionally replacing its pixels, transform or profile.

    Args:
        src: the GeoTIFF to copy.
        dst: where to write the copy.
        data: ``(bands, rows, cols)`` pixels to write instead of the source's.
        transform: a geotransform instead of the source's.
        **profile_changes: rasterio profile entries to change (``crs=None``, ``compress=...``).

    Returns:
        ``str(dst)``.
    """
    with rasterio.open(src) as ds:
        profile = ds.profile
        pixels = ds.read() if data is None else data
        profile.update(transform=transform or ds.transform, **profile_changes)
    profile["count"] = pixels.shape[0]
    profile["dtype"] = pixels.dtype.name
    with rasterio.open(dst, "w", **profile) as out:
        out.write(pixels)
    return str(dst)


def corrupt_middle_tile(src: str, dst: Path) -> str:
    """A deflate-compressed copy whose first and last tiles are fine but one in between is garbage.

    Opening it and reading its corner tiles works; the damage shows only when the pixels under
    the cube are read (during the SAR tasks, not the inspection).

    Args:
        src: the GeoTIFF to copy (more than 2 × 512 pixels each way).
        dst: where to write the damaged copy.

    Returns:
        ``str(dst)``.
    """
    tmp = dst.with_name("tmp-" + dst.name)
    rewrite_geotiff(src, tmp, compress="deflate")
    with rasterio.open(tmp) as ds:
        assert ds.height > 2 * 512 and ds.width > 2 * 512
        r, c = 1, 0  # tile row 1, column 0: away from the first and the last tile
        off = int(ds.get_tag_item(f"BLOCK_OFFSET_{c}_{r}", "TIFF", bidx=1))
        size = int(ds.get_tag_item(f"BLOCK_SIZE_{c}_{r}", "TIFF", bidx=1))
    raw = bytearray(tmp.read_bytes())
    raw[off : off + size] = np.random.default_rng(0).integers(0, 256, size, np.uint8).tobytes()
    dst.write_bytes(bytes(raw))
    tmp.unlink()
    return str(dst)
