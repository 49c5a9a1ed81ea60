"""What each teleport did, measured on the same batches before and after, and the per-epoch trigger counts."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import lightning as L
import torch
from torch import Tensor

from lightning_cost.teleport.trigger import ConflictTrigger

__all__ = ["GradientStats", "TeleportLog", "TeleportRecord"]


@dataclass(frozen=True)
class GradientStats:
    """The gradient statistics a teleport is meant to change (eqs. 3-6), from a ``K x P`` Jacobian."""

    task_norms: list[float]
    mean_norm: float  # ||g_0||, g_0 the mean task gradient
    cosines: list[float]  # cos(g_i, g_0); NaN for a zero task gradient
    min_cos: float
    conflicts: int  # tasks counted by the trigger's rule

    @classmethod
    def of(cls, jacobian: Tensor, trigger: ConflictTrigger) -> GradientStats:
        j = jacobian.double()
        decision = trigger(jacobian)
        cos = decision.cosines
        finite = cos[~torch.isnan(cos)]
        return cls(task_norms=j.norm(dim=1).tolist(), mean_norm=float(j.mean(dim=0).norm()), cosines=cos.tolist(),
                   min_cos=float(finite.min()) if finite.numel() else float("nan"),
                   conflicts=decision.num_conflicting)


@dataclass
class TeleportRecord:
    """One teleport attempt. Losses and gradients are global (averaged over DDP ranks) and measured with
    dropout off on the same batches before and after; ``*_after`` fields are ``None`` when the teleport
    was rejected, not applied, or the callback was asked not to measure. ``applied``: the state transfer
    ran and the step was dropped (the weights moved, or a control teleporter such as ``"null"``, named
    in ``teleporter``, was accepted: ``applied`` without ``moved``)."""

    step: int
    epoch: int
    teleporter: str
    forced: bool = False
    accepted: bool = False
    moved: bool = False
    applied: bool = False
    reason: str = ""
    seconds: float = 0.0
    trigger_conflicts: int | None = None
    losses_before: list[float] = field(default_factory=list)
    losses_after: list[float] | None = None
    loss_drift: float | None = None  # max_i |L_i - L_i*| / |L_i*|
    loss_tolerance: float | None = None  # the relative tolerance the acceptance test applied ("auto" resolved)
    displacement_norm: float | None = None
    displacement_rel: float | None = None  # ||dtheta|| / ||theta|| over the teleported parameters
    before: GradientStats | None = None
    after: GradientStats | None = None
    sigma: float | None = None  # eq. 12, when the state transfer computes it
    transfer: str = ""
    trace: list[dict[str, float]] = field(default_factory=list)  # per inner step of a search

    @property
    def grad_norm_ratio(self) -> float | None:
        """``||g_0||`` after over before."""
        if self.before is None or self.after is None or self.before.mean_norm == 0:
            return None
        return self.after.mean_norm / self.before.mean_norm

    @property
    def min_cos_change(self) -> float | None:
        if self.before is None or self.after is None:
            return None
        return self.after.min_cos - self.before.min_cos

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TeleportRecord:
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in data.items() if k in known}
        kw.setdefault("applied", bool(kw.get("moved", False)))  # records written before controls existed
        for key in ("before", "after"):
            if isinstance(kw.get(key), dict):
                kw[key] = GradientStats(**kw[key])
        return cls(**kw)


class TeleportLog:
    """The teleport history, the counters the schedule reads, per-epoch trigger statistics, and the
    scalars logged under ``teleport/``. Its state travels in the callback's checkpoint."""

    def __init__(self) -> None:
        self.history: list[TeleportRecord] = []
        self.epoch_stats: list[dict[str, Any]] = []
        self.num_teleports = 0  # applied: accepted and moved, or a control's accepted attempt
        self.num_rejected = 0
        self.num_unmoved = 0  # accepted, not applied
        self.last_step: int | None = None
        self._epoch = self._fresh_epoch()

    @staticmethod
    def _fresh_epoch() -> dict[str, int]:
        return {"checked": 0, "conflicting": 0, "attempts": 0, "teleports": 0}

    @property
    def attempts_this_epoch(self) -> int:
        return self._epoch["attempts"]

    def start_epoch(self) -> None:
        self._epoch = self._fresh_epoch()

    def count_check(self, fired: bool) -> None:
        self._epoch["checked"] += 1
        self._epoch["conflicting"] += int(fired)

    def add(self, record: TeleportRecord, trainer: L.Trainer) -> None:
        self.history.append(record)
        self._epoch["attempts"] += 1
        self.last_step = record.step
        if not record.accepted:
            self.num_rejected += 1
        elif not record.applied:
            self.num_unmoved += 1
        else:
            self.num_teleports += 1
            self._epoch["teleports"] += 1
        _log(trainer, {
            "teleport/accepted": float(record.accepted), "teleport/moved": float(record.moved),
            "teleport/applied": float(record.applied),
            "teleport/count": float(self.num_teleports), "teleport/seconds": record.seconds,
            "teleport/loss_drift": record.loss_drift, "teleport/displacement_rel": record.displacement_rel,
            "teleport/grad_norm_ratio": record.grad_norm_ratio, "teleport/min_cos_change": record.min_cos_change,
            "teleport/sigma": record.sigma,
        })

    def end_epoch(self, trainer: L.Trainer) -> None:
        checked = self._epoch["checked"]
        stats = {"epoch": int(trainer.current_epoch), **self._epoch,
                 "trigger_ratio": self._epoch["conflicting"] / checked if checked else 0.0}
        self.epoch_stats.append(stats)
        _log(trainer, {"teleport/trigger_ratio": stats["trigger_ratio"],
                       "teleport/epoch_teleports": float(stats["teleports"])})

    def state_dict(self) -> dict[str, Any]:
        return {"history": [r.to_dict() for r in self.history], "epoch_stats": [dict(e) for e in self.epoch_stats],
                "num_teleports": self.num_teleports, "num_rejected": self.num_rejected,
                "num_unmoved": self.num_unmoved, "last_step": self.last_step, "epoch_counts": dict(self._epoch)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [TeleportRecord.from_dict(r) for r in state["history"]]
        self.epoch_stats = [dict(e) for e in state["epoch_stats"]]
        self.num_teleports, self.num_rejected = int(state["num_teleports"]), int(state["num_rejected"])
        self.num_unmoved = int(state.get("num_unmoved", 0))
        self.last_step = state["last_step"]
        self._epoch = {**self._fresh_epoch(), **state["epoch_counts"]}


def _log(trainer: L.Trainer, metrics: dict[str, float | None]) -> None:
    if not trainer.is_global_zero:
        return
    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    for logger in trainer.loggers:
        logger.log_metrics(clean, step=trainer.global_step)
