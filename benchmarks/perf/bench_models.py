"""The perf benchmark's models and data: a shared trunk with K heads (LeNet, the fingerprint MLP,
ResNet-18) and the batches they are timed on."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from lightning_cost import MultiTaskMixin


class BenchMTL(MultiTaskMixin, L.LightningModule):
    """A shared trunk and K classification heads; ``training_step`` returns the K losses."""

    def __init__(self, trunk: nn.Module, heads: nn.ModuleList, method: Any = "ls", lr: float = 1e-3,
                 **multitask: Any) -> None:
        super().__init__()
        self.trunk, self.heads, self.lr = trunk, heads, lr
        self.configure_multitask([f"t{i}" for i in range(len(heads))], shared=self.trunk, method=method, **multitask)

    def task_loss_list(self, batch: Any) -> list[Tensor]:
        x, y = batch
        z = self.trunk(x)
        return [F.cross_entropy(h(z), y[:, i]) for i, h in enumerate(self.heads)]

    def task_losses(self, batch: Any) -> Tensor:
        return torch.stack(self.task_loss_list(batch))

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        return dict(zip(self.task_names, self.task_loss_list(batch), strict=True))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr)


def lenet_parts(k: int) -> tuple[nn.Module, nn.ModuleList]:
    from benchmarks.data.tasks import TaskSpec
    from benchmarks.models import lenet_multimnist

    net = lenet_multimnist([TaskSpec.multiclass(f"t{i}", 10) for i in range(k)], in_shape=(1, 28, 28))
    return net.trunk, nn.ModuleList(list(net.heads.values()))


def tox21_mlp_parts(k: int) -> tuple[nn.Module, nn.ModuleList]:
    """The Tox21/QM8 tables' model: ECFP4 (2048 bits) -> 512 -> 256 MLP trunk, one head per task."""
    from benchmarks.models import mlp

    return mlp(2048, (512, 256), batchnorm=True, dropout=0.1), nn.ModuleList([nn.Linear(256, 2) for _ in range(k)])


def resnet_parts(k: int) -> tuple[nn.Module, nn.ModuleList]:
    from torchvision.models import resnet18

    trunk = resnet18(num_classes=10)
    width = trunk.fc.in_features
    trunk.fc = nn.Identity()
    return trunk, nn.ModuleList([nn.Linear(width, 10) for _ in range(k)])


_MNIST_CACHE: dict[int, TensorDataset] = {}


def multimnist_train(n: int) -> TensorDataset:
    """MultiMNIST (28x28, the original recipe) train composites, real data."""
    if n not in _MNIST_CACHE:
        from benchmarks.data import MultiMNISTDataModule

        dm = MultiMNISTDataModule(num_train=n, num_val=256, num_test=256, batch_size=256, image_size=28)
        dm.setup("fit")
        _MNIST_CACHE[n] = dm.train_set
    return _MNIST_CACHE[n]


def dataset(kind: str, k: int, batches: int) -> tuple[TensorDataset, int]:
    """The benchmark data: MultiMNIST for LeNet (random labels for K > 2), random 64x64 for ResNet."""
    g = torch.Generator().manual_seed(0)
    if kind == "lenet":
        bs = 256
        try:
            ds = multimnist_train(bs * batches)
            x, y = ds.tensors
        except (FileNotFoundError, KeyError, OSError):  # no data file: same shapes, random
            x, y = torch.randn(bs * batches, 1, 28, 28, generator=g), torch.randint(0, 10, (bs * batches, 2), generator=g)
        if k != 2:
            y = torch.randint(0, 10, (len(x), k), generator=g)
        return TensorDataset(x, y), bs
    if kind == "tox21mlp":  # fingerprint-shaped bits, random labels: only the shapes matter for timing
        bs = 128
        x = torch.randint(0, 2, (bs * batches, 2048), generator=g).float()
        return TensorDataset(x, torch.randint(0, 2, (bs * batches, k), generator=g)), bs
    bs = 8
    x = torch.randn(bs * batches, 3, 64, 64, generator=g)
    return TensorDataset(x, torch.randint(0, 10, (bs * batches, k), generator=g)), bs


def build(kind: str, k: int, method: Any = "ls", **multitask: Any) -> BenchMTL:
    torch.manual_seed(0)
    parts = {"lenet": lenet_parts, "tox21mlp": tox21_mlp_parts, "resnet18": resnet_parts}[kind]
    trunk, heads = parts(k)
    return BenchMTL(trunk, heads, method, **multitask)
