"""The approximate trigger on the shared representation's gradients (no parameter Jacobian per step)."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from mtl_models import TinyMTL, loader, regression_data
from teleport_helpers import Force, MarkedRaw, WithRaw, fit

from lightning_cost import SymmetryTeleportCallback


@pytest.mark.parametrize("method", ["ls", "mgda"])
def test_representation_jacobian_is_the_gradient_wrt_the_trunk_output(method):
    """Loss weighting (K passes through the heads) and Jacobian path (same VJPs) record dL_i/dz."""
    torch.manual_seed(0)
    model = TinyMTL(k=3, method=method)
    x, y = next(iter(loader(regression_data(k=3))))
    model.training_step((x, y), 0)
    assert model.mtl_step.representation_jacobian is None  # not requested: nothing recorded
    model.request_representation_jacobian(True)
    model.training_step((x, y), 0)
    rj = model.mtl_step.representation_jacobian
    assert rj.shape == (3, 32, 16)
    assert (model.mtl_step.gramian is None) == (method == "ls")  # MGDA: the Gramian engine records G, not J
    z = model.trunk(x)
    losses = model.evaluate_task_losses((x, y))
    for i in range(3):
        loss = torch.nn.functional.mse_loss(model.heads[i](z).squeeze(-1), y[:, i])
        torch.testing.assert_close(loss, losses[i])
        (g,) = torch.autograd.grad(loss, z)
        torch.testing.assert_close(rj[i], g, rtol=1e-5, atol=1e-7)
    if method == "ls":  # the K-pass fallback of the batched VJP gives the same rows
        model.mtl_jacobian_mode = "loop"
        model.training_step((x, y), 0)
        torch.testing.assert_close(model.mtl_step.representation_jacobian, rj, rtol=1e-6, atol=1e-8)
    model.request_representation_jacobian(False)
    assert model._mtl_rep_hook is None


def test_mark_representation_and_a_clear_error_without_one():
    model = MarkedRaw()
    model.request_representation_jacobian(True)
    model.training_step(next(iter(loader(regression_data(k=2)))), 0)
    assert model.mtl_step.representation_jacobian.shape == (2, 32, 16)
    tele = SymmetryTeleportCallback(trigger={"on": "representation"})
    with pytest.raises(RuntimeError, match="mark_representation"):
        fit(WithRaw(), [tele], steps=1)  # a parameter list and nothing marked


def test_representation_trigger_decides_from_the_representation_and_teleports_without_a_step_jacobian():
    L.seed_everything(0)
    model = TinyMTL(k=3, method="ls")
    tele = SymmetryTeleportCallback(trigger={"on": "representation", "reduce": "mean"},
                                    schedule={"max_per_epoch": None}, teleporter={"inner_steps": 2})
    seen = []

    class Check(L.Callback):
        def on_after_backward(self, trainer, pl_module):
            rec = pl_module.mtl_step
            seen.append((rec.jacobian is None, rec.representation_jacobian is not None))

    fit(model, [Force(tele, steps=(3,)), tele, Check()], steps=5)
    assert seen == [(True, True)] * 5  # the loss weighting never paid for a parameter Jacobian
    assert tele.epoch_stats[0]["checked"] == 5
    rec = tele.history[0]
    assert rec.accepted and rec.trigger_conflicts is not None and rec.sigma is not None
    assert len(rec.before.cosines) == 3 and len(rec.before.task_norms) == 3 and len(rec.after.task_norms) == 3
    assert model._mtl_rep_hook is None  # removed at the end of fit
