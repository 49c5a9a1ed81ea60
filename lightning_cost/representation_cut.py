"""Per-task products in two stages, cut at the shared representation: the heads, then the trunk.

One batched vector-Jacobian product with the K one-hot cotangents pushes all K rows through every
head that reads the shared representation ``z``, although only head ``i`` depends on task ``i``:
with K heads that is ``K^2`` head backwards and ``K`` dense ``[K, *z.shape]`` cotangents summed at
``z``. When every task loss reaches the shared parameters only through ``z`` (the chain rule then
gives ``dL_i/dtheta = (dL_i/dz)(dz/dtheta)``), the same numbers come in two stages:

1. ``K`` small products, one per task loss ``L_i`` (a separate scalar, not a row of a stacked
   tensor), each through head ``i`` only: ``c_i = dL_i/dz`` and head ``i``'s own gradients;
2. one batched product from ``z`` with the cotangents ``[c_1, ..., c_K]`` through the trunk.

:func:`passes_only_through` checks the condition on the step's autograd graph, so a head that
reads a trunk feature besides ``z`` (skip connections, attention over trunk features) or a shared
weight used in a head keeps the one-stage product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.autograd.graph import get_gradient_edge

__all__ = ["passes_only_through", "reached_leaves", "head_products"]


def _edge(t: Tensor) -> tuple[object, int]:
    e = get_gradient_edge(t)
    return e.node, e.output_nr


def _walk(roots: Sequence[Tensor], cut: Sequence[Tensor]) -> tuple[set[object], set[tuple[object, int]]]:
    """The autograd nodes reachable from ``roots`` without crossing an edge of ``cut``, and the edges
    met on the way (a node with several outputs is crossed only through the cut's own output)."""
    stop = {_edge(t) for t in cut}
    nodes: set[object] = set()
    edges: set[tuple[object, int]] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None]
    while stack:
        node = stack.pop()
        if node in nodes:
            continue
        nodes.add(node)
        for nxt, nr in node.next_functions:
            if nxt is None or (nxt, nr) in stop:
                continue
            edges.add((nxt, nr))
            stack.append(nxt)
    return nodes, edges


def passes_only_through(losses: Sequence[Tensor], cut: Sequence[Tensor], shared: Sequence[Tensor],
                        marked: Sequence[Tensor] = ()) -> bool:
    """Whether every path of the graph from ``losses`` to a ``shared`` leaf crosses ``cut``, and no
    path reaches a ``marked`` tensor (one whose gradient is wanted) without crossing it."""
    if not cut or any(t.grad_fn is None for t in cut):
        return False
    nodes, edges = _walk(losses, cut)
    if any(get_gradient_edge(p).node in nodes for p in shared):
        return False
    return not any(_edge(t) in edges or t.grad_fn in nodes for t in marked if t.grad_fn is not None)


def reached_leaves(losses: Sequence[Tensor], cut: Sequence[Tensor], leaves: Sequence[Tensor]) -> list[bool]:
    """For each leaf, whether a path from ``losses`` reaches it without crossing ``cut`` (a head's own
    parameter); the others are reached through ``cut`` or not at all."""
    nodes, _ = _walk(losses, cut)
    return [get_gradient_edge(p).node in nodes for p in leaves]


def head_products(losses: Sequence[Tensor], inputs: Sequence[Tensor], scale: float = 1.0) -> list[list[Tensor | None]]:
    """Stage 1: ``dL_i/dx`` for each task loss and each of ``inputs`` (``None`` where ``L_i`` does not
    reach ``x``), one product per task; the graph is kept for stage 2."""
    out: list[list[Tensor | None]] = []
    for loss in losses:
        scaled = loss * scale if scale != 1.0 else loss
        out.append(list(torch.autograd.grad(scaled, list(inputs), retain_graph=True, allow_unused=True)))
    return out
