"""JAXA product file names: ALOS-2 PALSAR-2 scenes, the yearly 25 m mosaic tiles, HR-LULC tiles.

Everything the cube needs about a scene's acquisition (date, level, mode, look and orbit
direction) is in its name, so names are parsed strictly and a name that does not follow the rule is
a clear error naming the file and the rule.
"""

from __future__ import annotations

import datetime as dt
import re
from dataclasses import dataclass
from pathlib import PurePosixPath

from .errors import InputError

# IMG-HH-ALOS2{orbit:5}{frame:4}-{yymmdd}-{mode}{L|R}{level}{G|R|_}{U|P|M|L|_}{A|D}[.tif]
# e.g. IMG-HH-ALOS2237752900-181018-UBSR2.1GUD.tif, IMG-HH-ALOS2015976960-140909-FBDR1.5GUA (CEOS)
SCENE_NAME_RULE = (
    "IMG-{pol}-ALOS2{orbit:5 digits}{frame:4 digits}-{yymmdd}-"
    "{mode:3 letters}{look:L|R}{level:1.1|1.5|2.1|3.1}{G|R|_}{U|P|M|L|_}{A|D}[.tif]"
)
_SCENE_RE = re.compile(
    r"^IMG-(?P<pol>HH|HV|VH|VV)-ALOS2(?P<orbit>\d{5})(?P<frame>\d{4})-(?P<date>\d{6})-"
    r"(?P<mode>[A-Z]{3})(?P<look>[LR])(?P<level>1\.1|1\.5|2\.1|3\.1)"
    r"(?P<proc>[GR_])(?P<proj>[UPML_])(?P<direction>[AD])(?:\.tiff?)?$"
)
MOSAIC_NAME_RULE = "{N|S}{lat:2}{E|W}{lon:3}_{yy}_sl_{pol}_{version}.tif (named by the NW corner)"
_MOSAIC_RE = re.compile(
    r"^(?P<ns>[NS])(?P<lat>\d{2})(?P<ew>[EW])(?P<lon>\d{3})_(?P<yy>\d{2})_sl_(?P<pol>HH|HV)_"
    r"(?P<version>F\w+?)\.tiff?$"
)
LULC_NAME_RULE = "LC_{N|S}{lat:2}{E|W}{lon:3}.tif (named by the SW corner)"
_LULC_RE = re.compile(r"^LC_(?P<ns>[NS])(?P<lat>\d{2})(?P<ew>[EW])(?P<lon>\d{3})\.tiff?$")

SCENE_MODES = {
    "SBS",
    "SBD",
    "UBS",
    "UBD",
    "HBS",
    "HBD",
    "HBQ",
    "FBS",
    "FBD",
    "FBQ",
    "WBS",
    "WBD",
    "WWS",
    "WWD",
    "VBS",
    "VBD",
}


class ProductNameError(InputError):
    """A file name that does not follow the JAXA naming rule it was expected to follow."""


@dataclass(frozen=True)
class SceneName:
    """The fields of an ALOS-2 PALSAR-2 scene file name."""

    polarization: str
    orbit: int
    frame: int
    date: dt.date
    mode: str
    look: str  # "R" right-looking, "L" left-looking
    level: str  # "1.5", "2.1", ...
    processing: str  # "G" geo-coded, "R" geo-referenced, "_" none
    projection: str  # "U" UTM, "P" polar stereographic, "M" Mercator, "L" LCC, "_" none
    direction: str  # "A" ascending, "D" descending

    @property
    def scene_id(self) -> str:
        return f"ALOS2{self.orbit:05d}{self.frame:04d}-{self.date:%y%m%d}"

    @property
    def product_code(self) -> str:
        return (
            f"{self.mode}{self.look}{self.level}{self.processing}{self.projection}{self.direction}"
        )

    @property
    def product_id(self) -> str:
        """Scene id + product code, e.g. ``ALOS2237752900-181018-UBSR2.1GUD``."""
        return f"{self.scene_id}-{self.product_code}"

    def filename(self, suffix: str = ".tif") -> str:
        return f"IMG-{self.polarization}-{self.product_id}{suffix}"


