"""The output folder of one training run, local or on an object store: its files and their writes.

One :class:`RunFolder` per :class:`training.engine.Trainer` owns everything about ``out``: the
file names, the one-writer lock, the atomic writes of checkpoints and weights, the run's history
and config, and where the logs are kept while the run writes them. The trainer decides *what*
goes into a checkpoint and *when*; this module decides *where* and *how*. Only rank 0 writes
(the methods that write say so); the trainer puts the barriers around them.

Files (all written atomically: :mod:`training.checkpoint`)::

    checkpoint.pt           latest full state
    checkpoint-epochNNNN.pt snapshots every ``train.keep_every_epochs`` epochs
    best.pt                 weights of the best validation score so far (sarcube-model/1)
    encoder.pth             encoder state dict when the run ends
    config.yaml             the resolved config
    history.jsonl           one line per start / resume of the run
    metrics.jsonl, tb/      the logs (:mod:`training.metrics_log`)
    reconstruction.png      the task's figure at the end
    ranks/rank-NNNNN.json   per-rank summaries

For a remote ``out``, the logs are written to a private temporary directory (or
``train.log_dir``) and uploaded at each checkpoint and at the end; a resume fetches
``metrics.jsonl`` back. Nothing is left in the working directory.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from sarcube.locking import StoreLock
from sarcube.storage import RedactedOptions, is_remote, join_url

from .checkpoint import exists, load_checkpoint, read_bytes, save_checkpoint, write_bytes
from .metrics_log import METRICS, fetch_metrics, upload_metrics, upload_tensorboard

__all__ = [
    "BEST",
    "CHECKPOINT",
    "CONFIG",
    "ENCODER",
    "FIGURE",
    "FORMAT",
    "HISTORY",
    "MODEL_FORMAT",
    "RunFolder",
]

CHECKPOINT = "checkpoint.pt"
BEST = "best.pt"
ENCODER = "encoder.pth"
FIGURE = "reconstruction.png"
CONFIG = "config.yaml"
HISTORY = "history.jsonl"
FORMAT = "sarcube-checkpoint/1"
MODEL_FORMAT = "sarcube-model/1"  # best.pt: weights + config + scores, no optimiser state


class RunFolder:
    """The files of one run under ``out`` (see the module docstring).

    Args:
        out: output directory or URL (``s3://...``); a local path is made absolute.
        storage_options: fsspec options for ``out`` (kept redacted: never printed).
        main: whether this process is rank 0 (the only writer; it keeps the log folder).
        log_dir: ``train.log_dir``: where rank 0 writes the logs; ``None``: ``out`` itself for a
            local run, a temporary directory for a remote one.
    """

    def __init__(
        self,
        out: str,
        storage_options: Mapping[str, Any] | None,
        main: bool,
        log_dir: str | None = None,
    ) -> None:
        self.out = str(out).rstrip("/")
        if not is_remote(self.out):
            self.out = os.path.abspath(self.out.removeprefix("file://"))
        self.storage_options = RedactedOptions(storage_options or {})
        self.remote = is_remote(self.out)
        self.main = main
        self.checkpoint = self.url(CHECKPOINT)
        self._lock: StoreLock | None = None
        self._tmp_log_dir: Path | None = None
        self.log_dir = self._make_log_dir(log_dir) if main else None

    def _make_log_dir(self, log_dir: str | None) -> Path:
        if log_dir:
            return Path(log_dir).expanduser().absolute()
        if not self.remote:
            return Path(self.out)
        self._tmp_log_dir = Path(tempfile.mkdtemp(prefix="sarcube-run-"))
        return self._tmp_log_dir

    def url(self, name: str) -> str:
        """The URL of file ``name`` in the folder."""
        return join_url(self.out, name)

    # -- the one-writer lock ------------------------------------------------------------------

    def acquire(self, command: str) -> None:
        """Take the folder's lock (rank 0): two runs, or two resumes, of one ``out`` would
        overwrite each other's checkpoints. A run killed on this host leaves a lock that the
        next ``--resume`` breaks (its process is gone)."""
        self._lock = StoreLock(self.out, self.storage_options, command=command).acquire()

    def release(self) -> None:
        """Give the lock back (if held) and remove the temporary log folder (if any)."""
        if self._lock is not None:
            self._lock.release()
            self._lock = None
        if self._tmp_log_dir is not None:
            shutil.rmtree(self._tmp_log_dir, ignore_errors=True)

    # -- checkpoints and weights --------------------------------------------------------------

    def has_checkpoint(self) -> bool:
        return exists(self.checkpoint, self.storage_options)

    def load_checkpoint(self) -> dict[str, Any]:
        return load_checkpoint(self.checkpoint, self.storage_options)

    def write_checkpoint(self, ck: Mapping[str, Any], snapshot: str | None = None) -> None:
        """``checkpoint.pt`` (and the ``snapshot`` copy), then the logs so far (rank 0). Never
        after the lock was lost: another writer owns the folder then."""
        if self._lock is not None:
            self._lock.check()
        save_checkpoint(dict(ck), self.checkpoint, self.storage_options)
        if snapshot:
            save_checkpoint(dict(ck), self.url(snapshot), self.storage_options)
        if self.log_dir is not None and self.remote:
            upload_metrics(self.log_dir, self.out, self.storage_options)

    def write_weights(self, name: str, payload: Mapping[str, Any]) -> str:
        """A weights file (``best.pt``, ``encoder.pth``): plain tensors and values (rank 0)."""
        url = self.url(name)
        save_checkpoint(dict(payload), url, self.storage_options)
        return url

    # -- the run's history, config and logs ---------------------------------------------------

    def append_history(self, event: Mapping[str, Any], resume: bool) -> None:
        """One line in ``history.jsonl`` (rank 0; every attempt, also those that end before a
        checkpoint). A fresh start begins the file again."""
        url = self.url(HISTORY)
        storage_options = self.storage_options
        before = (
            read_bytes(url, storage_options).decode()
            if resume and exists(url, storage_options)
            else ""
        )
        if before and not before.endswith("\n"):
            before += "\n"
        line = json.dumps(dict(event), default=str) + "\n"
        write_bytes(url, (before + line).encode(), storage_options)

    def write_config(self, config_yaml: str, resume: bool) -> None:
        """``config.yaml`` (rank 0); on a resume of a remote run, ``metrics.jsonl`` fetched back
        into the log folder."""
        write_bytes(self.url(CONFIG), config_yaml.encode(), self.storage_options)
        if resume and self.remote and self.log_dir is not None:
            fetch_metrics(self.log_dir, self.out, self.storage_options)

    def upload_logs(self) -> None:
        """``metrics.jsonl`` and ``tb/`` to a remote ``out`` (rank 0; a no-op for a local one)."""
        if self.remote and self.log_dir is not None:
            upload_metrics(self.log_dir, self.out, self.storage_options)
            upload_tensorboard(self.log_dir, self.out, self.storage_options)

    def metrics_url(self, local: Path | None) -> str | None:
        """Where a reader finds ``metrics.jsonl`` after the run (the temporary copy is gone)."""
        if self._tmp_log_dir is not None:
            return self.url(METRICS)
        return str(local) if local else None

    # -- the figure ---------------------------------------------------------------------------

    def figure_path(self) -> Path | None:
        """The local file the figure is drawn to (``None`` on ranks other than 0)."""
        folder = Path(self.out) if not self.remote else self.log_dir
        if folder is None:
            return None
        folder.mkdir(parents=True, exist_ok=True)
        return folder / FIGURE

    def publish_figure(self, local: Path) -> str:
        """The figure's URL, uploaded first for a remote ``out``."""
        if self.remote:
            write_bytes(self.url(FIGURE), local.read_bytes(), self.storage_options)
        return self.url(FIGURE)
