"""DataModules for the paper's benchmarks (COST paper Sec. 5.1), read from local copies only.

Nothing is ever downloaded: each DataModule checks its layout first and raises
``FileNotFoundError`` naming the expected paths, file names and shapes. Point a DataModule at
its data with ``root=...`` (``data_kw: {root: ...}`` in a runner config) or move the whole data
root with ``$LIGHTNING_COST_DATA`` (default ``<project>/../shared/data``, see
:mod:`benchmarks.data.base`); without ``root`` each one reads ``<data root>/<name>``. A relative
``root`` that does not exist from the working directory is also looked up under the data root.

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

CelebA (:class:`CelebADataModule`)
    ``torchvision.datasets.CelebA(root, split, target_type="attr", download=False)``::

        <root>/celeba/img_align_celeba/<000001.jpg ...>
        <root>/celeba/list_attr_celeba.txt   list_eval_partition.txt   identity_CelebA.txt
        <root>/celeba/list_bbox_celeba.txt   list_landmarks_align_celeba.txt

    (``root`` may also be the ``celeba`` folder itself.) torchvision checks the MD5 of the five text
    files; ``check_md5=False`` skips that check (only their presence is checked). Official
    train/valid/test partition; images resized to 64x64 and scaled to [0, 1] (FairGrad/FAMO's
    pipeline). Batches ``(image [B, 3, 64, 64], attributes [B, 40] float in {0, 1})``.

QM9 (:class:`QM9DataModule`)
    ``torch_geometric.datasets.QM9(root)``, imported only when the DataModule is set up::

        <root>/raw/gdb9.sdf  gdb9.sdf.csv  uncharacterized.txt   (processed with RDKit), or
        <root>/raw/qm9_v3.pt                                     (PyG's pre-processed file, no RDKit), or
        <root>/processed/data_v3.pt                              (already processed)

    The 11 targets of the Nash-MTL/FAMO/FairGrad setup (mu, alpha, HOMO, LUMO, <R^2>, ZPVE, and the
    atomisation energies U0, U, H, G, then c_v), standardised with train statistics; MAE is reported
    in the original units with energies in meV. Graphs are made complete with the bond type as a
    4-dim edge feature (zeros for non-bonded pairs) plus the interatomic distance (edge_dim 5).
    Seeded random split: 10,000 test, 10,000 validation, the rest training. Batches
    ``(torch_geometric Batch, y [B, 11])``.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from benchmarks.data.base import DATA_ENV_VAR, MultiTaskDataModule, default_data_root, safe_task_names
from benchmarks.data.tasks import TaskSpec
from benchmarks.paper.tasks import attribute_task, depth_task, normal_task, segmentation_task

__all__ = [
    "DenseNpyDataModule",
    "CityScapesDataModule",
    "NYUv2DataModule",
    "CelebADataModule",
    "QM9DataModule",
    "PAPER_DATAMODULES",
    "QM9_TARGETS",
]

log = logging.getLogger(__name__)

_HOW = (
    f"Pass the location as root=... (runner config: data_kw: {{root: ...}}) or set ${DATA_ENV_VAR} "
    "to a data root holding it under the default folder name. Nothing is downloaded."
)


def resolve_root(root: str | os.PathLike | None, default: str) -> Path:
    """``root`` as given if it exists, else ``<data root>/<root>``; ``None`` -> ``<data root>/<default>``.

    Returns the first candidate that exists, or the first candidate (the layout check then fails
    with a message naming it)."""
    base = default_data_root()
    if root is None:
        return base / default
    p = Path(root).expanduser()
    if p.exists() or p.is_absolute():
        return p
    alt = base / p
    return alt if alt.exists() else p


class _PaperDataModule(MultiTaskDataModule):
    """The base class's loaders (with its ``collate_fn`` hook) over lazily read data sets; the evaluation
    batch defaults to the training batch (these inputs are large)."""

    def __init__(self, root: str | os.PathLike | None, batch_size: int, seed: int,
                 eval_batch_size: int | None = None, **loader: Any) -> None:
        super().__init__(batch_size, eval_batch_size or batch_size, seed=seed, **loader)
        self.root_arg = root

    #: the folder under the data root read when no ``root`` is given
    DEFAULT_FOLDER = "."

    def data_files(self) -> list[Path]:
        """The data folder (the runner fingerprints a folder by its listing, not its content)."""
        return [resolve_root(self.root_arg, self.DEFAULT_FOLDER)]

    @property
    def in_shape(self) -> tuple[int, ...]:
        self._ensure_setup()
        return tuple(self._in_shape)


def _limit(idx: np.ndarray, n: int | None) -> np.ndarray:
    return idx if n is None else idx[: max(0, int(n))]


# --------------------------------------------------------------------------- CityScapes / NYUv2


_INDEX_RE = re.compile(r"^(\d+)\.npy$")


def _npy_indices(folder: Path) -> list[int]:
    return sorted(int(m.group(1)) for f in os.listdir(folder) if (m := _INDEX_RE.match(f)))


def random_scale_crop_flip(
    image: torch.Tensor, targets: dict[str, torch.Tensor], scales: Sequence[float] = (1.0, 1.2, 1.5),
    flip: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The MTAN/Nash-MTL/FairGrad training augmentation (one sample, channels first).

    Crops a random window of ``1/s`` of the image (``s`` drawn from ``scales``) and resizes it back
    (bilinear for the image and normals, nearest for labels and depth; depth is divided by ``s``:
    zooming in brings the scene closer), then flips horizontally with probability 1/2 (negating
    the normals' x-component). Uses torch's global RNG (seeded per worker by Lightning).
    """
    h, w = image.shape[-2:]
    s = float(scales[int(torch.randint(len(scales), ()).item())])
    ch, cw = int(h / s), int(w / s)
    i = int(torch.randint(h - ch + 1, ()).item())
    j = int(torch.randint(w - cw + 1, ()).item())

    def crop(t: torch.Tensor, mode: str) -> torch.Tensor:
        t = t[..., i : i + ch, j : j + cw]
        if (ch, cw) == (h, w):
            return t
        kw = {"align_corners": True} if mode == "bilinear" else {}
        return F.interpolate(t[None].float(), size=(h, w), mode=mode, **kw)[0].to(t.dtype)

    image = crop(image, "bilinear")
    out: dict[str, torch.Tensor] = {}
    for name, t in targets.items():
        if name == "segmentation":
            out[name] = crop(t[None], "nearest")[0]
        elif name == "depth":
            out[name] = crop(t, "nearest") / s
        elif name == "normal":
            out[name] = crop(t, "bilinear")
        else:
            raise ValueError(f"unknown dense target {name!r}")
    if flip and bool(torch.rand(()) < 0.5):
        image = image.flip(-1)
        for name in out:
            out[name] = out[name].flip(-1)
        if "normal" in out:
            out["normal"] = out["normal"].clone()
            out["normal"][0].neg_()
    return image, out


