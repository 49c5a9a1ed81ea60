"""Multi-task evaluation metrics: Delta-m% (the paper's eq. 14), LibMTL's Delta-p, mean rank.

* :func:`delta_m` -- eq. (14) of the COST paper (after Maninis et al. 2019 [21]):

      Delta m% = (1/K) sum_k (-1)^{delta_k} (M_{m,k} - M_{b,k}) / M_{b,k} * 100,

  ``delta_k = 1`` when a higher value of metric ``k`` is better, ``K`` the number
  of *metrics* (the paper's Table 1 averages over its 4 metrics). It is the mean
  relative degradation w.r.t. the independent (single-task) baseline: **lower is
  better**, negative means better than the baseline on average.
* :func:`delta_p` -- the "improvement" reported by LibMTL: the same relative
  differences with the opposite sign (**higher is better**), averaged first over
  the metrics of each task and then over the tasks. Without a task grouping (or
  when every task has the same number of metrics) ``delta_p == -delta_m``.
* :func:`mean_rank` -- MR: for every metric rank the methods (1 = best, ties share
  the average rank), then average each method's ranks over the metrics.
* :class:`DeltaM` -- a :class:`torchmetrics.Metric` for ``validation_step``:
  accumulate per-metric values (one row per batch or per epoch), compute eq. (14)
  on their mean; its states are sums, so it syncs across DDP ranks.

Inputs may be sequences, 1-D tensors / arrays, or mappings keyed by metric name
(then ``values``, ``baseline`` and ``higher_is_better`` must have the same keys;
the order is the baseline's).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import Tensor
from torchmetrics import Metric

__all__ = ["DeltaM", "delta_m", "delta_p", "flatten_metrics", "mean_rank"]

Values = Sequence[float] | Tensor | np.ndarray | Mapping[str, float]
Directions = Sequence[bool] | Tensor | np.ndarray | Mapping[str, bool]


# ---------------------------------------------------------------------------------------
# validation helpers
# ---------------------------------------------------------------------------------------
def _to_float_array(x: Any, name: str) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().double().numpy()
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be a sequence of numbers, got {x!r}") from err
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per metric), got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name} is empty: at least one metric is needed")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} must be finite, got {arr.tolist()}")
    return arr


def _to_bool_array(x: Any, name: str = "higher_is_better") -> np.ndarray:
    if isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a sequence of bools (one per metric), got the single value {x!r}")
    if isinstance(x, Tensor):
        x = x.detach().cpu().tolist()
    items = list(x)
    for v in items:
        if not isinstance(v, (bool, np.bool_)) and v not in (0, 1):
            raise TypeError(f"{name} must contain bools (True: higher is better), got {v!r}")
    arr = np.asarray(items, dtype=bool)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of bools, got {items!r}")
    return arr


def _align(
    values: Values, baseline: Values, higher_is_better: Directions
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str] | None]:
    """Turn the three arguments into float/float/bool arrays of one common length."""
    keys: list[str] | None = None
    if isinstance(baseline, Mapping) or isinstance(values, Mapping) or isinstance(higher_is_better, Mapping):
        if not (
            isinstance(baseline, Mapping)
            and isinstance(values, Mapping)
            and isinstance(higher_is_better, Mapping)
        ):
            raise TypeError(
                "when one of values / baseline / higher_is_better is a mapping, all three must be"
            )
        keys = list(baseline)
        for other, name in ((values, "values"), (higher_is_better, "higher_is_better")):
            if set(other) != set(keys):
                missing = sorted(map(str, set(keys) - set(other)))
                extra = sorted(map(str, set(other) - set(keys)))
                raise ValueError(
                    f"{name} and baseline have different metrics: missing {missing}, extra {extra}"
                )
        values = [values[k] for k in keys]
        higher_is_better = [higher_is_better[k] for k in keys]
        baseline = [baseline[k] for k in keys]
    v = _to_float_array(values, "values")
    b = _to_float_array(baseline, "baseline")
    h = _to_bool_array(higher_is_better)
    if not (v.size == b.size == h.size):
        raise ValueError(
            f"length mismatch: {v.size} values, {b.size} baseline values, {h.size} higher_is_better flags"
        )
    if (b == 0).any():
        raise ValueError(
            f"baseline values must be non-zero (eq. 14 divides by them); metrics {np.flatnonzero(b == 0).tolist()} are 0"
        )
    return v, b, h, keys


def _relative_degradation(v: np.ndarray, b: np.ndarray, h: np.ndarray) -> np.ndarray:
    """Per metric ``(-1)^{delta_k} (M_m - M_b) / M_b * 100`` (positive = worse than the baseline)."""
    sign = np.where(h, -1.0, 1.0)
    return sign * (v - b) / b * 100.0


# ---------------------------------------------------------------------------------------
# functional metrics
# ---------------------------------------------------------------------------------------
def delta_m(values: Values, baseline: Values, higher_is_better: Directions) -> float:
    r"""Delta-m% of eq. (14): mean relative degradation w.r.t. ``baseline``, in percent; lower is better.

    ``(1/K) sum_k (-1)^{delta_k} (values_k - baseline_k) / baseline_k * 100`` with
    ``delta_k = 1`` when ``higher_is_better[k]``. As in eq. (14) the division is by
    the signed baseline value (metrics are normally positive).

    Args:
        values: the method's metric values (length ``K``, or a mapping name -> value).
        baseline: the reference (independent single-task models) values; non-zero.
        higher_is_better: one bool per metric.

    Raises:
        ValueError: on length / key mismatch, empty input, non-finite values or a zero baseline.
        TypeError: on non-numeric values or non-bool directions.
    """
    v, b, h, _ = _align(values, baseline, higher_is_better)
    return float(_relative_degradation(v, b, h).mean())


def delta_p(
    values: Values,
    baseline: Values,
    higher_is_better: Directions,
    tasks: Sequence[Hashable] | Mapping[str, Hashable] | None = None,
) -> float:
    r"""LibMTL's Delta-p: mean relative *improvement* in percent; higher is better.

    ``Delta_p = (1/T) sum_t (1/M_t) sum_{m in t} (-1)^{1 - delta_m} (values_m - baseline_m) / baseline_m * 100``
    (LibMTL, Lin & Zhang 2023, "LibMTL: A Python Library for Multi-Task Learning",
    JMLR): the relative differences are averaged within each task, then over the ``T``
    tasks. ``tasks[m]`` names the task of metric ``m`` (a mapping metric -> task for
    mapping inputs); ``None`` treats every metric as its own task.

    Relation to :func:`delta_m`: ``delta_p == -delta_m`` when ``tasks`` is ``None`` or
    every task has the same number of metrics (e.g. CityScapes: 2 + 2); otherwise
    ``delta_p`` gives each *task* equal weight while eq. (14) gives each *metric*
    equal weight.
    """
    v, b, h, keys = _align(values, baseline, higher_is_better)
    improvement = -_relative_degradation(v, b, h)
    if tasks is None:
        return float(improvement.mean())
    if isinstance(tasks, Mapping):
        if keys is None:
            raise TypeError("tasks may be a mapping only when the values are mappings")
        if set(tasks) != set(keys):
            raise ValueError("tasks must map exactly the metrics of baseline to their task")
        groups = [tasks[k] for k in keys]
    else:
        groups = list(tasks)
    if len(groups) != v.size:
        raise ValueError(f"length mismatch: {v.size} metrics but {len(groups)} task labels")
    per_task: dict[Hashable, list[float]] = {}
    for g, x in zip(groups, improvement, strict=True):
        per_task.setdefault(g, []).append(float(x))
    return float(np.mean([np.mean(xs) for xs in per_task.values()]))


def mean_rank(
    table: Mapping[str, Values], higher_is_better: Directions, ties: str = "average"
) -> dict[str, float]:
    r"""Mean rank (MR) of each method over the metrics; lower is better.

    For each metric the methods are ranked (1 = best according to
    ``higher_is_better``); tied values share the average of their ranks (``ties``
    may also be ``"min"``, ``"max"``, ``"dense"`` or ``"ordinal"``, as in
    :func:`scipy.stats.rankdata`). A method's MR is the mean of its ranks over the
    metrics.

    Args:
        table: method name -> its metric values (all the same length ``M``; mappings
            keyed by metric name are aligned on the first method's keys).
        higher_is_better: one bool per metric (a mapping when the rows are mappings).

    Returns:
        method name -> mean rank, in the order of ``table``.
    """
    if not isinstance(table, Mapping) or len(table) == 0:
        raise ValueError("table must be a non-empty mapping method -> metric values")
    if ties not in ("average", "min", "max", "dense", "ordinal"):
        raise ValueError(f"unknown ties method {ties!r}")
    methods = list(table)
    first = table[methods[0]]
    if isinstance(first, Mapping):
        keys = list(first)
        if not isinstance(higher_is_better, Mapping) or set(higher_is_better) != set(keys):
            raise ValueError(
                "with rows keyed by metric, higher_is_better must be a mapping with the same keys"
            )
        rows = []
        for m in methods:
            row = table[m]
            if not isinstance(row, Mapping) or set(row) != set(keys):
                raise ValueError(f"row {m!r} does not have the metrics {keys}")
            rows.append(_to_float_array([row[k] for k in keys], f"table[{m!r}]"))
        h = _to_bool_array([higher_is_better[k] for k in keys])
    else:
        rows = [_to_float_array(table[m], f"table[{m!r}]") for m in methods]
        h = _to_bool_array(higher_is_better)
    lengths = {r.size for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"all methods must have the same number of metrics, got lengths {sorted(lengths)}")
    if h.size != rows[0].size:
        raise ValueError(
            f"length mismatch: {rows[0].size} metrics per method but {h.size} higher_is_better flags"
        )
    values = np.stack(rows)  # [methods, metrics]
    keyed = np.where(h, -values, values)  # smaller key = better
    ranks = np.column_stack([rankdata(keyed[:, j], method=ties) for j in range(values.shape[1])])
    return {m: float(r) for m, r in zip(methods, ranks.mean(axis=1), strict=True)}


def flatten_metrics(results: Mapping[str, Any], sep: str = "/") -> dict[str, float]:
    """Flatten nested results (e.g. torchmetrics' ``MultitaskWrapper.compute()``) to ``{"task/metric": float}``.

    The output can be passed to :func:`delta_m` together with baselines keyed the same way.
    """
    out: dict[str, float] = {}
    for key, val in results.items():
        if isinstance(val, Mapping):
            for sub, x in flatten_metrics(val, sep).items():
                out[f"{key}{sep}{sub}"] = x
        else:
            out[str(key)] = float(val.item() if isinstance(val, Tensor) else val)
    return out


# ---------------------------------------------------------------------------------------
# torchmetrics wrapper
# ---------------------------------------------------------------------------------------
class DeltaM(Metric):
    r"""Delta-m% (eq. 14) as a :class:`torchmetrics.Metric`, for ``validation_step``.

    Built with the baseline values and directions of the ``M`` metrics. Each
    :meth:`update` receives the method's metric values, a tensor of length ``M``
    (e.g. this batch's mIoU, pixel accuracy, ...) or ``N x M`` (``N`` rows at once);
    :meth:`compute` returns :func:`delta_m` of the **mean** row. The states are a
    running sum and a count (``dist_reduce_fx="sum"``), so under DDP the mean is
    over the rows of all ranks.

    Note that the mean of per-batch metrics is not always the epoch metric (mIoU,
    for one, is not additive over batches): for exact results compute the epoch's
    metrics with their own torchmetrics and call ``update`` once per epoch with
    them, then ``compute`` and ``reset``.

    Example::

        self.delta = DeltaM(baseline=[74.01, 93.16, 0.0125, 27.77],
                            higher_is_better=[True, True, False, False])
        ...
        self.delta.update(torch.stack([miou, pix_acc, abs_err, rel_err]))
        self.log("val/delta_m", self.delta)
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    baseline: Tensor
    sign: Tensor
    value_sum: Tensor
    count: Tensor

    def __init__(self, baseline: Values, higher_is_better: Directions, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(baseline, Mapping) or isinstance(higher_is_better, Mapping):
            if not (isinstance(baseline, Mapping) and isinstance(higher_is_better, Mapping)):
                raise TypeError("baseline and higher_is_better must both be mappings or both sequences")
            self.metric_names: list[str] | None = [str(k) for k in baseline]
            if set(higher_is_better) != set(baseline):
                raise ValueError("higher_is_better must have the same keys as baseline")
            higher_is_better = [higher_is_better[k] for k in baseline]
            baseline = [baseline[k] for k in baseline]
        else:
            self.metric_names = None
        b = _to_float_array(baseline, "baseline")
        h = _to_bool_array(higher_is_better)
        if b.size != h.size:
            raise ValueError(f"length mismatch: {b.size} baseline values but {h.size} higher_is_better flags")
        if (b == 0).any():
            raise ValueError(
                f"baseline values must be non-zero; metrics {np.flatnonzero(b == 0).tolist()} are 0"
            )
        self.num_metrics = int(b.size)
        self._baseline = b
        self._higher = h
        self.add_state("value_sum", default=torch.zeros(self.num_metrics), dist_reduce_fx="sum")
        self.add_state("count", default=torch.zeros(()), dist_reduce_fx="sum")

    def update(self, values: Tensor | Sequence[float] | Mapping[str, float]) -> None:  # type: ignore[override]
        """Add one row (length ``M``) or ``N`` rows (``N x M``) of metric values."""
        if isinstance(values, Mapping):
            if self.metric_names is None or set(map(str, values)) != set(self.metric_names):
                raise ValueError(
                    f"values keys {sorted(map(str, values))} do not match the metrics {self.metric_names}"
                )
            by_name: dict[str, Any] = {str(k): v for k, v in values.items()}  # floats or 0-d tensors
            values = [
                float(by_name[k].item() if isinstance(by_name[k], Tensor) else by_name[k])
                for k in self.metric_names
            ]
        x = values.detach() if isinstance(values, Tensor) else torch.as_tensor(values)
        x = x.to(device=self.value_sum.device, dtype=self.value_sum.dtype)
        if x.ndim == 1:
            x = x.unsqueeze(0)
        if x.ndim != 2 or x.shape[1] != self.num_metrics:
            raise ValueError(
                f"DeltaM expects {self.num_metrics} metric values per row, got shape {tuple(x.shape)}"
            )
        if not torch.isfinite(x).all():
            raise ValueError(f"metric values must be finite, got {x.tolist()}")
        self.value_sum += x.sum(dim=0)
        self.count += x.shape[0]

    def compute(self) -> Tensor:
        """Delta-m% of the mean row seen since the last reset (lower is better)."""
        if float(self.count) == 0:
            raise ValueError("DeltaM.compute() called before any update: there are no metric values")
        mean = (self.value_sum / self.count).cpu().numpy()
        return torch.tensor(delta_m(mean, self._baseline, self._higher), dtype=torch.get_default_dtype())

    def mean_values(self) -> Tensor:
        """The accumulated mean of each metric (length ``M``)."""
        if float(self.count) == 0:
            raise ValueError("no metric values accumulated yet")
        return self.value_sum / self.count
