"""How to teleport: the interface every teleporter implements, and the transaction around a move.

A teleport moves the shared weights to a point with the same task losses (eq. 5) and better
gradients (eq. 6). A :class:`Teleporter` only implements :meth:`Teleporter.move` (find the point and
write it into the weights in place); :meth:`Teleporter.teleport` wraps it in the transaction every
teleporter shares: the weights before are in a :class:`~lightning_cost.teleport.evaluation.Snapshot`;
a move that raises :class:`TeleportRejected`, leaves non-finite weights, or changes a task loss by more
than ``loss_tolerance * |L_i*| + abs_tolerance`` is undone bit for bit. ``loss_tolerance="auto"``
follows the precision the task losses are computed in (:meth:`Teleporter.resolved_loss_tolerance`).
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_cost._precision import AUTO, rounding_tolerance
from lightning_cost.teleport.evaluation import Snapshot, TaskLossEvaluator, keep_buffers
from lightning_cost.teleport.records import TeleportRecord

__all__ = ["LOSS_TOLERANCE_FLOOR", "LOSS_TOLERANCE_UNITS", "Move", "TeleportProblem", "TeleportRejected", "Teleporter"]

#: ``loss_tolerance="auto"`` where the losses are computed in float32 or finer: the float rounding of
#: an exact move, with room to spare
LOSS_TOLERANCE_FLOOR = 1e-4
#: ``loss_tolerance="auto"`` in a coarser dtype: this many steps ``eps`` of its relative resolution
#: (:meth:`Teleporter.resolved_loss_tolerance` says why one)
LOSS_TOLERANCE_UNITS = 1.0


class TeleportRejected(Exception):
    """Raised inside :meth:`Teleporter.move` to reject the teleport (the weights are rolled back)."""


@dataclass
class TeleportProblem:
    """What a teleporter works with. Losses and Jacobian are global and measured with dropout off.

    Attributes:
        module: the LightningModule (its weights are changed in place).
        params: the weights to teleport (the trainable shared parameters), the columns of ``jacobian``.
        evaluator: task losses on ``batches`` at the current weights or at overrides.
        batches: the teleport's data.
        target: ``L*``, the ``[K]`` task losses before the teleport (eq. 7).
        jacobian: ``[K, P]`` per-task gradients of ``params`` before the teleport.
        generator: the callback's own random stream (never the global one).
        lr: the outer optimizer's learning rate of ``params``.
        snapshot: the state before the teleport, restored if it is rejected.
    """

    module: nn.Module
    params: list[nn.Parameter]
    evaluator: TaskLossEvaluator
    batches: Sequence[Any]
    target: Tensor
    jacobian: Tensor
    generator: torch.Generator
    lr: float
    snapshot: Snapshot


@dataclass
class Move:
    """What :meth:`Teleporter.move` did.

    Attributes:
        factors: for an exact symmetry ``theta' = t * theta``, the factor ``t`` per parameter; the
            gradients at the new point are ``g / t`` (no backward needed to measure them) and optimizer
            state can be transported exactly.
        trace: per inner step, the objective's terms (for the record).
    """

    factors: list[Tensor] | None = None
    trace: list[dict[str, float]] = field(default_factory=list)


class Teleporter(ABC):
    """Finds a loss-preserving point with better gradients and moves the weights there in place."""

    #: registry name, used in records
    name: str = "teleporter"
    #: the state transfer that suits this teleporter (``"htr"``, ``"transport"``, ...)
    default_transfer: str = "htr"
    #: whether :attr:`Move.factors` is given (exact transport of the optimizer state is possible)
    gives_factors: bool = False
    #: a control that never moves the weights (:class:`~lightning_cost.teleport.null.NullTeleporter`): the
    #: callback applies its accepted attempts as it applies a teleport that moved (transfer, dropped step)
    control: bool = False

    def __init__(self, loss_tolerance: float | Literal["auto"], abs_tolerance: float) -> None:
        self.loss_tolerance, self.abs_tolerance = loss_tolerance, abs_tolerance

    def resolved_loss_tolerance(self, problem: TeleportProblem) -> float:
        """The relative tolerance of the acceptance test: ``loss_tolerance`` when it is a number, else
        (``"auto"``) ``max(LOSS_TOLERANCE_FLOOR, LOSS_TOLERANCE_UNITS * eps)``, ``eps`` the relative
        resolution (``torch.finfo(dtype).eps``) of the dtype the task losses are computed in
        (:meth:`~lightning_cost.teleport.evaluation.TaskLossEvaluator.compute_dtype`: the trainer's
        autocast dtype under ``"bf16-mixed"`` / ``"16-mixed"``).

        Why one ``eps``: under autocast every matmul or convolution output is rounded to the dtype, a
        relative error of up to ``eps / 2`` per value, and moving the weights (even exactly along a
        symmetry) changes how each value rounds. A task loss is a mean over many such values whose
        round-to-nearest errors are unbiased and mostly cancel, so each evaluation of a loss is off by
        about one rounding, ``eps / 2``, at most; the drift compares two evaluations (before and after
        the move), each with its own, hence ``2 * eps / 2 = eps``. In float32 that is far below the
        floor, which is kept; a loss that moves by more than one step of the dtype's resolution has
        moved for a reason other than rounding, so non-preserving moves are still rejected.
        """
        if self.loss_tolerance != AUTO:
            return float(self.loss_tolerance)
        return rounding_tolerance(LOSS_TOLERANCE_FLOOR, problem.evaluator.compute_dtype(), LOSS_TOLERANCE_UNITS)

    def setup(self, module: nn.Module, params: Sequence[nn.Parameter]) -> None:  # noqa: B027 - optional hook
        """Called once at the start of fit (fail early on a module this teleporter cannot handle)."""

    @abstractmethod
    def move(self, problem: TeleportProblem) -> Move:
        """Find the new point and write it into ``problem.params`` in place (same Parameter objects)."""

    def teleport(self, problem: TeleportProblem, record: TeleportRecord) -> Move | None:
        """Move, verify, and accept or roll back; fills ``record``'s outcome. Returns the move if kept."""
        start = time.perf_counter()
        snapshot = problem.snapshot
        record.losses_before = problem.target.tolist()
        record.loss_tolerance = self.resolved_loss_tolerance(problem)
        try:
            move = self.move(problem)
            with keep_buffers(problem.module):
                losses = self._verify(problem)
        except TeleportRejected as err:
            snapshot.restore_weights()
            snapshot.restore_buffers()
            record.reason, record.seconds = str(err), time.perf_counter() - start
            return None
        finally:
            snapshot.restore_flags_and_modes()
        record.accepted, record.moved = True, snapshot.moved()
        record.losses_after = losses.tolist()
        record.loss_drift = float(((losses - problem.target).abs() / problem.target.abs().clamp_min(1e-12)).max())
        record.trace = move.trace
        record.seconds = time.perf_counter() - start
        return move

    def _bound(self, problem: TeleportProblem) -> Tensor:
        """The largest drift each task loss may have: ``loss_tolerance |L_i*| + abs_tolerance``
        (``loss_tolerance`` resolved: :meth:`resolved_loss_tolerance`)."""
        return self.resolved_loss_tolerance(problem) * problem.target.abs() + self.abs_tolerance

    def on_level_set(self, problem: TeleportProblem, losses: Tensor) -> bool:
        """Whether ``losses`` pass the acceptance test of :meth:`_verify` (finite, every drift in bound)."""
        return bool(torch.isfinite(losses).all()) and not bool(((losses - problem.target).abs() > self._bound(problem)).any())

    def _verify(self, problem: TeleportProblem) -> Tensor:
        """The global task losses at the new point; :class:`TeleportRejected` if they drifted."""
        if not all(torch.isfinite(p).all() for p in problem.params):
            raise TeleportRejected("non-finite weights after the move")
        with torch.no_grad():
            losses = problem.evaluator(problem.batches).detach()
        if not torch.isfinite(losses).all():
            raise TeleportRejected("non-finite losses after the move")
        bound = self._bound(problem)
        if ((losses - problem.target).abs() > bound).any():
            worst = int(((losses - problem.target).abs() / bound).argmax())
            name = list(getattr(problem.module, "task_names", range(len(losses))))[worst]
            raise TeleportRejected(f"loss drift above tolerance (task {name}: {float(losses[worst]):.6g} vs "
                                   f"{float(problem.target[worst]):.6g}, relative tolerance "
                                   f"{self.resolved_loss_tolerance(problem):.3g})")
        return losses
