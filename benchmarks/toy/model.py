"""The toy as a multi-task LightningModule (:class:`ToyMTL`) and the dummy dataloader that drives it."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.toy.problem import toy_losses
from lightning_cost import MultiTaskMixin


class ToyMTL(MultiTaskMixin, L.LightningModule):
    """The toy as a multi-task LightningModule: ``x`` (a raw ``[2]`` parameter) is all there is, and shared.

    Args:
        init: the starting point ``(x1, x2)``.
        method: a registry name (``lightning_cost.aggregators.AVAILABLE``).
        l1_scale: factor on ``L1`` (0.1 in the Nash-MTL / FAMO versions).
        lr, betas: Adam's learning rate and betas.
        **hparams: the method's hyper-parameters.
    """

    def __init__(self, init: Sequence[float] = (0.0, 0.0), method: str = "ls", l1_scale: float = 1.0,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), **hparams: Any) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([float(v) for v in init], dtype=torch.float32))
        self.l1_scale = float(l1_scale)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.configure_multitask(["L1", "L2"], shared=[self.x], method=method, **hparams)

    def compute_task_losses(self, batch: Any) -> dict[str, Tensor]:
        """The two losses at ``x`` (the batch is a dummy): pure, so a teleport can evaluate it freely."""
        losses = toy_losses(self.x, self.l1_scale)
        return {"L1": losses[0], "L2": losses[1]}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.compute_task_losses(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=self.betas)


def dummy_loader(steps: int) -> DataLoader:
    """One dummy batch (a zero) per step: one epoch of ``steps`` steps."""
    return DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)
