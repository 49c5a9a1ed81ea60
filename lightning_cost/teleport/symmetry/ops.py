"""How scale labels cross the parameter-free operations of a traced graph.

Each rule takes the propagator (:class:`~lightning_cost.teleport.symmetry.graph.LabelPropagator`),
the fx node and the node's example value, and returns the labels of the node's output. An operation
``f`` passes a scale on when ``f(a * x) = a * f(x)`` for every ``a > 0`` applied channelwise:

* pointwise positively homogeneous maps (ReLU, LeakyReLU, dropout, identity, dtype casts);
* pooling and resampling within a channel (max/avg/adaptive pooling, max-unpooling, interpolation),
  when the labels do not vary over the pooled axes;
* pure data movement (view, reshape, flatten, permute, cat, getitem, ...): the op is replayed on a
  tensor of element indices, so each output element takes the label of the input element it came
  from, whatever the op's arguments;
* sums ``x + y`` of two rescaled tensors, which tie the two inputs' labels elementwise;
* products and quotients by an unrescaled tensor or a number, and reductions (mean, sum, amax, amin)
  over axes along which the labels are constant.

Anything else that reads a rescaled tensor fixes its labels (scale 1): see ``LabelPropagator.unknown``.
"""

from __future__ import annotations

import builtins
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, fx

from lightning_cost.teleport.symmetry.labels import compress, padded

__all__ = ["FUNCTION_RULES", "METHOD_RULES", "Rule", "move", "pointwise", "pool"]

Rule = Callable[[Any, fx.Node, Any], Any]


def _operand(node: fx.Node, position: int, keyword: str) -> Any:
    if len(node.args) > position:
        return node.args[position]
    return node.kwargs.get(keyword)


def pointwise(prop, node: fx.Node, value: Any) -> np.ndarray | None:
    """A positively homogeneous pointwise map of its first argument: the labels pass unchanged.

    A cast to a non-floating dtype rounds, so it is not homogeneous: the labels are fixed.
    """
    if not (isinstance(value, Tensor) and value.is_floating_point()):
        return prop.unknown(node)
    return prop.label(node.args[0])


def pool(spatial: int | None) -> Rule:
    """Pooling/resampling within each channel over the last ``spatial`` axes (``None``: all but N, C)."""

    def rule(prop, node: fx.Node, value: Any) -> Any:
        labels, x = prop.label(node.args[0]), prop.value(node.args[0])
        if labels is None:
            return None
        k = x.ndim - 2 if spatial is None else spatial
        full = padded(labels, x.ndim)
        if k > 0 and any(size != 1 for size in full.shape[-k:]):
            prop.fix(labels, f"'{node.name}' pools over axes along which the scales vary")
            return None
        return (full, None) if isinstance(value, tuple) else full

    return rule


def _index_tensors(prop, sources: list[Any]) -> tuple[list[Any], np.ndarray]:
    """Element-index stand-ins for the tensors in ``sources`` and the labels of every index."""
    stand_ins, labels, offset = [], [], 0
    for source in sources:
        value = prop.value(source)
        if not isinstance(value, Tensor):
            stand_ins.append(value)
            continue
        stand_ins.append(torch.arange(offset, offset + value.numel(), device=value.device).reshape(value.shape))
        own = prop.label(source)
        full = np.zeros(value.shape, np.int64) if own is None else np.broadcast_to(padded(own, value.ndim), value.shape)
        labels.append(full.reshape(-1))
        offset += value.numel()
    return stand_ins, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def move(multi: bool = False) -> Rule:
    """Pure data movement; ``multi``: the first argument is a sequence of tensors (cat, stack)."""

    def rule(prop, node: fx.Node, value: Any) -> Any:
        sources = list(cast(Sequence[Any], node.args[0])) if multi else [node.args[0]]
        stand_ins, labels = _index_tensors(prop, sources)
        first = stand_ins if multi else stand_ins[0]
        rest = fx.node.map_arg(tuple(node.args[1:]), prop.value)
        kwargs = fx.node.map_arg(dict(node.kwargs), prop.value)
        if node.op == "call_method":
            moved = getattr(first, str(node.target))(*rest, **kwargs)
        elif node.op == "call_module":
            moved = prop.module(node)(first, *rest, **kwargs)
        else:
            moved = cast(Callable[..., Any], node.target)(first, *rest, **kwargs)

        def labels_of(m: Any) -> Any:
            return compress(labels[m.cpu().numpy()]) if isinstance(m, Tensor) else None

        return fx.node.map_aggregate(moved, labels_of)

    return rule


def add(prop, node: fx.Node, value: Any) -> np.ndarray | None:
    """``x + y`` / ``x - y``: both rescaled -> one scale elementwise; else a rescaled side is fixed."""
    a, b = node.args[0], _operand(node, 1, "other")
    la, lb = prop.label(a), prop.label(b)
    if la is None and lb is None:
        return None
    if not isinstance(value, Tensor):
        return prop.unknown(node)
    scaled, other = (a, b) if la is not None else (b, a)
    if la is not None and lb is not None:
        ndim = value.ndim
        pa, pb = np.broadcast_arrays(padded(la, ndim), padded(lb, ndim))
        prop.uf.union(pa, pb)
        return compress(pa)
    if isinstance(other, numbers.Number) and other == 0:
        return prop.label(scaled)
    prop.fix(prop.label(scaled), f"'{node.name}' adds a tensor that is not rescaled the same way")
    return None


