"""DB-MTL: the gradients of the log-losses, smoothed by an EMA and each rescaled to the largest
smoothed norm (Lin, Jiang, Ye, Zhang, Chen, Chen, Liu, Tsang & Kwok, "Dual-Balancing for
Multi-Task Learning", 2023, arXiv:2308.12029, Sec. 3 and Algorithm 1)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_cost.aggregators._common import ObservedLosses, real_hparam
from lightning_cost.aggregators.base import Aggregator, check_jacobian

__all__ = ["DBMTL"]

_EPS = 1e-8  # LibMTL's log(L + 1e-8): the log-loss gradient is g / (L + 1e-8)


class DBMTL(ObservedLosses, Aggregator):
    """Dual-Balancing MTL (Lin et al., 2023): loss-scale and gradient-magnitude balancing.

    Loss scales: each task trains on ``log L_k``, whose gradient is ``h_k = g_k / (L_k + 1e-8)``.
    Gradient magnitudes: at call ``t`` (from 1) with ``beta_t = beta / t^beta_sigma``, the running
    estimates ``m_k <- beta_t m_k + (1 - beta_t) h_k`` (from ``m_k = 0``) are each rescaled to the
    largest norm and summed::

        d = sum_k (max_j ||m_j|| / ||m_k||) m_k.

    ``m`` reads every entry of ``J``, so this is a Jacobian method.

    Deviations from LibMTL: a task whose ``m_k`` is exactly zero contributes nothing (LibMTL divides
    by ``||m_k|| + 1e-8``; here no ``eps`` enters the rescaling). A zero row of ``J`` (a task with no
    gradient this step; the mixin hands it in with the others) leaves that task's ``m_k`` as it was:
    no observation, not an observation of zero. The multi-task core gives the task-specific
    parameters (the heads) each task's gradient of ``L_k``, where LibMTL gives them that of
    ``log L_k``: only the shared direction is the method's.

    Args:
        beta: the EMA's rate ``in [0, 1)`` (0.9, the paper's and LibMTL's).
        beta_sigma: the decay exponent of ``beta_t``, ``>= 0`` (0: a constant rate, LibMTL's default).

    Needs the task losses (non-negative; :meth:`observe_losses` before each call, which the mixin
    does). The state, ``m`` (``K x P``, in ``J``'s dtype and device: as large as ``J``) and the call
    count, is in the ``state_dict``; it restarts when ``J``'s shape changes. A non-finite ``J`` raises
    ``ValueError``.
    """

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0) -> None:
        super().__init__()
        self.beta = real_hparam("beta", beta, 0.0, 1.0, high_open=True)
        self.beta_sigma = real_hparam("beta_sigma", beta_sigma, 0.0)
        self.state: dict[str, Any] | None = None

    def aggregate(self, jacobian: Tensor) -> Tensor:
        check_jacobian(jacobian)
        j = jacobian if jacobian.dtype in (torch.float32, torch.float64) else jacobian.float()
        losses = self._losses_for(j.shape[0])
        st = self.state
        if st is None or tuple(st["ema"].shape) != tuple(j.shape):
            st = {"ema": j.new_zeros(j.shape), "steps": 0}
        else:
            st = {"ema": st["ema"].to(device=j.device, dtype=j.dtype), "steps": st["steps"]}
        self.state = st
        st["steps"] += 1
        beta_t = self.beta / st["steps"] ** self.beta_sigma
        seen = (j != 0).any(dim=1)
        log_grads = j.detach() / (losses + _EPS).to(device=j.device, dtype=j.dtype).unsqueeze(1)
        ema = st["ema"]
        updated = beta_t * ema + (1.0 - beta_t) * log_grads
        st["ema"] = ema = torch.where(seen.unsqueeze(1), updated, ema)
        norms = torch.linalg.vector_norm(ema, dim=1)
        scale = torch.where(norms > 0, norms.max() / torch.where(norms > 0, norms, 1.0), 0.0)
        return (scale @ ema).to(jacobian.dtype)

    def get_extra_state(self) -> Any:
        if self.state is None:
            return {"state": None}
        return {"state": {"ema": self.state["ema"].clone(), "steps": self.state["steps"]}}

    def set_extra_state(self, state: Any) -> None:
        saved = state["state"]
        self.state = None if saved is None else {"ema": saved["ema"].clone(), "steps": int(saved["steps"])}

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, beta_sigma={self.beta_sigma:g}"
