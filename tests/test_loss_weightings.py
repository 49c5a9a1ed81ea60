"""The loss-weighting methods: what they share (registry, closed-form weights, validation, state),
LS and SI against their math, and training through the mixin. The stateful methods (RLW, DWA, UW,
FAMO) are in test_loss_weightings_stateful.py."""

from __future__ import annotations

import math

import pytest
import torch
from mtl_models import TinyMTL, loader, regression_data, trainer
from torch import nn

from lightning_cost.aggregators import (
    DWA,
    FAMO,
    RLW,
    LinearScalarization,
    LossWeighting,
    ScaleInvariant,
    UncertaintyWeighting,
    aggregator_class,
    build_aggregator,
)

torch.set_default_dtype(torch.float32)

NAMES = ["ls", "si", "rlw", "dwa", "uw", "famo"]


def make(name: str, k: int = 3, **kw) -> LossWeighting:
    if aggregator_class(name) is UncertaintyWeighting:
        kw.setdefault("num_tasks", k)
    return build_aggregator(name, **kw)


def tiny_problem(k: int = 3, seed: int = 0):
    """A shared linear layer and K positive losses of it, differentiable."""
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(4, k)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(k, 4, generator=g))
        lin.bias.copy_(torch.randn(k, generator=g))
    x = torch.randn(16, 4, generator=g)
    y = torch.randn(16, k, generator=g)

    def losses() -> torch.Tensor:
        return ((lin(x) - y) ** 2).mean(0) + 0.1

    return lin, losses


def flat_grad(scalar: torch.Tensor, params) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(scalar, list(params), retain_graph=True)])


# ----------------------------------------------------------------------------- registry / common
@pytest.mark.parametrize(
    "name, cls",
    [
        ("ls", LinearScalarization),
        ("ew", LinearScalarization),
        ("si", ScaleInvariant),
        ("rlw", RLW),
        ("dwa", DWA),
        ("uw", UncertaintyWeighting),
        ("uncertainty", UncertaintyWeighting),
        ("famo", FAMO),
    ],
)
def test_registry_builds_each_weighting(name, cls):
    assert aggregator_class(name) is cls
    m = make(name)
    assert isinstance(m, LossWeighting) and isinstance(m, nn.Module)
    assert m.requires_jacobian is False


def analytic_weights(m: LossWeighting, losses: torch.Tensor) -> torch.Tensor:
    """d objective / d L_k written out by hand for each method."""
    k = losses.shape[0]
    if isinstance(m, LinearScalarization):
        return torch.ones(k) if m.weights.numel() == 0 else m.weights
    if isinstance(m, ScaleInvariant):
        return 1.0 / losses
    if isinstance(m, RLW):
        return m.weights
    if isinstance(m, DWA):
        return m.task_weights(losses)
    if isinstance(m, UncertaintyWeighting):
        return torch.exp(-m.s.detach())
    if isinstance(m, FAMO):
        z = torch.softmax(m.xi, 0)
        d = losses - m.min_losses + m.eps
        return z / d / (z / d).sum()
    raise AssertionError(type(m))


@pytest.mark.parametrize("name", NAMES)
def test_loss_weights_is_the_analytic_derivative(name):
    m = make(name)
    losses = torch.tensor([0.5, 2.0, 3.5])
    if isinstance(m, UncertaintyWeighting):
        with torch.no_grad():
            m.s.copy_(torch.tensor([0.3, -0.2, 1.0]))
    if isinstance(m, FAMO):
        m(losses)
        m.xi.copy_(torch.tensor([0.1, -0.4, 0.2]))
    if isinstance(m, DWA):  # past the warm-up, so the weights are not all 1
        for avg in ([1.0, 2.0, 3.0], [0.5, 2.0, 4.0]):
            m.observe(torch.tensor(avg))
            m.on_epoch_end()
    w = m.loss_weights(losses)
    torch.testing.assert_close(w, analytic_weights(m, losses).to(w), rtol=1e-5, atol=1e-6)
    # and the parameter gradient of the objective is sum_k w_k g_k
    lin, fn = tiny_problem()
    ls = fn()
    w = m.loss_weights(ls.detach())
    expected = sum(w[i] * flat_grad(ls[i], lin.parameters()) for i in range(3))
    torch.testing.assert_close(flat_grad(m(ls), lin.parameters()), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_closed_form_loss_weights_equal_autograd(name, dtype):
    """Each method's loss_weights override is the autograd derivative of its forward (the base
    class's generic implementation), in every state, and returns a fresh tensor."""
    m = make(name, **({"weights": [1.0, 0.5, 2.0]} if name == "ls" else {}))
    g = torch.Generator().manual_seed(0)
    for step in range(5):
        losses = (torch.rand(3, generator=g) * 3 + 0.1).to(dtype)
        w = m.loss_weights(losses)
        assert w.dtype == dtype and not w.requires_grad
        torch.testing.assert_close(w, LossWeighting.loss_weights(m, losses), rtol=1e-6, atol=0)
        w.add_(1.0)  # the caller may modify it: no state of the method changes
        torch.testing.assert_close(m.loss_weights(losses), LossWeighting.loss_weights(m, losses), rtol=1e-6, atol=0)
        m.observe(losses)
        if step % 2:
            m.on_epoch_end()
        if isinstance(m, UncertaintyWeighting):
            with torch.no_grad():
                m.s.add_(0.2 * step - 0.3)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.tensor([1.0, float("nan"), 2.0]), "finite"),
        (torch.tensor([1.0, float("inf"), 2.0]), "finite"),
        (torch.ones(3, 1), "shape"),
        (torch.tensor([1.0]), "at least 2"),
    ],
)
def test_bad_losses_raise(name, bad, match):
    m = make(name)
    with pytest.raises(ValueError, match=match):
        m(bad)
    with pytest.raises(ValueError, match=match):
        m.loss_weights(bad)
    if name in ("rlw", "dwa", "famo"):  # the stateful ones validate what they record
        with pytest.raises(ValueError, match=match):
            m.observe(bad)


