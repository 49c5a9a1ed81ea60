"""Benchmarks for lightning-cost: real data sets read from local files, models, a runner, measurements.

* :mod:`benchmarks.data.tasks` -- :class:`TaskSpec`, masked per-task losses and metrics.
* :mod:`benchmarks.data` -- Lightning DataModules: MultiMNIST-type composites, multi-label tables
  (Mulan), molecules (MoleculeNet).
* :mod:`benchmarks.models` -- networks (shared trunk + per-task heads) and their LightningModules.
* :mod:`benchmarks.paper` -- the paper's data sets (CityScapes, NYUv2, CelebA, QM9; COST Sec. 5)
  from local copies, their models (SegNet-MTAN, 9-layer CNN, MPNN), losses, metrics and modules.
* :mod:`benchmarks.registry` -- benchmarks by name and file formats; the default model of each.
* :mod:`benchmarks.runner` -- the runner (``python -m benchmarks.run``): grid, cache, statistics, reports.
* :mod:`benchmarks.runner.conflicts` -- the per-step conflict counter (trigger ratio under both rules).
* :mod:`benchmarks.toy`, :mod:`benchmarks.teleport.stats`, :mod:`benchmarks.perf` -- the 2-D toy,
  the teleport statistics (Fig. 5a, Fig. 8) and the performance measurements.

:func:`make_datamodule` and :func:`make_model` build a benchmark by name::

    dm = make_datamodule("multimnist", num_train=2000)
    model = make_model(dm)
"""

from __future__ import annotations

from benchmarks.data.tasks import TaskSpec, make_task_metric, task_loss, update_task_metric
from benchmarks.registry import (
    BENCHMARKS,
    FORMATS,
    UnknownDatasetError,
    dataset_title,
    make_datamodule,
    make_model,
    module_classes,
)

__all__ = [
    "TaskSpec",
    "task_loss",
    "make_task_metric",
    "update_task_metric",
    "BENCHMARKS",
    "FORMATS",
    "UnknownDatasetError",
    "dataset_title",
    "make_datamodule",
    "make_model",
    "module_classes",
]
