"""Lightning DataModules for the multi-task benchmarks (real data, read from local files).

Data location
-------------
Each DataModule takes the path of its file. Without one it reads the project's
shared data folder, ``<project root>/../shared/data`` (the layout of
``shared/data/README.md``)::

    <data root>/mnist.npz                  x_train (N,28,28) uint8, y_train (N,), x_test, y_test
    <data root>/fashion_mnist.npz          same layout
    <data root>/multilabel/<name>.npz      X (N,F) float, Y (N,K) {0,1}, optional labels (K,)
    <data root>/molecules/<name>.csv.gz    a SMILES column + numeric target columns, blank = missing

The data root can be moved with the environment variable ``LIGHTNING_COST_DATA``
(read when a DataModule resolves its path). A relative ``path`` that does not
exist from the working directory is also looked up under the data root, and a
bare name works too: ``MoleculeDataModule("qm8")``, ``MultiLabelDataModule("emotions")``,
``MultiMNISTDataModule("fashion_mnist")``.

Batches
-------
All loaders yield ``(x, y)`` with ``y`` of shape ``[B, K]``, one column per task in
the order of ``datamodule.task_specs`` (``LongTensor`` for MultiMNIST, float with
``NaN`` for missing labels otherwise). ``setup()`` is idempotent and also runs
lazily when ``task_specs``/``num_tasks``/``in_shape`` are first read. The train
loader shuffles with a generator seeded by ``seed``; ``num_workers=0`` by default.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.tasks import TaskSpec

__all__ = [
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "default_data_root",
    "default_cache_dir",
    "resolve_data_path",
    "make_multimnist_composites",
    "split_indices",
    "read_molecule_csv",
    "morgan_fingerprints",
    "MultiMNISTDataModule",
    "MultiLabelDataModule",
    "MoleculeDataModule",
]

log = logging.getLogger(__name__)

DATA_ENV_VAR = "LIGHTNING_COST_DATA"
CACHE_ENV_VAR = "LIGHTNING_COST_CACHE"

_LAYOUT = (
    "Expected layout of the data root (see shared/data/README.md):\n"
    "  mnist.npz, fashion_mnist.npz           (x_train, y_train, x_test, y_test; uint8 28x28 images)\n"
    "  multilabel/<name>.npz                  (X [N,F], Y [N,K] in {0,1}, optional labels [K])\n"
    "  molecules/<name>.csv[.gz]              (a 'smiles' column + numeric target columns)\n"
    f"The data root defaults to <project>/../shared/data; set ${DATA_ENV_VAR} to move it, "
    "or pass the file's path explicitly."
)


# --------------------------------------------------------------------------- paths


def default_data_root() -> Path:
    """``$LIGHTNING_COST_DATA`` if set, else ``<project root>/../shared/data``."""
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1].parent / "shared" / "data"


def default_cache_dir() -> Path:
    """``$LIGHTNING_COST_CACHE`` if set, else ``~/.cache/lightning_cost``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_cost"


def resolve_data_path(
    path: str | os.PathLike | None,
    default: str,
    subdir: str = "",
    suffixes: Sequence[str] = (),
) -> Path:
    """Resolve a data file path.

    ``None`` -> ``<data root>/<default>``. Otherwise ``path`` as given if it exists,
    then (for relative paths) ``<data root>/<path>``, ``<data root>/<subdir>/<path>``
    and those with each of ``suffixes`` appended. Raises ``FileNotFoundError``
    naming every place tried and the expected layout.
    """
    root = default_data_root()
    if path is None:
        candidates = [root / default]
    else:
        p = Path(path).expanduser()
        candidates = [p]
        if not p.is_absolute():
            bases = [root / p] + ([root / subdir / p] if subdir else [])
            for b in bases:
                candidates.append(b)
                candidates += [b.with_name(b.name + s) for s in suffixes]
    for c in candidates:
        if c.is_file():
            return c
    tried = "\n".join(f"  {c}" for c in dict.fromkeys(candidates))
    raise FileNotFoundError(f"data file not found; tried:\n{tried}\n{_LAYOUT}")


