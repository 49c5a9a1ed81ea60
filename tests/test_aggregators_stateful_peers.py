"""MoDo, SDMGrad and ExcessMTL (stateful methods as TorchJD 0.18 defines them, on one mini-batch's J):
against TorchJD over sequences of calls, one or two steps by hand in numpy (a bisection projection onto the
simplex, not the library's sort), their defining properties (MoDo and SDMGrad with lambda_ = 0 reach MGDA's
weights on a fixed G; ExcessMTL's scale processing), the first call's symmetries, bit-identical
``state_dict`` resumption, and a short training run through the mixin."""

from __future__ import annotations

import io
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from aggregator_props import Symmetry, assert_permutation_and_scale, gram, rand_jacobian, ready
from mtl_models import TinyMTL, loader, regression_data, trainer

from lightning_cost.aggregators import MGDA, ExcessMTL, GramianAggregator, MoDo, SDMGrad, build_aggregator

KS = [2, 3, 5, 12]
SHIFTS = [-1.0, 0.0, 1.0]  # a common component of either sign, or none


def sequence(k: int, shift: float, n: int = 6, p: int | None = None) -> list[torch.Tensor]:
    """``n`` float64 ``K x P`` Jacobians, one per step (``P = K + 8`` by default)."""
    return [rand_jacobian(100 * k + t, k, k + 8 if p is None else p, shift) for t in range(n)]


def bisect_simplex(y: np.ndarray) -> np.ndarray:
    """The projection onto the simplex as ``max(y - theta, 0)`` with ``theta`` found by bisection."""
    lo, hi = float(y.min()) - 1.0, float(y.max())
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(y - mid, 0.0).sum() > 1.0 else (lo, mid)
    return np.maximum(y - 0.5 * (lo + hi), 0.0)


def on_simplex(w: torch.Tensor, tol: float = 1e-12) -> bool:
    return bool((w >= -tol).all()) and abs(float(w.sum()) - 1.0) <= tol


# ----------------------------------------------------------------------------- against TorchJD

#: (our method, TorchJD's, tolerance on the weights / direction); measured maxima in the comments
TORCHJD_CASES = {
    "modo": (lambda: MoDo(), lambda agg: agg.MoDoWeighting(), 1e-12),  # measured <= 1.2e-15
    "modo-small": (lambda: MoDo(gamma=0.02, rho=0.0), lambda agg: agg.MoDoWeighting(0.02, 0.0), 1e-12),  # 2.2e-16
    # lr = 10 bounces between faces, so rounding differences can grow over calls: measured 1.9e-10 here,
    # up to 1.3e-6 on other random sequences (K = 3)
    "sdmgrad": (lambda: SDMGrad(), lambda agg: agg.SDMGradWeighting(), 1e-5),
    "sdmgrad-pref": (lambda: SDMGrad(lr=1.0, momentum=0.2, n_iter=5, lambda_=0.5, pref_vector=None),  # 5.6e-16
                     lambda agg: agg.SDMGradWeighting(1.0, 0.2, 5, 0.5), 1e-10),
    "excessmtl": (lambda: ExcessMTL(), lambda agg: agg.ExcessMTL(), 1e-12),  # measured 0 (both)
    "excessmtl-warmup": (lambda: ExcessMTL(0.5, 2), lambda agg: agg.ExcessMTL(0.5, 2), 1e-12),
}


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("shift", SHIFTS)
@pytest.mark.parametrize("case", list(TORCHJD_CASES))
def test_matches_torchjd_over_a_sequence(case: str, shift: float, k: int) -> None:
    agg = pytest.importorskip("torchjd.aggregation")
    make_ours, make_theirs, tol = TORCHJD_CASES[case]
    ours, theirs = make_ours(), make_theirs(agg)
    for j in sequence(k, shift):
        if isinstance(ours, GramianAggregator):
            g = gram(j)
            g = 0.5 * (g + g.T)  # exactly symmetric, as our weights() makes it
            w, w_theirs = ours.weights(g), theirs(g)
            assert float((w - w_theirs).abs().max()) <= tol
        else:
            d, d_theirs = ours.aggregate(j), theirs(j)
            assert float((d - d_theirs).abs().max()) <= tol * float(j.norm(dim=1).max())


