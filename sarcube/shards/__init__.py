"""``sarcube shards``: the patch index -> WebDataset tar shards + ``manifest.json``
(docs/design.md).

One Dask task per shard writes it whole, so a shard either exists complete or not at all, and
the manifest, written last, is the commit point: readers trust only the shards it lists. A re-run
plans the same shards, keeps those that check out and rewrites the rest.

The modules, in the order a run uses them:

- ``layout``: file names, sample members and their deterministic bytes; ``ShardError``;
- ``inputs``: loading the index and checking it against the cube;
- ``plan``: which patches go into which shard (the shard count rule), spot checks;
- ``destination``: the destination's state (writable, manifest removed while a run writes, the
  previous manifest's hashes kept, stale files removed, the manifest committed);
- ``task``: the per-shard Dask task that writes or keeps one shard;
- ``manifest``: building and reading ``manifest.json``, resolving its shard names;
- ``driver``: ``write_shards``, the run;
- ``readers``: ``iter_samples`` and ``recut_patch``.

Every public name is importable from ``sarcube.shards``.
"""

from __future__ import annotations

from .driver import write_shards
from .layout import (
    CRS,
    FORMAT,
    INDEX_COPY,
    MANIFEST,
    MIB,
    PARTIAL_RE,
    PREVIOUS_MANIFEST,
    SHARD_RE,
    TAR_BLOCK,
    ShardError,
    members_of,
    npy_bytes,
    npy_load,
    sample_json,
    shard_name,
)
from .manifest import read_manifest, shard_urls
from .plan import SampleSpec, ShardPlan, plan_shards, shard_count, spot_checks
from .readers import iter_samples, recut_patch
from .task import write_shard

__all__ = [
    "CRS",
    "FORMAT",
    "INDEX_COPY",
    "MANIFEST",
    "MIB",
    "PARTIAL_RE",
    "PREVIOUS_MANIFEST",
    "SHARD_RE",
    "TAR_BLOCK",
    "SampleSpec",
    "ShardError",
    "ShardPlan",
    "iter_samples",
    "members_of",
    "npy_bytes",
    "npy_load",
    "plan_shards",
    "read_manifest",
    "recut_patch",
    "sample_json",
    "shard_count",
    "shard_name",
    "shard_urls",
    "spot_checks",
    "write_shard",
    "write_shards",
]
