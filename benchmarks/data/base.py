"""What every benchmark DataModule shares: where the data lives, splits, the loaders, file digests.

Data location
-------------
Each DataModule takes the path of its file(s). Without one it reads the project's
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

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.data.tasks import TaskSpec

__all__ = [
    "DATA_ENV_VAR",
    "CACHE_ENV_VAR",
    "LAYOUT",
    "MultiTaskDataModule",
    "default_data_root",
    "default_cache_dir",
    "file_sha256",
    "resolve_data_path",
    "safe_task_names",
    "split_indices",
]

log = logging.getLogger(__name__)

DATA_ENV_VAR = "LIGHTNING_COST_DATA"
CACHE_ENV_VAR = "LIGHTNING_COST_CACHE"

LAYOUT = (
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
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def default_cache_dir() -> Path:
    """``$LIGHTNING_COST_CACHE`` if set, else ``~/.cache/lightning_cost``."""
    env = os.environ.get(CACHE_ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "lightning_cost"


_DIGESTS: dict[tuple[str, int, int], str] = {}


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's content, read once per ``(path, size, mtime)``.

    Digests are kept in memory and in ``<cache dir>/sha256.json``, so a later process does not read an
    unchanged file again; a file whose size or modification time changed is hashed anew.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    if key in _DIGESTS:
        return _DIGESTS[key]
    store = default_cache_dir() / "sha256.json"
    try:
        table = json.loads(store.read_text())
    except (OSError, ValueError):
        table = {}
    entry = table.get(str(p), {})
    if entry.get("size") == st.st_size and entry.get("mtime_ns") == st.st_mtime_ns:
        _DIGESTS[key] = entry["sha256"]
        return entry["sha256"]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    _DIGESTS[key] = h.hexdigest()
    table[str(p)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _DIGESTS[key]}
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f".{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(table, indent=0))
        os.replace(tmp, store)
    except OSError as e:
        log.warning("could not write the digest cache %s (%s)", store, e)
    return _DIGESTS[key]


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
    raise FileNotFoundError(f"data file not found; tried:\n{tried}\n{LAYOUT}")


def safe_task_names(names: Sequence[str]) -> list[str]:
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


class MultiTaskDataModule(L.LightningDataModule):
    """Shared loader logic; subclasses implement ``_build()`` setting the datasets and specs.

    Loader settings (every subclass takes them as keywords): ``eval_batch_size`` (default: the larger of
    ``batch_size`` and 512), ``num_workers``, ``pin_memory``, ``drop_last`` (``None``: drop a last training
    batch of one sample, which breaks BatchNorm).
    """

    def __init__(
        self,
        batch_size: int,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        pin_memory: bool = False,
        drop_last: bool | None = None,
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

    def data_files(self) -> list[Path]:
        """The files (or folders) the data is read from, resolved without loading them: the runner's
        cache key holds their content digest."""
        return []

    def undefined_auroc_tasks(self) -> dict[str, list[str]]:
        """Per split, the binary tasks whose present labels are all one class there: their ROC-AUC is
        undefined (the metric computes to NaN), which reports must say rather than drop."""
        out: dict[str, list[str]] = {}
        for split, ds in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)):
            if not isinstance(ds, TensorDataset):
                continue
            y = ds.tensors[1]
            bad = []
            for k, spec in enumerate(self.task_specs):
                col = y[:, k]
                present = col[~torch.isnan(col)] if col.is_floating_point() else col
                if spec.kind == "binary" and torch.unique(present).numel() < 2:
                    bad.append(spec.name)
            if bad:
                out[split] = bad
        return out

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


