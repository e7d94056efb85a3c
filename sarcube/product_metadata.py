"""JAXA's own metadata files beside an ALOS-2 scene: ``summary.txt`` and the CEOS leader file.

A PALSAR-2 L1.5/L2.1 product as JAXA delivers it (a ``.zip`` or its unpacked folder) holds, next to
the image files, ``summary.txt`` (``Key="value"`` lines: scene id, product code, acquisition times,
corner coordinates, off-nadir angle, pixel spacing) and, for CEOS-format products, the leader file
``LED-<scene id>-<product code>``, whose radiometric data record carries the calibration factor.

Parsed by hand: the summary is a flat list of ``Key="value"`` lines, and of the leader file only
one fixed-width ASCII field is needed (CEOS record headers are 12 bytes: sequence number, four
type codes, record length). The libraries that read CEOS (pyroSAR, GDAL's SAR_CEOS driver) either
pull in a SAR processing stack or do not expose the ALOS-2 radiometric record.

Sources: JAXA, "ALOS-2/PALSAR-2 Level 1.1/1.5/2.1/3.1 CEOS SAR Product Format Description"
(summary.txt keys; leader file record layout: the radiometric data record, type code 50, holds the
calibration factor CF as F16.7 at bytes 21–36).
"""

from __future__ import annotations

import datetime as dt
import re
import struct
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import InputError
from .products import SceneName
from .storage import member_url, split_member_url, url_to_fs

SUMMARY_NAME = "summary.txt"
_LINE_RE = re.compile(r'^\s*(?P<key>[A-Za-z0-9_]+)\s*=\s*"(?P<value>[^"]*)"\s*$')
# Radiometric data record: the record type code (byte 6 of the header) and the CF field's bytes.
_RADIOMETRIC_RECORD_TYPE = 50
_CF_FIELD = slice(20, 36)


class ProductMetadataError(InputError):
    """A JAXA metadata file that cannot be read or contradicts the scene's file name."""


@dataclass(frozen=True)
class ProductSummary:
    """The fields of a product's ``summary.txt`` that the cube records or checks.

    Times are UTC; angles in degrees; the pixel spacing in metres.
    """

    url: str
    scene_id: str  # Scs_SceneID, e.g. ALOS2015976960-140909
    product_code: str  # Pds_ProductID, e.g. FBDR1.5GUA
    level: str  # Lbi_ProcessLevel, e.g. 1.5
    observation_date: dt.date  # Lbi_ObservationDate
    scene_center_time: dt.datetime | None  # Img_SceneCenterDateTime
    off_nadir_deg: float | None  # Img_OffNadirAngle
    pixel_spacing_m: float | None  # Pds_PixelSpacing
    utm_zone: int | None  # Pds_UTM_ZoneNo (absent for non-UTM products)
    file_names: tuple[str, ...]  # the product's files (Pdi_L15ProductFileNameNN and the like)

    def as_record(self) -> dict[str, Any]:
        """What the slice registry keeps (JSON values)."""
        return {
            "summary": self.url,
            "scene_center_time": (
                self.scene_center_time.isoformat() + "Z" if self.scene_center_time else None
            ),
            "off_nadir_deg": self.off_nadir_deg,
            "pixel_spacing_m": self.pixel_spacing_m,
            "utm_zone": self.utm_zone,
        }


def _field(fields: Mapping[str, str], key: str, url: str) -> str:
    try:
        return fields[key]
    except KeyError:
        raise ProductMetadataError(
            f"{url}: field {key} is missing (expected a JAXA product summary)"
        ) from None


def _optional_float(fields: Mapping[str, str], key: str, url: str) -> float | None:
    text = fields.get(key, "").strip()
    if not text:
        return None
    try:
        return float(text)
    except ValueError:
        raise ProductMetadataError(f"{url}: field {key} is {text!r}; expected a number") from None


