"""The bytes of a shard: file names, sample members and their deterministic encoding.

A sample (``__key__`` = patch id ``YYYYMMDD-rRRRR-cCCCC``)::

    {key}.json       id, time, row, col, bounds (W, S, E, N), crs "EPSG:4326", split,
                     class_histogram {"1": n, ..., "14": n}, nodata_frac, anchors, cube_fingerprint
    {key}.lulc.npy   uint8 (256, 256) JAXA codes, fine-tuning splits (train/val/test) only
    {key}.sar.npy    float16 (256, 256) HH dB (NaN = no data), ``np.load(..., allow_pickle=False)``

Shards are named ``{split}-{n:06d}.tar``. The same schema is in every manifest
(``sample_schema``, :data:`SAMPLE_SCHEMA`), for readers without sarcube.

**No channel axis** in ``sar.npy``: the shards hold one polarisation (HH), and ``(H, W)`` is what
``np.load`` and GDAL-style tools give for one band. Adding the axis would change the bytes (and
sha256) of every shard set already written for a purely cosmetic gain; sarcube's loader adds it
(``ShardStream`` batches are ``(B, 1, H, W)``), and a webdataset or TorchGeo user writes
``sar[None]``.

Determinism: the same cube content, index and seed give byte-identical shards, wherever the cube
and the shards live. Members are written in a fixed order within a sample (``json``,
``lulc.npy``, ``sar.npy``: sorted by extension, as WebDataset writes them), in the USTAR format
(no PAX headers) with mtime 0, uid/gid 0, empty uname/gname and mode 0644; npy payloads are
``np.save(..., allow_pickle=False)`` of C-ordered little-endian arrays; the JSON has sorted keys and
no whitespace. The standard ``tarfile`` module is used rather than ``webdataset.TarWriter``: that
writer stamps ``time.time()`` as mtime unless told otherwise, writes uname/gname "bigdata" and
mode 0444, and its default npy encoder saves with pickling allowed; the bytes are also needed in
memory anyway for the sha256 and the single atomic write.
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from ..errors import SarcubeError
from ..index import CODES, FINETUNE_SPLITS, HIST_COLUMNS

FORMAT = "sarcube-shards/1"
# What a sample holds, for the manifest's readers (the module docstring says the same in prose).
SAMPLE_SCHEMA: dict[str, Any] = {
    "__key__": "patch id YYYYMMDD-rRRRR-cCCCC (date of the cube slice, patch-grid row and col)",
    "sar.npy": {
        "dtype": "float16",
        "shape": ["H", "W"],
        "units": "dB (HH backscatter, sigma0 or gamma0 as in the cube)",
        "nodata": "NaN",
        "channel_axis": None,
    },
    "lulc.npy": {
        "dtype": "uint8",
        "shape": ["H", "W"],
        "values": "JAXA HR-LULC codes 1-14, 0 = no data",
        "splits": list(FINETUNE_SPLITS),
    },
    "json": {
        "keys": [
            "anchors",
            "bounds",
            "class_histogram",
            "col",
            "crs",
            "cube_fingerprint",
            "id",
            "nodata_frac",
            "row",
            "split",
            "time",
        ],
        "bounds": "W, S, E, N in degrees (EPSG:4326)",
    },
    "encoding": "USTAR tar; npy written with allow_pickle=False; JSON with sorted keys",
}

MANIFEST = "manifest.json"
PREVIOUS_MANIFEST = ".sarcube-previous-manifest.json"  # the last one, while a re-run writes
INDEX_COPY = "index.parquet"
CRS = "EPSG:4326"
MIB = 2**20
SHARD_RE = re.compile(r"^(?P<split>[a-z]+)-(?P<n>\d{6})\.tar$")
PARTIAL_RE = re.compile(r"^\.(?P<split>[a-z]+)-\d{6}\.tar\..+\.partial$")  # a killed local write
TAR_BLOCK = 512


class ShardError(SarcubeError):
    """Shards could not be written or read (foreign index, unwritable destination, bad shard)."""


def shard_name(split: str, n: int) -> str:
    """The file name of shard number ``n`` of ``split``."""
    return f"{split}-{n:06d}.tar"


def members_of(split: str) -> tuple[str, ...]:
    """Member extensions of a sample of ``split``, in their order in the tar."""
    return ("json", "lulc.npy", "sar.npy") if split in FINETUNE_SPLITS else ("json", "sar.npy")


def npy_bytes(arr: np.ndarray) -> bytes:
    """The ``.npy`` payload of ``arr`` (C order, no pickling)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def npy_load(data: bytes) -> np.ndarray:
    """The array of a ``.npy`` payload (pickled objects refused)."""
    return np.load(io.BytesIO(data), allow_pickle=False)


def tarinfo(name: str, size: int) -> tarfile.TarInfo:
    """The header of a member: regular file, mtime 0, root-owned, no names, mode 0644."""
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mtime = 0
    ti.mode = 0o644
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    ti.type = tarfile.REGTYPE
    return ti


def tar_member_bytes(size: int) -> int:
    """Bytes a member of ``size`` payload bytes takes in a tar (header and padding)."""
    return TAR_BLOCK + -(-size // TAR_BLOCK) * TAR_BLOCK


def sample_json(row: Mapping[str, Any], split: str, fingerprint: str) -> bytes:
    """The JSON member of one sample (deterministic bytes)."""
    meta = {
        "id": row["patch_id"],
        "time": pd.Timestamp(row["time"]).strftime("%Y-%m-%d"),
        "row": int(row["row"]),
        "col": int(row["col"]),
        "bounds": [
            float(row["lon_min"]),
            float(row["lat_min"]),
            float(row["lon_max"]),
            float(row["lat_max"]),
        ],
        "crs": CRS,
        "split": split,
        "class_histogram": {str(c): int(row[h]) for c, h in zip(CODES, HIST_COLUMNS, strict=True)},
        "nodata_frac": float(row["nodata_frac"]),
        "anchors": int(row["anchors"]),
        "cube_fingerprint": fingerprint,
    }
    return json.dumps(meta, sort_keys=True, separators=(",", ":")).encode()


def read_bytes(fs, path: str) -> bytes | None:
    """The content of the file at ``path``; None when there is no such file."""
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None
