"""``ShardStream``: deterministic, rank- and worker-split batches from one split's shards.

The stream reads the shards a ``manifest.json`` lists for one split (nothing else: the manifest
is the commit point) through WebDataset's tar iterators and the opener of
``training.data.opener``, each shard verified against its manifest entry while it streams
(``training.data.verify``). Which shards each rank and loader worker reads, in which order and
for how many batches is the epoch plan (``training.data.plan``); decoding, augmentation and the
batch ``finish`` are ``training.data.decode``; the DataLoader wrappers ``training.data.loaders``.

Statistics: ``task="pretrain"`` z-scores with the manifest's ``pretrain`` split ``db_stats``;
the fine-tuning tasks use the ``train`` split's statistics for train, val and test alike
(``stats_split`` overrides).

Failures while streaming (transient errors within ``skip_errors``, bad shards within
``max_bad_shards``) are handled shard by shard in ``training.data.reading``; evaluation
(``eval_batches``) never skips.
"""

from __future__ import annotations

import logging
from collections.abc import Generator, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from sarcube.classes import nine_class_lut, water_lut
from sarcube.shards import read_manifest, shard_urls

from ..sar_weight import WEIGHT_DOMAINS
from . import plan as epoch_plan
from .counters import WorkerState, empty_counters, merge_counters
from .decode import decode_batch, finish_batch
from .errors import ShardReadError
from .loaders import EpochLoader, eval_in_workers
from .opener import MIB, ensure_fsspec_opener, register_fsspec_opener
from .reading import ReadPolicy, read_shard

if TYPE_CHECKING:
    from ..config import DataConfig

__all__ = ["PREPARE", "TASKS", "ShardStream"]

log = logging.getLogger("training.data")

TASKS = ("pretrain", "lulc", "water")
PREPARE = ("worker", "device")  # where the z-score, weight map and int64 labels are made


def _check_arguments(
    *,
    prepare: str,
    task: str,
    weight_domain: str,
    batch_size: int,
    rank: int,
    world_size: int,
    counts: Sequence[int],
) -> None:
    """Raise ``ValueError`` for constructor arguments out of range (``counts``: num_workers,
    skip_errors, max_bad_shards and seed, each ≥ 0)."""
    if prepare not in PREPARE:
        raise ValueError(f"prepare must be one of {PREPARE}, got {prepare!r}")
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if weight_domain not in WEIGHT_DOMAINS:
        raise ValueError(f"weight_domain must be one of {WEIGHT_DOMAINS}, got {weight_domain!r}")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be ≥ 1, got {batch_size}")
    if int(world_size) < 1 or not 0 <= int(rank) < int(world_size):
        raise ValueError(f"need 0 ≤ rank < world_size, got rank {rank}, world_size {world_size}")
    if min(int(c) for c in counts) < 0:
        raise ValueError("num_workers, skip_errors, max_bad_shards and seed must be ≥ 0")


