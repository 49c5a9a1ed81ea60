"""Which channels of a traced network can be rescaled, and which parameters each scale touches.

:class:`LabelPropagator` walks an fx graph whose nodes carry example values
(:func:`~lightning_cost.teleport.symmetry.trace.trace_with_values`) and labels every tensor with the
free scales multiplying its elements (:mod:`~lightning_cost.teleport.symmetry.labels`):

* a **producer** (``Linear``, ``Conv1d/2d/3d`` with ``groups == 1``, the affine of
  ``BatchNorm``/``InstanceNorm``/``LayerNorm``/``GroupNorm``/``RMSNorm``) whose parameters are all
  among the rescalable ones gives each output channel a fresh label: its weight row and bias entry
  are multiplied by the scale ``a_j``;
* a **consumer** (the same ``Linear``/``Conv``) divides its input columns by the scale of the input
  channel they read (``1 / a_j``), so its output no longer depends on ``a``;
* with ``normalized=True`` a normalisation **absorbs** the scales of its input: per channel for
  BatchNorm/InstanceNorm (the running statistics follow: ``mean * a``, ``var * a**2``), one scale per
  normalised slice for LayerNorm/GroupNorm/RMSNorm;
* parameter-free ops pass labels on or constrain them (:mod:`~lightning_cost.teleport.symmetry.ops`);
  any other reader of a rescaled tensor -- an unknown op, a layer with parameters outside the
  rescalable set, the traced module's output -- **fixes** its labels to scale 1.

If ``L(T theta) = L(theta)`` for the diagonal ``T`` this builds, per-task gradients transform as
``grad L(T theta) = T^{-1} grad L(theta)`` (the gradient of the loss-invariant map, cf. the
paper's eq. 1 group action).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import numpy as np
from torch import Tensor, fx, nn

from lightning_cost.teleport.symmetry.labels import UnionFind, along_axis, compress, padded
from lightning_cost.teleport.symmetry.ops import FUNCTION_RULES, METHOD_RULES, move, pointwise, pool
from lightning_cost.teleport.symmetry.trace import MISSING, VALUE_KEY

__all__ = ["Binding", "LabelPropagator", "Propagation"]

_CONVS: dict[type[nn.Module], int] = {nn.Conv1d: 1, nn.Conv2d: 2, nn.Conv3d: 3}
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_INSTANCE_NORMS: dict[type[nn.Module], int] = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}
_SLICE_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
_POINTWISE_MODULES = (nn.ReLU, nn.LeakyReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.Identity)
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.PixelShuffle, nn.PixelUnshuffle, nn.ChannelShuffle)
_POOL_MODULES: dict[type[nn.Module], int] = {
    **{m: 1 for m in (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d, nn.MaxUnpool1d)},
    **{m: 2 for m in (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d, nn.MaxUnpool2d)},
    **{m: 3 for m in (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d, nn.MaxUnpool3d)},
}


@dataclass
class Binding:
    """``tensor`` is multiplied by ``prod(a[labels] ** power)``; ``labels`` broadcast to its shape."""

    tensor: Tensor
    power: int
    labels: np.ndarray


@dataclass
class Propagation:
    """What :meth:`LabelPropagator.run` found; label ``l``'s scale is that of ``roots[l]``."""

    roots: np.ndarray
    params: list[Binding]
    buffers: list[Binding]
    producers: list[tuple[str, np.ndarray]]
    consumers: list[tuple[str, np.ndarray]]
    absorbed: list[np.ndarray]
    fixes: list[str] = field(default_factory=list)


def _arrays(structure: Any) -> list[np.ndarray]:
    found: list[np.ndarray] = []
    fx.node.map_aggregate(structure, lambda v: found.append(v) if isinstance(v, np.ndarray) else None)
    return found


