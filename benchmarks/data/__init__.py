"""Lightning DataModules of the benchmarks, one module per kind of data (all read from local files).

* :mod:`benchmarks.data.base` -- where the data lives, splits, loaders, file digests.
* :mod:`benchmarks.data.composites` -- MultiMNIST-type composites (MultiMNIST, MultiFashion,
  Multi-(Fashion+MNIST)).
* :mod:`benchmarks.data.multilabel` -- multi-label tables (Mulan: Yeast, Birds, ...).
* :mod:`benchmarks.data.molecules` -- molecules (MoleculeNet: Tox21, QM8, ToxCast, ...).
"""

from benchmarks.data.base import (
    CACHE_ENV_VAR,
    DATA_ENV_VAR,
    LAYOUT,
    MultiTaskDataModule,
    default_cache_dir,
    default_data_root,
    file_sha256,
    resolve_data_path,
    safe_task_names,
    split_indices,
)
from benchmarks.data.composites import MultiMNISTDataModule, make_multimnist_composites
from benchmarks.data.molecules import (
    MoleculeDataModule,
    morgan_fingerprints,
    most_labelled_columns,
    read_molecule_csv,
)
from benchmarks.data.multilabel import MultiLabelDataModule

__all__ = [
    "CACHE_ENV_VAR",
    "DATA_ENV_VAR",
    "LAYOUT",
    "MultiTaskDataModule",
    "default_cache_dir",
    "default_data_root",
    "file_sha256",
    "resolve_data_path",
    "safe_task_names",
    "split_indices",
    "MultiMNISTDataModule",
    "make_multimnist_composites",
    "MoleculeDataModule",
    "morgan_fingerprints",
    "most_labelled_columns",
    "read_molecule_csv",
    "MultiLabelDataModule",
]
