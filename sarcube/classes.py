"""The JAXA HR-LULC class tables, the 9-class map of the papers, and the segmentation tasks.

The class table is data, versioned by product release, so that a newer release (v25.04 adds
code 15, rock reef / tidal flat) is a new table, not a hunt for scattered constants. The same
holds for the two fine-tuning tasks: everything that differs between "lulc" and "water" (class
names, logit channels, label lookup, the score that selects ``best.pt``, colours) is one row of
``SEGMENTATION_TASKS``, read by fine-tuning, prediction and the reports.
"""

from __future__ import annotations

from collections.abc import Callable
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

    def lookup(self, code: int) -> LulcClass:
        for c in self.classes:
            if c.code == code:
                return c
        raise KeyError(f"code {code} is not in HR-LULC {self.version} (codes {self.codes})")

    def name(self, code: int) -> str:
        return self.lookup(code).name

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


def focal_alpha(freqs, atol: float = 1e-4) -> np.ndarray:
    """Class weights α of eq. 1 of arXiv 2601.15705: α_k = (1 − f_k) / Σ_j (1 − f_j).

    The one definition: the sampling report (α of the sampled train split) and the focal loss
    (``training.seg_losses.alpha_from_frequencies``) both call it.

    Args:
        freqs: ``(K,)`` pixel frequency of each class (non-negative, sum 1, K ≥ 2). Pass
            frequencies, not counts: normalise counts with ``counts / counts.sum()``.
        atol: tolerance on ``|Σ f − 1|``.

    Returns:
        ``(K,)`` float64 summing to 1 (e.g. f = (0.5, 0.3, 0.2) → α = (0.25, 0.35, 0.4)).

    Raises:
        ValueError: not a vector of K ≥ 2, a negative or non-finite value, or a sum ≠ 1.
    """
    f = np.asarray(freqs, dtype=np.float64)
    if f.ndim != 1 or f.size < 2:
        raise ValueError(
            f"freqs must be a 1-D vector of K >= 2 class frequencies, got {tuple(f.shape)}"
        )
    if not np.isfinite(f).all() or (f < 0).any():
        raise ValueError(f"class frequencies must be finite and >= 0, got {f.tolist()}")
    total = float(f.sum())
    if abs(total - 1.0) > atol:
        raise ValueError(
            f"class frequencies must sum to 1 (got {total:.6g}); pass pixel counts divided by "
            "their total"
        )
    w = 1.0 - f
    return w / w.sum()


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


# ---------------------------------------------------------------------------------------------
# The segmentation tasks

WATER_CLASS_NAMES = ("not water", "water")
NOT_WATER_RGB = (217, 217, 217)  # light grey: the water task's background class


@dataclass(frozen=True)
class SegmentationTask:
    """The facts of one fine-tuning task, in one place.

    Attributes:
        name: the task's name in configs, shards and stores ("lulc", "water").
        class_names: class id -> name; ``num_classes`` of them in the confusion matrix.
        num_outputs: logit channels of the segmentation head: K for a softmax over K classes,
            1 for a binary task scored with a sigmoid.
        best_metric: the validation score (a key of the task's scores) that selects ``best.pt``.
        label_lut: JAXA code -> class id, IGNORE_INDEX for no data ((256,) uint8).
        rgb: class id -> 0-255 RGB, for figures, legends and COG colour tables.
    """

    name: str
    class_names: tuple[str, ...]
    num_outputs: int
    best_metric: str
    label_lut: Callable[[], np.ndarray]
    rgb: tuple[tuple[int, int, int], ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def binary(self) -> bool:
        """True when the head has one logit (sigmoid) for two classes."""
        return self.num_outputs == 1


def _nine_class_rgb() -> tuple[tuple[int, int, int], ...]:
    """Each of the 9 classes takes the JAXA colour of its first code (forest: code 6)."""
    return tuple(DEFAULT_TABLE.lookup(codes[0]).rgb for _, codes in NINE_CLASSES)


SEGMENTATION_TASKS: dict[str, SegmentationTask] = {
    "lulc": SegmentationTask(
        "lulc", NINE_CLASS_NAMES, len(NINE_CLASS_NAMES), "miou", nine_class_lut, _nine_class_rgb()
    ),
    "water": SegmentationTask(
        "water",
        WATER_CLASS_NAMES,
        1,
        "iou",
        water_lut,
        (NOT_WATER_RGB, DEFAULT_TABLE.lookup(1).rgb),
    ),
}


def segmentation_task(name: str) -> SegmentationTask:
    """The row of ``SEGMENTATION_TASKS`` for a task name.

    Raises:
        ValueError: an unknown task, naming the known ones.
    """
    try:
        return SEGMENTATION_TASKS[name]
    except KeyError:
        raise ValueError(
            f"unknown task {name!r}; expected one of {tuple(SEGMENTATION_TASKS)}"
        ) from None