def scale(divide: bool) -> Rule:
    """``x * m`` (or ``x / m``) with ``m`` a number or a tensor that is not rescaled: labels pass."""

    def rule(prop, node: fx.Node, value: Any) -> Any:
        if divide and node.kwargs.get("rounding_mode") is not None:
            return prop.unknown(node)
        a, b = node.args[0], _operand(node, 1, "other")
        la, lb = prop.label(a), prop.label(b)
        if lb is not None and (divide or la is not None) or not isinstance(value, Tensor):
            return prop.unknown(node)
        labels = la if la is not None else lb
        return compress(padded(labels, value.ndim))

    return rule


def reduce(prop, node: fx.Node, value: Any) -> np.ndarray | None:
    """mean/sum/amax/amin over axes along which the labels are constant."""
    labels, x = prop.label(node.args[0]), prop.value(node.args[0])
    dim = prop.value(_operand(node, 1, "dim"))
    keepdim = bool(prop.value(_operand(node, 2, "keepdim")) or False)
    if labels is None:
        return None
    if not isinstance(dim, (int, tuple, list, type(None))) or not isinstance(value, Tensor):
        return prop.unknown(node)
    full = padded(labels, x.ndim)
    every = dim is None or isinstance(dim, (tuple, list)) and len(dim) == 0
    dims = tuple(range(x.ndim)) if every else tuple(int(d) % x.ndim for d in np.atleast_1d(cast(Any, dim)))
    if any(full.shape[d] != 1 for d in dims):
        prop.fix(labels, f"'{node.name}' reduces over axes along which the scales vary")
        return None
    return compress(full if keepdim else full.reshape([s for d, s in enumerate(full.shape) if d not in dims]))


def getitem(prop, node: fx.Node, value: Any) -> Any:
    """``x[index]``: data movement on a tensor; on a tuple/list/dict, the labels of the item."""
    if isinstance(prop.value(node.args[0]), Tensor):
        return _MOVE(prop, node, value)
    labels = prop.label(node.args[0])
    return None if labels is None else labels[prop.value(node.args[1])]


def shape_query(prop, node: fx.Node, value: Any) -> None:
    """size(), dim(), ``.shape``, ...: a value that does not depend on the scales."""
    return None


def attribute(prop, node: fx.Node, value: Any) -> Any:
    """``getattr(x, name)``: metadata passes nothing; anything else is unknown."""
    if node.args[1] in {"shape", "dtype", "device", "ndim", "is_cuda", "requires_grad", "layout"}:
        return None
    return prop.unknown(node)


_MOVE = move()


def _by_name(names: str, rule: Rule) -> dict[str, Rule]:
    return {name: rule for name in names.split()}


_MOVE_NAMES = (
    "view reshape flatten unflatten permute transpose t squeeze unsqueeze narrow select expand expand_as "
    "view_as reshape_as chunk split tensor_split unbind movedim swapaxes flip roll repeat tile unfold"
)

METHOD_RULES: dict[str, Rule] = {
    **_by_name("relu relu_ contiguous clone float double half bfloat16 to type_as detach neg neg_", pointwise),
    **_by_name(_MOVE_NAMES, move()),
    **_by_name("add add_ sub sub_", add),
    **_by_name("mul mul_", scale(divide=False)),
    **_by_name("div div_ true_divide", scale(divide=True)),
    **_by_name("mean sum amax amin", reduce),
    **_by_name("size dim numel nelement ndimension get_device", shape_query),
}

_POOLS_BY_RANK = {
    1: (F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d, F.max_unpool1d),
    2: (F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.max_unpool2d),
    3: (F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d, F.max_unpool3d),
}

FUNCTION_RULES: dict[Any, Rule] = {
    **{f: pointwise for f in (F.relu, F.relu_, torch.relu, torch.relu_, F.leaky_relu, F.leaky_relu_,
                              F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.neg, operator.neg,
                              operator.pos, torch.clone)},
    **{f: pool(rank) for rank, fs in _POOLS_BY_RANK.items() for f in fs},
    F.interpolate: pool(None),
    **{f: move() for f in (torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze,
                           torch.unsqueeze, torch.narrow, torch.select, torch.chunk, torch.split,
                           torch.movedim, torch.flip, torch.roll, torch.tile,
                           F.pixel_shuffle, F.pixel_unshuffle)},
    **{f: move(multi=True) for f in (torch.cat, torch.concat, torch.stack)},
    **{f: add for f in (operator.add, operator.iadd, operator.sub, operator.isub, torch.add, torch.sub)},
    **{f: scale(divide=False) for f in (operator.mul, operator.imul, torch.mul)},
    **{f: scale(divide=True) for f in (operator.truediv, operator.itruediv, torch.div, torch.true_divide)},
    **{f: reduce for f in (torch.mean, torch.sum, torch.amax, torch.amin)},
    builtins.getattr: attribute,
    operator.getitem: getitem,
}

