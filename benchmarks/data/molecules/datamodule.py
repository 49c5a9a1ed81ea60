"""The molecules' DataModule: a SMILES + targets CSV featurised (with a cache), split and standardised."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from benchmarks.data.base import (
    MultiTaskDataModule,
    default_cache_dir,
    file_sha256,
    resolve_data_path,
    safe_task_names,
    split_indices,
)
from benchmarks.data.molecules.features import _murcko_scaffolds, _scaffold_split, morgan_fingerprints
from benchmarks.data.molecules.table import most_labelled_columns, read_molecule_csv
from benchmarks.data.tasks import TaskSpec

__all__ = ["MoleculeDataModule"]

log = logging.getLogger(__name__)


def _atomic_savez(path: Path, **arrays) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)



class MoleculeDataModule(MultiTaskDataModule):
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
    (balanced Bemis-Murcko scaffold split). ``top_k_targets`` keeps the ``k`` target
    columns with the most present labels (ToxCast's 617 assays -> its 40 most-labelled).

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
        top_k_targets: int | None = None,
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
        **loader: Any,
    ) -> None:
        super().__init__(batch_size, seed=seed, **loader)  # eval_batch_size, num_workers, ... (base class)
        if task_type not in (None, "binary", "regression"):
            raise ValueError(f"task_type must be None, 'binary' or 'regression', got {task_type!r}")
        if split not in ("random", "scaffold"):
            raise ValueError(f"split must be 'random' or 'scaffold', got {split!r}")
        if top_k_targets is not None and top_k_targets < 1:
            raise ValueError(f"top_k_targets must be a positive number of columns, got {top_k_targets}")
        self.path = path
        self.top_k_targets = top_k_targets
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
        cache = self._cache_path(file_sha256(self.file), "morgan") if self.use_cache else None
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
        cache = self._cache_path(file_sha256(self.file), "scaffold") if self.use_cache else None
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

    def data_files(self) -> list[Path]:
        return [resolve_data_path(self.path, "molecules/tox21.csv.gz", "molecules", (".csv.gz", ".csv"))]

    def _kept_rows(self, smiles: list[str], Y: np.ndarray, valid: np.ndarray) -> np.ndarray:
        """Rows kept: parsable SMILES with at least one label (``drop_unlabelled``); counts logged."""
        self.num_invalid = int((~valid).sum())
        self.invalid_smiles = [s for s, v in zip(smiles, valid, strict=True) if not v]
        if self.num_invalid:
            log.warning("%s: dropped %d of %d molecules with invalid SMILES (e.g. %s)", self.file.name,
                        self.num_invalid, len(smiles), self.invalid_smiles[:3])
        keep = valid.copy()
        self.num_unlabelled = 0
        if self.drop_unlabelled:
            unl = valid & np.isnan(Y).all(1)
            self.num_unlabelled = int(unl.sum())
            if self.num_unlabelled:
                log.warning("%s: dropped %d molecules without any label", self.file.name, self.num_unlabelled)
            keep &= ~unl
        return np.flatnonzero(keep)

    def _task_kind(self, Y: np.ndarray) -> str:
        present = Y[~np.isnan(Y)]
        detected = "binary" if np.isin(present, (0.0, 1.0)).all() else "regression"
        kind = self.task_type or detected
        if kind == "binary" and detected != "binary":
            raise ValueError(f"{self.file}: task_type='binary' but targets are not all in {{0, 1, NaN}}")
        return kind

    def _specs(self, kind: str, names: list[str], Y: np.ndarray, tr: np.ndarray) -> tuple[list[TaskSpec], np.ndarray]:
        """Task specs and the targets, regression ones standardised with the train split's statistics."""
        task_names = safe_task_names(names)
        if kind != "regression":
            self.target_mean, self.target_std = np.zeros(Y.shape[1]), np.ones(Y.shape[1])
            return [TaskSpec.binary(n) for n in task_names], Y
        with np.errstate(all="ignore"):
            mean = np.nanmean(Y[tr], 0) if self.standardize_targets else np.zeros(Y.shape[1])
            std = np.nanstd(Y[tr], 0) if self.standardize_targets else np.ones(Y.shape[1])
        mean = np.where(np.isfinite(mean), mean, 0.0)
        std = np.where(np.isfinite(std) & (std > 1e-12), std, 1.0)
        self.target_mean, self.target_std = mean, std
        specs = [TaskSpec.regression(n, m, s) for n, m, s in zip(task_names, mean, std, strict=True)]
        return specs, (Y - mean) / std

    def _build(self) -> None:
        self.file = self.data_files()[0]
        smiles, names, Y = read_molecule_csv(self.file, self.smiles_column, self.targets)
        if self.top_k_targets is not None and self.top_k_targets < len(names):
            cols = most_labelled_columns(Y, self.top_k_targets)
            names, Y = [names[j] for j in cols], Y[:, cols]
        fps, valid = self._featurize(smiles)
        idx = self._kept_rows(smiles, Y, valid)
        if len(idx) == 0:
            raise ValueError(f"{self.file}: no valid molecule")
        self.row_index = idx  # row of the CSV (0-based, header excluded) of each kept molecule
        self.smiles = [smiles[i] for i in idx]
        X, Y = fps[idx].astype(np.float32), Y[idx]
        self.resolved_task_type = kind = self._task_kind(Y)
        if self.split == "scaffold":
            tr, va, te = _scaffold_split(self._scaffolds(self.smiles), self.fractions, self.seed)
        else:
            tr, va, te = split_indices(len(idx), self.fractions, self.seed)
        self.split_idx = {"train": tr, "val": va, "test": te}
        self.target_names = names
        specs, Y = self._specs(kind, names, Y, tr)
        self._task_specs = tuple(specs)
        Xt, Yt = torch.from_numpy(X), torch.from_numpy(Y.astype(np.float32))
        self.train_set = TensorDataset(Xt[tr], Yt[tr])
        self.val_set = TensorDataset(Xt[va], Yt[va])
        self.test_set = TensorDataset(Xt[te], Yt[te])
