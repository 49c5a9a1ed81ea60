"""What happens to the optimizer's state of the teleported weights after a teleport.

* ``"htr"``: historical trajectory reuse (eqs. 12-13): keep a share ``sigma = cos(dtheta, g')`` of
  Adam's moments (or SGD's momentum), applied with the first gradient after the teleport.
* ``"transport"``: for an exact symmetry ``theta' = t * theta`` the gradients become ``g / t``, so the
  state follows exactly: Adam ``m -> m / t``, ``v -> v / t^2`` (and ``amsgrad``'s maximum), SGD momentum
  ``-> buf / t``. Needs a teleporter that gives the factors ``t``.
* ``"keep"``: leave the state as it is.
* ``"reset"``: forget the state of the teleported weights; the optimizer restarts it from the next
  gradient, as for a fresh optimizer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_cost.teleport._checks import check_bool, check_choice
from lightning_cost.teleport.htr import apply_htr, htr_sigma

__all__ = ["TRANSFERS", "StateTransfer"]

TRANSFERS = ("htr", "transport", "keep", "reset")

#: optimizer state entries that scale like the gradient (power 1) or its square (power 2)
_SCALING = {"exp_avg": 1, "momentum_buffer": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2}


class StateTransfer:
    """One of :data:`TRANSFERS`; ``htr`` keeps its ``sigma`` until the next optimizer step takes it.

    Args:
        policy: the rule (module docstring).
        bias_corrected: for ``htr``, apply eq. 13 to Adam's bias-corrected moments
            (:func:`~lightning_cost.teleport.htr.apply_htr`).
    """

    def __init__(self, policy: str = "htr", bias_corrected: bool = True) -> None:
        check_choice("transfer", policy, TRANSFERS)
        check_bool("bias_corrected", bias_corrected)
        self.policy, self.bias_corrected = policy, bias_corrected
        self.pending_sigma: float | None = None

    def after_teleport(self, optimizer: Any, params: Sequence[nn.Parameter], displacement: Tensor,
                       last_gradient: Tensor | None, factors: Sequence[Tensor] | None) -> float | None:
        """Apply the policy right after an accepted move; returns ``sigma`` for ``htr``."""
        if self.policy == "htr":
            sigma = htr_sigma(displacement, last_gradient) if last_gradient is not None else 0.0
            self.pending_sigma = sigma
            return sigma
        if self.policy == "transport":
            if factors is None:
                raise ValueError("transfer='transport' needs a teleporter that gives its symmetry factors "
                                 "(teleporter='rescale')")
            transport_state(optimizer, params, factors)
        elif self.policy == "reset":
            for p in params:
                optimizer.state.pop(p, None)
        return None

    def before_step(self, optimizer: Any, params: Sequence[nn.Parameter]) -> None:
        """Called before every optimizer step that is taken: applies a pending ``htr``."""
        if self.pending_sigma is None:
            return
        apply_htr(optimizer, params, self.pending_sigma, bias_corrected=self.bias_corrected)  # warns otherwise
        self.pending_sigma = None


@torch.no_grad()
def transport_state(optimizer: Any, params: Sequence[nn.Parameter], factors: Sequence[Tensor]) -> None:
    """Divide each gradient-like state entry by ``t`` (its square-like entries by ``t^2``)."""
    unknown = set()
    for p, t in zip(params, factors, strict=True):
        for key, value in optimizer.state.get(p, {}).items():
            if key in _SCALING and torch.is_tensor(value) and value.shape == p.shape:
                value.div_(t.to(value.dtype) ** _SCALING[key])
            elif key != "step":
                unknown.add(key)
    if unknown:
        rank_zero_warn(f"transfer='transport' left optimizer state entries {sorted(unknown)} of "
                       f"{type(optimizer).__name__} unchanged (unknown how they scale)")
