"""The shard plan: which patches of the index go into which shard, decided before any is written.

Shard layout (per split, named ``{split}-{n:06d}.tar``):

- the split's patches are sorted by id, then permuted by a generator seeded with
  ``(seed, split number)`` and cut into consecutive runs of near-equal length, so every shard
  holds patches from all over the area and all dates of the split (no shard is one small area);
- number of shards = ``min(max(ceil(bytes / shard_size), min_shards_per_split), samples)``,
  with ``bytes`` the exact tar size of the split (headers and padding included). Choose
  ``min_shards_per_split`` ≥ 4 × ranks × loader workers of the largest launch intended, so that
  every loader worker of every rank gets several shards (the default 8 suits 1 rank × 2 workers).

A re-run plans the same shards, so it can keep those already written (``sarcube.shards.task``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ..index import FINETUNE_SPLITS, HIST_COLUMNS, SPLITS
from .layout import MIB, members_of, npy_bytes, sample_json, shard_name, tar_member_bytes


@dataclass(frozen=True)
class SampleSpec:
    """One planned sample: where its patch is in the cube and its expected content."""

    key: str
    t_index: int  # raw index on the cube's time axis (the slice registry's time_index)
    row: int
    col: int
    hist: tuple[int, ...]  # the index's counts of codes 1..14
    json: bytes


@dataclass
class ShardPlan:
    """One planned shard: its split, file name and samples in their order in the tar."""

    split: str
    name: str
    samples: list[SampleSpec] = field(default_factory=list)

    @property
    def with_lulc(self) -> bool:
        return self.split in FINETUNE_SPLITS

    def member_names(self) -> list[str]:
        return [f"{s.key}.{ext}" for s in self.samples for ext in members_of(self.split)]


def shard_count(total_bytes: int, n_samples: int, shard_size_mb: float, min_shards: int) -> int:
    """max(ceil(bytes / shard size), min_shards), capped at the number of samples (≥ 1)."""
    n = max(math.ceil(total_bytes / (shard_size_mb * MIB)), int(min_shards))
    return max(1, min(n, n_samples))


def _sample_specs(
    df: pd.DataFrame, t_index: Mapping[str, int], fingerprint: str, split: str
) -> list[SampleSpec]:
    """The samples of ``split``, sorted by patch id."""
    rows = df[df["split"] == split].sort_values("patch_id", kind="stable")
    specs = []
    for r in rows.to_dict("records"):
        date = pd.Timestamp(r["time"]).strftime("%Y-%m-%d")
        specs.append(
            SampleSpec(
                key=r["patch_id"],
                t_index=int(t_index[date]),
                row=int(r["row"]),
                col=int(r["col"]),
                hist=tuple(int(r[h]) for h in HIST_COLUMNS),
                json=sample_json(r, split, fingerprint),
            )
        )
    return specs


def plan_shards(
    df: pd.DataFrame,
    t_index: Mapping[str, int],
    fingerprint: str,
    splits: Sequence[str],
    shard_size_mb: float,
    min_shards_per_split: int,
    seed: int,
    patch: int = 256,
) -> dict[str, list[ShardPlan]]:
    """Deterministic assignment of the index rows to shards, per split (see the module doc).

    Args:
        df: the patch index.
        t_index: date (YYYY-MM-DD) -> raw index on the cube's time axis.
        fingerprint: the cube's fingerprint, written into every sample's JSON.
        splits: the splits to plan.
        shard_size_mb / min_shards_per_split: the shard count rule's parameters.
        seed: seeds the permutation of each split's patches.
        patch: patch side in cells.
    Returns split -> its shards, in shard-number order.
    """
    sar_size = len(npy_bytes(np.zeros((patch, patch), np.float16)))
    lulc_size = len(npy_bytes(np.zeros((patch, patch), np.uint8)))
    out: dict[str, list[ShardPlan]] = {}
    for split in splits:
        specs = _sample_specs(df, t_index, fingerprint, split)
        per_sample = tar_member_bytes(sar_size) + (
            tar_member_bytes(lulc_size) if split in FINETUNE_SPLITS else 0
        )
        total = sum(per_sample + tar_member_bytes(len(s.json)) for s in specs)
        n = shard_count(total, len(specs), shard_size_mb, min_shards_per_split)
        rng = np.random.default_rng([int(seed), SPLITS.index(split)])
        order = rng.permutation(len(specs))
        out[split] = [
            ShardPlan(split, shard_name(split, k), [specs[i] for i in part])
            for k, part in enumerate(np.array_split(order, n))
        ]
    return out


def spot_checks(plan: ShardPlan, n: int = 2) -> list[int]:
    """Indices of the ``n`` samples of a kept shard compared with a fresh cut from the cube:
    drawn from a generator seeded with the shard's name (the same on every run)."""
    k = len(plan.samples)
    if k <= n:
        return list(range(k))
    rng = np.random.default_rng(list(hashlib.sha256(plan.name.encode()).digest()[:8]))
    return sorted(int(i) for i in rng.choice(k, size=n, replace=False))
