"""End to end on real data: MultiMNIST from ../shared/data/mnist.npz, 3 aggregators, a real Trainer."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from benchmarks.data import MultiMNISTDataModule, default_data_root
from benchmarks.models import lenet_multimnist
from lightning_cost import MultiTaskMixin, SymmetryTeleportCallback

# the real MNIST file, as the other data tests: skip (not error) where the data root lacks it
pytestmark = pytest.mark.skipif(not (default_data_root() / "mnist.npz").exists(),
                                reason="mnist.npz not in the data root")


class MultiMNISTNet(MultiTaskMixin, L.LightningModule):
    def __init__(self, specs, in_shape, method):
        super().__init__()
        self.net = lenet_multimnist(specs, in_shape)
        self.configure_multitask(["left", "right"], shared=self.net.trunk, method=method)

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self.net(x)
        return {"left": F.cross_entropy(out["left"], y[:, 0]), "right": F.cross_entropy(out["right"], y[:, 1])}

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=2e-3)


def accuracy(model, dm):
    model.eval()
    correct, n = torch.zeros(2), 0
    with torch.no_grad():
        for x, y in dm.test_dataloader():
            out = model.net(x)
            correct += torch.stack([(out["left"].argmax(1) == y[:, 0]).sum(), (out["right"].argmax(1) == y[:, 1]).sum()])
            n += len(y)
    return correct / n


@pytest.fixture(scope="module")
def datamodule():
    dm = MultiMNISTDataModule(num_train=9600, num_val=500, num_test=2000, batch_size=32, image_size=28, seed=0)
    dm.setup("fit")
    dm.setup("test")
    return dm


@pytest.mark.parametrize("method", ["ls", "mgda", "fairgrad"])
def test_three_aggregators_beat_chance_on_both_tasks(datamodule, method):
    L.seed_everything(0)
    model = MultiMNISTNet(datamodule.task_specs, datamodule.in_shape, method)
    L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(model, datamodule.train_dataloader())
    acc = accuracy(model, datamodule)
    assert (acc > 0.5).all(), f"{method}: test accuracy {acc.tolist()} (chance is 0.1)"
    assert model.mtl_skipped_steps == 0


def test_cost_on_multimnist_teleports_and_still_learns(datamodule):
    L.seed_everything(0)
    model = MultiMNISTNet(datamodule.task_specs, datamodule.in_shape, "fairgrad")
    # MultiMNIST's two tasks rarely conflict this early: force two teleports (steps 150 and 250)
    tele = SymmetryTeleportCallback(schedule={"every": 100, "warmup_steps": 100, "max_per_epoch": None})

    L.Trainer(max_steps=300, accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, callbacks=[tele]).fit(
        model, datamodule.train_dataloader())
    assert [r.step for r in tele.history] == [150, 250]
    assert tele.num_teleports >= 1
    for rec in tele.history:
        if rec.accepted and rec.moved:
            assert rec.loss_drift <= tele.teleporter.config.loss_tolerance
            assert rec.after is not None and rec.after.task_norms and rec.after.conflicts >= 0
    assert (accuracy(model, datamodule) > 0.5).all()
