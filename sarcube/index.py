"""The patch index: one Parquet table per sampling run, the contract between ``sample``,
``shards`` and the analysts who want to see exactly what the model saw.

One row per (date, patch):

| column | type | meaning |
|---|---|---|
| ``patch_id`` | str | ``{YYYYMMDD}-r{row:04d}-c{col:04d}``; the WebDataset ``__key__`` |
| ``time`` | datetime64[ns] | acquisition date of the cube slice |
| ``row``, ``col`` | int32 | patch-grid position: cube pixels [row·256, (row+1)·256) × [col·256, …) |
| ``lon_min``, ``lat_min``, ``lon_max``, ``lat_max`` | float64 | patch bounds, degrees (EPSG:4326) |
| ``split`` | str | ``pretrain``, ``train``, ``val`` or ``test`` |
| ``hist_01`` … ``hist_14`` | int32 | pixel count of each JAXA code in the patch |
| ``nodata_frac`` | float32 | share of pixels with no SAR value or no label (code 0) |
| ``anchors`` | int32 | sampling anchors that fell in the patch |
| ``shard`` | str | shard file name it went into (empty until ``sarcube shards``) |
| ``geometry`` | WKB | the patch footprint (a polygon of the bounds), EPSG:4326 |

The file is **GeoParquet** (1.0, written by geopandas): geopandas, QGIS and DuckDB open it as a
layer of patch footprints with their CRS. The table's Parquet metadata (key ``sarcube``) holds the
cube URL and fingerprint, the sampling parameters and seed, so that shards are never cut from
another cube by mistake.
"""  # noqa: E501 (markdown table row cannot be wrapped)

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import pandas as pd

from .errors import InputError
from .storage import url_to_fs

CODES = tuple(range(1, 15))
HIST_COLUMNS = tuple(f"hist_{c:02d}" for c in CODES)
SPLITS = ("pretrain", "train", "val", "test")
FINETUNE_SPLITS = ("train", "val", "test")
COLUMNS = (
    "patch_id",
    "time",
    "row",
    "col",
    "lon_min",
    "lat_min",
    "lon_max",
    "lat_max",
    "split",
    *HIST_COLUMNS,
    "nodata_frac",
    "anchors",
    "shard",
)
META_KEY = b"sarcube"


def patch_id(date: Any, row: int, col: int) -> str:
    return f"{pd.Timestamp(date):%Y%m%d}-r{row:04d}-c{col:04d}"


def parse_patch_id(pid: str) -> tuple[pd.Timestamp, int, int]:
    try:
        d, r, c = pid.split("-")
        return pd.Timestamp(d), int(r[1:]), int(c[1:])
    except (ValueError, IndexError):
        raise InputError(f"patch id {pid!r}: expected YYYYMMDD-rRRRR-cCCCC") from None


def cube_fingerprint(root_attrs: Mapping[str, Any]) -> str:
    """A short hash of a cube's grid, labels and slice inputs: changes when its content does."""
    payload = {
        "grid": root_attrs.get("grid"),
        "labels": (root_attrs.get("labels") or {}).get("tiles"),
        "slices": {
            k: v.get("inputs")
            for k, v in sorted((root_attrs.get("slices") or {}).items())
            if v.get("status") == "complete"
        },
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def write_index(
    df: pd.DataFrame,
    url: str,
    meta: Mapping[str, Any],
    storage_options: Mapping[str, Any] | None = None,
) -> None:
    """Write the index with its metadata (atomically for local paths)."""
    import pyarrow.parquet as pq

    from .storage import local_output

    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"index is missing columns {missing}")
    import geopandas as gpd
    import shapely

    rows = df[list(COLUMNS)].reset_index(drop=True)
    footprints = shapely.box(rows.lon_min, rows.lat_min, rows.lon_max, rows.lat_max)
    gdf = gpd.GeoDataFrame(rows, geometry=footprints, crs="EPSG:4326")
    with local_output(url, storage_options) as local:
        # geopandas writes the GeoParquet "geo" metadata; ours is added to the same schema (a
        # second write of a small file: geopandas has no public way to pass schema metadata)
        gdf.to_parquet(local, index=False, compression="zstd", schema_version="1.0.0")
        table = pq.read_table(local)
        table = table.replace_schema_metadata(
            {**(table.schema.metadata or {}), META_KEY: json.dumps(meta).encode()}
        )
        pq.write_table(table, local, compression="zstd")


def read_index(
    url: str, storage_options: Mapping[str, Any] | None = None
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """(table, metadata) of a patch index; clear errors for a missing or foreign file."""
    import pyarrow.parquet as pq

    fs, path = url_to_fs(url, storage_options)
    if not fs.exists(path):
        raise InputError(f"{url}: patch index not found")
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
    except Exception as e:
        raise InputError(f"{url}: not a readable Parquet patch index ({e})") from None
    meta_raw = (table.schema.metadata or {}).get(META_KEY)
    if meta_raw is None:
        raise InputError(
            f"{url}: a Parquet file without sarcube metadata (not made by `sarcube sample`)"
        )
    df = table.drop_columns([c for c in ("geometry",) if c in table.column_names]).to_pandas()
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{url}: patch index lacks columns {missing}")
    return df, json.loads(meta_raw)
