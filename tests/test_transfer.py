"""Optimizer state after a teleport: HTR (eqs. 12-13) and the transfer policies."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lightning_cost.teleport import StateTransfer, apply_htr, htr_sigma


def adam_with_state(params, betas=(0.9, 0.999)):
    opt = torch.optim.Adam(params, lr=0.1, betas=betas)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt


@pytest.mark.parametrize("bias_corrected", [False, True])
@pytest.mark.parametrize("sigma", [0.6, 1.0, -0.4, 0.0])
@pytest.mark.parametrize("steps_before", [1, 7])
def test_htr_adam_gives_eq13_moments_for_the_shared_parameters_only(sigma, bias_corrected, steps_before):
    torch.manual_seed(0)
    shared, head = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(3))
    opt = adam_with_state([shared, head])
    for _ in range(steps_before - 1):
        for p in (shared, head):
            p.grad = torch.randn_like(p)
        opt.step()
    t = steps_before
    m0, v0 = opt.state[shared]["exp_avg"].clone(), opt.state[shared]["exp_avg_sq"].clone()
    head_state = {k: v.clone() for k, v in opt.state[head].items()}
    g = torch.randn(4)
    shared.grad, head.grad = g.clone(), torch.randn(3)
    hg = head.grad.clone()
    assert apply_htr(opt, [shared], sigma, bias_corrected=bias_corrected) == "adam"
    opt.step()
    s = min(max(sigma, 0.0), 1.0)
    b1, b2 = 0.9, 0.999
    m13, v13 = s * b1 * m0 + (1 - s * b1) * g, s * b2 * v0 + (1 - s * b2) * g * g  # eq. 13
    m, v = opt.state[shared]["exp_avg"], opt.state[shared]["exp_avg_sq"]
    if bias_corrected:  # Adam's bias-corrected moments are eq. 13's moments over their total weight
        torch.testing.assert_close(m / (1 - b1 ** (t + 1)), m13 / (1 - s * b1 ** (t + 1)))
        torch.testing.assert_close(v / (1 - b2 ** (t + 1)), v13 / (1 - s * b2 ** (t + 1)))
        if s == 0.0:  # history dropped: the step of a fresh Adam on g
            torch.testing.assert_close(m / (1 - b1 ** (t + 1)), g)
            torch.testing.assert_close(v / (1 - b2 ** (t + 1)), g * g)
    else:
        torch.testing.assert_close(m, m13)
        torch.testing.assert_close(v, v13)
    if s == 1.0:  # nothing to forget: an ordinary Adam step either way
        torch.testing.assert_close(m, b1 * m0 + (1 - b1) * g)
    torch.testing.assert_close(opt.state[head]["exp_avg"], b1 * head_state["exp_avg"] + (1 - b1) * hg)
    assert (v >= 0).all()


@pytest.mark.parametrize("bias_corrected", [False, True])
def test_htr_with_beta1_zero_stays_finite(bias_corrected):
    """``betas=(0, 0.99)`` (the 2-D toy's): no first-moment history, and no division by ``b1``."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(3))
    opt = adam_with_state([p], betas=(0.0, 0.99))
    g = torch.randn(3)
    p.grad = g.clone()
    apply_htr(opt, [p], 0.3, bias_corrected=bias_corrected)
    opt.step()
    assert all(torch.isfinite(v).all() for v in opt.state[p].values()) and torch.isfinite(p).all()
    torch.testing.assert_close(opt.state[p]["exp_avg"], g)  # b1 = 0: m is the gradient whatever HTR did


def test_htr_sgd_scales_the_momentum_buffer_and_warns_otherwise():
    p = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.ones(2)
    opt.step()
    buf = opt.state[p]["momentum_buffer"].clone()
    assert apply_htr(opt, [p], 0.25) == "sgd"
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], 0.25 * buf)
    with pytest.warns(UserWarning, match="HTR supports"):
        assert apply_htr(torch.optim.RMSprop([p]), [p], 0.5) == "none"


def test_htr_sigma_is_the_cosine():
    assert htr_sigma(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1 / math.sqrt(2))
    assert htr_sigma(torch.zeros(2), torch.ones(2)) == 0.0


