"""Benchmarks for lightning-cost: real data sets read from local files, models, a runner, measurements.

Entry points (each folder's opening docstring names its own):

* ``python -m benchmarks.run`` -- the runner: a grid of methods x COST variants x seeds from a YAML config,
  cached per run, with statistics, reports and the verdict (:mod:`benchmarks.runner`), and
  ``python -m benchmarks.runner.reproduce`` -- cached runs retrained with today's code and compared;
* ``python -m benchmarks.teleport.effect`` and ``python -m benchmarks.teleport.stats`` -- what one teleport
  does, and the paper's teleport statistics (:mod:`benchmarks.teleport`);
* ``python -m benchmarks.perf.<name>`` -- speed and memory measurements (:mod:`benchmarks.perf`);
* ``python -m benchmarks.toy`` -- the 2-task, 2-parameter toy of the paper's Fig. 6 (:mod:`benchmarks.toy`).

Parts they share:

* :mod:`benchmarks.data` -- Lightning DataModules (MultiMNIST-type composites, multi-label tables, molecules)
  and :mod:`benchmarks.data.tasks` (:class:`TaskSpec`, masked per-task losses and metrics);
* :mod:`benchmarks.models` -- networks (shared trunk + per-task heads) and their LightningModules;
* :mod:`benchmarks.paper` -- the paper's data sets (CityScapes, NYUv2, CelebA, QM9; COST Sec. 5) from local
  copies, their models, losses, metrics and modules;
* :mod:`benchmarks.registry` -- benchmarks by name and file formats; the default model of each;
* :mod:`benchmarks.common` -- quiet training, number and table formatting, JSON files.

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