def parse_summary(text: str, url: str) -> ProductSummary:
    """Parse the text of a JAXA ``summary.txt``.

    Raises ProductMetadataError naming the file and the field when a required field (scene id,
    product code, level, observation date) is missing or malformed.
    """
    fields = {m["key"]: m["value"] for m in map(_LINE_RE.match, text.splitlines()) if m}
    raw_date = _field(fields, "Lbi_ObservationDate", url)
    try:
        date = dt.datetime.strptime(raw_date, "%Y%m%d").date()
    except ValueError:
        raise ProductMetadataError(
            f"{url}: field Lbi_ObservationDate is {raw_date!r}; expected YYYYMMDD"
        ) from None
    center = None
    if raw := fields.get("Img_SceneCenterDateTime", "").strip():
        try:
            center = dt.datetime.strptime(raw, "%Y%m%d %H:%M:%S.%f")
        except ValueError:
            raise ProductMetadataError(
                f"{url}: field Img_SceneCenterDateTime is {raw!r}; expected 'YYYYMMDD hh:mm:ss.fff'"
            ) from None
    zone = fields.get("Pds_UTM_ZoneNo", "").strip()
    return ProductSummary(
        url=url,
        scene_id=_field(fields, "Scs_SceneID", url),
        product_code=_field(fields, "Pds_ProductID", url),
        level=_field(fields, "Lbi_ProcessLevel", url),
        observation_date=date,
        scene_center_time=center,
        off_nadir_deg=_optional_float(fields, "Img_OffNadirAngle", url),
        pixel_spacing_m=_optional_float(fields, "Pds_PixelSpacing", url),
        utm_zone=int(zone) if zone.lstrip("-").isdigit() else None,
        file_names=tuple(
            v for k, v in sorted(fields.items()) if re.fullmatch(r"Pdi_L\d\dProductFileName\d+", k)
        ),
    )


def check_summary_matches(summary: ProductSummary, name: SceneName, scene_url: str) -> None:
    """Raise ProductMetadataError when the summary describes another product than the file name."""
    for field_name, in_summary, in_name in (
        ("Scs_SceneID", summary.scene_id, name.scene_id),
        ("Pds_ProductID", summary.product_code, name.product_code),
        ("Lbi_ProcessLevel", summary.level, name.level),
        ("Lbi_ObservationDate", f"{summary.observation_date:%Y%m%d}", f"{name.date:%Y%m%d}"),
    ):
        if in_summary != in_name:
            raise ProductMetadataError(
                f"{summary.url}: field {field_name} is {in_summary!r} but the scene beside it "
                f"({scene_url}) is named for {in_name!r}; expected the product's own summary"
            )


def calibration_factor_from_leader(data: bytes, url: str) -> float | None:
    """The calibration factor CF (dB) in a CEOS leader file's radiometric data record.

    Returns None when the file has no radiometric data record; raises ProductMetadataError when
    the record is there but its CF field is not a number.
    """
    offset = 0
    while offset + 12 <= len(data):
        _seq, _sub1, rtype, _sub2, _sub3, length = struct.unpack(
            ">IBBBBI", data[offset : offset + 12]
        )
        if length < 12:
            break  # not a CEOS record sequence
        if rtype == _RADIOMETRIC_RECORD_TYPE:
            text = data[offset + _CF_FIELD.start : offset + _CF_FIELD.stop].decode(
                "ascii", "replace"
            )
            try:
                return float(text)
            except ValueError:
                raise ProductMetadataError(
                    f"{url}: the radiometric data record's calibration factor is {text.strip()!r}; "
                    "expected a number (F16.7, dB)"
                ) from None
        offset += length
    return None


def sibling_url(url: str, name: str) -> str:
    """The URL of file ``name`` in the same folder as ``url`` (inside the same archive for an
    archive member's URL ``zip://DIR/MEMBER::ARCHIVE``)."""
    parts = split_member_url(url)
    if parts is not None:
        _, member, archive = parts
        folder = member.rsplit("/", 1)[0] + "/" if "/" in member else ""
        return member_url(archive, folder + name)
    return f"{url.rsplit('/', 1)[0]}/{name}" if "/" in url else name


def _read_optional(url: str, storage_options: Mapping[str, Any] | None) -> bytes | None:
    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        return None
    return fs.cat_file(path)


def read_scene_metadata(
    scene_url: str, name: SceneName, storage_options: Mapping[str, Any] | None = None
) -> tuple[dict[str, Any], float | None]:
    """The product metadata beside a scene: (record for the registry, CF from the leader file).

    Both are empty/None when the product carries no ``summary.txt`` / leader file (a scene copied
    out of its delivery). A summary that describes another product is an error.
    """
    record: dict[str, Any] = {}
    summary_url = sibling_url(scene_url, SUMMARY_NAME)
    text = _read_optional(summary_url, storage_options)
    if text is not None:
        summary = parse_summary(text.decode("utf-8", "replace"), summary_url)
        check_summary_matches(summary, name, scene_url)
        record.update(summary.as_record())
    leader_url = sibling_url(scene_url, f"LED-{name.product_id}")
    leader = _read_optional(leader_url, storage_options)
    cf = calibration_factor_from_leader(leader, leader_url) if leader is not None else None
    if cf is not None:
        record["leader"] = leader_url
    return record, cf