class LabelPropagator:
    """Label propagation over one traced graph (module docstring)."""

    def __init__(self, root: nn.Module, params: Sequence[Tensor], normalized: bool) -> None:
        self.root = root
        self.normalized = normalized
        self.uf = UnionFind()
        self._rescalable = {id(p) for p in params}
        self._labels: dict[fx.Node, Any] = {}
        self._params: dict[tuple[int, str], Binding] = {}
        self._buffers: dict[tuple[int, str], Binding] = {}
        self._raw: set[int] = set()
        self._producers: list[tuple[str, np.ndarray]] = []
        self._consumers: list[tuple[str, np.ndarray]] = []
        self._absorbed: list[np.ndarray] = []
        self._fixes: list[str] = []

    # ------------------------------------------------------------------ driver
    def run(self, graph: fx.Graph) -> Propagation:
        for node in graph.nodes:
            try:
                self._labels[node] = self._transfer(node)
            except Exception as e:  # a rule that cannot handle this use: treat the op as unknown
                self.unknown(node, f"'{node.name}' could not be analysed ({e})")
                self._labels[node] = None
        for (tid, _), binding in [*self._params.items(), *self._buffers.items()]:
            if tid in self._raw:
                self.fix(binding.labels, "a rescaled parameter is also used outside its layer")
        return Propagation(
            self.uf.roots(), list(self._params.values()), list(self._buffers.values()),
            self._producers, self._consumers, self._absorbed, self._fixes,
        )

    def _transfer(self, node: fx.Node) -> Any:
        if node.op == "placeholder":
            return None
        if node.op == "get_attr":
            self._note_raw_attribute(str(node.target))
            return None
        if node.op == "output":
            self.fix(self.label(node.args), "the traced module's output")
            return None
        value = node.meta.get(VALUE_KEY, MISSING)
        if node.op == "call_module":
            return self._call_module(node, value)
        if not _arrays((self.label(node.args), self.label(node.kwargs))):
            return None
        rule = METHOD_RULES.get(str(node.target)) if node.op == "call_method" else FUNCTION_RULES.get(node.target)
        if rule is None or value is MISSING:
            return self.unknown(node)
        return rule(self, node, value)

    # ------------------------------------------------------------------ helpers for the rules
    def label(self, arg: Any) -> Any:
        """The labels of a node argument (mirroring its structure); ``None`` for constants."""
        if isinstance(arg, fx.Node):
            return self._labels.get(arg)
        if isinstance(arg, (tuple, list, dict)):
            return fx.node.map_aggregate(arg, lambda v: self._labels.get(v) if isinstance(v, fx.Node) else None)
        return None

    def value(self, arg: Any) -> Any:
        """The example value of a node argument (constants as they are)."""
        return fx.node.map_arg(arg, lambda n: n.meta.get(VALUE_KEY, MISSING))

    def module(self, node: fx.Node) -> nn.Module:
        return self.root.get_submodule(str(node.target))

    def fix(self, labels: Any, reason: str) -> None:
        """Tie every label in ``labels`` (any structure) to scale 1, noting why."""
        arrays = _arrays(labels)
        for array in arrays:
            self.uf.fix(array)
        if arrays and reason not in self._fixes:
            self._fixes.append(reason)

    def unknown(self, node: fx.Node, reason: str | None = None) -> None:
        """An op that is not rescaling-compatible: it fixes everything it reads, outputs no scale."""
        if node.op == "call_module":
            module = self.module(node)
            self._raw.update(id(p) for p in module.parameters())
            where, what = node.target, type(module).__name__
        else:
            where, what = node.name, getattr(node.target, "__name__", str(node.target))
        self.fix((self.label(node.args), self.label(node.kwargs)), reason or f"'{where}' ({what})")
        return None

    def _note_raw_attribute(self, target: str) -> None:
        value: Any = self.root
        for atom in target.split("."):
            value = getattr(value, atom, None)
        if isinstance(value, Tensor):
            self._raw.add(id(value))

    # ------------------------------------------------------------------ modules
    def _call_module(self, node: fx.Node, value: Any) -> Any:
        module = self.module(node)
        kind = type(module)
        has_input = bool(_arrays(self.label(node.args)))
        if kind in _POINTWISE_MODULES or kind in _POOL_MODULES or kind in _MOVE_MODULES or kind is nn.Upsample:
            if not has_input:
                return None
            if value is MISSING:
                return self.unknown(node)
            rule = pointwise if kind in _POINTWISE_MODULES else move() if kind in _MOVE_MODULES \
                else pool(_POOL_MODULES.get(kind))
            return rule(self, node, value)
        x = self.value(node.args[0]) if node.args else MISSING
        owned = self._owns(module)
        if not owned or not isinstance(x, Tensor) or not isinstance(value, Tensor) or len(node.args) != 1:
            return self.unknown(node, f"'{node.target}' ({kind.__name__}) has parameters outside the rescaled set"
                                if not owned else None)
        if kind is nn.Linear or (kind in _CONVS and module.groups == 1):
            return self._linear_layer(node, module, x, value)
        if kind in _BATCH_NORMS or kind in _INSTANCE_NORMS:
            axis = 1 if kind in _BATCH_NORMS else x.ndim - _INSTANCE_NORMS[kind] - 1
            return self._channel_norm(node, module, x, value, axis)
        if kind in _SLICE_NORMS:
            return self._slice_norm(node, module, x, value)
        return self.unknown(node)

    def _owns(self, module: nn.Module) -> bool:
        """Every parameter of ``module``, and its ``weight``/``bias`` whatever they are, is rescalable."""
        tensors = [*module.parameters(recurse=False), getattr(module, "weight", None), getattr(module, "bias", None)]
        return all(id(t) in self._rescalable for t in tensors if t is not None)

    def _linear_layer(self, node: fx.Node, module: nn.Module, x: Tensor, value: Tensor) -> np.ndarray | None:
        """Linear/Conv: consumer of its input channels, producer of its output channels."""
        spatial = _CONVS.get(type(module), 0)
        name = str(node.target)
        self._consume(name, cast(Tensor, module.weight), self.label(node.args[0]), x.ndim, x.ndim - spatial - 1)
        return self._produce(name, module, value.ndim, value.ndim - spatial - 1, leading=1)

    def _channel_norm(self, node: fx.Node, module: nn.Module, x: Tensor, value: Tensor, axis: int):
        """BatchNorm/InstanceNorm: absorbs per-channel input scales, produces through its affine."""
        name, labels = str(node.target), self.label(node.args[0])
        if labels is not None and not self.normalized:
            self.fix(labels, f"'{name}' ({type(module).__name__}) normalises it (normalized=False)")
        elif self.normalized:
            channels = None if labels is None else along_axis(labels, x.ndim, axis)
            if labels is not None and channels is None:
                self.fix(labels, f"'{name}' reads scales that vary within a channel")
            elif channels is not None:
                self._absorbed.append(channels)
                self._consumers.append((name, channels))
            per_channel = np.broadcast_to(0 if channels is None else channels, (x.shape[axis],))
            if getattr(module, "running_mean", None) is not None:
                self._bind(self._buffers, cast(Tensor, module.running_mean), "mean", 1, per_channel)
                self._bind(self._buffers, cast(Tensor, module.running_var), "var", 2, per_channel)
        return self._produce(name, module, value.ndim, axis, leading=1)

    def _slice_norm(self, node: fx.Node, module: nn.Module, x: Tensor, value: Tensor) -> np.ndarray | None:
        """LayerNorm/RMSNorm/GroupNorm: one scale per normalised slice is absorbed."""
        name, labels = str(node.target), self.label(node.args[0])
        if labels is not None and not self.normalized:
            self.fix(labels, f"'{name}' ({type(module).__name__}) normalises it (normalized=False)")
        elif labels is not None:
            full = padded(labels, x.ndim)
            if isinstance(module, nn.GroupNorm):
                rows = np.broadcast_to(full, full.shape[:1] + x.shape[1:2] + full.shape[2:])
                rows = rows.reshape(full.shape[0] * module.num_groups, -1)
            else:
                m = len(cast(tuple[int, ...], module.normalized_shape))
                rows = np.broadcast_to(full, full.shape[:-m] + tuple(x.shape[-m:])).reshape(-1, math.prod(x.shape[-m:]))
            self.uf.unite_rows(rows)
            self._absorbed.append(np.unique(rows))
            self._consumers.append((name, np.unique(rows)))
        if isinstance(module, nn.GroupNorm):
            return self._produce(name, module, value.ndim, 1, leading=1)
        weight = getattr(module, "weight", None)
        leading = 0 if weight is None else weight.ndim
        return self._produce(name, module, value.ndim, value.ndim - leading, leading=leading)

    # ------------------------------------------------------------------ producers and consumers
    def _consume(self, name: str, weight: Tensor, labels: np.ndarray | None, ndim: int, axis: int) -> None:
        """Divide the input columns of ``weight`` by the scales of the channels they read."""
        columns = None if labels is None else along_axis(labels, ndim, axis)
        if labels is not None and columns is None:
            self.fix(labels, f"'{name}' reads scales that vary outside its input-channel axis")
        elif columns is not None:
            self._consumers.append((name, columns))
        n_in = weight.shape[1]
        columns = np.broadcast_to(0 if columns is None else columns, (n_in,))
        self._bind(self._params, weight, "in", -1, columns.reshape((1, n_in) + (1,) * (weight.ndim - 2)))

    def _produce(self, name: str, module: nn.Module, ndim: int, axis: int, leading: int) -> np.ndarray | None:
        """Fresh labels (reused on a repeated call) for the output channels of ``module``'s affine map."""
        weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
        if weight is None:
            return None
        shape = tuple(weight.shape[:leading])
        existing = self._params.get((id(weight), "out"))
        if existing is not None:
            ids = existing.labels.reshape(shape)
        else:
            ids = self.uf.new(math.prod(shape)).reshape(shape)
            self._bind(self._params, weight, "out", 1, ids.reshape(shape + (1,) * (weight.ndim - leading)))
            self._producers.append((name, ids.reshape(-1)))
        if bias is not None:
            self._bind(self._params, bias, "out", 1, ids.reshape(bias.shape))
        return compress(ids.reshape((1,) * axis + shape + (1,) * (ndim - axis - leading)))

    def _bind(self, table: dict, tensor: Tensor, role: str, power: int, labels: np.ndarray) -> None:
        """Record that ``tensor`` carries ``labels`` in ``role``; a second use must agree (union)."""
        key = (id(tensor), role)
        if key in table:
            self.uf.union(table[key].labels, labels)
        else:
            table[key] = Binding(tensor, power, np.ascontiguousarray(labels, dtype=np.int64))
