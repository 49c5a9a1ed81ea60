"""Controls for a teleport ablation: what a teleport does besides teleporting, one piece at a time.

A forced teleport (i) moves the shared weights, (ii) drops the teleporting batch's optimizer step and
(iii) rewrites the optimizer state of the shared weights (HTR, transport, reset). To tell which piece
changes a result, each control does one of them at the same steps (``TeleportSchedule.every``):

* :class:`DropSteps`: drops the step only (the weights and the optimizer state are untouched);
* :class:`ResetState`: forgets the optimizer state of the shared weights only (the step is taken);
* :class:`~lightning_cost.teleport.RandomMove` (``teleporter="random_move"``): a teleporter that moves
  the shared weights by a random direction of a given relative size (so, through the callback: move +
  dropped step + the chosen state transfer);
* :class:`~lightning_cost.teleport.NullTeleporter` (``teleporter="null"``): the matched control, the
  same callback without the move (dropped step + the chosen state transfer).

The two callbacks here act without a teleporter; add them to a ``Trainer`` in place of
:class:`~lightning_cost.teleport.SymmetryTeleportCallback`. ``pl_module`` is a
:class:`~lightning_cost.MultiTaskMixin` module (``shared_parameters()`` names the weights).
"""

from __future__ import annotations

from typing import Any

import lightning as L

from lightning_cost.teleport.schedule import TeleportSchedule

__all__ = ["CONTROLS", "DropSteps", "ResetState", "build_control"]


class _AtScheduledSteps(L.Callback):
    """Acts in ``on_before_optimizer_step`` at the steps where ``schedule`` forces a teleport."""

    def __init__(self, every: int) -> None:
        self.schedule = TeleportSchedule(every=every, max_per_epoch=None)
        self.count = 0

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: Any, optimizer: Any) -> None:
        if self.schedule.forces(trainer.global_step):
            self.count += 1
            self.act(pl_module, optimizer)

    def act(self, pl_module: Any, optimizer: Any) -> None:
        raise NotImplementedError


class DropSteps(_AtScheduledSteps):
    """Drop the optimizer step (every gradient), as a teleport does, and nothing else."""

    def act(self, pl_module: Any, optimizer: Any) -> None:
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None


class ResetState(_AtScheduledSteps):
    """Forget the optimizer state of the shared weights, as ``transfer="reset"`` does, and nothing else."""

    def act(self, pl_module: Any, optimizer: Any) -> None:
        for p in pl_module.shared_parameters():
            optimizer.state.pop(p, None)


CONTROLS = {"drop_step": DropSteps, "reset_state": ResetState}


def build_control(kind: str, every: int) -> L.Callback:
    """A control callback by name (``drop_step`` or ``reset_state``) acting every ``every`` steps."""
    if kind not in CONTROLS:
        raise ValueError(f"unknown control {kind!r}; choose from {sorted(CONTROLS)}")
    return CONTROLS[kind](every)
