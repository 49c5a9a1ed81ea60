"""The stateful loss weightings (RLW, DWA, UW, FAMO) against their math and independent references."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_cost.aggregators import DWA, FAMO, RLW, UncertaintyWeighting, build_aggregator

torch.set_default_dtype(torch.float32)


# ----------------------------------------------------------------------------- RLW
def test_rlw_weights_are_softmax_of_standard_normal_draws():
    m = RLW(num_tasks=4, seed=7)
    g = torch.Generator().manual_seed(7)
    for _ in range(3):
        expected = torch.softmax(torch.randn(4, generator=g, dtype=torch.float64), 0).float()
        torch.testing.assert_close(m.weights, expected)
        assert m.weights.sum().item() == pytest.approx(1.0, abs=1e-6)
        assert (m.weights > 0).all()
        m.observe(torch.ones(4))


def test_rlw_rescale_sums_to_k():
    m = RLW(num_tasks=5, seed=1, rescale=True)
    for _ in range(3):
        assert m.weights.sum().item() == pytest.approx(5.0, abs=1e-5)
        m.observe(torch.ones(5))
    torch.testing.assert_close(
        RLW(num_tasks=5, seed=1, rescale=True).weights / 5, RLW(num_tasks=5, seed=1).weights
    )


def test_rlw_same_seed_same_draws_different_steps_differ():
    losses = torch.tensor([1.0, 2.0, 3.0])
    a, b, lazy = RLW(num_tasks=3, seed=11), RLW(num_tasks=3, seed=11), RLW(seed=11)  # lazy: K from the losses
    other = RLW(num_tasks=3, seed=12)
    draws = []
    for _ in range(4):
        wa = a.loss_weights(losses)
        torch.testing.assert_close(wa, b.loss_weights(losses))
        torch.testing.assert_close(wa, lazy.loss_weights(losses))
        assert not torch.allclose(wa, other.loss_weights(losses))
        # forward / loss_weights do not redraw: one draw per optimizer step
        torch.testing.assert_close(a.loss_weights(losses), wa)
        draws.append(wa)
        for m in (a, b, lazy, other):
            m.observe(losses)
    for i in range(len(draws) - 1):
        assert not torch.allclose(draws[i], draws[i + 1])
    assert int(a.num_draws) == 5


def test_rlw_default_seed_follows_torch_seed():
    torch.manual_seed(123)
    a = RLW(num_tasks=3)
    torch.manual_seed(123)
    b = RLW(num_tasks=3)
    torch.testing.assert_close(a.weights, b.weights)
    assert a.seed == 123


def test_rlw_does_not_touch_global_rng():
    torch.manual_seed(0)
    expected = torch.rand(3)
    torch.manual_seed(0)
    m = RLW(num_tasks=3, seed=5)
    m.observe(torch.ones(3))
    torch.testing.assert_close(torch.rand(3), expected)


# ----------------------------------------------------------------------------- DWA
def test_dwa_worked_three_epoch_history():
    """K=3, T=2: epoch averages worked out by hand."""
    m = DWA()
    ones = torch.ones(3)
    # epoch 0: two steps, averages [3, 4, 1]; weights 1 during epochs 0 and 1
    for step in ([2.0, 4.0, 1.5], [4.0, 4.0, 0.5]):
        torch.testing.assert_close(m.loss_weights(torch.tensor(step)), ones)
        m.observe(torch.tensor(step))
    m.on_epoch_end()
    torch.testing.assert_close(m.history[1], torch.tensor([3.0, 4.0, 1.0]))
    # epoch 1: averages [1.5, 4, 2]
    for step in ([1.0, 3.0, 2.0], [2.0, 5.0, 2.0]):
        torch.testing.assert_close(m.loss_weights(torch.tensor(step)), ones)
        m.observe(torch.tensor(step))
    m.on_epoch_end()
    # epoch 2: w = L(1)/L(0) = [0.5, 1, 2]; lambda = 3 exp(w/2) / sum exp(w/2)
    e = [math.exp(0.25), math.exp(0.5), math.exp(1.0)]
    expected = torch.tensor([3 * x / sum(e) for x in e])
    losses = torch.tensor([1.0, 2.0, 3.0])
    torch.testing.assert_close(m.loss_weights(losses), expected)
    assert m(losses).item() == pytest.approx(float((expected * losses).sum()), rel=1e-6)
    assert expected.sum().item() == pytest.approx(3.0)
    # weights stay constant within epoch 2, whatever is observed
    m.observe(torch.tensor([0.75, 8.0, 2.0]))
    torch.testing.assert_close(m.loss_weights(losses), expected)
    m.on_epoch_end()
    # epoch 3: w = [0.75/1.5, 8/4, 2/2] = [0.5, 2, 1]
    e = [math.exp(0.25), math.exp(1.0), math.exp(0.5)]
    torch.testing.assert_close(m.loss_weights(losses), torch.tensor([3 * x / sum(e) for x in e]))
    assert int(m.num_epochs) == 3


def test_dwa_temperature_and_empty_epoch():
    m = DWA(num_tasks=2, T=1000.0)
    m.on_epoch_end()  # nothing observed: not counted
    assert int(m.num_epochs) == 0
    for avg in ([1.0, 1.0], [0.1, 1.0]):
        m.observe(torch.tensor(avg))
        m.on_epoch_end()
    torch.testing.assert_close(m.loss_weights(torch.ones(2)), torch.ones(2), atol=1e-3, rtol=0)
    with pytest.raises(ValueError, match="temperature"):
        DWA(T=0.0)


def test_dwa_needs_positive_epoch_losses():
    m = DWA(num_tasks=2)
    for avg in ([0.0, 1.0], [1.0, 1.0]):
        m.observe(torch.tensor(avg))
        m.on_epoch_end()
    with pytest.raises(ValueError, match="positive"):
        m(torch.ones(2))


# ----------------------------------------------------------------------------- UW
def test_uw_objective_and_closed_form_optimum():
    losses = torch.tensor([0.2, 1.0, 5.0])
    m = UncertaintyWeighting(num_tasks=3)
    assert m(losses).item() == pytest.approx(6.2)  # s = 0: sum L
    # gradient in s vanishes at s = log L
    with torch.no_grad():
        m.s.copy_(losses.log())
    (gs,) = torch.autograd.grad(m(losses), m.s)
    torch.testing.assert_close(gs, torch.zeros(3), atol=1e-6, rtol=0)
    # and gradient descent on s from 0 reaches it: exp(s_k) = L_k
    m = UncertaintyWeighting(num_tasks=3)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    for _ in range(600):
        opt.zero_grad()
        m(losses).backward()
        opt.step()
    torch.testing.assert_close(m.s.detach().exp(), losses, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(m.loss_weights(losses), 1.0 / losses, rtol=1e-3, atol=1e-4)


def test_uw_parameters_are_trainable_submodule_parameters():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(2, 2)
            self.method = UncertaintyWeighting(num_tasks=2, init_s=0.5)

    model = Model()
    names = [n for n, _ in model.named_parameters()]
    assert "method.s" in names
    assert "method.s" in model.state_dict()
    torch.testing.assert_close(model.method.s.detach(), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="num_tasks"):
        UncertaintyWeighting(num_tasks=1)
    with pytest.raises(TypeError):
        build_aggregator("uw")  # K is required: the parameters must exist before the optimizer


# ----------------------------------------------------------------------------- FAMO
def reference_famo_step(xi, before, after, beta, gamma, min_losses, eps):
    """Independent FAMO logit step: softmax Jacobian by autograd, plain gradient step."""
    xi = xi.clone().double().requires_grad_(True)
    delta = torch.log(before.double() - min_losses + eps) - torch.log(after.double() - min_losses + eps)
    (g,) = torch.autograd.grad(torch.softmax(xi, 0), xi, grad_outputs=delta)
    return (xi - beta * (g + gamma * xi)).detach()


def test_famo_objective_and_weights():
    m = FAMO(num_tasks=2)
    losses = torch.tensor([1.0, 4.0])
    # z = (1/2, 1/2): c = 1/2 (1 + 1/4) = 5/8; objective = 1/2 (log 1 + log 4) / c
    assert m(losses).item() == pytest.approx(0.5 * math.log(4.0 + 1e-8) / 0.625, rel=1e-6)
    # weights z_k / (c L_k) = [4/5, 1/5]: sum to 1, inversely proportional to the losses
    torch.testing.assert_close(m.loss_weights(losses), torch.tensor([0.8, 0.2]))


def test_famo_single_update_by_hand():
    m = FAMO(num_tasks=2, beta=0.025, gamma=1e-3)
    before, after = torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.75])
    m.update(before, after)
    # z = (1/2, 1/2), delta = (log 2, log 4/3): grad_1 = z1 (delta1 - z.delta) = (log 2 - log 4/3) / 4 = -grad_2
    g1 = (math.log(2.0) - math.log(4.0 / 3.0)) / 4.0
    torch.testing.assert_close(m.xi, torch.tensor([-0.025 * g1, 0.025 * g1]))
    assert m.xi[0] < 0 < m.xi[1]  # the task that improved more loses weight


def test_famo_updates_match_independent_reference():
    torch.manual_seed(0)
    beta, gamma, mins, eps = 0.05, 0.01, torch.tensor([0.1, 0.0, 0.2, 0.0]), 1e-8
    m = FAMO(beta=beta, gamma=gamma, min_losses=mins.tolist(), eps=eps)
    xi = torch.zeros(4, dtype=torch.float64)
    seq = [mins + torch.rand(4) + 0.1 for _ in range(6)]
    for before, after in zip(seq[:-1], seq[1:], strict=True):
        m.update(before, after)
        xi = reference_famo_step(xi, before, after, beta, gamma, mins.double(), eps)
        torch.testing.assert_close(m.xi.double(), xi, rtol=1e-5, atol=1e-7)


def test_famo_adam_matches_torch_adam():
    torch.manual_seed(1)
    beta, gamma = 0.025, 1e-3
    m = FAMO(num_tasks=3, beta=beta, gamma=gamma, logit_optimizer="adam")
    w = torch.zeros(3, requires_grad=True)
    opt = torch.optim.Adam([w], lr=beta, weight_decay=gamma)
    seq = [torch.rand(3) + 0.1 for _ in range(6)]
    for before, after in zip(seq[:-1], seq[1:], strict=True):
        m.update(before, after)
        delta = before.log() - after.log()
        opt.zero_grad()
        (g,) = torch.autograd.grad(torch.softmax(w, 0), w, grad_outputs=delta)
        w.grad = g
        opt.step()
        torch.testing.assert_close(m.xi, w.detach(), rtol=1e-5, atol=1e-7)


def test_famo_observe_uses_consecutive_steps():
    m = FAMO(num_tasks=2)
    ref = FAMO(num_tasks=2)
    seq = [torch.tensor([2.0, 1.0]), torch.tensor([1.0, 0.9]), torch.tensor([0.8, 0.5])]
    m.observe(seq[0])
    assert int(m.num_updates) == 0 and torch.equal(m.xi, torch.zeros(2))
    m.observe(seq[1])
    m.observe(seq[2])
    ref.update(seq[0], seq[1])
    ref.update(seq[1], seq[2])
    torch.testing.assert_close(m.xi, ref.xi)
    assert int(m.num_updates) == 2
    # same-batch mode: observe does nothing, the user calls update(before, after)
    manual = FAMO(num_tasks=2, update_on_observe=False)
    for ls in seq:
        manual.observe(ls)
    assert int(manual.num_updates) == 0


def test_famo_bad_arguments():
    with pytest.raises(ValueError, match="min_losses"):
        FAMO(num_tasks=2, min_losses=[0.5, 0.5])(torch.tensor([0.2, 1.0]))
    with pytest.raises(ValueError, match="beta"):
        FAMO(beta=0.0)
    with pytest.raises(ValueError, match="logit_optimizer"):
        FAMO(logit_optimizer="rmsprop")
    with pytest.raises(ValueError, match="num_tasks"):
        FAMO(num_tasks=3, min_losses=[0.0, 0.0])
    with pytest.raises(ValueError, match="shapes"):
        FAMO().update(torch.ones(2), torch.ones(3))

