"""``sarcube sample``: category-aware patch sampling, leakage-free splits and the patch index.

The method of arXiv 2603.15119 §2.2 / 2601.15705 §III-A, computed without ever holding the label
raster in memory:

1. per-patch class histograms of the label cube (Dask, block by block) -> global pixel counts n_k;
2. p_k = n_k / Σn, weights w_k ∝ 1/p_k normalised to 1 (classes with n_k = 0 get none);
3. N anchors allocated to classes by N·w_k (largest-remainder rounding, so they sum to N exactly);
4. the A_k anchors of class k placed uniformly at random among class-k pixels. Only *which patch*
   an anchor lands in matters, and uniform placement over pixels is, patch by patch, a multinomial
   draw with probabilities (class-k pixels in the patch) / n_k — so that is what is drawn, exactly;
5. keep patches with ≥ 1 anchor (duplicates collapse), drop those made entirely of the excluded
   codes (default: the five forest codes), and, per date, those whose SAR-or-label no-data share
   exceeds ``max_nodata``.

Splits: by acquisition month (default Oct–Nov -> ``pretrain``, Sep -> fine-tuning); fine-tuning
patches go to train/val/test by spatial blocks of ``block`` × ``block`` patches, in a seeded random
block order, each block to the split furthest below its target share — so neighbouring patches
share a split except across block edges. Everything is deterministic from the seed.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import __version__, defaults
from .classes import DEFAULT_TABLE, FOREST_CODES, NINE_CLASS_NAMES, focal_alpha, nine_class_lut
from .errors import InputError
from .index import (
    CODES,
    COLUMNS,
    FINETUNE_SPLITS,
    HIST_COLUMNS,
    cube_fingerprint,
    patch_id,
    write_index,
)

SHORT_NAMES = {
    1: "water",
    2: "built-up",
    3: "paddy",
    4: "cropland",
    5: "grassland",
    6: "DBF",
    7: "DNF",
    8: "EBF",
    9: "ENF",
    10: "bare",
    11: "bamboo",
    12: "solar",
    13: "wetland",
    14: "greenhouse",
}
NCODES = 16  # histogram bins 0..15 (0 = no data; 15 reserved for newer releases)


# The random stream of the spatial split's block order, apart from the anchors' (``seed``): an
# offset of the sampling seed (changing it changes every split).
SPLIT_BLOCK_STREAM = 7919


@dataclass
class SamplingParams:
    n_anchors: int = defaults.N_ANCHORS
    seed: int = defaults.SAMPLING_SEED
    exclude_full: tuple[int, ...] = defaults.EXCLUDE_FULL
    pretrain_months: tuple[int, ...] = defaults.PRETRAIN_MONTHS
    finetune_months: tuple[int, ...] = defaults.FINETUNE_MONTHS
    split: tuple[float, float, float] = defaults.SPLIT_FRACTIONS
    max_nodata: float = defaults.MAX_NODATA
    block: int = defaults.SPLIT_BLOCK  # patches per side of a split block
    patch: int = defaults.PATCH

    def validate(self) -> None:
        if int(self.n_anchors) <= 0:
            raise InputError(f"--n-anchors must be > 0, got {self.n_anchors}")
        if (
            len(self.split) != 3
            or any(f < 0 for f in self.split)
            or not math.isclose(sum(self.split), 1.0, abs_tol=1e-6)
        ):
            raise InputError(
                "--split TRAIN VAL TEST must be 3 non-negative fractions summing to 1, "
                f"got {list(self.split)}"
            )
        for name in ("pretrain_months", "finetune_months"):
            bad = [m for m in getattr(self, name) if not (1 <= int(m) <= 12)]
            if bad:
                raise InputError(f"--{name.replace('_', '-')}: {bad} are not months 1–12")
        both = set(self.pretrain_months) & set(self.finetune_months)
        if both:
            raise InputError(
                f"months {sorted(both)} are in both --pretrain-months and --finetune-months "
                "(temporal leakage)"
            )
        if not (0.0 <= self.max_nodata <= 1.0):
            raise InputError(f"--max-nodata must be within 0..1, got {self.max_nodata}")
        bad = [c for c in self.exclude_full if c not in DEFAULT_TABLE.codes]
        if bad:
            raise InputError(f"--exclude-full: {bad} are not JAXA codes {DEFAULT_TABLE.codes}")
        if self.block < 1:
            raise InputError(f"--block must be ≥ 1, got {self.block}")


# ---------------------------------------------------------------------------------------------
# Building blocks (public: the real-data test and the benchmark call them on any label array)


def _block_hist(block: np.ndarray, patch: int) -> np.ndarray:
    """(bh, bw) codes -> (bh/patch, bw/patch, NCODES) pixel counts per patch."""
    bh, bw = block.shape
    nr, nc = bh // patch, bw // patch
    b = block[: nr * patch, : nc * patch].reshape(nr, patch, nc, patch).transpose(0, 2, 1, 3)
    codes = np.minimum(b.reshape(nr * nc, patch * patch).astype(np.int64), NCODES - 1)
    offsets = (np.arange(nr * nc, dtype=np.int64) * NCODES)[:, None]
    return np.bincount((codes + offsets).ravel(), minlength=nr * nc * NCODES).reshape(
        nr, nc, NCODES
    )


def patch_histograms(labels, patch: int = 256, block_patches: int = 8) -> np.ndarray:
    """Per-patch class histograms of a 2-D label array (numpy or Dask), (nr, nc, 16) int64.

    Only whole patches count (a partial last row/column of patches is left out). With a Dask
    array the work is one task per block of ``block_patches``² patches, summed nowhere else:
    the label raster is never in memory as a whole.
    """
    import dask.array as da

    h, w = labels.shape
    nr, nc = h // patch, w // patch
    if nr == 0 or nc == 0:
        return np.zeros((nr, nc, NCODES), dtype=np.int64)
    arr = (
        labels
        if isinstance(labels, da.Array)
        else da.from_array(np.asarray(labels), chunks=patch * block_patches)
    )
    arr = arr[: nr * patch, : nc * patch].rechunk(patch * block_patches)
    out = arr.map_blocks(
        _block_hist,
        patch,
        dtype=np.int64,
        new_axis=2,
        chunks=(
            tuple(c // patch for c in arr.chunks[0]),
            tuple(c // patch for c in arr.chunks[1]),
            (NCODES,),
        ),
    )
    return out.compute()


def _block_sar_nodata(hh: np.ndarray, lab: np.ndarray, patch: int) -> np.ndarray:
    bad = ~np.isfinite(hh) | (lab == 0)
    nr, nc = bad.shape[0] // patch, bad.shape[1] // patch
    return bad[: nr * patch, : nc * patch].reshape(nr, patch, nc, patch).sum(axis=(1, 3))


def patch_nodata_counts(hh_db, lulc, patch: int = 256, block_patches: int = 8) -> np.ndarray:
    """(T, nr, nc) number of pixels per (date, patch) with no SAR value or no label (Dask)."""
    import dask.array as da

    t, h, w = hh_db.shape
    nr, nc = h // patch, w // patch
    size = patch * block_patches
    lab = lulc[: nr * patch, : nc * patch].rechunk(size)
    outs = []
    for i in range(t):
        hh = hh_db[i, : nr * patch, : nc * patch].rechunk(size)
        outs.append(
            da.map_blocks(
                _block_sar_nodata,
                hh,
                lab,
                patch,
                dtype=np.int64,
                chunks=(
                    tuple(c // patch for c in hh.chunks[0]),
                    tuple(c // patch for c in hh.chunks[1]),
                ),
            )
        )
    return np.stack(da.compute(*outs)) if outs else np.zeros((0, nr, nc), dtype=np.int64)


def class_weights(counts: np.ndarray) -> np.ndarray:
    """w_k ∝ 1/p_k over codes 1..14 with n_k > 0, normalised to sum 1; (NCODES,) float64."""
    counts = np.asarray(counts, dtype=np.float64)
    w = np.zeros(NCODES, dtype=np.float64)
    present = [c for c in CODES if counts[c] > 0]
    if not present:
        raise InputError("the label cube has no labelled pixel (all codes 0): nothing to sample")
    total = counts[present].sum()
    for c in present:
        w[c] = total / counts[c]  # 1 / p_k
    return w / w.sum()


def allocate_anchors(n_anchors: int, weights: np.ndarray) -> np.ndarray:
    """N·w_k anchors per class, rounded by largest remainder so they sum to N; (NCODES,) int64."""
    exact = n_anchors * np.asarray(weights, dtype=np.float64)
    alloc = np.floor(exact).astype(np.int64)
    short = int(n_anchors - alloc.sum())
    order = np.argsort(-(exact - alloc), kind="stable")  # ties -> lower code first
    alloc[order[:short]] += 1
    return alloc


def place_anchors(hist: np.ndarray, alloc: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Anchors per patch: for each class, a multinomial over patches weighted by that class's
    pixels in them (= uniform placement among the class's pixels). (nr, nc) int64."""
    nr, nc, _ = hist.shape
    anchors = np.zeros(nr * nc, dtype=np.int64)
    for k in CODES:
        n_k = int(hist[..., k].sum())
        if alloc[k] == 0 or n_k == 0:
            continue
        anchors += rng.multinomial(int(alloc[k]), hist[..., k].ravel() / n_k)
    return anchors.reshape(nr, nc)


