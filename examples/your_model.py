"""Your model with the mixin: shared trunk, one head per task, a method that needs the Gramian only."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cost import MultiTaskMixin


class ThreeTasks(MultiTaskMixin, L.LightningModule):
    def __init__(self, method="upgrad", **hparams):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU())
        self.heads = nn.ModuleList(nn.Linear(32, 1) for _ in range(3))
        # shared: the module (or parameters) whose per-task gradients the method combines; the heads get
        # the sum of their own task's gradients
        self.configure_multitask(["a", "b", "c"], shared=self.trunk, method=method, **hparams)

    def compute_task_losses(self, batch):  # a [K] tensor in task order works as well as a mapping
        x, y = batch
        z = self.trunk(x)
        return torch.stack([F.mse_loss(head(z).squeeze(-1), y[:, k]) for k, head in enumerate(self.heads)])

    def training_step(self, batch, batch_idx):
        return self.compute_task_losses(batch)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def regression_tasks(n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.stack([x[:, 0], -x[:, 0] + x[:, 1], x[:, 2] ** 2], dim=1)
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


if __name__ == "__main__":
    L.seed_everything(0)
    model = ThreeTasks()
    trainer = L.Trainer(max_epochs=2, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.fit(model, regression_tasks())
    step = model.mtl_step  # the last step: losses, Gramian, direction (detached, unscaled)
    print("losses:", [round(v, 4) for v in step.losses.tolist()])
    print("Gramian diagonal (squared task-gradient norms):", [round(v, 4) for v in step.gramian.diagonal().tolist()])
    print("Jacobian formed:", step.jacobian is not None)  # False: the Gramian engine never forms J
    print("paths per shared layer:", model.mtl_gramian_engine.paths())
