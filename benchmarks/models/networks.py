"""Multi-task models for the benchmarks: a shared trunk and one head per task.

All models are plain ``nn.Module``\\ s (no Lightning) of the form
:class:`MultiTaskNet` ``(trunk, heads)``: ``trunk`` maps the input to a shared
representation, ``heads[name]`` maps it to the output of task ``name``.
``forward(x)`` returns ``{name: output}`` with ``[B, num_classes]`` logits for
multiclass tasks and ``[B]`` outputs for binary (logits) and regression tasks.

The split matters to the methods this project implements: the gradient
aggregators act on the *shared* parameters (:meth:`MultiTaskNet.shared_parameters`)
and the teleportation acts on layers of the trunk. The MLP trunks contain
``BatchNorm1d`` by default (``batchnorm=True``) so that the teleport code is
exercised with BN running statistics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from benchmarks.data.tasks import TaskSpec

__all__ = [
    "MultiTaskNet",
    "mlp",
    "make_heads",
    "lenet_multimnist",
    "mlp_multilabel",
    "fingerprint_mlp",
]


class MultiTaskNet(nn.Module):
    """Shared trunk + per-task heads.

    Args:
        trunk: shared module, ``x -> z``.
        heads: ``ModuleDict`` ``{task name: head}``, each ``z -> output``. A head
            output of shape ``[B, 1]`` is returned as ``[B]``.
    """

    def __init__(self, trunk: nn.Module, heads: nn.ModuleDict) -> None:
        super().__init__()
        if not isinstance(heads, nn.ModuleDict) or len(heads) == 0:
            raise ValueError("heads must be a non-empty nn.ModuleDict")
        self.trunk = trunk
        self.heads = heads

    @property
    def task_names(self) -> list[str]:
        return list(self.heads.keys())

    def features(self, x: Tensor) -> Tensor:
        """The shared representation ``trunk(x)``."""
        return self.trunk(x)

    def heads_forward(self, z: Tensor) -> dict[str, Tensor]:
        """Apply every head to a shared representation ``z``."""
        out = {}
        for name, head in self.heads.items():
            y = head(z)
            if y.dim() == 2 and y.shape[1] == 1:
                y = y[:, 0]
            out[name] = y
        return out

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.heads_forward(self.trunk(x))

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.trunk.parameters()

    def task_specific_parameters(self) -> Iterator[nn.Parameter]:
        return self.heads.parameters()


def mlp(
    in_features: int,
    hidden: Sequence[int],
    *,
    batchnorm: bool = True,
    dropout: float = 0.0,
    activation: type[nn.Module] = nn.ReLU,
) -> nn.Sequential:
    """``[Linear -> (BatchNorm1d) -> act -> (Dropout)] * len(hidden)``; output width ``hidden[-1]``."""
    layers: list[nn.Module] = []
    width = in_features
    for h in hidden:
        layers.append(nn.Linear(width, h))
        if batchnorm:
            layers.append(nn.BatchNorm1d(h))
        layers.append(activation())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        width = h
    return nn.Sequential(*layers)


def make_heads(
    task_specs: Sequence[TaskSpec], in_features: int, hidden: Sequence[int] = (), dropout: float = 0.0
) -> nn.ModuleDict:
    """One head per task: an optional MLP (``hidden``, no BN) then ``Linear(-> spec.out_features)``."""
    heads = nn.ModuleDict()
    for spec in task_specs:
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, spec.out_features))
        heads[spec.name] = nn.Sequential(*layers)
    return heads


def _conv_out(size: int, kernel: int = 5, pool: int = 2) -> int:
    return (size - kernel + 1) // pool


def lenet_multimnist(
    task_specs: Sequence[TaskSpec],
    in_shape: Sequence[int] = (1, 36, 36),
    *,
    batchnorm: bool = False,
) -> MultiTaskNet:
    """The standard MultiMNIST LeNet (Sener & Koltun 2018, used by most MTL papers since).

    Trunk: ``Conv(1->10, 5) -> MaxPool(2) -> ReLU -> Conv(10->20, 5) -> MaxPool(2) -> ReLU
    -> Flatten -> Linear(->50) -> ReLU``. Heads: ``Linear(50->50) -> ReLU -> Linear(50->10)``.

    ``in_shape`` is ``datamodule.in_shape``: 28x28 inputs give the classic 320->50
    linear layer, the 36x36 default canvas gives 720->50. ``batchnorm=True`` adds
    ``BatchNorm2d`` after each conv (off in the standard model).
    """
    c, h, w = (int(v) for v in in_shape)
    h2, w2 = _conv_out(_conv_out(h)), _conv_out(_conv_out(w))
    if h2 < 1 or w2 < 1:
        raise ValueError(f"input {tuple(in_shape)} is too small for the LeNet trunk")

    def block(cin: int, cout: int) -> list[nn.Module]:
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel_size=5)]
        if batchnorm:
            layers.append(nn.BatchNorm2d(cout))
        return layers + [nn.MaxPool2d(2), nn.ReLU()]

    trunk = nn.Sequential(
        *block(c, 10),
        *block(10, 20),
        nn.Flatten(),
        nn.Linear(20 * h2 * w2, 50),
        nn.ReLU(),
    )
    return MultiTaskNet(trunk, make_heads(task_specs, 50, hidden=(50,)))


def mlp_multilabel(
    in_features: int,
    task_specs: Sequence[TaskSpec],
    hidden: Sequence[int] = (256, 128),
    *,
    batchnorm: bool = True,
    dropout: float = 0.0,
) -> MultiTaskNet:
    """MLP trunk (``Linear -> BN -> ReLU`` per hidden layer) and one linear logit head per label."""
    trunk = mlp(in_features, hidden, batchnorm=batchnorm, dropout=dropout)
    return MultiTaskNet(trunk, make_heads(task_specs, hidden[-1]))


def fingerprint_mlp(
    in_features: int,
    task_specs: Sequence[TaskSpec],
    hidden: Sequence[int] = (512, 256),
    dropout: float = 0.1,
    *,
    batchnorm: bool = True,
) -> MultiTaskNet:
    """MLP on Morgan fingerprints (the MoleculeNet fingerprint baseline), one linear head per target.

    Trunk: ``[Linear -> BN -> ReLU -> Dropout]`` per hidden layer.
    """
    trunk = mlp(in_features, hidden, batchnorm=batchnorm, dropout=dropout)
    return MultiTaskNet(trunk, make_heads(task_specs, hidden[-1]))


@torch.no_grad()
def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
