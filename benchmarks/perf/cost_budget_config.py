"""The COST-cost benchmark's settings: the sizes of every section and the runner's configuration of
the budget measurements (``benchmarks/configs/cost_budget.yaml``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.runner.config import RunnerConfig, config_from_argv

BUDGET_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "cost_budget.yaml"

# --------------------------------------------------------------------------- configuration


def make_config(quick: bool) -> dict[str, Any]:
    """Sizes of every section; ``quick`` is a seconds-long smoke run (tests), not a measurement."""
    if quick:
        return dict(quick=True, data_kw={"num_train": 640, "num_val": 128, "num_test": 256, "batch_size": 64},
                    epochs=1, budgets=[0, 1], inner_steps=["2"],
                    lever_grid=[(2, None), (1, 5e-3)], step_reps=1,
                    step_batches=2, yeast_epochs=1, agree_mm_batches=4, agree_synth_steps=8)
    return dict(quick=False, data_kw=None, epochs=None, budgets=[0, 1, 2, 4, 8], inner_steps=["10", "3@3e-3", "1@1e-2", "1@1e-2:nohtr"],
                lever_grid=[(10, None), (5, 2e-3), (3, 3e-3), (3, None), (2, 5e-3), (1, 1e-2), (1, None)],
                lever_epoch_frac=1.0, step_reps=3, step_batches=15, yeast_epochs=5, agree_mm_batches=None,
                agree_synth_steps=150)


def runner_config(quick: bool, threads: int = 1) -> RunnerConfig:
    """The runner's configuration of the budget measurements (cost_budget.yaml through the runner's own parser)."""
    settings, _ = config_from_argv(["--config", str(BUDGET_CONFIG), "--progress", "false", "--threads", str(threads),
                                    "--out", "unused"])
    sizes = make_config(quick)
    if sizes["data_kw"] is not None:
        settings["data_kw"] = dict(sizes["data_kw"])
    if sizes["epochs"] is not None:
        settings["epochs"] = sizes["epochs"]
    return RunnerConfig(**settings)