class _DenseNpyDataset(Dataset):
    """Reads ``<split dir>/<modality>/<i>.npy`` lazily; returns ``(image [3,H,W], {task: target})``."""

    def __init__(self, folder: Path, dirs: dict[str, str], indices: Sequence[int], augment: bool = False) -> None:
        self.folder = Path(folder)
        self.dirs = dict(dirs)  # target name -> sub-folder
        self.indices = [int(i) for i in indices]
        self.augment = augment

    def __len__(self) -> int:
        return len(self.indices)

    def _load(self, sub: str, i: int) -> np.ndarray:
        return np.load(self.folder / sub / f"{i}.npy")

    def __getitem__(self, k: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        i = self.indices[k]
        image = torch.from_numpy(np.ascontiguousarray(np.moveaxis(self._load("image", i), -1, 0), dtype=np.float32))
        targets: dict[str, torch.Tensor] = {}
        for name, sub in self.dirs.items():
            a = self._load(sub, i)
            if name == "segmentation":
                a = np.where(np.isfinite(a), a, -1)
                targets[name] = torch.from_numpy(np.rint(a).astype(np.int64))
            elif name == "depth":
                a = a[..., 0] if a.ndim == 3 else a
                targets[name] = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None]
            else:
                targets[name] = torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, -1, 0), dtype=np.float32))
        if self.augment:
            image, targets = random_scale_crop_flip(image, targets)
        return image, targets


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


