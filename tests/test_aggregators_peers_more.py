"""TrimmedMean and PCD (Jacobian methods as TorchJD 0.18 defines them) and the loss weightings GLS,
IMTL-L and STCH (TorchJD's scalarizers, LibMTL's STCH warm-up): against TorchJD where it has the
method, against an independent computation or a hand-worked case (per-column sorting, a cvxpy QP in
parameter space for PCD, autograd for the loss weights), their defining properties, state_dict
resumes and one training run each through the mixin."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from aggregator_props import HYPO, Symmetry, assert_permutation_and_scale, gram, jacobians, rand_jacobian
from hypothesis import assume, given
from hypothesis import strategies as st
from mtl_models import TinyMTL, loader, regression_data, trainer

import lightning_cost.aggregators as aggregators
from lightning_cost.aggregators import (
    AVAILABLE,
    GLS,
    IMTLL,
    PCD,
    PEERS,
    STCH,
    Aggregator,
    GramianAggregator,
    LossWeighting,
    TrimmedMean,
    aggregator_class,
    build_aggregator,
)

CLASSES = {"trimmedmean": TrimmedMean, "pcd": PCD, "gls": GLS, "imtll": IMTLL, "stch": STCH}
KS = [2, 3, 5, 12]


def make_jacobian(k: int, seed: int = 0, shift: float = 0.0, p: int | None = None) -> torch.Tensor:
    """A float64 ``K x P`` Jacobian (``P = K + 8``), rows of different norms."""
    j = rand_jacobian(1000 * k + seed, k, k + 8 if p is None else p, shift=shift)
    return j * torch.linspace(0.5, 3.0, k, dtype=torch.float64)[:, None]


def rel_diff(a: torch.Tensor, b: torch.Tensor, j: torch.Tensor) -> float:
    return float((a - b).abs().max()) / float(j.norm(dim=1).max())


# ----------------------------------------------------------------------------- registry


@pytest.mark.parametrize("name", list(CLASSES))
def test_registry_and_exports(name: str) -> None:
    cls = CLASSES[name]
    assert aggregator_class(name) is cls and getattr(aggregators, cls.__name__) is cls
    assert cls.__name__ in aggregators.__all__ and name in PEERS and name not in AVAILABLE
    m = build_aggregator(name, **({"num_tasks": 3} if name == "imtll" else {}))
    assert type(m) is cls
    assert isinstance(m, LossWeighting) == (name in ("gls", "imtll", "stch"))
    assert isinstance(m, GramianAggregator) == (name == "pcd")
    assert m.requires_jacobian == isinstance(m, Aggregator)


def test_aliases() -> None:
    assert isinstance(build_aggregator("Trimmed-Mean"), TrimmedMean)
    assert isinstance(build_aggregator("imtl-l", num_tasks=2), IMTLL)
    assert isinstance(build_aggregator("STCH", mu=0.1), STCH)


# ----------------------------------------------------------------------------- TrimmedMean


@pytest.mark.parametrize(("k", "trim"), [(k, t) for k in (3, 5, 12) for t in (0, 1, 2, 5) if k > 2 * t])
def test_trimmed_mean_matches_torchjd(k: int, trim: int) -> None:
    agg = pytest.importorskip("torchjd.aggregation")
    for seed in range(3):
        j = make_jacobian(k, seed, shift=0.5)
        assert rel_diff(TrimmedMean(trim).aggregate(j), agg.TrimmedMean(trim)(j), j) <= 1e-14
        jf = j.float()
        torch.testing.assert_close(TrimmedMean(trim).aggregate(jf), agg.TrimmedMean(trim)(jf), rtol=1e-6, atol=1e-6)


def test_trimmed_mean_hand_case_and_column_by_column() -> None:
    j = torch.tensor([[1.0, 10.0], [2.0, -5.0], [3.0, 0.0], [100.0, 1.0]], dtype=torch.float64)
    # column 0 sorted [1, 2, 3, 100] -> mean(2, 3); column 1 sorted [-5, 0, 1, 10] -> mean(0, 1)
    torch.testing.assert_close(TrimmedMean(1).aggregate(j), torch.tensor([2.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(TrimmedMean(0).aggregate(j), j.mean(0))
    j = make_jacobian(7, shift=-0.3).numpy()
    for trim in range(4):  # per column in plain Python: drop the extremes, average the rest
        expected = [float(np.mean(sorted(col)[trim : 7 - trim])) for col in j.T]
        np.testing.assert_allclose(TrimmedMean(trim).aggregate(torch.tensor(j)).numpy(), expected, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("seed", range(5))
def test_trimmed_mean_is_robust_to_trim_number_arbitrary_gradients(seed: int) -> None:
    """Yin et al.'s point: with at most ``trim_number`` corrupted rows, each coordinate of the result
    lies within the range of the honest rows' values, however large the corrupted ones are."""
    honest = make_jacobian(5, seed)
    rng = np.random.default_rng(seed)
    bad = torch.tensor(rng.choice([-1e9, 1e9], size=(2, honest.shape[1])) * rng.random((2, honest.shape[1])))
    j = torch.cat([honest, bad])[torch.randperm(7, generator=torch.Generator().manual_seed(seed))]
    d = TrimmedMean(2).aggregate(j)
    assert bool((d >= honest.min(0).values - 1e-12).all()) and bool((d <= honest.max(0).values + 1e-12).all())


