"""GradDrop: gradient sign dropout (Chen et al., 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_cost.aggregators._common import SeededDraws
from lightning_cost.aggregators.base import Aggregator, check_jacobian, check_jacobian_shape

__all__ = ["GradDrop"]


class GradDrop(SeededDraws, Aggregator):
    """Gradient Sign Dropout (Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov,
    NeurIPS 2020, "Just Pick a Sign", Sec. 3, eq. (1) and Algorithm 1).

    Per coordinate ``p`` of the shared parameters, with ``g_ip`` the gradient of task ``i``:

    * positive sign purity ``P_p = 0.5 * (1 + sum_i g_ip / sum_i |g_ip|)`` (eq. 1);
    * ``U_p ~ Uniform[0, 1)``; keep the positive entries if ``P_p > U_p``, else the
      negative ones: ``M_ip = 1[P_p > U_p] 1[g_ip > 0] + 1[P_p <= U_p] 1[g_ip < 0]``
      (the paper writes ``P_p < U_p``; the tie, of probability zero, goes to the
      negative side so that a purely negative coordinate is never dropped);
    * ``d_p = sum_i (l_i + (1 - l_i) M_ip) g_ip`` with the leak ``l_i``.

    The paper applies GradDrop to the gradients of a shared *activation* layer (summed
    over the batch) and back-propagates the masked signal into the trunk. This is the
    parameter-space variant most libraries implement: the mask acts per coordinate of
    the ``K x P`` shared-parameter Jacobian. The optional transformation of ``P`` from
    the paper is not offered (identity, the paper's default).

    Args:
        leak: ``l_i`` in ``[0, 1]``, one float for all tasks or one per task (paper
            default ``0.0``: pure GradDrop; ``1.0`` recovers the plain sum of gradients).
        seed: seed of the CPU ``torch.Generator`` that draws ``U`` (``P`` float32 draws per
            call, then moved to the Jacobian's device). Give every DDP rank the same seed
            so that all ranks drop the same signs. ``None`` seeds it from ``torch.initial_seed()``.
            The generator state is saved in the module's ``state_dict`` (extra state).

    Degenerate input: no task-gradient norm is divided by. A coordinate where every task
    gradient is zero has ``sum_i |g_ip| = 0``; its purity is set to ``0.5`` and its output
    is ``0``. Where all non-zero entries of a coordinate share one sign, ``P_p`` is 0 or 1
    and the output is the plain sum, whatever ``U`` is.
    """

    def __init__(self, leak: float | Sequence[float] = 0.0, seed: int | None = None) -> None:
        super().__init__()
        leaks = [float(leak)] if isinstance(leak, (int, float)) else [float(x) for x in leak]
        if not leaks or not all(0.0 <= x <= 1.0 for x in leaks):
            raise ValueError(f"leak must be in [0, 1] (a float or one per task), got {leak!r}")
        self.leak = leak
        self._leaks = leaks
        self._seed(seed)

    def _leak_vector(self, k: int, like: Tensor) -> Tensor:
        if len(self._leaks) == 1:
            return torch.full((k,), self._leaks[0], dtype=like.dtype, device=like.device)
        if len(self._leaks) != k:
            raise ValueError(
                f"GradDrop was given {len(self._leaks)} leak values but the Jacobian has K={k} tasks"
            )
        return torch.tensor(self._leaks, dtype=like.dtype, device=like.device)

    def aggregate(self, jacobian: Tensor) -> Tensor:
        check_jacobian_shape(jacobian)
        k, p = jacobian.shape
        work = jacobian.to(torch.promote_types(jacobian.dtype, torch.float32))
        leak = self._leak_vector(k, work).unsqueeze(1)
        scratch = work.abs()  # the one K x P temporary, reused below (fresh ones cost page faults)
        abs_total = scratch.sum(dim=0)
        # A NaN or infinite entry makes its column's sum of |g_ip| non-finite: J is finite whenever
        # abs_total is, and only then is J itself scanned (to name the rows, or to find that the
        # sum merely overflowed).
        if not bool(torch.isfinite(abs_total).all()):
            check_jacobian(jacobian)
        total = work.sum(dim=0)
        # An all-zero column has total = 0 and is divided by 1: 0.5 * (1 + 0 / 1) is exactly the 0.5
        # the docstring sets for it, so no second where() (nor P-sized ones/full tensors) is needed.
        safe = torch.where(abs_total > 0, abs_total, 1.0)
        purity = (total / safe).add_(1.0).mul_(0.5)
        u = torch.rand(p, generator=self.generator, dtype=torch.float32).to(
            device=work.device, dtype=work.dtype
        )
        keep_positive = purity > u  # ties (P == U, e.g. P = U = 0) keep the negative side
        if all(x == 0.0 for x in self._leaks):
            # No leak: M_ip g_ip is g_ip^+ = max(g_ip, 0) where the positive side is kept and
            # g_ip^- = min(g_ip, 0) elsewhere, so d_p = sum_i g_ip^+ or sum_i g_ip^- (the same sums,
            # in the same order, as sum_i M_ip g_ip; dropped entries add a zero either way).
            pos = torch.clamp_min(work, 0.0, out=scratch).sum(dim=0)
            neg = torch.clamp_max(work, 0.0, out=scratch).sum(dim=0)
            d = torch.where(keep_positive, pos, neg)
        else:
            keep_positive = keep_positive.unsqueeze(0)
            mask = (keep_positive & (work > 0)) | (~keep_positive & (work < 0))
            d = ((leak + (1.0 - leak) * mask.to(work.dtype)) * work).sum(dim=0)
        return d.to(jacobian.dtype)

    def extra_repr(self) -> str:
        return f"leak={self.leak!r}, seed={self.seed}"
