"""Task descriptions, masked losses and masked metrics for the multi-task benchmarks.

Every benchmark task is described by a :class:`TaskSpec`. The model returns one
output per task (``dict[name, logits]``, see :mod:`benchmarks.models`) and the
DataModules return targets ``[B, K]`` with one column per task, in the order of
``datamodule.task_specs``.

Missing labels
--------------
Some data sets (Tox21, ToxCast) have missing labels. They are stored as ``NaN``
in float targets; multiclass targets (integers) use any negative value (``-1``,
``-100``) for "missing". :func:`task_loss` averages over the labels that are
present only, and a batch with no label at all for a task returns
``(logits * 0).sum()``: a zero that is still connected to the graph, so that a
per-task ``autograd.grad``/Jacobian (which the gradient aggregators compute)
gives a zero gradient instead of raising.

Losses
------
* ``multiclass``: cross-entropy on ``[B, C]`` logits and integer targets.
* ``binary``: binary cross-entropy with logits on ``[B]`` (or ``[B, 1]``) logits.
* ``regression``: mean squared error on standardised targets by default
  (``regression_loss="mse"``). MSE is the usual training loss for MoleculeNet
  regression (chemprop, MoleculeNet baselines); QM8 results are *reported* as MAE
  (the metric, see below), in the original units. ``regression_loss="l1"``
  trains on MAE directly.

Metrics
-------
:func:`make_task_metric` returns a torchmetrics metric that takes the raw model
output and the raw (possibly missing) target and masks missing labels itself:
accuracy for multiclass, ROC-AUC for binary tasks (the multi-label and Tox21 labels
are strongly imbalanced -- a few percent positives for many tasks -- so accuracy
would reward always answering 0), MAE for regression (in original units: the
standardisation scale ``TaskSpec.target_std`` is undone). A metric that saw no
usable sample (or, for AUROC, only one class) computes to ``NaN`` instead of a
misleading 0, so averaging over tasks should use ``nanmean``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import MeanAbsoluteError, Metric
from torchmetrics.classification import BinaryAUROC, MulticlassAccuracy
from torchmetrics.utilities import dim_zero_cat

from lightning_cost.losses import masked_loss, present_labels, squeeze_column

__all__ = [
    "TaskKind",
    "TaskSpec",
    "task_loss",
    "task_losses",
    "make_task_metric",
    "make_task_metrics",
    "update_task_metric",
    "present_mask",
    "MaskedMulticlassAccuracy",
    "MaskedBinaryAUROC",
    "MaskedMeanAbsoluteError",
]

TaskKind = Literal["multiclass", "binary", "regression"]
_KINDS = ("multiclass", "binary", "regression")
_DEFAULT_METRIC = {"multiclass": "accuracy", "binary": "auroc", "regression": "mae"}


@dataclass(frozen=True)
class TaskSpec:
    """Description of one task of a multi-task benchmark.

    Args:
        name: task name; used as the key of the model's head ``ModuleDict`` and
            of the output dict, so it must be non-empty and contain no ``.``.
        kind: ``"multiclass"``, ``"binary"`` or ``"regression"``.
        num_classes: number of classes for ``multiclass``; ``None`` otherwise.
        metric: name of the evaluation metric (``"accuracy"``, ``"auroc"``, ``"mae"``).
        higher_is_better: direction of ``metric`` (for model selection).
        target_mean, target_std: for regression targets that were standardised
            with train statistics, ``original = standardised * target_std + target_mean``;
            the MAE metric reports errors in original units. Defaults: identity.
    """

    name: str
    kind: TaskKind
    num_classes: int | None
    metric: str
    higher_is_better: bool
    target_mean: float = 0.0
    target_std: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or "." in self.name:
            raise ValueError(f"invalid task name {self.name!r}: must be non-empty and contain no '.'")
        if self.kind not in _KINDS:
            raise ValueError(f"task {self.name!r}: kind must be one of {_KINDS}, got {self.kind!r}")
        if self.kind == "multiclass":
            if self.num_classes is None or self.num_classes < 2:
                raise ValueError(f"task {self.name!r}: multiclass needs num_classes >= 2")
        elif self.num_classes is not None:
            raise ValueError(f"task {self.name!r}: num_classes must be None for {self.kind} tasks")
        if not (self.target_std > 0 and math.isfinite(self.target_std)):
            raise ValueError(f"task {self.name!r}: target_std must be positive and finite")

    @property
    def out_features(self) -> int:
        """Width of the head's output layer: ``num_classes`` or 1."""
        return int(self.num_classes) if self.kind == "multiclass" else 1

    @classmethod
    def multiclass(cls, name: str, num_classes: int) -> TaskSpec:
        return cls(name, "multiclass", num_classes, "accuracy", True)

    @classmethod
    def binary(cls, name: str) -> TaskSpec:
        return cls(name, "binary", None, "auroc", True)

    @classmethod
    def regression(cls, name: str, target_mean: float = 0.0, target_std: float = 1.0) -> TaskSpec:
        return cls(name, "regression", None, "mae", False, float(target_mean), float(target_std))


