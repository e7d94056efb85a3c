"""The epoch plan: which shards, in which order, and how many batches each loader worker makes.

Everything here is a pure function of the manifest, ``seed``, ``epoch``, ``world_size`` and
``num_workers`` (``ShardStream`` wraps these functions in methods of the same names):

1. The split's shards are permuted by a generator seeded with ``(seed, epoch)`` — the same on
   every rank (``shard_order``).
2. Rank ``r`` takes ``perm[r::world_size]``; within the rank, logical loader worker ``w`` takes
   ``rank_shards[w::W]`` (``W = max(num_workers, 1)``). With fewer shards than slots (avoid it:
   write ≥ 4 × ranks × workers shards; a warning is logged) a rank left empty takes
   ``perm[r mod N]`` and a worker left empty ``rank_shards[w mod n]``: shared shards
   (``rank_shards``, ``worker_shards``).
3. ``steps_per_epoch = floor(split samples / (world_size × batch_size))``, identical on every rank
   (≥ 1, else ``ValueError``). Global step ``i`` of a rank comes from logical worker ``i mod W``,
   which is exactly how ``torch.utils.data.DataLoader`` interleaves the batches of its worker
   processes (round-robin, in order); worker ``w``'s quota is the number of such steps,
   ``ceil((steps - w) / W)`` (``worker_quota``). ``batches()`` runs the W logical workers
   in-process in the same interleaving, so it yields the same sequence as ``loader()``; the
   sequence depends on ``(seed, epoch, num_workers)``, not on timing.
4. A worker streams its shard list in order, one *pass* at a time, each pass through a shuffle
   buffer of ``shuffle_buffer`` raw (undecoded) samples whose generator is seeded with
   ``(seed, epoch, rank, worker)`` (``shuffle_rng``, ``shuffled``); the buffer is drained at the
   end of a pass, so a pass emits every sample of the worker's shards exactly once before
   anything repeats.
   **Remainder policy:** a worker whose pass runs short of its quota *wraps around* to the start
   of its own shard list (pass 2, 3, …: same shards, same order, the shuffle generator continuing),
   and it stops exactly at its quota. Samples beyond the quota are left out of this epoch; the
   next epoch's permutation leaves out others. So every rank runs exactly ``steps_per_epoch``
   steps (no DDP hang), and when every worker's quota covers its shards, the union over ranks is
   the whole split (some samples then appear twice in the epoch).
5. Augmentation is drawn per sample key, independent of this plan (``training.data.decode``).

Mid-epoch resume: a checkpoint needs only ``(epoch, next step)`` (and the constructor arguments);
``batches(epoch, start_step=k)`` (or ``loader(epoch, k)``) yields exactly the batches
``k, k+1, …`` of the uninterrupted sequence. Each logical worker ``w`` starts at its local
step ``ceil((k - w) / W)`` (``worker_quota(k, w, W)``); it re-reads its shard stream from the
start of the epoch and passes the first ``local_step × batch_size`` samples through the shuffle
buffer *undecoded* (no npy decode, augmentation or weight), then decodes from there. Cost: the
I/O of the skipped part of the epoch (up to one epoch of the rank's shards) plus tar parsing; no
GPU time is lost. With ``num_workers > 0`` the DataLoader worker process ``d`` plays logical
worker ``(d + k) mod W`` (``loader_worker``) so that the first batch (step ``k``) comes from the
right one.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import TypeVar

import numpy as np

from ..reproducibility import TAG_SHARD_ORDER, TAG_SHUFFLE_BUFFER

__all__ = [
    "loader_worker",
    "rank_shards",
    "shard_order",
    "shuffle_rng",
    "shuffled",
    "steps_per_epoch",
    "worker_quota",
    "worker_shards",
]

T = TypeVar("T")


def steps_per_epoch(total_samples: int, world_size: int, batch_size: int) -> int:
    """Steps every rank runs per epoch: ``floor(total_samples / (world_size × batch_size))``
    (may be 0; the stream refuses that for training)."""
    return total_samples // (world_size * batch_size)


def shard_order(seed: int, epoch: int, n_shards: int) -> list[int]:
    """Shard indices ``0 … n_shards - 1`` in ``epoch``'s order (the same on every rank)."""
    rng = np.random.default_rng([seed, int(epoch), TAG_SHARD_ORDER])
    return [int(i) for i in rng.permutation(n_shards)]


def rank_shards(order: Sequence[int], rank: int, world_size: int) -> list[int]:
    """Rank ``rank``'s share of the epoch's shard ``order``: every ``world_size``-th one from
    ``rank`` on, or the single shard ``order[rank mod N]`` when that share is empty."""
    return list(order[rank::world_size]) or [order[rank % len(order)]]


def worker_shards(mine: Sequence[int], worker: int, n_workers: int) -> list[int]:
    """Logical worker ``worker``'s share of its rank's shards ``mine`` (as ``rank_shards`` deals
    shards to ranks: every ``n_workers``-th one, or ``mine[worker mod n]`` when empty)."""
    return list(mine[worker::n_workers]) or [mine[worker % len(mine)]]


def worker_quota(steps: int, worker: int, n_workers: int) -> int:
    """Batches logical worker ``worker`` yields among a rank's first ``steps`` steps (step ``i``
    comes from worker ``i mod n_workers``): its whole quota for ``steps = steps_per_epoch``, its
    first local step for a resume at global step ``steps``."""
    return max(0, (steps - worker + n_workers - 1) // n_workers)


def loader_worker(process: int, start_step: int, n_workers: int) -> int:
    """The logical worker DataLoader worker process ``process`` plays in an epoch resumed at
    ``start_step``: the DataLoader's first batch comes from process 0 and must be step
    ``start_step``'s."""
    return (process + start_step) % n_workers


def shuffle_rng(seed: int, epoch: int, rank: int, worker: int) -> np.random.Generator:
    """The shuffle-buffer generator of one logical worker in one epoch."""
    return np.random.default_rng([seed, int(epoch), rank, worker, TAG_SHUFFLE_BUFFER])


def shuffled(samples: Iterator[T], size: int, rng: np.random.Generator) -> Iterator[T]:
    """``samples`` through a shuffle buffer of ``size`` items (``size ≤ 1``: unchanged order).

    Each new item, once the buffer is full, takes the place of a random one, which is emitted;
    at the end the buffer is drained in random order, so every item comes out exactly once.
    """
    if size <= 1:
        yield from samples
        return
    buf: list[T] = []
    for s in samples:
        if len(buf) < size:
            buf.append(s)
            continue
        i = int(rng.integers(size))
        out, buf[i] = buf[i], s
        yield out
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()
