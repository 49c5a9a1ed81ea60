"""The rescaling toward flatter points: its Hessian-trace formula, its Hutchinson estimate, and its
effect on the exact Hessian trace (plain autograd before and after, against random rescalings)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from teleport_helpers import Force, Grab, ReluMTL, Spy, fit
from torch import nn
from torch.func import functional_call, hessian

from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport import RescaleSymmetry
from lightning_cost.teleport.symmetry.flatness import ScaledHessianTrace, hessian_diagonal
from lightning_cost.teleport.symmetry.rescale import RescaleConfig


def _exact_hessian(trunk, names, shapes, loss_of_output, x):
    """The Hessian of ``loss_of_output(trunk(x))`` over the trunk's parameters, flattened (plain torch.func)."""
    sizes = [s.numel() for s in shapes]

    def loss(flat):
        parts = dict(zip(names, (c.reshape(s) for c, s in zip(flat.split(sizes), shapes, strict=True)), strict=True))
        return loss_of_output(functional_call(trunk, parts, (x,)))

    flat = torch.cat([p.detach().reshape(-1) for p in trunk.parameters()]).double()
    return hessian(loss)(flat)


def _tiny(seed=0):
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 5, dtype=torch.float64), torch.randn(16, 3, dtype=torch.float64)
    names = [n for n, _ in trunk.named_parameters()]
    shapes = [p.shape for p in trunk.parameters()]
    return trunk, x, y, names, shapes


def test_scaled_trace_equals_the_exact_trace_at_the_rescaled_point():
    """tr H' = sum_j H_jj / t_j^2: the formula, from the diagonal at the current point, against the exact
    Hessian computed again at the rescaled weights."""
    trunk, x, y, names, shapes = _tiny()
    params = list(trunk.parameters())
    mse = lambda out: ((out - y) ** 2).mean()  # noqa: E731
    h = _exact_hessian(trunk, names, shapes, mse, x)
    diag = [d.reshape(s) for d, s in zip(h.diagonal().split([s.numel() for s in shapes]), shapes, strict=True)]
    sym = RescaleSymmetry.find(trunk, (x,), params)
    trace = ScaledHessianTrace(sym, diag)
    assert float(trace(torch.zeros(sym.num_scales, dtype=torch.float64))) == pytest.approx(float(h.trace()), rel=1e-10)
    for seed in range(3):
        s = torch.empty(sym.num_scales, dtype=torch.float64).uniform_(-0.8, 0.8, generator=torch.Generator().manual_seed(seed))
        moved = [p.detach().clone() for p in params]
        with torch.no_grad():
            sym.apply_(s)
            h_new = _exact_hessian(trunk, names, shapes, mse, x)
            for p, m in zip(params, moved, strict=True):
                p.copy_(m)
        assert float(trace(s)) == pytest.approx(float(h_new.trace()), rel=1e-8)
        assert abs(float(h_new.trace()) - float(h.trace())) > 1e-3 * abs(float(h.trace()))  # the move matters


def test_hutchinson_diagonal_converges_to_the_exact_diagonal():
    trunk, x, y, names, shapes = _tiny(1)
    mse = lambda out: ((out - y) ** 2).mean()  # noqa: E731
    exact = _exact_hessian(trunk, names, shapes, mse, x).diagonal()
    est = hessian_diagonal(lambda: mse(trunk(x)), list(trunk.parameters()), 3000, torch.Generator().manual_seed(0))
    flat = torch.cat([e.reshape(-1) for e in est]).double()
    assert (flat - exact).abs().max() <= 0.05 * exact.abs().max()
    assert float(flat.sum()) == pytest.approx(float(exact.sum()), rel=0.05)


def test_flatness_config_is_validated():
    with pytest.raises(ValueError, match="probes"):
        RescaleConfig(objective="flatness", probes=0)
    with pytest.raises(ValueError, match="objective"):
        RescaleConfig(objective="flat")


def test_flatness_teleport_lowers_the_exact_hessian_trace_more_than_random_rescalings():
    """Through the callback: the losses stay, the exact Hessian trace of the mean task loss (plain
    torch.func, heads fixed) falls; rescalings of the same size in random directions do not do as well."""
    L.seed_everything(0)
    model = ReluMTL(k=3)
    tele = SymmetryTeleportCallback(teleporter={"name": "rescale", "objective": "flatness", "max_scale": 1.5,
                                                "probes": 16}, schedule={"max_per_epoch": None})
    spy, grab = Spy(), Grab()

    class After(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step == 5:
                self.params = [p.detach().clone() for p in pl_module.trunk.parameters()]

    after = After()
    fit(model, [grab, Force(tele, steps=(5,)), spy, tele, after], steps=6)
    rec = tele.history[0]
    assert rec.accepted and rec.moved, rec.reason
    x, y = grab.batches[5]
    trunk = model.trunk.double()
    heads = [h.double() for h in model.heads]
    names = [n for n, _ in trunk.named_parameters()]
    shapes = [p.shape for p in trunk.parameters()]
    mean_loss = lambda z: torch.stack([((h(z).squeeze(-1) - y[:, i].double()) ** 2).mean()  # noqa: E731
                                       for i, h in enumerate(heads)]).mean()
    trunk_ids = [id(p) for p in model.trunk.parameters()]
    before = [v for p, v in zip(model.parameters(), spy.snaps[5]["params"], strict=True) if id(p) in trunk_ids]

    def trace_at(values):
        with torch.no_grad():
            for p, v in zip(trunk.parameters(), values, strict=True):
                p.copy_(v)
        return float(_exact_hessian(trunk, names, shapes, mean_loss, x.double()).trace())

    t0, t1 = trace_at(before), trace_at(after.params)
    assert t1 < 0.98 * t0, (t0, t1)
    sym = RescaleSymmetry.find(trunk, (x.double(),), list(trunk.parameters()))
    move = torch.cat([(a / b.double()).reshape(-1) for a, b in zip(after.params, before, strict=True)])
    size = float(move.log().norm())
    gen = torch.Generator().manual_seed(1)
    random_changes = []
    for _ in range(10):
        trace_at(before)
        s = torch.randn(sym.num_scales, generator=gen, dtype=torch.float64)
        s = s * size / float(sym.flat_factors(s).log().norm())
        with torch.no_grad():
            sym.apply_(s)
        random_changes.append(trace_at([p.detach().clone() for p in trunk.parameters()]) - t0)
    assert t1 - t0 < min(random_changes), (t1 - t0, random_changes)
