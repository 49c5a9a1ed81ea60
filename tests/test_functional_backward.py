"""``lightning_cost.backward`` in a plain loop and under Fabric gives exactly the mixin's update under a Trainer."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.fabric import Fabric
from mtl_models import TinyMTL, loader, regression_data, trainer
from torch import nn

import lightning_cost
from lightning_cost.aggregators import LossWeighting, build_aggregator
from lightning_cost.functional import is_stateful

STEPS, LR = 5, 1e-2
#: (registry name, hyper-parameters): three aggregators (PCGrad seeded), three loss weightings
#: (UW has parameters, FAMO is stateful) and DB-MTL, which reads the losses (observe_losses, through the step)
METHODS = [("upgrad", {}), ("mgda", {}), ("pcgrad", {"seed": 0}), ("ls", {}), ("uw", {"num_tasks": 2}), ("famo", {}),
           ("dbmtl", {})]


class Plain(nn.Module):
    """TinyMTL's layers, built in the same order (so the same seed gives the same weights), no Lightning."""

    def __init__(self, k: int = 2, d: int = 8, hidden: int = 16) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, hidden),
                                   nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(k)])

    def forward(self, x, y):
        z = self.trunk(x)
        return [F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)]


def _batches(n=STEPS):
    return [b for _, b in zip(range(n), loader(regression_data(), batch_size=32), strict=False)]


def _plain_loop(name, hparams, fabric: Fabric | None = None):
    torch.manual_seed(0)
    model = Plain()
    method = build_aggregator(name, **hparams)
    opt = torch.optim.Adam([*model.parameters(), *method.parameters()], lr=LR)
    run_model = model
    if fabric is not None:
        run_model, opt = fabric.setup(model, opt)
    records = []
    for x, y in _batches():
        opt.zero_grad()
        losses = run_model(x, y)
        records.append(lightning_cost.backward(losses, shared=model.trunk.parameters(), method=method))
        opt.step()
    return [p.detach().clone() for p in [*model.parameters(), *method.parameters()]], records


def _mixin(name, hparams, **kw):
    torch.manual_seed(0)
    net = TinyMTL(method=name, lr=LR, engine="jacobian", **{k: v for k, v in hparams.items() if k != "num_tasks"}, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=STEPS).fit(net, loader(regression_data(), batch_size=32))
    params = [*net.trunk.parameters(), *net.heads.parameters(), *net.mtl_method.parameters()]
    return [p.detach().clone() for p in params], net


@pytest.mark.parametrize(("name", "hparams"), METHODS, ids=[m for m, _ in METHODS])
def test_plain_loop_and_fabric_equal_the_mixin_under_the_trainer(name, hparams):
    mixin, net = _mixin(name, hparams)
    plain, records = _plain_loop(name, hparams)
    fabric, _ = _plain_loop(name, hparams, Fabric(accelerator="cpu", devices=1))
    assert len(mixin) == len(plain) == len(fabric)
    for a, b, c in zip(mixin, plain, fabric, strict=True):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert not any(r.skipped for r in records)
    torch.manual_seed(0)
    init = [p.detach().clone() for p in Plain().parameters()]
    assert not any(torch.equal(a, b) for a, b in zip(init, plain, strict=False))  # every weight moved
    if name != "ls":  # the method matters: five LS steps end elsewhere
        assert not torch.equal(plain[0], _plain_loop("ls", {})[0][0])
    torch.testing.assert_close(records[-1].losses, net.mtl_step.losses, rtol=0, atol=0)
    if isinstance(net.mtl_method, LossWeighting):
        assert records[-1].jacobian is None
    else:
        assert records[-1].jacobian.shape[0] == 2 and torch.equal(records[-1].direction, net.mtl_step.direction)


def test_a_loss_weighting_on_the_jacobian_path_equals_the_mixin_with_the_jacobian_requested():
    """``jacobian=True`` is the mixin's Jacobian step for a loss weighting (e.g. with the teleport on):
    the heads get ``sum_k c_k grad L_k`` with the method's weights."""

    class Requested(TinyMTL):
        def on_fit_start(self):
            self.request_jacobian()

    torch.manual_seed(0)
    net = Requested(method="famo", lr=LR, engine="jacobian")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer(max_steps=STEPS).fit(net, loader(regression_data(), batch_size=32))
    torch.manual_seed(0)
    model, method = Plain(), build_aggregator("famo")
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    for x, y in _batches():
        opt.zero_grad()
        record = lightning_cost.backward(model(x, y), model.trunk.parameters(), method, jacobian=True)
        opt.step()
    assert torch.equal(record.extras["weights"], net.mtl_step.extras["weights"])
    assert torch.equal(record.jacobian, net.mtl_step.jacobian)
    for a, b in zip([*net.trunk.parameters(), *net.heads.parameters()], model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_gradients_accumulate_like_loss_backward_and_a_tensor_or_mapping_works():
    torch.manual_seed(0)
    model = Plain()
    x, y = _batches(1)[0]
    lightning_cost.backward(model(x, y), model.trunk.parameters(), "upgrad")
    once = [p.grad.clone() for p in model.parameters()]
    lightning_cost.backward(torch.stack(model(x, y)), model.trunk.parameters(), "upgrad")
    losses = model(x, y)
    record = lightning_cost.backward({"a": losses[0], "b": losses[1]}, model.trunk.parameters(), "upgrad")
    for g, p in zip(once, model.parameters(), strict=True):
        torch.testing.assert_close(p.grad, 3 * g)
    assert record.direction.numel() == sum(p.numel() for p in model.trunk.parameters())


def test_a_skipped_step_leaves_the_weights_untouched(caplog):
    torch.manual_seed(0)
    model = Plain()
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    x, y = _batches(1)[0]
    before = [p.detach().clone() for p in model.parameters()]
    losses = model(x, y)
    record = lightning_cost.backward([losses[0] * float("nan"), losses[1]], model.trunk.parameters(), "upgrad")
    assert record.skipped and not record.finite
    assert all(p.grad is None for p in model.parameters())
    opt.step()
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)
    assert "skipping the optimizer step" in caplog.text


