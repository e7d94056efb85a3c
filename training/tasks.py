"""What the training engine asks of a task and of a data source: the hooks of the loop.

:class:`training.engine.Trainer` trains a model with a *task* (how a batch becomes a loss, plus
optional hooks for parameter groups, validation, export and a figure) on a *data source* (the
batches of each epoch). A task subclasses :class:`Task`, whose hooks default to "nothing to do";
the loop calls them at fixed points::

    Trainer(...)           task.param_groups(model, weight_decay, lr)   the AdamW groups
    every micro-batch      data.finish(batch, device)                   the batch on the device
                           task.loss(model, batch, step=, rank=)        the loss to minimise
    every epoch end        task.validate(model, epoch=, device=)        scores (every rank)
                           task.best_metric                             which score picks best.pt
    when the run ends      task.encoder(model)                          exported as encoder.pth
    (rank 0)               task.figure(model, batch, path)              reconstruction.png

Objects that do not subclass :class:`Task` but have a ``loss`` (and any of the hooks, by name)
are accepted too: :func:`as_task` wraps them. A data source is any object of the
:class:`DataSource` shape (``training.data.ShardStream`` is one); :class:`DataHooks` gives the
engine one view of its optional parts.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from .optim import param_groups_weight_decay

__all__ = ["DataHooks", "DataSource", "Task", "as_task"]


class Task(abc.ABC):
    """Base class of the engine's tasks: :meth:`loss` to implement, hooks with defaults.

    Attributes:
        best_metric: the key of :meth:`validate`'s scores whose maximum selects ``best.pt``;
            ``None`` (the default): no ``best.pt``.
    """

    best_metric: str | None = None

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Mapping[str, Any], *, step: int, rank: int) -> Tensor:
        """The scalar loss of one micro-batch (called for each, under autocast).

        Args:
            model: the (DDP / compiled) module to call.
            batch: the micro-batch on the training device (after :meth:`DataHooks.finish`).
            step: the global micro-step (optimiser step × ``accum_steps`` + micro-batch):
                seed random masks with :func:`training.reproducibility.step_generator` of it.
            rank: this process's rank.

        Returns:
            A scalar tensor; the engine averages it over micro-batches and ranks.
        """

    def param_groups(
        self, model: nn.Module, weight_decay: float, lr: float
    ) -> list[dict[str, Any]]:
        """The AdamW parameter groups (called once, when the :class:`Trainer` is built).

        Args:
            model: the raw model, on its device.
            weight_decay: ``optim.weight_decay``.
            lr: the scaled peak lr; a group's own ``lr`` (e.g. from
                :func:`training.layer_decay.param_groups_layer_decay`) is kept and scheduled.

        Returns:
            Groups as ``torch.optim.AdamW`` takes them. Default: decay / no-decay groups
            (:func:`training.optim.param_groups_weight_decay`).
        """
        return param_groups_weight_decay(model, weight_decay)

    def validate(
        self, model: nn.Module, *, epoch: int, device: torch.device
    ) -> dict[str, Any] | None:
        """Scores of the model after an epoch (called on every rank at each epoch end, after the
        epoch's metrics line: a collective when the task evaluates across ranks).

        Args:
            model: the raw model.
            epoch: the epoch just finished (0-based).
            device: the training device.

        Returns:
            The scores, the same on every rank (scalars go to ``metrics.jsonl``), or ``None``
            (the default): the task does not validate, no ``val`` line is written.
        """
        return None

    def encoder(self, model: nn.Module) -> nn.Module | None:
        """The module exported as ``encoder.pth`` when the run ends (rank 0).

        Args:
            model: the raw model.

        Returns:
            The encoder module, or ``None`` for no export. Default: ``model.encoder`` if any.
        """
        return getattr(model, "encoder", None)

    def figure(self, model: nn.Module, batch: Mapping[str, Any], path: str) -> bool:
        """Draw the run's figure when it ends (rank 0, with ``train.figure``).

        Args:
            model: the raw model.
            batch: the last training micro-batch of this call (on the device).
            path: the local PNG file to write.

        Returns:
            Whether a figure was written at ``path``. Default: ``False`` (no figure).
        """
        return False


class _NamedHooks(Task):
    """A :class:`Task` view of an object that has ``loss`` and any hooks by name only."""

    def __init__(self, task: Any) -> None:
        self.task = task

    @property
    def best_metric(self) -> str | None:  # type: ignore[override]
        return getattr(self.task, "best_metric", None)

    def loss(self, model: nn.Module, batch: Mapping[str, Any], *, step: int, rank: int) -> Tensor:
        return self.task.loss(model, batch, step=step, rank=rank)

    def param_groups(
        self, model: nn.Module, weight_decay: float, lr: float
    ) -> list[dict[str, Any]]:
        fn = getattr(self.task, "param_groups", None)
        return (
            fn(model, weight_decay, lr)
            if callable(fn)
            else super().param_groups(model, weight_decay, lr)
        )

    def validate(
        self, model: nn.Module, *, epoch: int, device: torch.device
    ) -> dict[str, Any] | None:
        fn = getattr(self.task, "validate", None)
        return fn(model, epoch=epoch, device=device) if callable(fn) else None

    def encoder(self, model: nn.Module) -> nn.Module | None:
        fn = getattr(self.task, "encoder", None)
        return fn(model) if callable(fn) else super().encoder(model)

    def figure(self, model: nn.Module, batch: Mapping[str, Any], path: str) -> bool:
        fn = getattr(self.task, "figure", None)
        if not callable(fn):
            return False
        fn(model, batch, path)
        return True


def as_task(task: Any) -> Task:
    """``task`` itself when it is a :class:`Task`, else a :class:`Task` that forwards ``loss``
    and whichever hooks ``task`` has (by name) to it.

    Args:
        task: a :class:`Task`, or any object with a ``loss`` method of the same signature.

    Returns:
        A :class:`Task`.
    """
    return task if isinstance(task, Task) else _NamedHooks(task)


class DataSource(Protocol):
    """The batches of this rank.

    Required: ``steps_per_epoch`` (the same on every rank) and ``batches(epoch, start_step)``
    or ``loader(epoch, start_step)``: the batches of ``epoch`` from batch ``start_step`` on,
    deterministic in (seed, epoch). Optional: ``finish(batch, device)`` (a compact loader batch
    made ready on the device: z-score, weight map, labels) and ``io_counters`` (a mapping of loader
    counters, logged per epoch and in the rank summaries). See :class:`DataHooks`.
    """

    steps_per_epoch: int

    def batches(self, epoch: int, start_step: int = 0) -> Iterable[dict[str, Any]]: ...


class DataHooks:
    """The engine's view of a :class:`DataSource`, its optional parts filled with defaults.

    Each call looks the hook up afresh: ``io_counters`` in particular is replaced while an epoch
    runs.

    Args:
        data: the data source.
    """

    def __init__(self, data: Any) -> None:
        self.data = data

    def epoch_batches(self, epoch: int, start_step: int) -> Iterator[dict[str, Any]]:
        """An iterator over ``data.loader(epoch, start_step)`` when the source has a
        ``loader`` (``ShardStream``'s worker-process loader), else ``data.batches(...)``."""
        loader = getattr(self.data, "loader", None)
        src = (
            loader(epoch, start_step) if callable(loader) else self.data.batches(epoch, start_step)
        )
        return iter(src)

    def finish(self, batch: Mapping[str, Any], device: torch.device) -> Mapping[str, Any]:
        """``data.finish(batch, device)`` when the source has it, else ``batch`` unchanged."""
        finish = getattr(self.data, "finish", None)
        return finish(batch, device) if callable(finish) else batch

    @property
    def io_counters(self) -> Any:
        """``data.io_counters`` (the loader's counters), or ``None``."""
        return getattr(self.data, "io_counters", None)
