"""An exact symmetry teleport: rescale ReLU units (and, optionally, normalised channels) of the trunk.

Positive rescalings ``theta' = t(s) * theta`` leave every task loss unchanged (eq. 5 holds exactly, no
adapter is learned; :mod:`~lightning_cost.teleport.symmetry.groups` finds them), and every per-task gradient
at the new point is ``g_i / t`` (no new backward). So the log-scales ``s`` are chosen on the
Jacobian alone: ``objective="grad_norm"`` maximises ``||g_0'||`` (eq. 6), ``objective="conflict"``
maximises a soft minimum of ``cos(g_i', g_0')`` (clearing the eq. 4 condition). Both need only the
``K x K`` Gramian ``G'(s) = J diag(t^-2) J^T``, which :class:`ScaledGramian` evaluates from per-layer
cell sums of ``J`` formed once, so each of the ``steps`` costs far less than a pass over ``J``.
``objective="flatness"`` instead minimises the Hessian trace of the mean task loss at the new point,
``sum_j H_jj / t_j^2`` (:mod:`~lightning_cost.teleport.symmetry.flatness`; a move toward flatter points, as in
Zhao et al., ICLR 2024), from one Hutchinson estimate of ``diag H`` (``probes`` Hessian-vector products).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_cost.distributed import broadcast_
from lightning_cost.teleport._checks import check_bool, check_choice, check_float, check_int, check_tolerance
from lightning_cost.teleport.evaluation import keep_buffers
from lightning_cost.teleport.symmetry.flatness import ScaledHessianTrace, hessian_diagonal
from lightning_cost.teleport.symmetry.groups import RescaleSymmetry
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem

__all__ = ["OBJECTIVES", "RescaleConfig", "RescaleTeleporter", "ScaledGramian", "scaled_objective"]

#: what the rescaling can aim for (:attr:`RescaleConfig.objective`)
OBJECTIVES = ("conflict", "grad_norm", "flatness")


@dataclass
class RescaleConfig:
    """Settings of the exact rescaling teleport.

    Args:
        objective: ``"conflict"`` (raise the smallest ``cos(g_i, g_0)``), ``"grad_norm"`` (raise
            ``||g_0||``, eq. 6) or ``"flatness"`` (lower the Hessian trace of the mean task loss).
        max_scale: every unit's scale stays in ``[1 / max_scale, max_scale]``.
        steps, lr: Adam steps and learning rate on the (unbounded) parameters of the log-scales.
        temperature: of the soft minimum of the cosines (``objective="conflict"``).
        normalized: also rescale channels that only feed a normalisation (exact up to its ``eps``).
        loss_tolerance, abs_tolerance: acceptance test (float rounding only, the action is exact):
            ``|L_i - L_i*| <= loss_tolerance |L_i*| + abs_tolerance``. ``loss_tolerance="auto"`` (the
            default) follows the precision the task losses are computed in: ``1e-4`` in float32, one
            step ``eps`` of the autocast dtype's resolution under ``"bf16-mixed"`` / ``"16-mixed"``
            (:meth:`~lightning_cost.teleport.teleporter.Teleporter.resolved_loss_tolerance`); a number
            is used as given.
        probes: Rademacher probes of the Hutchinson estimate of ``diag H`` (``objective="flatness"``).
    """

    objective: Literal["conflict", "grad_norm", "flatness"] = "conflict"
    max_scale: float = 4.0
    steps: int = 100
    lr: float = 0.1
    temperature: float = 0.05
    normalized: bool = False
    loss_tolerance: float | Literal["auto"] = "auto"
    abs_tolerance: float = 1e-7
    probes: int = 8

    def __post_init__(self) -> None:
        check_choice("objective", self.objective, OBJECTIVES)
        check_int("probes", self.probes, 1)
        check_float("max_scale", self.max_scale, minimum=1.0)
        check_int("steps", self.steps, 1)
        check_float("lr", self.lr, positive=True)
        check_float("temperature", self.temperature, positive=True)
        check_bool("normalized", self.normalized)
        check_tolerance("loss_tolerance", self.loss_tolerance)
        check_float("abs_tolerance", self.abs_tolerance, minimum=0.0)


class ScaledGramian:
    """``G'(s) = J diag(t(s)^-2) J^T`` for a :class:`RescaleSymmetry`, differentiable in ``s``.

    ``t`` is constant over a convolution's kernel axes (and over whatever else a layer's factor does not
    vary along), so ``J_i . J_k`` is summed over those axes once, per pair ``i <= k``; each evaluation then
    weighs these cell sums by ``exp(-2 log t)``. Where the cells would hold more than twice ``J``'s
    entries (many tasks, no kernel axes), ``G'`` is formed directly from ``J``.
    """

    def __init__(self, symmetry: RescaleSymmetry, jacobian: Tensor) -> None:
        self.symmetry, self.k = symmetry, jacobian.shape[0]
        self.pairs = torch.triu_indices(self.k, self.k, device=jacobian.device)
        zero = jacobian.new_zeros(symmetry.num_scales)
        shapes = [lf.shape if lf is not None else None for lf in symmetry.log_factors(zero)]
        cells = sum(math.prod(s) for s in shapes if s is not None)
        self.direct = self.pairs.shape[1] * cells > 2 * jacobian.numel()
        self.jacobian = jacobian
        self.fixed = jacobian.new_zeros(self.pairs.shape[1], dtype=torch.float64)
        self.cells: list[Tensor | None] = []
        if not self.direct:
            self._precompute(jacobian, shapes)

    def _precompute(self, jacobian: Tensor, shapes: list[torch.Size | None]) -> None:
        i, k = self.pairs
        offset = 0
        for p, shape in zip(self.symmetry.params, shapes, strict=True):
            block = jacobian[:, offset : offset + p.numel()].reshape(self.k, *p.shape)
            offset += p.numel()
            if shape is None:
                flat = block.reshape(self.k, -1)
                self.fixed += (flat @ flat.T)[i, k].double()
                self.cells.append(None)
                continue
            aligned = (1,) * (p.ndim - len(shape)) + tuple(shape)
            summed = [d for d in range(p.ndim) if aligned[d] == 1 and p.shape[d] > 1]
            self.cells.append(_cell_sums(block, summed, self.pairs) if summed else block[i] * block[k])

    def __call__(self, log_scales: Tensor) -> Tensor:
        """The ``[K, K]`` Gramian (float64) at the point rescaled by ``exp(log_scales)``."""
        if self.direct:
            logs = [log_scales.new_zeros(()).expand(p.shape) if lf is None else lf.expand(p.shape)
                    for p, lf in zip(self.symmetry.params, self.symmetry.log_factors(log_scales), strict=True)]
            w = torch.exp(-2.0 * torch.cat([x.reshape(-1) for x in logs]))
            return ((self.jacobian * w) @ self.jacobian.T).double()
        packed = self.fixed.clone()
        for cell, lf in zip(self.cells, self.symmetry.log_factors(log_scales), strict=True):
            if cell is not None:
                assert lf is not None  # a parameter with a cell is one the rescaling touches
                aligned = lf.reshape((1,) * (cell.ndim - 1 - lf.ndim) + tuple(lf.shape))
                packed = packed + (cell * torch.exp(-2.0 * aligned).unsqueeze(0)).reshape(cell.shape[0], -1).sum(
                    dim=1).double()
        out = packed.new_zeros(self.k, self.k)
        out = out.index_put((self.pairs[0], self.pairs[1]), packed)
        return out + out.triu(1).T


def _cell_sums(block: Tensor, summed: list[int], pairs: Tensor) -> Tensor:
    """``sum over the summed axes of J_i * J_k`` for every pair, shaped ``[pairs, *p.shape]`` with 1 on
    the summed axes: one batched ``K x K`` product per cell, never the ``pairs x numel`` products."""
    kept = [d for d in range(block.ndim - 1) if d not in summed]
    x = block.permute(*(d + 1 for d in kept), 0, *(d + 1 for d in summed))
    x = x.reshape(-1, block.shape[0], math.prod(block.shape[d + 1] for d in summed))
    gram = x @ x.transpose(1, 2)  # [cells, K, K]
    out_shape = [1 if d in summed else block.shape[d + 1] for d in range(block.ndim - 1)]
    return gram[:, pairs[0], pairs[1]].T.reshape(pairs.shape[1], *out_shape)


def scaled_objective(gram: Tensor, objective: str, temperature: float) -> Tensor:
    """What the rescaling maximises, from the Gramian of the task gradients."""
    k = gram.shape[0]
    g0_sq = gram.sum() / (k * k)
    if objective == "grad_norm":
        return torch.log(g0_sq.clamp_min(1e-300))
    sq = gram.diagonal()
    alive = sq > 0
    cos = (gram.sum(dim=1) / k)[alive] / torch.sqrt(sq[alive] * g0_sq).clamp_min(1e-300)
    return -temperature * torch.logsumexp(-cos / temperature, dim=0)


class RescaleTeleporter(Teleporter):
    """Teleports along the trunk's exact rescaling symmetries (found at the first teleport, by tracing
    the shared module on the teleport's batch) to the scales that best serve ``config.objective``."""

    name = "rescale"
    default_transfer = "transport"
    gives_factors = True

    def __init__(self, config: RescaleConfig | None = None) -> None:
        self.config = config or RescaleConfig()
        super().__init__(self.config.loss_tolerance, self.config.abs_tolerance)
        self._symmetry: RescaleSymmetry | None = None
        self._key: tuple[int, ...] | None = None

    @property
    def found(self) -> RescaleSymmetry | None:
        """The symmetry traced at the last teleport (``None`` before the first)."""
        return self._symmetry

    def symmetry(self, problem: TeleportProblem) -> RescaleSymmetry:
        """The rescalings of the shared module among ``problem.params`` (traced once per parameter set)."""
        key = (id(problem.module), *(id(p) for p in problem.params))
        if self._symmetry is None or key != self._key:
            trunk = shared_module(problem.module, problem.params)
            args = _example_input(trunk, problem)
            self._symmetry = RescaleSymmetry.find(trunk, args, problem.params, normalized=self.config.normalized)
            self._key = key
        return self._symmetry

    def move(self, problem: TeleportProblem) -> Move:
        cfg = self.config
        symmetry = self.symmetry(problem)
        value_at = self._objective(symmetry, problem)
        bound = math.log(cfg.max_scale)
        u = torch.zeros(symmetry.num_scales, device=problem.jacobian.device, requires_grad=True)
        opt = torch.optim.Adam([u], lr=cfg.lr)
        start = best = math.nan
        best_u = u.detach().clone()
        with torch.enable_grad():
            for i in range(cfg.steps):
                value = value_at(bound * torch.tanh(u))
                v = value.item()
                if i == 0:  # u = 0: the objective where the weights are now
                    start = best = v
                elif v > best:
                    best, best_u = v, u.detach().clone()
                opt.zero_grad()
                (-value).backward()
                opt.step()
        trace = [{"objective": start}, {"objective": best}]
        if not best > start:
            return Move(trace=trace)  # no better point: nothing moves
        log_scales = broadcast_(bound * torch.tanh(best_u))  # identical on every rank
        symmetry.apply_(log_scales)
        return Move(factors=[t.detach() for t in symmetry.factors(log_scales)], trace=trace)


    def _objective(self, symmetry: RescaleSymmetry, problem: TeleportProblem) -> Callable[[Tensor], Tensor]:
        """What :meth:`move` maximises, as a function of the log-scales."""
        cfg = self.config
        if cfg.objective == "flatness":
            with keep_buffers(problem.module):
                diagonal = hessian_diagonal(lambda: problem.evaluator.local(problem.batches).mean(), symmetry.params,
                                            cfg.probes, problem.generator)
            trace = ScaledHessianTrace(symmetry, diagonal)
            scale = max(abs(float(trace(torch.zeros(symmetry.num_scales, device=problem.jacobian.device)))), 1e-300)
            return lambda log_scales: -trace(log_scales) / scale
        gram = ScaledGramian(symmetry, problem.jacobian.float())
        return lambda log_scales: scaled_objective(gram(log_scales), cfg.objective, cfg.temperature)


