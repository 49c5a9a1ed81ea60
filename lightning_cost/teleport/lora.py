"""COST's teleport (paper Sec. 4.1): a LoRA displacement trained on ``L_t - gamma L_g``, then merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor

from lightning_cost.distributed import all_reduce_mean_, broadcast_
from lightning_cost.teleport._checks import check_bool, check_choice, check_float, check_int
from lightning_cost.teleport.adapter import TeleportAdapter
from lightning_cost.teleport.objective import balance_ratios, loss_invariance, sample_sphere, sharpness
from lightning_cost.teleport.teleporter import Move, Teleporter, TeleportProblem, TeleportRejected

__all__ = ["LoRAConfig", "LoRATeleporter"]


@dataclass
class LoRAConfig:
    """Settings of the LoRA teleport (eqs. 7-11).

    Args:
        rank, alpha: LoRA rank and ``lora_alpha`` (scaling ``alpha / rank``; ``None``: ``alpha = rank``).
        inner_steps: Adam steps on ``L_lora`` per teleport.
        inner_lr: their learning rate; ``None``: the outer optimizer's learning rate of the shared
            parameters (the authors' choice).
        gamma: weight of ``L_g`` in eq. 11.
        num_perturbations: ``n~`` in eq. 9.
        radius: ``delta``, the norm of each perturbation over all teleported parameters.
        ratio: ``R`` of eq. 10: ``"softmax"`` (the paper) or ``"linear"`` (the authors' code).
        sharpness: ``"perturbed"`` (eq. 9: the perturbed losses) or ``"difference"`` (eq. 8:
            perturbed minus unperturbed).
        use_lt, use_lg: the two terms of eq. 11 (paper Table 4 ablation).
        use_lora: ``False``: a dense delta on every parameter instead of LoRA.
        batched_perturbations: evaluate the ``n~`` perturbations in one ``torch.func.vmap`` pass (the
            same values; faster where kernel launches dominate; needs a module ``vmap`` can trace).
        loss_tolerance, abs_tolerance: acceptance test, ``|L_i - L_i*| <= loss_tolerance |L_i*| + abs_tolerance``.
    """

    rank: int = 5
    alpha: float | None = None
    inner_steps: int = 10
    inner_lr: float | None = None
    gamma: float = 0.05
    num_perturbations: int = 5
    radius: float = 1e-2
    ratio: Literal["softmax", "linear"] = "softmax"
    sharpness: Literal["perturbed", "difference"] = "perturbed"
    use_lt: bool = True
    use_lg: bool = True
    use_lora: bool = True
    batched_perturbations: bool = False
    loss_tolerance: float = 0.05
    abs_tolerance: float = 1e-4

    def __post_init__(self) -> None:
        check_int("rank", self.rank, 1)
        check_float("alpha", self.alpha, positive=True, optional=True)
        check_int("inner_steps", self.inner_steps, 1)
        check_float("inner_lr", self.inner_lr, positive=True, optional=True)
        check_float("gamma", self.gamma, minimum=0.0)
        check_int("num_perturbations", self.num_perturbations, 1)
        check_float("radius", self.radius, positive=True)
        check_choice("ratio", self.ratio, ("softmax", "linear"))
        check_choice("sharpness", self.sharpness, ("perturbed", "difference"))
        for name in ("use_lt", "use_lg", "use_lora", "batched_perturbations"):
            check_bool(name, getattr(self, name))
        if not (self.use_lt or self.use_lg):
            raise ValueError("at least one of use_lt and use_lg must be True")
        check_float("loss_tolerance", self.loss_tolerance, minimum=0.0)
        check_float("abs_tolerance", self.abs_tolerance, minimum=0.0)


class LoRATeleporter(Teleporter):
    """Trains a LoRA displacement ``dtheta`` on ``L_lora = L_t - gamma * L_g`` (eq. 11) and merges it.

    ``L_t = mean_i |L_i(theta + dtheta) - L_i*|`` (eq. 7); ``L_g = max_j |(1/K) sum_i R_i
    L_i(theta + dtheta + eps_j)|`` (eq. 9) over ``n~`` draws ``eps_j`` on the sphere of radius ``delta``,
    ``R`` from eq. 10 on the task-gradient norms of the teleport's batches. The max is found without
    gradients and only the arg-max draw is back-propagated (the gradient of a max is its arg-max
    term's). Every loss is global under DDP and the inner gradients are averaged over ranks, so the
    search is the one-device search on the global batch.
    """

    name = "lora"
    default_transfer = "htr"

    def __init__(self, config: LoRAConfig | None = None) -> None:
        self.config = config or LoRAConfig()
        super().__init__(self.config.loss_tolerance, self.config.abs_tolerance)

    def setup(self, module: torch.nn.Module, params: list[torch.nn.Parameter]) -> None:
        if self.config.use_lora:
            import peft.tuners.lora  # noqa: F401  (a one-time import of ~2 s, paid here, not in the first teleport)

    def move(self, problem: TeleportProblem) -> Move:
        cfg = self.config
        adapter = TeleportAdapter(problem.module, problem.params, cfg.rank, cfg.alpha, cfg.use_lora)
        ratios = balance_ratios(problem.jacobian.norm(dim=1).float(), cfg.ratio).to(problem.target.device)
        adapter.inject(problem.generator)
        trace: list[dict[str, float]] = []
        try:
            for p in adapter.lora_parameters():
                broadcast_(p.data)  # identical on every rank whatever their generators did
            inner = torch.optim.Adam(adapter.parameters(), lr=cfg.inner_lr if cfg.inner_lr is not None else problem.lr)
            with torch.enable_grad():
                for _ in range(cfg.inner_steps):
                    objective, terms = self._objective(problem, adapter, ratios)
                    _step(inner, objective, adapter.parameters())
                    trace.append(terms)
            adapter.merge()
        finally:
            adapter.discard()  # a no-op after the merge; removes the adapters after a failure
        return Move(trace=trace)

    def _objective(self, problem: TeleportProblem, adapter: TeleportAdapter, ratios: Tensor
                   ) -> tuple[Tensor, dict[str, float]]:
        """``L_lora`` (eq. 11) at the adapter's current ``dtheta``, and its terms for the record."""
        cfg = self.config
        base = adapter.overrides()  # theta + dtheta, shared by the n~ + 2 evaluations of this step
        losses = problem.evaluator(problem.batches, base)
        if not torch.isfinite(losses).all():
            raise TeleportRejected("non-finite task losses in the inner loop")
        lt = loss_invariance(losses, problem.target)
        objective = lt if cfg.use_lt else losses.new_zeros(())
        lg = float("nan")
        if cfg.use_lg:
            term = self._sharpness_term(problem, adapter, base, losses, ratios)
            objective = objective - cfg.gamma * term
            lg = float(term.detach())
        return objective, {"objective": float(objective.detach()), "l_t": float(lt.detach()), "l_g": lg}

    def _sharpness_term(self, problem: TeleportProblem, adapter: TeleportAdapter, base: dict[str, Tensor],
                        losses: Tensor, ratios: Tensor) -> Tensor:
        """``L_g`` (eq. 9): the largest of the ``n~`` terms, back-propagated through its arg-max only."""
        cfg = self.config
        shapes = [p.shape for p in problem.params]
        device = losses.device
        draws = [sample_sphere(shapes, cfg.radius, problem.generator, device) for _ in range(cfg.num_perturbations)]
        with torch.no_grad():
            if cfg.batched_perturbations:
                stacked = adapter.perturb({k: v.unsqueeze(0) for k, v in base.items()},
                                          [torch.stack(parts) for parts in zip(*draws, strict=True)])
                perturbed = problem.evaluator.batched(problem.batches, stacked)
            else:
                perturbed = torch.stack([problem.evaluator(problem.batches, adapter.perturb(base, eps))
                                         for eps in draws])
            values = torch.stack([self._sharpness(lp, losses.detach(), ratios) for lp in perturbed])
        best = draws[int(values.argmax())]
        return self._sharpness(problem.evaluator(problem.batches, adapter.perturb(base, best)), losses, ratios)

    def _sharpness(self, perturbed: Tensor, unperturbed: Tensor, ratios: Tensor) -> Tensor:
        if self.config.sharpness == "difference":
            return sharpness(perturbed - unperturbed, ratios)
        return sharpness(perturbed, ratios)


def _step(inner: torch.optim.Optimizer, objective: Tensor, params: list[Tensor]) -> None:
    """One inner Adam step with the gradients averaged over DDP ranks."""
    grads = torch.autograd.grad(objective, params, allow_unused=True)
    for p, g in zip(params, grads, strict=True):
        p.grad = all_reduce_mean_(g.detach().clone() if g is not None else torch.zeros_like(p))
    if not all(torch.isfinite(p.grad).all() for p in params):
        raise TeleportRejected("non-finite gradient in the inner loop")
    inner.step()
    inner.zero_grad(set_to_none=True)