def test_sdmgrad_preference_vector_matches_torchjd() -> None:
    agg = pytest.importorskip("torchjd.aggregation")
    pref = [0.5, 0.2, 0.2, 0.1]
    ours = SDMGrad(lr=2.0, lambda_=1.0, pref_vector=pref)
    theirs = agg.SDMGradWeighting(2.0, 0.5, 20, 1.0, torch.tensor(pref, dtype=torch.float64))
    for j in sequence(4, 0.5):
        g = gram(j)
        g = 0.5 * (g + g.T)
        assert float((ours.weights(g) - theirs(g)).abs().max()) <= 1e-10


# ----------------------------------------------------------------------------- by hand


def test_modo_two_steps_by_hand() -> None:
    gamma, rho = 0.3, 0.2
    js = sequence(3, 0.5, n=2, p=5)
    lam = np.full(3, 1.0 / 3.0)
    m = MoDo(gamma=gamma, rho=rho)
    for j in js:
        g = (j @ j.T).numpy()
        lam = bisect_simplex(lam - gamma * (g @ lam + rho * lam))
        np.testing.assert_allclose(m.weights(gram(j)).numpy(), lam, atol=1e-12)
    np.testing.assert_allclose(MoDo(gamma, rho).aggregate(js[0]).numpy(),
                               js[0].numpy().T @ bisect_simplex(np.full(3, 1 / 3) - gamma * ((js[0] @ js[0].T).numpy() + rho * np.eye(3)) @ np.full(3, 1 / 3)),
                               atol=1e-12)


def test_sdmgrad_one_call_by_hand() -> None:
    lr, mom, n_iter, lam_ = 0.7, 0.4, 3, 0.3
    pref = np.array([0.6, 0.3, 0.1])
    j = rand_jacobian(7, 3, 6, shift=-0.4)
    g = (j @ j.T).numpy()
    a = g / (np.sqrt(np.diag(g)).mean() ** 2 + 1e-8)
    w, v = np.full(3, 1.0 / 3.0), np.zeros(3)
    for _ in range(n_iter):
        v = mom * v + a @ (w + lam_ * pref)
        w = bisect_simplex(w - lr * v)
    expected = (w + lam_ * pref) / (1 + lam_)
    m = SDMGrad(lr=lr, momentum=mom, n_iter=n_iter, lambda_=lam_, pref_vector=list(pref))
    np.testing.assert_allclose(m.aggregate(j).numpy(), j.numpy().T @ expected, atol=1e-12)
    np.testing.assert_allclose(m.w, w, atol=1e-12)  # the next call starts from w


