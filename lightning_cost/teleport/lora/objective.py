"""The teleport objective ``L_lora = L_t - gamma * L_g`` (paper eqs. 7-11)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, cast

import torch
from torch import Tensor

__all__ = ["ascent_direction", "balance_ratios", "loss_invariance", "relative_drift_penalty", "sample_sphere",
           "sharpness"]


def loss_invariance(losses: Tensor, target: Tensor) -> Tensor:
    """``L_t = (1/K) sum_i |L_i - L_i*|`` (eq. 7); ``target`` (``L*``) is held fixed."""
    return (losses - target.detach()).abs().mean()


def relative_drift_penalty(losses: Tensor, target: Tensor, scale: float) -> Tensor:
    """``(1/K) sum_i ((L_i - L_i*) / (scale |L_i*|))^2``: eq. 7's minimiser with a gradient that grows with
    the drift (eq. 7's absolute value has a zero subgradient at the start and a constant pull after),
    the same for every task whatever its loss scale; 1 at a relative drift of ``scale``."""
    t = target.detach()
    return (((losses - t) / (scale * t.abs().clamp_min(1e-12))) ** 2).mean()


def ascent_direction(grads: Sequence[Tensor], radius: float) -> list[Tensor]:
    """``radius * g / ||g||`` (joint norm over the tensors): the first-order maximiser of eq. 8 on the
    sphere, where ``L(theta + eps) - L(theta) = radius ||g||``. Zero gradients give zeros."""
    norm = torch.sqrt(cast(Tensor, sum((g.double() ** 2).sum() for g in grads)))
    if norm == 0:
        return [torch.zeros_like(g) for g in grads]
    return [(g * (radius / norm)).to(g.dtype) for g in grads]


def balance_ratios(grad_norms: Tensor, rule: Literal["softmax", "linear"] = "softmax") -> Tensor:
    """Task ratios ``R`` from the per-task gradient norms at the pre-teleport point.

    ``rule="softmax"`` (eq. 10): ``R = K * softmax([sum_j ||g_j|| / ||g_i||]_i)``: tasks with small
    gradients get larger ratios. ``rule="linear"`` (the authors' public code):
    ``R_i = K (1 - ||g_i|| / sum_j ||g_j||)``. Zero norms are clamped to the smallest positive norm so
    that a stalled task gets the largest ratio instead of a division by zero.
    """
    norms = grad_norms.detach().double()
    if norms.ndim != 1 or norms.numel() < 2:
        raise ValueError(f"grad_norms must have shape [K>=2], got {tuple(norms.shape)}")
    if not torch.isfinite(norms).all() or (norms < 0).any():
        raise ValueError(f"grad_norms must be finite and non-negative, got {norms.tolist()}")
    k = norms.numel()
    total = norms.sum()
    if total == 0:
        return torch.ones(k, dtype=grad_norms.dtype, device=grad_norms.device)
    if rule == "softmax":
        positive = norms[norms > 0]
        safe = norms.clamp_min(positive.min().item())
        r = k * torch.softmax(total / safe, dim=0)
    elif rule == "linear":
        r = k * (1.0 - norms / total)
    else:
        raise ValueError(f"rule must be 'softmax' or 'linear', got {rule!r}")
    return r.to(grad_norms.dtype)


def sharpness(perturbed_losses: Tensor, ratios: Tensor) -> Tensor:
    """One term of eq. 9, ``|(1/K) sum_i R_i L_i(theta + dtheta + eps_j)|``; ``L_g`` is the max over ``j``."""
    return (ratios.detach() * perturbed_losses).mean().abs()


def sample_sphere(
    shapes: Sequence[torch.Size], radius: float, generator: torch.Generator, device: torch.device | str = "cpu"
) -> list[Tensor]:
    """A point drawn uniformly on the sphere of ``radius`` in the joint space of tensors of ``shapes``.

    (A standard normal vector normalised to ``radius``; eq. 8's ``||eps|| = delta``.)
    """
    parts = [torch.randn(s, generator=generator, dtype=torch.float64) for s in shapes]
    norm = torch.sqrt(cast(Tensor, sum((p * p).sum() for p in parts)))
    return [(p * (radius / norm)).float().to(device) for p in parts]
