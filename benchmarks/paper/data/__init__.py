"""DataModules for the paper's benchmarks (COST paper Sec. 5.1), read from local copies only, one
module per job:

* :mod:`.base` -- the data root lookup and the base class the DataModules share;
* :mod:`.npy` -- MTAN's ``.npy`` files read lazily, and the dense training augmentation;
* :mod:`.dense` -- CityScapes and NYUv2 (dense scene understanding) as DataModules;
* :mod:`.celeba` -- CelebA (40 face attributes) as a DataModule;
* :mod:`.qm9` -- QM9 (11 molecular properties, graphs) as a DataModule;
* :mod:`.lazy` -- the torchvision / PyG data set subclasses, built on first use.

Nothing is ever downloaded: each DataModule checks its layout first and raises
``FileNotFoundError`` naming the expected paths, file names and shapes. Point a DataModule at
its data with ``root=...`` (``data_kw: {root: ...}`` in a runner config) or move the whole data
root with ``$LIGHTNING_COST_DATA`` (default ``<project>/../shared/data``, see
:mod:`benchmarks.data.base`); without ``root`` each one reads ``<data root>/<name>``. A relative
``root`` that does not exist from the working directory is also looked up under the data root.

Each data set's module docstring gives its layout, splits and batches.
"""

from benchmarks.paper.data.base import resolve_root
from benchmarks.paper.data.celeba import CELEBA_FILES, CelebADataModule
from benchmarks.paper.data.dense import CityScapesDataModule, DenseNpyDataModule, NYUv2DataModule
from benchmarks.paper.data.lazy import _LAZY_CLASSES, _lazy_class
from benchmarks.paper.data.npy import random_scale_crop_flip
from benchmarks.paper.data.qm9 import (
    QM9_EV,
    QM9_NAMES,
    QM9_TARGETS,
    GraphCollate,
    QM9DataModule,
    QM9Transform,
)

__all__ = [
    "DenseNpyDataModule",
    "CityScapesDataModule",
    "NYUv2DataModule",
    "CelebADataModule",
    "QM9DataModule",
    "PAPER_DATAMODULES",
    "QM9_TARGETS",
    # the helpers of the data sets
    "resolve_root",
    "random_scale_crop_flip",
    "CELEBA_FILES",
    "QM9_NAMES",
    "QM9_EV",
    "QM9Transform",
    "GraphCollate",
]

PAPER_DATAMODULES = (DenseNpyDataModule, CelebADataModule, QM9DataModule)


def __getattr__(name: str) -> type:  # PEP 562: the lazily built classes (:mod:`.lazy`) as attributes here too
    if name in _LAZY_CLASSES:
        return _lazy_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
