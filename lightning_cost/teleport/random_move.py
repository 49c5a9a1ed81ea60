"""A control teleporter: move the shared weights along a random direction of a given relative size.

Through the callback it is a move (no loss preserved, no gradient sought), a dropped step and the
chosen state transfer at the teleport's steps: set ``relative_size`` to a real teleporter's measured
``displacement_rel`` to ask whether any move of that size does what the teleport does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, cast

import torch
from torch import Tensor

from lightning_cost.teleport._checks import check_float, check_tolerance
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem

__all__ = ["RandomMove", "RandomMoveConfig"]


@dataclass
class RandomMoveConfig:
    """Settings of the random move.

    Args:
        relative_size: ``||dtheta|| / ||theta||`` over the teleported weights (``> 0``).
        loss_tolerance, abs_tolerance: acceptance test; ``inf`` (the default): none, so every finite
            move is kept. ``loss_tolerance="auto"``: the rule of the exact teleporters
            (:meth:`~lightning_cost.teleport.teleporter.Teleporter.resolved_loss_tolerance`).
    """

    relative_size: float = 3e-3
    loss_tolerance: float | Literal["auto"] = float("inf")
    abs_tolerance: float = float("inf")

    def __post_init__(self) -> None:
        check_float("relative_size", self.relative_size, positive=True)
        check_tolerance("loss_tolerance", self.loss_tolerance, allow_inf=True)
        check_float("abs_tolerance", self.abs_tolerance, minimum=0.0, allow_inf=True)


class RandomMove(Teleporter):
    """Moves the teleported weights along a Gaussian direction drawn from the callback's generator."""

    name = "random_move"
    default_transfer = "htr"

    def __init__(self, config: RandomMoveConfig | None = None) -> None:
        self.config = config or RandomMoveConfig()
        super().__init__(self.config.loss_tolerance, self.config.abs_tolerance)

    @torch.no_grad()
    def move(self, problem: TeleportProblem) -> Move:
        noise = [torch.randn(p.shape, generator=problem.generator, dtype=torch.float64) for p in problem.params]
        theta = torch.sqrt(cast(Tensor, sum((p.double() ** 2).sum() for p in problem.params)))
        scale = self.config.relative_size * theta / torch.sqrt(cast(Tensor, sum((n**2).sum() for n in noise)))
        for p, n in zip(problem.params, noise, strict=True):
            p.add_((n * scale).to(device=p.device, dtype=p.dtype))
        return Move()
