"""Evaluation reports: one folder per evaluated split, readable by people and by programs.

:func:`write_evaluation_report` turns the split's confusion matrix (``training.metrics``) into

- ``report.json``: the scores, the matrix, the class names and any provenance the caller adds;
  strict JSON, so every NaN score (undefined, see ``ABSENT_CLASS_NOTE``) is written as ``null``;
- ``report.md``: the Table II row of arXiv 2601.15705 (LULC, IoU as fractions) or the water scores
  in percent, the absent-class note and the confusion matrix;
- ``confusion_matrix.png``, ``per_class.png`` and, given sample tiles, ``panels.png``.

Class colours are JAXA's HR-LULC palette (``sarcube.classes``): each of the 9 classes takes the
colour of its first JAXA code, so the figures match the label maps drawn by ``sarcube.plots``.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas rather than through
``pyplot``: no global backend switch and no pyplot figure registry, so writing a report from a
training process or a notebook leaves the caller's matplotlib state alone.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sarcube.classes import (
    IGNORE_INDEX,
    SEGMENTATION_TASKS,
    WATER_CLASS_NAMES,
    segmentation_task,
)
from training.metrics import ABSENT_CLASS_NOTE, binary_scores, format_table, segmentation_scores

__all__ = [
    "REPORT_FILES",
    "TASKS",
    "WATER_CLASS_NAMES",
    "class_colors",
    "json_safe",
    "read_report",
    "row_normalized",
    "write_evaluation_report",
]

TASKS = tuple(SEGMENTATION_TASKS)
REPORT_FILES = {
    "json": "report.json",
    "markdown": "report.md",
    "confusion_png": "confusion_matrix.png",
    "per_class_png": "per_class.png",
    "panels_png": "panels.png",
}

# Keys of report.json that ``extra`` may not overwrite.
_RESERVED_KEYS = frozenset(
    {"task", "split", "method", "scores", "confusion_matrix", "class_names", "note"}
    | {"synthetic_note"}
)
_IGNORE_RGB = (1.0, 1.0, 1.0)  # white: distinct from JAXA water (dark navy) and the SAR NaN colour
_SAR_NODATA_RGB = (1.0, 0.0, 1.0)  # NaN backscatter: magenta, unlike any class or grey level
_EMPTY_ROW_RGB = (0.8, 0.8, 0.8)  # confusion rows without truth pixels
_DPI = 100


def class_colors(task: str, num_classes: int) -> list[tuple[float, float, float]]:
    """RGB colours (floats in [0, 1]) of the classes of a task, in class-id order.

    The task's own colours (``SegmentationTask.rgb``) when ``num_classes`` is its class count:
    ``lulc``, the JAXA palette colour of each class's first JAXA code (water 1, built-up 2,
    cropland 3, grassland 5, forest 6, bare 10, solar panel 12, wetland 13, greenhouse 14);
    ``water``, light grey (not water) and JAXA's water colour. ``lulc`` with another class
    count: matplotlib's ``tab20`` cycle (the JAXA mapping is only defined for the 9 classes).
    """
    spec = segmentation_task(task)
    if num_classes == spec.num_classes:
        return [(r / 255.0, g / 255.0, b / 255.0) for r, g, b in spec.rgb]
    if task == "lulc":
        from matplotlib import colormaps

        tab20 = colormaps["tab20"]
        return [
            (float(r), float(g), float(b))
            for r, g, b in (tab20(i % 20)[:3] for i in range(num_classes))
        ]
    raise ValueError(f"{task}: {num_classes} classes, expected {spec.num_classes}")


def row_normalized(cm: Tensor | np.ndarray) -> np.ndarray:
    """Row-normalised confusion matrix: ``out[i, j] = cm[i, j] / sum_j cm[i, j]``.

    Args:
        cm: ``(K, K)`` counts, rows = truth, columns = prediction.

    Returns:
        ``(K, K)`` float64 array of fractions in [0, 1], each row summing to 1; a row with no
        truth pixels is all NaN (its distribution is undefined, not zero).
    """
    m = _as_numpy(cm).astype(np.float64)
    support = m.sum(axis=1, keepdims=True)
    out = np.full_like(m, np.nan)
    np.divide(m, support, out=out, where=support > 0)
    return out


def json_safe(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively.

    Python's ``json`` writes NaN as the bare token ``NaN``, which is not JSON and which strict
    parsers (JavaScript, jq, many JSON-schema tools) reject. Also converts what ``json`` cannot
    write: NumPy scalars / arrays and tensors to Python numbers / lists, tuples to lists, paths
    to strings, mapping keys to strings.
    """
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, Tensor):
        return json_safe(obj.detach().cpu().tolist())
    if isinstance(obj, np.ndarray):
        return json_safe(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        return json_safe(obj.item())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_report(path: str | Path) -> dict[str, Any]:
    """Read a ``report.json`` back (``path``: the file or the report folder).

    Undefined scores come back as ``None`` (they were written as ``null``), not NaN.
    """
    p = Path(path)
    if p.is_dir():
        p = p / REPORT_FILES["json"]
    report = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(report, dict):
        raise ValueError(f"{p} does not hold a report (a JSON object), got {type(report).__name__}")
    return report


def write_evaluation_report(
    out_dir: str | Path,
    cm: Tensor,
    *,
    task: str,
    split: str,
    method: str = "this run",
    class_names: Sequence[str] | None = None,
    panels: Sequence[Mapping[str, Any]] = (),
    extra: Mapping[str, Any] | None = None,
    synthetic_note: str | None = None,
) -> dict[str, Any]:
    """Write the evaluation report of one split into ``out_dir`` (created if missing).

    Args:
        out_dir: folder receiving the files below; existing files of the same names are replaced.
        cm: ``(K, K)`` integer confusion matrix in pixels, rows = truth, columns = prediction
            (e.g. ``ConfusionMatrix.compute()`` after ``all_reduce()``). A NumPy array is accepted.
        task: ``"lulc"`` (9 classes of Table II by default) or ``"water"`` (K = 2, class 1 = water,
            the positive class of the binary scores).
        split: name of the evaluated split, e.g. ``"test"``.
        method: first ("Method") cell of the Table II row.
        class_names: K names; default ``NINE_CLASS_NAMES`` for lulc, ``("not water", "water")``
            for water.
        panels: sample tiles for ``panels.png``, each a mapping with ``"key"`` (str, the row
            label), ``"sar_db"`` (``(H, W)`` float backscatter in dB, NaN = no data), ``"pred"``
            (``(H, W)`` int class ids in ``[0, K)``) and ``"truth"`` (``(H, W)`` int class ids in
            ``[0, K)`` or 255 = ignore). NumPy arrays or CPU tensors.
        extra: JSON-serialisable provenance merged into ``report.json`` (checkpoint, manifest,
            epoch, …); it may not reuse a key of the report itself.
        synthetic_note: if given, printed as a warning at the top of ``report.md`` and stored in
            ``report.json`` under ``"synthetic_note"`` (``null`` otherwise): a report of synthetic
            data must not be mistaken for a result on real data.

    Files written:
        ``report.json``: ``{"task", "split", "method", "scores", "confusion_matrix" (K lists of K
        ints), "class_names", "note" (``ABSENT_CLASS_NOTE``), "synthetic_note", **extra}``.
        ``scores`` is ``segmentation_scores(cm)`` for lulc; for water ``binary_scores(cm)``
        (fractions and counts) plus the 2-class ``segmentation_scores`` under ``"segmentation"``.
        Strict JSON: every NaN score (undefined, e.g. the IoU of a class absent from truth and
        prediction) is written as ``null``. ``report.md``: the scores (lulc: IoU as fractions
        with 2 decimals in the Table II layout; water: IoU, precision, recall, F1 in percent with
        2 decimals), the absent-class note and the matrix. ``confusion_matrix.png``:
        row-normalised heatmap in percent of each true class. ``per_class.png``: per-class IoU
        and accuracy with the mIoU line (water: IoU, precision, recall, F1). ``panels.png``
        (only with ``panels``; a stale one is removed otherwise): SAR | prediction | truth.

    Returns:
        ``{"json", "markdown", "confusion_png", "per_class_png": Path, "panels_png": Path or
        None, "scores": dict}``, where ``scores`` is the in-memory scores dict (NaN, not None,
        where undefined).

    Raises:
        ValueError: unknown task, a non-square or non-integer or negative matrix, a class count
        that does not match the class names (or is not 2 for water), ``extra`` reusing a report
        key, or a malformed panel (missing entry, shapes that differ, class ids out of range).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    counts = _check_cm(cm)
    k = counts.shape[0]
    if class_names is None:
        class_names = SEGMENTATION_TASKS[task].class_names
    names = [str(n) for n in class_names]
    if len(names) != k:
        raise ValueError(f"{len(names)} class names {names} for a {k}x{k} confusion matrix")
    if task == "water" and k != 2:
        raise ValueError(f"task 'water' needs a 2x2 confusion matrix (not water, water), got {k}")
    extra = dict(extra or {})
    clash = sorted(_RESERVED_KEYS & set(extra))
    if clash:
        raise ValueError(f"extra may not overwrite report keys {clash}")
    checked_panels = [_check_panel(p, i, k) for i, p in enumerate(panels)]

    cm_t = torch.from_numpy(counts)
    seg = segmentation_scores(cm_t, names)
    scores: dict[str, Any] = seg if task == "lulc" else {**binary_scores(cm_t), "segmentation": seg}

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {key: out / name for key, name in REPORT_FILES.items()}

    report = {
        "task": task,
        "split": split,
        "method": method,
        "scores": scores,
        "confusion_matrix": counts.tolist(),
        "class_names": names,
        "note": ABSENT_CLASS_NOTE,
        "synthetic_note": synthetic_note,
        **extra,
    }
    # allow_nan=False: fail loudly rather than write an invalid token if json_safe missed one.
    text = json.dumps(json_safe(report), indent=2, allow_nan=False, ensure_ascii=False)
    paths["json"].write_text(text + "\n", encoding="utf-8")
    paths["markdown"].write_text(
        _markdown(task, split, method, names, counts, scores, synthetic_note), encoding="utf-8"
    )

    colors = class_colors(task, k)
    title = f"{task} · {split} · {method}"
    _plot_confusion(counts, names, title, paths["confusion_png"])
    _plot_per_class(task, scores, names, title, paths["per_class_png"])
    if checked_panels:
        _plot_panels(checked_panels, names, colors, title, paths["panels_png"])
    else:
        # A panels.png left by an earlier report in this folder would not match this one.
        paths["panels_png"].unlink(missing_ok=True)
    written: dict[str, Any] = {**paths, "scores": scores}
    if not checked_panels:
        written["panels_png"] = None
    return written


# --------------------------------------------------------------------------- validation


def _as_numpy(a: Any) -> np.ndarray:
    if isinstance(a, Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def _check_cm(cm: Tensor | np.ndarray) -> np.ndarray:
    m = _as_numpy(cm)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise ValueError(f"cm must be a square (K, K) matrix with K >= 1, got shape {m.shape}")
    if not np.issubdtype(m.dtype, np.integer):
        raise ValueError(f"cm must hold integer pixel counts, got dtype {m.dtype}")
    if (m < 0).any():
        raise ValueError("cm holds negative counts")
    return m.astype(np.int64)


def _check_panel(panel: Mapping[str, Any], index: int, k: int) -> dict[str, Any]:
    missing = [name for name in ("key", "sar_db", "pred", "truth") if name not in panel]
    if missing:
        raise ValueError(f"panel {index} lacks {missing}")
    key = str(panel["key"])
    sar = _as_numpy(panel["sar_db"]).astype(np.float64)
    pred = _as_numpy(panel["pred"])
    truth = _as_numpy(panel["truth"])
    if sar.ndim != 2 or sar.shape != pred.shape or sar.shape != truth.shape:
        raise ValueError(
            f"panel {key!r}: sar_db {sar.shape}, pred {pred.shape} and truth {truth.shape} must "
            "be 2-D arrays of the same (H, W) shape"
        )
    for name, labels in (("pred", pred), ("truth", truth)):
        if not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"panel {key!r}: {name} must hold integer class ids, got {labels.dtype}"
            )
        labels = labels.astype(np.int64)
        bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= k))
        if bad.any():
            raise ValueError(
                f"panel {key!r}: {name} holds ids outside [0, {k}) other than {IGNORE_INDEX}: "
                f"{sorted(set(labels[bad].tolist()))[:10]}"
            )
    return {
        "key": key,
        "sar_db": sar,
        "pred": pred.astype(np.int64),
        "truth": truth.astype(np.int64),
    }


# --------------------------------------------------------------------------- Markdown


def _pct(v: float) -> str:
    return "—" if math.isnan(v) else f"{100.0 * v:.2f}"


def _markdown(
    task: str,
    split: str,
    method: str,
    names: list[str],
    counts: np.ndarray,
    scores: dict[str, Any],
    synthetic_note: str | None,
) -> str:
    lines = [f"# Evaluation report: {task}, split `{split}`, {method}", ""]
    if synthetic_note:
        lines += [f"> **⚠ SYNTHETIC DATA:** {synthetic_note}", ""]
    if task == "lulc":
        lines += [
            "## IoU per class (Table II layout, fractions)",
            "",
            format_table(scores, names, method),
        ]
        seg = scores
    else:
        seg = scores["segmentation"]
        lines += [
            "## Water detection (percent)",
            "",
            "| Method | Water IoU | Precision | Recall | F1 |",
            "|---|---:|---:|---:|---:|",
            f"| {method} | {_pct(scores['iou'])} | {_pct(scores['precision'])} | "
            f"{_pct(scores['recall'])} | {_pct(scores['f1'])} |",
            "",
            f"Pixel accuracy {_pct(scores['accuracy'])} % · 2-class mIoU {_pct(seg['miou'])} % · "
            f"TP {scores['tp']}, FP {scores['fp']}, FN {scores['fn']}, TN {scores['tn']}",
            "",
        ]
    # format_table already prints the note (and the excluded classes) when a class is absent.
    if ABSENT_CLASS_NOTE not in "\n".join(lines):
        lines += ["## Absent classes", "", ABSENT_CLASS_NOTE, ""]
        if seg["iou_excluded"] or seg["acc_excluded"]:
            lines += [
                f"Here: IoU undefined for {seg['iou_excluded']}, accuracy undefined for "
                f"{seg['acc_excluded']}.",
                "",
            ]
    header = ["truth \\ prediction", *names, "total"]
    lines += [
        "## Confusion matrix (pixels; rows = truth, columns = prediction)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|",
    ]
    for name, row in zip(names, counts.tolist(), strict=True):
        lines.append("| " + " | ".join([name, *map(str, row), str(sum(row))]) + " |")
    lines += [
        "| total | " + " | ".join(str(int(v)) for v in counts.sum(axis=0)) + f" | {counts.sum()} |",
        "",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- figures


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=_DPI, layout="constrained")


def _save(fig, path: Path) -> None:
    # bbox "tight": constrained layout alone can clip the y label next to a square heatmap.
    fig.savefig(path, bbox_inches="tight")


def _plot_confusion(counts: np.ndarray, names: list[str], title: str, path: Path) -> None:
    from matplotlib import colormaps

    k = len(names)
    frac = row_normalized(counts)
    side = max(4.0, 0.75 * k + 2.5)
    fig = _new_figure(side + 1.0, side)
    ax = fig.subplots()
    cmap = colormaps["Blues"].with_extremes(bad=_EMPTY_ROW_RGB)
    im = ax.imshow(np.ma.masked_invalid(frac * 100.0), cmap=cmap, vmin=0.0, vmax=100.0)
    fontsize = 9 if k <= 6 else 7
    for i in range(k):
        if not np.isfinite(frac[i]).any():
            ax.text((k - 1) / 2, i, "no truth pixels", ha="center", va="center", fontsize=fontsize)
            continue
        for j in range(k):
            v = 100.0 * frac[i, j]
            ax.text(
                j,
                i,
                f"{v:.1f}" if counts[i, j] else "0",
                ha="center",
                va="center",
                fontsize=fontsize,
                color="white" if v > 50.0 else "black",
            )
    ax.set_xticks(range(k), names, rotation=45, ha="right")
    ax.set_yticks(range(k), names)
    ax.set_xlabel("prediction")
    ax.set_ylabel("truth")
    ax.set_title(f"confusion matrix, % of each true class\n{title}", fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.046, label="% of the row's truth pixels")
    _save(fig, path)


def _plot_per_class(
    task: str, scores: dict[str, Any], names: list[str], title: str, path: Path
) -> None:
    if task == "water":
        labels = ["IoU", "precision", "recall", "F1"]
        values = [100.0 * scores[m] for m in ("iou", "precision", "recall", "f1")]
        fig = _new_figure(5.5, 4.0)
        ax = fig.subplots()
        heights = [0.0 if math.isnan(v) else v for v in values]
        bars = ax.bar(labels, heights, color=class_colors("water", 2)[1], edgecolor="black")
        for bar, v in zip(bars, values, strict=True):
            text = "undefined" if math.isnan(v) else f"{v:.2f}"
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height() + 1, text, ha="center")
        ax.set_ylim(0, 110)
        ax.set_ylabel("%")
        ax.set_title(f"water detection\n{title}", fontsize=10)
        _save(fig, path)
        return

    k = len(names)
    iou = np.array([scores["iou"][n] for n in names], dtype=np.float64)
    acc = np.array([scores["acc"][n] for n in names], dtype=np.float64)
    y = np.arange(k)
    h = 0.38
    fig = _new_figure(7.0, max(3.5, 0.45 * k + 1.5))
    ax = fig.subplots()
    ax.barh(y - h / 2, np.nan_to_num(iou), h, label="IoU", color="tab:blue")
    ax.barh(y + h / 2, np.nan_to_num(acc), h, label="accuracy (recall)", color="tab:orange")
    for offset, vals in ((-h / 2, iou), (h / 2, acc)):
        for yi, v in zip(y, vals, strict=True):
            text = "absent" if math.isnan(v) else f"{v:.2f}"
            ax.text(
                max(v, 0.0) + 0.01 if not math.isnan(v) else 0.01,
                yi + offset,
                text,
                va="center",
                fontsize=7,
                color="dimgray" if math.isnan(v) else "black",
            )
    if not math.isnan(scores["miou"]):
        ax.axvline(
            scores["miou"], color="black", linestyle="--", label=f"mIoU {scores['miou']:.2f}"
        )
    ax.set_yticks(y, names)
    ax.invert_yaxis()  # class 0 on top, as in the tables
    ax.set_xlim(0, 1.12)
    ax.set_xlabel("fraction")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"per-class scores\n{title}", fontsize=10)
    _save(fig, path)


def _sar_range(sar: np.ndarray) -> tuple[float, float]:
    """2nd/98th percentiles of the finite values (display stretch robust to speckle outliers)."""
    finite = sar[np.isfinite(sar)]
    if finite.size == 0:
        from sarcube.plots import DB_RANGE

        return DB_RANGE
    lo, hi = (float(v) for v in np.percentile(finite, [2.0, 98.0]))
    if hi <= lo:  # constant tile: widen so imshow does not divide by zero
        lo, hi = lo - 1.0, hi + 1.0
    return lo, hi


def _plot_panels(
    panels: list[dict[str, Any]],
    names: list[str],
    colors: list[tuple[float, float, float]],
    title: str,
    path: Path,
) -> None:
    from matplotlib import colormaps
    from matplotlib.colors import BoundaryNorm, ListedColormap
    from matplotlib.patches import Patch

    k = len(names)
    label_cmap = ListedColormap(colors).with_extremes(bad=_IGNORE_RGB)
    label_norm = BoundaryNorm(np.arange(-0.5, k + 0.5), k)
    sar_cmap = colormaps["gray"].with_extremes(bad=_SAR_NODATA_RGB)
    n = len(panels)
    fig = _new_figure(11.0, 3.4 * n + 1.0)
    axes = fig.subplots(n, 3, squeeze=False)
    for row, panel in zip(axes, panels, strict=True):
        sar, pred, truth = panel["sar_db"], panel["pred"], panel["truth"]
        lo, hi = _sar_range(sar)
        im = row[0].imshow(np.ma.masked_invalid(sar), cmap=sar_cmap, vmin=lo, vmax=hi)
        fig.colorbar(im, ax=row[0], fraction=0.046, label="dB")
        valid = truth != IGNORE_INDEX
        acc = float((pred[valid] == truth[valid]).mean()) if valid.any() else math.nan
        for ax, labels in ((row[1], pred), (row[2], truth)):
            ax.imshow(
                np.ma.masked_equal(labels, IGNORE_INDEX),
                cmap=label_cmap,
                norm=label_norm,
                interpolation="nearest",
            )
        row[0].set_title(f"{panel['key']}\nSAR [dB], 2–98 % stretch", fontsize=9)
        acc_text = "no valid truth" if math.isnan(acc) else f"pixel acc. {100 * acc:.1f} %"
        row[1].set_title(f"prediction ({acc_text})", fontsize=9)
        row[2].set_title("truth", fontsize=9)
        for ax in row:
            ax.set_xticks([])
            ax.set_yticks([])
    handles = [
        Patch(facecolor=c, edgecolor="black", label=n) for n, c in zip(names, colors, strict=True)
    ]
    handles += [
        Patch(facecolor=_IGNORE_RGB, edgecolor="black", label=f"ignore ({IGNORE_INDEX})"),
        Patch(facecolor=_SAR_NODATA_RGB, edgecolor="black", label="SAR no data (NaN)"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncol=min(6, len(handles)), fontsize=8)
    fig.suptitle(title, fontsize=10)
    _save(fig, path)
