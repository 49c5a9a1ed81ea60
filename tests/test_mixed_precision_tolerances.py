"""Checks whose tolerance follows the precision they check: the exact teleport's level-set test and the
Gramian engine's first-step check, under ``precision="bf16-mixed"`` (autocast rounds to bfloat16)."""

from __future__ import annotations

import logging
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from mtl_models import TinyMTL, loader, regression_data, trainer
from teleport_helpers import ReluMTL, fit
from torch import nn

from lightning_cost import GramianConfig, SymmetryTeleportCallback
from lightning_cost.teleport import RandomMoveConfig, RescaleConfig, RescaleTeleporter, TaskLossEvaluator

BF16_EPS = torch.finfo(torch.bfloat16).eps  # 2**-7
SCHEDULE = {"every": 4, "on_trigger": False, "max_per_epoch": None}


class _Before(L.Callback):
    """Put before the teleport callback: the weights and batch each step starts its teleport from."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batch = batch

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.params = [p.detach().clone() for p in pl_module.parameters()]


class _After(L.Callback):
    """Put after it: for every accepted move, (batch, weights before, weights after)."""

    def __init__(self, tele, before):
        self.tele, self.before, self.seen, self.moves = tele, before, 0, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if len(self.tele.history) > self.seen:
            self.seen = len(self.tele.history)
            if self.tele.history[-1].moved:
                after = [p.detach().clone() for p in pl_module.parameters()]
                self.moves.append((self.before.batch, self.before.params, after))


def teleports(precision, steps=12, **teleporter):
    torch.manual_seed(0)
    model = ReluMTL(k=3)
    tele = SymmetryTeleportCallback(teleporter={"name": "rescale", **teleporter}, schedule=SCHEDULE)
    before = _Before()
    after = _After(tele, before)
    fit(model, [before, tele, after], steps=steps, precision=precision)
    return model, tele.history, after.moves


def autocast_losses(model, params, batch):
    """The task losses at ``params``, by plain autograd under the same bfloat16 autocast as training."""
    with torch.no_grad():
        for p, v in zip(model.parameters(), params, strict=True):
            p.copy_(v)
        x, y = batch
        with torch.autocast("cpu", dtype=torch.bfloat16):
            z = model.trunk(x)
            return torch.stack([F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(model.heads)]).float()


def test_exact_rescaling_is_accepted_under_bf16_with_the_default_and_was_rejected_with_the_old_one():
    model, history, moves = teleports("bf16-mixed")
    assert len(history) == 3 and all(r.accepted and r.moved for r in history)
    assert all(r.loss_tolerance == BF16_EPS for r in history)
    drifts = []
    for batch, before, after in moves:  # measured independently of the teleporter's own evaluator
        l0, l1 = autocast_losses(model, before, batch), autocast_losses(model, after, batch)
        drifts.append(float(((l1 - l0).abs() / l0.abs()).max()))
    assert len(drifts) == 3 and max(drifts) <= BF16_EPS
    assert max(drifts) > 1e-4  # above the old default: rounding alone, the action is exact

    _, old, _ = teleports("bf16-mixed", loss_tolerance=1e-4)  # the old default, now an explicit value: kept
    assert all(r.loss_tolerance == 1e-4 for r in old)
    rejected = [r for r in old if not r.accepted]
    assert rejected and all("loss drift above tolerance" in r.reason for r in rejected)
    assert not old[0].accepted and history[0].loss_drift > 1e-4  # the same first move, from the same state


def test_float32_keeps_the_old_tolerance():
    _, history, _ = teleports("32-true", steps=8)
    assert history and all(r.accepted and r.moved and r.loss_tolerance == 1e-4 for r in history)


def test_a_move_off_the_level_set_is_still_rejected_under_bf16():
    torch.manual_seed(0)
    model = ReluMTL(k=3)
    tele = SymmetryTeleportCallback(teleporter={"name": "random_move", "relative_size": 0.3, "loss_tolerance": "auto",
                                                "abs_tolerance": 1e-7},
                                    schedule={**SCHEDULE, "every": 40})  # a trained point: the losses depend on the trunk
    fit(model, [tele], steps=61, precision="bf16-mixed")
    assert len(tele.history) == 2
    for r in tele.history:
        assert not r.accepted and "loss drift above tolerance" in r.reason and r.loss_tolerance == BF16_EPS


@pytest.mark.parametrize(("context", "dtype", "expected"), [
    (None, torch.float32, 1e-4),
    (lambda: torch.autocast("cpu", dtype=torch.bfloat16), torch.float32, 2.0**-7),
    (lambda: torch.autocast("cpu", dtype=torch.float16), torch.float32, 2.0**-10),
    (None, torch.bfloat16, 2.0**-7),  # precision="bf16-true": the weights themselves
    (None, torch.float64, 1e-4),
])
def test_auto_resolves_to_the_precision_of_the_forward_context(context, dtype, expected):
    evaluator = TaskLossEvaluator(nn.Linear(2, 2).to(dtype), context)
    problem = SimpleNamespace(evaluator=evaluator)
    assert RescaleTeleporter().resolved_loss_tolerance(problem) == expected  # type: ignore[arg-type]
    assert RescaleTeleporter(RescaleConfig(loss_tolerance=3e-5)).resolved_loss_tolerance(problem) == 3e-5  # type: ignore[arg-type]


def test_tolerance_settings_are_validated():
    for bad, err in (("loose", ValueError), (-1.0, ValueError), (float("nan"), ValueError), (True, TypeError)):
        with pytest.raises(err, match="loss_tolerance"):
            RescaleConfig(loss_tolerance=bad)
    with pytest.raises(ValueError, match="loss_tolerance"):
        RandomMoveConfig(loss_tolerance="Auto")
    assert RescaleConfig().loss_tolerance == "auto" and RandomMoveConfig(loss_tolerance="auto").loss_tolerance == "auto"
    for bad in ("loose", 0.0, 1.5, True):
        with pytest.raises(ValueError, match="rtol"):
            GramianConfig(rtol=bad)
    assert GramianConfig().rtol == "auto"


# ----------------------------------------------------------------------------- the Gramian engine
class TiedWeights(TinyMTL):
    """Reads the first layer's weight outside its forward: the Gram parts cannot see that use."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.trunk(x) + F.linear(x, self.trunk[0].weight)
        return {f"t{i}": F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)}


