"""A teleport is safe where users train: frozen layers, exceptions, side effects, RNG, bad arguments."""

from __future__ import annotations

import math

import lightning as L
import pytest
import torch
import torchmetrics
from lightning.pytorch.callbacks import ModelCheckpoint
from mtl_models import TinyMTL, loader, regression_data, trainer
from teleport_helpers import Force, Spy, cost, fit

from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport import LoRAConfig, StateTransfer, TeleportSchedule


def test_frozen_shared_layers_are_never_touched():
    L.seed_everything(0)
    model = TinyMTL(k=3)
    model.trunk[0].requires_grad_(False)  # a frozen first layer of the shared trunk
    frozen = [p.detach().clone() for p in model.trunk[0].parameters()]
    tele = cost(inner_steps=3, min_gain=None)  # one inner loop: the mechanics, not the search
    fit(model, [Force(tele, steps=(2,)), tele], steps=4)
    rec = tele.history[0]
    assert rec.accepted and rec.moved and rec.sigma is not None
    assert all(torch.equal(a, b) for a, b in zip(frozen, model.trunk[0].parameters(), strict=True))
    assert not any(p.requires_grad for p in model.trunk[0].parameters())
    assert all(p.requires_grad for p in model.trunk[3].parameters())


class Boom(StateTransfer):
    def after_teleport(self, *args, **kwargs):
        raise RuntimeError("boom")


def test_an_exception_after_the_move_restores_weights_buffers_and_optimizer_state():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(teleporter={"inner_steps": 3}, schedule={"max_per_epoch": None}, transfer=Boom())
    spy = Spy()
    with pytest.raises(RuntimeError, match="boom"):
        fit(model, [Force(tele, steps=(3,)), spy, tele], steps=5)
    snap, opt = spy.snaps[3], model.trainer.optimizers[0]
    assert all(torch.equal(a, b) for a, b in zip(snap["params"], model.parameters(), strict=True))
    assert all(torch.equal(a, b) for a, b in zip(snap["buffers"], model.buffers(), strict=True))
    for p in model.parameters():
        assert all(torch.equal(v, opt.state[p][k]) for k, v in snap["opt"][id(p)].items())
    assert all(p.requires_grad for p in model.parameters()) and not any("lora" in n for n in model.state_dict())


class NoHook(TinyMTL):
    """training_step has side effects (a counter, a logged metric)."""

    def __init__(self):
        super().__init__(k=2)
        self.calls = 0
        self.seen = torchmetrics.MeanMetric()

    def training_step(self, batch, batch_idx):
        self.calls += 1
        self.seen.update(batch[1][:, 0].abs().mean())
        self.log("seen", self.seen, on_step=False, on_epoch=True)
        return super().training_step(batch, batch_idx)


class Counting(NoHook):
    """The same side effects, and a pure compute_task_losses the teleport can use instead."""

    def compute_task_losses(self, batch):
        x, y = batch
        z = self.trunk(x)
        return {f"t{i}": torch.nn.functional.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)}


def test_with_a_pure_loss_hook_training_step_runs_once_per_trained_batch():
    L.seed_everything(0)
    model = Counting()
    tele = cost(inner_steps=2)
    data = loader(regression_data(k=2))
    t = trainer(max_epochs=1, callbacks=[Force(tele, steps=(2, 5)), tele])
    t.fit(model, data)
    assert tele.num_teleports == 2 and model.calls == 8  # 8 batches, whatever the teleports evaluated
    expected = torch.stack([y[:, 0].abs().mean() for _, y in data]).mean()
    torch.testing.assert_close(t.callback_metrics["seen"], expected)


def test_without_a_pure_hook_the_side_effects_are_announced_once():
    L.seed_everything(0)
    model = NoHook()
    tele = cost(inner_steps=2)
    with pytest.warns(UserWarning, match="compute_task_losses") as caught:
        fit(model, [Force(tele, steps=(2,)), tele], steps=4)
    assert sum("compute_task_losses" in str(w.message) for w in caught) == 1
    assert model.calls > 4  # the teleport re-ran training_step


def _forced_run(ckpt_dir=None, resume=None, epochs=3):
    L.seed_everything(0)
    model = TinyMTL(k=3)
    tele = SymmetryTeleportCallback(teleporter={"inner_steps": 2, "min_gain": 0.02}, schedule={"every": 3, "max_per_epoch": None},
                                    seed=7)
    callbacks = [tele]
    if ckpt_dir is not None:
        callbacks.append(ModelCheckpoint(dirpath=ckpt_dir, save_last=True))
    trainer(max_epochs=epochs, callbacks=callbacks, enable_checkpointing=ckpt_dir is not None).fit(
        model, loader(regression_data(k=3), shuffle=False), ckpt_path=resume)
    return model, tele


