"""Multi-label tables (Mulan): every label of an ``X, Y`` ``.npz`` is a binary task."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import TensorDataset

from benchmarks.data.base import MultiTaskDataModule, resolve_data_path, safe_task_names, split_indices
from benchmarks.data.tasks import TaskSpec

__all__ = ["MultiLabelDataModule"]


class MultiLabelDataModule(MultiTaskDataModule):
    """Multi-label classification from an ``X, Y`` ``.npz`` (Mulan sets: Yeast, Emotions, ...).

    ``X`` ``[N, F]`` features, ``Y`` ``[N, K]`` in {0, 1}, optional ``labels`` ``[K]``
    (task names; ``label<k>`` otherwise). Seeded random split ``fractions``
    (default 60/20/20). ``X`` is standardised with the mean/std of the train
    split only (``x_mean``, ``x_std``). Targets float ``[B, K]``.

    Every label is a binary task evaluated by ROC-AUC: the labels are imbalanced
    (Yeast: 1.4% to 75% positives), so accuracy would mostly measure the
    majority class, while AUROC is threshold-free and insensitive to the base rate.
    A rare label may have no positive (or no negative) in a split; its ROC-AUC there is undefined
    and computes to NaN (:meth:`undefined_auroc_tasks` lists them; reports keep and mark them).
    """

    def __init__(
        self,
        path: str | os.PathLike | None = None,
        fractions: Sequence[float] = (0.6, 0.2, 0.2),
        batch_size: int = 64,
        seed: int = 0,
        *,
        standardize: bool = True,
        **loader: Any,
    ) -> None:
        super().__init__(batch_size, seed=seed, **loader)  # eval_batch_size, num_workers, ... (base class)
        self.path = path
        self.fractions = tuple(fractions)
        self.standardize = standardize
        self.split_idx: dict[str, np.ndarray] = {}

    def data_files(self) -> list[Path]:
        return [resolve_data_path(self.path, "multilabel/yeast.npz", "multilabel", (".npz",))]

    def _build(self) -> None:
        self.file = self.data_files()[0]
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
        self._task_specs = tuple(TaskSpec.binary(n) for n in safe_task_names(labels))
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


