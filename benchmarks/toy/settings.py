"""The settings of a toy run: the methods and their hyper-parameters, the optimiser, and COST's arguments."""

from __future__ import annotations

import dataclasses
from typing import Any

from benchmarks.runner.variants import deep_merge
from lightning_cost.teleport import LoRAConfig

#: The methods of the sweep (registry names) and their display names.
METHODS: tuple[str, ...] = ("ls", "mgda", "pcgrad", "cagrad", "nashmtl", "famo", "fairgrad")
LABELS = {"ls": "LS", "mgda": "MGDA", "pcgrad": "PCGrad", "cagrad": "CAGrad", "nashmtl": "Nash-MTL",
          "famo": "FAMO", "fairgrad": "FairGrad"}
#: ``l1_scale`` per method when ``--l1-scale paper`` (the default): the Nash-MTL / FAMO papers' 0.1.
PAPER_L1_SCALE = {"nashmtl": 0.1, "famo": 0.1}
#: Gradient-norm clipping per method (``--l1-scale paper``): the Nash-MTL / FAMO toy code clips the shared
#: gradient to norm 1 (``max_norm=1.0`` in their ``WeightMethod.backward``); Lightning's ``gradient_clip_val``.
PAPER_CLIP = {"nashmtl": 1.0, "famo": 1.0}
#: The papers' optimiser: Adam, lr 1e-3, default betas, 35k-100k steps.
PAPER_LR = 1e-3
PAPER_BETAS = (0.9, 0.999)
DEFAULT_STEPS = 2000
DEFAULT_LR = 1e-2
#: Settings of :class:`~lightning_cost.SymmetryTeleportCallback` on the toy (see :mod:`benchmarks.toy`); the
#: warm-up is ``TOY_WARMUP_FRACTION`` of the steps.
TOY_COST: dict[str, Any] = {
    # the paper's LoRA objective (eqs. 7-11 as published) with the toy's perturbation radius
    "teleporter": {"name": "lora", **dataclasses.asdict(LoRAConfig.paper(radius=0.1))},
    "trigger": "majority",
    "schedule": {"max_per_epoch": None, "min_steps_between": 20},
    "transfer": "htr",
    "seed": 0,
}
TOY_WARMUP_FRACTION = 0.1


def method_hparams(method: str, l1_scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The method's hyper-parameters on the toy (the papers' toy code; see :mod:`benchmarks.toy`)."""
    if method == "cagrad":
        return {"c": 0.5, "rescale": 2}
    if method == "pcgrad":
        return {"seed": seed}
    if method == "famo":
        return {"gamma": 0.0, "min_losses": (-21.0 * l1_scale, -21.0), "logit_optimizer": "adam"}
    return {}


def rescaled_betas(lr: float) -> tuple[float, float]:
    """Adam betas that keep the papers' run (lr ``1e-3``, betas ``(0.9, 0.999)``) in continuous time.

    One step at ``lr`` stands for ``s = lr / 1e-3`` of the papers' steps, so the moment averages must
    forget ``s`` times faster: ``1 - beta = s (1 - beta_paper)``, clipped at 0. ``lr = 1e-2``: ``(0.0, 0.99)``.
    """
    s = lr / PAPER_LR
    return tuple(round(max(0.0, 1.0 - s * (1.0 - beta)), 12) for beta in PAPER_BETAS)  # type: ignore[return-value]


def cost_settings(steps: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :class:`~lightning_cost.SymmetryTeleportCallback` arguments on the toy (:data:`TOY_COST`, a warm-up
    of ``TOY_WARMUP_FRACTION`` of ``steps``) for a run of ``steps``, ``overrides`` merged over them."""
    kw = deep_merge(TOY_COST, {"schedule": {"warmup_steps": int(TOY_WARMUP_FRACTION * steps)}})
    return deep_merge(kw, overrides or {})
