"""The teleport ablation's controls do one thing each, at the teleport's steps."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from mtl_models import TinyMTL
from teleport_helpers import fit

from lightning_cost import SymmetryTeleportCallback
from lightning_cost.teleport import RandomMove, RandomMoveConfig, build_control


class Record(L.Callback):
    def __init__(self):
        self.weights, self.steps = {}, {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.weights[trainer.global_step] = [p.detach().clone() for p in pl_module.parameters()]

    def on_train_end(self, trainer, pl_module):
        opt = trainer.optimizers[0]
        self.steps = {id(p): int(opt.state[p]["step"]) for p in pl_module.parameters() if p in opt.state}


def test_drop_steps_drops_exactly_the_scheduled_steps():
    L.seed_everything(0)
    model, rec = TinyMTL(k=2), Record()
    fit(model, [build_control("drop_step", every=4), rec], steps=6)  # forced at step 2
    assert all(torch.equal(a, b) for a, b in zip(rec.weights[2], rec.weights[3], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(rec.weights[3], rec.weights[4], strict=True))
    assert set(rec.steps.values()) == {5}


def test_reset_state_forgets_only_the_shared_state():
    L.seed_everything(0)
    model, rec = TinyMTL(k=2), Record()
    fit(model, [build_control("reset_state", every=4), rec], steps=4)  # reset before step 2's update
    shared = {id(p) for p in model.shared_parameters()}
    assert {rec.steps[i] for i in shared} == {2} and {v for i, v in rec.steps.items() if i not in shared} == {4}
    with pytest.raises(ValueError, match="unknown control"):
        build_control("warp", 3)


def test_random_move_has_the_requested_relative_size():
    L.seed_everything(0)
    model = TinyMTL(k=2)
    tele = SymmetryTeleportCallback(teleporter=RandomMove(RandomMoveConfig(relative_size=0.02)),
                                    schedule={"every": 4, "max_per_epoch": None})
    fit(model, [tele], steps=4)
    rec = tele.history[0]
    assert rec.accepted and rec.moved and rec.displacement_rel == pytest.approx(0.02, rel=1e-5)
