"""The 2-task, 2-parameter toy problem (CAGrad / Nash-MTL / FAMO; the COST paper's Fig. 6) in Lightning.

The problem (the same as ``toy.py`` of the CAGrad code)::

    x = (x1, x2);  LOWER = 5e-6
    f1 = log(max(|0.5*(-x1-7) - tanh(-x2)|, LOWER)) + 6
    f2 = log(max(|0.5*(-x1+3) + tanh(-x2) + 2|, LOWER)) + 6
    c1 = max(tanh(0.5*x2), 0);   c2 = max(tanh(-0.5*x2), 0)
    f1_sq = ((-x1+7)^2 + 0.1*(-x2-8)^2)/10 - 20
    f2_sq = ((-x1-7)^2 + 0.1*(-x2-8)^2)/10 - 20
    L1 = l1_scale * (f1*c1 + f1_sq*c2);    L2 = f2*c1 + f2_sq*c2

The ``max(., floor)`` have derivative 1 at ``t == floor`` (``torch.where(t >= floor, ...)``), the
subgradient ``torch.clamp`` had in the papers' PyTorch (``where(self >= min, grad, 0)``). torch 2.14's
``clamp`` gives 0 there, which would make the init ``(0, 0)`` (``c1 = c2 = 0``) an exact stationary
point of both losses: every method would stay there. The values are unchanged.

``x`` is a raw ``nn.Parameter`` of shape ``[2]``: the *shared* parameters, no heads. :class:`ToyMTL`
trains it through the same Lightning path as any model (a ``Trainer``, a dataloader yielding one dummy
batch per step, Adam), :class:`~lightning_cost.MultiTaskMixin` doing the aggregation and, in the "COST"
runs, :class:`~lightning_cost.SymmetryTeleportCallback` teleporting ``x`` (a raw parameter gets the
callback's dense-delta adapter automatically).

**Which methods use ``l1_scale = 0.1``.** The CAGrad paper ran LS, MGDA, PCGrad and CAGrad on the
unscaled problem; the Nash-MTL and FAMO papers multiplied ``L1`` by 0.1 (``--scale 1e-1`` in their toy
code). The runner follows that by default (``--l1-scale paper``): ``nashmtl`` and ``famo`` train with
``l1_scale = 0.1`` (:data:`PAPER_L1_SCALE`) and, as their toy code (``max_norm=1.0``), with the gradient
clipped to norm 1 (:data:`PAPER_CLIP`, the trainer's ``gradient_clip_val``); LS, MGDA, PCGrad, CAGrad and
FairGrad train with ``1`` and no clipping. ``--l1-scale 1`` or ``--l1-scale 0.1`` puts every method on
the same problem, without clipping. A positive factor does not change the Pareto set, so "reached the
Pareto set" compares across methods; the losses written to the summary and drawn in loss space are
always the *unscaled* ``(L1, L2)``.

**Pareto set.** ``x1 in [-7, 7], x2 = -8.3552`` (the segment the CAGrad / Nash-MTL plots draw);
:func:`pareto_distance` is the Euclidean distance to it. The exact Pareto set (the minimisers of
``w L1 + (1 - w) L2``, ``w in [0, 1]``) bends slightly: ``x2 = -8.3551`` at ``x1 = 0``, ``-8.4345`` at
``x1 = +-7``, i.e. within 0.08 of the segment. A run has *reached* the Pareto set at the first optimizer
step after which its distance is at most :data:`PARETO_TOL` = 0.1 (checked after every step): this
counts every exactly Pareto-optimal point, plus Adam's jitter, and nothing visibly off the front.

**Optimiser and step budget.** The papers ran Adam at lr ``1e-3`` with the default betas for 35k-100k
steps. Through Lightning that is far too slow for a 70-run sweep on 2 CPU cores (a step costs a few ms,
10-20 ms with Nash-MTL's solver, more with teleports), so the default is :data:`DEFAULT_STEPS` = 2000
steps at lr :data:`DEFAULT_LR` = ``1e-2`` with *time-rescaled* betas (:func:`rescaled_betas`): one step
stands for ``s = lr / 1e-3 = 10`` of the papers' steps, so the moment averages must forget 10 times
faster, ``1 - beta = s (1 - beta_paper)``: betas ``(0.0, 0.99)``. 2000 steps are thus ~20k of the papers'
steps (``--steps 3500`` gives their 35k). This keeps the papers' dynamics: LS (checked without Lightning
at 3500 vs 35k steps) ends where the papers' setting ends, stuck in the valleys of the log terms from
``(-8.5, 7.5)`` and ``(9, 9)`` and on the front from the other three inits, which it first reaches
after 1364 / 1486 / 1617 steps vs 13641 / 14866 / 16154. A larger lr alone does *not* (lr ``1e-2`` or
``2e-2`` with betas ``(0.9, 0.999)``: Adam's second moment remembers the huge gradients near the log
valleys for ~1000 steps and nothing converges in 2-3.5k steps), nor does ``s = 20`` (lr ``2e-2``, betas
``(0, 0.98)``: the stuck runs jump out of the valleys). ``--lr 1e-3 --steps 35000`` is the papers'
exact setting; ``--betas`` overrides the betas. Measured (2 cores, ``--jobs 2``): the default 70-run
sweep takes 805 s on an otherwise idle machine (1266 s while other jobs used about half of it);
Nash-MTL's runs are 46% of that and FairGrad's 24%, mostly solver retries on steps that fail (below).
Fewer steps do not pay: below ~1650 steps not even LS reaches the front from its three good inits.

**Failed aggregations.** The library's Nash-MTL and FairGrad raise :class:`AggregationError` instead of
falling back (the official code keeps the previous or an inexact solution), and the training core then
skips the step. On this toy that happens on most steps near the front (``g_1`` nearly ``-g_2``: the
systems become singular) and in the valleys (gradient norms 1e3-1e4 apart): the runs report thousands
of ``skipped_steps``. As the problem is deterministic, a skipped step leaves ``x`` and hence the next
Jacobian unchanged, so a run that fails once stays frozen (Nash-MTL from ``(9, 9)``: 1650 of 2000 steps
skipped); the teleport trigger does not check skipped steps, so COST cannot help there either.

**Method settings on the toy** (from the papers' toy code, not tuned here): CAGrad ``c = 0.5`` and the
update divided by ``1 + c`` (CAGrad ``toy.py``, ``rescale=2``); PCGrad seeded; FAMO ``gamma = 0`` (FAMO
``experiments/toy/run.sh``: "the objective is not changing"), Adam on the logits as in the authors'
code, ``min_losses = (-21 * l1_scale, -21)`` (FAMO ``toy/trainer.py``; both losses are >= -20);
MGDA, Nash-MTL and FairGrad (``alpha = 2``) with the library's defaults.

**COST settings on the toy** (:data:`TOY_COST`, chosen on this toy only). The library's defaults are
kept where they make sense for 2 parameters: ``gamma = 0.05``, ``inner_steps = 10``, inner lr = the
outer lr (the authors' rule), 5 perturbations, the paper's trigger (eq. 4; for ``K = 2``: one task
with ``cos(g_i, g_0) < 0``), HTR, and the acceptance test (every task loss within 5% of its value
before the teleport, + 1e-4). Changed for the toy: the perturbation radius ``delta = 0.1`` (not
``1e-2``: a coordinate here is O(1), the ``tanh`` features vary over ~1 unit); a warm-up (no teleport
in the first 10% of the steps); and the spacing: one long epoch (schedule ``max_per_epoch=None``) and
at least 20 optimizer steps between two teleports (``min_steps_between=20``, ~200 of the papers'
steps); the trigger still decides. What was tried (LS, on this toy): inner lr 0.05 with 20 inner steps
is mostly rejected (a step of the inner Adam leaves the narrow valleys); spacings of 10, 25 and 50 steps
all speed up the escape from the valleys, and which stuck init gets out within the budget changes with
the spacing (20 halves the cost of 10). Why so: with 2 parameters and 2 losses held fixed, the
loss-preserving set is (generically) a point, so a teleport can only move ``x`` inside the tolerance
band (in the valleys by ~1e-3 to 1e-2). COST acts here mostly through HTR: when the displacement has a
non-positive cosine with the pre-teleport gradient (``sigma <= 0``) Adam's moments restart from the next
gradient, which un-sticks the slow drift along a valley; with ``transfer="keep"`` the same teleports
changed nothing (LS from the two stuck inits).

Run::

    python -m benchmarks.toy --out runs/toy [--steps 2000] [--methods ls cagrad] [--inits 0 2] [--jobs 2]

It writes ``DIR/toy_summary.json`` (schema in :func:`run_sweep`), ``DIR/toy_trajectories.json`` (every
recorded point; ``--replot`` redraws from it) and ``DIR/toy.png``, and prints a results table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from benchmarks.common import quiet
from benchmarks.runner.variants import deep_merge, teleport_records
from lightning_cost import MultiTaskMixin, SymmetryTeleportCallback
from lightning_cost.teleport import LoRAConfig

__all__ = [
    "DEFAULT_LR",
    "DEFAULT_STEPS",
    "INITS",
    "LOWER",
    "METHODS",
    "PAPER_CLIP",
    "PAPER_L1_SCALE",
    "PARETO_TOL",
    "PARETO_X1",
    "PARETO_X2",
    "TOY_COST",
    "ToyMTL",
    "TrajectoryRecorder",
    "cost_settings",
    "method_hparams",
    "on_pareto_set",
    "pareto_distance",
    "rescaled_betas",
    "run_one",
    "run_sweep",
    "toy_losses",
]

LOWER = 5e-6
#: The Pareto set: ``x1 in PARETO_X1``, ``x2 = PARETO_X2``.
PARETO_X1 = (-7.0, 7.0)
PARETO_X2 = -8.3552
#: Distance (parameter space) below which a point counts as on the Pareto set (see the module doc).
PARETO_TOL = 0.1
#: The five initialisations of the Nash-MTL / FAMO toy (CAGrad used the 1st, (-8.5, -5) and the 3rd).
INITS: tuple[tuple[float, float], ...] = ((-8.5, 7.5), (0.0, 0.0), (9.0, 9.0), (-7.5, -0.5), (9.0, -1.0))
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
#: Settings of :class:`SymmetryTeleportCallback` on the toy (see the module doc); the warm-up is
#: ``TOY_WARMUP_FRACTION`` of the steps.
TOY_COST: dict[str, Any] = {
    # the paper's LoRA objective (eqs. 7-11 as published) with the toy's perturbation radius
    "teleporter": {"name": "lora", **dataclasses.asdict(LoRAConfig.paper(radius=0.1))},
    "trigger": "majority",
    "schedule": {"max_per_epoch": None, "min_steps_between": 20},
    "transfer": "htr",
    "seed": 0,
}
TOY_WARMUP_FRACTION = 0.1


# ---------------------------------------------------------------------------------------- the problem
def _max(t: Tensor, floor: float) -> Tensor:
    """``max(t, floor)`` whose derivative at ``t == floor`` is 1 (the subgradient ``torch.clamp`` had when the
    papers' code ran: ``where(self >= min, grad, 0)``). torch 2.14's ``clamp`` gives 0 there, which makes
    ``x = (0, 0)`` (``c1 = c2 = 0``, one of the five inits) an exact stationary point of both losses."""
    return torch.where(t >= floor, t, torch.full_like(t, floor))


def toy_losses(x: Tensor, l1_scale: float = 1.0) -> Tensor:
    """``[L1, L2]`` at ``x`` (shape ``[..., 2]`` -> ``[..., 2]``), differentiable; see the module doc."""
    x1, x2 = x[..., 0], x[..., 1]
    th = torch.tanh(-x2)
    f1 = _max((0.5 * (-x1 - 7) - th).abs(), LOWER).log() + 6
    f2 = _max((0.5 * (-x1 + 3) + th + 2).abs(), LOWER).log() + 6
    c1 = _max(torch.tanh(x2 * 0.5), 0.0)
    c2 = _max(torch.tanh(-x2 * 0.5), 0.0)
    f1_sq = ((-x1 + 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    f2_sq = ((-x1 - 7).pow(2) + 0.1 * (-x2 - 8).pow(2)) / 10 - 20
    l1 = f1 * c1 + f1_sq * c2
    l2 = f2 * c1 + f2_sq * c2
    return torch.stack([l1 * l1_scale, l2], dim=-1)


def pareto_distance(x: Tensor | Sequence[float]) -> Tensor:
    """Euclidean distance from ``x`` (``[..., 2]``) to the segment ``x1 in [-7, 7], x2 = -8.3552``."""
    x = torch.as_tensor(x, dtype=torch.float64).detach()
    dx1 = (x[..., 0].abs() - PARETO_X1[1]).clamp_min(0.0)
    dx2 = x[..., 1] - PARETO_X2
    return torch.sqrt(dx1 * dx1 + dx2 * dx2)


def _distance(x1: float, x2: float) -> float:
    """:func:`pareto_distance` of one point, in plain floats (checked after every step)."""
    return math.hypot(max(abs(x1) - PARETO_X1[1], 0.0), x2 - PARETO_X2)


def on_pareto_set(x: Tensor | Sequence[float], tol: float = PARETO_TOL) -> bool | Tensor:
    """Whether ``x`` lies within ``tol`` of the Pareto set (a bool for one point, a mask for ``[..., 2]``)."""
    out = pareto_distance(x) <= tol
    return bool(out) if out.ndim == 0 else out


def method_hparams(method: str, l1_scale: float = 1.0, seed: int = 0) -> dict[str, Any]:
    """The method's hyper-parameters on the toy (the papers' toy code; see the module doc)."""
    if method == "cagrad":
        return {"c": 0.5, "rescale": 2}
    if method == "pcgrad":
        return {"seed": seed}
    if method == "famo":
        return {"gamma": 0.0, "min_losses": (-21.0 * l1_scale, -21.0), "logit_optimizer": "adam"}
    return {}


class ToyMTL(MultiTaskMixin, L.LightningModule):
    """The toy as a multi-task LightningModule: ``x`` (a raw ``[2]`` parameter) is all there is, and shared.

    Args:
        init: the starting point ``(x1, x2)``.
        method: a registry name (``lightning_cost.aggregators.AVAILABLE``).
        l1_scale: factor on ``L1`` (0.1 in the Nash-MTL / FAMO versions).
        lr, betas: Adam's learning rate and betas.
        **hparams: the method's hyper-parameters.
    """

    def __init__(self, init: Sequence[float] = (0.0, 0.0), method: str = "ls", l1_scale: float = 1.0,
                 lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), **hparams: Any) -> None:
        super().__init__()
        self.x = nn.Parameter(torch.tensor([float(v) for v in init], dtype=torch.float32))
        self.l1_scale = float(l1_scale)
        self.lr = float(lr)
        self.betas = (float(betas[0]), float(betas[1]))
        self.configure_multitask(["L1", "L2"], shared=[self.x], method=method, **hparams)

    def compute_task_losses(self, batch: Any) -> dict[str, Tensor]:
        """The two losses at ``x`` (the batch is a dummy): pure, so a teleport can evaluate it freely."""
        losses = toy_losses(self.x, self.l1_scale)
        return {"L1": losses[0], "L2": losses[1]}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        return self.compute_task_losses(batch)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.lr, betas=self.betas)


def dummy_loader(steps: int) -> DataLoader:
    """One dummy batch (a zero) per step: one epoch of ``steps`` steps."""
    return DataLoader(TensorDataset(torch.zeros(steps, 1)), batch_size=1)


class TrajectoryRecorder(L.Callback):
    """Records ``x`` and the unscaled losses every ``every`` steps, every teleport, and the first step on the
    Pareto set (checked after every optimizer step)."""

    def __init__(self, every: int = 10, tol: float = PARETO_TOL) -> None:
        super().__init__()
        self.every, self.tol = max(1, int(every)), tol
        self.steps: list[int] = []
        self.xs: list[list[float]] = []
        self.losses: list[list[float]] = []
        self.first_pareto_step: int | None = None
        self.teleports: list[dict[str, Any]] = []
        self._x_before: Tensor | None = None
        self._seen = 0

    @staticmethod
    def _teleporter(trainer: L.Trainer) -> SymmetryTeleportCallback | None:
        callbacks = trainer.callbacks  # type: ignore[attr-defined]
        return next((c for c in callbacks if isinstance(c, SymmetryTeleportCallback)), None)

    def _push(self, step: int, x: Tensor) -> None:
        x = x.detach().double().cpu()
        if self.steps and self.steps[-1] == step and self.xs[-1] == x.tolist():
            return
        self.steps.append(step)
        self.xs.append(x.tolist())
        self.losses.append(toy_losses(x).tolist())

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._push(trainer.global_step, pl_module.x)
        if self.first_pareto_step is None and on_pareto_set(pl_module.x, self.tol):
            self.first_pareto_step = trainer.global_step

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self._x_before = pl_module.x.detach().clone()
        tele = self._teleporter(trainer)
        self._seen = len(tele.history) if tele is not None else 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        x = pl_module.x.detach()
        tele = self._teleporter(trainer)
        jumped = False
        if tele is not None and len(tele.history) > self._seen:  # only the new records are converted
            for rec in teleport_records(tele, start=self._seen):
                event = {k: rec[k] for k in ("step", "accepted", "moved", "reason", "losses_before", "losses_after",
                                             "sigma") if k in rec}
                for when in ("before", "after"):  # the trigger's conflict count on the teleport's batch
                    event[f"conflicts_{when}"] = rec[when]["conflicts"] if rec.get(when) else None
                if rec["accepted"] and self._x_before is not None:
                    event["x_before"] = self._x_before.double().tolist()
                    event["x_after"] = x.double().tolist()
                    jumped = True
                self.teleports.append(event)
        if jumped and self._x_before is not None:
            self._push(step - 1, self._x_before)  # the jump is drawn as a segment
        if self.first_pareto_step is None and _distance(*x.tolist()) <= self.tol:
            self.first_pareto_step = step
        if jumped or step % self.every == 0:
            self._push(step, x)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._push(trainer.global_step, pl_module.x)


# ---------------------------------------------------------------------------------------- one run
def rescaled_betas(lr: float) -> tuple[float, float]:
    """Adam betas that keep the papers' run (lr ``1e-3``, betas ``(0.9, 0.999)``) in continuous time.

    One step at ``lr`` stands for ``s = lr / 1e-3`` of the papers' steps, so the moment averages must
    forget ``s`` times faster: ``1 - beta = s (1 - beta_paper)``, clipped at 0. ``lr = 1e-2``: ``(0.0, 0.99)``.
    """
    s = lr / PAPER_LR
    return tuple(round(max(0.0, 1.0 - s * (1.0 - beta)), 12) for beta in PAPER_BETAS)  # type: ignore[return-value]


def cost_settings(steps: int, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The :class:`SymmetryTeleportCallback` arguments on the toy (:data:`TOY_COST`, a warm-up of
    ``TOY_WARMUP_FRACTION`` of ``steps``) for a run of ``steps``, ``overrides`` merged over them."""
    kw = deep_merge(TOY_COST, {"schedule": {"warmup_steps": int(TOY_WARMUP_FRACTION * steps)}})
    return deep_merge(kw, overrides or {})


