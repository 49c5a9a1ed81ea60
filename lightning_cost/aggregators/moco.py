"""MoCo: tracked task gradients and simplex weights moved by a projected gradient step toward the
min-norm combination of the tracked gradients (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen,
"Mitigating Gradient Bias in Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Alg. 1)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_cost.aggregators._common import (
    ObservedLosses,
    checkpoint_safe,
    real_hparam,
    simplex_projection,
)
from lightning_cost.aggregators.base import Aggregator, check_jacobian, gramian

__all__ = ["MoCo"]

_NORMALIZE = ("loss", "none")


class MoCo(ObservedLosses, Aggregator):
    """MoCo (Fernando et al., ICLR 2023): the direction ``Y^T lambda`` of tracked gradients ``Y``.

    At call ``t`` (from 1), with ``beta_t = beta / t^beta_sigma`` and ``gamma_t = gamma / t^gamma_sigma``::

        y_k    <- y_k - beta_t (y_k - h_k)                                  (from y_k = 0)
        lambda <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda)     (from lambda = 1/K)
        d       = Y^T lambda

    where ``h_k = g_k`` (``normalize="none"``, the paper) or ``h_k = L_k g_k / ||g_k||`` (``"loss"``,
    LibMTL's default: each gradient gets its task's loss as its length). The ``lambda`` step is a
    projected gradient step on ``1/2 lambda^T (Y Y^T + rho I) lambda``, so on a fixed ``J`` with
    ``rho = 0`` ``lambda`` approaches MGDA's min-norm weights.

    Deviations from LibMTL: the paper's Euclidean projection onto the simplex replaces LibMTL's
    softmax of the stepped ``lambda``; no ``eps`` enters ``g_k / ||g_k||``. A zero row of ``J`` (a task
    with no gradient this step; the mixin hands it in with the others) leaves ``y_k`` as it was: no
    observation, not an observation of zero (LibMTL's ``eps`` would pull ``y_k`` toward 0, and so
    ``lambda`` toward that task). The paper's projection of ``y`` onto a bounded set is omitted, as in
    LibMTL.

    Args:
        beta: ``y``'s step ``in (0, 1]`` (0.5, LibMTL's). beta_sigma: its decay exponent ``>= 0`` (0.5).
        gamma: ``lambda``'s step ``> 0`` (0.1, LibMTL's). gamma_sigma: its decay exponent ``>= 0`` (0.5).
        rho: the ``l2`` regularisation of ``lambda``'s step, ``>= 0`` (0, LibMTL's).
        normalize: ``"loss"`` or ``"none"``, as above. Only ``"loss"`` reads the task losses
            (non-negative; :meth:`observe_losses` before each call, which the mixin does).

    The state, ``Y`` (``K x P``, in ``J``'s dtype and device: as large as ``J``), ``lambda`` and the call
    count, is in the ``state_dict``; it restarts when ``J``'s shape changes. A non-finite ``J`` raises
    ``ValueError``.
    """

    def __init__(self, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1, gamma_sigma: float = 0.5,
                 rho: float = 0.0, normalize: str = "loss") -> None:
        super().__init__()
        self.beta = real_hparam("beta", beta, 0.0, 1.0, low_open=True)
        self.beta_sigma = real_hparam("beta_sigma", beta_sigma, 0.0)
        self.gamma = real_hparam("gamma", gamma, 0.0, low_open=True)
        self.gamma_sigma = real_hparam("gamma_sigma", gamma_sigma, 0.0)
        self.rho = real_hparam("rho", rho, 0.0)
        if normalize not in _NORMALIZE:
            raise ValueError(f"normalize must be one of {_NORMALIZE}, got {normalize!r}")
        self.normalize = normalize
        self.uses_losses = normalize == "loss"
        self.state: dict[str, Any] | None = None

    def aggregate(self, jacobian: Tensor) -> Tensor:
        check_jacobian(jacobian)
        j = jacobian.detach() if jacobian.dtype in (torch.float32, torch.float64) else jacobian.detach().float()
        k = j.shape[0]
        st = self.state
        if st is None or tuple(st["y"].shape) != tuple(j.shape):
            st = {"y": j.new_zeros(j.shape), "lambda": np.full(k, 1.0 / k), "steps": 0}
        else:
            st = {**st, "y": st["y"].to(device=j.device, dtype=j.dtype)}
        self.state = st
        seen = (j != 0).any(dim=1)
        if self.normalize == "loss":
            losses = self._losses_for(k).to(device=j.device, dtype=j.dtype)
            norms = torch.linalg.vector_norm(j, dim=1)
            j = j * (losses / torch.where(seen, norms, 1.0)).unsqueeze(1)
        st["steps"] += 1
        t = st["steps"]
        beta_t, gamma_t = self.beta / t**self.beta_sigma, self.gamma / t**self.gamma_sigma
        y = st["y"]
        st["y"] = y = torch.where(seen.unsqueeze(1), y - beta_t * (y - j), y)
        lam = st["lambda"]
        g = gramian(y).to(device="cpu", dtype=torch.float64).numpy()
        st["lambda"] = lam = simplex_projection(lam - gamma_t * (g @ lam + self.rho * lam))
        return (torch.as_tensor(lam, dtype=y.dtype, device=y.device) @ y).to(jacobian.dtype)

    def get_extra_state(self) -> Any:
        if self.state is None:
            return {"state": None}
        st = self.state
        return {"state": checkpoint_safe({"y": st["y"].clone(), "lambda": st["lambda"], "steps": st["steps"]})}

    def set_extra_state(self, state: Any) -> None:
        saved = state["state"]
        self.state = None if saved is None else {
            "y": saved["y"].clone(), "lambda": np.array(saved["lambda"], dtype=np.float64), "steps": int(saved["steps"])}

    def extra_repr(self) -> str:
        return (f"beta={self.beta:g}, beta_sigma={self.beta_sigma:g}, gamma={self.gamma:g}, "
                f"gamma_sigma={self.gamma_sigma:g}, rho={self.rho:g}, normalize={self.normalize!r}")
