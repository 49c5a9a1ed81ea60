"""The exact rescaling teleport: its Gramian, its effect measured by plain autograd, exact state transport."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from mtl_models import TinyMTL
from teleport_helpers import Force, Grab, ReluMTL, Spy, fit
from torch import nn

from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport import NoSymmetryError, RescaleSymmetry
from lightning_cost.teleport.symmetry.rescale import ScaledGramian


def _plain_jacobian(model, batch):
    """Per-task losses and gradients of the shared parameters by plain autograd (no library code)."""
    params = model.shared_parameters()
    x, y = batch
    z = model.trunk(x)
    losses = torch.stack([((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(model.heads)])
    rows = [torch.cat([g.reshape(-1) for g in torch.autograd.grad(losses[i], params, retain_graph=True)])
            for i in range(len(losses))]
    return losses.detach(), torch.stack(rows)


def _cos(j):
    g0 = j.mean(0)
    return (j @ g0) / (j.norm(dim=1) * g0.norm())


@pytest.mark.parametrize("conv", [False, True])
def test_scaled_gramian_is_j_diag_t2_jt(conv):
    """The cell sums give exactly ``J diag(t^-2) J^T`` (direct computation from the flat factors)."""
    torch.manual_seed(0)
    if conv:
        trunk = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 6, 3), nn.ReLU(), nn.Flatten(),
                              nn.Linear(6 * 4 * 4, 5), nn.ReLU(), nn.Linear(5, 3))
        x = torch.randn(2, 1, 8, 8)
    else:
        trunk = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3))
        x = torch.randn(2, 5)
    params = list(trunk.parameters())
    sym = RescaleSymmetry.find(trunk, (x,), params)
    j = torch.randn(3, sum(p.numel() for p in params))
    s = torch.empty(sym.num_scales).uniform_(-1.3, 1.3)
    t = sym.flat_factors(s)
    expected = ((j / t) @ (j / t).T).double()
    for direct in (False, True):
        g = ScaledGramian(sym, j)
        if direct:
            g.direct = True
        torch.testing.assert_close(g(s), expected, rtol=1e-5, atol=1e-6)


def _teleport_once(objective, transfer="transport"):
    L.seed_everything(0)
    model = ReluMTL(k=3)
    tele = SymmetryTeleportCallback(teleporter={"name": "rescale", "objective": objective},
                                    schedule={"max_per_epoch": None}, transfer=transfer)
    spy = Spy()
    grab = Grab()

    class After(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 5:
                self.params = [p.detach().clone() for p in pl_module.parameters()]
                self.opt = {id(p): {k: v.clone() for k, v in optimizer.state[p].items()}
                            for p in pl_module.shared_parameters()}

    after = After()
    fit(model, [grab, Force(tele, steps=(5,)), spy, tele, after], steps=6)
    return model, tele, spy.snaps[5], after, grab.batches[5]


@pytest.mark.parametrize("objective", ["conflict", "grad_norm"])
def test_rescale_teleport_keeps_losses_exactly_and_improves_its_objective(objective):
    model, tele, snap, after, batch = _teleport_once(objective)
    rec = tele.history[0]
    assert rec.accepted and rec.moved, rec.reason
    shared_ids = {id(p) for p in model.shared_parameters()}
    names = list(dict(model.named_parameters()))
    before_model, after_model = ReluMTL(k=3), ReluMTL(k=3)
    for m, values in ((before_model, snap["params"]), (after_model, after.params)):
        with torch.no_grad():
            for p, v in zip(m.parameters(), values, strict=True):
                p.copy_(v)
    l0, j0 = _plain_jacobian(before_model, batch)
    l1, j1 = _plain_jacobian(after_model, batch)
    assert ((l1 - l0).abs() / l0).max() <= 1e-5  # eq. 5, exactly (float rounding)
    t = torch.cat([(a / b).reshape(-1) for a, b, n in
                   zip(after.params, snap["params"], names, strict=True) if id(dict(model.named_parameters())[n])
                   in shared_ids])
    torch.testing.assert_close(j1, j0 / t, rtol=1e-4, atol=1e-7)  # gradients at the new point: J / t
    if objective == "conflict":
        assert _cos(j1).min() > _cos(j0).min() + 0.01
    else:
        assert j1.mean(0).norm() > 1.05 * j0.mean(0).norm()
    assert rec.after.min_cos == pytest.approx(float(_cos(j1).min()), abs=1e-4)  # the record says what happened
    assert rec.grad_norm_ratio == pytest.approx(float(j1.mean(0).norm() / j0.mean(0).norm()), rel=1e-4)


def test_rescale_teleport_transports_adam_state_exactly_and_needs_no_backward():
    model, tele, snap, after, _ = _teleport_once("conflict")
    opt_before = snap["opt"]
    for p, old, new in zip(model.shared_parameters(), snap["params"][:4], after.params[:4], strict=True):
        t = new / old
        state_before, state_after = opt_before[id(p)], after.opt[id(p)]
        torch.testing.assert_close(state_after["exp_avg"], state_before["exp_avg"] / t, rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(state_after["exp_avg_sq"], state_before["exp_avg_sq"] / t**2, rtol=1e-5, atol=1e-12)
    calls = []
    real = torch.autograd.grad

    def counting(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    counts = {}
    for forced in (False, True):
        L.seed_everything(0)
        model = ReluMTL(k=3)
        tele = SymmetryTeleportCallback(teleporter="rescale", schedule={"max_per_epoch": None}, measure=True)
        calls.clear()
        torch.autograd.grad = counting
        try:
            fit(model, [Force(tele, steps=(2,) if forced else ()), tele], steps=3)
        finally:
            torch.autograd.grad = real
        counts[forced] = len(calls)
    assert counts[True] == counts[False]  # the teleport and its record need no per-task backward


def test_a_trunk_without_rescaling_symmetry_fails_with_the_reason():
    model = TinyMTL(k=2)
    model.trunk = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh())
    model.configure_multitask(["t0", "t1"], shared=model.trunk)
    tele = SymmetryTeleportCallback(teleporter="rescale", schedule={"max_per_epoch": None})
    with pytest.raises(NoSymmetryError, match="Tanh"):
        fit(model, [Force(tele, steps=(1,)), tele], steps=3)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_rescale_works_with_the_batchnorm_trunk_and_sgd():
    L.seed_everything(0)
    model = TinyMTL(k=3, optimizer="sgd")
    tele = SymmetryTeleportCallback(teleporter="rescale", schedule={"every": 2, "max_per_epoch": None})
    fit(model, [tele], steps=8)
    assert tele.num_teleports >= 2 and all(r.accepted for r in tele.history)
    assert all(r.loss_drift <= 1e-5 for r in tele.history if r.moved)