def run_one(method: str, init: Sequence[float], cost: bool, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
            betas: Sequence[float] | None = None, l1_scale: float | None = None, record_every: int = 10,
            tol: float = PARETO_TOL, cost_overrides: dict[str, Any] | None = None,
            callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train one method from one init, with or without COST, through a Lightning ``Trainer``.

    ``betas=None`` uses :func:`rescaled_betas` of ``lr``; ``l1_scale=None`` the papers' factor for the
    method (:data:`PAPER_L1_SCALE`, else 1); ``cost_overrides`` change :data:`TOY_COST`; ``callbacks``
    are added to the trainer's. Returns the run's record (see :func:`run_sweep`) with its trajectory
    under ``"trajectory"``.
    """
    scale = PAPER_L1_SCALE.get(method, 1.0) if l1_scale is None else float(l1_scale)
    clip = PAPER_CLIP.get(method) if l1_scale is None else None
    b = rescaled_betas(lr) if betas is None else (float(betas[0]), float(betas[1]))
    model = ToyMTL(init, method=method, l1_scale=scale, lr=lr, betas=b, **method_hparams(method, scale))
    recorder = TrajectoryRecorder(every=record_every, tol=tol)
    cbs: list[L.Callback] = [recorder, *callbacks]
    teleporter = SymmetryTeleportCallback(**cost_settings(steps, cost_overrides)) if cost else None
    if teleporter is not None:
        cbs.append(teleporter)
    with quiet():
        trainer = L.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, max_epochs=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0, callbacks=cbs,
            gradient_clip_val=clip,
        )
        start = time.perf_counter()
        trainer.fit(model, train_dataloaders=dummy_loader(steps))
        seconds = time.perf_counter() - start
    x = model.x.detach().double()
    dist = float(pareto_distance(x))
    return {
        "method": method,
        "cost": bool(cost),
        "init": [float(v) for v in init],
        "l1_scale": scale,
        "gradient_clip": clip,
        "steps": int(trainer.global_step),
        "final_x": x.tolist(),
        "final_losses": toy_losses(x).tolist(),
        "final_pareto_distance": dist,
        "final_on_pareto": dist <= tol,
        "reached_pareto": recorder.first_pareto_step is not None,
        "first_pareto_step": recorder.first_pareto_step,
        "teleports": teleporter.num_teleports if teleporter is not None else 0,
        "teleports_rejected": teleporter.num_rejected if teleporter is not None else 0,
        "teleport_events": recorder.teleports,
        "skipped_steps": int(model.mtl_skipped_steps),
        "seconds": seconds,
        "trajectory": {"steps": recorder.steps, "x": recorder.xs, "losses": recorder.losses},
    }


#: Rough relative cost of a run per method (orders the parallel sweep).
_COST_RANK = {"nashmtl": 6, "fairgrad": 3, "cagrad": 3, "mgda": 2, "pcgrad": 2}


def _run_job(job: dict[str, Any]) -> dict[str, Any]:
    torch.set_num_threads(1)
    return run_one(**job)


# ---------------------------------------------------------------------------------------- the sweep
def init_key(init: Sequence[float]) -> str:
    return f"({float(init[0]):g}, {float(init[1]):g})"


def run_sweep(out: str | Path, methods: Sequence[str] = METHODS, inits: Sequence[Sequence[float]] = INITS,
              steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR, betas: Sequence[float] | None = None,
              l1_scale: float | None = None, flags: Sequence[bool] = (False, True), record_every: int = 10,
              tol: float = PARETO_TOL, jobs: int = 1, plot: bool = True, echo: bool = True) -> dict[str, Any]:
    """Every method x flag x init; writes ``toy_summary.json``, ``toy_trajectories.json`` and ``toy.png``.

    ``toy_summary.json``::

        {"config": {steps, lr, betas, optimizer, record_every, jobs, wall_seconds, versions,
                    pareto: {x1, x2, tol, distance}, l1_scale: {method: factor}, methods,
                    inits, method_hparams: {method: {...}}, cost: {callback arguments}},
         "results": {method: {"baseline" | "cost": {"(x1, x2)": run}}},
         "counts": {method: {"baseline" | "cost": number of inits that reached the Pareto set}}}

    ``run`` = ``{init, l1_scale, steps, final_x: [x1, x2], final_losses: [L1, L2] (unscaled),
    final_pareto_distance, final_on_pareto, reached_pareto, first_pareto_step (null if never),
    teleports (accepted), teleports_rejected, teleport_events: [{step, accepted, reason, losses_before,
    losses_after (as trained, i.e. scaled), x_before, x_after (accepted only), ...}], skipped_steps,
    seconds}``. ``toy_trajectories.json`` holds ``{"config": ..., "runs": [run + method, cost,
    trajectory: {steps, x, losses (unscaled)}]}``.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    betas = tuple(rescaled_betas(lr) if betas is None else (float(betas[0]), float(betas[1])))
    todo = [dict(method=m, init=tuple(i), cost=f, steps=steps, lr=lr, betas=betas, l1_scale=l1_scale,
                 record_every=record_every, tol=tol)
            for m in methods for f in flags for i in inits]
    start = time.perf_counter()
    runs: list[dict[str, Any]] = []
    if jobs > 1:
        import multiprocessing as mp

        # Longest runs first (Nash-MTL's solver, then the teleporting runs) so that the pool ends together.
        order = sorted(range(len(todo)),
                       key=lambda i: (-_COST_RANK.get(todo[i]["method"], 1) - todo[i]["cost"], i))
        with mp.get_context("spawn").Pool(jobs) as pool:
            for r in pool.imap_unordered(_run_job, [todo[i] for i in order]):
                runs.append(r)
                if echo:
                    _echo(r, len(runs), len(todo))
        rank = {(j["method"], j["cost"], tuple(j["init"])): i for i, j in enumerate(todo)}
        runs.sort(key=lambda r: rank[(r["method"], r["cost"], tuple(r["init"]))])
    else:
        for job in todo:
            runs.append(run_one(**job))
            if echo:
                _echo(runs[-1], len(runs), len(todo))
    wall = time.perf_counter() - start
    scales = {m: (PAPER_L1_SCALE.get(m, 1.0) if l1_scale is None else float(l1_scale)) for m in methods}
    clips = {m: (PAPER_CLIP.get(m) if l1_scale is None else None) for m in methods}
    config = {
        "steps": steps, "lr": lr, "betas": list(betas), "optimizer": "Adam", "record_every": record_every,
        "jobs": jobs, "wall_seconds": wall,
        "versions": {"torch": torch.__version__, "lightning": L.__version__, "python": platform.python_version()},
        "pareto": {"x1": list(PARETO_X1), "x2": PARETO_X2, "tol": tol,
                   "distance": "euclidean distance to the segment, checked after every optimizer step"},
        "l1_scale": scales, "gradient_clip": clips, "methods": list(methods),
        "inits": [[float(v) for v in i] for i in inits],
        "method_hparams": {m: {k: (list(v) if isinstance(v, tuple) else v)
                               for k, v in method_hparams(m, scales[m]).items()} for m in methods},
        "cost": cost_settings(steps),
    }
    summary = _summarise(config, runs)
    (out / "toy_summary.json").write_text(json.dumps(summary, indent=1))
    (out / "toy_trajectories.json").write_text(json.dumps({"config": config, "runs": runs}))
    if plot:
        plot_results(runs, out / "toy.png")
    return summary


def _summarise(config: dict[str, Any], runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    results: dict[str, dict[str, dict[str, Any]]] = {}
    counts: dict[str, dict[str, int]] = {}
    for r in runs:
        flag = "cost" if r["cost"] else "baseline"
        rec = {k: v for k, v in r.items() if k not in ("trajectory", "method", "cost")}
        results.setdefault(r["method"], {}).setdefault(flag, {})[init_key(r["init"])] = rec
        counts.setdefault(r["method"], {}).setdefault(flag, 0)
        counts[r["method"]][flag] += int(r["reached_pareto"])
    return {"config": config, "results": results, "counts": counts}


def _echo(r: dict[str, Any], i: int, n: int) -> None:
    step = r["first_pareto_step"]
    tele = f"teleports {r['teleports']}/{r['teleports'] + r['teleports_rejected']}" if r["cost"] else ""
    print(f"[{i:>2}/{n}] {LABELS.get(r['method'], r['method']):>8} {'+COST' if r['cost'] else '     '} "
          f"{init_key(r['init']):>12} -> ({r['final_x'][0]:7.3f}, {r['final_x'][1]:7.3f}) "
          f"{'Pareto @ ' + str(step) if step is not None else 'not on Pareto':<16} {tele:<16} "
          f"{r['seconds']:5.1f}s", flush=True)


# ---------------------------------------------------------------------------------------- outputs
def results_table(summary: dict[str, Any]) -> str:
    """A compact plain-text table: per method and flag, each init's first step on the Pareto set
    (``ok@step``) or its final distance to it (``no d=...``), the number of inits that reached it, the
    accepted teleports and the optimizer steps the training core skipped (failed aggregation), summed
    over the inits."""
    cfg = summary["config"]
    inits = [init_key(i) for i in cfg["inits"]]
    head = (f"{'method':<16}" + "".join(f"{k:>14}" for k in inits)
            + f"{'reached':>9}{'teleports':>11}{'skipped':>9}")
    lines = [head, "-" * len(head)]
    for method, by_flag in summary["results"].items():
        for flag in ("baseline", "cost"):
            if flag not in by_flag:
                continue
            cells, tele, skipped = [], 0, 0
            for k in inits:
                r = by_flag[flag].get(k)
                if r is None:
                    cells.append("-")
                    continue
                tele += r["teleports"]
                skipped += r["skipped_steps"]
                cells.append(f"ok@{r['first_pareto_step']}" if r["reached_pareto"]
                             else f"no d={r['final_pareto_distance']:.2f}")
            name = LABELS.get(method, method) + (" +COST" if flag == "cost" else "")
            n = sum(1 for k in inits if k in by_flag[flag])
            lines.append(f"{name:<16}" + "".join(f"{c:>14}" for c in cells)
                         + f"{summary['counts'][method][flag]:>6}/{n}" + f"{tele if flag == 'cost' else '':>11}"
                         + f"{skipped:>9}")
    return "\n".join(lines)


def plot_results(runs: Sequence[dict[str, Any]], path: str | Path, extent: float = 10.5) -> None:
    """Row 1: contours of ``(L1 + L2) / 2`` with the trajectories, one panel per method (title: inits that
    reached the Pareto set without | with COST); row 2: the same runs in loss space ``(L1, L2)`` (unscaled).
    Colour = init; solid = without COST, dashed = with COST; small black dots = where accepted teleports
    landed; large black dots = the inits; end markers: square = reached the Pareto set, cross = did not
    (hollow with COST); grey band = the Pareto set (its image in loss space)."""
    import matplotlib
    import numpy as np
    from matplotlib.figure import Figure  # no pyplot: the caller's backend (e.g. Jupyter's) is left alone

    methods = list(dict.fromkeys(r["method"] for r in runs))
    inits = list(dict.fromkeys(tuple(r["init"]) for r in runs))
    colors = matplotlib.colormaps["tab10"]
    n = len(methods)
    fig = Figure(figsize=(3.2 * n, 6.6))
    axes = fig.subplots(2, n, squeeze=False)

    grid = torch.linspace(-extent, extent, 241, dtype=torch.float64)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    lz = toy_losses(torch.stack([gx, gy], dim=-1))
    mean = lz.mean(-1).numpy()
    front_x1 = torch.linspace(PARETO_X1[0], PARETO_X1[1], 200, dtype=torch.float64)
    front = toy_losses(torch.stack([front_x1, torch.full_like(front_x1, PARETO_X2)], dim=-1)).numpy()

    for col, method in enumerate(methods):
        ax, bx = axes[0, col], axes[1, col]
        ax.contour(gx.numpy(), gy.numpy(), mean, levels=20, cmap="viridis", linewidths=0.6, alpha=0.7)
        ax.plot(PARETO_X1, [PARETO_X2, PARETO_X2], color="grey", linewidth=5, alpha=0.5, zorder=1)
        bx.plot(front[:, 0], front[:, 1], color="grey", linewidth=5, alpha=0.5, zorder=1)
        for r in runs:
            if r["method"] != method:
                continue
            c = colors(inits.index(tuple(r["init"])) % 10)
            ls = "--" if r["cost"] else "-"
            xs = np.asarray(r["trajectory"]["x"])
            lo = np.asarray(r["trajectory"]["losses"])
            ax.plot(xs[:, 0], xs[:, 1], ls, color=c, linewidth=1.3 if r["cost"] else 1.8, zorder=3)
            bx.plot(lo[:, 0], lo[:, 1], ls, color=c, linewidth=1.3 if r["cost"] else 1.8, zorder=3)
            ax.plot(*r["init"], "o", color="k", markersize=4, zorder=5)
            end = "s" if r["reached_pareto"] else "X"
            ax.plot(xs[-1, 0], xs[-1, 1], end, color=c, markersize=5, markerfacecolor="none" if r["cost"] else c,
                    zorder=6)
            jumps = [ev["x_after"] for ev in r.get("teleport_events", [])
                     if ev.get("accepted") and "x_after" in ev]
            if jumps:  # the jumps themselves are tiny on this problem: mark where they land
                ax.plot(*np.asarray(jumps).T, ".", color="k", markersize=2, alpha=0.5, zorder=4)
        reached = {f: sum(r["reached_pareto"] for r in runs if r["method"] == method and r["cost"] == f)
                   for f in (False, True)}
        n_inits = sum(1 for r in runs if r["method"] == method and not r["cost"])
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.set_title(f"{LABELS.get(method, method)}: {reached[False]}/{n_inits} | +COST {reached[True]}/{n_inits}",
                     fontsize=10)
        ax.set_xlabel("x1")
        bx.set_xlabel("L1")
        bx.set_title("loss space")
        if col == 0:
            ax.set_ylabel("x2")
            bx.set_ylabel("L2")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors(i % 10), label=f"init {init_key(v)}") for i, v in enumerate(inits)]
    handles += [Line2D([], [], color="k", linestyle="-", label="without COST"),
                Line2D([], [], color="k", linestyle="--", label="with COST"),
                Line2D([], [], color="k", linestyle="", marker=".", markersize=3, label="accepted teleport"),
                Line2D([], [], color="grey", linewidth=5, alpha=0.5, label="Pareto set")]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), max(3, int(3.2 * n / 1.6))), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path, dpi=110)


