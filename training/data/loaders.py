"""``torch.utils.data.DataLoader`` wrappers: a ``ShardStream``'s epoch or evaluation made by
worker processes.

Each DataLoader worker process runs one logical worker of the stream (``training.data.plan``)
and ships its batches with a snapshot of its counters, which the main process merges into the
stream's ``io_counters``. A ``DataError`` raised in a worker travels to the main process as an item
and is raised there as itself (torch would re-raise a new exception whose message is the
worker's whole traceback).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .counters import merge_counters
from .errors import DataError
from .plan import loader_worker

if TYPE_CHECKING:
    from .stream import ShardStream

__all__ = ["EpochLoader", "eval_in_workers"]

_ERROR = "_data_error"  # a batch dict carrying a worker's DataError


class _EpochDataset(IterableDataset):
    """One epoch of ``stream`` from ``start_step`` on; DataLoader worker process ``d`` plays
    logical worker ``loader_worker(d, start_step, W)``."""

    def __init__(self, stream: ShardStream, epoch: int, start_step: int):
        self.stream, self.epoch, self.start_step = stream, epoch, start_step

    def __iter__(self):
        info = get_worker_info()
        d, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        if nw != self.stream._nw:
            raise RuntimeError(f"DataLoader has {nw} workers, the stream plans {self.stream._nw}")
        self.stream._ensure_opener()
        worker = loader_worker(d, self.start_step, nw)
        yield from _forward_errors(self.stream._worker_batches(self.epoch, worker, self.start_step))


class _EvalDataset(IterableDataset):
    """``stream``'s evaluation batches, its shards dealt to the DataLoader worker processes."""

    def __init__(self, stream: ShardStream):
        self.stream = stream

    def __iter__(self):
        info = get_worker_info()
        self.stream._ensure_opener()
        yield from _forward_errors(self.stream._eval_batches(info.id, info.num_workers))


def _forward_errors(batches: Iterator[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """In a DataLoader worker: a ``DataError`` travels to the main process as an item, which
    raises it there as itself (torch would re-raise a new one whose message is the worker's
    whole traceback)."""
    try:
        yield from batches
    except DataError as e:
        yield {_ERROR: e}


def _raise_forwarded(batch: Mapping[str, Any]) -> None:
    e = batch.get(_ERROR)
    if e is not None:
        raise e


def _data_loader(stream: ShardStream, dataset: IterableDataset, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=stream.pin_memory,
        prefetch_factor=stream.prefetch_factor,
        multiprocessing_context=stream.multiprocessing_context,
    )


def _shutdown(it: Iterator[Any]) -> None:
    """Stop a DataLoader iterator's workers now: left to the garbage collector after an error
    (the traceback holds the iterator), torch's shutdown waits out its 5 s join timeout per
    worker."""
    shutdown = getattr(it, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()


def eval_in_workers(stream: ShardStream, num_workers: int) -> Iterator[dict[str, Any]]:
    """``stream.eval_batches()`` made by ``num_workers`` (≥ 1) DataLoader worker processes
    (batch order then follows the workers)."""
    it = iter(_data_loader(stream, _EvalDataset(stream), num_workers))
    try:
        for batch in it:
            _raise_forwarded(batch)
            yield batch
    finally:
        _shutdown(it)


class EpochLoader:
    """One epoch of a ``ShardStream`` through a ``torch.utils.data.DataLoader``."""

    def __init__(self, stream: ShardStream, epoch: int, start_step: int):
        self.stream, self.epoch, self.start_step = stream, epoch, start_step

    def __len__(self) -> int:
        return self.stream.steps_per_epoch - self.start_step

    def __iter__(self) -> Iterator[dict[str, Any]]:
        s = self.stream
        if s.num_workers == 0:
            yield from s.batches(self.epoch, self.start_step)
            return
        dl = _data_loader(s, _EpochDataset(s, self.epoch, self.start_step), s.num_workers)
        base, latest, n = s.io_counters, {}, 0
        it = iter(dl)
        try:
            for batch in it:
                _raise_forwarded(batch)
                w, snap = batch.pop("_stats")
                latest[w] = snap
                s.io_counters = merge_counters(base, list(latest.values()))
                n += 1
                yield batch
        finally:
            _shutdown(it)
        if n != len(self):
            raise RuntimeError(f"the DataLoader gave {n} batches, expected {len(self)}")
