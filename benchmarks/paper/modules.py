"""LightningModules for the paper's benchmarks: dense targets, several metrics per task, graph batches.

:class:`PaperMTLModule` / :class:`PaperSingleTaskModule` are :class:`~benchmarks.models.modules.MTLBenchModule` /
:class:`~benchmarks.models.modules.SingleTaskModule` (same arguments, same optimiser and ``lr_scheduler``
handling) with three changes:

* losses and metrics come from :mod:`benchmarks.paper.tasks` (pixel-wise losses for CityScapes/NYUv2,
  F1 for CelebA, MAE for QM9), and every metric of a task is logged as ``<stage>/<task>/<metric>``
  (e.g. ``test/segmentation/miou``, ``test/segmentation/pixacc``); :attr:`metric_directions` gives
  their directions (the runner reads it, so Delta-m% averages over all of them, as eq. 14 does);
* targets are either a ``[B, K]`` tensor (column ``k`` = task ``k``) or a dict ``{task: tensor}``
  (dense maps);
* ``val/score`` (epoch selection, lr plateau): for CelebA (every task scored by F1) the mean F1,
  FairGrad's selection criterion; otherwise the metrics' mean relative improvement over the first
  validated epoch, ``mean_m s_m (M_m - M_m^(0)) / |M_m^(0)|`` with ``s_m = +1`` when higher is
  better -- the negative of eq. 14 with the first epoch as reference, so that metrics in different
  units (mIoU vs. depth error, meV vs. Debye) weigh alike. The reference code selects on the
  validation Delta-m%, which needs the single-task results that a run does not have.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from benchmarks.models.modules import MTLBenchModule, SingleTaskModule
from benchmarks.paper.tasks import make_paper_metric, paper_task_loss

__all__ = ["PaperMTLModule", "PaperSingleTaskModule"]


def _target(y: Any, k: int, name: str) -> Tensor:
    if isinstance(y, dict):
        return y[name]
    return y[:, k]


def _batch_size(y: Any) -> int:
    if isinstance(y, dict):
        return int(next(iter(y.values())).shape[0])
    return int(y.shape[0])


class _PaperEvalMixin:
    """Overrides the metric, evaluation and loss helpers of :class:`benchmarks.models.modules._EvalMixin`."""

    def _init_metrics(self) -> None:
        self.val_metrics = nn.ModuleDict({s.name: make_paper_metric(s) for s in self.eval_specs})
        self.test_metrics = nn.ModuleDict({s.name: make_paper_metric(s) for s in self.eval_specs})
        self.score_mode = "mean" if all(s.metric == "f1" for s in self.eval_specs) else "relative"
        self.score_reference: dict[str, float] | None = None

    @property
    def metric_directions(self) -> dict[str, bool]:
        """``{"<task>/<metric>": higher is better}`` for every reported metric."""
        return {f"{name}/{m}": hib for name, tm in self.val_metrics.items() for m, hib in tm.higher_is_better.items()}

    def _task_loss(self, spec, out: dict[str, Tensor], y: Any, k: int) -> Tensor:
        return paper_task_loss(spec, out[spec.name], _target(y, k, spec.name), self.regression_loss)

    @staticmethod
    def _batch_size(y: Any) -> int:
        return _batch_size(y)

    def _eval_step(self, batch: Any, metrics: nn.ModuleDict) -> None:
        x, y = batch
        out = self.net(x)
        idx = self._spec_index()
        for s in self.eval_specs:
            metrics[s.name].update(out[s.name], _target(y, idx[s.name], s.name))

    def _score(self, stage: str, values: dict[str, float]) -> float:
        hib = self.metric_directions
        if self.score_mode == "mean":
            v = [x if hib[k] else -x for k, x in values.items() if math.isfinite(x)]
            return sum(v) / len(v) if v else float("nan")
        if stage == "val" and self.score_reference is None and not self._sanity_checking():
            self.score_reference = dict(values)
        ref = self.score_reference
        if ref is None:
            return float("nan")
        rel = []
        for k, x in values.items():
            r = ref.get(k, float("nan"))
            if math.isfinite(x) and math.isfinite(r) and r != 0:
                rel.append((x - r) / abs(r) * (1.0 if hib[k] else -1.0))
        return sum(rel) / len(rel) if rel else float("nan")

    def _sanity_checking(self) -> bool:
        trainer = getattr(self, "_trainer", None)
        return bool(trainer is not None and trainer.sanity_checking)

    def _eval_end(self, stage: str, metrics: nn.ModuleDict) -> None:
        values: dict[str, float] = {}
        show = sum(len(m.names) for m in metrics.values()) <= 4
        for s in self.eval_specs:
            for mname, v in metrics[s.name].compute().items():
                key = f"{s.name}/{mname}"
                values[key] = float(v)
                self.log(f"{stage}/{key}", v.float(), prog_bar=show)
            metrics[s.name].reset()
        self.log(f"{stage}/score", torch.tensor(self._score(stage, values)), prog_bar=True)


class PaperMTLModule(_PaperEvalMixin, MTLBenchModule):
    """:class:`~benchmarks.models.modules.MTLBenchModule` for the paper's data sets (module docstring)."""


class PaperSingleTaskModule(_PaperEvalMixin, SingleTaskModule):
    """:class:`~benchmarks.models.modules.SingleTaskModule` for the paper's data sets (module docstring)."""

