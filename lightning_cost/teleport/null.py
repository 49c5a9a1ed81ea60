"""The matched control of a teleport: a teleporter that never moves the weights.

Through :class:`~lightning_cost.SymmetryTeleportCallback` with the same trigger, schedule and state
transfer as a real teleporter, an accepted null teleport is applied as a teleport is: the batch's
optimizer step is dropped and the transfer rewrites the optimizer state of the shared weights. The
weights stay bit for bit where they are, so what the control changes is exactly the optimizer-state
change and the dropped step, at the same kind of steps. What each transfer does with the zero move:

* ``"htr"``: ``sigma = cos(dtheta, g')`` has no direction to measure for ``dtheta = 0``; it is defined
  as ``0`` (:func:`~lightning_cost.teleport.htr.htr_sigma`: no information to reuse), so the history
  of the shared weights is discarded at the next step taken: Adam's bias-corrected moments restart
  from that step's gradient (``m_hat = g``, ``v_hat = g^2``) with the step count kept; SGD's momentum
  buffer restarts from ``g``. A real teleport's displacement in many dimensions is nearly orthogonal
  to ``g'``, so its clipped ``sigma`` is near 0 as well: the control makes the state change it makes.
* ``"transport"``: the move is the symmetry with every factor ``t = 1``, so the state is divided by
  ``1`` (unchanged, exactly); the control is then the dropped step alone.
* ``"keep"``: the state is unchanged; the control is the dropped step alone.
* ``"reset"``: the state of the shared weights is forgotten (a fresh optimizer from the next step).
* ``"reset_step"``: Adam's step count of the shared weights restarts at 0, the moments are kept.

Records are written as for any teleport: ``teleporter="null"``, ``accepted=True``, ``moved=False``,
``applied=True``, ``displacement_norm=0``, and ``after`` equal to ``before`` (nothing moved).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from lightning_cost.teleport.records import TeleportRecord
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem

__all__ = ["NullConfig", "NullTeleporter"]


@dataclass
class NullConfig:
    """The null teleporter has no settings (a config object keeps the registry uniform)."""


class NullTeleporter(Teleporter):
    """Never moves the weights; every attempt is accepted and applied (module docstring).

    The move is the identity symmetry (all factors 1), so ``transfer="transport"`` is allowed and the
    gradients after it are the ones before (no backward to measure them).
    """

    name = "null"
    default_transfer = "htr"
    gives_factors = True
    control = True

    def __init__(self, config: NullConfig | None = None) -> None:
        self.config = config or NullConfig()
        super().__init__(loss_tolerance=0.0, abs_tolerance=0.0)

    def move(self, problem: TeleportProblem) -> Move:
        """The identity: nothing is written; the factors are all 1."""
        return Move(factors=[torch.ones_like(p, memory_format=torch.contiguous_format) for p in problem.params])

    def teleport(self, problem: TeleportProblem, record: TeleportRecord) -> Move:
        """Accepted without an evaluation: the weights are the snapshot's bit for bit, so are the losses."""
        start = time.perf_counter()
        move = self.move(problem)
        record.losses_before = problem.target.tolist()
        record.accepted, record.moved = True, problem.snapshot.moved()
        record.losses_after, record.loss_drift = list(record.losses_before), 0.0
        record.trace = move.trace
        record.seconds = time.perf_counter() - start
        return move
