"""Exact rescaling symmetries of a network: the group action of an exact symmetry teleport.

Positive rescalings leave a network's function unchanged (the loss-invariant action ``g . theta``
of the paper's eq. 1, here without any learned adapter): a ReLU unit ``j`` whose producing layer's
row is multiplied by ``a_j > 0`` and whose consumers' columns are divided by ``a_j`` computes the
same function; a channel that only feeds a normalisation may be scaled freely (the norm removes
it). :meth:`RescaleSymmetry.find` traces a module with torch.fx, finds every such scale that only
touches the given parameters (:mod:`~lightning_cost.teleport.symmetry.graph`), and returns the
diagonal action ``theta' = t(log a) * theta``.

Because ``L(T theta) = L(theta)`` for every ``theta``, per-task gradients at the new point need no
backward pass: ``grad L(T theta) = T^{-1} grad L(theta)``, i.e. ``J' = J / t`` column-wise;
optimizer state moves the same way (Adam ``m / t``, ``v / t**2``; SGD momentum ``/ t``).

Normalised groups (``normalized=True``) are exact only up to the normalisation's ``eps``:
``a (x - mu) / sqrt(a**2 var + eps)`` differs from ``(x - mu) / sqrt(var + eps)`` by a relative
``eps (1 - 1 / a**2) / (2 var)``. They are off by default, so that the default action is exact
to rounding.
"""

from __future__ import annotations

import warnings
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from lightning_cost.teleport.symmetry.graph import LabelPropagator, Propagation
from lightning_cost.teleport.symmetry.labels import FIXED
from lightning_cost.teleport.symmetry.trace import TraceFailure, trace_with_values

__all__ = ["NoSymmetryError", "RescaleSymmetry", "ScaleGroup"]

_KINDS = ("homogeneous", "normalized")


class NoSymmetryError(ValueError):
    """The module has no rescaling symmetry among the given parameters (the message says why)."""


@dataclass(frozen=True)
class ScaleGroup:
    """Scales produced by the same layers and removed the same way.

    ``name`` is ``"producers -> consumers"`` (module paths); ``size`` the number of independent
    scales; ``kind`` ``"homogeneous"`` (consumers divide them out exactly) or ``"normalized"`` (a
    normalisation removes them, exact up to its ``eps``).
    """

    name: str
    size: int
    kind: str

    def __post_init__(self) -> None:
        if self.size < 1:
            raise ValueError(f"a scale group has at least one scale, got size={self.size}")
        if self.kind not in _KINDS:
            raise ValueError(f"kind must be one of {_KINDS}, got {self.kind!r}")


@dataclass(frozen=True)
class _Target:
    """A tensor multiplied by ``exp(sum_k power_k * s[index_k])`` (``s[0] = 0``: scale 1)."""

    tensor: Tensor
    terms: tuple[tuple[int, Tensor], ...]