def test_excessmtl_steps_by_hand() -> None:
    eta = 0.7
    js = [j.numpy() for j in sequence(3, 0.3, n=4, p=5)]
    # n_warmup_steps = 0: the first estimate is the baseline and the first update uses it raw
    s = np.zeros_like(js[0])
    w = np.full(3, 1.0 / 3.0)
    m = ExcessMTL(robust_step_size=eta)
    for t, j in enumerate(js):
        s = s + j**2
        e = (j**2 / np.sqrt(s + 1e-7)).sum(axis=1)
        if t == 0:
            base = e
        else:
            e = e / (base + 1e-7)
        w = w * np.exp(eta * e)
        w = w / w.sum()
        np.testing.assert_allclose(m.aggregate(torch.tensor(j)).numpy(), j.T @ w, rtol=1e-12, atol=1e-12)
    # n_warmup_steps = 2: two calls of the mean gradient, then the mean warm-up estimate is the baseline
    m = ExcessMTL(robust_step_size=eta, n_warmup_steps=2)
    s, warm = np.zeros_like(js[0]), []
    for t, j in enumerate(js[:3]):
        s = s + j**2
        e = (j**2 / np.sqrt(s + 1e-7)).sum(axis=1)
        d = m.aggregate(torch.tensor(j)).numpy()
        if t < 2:
            warm.append(e)
            np.testing.assert_allclose(d, j.mean(axis=0), atol=1e-12)
        else:
            w = np.exp(eta * e / (np.mean(warm, axis=0) + 1e-7))
            np.testing.assert_allclose(d, j.T @ (w / w.sum()), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- defining properties


@pytest.mark.parametrize("k", [3, 5])
def test_modo_and_sdmgrad_reach_mgda_on_a_fixed_gramian(k: int) -> None:
    """On a fixed G, MoDo's steps are projected gradient descent on MGDA's objective (plus rho/2 ||w||^2), and
    SDMGrad with lambda_ = 0 is the same descent: both end at the min-norm weights (of G + rho I)."""
    j = rand_jacobian(3 * k, k, k + 4, shift=0.3)
    g = gram(j)
    step = 1.0 / float(torch.linalg.eigvalsh(g).max())
    modo = MoDo(gamma=step, rho=0.0)
    modo_rho = MoDo(gamma=step / 2, rho=0.5 / step)
    for _ in range(5000):
        w, w_rho = modo.weights(g), modo_rho.weights(g)
    assert on_simplex(w) and on_simplex(w_rho)
    torch.testing.assert_close(w, MGDA().weights(g), rtol=0, atol=1e-6)
    torch.testing.assert_close(w_rho, MGDA().weights(g + 0.5 / step * torch.eye(k, dtype=g.dtype)), rtol=0, atol=1e-6)
    sdm = SDMGrad(lr=0.2, momentum=0.0, n_iter=500, lambda_=0.0)
    for _ in range(10):
        w = sdm.weights(g)
    torch.testing.assert_close(w, MGDA().weights(g), rtol=0, atol=1e-6)


@pytest.mark.parametrize("k", KS)
def test_weights_stay_on_the_simplex(k: int) -> None:
    lam_ = 0.3
    modo, sdm, sdm_pref = MoDo(), SDMGrad(lambda_=lam_), SDMGrad(lambda_=lam_, pref_vector=[1.0] + [0.0] * (k - 1))
    for j in sequence(k, 0.0):
        g = gram(j)
        assert on_simplex(modo.weights(g))
        w = sdm.weights(g)
        assert on_simplex(w) and bool((w >= lam_ / k / (1 + lam_) - 1e-12).all())  # w + lambda_ w_pref, over 1 + lambda_
        w = sdm_pref.weights(g)
        assert float(w[0]) >= lam_ / (1 + lam_) - 1e-12 and abs(float(w.sum()) - (1 + lam_) / (1 + lam_)) < 1e-12
    # ExcessMTL's weights, read back from d = J^T w with an invertible square J
    m = ExcessMTL()
    for t in range(4):
        j = rand_jacobian(t, k, k, shift=0.2)
        w = torch.linalg.solve(j.T, m.aggregate(j))
        assert on_simplex(w, tol=1e-8)


def test_excessmtl_scale_processing() -> None:
    """Dividing by each task's first estimate puts the tasks on one scale: the same J again gives every task
    (nearly) the same E / E_0 = 1/sqrt(2), a common factor the softmax removes, so the weights stay; and a
    task whose gradient stays large, while the others' shrink, gains weight every step."""
    j = rand_jacobian(4, 3, 6)
    m = ExcessMTL()
    m.aggregate(j)
    w1 = m.state["weights"].clone()
    m.aggregate(j)
    e_ratio = (j**2 / torch.sqrt(2 * j**2 + 1e-7)).sum(1) / ((j**2 / torch.sqrt(j**2 + 1e-7)).sum(1) + 1e-7)
    assert float(e_ratio.max() - e_ratio.min()) < 1e-6  # one ratio for all tasks ...
    torch.testing.assert_close(m.state["weights"], w1, rtol=1e-6, atol=0)  # ... so the weights stay
    m, last = ExcessMTL(), 0.0
    for t in range(6):
        jt = j.clone()
        jt[1:] *= 0.5**t  # tasks 1 and 2 converge, task 0 does not
        m.aggregate(jt)
        w0 = float(m.state["weights"][0])
        assert w0 > last
        last = w0


# ----------------------------------------------------------------------------- first-call symmetries, degenerate input

SYMMETRY = {"modo": Symmetry(scale=False, rtol=1e-9, atol=1e-12), "sdmgrad": Symmetry(scale=False, rtol=1e-7, atol=1e-9),
            "excessmtl": Symmetry(scale=False, rtol=1e-9, atol=1e-12),
            # loss-aware (equal losses observed first, see aggregator_props.ready)
            "gradnorm": Symmetry(rtol=1e-12, atol=1e-14), "dbmtl": Symmetry(rtol=1e-9, atol=1e-12),
            "moco": Symmetry(weight_power=-1.0, rtol=1e-9, atol=1e-12)}


@pytest.mark.parametrize("name", list(SYMMETRY))
@pytest.mark.parametrize("k", [2, 3, 5])
def test_first_call_permutes_with_the_tasks(name: str, k: int) -> None:
    for seed in range(5):
        j = rand_jacobian(seed, k, k + 3, shift=[-0.5, 0.0, 1.0][seed % 3])
        perm = torch.randperm(k, generator=torch.Generator().manual_seed(seed)).tolist()
        assert_permutation_and_scale(lambda: build_aggregator(name), j, 1.0, perm, SYMMETRY[name])


def test_sdmgrad_first_call_is_scale_free_while_the_eps_is_negligible() -> None:
    for seed in range(5):
        j = rand_jacobian(seed, 4, 8, shift=0.5)
        w = SDMGrad().weights(gram(j))
        for c in (0.5, 30.0):
            torch.testing.assert_close(SDMGrad().weights(gram(c * j)), w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", list(SYMMETRY))
def test_finite_in_finite_out_and_non_finite_rejected(name: str) -> None:
    m = ready(build_aggregator(name), 3)
    for j in sequence(3, 0.5, n=3):
        j[1] = 0.0  # a zero task gradient
        assert torch.isfinite(m.aggregate(j)).all()
    assert torch.isfinite(ready(build_aggregator(name), 3).aggregate(torch.zeros(3, 4, dtype=torch.float64))).all()
    assert ready(build_aggregator(name), 3).aggregate(rand_jacobian(0, 3, 5).float()).dtype == torch.float32
    bad = rand_jacobian(0, 3, 5)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError):
        build_aggregator(name).aggregate(bad)


# ----------------------------------------------------------------------------- state


MAKERS = {"modo": lambda: MoDo(gamma=0.2, rho=0.05), "sdmgrad": lambda: SDMGrad(),
          "excessmtl": lambda: ExcessMTL(0.5, n_warmup_steps=2)}


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_resumes_bit_identically(name: str) -> None:
    js = sequence(4, 0.3, n=8)
    full = MAKERS[name]()
    uninterrupted = [full.aggregate(j) for j in js]
    first = MAKERS[name]()
    for j in js[:4]:
        first.aggregate(j)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)  # through a checkpoint file's round trip
    buf.seek(0)
    resumed = MAKERS[name]()
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    for j, d in zip(js[4:], uninterrupted[4:], strict=True):
        assert torch.equal(resumed.aggregate(j), d)
    fresh = MAKERS[name]()  # a fresh module has no state yet, and loads into another fresh one
    other = MAKERS[name]()
    other.load_state_dict(fresh.state_dict())
    assert torch.equal(other.aggregate(js[0]), uninterrupted[0])


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_new_number_of_tasks_restarts_the_state(name: str) -> None:
    m = MAKERS[name]()
    for j in sequence(3, 0.3, n=3):
        m.aggregate(j)
    j5 = rand_jacobian(9, 5, 11)
    assert torch.equal(m.aggregate(j5), MAKERS[name]().aggregate(j5))
    if name == "excessmtl":  # a new P too (the squared-gradient sums are K x P)
        j7 = rand_jacobian(9, 5, 7)
        assert torch.equal(m.aggregate(j7), MAKERS[name]().aggregate(j7))


