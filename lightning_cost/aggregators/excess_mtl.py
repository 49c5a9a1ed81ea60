"""ExcessMTL: task weights raised by exponentiated gradient steps on each task's estimated excess risk
(He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with Excess Risks",
ICML 2024, Eqs. (6)-(7) for the estimate, Eq. (9) for the update)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_cost.aggregators._common import int_hparam, real_hparam
from lightning_cost.aggregators.base import Aggregator, check_jacobian

__all__ = ["ExcessMTL"]

_EPS = 1e-7  # the authors' (and TorchJD's) guard in the square root and the baseline's division


class ExcessMTL(Aggregator):
    """Excess-risk weighting (He et al., ICML 2024): a task far from its own optimum gets more weight.

    Weighting by the losses themselves favours tasks with large irreducible noise (label noise);
    the excess risk ``L_i - L_i^*`` does not. It is estimated from the second-order expansion
    ``E_i = 1/2 g_i^T H_i^{-1} g_i`` with AdaGrad's diagonal Hessian ``H_i = sqrt(S_i)``, ``S_i`` the
    sum of the squared gradients of task ``i`` over all steps so far (this one included)::

        E_i = sum_p g_ip^2 / sqrt(S_ip + 1e-7),   w <- softmax(log w + robust_step_size * E / E_0),

    from ``w = 1/K``, with ``d = J^T w``. ``E_0`` is each task's first estimate (dividing by it puts
    the tasks on one scale; as in the authors' code and TorchJD, the first update uses the raw
    ``E``), or, with ``n_warmup_steps = n > 0``, the mean estimate over the first ``n`` calls, which
    keep ``w = 1/K``. The weights stay on the simplex. ``E`` reads every entry of ``J`` (not only
    ``G``), so this is a Jacobian method.

    Args:
        robust_step_size: the exponentiated step's size ``eta_alpha``, ``> 0`` (1, the authors').
        n_warmup_steps: calls that only collect ``E_0``, an int ``>= 0`` (0; the paper's Appendix C.1
            suggests 3 epochs).

    The state, ``S`` (``K x P``, in ``J``'s dtype and on its device: as large as ``J``), the weights,
    ``E_0``, the warm-up sum and the call count, is in the ``state_dict``; it follows ``J``'s device and
    dtype and restarts from ``w = 1/K`` (and a new warm-up) when ``J``'s shape changes. A non-finite
    ``J`` raises ``ValueError``.
    """

    def __init__(self, robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> None:
        super().__init__()
        self.robust_step_size = real_hparam("robust_step_size", robust_step_size, 0.0, low_open=True)
        self.n_warmup_steps = int_hparam("n_warmup_steps", n_warmup_steps, 0)
        self.state: dict[str, Any] | None = None

    def aggregate(self, jacobian: Tensor) -> Tensor:
        check_jacobian(jacobian)
        j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
        st = self._state_for(j)
        sq = j.detach() ** 2
        st["sq_sum"].add_(sq)
        excess = (sq / torch.sqrt(st["sq_sum"] + _EPS)).sum(dim=1)
        st["steps"] += 1
        if st["steps"] <= self.n_warmup_steps:  # warm-up: collect E_0, keep w = 1/K
            st["warmup_sum"].add_(excess)
            return (st["weights"] @ j).to(jacobian.dtype)
        if st["baseline"] is None:
            baseline = st["warmup_sum"] / self.n_warmup_steps if self.n_warmup_steps else excess
            st["baseline"] = baseline
            if self.n_warmup_steps:
                excess = excess / (baseline + _EPS)
        else:
            excess = excess / (st["baseline"] + _EPS)
        # in log space: a huge E (a task whose E_0 was 0) saturates the weights instead of overflowing
        st["weights"] = torch.softmax(torch.log(st["weights"]) + self.robust_step_size * excess, dim=0)
        return (st["weights"] @ j).to(jacobian.dtype)

    def _state_for(self, j: Tensor) -> dict[str, Any]:
        """The state for this ``J``: moved to its device and dtype, or fresh for a new shape."""
        st = self.state
        if st is None or tuple(st["sq_sum"].shape) != tuple(j.shape):
            k = j.shape[0]
            st = {"sq_sum": j.new_zeros(j.shape), "weights": j.new_full((k,), 1.0 / k), "baseline": None,
                  "warmup_sum": j.new_zeros(k), "steps": 0}
        else:
            st = {key: v.to(device=j.device, dtype=j.dtype) if isinstance(v, Tensor) else v for key, v in st.items()}
        self.state = st
        return st

    def get_extra_state(self) -> Any:
        if self.state is None:
            return {"state": None}
        return {"state": {key: v.clone() if isinstance(v, Tensor) else v for key, v in self.state.items()}}

    def set_extra_state(self, state: Any) -> None:
        saved = state["state"]
        self.state = None if saved is None else {key: v.clone() if isinstance(v, Tensor) else v for key, v in saved.items()}

    def extra_repr(self) -> str:
        return f"robust_step_size={self.robust_step_size:g}, n_warmup_steps={self.n_warmup_steps}"
