"""COST's teleport from a plain PyTorch loop (``lightning_cost.Teleport``): the callback's attempt, without the Trainer."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from mtl_models import loader, regression_data
from teleport_helpers import Force, Grab, ReluMTL, Spy, fit
from torch import nn

import lightning_cost
from lightning_cost import SymmetryTeleportCallback, Teleport, teleport_once


class Net(nn.Module):
    """A plain (non-Lightning) two-task model: a ReLU trunk with exact rescalings, two linear heads."""

    def __init__(self, k: int = 2):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.heads = nn.ModuleList([nn.Linear(16, 1) for _ in range(k)])


def _losses_of(model):
    """The user's ``task_losses(batch)``: a closure over the model, as a plain loop would write it."""
    def task_losses(batch):
        x, y = batch
        z = model.trunk(x)
        return [F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(model.heads)]
    return task_losses


def _plain_jacobian(model, batch):
    """Task losses and per-task gradients of the trunk by plain autograd (no library code)."""
    params = list(model.trunk.parameters())
    losses = torch.stack(_losses_of(model)(batch))
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
            for i in range(len(losses))]
    return losses.detach(), torch.stack(rows)


def _min_cos(j):
    g0 = j.mean(0)
    return float(((j @ g0) / (j.norm(dim=1) * g0.norm())).min())


