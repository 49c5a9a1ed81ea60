"""IMTL-G, Nash-MTL and FairGrad (weights from a nonlinear system on the Gramian), against their
defining equations, closed forms and independent solves; and with one task's gradient scaled by
orders of magnitude."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from aggregator_props import HYPO, gram, jacobians, one_task_scaled, rand_jacobian
from hypothesis import given
from mtl_models import TinyMTL, loader, regression_data, trainer
from scipy.optimize import minimize

from lightning_cost.aggregators import IMTLG, AggregationError, FairGrad, NashMTL

# ----------------------------------------------------------------------------- IMTL-G


def imtl_vectors(j: np.ndarray) -> np.ndarray:
    """The paper's closed form with explicit vectors: alpha_{2:K} = g_1 U^T (D U^T)^{-1}."""
    u = j / np.linalg.norm(j, axis=1, keepdims=True)
    dmat = j[0] - j[1:]
    umat = u[0] - u[1:]
    tail = j[0] @ umat.T @ np.linalg.inv(dmat @ umat.T)
    return np.concatenate([[1 - tail.sum()], tail])


@HYPO
@given(jacobians())
def test_imtl_equal_projections_and_closed_form(j: torch.Tensor) -> None:
    alpha = IMTLG().weights(gram(j))
    d = alpha @ j
    proj = (j / j.norm(dim=1, keepdim=True)) @ d
    assert float(alpha.sum()) == pytest.approx(1.0)
    torch.testing.assert_close(proj, proj[:1].expand_as(proj), rtol=1e-7, atol=1e-9 * float(j.norm()))
    np.testing.assert_allclose(alpha.numpy(), imtl_vectors(j.numpy()), rtol=1e-6, atol=1e-8)


def test_imtl_per_task_scale_only_rescales_direction() -> None:
    j = rand_jacobian(8, 3, 6, shift=0.5)
    d = IMTLG().aggregate(j)
    d2 = IMTLG().aggregate(j * torch.tensor([[2.0], [0.1], [7.0]], dtype=torch.float64))
    cos = float(d @ d2 / (d.norm() * d2.norm()))
    assert abs(cos) == pytest.approx(1.0, abs=1e-9)


def test_imtl_duplicate_gradients_still_equal_projections() -> None:
    j = rand_jacobian(9, 3, 5)
    j[2] = j[1]
    d = IMTLG().aggregate(j)
    proj = (j / j.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(proj, proj[:1].expand_as(proj))


# ----------------------------------------------------------------------------- Nash-MTL


def nash_reference(g: np.ndarray) -> np.ndarray:
    """Independent solve: (G a)_i = 1/a_i is the stationary point of 0.5 a^T G a - sum log a_i."""
    k = g.shape[0]
    res = minimize(
        lambda a: 0.5 * a @ g @ a - np.log(a).sum(),
        np.ones(k),
        jac=lambda a: g @ a - 1 / a,
        bounds=[(1e-9, None)] * k,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000},
    )
    return res.x


@HYPO
@given(jacobians(max_k=4))
def test_nash_defining_property_and_reference(j: torch.Tensor) -> None:
    g = gram(j)
    fro = float(torch.linalg.norm(g))
    alpha = NashMTL().weights(g).numpy()  # solution for G / ||G||_F
    gn = g.numpy() / fro
    np.testing.assert_allclose(alpha * (gn @ alpha), 1.0, atol=1e-5)
    np.testing.assert_allclose(alpha, nash_reference(gn), rtol=1e-4)
    raw = NashMTL(normalize_gramian=False).weights(g).numpy()
    np.testing.assert_allclose(raw * (g.numpy() @ raw), 1.0, atol=1e-5)
    np.testing.assert_allclose(alpha, raw * np.sqrt(fro), rtol=1e-6)