def balance_patches(
    hist: np.ndarray, n_anchors: int, seed: int, exclude_full: Sequence[int] = FOREST_CODES
) -> dict[str, Any]:
    """Category-aware sampling on per-patch histograms. Returns counts, weights, allocation,
    anchors per patch and the kept mask (≥ 1 anchor, not entirely excluded codes)."""
    counts = hist.reshape(-1, NCODES).sum(axis=0)
    w = class_weights(counts)
    alloc = allocate_anchors(int(n_anchors), w)
    anchors = place_anchors(hist, alloc, np.random.default_rng(seed))
    labelled = hist[..., 1:15].sum(axis=-1)
    excluded = (
        hist[..., list(exclude_full)].sum(axis=-1) if len(exclude_full) else np.zeros_like(labelled)
    )
    only_excluded = (labelled > 0) & (excluded == labelled)
    kept = (anchors > 0) & ~only_excluded
    return {
        "counts": counts,
        "weights": w,
        "allocation": alloc,
        "anchors": anchors,
        "kept": kept,
        "only_excluded": only_excluded,
    }


def class_shares(counts: np.ndarray) -> dict[int, float]:
    """{code: share of labelled pixels} over codes 1..14."""
    counts = np.asarray(counts, dtype=np.float64)
    total = counts[1:15].sum()
    return {c: (float(counts[c] / total) if total else 0.0) for c in CODES}


