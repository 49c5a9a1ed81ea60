"""Scale labels: which free scale multiplies each element of a tensor.

Every channel a rescalable layer produces gets a fresh integer label; label ``FIXED`` (0) is the
scale that must stay 1. A tensor's labels are an integer array broadcastable to the tensor (size 1
along every axis where they do not vary: a conv output's labels have shape ``[1, C, 1, 1]``), or
``None`` when nothing in it is rescaled. Constraints between labels (a residual sum needs one scale
on both inputs; a tanh needs scale 1) are unions in a :class:`UnionFind` over the labels.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FIXED", "UnionFind", "along_axis", "compress", "padded"]

FIXED = 0


class UnionFind:
    """Disjoint sets of labels; label ``FIXED`` is always the representative of its set."""

    def __init__(self) -> None:
        self._parent: list[int] = [FIXED]

    def new(self, count: int) -> np.ndarray:
        """``count`` fresh labels, each in its own set."""
        start = len(self._parent)
        self._parent.extend(range(start, start + count))
        return np.arange(start, start + count, dtype=np.int64)

    def _find(self, label: int) -> int:
        parent = self._parent
        while parent[label] != label:
            parent[label] = parent[parent[label]]
            label = parent[label]
        return label

    def union(self, a: np.ndarray, b: np.ndarray | int) -> None:
        """Unite ``a[i]`` with ``b[i]`` elementwise (``a`` and ``b`` broadcast)."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        pairs = np.unique(np.stack([a.ravel(), b.ravel()], axis=1), axis=0)
        for x, y in pairs[pairs[:, 0] != pairs[:, 1]].tolist():
            rx, ry = self._find(x), self._find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def unite_rows(self, rows: np.ndarray) -> None:
        """Put all labels of each row of a 2-D array in one set."""
        self.union(rows, rows[:, :1])

    def fix(self, labels: np.ndarray) -> None:
        """Tie ``labels`` to scale 1."""
        self.union(labels, FIXED)

    def roots(self) -> np.ndarray:
        """The representative of every label, as an array indexed by label."""
        root = np.asarray(self._parent, dtype=np.int64)
        while True:
            nxt = root[root]
            if np.array_equal(nxt, root):
                return root
            root = nxt


def padded(labels: np.ndarray, ndim: int) -> np.ndarray:
    """``labels`` with leading size-1 axes up to ``ndim`` axes (numpy/torch broadcasting)."""
    return labels.reshape((1,) * (ndim - labels.ndim) + labels.shape)


def compress(labels: np.ndarray | None) -> np.ndarray | None:
    """Shrink every axis along which the labels are constant to size 1; ``None`` if all are FIXED."""
    if labels is None:
        return None
    labels = np.asarray(labels, dtype=np.int64)
    if not labels.any():
        return None
    for axis in range(labels.ndim):
        first = labels.take([0], axis=axis)
        if labels.shape[axis] > 1 and (labels == first).all():
            labels = first
    return np.ascontiguousarray(labels)


def along_axis(labels: np.ndarray, ndim: int, axis: int) -> np.ndarray | None:
    """The 1-D labels along ``axis`` of an ``ndim``-D tensor, or ``None`` if they also vary elsewhere."""
    full = padded(labels, ndim)
    axis %= ndim
    if any(size != 1 for d, size in enumerate(full.shape) if d != axis):
        return None
    return full.reshape(-1)
