"""Callbacks and modules shared by the teleport tests."""

from __future__ import annotations

import lightning as L
import torch
from mtl_models import TinyMTL, loader, regression_data, trainer
from torch import nn

from lightning_cost import SymmetryTeleportCallback


def cost(schedule: dict | None = None, transfer: str | None = None, **lora) -> SymmetryTeleportCallback:
    """A LoRA teleport callback with ``lora`` settings and no cap per epoch unless ``schedule`` says so."""
    return SymmetryTeleportCallback(teleporter={"name": "lora", **lora}, schedule={"max_per_epoch": None,
                                                                                  **(schedule or {})},
                                    transfer=transfer)


class Force(L.Callback):
    """Requests a teleport at the given optimizer steps."""

    def __init__(self, tele, steps=(3,)):
        self.tele, self.steps = tele, set(steps)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step in self.steps:
            self.tele.request_teleport()


class Grab(L.Callback):
    """Keeps every training batch, in step order (``batches``)."""

    def __init__(self):
        self.batches = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.batches.append(batch)


class Spy(L.Callback):
    """Put before the teleport callback: snapshots the state the teleport starts from."""

    def __init__(self):
        self.snaps = {}

    @property
    def snap(self):
        return self.snaps[max(self.snaps)]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.snaps[trainer.global_step] = {
            "params": [p.detach().clone() for p in pl_module.parameters()],
            "buffers": [b.detach().clone() for b in pl_module.buffers()],
            "opt": {id(p): {k: v.clone() for k, v in optimizer.state[p].items()} for p in pl_module.parameters()
                    if p in optimizer.state},
            "step": trainer.global_step,
        }


def fit(model, callbacks, steps=6, **kw):
    trainer(max_steps=steps, callbacks=callbacks, **kw).fit(model, loader(regression_data(k=len(model.task_names)),
                                                                           shuffle=False))


class WithRaw(TinyMTL):
    """A raw shared ``nn.Parameter`` next to the trunk (it gets a dense delta)."""

    def __init__(self):
        super().__init__(k=2, batchnorm=True)
        self.scale = nn.Parameter(torch.tensor([1.5]))
        self.configure_multitask(["t0", "t1"], shared=[*self.trunk.parameters(), self.scale])

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.trunk(x) * self.scale
        return {f"t{i}": ((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)}


class MarkedRaw(WithRaw):
    """Shared parameters given as a list: the representation is marked in training_step."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.mark_representation(self.trunk(x) * self.scale)
        return {f"t{i}": ((h(z).squeeze(-1) - y[:, i]) ** 2).mean() for i, h in enumerate(self.heads)}


class ReluMTL(TinyMTL):
    """A ReLU trunk with two hidden layers (32 exact rescaling scales) and K linear heads."""

    def __init__(self, k: int = 3, method="ls", optimizer: str = "adam"):
        super().__init__(k=k, method=method, optimizer=optimizer, batchnorm=False)
        self.trunk = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.configure_multitask([f"t{i}" for i in range(k)], shared=self.trunk, method=method)
