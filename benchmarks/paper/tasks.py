"""Losses and metrics of the paper's benchmarks (CityScapes, NYUv2, CelebA, QM9; COST paper Sec. 5).

The tasks are ordinary :class:`~benchmarks.data.tasks.TaskSpec`\\ s; what makes them "paper tasks" is the
``metric`` field, which selects the loss and the set of reported metrics here:

==================  ===============================  =====================================================
``spec.metric``     loss (:func:`paper_task_loss`)    metrics (:func:`make_paper_metric`), direction
==================  ===============================  =====================================================
``"miou"``          pixel cross-entropy,              ``miou`` (up), ``pixacc`` (up): torchmetrics
(segmentation)      label ``-1`` ignored              ``MulticlassJaccardIndex`` (macro over the classes
                                                      present in prediction or target) and
                                                      ``MulticlassAccuracy`` (micro), ``ignore_index=-1``
``"abs_err"``       L1 over pixels with depth != 0    ``abs_err`` (down), ``rel_err`` (down):
(depth)                                               ``|p - d|`` and ``|p - d| / d`` over pixels with
                                                      ``d != 0``
``"mean_angle"``    ``1 - cos`` (prediction unit-     ``mean_angle``, ``median_angle`` (down, degrees),
(surface normal)    normalised) over pixels whose     ``within_11_25``, ``within_22_5``, ``within_30``
                    normal is not all zero            (up, fraction of pixels below the angle)
``"f1"``            BCE with logits                   ``f1`` (up): torchmetrics ``BinaryF1Score`` at 0.5
(binary attribute)                                    on the sigmoid (the CelebA metric of FairGrad/FAMO)
anything else       :func:`benchmarks.data.tasks.task_loss`  the spec's own metric
                                                      (:func:`benchmarks.data.tasks.make_task_metric`)
==================  ===============================  =====================================================

All errors and fractions are accumulated over every valid pixel of the evaluated split (a
dataset-level average; the MTAN/LibMTL scripts average per-batch means, which differs only in
how a partial last batch is weighted). Fractions stay fractions (the paper's tables print them
as percentages); Delta-m% (eq. 14) is unaffected by the unit. The median angle comes from a
histogram with 0.01 degree bins (exact to 0.01 degree, constant memory, DDP-reducible).

Shapes: segmentation logits ``[B, C, H, W]`` with labels ``[B, H, W]`` (integer-valued, ``-1`` =
ignore); depth ``[B, 1, H, W]`` against ``[B, 1, H, W]`` (or ``[B, H, W]``); normals ``[B, 3, H, W]``
against ``[B, 3, H, W]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.classification import BinaryF1Score, MulticlassAccuracy, MulticlassJaccardIndex

from benchmarks.data.tasks import TaskSpec, make_task_metric, task_loss

__all__ = [
    "DENSE_METRICS",
    "METRIC_DIRECTIONS",
    "segmentation_task",
    "depth_task",
    "normal_task",
    "attribute_task",
    "paper_task_loss",
    "make_paper_metric",
    "TaskMetrics",
    "DepthErrors",
    "NormalAngleErrors",
]

IGNORE_INDEX = -1

#: every metric name this module reports -> higher is better
METRIC_DIRECTIONS: dict[str, bool] = {
    "miou": True,
    "pixacc": True,
    "abs_err": False,
    "rel_err": False,
    "mean_angle": False,
    "median_angle": False,
    "within_11_25": True,
    "within_22_5": True,
    "within_30": True,
    "f1": True,
}
#: the primary metric of a dense task -> the task's kind
DENSE_METRICS = {"miou": "segmentation", "abs_err": "depth", "mean_angle": "normal"}


# --------------------------------------------------------------------------- task constructors


def segmentation_task(num_classes: int, name: str = "segmentation") -> TaskSpec:
    return TaskSpec(name, "multiclass", int(num_classes), "miou", True)


def depth_task(name: str = "depth") -> TaskSpec:
    return TaskSpec(name, "regression", None, "abs_err", False)


def normal_task(name: str = "normal") -> TaskSpec:
    return TaskSpec(name, "regression", None, "mean_angle", False)


def attribute_task(name: str) -> TaskSpec:
    """A binary attribute evaluated by F1 (CelebA)."""
    return TaskSpec(name, "binary", None, "f1", True)


# --------------------------------------------------------------------------- losses


def _check_dense(spec: TaskSpec, pred: Tensor, target: Tensor, channels: int | None) -> None:
    if pred.dim() != 4:
        raise ValueError(f"task {spec.name!r}: expected a [B, C, H, W] prediction, got {tuple(pred.shape)}")
    if channels is not None and pred.shape[1] != channels:
        raise ValueError(f"task {spec.name!r}: expected {channels} channels, got {tuple(pred.shape)}")
    if target.shape[0] != pred.shape[0] or target.shape[-2:] != pred.shape[-2:]:
        raise ValueError(
            f"task {spec.name!r}: prediction {tuple(pred.shape)} and target {tuple(target.shape)} do not match"
        )


def _as_map(target: Tensor, channels: int) -> Tensor:
    """``[B, H, W]`` -> ``[B, 1, H, W]`` for single-channel maps."""
    if target.dim() == 3 and channels == 1:
        return target.unsqueeze(1)
    return target


def _zero(pred: Tensor) -> Tensor:
    """A zero loss that keeps a graph to the parameters (see :func:`benchmarks.data.tasks.task_loss`)."""
    return (pred * 0).sum()


def segmentation_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean cross-entropy over the pixels whose label is not ``-1``."""
    labels = labels.long()
    if not bool((labels != IGNORE_INDEX).any()):
        return _zero(logits)
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX)