# --------------------------------------------------------------------------- CelebA


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


# --------------------------------------------------------------------------- QM9

#: PyG QM9 target columns of the Nash-MTL/FAMO/FairGrad setup, in their order, and their names
QM9_TARGETS = (0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11)
QM9_NAMES = {0: "mu", 1: "alpha", 2: "homo", 3: "lumo", 4: "gap", 5: "r2", 6: "zpve", 7: "U0_total",
             8: "U_total", 9: "H_total", 10: "G_total", 11: "cv", 12: "U0", 13: "U", 14: "H", 15: "G",
             16: "A", 17: "B", 18: "C"}
#: PyG columns in eV (reported in meV when ``report_mev``)
QM9_EV = frozenset({2, 3, 4, 6, 7, 8, 9, 10, 12, 13, 14, 15})


class QM9Transform:
    """Per-molecule transform: select and standardise the targets, make the graph complete, append
    the interatomic distance to the edge features (4 bond types + distance = 5)."""

    def __init__(self, targets: Sequence[int], mean: torch.Tensor, std: torch.Tensor) -> None:
        self.targets = torch.as_tensor(list(targets), dtype=torch.long)
        self.mean, self.std = mean.float().reshape(1, -1), std.float().reshape(1, -1)

    def __call__(self, data):
        data = data.clone()
        data.y = (data.y[:, self.targets] - self.mean) / self.std
        n = int(data.num_nodes)
        row = torch.arange(n).repeat_interleave(n)
        col = torch.arange(n).repeat(n)
        attr = data.edge_attr.new_zeros(n * n, data.edge_attr.shape[1])
        attr[data.edge_index[0] * n + data.edge_index[1]] = data.edge_attr
        keep = row != col
        row, col, attr = row[keep], col[keep], attr[keep]
        dist = (data.pos[row] - data.pos[col]).norm(dim=-1, keepdim=True)
        data.edge_index = torch.stack([row, col])
        data.edge_attr = torch.cat([attr.float(), dist], dim=-1)
        return data


class GraphCollate:
    """``list[Data] -> (Batch, Batch.y)``: the runner's ``(x, y)`` batches for graphs."""

    def __call__(self, items):
        from torch_geometric.data import Batch

        batch = Batch.from_data_list(items)
        return batch, batch.y


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


def _offline_qm9(root: str):
    return _lazy_class("OfflineQM9")(root)


