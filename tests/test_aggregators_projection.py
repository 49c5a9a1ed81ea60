"""GradDrop and PCGrad (per-coordinate sign dropout and pairwise projection), against direct
implementations of the papers' algorithms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregator_props import HYPO, jacobians, rand_jacobian
from hypothesis import given

from lightning_cost.aggregators import GradDrop, PCGrad
from lightning_cost.aggregators.pcgrad import _project_lockstep, _project_small

# ----------------------------------------------------------------------------- GradDrop


def graddrop_loop(j: torch.Tensor, u: torch.Tensor, leak: list[float]) -> torch.Tensor:
    """Direct per-coordinate implementation of Chen et al. (2020), Algorithm 1."""
    k, p = j.shape
    out = torch.zeros(p, dtype=torch.float64)
    for c in range(p):
        col = [float(x) for x in j[:, c]]
        denom = sum(abs(x) for x in col)
        purity = 0.5 * (1 + sum(col) / denom) if denom > 0 else 0.5
        positive = purity > float(u[c])
        for i in range(k):
            kept = (positive and col[i] > 0) or (not positive and col[i] < 0)
            out[c] += (leak[i] + (1 - leak[i]) * kept) * col[i]
    return out


@pytest.mark.parametrize("leak", [0.0, 0.3, [0.0, 0.5, 1.0]])
def test_graddrop_matches_direct_loop(leak: float | list[float]) -> None:
    j = rand_jacobian(7, 3, 60)
    j[:, 0] = 0.0  # an all-zero coordinate
    j[:, 1] = j[:, 1].abs()  # all positive
    j[:, 2] = -j[:, 2].abs()  # all negative
    u = torch.rand(60, generator=torch.Generator().manual_seed(11))  # the documented draw order
    leaks = leak if isinstance(leak, list) else [leak] * 3
    d = GradDrop(leak=leak, seed=11).aggregate(j)
    torch.testing.assert_close(d, graddrop_loop(j, u, leaks))


def test_graddrop_keeps_one_sign_and_is_unbiased_for_the_sum() -> None:
    # One conflicting column repeated: each output is the positive or the negative part,
    # the positive one with probability P = 0.5 (1 + sum / sum |.|); E[d] = sum g.
    col = torch.tensor([3.0, -1.0, 0.5, -0.5], dtype=torch.float64)
    j = col[:, None].repeat(1, 40000)
    d = GradDrop(seed=0).aggregate(j)
    pos, neg = float(col[col > 0].sum()), float(col[col < 0].sum())
    assert torch.all((d == pos) | (d == neg))
    purity = 0.5 * (1 + col.sum() / col.abs().sum())
    assert abs(float((d == pos).double().mean()) - float(purity)) < 0.01
    assert abs(float(d.mean()) - float(col.sum())) < 0.05


def test_graddrop_same_sign_and_full_leak_give_the_sum() -> None:
    j = rand_jacobian(1, 3, 50).abs() * torch.where(torch.rand(50) > 0.5, 1.0, -1.0).double()
    torch.testing.assert_close(GradDrop(seed=3).aggregate(j), j.sum(0))  # no conflict per coordinate
    j = rand_jacobian(2, 3, 50)
    torch.testing.assert_close(GradDrop(leak=1.0, seed=3).aggregate(j), j.sum(0))
    assert not torch.allclose(GradDrop(seed=3).aggregate(j), j.sum(0))


def test_graddrop_seed_determinism_and_state_round_trip() -> None:
    j = rand_jacobian(5, 4, 200)
    a, b = GradDrop(seed=42), GradDrop(seed=42)
    torch.testing.assert_close(a.aggregate(j), b.aggregate(j))  # same seed: same draws (DDP ranks)
    assert not torch.equal(GradDrop(seed=43).aggregate(j), GradDrop(seed=42).aggregate(j))
    state = a.state_dict()
    expected = a.aggregate(j)
    c = GradDrop(seed=0)
    c.load_state_dict(state)
    torch.testing.assert_close(c.aggregate(j), expected)


def test_graddrop_bad_leak() -> None:
    with pytest.raises(ValueError):
        GradDrop(leak=1.5)
    with pytest.raises(ValueError):
        GradDrop(leak=[0.1, 0.2]).aggregate(rand_jacobian(0, 3, 4))


# ----------------------------------------------------------------------------- PCGrad


def pcgrad_vectors(j: torch.Tensor, seed: int) -> torch.Tensor:
    """Direct vector implementation of Yu et al. (2020), Algorithm 1, same order draws."""
    gen = torch.Generator().manual_seed(seed)
    k = j.shape[0]
    total = torch.zeros(j.shape[1], dtype=j.dtype)
    for i in range(k):
        g = j[i].clone()
        for jj in torch.randperm(k, generator=gen).tolist():
            if jj != i and g @ j[jj] < 0:
                g = g - (g @ j[jj]) / (j[jj] @ j[jj]) * j[jj]
        total += g
    return total


def test_pcgrad_two_tasks_closed_form() -> None:
    g1 = torch.tensor([1.0, 0.5, -2.0], dtype=torch.float64)
    g2 = torch.tensor([-1.0, 1.0, 1.0], dtype=torch.float64)
    assert g1 @ g2 < 0
    g1p = g1 - (g1 @ g2) / (g2 @ g2) * g2
    g2p = g2 - (g2 @ g1) / (g1 @ g1) * g1
    d = PCGrad(seed=0).aggregate(torch.stack([g1, g2]))
    torch.testing.assert_close(d, g1p + g2p)
    assert d @ g1 >= 0 and d @ g2 >= 0
    g3 = torch.tensor([1.0, 1.0, -0.5], dtype=torch.float64)
    assert g1 @ g3 > 0
    torch.testing.assert_close(PCGrad(seed=0).aggregate(torch.stack([g1, g3])), g1 + g3)


@pytest.mark.parametrize("seed", range(8))
def test_pcgrad_matches_vector_implementation(seed: int) -> None:
    j = rand_jacobian(seed, 3 + seed % 3, 6, shift=0.3)
    d = PCGrad(seed=seed).aggregate(j)
    torch.testing.assert_close(d, pcgrad_vectors(j, seed))


@pytest.mark.parametrize("k", [2, 7, 9, 12, 20])
def test_pcgrad_matches_vector_implementation_small_and_large_k(k: int) -> None:
    # K <= 8 runs on Python floats, larger K in numpy lock-step: both are Algorithm 1
    j = rand_jacobian(k, k, 2 * k, shift=0.2)
    torch.testing.assert_close(PCGrad(seed=k).aggregate(j), pcgrad_vectors(j, k))
    orders = [[x for x in torch.randperm(k).tolist() if x != i] for i in range(k)]
    g = (j @ j.T).numpy()
    np.testing.assert_allclose(_project_small(g.tolist(), orders), _project_lockstep(g, orders), rtol=1e-12, atol=1e-12)


def test_pcgrad_order_matters_and_is_seeded() -> None:
    # With 3 mutually conflicting tasks the result depends on the order: seeds must differ somewhere.
    j = torch.tensor([[1.0, 0.0], [-0.6, 0.8], [-0.6, -0.8]], dtype=torch.float64)
    outs = {tuple(PCGrad(seed=s).aggregate(j).round(decimals=9).tolist()) for s in range(20)}
    assert len(outs) > 1
    a = PCGrad(seed=9)
    a.aggregate(j)
    b = PCGrad(seed=0)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(a.aggregate(j), b.aggregate(j))


@HYPO
@given(jacobians())
def test_pcgrad_non_conflicting_is_plain_sum(j: torch.Tensor) -> None:
    j = j.abs()  # non-negative entries: every pair has g_i . g_j >= 0
    torch.testing.assert_close(PCGrad(seed=0).aggregate(j), j.sum(0))

