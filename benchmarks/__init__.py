"""Benchmark data, tasks and models for lightning-cost (real data sets read from local files).

* :mod:`benchmarks.tasks` -- :class:`TaskSpec`, masked per-task losses and metrics.
* :mod:`benchmarks.data` -- Lightning DataModules: MultiMNIST, multi-label (Mulan), molecules (MoleculeNet).
* :mod:`benchmarks.models` -- :class:`MultiTaskNet` (shared trunk + per-task heads) and factories.

:func:`make_datamodule` and :func:`make_model` build a benchmark by name::

    dm = make_datamodule("multimnist", num_train=2000)
    model = make_model(dm)
"""

from __future__ import annotations

from typing import Any

from benchmarks.data import MoleculeDataModule, MultiLabelDataModule, MultiMNISTDataModule
from benchmarks.models import MultiTaskNet, fingerprint_mlp, lenet_multimnist, mlp_multilabel
from benchmarks.tasks import TaskSpec, make_task_metric, task_loss, update_task_metric

__all__ = [
    "TaskSpec",
    "task_loss",
    "make_task_metric",
    "update_task_metric",
    "MultiMNISTDataModule",
    "MultiLabelDataModule",
    "MoleculeDataModule",
    "MultiTaskNet",
    "lenet_multimnist",
    "mlp_multilabel",
    "fingerprint_mlp",
    "BENCHMARKS",
    "make_datamodule",
    "make_model",
]

#: benchmark name -> (DataModule class, default path argument)
BENCHMARKS: dict[str, tuple[type, str | None]] = {
    "multimnist": (MultiMNISTDataModule, "mnist.npz"),
    "multifashion": (MultiMNISTDataModule, "fashion_mnist.npz"),
    **{
        name: (MultiLabelDataModule, f"multilabel/{name}.npz")
        for name in ("yeast", "emotions", "water_quality", "birds", "tmc2007_500")
    },
    **{
        name: (MoleculeDataModule, f"molecules/{name}.csv.gz")
        for name in ("qm8", "tox21", "sider", "clintox", "toxcast")
    },
}


def make_datamodule(name: str, **kwargs: Any):
    """Build the DataModule of a named benchmark (``BENCHMARKS``); ``kwargs`` go to its constructor."""
    key = name.lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)}")
    cls, path = BENCHMARKS[key]
    kwargs.setdefault("path", path)
    return cls(**kwargs)


def make_model(datamodule, **kwargs: Any) -> MultiTaskNet:
    """The default model for a DataModule: LeNet for MultiMNIST, an MLP otherwise."""
    if isinstance(datamodule, MultiMNISTDataModule):
        return lenet_multimnist(datamodule.task_specs, datamodule.in_shape, **kwargs)
    if isinstance(datamodule, MultiLabelDataModule):
        return mlp_multilabel(datamodule.in_features, datamodule.task_specs, **kwargs)
    if isinstance(datamodule, MoleculeDataModule):
        return fingerprint_mlp(datamodule.in_features, datamodule.task_specs, **kwargs)
    raise TypeError(f"no default model for {type(datamodule).__name__}")