def alpha_from_counts(counts: np.ndarray) -> list[float]:
    """``focal_alpha`` (eq. 1) of the 9-class map, from code pixel counts (index 0..15)."""
    lut = nine_class_lut()
    nine = np.zeros(len(NINE_CLASS_NAMES), dtype=np.float64)
    for code in CODES:
        nine[lut[code]] += counts[code]
    return list(focal_alpha(nine / nine.sum()))


def assign_blocks(
    rows: np.ndarray,
    cols: np.ndarray,
    fractions: Sequence[float],
    block: int,
    seed: int,
    names: Sequence[str] = FINETUNE_SPLITS,
) -> np.ndarray:
    """Split patches by spatial blocks of ``block`` × ``block`` patches (see module doc)."""
    rows, cols = np.asarray(rows), np.asarray(cols)
    out = np.empty(rows.shape, dtype=object)
    if rows.size == 0:
        return out
    bid = (rows // block).astype(np.int64) * 1_000_003 + (cols // block).astype(np.int64)
    blocks, inverse, sizes = np.unique(bid, return_inverse=True, return_counts=True)
    order = np.random.default_rng(seed + SPLIT_BLOCK_STREAM).permutation(len(blocks))
    target = np.asarray(fractions, dtype=np.float64) * rows.size
    have = np.zeros(len(fractions))
    choice = np.empty(len(blocks), dtype=np.int64)
    for b in order:
        k = int(np.argmax(target - have))  # the split furthest below its target
        choice[b] = k
        have[k] += sizes[b]
    out[:] = np.asarray(names, dtype=object)[choice[inverse]]
    return out


# ---------------------------------------------------------------------------------------------
# The cube -> index pipeline


@dataclass
class SamplingResult:
    index: pd.DataFrame
    report: dict[str, Any]
    files: dict[str, str] = field(default_factory=dict)


def sample_patches(
    cube_url: str,
    out: str | None = None,
    params: SamplingParams | None = None,
    storage_options: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> SamplingResult:
    """Sample the cube's patches into a patch index (Parquet at ``out``) and a sampling report
    (``<out stem>_report.{json,md,png}`` next to it)."""
    from .cube import CubeError, cube_attrs, open_cube, open_group

    p = params or SamplingParams()
    p.validate()
    root = open_group(cube_url, storage_options)
    if (cube_attrs(root).get("labels") or {}).get("status") != "complete":
        raise CubeError(
            f"{cube_url}: the cube has no labels (ingest HR-LULC tiles with --lulc first)"
        )
    cube = open_cube(cube_url, storage_options)
    if cube.sizes["time"] == 0:
        raise CubeError(f"{cube_url}: the cube has no complete SAR time slice")
    months = sorted({int(m) for m in cube.time.dt.month.values})
    have = ", ".join(sorted({str(t)[:7] for t in cube.time.values}))
    for name, wanted in (("pretrain", p.pretrain_months), ("finetune", p.finetune_months)):
        missing = [m for m in wanted if m not in months]
        if missing and len(missing) == len(wanted):
            raise InputError(
                f"--{name}-months {list(wanted)}: "
                f"the cube has no slice in those months (it has {have})"
            )
    patch = p.patch
    grid = cube.sarcube.grid
    if patch != grid.chunk:
        raise InputError(f"patch size {patch} differs from the cube's chunk {grid.chunk}")

    from contextlib import nullcontext

    from dask.diagnostics import ProgressBar

    say = print if progress else (lambda *a, **k: None)
    with ProgressBar(minimum=1.0) if progress else nullcontext():  # Dask blocks of 8 × 8 patches
        say("sample: class histograms per patch", flush=True)
        hist = patch_histograms(cube.lulc.data, patch)
        bal = balance_patches(hist, p.n_anchors, p.seed, p.exclude_full)
        say("sample: no-data per date and patch", flush=True)
        nodata = patch_nodata_counts(cube.hh_db.data, cube.lulc.data, patch) / float(patch * patch)

    rows_out = []
    kr, kc = np.nonzero(bal["kept"])
    for ti, t in enumerate(cube.time.values):
        month = pd.Timestamp(t).month
        split = (
            "pretrain"
            if month in p.pretrain_months
            else ("finetune" if month in p.finetune_months else None)
        )
        if split is None:
            continue
        ok = nodata[ti, kr, kc] <= p.max_nodata + 1e-12
        for r, c in zip(kr[ok], kc[ok], strict=True):
            rows_out.append((t, int(r), int(c), split))
    if not rows_out:
        raise InputError(
            f"{cube_url}: no valid patch: none has ≥ 1 anchor, a no-data share ≤ {p.max_nodata} "
            "and not only excluded codes"
        )
    df = pd.DataFrame(rows_out, columns=["time", "row", "col", "split"])
    ft = df["split"] == "finetune"
    df.loc[ft, "split"] = assign_blocks(
        df.loc[ft, "row"].to_numpy(), df.loc[ft, "col"].to_numpy(), p.split, p.block, p.seed
    )
    df["time"] = pd.to_datetime(df["time"])
    df["patch_id"] = [
        patch_id(t, r, c) for t, r, c in zip(df["time"], df["row"], df["col"], strict=True)
    ]
    bounds = np.array(
        [cube.sarcube.patch_bbox(r, c) for r, c in zip(df["row"], df["col"], strict=True)]
    )
    df["lon_min"], df["lat_min"], df["lon_max"], df["lat_max"] = bounds.T
    for code, colname in zip(CODES, HIST_COLUMNS, strict=True):
        df[colname] = hist[df["row"], df["col"], code].astype(np.int32)
    ti_of = {pd.Timestamp(t): i for i, t in enumerate(cube.time.values)}
    df["nodata_frac"] = [
        np.float32(nodata[ti_of[t], r, c])
        for t, r, c in zip(df["time"], df["row"], df["col"], strict=True)
    ]
    df["anchors"] = bal["anchors"][df["row"], df["col"]].astype(np.int32)
    df["shard"] = ""
    df["row"] = df["row"].astype(np.int32)
    df["col"] = df["col"].astype(np.int32)
    df = df.sort_values(["time", "row", "col"], kind="stable").reset_index(drop=True)[list(COLUMNS)]

    report = _report(df, bal, p, cube_url, hist)
    meta = {
        "cube_url": str(cube_url),
        "cube_fingerprint": cube_fingerprint(cube_attrs(root)),
        "params": _params_json(p),
        "sarcube_version": __version__,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    files: dict[str, str] = {}
    if out is not None:
        write_index(df, out, meta, storage_options)
        files = write_report(report, out, storage_options)
        files["index"] = str(out)
    return SamplingResult(df, report, files)


def _params_json(p: SamplingParams) -> dict[str, Any]:
    d = asdict(p)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def _split_counts(df: pd.DataFrame, split: str) -> np.ndarray:
    sub = df[df["split"] == split]
    counts = np.zeros(NCODES, dtype=np.int64)
    counts[1:15] = sub[list(HIST_COLUMNS)].to_numpy().sum(axis=0) if len(sub) else 0
    return counts


def _report(
    df: pd.DataFrame, bal: Mapping[str, Any], p: SamplingParams, cube_url: str, hist
) -> dict[str, Any]:
    shares = {"cube": class_shares(bal["counts"])}
    n_patches = {}
    for s in ("pretrain", *FINETUNE_SPLITS):
        shares[s] = class_shares(_split_counts(df, s))
        n_patches[s] = int((df["split"] == s).sum())
    train = _split_counts(df, "train")
    return {
        "cube_url": str(cube_url),
        "params": _params_json(p),
        "patch_grid": list(hist.shape[:2]),
        "class_names": {c: DEFAULT_TABLE.name(c) for c in CODES},
        "class_pixel_counts": {c: int(bal["counts"][c]) for c in CODES},
        "weights": {c: float(bal["weights"][c]) for c in CODES},
        "anchors_per_class": {c: int(bal["allocation"][c]) for c in CODES},
        "spatial_patches_with_anchor": int((bal["anchors"] > 0).sum()),
        "spatial_patches_only_excluded_dropped": int(
            ((bal["anchors"] > 0) & bal["only_excluded"]).sum()
        ),
        "spatial_patches_kept": int(bal["kept"].sum()),
        "patches_per_split": n_patches,
        "class_shares": shares,
        "alpha_train_9class": dict(
            zip(
                NINE_CLASS_NAMES,
                alpha_from_counts(train) if train.sum() else [None] * 9,
                strict=True,
            )
        ),
    }


def write_report(report: Mapping[str, Any], index_url: str, storage_options=None) -> dict[str, str]:
    """Sampling report next to the index: JSON, Markdown table and a bar-chart PNG."""
    from .storage import local_output

    stem = str(index_url).removesuffix(".parquet")
    files = {
        "report_json": f"{stem}_report.json",
        "report_md": f"{stem}_report.md",
        "report_png": f"{stem}_report.png",
    }
    with local_output(files["report_json"], storage_options) as local:
        local.write_text(json.dumps(report, indent=1, default=str))
    with local_output(files["report_md"], storage_options) as local:
        local.write_text(report_markdown(report))
    with local_output(files["report_png"], storage_options) as local:
        plot_shares(report, local)
    return files


def report_markdown(report: Mapping[str, Any]) -> str:
    splits = [s for s in ("cube", "pretrain", *FINETUNE_SPLITS) if s in report["class_shares"]]
    lines = [
        "# Sampling report",
        "",
        f"Cube: `{report['cube_url']}` — "
        f"patch grid {report['patch_grid'][0]} × {report['patch_grid'][1]}; "
        f"{report['params']['n_anchors']:,} anchors, seed {report['params']['seed']}.",
        "",
        f"Spatial patches with ≥ 1 anchor: {report['spatial_patches_with_anchor']}, "
        f"dropped as only {report['params']['exclude_full']}: "
        f"{report['spatial_patches_only_excluded_dropped']}, kept: "
        f"{report['spatial_patches_kept']}. Patches per split: "
        + ", ".join(f"{k} {v}" for k, v in report["patches_per_split"].items())
        + ".",
        "",
        "## Class pixel shares (%) and anchor allocation",
        "",
        "| code | class | " + " | ".join(splits) + " | weight w_k | anchors |",
        "|---:|---|" + "---:|" * len(splits) + "---:|---:|",
    ]
    for c in CODES:
        k = c if c in report["class_shares"]["cube"] else str(c)
        cells = [f"{100 * report['class_shares'][s][k]:.2f}" for s in splits]
        w = report["weights"][k]
        a = report["anchors_per_class"][k]
        lines.append(
            f"| {c} | {report['class_names'][k]} | " + " | ".join(cells) + f" | {w:.4f} | {a:,} |"
        )
    lines += [
        "",
        "## α of the train split (9 classes): α_k = (1 − f_k) / Σ(1 − f_j)",
        "",
        "| " + " | ".join(report["alpha_train_9class"]) + " |",
        "|" + "---:|" * len(report["alpha_train_9class"]),
        "| "
        + " | ".join(
            "—" if v is None else f"{v:.4f}" for v in report["alpha_train_9class"].values()
        )
        + " |",
    ]
    return "\n".join(lines) + "\n"


def plot_shares(report: Mapping[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    splits = [s for s in ("cube", "pretrain", *FINETUNE_SPLITS) if s in report["class_shares"]]
    codes = list(CODES)
    x = np.arange(len(codes))
    width = 0.8 / len(splits)
    fig, ax = plt.subplots(figsize=(12, 4.2))
    for i, s in enumerate(splits):
        shares = report["class_shares"][s]
        vals = [100 * shares.get(c, shares.get(str(c), 0.0)) for c in codes]
        ax.bar(
            x + (i - (len(splits) - 1) / 2) * width,
            vals,
            width,
            label="whole cube" if s == "cube" else s,
        )
    ax.set_xticks(x, [f"{c}\n{SHORT_NAMES[c]}" for c in codes], fontsize=8)
    ax.set_ylabel("share of labelled pixels [%]")
    ax.set_yscale("log")
    ax.set_title("Class shares before (whole cube) and after category-aware sampling")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90, format="png")
    plt.close(fig)