def _safe_task_names(names: Sequence[str]) -> list[str]:
    """Task names usable as ``ModuleDict`` keys: no '.', non-empty, unique."""
    out: list[str] = []
    seen: set[str] = set()
    for k, n in enumerate(names):
        s = re.sub(r"\s+", "_", str(n).strip()).replace(".", "_") or f"task{k}"
        base, i = s, 1
        while s in seen:
            i += 1
            s = f"{base}_{i}"
        seen.add(s)
        out.append(s)
    return out


def split_indices(n: int, fractions: Sequence[float], seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded random ``(train, val, test)`` index split of ``range(n)``.

    ``fractions`` = ``(train, val, test)`` (normalised to sum 1); val and test sizes
    are rounded, train takes the rest. The three parts are disjoint and cover ``range(n)``.
    """
    f = np.asarray(fractions, dtype=float)
    if f.shape != (3,) or (f < 0).any() or f.sum() <= 0:
        raise ValueError(f"fractions must be three non-negative numbers, got {fractions}")
    f = f / f.sum()
    n_val, n_test = int(round(f[1] * n)), int(round(f[2] * n))
    perm = np.random.default_rng(seed).permutation(n)
    return perm[n_val + n_test :], perm[:n_val], perm[n_val : n_val + n_test]


# --------------------------------------------------------------------------- base class


class _MultiTaskDataModule(L.LightningDataModule):
    """Shared loader logic; subclasses implement ``_build()`` setting the datasets and specs."""

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        seed: int,
        pin_memory: bool,
        drop_last: bool | None,
    ) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or max(batch_size, 512))
        self.num_workers = int(num_workers)
        self.seed = int(seed)
        self.pin_memory = bool(pin_memory)
        self.drop_last = drop_last
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None
        self.test_set: TensorDataset | None = None
        self._task_specs: tuple[TaskSpec, ...] | None = None
        self._is_setup = False

    # -- lifecycle
    def _build(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Load and split the data (once; later calls do nothing)."""
        if self._is_setup:
            return
        t0 = time.perf_counter()
        self._build()
        self._is_setup = True
        self.setup_seconds = time.perf_counter() - t0
        log.info(
            "%s ready in %.2fs: train %d, val %d, test %d",
            type(self).__name__,
            self.setup_seconds,
            len(self.train_set),
            len(self.val_set),
            len(self.test_set),
        )

    def _ensure_setup(self) -> None:
        if not self._is_setup:
            self.setup()

    # -- properties
    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        self._ensure_setup()
        assert self._task_specs is not None
        return self._task_specs

    @property
    def task_names(self) -> list[str]:
        return [s.name for s in self.task_specs]

    @property
    def num_tasks(self) -> int:
        return len(self.task_specs)

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input sample (without the batch dimension)."""
        self._ensure_setup()
        return tuple(self.train_set.tensors[0].shape[1:])

    @property
    def in_features(self) -> int:
        return int(np.prod(self.in_shape))

    # -- loaders
    #: ``DataLoader(collate_fn=...)``; ``None`` is PyTorch's default (graph data sets set their own)
    collate_fn: Any = None

    def _loader(self, ds: Any, train: bool) -> DataLoader:
        self._ensure_setup()
        assert ds is not None
        kw: dict = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, collate_fn=self.collate_fn)
        if self.num_workers > 0:
            kw["persistent_workers"] = True
        if not train:
            return DataLoader(ds, batch_size=self.eval_batch_size, shuffle=False, **kw)
        drop_last = self.drop_last
        if drop_last is None:  # a last batch of one sample breaks BatchNorm in training mode
            drop_last = len(ds) % self.batch_size == 1 and len(ds) > self.batch_size
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(
            ds, batch_size=self.batch_size, shuffle=True, generator=gen, drop_last=drop_last, **kw
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)


# --------------------------------------------------------------------------- MultiMNIST


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


class MultiMNISTDataModule(_MultiTaskDataModule):
    """MultiMNIST: two MNIST digits on one canvas; task ``left`` and task ``right``.

    The standard construction of Sener & Koltun (NeurIPS 2018), from any
    MNIST-format ``.npz`` (``x_train``, ``y_train``, ``x_test``, ``y_test``; e.g.
    ``fashion_mnist.npz`` gives MultiFashion): composite ``i`` of a split puts
    digit ``i`` at the top-left of a 36x36 canvas and a second digit, drawn
    uniformly at random (seeded) from the *same* split, shifted 6 px down-right,
    max-combined, then resized to ``image_size`` (default 36 = no resize;
    ``image_size=28, resize_mode="nearest"`` is exactly the original recipe).

    Splits: ``num_val`` images of the official train set (a seeded permutation)
    form the validation split (for model selection), the rest the train split;
    the test split is built from the official test set with a fixed pairing
    (``test_seed``, independent of ``seed``, so every run sees the same test set).
    Partners are always drawn from the same split, so train and val composites
    share no source image. ``num_train``/``num_test`` take prefixes of the full
    splits (a subset is the start of the full set, for fast tests).

    Inputs are float ``[B, 1, S, S]`` in [0, 1], standardised with the train
    composites' pixel mean/std when ``normalize``; targets ``LongTensor [B, 2]``
    = (left digit, right digit). ``source_indices[split]`` holds the
    ``(left, right)`` indices into the official arrays (``x_train`` for
    train/val, ``x_test`` for test).
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
        canvas_size: int | None = None,
        offset: int | None = None,
        resize_mode: str = "nearest",
        normalize: bool = True,
        test_seed: int = 0,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, pin_memory, drop_last)
        self.path = path
        self.num_train, self.num_val, self.num_test = num_train, int(num_val), num_test
        self.image_size = int(image_size)
        self.canvas_size, self.offset = canvas_size, offset
        self.resize_mode = resize_mode
        self.normalize = normalize
        self.test_seed = int(test_seed)
        self.source_indices: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self.pixel_mean, self.pixel_std = 0.0, 1.0
        # known without reading the file
        self._task_specs = (TaskSpec.multiclass("left", 10), TaskSpec.multiclass("right", 10))

    @property
    def task_specs(self) -> tuple[TaskSpec, ...]:
        return self._task_specs

    @property
    def in_shape(self) -> tuple[int, int, int]:
        return (1, self.image_size, self.image_size)

    def _load(self) -> dict[str, np.ndarray]:
        self.file = resolve_data_path(self.path, "mnist.npz", suffixes=(".npz",))
        with np.load(self.file) as z:
            missing = {"x_train", "y_train", "x_test", "y_test"} - set(z.files)
            if missing:
                raise KeyError(f"{self.file} lacks arrays {sorted(missing)}; MNIST layout: {_LAYOUT}")
            d = {k: z[k] for k in ("x_train", "y_train", "x_test", "y_test")}
        for s in ("train", "test"):
            x, y = d[f"x_{s}"], d[f"y_{s}"]
            if x.ndim != 3 or len(x) != len(y):
                raise ValueError(
                    f"{self.file}: x_{s} must be [N,h,w] with N == len(y_{s}), got {x.shape}, {y.shape}"
                )
        return d

    def _composites(self, x: np.ndarray, left: np.ndarray, right: np.ndarray) -> torch.Tensor:
        comp = make_multimnist_composites(x[left], x[right], self.canvas_size, self.offset)
        scale = 255.0 if (comp.dtype == np.uint8 or comp.max() > 1.0) else 1.0
        t = torch.from_numpy(comp).unsqueeze(1)  # [N,1,C,C]
        if t.shape[-1] == self.image_size:
            return t.float().div_(scale)
        if len(t) == 0:
            return torch.zeros(0, 1, self.image_size, self.image_size)
        kw = (
            {}
            if self.resize_mode == "nearest"
            else {"antialias": self.resize_mode in ("bilinear", "bicubic")}
        )
        chunks = [
            F.interpolate(c.float(), size=self.image_size, mode=self.resize_mode, **kw) for c in t.split(8192)
        ]
        return torch.cat(chunks).div_(scale)

    def _build(self) -> None:
        d = self._load()
        n_official = len(d["y_train"])
        if not 0 <= self.num_val < n_official:
            raise ValueError(f"num_val={self.num_val} out of range for {n_official} training images")
        perm = np.random.default_rng(self.seed).permutation(n_official)
        val_pool, train_pool = perm[: self.num_val], perm[self.num_val :]
        test_pool = np.arange(len(d["y_test"]))

        def pairs(pool: np.ndarray, seed: int, tag: int, n: int | None) -> tuple[np.ndarray, np.ndarray]:
            rng = np.random.default_rng([seed, tag])
            right = pool[rng.integers(0, len(pool), size=len(pool))] if len(pool) else pool
            n = len(pool) if n is None else min(int(n), len(pool))
            return pool[:n], right[:n]

        self.source_indices = {
            "train": pairs(train_pool, self.seed, 1, self.num_train),
            "val": pairs(val_pool, self.seed, 2, None),
            "test": pairs(test_pool, self.test_seed, 3, self.num_test),
        }
        tensors = {}
        for split, (li, ri) in self.source_indices.items():
            src = "test" if split == "test" else "train"
            x = self._composites(d[f"x_{src}"], li, ri)
            y = torch.from_numpy(np.stack([d[f"y_{src}"][li], d[f"y_{src}"][ri]], 1).astype(np.int64))
            tensors[split] = (x, y)
        if self.normalize and len(tensors["train"][0]):
            xt = tensors["train"][0]
            self.pixel_mean = float(xt.mean())
            self.pixel_std = float(xt.std()) or 1.0
            for x, _ in tensors.values():
                x.sub_(self.pixel_mean).div_(self.pixel_std)
        self.train_set = TensorDataset(*tensors["train"])
        self.val_set = TensorDataset(*tensors["val"])
        self.test_set = TensorDataset(*tensors["test"])