def test_resume_with_teleports_is_bit_identical_to_the_uninterrupted_run(tmp_path):
    """Teleports draw from the callback's own checkpointed generator, never the global RNG."""
    whole, tele = _forced_run()
    _forced_run(ckpt_dir=tmp_path, epochs=1)
    resumed, tele2 = _forced_run(resume=tmp_path / "last.ckpt")
    assert tele.num_teleports == tele2.num_teleports >= 3  # the gain search ran, on restarted adapters too
    assert [r.accepted for r in tele.history] == [r.accepted for r in tele2.history]
    for a, b in zip(whole.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("kw,match", [
    ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"), ({"inner_steps": 2.5}, "inner_steps"),
    ({"alpha": 0}, "alpha"), ({"alpha": -3}, "alpha"), ({"gamma": math.nan}, "gamma"),
    ({"loss_tolerance": math.nan}, "loss_tolerance"), ({"radius": math.inf}, "radius"),
    ({"use_lt": "no"}, "use_lt"), ({"num_perturbations": True}, "num_perturbations"),
    ({"ratio": "paper"}, "ratio"), ({"inner_lr": 0.0}, "inner_lr"),
])
def test_bad_lora_settings_fail_at_construction_naming_the_argument(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        LoRAConfig(**kw)
    with pytest.raises((TypeError, ValueError), match=match):
        SymmetryTeleportCallback(teleporter=kw)


@pytest.mark.parametrize("kw,match", [
    ({"warmup_epochs": -1}, "warmup_epochs"), ({"max_per_epoch": 1.5}, "max_per_epoch"),
    ({"check_every": 0}, "check_every"), ({"warmup_fraction": 1.5}, "warmup_fraction"), ({"every": "3"}, "every"),
])
def test_bad_schedule_settings_fail_at_construction(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        TeleportSchedule(**kw)


@pytest.mark.parametrize("kw,match", [({"transfer": "no"}, "transfer"), ({"trigger": "paper"}, "rule"),
                                      ({"teleport_batches": -1}, "teleport_batches"), ({"seed": 1.0}, "seed"),
                                      ({"measure": "yes"}, "measure")])
def test_bad_callback_arguments_fail_at_construction(kw, match):
    with pytest.raises((TypeError, ValueError), match=match):
        SymmetryTeleportCallback(**kw)


def test_resume_with_changed_settings_warns_and_keeps_the_state(tmp_path):
    L.seed_everything(0)
    tele = cost(inner_steps=2)
    trainer(max_epochs=1, callbacks=[Force(tele, steps=(2,)), tele, ModelCheckpoint(dirpath=tmp_path, save_last=True)],
            enable_checkpointing=True).fit(TinyMTL(k=2), loader(regression_data(k=2)))
    tele2 = cost(inner_steps=2, gamma=0.5)
    with pytest.warns(UserWarning, match=r"gamma: 3\.0 -> 0\.5"):
        trainer(max_epochs=2, callbacks=[tele2]).fit(TinyMTL(k=2), loader(regression_data(k=2)),
                                                     ckpt_path=tmp_path / "last.ckpt")
    assert tele2.num_teleports == tele.num_teleports == 1 and len(tele2.history) == 1


def test_a_teleport_that_does_not_move_changes_nothing_else():
    """L_t alone has a zero (sub)gradient at the start: the displacement is exactly 0. Such a teleport is
    recorded as not moved; the step is taken and the optimizer state is untouched (no HTR)."""
    runs = []
    for force in (True, False):
        L.seed_everything(0)
        model = TinyMTL(k=2)
        tele = cost(inner_steps=3, use_lg=False) if force else cost(schedule={"max_per_epoch": 0})
        fit(model, [Force(tele, steps=(2,)), tele], steps=5)
        runs.append((model, tele))
    (moved_model, tele), (plain, _) = runs
    rec = tele.history[0]
    assert rec.accepted and not rec.moved and rec.sigma is None and tele.num_teleports == 0
    assert tele.transfer.pending_sigma is None
    for a, b in zip(moved_model.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a, b)  # the same run as without the teleport, step for step