@dataclass(frozen=True)
class MosaicTileName:
    """The fields of a JAXA yearly 25 m PALSAR-2 mosaic tile name (NW corner)."""

    north: int  # latitude of the tile's north edge, degrees
    west: int  # longitude of the tile's west edge, degrees
    year: int
    polarization: str
    version: str

    @property
    def product_id(self) -> str:
        ns = "N" if self.north >= 0 else "S"
        ew = "E" if self.west >= 0 else "W"
        return (
            f"{ns}{abs(self.north):02d}{ew}{abs(self.west):03d}_{self.year % 100:02d}_sl_"
            f"{self.polarization}_{self.version}"
        )


@dataclass(frozen=True)
class LulcTileName:
    """The fields of a JAXA HR-LULC tile name (SW corner)."""

    south: int
    west: int

    def filename(self) -> str:
        return format_lulc_name(self.south, self.west)


def _basename(name_or_url: str) -> str:
    # an archive member's URL (tar://DIR/NAME::ARCHIVE): the member's name
    head = str(name_or_url).split("::", 1)[0]
    return PurePosixPath(head.rstrip("/")).name


def parse_scene_name(name_or_url: str) -> SceneName:
    """Parse an ALOS-2 scene file name (a path or URL is fine; only its last part is read).

    Raises ProductNameError naming the file and the expected rule.
    """
    base = _basename(name_or_url)
    m = _SCENE_RE.match(base)
    if not m:
        raise ProductNameError(
            f"{name_or_url}: file name does not follow the ALOS-2 scene naming rule "
            f"{SCENE_NAME_RULE}"
        )
    if m["mode"] not in SCENE_MODES:
        raise ProductNameError(
            f"{name_or_url}: unknown observation mode {m['mode']!r} in the file name "
            f"(expected one of {', '.join(sorted(SCENE_MODES))})"
        )
    try:
        date = dt.datetime.strptime(m["date"], "%y%m%d").date()
    except ValueError:
        raise ProductNameError(
            f"{name_or_url}: acquisition date {m['date']!r} in the file name "
            "is not a valid yymmdd date"
        ) from None
    return SceneName(
        polarization=m["pol"],
        orbit=int(m["orbit"]),
        frame=int(m["frame"]),
        date=date,
        mode=m["mode"],
        look=m["look"],
        level=m["level"],
        processing=m["proc"],
        projection=m["proj"],
        direction=m["direction"],
    )


def parse_mosaic_name(name_or_url: str) -> MosaicTileName:
    """Parse a JAXA yearly mosaic tile name such as ``N23W161_20_sl_HH_F02DAR.tif``."""
    base = _basename(name_or_url)
    m = _MOSAIC_RE.match(base)
    if not m:
        raise ProductNameError(
            f"{name_or_url}: file name does not follow the PALSAR-2 mosaic naming rule "
            f"{MOSAIC_NAME_RULE}"
        )
    lat = int(m["lat"]) * (1 if m["ns"] == "N" else -1)
    lon = int(m["lon"]) * (1 if m["ew"] == "E" else -1)
    return MosaicTileName(lat, lon, 2000 + int(m["yy"]), m["pol"], m["version"])


def parse_lulc_name(name_or_url: str) -> LulcTileName:
    """Parse an HR-LULC tile name such as ``LC_N36E140.tif`` (SW corner)."""
    base = _basename(name_or_url)
    m = _LULC_RE.match(base)
    if not m:
        raise ProductNameError(
            f"{name_or_url}: file name does not follow the HR-LULC tile naming rule "
            f"{LULC_NAME_RULE}"
        )
    lat = int(m["lat"]) * (1 if m["ns"] == "N" else -1)
    lon = int(m["lon"]) * (1 if m["ew"] == "E" else -1)
    return LulcTileName(lat, lon)


def format_lulc_name(south: int, west: int) -> str:
    """HR-LULC tile file name for the 1°×1° cell whose SW corner is (south, west)."""
    ns = "N" if south >= 0 else "S"
    ew = "E" if west >= 0 else "W"
    return f"LC_{ns}{abs(south):02d}{ew}{abs(west):03d}.tif"
