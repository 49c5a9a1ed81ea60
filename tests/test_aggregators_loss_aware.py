"""The loss-aware aggregators GradNorm, DB-MTL and MoCo (``uses_losses``) and the seam that gives them
the task losses: two steps of each against an independent numpy computation, each method's defining
property, ``state_dict`` resumption, the mixin calling ``observe_losses`` before each aggregation on
both engines (and not on skipped steps), zero task rows, and a short training run of each."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from aggregator_props import rand_jacobian
from mtl_models import TinyMTL, loader, regression_data, trainer

from lightning_cost.aggregators import DBMTL, MGDA, Aggregator, GradNorm, MoCo, build_aggregator
from lightning_cost.protocol import StepRecord
from lightning_cost.update import aggregate_nonzero_rows

MAKERS = {"gradnorm": lambda: GradNorm(alpha=1.5, lr=0.05), "dbmtl": lambda: DBMTL(beta=0.8, beta_sigma=0.5),
          "moco": lambda: MoCo(gamma=0.3)}


def losses_seq(k: int, n: int, seed: int = 0) -> list[torch.Tensor]:
    rng = np.random.default_rng(seed)
    return [torch.tensor(rng.uniform(0.2, 3.0, k), dtype=torch.float64) for _ in range(n)]


def step(method: Aggregator, j: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    method.observe_losses(losses)
    return method.aggregate(j)


def bisect_simplex(y: np.ndarray) -> np.ndarray:
    """The Euclidean projection onto the simplex by bisection on its threshold (no sorting)."""
    lo, hi = y.min() - 1.0, y.max()
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if np.maximum(y - mid, 0.0).sum() > 1.0 else (lo, mid)
    return np.maximum(y - 0.5 * (lo + hi), 0.0)


# ----------------------------------------------------------------------------- two steps by hand


def test_gradnorm_two_steps_by_hand() -> None:
    j = torch.tensor([[3.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 2.0]], dtype=torch.float64)  # norms 3, 1, 2
    m = GradNorm(alpha=1.0, lr=0.1)
    # step 1: w = 1 (returned), ratios 1: targets = mean(3, 1, 2) = 2; signs (+, -, 0)
    torch.testing.assert_close(step(m, j, torch.tensor([2.0, 1.0, 4.0], dtype=torch.float64)), j.sum(0))
    w1 = np.array([1 - 0.3, 1 + 0.1, 1.0])
    w1 *= 3 / w1.sum()
    np.testing.assert_allclose(m.state["weights"], w1, rtol=1e-14)
    # step 2: w1 returned; L/L0 = (0.5, 1, 0.25), r = ratio / mean
    d = step(m, j, torch.tensor([1.0, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(d, torch.tensor(w1) @ j, rtol=1e-14, atol=0)
    ratio = (np.array([1.0, 1.0, 1.0]) + 1e-8) / (np.array([2.0, 1.0, 4.0]) + 1e-8)
    weighted = w1 * np.array([3.0, 1.0, 2.0])
    targets = weighted.mean() * ratio / ratio.mean()
    w2 = np.maximum(w1 - 0.1 * np.sign(weighted - targets) * np.array([3.0, 1.0, 2.0]), 0.0)
    np.testing.assert_allclose(m.state["weights"], 3 * w2 / w2.sum(), rtol=1e-14)


def test_dbmtl_two_steps_against_numpy() -> None:
    j1, j2 = rand_jacobian(0, 3, 7), rand_jacobian(1, 3, 7)
    l1, l2 = np.array([0.5, 2.0, 4.0]), np.array([0.4, 1.5, 3.0])
    m = DBMTL(beta=0.8, beta_sigma=0.5)
    ema = np.zeros((3, 7))
    for t, (j, loss) in enumerate([(j1, l1), (j2, l2)], start=1):
        beta_t = 0.8 / t**0.5
        ema = beta_t * ema + (1 - beta_t) * j.numpy() / (loss[:, None] + 1e-8)
        norms = np.linalg.norm(ema, axis=1)
        expected = ((norms.max() / norms)[:, None] * ema).sum(0)
        d = step(m, j, torch.tensor(loss))
        np.testing.assert_allclose(d.numpy(), expected, rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(m.state["ema"].numpy(), ema, rtol=1e-12, atol=1e-14)


def test_moco_two_steps_against_numpy() -> None:
    j1, j2 = rand_jacobian(2, 3, 6, shift=0.5), rand_jacobian(3, 3, 6, shift=0.5)
    l1, l2 = np.array([1.0, 0.5, 2.0]), np.array([0.8, 0.4, 1.5])
    m = MoCo(beta=0.5, beta_sigma=0.5, gamma=0.3, gamma_sigma=0.5, rho=0.1)
    y, lam = np.zeros((3, 6)), np.full(3, 1 / 3)
    for t, (j, loss) in enumerate([(j1, l1), (j2, l2)], start=1):
        h = j.numpy() / np.linalg.norm(j.numpy(), axis=1, keepdims=True) * loss[:, None]
        y = y - 0.5 / t**0.5 * (y - h)
        lam = bisect_simplex(lam - 0.3 / t**0.5 * (y @ y.T @ lam + 0.1 * lam))
        d = step(m, j, torch.tensor(loss))
        np.testing.assert_allclose(d.numpy(), lam @ y, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.state["lambda"], lam, atol=1e-12)


# ----------------------------------------------------------------------------- defining properties


def test_gradnorm_balances_the_weighted_norms() -> None:
    j = rand_jacobian(4, 3, 6) * torch.tensor([[0.25], [0.5], [1.0]], dtype=torch.float64)  # norms 0.6, 1.2, 3.5
    norms = j.norm(dim=1).numpy()
    # equal training rates: every weighted norm goes to the mean (within the sign steps' oscillation)
    m = GradNorm(lr=0.002)
    for t in range(4000):
        step(m, j, torch.full((3,), 1.0 if t == 0 else 0.5, dtype=torch.float64))
    weighted = m.state["weights"] * norms
    np.testing.assert_allclose(weighted, weighted.mean(), rtol=0.02)
    assert abs(m.state["weights"].sum() - 3) < 1e-12
    # unequal rates: the weighted norms follow mean * r^alpha (approximately: with alpha > 1 the targets
    # sum to more than the norms, so not every target can be met); the slowest task gets the most
    m = GradNorm(lr=0.002)
    step(m, j, torch.ones(3, dtype=torch.float64))
    later = torch.tensor([0.9, 0.6, 0.3], dtype=torch.float64)
    for _ in range(4000):
        step(m, j, later)
    weighted = m.state["weights"] * norms
    r = later.numpy() / later.numpy().mean()
    np.testing.assert_allclose(weighted, weighted.mean() * r**1.5, rtol=0.12)
    assert weighted[0] > weighted[1] > weighted[2]


def test_dbmtl_rescaled_estimates_have_equal_norms() -> None:
    m = DBMTL()
    for seed, loss in enumerate(losses_seq(4, 5)):
        j = rand_jacobian(seed, 4, 9) * torch.tensor([[0.1], [1.0], [10.0], [3.0]], dtype=torch.float64)
        d = step(m, j, loss)
        ema = m.state["ema"]
        norms = ema.norm(dim=1)
        rescaled = ema * (norms.max() / norms)[:, None]
        torch.testing.assert_close(rescaled.norm(dim=1), torch.full((4,), float(norms.max()), dtype=torch.float64))
        torch.testing.assert_close(d, rescaled.sum(0))
    # the log transform: scaling a task's loss (and so its gradient) by c changes nothing (up to the 1e-8)
    a, b = DBMTL(), DBMTL()
    for seed, loss in enumerate(losses_seq(3, 3)):
        j = rand_jacobian(seed, 3, 5)
        c = torch.tensor([1.0, 100.0, 0.1], dtype=torch.float64)
        torch.testing.assert_close(step(a, j, loss), step(b, j * c[:, None], loss * c), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("seed", range(3))
def test_moco_stays_on_the_simplex_and_reaches_mgda_on_a_fixed_jacobian(seed: int) -> None:
    j = rand_jacobian(seed, 3, 6, shift=0.3)
    m = MoCo(normalize="none", gamma=0.5)  # rho = 0; the tracked y converge to J, lambda to MGDA's weights
    for _ in range(3000):
        d = m.aggregate(j)
        lam = m.state["lambda"]
        assert lam.min() >= 0.0 and abs(lam.sum() - 1.0) < 1e-12
    mgda = MGDA().weights(j @ j.T).numpy()
    np.testing.assert_allclose(lam, mgda, atol=2e-4)
    torch.testing.assert_close(d, torch.tensor(mgda) @ j, rtol=0, atol=1e-3 * float(j.norm(dim=1).max()))
    assert not MoCo(normalize="none").uses_losses and MoCo().uses_losses


# ----------------------------------------------------------------------------- state


@pytest.mark.parametrize("name", list(MAKERS))
def test_state_dict_resumes_bit_identically(name: str) -> None:
    js = [rand_jacobian(s, 4, 6, shift=0.3) for s in range(8)]
    ls = losses_seq(4, 8)
    full = MAKERS[name]()
    uninterrupted = [step(full, j, loss) for j, loss in zip(js, ls, strict=True)]
    first = MAKERS[name]()
    for j, loss in zip(js[:4], ls[:4], strict=True):
        step(first, j, loss)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = MAKERS[name]()
    resumed.load_state_dict(torch.load(buf, weights_only=False))
    for j, loss, d in zip(js[4:], ls[4:], uninterrupted[4:], strict=True):
        assert torch.equal(step(resumed, j, loss), d)
    other = MAKERS[name]()
    other.load_state_dict(MAKERS[name]().state_dict())  # a fresh (empty) state loads too
    assert torch.equal(step(other, js[0], ls[0]), uninterrupted[0])
    # a new K restarts the state
    j5 = rand_jacobian(9, 5, 6)
    assert torch.equal(step(full, j5, losses_seq(5, 1)[0]), step(MAKERS[name](), j5, losses_seq(5, 1)[0]))


# ----------------------------------------------------------------------------- the seam, directly


@pytest.mark.parametrize("name", list(MAKERS))
def test_aggregate_without_observed_losses_says_what_to_do(name: str) -> None:
    m = build_aggregator(name)
    assert m.uses_losses
    with pytest.raises(RuntimeError, match=rf"{type(m).__name__} uses the task losses: call observe_losses\(losses\) first"):
        m.aggregate(rand_jacobian(0, 3, 4))
    m.observe_losses(torch.ones(2))
    with pytest.raises(ValueError, match="2 task losses but the Jacobian has 3 rows"):
        m.aggregate(rand_jacobian(0, 3, 4))
    for bad in (torch.tensor([1.0, -0.5]), torch.tensor([1.0, float("nan")]), torch.ones(1)):
        with pytest.raises(ValueError):
            m.observe_losses(bad)
    if name == "gradnorm":
        with pytest.raises(RuntimeError, match=r"call observe_losses\(losses\) first"):
            GradNorm().weights(torch.eye(2))


def test_builtin_methods_ignore_losses_and_registry() -> None:
    mgda = MGDA()
    assert not mgda.uses_losses and mgda.observe_losses(torch.ones(3)) is None
    assert isinstance(build_aggregator("DB-MTL"), DBMTL) and isinstance(build_aggregator("db_mtl"), DBMTL)
    assert (GradNorm().alpha, GradNorm().lr) == (1.5, 0.025)
    assert (DBMTL().beta, DBMTL().beta_sigma) == (0.9, 0.0)
    mo = MoCo()
    assert (mo.beta, mo.beta_sigma, mo.gamma, mo.gamma_sigma, mo.rho, mo.normalize) == (0.5, 0.5, 0.1, 0.5, 0.0, "loss")
    for bad in (lambda: GradNorm(alpha=-1.0), lambda: GradNorm(lr=0.0), lambda: DBMTL(beta=1.0),
                lambda: DBMTL(beta_sigma=-1.0), lambda: MoCo(beta=0.0), lambda: MoCo(gamma=0.0),
                lambda: MoCo(rho=-0.1), lambda: MoCo(normalize="l2")):
        with pytest.raises(ValueError):
            bad()
    with pytest.raises(TypeError):
        GradNorm(alpha="1.5")


@pytest.mark.parametrize("name", list(MAKERS))
def test_a_zero_task_row_is_handed_in_and_leaves_that_tasks_state(name: str) -> None:
    j = rand_jacobian(0, 3, 5, shift=0.3)
    m = MAKERS[name]()
    step(m, j, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    before = {key: (v.clone() if isinstance(v, torch.Tensor) else np.copy(v)) for key, v in m.state.items()}
    j0 = rand_jacobian(1, 3, 5, shift=0.3)
    j0[1] = 0.0
    m.observe_losses(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    seen = []
    m.aggregate = lambda jac, *a: seen.append(jac.shape[0]) or type(m).aggregate(m, jac, *a)  # type: ignore[method-assign]
    d = aggregate_nonzero_rows(m, j0, j0.abs().amax(dim=1))
    assert seen == [3] and torch.isfinite(d).all()  # all K rows, the zero one included
    if name == "dbmtl":
        assert torch.equal(m.state["ema"][1], before["ema"][1]) and not torch.equal(m.state["ema"][0], before["ema"][0])
    elif name == "moco":
        assert torch.equal(m.state["y"][1], before["y"][1]) and not torch.equal(m.state["y"][0], before["y"][0])
    else:  # n_1 = 0: no gradient step for w_1, only the renormalisation (equal loss ratios: targets = mean)
        w0, n = before["weights"], j0.norm(dim=1).numpy()
        raw = np.maximum(w0 - 0.05 * np.sign(w0 * n - (w0 * n).mean()) * n, 0.0)
        assert raw[1] == w0[1]
        np.testing.assert_allclose(m.state["weights"], 3 * raw / raw.sum(), rtol=1e-14)


def test_gramian_path_hands_every_row_to_gradnorm() -> None:
    model = TinyMTL(k=3, method=GradNorm(), engine="gramian", gramian={"path": "gram"})
    j = rand_jacobian(0, 3, 4).float()
    j[2] = 0.0
    g = j @ j.T
    record = StepRecord(losses=torch.tensor([1.0, 2.0, 3.0]), gramian=g, finite=True)
    w = model._mtl_gram_weights(record, g.diagonal(), overflowed=False)
    assert w is not None and w.shape == (3,) and float(w[2]) == 1.0  # the first weights: ones, all three rows
    assert model.mtl_method.state["weights"].shape == (3,)
    assert torch.equal(model.mtl_method._observed, torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- through the mixin


def spy(cls: type, log: list, **kw) -> Aggregator:
    class Spy(cls):  # type: ignore[misc, valid-type]
        def observe_losses(self, losses: torch.Tensor) -> None:
            log.append(("observe", losses.clone()))
            super().observe_losses(losses)

        def aggregate(self, jacobian: torch.Tensor, *args) -> torch.Tensor:
            log.append(("aggregate", jacobian.shape[0]))
            return super().aggregate(jacobian, *args)

        def weights(self, gramian: torch.Tensor) -> torch.Tensor:
            log.append(("weights", gramian.shape[0]))
            return super().weights(gramian)

    return Spy(**kw)


class NaNAtSecondStep(TinyMTL):
    def training_step(self, batch, batch_idx):
        losses = super().training_step(batch, batch_idx)
        if batch_idx == 1:
            losses["t0"] = losses["t0"] * float("nan")
        return losses


def fit(method: Aggregator, engine: str, steps: int, k: int = 3, cls: type = TinyMTL) -> TinyMTL:
    torch.manual_seed(0)
    model = cls(k=k, method=method, engine=engine, gramian={"path": "gram"}, optimizer="sgd")
    trainer(max_steps=steps).fit(model, loader(regression_data(k=k)))
    return model


@pytest.mark.parametrize(("cls", "engine", "call"), [(DBMTL, "jacobian", "aggregate"), (MoCo, "jacobian", "aggregate"),
                                                     (GradNorm, "jacobian", "aggregate"), (GradNorm, "gramian", "weights")])
def test_mixin_observes_the_global_losses_before_each_aggregation(cls: type, engine: str, call: str) -> None:
    log: list = []
    model = fit(spy(cls, log), engine, 3)
    assert model.mtl_uses_gramian_engine == (engine == "gramian")
    kinds = [kind for kind, _ in log if kind != "weights" or call == "weights"]
    assert kinds == ["observe", call] * 3
    last_observed = [value for kind, value in log if kind == "observe"][-1]
    assert torch.equal(last_observed, model.mtl_step.losses)


@pytest.mark.parametrize("engine", ["jacobian", "gramian"])
def test_skipped_steps_observe_nothing(engine: str) -> None:
    log: list = []
    model = fit(spy(GradNorm, log), engine, 3, cls=NaNAtSecondStep)
    assert model.mtl_skipped_steps == 1
    assert [kind for kind, _ in log].count("observe") == 2 and model.mtl_method.state["steps"] == 2


def test_gradnorm_takes_the_same_step_on_both_engines() -> None:
    gram_model, jac_model = fit(GradNorm(), "gramian", 2), fit(GradNorm(), "jacobian", 2)
    assert gram_model.mtl_uses_gramian_engine and gram_model.mtl_step.jacobian is None
    torch.testing.assert_close(gram_model.mtl_step.direction, jac_model.mtl_step.direction, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(gram_model.mtl_method.state["weights"], jac_model.mtl_method.state["weights"], rtol=1e-5)


@pytest.mark.parametrize("name", list(MAKERS))
def test_short_training_run(name: str) -> None:
    model = fit(MAKERS[name](), "auto", 6)
    assert model.mtl_skipped_steps == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    assert model.mtl_method.state["steps"] == 6
    assert model.mtl_uses_gramian_engine == (name == "gradnorm")
    assert any(key.startswith("mtl_method.") for key in model.state_dict())  # the state travels with the checkpoint