def test_excessmtl_state_follows_the_dtype() -> None:
    m = ExcessMTL()
    m.aggregate(rand_jacobian(0, 3, 5))
    d = m.aggregate(rand_jacobian(1, 3, 5).float())
    assert d.dtype == torch.float32 and m.state["sq_sum"].dtype == torch.float32 and m.state["steps"] == 2


def test_init_validation_and_defaults() -> None:
    assert (MoDo().gamma, MoDo().rho) == (0.1, 0.1)
    s = SDMGrad()
    assert (s.lr, s.momentum, s.n_iter, s.lambda_, s.pref_vector) == (10.0, 0.5, 20, 0.3, None)
    assert (ExcessMTL().robust_step_size, ExcessMTL().n_warmup_steps) == (1.0, 0)
    assert isinstance(build_aggregator("Excess-MTL"), ExcessMTL)
    assert SDMGrad(pref_vector=torch.tensor([1.0, 2.0])).pref_vector == (1.0, 2.0)
    for bad in (lambda: MoDo(gamma=0.0), lambda: MoDo(rho=-1.0), lambda: MoDo(gamma=float("inf")),
                lambda: SDMGrad(lr=-1.0), lambda: SDMGrad(momentum=1.0), lambda: SDMGrad(n_iter=0),
                lambda: SDMGrad(lambda_=-0.1), lambda: SDMGrad(pref_vector=[1.0, -1.0]),
                lambda: SDMGrad(pref_vector=[[1.0, 2.0]]), lambda: ExcessMTL(robust_step_size=0.0),
                lambda: ExcessMTL(n_warmup_steps=-1)):
        with pytest.raises(ValueError):
            bad()
    for bad in (lambda: MoDo(gamma="0.1"), lambda: MoDo(rho=None), lambda: SDMGrad(n_iter=2.0),
                lambda: SDMGrad(n_iter=True), lambda: SDMGrad(pref_vector="ab"), lambda: SDMGrad(pref_vector=3.0),
                lambda: ExcessMTL(n_warmup_steps=1.5), lambda: ExcessMTL(robust_step_size=True)):
        with pytest.raises(TypeError):
            bad()
    with pytest.raises(ValueError, match="2 entries for 3 tasks"):
        SDMGrad(pref_vector=[0.5, 0.5]).aggregate(rand_jacobian(0, 3, 4))


