"""What happens to the optimizer's state of the teleported weights after a teleport.

* ``"htr"``: historical trajectory reuse (eqs. 12-13): keep a share ``sigma = cos(dtheta, g')`` of
  Adam's moments (or SGD's momentum), applied with the first gradient after the teleport.
* ``"transport"``: for an exact symmetry ``theta' = t * theta`` the gradients become ``g / t``, so the
  state follows exactly: Adam ``m -> m / t``, ``v -> v / t^2`` (and ``amsgrad``'s maximum), SGD momentum
  ``-> buf / t``. Needs a teleporter that gives the factors ``t``.
* ``"keep"``: leave the state as it is.
* ``"reset"``: forget the state of the teleported weights; the optimizer restarts it from the next
  gradient, as for a fresh optimizer.
* ``"reset_step"``: restart only the step count (Adam's bias-correction counter, ``state["step"]``) of
  the teleported weights at 0 and keep the moments: the next step divides the kept moments by
  ``1 - b1`` and ``1 - b2`` (so it is about ``sqrt(1 - b2) / (1 - b1)`` times larger, ~3.2x for
  ``(0.9, 0.999)``). A control that separates what ``"reset"`` does through the bias correction from
  what it does by forgetting the moments. An optimizer that keeps no step count cannot be asked for it:
  SGD is refused when training starts (use ``"keep"``: it would be the same); for any other optimizer
  without ``step`` entries the state is left unchanged, with a warning once.

* ``"restart_if_opposed"``: the state rule of the authors' public code: when ``cos(dtheta, g') <= 0`` the
  optimizer starts afresh (the state of *every* parameter it holds is forgotten, heads included, as a new
  Adam would), otherwise the state is kept as it is. The learning rate and any scheduler are left alone:
  only the optimizer's state is the transfer's to change. Under the ``"null"`` teleporter ``dtheta = 0``, so
  ``cos`` is 0 and its control restarts the optimizer at every accepted step.

Under the ``"null"`` teleporter (no move) each policy acts as written here with ``dtheta = 0``; ``htr``'s
``sigma`` is then 0 (:mod:`lightning_cost.teleport.null`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from lightning_cost.teleport._checks import check_bool, check_choice
from lightning_cost.teleport.htr import apply_htr, htr_sigma

__all__ = ["TRANSFERS", "StateTransfer", "reset_step_count", "transport_state"]

TRANSFERS = ("htr", "transport", "keep", "reset", "reset_step", "restart_if_opposed")

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
        self._warned_no_step = False

    @property
    def reads_last_gradient(self) -> bool:
        """Whether the policy decides on eq. 12's ``g'`` (HTR's share, the authors' restart rule): the
        callers pass the step's gradient only then."""
        return self.policy in ("htr", "restart_if_opposed")

    def check_optimizer(self, optimizer: Any) -> None:
        """Refuse, before training, a policy the optimizer cannot follow (``reset_step`` with SGD)."""
        if self.policy == "reset_step" and isinstance(optimizer, torch.optim.SGD):
            raise ValueError("transfer='reset_step' restarts the bias-correction step count of Adam-like "
                             "optimizers; SGD keeps none, so it would change nothing (use transfer='keep')")

    def after_teleport(self, optimizer: Any, params: Sequence[nn.Parameter], displacement: Tensor,
                       last_gradient: Tensor | None, factors: Sequence[Tensor] | None) -> float | None:
        """Apply the policy right after an accepted move; returns ``sigma`` for ``htr`` and
        ``restart_if_opposed`` (the cosine it decided on)."""
        if self.reads_last_gradient:
            sigma = htr_sigma(displacement, last_gradient) if last_gradient is not None else 0.0
            if self.policy == "htr":
                self.pending_sigma = sigma
            elif sigma <= 0:
                optimizer.state.clear()
            return sigma
        if self.policy == "transport":
            if factors is None:
                raise ValueError("transfer='transport' needs a teleporter that gives its symmetry factors "
                                 "(teleporter='rescale')")
            transport_state(optimizer, params, factors)
        elif self.policy == "reset":
            for p in params:
                optimizer.state.pop(p, None)
        elif self.policy == "reset_step" and not reset_step_count(optimizer, params) and not self._warned_no_step:
            self._warned_no_step = True
            rank_zero_warn(f"transfer='reset_step': {type(optimizer).__name__} keeps no step count for the "
                           "teleported weights; their state is left unchanged")
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


@torch.no_grad()
def reset_step_count(optimizer: Any, params: Sequence[nn.Parameter]) -> bool:
    """Set ``state["step"]`` of each of ``params`` that has one to 0 (in place: dtype and device kept).

    Returns whether any parameter had a step count, or none has state yet (nothing to reset then).
    """
    states = [optimizer.state[p] for p in params if optimizer.state.get(p)]
    found = False
    for state in states:
        if "step" in state:
            found = True
            if torch.is_tensor(state["step"]):
                state["step"].zero_()
            else:
                state["step"] = 0
    return found or not states
