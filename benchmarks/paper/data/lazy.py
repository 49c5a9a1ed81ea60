"""The torchvision / PyG data set subclasses of the paper's DataModules (CelebA without the MD5
check, QM9 that never downloads), built on first use."""

from __future__ import annotations

import os


def _make_celeba_no_md5() -> type:
    from torchvision import datasets

    class CelebANoMD5(datasets.CelebA):
        """torchvision's CelebA without the MD5 check (the files' presence is checked before)."""

        def _check_integrity(self) -> bool:
            return os.path.isdir(os.path.join(self.root, self.base_folder, "img_align_celeba"))

    return CelebANoMD5


def _make_offline_qm9() -> type:
    from torch_geometric.data.dataset import files_exist
    from torch_geometric.datasets import QM9

    class OfflineQM9(QM9):
        """PyG's QM9 that never downloads: with processed data it needs no raw files."""

        def download(self) -> None:
            if files_exist(self.processed_paths):
                return
            from benchmarks.paper.data.qm9 import QM9DataModule  # here: that module imports this one

            raise FileNotFoundError(f"QM9 raw files missing under {self.raw_dir}\n{QM9DataModule.layout(self.root)}")

    return OfflineQM9


_LAZY_CLASSES = {"CelebANoMD5": _make_celeba_no_md5, "OfflineQM9": _make_offline_qm9}


def _lazy_class(name: str) -> type:
    """Subclasses of torchvision / PyG data sets, built on first use (so that importing this module
    imports neither) and published as module attributes, so that datasets pickle by reference
    (DataLoader workers started with ``spawn``)."""
    cls = globals().get(name)
    if cls is None:
        cls = _LAZY_CLASSES[name]()
        cls.__module__, cls.__qualname__ = __name__, name
        globals()[name] = cls
    return cls


def __getattr__(name: str) -> type:  # PEP 562: unpickling in a fresh process builds the class
    if name in _LAZY_CLASSES:
        return _lazy_class(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

