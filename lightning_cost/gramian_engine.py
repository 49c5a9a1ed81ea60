"""The Gramian engine: ``G = J J^T`` and ``J^T w`` of the shared parameters, without forming ``J``.

Methods that are a function of the Gramian (:class:`~lightning_cost.aggregators.GramianAggregator`,
and the conflict trigger's cosines) never need the ``K x P`` Jacobian itself. During
``training_step`` the engine records, for each shared ``nn.Linear``/``Conv1d``/``Conv2d``/
``Embedding`` whose cost rule (:mod:`lightning_cost.gram_layers`) favours it, the layer's input and
its output tensor. One batched vector-Jacobian product with the K one-hot cotangents (the module's
:class:`~lightning_cost.jacobian.JacobianEngine`, with its loop fallback) then gives the K output
cotangents of those layers and the per-task gradients of every other shared parameter (norm
affines, unknown modules, layers the rule sends to the explicit path); no weight gradient of a
Gram-path layer is formed. ``G`` is the sum of the layers' Gram parts and of the explicit blocks'
Gramians; the update of weights ``w`` is written per layer as ``(sum_i w_i D_i)^T A``.

The Gram parts are exact in real arithmetic; a weight used outside its module's ``forward`` (tied
weights read as a tensor) would escape them, so the first step is checked against the Jacobian
engine's ``J J^T`` (:attr:`GramianConfig.verify`) and a mismatch switches back to the Jacobian for
good, with a warning (the check's tolerance follows the precision the step ran in: under
``"bf16-mixed"`` the two computations round differently, :attr:`GramianConfig.rtol`). Under DDP the
global Gramian has cross-rank terms that no rank's Gram parts contain: the multi-task core then uses
the exact path (per-task gradients averaged over ranks).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_cost._precision import AUTO, autocast_dtype, coarsest, rounding_tolerance
from lightning_cost.aggregators import gramian as block_gramian
from lightning_cost.aggregators.base import GRAMIAN_BLOCK
from lightning_cost.gram_layers import LayerRule, rule_for
from lightning_cost.jacobian import JacobianEngine
from lightning_cost.representation_cut import head_products, passes_only_through, reached_leaves

__all__ = ["RTOL_FLOOR", "RTOL_UNITS", "GramianConfig", "GramianEngine", "GramianStep"]

log = logging.getLogger(__name__)

PATHS = ("auto", "gram", "explicit")
#: ``rtol="auto"`` where the step ran in float32 or finer
RTOL_FLOOR = 1e-3
#: ``rtol="auto"`` in a coarser dtype: this many steps ``eps`` of its relative resolution
#: (:meth:`GramianEngine.check_rtol` says why four)
RTOL_UNITS = 4.0


@dataclass(frozen=True)
class GramianConfig:
    """Settings of :class:`GramianEngine`.

    Args:
        path: ``"auto"`` (the per-layer cost rule), ``"gram"`` (every supported layer takes the Gram
            path within ``max_rows``) or ``"explicit"`` (none: per-task weight gradients, as the
            Jacobian engine, but ``J`` is still never formed).
        max_rows: the largest ``N`` (rows of a layer's input; batch x positions for a convolution)
            for the Gram path: its ``N x N`` matrix ``S`` is formed.
        verify: check the first step's ``G`` against the Jacobian engine's ``J J^T`` (one extra
            Jacobian, once) and fall back to the Jacobian engine on a mismatch.
        rtol: the check's tolerance, relative to the largest ``|G_ij|``; ``"auto"`` (the default)
            follows the precision the step's forward and backward ran in: ``1e-3`` in float32, four
            steps ``eps`` of the autocast dtype's resolution under ``"bf16-mixed"`` / ``"16-mixed"``
            (:meth:`GramianEngine.check_rtol`); a number is used as given.
        two_stage: where the task losses reach the shared parameters only through the shared
            module's output ``z`` (checked on each step's graph), get the cotangents of ``z`` by one
            small product per task through its head, then one batched product through the trunk
            (:mod:`lightning_cost.representation_cut`), instead of ``K`` one-hot rows through every head.
    """

    path: str = "auto"
    max_rows: int = 4096
    verify: bool = True
    rtol: float | Literal["auto"] = "auto"
    two_stage: bool = True

    def __post_init__(self) -> None:
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if not isinstance(self.max_rows, int) or isinstance(self.max_rows, bool) or self.max_rows < 1:
            raise ValueError(f"max_rows must be an int >= 1, got {self.max_rows!r}")
        if not isinstance(self.verify, bool):
            raise ValueError(f"verify must be a bool, got {self.verify!r}")
        if self.rtol != AUTO and not (isinstance(self.rtol, (int, float)) and not isinstance(self.rtol, bool)
                                      and 0 < self.rtol < 1):
            raise ValueError(f"rtol must be 'auto' or in (0, 1), got {self.rtol!r}")
        if not isinstance(self.two_stage, bool):
            raise ValueError(f"two_stage must be a bool, got {self.two_stage!r}")


@dataclass
class _Layer:
    """One Gram-path candidate: a shared module, its rule and this step's captured calls."""

    name: str
    module: nn.Module
    rule: LayerRule
    params: list[tuple[str, nn.Parameter]]  # its trainable direct parameters ("weight", "bias")
    gram: bool | None = None  # this step's decision (None: not called yet)
    inputs: list[Tensor] = field(default_factory=list)
    outputs: list[Tensor] = field(default_factory=list)


