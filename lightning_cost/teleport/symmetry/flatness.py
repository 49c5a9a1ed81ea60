"""The flatness objective of the exact rescaling: the Hessian trace of the mean task loss at the new point.

Zhao, Gower, Walters & Yu (ICLR 2024, "Improving Convergence and Generalization Using Parameter
Symmetries", Sec. 5) teleport along a symmetry to minima of another curvature and find it changes
generalisation. For a rescaling ``theta' = T theta`` (``T`` diagonal, constant) that leaves the loss
unchanged everywhere, differentiating ``L(theta) = L(T theta)`` twice gives ``H' = T^-1 H T^-1``, so
``tr H' = sum_j H_jj / t_j^2``: one estimate of the diagonal of ``H`` where the weights are now (Hutchinson's,
``E[z * (H z)]`` over Rademacher ``z``) prices every candidate scaling without another backward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from lightning_cost.distributed import all_reduce_mean
from lightning_cost.teleport.symmetry.groups import RescaleSymmetry

__all__ = ["ScaledHessianTrace", "hessian_diagonal"]


def hessian_diagonal(loss_fn: Callable[[], Tensor], params: Sequence[Tensor], probes: int,
                     generator: torch.Generator) -> list[Tensor]:
    """Hutchinson's estimate of ``diag H`` of ``loss_fn()`` per parameter: the mean of ``z * (H z)``
    over ``probes`` Rademacher vectors drawn from ``generator`` (one Hessian-vector product each),
    averaged over ranks (each rank's loss is its share of the global mean)."""
    with torch.enable_grad():
        grads = torch.autograd.grad(loss_fn(), list(params), create_graph=True)
        acc = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for i in range(probes):
            zs = [(torch.randint(0, 2, p.shape, generator=generator, dtype=torch.float32) * 2 - 1).to(p)
                  for p in params]
            hz = torch.autograd.grad(grads, list(params), zs, retain_graph=i < probes - 1)
            for a, z, h in zip(acc, zs, hz, strict=True):
                a.add_(z.float() * h.float())
    return [all_reduce_mean(a / probes) for a in acc]


class ScaledHessianTrace:
    """``tr H'(s) = sum_j H_jj exp(-2 log t_j(s))`` for a :class:`RescaleSymmetry`, differentiable in ``s``.

    The diagonal is summed once over the axes each parameter's factor does not vary along (for a Linear
    layer whose rows and columns both scale, nothing is summed), so an evaluation costs one weighted sum
    the size of those cells.
    """

    def __init__(self, symmetry: RescaleSymmetry, diagonal: Sequence[Tensor]) -> None:
        self.symmetry = symmetry
        zero = diagonal[0].new_zeros(symmetry.num_scales)
        self.fixed = diagonal[0].new_zeros((), dtype=torch.float64)
        self.cells: list[Tensor | None] = []
        for h, lf in zip(diagonal, symmetry.log_factors(zero), strict=True):
            if lf is None:
                self.fixed = self.fixed + h.double().sum()
                self.cells.append(None)
                continue
            aligned = (1,) * (h.ndim - lf.ndim) + tuple(lf.shape)
            summed = [d for d in range(h.ndim) if aligned[d] == 1 and h.shape[d] > 1]
            cell = h.double().sum(dim=summed, keepdim=True) if summed else h.double()
            self.cells.append(cell.reshape(aligned))

    def __call__(self, log_scales: Tensor) -> Tensor:
        """The trace (float64) at the point rescaled by ``exp(log_scales)``."""
        total = self.fixed
        for cell, lf in zip(self.cells, self.symmetry.log_factors(log_scales), strict=True):
            if cell is not None:
                assert lf is not None  # a parameter with a cell is one the rescaling touches
                total = total + (cell * torch.exp(-2.0 * lf.double().reshape(cell.shape))).sum()
        return total
