"""Small in-process training runs: the tiny SimMIM config, a deterministic in-memory data source,
a :class:`training.engine.Trainer` over both, and the reader of the metrics log it writes.

The data source stands in for the shard stream (exercised in test_pretrain.py) so that engine
tests run in seconds on a CPU.
"""

from __future__ import annotations

import json

import torch

from training.config import Config, load_config
from training.engine import Trainer
from training.pretrain import build_model, make_task
from training.sar_weight import sar_intensity_weight


class SynthData:
    """Deterministic batches from (seed, epoch, step): speckled two-level scenes, z-scored."""

    def __init__(self, steps_per_epoch: int = 3, batch_size: int = 2, seed: int = 0) -> None:
        self.steps_per_epoch, self.batch_size, self.seed = steps_per_epoch, batch_size, seed
        self.mean, self.std = -12.0, 5.0

    def batches(self, epoch: int, start_step: int = 0):
        """The batches of ``epoch`` from ``start_step`` on: ``image``, ``weight`` and ``key``."""
        yy = torch.arange(256).view(1, 1, 256, 1).expand(self.batch_size, 1, 256, 256)
        for i in range(start_step, self.steps_per_epoch):
            g = torch.Generator().manual_seed(1000 * self.seed + 100 * epoch + i)
            level = torch.where(yy < 64 + 32 * i, -20.0, -6.0)
            db = level + 10 * torch.log10(torch.empty(level.shape).exponential_(generator=g) + 1e-3)
            image = (db - self.mean) / self.std
            yield {
                "image": image.float(),
                "weight": sar_intensity_weight(db),
                "key": [f"e{epoch}-s{i}-{b}" for b in range(self.batch_size)],
            }


def tiny_cfg(*overrides: str) -> Config:
    """The ``simmim_tiny`` profile made fast (batch 2, 2 epochs, no progress bar, TensorBoard or
    figures), with ``overrides`` (``section.key=value``) on top."""
    base = [
        "data.batch_size=2",
        "schedule.epochs=2",
        "schedule.warmup_epochs=1",
        "optim.base_lr=0.256",
        "train.progress=false",
        "train.tensorboard=false",
        "train.figure=false",
    ]
    return load_config("simmim_tiny", [*base, *overrides])


def make_trainer(cfg: Config, out, data=None, **kw) -> Trainer:
    """A :class:`Trainer` of ``cfg``'s model writing to ``out``.

    Args:
        cfg: the training configuration.
        out: the run directory (a path or URL).
        data: the data source; default a :class:`SynthData` of ``cfg``'s batch size.
        **kw: passed on to :class:`Trainer` (e.g. ``storage_options``).
    """
    model = build_model(cfg)
    data = data or SynthData(batch_size=cfg.data.batch_size)
    return Trainer(cfg, model, make_task(cfg, model, (data.mean, data.std)), data, str(out), **kw)


def jsonl_records(text: str) -> list[dict]:
    """The records of a JSON-lines text (a run's ``metrics.jsonl``), blank lines skipped."""
    return [json.loads(ln) for ln in text.splitlines() if ln.strip()]