# --------------------------------------------------------------------------- multi-label


class MultiLabelDataModule(_MultiTaskDataModule):
    """Multi-label classification from an ``X, Y`` ``.npz`` (Mulan sets: Yeast, Emotions, ...).

    ``X`` ``[N, F]`` features, ``Y`` ``[N, K]`` in {0, 1}, optional ``labels`` ``[K]``
    (task names; ``label<k>`` otherwise). Seeded random split ``fractions``
    (default 60/20/20). ``X`` is standardised with the mean/std of the train
    split only (``x_mean``, ``x_std``). Targets float ``[B, K]``.

    Every label is a binary task evaluated by ROC-AUC: the labels are imbalanced
    (Yeast: 1.4% to 75% positives), so accuracy would mostly measure the
    majority class, while AUROC is threshold-free and insensitive to the base rate.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        batch_size: int = 64,
        seed: int = 0,
        *,
        standardize: bool = True,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, pin_memory, drop_last)
        self.path = path
        self.fractions = tuple(fractions)
        self.standardize = standardize
        self.split_idx: dict[str, np.ndarray] = {}

    def _build(self) -> None:
        self.file = resolve_data_path(self.path, "multilabel/yeast.npz", "multilabel", (".npz",))
        with np.load(self.file) as z:
            if "X" not in z.files or "Y" not in z.files:
                raise KeyError(f"{self.file} must hold arrays 'X' [N,F] and 'Y' [N,K]; has {z.files}")
            X = np.asarray(z["X"], dtype=np.float32)
            Y = np.asarray(z["Y"], dtype=np.float32)
            labels = [str(s) for s in z["labels"]] if "labels" in z.files else None
        if Y.ndim == 1:
            Y = Y[:, None]
        if X.ndim != 2 or len(X) != len(Y):
            raise ValueError(f"{self.file}: need X [N,F] and Y [N,K] with equal N, got {X.shape}, {Y.shape}")
        if not np.isfinite(X).all():
            raise ValueError(f"{self.file}: X contains NaN/inf")
        present = Y[~np.isnan(Y)]
        if not np.isin(present, (0.0, 1.0)).all():
            raise ValueError(f"{self.file}: Y must be in {{0, 1}} (NaN = missing)")
        K = Y.shape[1]
        if labels is None or len(labels) != K:
            labels = [f"label{k}" for k in range(K)]
        self._task_specs = tuple(TaskSpec.binary(n) for n in _safe_task_names(labels))
        tr, va, te = split_indices(len(X), self.fractions, self.seed)
        self.split_idx = {"train": tr, "val": va, "test": te}
        if self.standardize:
            self.x_mean = X[tr].mean(0)
            std = X[tr].std(0)
            self.x_std = np.where(std > 1e-8, std, 1.0).astype(np.float32)
            X = (X - self.x_mean) / self.x_std
        else:
            self.x_mean = np.zeros(X.shape[1], np.float32)
            self.x_std = np.ones(X.shape[1], np.float32)
        Xt, Yt = torch.from_numpy(np.ascontiguousarray(X)), torch.from_numpy(Y)
        self.train_set = TensorDataset(Xt[tr], Yt[tr])
        self.val_set = TensorDataset(Xt[va], Yt[va])
        self.test_set = TensorDataset(Xt[te], Yt[te])


# --------------------------------------------------------------------------- molecules

_MISSING = {"", "nan", "na", "n/a", "none", "null"}


def _open_text(path: Path) -> io.TextIOBase:
    with open(path, "rb") as f:
        magic = f.read(2)
    if magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _to_float(s: str) -> float | None:
    """Parse a cell: a float, ``nan`` for a missing value, ``None`` if not numeric."""
    t = s.strip()
    if t.lower() in _MISSING:
        return math.nan
    try:
        return float(t)
    except ValueError:
        return None


def read_molecule_csv(
    path: str | os.PathLike,
    smiles_column: str | None = None,
    targets: Sequence[str] | None = None,
) -> tuple[list[str], list[str], np.ndarray]:
    """Read a SMILES + targets CSV (plain or gzip).

    Returns ``(smiles, target_names, Y)`` with ``Y`` float64 ``[N, K]``, ``NaN`` for
    blank/missing cells. The SMILES column is ``smiles_column`` or the column named
    ``smiles`` (case-insensitive); targets are ``targets`` or every other column
    whose non-missing cells are all numeric.
    """
    path = Path(path)
    with _open_text(path) as f:
        rows = list(csv.reader(f))
    if not rows:
        raise ValueError(f"{path}: empty CSV")
    header, body = [h.strip() for h in rows[0]], [r for r in rows[1:] if r]
    lower = [h.lower() for h in header]
    want = (smiles_column or "smiles").lower()
    if want not in lower:
        raise KeyError(f"{path}: no SMILES column {smiles_column or 'smiles'!r} (columns: {header})")
    s_col = lower.index(want)
    for i, r in enumerate(body):
        if len(r) != len(header):
            raise ValueError(f"{path}: row {i + 2} has {len(r)} cells, header has {len(header)}")
    if targets is not None:
        cols = []
        for t in targets:
            if t not in header:
                raise KeyError(f"{path}: target column {t!r} not found (columns: {header})")
            cols.append(header.index(t))
    else:
        cols = [j for j in range(len(header)) if j != s_col]
    names, values = [], []
    for j in cols:
        vals = [_to_float(r[j]) for r in body]
        if any(v is None for v in vals):
            if targets is not None:
                raise ValueError(f"{path}: target column {header[j]!r} is not numeric")
            log.info("%s: skipping non-numeric column %r", path.name, header[j])
            continue
        names.append(header[j])
        values.append(vals)
    if not names:
        raise ValueError(f"{path}: no numeric target column")
    Y = np.asarray(values, dtype=np.float64).T.reshape(len(body), len(names))
    return [r[s_col].strip() for r in body], names, Y


def morgan_fingerprints(
    smiles: Sequence[str], radius: int = 2, n_bits: int = 2048, use_chirality: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Morgan (ECFP-like) bit fingerprints with RDKit.

    Returns ``(fps, valid)``: ``fps`` uint8 ``[N, n_bits]`` (zeros for invalid rows)
    and ``valid`` bool ``[N]`` (False where RDKit cannot parse the SMILES).
    """
    try:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import rdFingerprintGenerator
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("MoleculeDataModule needs RDKit: pip install rdkit") from e
    gen = rdFingerprintGenerator.GetMorganGenerator(
        radius=int(radius), fpSize=int(n_bits), includeChirality=bool(use_chirality)
    )
    fps = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    valid = np.zeros(len(smiles), dtype=bool)
    RDLogger.DisableLog("rdApp.*")
    try:
        for i, s in enumerate(smiles):
            mol = Chem.MolFromSmiles(s) if s else None
            if mol is None:
                continue
            fps[i] = gen.GetFingerprintAsNumPy(mol)
            valid[i] = True
    finally:
        RDLogger.EnableLog("rdApp.*")
    return fps, valid