def test_nash_conflicting_start_and_warm_start() -> None:
    # Task 0 conflicts with the sum: (G 1)_0 < 0, where Phi is undefined at the ones start.
    g = torch.tensor([[1.0, -2.0], [-2.0, 5.0]], dtype=torch.float64)
    assert (g.sum(0) < 0).any()
    agg = NashMTL()
    a = agg.weights(g).numpy()
    gn = g.numpy() / np.linalg.norm(g.numpy())
    np.testing.assert_allclose(a * (gn @ a), 1.0, atol=1e-5)
    b = agg.weights(g).numpy()  # warm-started from the previous solution
    np.testing.assert_allclose(b, a, rtol=1e-5)


@pytest.mark.parametrize("k, shift", [(2, 0.5), (3, -0.2), (12, 0.3), (40, 0.2)])
def test_nash_newton_solve_equals_the_ccp_and_solves_the_equation(k: int, shift: float) -> None:
    """The Newton solve and the authors' CCP reach the same alpha (one solution of
    alpha_i (G alpha)_i = 1), also where tasks conflict with the sum (shift < 0)."""
    for seed in range(3):
        g = gram(rand_jacobian(seed, k, 3 * k, shift=shift))
        newton, ccp = NashMTL(solver="newton").weights(g).numpy(), NashMTL().weights(g).numpy()
        gn = g.numpy() / np.linalg.norm(g.numpy())
        np.testing.assert_allclose(newton * (gn @ newton), 1.0, atol=1e-9)
        np.testing.assert_allclose(newton, ccp, rtol=1e-4)


def test_nash_failures_raise_aggregation_error() -> None:
    j = rand_jacobian(0, 2, 3)
    with pytest.raises(AggregationError, match="not installed"):
        NashMTL(solver="NO_SUCH_SOLVER").aggregate(j)
    opposed = torch.stack([j[0], -j[0]])  # no alpha > 0 with (G alpha)_i = 1/alpha_i
    with pytest.raises(AggregationError):
        NashMTL().aggregate(opposed)
    with pytest.raises(AggregationError, match="Newton"):
        NashMTL(solver="newton").aggregate(opposed)


def test_nash_update_weights_every_and_state() -> None:
    g1 = gram(rand_jacobian(1, 3, 5, shift=0.5))
    g2 = gram(rand_jacobian(2, 3, 5, shift=0.5))
    agg = NashMTL(update_weights_every=2)
    w1 = agg.weights(g1)
    torch.testing.assert_close(agg.weights(g2), w1)  # reused on the 2nd call
    w3 = agg.weights(g2)
    torch.testing.assert_close(w3, NashMTL().weights(g2), rtol=1e-5, atol=1e-7)
    other = NashMTL(update_weights_every=2)
    other.load_state_dict(agg.state_dict())
    torch.testing.assert_close(other.weights(g1), w3)  # step 4 reuses the restored weights


# ----------------------------------------------------------------------------- FairGrad


def fairgrad_reference(g: np.ndarray, alpha: float) -> np.ndarray:
    """Independent solve: G w = w^(-1/alpha) is the stationary point of a strictly convex potential."""
    k = g.shape[0]
    p = 1 - 1 / alpha

    def f(w: np.ndarray) -> float:
        u = -np.log(w).sum() if alpha == 1 else -(w**p).sum() / p
        return 0.5 * w @ g @ w + u

    res = minimize(
        f,
        np.ones(k),
        jac=lambda w: g @ w - w ** (-1 / alpha),
        bounds=[(1e-9, None)] * k,
        method="L-BFGS-B",
        options={"ftol": 1e-15, "gtol": 1e-12, "maxiter": 10000},
    )
    return res.x


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("seed", range(4))
def test_fairgrad_defining_property_and_reference(alpha: float, seed: int) -> None:
    j = rand_jacobian(seed, 2 + seed, 8, shift=[-0.3, 0.0, 0.5, 1.0][seed])
    g = gram(j).numpy()
    w = FairGrad(alpha=alpha).weights(torch.tensor(g)).numpy()
    assert np.all(w > 0)
    np.testing.assert_allclose(g @ w, w ** (-1 / alpha), rtol=1e-6)
    np.testing.assert_allclose(w, fairgrad_reference(g, alpha), rtol=1e-4)


