"""CityScapes and NYUv2 as DataModules: the layout check, the splits and the tasks.

CityScapes / NYUv2 (:class:`CityScapesDataModule`, :class:`NYUv2DataModule`)
    The pre-processed ``.npy`` release of MTAN (Liu et al. 2019), used by MTAN, CAGrad, Nash-MTL,
    FAMO, FairGrad and LibMTL::

        <root>/train/image/<i>.npy     float32 [H, W, 3] in [0, 1]
        <root>/train/<label>/<i>.npy   [H, W] class index, -1 = ignore (float or int)
        <root>/train/depth/<i>.npy     float32 [H, W, 1] (or [H, W]), 0 = missing
        <root>/train/normal/<i>.npy    float32 [H, W, 3] unit normals, all-zero = missing (NYUv2 only)
        <root>/val/...                 the same for the evaluation images

    with ``<i>`` = 0, 1, ..., N-1. CityScapes: 2975 train / 500 val images of 128x256, 7 classes,
    label folder ``label_7`` (MTAN's release; ``label`` as in LibMTL is accepted too). NYUv2: 795
    train / 654 val images of 288x384, 13 classes, label folder ``label``. Other sizes are accepted
    if all modalities agree (the SegNet needs H, W divisible by 32).

    Splits: the ``val`` folder is the *test* split. The reference code trains on the whole ``train``
    folder and reports on ``val``; here ``val_fraction`` (default 0.1) of the ``train`` images
    (seeded) are held out for epoch selection, so that the test images are never used to select.
    ``val_fraction=0`` trains on all of ``train`` and validates on the test images, as the reference
    code does (a warning says so). ``augment=True`` (FairGrad's default for these benchmarks) applies
    the usual random scale-crop (scales 1, 1.2, 1.5; depth divided by the scale) and horizontal flip
    (normal x-component negated) to training images.

    Batches: ``(image [B, 3, H, W], {task: target})`` with targets ``segmentation`` ``[B, H, W]``
    long, ``depth`` ``[B, 1, H, W]``, ``normal`` ``[B, 3, H, W]``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data.tasks import TaskSpec
from benchmarks.paper.data.base import _HOW, _limit, _PaperDataModule, resolve_root
from benchmarks.paper.data.npy import _DenseNpyDataset, _npy_indices
from benchmarks.paper.tasks import depth_task, normal_task, segmentation_task

__all__ = ["DenseNpyDataModule", "CityScapesDataModule", "NYUv2DataModule"]

log = logging.getLogger(__name__)


class DenseNpyDataModule(_PaperDataModule):
    """Dense scene understanding from MTAN's pre-processed ``.npy`` files (module docstring).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        num_classes: segmentation classes (labels ``0..num_classes-1``, ``-1`` ignored).
        tasks: which of ``segmentation``, ``depth``, ``normal`` to use (default: all of the data set's).
        label_dir: the label sub-folder (default: the first of the data set's names that exists).
        val_fraction: share of the ``train`` images held out for validation (0: validate on the test images).
        augment: random scale-crop and flip on training images.
        num_train, num_test: keep only the first N training / test images (quick runs).
        batch_size: paper: 8 (CityScapes), 2 (NYUv2).
    """

    NAME = "dense"
    DEFAULT_FOLDER = "dense"
    ALL_TASKS: tuple[str, ...] = ("segmentation", "depth")
    LABEL_DIRS: tuple[str, ...] = ("label",)
    NUM_CLASSES = 7
    IMAGE_SHAPE = (128, 256)
    SIZES = ""

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        batch_size: int = 8,
        seed: int = 0,
        *,
        num_classes: int | None = None,
        tasks: Sequence[str] | None = None,
        label_dir: str | None = None,
        val_fraction: float = 0.1,
        augment: bool = True,
        num_train: int | None = None,
        num_test: int | None = None,
        **loader: Any,
    ) -> None:
        super().__init__(root, batch_size, seed, **loader)  # eval_batch_size, num_workers, ... (base classes)
        self.num_classes = int(num_classes or self.NUM_CLASSES)
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {self.num_classes}")
        tasks = tuple(tasks) if tasks is not None else self.ALL_TASKS
        bad = set(tasks) - set(self.ALL_TASKS)
        if bad or len(tasks) < 1 or len(set(tasks)) != len(tasks):
            raise ValueError(f"tasks must be distinct names among {self.ALL_TASKS}, got {tasks}")
        self.tasks = tasks
        self.label_dir = label_dir
        if not 0.0 <= float(val_fraction) < 1.0:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.val_fraction = float(val_fraction)
        self.augment = bool(augment)
        self.num_train, self.num_test = num_train, num_test
        specs = {"segmentation": segmentation_task(self.num_classes), "depth": depth_task(), "normal": normal_task()}
        self._task_specs = tuple(specs[t] for t in self.tasks)  # known without reading the files

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        return self._task_specs

    @classmethod
    def layout(cls, root: Path | str = "<root>") -> str:
        """The expected layout, for error messages."""
        h, w = cls.IMAGE_SHAPE
        label = " or ".join(cls.LABEL_DIRS)
        lines = [
            f"Expected the pre-processed {cls.NAME} release of MTAN ({cls.SIZES}) under {root}:",
            f"  {root}/train/image/<i>.npy   float [{h}, {w}, 3] in [0, 1], i = 0..N-1",
            f"  {root}/train/{cls.LABEL_DIRS[0]}/<i>.npy   [{h}, {w}] class index in 0..{cls.NUM_CLASSES - 1}, "
            f"-1 = ignore (folder {label})",
            f"  {root}/train/depth/<i>.npy   float [{h}, {w}, 1], 0 = missing depth",
        ]
        if "normal" in cls.ALL_TASKS:
            lines.append(f"  {root}/train/normal/<i>.npy  float [{h}, {w}, 3] unit normals, all-zero = missing")
        lines.append(f"  {root}/val/...               the same sub-folders for the evaluation (test) images")
        lines.append(_HOW)
        return "\n".join(lines)

    def _dirs(self, split_dir: Path) -> dict[str, str]:
        dirs: dict[str, str] = {}
        for t in self.tasks:
            if t == "segmentation":
                names = (self.label_dir,) if self.label_dir else self.LABEL_DIRS
                found = next((n for n in names if (split_dir / n).is_dir()), None)
                if found is None:
                    raise FileNotFoundError(
                        f"no label folder {' or '.join(names)} in {split_dir}\n{self.layout(self.root)}"
                    )
                dirs[t] = found
            else:
                dirs[t] = t
        return dirs

    def _scan(self, split: str) -> tuple[Path, dict[str, str], list[int]]:
        split_dir = self.root / split
        if not (split_dir / "image").is_dir():
            raise FileNotFoundError(f"{self.NAME} data not found: no folder {split_dir / 'image'}\n{self.layout(self.root)}")
        dirs = self._dirs(split_dir)
        idx = _npy_indices(split_dir / "image")
        if not idx:
            raise FileNotFoundError(f"no <i>.npy files in {split_dir / 'image'}\n{self.layout(self.root)}")
        for sub in dirs.values():
            if not (split_dir / sub).is_dir():
                raise FileNotFoundError(f"missing folder {split_dir / sub}\n{self.layout(self.root)}")
            have = set(_npy_indices(split_dir / sub))
            missing = [i for i in idx if i not in have]
            if missing:
                raise FileNotFoundError(
                    f"{split_dir / sub} lacks {len(missing)} of the {len(idx)} images in {split_dir / 'image'} "
                    f"(e.g. {missing[0]}.npy)\n{self.layout(self.root)}"
                )
        return split_dir, dirs, idx

    def _check_sample(self, split_dir: Path, dirs: dict[str, str], i: int) -> tuple[int, int]:
        image = np.load(split_dir / "image" / f"{i}.npy")
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{split_dir}/image/{i}.npy: expected [H, W, 3], got {image.shape}\n{self.layout(self.root)}")
        h, w = image.shape[:2]
        expect = {"segmentation": [(h, w)], "depth": [(h, w), (h, w, 1)], "normal": [(h, w, 3)]}
        for t, sub in dirs.items():
            a = np.load(split_dir / sub / f"{i}.npy")
            if a.shape not in expect[t]:
                raise ValueError(
                    f"{split_dir}/{sub}/{i}.npy: expected shape {' or '.join(map(str, expect[t]))} "
                    f"(matching the image), got {a.shape}\n{self.layout(self.root)}"
                )
            if t == "segmentation":
                v = a[np.isfinite(a)]
                if v.size and (v.max() >= self.num_classes or v.min() < -1):
                    raise ValueError(
                        f"{split_dir}/{sub}/{i}.npy: labels must be in -1..{self.num_classes - 1}, "
                        f"found {v.min():g}..{v.max():g} (num_classes={self.num_classes})"
                    )
        if (h, w) != tuple(self.IMAGE_SHAPE):
            log.info("%s: images are %dx%d (the standard release has %dx%d)", self.NAME, h, w, *self.IMAGE_SHAPE)
        return h, w

    def _build(self) -> None:
        self.root = resolve_root(self.root_arg, self.DEFAULT_FOLDER)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.NAME} data not found: {self.root} does not exist\n{self.layout(self.root)}")
        train_dir, train_dirs, train_idx = self._scan("train")
        test_dir, test_dirs, test_idx = self._scan("val")
        h, w = self._check_sample(train_dir, train_dirs, train_idx[0])
        if self._check_sample(test_dir, test_dirs, test_idx[0]) != (h, w):
            raise ValueError(f"{self.NAME}: train and val images differ in size")
        self._in_shape = (3, h, w)
        perm = np.random.default_rng(self.seed).permutation(len(train_idx))
        n_val = int(round(self.val_fraction * len(train_idx)))
        if self.val_fraction > 0 and n_val == 0:
            n_val = 1
        if n_val >= len(train_idx):
            raise ValueError(f"val_fraction={self.val_fraction} leaves no training image of {len(train_idx)}")
        all_train = np.asarray(train_idx)
        val_ids = np.sort(all_train[perm[:n_val]])
        tr_ids = _limit(np.sort(all_train[perm[n_val:]]), self.num_train)
        te_ids = _limit(np.asarray(test_idx), self.num_test)
        self.train_set = _DenseNpyDataset(train_dir, train_dirs, tr_ids, augment=self.augment)
        self.test_set = _DenseNpyDataset(test_dir, test_dirs, te_ids)
        if n_val:
            self.val_set = _DenseNpyDataset(train_dir, train_dirs, val_ids)
        else:
            log.warning("%s: val_fraction=0, so epochs are selected on the test images (the reference code's "
                        "protocol)", self.NAME)
            self.val_set = self.test_set
        self.split_ids = {"train": tr_ids, "val": val_ids if n_val else te_ids, "test": te_ids}


class CityScapesDataModule(DenseNpyDataModule):
    """CityScapes (2 tasks: 7-class segmentation, depth), MTAN's 128x256 ``.npy`` release.

    Paper settings (Sec. 5.1, after FairGrad): SegNet-MTAN, Adam lr 1e-4 halved after 100 of 200
    epochs, batch size 8. See :class:`DenseNpyDataModule` for the arguments and the module
    docstring for the layout.
    """

    NAME = "CityScapes"
    DEFAULT_FOLDER = "cityscapes"
    ALL_TASKS = ("segmentation", "depth")
    LABEL_DIRS = ("label_7", "label")
    NUM_CLASSES = 7
    IMAGE_SHAPE = (128, 256)
    SIZES = "2975 train / 500 val images, 128x256, 7 classes"


class NYUv2DataModule(DenseNpyDataModule):
    """NYUv2 (3 tasks: 13-class segmentation, depth, surface normals), MTAN's 288x384 ``.npy`` release.

    Paper settings (Sec. 5.1, after FairGrad): SegNet-MTAN, Adam lr 1e-4 halved after 100 of 200
    epochs, batch size 2. See :class:`DenseNpyDataModule` for the arguments.
    """

    NAME = "NYUv2"
    DEFAULT_FOLDER = "nyuv2"
    ALL_TASKS = ("segmentation", "depth", "normal")
    LABEL_DIRS = ("label",)
    NUM_CLASSES = 13
    IMAGE_SHAPE = (288, 384)
    SIZES = "795 train / 654 val images, 288x384, 13 classes"

    def __init__(self, root: str | os.PathLike | None = None, batch_size: int = 2, seed: int = 0, **kwargs: Any):
        super().__init__(root, batch_size, seed, **kwargs)