def test_trimmed_mean_validation() -> None:
    with pytest.raises(ValueError, match="K=4"):
        TrimmedMean(2).aggregate(make_jacobian(4))
    with pytest.raises(ValueError, match=r"rows of tasks \[1\]"):
        TrimmedMean(1).aggregate(torch.tensor([[1.0, 2.0], [float("nan"), 0.0], [3.0, 4.0]]))
    for bad in (1.0, True, "1"):
        with pytest.raises(TypeError):
            TrimmedMean(bad)
    with pytest.raises(ValueError, match=">= 0"):
        TrimmedMean(-1)
    with pytest.raises(TypeError):
        TrimmedMean().aggregate(np.ones((3, 2)))


@HYPO
@given(j=jacobians(), c=st.sampled_from([1e-3, 0.5, 1e3]), perm=st.randoms(use_true_random=False))
def test_trimmed_mean_permutation_and_scale(j: torch.Tensor, c: float, perm) -> None:
    assume(j.shape[0] >= 3)
    order = list(range(j.shape[0]))
    perm.shuffle(order)
    assert_permutation_and_scale(TrimmedMean, j, c, order, Symmetry(rtol=1e-12, atol=1e-14))


# ----------------------------------------------------------------------------- PCD


def torchjd_pcd(**kw):
    agg = pytest.importorskip("torchjd.aggregation")
    return agg.PCD(**{k: torch.tensor(v, dtype=torch.float64) if isinstance(v, list) else v for k, v in kw.items()})


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shift", [-1.0, 0.0, 1.0])
@pytest.mark.parametrize("hp", [{}, {"tau": 0.5, "beta": 0.9}, {"tau": 1.0, "eps": 0.0}, {"tau": "vector"}])
def test_pcd_matches_torchjd_over_a_sequence(k: int, shift: float, hp: dict) -> None:
    """The same sequence of Jacobians through both (the running mean evolves): directions to 1e-5
    of the largest gradient norm (measured: at most 4e-15)."""
    if hp.get("tau") == "vector":
        hp = {"tau": [float(x) for x in np.linspace(0.0, 0.8, k - 1)]}
    ours, theirs = PCD(**hp), torchjd_pcd(**hp)
    for t in range(6):
        j = make_jacobian(k, t, shift=shift) * (1.0 + 0.5 * t)
        assert rel_diff(ours.aggregate(j), theirs(j), j) <= 1e-5, t
    jf = make_jacobian(k, 9, shift=shift).float()  # float32 input: the Gramian's precision sets the cut-offs
    torch.testing.assert_close(ours.aggregate(jf), theirs(jf), rtol=1e-4, atol=1e-5 * float(jf.norm(dim=1).max()))