def test_fairgrad_alpha_one_equals_nash() -> None:
    g = gram(rand_jacobian(3, 4, 7, shift=0.2))
    torch.testing.assert_close(
        FairGrad(alpha=1.0).weights(g), NashMTL(normalize_gramian=False).weights(g), rtol=1e-5, atol=1e-8
    )


def test_fairgrad_scale_and_clip_option() -> None:
    j = rand_jacobian(5, 3, 6, shift=0.5) * 10
    g = gram(j)
    w = FairGrad().weights(g)
    clipped = FairGrad(scale_and_clip=True).weights(g)
    torch.testing.assert_close(clipped / clipped.sum(), w / w.sum())  # same direction
    assert float((clipped @ j).norm()) == pytest.approx(1.0)  # ||K J^T w|| > 1 is clipped to 1
    small = j * 1e-3
    w_small = FairGrad(scale_and_clip=True, max_norm=1e6).weights(gram(small))
    torch.testing.assert_close(w_small, 3 * FairGrad().weights(gram(small)))  # no clipping needed


def test_fairgrad_unsolvable_raises_aggregation_error() -> None:
    j = rand_jacobian(0, 2, 3)
    with pytest.raises(AggregationError):
        FairGrad().aggregate(torch.stack([j[0], -j[0]]))



# ----------------------------------------------------------------------------- one task's scale x1e6


@pytest.mark.parametrize("alpha", [0.5, 1.0, 2.0, 5.0])
@pytest.mark.parametrize("scale", [1e6, 1e-6])
@pytest.mark.parametrize("seed", range(4))
def test_fairgrad_solves_when_one_task_is_scaled(alpha: float, scale: float, seed: int) -> None:
    """The weights must then span many orders of magnitude; they still solve G w = w^(-1/alpha)."""
    g = gram(one_task_scaled(seed, 3 + seed % 3, scale)).numpy()
    w = FairGrad(alpha=alpha).weights(torch.tensor(g)).numpy()
    assert np.all(w > 0)
    np.testing.assert_allclose(g @ w, w ** (-1 / alpha), rtol=1e-6)


@pytest.mark.parametrize("scale", [1e6, 1e-6])
@pytest.mark.parametrize("seed", range(3))
def test_nash_solves_when_one_task_is_scaled(scale: float, seed: int) -> None:
    g = gram(one_task_scaled(seed, 3 + seed % 3, scale)).numpy()
    raw = NashMTL(normalize_gramian=False).weights(torch.tensor(g)).numpy()
    np.testing.assert_allclose(raw * (g @ raw), 1.0, atol=1e-5)
    alpha = NashMTL().weights(torch.tensor(g)).numpy()
    gn = g / np.linalg.norm(g)
    np.testing.assert_allclose(alpha * (gn @ alpha), 1.0, atol=1e-5)


@pytest.mark.parametrize("seed", range(3))
def test_imtl_equal_projections_when_one_task_is_scaled(seed: int) -> None:
    j = one_task_scaled(seed, 3 + seed % 3, 1e6)
    d = IMTLG().aggregate(j)
    proj = (j / j.norm(dim=1, keepdim=True)) @ d
    torch.testing.assert_close(proj, proj[:1].expand_as(proj), rtol=1e-7, atol=0.0)


class ScaledTask(TinyMTL):
    """Task t1's loss multiplied by 1e6: its gradient dwarfs the others'."""

    def training_step(self, batch, batch_idx):
        out = super().training_step(batch, batch_idx)
        out["t1"] = out["t1"] * 1e6
        return out


@pytest.mark.parametrize("method", ["fairgrad", "nashmtl"])
def test_fit_with_one_task_loss_scaled_by_1e6_takes_every_step(method: str) -> None:
    torch.manual_seed(0)
    model = ScaledTask(k=3, method=method)
    before = [p.detach().clone() for p in model.trunk.parameters()]
    trainer(max_steps=6).fit(model, loader(regression_data(k=3), batch_size=32))
    assert model.mtl_skipped_steps == 0
    assert all(not torch.equal(a, b) for a, b in zip(before, model.trunk.parameters(), strict=True))
