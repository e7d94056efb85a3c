"""Evaluation reports (training.reports) against hand-computed scores.

The 9-class matrix below is worked by hand (cells not listed are 0):

    truth \\ pred  water built crop grass forest bare solar wetl green | truth px
    water            50                                    10         |  60
    built-up               40    10                                   |  50
    cropland                5    30                                   |  35
    grassland                         20    20                        |  40
    forest                             5   100                        | 105
    bare                   10                    10                   |  20
    solar panel                                                       |   0
    wetland                                                           |   0
    greenhouse                    5                               5   |  10
    predicted px     50    55    45   25   120   10    0    10    5   | 320

IoU = TP / (truth + predicted - TP): water 50/60, built-up 40/65, cropland 30/50, grassland
20/45, forest 100/125, bare 10/20, solar panel 0/0 (absent from truth and prediction: NaN),
wetland 0/10 = 0 (predicted, never true), greenhouse 5/10. mIoU = mean of the 8 defined values
= 4.293162/8 = 0.536645. Accuracy = TP / truth: NaN for solar panel and wetland.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sarcube.classes import NINE_CLASS_NAMES
from training.reports import (
    class_colors,
    json_safe,
    read_report,
    row_normalized,
    write_evaluation_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
WATER, BUILT, CROP, GRASS, FOREST, BARE, SOLAR, WETLAND, GREEN = range(9)


def _lulc_cm() -> torch.Tensor:
    cm = torch.zeros(9, 9, dtype=torch.int64)
    for (i, j), n in {
        (WATER, WATER): 50,
        (WATER, WETLAND): 10,
        (BUILT, BUILT): 40,
        (BUILT, CROP): 10,
        (CROP, BUILT): 5,
        (CROP, CROP): 30,
        (GRASS, GRASS): 20,
        (GRASS, FOREST): 20,
        (FOREST, GRASS): 5,
        (FOREST, FOREST): 100,
        (BARE, BUILT): 10,
        (BARE, BARE): 10,
        (GREEN, CROP): 5,
        (GREEN, GREEN): 5,
    }.items():
        cm[i, j] = n
    return cm


HAND_IOU = {
    "water": 50 / 60,
    "built-up": 40 / 65,
    "cropland": 30 / 50,
    "grassland": 20 / 45,
    "forest": 100 / 125,
    "bare": 10 / 20,
    "solar panel": None,
    "wetland": 0.0,
    "greenhouse": 5 / 10,
}
HAND_MIOU = sum(v for v in HAND_IOU.values() if v is not None) / 8


def _strict_json(text: str) -> dict:
    def reject(token: str) -> None:
        raise AssertionError(f"invalid JSON token {token} in report.json")

    return json.loads(text, parse_constant=reject)


def _check_png(path, min_h: int = 150, min_w: int = 150) -> np.ndarray:
    import matplotlib.image as mpimg

    assert path.read_bytes()[:8] == PNG_MAGIC
    img = mpimg.imread(path)
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    assert img.shape[0] >= min_h and img.shape[1] >= min_w, img.shape
    assert img.shape[0] <= 4000 and img.shape[1] <= 4000, img.shape
    assert img[..., :3].std() > 0.01  # not a blank canvas
    return img


def _panel(key: str, k: int, rng: np.random.Generator, h: int = 24, w: int = 32) -> dict:
    sar = rng.normal(-12.0, 4.0, size=(h, w))
    sar[:3, :5] = np.nan
    truth = rng.integers(0, k, size=(h, w))
    truth[-2:, :] = 255
    pred = np.where(rng.random((h, w)) < 0.8, np.where(truth == 255, 0, truth), 0)
    return {"key": key, "sar_db": sar, "pred": pred, "truth": truth}


def test_lulc_report_matches_hand_values(tmp_path):
    rng = np.random.default_rng(0)
    out = write_evaluation_report(
        tmp_path / "rep",
        _lulc_cm(),
        task="lulc",
        split="test",
        method="UperNet SAR",
        panels=[_panel("tile_a", 9, rng), _panel("tile_b", 9, rng)],
        extra={"checkpoint": tmp_path / "best.pt", "epoch": np.int64(7)},
        synthetic_note="Scores on SYNTHETIC scenes; not comparable with the paper.",
    )

    report = _strict_json(out["json"].read_text())
    assert report == read_report(tmp_path / "rep") == read_report(out["json"])
    assert (report["task"], report["split"], report["method"]) == ("lulc", "test", "UperNet SAR")
    assert report["class_names"] == list(NINE_CLASS_NAMES)
    assert report["confusion_matrix"] == _lulc_cm().tolist()
    assert report["checkpoint"] == str(tmp_path / "best.pt") and report["epoch"] == 7
    assert report["synthetic_note"].startswith("Scores on SYNTHETIC")
    assert "absent" in report["note"]

    s = report["scores"]
    for name, hand in HAND_IOU.items():
        if hand is None:
            assert s["iou"][name] is None, name
        else:
            assert s["iou"][name] == pytest.approx(hand, abs=1e-12), name
    assert s["miou"] == pytest.approx(HAND_MIOU, abs=1e-12)
    assert s["miou"] == pytest.approx(0.536645, abs=1e-6)
    assert s["acc"]["solar panel"] is None and s["acc"]["wetland"] is None
    assert s["acc"]["cropland"] == pytest.approx(30 / 35)
    assert s["pixel_acc"] == pytest.approx(255 / 320)
    assert s["iou_excluded"] == ["solar panel"]
    assert s["acc_excluded"] == ["solar panel", "wetland"]
    assert s["support"]["forest"] == 105 and s["total_pixels"] == 320
    # The in-memory scores keep NaN; only the file has null.
    assert math.isnan(out["scores"]["iou"]["solar panel"])

    md = out["markdown"].read_text()
    lines = md.splitlines()
    assert lines[0].startswith("# ")
    assert "SYNTHETIC" in "\n".join(lines[:4])  # prominent: right under the title
    assert "Scores on SYNTHETIC scenes; not comparable with the paper." in md
    assert (
        "| Method | Water | Built-up | Cropland | Grassland | Forest | Bare | Solar Panel | "
        "Wetland | Greenhouse | mIoU |" in md
    )
    # Hand values to 2 decimals: 0.8333 0.6154 0.6 0.4444 0.8 0.5 — 0 0.5 | 0.5366.
    assert (
        "| UperNet SAR | 0.83 | 0.62 | 0.60 | 0.44 | 0.80 | 0.50 | — | 0.00 | 0.50 | 0.54 |" in md
    )
    assert "TP+FP+FN = 0" in md  # the absent-class note
    assert "| truth \\ prediction | water | built-up |" in md
    assert "| water | 50 | 0 | 0 | 0 | 0 | 0 | 0 | 10 | 0 | 60 |" in md
    assert "| solar panel | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 | 0 |" in md

    for key in ("confusion_png", "per_class_png", "panels_png"):
        assert out[key].parent == tmp_path / "rep"
        _check_png(out[key])
    panels = _check_png(out["panels_png"], min_h=400, min_w=600)
    assert panels.shape[0] > panels.shape[1] * 0.5  # two rows of three panels


def test_water_report_percent_values(tmp_path):
    # rows truth, cols prediction: [[TN, FP], [FN, TP]]
    cm = torch.tensor([[900, 20], [30, 450]])
    out = write_evaluation_report(
        tmp_path,
        cm,
        task="water",
        split="val",
        panels=[_panel("w", 2, np.random.default_rng(1))],
    )
    md = out["markdown"].read_text()
    assert "| Method | Water IoU | Precision | Recall | F1 |" in md
    # IoU 450/500 = 90 %, precision 450/470 = 95.745 %, recall 450/480 = 93.75 %,
    # F1 900/950 = 94.737 %.
    assert "| this run | 90.00 | 95.74 | 93.75 | 94.74 |" in md
    assert "SYNTHETIC" not in md
    assert "| not water | 900 | 20 | 920 |" in md

    report = _strict_json(out["json"].read_text())
    s = report["scores"]
    assert s["precision"] == pytest.approx(450 / 470)
    assert (s["tp"], s["fp"], s["fn"], s["tn"]) == (450, 20, 30, 900)
    assert report["class_names"] == ["not water", "water"]
    assert s["segmentation"]["iou"]["water"] == pytest.approx(450 / 500)
    assert s["segmentation"]["iou"]["not water"] == pytest.approx(900 / 950)
    assert report["synthetic_note"] is None
    for key in ("confusion_png", "per_class_png", "panels_png"):
        _check_png(out[key])


def test_water_without_positives_writes_null(tmp_path):
    out = write_evaluation_report(
        tmp_path, torch.tensor([[10, 0], [0, 0]]), task="water", split="t"
    )
    report = _strict_json(out["json"].read_text())
    assert report["scores"]["iou"] is None and report["scores"]["precision"] is None
    assert "| this run | — | — | — | — |" in out["markdown"].read_text()
    _check_png(out["per_class_png"])


def test_no_panels_removes_stale_panels_png(tmp_path):
    rng = np.random.default_rng(2)
    first = write_evaluation_report(
        tmp_path, _lulc_cm(), task="lulc", split="test", panels=[_panel("a", 9, rng)]
    )
    assert first["panels_png"].exists()
    second = write_evaluation_report(tmp_path, _lulc_cm(), task="lulc", split="test")
    assert second["panels_png"] is None
    assert not (tmp_path / "panels.png").exists()


def test_row_normalized_and_palette():
    frac = row_normalized(_lulc_cm())
    assert frac[WATER, WATER] == pytest.approx(50 / 60)
    assert frac[WATER, WETLAND] == pytest.approx(10 / 60)
    np.testing.assert_allclose(np.nansum(frac, axis=1)[[0, 1, 2, 3, 4, 5, 8]], 1.0)
    assert np.isnan(frac[SOLAR]).all() and np.isnan(frac[WETLAND]).all()

    colors = class_colors("lulc", 9)
    # JAXA palette of the first code of each class: water 1, cropland 3 (paddy), forest 6.
    assert colors[WATER] == pytest.approx((0, 0, 100 / 255))
    assert colors[CROP] == pytest.approx((0, 128 / 255, 1))
    assert colors[FOREST] == pytest.approx((128 / 255, 1, 0))
    assert colors[GREEN] == pytest.approx((1, 1, 1))
    assert class_colors("water", 2)[1] == colors[WATER]


def test_json_safe_replaces_non_finite():
    obj = {"a": math.nan, "b": [1.0, math.inf, np.float32("nan")], "c": (np.int64(3),)}
    assert json_safe(obj) == {"a": None, "b": [1.0, None, None], "c": [3]}
    json.dumps(json_safe(obj), allow_nan=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"cm": torch.zeros(9, 8, dtype=torch.int64)}, "square"),
        ({"cm": torch.zeros(3, 3, dtype=torch.int64)}, "3 class names|9 class names"),
        ({"task": "flood"}, "unknown task"),
        ({"cm": torch.zeros(9, 9)}, "integer"),
        ({"cm": -torch.ones(9, 9, dtype=torch.int64)}, "negative"),
        ({"class_names": ["a", "b"]}, "2 class names"),
        ({"task": "water"}, "2 class names"),
        ({"task": "water", "class_names": NINE_CLASS_NAMES}, "2x2"),
        ({"extra": {"scores": 1}}, "overwrite"),
        (
            {
                "panels": [
                    {
                        "key": "p",
                        "sar_db": np.zeros((4, 4)),
                        "pred": np.zeros((4, 4), int),
                        "truth": np.zeros((4, 5), int),
                    }
                ]
            },
            "same",
        ),
        (
            {
                "panels": [
                    {
                        "key": "p",
                        "sar_db": np.zeros((4, 4)),
                        "pred": np.full((4, 4), 9),
                        "truth": np.zeros((4, 4), int),
                    }
                ]
            },
            "outside",
        ),
        ({"panels": [{"key": "p", "sar_db": np.zeros((4, 4))}]}, "lacks"),
    ],
)
def test_bad_input_raises(tmp_path, kwargs, match):
    args = {"cm": _lulc_cm(), "task": "lulc", "split": "test", **kwargs}
    cm = args.pop("cm")
    with pytest.raises(ValueError, match=match):
        write_evaluation_report(tmp_path / "never", cm, **args)
    assert not (tmp_path / "never").exists()  # validation happens before anything is written
