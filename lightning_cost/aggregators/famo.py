"""Fast Adaptive Multitask Optimization (FAMO), Liu et al. 2023.

B. Liu, Y. Feng, P. Stone, Q. Liu, "FAMO: Fast Adaptive Multitask Optimization",
NeurIPS 2023 (arXiv:2306.03792; ref. [17] of the COST paper), Sec. 3 and
Algorithm 1. With logits ``xi`` and ``z = softmax(xi)``, the model is trained on

    objective = sum_k z_k log(L_k - L*_k + eps) / c,   c = sum_k z_k / (L_k - L*_k + eps)  (c detached),

whose gradient is ``sum_k w_k g_k`` with ``w_k = z_k / (c (L_k - L*_k + eps))``,
``sum_k w_k = 1``. After the model step the logits follow the observed decrease
of the log losses ``delta_k = log(L_k^before - L*_k + eps) - log(L_k^after - L*_k + eps)``:

    xi <- xi - beta * ( (d z / d xi)^T delta + gamma * xi ),   d z / d xi = diag(z) - z z^T,

i.e. tasks whose log loss decreased more than the ``z``-weighted average lose weight.
Defaults: ``beta = 0.025``, ``gamma = 1e-3`` (the paper tunes ``gamma`` per data
set; the authors' code defaults to ``0.01``), ``L*_k = 0``, ``eps = 1e-8``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor

from lightning_cost.aggregators._common import ensure_task_buffers, size_task_buffers_for
from lightning_cost.aggregators.base import LossWeighting, check_losses

__all__ = ["FAMO"]

_TASK_BUFFERS = ("xi", "min_losses", "prev_losses", "exp_avg", "exp_avg_sq")


class FAMO(LossWeighting):
    r"""FAMO: balanced decrease of the log losses with ``O(1)`` extra cost per step.

    **Update timing.** Algorithm 1 (and the authors' code) compares the losses of
    the *same batch* before and after the model step, which costs one extra
    forward pass per step. By default (``update_on_observe=True``) this module
    instead uses the losses the training core passes to :meth:`observe` once per
    optimizer step: ``delta`` is the decrease between two *consecutive* observed
    steps (two different batches), so the logits lag one step and ``delta`` is
    noisier, but no forward pass is added. Under DDP the observed losses are the
    global averages, so every rank keeps identical logits. For the paper's exact
    scheme, set ``update_on_observe=False`` and call
    :meth:`update(losses_before, losses_after) <update>` yourself after
    re-evaluating the batch.

    **Logit optimizer.** ``logit_optimizer="sgd"`` is Algorithm 1's plain step
    ``xi <- xi - beta (grad + gamma xi)``. The authors' public code instead runs
    Adam (``lr=beta``, L2 ``weight_decay=gamma``, betas (0.9, 0.999)) on the
    logits; ``logit_optimizer="adam"`` reproduces that, with its moments kept
    in buffers. (Their code also clips the model gradient to norm 1; that is
    the trainer's ``gradient_clip_val``, not part of this module.)

    All state (``xi``, the previous losses, Adam moments) lives in buffers and is
    checkpointed.

    Args:
        num_tasks: ``K``; when ``None`` it is taken from ``min_losses`` or from the
            first losses seen.
        beta: step size of the logits (paper: 0.025).
        gamma: decay of the logits (paper: 1e-3).
        min_losses: lower bounds ``L*_k`` of the losses (default 0).
        eps: added inside the logarithms (default 1e-8).
        logit_optimizer: ``"sgd"`` (Algorithm 1) or ``"adam"`` (authors' code).
        update_on_observe: update the logits in :meth:`observe` from consecutive
            steps (see above).
    """

    xi: Tensor
    min_losses: Tensor
    prev_losses: Tensor
    has_prev: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    num_updates: Tensor

    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8

    def __init__(
        self,
        num_tasks: int | None = None,
        beta: float = 0.025,
        gamma: float = 1e-3,
        min_losses: Sequence[float] | Tensor | None = None,
        eps: float = 1e-8,
        logit_optimizer: Literal["sgd", "adam"] = "sgd",
        update_on_observe: bool = True,
    ) -> None:
        super().__init__()
        if not beta > 0:
            raise ValueError(f"beta (the logits' step size) must be positive, got {beta}")
        if not gamma >= 0:
            raise ValueError(f"gamma (the logits' decay) must be non-negative, got {gamma}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps}")
        if logit_optimizer not in ("sgd", "adam"):
            raise ValueError(f"logit_optimizer must be 'sgd' or 'adam', got {logit_optimizer!r}")
        self.beta, self.gamma, self.eps = float(beta), float(gamma), float(eps)
        self.logit_optimizer = logit_optimizer
        self.update_on_observe = bool(update_on_observe)
        for name in _TASK_BUFFERS:
            self.register_buffer(name, torch.zeros(0))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        if min_losses is not None:
            m = torch.as_tensor(min_losses, dtype=torch.get_default_dtype()).detach().clone()
            if m.ndim != 1 or m.numel() < 2 or not torch.isfinite(m).all():
                raise ValueError(f"min_losses must be K >= 2 finite numbers, got {m.tolist()}")
            if num_tasks is not None and num_tasks != m.numel():
                raise ValueError(f"num_tasks={num_tasks} but min_losses has {m.numel()} entries")
            self._ensure(m.numel())
            self.min_losses.copy_(m)
        elif num_tasks is not None:
            if not isinstance(num_tasks, int) or num_tasks < 2:
                raise ValueError(f"num_tasks must be an int >= 2, got {num_tasks!r}")
            self._ensure(num_tasks)

    # -- state ------------------------------------------------------------------------
    @property
    def num_tasks(self) -> int | None:
        return self.xi.numel() or None

    def _ensure(self, k: int) -> None:
        ensure_task_buffers(self, k, {name: (k,) for name in _TASK_BUFFERS}, "FAMO")

    def z(self) -> Tensor:
        """The task distribution ``softmax(xi)``."""
        return torch.softmax(self.xi, dim=0)

    def _shifted(self, losses: Tensor) -> Tensor:
        d = losses - self.min_losses.to(device=losses.device, dtype=losses.dtype) + self.eps
        if (d <= 0).any():
            bad = (d <= 0).nonzero().flatten().tolist()
            raise ValueError(
                f"FAMO needs losses above their lower bounds min_losses (it takes log(L - L*)); "
                f"tasks {bad} have L={losses.detach()[bad].tolist()}, L*={self.min_losses[bad].tolist()}"
            )
        return d

    # -- objective -------------------------------------------------------------------
    def forward(self, losses: Tensor) -> Tensor:
        check_losses(losses)
        self._ensure(losses.shape[0])
        d = self._shifted(losses)
        z = self.z().to(device=losses.device, dtype=losses.dtype)
        c = (z / d).sum().detach()
        return (z * d.log()).sum() / c

    def loss_weights(self, losses: Tensor) -> Tensor:
        """``d/dL_k [sum_j z_j log(L_j - L*_j + eps) / c] = z_k / (c (L_k - L*_k + eps))``, ``c`` detached."""
        check_losses(losses)
        self._ensure(losses.shape[0])
        d = self._shifted(losses.detach())
        z_over_d = self.z().to(device=losses.device, dtype=losses.dtype) / d
        return z_over_d / z_over_d.sum()

    # -- logit update ------------------------------------------------------------------
    def logit_gradient(self, losses_before: Tensor, losses_after: Tensor) -> Tensor:
        """``(d z / d xi)^T delta`` for the log-loss decrease ``delta`` (without the decay term)."""
        check_losses(losses_before)
        check_losses(losses_after)
        if losses_before.shape != losses_after.shape:
            raise ValueError(f"shapes differ: {tuple(losses_before.shape)} vs {tuple(losses_after.shape)}")
        self._ensure(losses_before.shape[0])
        before = self._shifted(losses_before.detach().to(self.xi))
        after = self._shifted(losses_after.detach().to(self.xi))
        delta = before.log() - after.log()
        z = self.z()
        # (diag(z) - z z^T) delta, the softmax Jacobian (symmetric) applied to delta.
        return z * delta - z * (z @ delta)

    @torch.no_grad()
    def update(self, losses_before: Tensor, losses_after: Tensor) -> None:
        """One logit step from the losses before and after a model step (Algorithm 1)."""
        g = self.logit_gradient(losses_before, losses_after) + self.gamma * self.xi
        self.num_updates.add_(1)
        if self.logit_optimizer == "sgd":
            self.xi -= self.beta * g
            return
        b1, b2 = self.adam_betas
        t = int(self.num_updates)
        self.exp_avg.mul_(b1).add_(g, alpha=1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        denom = (self.exp_avg_sq / (1 - b2**t)).sqrt() + self.adam_eps
        self.xi -= self.beta / (1 - b1**t) * self.exp_avg / denom

    @torch.no_grad()
    def observe(self, losses: Tensor) -> None:
        """Update the logits from the previous observed losses to these (when ``update_on_observe``)."""
        check_losses(losses)
        self._ensure(losses.shape[0])
        if not self.update_on_observe:
            return
        losses = losses.detach().to(self.xi)
        if bool(self.has_prev):
            self.update(self.prev_losses, losses)
        self.prev_losses.copy_(losses)
        self.has_prev.fill_(True)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
        size_task_buffers_for(self, state_dict, prefix, _TASK_BUFFERS)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"num_tasks={self.num_tasks}, beta={self.beta}, gamma={self.gamma}, eps={self.eps}, "
            f"logit_optimizer={self.logit_optimizer!r}, update_on_observe={self.update_on_observe}"
        )