def pcd_by_cvxpy(j: torch.Tensor, sq_means: np.ndarray, steps: int, beta: float, eps: float, tau) -> np.ndarray:
    """PCD's definition in parameter space: normalise by the bias-corrected mean, solve the QP with
    cvxpy (not on the Gramian), rescale to ||g_1||."""
    cp = pytest.importorskip("cvxpy")
    x = j.numpy()
    scale = 1.0 / np.sqrt(sq_means / (1.0 - beta**steps) + eps)
    xt = x * scale[:, None]
    taus = np.broadcast_to(np.asarray(tau, dtype=np.float64), (x.shape[0] - 1,))
    d = cp.Variable(x.shape[1])
    cons = [xt[i] @ d >= taus[i - 1] * (xt[i] @ xt[i]) for i in range(1, x.shape[0])]
    prob = cp.Problem(cp.Minimize(0.5 * cp.sum_squares(d - xt[0])), cons)
    prob.solve(solver=cp.CLARABEL, tol_gap_abs=1e-12, tol_gap_rel=1e-12, tol_feas=1e-12)
    assert prob.status == "optimal"
    return d.value * np.linalg.norm(x[0]) / np.linalg.norm(d.value)


@pytest.mark.parametrize("k", [2, 3, 5, 8])
@pytest.mark.parametrize("tau", [0.02, 0.3, 1.0])
def test_pcd_is_the_priority_qp_solved_in_parameter_space(k: int, tau: float) -> None:
    beta, eps = 0.9, 1e-8
    pcd = PCD(tau=tau, beta=beta, eps=eps)
    sq_means = np.zeros(k)
    for t in range(4):
        j = make_jacobian(k, t, shift=-0.8)
        sq_means = beta * sq_means + (1 - beta) * (j.norm(dim=1) ** 2).numpy()  # the running mean by hand
        w = copy.deepcopy(pcd).weights(gram(j)).numpy()  # the same step's weights, on a copy of the state
        d = pcd.aggregate(j)
        np.testing.assert_allclose(pcd.sq_norm_mean, sq_means, rtol=1e-13)
        expected = pcd_by_cvxpy(j, sq_means, t + 1, beta, eps, tau)
        assert np.abs(d.numpy() - expected).max() <= 1e-6 * float(j.norm(dim=1).max())
        # the defining property on our own d~ = d / c (c = w_1 / s_1 > 0, the rescaling to ||g_1||):
        # every secondary task gets its share tau ||g~_j||^2 of the first-order progress
        scale = 1.0 / np.sqrt(sq_means / (1 - beta ** (t + 1)) + eps)
        xt = j.numpy() * scale[:, None]
        d_tilde = d.numpy() * scale[0] / w[0]
        slack = xt[1:] @ d_tilde - tau * (xt[1:] ** 2).sum(1)
        assert float(slack.min()) >= -1e-8 * float((xt**2).sum(1).max()), slack


def test_pcd_special_cases() -> None:
    j = make_jacobian(4, shift=0.5)
    zero_primary = j.clone()
    zero_primary[0] = 0.0
    assert torch.equal(PCD().aggregate(zero_primary), torch.zeros(j.shape[1], dtype=torch.float64))
    # two opposite secondary gradients with tau > 0: no d gives both progress, so d = g_1
    g = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.5], [0.0, -2.0, -1.0]], dtype=torch.float64)
    torch.testing.assert_close(PCD(tau=0.1).aggregate(g), g[0], rtol=1e-12, atol=1e-14)
    # no conflict: g_1 already gives every task its share, so d = g_1
    aligned = torch.tensor([[1.0, 0.2, 0.0], [1.0, 0.0, 0.3], [0.8, 0.1, 0.1]], dtype=torch.float64)
    torch.testing.assert_close(PCD(tau=0.02).aggregate(aligned), aligned[0], rtol=1e-12, atol=1e-14)
    # hand case, K = 2, beta -> normalised by the first step: g1 = e1, g2 = (-1, 1)/sqrt2 (unit norms);
    # tau = 0: d~ = e1 + mu g2 with g2 . d~ = 0 -> mu = 1/sqrt2, d~ = (1/2, 1/2), rescaled to norm 1
    h = torch.tensor([[1.0, 0.0], [-(0.5**0.5), 0.5**0.5]], dtype=torch.float64)
    torch.testing.assert_close(PCD(tau=0.0, eps=0.0).aggregate(h), torch.tensor([0.5**0.5, 0.5**0.5], dtype=torch.float64))


