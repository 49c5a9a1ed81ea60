"""Shared data and property checks for the aggregator tests."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from hypothesis import HealthCheck, assume, settings
from hypothesis import strategies as st

from lightning_cost.aggregators import Aggregator, GramianAggregator

HYPO = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand_jacobian(seed: int, k: int, p: int, shift: float = 0.0) -> torch.Tensor:
    """A float64 ``K x P`` Jacobian; ``shift`` adds a common component (aligned if > 0)."""
    rng = np.random.default_rng(seed)
    j = rng.standard_normal((k, p)) + shift * rng.standard_normal(p)[None, :]
    return torch.tensor(j, dtype=torch.float64)


@st.composite
def jacobians(draw: st.DrawFn, max_k: int = 5) -> torch.Tensor:
    """Well-conditioned Jacobians (linearly independent rows), with or without conflict."""
    k = draw(st.integers(2, max_k))
    p = k + draw(st.integers(0, 5))
    j = rand_jacobian(draw(st.integers(0, 2**31 - 1)), k, p, draw(st.floats(-2.0, 2.0)))
    assume(np.linalg.cond((j @ j.T).numpy()) < 1e4)
    return j


def gram(j: torch.Tensor) -> torch.Tensor:
    return j @ j.T


@dataclass(frozen=True)
class Symmetry:
    """How a method's output transforms under a task permutation and under ``J -> cJ``.

    ``weight_power``: the weights of a Gramian method scale as ``c**weight_power`` (so the
    direction as ``c**(1 + weight_power)``; a non-Gramian method's direction scales as ``c``).
    ``permutes``: whether permuting the tasks permutes the weights (the direction stays the same).
    ``scale``: whether ``J -> cJ`` acts as ``weight_power`` says (False: a stateful method whose
    step size is in the units of ``G``, e.g. MoDo; only the permutation is checked).
    """

    weight_power: float = 0.0
    permutes: bool = True
    scale: bool = True
    rtol: float = 1e-6
    atol: float = 1e-8
    scales: tuple[float, float] = (1e-3, 1e3)
    max_k: int = 5
    hparams: dict = field(default_factory=dict)


def assert_permutation_and_scale(
    make: Callable[[], Aggregator], j: torch.Tensor, c: float, perm: Sequence[int], sym: Symmetry
) -> None:
    """The method's output permutes with the tasks and scales as ``sym`` says under ``J -> cJ``.

    A fresh method per call, so that seeded methods draw the same random numbers each time.
    """
    perm = list(perm)
    make = with_losses(make, j.shape[0])
    direction_power = 1.0 + sym.weight_power
    d = make().aggregate(j)
    if sym.scale:
        torch.testing.assert_close(make().aggregate(c * j), c**direction_power * d, rtol=sym.rtol,
                                   atol=sym.atol * c**direction_power)
    if sym.permutes:
        torch.testing.assert_close(make().aggregate(j[perm]), d, rtol=sym.rtol, atol=sym.atol * float(j.abs().max()))
    if not isinstance(make(), GramianAggregator):
        return
    w = make().weights(gram(j))
    if sym.scale:
        torch.testing.assert_close(make().weights(gram(c * j)), w * c**sym.weight_power, rtol=sym.rtol, atol=sym.atol)
    if sym.permutes:
        torch.testing.assert_close(make().weights(gram(j[perm])), w[perm], rtol=sym.rtol, atol=sym.atol)


def ready(method: Aggregator, k: int) -> Aggregator:
    """``method``, after ``observe_losses(ones(K))`` where it reads the task losses (``uses_losses``:
    GradNorm, DB-MTL, MoCo), so that the shared tests can call ``aggregate(J)`` on every method."""
    if getattr(method, "uses_losses", False):
        method.observe_losses(torch.ones(k, dtype=torch.float64))
    return method


def with_losses(make: Callable[[], Aggregator], k: int) -> Callable[[], Aggregator]:
    """``make``, each method it builds :func:`ready` for ``K`` tasks."""
    return lambda: ready(make(), k)


def one_task_scaled(seed: int, k: int, scale: float, p: int = 8) -> torch.Tensor:
    """A random ``K x P`` Jacobian whose row ``seed % K`` is multiplied by ``scale`` (a task whose loss
    is scaled: its gradient's norm then differs from the others' by orders of magnitude)."""
    j = rand_jacobian(seed, k, p, shift=[-0.3, 0.0, 0.5, 1.0][seed % 4])
    j[seed % k] *= scale
    return j