def depth_loss(pred: Tensor, depth: Tensor) -> Tensor:
    """Mean absolute error over the pixels with ``depth != 0`` (0 marks a missing depth)."""
    depth = _as_map(depth, 1).to(pred.dtype)
    mask = depth != 0
    if not bool(mask.any()):
        return _zero(pred)
    return (pred - depth).abs()[mask].mean()


def normal_loss(pred: Tensor, normal: Tensor) -> Tensor:
    """``1 - mean cos(pred, normal)`` over the pixels whose target normal is not all zero.

    The prediction is normalised to unit length here (the model's head does it too)."""
    normal = normal.to(pred.dtype)
    mask = (normal != 0).any(dim=1)
    if not bool(mask.any()):
        return _zero(pred)
    unit = F.normalize(pred, dim=1, eps=1e-12)
    cos = (unit * normal).sum(dim=1)
    return 1.0 - cos[mask].mean()


def paper_task_loss(spec: TaskSpec, pred: Tensor, target: Tensor, regression_loss: str = "mse") -> Tensor:
    """The training loss of one task (see the module docstring's table)."""
    kind = DENSE_METRICS.get(spec.metric)
    if kind == "segmentation":
        _check_dense(spec, pred, target, spec.num_classes)
        return segmentation_loss(pred, target)
    if kind == "depth":
        _check_dense(spec, pred, target, 1)
        return depth_loss(pred, target)
    if kind == "normal":
        _check_dense(spec, pred, target, 3)
        return normal_loss(pred, target)
    return task_loss(spec, pred, target, regression_loss)


# --------------------------------------------------------------------------- metrics


