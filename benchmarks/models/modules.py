"""LightningModules for the benchmarks: a multi-task module (any method) and a single-task baseline.

* :class:`MTLBenchModule` wraps a :class:`~benchmarks.models.MultiTaskNet` and its task specs
  with :class:`~lightning_cost.MultiTaskMixin`: ``training_step`` returns ``{task: masked loss}``,
  the mixin turns them into the method's update (and the teleport callback can hook in).
* :class:`SingleTaskModule` trains one task (its head + the trunk) as a plain LightningModule; the
  mixin needs K >= 2, and Delta-m% (eq. 14) compares against one such model per task.

Both log ``train/<task>/loss`` (epoch mean), ``val/<task>/<metric>``, ``test/<task>/<metric>`` and
``val/score``: the mean over tasks of the validation metric, signed so that higher is better
(``-MAE`` for regression). ``val/score`` is what the runner selects the epoch on.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from benchmarks.data.tasks import TaskSpec, make_task_metric, task_loss
from benchmarks.models.networks import MultiTaskNet
from lightning_cost.mixin import MultiTaskMixin

__all__ = ["MTLBenchModule", "SingleTaskModule", "build_module", "make_lr_scheduler"]


def make_lr_scheduler(optimizer: torch.optim.Optimizer, spec: dict[str, Any]) -> dict[str, Any]:
    """A Lightning ``lr_scheduler`` config from ``spec`` (the runner's ``--lr-scheduler``).

    * ``{"name": "step", "step_size": N, "gamma": g}``: ``StepLR``, stepped every epoch (the paper's
      CityScapes/NYUv2 schedule: lr halved after 100 epochs).
    * ``{"name": "plateau", "factor": f, "patience": p, "min_lr": m}``: ``ReduceLROnPlateau`` on
      ``val/score`` (``mode="max"``: higher is better; ``"monitor"`` picks another key), the QM9 schedule.
    """
    kw = dict(spec)
    name = str(kw.pop("name", "")).lower()
    if name in ("step", "steplr"):
        return {"scheduler": torch.optim.lr_scheduler.StepLR(optimizer, **kw), "interval": "epoch"}
    if name in ("plateau", "reducelronplateau"):
        monitor = kw.pop("monitor", "val/score")
        kw.setdefault("mode", "max")
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, **kw)
        return {"scheduler": sched, "monitor": monitor, "interval": "epoch", "strict": True}
    raise ValueError(f"unknown lr scheduler {spec!r}: name must be 'step' or 'plateau'")


class _EvalMixin:
    """Shared evaluation / optimiser code for both modules (``self.net``, ``self.specs``)."""

    net: MultiTaskNet
    specs: tuple[TaskSpec, ...]
    eval_specs: tuple[TaskSpec, ...]

    def _init_metrics(self) -> None:
        self.val_metrics = nn.ModuleDict({s.name: make_task_metric(s) for s in self.eval_specs})
        self.test_metrics = nn.ModuleDict({s.name: make_task_metric(s) for s in self.eval_specs})

    def _task_loss(self, spec: TaskSpec, out: dict[str, Tensor], y: Any, k: int) -> Tensor:
        """The masked loss of task ``spec`` (target column ``k``)."""
        return task_loss(spec, out[spec.name], y[:, k], self.regression_loss)

    @staticmethod
    def _batch_size(y: Any) -> int:
        return int(y.shape[0])

    def _spec_index(self) -> dict[str, int]:
        return {s.name: k for k, s in enumerate(self.specs)}

    def forward(self, x: Tensor) -> dict[str, Tensor]:
        return self.net(x)

    def _eval_step(self, batch: Any, metrics: nn.ModuleDict) -> None:
        x, y = batch
        out = self.net(x)
        idx = self._spec_index()
        for s in self.eval_specs:
            metrics[s.name].update(out[s.name], y[:, idx[s.name]])

    def _eval_end(self, stage: str, metrics: nn.ModuleDict) -> None:
        scores = []
        for s in self.eval_specs:
            v = metrics[s.name].compute()
            value = float(v)
            self.log(f"{stage}/{s.name}/{s.metric}", v.float(), prog_bar=len(self.eval_specs) <= 2)
            if math.isfinite(value):
                scores.append(value if s.higher_is_better else -value)
            metrics[s.name].reset()
        score = sum(scores) / len(scores) if scores else float("nan")
        self.log(f"{stage}/score", torch.tensor(score), prog_bar=True)

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        self._eval_end("val", self.val_metrics)

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._eval_step(batch, self.test_metrics)

    def on_test_epoch_end(self) -> None:
        self._eval_end("test", self.test_metrics)

    #: optional lr schedule, see :func:`make_lr_scheduler` (set by the runner's ``--lr-scheduler``)
    lr_scheduler: dict[str, Any] | None = None

    def configure_optimizers(self) -> Any:
        params = [p for p in self.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        if not self.lr_scheduler:
            return opt
        return {"optimizer": opt, "lr_scheduler": make_lr_scheduler(opt, self.lr_scheduler)}


class MTLBenchModule(_EvalMixin, MultiTaskMixin, L.LightningModule):
    """A benchmark :class:`MultiTaskNet` trained with any multi-task method (``lightning_cost.aggregators``).

    Args:
        net: the model (trunk shared, one head per task).
        task_specs: the tasks, in the order of the target columns.
        method: a method name of ``lightning_cost.aggregators.AVAILABLE``.
        method_kw: its hyper-parameters.
        lr, weight_decay: Adam.
        regression_loss: ``"mse"`` or ``"l1"`` for regression tasks.
    """

    def __init__(
        self,
        net: MultiTaskNet,
        task_specs: Sequence[TaskSpec],
        method: str = "ls",
        method_kw: dict[str, Any] | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        regression_loss: str = "mse",
    ) -> None:
        super().__init__()
        self.net = net
        self.specs = tuple(task_specs)
        self.eval_specs = self.specs
        self.lr, self.weight_decay, self.regression_loss = float(lr), float(weight_decay), regression_loss
        self.method_name = method
        self._init_metrics()
        self.configure_multitask([s.name for s in self.specs], shared=self.net.trunk, method=method, **(method_kw or {}))

    def compute_task_losses(self, batch: Any) -> dict[str, Tensor]:
        """The masked task losses of ``batch``, without side effects: what a teleport re-evaluates."""
        x, y = batch
        out = self.net(x)
        return {s.name: self._task_loss(s, out, y, k) for k, s in enumerate(self.specs)}

    def training_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        losses = self.compute_task_losses(batch)
        bs = self._batch_size(batch[1])
        for name, v in losses.items():
            self.log(f"train/{name}/loss", v.detach(), on_step=False, on_epoch=True, batch_size=bs)
        return losses


class SingleTaskModule(_EvalMixin, L.LightningModule):
    """Single-task baseline: the trunk and one task's head, trained on that task only.

    ``task_specs`` are all the data set's tasks (to locate the target column); only ``task`` is
    trained and evaluated. The other heads are dropped from the network.
    """

    def __init__(
        self,
        net: MultiTaskNet,
        task_specs: Sequence[TaskSpec],
        task: str,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        regression_loss: str = "mse",
    ) -> None:
        super().__init__()
        self.specs = tuple(task_specs)
        names = [s.name for s in self.specs]
        if task not in names:
            raise ValueError(f"unknown task {task!r}; tasks: {names}")
        self.task = task
        self.col = names.index(task)
        self.spec = self.specs[self.col]
        self.eval_specs = (self.spec,)
        self.net = MultiTaskNet(net.trunk, nn.ModuleDict({task: net.heads[task]}))
        self.lr, self.weight_decay, self.regression_loss = float(lr), float(weight_decay), regression_loss
        self._init_metrics()

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        x, y = batch
        loss = self._task_loss(self.spec, self.net(x), y, self.col)
        self.log(f"train/{self.task}/loss", loss.detach(), on_step=False, on_epoch=True, batch_size=self._batch_size(y))
        return loss


def build_module(
    net: MultiTaskNet,
    task_specs: Sequence[TaskSpec],
    method: str = "ls",
    tasks: Sequence[str] | None = None,
    **kwargs: Any,
) -> L.LightningModule:
    """``SingleTaskModule`` when ``tasks`` names one task, else ``MTLBenchModule`` (all tasks)."""
    if tasks is not None and len(tasks) == 1:
        kwargs.pop("method_kw", None)
        return SingleTaskModule(net, task_specs, tasks[0], **kwargs)
    if tasks is not None and list(tasks) != [s.name for s in task_specs]:
        raise ValueError("a multi-task run trains all tasks of the data set")
    return MTLBenchModule(net, task_specs, method=method, **kwargs)