class RescaleSymmetry:
    """The diagonal action ``theta' = t(log_scales) * theta`` of a network's exact rescalings.

    Build it with :meth:`find`. ``log_scales`` is a ``[num_scales]`` tensor, ``a = exp(log_scales)``.
    """

    def __init__(
        self, params: Sequence[Tensor], groups: Sequence[ScaleGroup], targets: Sequence[_Target | None],
        buffers: Sequence[_Target],
    ) -> None:
        self.params: list[Tensor] = list(params)
        self.groups: tuple[ScaleGroup, ...] = tuple(groups)
        self.num_scales: int = sum(g.size for g in self.groups)
        self._targets = list(targets)
        self._buffers = list(buffers)
        self._on_device: dict[torch.device, tuple[list, list]] = {}

    @classmethod
    def find(
        cls, module: nn.Module, example_args: tuple[Any, ...], params: Sequence[nn.Parameter],
        normalized: bool = False,
    ) -> RescaleSymmetry:
        """Trace ``module(*example_args)`` and collect its rescalings that touch only ``params``.

        ``params`` are the parameters that may be rescaled (the shared, trainable ones); a layer with
        a parameter outside them fixes the scales it reads. ``normalized=True`` also uses channels
        absorbed by a normalisation (approximate by the norm's ``eps``, module docstring).
        ``module`` is traced in eval mode (restored after), and Python branches in ``forward``
        follow the example inputs (a warning says when one depends on tensor values rather than
        shapes). ``params`` must not be used outside ``module`` (e.g. tied to a head's weight):
        only ``module``'s own uses are visible to the analysis.
        Raises :class:`NoSymmetryError` if tracing fails or no scale is left free.
        """
        checked = _checked_params(params)
        example_args = example_args if isinstance(example_args, tuple) else (example_args,)
        try:
            graph, data_dependent = trace_with_values(module, example_args)
        except TraceFailure as e:
            raise NoSymmetryError(
                f"{type(module).__name__} could not be traced with torch.fx on the example inputs: {e}"
            ) from e
        if data_dependent:
            warnings.warn(
                f"{type(module).__name__}.forward branches on tensor values ({', '.join(data_dependent[:3])}); "
                "the rescalings found hold on the path the example inputs take", stacklevel=2,
            )
        found = LabelPropagator(module, checked, bool(normalized)).run(graph)
        groups, index = _assign_scales(found)
        if not groups:
            raise NoSymmetryError(_why_none(module, found, normalized))
        return cls(checked, groups, *_targets(found, index, checked))

    # ------------------------------------------------------------------ the action
    def factors(self, log_scales: Tensor) -> list[Tensor]:
        """Per parameter (``params`` order) the factor ``t`` with ``theta' = t * theta``.

        Each is a broadcast view with the parameter's shape (ones where untouched), differentiable
        with respect to ``log_scales``; copy it before writing into it.
        """
        s = self._extended(log_scales)
        params, _ = self._indices(s.device)
        out = []
        for p, terms in zip(self.params, params, strict=True):
            if terms is None:
                out.append(s.new_ones(()).expand(p.shape))
            else:
                out.append(_log_factor(s, terms).exp().expand(p.shape))
        return out

    def log_factors(self, log_scales: Tensor) -> list[Tensor | None]:
        """Per parameter ``log t`` in its compact shape (broadcastable to the parameter's, size 1 along
        the axes the factor does not vary over: a convolution's kernel axes), ``None`` if untouched."""
        s = self._extended(log_scales)
        params, _ = self._indices(s.device)
        return [None if terms is None else _log_factor(s, terms) for terms in params]

    def flat_factors(self, log_scales: Tensor) -> Tensor:
        """``[P]``: the factors flattened and concatenated in ``params`` order."""
        return torch.cat([t.reshape(-1) for t in self.factors(log_scales)])

    @torch.no_grad()
    def apply_(self, log_scales: Tensor) -> None:
        """Rescale in place: every parameter (same objects) and the running statistics that follow."""
        s = self._extended(log_scales.detach())
        params, buffers = self._indices(s.device)
        for p, terms in zip(self.params, params, strict=True):
            if terms is not None:
                p.mul_(_log_factor(s, terms).exp().to(p.dtype))
        for target, terms in zip(self._buffers, buffers, strict=True):
            target.tensor.mul_(_log_factor(s, terms).exp().to(target.tensor.dtype))

    def buffer_snapshot(self) -> list[tuple[Tensor, Tensor]]:
        """``(buffer, copy)`` for every buffer :meth:`apply_` changes; ``buffer.copy_(copy)`` restores it."""
        return [(b.tensor, b.tensor.detach().clone()) for b in self._buffers]

    def __repr__(self) -> str:
        kinds = ", ".join(f"{sum(g.size for g in self.groups if g.kind == k)} {k}" for k in _KINDS)
        return f"RescaleSymmetry({len(self.groups)} groups, {self.num_scales} scales: {kinds})"

    # ------------------------------------------------------------------ internals
    def _extended(self, log_scales: Tensor) -> Tensor:
        if not isinstance(log_scales, Tensor) or not log_scales.is_floating_point():
            raise ValueError(f"log_scales must be a floating-point tensor, got {type(log_scales).__name__}"
                             + (f" of {log_scales.dtype}" if isinstance(log_scales, Tensor) else ""))
        if tuple(log_scales.shape) != (self.num_scales,):
            raise ValueError(f"log_scales must have shape [{self.num_scales}], got {tuple(log_scales.shape)}")
        return torch.cat([log_scales.new_zeros(1), log_scales])

    def _indices(self, device: torch.device) -> tuple[list, list]:
        """The index tensors on ``device`` (moved once per device)."""
        if device not in self._on_device:
            def move(target: _Target | None) -> tuple | None:
                return None if target is None else tuple((k, i.to(device)) for k, i in target.terms)

            self._on_device[device] = ([move(t) for t in self._targets], [move(b) for b in self._buffers])
        return self._on_device[device]