# ---------------------------------------------------------------- the transfer policies


def _run(opt_cls, grads, **kw):
    p = nn.Parameter(torch.zeros(4))
    opt = opt_cls([p], lr=0.1, **kw)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p, opt


@pytest.mark.parametrize("opt_cls,kw", [(torch.optim.Adam, {}), (torch.optim.Adam, {"amsgrad": True}),
                                        (torch.optim.AdamW, {}), (torch.optim.SGD, {"momentum": 0.9})])
def test_transport_gives_the_state_of_an_optimizer_that_saw_the_transformed_gradients(opt_cls, kw):
    """Under theta' = t * theta the gradients are g / t: transported state = state built from g / t."""
    torch.manual_seed(0)
    grads = [torch.randn(4) for _ in range(5)]
    t = torch.tensor([0.5, 2.0, 1.0, 3.0])
    p, opt = _run(opt_cls, grads, **kw)
    _, ref = _run(opt_cls, [g / t for g in grads], **kw)
    StateTransfer("transport").after_teleport(opt, [p], torch.ones(4), None, [t])
    for key, value in ref.state[ref.param_groups[0]["params"][0]].items():
        torch.testing.assert_close(opt.state[p][key], value, rtol=1e-5, atol=1e-7)


def test_reset_keep_and_pending_htr():
    torch.manual_seed(0)
    grads = [torch.randn(4) for _ in range(3)]
    p, opt = _run(torch.optim.Adam, grads)
    before = {k: v.clone() for k, v in opt.state[p].items()}
    StateTransfer("keep").after_teleport(opt, [p], torch.ones(4), grads[-1], None)
    assert all(torch.equal(before[k], opt.state[p][k]) for k in before)
    htr = StateTransfer("htr")
    d, g = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert htr.after_teleport(opt, [p], d, g, None) == pytest.approx(1 / math.sqrt(2))
    assert all(torch.equal(before[k], opt.state[p][k]) for k in before)  # applied with the next gradient only
    p.grad = torch.randn(4)
    htr.before_step(opt, [p])
    assert htr.pending_sigma is None and not torch.equal(before["exp_avg"], opt.state[p]["exp_avg"])
    StateTransfer("reset").after_teleport(opt, [p], d, g, None)
    assert p not in opt.state
    with pytest.raises(ValueError, match="transport"):
        StateTransfer("transport").after_teleport(opt, [p], d, g, None)  # no factors: not an exact symmetry
    with pytest.raises(ValueError):
        StateTransfer("forget")


def test_restart_if_opposed_forgets_every_parameters_state_only_when_the_move_opposes_the_gradient():
    torch.manual_seed(0)
    shared, head = nn.Parameter(torch.randn(4)), nn.Parameter(torch.randn(2))
    opt = adam_with_state([shared, head])
    before = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in (shared, head)}
    lr = opt.param_groups[0]["lr"]
    rule = StateTransfer("restart_if_opposed")
    d, g = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0])
    assert rule.after_teleport(opt, [shared], d, g, None) == pytest.approx(1 / math.sqrt(2))
    for p in (shared, head):  # aligned: nothing changes
        assert all(torch.equal(before[id(p)][k], opt.state[p][k]) for k in before[id(p)])
    assert rule.after_teleport(opt, [shared], -d, g, None) == pytest.approx(-1 / math.sqrt(2))
    assert len(opt.state) == 0 and opt.param_groups[0]["lr"] == lr  # a fresh Adam, heads included
    # what a fresh Adam does from here is what the restarted one does
    fresh = torch.optim.Adam([nn.Parameter(shared.detach().clone())], lr=lr)
    grad = torch.randn(4)
    shared.grad, fresh.param_groups[0]["params"][0].grad = grad.clone(), grad.clone()
    opt.step(), fresh.step()
    assert torch.equal(shared.detach(), fresh.param_groups[0]["params"][0].detach())
    opt2 = adam_with_state([shared])  # no move (the null teleporter): cos is 0, the optimizer restarts
    assert rule.after_teleport(opt2, [shared], torch.zeros(4), g, None) == 0.0 and len(opt2.state) == 0