def _trained(steps: int = 4, seed: int = 0):
    """A Net, its Adam and the batches after ``steps`` ordinary steps of the summed loss."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batches = list(loader(regression_data(k=2)))
    task_losses = _losses_of(model)
    for batch in batches[:steps]:
        opt.zero_grad()
        torch.stack(task_losses(batch)).sum().backward()
        opt.step()
    return model, opt, batches, task_losses


def _state(opt, params):
    return [{k: v.clone() for k, v in opt.state[p].items()} for p in params]


@pytest.mark.parametrize("transfer", ["transport", "restart_if_opposed"])
def test_plain_loop_teleport_equals_the_callbacks(transfer):
    """Same weights, optimizer state and batch: the plain-loop attempt leaves what the callback leaves.

    The callback reuses the training step's losses and Jacobian (one batch, no dropout); the plain loop
    measures them again with the same Jacobian engine on the same function, which gives the same bits on
    CPU here, so everything is compared exactly.
    """
    L.seed_everything(0)
    model = ReluMTL(k=2)
    tele = SymmetryTeleportCallback(teleporter="rescale", transfer=transfer, schedule={"max_per_epoch": None})
    spy, grab = Spy(), Grab()

    class After(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 3:
                self.params = [p.detach().clone() for p in pl_module.parameters()]
                self.opt = [{k: v.clone() for k, v in optimizer.state[p].items()} for p in pl_module.parameters()]
                self.grads = [p.grad for p in pl_module.parameters()]
                self.direction = pl_module.mtl_step.direction.clone()  # eq. 12's g': the step's update

    after = After()
    fit(model, [grab, Force(tele, steps=(3,)), spy, tele, after], steps=4)
    rec_cb = tele.history[0]
    assert rec_cb.applied and rec_cb.moved, rec_cb.reason
    assert all(g is None for g in after.grads)  # the callback drops the step

    plain = ReluMTL(k=2)  # the same architecture, outside any Trainer, with the callback's starting point
    snap = spy.snaps[3]
    with torch.no_grad():
        for p, v in zip(plain.parameters(), snap["params"], strict=True):
            p.copy_(v)
    opt = torch.optim.Adam(plain.parameters(), lr=plain.lr)
    for p, p_cb in zip(plain.parameters(), model.parameters(), strict=True):
        opt.state[p] = {k: v.clone() for k, v in snap["opt"][id(p_cb)].items()}
    rec = Teleport("rescale", transfer=transfer)(plain, _losses_of(plain), [grab.batches[3]], opt,
                                                 shared=plain.trunk, step=3, last_gradient=after.direction)
    assert rec.applied and rec.moved
    if transfer == "restart_if_opposed":  # the authors' rule decides on cos(dtheta, g'), computed here apart
        names = [n for n, _ in model.named_parameters()]
        dtheta = torch.cat([(w - v).reshape(-1) for n, w, v in zip(names, after.params, snap["params"], strict=True)
                            if n.startswith("trunk.")])  # the shared trunk's move, in the direction's order
        cos = float(dtheta @ after.direction / (dtheta.norm() * after.direction.norm()))
        assert rec_cb.sigma == pytest.approx(cos, abs=1e-5) and rec_cb.sigma != 0.0
        assert bool(after.opt[0]) == (cos > 0)  # the state is kept exactly when the move follows g'
    for p, w in zip(plain.parameters(), after.params, strict=True):
        assert torch.equal(p.detach(), w)
    for p, s in zip(plain.parameters(), after.opt, strict=True):
        assert opt.state[p].keys() == s.keys() and all(torch.equal(opt.state[p][k], s[k]) for k in s)
    for key in ("before", "after", "losses_before", "losses_after", "loss_drift", "displacement_norm",
                "displacement_rel", "sigma", "trigger_conflicts", "step", "transfer", "trace"):
        assert getattr(rec, key) == getattr(rec_cb, key), key


def test_rescale_from_a_plain_loop_keeps_the_losses_moves_the_weights_and_transports_adam():
    model, opt, batches, task_losses = _trained()
    batch = batches[4]
    trunk = list(model.trunk.parameters())
    w0, s0 = [p.detach().clone() for p in trunk], _state(opt, trunk)
    l0, j0 = _plain_jacobian(model, batch)
    rec = teleport_once(model, task_losses, [batch], opt, shared=model.trunk.parameters())
    assert rec.accepted and rec.applied and rec.moved, rec.reason
    l1, j1 = _plain_jacobian(model, batch)
    assert float(((l1 - l0).abs() / l0).max()) <= 1e-5  # eq. 5: the task losses are kept
    assert any(not torch.equal(p.detach(), w) for p, w in zip(trunk, w0, strict=True))  # the weights moved
    t = torch.cat([(p.detach() / w).reshape(-1) for p, w in zip(trunk, w0, strict=True)])
    torch.testing.assert_close(j1, j0 / t, rtol=1e-4, atol=1e-7)  # the gradients at the new point: J / t
    assert _min_cos(j1) > _min_cos(j0)  # the default objective raises the smallest cosine
    assert rec.after.min_cos == pytest.approx(_min_cos(j1), abs=1e-4)
    assert rec.before.min_cos == pytest.approx(_min_cos(j0), abs=1e-4)
    for p, w, s in zip(trunk, w0, s0, strict=True):  # exact transport: m / t, v / t^2
        tp = p.detach() / w
        torch.testing.assert_close(opt.state[p]["exp_avg"], s["exp_avg"] / tp, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(opt.state[p]["exp_avg_sq"], s["exp_avg_sq"] / tp**2, rtol=1e-5, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())  # so a step taken anyway changes nothing:
    moved = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), moved, strict=True))


def test_restart_if_opposed_reads_the_gradient_left_in_grad_by_default():
    model, opt, batches, task_losses = _trained()
    trunk = list(model.trunk.parameters())
    opt.zero_grad()
    lightning_cost.backward(task_losses(batches[4]), shared=model.trunk.parameters())
    g = torch.cat([p.grad.reshape(-1) for p in trunk]).double()
    w0 = torch.cat([p.detach().reshape(-1) for p in trunk]).double()
    rec = Teleport("rescale", transfer="restart_if_opposed")(model, task_losses, [batches[4]], opt, shared=model.trunk)
    assert rec.applied, rec.reason
    d = torch.cat([p.detach().reshape(-1) for p in trunk]).double() - w0
    assert rec.sigma == pytest.approx(float(d @ g / (d.norm() * g.norm())), abs=1e-6) and rec.sigma != 0.0
    assert (len(opt.state) == 0) == (rec.sigma <= 0)  # a fresh optimizer only when the move opposes g'


def test_htr_from_a_plain_loop_scales_the_moments_by_the_recorded_sigma_at_the_next_step():
    model, opt, batches, task_losses = _trained()
    tele = Teleport({"name": "rescale", "objective": "grad_norm"}, transfer="htr")
    trunk = list(model.trunk.parameters())
    opt.zero_grad()
    lightning_cost.backward(task_losses(batches[4]), shared=model.trunk.parameters())
    g_prev = -torch.cat([p.grad.reshape(-1) for p in trunk])  # any g' the loop chooses (eq. 12)
    w0 = torch.cat([p.detach().reshape(-1) for p in trunk]).double()
    rec = tele(model, task_losses, [batches[4]], opt, shared=model.trunk, last_gradient=g_prev, step=4)
    assert rec.applied and rec.moved, rec.reason
    d = torch.cat([p.detach().reshape(-1) for p in trunk]).double() - w0
    sigma = float(d @ g_prev.double() / (d.norm() * g_prev.double().norm()))  # cos(dtheta, g'), independently
    assert rec.sigma == pytest.approx(sigma, abs=1e-6) and tele.pending_sigma == rec.sigma
    assert 0 < sigma < 1  # a partial reuse, so the check below tells the rule from a reset or a keep
    tele.before_step(opt)  # the teleporting step has no gradient: the sigma waits
    assert tele.pending_sigma == rec.sigma
    opt.zero_grad()
    lightning_cost.backward(task_losses(batches[5]), shared=model.trunk.parameters())
    before = _state(opt, trunk)
    head = next(iter(model.heads[0].parameters()))
    head_before = _state(opt, [head])[0]
    tele.before_step(opt, shared=model.trunk)
    assert tele.pending_sigma is None
    (b1, b2), s = opt.param_groups[0]["betas"], sigma
    for p, st in zip(trunk, before, strict=True):  # eq. 13 on the bias-corrected moments (htr.py)
        t = float(st["step"])
        for key, beta, x in (("exp_avg", b1, p.grad), ("exp_avg_sq", b2, p.grad**2)):
            mass = 1 - s * beta ** (t + 1)
            want = (s * (1 - beta ** (t + 1)) * st[key] + (1 - s) * (1 - beta**t) * x) / mass
            torch.testing.assert_close(opt.state[p][key], want, rtol=1e-5, atol=1e-10)
    assert all(torch.equal(opt.state[head][k], v) for k, v in head_before.items())  # the heads keep their history


def test_null_teleporter_from_a_plain_loop_leaves_the_weights_and_the_kept_state_bit_for_bit():
    model, opt, batches, task_losses = _trained()
    weights = [p.detach().clone() for p in model.parameters()]
    state = _state(opt, list(model.parameters()))
    l0, _ = _plain_jacobian(model, batches[4])
    rec = Teleport("null", transfer="keep")(model, task_losses, [batches[4], batches[5]], opt,
                                            shared=model.trunk.parameters())
    assert rec.accepted and rec.applied and not rec.moved and rec.displacement_norm == 0.0
    assert rec.after == rec.before
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    for p, s in zip(model.parameters(), state, strict=True):
        assert all(torch.equal(opt.state[p][k], v) for k, v in s.items())
    l1, _ = _plain_jacobian(model, batches[4])
    assert torch.equal(l0, l1)


def test_a_mapping_or_tensor_of_losses_and_several_batches_work():
    model, opt, batches, task_losses = _trained()

    def as_dict(batch):
        a, b = task_losses(batch)
        return {"a": a, "b": b}

    rec = Teleport("rescale")(model, as_dict, batches[4:6], opt, shared=model.trunk)
    assert rec.accepted and len(rec.losses_before) == 2
    rec = Teleport("rescale")(model, lambda b: torch.stack(task_losses(b)), batches[6:7], opt, shared=model.trunk)
    assert rec.accepted


def test_a_rejected_move_is_rolled_back():
    model, opt, batches, task_losses = _trained()
    weights = [p.detach().clone() for p in model.parameters()]
    state = _state(opt, list(model.parameters()))
    tele = Teleport({"name": "random_move", "relative_size": 0.5, "loss_tolerance": 0.0, "abs_tolerance": 0.0},
                    transfer="reset")
    with pytest.warns(UserWarning, match="rejected"):
        rec = tele(model, task_losses, [batches[4]], opt, shared=model.trunk)
    assert not rec.accepted and not rec.applied and tele.history == [rec]
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights, strict=True))
    assert all(torch.equal(opt.state[p]["exp_avg"], s["exp_avg"]) for p, s in zip(model.parameters(), state,
                                                                                   strict=True))


def test_errors_name_the_bad_argument():
    model, opt, batches, task_losses = _trained(steps=1)
    tele = Teleport("rescale")
    call = dict(shared=model.trunk)
    with pytest.raises(ValueError, match="batches is empty"):
        tele(model, task_losses, [], opt, **call)
    with pytest.raises(TypeError, match="list of batches"):
        tele(model, task_losses, tuple(batches[:1]), opt, **call)
    with pytest.raises(ValueError, match="parameters of model"):
        tele(model, task_losses, batches[:1], opt, shared=Net().trunk)
    with pytest.raises(ValueError, match="no shared parameters"):
        tele(model, task_losses, batches[:1], opt, shared=[])
    with pytest.raises(TypeError, match="nn.Module or an iterable"):
        tele(model, task_losses, batches[:1], opt, shared=[torch.zeros(2)])
    with pytest.raises(ValueError, match="optimizer holds none"):
        tele(model, task_losses, batches[:1], torch.optim.Adam(model.heads.parameters()), **call)
    with pytest.raises(ValueError, match="at least 2 task losses"):
        tele(model, lambda b: task_losses(b)[:1], batches[:1], opt, **call)
    with pytest.raises(ValueError, match="last_gradient"):
        Teleport("rescale", transfer="htr")(model, task_losses, batches[:1], opt, last_gradient=torch.ones(3), **call)
    with pytest.raises(ValueError, match=">= 0"):
        tele(model, task_losses, batches[:1], opt, step=-1, **call)
    with pytest.raises(ValueError, match="exact symmetry"):
        Teleport("random_move", transfer="transport")
    with pytest.raises(ValueError, match="transfer must be one of"):
        Teleport("rescale", transfer="teleport")
    with pytest.raises(ValueError, match="unknown teleporter"):
        Teleport("rotate")
    with pytest.raises(ValueError, match="on='representation'"):
        Teleport("rescale", trigger={"on": "representation"})
    with pytest.raises(ValueError, match="SGD"):
        Teleport("rescale", transfer="reset_step")(model, task_losses, batches[:1],
                                                   torch.optim.SGD(model.parameters(), lr=0.1), **call)
    with pytest.raises(ValueError, match="before_step"):
        teleport_once(model, task_losses, batches[:1], opt, teleporter="lora", **call)  # lora's default: htr
    assert tele.history == [] and math.isfinite(float(next(model.parameters()).detach().sum()))