def _log_factor(s: Tensor, terms: tuple[tuple[int, Tensor], ...]) -> Tensor:
    total: Tensor | None = None
    for power, index in terms:
        term = s[index] if power == 1 else s[index] * power
        total = term if total is None else total + term
    assert total is not None  # every target has at least one term (_targets)
    return total


def _checked_params(params: Sequence[Tensor]) -> list[Tensor]:
    params = list(params)
    if not params:
        raise ValueError("params is empty: nothing may be rescaled")
    for i, p in enumerate(params):
        if not isinstance(p, Tensor):
            raise ValueError(f"params[{i}] is a {type(p).__name__}, not a tensor/Parameter")
    if len({id(p) for p in params}) != len(params):
        raise ValueError("params lists the same parameter more than once")
    return params


def _assign_scales(found: Propagation) -> tuple[list[ScaleGroup], np.ndarray]:
    """Group the free roots by (producing layers, absorbed or not); the scale index of every label."""
    roots = found.roots
    producers_of: dict[int, list[int]] = defaultdict(list)
    for i, (_, ids) in enumerate(found.producers):
        for r in np.unique(roots[ids]).tolist():
            if r != FIXED:
                producers_of[r].append(i)
    absorbed = set(np.unique(roots[np.concatenate(found.absorbed)]).tolist()) if found.absorbed else set()
    consumers_of: dict[int, list[str]] = defaultdict(list)
    for name, ids in found.consumers:
        for r in np.unique(roots[ids]).tolist():
            if name not in consumers_of[r]:
                consumers_of[r].append(name)
    buckets: dict[tuple, list[int]] = defaultdict(list)
    for r in sorted(producers_of):
        buckets[(tuple(producers_of[r]), r in absorbed)].append(r)
    groups: list[ScaleGroup] = []
    root_index = np.zeros(len(roots), dtype=np.int64)
    for key in sorted(buckets):
        members = buckets[key]
        root_index[members] = np.arange(len(members)) + 1 + sum(g.size for g in groups)
        consumers = list(dict.fromkeys(n for r in members for n in consumers_of[r])) or ["(unused)"]
        producers = ", ".join(found.producers[i][0] for i in key[0])
        groups.append(ScaleGroup(f"{producers} -> {', '.join(consumers)}", len(members), _KINDS[key[1]]))
    return groups, root_index[roots]


def _targets(found: Propagation, index: np.ndarray, params: list[Tensor]) -> tuple[list, list]:
    """Per parameter its ``_Target`` (``None`` if untouched), and the buffers' targets."""
    terms: dict[int, list] = defaultdict(list)
    tensors: dict[int, Tensor] = {}
    for binding in [*found.params, *found.buffers]:
        scale_index = index[binding.labels]
        if scale_index.any():
            terms[id(binding.tensor)].append((binding.power, torch.from_numpy(np.ascontiguousarray(scale_index))))
            tensors[id(binding.tensor)] = binding.tensor
    param_targets = [_Target(p, tuple(terms[id(p)])) if id(p) in terms else None for p in params]
    buffer_ids = dict.fromkeys(id(b.tensor) for b in found.buffers if id(b.tensor) in terms)
    return param_targets, [_Target(tensors[i], tuple(terms[i])) for i in buffer_ids]


def _why_none(module: nn.Module, found: Propagation, normalized: bool) -> str:
    head = f"{type(module).__name__} has no rescaling symmetry among the given parameters: "
    reasons = "; ".join(found.fixes[:5]) + ("; ..." if len(found.fixes) > 5 else "")
    if not found.producers:
        return head + (
            "no Linear/Conv (groups=1) or normalisation layer has all its parameters in `params`, "
            "so no unit can be rescaled" + (f" (fixed: {reasons})" if reasons else "")
        )
    units = ", ".join(f"'{name}'" for name, _ in found.producers[:4]) + (", ..." if len(found.producers) > 4 else "")
    norm = "" if normalized else " (normalisations count only with normalized=True)"
    return head + (
        f"no ReLU/BatchNorm unit whose scale reaches only Linear/Conv layers in `params`{norm}; "
        f"the scales of {units} are fixed by: {reasons}"
    )