@dataclass
class GramianStep:
    """One step's per-task gradient information from :meth:`GramianEngine.compute`.

    ``gramian`` is unscaled (``K x K``, float32, symmetric); :meth:`combine` gives ``J^T w`` per
    shared parameter; ``other_grads`` are the ``[K, *shape]`` gradients of the other parameters
    (still scaled by the loss scale, as the Jacobian engine's).
    """

    gramian: Tensor
    other_grads: list[Tensor | None]
    rep_grads: list[Tensor | None]
    scale: float
    _shared: list[nn.Parameter]
    _layers: list[tuple[_Layer, Tensor, Tensor | None]]  # (layer, A, D or None if unreached)
    _blocks: dict[int, Tensor]  # id(param) -> [K, numel] explicit per-task gradients

    def combine(self, weights: Tensor) -> Tensor:
        """``J^T w`` (length ``P``, in shared-parameter order), unscaled."""
        w = weights.detach().float()
        parts: dict[int, Tensor] = {}
        for layer, a, d in self._layers:
            if d is None:
                continue
            dw = torch.tensordot(w.to(d.device), d, dims=1)  # (N, d_out)
            for pname, p in layer.params:
                parts[id(p)] = layer.rule.weight_update(layer.module, a, dw) if pname == "weight" else dw.sum(0)
        for pid, block in self._blocks.items():
            parts[pid] = w.to(block.dtype) @ block
        flat = [parts[id(p)].reshape(-1).to(p.dtype) if id(p) in parts else torch.zeros(p.numel(), dtype=p.dtype,
                                                                                         device=p.device)
                for p in self._shared]
        out = torch.cat(flat)
        return out / self.scale if self.scale != 1.0 else out

    def finite_parts(self) -> bool:
        """Whether every cotangent and explicit block is finite (read only when ``G`` is not)."""
        tensors = [d for _, _, d in self._layers if d is not None] + list(self._blocks.values())
        return all(bool(torch.isfinite(t).all()) for t in tensors)