def test_pcd_state_dict_resumes_bit_identically() -> None:
    seq = [make_jacobian(4, t, shift=-0.5) for t in range(6)]
    a = PCD(tau=0.3, beta=0.8)
    for j in seq[:3]:
        a.aggregate(j)
    state = a.state_dict()
    assert set(state) == {"_extra_state"} and state["_extra_state"]["steps"] == 3
    b = PCD(tau=0.3, beta=0.8)
    b.load_state_dict(state)
    for j in seq[3:]:
        assert torch.equal(a.aggregate(j), b.aggregate(j))
    assert np.array_equal(a.sq_norm_mean, b.sq_norm_mean) and a.steps == b.steps == 6
    a.aggregate(make_jacobian(3))  # a new K restarts the running mean
    assert a.steps == 1 and a.sq_norm_mean.shape == (3,)
    # a non-finite Gramian raises and leaves the state alone
    before = a.sq_norm_mean.copy()
    with pytest.raises(ValueError, match="non-finite"):
        a.weights(torch.full((3, 3), float("nan"), dtype=torch.float64))
    assert a.steps == 1 and np.array_equal(a.sq_norm_mean, before)


def test_pcd_validation() -> None:
    for make in (lambda: PCD(tau=-0.1), lambda: PCD(tau=1.5), lambda: PCD(tau=[0.1, 2.0]), lambda: PCD(beta=1.0),
                 lambda: PCD(beta=-0.1), lambda: PCD(eps=-1.0), lambda: PCD(eps=float("inf"))):
        with pytest.raises(ValueError):
            make()
    for bad in ("0.1", True, [0.1, "x"], []):
        with pytest.raises(TypeError):
            PCD(tau=bad)
    with pytest.raises(ValueError, match="one per secondary task"):
        PCD(tau=[0.1, 0.2]).aggregate(make_jacobian(4))


@HYPO
@given(j=jacobians(), c=st.sampled_from([1e-3, 0.5, 1e3]))
def test_pcd_scale_free_and_gramian_only(j: torch.Tensor, c: float) -> None:
    sym = Symmetry(permutes=False, rtol=1e-7, atol=1e-9)
    assert_permutation_and_scale(lambda: PCD(eps=0.0), j, c, list(range(j.shape[0])), sym)
    q, _ = torch.linalg.qr(torch.tensor(np.random.default_rng(0).standard_normal((j.shape[1], j.shape[1]))))
    torch.testing.assert_close(PCD().aggregate(j @ q), PCD().aggregate(j) @ q, rtol=1e-6, atol=1e-9)


# ----------------------------------------------------------------------------- GLS


