"""QM9 as a DataModule, through PyTorch Geometric: the targets, the complete graphs and the split.

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

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.data.tasks import TaskSpec
from benchmarks.paper.data.base import _HOW, _limit, _PaperDataModule, resolve_root
from benchmarks.paper.data.lazy import _lazy_class

__all__ = ["QM9DataModule", "QM9_TARGETS", "QM9_NAMES", "QM9_EV", "QM9Transform", "GraphCollate"]

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

