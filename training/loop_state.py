"""What the training loop knows: where it is (checkpointed), what one call did, what it returns.

:class:`LoopState` is everything :class:`training.engine.Trainer` carries from one optimiser
step to the next that a resume must restore (it goes into ``checkpoint.pt``). :class:`CallRecord`
is what one ``fit()`` call did and is not checkpointed (its losses, validations, steps per epoch,
the last batch for the figure). :class:`TrainResult` is what ``fit()`` returns.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CallRecord", "LoopState", "NonFiniteLossError", "TrainResult", "step_and_epoch"]


class NonFiniteLossError(RuntimeError):
    """The loss (or gradient norm) became NaN/inf; the run stopped before applying the update.

    Attributes:
        step: 1-based optimiser step whose loss was not finite.
        epoch: its epoch.
        checkpoint: URL of the last good checkpoint, or ``None`` if none was written.
    """

    def __init__(
        self,
        step: int,
        epoch: int,
        value: float,
        what: str,
        checkpoint: str | None,
        base_lr: float | None = None,
    ):
        self.step, self.epoch, self.value, self.checkpoint = step, epoch, value, checkpoint
        lower = f"{base_lr / 10:.3g}" if base_lr else "<lower>"
        last = (
            f"the last good checkpoint is {checkpoint}; to continue from it with a lower "
            f"learning rate, run the same command again with --resume optim.base_lr={lower} "
            "added"
            if checkpoint
            else "no checkpoint was written yet"
        )
        super().__init__(
            f"non-finite {what} ({value}) at step {step} (epoch {epoch}); training "
            f"stopped before applying this update; {last}"
        )


@dataclass
class TrainResult:
    """What :meth:`training.engine.Trainer.fit` did (on this rank)."""

    step: int  # optimiser steps completed in total
    epoch: int  # epochs completed
    steps_taken: int  # optimiser steps taken by this call
    finished: bool  # all epochs done (False: stopped at train.max_steps)
    last_loss: float | None
    checkpoint: str | None  # last checkpoint written
    encoder: str | None = None
    figure: str | None = None
    metrics: str | None = None  # local metrics.jsonl (rank 0)
    losses: list[float] = field(default_factory=list)  # per step, this call
    best: str | None = None  # best.pt (when the task validates)
    best_value: float | None = None  # its task.best_metric
    best_epoch: int | None = None
    val: list[dict[str, Any]] = field(default_factory=list)  # per validated epoch, this call


@dataclass
class LoopState:
    """Where the loop is: everything here is checkpointed and restored by a resume."""

    step: int = 0  # optimiser steps completed in total
    epoch: int = 0  # the current epoch (= epochs completed)
    step_in_epoch: int = 0  # optimiser steps done in the current epoch
    epoch_loss_sum: float = 0.0  # sum of this epoch's step losses (for its mean)
    epoch_steps: int = 0  # steps in that sum
    best_value: float | None = None  # best task.best_metric so far (best.pt)
    best_epoch: int | None = None

    def add_step(self, loss: float) -> None:
        """Count one optimiser step of loss ``loss``."""
        self.step += 1
        self.step_in_epoch += 1
        self.epoch_loss_sum += loss
        self.epoch_steps += 1

    def next_epoch(self) -> None:
        """Move on to the next epoch (its running loss from zero)."""
        self.epoch += 1
        self.step_in_epoch, self.epoch_loss_sum, self.epoch_steps = 0, 0.0, 0

    @classmethod
    def from_checkpoint(cls, ck: Mapping[str, Any]) -> LoopState:
        """The state a ``checkpoint.pt`` holds (:meth:`training.engine.Trainer.state_dict`)."""
        best = ck.get("best") or {}
        return cls(
            step=ck["step"],
            epoch=ck["epoch"],
            step_in_epoch=ck["step_in_epoch"],
            epoch_loss_sum=ck["epoch_loss_sum"],
            epoch_steps=ck["epoch_steps"],
            best_value=best.get("value"),
            best_epoch=best.get("epoch"),
        )


@dataclass
class CallRecord:
    """What one :meth:`training.engine.Trainer.fit` call did (not checkpointed)."""

    losses: list[float] = field(default_factory=list)  # per optimiser step
    val: list[dict[str, Any]] = field(default_factory=list)  # per validation
    per_epoch: dict[str, int] = field(default_factory=dict)  # steps taken per epoch
    last_batch: dict[str, Any] | None = None  # the last micro-batch (for the figure)

    def add_step(self, epoch: int, loss: float) -> None:
        self.losses.append(loss)
        self.per_epoch[str(epoch)] = self.per_epoch.get(str(epoch), 0) + 1


def step_and_epoch(state: LoopState | Mapping[str, Any]) -> tuple[int, int]:
    """``(step, epoch)`` of a :class:`LoopState` or of a mapping with those keys."""
    if isinstance(state, LoopState):
        return state.step, state.epoch
    return int(state["step"]), int(state["epoch"])
