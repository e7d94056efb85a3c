"""Streaming training batches from sarcube's WebDataset shards (docs/design.md).

``ShardStream(manifest_url, split, batch_size=..., rank=..., world_size=..., num_workers=...)``
(or ``ShardStream.from_config(manifest_url, split, cfg.data, ...)``) reads the shards a
``manifest.json`` lists for one split, through WebDataset's tar iterators and, for object
stores, an fsspec-backed ``gopen`` handler with retries (``register_fsspec_opener``). It yields
batch dicts::

    image   (B, 1, P, P) float32   z-scored dB: (x - mean) / std, no-data filled with the mean (0)
    weight  (B, 1, P, P) float32   sar_intensity_weight of the augmented dB (or of ``image`` when
                                   weight_domain="normalized"), no-data pixels as filled
                                   (computed by ``intensity_weight``: the same formula, equal
                                   within float32 rounding, ~3× faster on CPU)
    valid   (B, 1, P, P) bool      finite SAR pixel (False: no data in the shard, filled above)
    label   (B, P, P)    int64     task "lulc": 9-class ids (nine_class_lut), "water": 0/1;
                                   255 = ignore (JAXA code 0 or no SAR data); absent for "pretrain"
    key     list[str]              patch ids (the samples' ``__key__``)

With ``prepare="device"`` (what training uses) the loader processes stop after decoding and
augmenting and ship a compact batch, a third of the bytes::

    sar     (B, 1, P, P) float16   augmented dB, NaN = no data
    label   (B, P, P)    uint8     task classes (before the no-data → 255 step)
    key     list[str]

and ``ShardStream.finish(batch, device)`` makes the batch above on the device (the training
engine calls it; on a GPU the weight map then costs the loaders nothing). Both paths run the
same ``finish`` code, so their batches are identical on CPU.

The submodules:

- ``stream``: ``ShardStream`` (construction, the per-worker sample streams, batches, evaluation).
- ``plan``: the epoch plan (shard order, rank / worker shares, quotas, steps per epoch, resume
  start steps, the shuffle buffer): pure functions.
- ``reading``: one shard's raw samples, verified, and the skip budgets for failures.
- ``verify``: the hashing reader and the comparison with the manifest entry.
- ``opener``: the retrying fsspec reader registered as WebDataset's ``gopen`` handler.
- ``decode``: npy decoding, augmentation, the intensity weight and the batch ``finish``.
- ``loaders``: the ``torch.utils.data.DataLoader`` wrappers of an epoch and of evaluation.
- ``counters``: the loader counters (``ShardStream.io_counters``) and their merging.
- ``errors``: ``DataError`` and its subclasses; which storage errors are transient.
"""

from __future__ import annotations

from .decode import apply_augmentation, augmentation, intensity_weight, npy_load_fast
from .errors import (
    DataError,
    SampleError,
    ShardIntegrityError,
    ShardReadError,
    TransientReadError,
    is_transient,
)
from .loaders import EpochLoader
from .opener import MIB, RetryingReader, gopen_fsspec, register_fsspec_opener
from .stream import PREPARE, TASKS, ShardStream
from .verify import VerifyingReader, shard_mismatch

__all__ = [
    "MIB",
    "PREPARE",
    "TASKS",
    "DataError",
    "EpochLoader",
    "RetryingReader",
    "SampleError",
    "ShardIntegrityError",
    "ShardReadError",
    "ShardStream",
    "TransientReadError",
    "VerifyingReader",
    "apply_augmentation",
    "augmentation",
    "gopen_fsspec",
    "intensity_weight",
    "is_transient",
    "npy_load_fast",
    "register_fsspec_opener",
    "shard_mismatch",
]
