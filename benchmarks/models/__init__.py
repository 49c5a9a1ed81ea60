"""Benchmark models: plain networks (:mod:`benchmarks.models.networks`: a shared trunk and one head per
task) and the LightningModules that train them (:mod:`benchmarks.models.modules`: any multi-task
method, or one task alone for the single-task baselines)."""

from benchmarks.models.networks import (
    MultiTaskNet,
    count_parameters,
    fingerprint_mlp,
    lenet_multimnist,
    make_heads,
    mlp,
    mlp_multilabel,
)

__all__ = [
    "MultiTaskNet",
    "count_parameters",
    "fingerprint_mlp",
    "lenet_multimnist",
    "make_heads",
    "mlp",
    "mlp_multilabel",
]