class GramianEngine:
    """``G = J J^T`` and ``J^T w`` from layer inputs and output cotangents (see the module docstring)."""

    def __init__(self, config: GramianConfig | None = None, jacobian: JacobianEngine | None = None) -> None:
        self.config = config or GramianConfig()
        self.jacobian = jacobian or JacobianEngine()
        self.verified = not self.config.verify
        self.disabled_reason: str | None = None
        self._layers: list[_Layer] = []
        self._paths: dict[str, str] = {}
        self._cut_calls: list[Any] = []
        self._dtypes: set[torch.dtype] = set()
        self.split = "one stage (not run yet)"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config}{', disabled' if self.disabled_reason else ''})"

    # ------------------------------------------------------------------ capture
    @contextmanager
    def capture(self, root: nn.Module, shared: Sequence[nn.Parameter], k: int,
                boundary: nn.Module | None = None) -> Iterator[None]:
        """Record, during the forward pass inside this block, what the Gram path needs (and the outputs
        of ``boundary``, the shared module, for the two-stage product)."""
        self._layers = self._candidates(root, shared)
        self._cut_calls = []
        active = [autocast_dtype(t) for t in {p.device.type for p in shared}]
        self._dtypes = {p.dtype for p in shared} | {d for d in active if d is not None}
        handles = [layer.module.register_forward_hook(self._hook(layer, k)) for layer in self._layers]
        if boundary is not None and self.config.two_stage:
            handles.append(boundary.register_forward_hook(lambda m, a, out: self._cut_calls.append(out)))
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def _candidates(self, root: nn.Module, shared: Sequence[nn.Parameter]) -> list[_Layer]:
        shared_ids = {id(p) for p in shared}
        layers, paths = [], {}
        for name, module in root.named_modules():
            rule = rule_for(module)
            params = [(n, p) for n, p in module.named_parameters(recurse=False) if p.requires_grad]
            if not params or not all(id(p) in shared_ids for _, p in params):
                continue
            why = "no Gram rule for this module type" if rule is None else rule.unsupported(module)
            if why is None and self.config.path == "explicit":
                why = "path='explicit'"
            if why is not None:
                paths[name] = f"explicit ({why})"
                continue
            assert rule is not None  # no rule gives a reason above
            layers.append(_Layer(name, module, rule, params))
        for name, module in root.named_modules():  # other modules with shared parameters of their own
            own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) in shared_ids]
            if own and name not in paths and not any(layer.name == name for layer in layers):
                paths[name] = "explicit (no Gram rule for this module type)"
        self._paths = paths
        return layers

    def _hook(self, layer: _Layer, k: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad and args
                    and isinstance(args[0], Tensor)):
                return None
            x = args[0]
            self._dtypes.add(output.dtype)
            if layer.gram is None:
                cfg = self.config
                layer.gram = (layer.rule.n_rows(module, x) <= cfg.max_rows if cfg.path == "gram"
                              else layer.rule.prefers_gram(module, x, k, cfg.max_rows))
            if not layer.gram:
                return None
            layer.inputs.append(x.detach())
            layer.outputs.append(output)
            return output.clone()  # later in-place ops change the clone: ``output`` keeps its cotangent

        return hook

    def paths(self) -> dict[str, str]:
        """Which path each shared module took at the last step: ``"gram"``, or ``"explicit (why)"``."""
        out = dict(self._paths)
        for layer in self._layers:
            out[layer.name] = "gram" if layer.gram else "explicit (cost rule)" if layer.gram is False else \
                "explicit (not called)"
        return out

    # ------------------------------------------------------------------ the step
    def compute(self, losses: Tensor, shared: Sequence[nn.Parameter], others: Sequence[Tensor],
                reps: Sequence[Tensor] = (), *, scale: float = 1.0, retain: bool = False,
                task_losses: Sequence[Tensor] | None = None) -> GramianStep:
        """``G`` of ``losses`` over ``shared`` (the layers captured during the last :meth:`capture`),
        the other parameters' and the representation's per-task gradients, from one VJP (two stages
        where ``task_losses``, the K losses as separate scalars, allow it: :attr:`split`)."""
        gram_layers = [layer for layer in self._layers if layer.gram]
        covered = {id(p) for layer in gram_layers for _, p in layer.params}
        explicit = [p for p in shared if id(p) not in covered]
        outputs = [o for layer in gram_layers for o in layer.outputs]
        grads = self._products(losses, task_losses, shared, [*outputs, *explicit], others, reps, scale, retain)
        k = losses.shape[0]
        gram = torch.zeros((k, k), dtype=torch.float32, device=losses.device)
        layers, pos = [], 0
        for layer in gram_layers:
            n_calls = len(layer.outputs)
            layers.append(self._layer_part(layer, grads[pos : pos + n_calls], gram))
            pos += n_calls
        blocks = {}
        for p, g in zip(explicit, grads[pos : pos + len(explicit)], strict=True):
            if g is not None:
                blocks[id(p)] = g.reshape(k, -1).float()
                gram += block_gramian(blocks[id(p)])
        pos += len(explicit)
        if scale != 1.0:
            gram /= scale * scale
        for layer in self._layers:  # drop the graph references; keep the decisions for paths()
            layer.inputs, layer.outputs = [], []
        self._cut_calls = []
        return GramianStep(gramian=0.5 * (gram + gram.T), other_grads=list(grads[pos : pos + len(others)]),
                           rep_grads=list(grads[pos + len(others):]), scale=scale, _shared=list(shared),
                           _layers=layers, _blocks=blocks)

    def _products(self, losses: Tensor, task_losses: Sequence[Tensor] | None, shared: Sequence[nn.Parameter],
                  trunk: Sequence[Tensor], others: Sequence[Tensor], reps: Sequence[Tensor], scale: float,
                  retain: bool) -> list[Tensor | None]:
        """The ``[K, *shape]`` per-task gradients w.r.t. ``[*trunk, *others, *reps]`` (``trunk``: the
        Gram-path layers' outputs and the explicit shared parameters): two stages where they give
        the same numbers, else one batched product (:attr:`split` says which, and why)."""
        cut = self._cut(task_losses, losses.shape[0])
        marked = [r for r in reps if not any(r is z for z in cut)]
        if not cut or not passes_only_through(task_losses, cut, shared, marked):  # type: ignore[arg-type]
            if cut:
                self.split = "one stage (a task loss reaches a shared parameter or a marked tensor besides the shared output)"
            scaled = losses * scale if scale != 1.0 else losses
            return self.jacobian.vjps(scaled, [*trunk, *others, *reps], retain)
        self.split = "two stages (per-task heads, then the trunk from the shared module's output)"
        heads = [p for p, r in zip(others, reached_leaves(task_losses, cut, others), strict=True) if r]  # type: ignore[arg-type]
        first = JacobianEngine.stack_rows(head_products(task_losses, [*cut, *heads], scale), [*cut, *heads])  # type: ignore[arg-type]
        pairs = [(z, c) for z, c in zip(cut, first[: len(cut)], strict=True) if c is not None]
        head_ids = {id(p) for p in heads}
        rest = [p for p in others if id(p) not in head_ids]
        back = [*trunk, *rest, *marked]
        second = self.jacobian.pullback([z for z, _ in pairs], [c for _, c in pairs], back, retain) if pairs \
            else [None] * len(back)
        by_id = {id(x): g for x, g in zip([*heads, *back], [*first[len(cut):], *second], strict=True)}
        cut_grads = {id(z): c for z, c in zip(cut, first[: len(cut)], strict=True)}
        return [*second[: len(trunk)], *(by_id[id(p)] for p in others),
                *(cut_grads[id(r)] if id(r) in cut_grads else by_id[id(r)] for r in reps)]

    def _cut(self, task_losses: Sequence[Tensor] | None, k: int) -> list[Tensor]:
        """The shared module's output tensors of this step, when the two-stage product may apply."""
        calls = self._cut_calls
        if not self.config.two_stage:
            self.split = "one stage (two_stage=False)"
        elif task_losses is None or len(task_losses) != k:
            self.split = "one stage (the task losses came as one stacked tensor, not as separate scalars)"
        elif len(calls) != 1:
            self.split = f"one stage (the shared module was called {len(calls)} times, not once)"
        else:
            out = calls[0]
            tensors = [out] if isinstance(out, Tensor) else list(out) if isinstance(out, (tuple, list)) else []
            cut = [t for t in tensors if isinstance(t, Tensor) and t.requires_grad]
            if cut and all(isinstance(t, Tensor) for t in tensors):
                return cut
            self.split = "one stage (the shared module's output is not a tensor or a tuple of tensors)"
        return []

    @staticmethod
    def _layer_part(layer: _Layer, grads: Sequence[Tensor | None], gram: Tensor) -> tuple[_Layer, Tensor, Tensor | None]:
        """Add one Gram-path layer's part to ``gram``; return its ``(layer, A, D)``."""
        rule, module = layer.rule, layer.module
        a = _cat([rule.rows(module, x) for x in layer.inputs], dim=0)
        if all(g is None for g in grads):
            return layer, a, None
        d = _cat([rule.cotangents(module, g if g is not None else torch.zeros((gram.shape[0], *o.shape),
                                                                              dtype=o.dtype, device=o.device))
                  for g, o in zip(grads, layer.outputs, strict=True)], dim=1)
        d = rule.prepare(module, a, d)
        for pname, _ in layer.params:
            if pname == "weight":
                gram += cross_gramian(d, torch.matmul(rule.input_gram(a), d))
            else:
                b = d.sum(1)
                gram += b @ b.T
        return layer, a, d

    @property
    def compute_dtype(self) -> torch.dtype:
        """The precision of the last captured step: the coarsest of the shared weights' dtype, the
        autocast dtype when :meth:`capture` was entered and the captured layers' output dtype."""
        return coarsest(self._dtypes)

    def check_rtol(self) -> float:
        """The first-step check's tolerance, relative to the largest ``|G_ij|``: ``config.rtol`` when it
        is a number, else (``"auto"``) ``max(RTOL_FLOOR, RTOL_UNITS * eps)``, ``eps`` the relative
        resolution (``torch.finfo(dtype).eps``) of :attr:`compute_dtype`.

        Why four ``eps``: each ``G_ij`` is a sum of products of two gradient factors (a layer's input
        rows and output cotangents here, two per-task weight gradients in the reference ``J J^T``).
        Under autocast those factors are rounded to the dtype along two different orders of operations
        (the reference rounds every per-task weight gradient, ``eps / 2`` each), so one product may
        be off by ``2 * eps / 2 = eps`` on either side and the two Gramians by ``2 eps`` of the largest
        entry from rounding alone; twice that covers the roundings compounded through the backward
        pass. In float32 that is far below the floor, which is kept. A weight read outside its
        module's forward leaves a whole term out of the Gram parts, an error of the order of ``G``
        itself, far above either.
        """
        if self.config.rtol != AUTO:
            return float(self.config.rtol)
        return rounding_tolerance(RTOL_FLOOR, self.compute_dtype, RTOL_UNITS)

    def check(self, gram: Tensor, reference: Tensor) -> bool:
        """Whether ``gram`` matches the Jacobian engine's ``reference`` (the first-step check, within
        :meth:`check_rtol`); on a mismatch the engine disables itself, saying why."""
        self.verified = True
        err = float((gram - reference).abs().max())
        size = float(reference.abs().max())
        rtol = self.check_rtol()
        if err <= rtol * max(size, torch.finfo(torch.float32).tiny):
            return True
        self.disabled_reason = (f"the Gram parts differ from J J^T by {err / max(size, 1e-30):.1e} relative, above "
                                f"the tolerance {rtol:.1e} for {self.compute_dtype} (a shared weight used outside "
                                "its module's forward?); using the Jacobian engine from now on")
        return False


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    """``torch.cat`` without the copy when a layer was called once (the usual case)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=dim)


def cross_gramian(x: Tensor, y: Tensor, block: int = GRAMIAN_BLOCK) -> Tensor:
    """``X Y^T`` over the flattened rows of ``[K, ...]`` tensors, summed in column blocks (as
    :func:`~lightning_cost.aggregators.gramian`, for float32 accuracy at any size)."""
    xf, yf = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1)
    if xf.shape[1] <= block:
        return xf @ yf.T
    out = torch.zeros((xf.shape[0], yf.shape[0]), dtype=xf.dtype, device=xf.device)
    for start in range(0, xf.shape[1], block):
        out.addmm_(xf[:, start : start + block], yf[:, start : start + block].T)
    return out
