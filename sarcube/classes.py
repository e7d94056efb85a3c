"""The JAXA HR-LULC class tables: codes, names, colours and the 9-class map of the papers.

The class table is data, versioned by product release, so that a newer release (v25.04 adds
code 15, rock reef / tidal flat) is a new table, not a hunt for scattered constants.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NODATA_CODE = 0
IGNORE_INDEX = 255  # training-side label for "no data" (JAXA code 0)


@dataclass(frozen=True)
class LulcClass:
    code: int
    name: str
    rgb: tuple[int, int, int]  # JAXA's palette, as embedded in the v23.12 GeoTIFFs


@dataclass(frozen=True)
class ClassTable:
    """One release of the JAXA HR-LULC Japan legend."""

    version: str
    classes: tuple[LulcClass, ...]

    @property
    def codes(self) -> tuple[int, ...]:
        return tuple(c.code for c in self.classes)

    def name(self, code: int) -> str:
        for c in self.classes:
            if c.code == code:
                return c.name
        raise KeyError(f"code {code} is not in HR-LULC {self.version} (codes {self.codes})")

    def colormap(self) -> dict[int, tuple[int, int, int, int]]:
        """GDAL colour table: code -> RGBA, with code 0 (no data) transparent."""
        cmap = {NODATA_CODE: (0, 0, 0, 0)}
        cmap.update({c.code: (*c.rgb, 255) for c in self.classes})
        return cmap


HRLULC_V23_12 = ClassTable(
    version="v23.12",
    classes=(
        LulcClass(1, "water", (0, 0, 100)),
        LulcClass(2, "built-up", (255, 0, 0)),
        LulcClass(3, "paddy field", (0, 128, 255)),
        LulcClass(4, "cropland", (255, 193, 191)),
        LulcClass(5, "grassland", (255, 255, 0)),
        LulcClass(6, "deciduous broad-leaf forest", (128, 255, 0)),
        LulcClass(7, "deciduous needle-leaf forest", (0, 255, 128)),
        LulcClass(8, "evergreen broad-leaf forest", (86, 172, 0)),
        LulcClass(9, "evergreen needle-leaf forest", (0, 172, 86)),
        LulcClass(10, "bare land", (128, 100, 0)),
        LulcClass(11, "bamboo forest", (217, 240, 5)),
        LulcClass(12, "solar panel", (161, 41, 119)),
        LulcClass(13, "wetland", (0, 150, 160)),
        LulcClass(14, "greenhouse", (255, 255, 255)),
    ),
)
CLASS_TABLES = {t.version: t for t in (HRLULC_V23_12,)}
DEFAULT_TABLE = HRLULC_V23_12

FOREST_CODES = (6, 7, 8, 9, 11)

# The 9 classes of arXiv 2601.15705 (Table II order): class id -> (name, JAXA codes).
NINE_CLASSES: tuple[tuple[str, tuple[int, ...]], ...] = (
    ("water", (1,)),
    ("built-up", (2,)),
    ("cropland", (3, 4)),
    ("grassland", (5,)),
    ("forest", FOREST_CODES),
    ("bare", (10,)),
    ("solar panel", (12,)),
    ("wetland", (13,)),
    ("greenhouse", (14,)),
)
NINE_CLASS_NAMES = tuple(name for name, _ in NINE_CLASSES)


def nine_class_lut(table: ClassTable = DEFAULT_TABLE) -> np.ndarray:
    """Lookup table (256,) uint8: JAXA code -> 9-class id, IGNORE_INDEX for 0 and unknown codes."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for idx, (_, codes) in enumerate(NINE_CLASSES):
        for code in codes:
            if code not in table.codes:
                raise ValueError(
                    f"9-class map uses code {code}, absent from HR-LULC {table.version}"
                )
            lut[code] = idx
    return lut


def water_lut() -> np.ndarray:
    """Lookup table (256,) uint8: JAXA code -> 1 water, 0 not water, IGNORE_INDEX for no data."""
    lut = np.zeros(256, dtype=np.uint8)
    lut[1] = 1
    lut[NODATA_CODE] = IGNORE_INDEX
    return lut


# Share (%) of each code on Japan's land, measured once from the real national map
# ../shared/realdata/hrlulc_japan_v23.12_250m/JAXA_HRLULC_Japan_v23.12_250m.tif (8,933,126 px):
# open sea is removed as every code-1 pixel connected (8-neighbour) to code 0 (open ocean), so
# "water" is inland water not connected to the sea (lakes; rivers reaching the sea are counted as
# sea, so inland water is under-estimated). Used by the procedural generator when no template map
# is given.
JAPAN_LAND_SHARES_PCT: dict[int, float] = {
    1: 1.037,
    2: 7.947,
    3: 4.607,
    4: 4.130,
    5: 7.329,
    6: 38.116,
    7: 3.148,
    8: 5.275,
    9: 20.343,
    10: 1.586,
    11: 3.381,
    12: 0.166,
    13: 2.616,
    14: 0.320,
}
