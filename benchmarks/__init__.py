"""Benchmark data, tasks and models for lightning-cost (real data sets read from local files).

* :mod:`benchmarks.tasks` -- :class:`TaskSpec`, masked per-task losses and metrics.
* :mod:`benchmarks.data` -- Lightning DataModules: MultiMNIST, multi-label (Mulan), molecules (MoleculeNet).
* :mod:`benchmarks.models` -- :class:`MultiTaskNet` (shared trunk + per-task heads) and factories.
* :mod:`benchmarks.paper_data`, :mod:`benchmarks.paper_models`, :mod:`benchmarks.paper_tasks`,
  :mod:`benchmarks.paper_lit` -- the paper's data sets (CityScapes, NYUv2, CelebA, QM9; COST Sec. 5)
  from local copies, their models (SegNet-MTAN, 9-layer CNN, MPNN), losses, metrics and modules.

:func:`make_datamodule` and :func:`make_model` build a benchmark by name::

    dm = make_datamodule("multimnist", num_train=2000)
    model = make_model(dm)
"""

from __future__ import annotations

from typing import Any

from benchmarks.data import MoleculeDataModule, MultiLabelDataModule, MultiMNISTDataModule
from benchmarks.models import MultiTaskNet, fingerprint_mlp, lenet_multimnist, mlp_multilabel
from benchmarks.paper_data import (
    PAPER_DATAMODULES,
    CelebADataModule,
    CityScapesDataModule,
    DenseNpyDataModule,
    NYUv2DataModule,
    QM9DataModule,
)
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
    "CityScapesDataModule",
    "NYUv2DataModule",
    "CelebADataModule",
    "QM9DataModule",
    "BENCHMARKS",
    "make_datamodule",
    "make_model",
    "module_classes",
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
    # the paper's data sets (benchmarks.paper_data): a folder given as data_kw root, no default path
    "cityscapes": (CityScapesDataModule, None),
    "nyuv2": (NYUv2DataModule, None),
    "celeba": (CelebADataModule, None),
    "qm9": (QM9DataModule, None),
}


def make_datamodule(name: str, **kwargs: Any):
    """Build the DataModule of a named benchmark (``BENCHMARKS``); ``kwargs`` go to its constructor."""
    key = name.lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise KeyError(f"unknown benchmark {name!r}; available: {sorted(BENCHMARKS)}")
    cls, path = BENCHMARKS[key]
    if path is not None:
        kwargs.setdefault("path", path)
    return cls(**kwargs)


def make_model(datamodule, **kwargs: Any) -> MultiTaskNet:
    """The default model for a DataModule: LeNet for MultiMNIST, an MLP for the tabular sets; the
    paper's models for its data sets (SegNet-MTAN, the 9-layer CelebA CNN, the QM9 MPNN)."""
    from benchmarks import paper_models

    if isinstance(datamodule, DenseNpyDataModule):
        return paper_models.segnet_mtan(datamodule.task_specs, in_channels=datamodule.in_shape[0], **kwargs)
    if isinstance(datamodule, CelebADataModule):
        return paper_models.celeba_cnn(datamodule.task_specs, in_channels=datamodule.in_shape[0], **kwargs)
    if isinstance(datamodule, QM9DataModule):
        return paper_models.qm9_mpnn(datamodule.task_specs, num_features=datamodule.num_node_features,
                                     edge_dim=datamodule.edge_dim, **kwargs)
    if isinstance(datamodule, MultiMNISTDataModule):
        return lenet_multimnist(datamodule.task_specs, datamodule.in_shape, **kwargs)
    if isinstance(datamodule, MultiLabelDataModule):
        return mlp_multilabel(datamodule.in_features, datamodule.task_specs, **kwargs)
    if isinstance(datamodule, MoleculeDataModule):
        return fingerprint_mlp(datamodule.in_features, datamodule.task_specs, **kwargs)
    raise TypeError(f"no default model for {type(datamodule).__name__}")


def module_classes(datamodule) -> tuple[type, type]:
    """``(multi-task, single-task)`` LightningModule classes for a DataModule (the runner's choice):
    :mod:`benchmarks.paper_lit`'s for the paper's data sets, :mod:`benchmarks.lit`'s otherwise."""
    if isinstance(datamodule, PAPER_DATAMODULES):
        from benchmarks.paper_lit import PaperMTLModule, PaperSingleTaskModule

        return PaperMTLModule, PaperSingleTaskModule
    from benchmarks.lit import MTLBenchModule, SingleTaskModule

    return MTLBenchModule, SingleTaskModule