def _murcko_scaffolds(smiles: Sequence[str]) -> list[str]:
    from rdkit import Chem, RDLogger
    from rdkit.Chem.Scaffolds import MurckoScaffold

    RDLogger.DisableLog("rdApp.*")
    try:
        out = []
        for s in smiles:
            mol = Chem.MolFromSmiles(s)
            out.append(MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False) if mol else "")
        return out
    finally:
        RDLogger.EnableLog("rdApp.*")


def _scaffold_split(
    scaffolds: Sequence[str], fractions: Sequence[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Balanced scaffold split (as in chemprop): whole scaffold groups go to one split;
    groups larger than half the val/test size go first (to train), the rest in seeded random order."""
    f = np.asarray(fractions, dtype=float) / float(np.sum(fractions))
    n = len(scaffolds)
    n_train, n_val = f[0] * n, f[1] * n
    groups: dict[str, list[int]] = {}
    for i, s in enumerate(scaffolds):
        groups.setdefault(s, []).append(i)
    sets = list(groups.values())
    rng = np.random.default_rng(seed)
    big = [s for s in sets if len(s) > f[1] * n / 2 or len(s) > f[2] * n / 2]
    small = [s for s in sets if not (len(s) > f[1] * n / 2 or len(s) > f[2] * n / 2)]
    order = [big[i] for i in rng.permutation(len(big))] + [small[i] for i in rng.permutation(len(small))]
    tr: list[int] = []
    va: list[int] = []
    te: list[int] = []
    for s in order:
        if len(tr) + len(s) <= n_train:
            tr += s
        elif len(va) + len(s) <= n_val:
            va += s
        else:
            te += s
    return np.asarray(tr, dtype=np.int64), np.asarray(va, dtype=np.int64), np.asarray(te, dtype=np.int64)


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


class MoleculeDataModule(_MultiTaskDataModule):
    """Multi-task molecular property prediction from a SMILES + targets CSV (MoleculeNet).

    Reads any CSV (plain or gzip) with a ``smiles`` column (case-insensitive, or
    ``smiles_column``) and numeric target columns (all of them, or ``targets``);
    blank cells are missing labels (``NaN``). Molecules are featurised to Morgan
    fingerprints with RDKit (``radius`` 2, ``n_bits`` 2048 = ECFP4) and the
    fingerprints are cached in ``cache_dir`` (default ``~/.cache/lightning_cost``
    or ``$LIGHTNING_COST_CACHE``) in a ``.npz`` keyed by the file's sha256 and the
    featuriser parameters, so later runs skip RDKit. SMILES that RDKit cannot
    parse are dropped (count logged, ``num_invalid``), as are rows without any label.

    ``task_type`` is ``"binary"`` if every present target is 0 or 1 (Tox21, SIDER,
    ClinTox, ToxCast), else ``"regression"`` (QM8); pass it to override. Regression
    targets are standardised with the train split's mean/std (``target_mean``,
    ``target_std``, also stored in each ``TaskSpec`` so that the MAE metric reports
    original units). Splits: seeded random (default 80/10/10) or ``split="scaffold"``
    (balanced Bemis-Murcko scaffold split).

    Why fingerprints and an MLP (:func:`benchmarks.models.fingerprint_mlp`) rather
    than a graph network: a GNN would need ``torch_geometric`` (or a hand-written
    message-passing layer) and is far slower per epoch on the project's 2-core
    CPU machines, while an ECFP + MLP model is a standard MoleculeNet baseline and
    keeps the shared-trunk/task-heads structure the multi-task methods need.
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        targets: Sequence[str] | None = None,
        task_type: str | None = None,
        batch_size: int = 128,
        seed: int = 0,
        *,
        smiles_column: str | None = None,
        radius: int = 2,
        n_bits: int = 2048,
        use_chirality: bool = False,
        split: str = "random",
        fractions: Sequence[float] = (0.8, 0.1, 0.1),
        standardize_targets: bool = True,
        drop_unlabelled: bool = True,
        cache_dir: str | os.PathLike | None = None,
        use_cache: bool = True,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        drop_last: bool | None = None,
    ) -> None:
        super().__init__(batch_size, eval_batch_size, num_workers, seed, pin_memory, drop_last)
        if task_type not in (None, "binary", "regression"):
            raise ValueError(f"task_type must be None, 'binary' or 'regression', got {task_type!r}")
        if split not in ("random", "scaffold"):
            raise ValueError(f"split must be 'random' or 'scaffold', got {split!r}")
        self.path = path
        self.targets = list(targets) if targets is not None else None
        self.task_type = task_type
        self.smiles_column = smiles_column
        self.radius, self.n_bits, self.use_chirality = int(radius), int(n_bits), bool(use_chirality)
        self.split = split
        self.fractions = tuple(fractions)
        self.standardize_targets = standardize_targets
        self.drop_unlabelled = drop_unlabelled
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir is not None else None
        self.use_cache = use_cache
        self.num_invalid = 0
        self.invalid_smiles: list[str] = []
        self.cache_file: Path | None = None
        self.cache_hit = False
        self.featurize_seconds = 0.0

    # -- featurisation with cache
    def _cache_path(self, digest: str, kind: str) -> Path:
        key = json.dumps(
            {
                "sha256": digest,
                "smiles_column": (self.smiles_column or "smiles").lower(),
                "radius": self.radius,
                "n_bits": self.n_bits,
                "chirality": self.use_chirality,
                "kind": kind,
                "v": 1,
            },
            sort_keys=True,
        )
        tag = hashlib.sha256(key.encode()).hexdigest()[:16]
        stem = self.file.name.split(".")[0]
        base = self.cache_dir or default_cache_dir()
        return base / f"{stem}-{kind}-r{self.radius}-b{self.n_bits}-{tag}.npz"

    def _featurize(self, smiles: list[str]) -> tuple[np.ndarray, np.ndarray]:
        t0 = time.perf_counter()
        cache = self._cache_path(_file_sha256(self.file), "morgan") if self.use_cache else None
        self.cache_file, self.cache_hit = cache, False
        if cache is not None and cache.is_file():
            try:
                with np.load(cache) as z:
                    packed, valid = z["fps"], z["valid"]
                if len(valid) == len(smiles):
                    fps = np.unpackbits(packed, axis=1, count=self.n_bits)
                    self.cache_hit = True
                    self.featurize_seconds = time.perf_counter() - t0
                    return fps, valid.astype(bool)
            except Exception as e:  # corrupt cache: recompute
                log.warning("ignoring unreadable fingerprint cache %s (%s)", cache, e)
        fps, valid = morgan_fingerprints(smiles, self.radius, self.n_bits, self.use_chirality)
        if cache is not None:
            try:
                _atomic_savez(cache, fps=np.packbits(fps, axis=1), valid=valid)
            except OSError as e:
                log.warning("could not write fingerprint cache %s (%s)", cache, e)
        self.featurize_seconds = time.perf_counter() - t0
        return fps, valid

    def _scaffolds(self, smiles: list[str]) -> list[str]:
        cache = self._cache_path(_file_sha256(self.file), "scaffold") if self.use_cache else None
        if cache is not None and cache.is_file():
            with np.load(cache) as z:
                sc = z["scaffolds"]
            if len(sc) == len(smiles):
                return [str(s) for s in sc]
        sc = _murcko_scaffolds(smiles)
        if cache is not None:
            try:
                _atomic_savez(cache, scaffolds=np.asarray(sc, dtype=str))
            except OSError as e:
                log.warning("could not write scaffold cache %s (%s)", cache, e)
        return sc

    def _build(self) -> None:
        self.file = resolve_data_path(self.path, "molecules/tox21.csv.gz", "molecules", (".csv.gz", ".csv"))
        smiles, names, Y = read_molecule_csv(self.file, self.smiles_column, self.targets)
        fps, valid = self._featurize(smiles)
        self.num_invalid = int((~valid).sum())
        self.invalid_smiles = [s for s, v in zip(smiles, valid, strict=True) if not v]
        if self.num_invalid:
            log.warning(
                "%s: dropped %d of %d molecules with invalid SMILES (e.g. %s)",
                self.file.name,
                self.num_invalid,
                len(smiles),
                self.invalid_smiles[:3],
            )
        keep = valid.copy()
        self.num_unlabelled = 0
        if self.drop_unlabelled:
            unl = valid & np.isnan(Y).all(1)
            self.num_unlabelled = int(unl.sum())
            if self.num_unlabelled:
                log.warning("%s: dropped %d molecules without any label", self.file.name, self.num_unlabelled)
            keep &= ~unl
        idx = np.flatnonzero(keep)
        self.row_index = idx  # row of the CSV (0-based, header excluded) of each kept molecule
        self.smiles = [smiles[i] for i in idx]
        X, Y = fps[idx].astype(np.float32), Y[idx]
        if len(idx) == 0:
            raise ValueError(f"{self.file}: no valid molecule")

        present = Y[~np.isnan(Y)]
        detected = "binary" if np.isin(present, (0.0, 1.0)).all() else "regression"
        kind = self.task_type or detected
        if kind == "binary" and detected != "binary":
            raise ValueError(f"{self.file}: task_type='binary' but targets are not all in {{0, 1, NaN}}")
        self.resolved_task_type = kind

        if self.split == "scaffold":
            tr, va, te = _scaffold_split(self._scaffolds(self.smiles), self.fractions, self.seed)
        else:
            tr, va, te = split_indices(len(idx), self.fractions, self.seed)
        self.split_idx = {"train": tr, "val": va, "test": te}

        task_names = _safe_task_names(names)
        self.target_names = names
        if kind == "regression":
            with np.errstate(all="ignore"):
                mean = np.nanmean(Y[tr], 0) if self.standardize_targets else np.zeros(Y.shape[1])
                std = np.nanstd(Y[tr], 0) if self.standardize_targets else np.ones(Y.shape[1])
            mean = np.where(np.isfinite(mean), mean, 0.0)
            std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
            Y = (Y - mean) / std
            self.target_mean, self.target_std = mean, std
            specs = [TaskSpec.regression(n, m, s) for n, m, s in zip(task_names, mean, std, strict=True)]
        else:
            self.target_mean = np.zeros(Y.shape[1])
            self.target_std = np.ones(Y.shape[1])
            specs = [TaskSpec.binary(n) for n in task_names]
        self._task_specs = tuple(specs)
        Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y.astype(np.float32))
        self.train_set = TensorDataset(Xt[tr], Yt[tr])
        self.val_set = TensorDataset(Xt[va], Yt[va])
        self.test_set = TensorDataset(Xt[te], Yt[te])
