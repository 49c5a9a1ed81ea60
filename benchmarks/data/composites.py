"""MultiMNIST-type composites: two MNIST-format items on one canvas, one task per item.

MultiMNIST and MultiFashion put two items of one file on the canvas; Multi-(Fashion+MNIST) takes the
left item from one file and the right item from another (``path_left``, ``path_right``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

from benchmarks.data.base import LAYOUT, MultiTaskDataModule, resolve_data_path, safe_task_names
from benchmarks.data.tasks import TaskSpec

__all__ = ["make_multimnist_composites", "MultiMNISTDataModule"]

_ARRAYS = ("x_train", "y_train", "x_test", "y_test")


def make_multimnist_composites(
    left: np.ndarray, right: np.ndarray, canvas_size: int | None = None, offset: int | None = None
) -> np.ndarray:
    """Overlay digit pairs: ``left`` at the top-left corner, ``right`` shifted by
    ``offset`` pixels down and right, combined with ``max`` (vectorised).

    ``left``, ``right``: ``[N, h, w]`` arrays. Defaults follow Sener & Koltun (2018):
    a ``(h + 8)``-pixel square canvas (36 for MNIST) and ``offset = canvas - h - 2`` (6),
    i.e. the right digit covers rows/cols ``6:34``.
    """
    if left.shape != right.shape or left.ndim != 3:
        raise ValueError(f"left/right must be equal [N,h,w] arrays, got {left.shape} and {right.shape}")
    n, h, w = left.shape
    canvas = int(canvas_size) if canvas_size is not None else max(h, w) + 8
    off = int(offset) if offset is not None else canvas - max(h, w) - 2
    if not (0 < off and off + h <= canvas and off + w <= canvas and h <= canvas and w <= canvas):
        raise ValueError(f"offset {off} does not fit {h}x{w} digits on a {canvas}x{canvas} canvas")
    out = np.zeros((n, canvas, canvas), dtype=np.result_type(left, right))
    out[:, :h, :w] = left
    region = out[:, off : off + h, off : off + w]
    np.maximum(region, right, out=region)
    return out


class MultiMNISTDataModule(MultiTaskDataModule):
    """MultiMNIST: two MNIST items on one canvas; one task classifies the left item, one the right.

    The standard construction of Sener & Koltun (NeurIPS 2018), from any MNIST-format ``.npz``
    (``x_train``, ``y_train``, ``x_test``, ``y_test``): composite ``i`` of a split puts item ``i`` at
    the top-left of a 36x36 canvas and a second item, drawn uniformly at random (seeded) from the
    *same* split, shifted 6 px down-right, max-combined, then resized to ``image_size`` (default
    36 = no resize; ``image_size=28, resize_mode="nearest"`` is exactly the original recipe).

    ``path`` names the file of both items (``fashion_mnist.npz`` gives MultiFashion); ``path_left``
    and ``path_right`` take the two items from two files (Multi-(Fashion+MNIST): digits on the left,
    Fashion-MNIST articles on the right), each split and drawn from its own file. Tasks are named
    ``task_names``; by default ``left``/``right`` for one file and the two files' stems for two.

    Splits: ``num_val`` images of each file's official train set (a seeded permutation) form the
    validation split (for model selection), the rest the train split; the test split is built from
    the official test sets with a fixed pairing (``test_seed``, independent of ``seed``, so every run
    sees the same test set). Partners are always drawn from the same split, so train and val
    composites share no source image. ``num_train``/``num_test`` take prefixes of the full splits
    (a subset is the start of the full set); ``num_train=None`` uses every training image.

    Inputs are float ``[B, 1, S, S]`` in [0, 1], standardised with the train composites' pixel
    mean/std when ``normalize``; targets ``LongTensor [B, 2]`` = (left class, right class).
    ``source_indices[split]`` holds the ``(left, right)`` indices into the official arrays
    (``x_train`` for train/val, ``x_test`` for test) of the left and the right file.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        num_train: int | None = None,
        num_val: int = 10_000,
        num_test: int | None = None,
        batch_size: int = 256,
        seed: int = 0,
        image_size: int = 36,
        *,
        path_left: str | os.PathLike | None = None,
        path_right: str | os.PathLike | None = None,
        task_names: tuple[str, str] | None = None,
        canvas_size: int | None = None,
        offset: int | None = None,
        resize_mode: str = "nearest",
        normalize: bool = True,
        test_seed: int = 0,
        **loader: Any,
    ) -> None:
        super().__init__(batch_size, seed=seed, **loader)  # eval_batch_size, num_workers, ... (base class)
        self.path = path
        self.path_left = path_left if path_left is not None else path
        self.path_right = path_right if path_right is not None else path
        self.num_train, self.num_val, self.num_test = num_train, int(num_val), num_test
        self.image_size = int(image_size)
        self.canvas_size, self.offset = canvas_size, offset
        self.resize_mode = resize_mode
        self.normalize = normalize
        self.test_seed = int(test_seed)
        self.source_indices: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.pixel_mean, self.pixel_std = 0.0, 1.0
        names = task_names or self._default_task_names()
        if len(names) != 2:
            raise ValueError(f"task_names must name the left and the right task, got {names!r}")
        # known without reading the files
        self._task_specs = tuple(TaskSpec.multiclass(n, 10) for n in safe_task_names(names))

    def _default_task_names(self) -> tuple[str, str]:
        if self.path_left == self.path_right:
            return ("left", "right")
        stems = tuple(Path(str(p or "mnist")).name.split(".")[0] for p in (self.path_left, self.path_right))
        return stems if stems[0] != stems[1] else ("left", "right")

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        return self._task_specs

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def data_files(self) -> list[Path]:
        files = [resolve_data_path(p, "mnist.npz", suffixes=(".npz",)) for p in (self.path_left, self.path_right)]
        return list(dict.fromkeys(files))

    @staticmethod
    def _load(file: Path) -> dict[str, np.ndarray]:
        with np.load(file) as z:
            missing = set(_ARRAYS) - set(z.files)
            if missing:
                raise KeyError(f"{file} lacks arrays {sorted(missing)}; MNIST layout: {LAYOUT}")
            d = {k: z[k] for k in _ARRAYS}
        for s in ("train", "test"):
            x, y = d[f"x_{s}"], d[f"y_{s}"]
            if x.ndim != 3 or len(x) != len(y):
                raise ValueError(f"{file}: x_{s} must be [N,h,w] with N == len(y_{s}), got {x.shape}, {y.shape}")
        return d

    def _composites(self, left: np.ndarray, right: np.ndarray) -> torch.Tensor:
        comp = make_multimnist_composites(left, right, self.canvas_size, self.offset)
        scale = 255.0 if (comp.dtype == np.uint8 or comp.max() > 1.0) else 1.0
        t = torch.from_numpy(comp).unsqueeze(1)  # [N,1,C,C]
        if t.shape[-1] == self.image_size:
            return t.float().div_(scale)
        if len(t) == 0:
            return torch.zeros(0, 1, self.image_size, self.image_size)
        kw = {} if self.resize_mode == "nearest" else {"antialias": self.resize_mode in ("bilinear", "bicubic")}
        chunks = [F.interpolate(c.float(), size=self.image_size, mode=self.resize_mode, **kw) for c in t.split(8192)]
        return torch.cat(chunks).div_(scale)

    def _pools(self, d: dict[str, np.ndarray], file: Path, seed: object) -> dict[str, np.ndarray]:
        """Source indices of each split: a seeded permutation of the official train set cut into
        validation and train, and the official test set in order."""
        n_official = len(d["y_train"])
        if not 0 <= self.num_val < n_official:
            raise ValueError(f"num_val={self.num_val} out of range for the {n_official} training images of {file}")
        perm = np.random.default_rng(seed).permutation(n_official)
        return {"train": perm[self.num_val :], "val": perm[: self.num_val], "test": np.arange(len(d["y_test"]))}

    def _pairs(self, pool: np.ndarray, partners: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
        """``(left, right)``: a prefix of ``pool`` and, for each, a partner drawn from ``partners``."""
        seed, tag, n = {"train": (self.seed, 1, self.num_train), "val": (self.seed, 2, None),
                        "test": (self.test_seed, 3, self.num_test)}[split]
        rng = np.random.default_rng([seed, tag])
        right = partners[rng.integers(0, len(partners), size=len(pool))] if len(pool) else pool
        n = len(pool) if n is None else min(int(n), len(pool))
        return pool[:n], right[:n]

    def _build(self) -> None:
        files = self.data_files()
        self.file = files[0]
        data = [self._load(f) for f in files]
        left, right = data[0], data[-1]
        pools_l = self._pools(left, files[0], self.seed)
        # one file: the partners come from the same pools (Sener & Koltun); two: each file its own
        pools_r = pools_l if len(files) == 1 else self._pools(right, files[-1], [self.seed, 9])
        tensors = {}
        for split in ("train", "val", "test"):
            li, ri = self.source_indices[split] = self._pairs(pools_l[split], pools_r[split], split)
            src = "test" if split == "test" else "train"
            x = self._composites(left[f"x_{src}"][li], right[f"x_{src}"][ri])
            y = np.stack([left[f"y_{src}"][li], right[f"y_{src}"][ri]], 1).astype(np.int64)
            tensors[split] = (x, torch.from_numpy(y))
        if self.normalize and len(tensors["train"][0]):
            xt = tensors["train"][0]
            self.pixel_mean = float(xt.mean())
            self.pixel_std = float(xt.std()) or 1.0
            for x, _ in tensors.values():
                x.sub_(self.pixel_mean).div_(self.pixel_std)
        self.train_set, self.val_set, self.test_set = (TensorDataset(*tensors[s]) for s in ("train", "val", "test"))