def gramian_fit(cls, path, precision, rtol="auto"):
    torch.manual_seed(0)
    model = cls(k=3, method="mgda", batchnorm=False, engine="gramian", gramian={"path": path, "rtol": rtol},
                optimizer="sgd")
    trainer(max_steps=2, precision=precision).fit(model, loader(regression_data(k=3)))
    return model


@pytest.mark.parametrize("path", ["gram", "auto"])
def test_the_gramian_engine_stays_on_under_bf16_where_it_is_exact(path, caplog):
    with caplog.at_level(logging.WARNING):
        model = gramian_fit(TinyMTL, path, "bf16-mixed")
    engine = model.mtl_gramian_engine
    assert engine.verified and engine.disabled_reason is None and model.mtl_uses_gramian_engine
    assert "differ from J J^T" not in caplog.text
    assert engine.compute_dtype == torch.bfloat16 and engine.check_rtol() == 4 * BF16_EPS
    assert gramian_fit(TinyMTL, path, "32-true").mtl_gramian_engine.check_rtol() == 1e-3


def test_the_old_gramian_tolerance_switched_a_correct_engine_off_under_bf16():
    model = gramian_fit(TinyMTL, "auto", "bf16-mixed", rtol=1e-3)  # the old default, now explicit: kept
    assert model.mtl_gramian_engine.disabled_reason is not None and not model.mtl_uses_gramian_engine


def test_a_weight_used_outside_its_module_is_still_caught_under_bf16(caplog):
    with caplog.at_level(logging.WARNING):
        model = gramian_fit(TiedWeights, "gram", "bf16-mixed")
    assert model.mtl_gramian_engine.disabled_reason is not None and not model.mtl_uses_gramian_engine
    assert "differ from J J^T" in caplog.text and "bfloat16" in caplog.text
