"""COST's teleport (paper Sec. 4.1): a LoRA displacement trained on ``L_t - gamma L_g``, then merged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor

from lightning_cost.distributed import all_reduce_mean_, broadcast_
from lightning_cost.teleport.evaluation import keep_buffers
from lightning_cost.teleport.lora.adapter import TeleportAdapter
from lightning_cost.teleport.lora.config import LoRAConfig
from lightning_cost.teleport.lora.objective import (
    ascent_direction,
    balance_ratios,
    loss_invariance,
    relative_drift_penalty,
    sample_sphere,
    sharpness,
)
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem, TeleportRejected

__all__ = ["LoRATeleporter"]


class LoRATeleporter(Teleporter):
    """Trains a LoRA displacement ``dtheta`` on ``L_lora = L_t - gamma * L_g`` (eq. 11) and merges it.

    ``L_t`` keeps the task losses at ``L*`` (eq. 7); ``L_g`` measures the sharpness at
    ``theta + dtheta`` along a perturbation ``eps`` of norm ``delta`` (eqs. 8-9), with the task ratios
    ``R`` of eq. 10 computed from the task-gradient norms on the teleport's batches. With random draws
    (eq. 9) the max is found without gradients and only the arg-max draw is back-propagated. Every loss
    is global under DDP and the inner gradients are averaged over ranks, so the search is the
    one-device search on the global batch. :class:`LoRAConfig` says which form of each term is used.
    """

    name = "lora"
    default_transfer = "htr"

    def __init__(self, config: LoRAConfig | None = None) -> None:
        self.config = config or LoRAConfig()
        super().__init__(self.config.loss_tolerance, self.config.abs_tolerance)

    def setup(self, module: torch.nn.Module, params: Sequence[torch.nn.Parameter]) -> None:
        if self.config.use_lora:
            import peft.tuners.lora  # noqa: F401  (a one-time import of ~2 s, paid here, not in the first teleport)

    def move(self, problem: TeleportProblem) -> Move:
        cfg = self.config
        adapter = TeleportAdapter(problem.module, problem.params, cfg.rank, cfg.alpha, cfg.use_lora)
        ratios = balance_ratios(problem.jacobian.norm(dim=1).float(), cfg.ratio).to(problem.target.device)
        radius = cfg.radius * problem.snapshot.weight_norm() if cfg.relative_radius else cfg.radius
        lr = cfg.inner_lr if cfg.inner_lr is not None else cfg.inner_lr_scale * problem.lr
        search = _Search(self, problem, adapter, ratios, radius)
        adapter.inject(problem.generator)
        try:
            with torch.enable_grad(), keep_buffers(problem.module):
                if cfg.min_gain is None or not cfg.use_lg or cfg.gamma == 0:
                    search.inner_loop(lr, cfg.gamma)
                else:
                    search.run(lr, cfg.gamma)
            adapter.merge()
        finally:
            adapter.discard()  # a no-op after the merge; removes the adapters after a failure
        return Move(trace=search.trace)

    def _objective(self, problem: TeleportProblem, adapter: TeleportAdapter, ratios: Tensor, radius: float,
                   gamma: float) -> tuple[Tensor, dict[str, float]]:
        """``L_lora`` (eq. 11, ``L_g`` weighted by ``gamma``) at the adapter's current ``dtheta``, and its terms
        for the record."""
        cfg = self.config
        base = adapter.overrides()  # theta + dtheta, shared by every evaluation of this step
        losses = problem.evaluator(problem.batches, base)
        if not torch.isfinite(losses).all():
            raise TeleportRejected("non-finite task losses in the inner loop")
        if cfg.invariance == "absolute":
            lt = loss_invariance(losses, problem.target)
        else:
            lt = relative_drift_penalty(losses, problem.target, cfg.drift_scale)
        objective = lt if cfg.use_lt else losses.new_zeros(())
        lg = float("nan")
        if cfg.use_lg:
            term = self._sharpness_term(problem, adapter, base, losses, ratios, radius)
            if cfg.normalise:
                term = term / (ratios * problem.target).mean().abs().clamp_min(1e-12)
            objective = objective - gamma * term
            lg = float(term.detach())
        return objective, {"objective": float(objective.detach()), "l_t": float(lt.detach()), "l_g": lg}

    def _sharpness_term(self, problem: TeleportProblem, adapter: TeleportAdapter, base: dict[str, Tensor],
                        losses: Tensor, ratios: Tensor, radius: float) -> Tensor:
        """``L_g`` (eqs. 8-9) along the ascent direction or the largest of ``n~`` random draws."""
        if self.config.perturbation == "ascent":
            eps = self._ascent(problem, adapter, base, losses, ratios, radius)
        else:
            eps = self._largest_draw(problem, adapter, base, losses, ratios, radius)
        return self._sharpness(problem.evaluator(problem.batches, adapter.perturb(base, eps)), losses, ratios)

    def _ascent(self, problem: TeleportProblem, adapter: TeleportAdapter, base: dict[str, Tensor],
                losses: Tensor, ratios: Tensor, radius: float) -> list[Tensor]:
        """``delta * g / ||g||`` for ``g`` the (global) gradient of ``sum_i R_i L_i`` at ``theta + dtheta``."""
        return ascent_direction(weighted_gradient(problem, adapter, base, losses, ratios), radius)

    def _largest_draw(self, problem: TeleportProblem, adapter: TeleportAdapter, base: dict[str, Tensor],
                      losses: Tensor, ratios: Tensor, radius: float) -> list[Tensor]:
        """The draw with the largest term among ``n~`` on the sphere (eq. 9), found without gradients."""
        cfg = self.config
        shapes = [p.shape for p in problem.params]
        draws = [sample_sphere(shapes, radius, problem.generator, losses.device) for _ in range(cfg.num_perturbations)]
        with torch.no_grad():
            if cfg.batched_perturbations:
                stacked = adapter.perturb({k: v.unsqueeze(0) for k, v in base.items()},
                                          [torch.stack(parts) for parts in zip(*draws, strict=True)])
                perturbed = problem.evaluator.batched(problem.batches, stacked)
            else:
                perturbed = torch.stack([problem.evaluator(problem.batches, adapter.perturb(base, eps))
                                         for eps in draws])
            values = torch.stack([self._sharpness(lp, losses.detach(), ratios) for lp in perturbed])
        return draws[int(values.argmax())]

    def _sharpness(self, perturbed: Tensor, unperturbed: Tensor, ratios: Tensor) -> Tensor:
        if self.config.sharpness == "difference":
            return sharpness(perturbed - unperturbed, ratios)
        return sharpness(perturbed, ratios)


def weighted_gradient(problem: TeleportProblem, adapter: TeleportAdapter, base: dict[str, Tensor], losses: Tensor,
                      ratios: Tensor) -> list[Tensor]:
    """The (global) gradient of ``(1/K) sum_i R_i L_i`` w.r.t. the teleported parameters at ``base``."""
    points = [base.get(adapter.name_of(p), p) for p in problem.params]
    grads = torch.autograd.grad((ratios * losses).mean(), points, retain_graph=True, allow_unused=True)
    return [all_reduce_mean_(g.detach().clone() if g is not None else torch.zeros_like(p))
            for g, p in zip(grads, problem.params, strict=True)]


class _Search:
    """The inner loop of one teleport, and the search over ``gamma`` for ``min_gain``."""

    def __init__(self, teleporter: LoRATeleporter, problem: TeleportProblem, adapter: TeleportAdapter,
                 ratios: Tensor, radius: float) -> None:
        self.teleporter, self.problem, self.adapter = teleporter, problem, adapter
        self.ratios, self.radius = ratios, radius
        self.trace: list[dict[str, float]] = []

    def inner_loop(self, lr: float, gamma: float, attempt: int = 0) -> None:
        """``inner_steps`` Adam steps on ``L_lora`` (weight ``gamma``) from the adapter's current ``dtheta``."""
        cfg = self.teleporter.config
        params = self.adapter.parameters()
        for p in self.adapter.lora_parameters():
            broadcast_(p.data)  # identical on every rank whatever their generators did
        inner = torch.optim.Adam(params, lr=lr)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(inner, cfg.inner_steps) \
            if cfg.lr_schedule == "cosine" else None
        for _ in range(cfg.inner_steps):
            objective, terms = self.teleporter._objective(self.problem, self.adapter, self.ratios, self.radius,
                                                             gamma)
            _step(inner, objective, params)
            if schedule is not None:
                schedule.step()
            self.trace.append({**terms, "try": float(attempt), "gamma": gamma})

    def run(self, lr: float, gamma: float) -> None:
        """Tries at searched ``gamma`` until one reaches ``min_gain`` (see :class:`LoRAConfig`); leaves the
        adapter at the best try; :class:`TeleportRejected` if no try reaches it."""
        cfg = self.teleporter.config
        start = self.grad_norm()[0]  # at dtheta = 0, before any try
        low: float | None = None  # the largest gamma that stayed on the level set, the smallest that left it
        high: float | None = None
        best: tuple[float, float, list[Tensor]] | None = None  # (gain, gamma, adapter values)
        for attempt in range(cfg.max_tries):
            if attempt:
                self.adapter.restart(self.problem.generator)
            self.inner_loop(lr, gamma, attempt)
            gain, on_level = self._outcome(start)
            if on_level and (best is None or gain > best[0]):
                best = (gain, gamma, self.adapter.values())
            if on_level and gain >= cfg.min_gain:  # type: ignore[operator]
                break
            low, high = (gamma, high) if on_level else (low, gamma)
            if high is None:  # every try so far stayed on the level set, so low is the last gamma
                assert low is not None
                gamma = low * cfg.gamma_growth
            else:
                gamma = high / cfg.gamma_growth if low is None else math.sqrt(low * high)
        if best is None:
            raise TeleportRejected(f"no inner try stayed within the loss tolerance ({cfg.max_tries} tries, "
                                   f"the smallest gamma {high:.3g})")
        if best[0] < cfg.min_gain:  # type: ignore[operator]
            raise TeleportRejected(f"no inner try raised the weighted gradient norm by {cfg.min_gain:.0%} within the loss tolerance "
                                   f"(best {best[0]:+.1%} at gamma {best[1]:.3g}, {cfg.max_tries} tries)")
        self.adapter.load(best[2])

    def _outcome(self, start: float) -> tuple[float, bool]:
        """The relative gain of :meth:`grad_norm` over ``start`` at the adapter's ``dtheta``, and whether
        every task loss there passes the teleporter's acceptance test."""
        norm, losses = self.grad_norm()
        on_level = self.teleporter.on_level_set(self.problem, losses)
        gain = norm / start - 1.0 if start > 0 else (math.inf if norm > 0 else 0.0)
        return gain, on_level

    def grad_norm(self) -> tuple[float, Tensor]:
        """``||grad sum_i R_i L_i||`` (what eq. 8 measures, to first order) at ``theta + dtheta``, and the
        task losses there."""
        base = self.adapter.overrides()
        losses = self.problem.evaluator(self.problem.batches, base)
        grads = weighted_gradient(self.problem, self.adapter, base, losses, self.ratios)
        return math.sqrt(sum(float((g.double() ** 2).sum()) for g in grads)), losses.detach()


def _step(inner: torch.optim.Optimizer, objective: Tensor, params: list[Tensor]) -> None:
    """One inner Adam step with the gradients averaged over DDP ranks."""
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = all_reduce_mean_(g.detach().clone() if g is not None else torch.zeros_like(p))
    if not all(torch.isfinite(cast(Tensor, p.grad)).all() for p in params):
        raise TeleportRejected("non-finite gradient in the inner loop")
    inner.step()
    inner.zero_grad(set_to_none=True)
