"""From per-task gradients to the update the optimizer receives: checks, aggregation, the surrogate.

The multi-task core hands its update to Lightning through a *linear surrogate*
``S = sum_p <p, G_p>`` (``G_p`` detached) returned from ``training_step``: its gradient is exactly
``G_p``, so Lightning's own backward places the update in ``.grad``. Gradient accumulation divides
it by the number of micro-batches, fp16 loss scaling scales and unscales it, DDP's reducer averages
it over ranks (shared directions are identical on every rank, so they are unchanged), and no
``.grad`` is written by hand, so DDP ranks cannot drift apart. The surrogate's backward costs a few
element-wise ops, not a pass through the network.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from lightning_cost.aggregators import Aggregator, GramianAggregator
from lightning_cost.aggregators import gramian as compute_gramian

__all__ = ["aggregate_nonzero_rows", "combine", "jacobian_finiteness", "linear_surrogate", "row_statistic"]

log = logging.getLogger(__name__)


def row_statistic(jacobian: Tensor, method: object) -> tuple[Tensor, Tensor | None]:
    """One per-row statistic of ``J`` for the finiteness and zero-row checks, and the Gramian.

    Where the method reads ``J J^T`` anyway (a :class:`GramianAggregator`) the statistic is the
    Gramian's diagonal ``||g_i||^2`` (and the Gramian is returned for the method and the trigger);
    otherwise it is ``max_k |g_ik|`` from one pass, and no Gramian is formed.
    """
    if isinstance(method, GramianAggregator):
        gramian = compute_gramian(jacobian)
        return gramian.diagonal(), gramian
    # max |g_ik| as max(amax, -amin): several times faster than vector_norm(ord=inf) or abs().amax()
    # on CPU, and NaN/inf propagate through both
    return torch.maximum(jacobian.amax(dim=1), jacobian.amin(dim=1).neg()), None


def jacobian_finiteness(jacobian: Tensor, row_stat: Tensor) -> tuple[bool, bool]:
    """``(J is finite, its squares overflowed)`` from the per-row statistic (``||g_i||^2`` or
    ``max_k |g_ik|``).

    A NaN or infinity in row ``i`` makes either statistic NaN or infinite, so a finite one proves a
    finite ``J``; only a non-finite one (rare) costs a pass over ``J``. A finite ``J`` with a
    non-finite ``||g_i||^2`` has gradients too large for their Gramian (diverged training).
    """
    if bool(torch.isfinite(row_stat).all()):
        return True, False
    finite = bool(torch.isfinite(jacobian).all())
    return finite, finite


def aggregate_nonzero_rows(method: Aggregator, jacobian: Tensor, row_stat: Tensor, gramian: Tensor | None = None,
                           task_names: Sequence[str] | None = None) -> Tensor:
    """Aggregate, leaving out tasks whose shared gradient is exactly zero (they have no direction).

    ``row_stat`` is per row either ``||g_i||^2`` (the diagonal of ``gramian``, passed on to a
    Gramian aggregator) or ``max_k |g_ik|``: zero exactly for a zero row, except that squares
    can underflow, so a zero ``||g_i||^2`` is confirmed by reading that row only. No row left:
    a zero direction; one row left: that task's gradient, whatever the method. A method that
    ``uses_losses`` (per-task state aligned with the observed losses) gets every row, zero ones
    included, while any row is non-zero.
    """
    zero = (row_stat == 0).tolist()
    nonzero = [not z or (gramian is not None and bool(jacobian[i].abs().amax() > 0)) for i, z in enumerate(zero)]
    n = sum(nonzero)
    if n == jacobian.shape[0] or (n > 0 and method.uses_losses):
        return method.aggregate(jacobian) if gramian is None else cast(GramianAggregator, method).aggregate(jacobian, gramian)
    if n == 0:
        return torch.zeros_like(jacobian[0])
    names = list(task_names) if task_names is not None else list(range(len(nonzero)))
    zero_tasks = [t for t, nz in zip(names, nonzero, strict=True) if not nz]
    log.debug("lightning_cost: tasks %s have a zero shared gradient this step; aggregating the rest", zero_tasks)
    keep = torch.tensor([i for i, nz in enumerate(nonzero) if nz], device=jacobian.device)
    if n == 1:
        return jacobian[keep[0]].clone()
    sub = jacobian.index_select(0, keep)
    if gramian is None:
        return method.aggregate(sub)
    return cast(GramianAggregator, method).aggregate(sub, gramian.index_select(0, keep).index_select(1, keep))


def combine(grads: Tensor | None, coeffs: Tensor, scale: float) -> Tensor | None:
    """``sum_k c_k g_k / scale`` from the ``[K, *shape]`` per-task gradients (``None``: no task reaches it)."""
    if grads is None:
        return None
    total = torch.tensordot(coeffs.to(grads.dtype), grads, dims=1)
    return total / scale if scale != 1.0 else total


def linear_surrogate(
    shared: Sequence[Tensor],
    direction: Tensor,
    others: Sequence[Tensor],
    other_grads: Sequence[Tensor | None] | None,
) -> Tensor:
    """``S = sum_p <p, G_p>`` with ``G`` detached: ``dS/dp = G_p`` exactly.

    ``shared`` take consecutive slices of ``direction``; ``other_grads=None`` gives zeros for every
    other parameter (a skipped step). Parameters that no task reaches (``None``) are left out, as an
    ordinary backward would leave them.
    """
    with torch.autocast(device_type=direction.device.type, enabled=False):
        terms = []
        offset = 0
        for p in shared:
            n = p.numel()
            terms.append(torch.dot(p.float().reshape(-1), direction[offset : offset + n].detach().float()))
            offset += n
        for j, p in enumerate(others):
            g = torch.zeros_like(p) if other_grads is None else other_grads[j]
            if g is not None:
                terms.append(torch.dot(p.float().reshape(-1), g.detach().float().reshape(-1)))
        return torch.stack(terms).sum()
