"""Small multi-task LightningModules and data used across the tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_cost import MultiTaskMixin


def regression_data(n: int = 256, d: int = 8, k: int = 2, seed: int = 0, conflict: float = 1.0) -> TensorDataset:
    """K regression targets from one input; with ``conflict`` > 0 tasks pull the trunk apart."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    base = torch.randn(d, generator=g)
    ys = []
    for i in range(k):
        sign = -1.0 if (i % 2 and conflict) else 1.0
        w = sign * base * conflict + 0.5 * torch.randn(d, generator=g)
        ys.append(x @ w + 0.1 * torch.randn(n, generator=g))
    return TensorDataset(x, torch.stack(ys, dim=1))


class TinyMTL(MultiTaskMixin, L.LightningModule):
    """Shared MLP trunk (with BatchNorm) and one linear head per task."""

    def __init__(self, k: int = 2, d: int = 8, hidden: int = 16, method="ls", lr: float = 1e-2,
                 optimizer: str = "adam", batchnorm: bool = True, **hparams):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(d, hidden)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(hidden))
        layers += [nn.ReLU(), nn.Linear(hidden, hidden), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(hidden, 1) for _ in range(k)])
        self.lr, self.optimizer_name = lr, optimizer
        self.configure_multitask([f"t{i}" for i in range(k)], shared=self.trunk, method=method, **hparams)

    def training_step(self, batch, batch_idx):
        x, y = batch
        z = self.trunk(x)
        return {f"t{i}": F.mse_loss(h(z).squeeze(-1), y[:, i]) for i, h in enumerate(self.heads)}

    def configure_optimizers(self):
        if self.optimizer_name == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def loader(ds: TensorDataset, batch_size: int = 32, shuffle: bool = False) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle)


def trainer(**kw) -> L.Trainer:
    opts = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False)
    opts.update(kw)
    return L.Trainer(**opts)
