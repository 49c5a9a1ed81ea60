"""One training run (:func:`run_one`) through a Lightning ``Trainer``, and the callback recording its path."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
from torch import Tensor

from benchmarks.common import quiet
from benchmarks.runner.variants import teleport_records
from benchmarks.toy.model import ToyMTL, dummy_loader
from benchmarks.toy.problem import (
    PARETO_TOL,
    PARETO_X1,
    PARETO_X2,
    on_pareto_set,
    pareto_distance,
    toy_losses,
)
from benchmarks.toy.settings import (
    DEFAULT_LR,
    DEFAULT_STEPS,
    PAPER_CLIP,
    PAPER_L1_SCALE,
    cost_settings,
    method_hparams,
    rescaled_betas,
)
from lightning_cost import SymmetryTeleportCallback


def _distance(x1: float, x2: float) -> float:
    """:func:`pareto_distance` of one point, in plain floats (checked after every step)."""
    return math.hypot(max(abs(x1) - PARETO_X1[1], 0.0), x2 - PARETO_X2)


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


def run_one(method: str, init: Sequence[float], cost: bool, steps: int = DEFAULT_STEPS, lr: float = DEFAULT_LR,
            betas: Sequence[float] | None = None, l1_scale: float | None = None, record_every: int = 10,
            tol: float = PARETO_TOL, cost_overrides: dict[str, Any] | None = None,
            callbacks: Sequence[L.Callback] = ()) -> dict[str, Any]:
    """Train one method from one init, with or without COST, through a Lightning ``Trainer``.

    ``betas=None`` uses :func:`rescaled_betas` of ``lr``; ``l1_scale=None`` the papers' factor for the
    method (:data:`PAPER_L1_SCALE`, else 1); ``cost_overrides`` change :data:`TOY_COST`; ``callbacks``
    are added to the trainer's. Returns the run's record (see :func:`~benchmarks.toy.sweep.run_sweep`) with
    its trajectory under ``"trajectory"``.
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