def shared_module(module: nn.Module, params: list[nn.Parameter]) -> nn.Module:
    """The module to trace: ``module.shared_module()`` when it has one, else the smallest submodule
    holding every teleported parameter (it must not be the whole LightningModule)."""
    getter = getattr(module, "shared_module", None)
    found = getter() if callable(getter) else None
    if found is not None:
        return found
    ids = {id(p) for p in params}
    best: nn.Module | None = None
    for _, sub in module.named_modules():
        if sub is not module and ids <= {id(p) for p in sub.parameters()}:
            if best is None or sum(1 for _ in sub.parameters()) < sum(1 for _ in best.parameters()):
                best = sub
    if best is None:
        raise ValueError("teleporter='rescale' needs the shared part as one submodule: pass shared=<module> to "
                         "configure_multitask, or give the LightningModule a shared_module() method")
    return best


def _example_input(trunk: nn.Module, problem: TeleportProblem) -> tuple[Any, ...]:
    """The shared module's input on the teleport's first batch (one forward, buffers restored)."""
    seen: list[tuple[Any, ...]] = []
    handle = trunk.register_forward_pre_hook(lambda _m, args: seen.append(args) if not seen else None)
    try:
        with torch.no_grad(), keep_buffers(problem.module):
            problem.evaluator.local(problem.batches[:1])
    finally:
        handle.remove()
    if not seen:
        raise ValueError(f"the shared module {type(trunk).__name__} was not called while evaluating the task losses")
    return tuple(a.detach() if torch.is_tensor(a) else a for a in seen[0])