def test_errors_are_clear():
    torch.manual_seed(0)
    model = Plain()
    x, y = _batches(1)[0]
    shared = model.trunk.parameters
    with pytest.raises(ValueError, match="at least 2 task losses"):
        lightning_cost.backward(model(x, y)[:1], shared(), "upgrad")
    with pytest.raises(ValueError, match="must be a scalar tensor"):
        lightning_cost.backward([model(x, y)[0], model.trunk(x).sum(1)], shared(), "upgrad")
    with pytest.raises(ValueError, match=r"\[K\] tensor"):
        lightning_cost.backward(torch.stack(model(x, y)).reshape(1, 2), shared(), "upgrad")
    with pytest.raises(ValueError, match="unknown multi-task method"):
        lightning_cost.backward(model(x, y), shared(), "nope")
    with pytest.raises(ValueError, match="no shared parameters"):
        lightning_cost.backward(model(x, y), [], "upgrad")
    frozen = Plain()
    frozen.trunk.requires_grad_(False)
    with pytest.raises(ValueError, match="no shared parameter requires grad"):
        lightning_cost.backward(frozen(x, y), frozen.trunk.parameters(), "upgrad")
    head_only = F.mse_loss(model.heads[1](torch.zeros(4, 16)).squeeze(-1), y[:4, 1])
    with pytest.raises(ValueError, match="task 1 is not connected to the shared parameters"):
        lightning_cost.backward([model(x, y)[0], head_only], shared(), "upgrad")
    stacked = torch.stack([model(x, y)[0], head_only])  # a [K] tensor from torch.stack: each task is checked
    with pytest.raises(ValueError, match="task 1 is not connected"):
        lightning_cost.backward(stacked, shared(), "upgrad")
    with torch.no_grad():
        detached = model(x, y)
    with pytest.raises(ValueError, match="do not require grad"):
        lightning_cost.backward(detached, shared(), "upgrad")
    with pytest.raises(ValueError, match="keeps state across steps"):
        lightning_cost.backward(model(x, y), shared(), "famo")
    with pytest.raises(ValueError, match="only be given with a method name"):
        lightning_cost.backward(model(x, y), shared(), build_aggregator("upgrad"), tol=1e-3)
    with pytest.raises(TypeError, match="must be a name, an Aggregator or a LossWeighting"):
        lightning_cost.backward(model(x, y), shared(), object())
    assert all(p.grad is None for p in model.parameters())  # nothing was backpropagated by a failed call


def test_names_that_keep_state_must_be_instances():
    stateful = {"uw", "famo", "dwa", "rlw", "pcgrad", "graddrop", "nashmtl", "gradvac", "random", "modo"}
    stateless = {"ls", "si", "mgda", "upgrad", "cagrad", "imtl", "fairgrad", "dualproj"}
    for name in stateful | stateless:
        method = build_aggregator(name, **({"num_tasks": 2} if name == "uw" else {}))
        assert is_stateful(method) == (name in stateful), name


SCRIPT = Path(__file__).parent / "scripts" / "ddp_functional.py"


@pytest.mark.ddp
def test_fabric_ddp_equals_the_mixin_under_trainer_ddp_on_the_same_per_rank_data(tmp_path):
    """Each rank has its own samples; the Jacobian is averaged over ranks before the aggregation and the
    surrogate's gradients go through DDP's reducer, in both routes."""
    states = {}
    for mode in ("fabric", "trainer"):
        out = tmp_path / mode
        out.mkdir()
        proc = subprocess.run([sys.executable, str(SCRIPT), str(out), mode], capture_output=True, text=True,
                              timeout=300, cwd=out)
        assert proc.returncode == 0, proc.stderr[-3000:]
        states[mode] = [torch.load(out / f"rank{i}.pt") for i in range(2)]
    f0, f1 = states["fabric"]
    t0, t1 = states["trainer"]
    assert not torch.equal(f0["first_local_losses"], f1["first_local_losses"])  # different samples per rank
    assert torch.equal(f0["first_local_losses"], t0["first_local_losses"])
    for a, b, c, d in zip(f0["params"], f1["params"], t0["params"], t1["params"], strict=True):
        assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(c, d)