class DepthErrors(Metric):
    """Absolute and relative depth error over all pixels with ``depth != 0`` (sums, DDP-reducible)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("abs_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("rel_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, depth: Tensor) -> None:  # type: ignore[override]
        depth = _as_map(depth, 1).float()
        mask = (depth != 0) & torch.isfinite(depth)
        if not bool(mask.any()):
            return
        err = (pred.detach().float() - depth).abs()[mask]
        self.abs_sum += err.double().sum()
        self.rel_sum += (err / depth[mask].abs()).double().sum()
        self.count += int(mask.sum())

    def compute(self) -> dict[str, Tensor]:
        if int(self.count) == 0:
            nan = torch.tensor(float("nan"), device=self.abs_sum.device)
            return {"abs_err": nan, "rel_err": nan.clone()}
        n = self.count.double()
        return {"abs_err": (self.abs_sum / n).float(), "rel_err": (self.rel_sum / n).float()}


class NormalAngleErrors(Metric):
    """Angle between predicted and true normals (degrees) over pixels with a non-zero true normal.

    Reports the mean, the median (from a histogram of ``bin_width``-degree bins, exact to
    ``bin_width``) and the fractions of pixels within 11.25, 22.5 and 30 degrees.
    """

    full_state_update = False
    higher_is_better = False
    THRESHOLDS = (11.25, 22.5, 30.0)

    def __init__(self, bin_width: float = 0.01, **kwargs) -> None:
        super().__init__(**kwargs)
        if not bin_width > 0:
            raise ValueError(f"bin_width must be positive, got {bin_width}")
        self.bin_width = float(bin_width)
        self.num_bins = int(math.ceil(180.0 / self.bin_width))
        self.add_state("hist", torch.zeros(self.num_bins, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("angle_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("within", torch.zeros(len(self.THRESHOLDS), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, normal: Tensor) -> None:  # type: ignore[override]
        normal = normal.float()
        mask = (normal != 0).any(dim=1)
        if not bool(mask.any()):
            return
        unit = F.normalize(pred.detach().float(), dim=1, eps=1e-12)
        cos = (unit * normal).sum(dim=1)[mask].clamp(-1.0, 1.0)
        angle = torch.rad2deg(torch.acos(cos))
        self.angle_sum += angle.double().sum()
        for i, t in enumerate(self.THRESHOLDS):
            self.within[i] += int((angle < t).sum())
        idx = (angle / self.bin_width).long().clamp_(0, self.num_bins - 1)
        self.hist += torch.bincount(idx, minlength=self.num_bins)
        self.count += int(angle.numel())

    def compute(self) -> dict[str, Tensor]:
        dev = self.angle_sum.device
        keys = ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30")
        if int(self.count) == 0:
            return {k: torch.tensor(float("nan"), device=dev) for k in keys}
        n = self.count.double()
        # median: the first bin whose cumulative count reaches n/2, linearly interpolated inside it
        cum = torch.cumsum(self.hist, 0).double()
        half = n / 2.0
        b = int(torch.searchsorted(cum, half.reshape(1)).item())
        before = cum[b - 1] if b > 0 else torch.tensor(0.0, dtype=torch.float64, device=dev)
        inside = self.hist[b].double().clamp(min=1.0)
        median = (b + (half - before) / inside) * self.bin_width
        within = self.within.double() / n
        return {
            "mean_angle": (self.angle_sum / n).float(),
            "median_angle": median.float(),
            "within_11_25": within[0].float(),
            "within_22_5": within[1].float(),
            "within_30": within[2].float(),
        }


class _SigmoidF1(BinaryF1Score):
    """F1 at threshold 0.5 of ``sigmoid(logits)``; targets ``[B]`` in {0, 1}, NaN ignored."""

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        preds, target = preds.reshape(-1), target.reshape(-1)
        mask = ~torch.isnan(target) if target.is_floating_point() else target >= 0
        if bool(mask.any()):
            super().update(torch.sigmoid(preds[mask].float()), target[mask].long())


class TaskMetrics(nn.Module):
    """All the metrics of one task: ``update(pred, target)``, ``compute() -> {name: value}``, ``reset()``.

    Args:
        metrics: ``{name: torchmetrics.Metric}``; a metric whose ``compute`` returns a dict
            contributes all of its entries (its own name is then unused).
        higher_is_better: the direction of every reported name (also their order).
        long_target: cast targets to ``long`` first (segmentation labels stored as floats).
    """

    def __init__(
        self, metrics: Mapping[str, Metric], higher_is_better: Mapping[str, bool], long_target: bool = False
    ) -> None:
        super().__init__()
        self.metrics = nn.ModuleDict(dict(metrics))
        self.higher_is_better = dict(higher_is_better)
        self.long_target = bool(long_target)

    @property
    def names(self) -> list[str]:
        return list(self.higher_is_better)

    def update(self, pred: Tensor, target: Tensor) -> None:
        pred = pred.detach()
        if self.long_target:
            target = target.long()
        for m in self.metrics.values():
            m.update(pred, target)

    def compute(self) -> dict[str, Tensor]:
        """``{name: 0-dim tensor}``; all ``NaN`` when nothing was seen since the last reset."""
        if all(m.update_count == 0 for m in self.metrics.values()):
            return {k: torch.tensor(float("nan")) for k in self.higher_is_better}
        out: dict[str, Tensor] = {}
        for name, m in self.metrics.items():
            v = m.compute()
            if isinstance(v, Mapping):
                out.update({k: t.float() for k, t in v.items()})
            else:
                out[name] = v.float()
        return {k: out[k] for k in self.higher_is_better}

    def reset(self) -> None:
        for m in self.metrics.values():
            m.reset()


def make_paper_metric(spec: TaskSpec) -> TaskMetrics:
    """A fresh :class:`TaskMetrics` for the task (see the module docstring's table)."""
    kind = DENSE_METRICS.get(spec.metric)
    if kind == "segmentation":
        c = int(spec.num_classes)
        metrics = {
            "miou": MulticlassJaccardIndex(num_classes=c, ignore_index=IGNORE_INDEX, average="macro"),
            "pixacc": MulticlassAccuracy(num_classes=c, ignore_index=IGNORE_INDEX, average="micro"),
        }
        return TaskMetrics(metrics, {"miou": True, "pixacc": True}, long_target=True)
    if kind == "depth":
        return TaskMetrics({"depth": DepthErrors()}, {"abs_err": False, "rel_err": False})
    if kind == "normal":
        names = ("mean_angle", "median_angle", "within_11_25", "within_22_5", "within_30")
        return TaskMetrics({"normal": NormalAngleErrors()}, {k: METRIC_DIRECTIONS[k] for k in names})
    if spec.metric == "f1":
        return TaskMetrics({"f1": _SigmoidF1(threshold=0.5)}, {"f1": True})
    return TaskMetrics({spec.metric: make_task_metric(spec)}, {spec.metric: bool(spec.higher_is_better)})
