"""Tests of the Jacobian-based methods: MGDA, GradDrop, PCGrad, CAGrad, IMTL-G, Nash-MTL, FairGrad.

Each method is checked against its defining property and against an independent
computation written here (closed form, brute force, or a direct vector implementation).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

from lightning_cost.aggregators import (
    AggregationError,
    Aggregator,
    GramianAggregator,
    aggregator_class,
    build_aggregator,
)
from lightning_cost.aggregators.cagrad import CAGrad
from lightning_cost.aggregators.fairgrad import FairGrad
from lightning_cost.aggregators.graddrop import GradDrop
from lightning_cost.aggregators.imtl import IMTLG
from lightning_cost.aggregators.mgda import MGDA
from lightning_cost.aggregators.nash_mtl import NashMTL
from lightning_cost.aggregators.pcgrad import PCGrad, _project_lockstep, _project_small

METHODS = ["mgda", "graddrop", "pcgrad", "cagrad", "imtl", "nashmtl", "fairgrad"]
GRAMIAN_METHODS = ["mgda", "pcgrad", "cagrad", "imtl", "nashmtl", "fairgrad"]
EXPECTED_CLASS = {
    "mgda": MGDA,
    "graddrop": GradDrop,
    "pcgrad": PCGrad,
    "cagrad": CAGrad,
    "imtl": IMTLG,
    "nashmtl": NashMTL,
    "fairgrad": FairGrad,
}
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


# ----------------------------------------------------------------------------- common


@pytest.mark.parametrize("name", METHODS)
def test_build_aggregator_builds_each(name: str) -> None:
    agg = build_aggregator(name)
    assert type(agg) is EXPECTED_CLASS[name]
    assert aggregator_class(name) is EXPECTED_CLASS[name]
    assert isinstance(agg, Aggregator) and agg.requires_jacobian
    assert isinstance(agg, GramianAggregator) == (name != "graddrop")


def test_aliases_and_hparams() -> None:
    assert isinstance(build_aggregator("IMTL-G"), IMTLG)
    assert isinstance(build_aggregator("nash-mtl"), NashMTL)
    assert build_aggregator("cagrad", c=0.2, rescale=0).c == 0.2
    assert build_aggregator("fairgrad", alpha=1.0).alpha == 1.0


def test_paper_defaults() -> None:
    assert CAGrad().c == 0.4 and CAGrad().rescale == 1
    assert FairGrad().alpha == 2.0 and not FairGrad().scale_and_clip
    assert NashMTL().max_iter == 20 and NashMTL().update_weights_every == 1 and NashMTL().solver == "ECOS"
    assert MGDA().normalization == "none"
    assert GradDrop()._leaks == [0.0]


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize(
    "bad",
    [
        torch.ones(5, dtype=torch.float64),  # 1-D
        torch.ones(1, 4, dtype=torch.float64),  # K = 1
        torch.ones(2, 3, 4, dtype=torch.float64),  # 3-D
        torch.tensor([[1.0, float("nan")], [0.0, 1.0]], dtype=torch.float64),
        torch.tensor([[1.0, 2.0], [float("inf"), 1.0]], dtype=torch.float64),
    ],
)
def test_bad_jacobian_raises_value_error(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        build_aggregator(name).aggregate(bad)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_any_non_finite_entry_raises_naming_its_row(name: str, dtype: torch.dtype, value: float) -> None:
    # aggregate() no longer scans J: a non-finite entry is caught through G (or GradDrop's column sums)
    rng = np.random.default_rng(0)
    for _ in range(4):
        j = rand_jacobian(int(rng.integers(1000)), 4, 9, shift=0.3).to(dtype)
        row, col = int(rng.integers(4)), int(rng.integers(9))
        j[row, col] = value
        with pytest.raises(ValueError, match=rf"non-finite entries in the rows of tasks \[{row}\]"):
            build_aggregator(name).aggregate(j)


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
def test_finite_jacobian_with_overflowing_gramian_raises(name: str) -> None:
    j = rand_jacobian(0, 3, 5).float() * 1e20  # finite in float32, but G = J J^T overflows
    with pytest.raises(ValueError, match="gramian has non-finite entries"):
        build_aggregator(name).aggregate(j)


def test_custom_gramian_aggregator_still_rejects_non_finite_jacobian() -> None:
    class NormalizedMean(GramianAggregator):  # does not validate its Gramian itself
        def weights(self, gramian: torch.Tensor) -> torch.Tensor:
            return 1.0 / gramian.diagonal().sqrt() / gramian.shape[0]

    j = rand_jacobian(1, 3, 6)
    torch.testing.assert_close(NormalizedMean().aggregate(j), (j / j.norm(dim=1, keepdim=True)).mean(0))
    j[2, 4] = float("nan")
    with pytest.raises(ValueError, match=r"rows of tasks \[2\]"):
        NormalizedMean().aggregate(j)


@pytest.mark.parametrize("name", METHODS)
def test_non_tensor_raises_type_error(name: str) -> None:
    with pytest.raises(TypeError):
        build_aggregator(name).aggregate(np.ones((2, 3)))


@pytest.mark.parametrize("name", GRAMIAN_METHODS)
@pytest.mark.parametrize(
    "bad",
    [torch.ones(2, 3), torch.ones(1, 1), torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]])],
)
def test_bad_gramian_raises_value_error(name: str, bad: torch.Tensor) -> None:
    with pytest.raises(ValueError):
        build_aggregator(name).weights(bad)


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_output_shape_dtype_and_finiteness(name: str, dtype: torch.dtype) -> None:
    j = rand_jacobian(3, 3, 7, shift=0.5).to(dtype)
    d = build_aggregator(name, **({"seed": 0} if name in ("graddrop", "pcgrad") else {})).aggregate(j)
    assert d.shape == (7,) and d.dtype == dtype and torch.isfinite(d).all()
    assert d.abs().sum() > 0


@pytest.mark.parametrize(
    ("name", "hparams"),
    [("imtl", {}), ("nashmtl", {}), ("fairgrad", {}), ("mgda", {"normalization": "l2"})],
)
def test_zero_norm_task_raises_value_error_naming_it(name: str, hparams: dict) -> None:
    j = rand_jacobian(0, 3, 5)
    j[1] = 0.0
    with pytest.raises(ValueError, match=r"task\(s\) \[1\]"):
        build_aggregator(name, **hparams).aggregate(j)


@pytest.mark.parametrize("name", ["cagrad", "pcgrad", "graddrop", "mgda"])
def test_zero_task_gradient_allowed_where_nothing_divides_by_it(name: str) -> None:
    j = rand_jacobian(0, 3, 5)
    j[2] = 0.0
    d = build_aggregator(name).aggregate(j)
    assert torch.isfinite(d).all()


def test_gramian_methods_use_jacobian_only_through_gramian() -> None:
    # Two Jacobians with the same Gramian (J2 = J1 Q, Q orthogonal) give the same weights.
    j1 = rand_jacobian(1, 3, 6, shift=0.3)
    q, _ = torch.linalg.qr(torch.tensor(np.random.default_rng(2).standard_normal((6, 6))))
    j2 = j1 @ q
    for name in GRAMIAN_METHODS:
        kw = {"seed": 5} if name == "pcgrad" else {}
        d1 = build_aggregator(name, **kw).aggregate(j1)
        d2 = build_aggregator(name, **kw).aggregate(j2)
        torch.testing.assert_close(d2, d1 @ q, rtol=1e-6, atol=1e-8)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", METHODS)
def test_cuda_jacobian_matches_cpu(name: str) -> None:
    j = rand_jacobian(6, 3, 1000, shift=0.3).float()
    kw = {"seed": 1} if name in ("graddrop", "pcgrad") else {}
    d_cpu = build_aggregator(name, **kw).aggregate(j)
    d_gpu = build_aggregator(name, **kw).aggregate(j.cuda())
    assert d_gpu.device.type == "cuda" and d_gpu.dtype == torch.float32
    torch.testing.assert_close(d_gpu.cpu(), d_cpu, rtol=1e-4, atol=1e-4)


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


@HYPO
@given(jacobians(), st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_mgda_permutation_and_scale(j: torch.Tensor, c: float, rnd) -> None:
    perm = list(range(j.shape[0]))
    rnd.shuffle(perm)
    w = MGDA().weights(gram(j))
    torch.testing.assert_close(MGDA().weights(gram(j[perm])), w[perm], rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(MGDA().weights(gram(c * j)), w, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(MGDA().aggregate(c * j), c * MGDA().aggregate(j), rtol=1e-7, atol=1e-9 * c)


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
    """The 2-task toy of NOTES.md sec. 4 (CAGrad version)."""
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


@HYPO
@given(jacobians(), st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_cagrad_permutation_and_scale(j: torch.Tensor, c: float, rnd) -> None:
    perm = list(range(j.shape[0]))
    rnd.shuffle(perm)
    w = CAGrad().weights(gram(j))
    torch.testing.assert_close(CAGrad().weights(gram(j[perm])), w[perm], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(CAGrad().weights(gram(c * j)), w, rtol=1e-6, atol=1e-8)


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


@HYPO
@given(jacobians(), st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_imtl_permutation_and_scale(j: torch.Tensor, c: float, rnd) -> None:
    perm = list(range(j.shape[0]))
    rnd.shuffle(perm)
    alpha = IMTLG().weights(gram(j))
    torch.testing.assert_close(IMTLG().weights(gram(j[perm])), alpha[perm], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(IMTLG().weights(gram(c * j)), alpha, rtol=1e-6, atol=1e-8)


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


@settings(max_examples=15, deadline=None)
@given(jacobians(max_k=4), st.floats(1e-3, 1e3), st.randoms(use_true_random=False))
def test_nash_permutation_and_scale(j: torch.Tensor, c: float, rnd) -> None:
    perm = list(range(j.shape[0]))
    rnd.shuffle(perm)
    alpha = NashMTL().weights(gram(j))
    torch.testing.assert_close(NashMTL().weights(gram(j[perm])), alpha[perm], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(NashMTL().weights(gram(c * j)), alpha, rtol=1e-5, atol=1e-7)


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


def test_nash_failures_raise_aggregation_error() -> None:
    j = rand_jacobian(0, 2, 3)
    with pytest.raises(AggregationError, match="not installed"):
        NashMTL(solver="NO_SUCH_SOLVER").aggregate(j)
    opposed = torch.stack([j[0], -j[0]])  # no alpha > 0 with (G alpha)_i = 1/alpha_i
    with pytest.raises(AggregationError):
        NashMTL().aggregate(opposed)


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


@HYPO
@given(jacobians(), st.floats(1e-2, 1e2), st.randoms(use_true_random=False))
def test_fairgrad_permutation_and_scale(j: torch.Tensor, c: float, rnd) -> None:
    perm = list(range(j.shape[0]))
    rnd.shuffle(perm)
    w = FairGrad().weights(gram(j))
    torch.testing.assert_close(FairGrad().weights(gram(j[perm])), w[perm], rtol=1e-6, atol=1e-10)
    # G -> c^2 G scales w by c^(-2 alpha / (alpha + 1)) (alpha = 2: c^(-4/3)).
    torch.testing.assert_close(FairGrad().weights(gram(c * j)), w * c ** (-4 / 3), rtol=1e-6, atol=1e-10)


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


# ---------------------------------------------------------------------------------------- Gramian


def test_gramian_is_j_jt_summed_by_blocks():
    """Definition: G = J J^T, for any block size (a block boundary inside P, at P, past P)."""
    from lightning_cost.aggregators import gramian

    j = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for block in (7, 50, 64):
        torch.testing.assert_close(gramian(j, block=block), j @ j.T, rtol=1e-5, atol=1e-5)
    assert gramian(j.half()).dtype == torch.float32  # at least float32, as the aggregators need


def test_gramian_and_trigger_cosines_keep_float32_accuracy_at_large_p():
    """Long float32 sums over P drift; blocked sums stay near float32 resolution (float64 reference)."""
    from lightning_cost.aggregators import gramian
    from lightning_cost.teleport import conflict_cosines

    g = torch.Generator().manual_seed(0)
    j = torch.randn(3, 3_000_000, generator=g) + 0.5  # a common mean component: the sums grow with P
    exact = j.double() @ j.double().T
    err = ((gramian(j).double() - exact).abs() / exact.abs()).max().item()
    assert err < 1e-5, err
    g0 = j.double().mean(0)
    cos = (j.double() @ g0) / (j.double().norm(dim=1) * g0.norm())
    assert (conflict_cosines(j) - cos).abs().max().item() < 1e-6