# ---------------------------------------------------------------------------------------- CLI
def _parse_init(s: str) -> tuple[float, float]:
    if "," in s:
        a, b = s.strip("()").split(",")
        return float(a), float(b)
    return INITS[int(s)]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(prog="python -m benchmarks.toy", description=(__doc__ or "").split("\n")[0])
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"optimizer steps per run ({DEFAULT_STEPS})")
    p.add_argument("--lr", type=float, default=DEFAULT_LR, help=f"Adam learning rate ({DEFAULT_LR:g})")
    p.add_argument("--betas", type=float, nargs=2, default=None,
                   help="Adam betas (default: rescaled to lr, see rescaled_betas; (0.9, 0.999) at lr 1e-3)")
    p.add_argument("--out", type=Path, default=Path("toy_out"), help="output folder")
    p.add_argument("--methods", nargs="+", default=list(METHODS), help=f"registry names ({' '.join(METHODS)})")
    p.add_argument("--inits", nargs="+", default=None,
                   help="indices into INITS (0-4) or 'x1,x2' (default: all five)")
    p.add_argument("--flags", choices=("both", "baseline", "cost"), default="both", help="with/without COST")
    p.add_argument("--l1-scale", default="paper",
                   help="'paper' (0.1 for nashmtl and famo, 1 for the others) or one number for every method")
    p.add_argument("--record-every", type=int, default=10, help="record x every N steps (10)")
    p.add_argument("--tol", type=float, default=PARETO_TOL, help=f"Pareto-set distance tolerance ({PARETO_TOL})")
    p.add_argument("--jobs", type=int, default=2, help="parallel runs, one process each (2)")
    p.add_argument("--replot", action="store_true", help="only redraw toy.png and the table from DIR")
    a = p.parse_args(argv)
    if a.replot:
        data = json.loads((a.out / "toy_trajectories.json").read_text())
        plot_results(data["runs"], a.out / "toy.png")
        summary = _summarise(data["config"], data["runs"])
        print(results_table(summary))
        return summary
    inits = INITS if a.inits is None else tuple(_parse_init(s) for s in a.inits)
    flags = {"both": (False, True), "baseline": (False,), "cost": (True,)}[a.flags]
    l1 = None if a.l1_scale == "paper" else float(a.l1_scale)
    betas = rescaled_betas(a.lr) if a.betas is None else tuple(a.betas)
    equiv = a.steps * a.lr / PAPER_LR
    setting = ("the papers' setting" if a.lr == PAPER_LR and tuple(betas) == PAPER_BETAS else
               f"time-rescaled: ~{equiv:,.0f} steps of the papers' lr 1e-3 / betas (0.9, 0.999); the papers ran "
               f"35k-100k" if a.betas is None else "custom betas")
    print(f"Toy (COST paper Fig. 6) through Lightning: {len(a.methods)} methods x {len(flags)} flag(s) x "
          f"{len(inits)} init(s); Adam {a.steps} steps, lr {a.lr:g}, betas ({betas[0]:g}, {betas[1]:g}) "
          f"[{setting}]; l1_scale {a.l1_scale}; Pareto tolerance {a.tol:g}; jobs {a.jobs}", flush=True)
    # The toy runs on the CPU; with no GPU visible torch skips an NVML probe that Adam's step makes each time.
    os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
    summary = run_sweep(a.out, a.methods, inits, a.steps, a.lr, betas, l1, flags, a.record_every, a.tol, a.jobs)
    print(results_table(summary))
    print(f"wall time {summary['config']['wall_seconds']:.1f}s; wrote {a.out / 'toy_summary.json'}, "
          f"{a.out / 'toy_trajectories.json'}, {a.out / 'toy.png'}")
    return summary


if __name__ == "__main__":
    main()