class QM9DataModule(_PaperDataModule):
    """QM9: 11 molecular properties as 11 regression tasks, through ``torch_geometric.datasets.QM9``.

    Paper settings (Sec. 5.1, after Nash-MTL/FairGrad): the MPNN of
    :func:`benchmarks.paper.models.qm9_mpnn`, Adam lr 1e-3, 300 epochs, batch size 120, the lr
    reduced on a validation plateau (reference code: factor 0.7, patience 5, min lr 1e-5). Targets
    standardised (MSE on the standardised targets is the training loss); MAE in original units
    (energies in meV when ``report_mev``).

    Args:
        root: PyG's QM9 root (``raw/`` and/or ``processed/``; module docstring).
        targets: PyG target columns (default :data:`QM9_TARGETS`).
        num_val, num_test: validation / test sizes (10,000 each in the reference code); the rest trains.
        num_train: keep only the first N training molecules (quick runs).
    """

    NAME = "QM9"
    collate_fn = GraphCollate()

    DEFAULT_FOLDER = "qm9"

    def __init__(
        self,
        root: str | os.PathLike | None = None,
        batch_size: int = 120,
        seed: int = 0,
        *,
        targets: Sequence[int] = QM9_TARGETS,
        num_val: int = 10_000,
        num_test: int = 10_000,
        num_train: int | None = None,
        report_mev: bool = True,
        **loader: Any,
    ) -> None:
        super().__init__(root, batch_size, seed, **loader)  # eval_batch_size, num_workers, ... (base classes)
        self.targets = tuple(int(t) for t in targets)
        if not self.targets or any(t not in QM9_NAMES for t in self.targets) or len(set(self.targets)) != len(self.targets):
            raise ValueError(f"targets must be distinct PyG QM9 columns in 0..18, got {tuple(targets)}")
        self.num_val, self.num_test, self.num_train = int(num_val), int(num_test), num_train
        self.report_mev = bool(report_mev)
        self.num_node_features, self.edge_dim = 11, 5

    @staticmethod
    def layout(root: Path | str = "<root>") -> str:
        return (
            f"Expected PyTorch Geometric's QM9 layout under {root}:\n"
            f"  {root}/raw/gdb9.sdf, {root}/raw/gdb9.sdf.csv, {root}/raw/uncharacterized.txt  "
            "(the MoleculeNet qm9.zip + figshare 3195404 files; processed with RDKit), or\n"
            f"  {root}/raw/qm9_v3.pt  (PyG's pre-processed file, when RDKit is not installed), or\n"
            f"  {root}/processed/data_v3.pt  (an already processed copy)\n" + _HOW
        )

    def _check(self, root: Path) -> None:
        if (root / "processed" / "data_v3.pt").is_file():
            return
        try:
            import rdkit  # noqa: F401

            raw = ["gdb9.sdf", "gdb9.sdf.csv", "uncharacterized.txt"]
        except ImportError:  # pragma: no cover - depends on the environment
            raw = ["qm9_v3.pt"]
        missing = [f for f in raw if not (root / "raw" / f).is_file()]
        if missing:
            raise FileNotFoundError(
                f"QM9 data not found under {root}: missing {', '.join('raw/' + m for m in missing)} "
                f"and processed/data_v3.pt\n{self.layout(root)}"
            )

    def _build(self) -> None:
        try:
            import torch_geometric  # noqa: F401
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError("QM9DataModule needs PyTorch Geometric: pip install 'lightning-cost[paper]'") from e
        root = resolve_root(self.root_arg, self.DEFAULT_FOLDER)
        self.root = root
        self._check(root)
        ds = _offline_qm9(str(root))
        n = len(ds)
        if self.num_val < 0 or self.num_test < 0 or self.num_val + self.num_test >= n:
            raise ValueError(f"QM9 has {n} molecules: num_val={self.num_val} + num_test={self.num_test} leaves "
                             "no training molecule")
        perm = np.random.default_rng(self.seed).permutation(n)
        te, va = perm[: self.num_test], perm[self.num_test : self.num_test + self.num_val]
        tr = _limit(perm[self.num_test + self.num_val :], self.num_train)
        self.split_idx = {"train": tr, "val": va, "test": te}
        y = ds._data.y[:, list(self.targets)].double()  # [N, T], one row per molecule
        ytr = y[torch.as_tensor(tr)]
        mean = ytr.mean(0)
        std = ytr.std(0) if len(tr) > 1 else torch.ones_like(mean)
        std = torch.where(torch.isfinite(std) & (std > 1e-12), std, torch.ones_like(std))
        ds.transform = QM9Transform(self.targets, mean, std)
        unit = torch.tensor([1000.0 if (self.report_mev and t in QM9_EV) else 1.0 for t in self.targets],
                            dtype=torch.float64)
        self.target_mean, self.target_std = (mean * unit).numpy(), (std * unit).numpy()
        self.target_names = [QM9_NAMES[t] for t in self.targets]
        self._task_specs = tuple(
            TaskSpec.regression(name, float(m), float(s))
            for name, m, s in zip(self.target_names, self.target_mean, self.target_std, strict=True)
        )
        self._in_shape = (self.num_node_features,)
        self.train_set = ds.index_select(torch.as_tensor(tr))
        self.val_set = ds.index_select(torch.as_tensor(va))
        self.test_set = ds.index_select(torch.as_tensor(te))


PAPER_DATAMODULES = (DenseNpyDataModule, CelebADataModule, QM9DataModule)
