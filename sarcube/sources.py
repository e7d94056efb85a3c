"""Ingest inputs: finding SAR scenes and HR-LULC tiles behind URLs, and checking each one.

``expand_urls`` turns paths, globs, directories and ``s3://`` prefixes into file URLs.
``inspect_scene`` / ``inspect_lulc`` open one file (with GDAL, through ``/vsis3/`` on S3), check it
against what the cube needs and return a small picklable record — or raise ``SourceError`` with one
line naming the file and what was expected. They run inside Dask workers.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Any

import numpy as np

from .classes import DEFAULT_TABLE
from .errors import InputError
from .product_metadata import ProductMetadataError, read_scene_metadata
from .products import (
    ProductNameError,
    parse_lulc_name,
    parse_mosaic_name,
    parse_scene_name,
)
from .radiometry import calibration_factor
from .storage import archive_protocol, gdal_path, member_url, rasterio_env, url_to_fs

GLOB_CHARS = re.compile(r"[*?\[]")
RASTER_SUFFIXES = (".tif", ".tiff")
ARCHIVE_SUFFIXES = (".zip", ".tar.gz", ".tgz", ".tar")
INPUT_SUFFIXES = RASTER_SUFFIXES + ARCHIVE_SUFFIXES


class SourceError(InputError):
    """One input file that cannot be used; the message names it and says what was expected."""


@dataclass(frozen=True)
class SceneSource:
    """A SAR input (ALOS-2 scene or yearly mosaic tile) that passed inspection."""

    url: str
    product_id: str
    kind: str  # "L1.5", "L2.1" or "mosaic"
    date: dt.date
    cf_db: float
    nodata: int
    crs_wkt: str
    transform: tuple[float, ...]
    width: int
    height: int
    bounds_4326: tuple[float, float, float, float]
    sha256: str
    name_fields: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # from the product's own summary.txt / CEOS leader file, where the delivery has them
    product_metadata: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)


@dataclass(frozen=True)
class LulcSource:
    """An HR-LULC tile that passed inspection (on the 1/12000° grid)."""

    url: str
    name: str
    row0: int  # global 1/12000° row of the top-left pixel
    col0: int
    height: int
    width: int
    sha256: str

    @property
    def bounds(self) -> tuple[float, float, float, float]:
        n = 12000
        return (
            -180 + self.col0 / n,
            90 - (self.row0 + self.height) / n,
            -180 + (self.col0 + self.width) / n,
            90 - self.row0 / n,
        )


def _describe_fs_error(url: str, e: Exception) -> str:
    text = f"{type(e).__name__}: {e}"
    if (
        isinstance(e, PermissionError)
        or "AccessDenied" in text
        or "403" in text
        or "InvalidAccessKeyId" in text
    ):
        return (
            f"{url}: access denied (check the credentials: "
            "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --storage-option key=/secret=)"
        )
    if "NoCredentialsError" in text or "Unable to locate credentials" in text:
        return (
            f"{url}: no S3 credentials found "
            "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --storage-option key=/secret=)"
        )
    if isinstance(e, FileNotFoundError) or "NoSuchBucket" in text or "404" in text:
        return f"{url}: not found"
    if (
        "Could not connect" in text
        or "ConnectTimeout" in text
        or "EndpointConnectionError" in text
        or "Connect" in type(e).__name__
    ):
        return f"{url}: cannot reach the storage endpoint (check --storage-option endpoint_url=…)"
    return f"{url}: cannot list or open ({text.splitlines()[0][:200]})"


def expand_urls(
    urls: Iterable[str], storage_options: Mapping[str, Any] | None = None
) -> tuple[list[str], list[str]]:
    """Expand paths/globs/directories/prefixes to GeoTIFF URLs. Returns (urls, problems).

    A JAXA delivery archive (``.zip``, ``.tar.gz``, ``.tgz``, ``.tar``; given, or found under a
    directory or prefix) is read in place: its HH scenes and mosaic tiles become member URLs
    (``tar://MEMBER::ARCHIVE``), which GDAL opens as ``/vsitar/`` or ``/vsizip/``; the archive's
    other layers (HV, date, mask, incidence) are not inputs and are skipped."""
    found: list[str] = []
    problems: list[str] = []
    for url in urls:
        url = str(url)
        try:
            fs, path = url_to_fs(url, storage_options)
            proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]

            def to_url(p: str, proto=proto) -> str:
                return p if proto in ("file", "local") else f"{proto}://{p}"

            if GLOB_CHARS.search(path):
                hits = sorted(fs.glob(path))
                if not hits:
                    problems.append(f"{url}: no file matches this pattern")
                hits = [to_url(h) for h in hits if h.lower().endswith(INPUT_SUFFIXES)]
            elif fs.isdir(path):
                hits = [
                    to_url(p) for p in sorted(fs.find(path)) if p.lower().endswith(INPUT_SUFFIXES)
                ]
                if not hits:
                    problems.append(f"{url}: no .tif file under this directory/prefix")
            elif fs.exists(path):
                hits = [to_url(path)]
            else:
                hits = []
                problems.append(f"{url}: not found")
            for hit in hits:
                if not archive_protocol(hit):
                    found.append(hit)
                    continue
                try:
                    found.extend(_archive_members(hit, storage_options))
                except SourceError as e:
                    problems.append(str(e))
        except Exception as e:  # any fsspec/botocore failure becomes one line naming the URL
            problems.append(_describe_fs_error(url, e))
    return list(dict.fromkeys(found)), problems


def _archive_members(archive: str, storage_options: Mapping[str, Any] | None) -> list[str]:
    """Member URLs of the HH scenes and mosaic tiles inside a delivery archive."""
    fs, _ = url_to_fs(member_url(archive, ""), storage_options)
    out, ceos = [], []
    for member in sorted(fs.find("")):
        if not member.lower().endswith(RASTER_SUFFIXES):
            if PurePosixPath(member).name.startswith("IMG-HH-"):
                ceos.append(member)
            continue
        for parse in (parse_scene_name, parse_mosaic_name):
            try:
                name = parse(member)
            except ProductNameError:
                continue
            if name.polarization == "HH":
                out.append(member_url(archive, member))
            break
    if not out and ceos:
        raise SourceError(
            f"{archive}: {ceos[0]} is a CEOS-format image; sarcube reads the GeoTIFF delivery "
            "(order the product as GeoTIFF)"
        )
    if not out:
        raise SourceError(f"{archive}: no HH scene or mosaic tile inside this archive")
    return out


def file_sha256(url: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """sha256 of a file's bytes (streamed in 8 MiB blocks)."""
    fs, path = url_to_fs(url, storage_options)
    h = hashlib.sha256()
    with fs.open(path, "rb", block_size=8 << 20) as f:
        while block := f.read(8 << 20):
            h.update(block)
    return h.hexdigest()


def _mosaic_date(url: str, storage_options) -> dt.date | None:
    """Acquisition date of a mosaic tile from its JAXA XML beside it (``…_F02DAR.xml``; in a
    delivery archive, the XML inside the same archive)."""
    head, sep, archive = url.partition("::")
    m = re.match(r"^(.*/)?([NS]\d{2}[EW]\d{3}_\d{2})_sl_H[HV]_(\w+)\.tiff?$", head)
    if not m:
        return None
    xml_url = f"{m[1] or ''}{m[2]}_{m[3]}.xml{sep}{archive}"
    try:
        fs, path = url_to_fs(xml_url, storage_options)
        if not fs.exists(path):
            return None
        text = fs.cat_file(path).decode("utf-8", "replace")
    except Exception:
        return None
    # JAXA's XML spells it "FirstAcquistionDate"; accept the correct spelling too.
    d = re.search(r"<FirstAcquis?i?tionDate>(\d{4}-\d{2}-\d{2})<", text)
    return dt.date.fromisoformat(d[1]) if d else None


def _open_error(url: str, e: Exception) -> SourceError:
    text = str(e)
    if (
        "403" in text
        or "Access Denied" in text
        or "AccessDenied" in text
        or "InvalidAccessKeyId" in text
    ):
        return SourceError(f"{url}: access denied (check the S3 credentials)")
    if "404" in text or "No such file" in text or "does not exist" in text:
        return SourceError(f"{url}: not found")
    if "not recognized as" in text or "not a supported file format" in text:
        return SourceError(f"{url}: not a GeoTIFF (GDAL cannot read it)")
    return SourceError(
        f"{url}: cannot read as a GeoTIFF (corrupt or truncated?): {text.splitlines()[0][:200]}"
    )


def _check_readable(ds, url: str) -> None:
    """Read the first and last blocks: a truncated file fails here, not half-way through ingest."""
    from rasterio.windows import Window

    bh, bw = ds.block_shapes[0]
    try:
        ds.read(1, window=Window(0, 0, min(bw, ds.width), min(bh, ds.height)))
        ds.read(
            1,
            window=Window(
                max(0, ds.width - bw), max(0, ds.height - bh), min(bw, ds.width), min(bh, ds.height)
            ),
        )
    except Exception as e:
        raise SourceError(
            f"{url}: pixel data cannot be read (truncated or corrupt file): "
            f"{str(e).splitlines()[0][:160]}"
        ) from None


def _strips(ds, rows: int = 1024):
    from rasterio.windows import Window

    for r0 in range(0, ds.height, rows):
        yield Window(0, r0, ds.width, min(rows, ds.height - r0))


def _check_all_pixels(ds, url: str, nodata: int) -> None:
    """Decode every pixel (``--strict``): a file damaged in the middle, or one holding nothing
    but no data, fails here, before any write, instead of while its slice is being written."""
    valid = 0
    for win in _strips(ds):
        try:
            valid += int(np.count_nonzero(ds.read(1, window=win) != nodata))
        except Exception as e:
            raise SourceError(
                f"{url}: pixel data cannot be read at rows "
                f"{win.row_off}–{win.row_off + win.height} "
                f"(truncated or corrupt file): {str(e).splitlines()[0][:160]}"
            ) from None
    if not valid:
        raise SourceError(f"{url}: no valid pixel (every pixel is the no-data value {nodata})")


def check_label_codes(ds, url: str, allowed: Iterable[int]) -> None:
    """Every pixel of an HR-LULC tile must hold 0 (no data) or a code of the class table.

    Reads the whole tile in strips (uint8: 144 MB for a 1° tile at 1/12000°, a few seconds);
    an unknown code would otherwise be written into the cube's labels and silently become a
    "not water" / ignored target downstream.
    """
    counts = np.zeros(256, dtype=np.int64)
    for win in _strips(ds):
        try:
            counts += np.bincount(ds.read(1, window=win).ravel(), minlength=256)
        except SourceError:
            raise
        except Exception as e:
            raise SourceError(
                f"{url}: pixel data cannot be read (truncated or corrupt file): "
                f"{str(e).splitlines()[0][:160]}"
            ) from None
    ok = np.zeros(256, dtype=bool)
    ok[[0, *allowed]] = True
    bad = np.flatnonzero((counts > 0) & ~ok)
    if bad.size:
        found = ", ".join(f"{int(c)} ({int(counts[c])} px)" for c in bad[:10])
        raise SourceError(
            f"{url}: label codes outside the HR-LULC class table: {found}; expected 0 (no data) "
            f"or one of {sorted(allowed)}"
        )


def inspect_scene(
    url: str,
    storage_options: Mapping[str, Any] | None = None,
    mosaic_date: dt.date | None = None,
    full_read: bool = False,
) -> SceneSource:
    """Check one SAR input and describe it; raises SourceError naming the problem.

    ``full_read`` decodes every pixel (``--strict``); otherwise the first and last blocks."""
    import rasterio
    from rasterio.warp import transform_bounds

    name_fields: dict[str, Any]
    try:
        name = parse_scene_name(url)
        if name.level == "1.1":
            raise SourceError(
                f"{url}: level 1.1 (single-look complex) is not supported; "
                "expected a geocoded L1.5/L2.1 amplitude GeoTIFF"
            )
        if name.polarization != "HH":
            raise SourceError(f"{url}: polarization {name.polarization}; the cube holds HH")
        kind, product_id, date, nodata = f"L{name.level}", name.product_id, name.date, 0
        try:
            product_metadata, leader_cf = read_scene_metadata(url, name, storage_options)
        except ProductMetadataError as e:
            raise SourceError(str(e)) from None
        except Exception as e:  # an unreadable metadata file: one line naming it
            raise SourceError(_describe_fs_error(url, e)) from None
        name_fields = {
            "mode": name.mode,
            "look": name.look,
            "level": name.level,
            "direction": name.direction,
            "orbit": name.orbit,
            "frame": name.frame,
        }
    except ProductNameError as scene_err:
        try:
            tile = parse_mosaic_name(url)
        except ProductNameError:
            raise scene_err from None
        if tile.polarization != "HH":
            raise SourceError(
                f"{url}: polarization {tile.polarization}; the cube holds HH"
            ) from None
        mosaic_day = _mosaic_date(url, storage_options) or mosaic_date
        if mosaic_day is None:
            raise SourceError(
                f"{url}: no acquisition date: expected the JAXA XML beside it "
                "(FirstAcquisitionDate) or --mosaic-date YYYY-MM-DD"
            ) from None
        kind, product_id, date, nodata = "mosaic", tile.product_id, mosaic_day, 1  # no data: DN 1
        name_fields = {"year": tile.year, "version": tile.version}
        product_metadata, leader_cf = {}, None
    try:
        cf = calibration_factor(kind)
    except KeyError as e:
        raise SourceError(f"{url}: {e.args[0]}") from None
    # the product's own calibration factor (CEOS leader file) over the published table's
    if leader_cf is not None:
        cf = leader_cf
    product_metadata["cf_db_source"] = "leader file" if leader_cf is not None else "table"

    with rasterio_env(storage_options):
        try:
            ds = rasterio.open(gdal_path(url))
        except Exception as e:
            raise _open_error(url, e) from None
        with ds:
            if ds.count != 1:
                raise SourceError(f"{url}: expected 1 band (HH amplitude DN), found {ds.count}")
            if ds.dtypes[0] != "uint16":
                raise SourceError(f"{url}: expected uint16 amplitude DN, found {ds.dtypes[0]}")
            if ds.crs is None:
                raise SourceError(
                    f"{url}: the GeoTIFF has no CRS (expected UTM or EPSG:4326 georeferencing)"
                )
            if ds.transform.is_identity:
                raise SourceError(f"{url}: the GeoTIFF has no geotransform")
            _check_readable(ds, url)
            if full_read:
                _check_all_pixels(ds, url, nodata)
            bounds = transform_bounds(ds.crs, "EPSG:4326", *ds.bounds, densify_pts=21)
            src = SceneSource(
                url=url,
                product_id=product_id,
                kind=kind,
                date=date,
                cf_db=cf,
                nodata=nodata,
                crs_wkt=ds.crs.to_wkt(),
                transform=tuple(ds.transform)[:6],
                width=ds.width,
                height=ds.height,
                bounds_4326=(
                    float(bounds[0]),
                    float(bounds[1]),
                    float(bounds[2]),
                    float(bounds[3]),
                ),
                sha256="",
                name_fields=name_fields,
                product_metadata=product_metadata,
            )
    try:
        digest = file_sha256(url, storage_options)
    except Exception as e:
        raise SourceError(_describe_fs_error(url, e)) from None
    return SceneSource(**{**src.__dict__, "sha256": digest})


def inspect_lulc(url: str, storage_options: Mapping[str, Any] | None = None) -> LulcSource:
    """Check one HR-LULC tile: name, uint8, one band, EPSG:4326 on the 1/12000° grid."""
    import rasterio

    try:
        parse_lulc_name(url)
    except ProductNameError as e:
        raise SourceError(str(e)) from None
    with rasterio_env(storage_options):
        try:
            ds = rasterio.open(gdal_path(url))
        except Exception as e:
            raise _open_error(url, e) from None
        with ds:
            if ds.count != 1 or ds.dtypes[0] != "uint8":
                raise SourceError(
                    f"{url}: expected 1 band of uint8 JAXA codes, found {ds.count} × {ds.dtypes[0]}"
                )
            if ds.crs is None or ds.crs.to_epsg() != 4326:
                raise SourceError(f"{url}: expected EPSG:4326, found {ds.crs}")
            t = ds.transform
            r0, c0 = (90.0 - t.f) * 12000, (t.c + 180.0) * 12000
            if not (
                np.isclose(t.a * 12000, 1, atol=1e-9)
                and np.isclose(-t.e * 12000, 1, atol=1e-9)
                and abs(r0 - round(r0)) < 1e-4
                and abs(c0 - round(c0)) < 1e-4
            ):
                raise SourceError(
                    f"{url}: expected the HR-LULC 1/12000° grid, "
                    f"found pixel {t.a:.9f}° at origin ({t.c}, {t.f})"
                )
            _check_readable(ds, url)
            check_label_codes(ds, url, DEFAULT_TABLE.codes)
            h, w = ds.height, ds.width
    try:
        digest = file_sha256(url, storage_options)
    except Exception as e:
        raise SourceError(_describe_fs_error(url, e)) from None
    return LulcSource(url, url.rsplit("/", 1)[-1], round(r0), round(c0), h, w, digest)