# --------------------------------------------------------------------------- masking helpers


def present_mask(spec: TaskSpec, target: Tensor) -> Tensor:
    """Boolean mask of the samples whose label for this task is present
    (:func:`lightning_cost.losses.present_labels`)."""
    return present_labels(target, spec.kind)


def _shaped(spec: TaskSpec, logits: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Shape-normalise ``(logits, target)``, with errors that name the task."""
    if spec.kind == "multiclass":
        if logits.dim() != 2 or logits.shape[1] != spec.num_classes:
            raise ValueError(
                f"task {spec.name!r}: expected logits [B, {spec.num_classes}], got {tuple(logits.shape)}"
            )
        if target.dim() == 2 and target.shape[1] == 1:
            target = target[:, 0]
    else:
        logits = squeeze_column(logits)
        target = squeeze_column(target)
    if target.shape[0] != logits.shape[0]:
        raise ValueError(f"task {spec.name!r}: batch sizes differ ({logits.shape[0]} vs {target.shape[0]})")
    return logits, target


# --------------------------------------------------------------------------- losses


def task_loss(spec: TaskSpec, logits: Tensor, target: Tensor, regression_loss: str = "mse") -> Tensor:
    """Scalar loss of one task, averaged over the samples whose label is present.

    Args:
        spec: the task.
        logits: model output for the task: ``[B, C]`` (multiclass) or ``[B]``/``[B, 1]``.
        target: ``[B]`` (or ``[B, 1]``) labels; ``NaN`` (float) or negative (int) = missing.
        regression_loss: ``"mse"`` (default) or ``"l1"``.

    Returns:
        A 0-dim tensor. With no present label it is ``(logits * 0).sum()``: zero,
        but with a grad path to the parameters (zero gradient).
    """
    logits, target = _shaped(spec, logits, target)  # masked_loss takes the mask itself
    return masked_loss(logits, target, spec.kind, regression_loss=regression_loss)  # type: ignore[arg-type]


def task_losses(
    specs: list[TaskSpec] | tuple[TaskSpec, ...],
    outputs: dict[str, Tensor],
    targets: Tensor,
    regression_loss: str = "mse",
) -> Tensor:
    """Stack the per-task losses: ``outputs[spec.name]`` against ``targets[:, k]``; returns ``[K]``."""
    if targets.dim() != 2 or targets.shape[1] != len(specs):
        raise ValueError(f"expected targets [B, {len(specs)}], got {tuple(targets.shape)}")
    return torch.stack(
        [task_loss(s, outputs[s.name], targets[:, k], regression_loss) for k, s in enumerate(specs)]
    )


# --------------------------------------------------------------------------- metrics


class MaskedMulticlassAccuracy(MulticlassAccuracy):
    """Micro accuracy from logits; negative/NaN targets are ignored; ``NaN`` when empty."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        mask = ~torch.isnan(target) & (target >= 0) if target.is_floating_point() else target >= 0
        if target.dim() == 2 and target.shape[1] == 1:
            target, mask = target[:, 0], mask[:, 0]
        if bool(mask.any()):
            super().update(preds[mask], target[mask].long())

    def compute(self) -> Tensor:
        if float((self.tp + self.fn).sum()) == 0:
            return torch.tensor(float("nan"), device=self.tp.device)
        return super().compute()


class MaskedBinaryAUROC(BinaryAUROC):
    """ROC-AUC from logits (a sigmoid is applied); NaN targets are ignored.

    Computes to ``NaN`` when the accumulated targets hold fewer than two classes
    (torchmetrics would return 0 with a warning).
    """

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        preds, target = squeeze_column(preds), squeeze_column(target)
        mask = ~torch.isnan(target) if target.is_floating_point() else target >= 0
        if bool(mask.any()):
            super().update(torch.sigmoid(preds[mask].float()), target[mask].long())

    def compute(self) -> Tensor:
        tgt = self.target
        if isinstance(tgt, list) and len(tgt) == 0:
            return torch.tensor(float("nan"))
        tgt = dim_zero_cat(tgt)
        if tgt.numel() == 0 or bool((tgt == tgt.flatten()[0]).all()):
            return torch.tensor(float("nan"), device=tgt.device)
        return super().compute()


class MaskedMeanAbsoluteError(MeanAbsoluteError):
    """MAE in original units: NaN targets are ignored and errors are multiplied by ``scale``.

    With standardised targets ``y_std = (y - mean) / std``, ``|p_std - y_std| * std``
    is the absolute error in original units. ``NaN`` when empty.
    """

    def __init__(self, scale: float = 1.0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.scale = float(scale)

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        preds, target = squeeze_column(preds), squeeze_column(target)
        mask = ~torch.isnan(target)
        if bool(mask.any()):
            super().update(preds[mask].float() * self.scale, target[mask].float() * self.scale)

    def compute(self) -> Tensor:
        if float(self.total) == 0:
            return torch.tensor(float("nan"), device=self.sum_abs_error.device)
        return super().compute()


def make_task_metric(spec: TaskSpec) -> Metric:
    """A fresh torchmetrics metric for the task (see the module docstring).

    The metric's ``update(logits, target)`` takes the raw model output and raw
    targets and masks missing labels itself.
    """
    if spec.kind == "multiclass":
        return MaskedMulticlassAccuracy(num_classes=int(spec.num_classes), average="micro")
    if spec.kind == "binary":
        return MaskedBinaryAUROC()
    return MaskedMeanAbsoluteError(scale=spec.target_std)


def make_task_metrics(specs, prefix: str = "") -> dict[str, Metric]:
    """``{prefix + name: metric}`` for all tasks (wrap in a ``torchmetrics.MetricCollection``
    or ``nn.ModuleDict`` to move them with the LightningModule)."""
    return {f"{prefix}{s.name}": make_task_metric(s) for s in specs}


def update_task_metric(metric: Metric, spec: TaskSpec, logits: Tensor, target: Tensor) -> None:
    """Update ``metric`` with one batch of one task, leaving out missing labels.

    Works with the metrics of :func:`make_task_metric` and with plain torchmetrics
    metrics (for those, binary logits are turned into probabilities here; a plain
    regression metric sees standardised values).
    """
    logits, target = _shaped(spec, logits.detach(), target)
    mask = present_mask(spec, target)
    if isinstance(metric, MaskedMulticlassAccuracy | MaskedBinaryAUROC | MaskedMeanAbsoluteError):
        metric.update(logits, target)
        return
    if not bool(mask.any()):
        return
    lg, tg = logits[mask], target[mask]
    if spec.kind == "multiclass":
        metric.update(lg, tg.long())
    elif spec.kind == "binary":
        metric.update(torch.sigmoid(lg.float()), tg.long())
    else:
        metric.update(lg.float(), tg.float())