class ShardStream:
    """Deterministic, rank- and worker-split batches from a split's shards (see the module doc).

    Args:
        manifest_url: ``manifest.json`` (or its directory), local or any fsspec URL.
        split: ``pretrain``, ``train``, ``val`` or ``test``.
        batch_size: samples per batch per rank.
        rank, world_size: this process's place in the data-parallel group.
        num_workers: DataLoader worker processes of ``loader()`` (0: in the calling process);
            ``batches()`` reproduces the same sequence in-process.
        seed: seeds shard order, shuffle buffers and augmentation (with the epoch).
        task: ``pretrain`` (no labels), ``lulc`` (9 classes) or ``water`` (0/1).
        augment: random rot90 / flips (training); off for evaluation.
        weight_domain, weight_k: the weight's input (``db`` or ``normalized``) and contrast ``k``
            (see ``training.sar_weight``).
        shuffle_buffer: raw samples held by each worker's shuffle buffer (≤ 1: no shuffle).
        storage_options: fsspec options for the manifest and the shards.
        skip_errors: transient shard failures each worker may skip per epoch (0: raise).
        max_bad_shards: bad shards (missing, not a readable tar, or bytes / sha256 / sample
            count differing from the manifest) each worker may skip per epoch, each one logged
            and counted in ``io_counters`` (0: raise ``ShardReadError``; see
            ``training.data.reading``).
            Evaluation (``eval_batches``) never skips.
        verify: check each shard's sha256 while streaming it (byte size and sample count are
            always checked).
        stats_split: split whose ``db_stats`` z-score the input (default per task, see above).
        retries, timeout, backoff, block_size: the opener's settings (``register_fsspec_opener``).
        pin_memory, prefetch_factor, multiprocessing_context: passed to the DataLoader.
        evaluation: a stream for ``eval_batches()`` only (no training epoch): a split smaller
            than one global batch is fine.
        prepare: ``worker`` (batches are complete) or ``device`` (compact batches: ``sar``
            float16 dB + uint8 ``label``; the consumer calls ``finish(batch, device)``, as the
            training engine does, so that the z-score and weight map run on the GPU).
    """

    def __init__(
        self,
        manifest_url: str,
        split: str,
        *,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        seed: int = 0,
        task: str = "pretrain",
        augment: bool = True,
        weight_domain: str = "db",
        weight_k: float = 1.0,
        shuffle_buffer: int = 256,
        storage_options: Mapping[str, Any] | None = None,
        skip_errors: int = 0,
        max_bad_shards: int = 0,
        verify: bool = True,
        stats_split: str | None = None,
        retries: int = 3,
        timeout: float = 60.0,
        backoff: float = 0.5,
        block_size: int = 8 * MIB,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        multiprocessing_context: Any = None,
        prepare: str = "worker",
        evaluation: bool = False,
    ) -> None:
        _check_arguments(
            prepare=prepare,
            task=task,
            weight_domain=weight_domain,
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            counts=(num_workers, skip_errors, max_bad_shards, seed),
        )
        self.manifest_url = str(manifest_url)
        self.split = split
        self.batch_size = int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.task = task
        self.augment = bool(augment)
        self.weight_domain, self.weight_k = weight_domain, float(weight_k)
        self.shuffle_buffer = int(shuffle_buffer)
        self.storage_options = dict(storage_options or {})
        self.skip_errors = int(skip_errors)
        self.max_bad_shards = int(max_bad_shards)
        self.verify = bool(verify)
        self.pin_memory, self.prefetch_factor = bool(pin_memory), prefetch_factor
        self.multiprocessing_context = multiprocessing_context
        self.prepare = prepare
        self.io_counters: dict[str, Any] = empty_counters()

        manifest = read_manifest(self.manifest_url, self.storage_options)
        self._load_split(manifest, split, task)
        self._load_db_stats(manifest["splits"], stats_split, task)
        self.lut = {"lulc": nine_class_lut(), "water": water_lut()}.get(task)
        self._plan_steps(evaluation)
        base = self.shards[0].rsplit("/", 1)[0] + "/"
        self._opener: dict[str, Any] = {
            "storage_options": self.storage_options,
            "retries": int(retries),
            "timeout": float(timeout),
            "backoff": float(backoff),
            "block_size": int(block_size),
            "prefix": base,
        }
        register_fsspec_opener(**self._opener)

    @classmethod
    def from_config(
        cls,
        manifest_url: str,
        split: str,
        cfg_data: DataConfig,
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        task: str = "pretrain",
        storage_options: Mapping[str, Any] | None = None,
        pin_memory: bool = False,
        **overrides: Any,
    ) -> ShardStream:
        """The stream of ``split`` with the loader settings of the training config's ``data``
        section (``training.config.DataConfig``: batch_size, num_workers, augment,
        shuffle_buffer, skip_errors, max_bad_shards, retries, timeout, prepare).

        Args:
            manifest_url, split, rank, world_size, seed, task, storage_options, pin_memory: as
                for the constructor.
            cfg_data: the config's ``data`` section (its ``split`` is not used: pass ``split``).
            **overrides: other constructor keywords (``weight_domain``, ``stats_split``,
                ``evaluation`` …); one that ``cfg_data`` also sets (e.g. ``batch_size``,
                ``augment``) replaces the config's value.

        Returns:
            The ``ShardStream``.
        """
        settings: dict[str, Any] = {
            "batch_size": cfg_data.batch_size,
            "num_workers": cfg_data.num_workers,
            "augment": cfg_data.augment,
            "shuffle_buffer": cfg_data.shuffle_buffer,
            "skip_errors": cfg_data.skip_errors,
            "max_bad_shards": cfg_data.max_bad_shards,
            "retries": cfg_data.retries,
            "timeout": cfg_data.timeout,
            "prepare": cfg_data.prepare,
        }
        settings.update(overrides)
        return cls(
            manifest_url,
            split,
            rank=rank,
            world_size=world_size,
            seed=seed,
            task=task,
            storage_options=storage_options,
            pin_memory=pin_memory,
            **settings,
        )

    def _load_split(self, manifest: Mapping[str, Any], split: str, task: str) -> None:
        """The split's shards, their manifest entries and sample counts, and the patch size."""
        splits = manifest["splits"]
        urls = shard_urls(self.manifest_url, split, self.storage_options, manifest)
        entries = splits[split]["shards"]
        self.shards: list[str] = list(urls)
        self.shard_samples: list[int] = [int(e["samples"]) for e in entries]
        # URL -> manifest entry (name, samples, bytes, sha256): what every read is checked against
        self.shard_entries: dict[str, dict[str, Any]] = {
            u: dict(e) for u, e in zip(urls, entries, strict=True)
        }
        self.total_samples = sum(self.shard_samples)
        self.patch = int(manifest.get("patch_size", 256))
        if not self.shards:
            raise ValueError(f"{self.manifest_url}: split {split!r} lists no shards")
        members = splits[split].get("members") or []
        self.with_labels = task != "pretrain"
        if self.with_labels and members and "lulc.npy" not in members:
            raise ValueError(
                f"task {task!r} needs labels but split {split!r} has none "
                f"(members {members}); fine-tune on train/val/test"
            )

    def _load_db_stats(self, splits: Mapping[str, Any], stats_split: str | None, task: str) -> None:
        """The z-score's ``mean`` and ``std`` from ``stats_split``'s ``db_stats`` (default: the
        ``pretrain`` split for pretraining, else ``train``)."""
        self.stats_split = stats_split or ("pretrain" if task == "pretrain" else "train")
        if self.stats_split not in splits:
            raise ValueError(
                f"{self.manifest_url}: no split {self.stats_split!r} for the "
                f"normalisation statistics (splits {sorted(splits)}); pass stats_split"
            )
        db = splits[self.stats_split].get("db_stats") or {}
        mean, std = db.get("mean"), db.get("std")
        if mean is None or std is None or not np.isfinite([mean, std]).all() or std <= 0:
            raise ValueError(
                f"{self.manifest_url}: split {self.stats_split!r} has unusable dB "
                f"statistics (mean {mean}, std {std})"
            )
        self.mean, self.std = float(mean), float(std)

    def _plan_steps(self, evaluation: bool) -> None:
        """``steps_per_epoch``; for a training stream at least 1, and a warning when shards are
        fewer than rank × worker slots."""
        self.steps_per_epoch = epoch_plan.steps_per_epoch(
            self.total_samples, self.world_size, self.batch_size
        )
        if self.steps_per_epoch < 1 and not evaluation:
            raise ValueError(
                f"split {self.split!r} has {self.total_samples} samples, fewer than world_size "
                f"× batch_size = {self.world_size} × {self.batch_size}: not one full step per "
                "epoch"
            )
        slots = self.world_size * max(self.num_workers, 1)
        if len(self.shards) < slots and not evaluation:
            log.warning(
                "split %s: %d shards for %d rank×worker slots; some shards are read by "
                "several slots (write ≥ %d shards)",
                self.split,
                len(self.shards),
                slots,
                4 * slots,
            )

    def __len__(self) -> int:
        return self.steps_per_epoch

    def __repr__(self) -> str:
        return (
            f"ShardStream({self.manifest_url!r}, {self.split!r}, task={self.task!r}, "
            f"rank={self.rank}/{self.world_size}, workers={self.num_workers}, "
            f"batch={self.batch_size}, steps/epoch={self.steps_per_epoch})"
        )

    # --- the plan -------------------------------------------------------------------------

    @property
    def _nw(self) -> int:
        """Logical loader workers per rank: ``max(num_workers, 1)``."""
        return max(self.num_workers, 1)

    def shard_order(self, epoch: int) -> list[int]:
        """Indices into ``shards`` in this epoch's order (same on every rank)."""
        return epoch_plan.shard_order(self.seed, epoch, len(self.shards))

    def rank_shards(self, epoch: int, rank: int | None = None) -> list[int]:
        """Indices of the shards rank ``rank`` (default: this one) reads in ``epoch``."""
        rank = self.rank if rank is None else int(rank)
        return epoch_plan.rank_shards(self.shard_order(epoch), rank, self.world_size)

    def worker_shards(self, epoch: int, worker: int, rank: int | None = None) -> list[int]:
        """Indices of the shards logical worker ``worker`` of rank ``rank`` reads in ``epoch``."""
        return epoch_plan.worker_shards(self.rank_shards(epoch, rank), worker, self._nw)

    def worker_quota(self, worker: int, steps: int | None = None) -> int:
        """Batches logical worker ``worker`` yields among the first ``steps`` (default: all)."""
        steps = self.steps_per_epoch if steps is None else steps
        return epoch_plan.worker_quota(steps, worker, self._nw)

    def plan(self, epoch: int) -> dict[int, list[dict[str, Any]]]:
        """Every rank's workers: shard URLs, samples in one pass and quota (batches)."""
        out: dict[int, list[dict[str, Any]]] = {}
        for r in range(self.world_size):
            out[r] = []
            for w in range(self._nw):
                idx = self.worker_shards(epoch, w, r)
                out[r].append(
                    {
                        "worker": w,
                        "shards": [self.shards[i] for i in idx],
                        "samples": sum(self.shard_samples[i] for i in idx),
                        "quota": self.worker_quota(w),
                    }
                )
        return out

    # --- streaming ------------------------------------------------------------------------

    def _ensure_opener(self) -> None:
        """Register this stream's opener settings in this process (a spawned worker process
        starts without them)."""
        ensure_fsspec_opener(self._opener)

    def _shard_raw(
        self, url: str, state: WorkerState, tolerant: bool = True
    ) -> Iterator[dict[str, Any]]:
        """Raw samples of one shard, verified against its manifest entry (``read_shard``); with
        ``tolerant``, transient failures are skipped within ``skip_errors`` and bad shards within
        ``max_bad_shards``."""
        policy = ReadPolicy(self.verify, self.skip_errors, self.max_bad_shards, tolerant)
        return read_shard(url, self.shard_entries.get(url), state, policy)

    def _worker_samples(
        self, epoch: int, worker: int, state: WorkerState
    ) -> Generator[dict, None, None]:
        """Endless raw samples of one logical worker: shuffled passes over its shard list."""
        shards = [self.shards[i] for i in self.worker_shards(epoch, worker)]
        rng = epoch_plan.shuffle_rng(self.seed, epoch, self.rank, worker)
        passes = 0
        while True:
            if passes:
                state.counts["wraps"] += 1
            n = 0
            one_pass = (s for url in shards for s in self._shard_raw(url, state))
            for s in epoch_plan.shuffled(one_pass, self.shuffle_buffer, rng):
                n += 1
                yield s
            if n == 0:
                raise ShardReadError(
                    f"rank {self.rank} worker {worker}, epoch {epoch}: its shards "
                    f"{shards} gave no sample in a whole pass"
                )
            passes += 1

    def _worker_batches(
        self, epoch: int, worker: int, start_step: int, opener_stats: bool = True
    ) -> Generator[dict, None, None]:
        """Logical worker ``worker``'s batches from global step ``start_step`` on."""
        state = WorkerState(opener_stats)
        first, quota = self.worker_quota(worker, start_step), self.worker_quota(worker)
        stream = self._worker_samples(epoch, worker, state)
        try:
            for _ in range(first * self.batch_size):  # fast-forward: no decode
                next(stream)
                state.counts["samples_fast_forwarded"] += 1
            for _ in range(first, quota):
                raw = [next(stream) for _ in range(self.batch_size)]
                batch = self.make_batch(epoch, raw)
                state.counts["samples_decoded"] += len(raw)
                batch["_stats"] = (worker, state.snapshot())
                yield batch
        finally:
            stream.close()

    # --- decoding -------------------------------------------------------------------------

    def make_batch(
        self, epoch: int, raw: Sequence[Mapping[str, Any]], augment: bool | None = None
    ) -> dict[str, Any]:
        """Decode and augment (``augment``, default the stream's) raw samples into one batch
        dict; with ``prepare="worker"`` also normalise and weight it (``finish``), else leave
        that to the consumer's device."""
        out = decode_batch(
            raw,
            epoch=epoch,
            seed=self.seed,
            patch=self.patch,
            task=self.task,
            lut=self.lut if self.with_labels else None,
            augment=self.augment if augment is None else augment,
        )
        return out if self.prepare == "device" else self.finish(out)

    def finish(
        self, batch: Mapping[str, Any], device: torch.device | str | None = None
    ) -> dict[str, Any]:
        """The full batch (``image``, ``weight``, ``valid``, ``label`` int64, ``key``; see the
        package doc) on ``device`` (default CPU) from a compact one (``sar`` (B, 1, P, P) float16
        augmented dB with NaN for no data, ``label`` (B, P, P) uint8 task classes, ``key``).

        With ``prepare="device"`` the loader ships the compact batch (a third of the bytes of the
        full one) and the training step calls this on the GPU: the z-score and weight map then
        cost the loader processes nothing. A batch that is already full is only moved.
        """
        return finish_batch(
            batch,
            device,
            mean=self.mean,
            std=self.std,
            weight_domain=self.weight_domain,
            weight_k=self.weight_k,
        )

    # --- public iteration -----------------------------------------------------------------

    def _check(self, epoch: int, start_step: int) -> None:
        if int(epoch) < 0:
            raise ValueError(f"epoch must be ≥ 0, got {epoch}")
        if not 0 <= int(start_step) <= self.steps_per_epoch:
            raise ValueError(f"start_step must be in [0, {self.steps_per_epoch}], got {start_step}")

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, Any]]:
        """This rank's batches ``start_step … steps_per_epoch - 1`` of ``epoch``, in the calling
        process (the logical workers interleaved as the DataLoader does)."""
        self._check(epoch, start_step)
        self._ensure_opener()
        # all logical workers share this process: worker 0 reports the opener's counters
        gens: list[Generator[dict, None, None]] = [
            self._worker_batches(epoch, w, start_step, w == 0) for w in range(self._nw)
        ]
        base, latest = self.io_counters, {}
        try:
            for i in range(start_step, self.steps_per_epoch):
                batch = next(gens[i % self._nw])
                w, snap = batch.pop("_stats")
                latest[w] = snap
                self.io_counters = merge_counters(base, list(latest.values()))
                yield batch
        finally:
            for g in gens:
                g.close()

    # --- evaluation -------------------------------------------------------------------------

    def eval_shards(self, rank: int | None = None) -> list[int]:
        """Shards rank ``rank`` reads for evaluation: ``rank, rank + world_size, …`` (manifest
        order). Each shard goes to exactly one rank, so every sample is counted once."""
        rank = self.rank if rank is None else int(rank)
        return list(range(rank, len(self.shards), self.world_size))

    def _eval_batches(self, worker: int, nw: int) -> Iterator[dict[str, Any]]:
        state = WorkerState(worker == 0)
        buf: list[dict[str, Any]] = []
        for i in self.eval_shards()[worker::nw]:
            for s in self._shard_raw(self.shards[i], state, tolerant=False):
                buf.append(s)
                if len(buf) == self.batch_size:
                    yield self.make_batch(0, buf, augment=False)
                    buf = []
        if buf:
            yield self.make_batch(0, buf, augment=False)

    def eval_batches(self) -> Iterator[dict[str, Any]]:
        """This rank's share of the split for evaluation: every sample of its ``eval_shards``
        exactly once, in order, without augmentation, in batches of ``batch_size`` (the last one
        may be short). Unlike the training epoch there is no wrap-around and no equal step count:
        ranks may get different numbers of batches (or none), which is fine for a confusion
        matrix summed once at the end. With ``num_workers > 0`` the rank's shards are dealt to
        DataLoader workers (batch order then follows the workers)."""
        self._ensure_opener()
        mine = self.eval_shards()
        nw = min(self.num_workers, len(mine))
        if nw == 0:
            yield from self._eval_batches(0, 1)
            return
        yield from eval_in_workers(self, nw)

    def loader(self, epoch: int, start_step: int = 0) -> EpochLoader:
        """An iterable of the same batches as ``batches()``, made by ``num_workers`` DataLoader
        processes (in-process when 0); ``len()`` is the number of batches it yields."""
        self._check(epoch, start_step)
        return EpochLoader(self, int(epoch), int(start_step))
