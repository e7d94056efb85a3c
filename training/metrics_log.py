"""The run's logs: ``metrics.jsonl`` and TensorBoard events (rank 0), per-rank summaries.

``metrics.jsonl`` has one JSON line per logged step (``kind: step``), per epoch (``epoch``) and
per validation (``val``); the same scalars go to TensorBoard under ``{kind}/{name}``.

Metrics and TensorBoard are written to a local directory (``out`` itself when local, else
``train.log_dir`` or a temporary directory removed at the end: nothing in the working
directory); for a remote ``out`` ``metrics.jsonl`` is uploaded with each checkpoint and fetched
back by a resume (:func:`fetch_metrics`), ``tb/`` uploaded when the run ends. A resume keeps the
lines up to the checkpoint's step and drops those after it (they are written again).

Each rank also writes ``ranks/rank-NNNNN.json`` at the end (:func:`write_rank_summary`): steps
per epoch, samples, parameter checksum and the loader's counters (:func:`loader_stats`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sarcube.storage import join_url, url_to_fs

from .checkpoint import exists, read_bytes, write_bytes

__all__ = [
    "METRICS",
    "MetricsLog",
    "fetch_metrics",
    "loader_stats",
    "upload_metrics",
    "upload_tensorboard",
    "write_rank_summary",
]

log = logging.getLogger("training.engine")  # these lines belong to the engine's log

METRICS = "metrics.jsonl"


class MetricsLog:
    """JSONL + TensorBoard on rank 0 (a no-op elsewhere).

    Args:
        log_dir: the local directory of ``metrics.jsonl`` and ``tb/``; ``None`` on ranks that
            do not log.
        tensorboard: also write TensorBoard events.
        resume_step: the checkpoint's step on a resume (later lines are dropped), ``None`` for a
            fresh run (the log starts empty).
    """

    def __init__(self, log_dir: Path | None, tensorboard: bool, resume_step: int | None) -> None:
        self.path = None if log_dir is None else log_dir / METRICS
        self.tb = None
        if log_dir is None or self.path is None:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("")
        else:  # keep what the checkpointed part of the run logged; drop lines after it
            lines = self.path.read_text().splitlines() if self.path.exists() else []
            keep = [
                ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= resume_step
            ]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                str(log_dir / "tb"), purge_step=None if resume_step is None else resume_step + 1
            )

    def write(self, record: Mapping[str, Any]) -> None:
        """Append ``record`` (with ``kind`` and ``step``) as a line, and its numbers to TB."""
        if self.path is None:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            kind, step = record["kind"], record["step"]
            for k, v in record.items():
                if k not in ("kind", "step", "epoch", "time") and isinstance(v, (int, float)):
                    self.tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()


def fetch_metrics(log_dir: Path, out: str, storage_options: Mapping[str, Any]) -> None:
    """Copy ``{out}/metrics.jsonl`` to ``log_dir`` unless a local copy is there (a resume of a
    remote run on a fresh machine)."""
    local, url = log_dir / METRICS, join_url(out, METRICS)
    if not local.exists() and exists(url, storage_options):
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_bytes(read_bytes(url, storage_options))


def upload_metrics(log_dir: Path, out: str, storage_options: Mapping[str, Any]) -> None:
    """Upload ``log_dir/metrics.jsonl`` (when there) to ``{out}/metrics.jsonl``."""
    path = log_dir / METRICS
    if path.exists():
        write_bytes(join_url(out, METRICS), path.read_bytes(), storage_options)


def upload_tensorboard(log_dir: Path, out: str, storage_options: Mapping[str, Any]) -> None:
    """Upload the files of ``log_dir/tb`` (when there) under ``{out}/tb``."""
    tb = log_dir / "tb"
    if tb.is_dir():
        fs, root = url_to_fs(join_url(out, "tb"), storage_options)
        for f in tb.rglob("*"):
            if f.is_file():
                fs.pipe_file(f"{root}/{f.relative_to(tb).as_posix()}", f.read_bytes())


def loader_stats(stats: Any, rank: int) -> dict[str, Any]:
    """``{"loader": stats}`` when ``stats``, the data source's counters (shards read, skipped,
    bad …; ``training.data.ShardStream.io_counters``: cumulative, this rank), is a mapping, else
    ``{}``; skipped or bad shards are also logged as a warning."""
    if not isinstance(stats, Mapping):
        return {}
    bad = int(stats.get("shards_bad", 0)) + int(stats.get("shards_skipped", 0))
    if bad:
        log.warning(
            "rank %d: the loader skipped %d shard(s) so far: %s",
            rank,
            bad,
            [*stats.get("bad_urls", []), *stats.get("skipped_urls", [])],
        )
    return {"loader": dict(stats)}


def write_rank_summary(
    out: str, rank: int, summary: Mapping[str, Any], storage_options: Mapping[str, Any]
) -> str:
    """Write ``summary`` as ``{out}/ranks/rank-NNNNN.json``; returns its URL."""
    url = join_url(out, f"ranks/rank-{rank:05d}.json")
    write_bytes(url, json.dumps(dict(summary), indent=1).encode(), storage_options)
    return url
