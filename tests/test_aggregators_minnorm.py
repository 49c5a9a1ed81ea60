"""MGDA and CAGrad (both solve simplex min-norm problems on the Gramian), against closed forms,
brute force, an interior-point solver and their optimality conditions."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from aggregator_props import HYPO, gram, jacobians, one_task_scaled, rand_jacobian
from hypothesis import given

from lightning_cost.aggregators import MGDA, CAGrad

# ----------------------------------------------------------------------------- MGDA


def brute_force_min_norm(g: np.ndarray) -> tuple[float, np.ndarray]:
    """min w^T G w over the simplex by enumerating every support and its affine KKT system."""
    k = g.shape[0]
    best = (np.inf, np.full(k, 1.0 / k))
    for r in range(1, k + 1):
        for s in itertools.combinations(range(k), r):
            s = list(s)
            a = np.zeros((r + 1, r + 1))
            a[:r, :r] = g[np.ix_(s, s)]
            a[:r, r] = a[r, :r] = 1.0
            rhs = np.zeros(r + 1)
            rhs[r] = 1.0
            mu = np.linalg.lstsq(a, rhs, rcond=None)[0][:r]
            if np.any(mu < -1e-12) or abs(mu.sum() - 1) > 1e-9:
                continue
            w = np.zeros(k)
            w[s] = np.clip(mu, 0, None)
            if w @ g @ w < best[0]:
                best = (float(w @ g @ w), w)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_mgda_two_tasks_closed_form(seed: int) -> None:
    j = rand_jacobian(seed, 2, 4, shift=[-1.0, 0.0, 1.0][seed % 3])
    g1, g2 = j[0], j[1]
    gamma = float(torch.clamp((g2 - g1) @ g2 / ((g1 - g2) @ (g1 - g2)), 0.0, 1.0))
    torch.testing.assert_close(MGDA().aggregate(j), gamma * g1 + (1 - gamma) * g2)


@pytest.mark.parametrize("seed", range(20))
def test_mgda_matches_brute_force_including_degenerate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    k, p = int(rng.integers(2, 6)), int(rng.integers(1, 8))  # K > P (rank-deficient) happens
    j = rng.standard_normal((k, p)) + rng.standard_normal(p) * rng.choice([0.0, 3.0])
    if seed % 4 == 0:
        j[1] = j[0]  # duplicated task
    g = j @ j.T
    w = MGDA().weights(torch.tensor(g)).numpy()
    best, w_ref = brute_force_min_norm(g)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1.0)
    assert w @ g @ w == pytest.approx(best, abs=1e-12 * np.max(np.diag(g)))
    np.testing.assert_allclose(w @ j, w_ref @ j, atol=1e-7 * np.abs(j).max())  # the point is unique


@HYPO
@given(jacobians())
def test_mgda_kkt_and_non_conflicting(j: torch.Tensor) -> None:
    w = MGDA().weights(gram(j))
    d = w @ j
    sq = d @ d
    assert torch.all(w >= 0) and abs(float(w.sum()) - 1) < 1e-12
    # Optimality on the simplex: g_i . d >= ||d||^2 for all i (equality on the support),
    # so the update does not conflict with any task.
    scale = float(gram(j).diagonal().max())
    assert torch.all(j @ d >= sq - 1e-10 * scale)
    support = w > 1e-9
    torch.testing.assert_close((j @ d)[support], sq.expand(int(support.sum())), rtol=1e-8, atol=1e-10 * scale)


def test_mgda_nearly_parallel_gradients_exact() -> None:
    # Each active-set step gains only ~1e-4 here: a loose stopping rule would return g_1.
    j = torch.tensor([[1.0, 1e-2], [1.0, -1e-2], [1.0, 2e-2]], dtype=torch.float64)
    torch.testing.assert_close(MGDA().aggregate(j), torch.tensor([1.0, 0.0], dtype=torch.float64))


def test_mgda_pareto_stationary_gives_zero() -> None:
    j = torch.tensor([[1.0, 2.0], [-2.0, -4.0], [0.5, 3.0]], dtype=torch.float64)
    assert MGDA().aggregate(j).abs().max() < 1e-12
    j = rand_jacobian(0, 3, 4)
    j[1] = 0.0
    w = MGDA().weights(gram(j))
    torch.testing.assert_close(w, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))


def test_mgda_l2_normalization_reweights_raw_gradients() -> None:
    j = rand_jacobian(4, 3, 5) * torch.tensor([[1.0], [10.0], [0.1]], dtype=torch.float64)
    unit = j / j.norm(dim=1, keepdim=True)
    _, w_ref = brute_force_min_norm((unit @ unit.T).numpy())
    w = MGDA(normalization="l2").weights(gram(j)).numpy()
    np.testing.assert_allclose(w, w_ref, atol=1e-9)
    torch.testing.assert_close(MGDA(normalization="l2").aggregate(j), torch.tensor(w_ref) @ j)
    assert not np.allclose(w, MGDA().weights(gram(j)).numpy(), atol=1e-3)
    with pytest.raises(ValueError):
        MGDA(normalization="loss")


# ----------------------------------------------------------------------------- CAGrad


def cagrad_grid_2tasks(j: torch.Tensor, c: float) -> torch.Tensor:
    """Brute-force CAGrad for K = 2: the dual on a grid of w in [0, 1], then d = g0 + s g_w/|g_w|."""
    jn = j.numpy()
    g0 = jn.mean(0)
    s = c * np.linalg.norm(g0)
    w = np.linspace(0.0, 1.0, 200001)
    gw = w[:, None] * jn[0] + (1 - w[:, None]) * jn[1]
    f = gw @ g0 + s * np.linalg.norm(gw, axis=1)
    best = gw[np.argmin(f)]
    return torch.tensor(g0 + s * best / np.linalg.norm(best))


@pytest.mark.parametrize("seed", range(8))
def test_cagrad_two_tasks_against_grid(seed: int) -> None:
    j = rand_jacobian(seed, 2, 5, shift=[-0.5, 0.0, 0.5, 1.5][seed % 4])
    for c in (0.4, 0.8):
        d = CAGrad(c=c, rescale=0).aggregate(j)
        torch.testing.assert_close(d, cagrad_grid_2tasks(j, c), rtol=1e-4, atol=1e-4)


def primal_brute_force_2d(j: np.ndarray, c: float) -> float:
    """max_{||d - g0|| <= c||g0||} min_i g_i . d for P = 2, on a polar grid of the disc."""
    g0 = j.mean(0)
    r = c * np.linalg.norm(g0) * np.linspace(0, 1, 51)
    th = np.linspace(0, 2 * np.pi, 20001)
    pts = g0 + (r[:, None, None] * np.stack([np.cos(th), np.sin(th)], -1)[None])
    return float(np.min(pts @ j.T, axis=-1).max())


def toy_losses(x: torch.Tensor) -> torch.Tensor:
    """The 2-task toy problem of the CAGrad authors' code (``toy.py``), as in ``benchmarks/toy/problem.py``."""
    lower = 5e-6
    x1, x2 = x[0], x[1]
    f1 = torch.log(torch.clamp((0.5 * (-x1 - 7) - torch.tanh(-x2)).abs(), min=lower)) + 6
    f2 = torch.log(torch.clamp((0.5 * (-x1 + 3) + torch.tanh(-x2) + 2).abs(), min=lower)) + 6
    c1 = torch.clamp(torch.tanh(0.5 * x2), min=0)
    c2 = torch.clamp(torch.tanh(-0.5 * x2), min=0)
    f1_sq = ((-x1 + 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    f2_sq = ((-x1 - 7) ** 2 + 0.1 * (-x2 - 8) ** 2) / 10 - 20
    return torch.stack([f1 * c1 + f1_sq * c2, f2 * c1 + f2_sq * c2])


@pytest.mark.parametrize("init", [(-8.5, 7.5), (-8.5, -5.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0)])
def test_cagrad_on_toy_maximises_worst_improvement(init: tuple[float, float]) -> None:
    x = torch.tensor(init, dtype=torch.float64)
    j = torch.autograd.functional.jacobian(toy_losses, x)
    c = 0.4
    d = CAGrad(c=c, rescale=0).aggregate(j)
    g0 = j.mean(0)
    assert (d - g0).norm() <= c * g0.norm() * (1 + 1e-9)  # primal feasibility
    worst = float((j @ d).min())
    assert worst >= float((j @ g0).min()) - 1e-12  # at least as good as plain averaging
    best = primal_brute_force_2d(j.numpy(), c)
    assert worst >= best - 1e-9 * float(j.norm()) ** 2
    assert worst == pytest.approx(best, rel=1e-5, abs=1e-9)


def test_cagrad_toy_pareto_stationary_point() -> None:
    # On the Pareto set (x2 = -8.3552... region) the toy gradients nearly oppose; (0, 0) has J = 0.
    j = torch.autograd.functional.jacobian(toy_losses, torch.zeros(2, dtype=torch.float64))
    d = CAGrad().aggregate(j)
    assert torch.isfinite(d).all() and torch.all(d == 0)


@pytest.mark.parametrize("seed", range(5))
def test_cagrad_strong_duality_with_cvxpy(seed: int) -> None:
    cp = pytest.importorskip("cvxpy")
    j = rand_jacobian(seed, 4, 6, shift=0.4).numpy()
    g = j @ j.T
    s = 0.4 * np.linalg.norm(j.mean(0))
    w = cp.Variable(4, nonneg=True)
    prob = cp.Problem(cp.Minimize(g.mean(1) @ w + s * cp.norm(j.T @ w)), [cp.sum(w) == 1])
    prob.solve(solver="CLARABEL")
    d = CAGrad(rescale=0).aggregate(torch.tensor(j)).numpy()
    primal = float((j @ d).min())
    assert primal >= prob.value - 1e-7 * np.max(np.diag(g))  # never worse than an IPM solution
    assert primal == pytest.approx(prob.value, rel=1e-5)


def test_cagrad_rescale_and_limits() -> None:
    j = rand_jacobian(3, 3, 5, shift=0.2)
    d0 = CAGrad(c=0.4, rescale=0).aggregate(j)
    torch.testing.assert_close(CAGrad(c=0.4, rescale=1).aggregate(j), d0 / 1.16)
    torch.testing.assert_close(CAGrad(c=0.4, rescale=2).aggregate(j), d0 / 1.4)
    torch.testing.assert_close(CAGrad(c=0.0).aggregate(j), j.mean(0))  # c = 0: plain average
    j0 = torch.cat([j[:1], -j[:1]])  # g0 = 0
    torch.testing.assert_close(CAGrad().aggregate(j0), torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError):
        CAGrad(rescale=3)
    with pytest.raises(ValueError):
        CAGrad(c=-1.0)



# ----------------------------------------------------------------------------- one task's scale x1e6


@pytest.mark.parametrize("scale", [1e6, 1e-6])
@pytest.mark.parametrize("seed", range(6))
def test_mgda_is_the_min_norm_point_when_one_task_is_scaled(seed: int, scale: float) -> None:
    """d = J^T w (w in the simplex) is the min-norm point of the hull iff g_i . d >= ||d||^2 for every
    task: checked relative to ||d||^2, which is set by the small gradients, not by the largest one."""
    j = one_task_scaled(seed, 3 + seed % 3, scale).numpy()
    w = MGDA().weights(torch.tensor(j @ j.T)).numpy()
    d = w @ j
    assert np.all(w >= 0.0) and w.sum() == pytest.approx(1.0)
    assert np.all(j @ d >= (d @ d) * (1.0 - 1e-7)), (j @ d) / (d @ d)


@pytest.mark.parametrize("scale", [1e6, 1e-6])
@pytest.mark.parametrize("seed", range(6))
def test_cagrad_closes_its_duality_gap_when_one_task_is_scaled(seed: int, scale: float) -> None:
    """Weak duality: for any simplex point u, u . (J g0) + r ||J^T u|| bounds the optimum from above and
    any feasible d's worst improvement min_i g_i . d from below. CAGrad's own dual point (its weights
    minus 1/K, normalised) must close that gap, and d must lie in the ball."""
    k = 3 + seed % 3
    j = one_task_scaled(seed, k, scale).numpy()
    w = CAGrad(rescale=0).weights(torch.tensor(j @ j.T)).numpy()
    d, g0 = w @ j, j.mean(0)
    radius = 0.4 * np.linalg.norm(g0)
    assert np.linalg.norm(d - g0) <= radius * (1.0 + 1e-9)
    u = w - 1.0 / k
    assert np.all(u >= -1e-12 * u.sum())
    u = u / u.sum()
    primal = float((j @ d).min())
    dual = float(u @ (j @ g0) + radius * np.linalg.norm(u @ j))
    assert dual - primal <= 1e-9 * np.abs(j @ g0).max(), (primal, dual)


@pytest.mark.parametrize("k", [3, 12, 40])
def test_min_norm_warm_start_reaches_the_cold_start_optimum(k):
    """A start support (good, wrong, or not affinely independent) changes the path, not the optimum."""
    import numpy as np

    from lightning_cost.aggregators._common import min_norm_weights

    rng = np.random.default_rng(k)
    for trial in range(5):
        jac = rng.standard_normal((k, 30)) + (0.3 if trial % 2 else -0.1)
        g = jac @ jac.T
        cold = min_norm_weights(g)
        for start in (np.flatnonzero(cold), rng.choice(k, size=min(k, 3), replace=False), range(k), [0, 0]):
            warm = min_norm_weights(g, start=list(start))
            assert np.abs(warm @ jac - cold @ jac).max() <= 1e-9 * np.abs(cold @ jac).max() + 1e-12


def test_kkt_solve_takes_lu_when_well_conditioned_and_least_squares_when_singular():
    """The affine min-norm step's solve: LU where the system is well conditioned (same answer as
    least squares), the minimum-norm least-squares solution where it is singular (a support whose
    points are affinely dependent, e.g. a task listed twice), never a huge or non-finite one."""
    from lightning_cost.aggregators._common import _affine_min_norm, _solve_kkt

    rng = np.random.default_rng(0)
    jac = rng.standard_normal((6, 20))
    g = jac @ jac.T
    kkt = np.zeros((7, 7))
    kkt[:6, :6], kkt[:6, 6], kkt[6, :6] = g, 1.0, 1.0
    rhs = np.zeros(7)
    rhs[6] = 1.0
    np.testing.assert_allclose(_solve_kkt(kkt, rhs), np.linalg.lstsq(kkt, rhs, rcond=None)[0], rtol=1e-10, atol=1e-12)
    # a duplicated point: the KKT matrix is singular; the least-squares answer splits it evenly
    dup = np.vstack([jac[:3], jac[:1]])
    mu = _affine_min_norm(dup @ dup.T, [0, 1, 2, 3])
    assert np.isfinite(mu).all() and abs(mu.sum() - 1.0) < 1e-9
    assert abs(mu[0] - mu[3]) < 1e-9
    point = mu @ dup  # the affine min-norm point of the three distinct points
    ref = _affine_min_norm(jac[:3] @ jac[:3].T, [0, 1, 2]) @ jac[:3]
    np.testing.assert_allclose(point, ref, rtol=1e-8, atol=1e-10)
