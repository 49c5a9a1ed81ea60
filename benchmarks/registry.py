"""Benchmarks by name: the registered data sets, the file formats a user's own data can take, and
the default model and LightningModules of each.

``make_datamodule("multimnist", num_train=2000)`` builds a registered data set;
``make_datamodule("multilabel", path="/x/my.npz")`` reads any file of a known format.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.data import MoleculeDataModule, MultiLabelDataModule, MultiMNISTDataModule
from benchmarks.models import MultiTaskNet, fingerprint_mlp, lenet_multimnist, mlp_multilabel
from benchmarks.paper.data import (
    PAPER_DATAMODULES,
    CelebADataModule,
    CityScapesDataModule,
    DenseNpyDataModule,
    NYUv2DataModule,
    QM9DataModule,
)

__all__ = ["BENCHMARKS", "FORMATS", "UnknownDatasetError", "dataset_title", "make_datamodule", "make_model",
           "module_classes"]

#: benchmark name -> (DataModule class, default constructor arguments)
BENCHMARKS: dict[str, tuple[type, dict[str, Any]]] = {
    "multimnist": (MultiMNISTDataModule, {"path": "mnist.npz"}),
    "multifashion": (MultiMNISTDataModule, {"path": "fashion_mnist.npz"}),
    # Multi-(Fashion+MNIST): an MNIST digit on the left, a Fashion-MNIST article on the right
    "multifashion_mnist": (MultiMNISTDataModule, {"path_left": "mnist.npz", "path_right": "fashion_mnist.npz",
                                                  "task_names": ("digit", "fashion")}),
    **{name: (MultiLabelDataModule, {"path": f"multilabel/{name}.npz"})
       for name in ("yeast", "emotions", "water_quality", "birds", "tmc2007_500")},
    **{name: (MoleculeDataModule, {"path": f"molecules/{name}.csv.gz"})
       for name in ("qm8", "tox21", "sider", "clintox", "toxcast")},
    # ToxCast restricted to its 40 most-labelled assays (of 617)
    "toxcast40": (MoleculeDataModule, {"path": "molecules/toxcast.csv.gz", "top_k_targets": 40}),
    # the paper's data sets (benchmarks.paper.data): a folder given as data_kw root
    "cityscapes": (CityScapesDataModule, {}),
    "nyuv2": (NYUv2DataModule, {}),
    "celeba": (CelebADataModule, {}),
    "qm9": (QM9DataModule, {}),
}

#: format name -> DataModule class: a user's own file, given as ``path`` (``path_left``/``path_right``)
FORMATS: dict[str, type] = {
    "multilabel": MultiLabelDataModule,
    "molecules": MoleculeDataModule,
    "mnist_composite": MultiMNISTDataModule,
}

_LOCATION_KEYS = ("path", "path_left", "path_right", "root")


class UnknownDatasetError(KeyError):
    """A data set name that is neither registered nor a format; its message is one line."""

    def __str__(self) -> str:
        return str(self.args[0])


def _key(name: str) -> str:
    key = name.strip().lower().replace("-", "_")
    if key not in BENCHMARKS and key not in FORMATS:
        raise UnknownDatasetError(
            f"unknown data set {name!r}: formats (with data_kw path): {', '.join(sorted(FORMATS))}; "
            f"names: {', '.join(sorted(BENCHMARKS))}")
    return key


def make_datamodule(name: str, **kwargs: Any):
    """The DataModule of a registered benchmark (``BENCHMARKS``) or of a format (``FORMATS``, which
    needs the file: ``path``, or ``path_left``/``path_right`` for ``mnist_composite``). ``kwargs``
    go to its constructor; any location given replaces the registered one."""
    key = _key(name)
    if key in FORMATS:
        if not any(kwargs.get(k) is not None for k in _LOCATION_KEYS):
            raise ValueError(f"data set format {key!r} reads your file: give data_kw path (e.g. "
                             f"--data-kw '{{\"path\": \"/data/my_file\"}}')")
        return FORMATS[key](**kwargs)
    cls, defaults = BENCHMARKS[key]
    if any(kwargs.get(k) is not None for k in _LOCATION_KEYS):
        defaults = {k: v for k, v in defaults.items() if k not in _LOCATION_KEYS}
    return cls(**{**defaults, **kwargs})


def _stem(path: Any) -> str:
    return Path(str(path)).name.split(".")[0]


def dataset_title(name: str, data_kw: dict[str, Any]) -> str:
    """How results name a data set: the registered name, or for a format the file's stem
    (``left+right`` stems for two files)."""
    key = _key(name)
    if key not in FORMATS:
        return key
    paths = [data_kw[k] for k in ("path", "path_left", "path_right") if data_kw.get(k) is not None]
    return "+".join(dict.fromkeys(_stem(p) for p in paths))


def make_model(datamodule, **kwargs: Any) -> MultiTaskNet:
    """The default model for a DataModule: LeNet for MultiMNIST-type composites, an MLP for the
    tabular sets; the paper's models for its data sets (SegNet-MTAN, the 9-layer CelebA CNN, the
    QM9 MPNN)."""
    from benchmarks.paper import models as paper_models

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
    :mod:`benchmarks.paper.modules`'s for the paper's data sets, :mod:`benchmarks.models.modules`'s
    otherwise."""
    if isinstance(datamodule, PAPER_DATAMODULES):
        from benchmarks.paper.modules import PaperMTLModule, PaperSingleTaskModule

        return PaperMTLModule, PaperSingleTaskModule
    from benchmarks.models.modules import MTLBenchModule, SingleTaskModule

    return MTLBenchModule, SingleTaskModule