def test_gls_hand_case_autograd_and_torchjd() -> None:
    losses = torch.tensor([1.0, 4.0, 16.0], dtype=torch.float64)
    assert float(GLS()(losses)) == pytest.approx(4.0, rel=1e-14)  # 64^(1/3)
    expected = torch.tensor([4 / 3, 1 / 3, 1 / 12], dtype=torch.float64)  # 4 / (3 L_k)
    torch.testing.assert_close(GLS().loss_weights(losses), expected, rtol=1e-14, atol=0)
    for seed in range(5):
        x = torch.rand(6, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 10 + 1e-3
        torch.testing.assert_close(GLS().loss_weights(x), LossWeighting.loss_weights(GLS(), x), rtol=1e-12, atol=0)
        w = GLS().loss_weights(x)
        torch.testing.assert_close(w * x, torch.full_like(x, float(GLS()(x)) / 6), rtol=1e-12, atol=0)  # equal w_k L_k
        scalar = pytest.importorskip("torchjd.scalarization")
        torch.testing.assert_close(GLS()(x), scalar.GeometricMean()(x), rtol=1e-14, atol=0)
    big = torch.full((200,), 1e3, dtype=torch.float64)  # the plain product would overflow
    assert float(GLS()(big)) == pytest.approx(1e3)


@pytest.mark.parametrize("bad", [[1.0, 0.0], [2.0, -1.0, 3.0]])
def test_gls_needs_positive_losses(bad: list[float]) -> None:
    for call in (GLS(), GLS().loss_weights):
        with pytest.raises(ValueError, match="strictly positive"):
            call(torch.tensor(bad))
    with pytest.raises(ValueError, match="finite"):
        GLS()(torch.tensor([1.0, float("nan")]))


# ----------------------------------------------------------------------------- IMTL-L


def test_imtll_objective_gradient_and_stationary_point() -> None:
    losses = torch.tensor([0.2, 1.0, 5.0])
    m = IMTLL(num_tasks=3)
    assert float(m(losses).detach()) == pytest.approx(6.2)  # s = 0: sum L
    with torch.no_grad():
        m.s.copy_(torch.tensor([0.3, -0.2, 1.0]))
    (gs,) = torch.autograd.grad(m(losses), m.s)
    torch.testing.assert_close(gs, torch.exp(m.s.detach()) * losses - 1.0)  # d/ds_k = e^s_k L_k - 1, by hand
    torch.testing.assert_close(m.loss_weights(losses), torch.exp(m.s.detach()))
    torch.testing.assert_close(m.loss_weights(losses), LossWeighting.loss_weights(m, losses))
    with torch.no_grad():
        m.s.copy_(-losses.log())
    (gs,) = torch.autograd.grad(m(losses), m.s)
    torch.testing.assert_close(gs, torch.zeros(3), atol=1e-6, rtol=0)
    m = IMTLL(num_tasks=3)  # and gradient descent on s reaches it: every scaled loss e^s L -> 1
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(800):
        opt.zero_grad()
        m(losses).backward()
        opt.step()
    torch.testing.assert_close(m.s.detach(), -losses.log(), rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(m.loss_weights(losses) * losses, torch.ones(3), rtol=1e-3, atol=1e-3)


def test_imtll_matches_torchjd_value_and_gradients() -> None:
    scalar = pytest.importorskip("torchjd.scalarization")
    ours, theirs = IMTLL(num_tasks=4), scalar.IMTLL(4)
    with torch.no_grad():
        ours.s.copy_(torch.tensor([0.5, -1.0, 0.0, 2.0]))
        theirs.log_scale.copy_(ours.s)
    x = torch.tensor([0.3, 2.0, 1.0, 0.1], requires_grad=True)
    a, b = ours(x), theirs(x)
    torch.testing.assert_close(a, b)
    ga = torch.autograd.grad(a, [x, ours.s])
    gb = torch.autograd.grad(b, [x, theirs.log_scale])
    for u, v in zip(ga, gb, strict=True):
        torch.testing.assert_close(u, v)


def test_imtll_validation_and_state() -> None:
    for bad, err in ((1, ValueError), (2.0, TypeError), (True, TypeError)):
        with pytest.raises(err):
            IMTLL(num_tasks=bad)
    with pytest.raises(TypeError):
        build_aggregator("imtll")  # K is required: the parameters must exist before the optimizer
    with pytest.raises(ValueError, match="finite"):
        IMTLL(num_tasks=2, init_s=float("nan"))
    with pytest.raises(ValueError, match="built for 3 tasks"):
        IMTLL(num_tasks=3)(torch.ones(2))
    m = IMTLL(num_tasks=2, init_s=0.5)
    assert [n for n, _ in m.named_parameters()] == ["s"] and "s" in m.state_dict()
    fresh = IMTLL(num_tasks=2)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh.s, m.s)


# ----------------------------------------------------------------------------- STCH


def run_epochs(m: STCH, epochs: list[list[list[float]]]) -> None:
    for steps in epochs:
        for ls in steps:
            m.observe(torch.tensor(ls, dtype=torch.float64))
        m.on_epoch_end()


def test_stch_worked_warm_up_and_weights() -> None:
    m = STCH(mu=1.0, warmup_epoch=1)
    x = torch.tensor([2.0, 8.0], dtype=torch.float64)
    run_epochs(m, [[[2.0, 4.0]]])  # epoch 0: warm-up, not recorded
    assert m.norm is None and float(m(x)) == pytest.approx(math.log(16.0))  # sum log L
    torch.testing.assert_close(m.loss_weights(x), 1.0 / x)
    run_epochs(m, [[[1.0, 2.0], [3.0, 6.0]]])  # epoch 1 (= warmup_epoch): n = [2, 4]
    torch.testing.assert_close(m.norm, torch.tensor([2.0, 4.0], dtype=torch.float64))
    # f = log(L / n) = [0, log 2]: objective 2 log(1 + 2) = 2 log 3; weights 2 softmax(f) / L = [1/3, 1/6]
    assert float(m(x)) == pytest.approx(2 * math.log(3.0), rel=1e-14)
    torch.testing.assert_close(m.loss_weights(x), torch.tensor([1 / 3, 1 / 6], dtype=torch.float64))
    m.on_epoch_end()  # nothing observed: not counted, nothing changes
    run_epochs(m, [[[10.0, 10.0]]])
    torch.testing.assert_close(m.norm, torch.tensor([2.0, 4.0], dtype=torch.float64))
    assert m.epochs == 3


@pytest.mark.parametrize("mu", [0.01, 0.5, 1.0])
@pytest.mark.parametrize("preference", [None, [0.2, 0.3, 0.5]])
def test_stch_matches_torchjd_and_autograd(mu: float, preference) -> None:
    scalar = pytest.importorskip("torchjd.scalarization")
    m = STCH(mu=mu, warmup_epoch=0, preference=preference)
    run_epochs(m, [[[1.0, 2.0, 3.0], [3.0, 2.0, 1.0]]])  # n = [2, 2, 2]
    w = torch.ones(3, dtype=torch.float64) if preference is None else torch.tensor(preference, dtype=torch.float64)
    theirs = scalar.STCH(mu, weights=w)
    for seed in range(4):
        x = (torch.rand(3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4 + 0.1).requires_grad_(True)
        a, b = m(x), 3 * theirs((x / 2.0).log())  # ours: K times TorchJD's on log(L / n)
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        (ga,), (gb,) = torch.autograd.grad(a, x), torch.autograd.grad(b, x)
        torch.testing.assert_close(ga, gb, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(m.loss_weights(x), ga, rtol=1e-10, atol=1e-12)  # the closed form


def test_stch_is_a_smooth_upper_bound_of_the_tchebycheff_max() -> None:
    x = torch.tensor([0.5, 3.0, 1.2, 2.2], dtype=torch.float64)
    for mu in (1.0, 0.1, 0.01, 1e-4):
        m = STCH(mu=mu, warmup_epoch=0, preference=[1.0, 0.5, 2.0, 1.0])
        run_epochs(m, [[[1.0, 2.0, 1.0, 2.0]]])
        tch = 4 * float((torch.tensor([1.0, 0.5, 2.0, 1.0]) * (x / m.norm).log()).max())
        assert tch - 1e-12 <= float(m(x)) <= tch + 4 * mu * math.log(4) + 1e-12
    # as mu -> 0 the weight goes to the task furthest behind (task 2: 2 log 1.2 > 0.5 log 1.5 > log 1.1)
    w = m.loss_weights(x)
    assert int(w.argmax()) == 2 and float(w[2] * x[2]) == pytest.approx(4 * 2.0, rel=1e-6)


def test_stch_state_dict_resumes_bit_identically() -> None:
    gen = torch.Generator().manual_seed(0)
    seq = [torch.rand(3, generator=gen, dtype=torch.float64) + 0.5 for _ in range(12)]

    def drive(m: STCH, steps: list[torch.Tensor], start: int) -> list[torch.Tensor]:
        out = []
        for i, ls in enumerate(steps, start):
            out += [m(ls), m.loss_weights(ls)]
            m.observe(ls)
            if i % 3 == 2:
                m.on_epoch_end()
        return out

    for cut in (4, 7):  # mid-way through the recording epoch, and after the warm-up
        a = STCH(mu=0.3, warmup_epoch=1)
        drive(a, seq[:cut], 0)
        b = STCH(mu=0.3, warmup_epoch=1)
        b.load_state_dict(a.state_dict())
        for u, v in zip(drive(a, seq[cut:], cut), drive(b, seq[cut:], cut), strict=True):
            assert torch.equal(u, v)
        assert a.norm is not None and torch.equal(a.norm, b.norm) and a.epochs == b.epochs == 4


def test_stch_validation() -> None:
    for make, err in ((lambda: STCH(mu=0.0), ValueError), (lambda: STCH(mu=float("inf")), ValueError),
                      (lambda: STCH(mu="1"), TypeError), (lambda: STCH(warmup_epoch=-1), ValueError),
                      (lambda: STCH(warmup_epoch=1.0), TypeError), (lambda: STCH(preference=[1.0, -1.0]), ValueError),
                      (lambda: STCH(preference=[1.0]), ValueError)):
        with pytest.raises(err):
            make()
    with pytest.raises(ValueError, match="strictly positive"):
        STCH()(torch.tensor([1.0, 0.0]))
    with pytest.raises(ValueError, match="2 preference weights"):
        STCH(preference=[1.0, 2.0])(torch.ones(3))
    with pytest.raises(ValueError, match="finite"):
        STCH().observe(torch.tensor([1.0, float("nan")]))


# ----------------------------------------------------------------------------- through the mixin


def fit(method, engine: str = "auto", k: int = 3, epochs: int = 1, **kw) -> TinyMTL:
    torch.manual_seed(0)
    model = TinyMTL(k=k, method=method, engine=engine, gramian={"path": "gram"}, optimizer="sgd", **kw)
    trainer(max_epochs=epochs).fit(model, loader(regression_data(n=96, k=k), batch_size=32))
    return model


def test_pcd_same_steps_on_both_engines() -> None:
    gram_model, jac_model = fit(PCD(tau=0.2), "gramian"), fit(PCD(tau=0.2), "jacobian")
    assert gram_model.mtl_uses_gramian_engine and gram_model.mtl_step.jacobian is None
    torch.testing.assert_close(gram_model.mtl_step.direction, jac_model.mtl_step.direction, rtol=1e-4, atol=1e-6)
    for a, b in zip(gram_model.parameters(), jac_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    assert gram_model.mtl_method.steps == jac_model.mtl_method.steps == 3
    j = jac_model.mtl_step.jacobian.double()
    assert float(j[0] @ jac_model.mtl_step.direction.double()) > 0.0  # the primary task descends


def test_trimmed_mean_trains_on_the_jacobian_engine() -> None:
    model = fit("trimmedmean", k=4)
    j = model.mtl_step.jacobian
    torch.testing.assert_close(model.mtl_step.direction, TrimmedMean(1).aggregate(j), rtol=1e-5, atol=1e-7)
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["gls", "imtll", "stch"])
def test_loss_weightings_train_through_the_mixin(name: str) -> None:
    method = STCH(warmup_epoch=0) if name == "stch" else name
    model = fit(method, k=2, epochs=3)
    m = model.mtl_method
    assert model.mtl_step is not None and torch.isfinite(model.mtl_step.losses).all()
    if isinstance(m, IMTLL):  # its parameter is in the optimizer (self.parameters()) and was trained
        assert not torch.equal(m.s.detach(), torch.zeros(2))
    if isinstance(m, STCH):  # epoch 0 gave n; epochs 1-2 trained STCH
        assert m.epochs == 2 and m.norm is not None and m.norm.shape == (2,)