@pytest.mark.parametrize("name", ["ls", "rlw", "dwa", "uw", "famo"])
def test_wrong_number_of_tasks_raises(name):
    m = make(name, k=3, **({"weights": [1.0, 2.0, 3.0]} if name == "ls" else {}))
    m(torch.ones(3))
    with pytest.raises(ValueError, match="3"):
        m(torch.ones(2))


def test_losses_must_be_tensors():
    with pytest.raises(TypeError, match="torch.Tensor"):
        LinearScalarization()([1.0, 2.0])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    """Every method's state is in its state_dict and a fresh instance resumes identically."""
    torch.manual_seed(0)
    m = make(name, seed=3) if name == "rlw" else make(name)
    seq = [torch.rand(3) + 0.5 for _ in range(7)]
    for i, ls in enumerate(seq[:4]):
        m(ls)
        m.observe(ls)
        if i % 2:
            m.on_epoch_end()
    if isinstance(m, UncertaintyWeighting):
        with torch.no_grad():
            m.s.add_(0.3)
    fresh = (
        make(name, seed=99)
        if name == "rlw"
        else (make(name, k=3) if name == "uw" else aggregator_class(name)())
    )
    fresh.load_state_dict(m.state_dict())
    for i, ls in enumerate(seq[4:]):
        torch.testing.assert_close(fresh(ls), m(ls))
        torch.testing.assert_close(fresh.loss_weights(ls), m.loss_weights(ls))
        m.observe(ls)
        fresh.observe(ls)
        if i % 2:
            m.on_epoch_end()
            fresh.on_epoch_end()


@pytest.mark.parametrize("name", NAMES)
def test_backward_after_observe(name):
    """The training core calls forward, then observe (state update), then backward."""
    m = make(name)
    lin, fn = tiny_problem()
    for _ in range(3):
        ls = fn()
        obj = m(ls)
        m.observe(ls.detach())
        m.on_epoch_end()
        obj.backward()  # no in-place modification of a tensor saved for backward
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in lin.parameters())


# ----------------------------------------------------------------------------- LS
def test_ls_gradient_is_sum_of_task_gradients():
    lin, fn = tiny_problem()
    ls = fn()
    total = sum(flat_grad(ls[i], lin.parameters()) for i in range(3))
    torch.testing.assert_close(flat_grad(LinearScalarization()(ls), lin.parameters()), total)
    torch.testing.assert_close(LinearScalarization()(ls), ls.sum())


def test_ls_fixed_weights():
    m = LinearScalarization(weights=[1.0, 0.5, 2.0])
    losses = torch.tensor([1.0, 2.0, 3.0])
    assert m(losses).item() == pytest.approx(1.0 + 1.0 + 6.0)
    torch.testing.assert_close(m.loss_weights(losses), torch.tensor([1.0, 0.5, 2.0]))
    for bad in ([1.0], [1.0, -1.0], [1.0, float("nan")], [[1.0, 2.0]]):
        with pytest.raises(ValueError):
            LinearScalarization(weights=bad)


# ----------------------------------------------------------------------------- SI
def test_si_gradient_wrt_losses_is_inverse_loss():
    losses = torch.tensor([0.1, 1.0, 7.0], requires_grad=True)
    obj = ScaleInvariant()(losses)
    assert obj.item() == pytest.approx(math.log(0.1) + math.log(7.0), rel=1e-6)
    (g,) = torch.autograd.grad(obj, losses)
    torch.testing.assert_close(g, 1.0 / losses.detach())


def test_si_is_scale_invariant():
    lin, fn = tiny_problem()
    ls = fn()
    scaled = ls * torch.tensor([10.0, 0.01, 3.0])
    si = ScaleInvariant()
    torch.testing.assert_close(
        flat_grad(si(ls), lin.parameters()), flat_grad(si(scaled), lin.parameters()), rtol=1e-4, atol=1e-6
    )


@pytest.mark.parametrize("bad", [[1.0, 0.0], [1.0, -0.5, 2.0]])
def test_si_requires_positive_losses(bad):
    with pytest.raises(ValueError, match="strictly positive"):
        ScaleInvariant()(torch.tensor(bad))
    with pytest.raises(ValueError, match="strictly positive"):
        ScaleInvariant().loss_weights(torch.tensor(bad))


# ----------------------------------------------------------------------------- through Lightning
@pytest.mark.parametrize("name", NAMES)
def test_trains_through_the_multitask_mixin(name):
    hp = {"num_tasks": 2} if name == "uw" else {}
    model = TinyMTL(k=2, method=name, **hp)
    trainer(max_epochs=3).fit(model, loader(regression_data(n=96), batch_size=32))
    m = model.mtl_method
    assert model.mtl_step is not None and torch.isfinite(model.mtl_step.losses).all()
    if isinstance(m, DWA):
        assert int(m.num_epochs) == 2  # rolled at the start of epochs 1 and 2
        assert not torch.allclose(m.loss_weights(torch.ones(2)), torch.ones(2))
    if isinstance(m, FAMO):
        assert int(m.num_updates) == 8 and not torch.equal(m.xi, torch.zeros(2))
    if isinstance(m, RLW):
        assert int(m.num_draws) == 10
    if isinstance(m, UncertaintyWeighting):
        assert not torch.equal(m.s.detach(), torch.zeros(2))
