"""COST's teleport (paper Sec. 4.1): a LoRA displacement trained on ``L_t - gamma L_g``, then merged."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, cast

import torch
from torch import Tensor

from lightning_cost.distributed import all_reduce_mean_, broadcast_
from lightning_cost.teleport._checks import check_bool, check_choice, check_float, check_int
from lightning_cost.teleport.adapter import TeleportAdapter
from lightning_cost.teleport.evaluation import keep_buffers
from lightning_cost.teleport.objective import (
    ascent_direction,
    balance_ratios,
    loss_invariance,
    relative_drift_penalty,
    sample_sphere,
    sharpness,
)
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem, TeleportRejected

__all__ = ["LoRAConfig", "LoRATeleporter"]


@dataclass
class LoRAConfig:
    """Settings of the LoRA teleport (eqs. 7-11). The defaults are the measured ones that make a teleport
    move (``docs/results/teleport_effect``); :meth:`paper` gives the objective exactly as published.

    Args:
        rank, alpha: LoRA rank and ``lora_alpha`` (scaling ``alpha / rank``; ``None``: ``alpha = rank``).
        inner_steps: Adam steps on ``L_lora`` per teleport.
        inner_lr: their learning rate; ``None``: ``inner_lr_scale`` times the outer optimizer's learning
            rate of the teleported parameters.
        inner_lr_scale: see ``inner_lr``.
        lr_schedule: ``"cosine"`` (annealed to 0 over the inner steps, so the search settles on the level
            set) or ``"constant"``.
        gamma: weight of ``L_g`` in eq. 11 (with ``min_gain``, the first try's: the search raises it).
        invariance: ``L_t``: ``"absolute"`` (eq. 7, ``mean_i |L_i - L_i*|``) or ``"squared_relative"``
            (``mean_i ((L_i - L_i*) / (drift_scale L_i*))^2``: the same minimiser, a gradient that grows
            with the drift, the same scale for every task).
        drift_scale: the relative drift at which the squared penalty reaches 1.
        perturbation: ``eps`` of eqs. 8-9: ``"random"`` (``num_perturbations`` draws on the sphere, the
            largest kept, eq. 9) or ``"ascent"`` (the sphere's first-order maximiser, the normalised
            gradient of ``sum_i R_i L_i``: eq. 8's max, where the difference form measures the gradient norm).
        num_perturbations: ``n~`` in eq. 9 (``perturbation="random"``).
        radius: ``delta``, the norm of each perturbation; relative to ``||theta||`` if ``relative_radius``.
        relative_radius: see ``radius``.
        sharpness: ``"perturbed"`` (eq. 9: the perturbed losses) or ``"difference"`` (eq. 8: perturbed minus
            unperturbed, which grows the gradient rather than the loss).
        normalise: divide ``L_g`` by ``mean_i R_i L_i*`` (the same ``gamma`` for any loss scale).
        ratio: ``R`` of eq. 10: ``"softmax"`` (the paper) or ``"linear"`` (the authors' code).
        use_lt, use_lg: the two terms of eq. 11 (paper Table 4 ablation).
        use_lora: ``False``: a dense delta on every parameter instead of LoRA.
        batched_perturbations: evaluate the ``n~`` random perturbations in one ``torch.func.vmap`` pass.
        loss_tolerance, abs_tolerance: acceptance test, ``|L_i - L_i*| <= loss_tolerance |L_i*| + abs_tolerance``.
        min_gain: the effect a teleport must reach: the norm of the gradient of ``sum_i R_i L_i`` (what
            eq. 8 measures, to first order) at the found point at least ``1 + min_gain`` times its norm at
            the start, with every task loss inside the acceptance test. The inner loop is
            rerun from ``dtheta = 0`` with ``gamma`` searched over up to ``max_tries`` tries (times
            ``gamma_growth`` after a try that stayed on the level set but gained less, divided by it after
            one that left it, the geometric mean once both are known): the pull of ``L_g`` that a model
            needs is found on that model, not set in advance. The try with the largest gain is kept, and
            the teleport is rejected if none reaches ``min_gain``. ``None``: one inner loop at
            the given learning rate, whatever it reaches (the paper's procedure; also with ``use_lg=False`` or
            ``gamma=0``, where nothing pulls ``L_g``).
        max_tries, gamma_growth: see ``min_gain``; ``gamma`` is the first try's weight.
    """

    rank: int = 5
    alpha: float | None = None
    inner_steps: int = 50
    inner_lr: float | None = None
    inner_lr_scale: float = 1.0
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    gamma: float = 3.0
    invariance: Literal["absolute", "squared_relative"] = "squared_relative"
    drift_scale: float = 0.01
    perturbation: Literal["random", "ascent"] = "ascent"
    num_perturbations: int = 5
    radius: float = 1e-2
    relative_radius: bool = True
    sharpness: Literal["perturbed", "difference"] = "difference"
    normalise: bool = True
    ratio: Literal["softmax", "linear"] = "softmax"
    use_lt: bool = True
    use_lg: bool = True
    use_lora: bool = True
    batched_perturbations: bool = False
    loss_tolerance: float = 0.01
    abs_tolerance: float = 1e-6
    min_gain: float | None = 0.05
    max_tries: int = 5
    gamma_growth: float = 4.0

    @classmethod
    def paper(cls, **overrides: Any) -> LoRAConfig:
        """Eqs. 7-11 as published: ``|L_i - L_i*|``, ``n~ = 5`` random draws at ``delta = 1e-2``, the plain
        perturbed loss, ``gamma = 0.05``, 10 inner steps at the outer learning rate (one try), 5 % tolerance."""
        settings = dict(inner_steps=10, lr_schedule="constant", gamma=0.05, invariance="absolute",
                        perturbation="random", relative_radius=False, sharpness="perturbed", normalise=False,
                        loss_tolerance=0.05, abs_tolerance=1e-4, min_gain=None)
        return cls(**{**settings, **overrides})

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_float("alpha", self.alpha, positive=True, optional=True)
        check_int("inner_steps", self.inner_steps, 1)
        check_float("inner_lr", self.inner_lr, positive=True, optional=True)
        check_float("inner_lr_scale", self.inner_lr_scale, positive=True)
        check_choice("lr_schedule", self.lr_schedule, ("cosine", "constant"))
        check_float("gamma", self.gamma, minimum=0.0)
        check_choice("invariance", self.invariance, ("absolute", "squared_relative"))
        check_float("drift_scale", self.drift_scale, positive=True)
        check_choice("perturbation", self.perturbation, ("random", "ascent"))
        check_int("num_perturbations", self.num_perturbations, 1)
        check_float("radius", self.radius, positive=True)
        check_choice("sharpness", self.sharpness, ("perturbed", "difference"))
        check_choice("ratio", self.ratio, ("softmax", "linear"))
        for name in ("relative_radius", "normalise", "use_lt", "use_lg", "use_lora", "batched_perturbations"):
            check_bool(name, getattr(self, name))
        if not (self.use_lt or self.use_lg):
            raise ValueError("at least one of use_lt and use_lg must be True")
        check_float("loss_tolerance", self.loss_tolerance, minimum=0.0)
        check_float("abs_tolerance", self.abs_tolerance, minimum=0.0)
        check_float("min_gain", self.min_gain, positive=True, optional=True)
        check_int("max_tries", self.max_tries, 1)
        check_float("gamma_growth", self.gamma_growth, minimum=1.0)
        if self.gamma_growth == 1.0 and self.min_gain is not None and self.max_tries > 1:
            raise ValueError("gamma_growth must be > 1 when min_gain searches over several tries")


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
