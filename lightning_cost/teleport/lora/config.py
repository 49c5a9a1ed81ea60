"""The LoRA teleport's settings (paper Sec. 4.1, eqs. 5-6), validated where they are defined."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from lightning_cost.teleport._checks import check_bool, check_choice, check_float, check_int

__all__ = ["LoRAConfig"]


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
