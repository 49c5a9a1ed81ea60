"""CelebA as a DataModule, through torchvision.

CelebA (:class:`CelebADataModule`)
    ``torchvision.datasets.CelebA(root, split, target_type="attr", download=False)``::

        <root>/celeba/img_align_celeba/<000001.jpg ...>
        <root>/celeba/list_attr_celeba.txt   list_eval_partition.txt   identity_CelebA.txt
        <root>/celeba/list_bbox_celeba.txt   list_landmarks_align_celeba.txt

    (``root`` may also be the ``celeba`` folder itself.) torchvision checks the MD5 of the five text
    files; ``check_md5=False`` skips that check (only their presence is checked). Official
    train/valid/test partition; images resized to 64x64 and scaled to [0, 1] (FairGrad/FAMO's
    pipeline). Batches ``(image [B, 3, 64, 64], attributes [B, 40] float in {0, 1})``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Subset

from benchmarks.data.base import safe_task_names
from benchmarks.paper.data.base import _HOW, _PaperDataModule, resolve_root
from benchmarks.paper.data.lazy import _lazy_class
from benchmarks.paper.tasks import attribute_task

__all__ = ["CelebADataModule", "CELEBA_FILES"]

CELEBA_FILES = (
    "list_attr_celeba.txt",
    "list_eval_partition.txt",
    "identity_CelebA.txt",
    "list_bbox_celeba.txt",
    "list_landmarks_align_celeba.txt",
)


def _attr_to_float(t: torch.Tensor) -> torch.Tensor:
    return t.float()


class CelebADataModule(_PaperDataModule):
    """CelebA: 40 binary face attributes as 40 tasks, through ``torchvision.datasets.CelebA``.

    Paper settings (Sec. 5.1, after FairGrad): the 9-layer CNN with linear heads
    (:func:`benchmarks.paper.models.celeba_cnn`), Adam lr 3e-4, 15 epochs, batch size 256; images
    resized to 64x64 (FairGrad/FAMO's ``Resize((64, 64))``, no normalisation). Metric: F1 per
    attribute. Official train (162,770) / valid (19,867) / test (19,962) partition.

    Args:
        root: the folder holding ``celeba/`` (torchvision's ``root``), or the ``celeba`` folder itself.
        image_size: ``(H, W)`` after resizing (paper: 64x64).
        check_md5: let torchvision verify the MD5 of the annotation files (``False``: presence only,
            e.g. for re-encoded files).
        num_train, num_val, num_test: keep only the first N images of a split (quick runs).
    """

    NAME = "CelebA"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        batch_size: int = 256,
        seed: int = 0,
        *,
        image_size: int | Sequence[int] = (64, 64),
        check_md5: bool = True,
        num_train: int | None = None,
        num_val: int | None = None,
        num_test: int | None = None,
        **loader: Any,
    ) -> None:
        super().__init__(root, batch_size, seed, **loader)  # eval_batch_size, num_workers, ... (base classes)
        size = (int(image_size), int(image_size)) if isinstance(image_size, int) else tuple(int(s) for s in image_size)
        if len(size) != 2 or min(size) < 1:
            raise ValueError(f"image_size must be an int or (H, W), got {image_size!r}")
        self.image_size = size
        self.check_md5 = bool(check_md5)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test

    @staticmethod
    def layout(root: Path | str = "<root>") -> str:
        files = "\n".join(f"  {root}/celeba/{f}" for f in CELEBA_FILES)
        return (
            f"Expected torchvision's CelebA layout under {root}:\n"
            f"  {root}/celeba/img_align_celeba/   the aligned JPEGs (000001.jpg ... 202599.jpg)\n"
            f"{files}\n"
            "(the files of the official release; torchvision checks their MD5 unless check_md5=False).\n" + _HOW
        )

    def _resolve(self) -> Path:
        root = resolve_root(self.root_arg, ".")
        if root.name == "celeba" and (root / "img_align_celeba").is_dir() and not (root / "celeba").is_dir():
            root = root.parent  # the celeba folder itself was given
        missing = [f for f in ("img_align_celeba",) + CELEBA_FILES if not (root / "celeba" / f).exists()]
        if missing:
            raise FileNotFoundError(
                f"CelebA data not found under {root}: missing {', '.join('celeba/' + m for m in missing)}\n"
                f"{self.layout(root)}"
            )
        return root

    def _dataset(self, root: Path, split: str):
        from torchvision import datasets, transforms

        cls = datasets.CelebA if self.check_md5 else _lazy_class("CelebANoMD5")
        tf = transforms.Compose([transforms.Resize(self.image_size), transforms.ToTensor()])
        try:
            return cls(str(root), split=split, target_type="attr", transform=tf,
                       target_transform=_attr_to_float, download=False)
        except RuntimeError as e:
            if "not found or corrupted" in str(e):
                raise RuntimeError(
                    f"torchvision rejected the CelebA files under {root / 'celeba'}: an annotation file's MD5 "
                    "differs from the official release. Use the official files, or pass check_md5=False "
                    f"(data_kw: {{check_md5: false}}) to skip the check.\n{self.layout(root)}"
                ) from e
            raise

    def _build(self) -> None:
        root = self._resolve()
        self.root = root
        sets = {s: self._dataset(root, s) for s in ("train", "valid", "test")}
        names = [n for n in sets["train"].attr_names if n]
        if len(names) != sets["train"].attr.shape[1]:
            raise ValueError(f"{root}/celeba/list_attr_celeba.txt: {len(names)} attribute names for "
                             f"{sets['train'].attr.shape[1]} columns")
        for s, ds in sets.items():
            if len(ds) == 0:
                raise ValueError(f"CelebA split {s!r} is empty (list_eval_partition.txt)")
        self.attr_names = names
        self._task_specs = tuple(attribute_task(n) for n in safe_task_names(names))
        self._in_shape = (3, *self.image_size)

        def cut(ds, n):
            return ds if n is None or n >= len(ds) else Subset(ds, range(max(0, int(n))))

        self.train_set = cut(sets["train"], self.num_train)
        self.val_set = cut(sets["valid"], self.num_val)
        self.test_set = cut(sets["test"], self.num_test)
