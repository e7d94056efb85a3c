"""The loader's counters: per logical worker, merged into ``ShardStream.io_counters``.

``io_counters`` (cumulative over the stream's life, merged from the workers with every batch; the
training engine writes them into each epoch's ``metrics.jsonl`` record and the rank summaries
as ``loader``): ``shards_read`` (shards streamed to their end and verified),
``shards_skipped`` and ``skipped_urls`` (transient failures), ``shards_bad`` and ``bad_urls``
(bad shards skipped under ``max_bad_shards``), ``read_retries`` (transient errors retried by
the opener), ``failed_reads`` (reads that failed after all retries), ``samples_decoded``,
``samples_fast_forwarded`` (skipped for a resume) and ``wraps`` (passes started after a
worker's first one).

Each logical worker keeps its counters in a ``WorkerState`` and attaches a snapshot to every
batch it makes; the consumer (``ShardStream.batches``, ``EpochLoader``) merges the latest
snapshot of each worker into the counters it had before the epoch (``merge_counters``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .opener import READ_COUNTERS

__all__ = ["WorkerState", "empty_counters", "merge_counters"]

_STAT_KEYS = (
    "shards_read",
    "shards_skipped",
    "shards_bad",
    "read_retries",
    "failed_reads",
    "samples_decoded",
    "samples_fast_forwarded",
    "wraps",
)
_STAT_LISTS = ("skipped_urls", "bad_urls")


def empty_counters() -> dict[str, Any]:
    """All counters at zero, all URL lists empty."""
    return {**dict.fromkeys(_STAT_KEYS, 0), **{k: [] for k in _STAT_LISTS}}


def merge_counters(base: Mapping[str, Any], parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """``base`` plus the counters (summed) and URL lists (concatenated) of ``parts``."""
    out: dict[str, Any] = {k: base.get(k, 0) + sum(p.get(k, 0) for p in parts) for k in _STAT_KEYS}
    for k in _STAT_LISTS:
        out[k] = list(base.get(k, [])) + [u for p in parts for u in p.get(k, [])]
    return out


class WorkerState:
    """Counters of one logical worker in one epoch; with ``opener`` also the opener's counters of
    this process (deltas), which only one logical worker per process may report."""

    def __init__(self, opener: bool = True) -> None:
        self.counts = empty_counters()
        self.bad: set[str] = set()  # shards found bad (and skipped) this epoch: not read again
        self._opener0 = dict(READ_COUNTERS) if opener else None

    def snapshot(self) -> dict[str, Any]:
        """A copy of the counters (with the opener's since this state was made, if it reports
        them)."""
        snap = dict(self.counts)
        for k in _STAT_LISTS:
            snap[k] = list(self.counts[k])
        if self._opener0 is not None:
            for k in READ_COUNTERS:
                snap[k] = READ_COUNTERS[k] - self._opener0[k]
        return snap
