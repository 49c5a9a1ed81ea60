"""What the paper's DataModules share: where their data lives and their base class."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.data.base import DATA_ENV_VAR, MultiTaskDataModule, default_data_root

__all__ = ["resolve_root"]

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

