"""A SMILES + targets CSV (plain or gzip) read into arrays, and the target columns with the most labels."""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = ["read_molecule_csv", "most_labelled_columns"]

log = logging.getLogger(__name__)

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


def _numeric_column(cells: Sequence[str]) -> np.ndarray | None:
    """A column's cells as float64 (``NaN`` for a missing value), or ``None`` if a cell is not numeric.
    Each distinct cell is parsed once (label columns hold a handful of distinct strings)."""
    parsed = {c: _to_float(c) for c in set(cells)}
    if any(v is None for v in parsed.values()):
        return None
    return np.fromiter((parsed[c] for c in cells), dtype=np.float64, count=len(cells))


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
    columns = list(zip(*body, strict=True)) if body else [()] * len(header)  # rows checked equal-length above
    for j in cols:
        vals = _numeric_column(columns[j])
        if vals is None:
            if targets is not None:
                raise ValueError(f"{path}: target column {header[j]!r} is not numeric")
            log.info("%s: skipping non-numeric column %r", path.name, header[j])
            continue
        names.append(header[j])
        values.append(vals)
    if not names:
        raise ValueError(f"{path}: no numeric target column")
    Y = np.stack(values, axis=1) if body else np.zeros((0, len(names)))
    return [r[s_col].strip() for r in body], names, Y



def most_labelled_columns(Y: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` columns of ``Y`` with the most present (non-NaN) labels, in column order.

    Ties (ToxCast: 57 assays share the largest count) go to the column whose rarer class has more
    labels (for binary 0/1 labels, ``min(#1, #0)``: the assays whose ROC-AUC is best defined), then to
    the earlier column."""
    present = ~np.isnan(Y)
    counts = present.sum(0)
    ones = np.where(present, Y == 1, False).sum(0)
    rarer = np.minimum(ones, counts - ones)
    order = np.lexsort((np.arange(Y.shape[1]), -rarer, -counts))[: int(k)]
    return np.sort(order)
