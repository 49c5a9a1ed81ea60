"""Your own multi-task LightningModule with COST: two tasks, FairGrad, teleports (the README's example)."""

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cost import MultiTaskMixin, SymmetryTeleportCallback


class Net(MultiTaskMixin, L.LightningModule):  # the mixin goes first
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU())  # shared
        self.heads = nn.ModuleDict({"up": nn.Linear(64, 1), "down": nn.Linear(64, 1)})
        self.configure_multitask(["up", "down"], shared=self.trunk, method="fairgrad", alpha=2.0)

    def compute_task_losses(self, batch):  # pure (no logging): teleports re-evaluate it
        x, y = batch
        z = self.trunk(x)
        return {task: F.mse_loss(head(z).squeeze(-1), y[:, i]) for i, (task, head) in enumerate(self.heads.items())}

    def training_step(self, batch, batch_idx):  # return the K task losses; log as usual
        losses = self.compute_task_losses(batch)
        self.log_dict({f"train/{task}": loss for task, loss in losses.items()}, on_epoch=True)
        return losses

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-3)


def tasks_that_pull_apart(n=4096, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 16, generator=g)
    w = torch.randn(16, generator=g)
    y = torch.stack([torch.relu(x @ w), x[:, 0] - 3 * torch.relu(x @ w)], dim=1)  # "down" dominates, opposed
    return DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True)


if __name__ == "__main__":
    L.seed_everything(0)
    cost = SymmetryTeleportCallback(trigger="any", schedule={"warmup_epochs": 1, "max_per_epoch": 2})
    trainer = L.Trainer(max_epochs=4, callbacks=[cost], logger=False, enable_checkpointing=False)
    trainer.fit(Net(), tasks_that_pull_apart())
    for r in cost.history:  # one record per teleport, measured on its batch before and after
        if r.moved:
            print(f"step {r.step}: loss drift {r.loss_drift:.1e}, |g0| x{r.grad_norm_ratio:.3f}, "
                  f"min cos(g_i, g0) {r.before.min_cos:+.3f} -> {r.after.min_cos:+.3f}")
        else:
            print(f"step {r.step}: not moved ({r.reason or 'zero displacement'})")
    print("trigger ratio per epoch:", [round(e["trigger_ratio"], 3) for e in cost.epoch_stats])