# ----------------------------------------------------------------------------- through the mixin


def fit(method: str, engine: str, steps: int, k: int = 3) -> TinyMTL:
    torch.manual_seed(0)
    model = TinyMTL(k=k, method=MAKERS[method](), batchnorm=True, engine=engine, gramian={"path": "gram"},
                    optimizer="sgd")
    trainer(max_steps=steps).fit(model, loader(regression_data(k=k)))
    return model


@pytest.mark.parametrize("method", ["modo", "sdmgrad"])
def test_gramian_methods_take_the_same_step_on_both_engines(method: str) -> None:
    gram_model, jac_model = fit(method, "gramian", 1), fit(method, "jacobian", 1)
    assert gram_model.mtl_uses_gramian_engine and gram_model.mtl_step.jacobian is None
    assert jac_model.mtl_step.jacobian is not None
    torch.testing.assert_close(gram_model.mtl_step.direction, jac_model.mtl_step.direction, rtol=1e-4, atol=1e-6)
    for a, b in zip(gram_model.parameters(), jac_model.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", list(MAKERS))
def test_short_training_run_keeps_and_checkpoints_the_state(method: str) -> None:
    model = fit(method, "auto", 6)
    assert model.mtl_skipped_steps == 0
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = model.mtl_method.get_extra_state()
    if method == "excessmtl":
        assert not model.mtl_uses_gramian_engine and state["state"]["steps"] == 6
        assert state["state"]["baseline"] is not None and on_simplex(state["state"]["weights"].double(), tol=1e-6)
    else:
        assert model.mtl_uses_gramian_engine
        w = torch.tensor(state["lam" if method == "modo" else "w"])
        assert on_simplex(w, tol=1e-9)
    assert any(key.startswith("mtl_method.") for key in model.state_dict())  # travels with the checkpoint
    with pytest.raises(ValueError, match="engine='gramian' needs a Gramian method") if method == "excessmtl" else nullcontext():
        TinyMTL(k=3, method=MAKERS[method](), engine="gramian")
