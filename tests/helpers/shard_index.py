"""A patch index built by hand from a cube, for the shard tests that must not depend on the
sampling module (``sarcube.sampling``).

Every patch with some valid SAR is in it; October/November patches go to ``pretrain``, September
patches to train/val/test by their 2 × 2-patch block (the small cube is 4 × 4 patches).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from sarcube.cube import cube_attrs, open_cube, open_group
from sarcube.index import CODES, COLUMNS, HIST_COLUMNS, cube_fingerprint, patch_id

# September patches: split by 2 × 2-patch blocks (the cube is 4 × 4 patches)
FINETUNE_RULE = {(0, 0): "train", (0, 1): "val", (1, 0): "test", (1, 1): "train"}


def build_index(cube_url: str) -> tuple[pd.DataFrame, dict]:
    """Every patch with some valid SAR, its histogram and no-data share, split by month/position.

    Args:
        cube_url: the cube to index (256-pixel patches).

    Returns:
        ``(index rows in sarcube.index.COLUMNS order, index metadata)``, ready for
        :func:`sarcube.index.write_index`.
    """
    cube = open_cube(cube_url)
    grid = cube.sarcube.grid
    nr, nc = cube.sarcube.patch_shape
    hh, lulc = cube.hh_db.values, cube.lulc.values
    rows = []
    for ti, t in enumerate(pd.DatetimeIndex(cube.time.values)):
        for r in range(nr):
            for c in range(nc):
                sar = hh[ti, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                lab = lulc[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
                nodata = float((np.isnan(sar) | (lab == 0)).mean())
                if np.isnan(sar).all():
                    continue
                w, s, e, n = grid.window_bounds(r * 256, (r + 1) * 256, c * 256, (c + 1) * 256)
                counts = np.bincount(lab.ravel(), minlength=256)
                rows.append(
                    {
                        "patch_id": patch_id(t, r, c),
                        "time": t,
                        "row": np.int32(r),
                        "col": np.int32(c),
                        "lon_min": w,
                        "lat_min": s,
                        "lon_max": e,
                        "lat_max": n,
                        "split": "pretrain"
                        if t.month in (10, 11)
                        else FINETUNE_RULE[(min(r // 2, 1), min(c // 2, 1))],
                        **{
                            h: np.int32(counts[code])
                            for h, code in zip(HIST_COLUMNS, CODES, strict=True)
                        },
                        "nodata_frac": np.float32(nodata),
                        "anchors": np.int32(1),
                        "shard": "",
                    }
                )
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    meta = {
        "cube_url": cube_url,
        "cube_fingerprint": cube_fingerprint(cube_attrs(open_group(cube_url))),
        "seed": 0,
        "params": {"rule": "test: all patches"},
    }
    return df, meta
