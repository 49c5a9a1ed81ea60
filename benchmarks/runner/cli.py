"""``python -m benchmarks.run``: the runner's entry point.

Usage::

    python -m benchmarks.run --dataset multimnist --methods ls fairgrad --cost none,paper \\
        --seeds 0 1 2 --epochs 30 --patience 5 --out results/multimnist
    python -m benchmarks.run --config benchmarks/configs/verdict/yeast.yaml          # a YAML config
    python -m benchmarks.run --config benchmarks/configs/verdict/yeast.yaml --seeds 0 1 --data-kw '{"batch_size": 32}'
    python -m benchmarks.run --dataset multilabel --data-kw '{"path": "/data/my.npz"}'  # your own file
    python -m benchmarks.run --config benchmarks/configs/verdict/yeast.yaml --workers 2  # 2 runs at once
    python -m benchmarks.run --config benchmarks/configs/verdict/yeast.yaml --ray local  # Ray tasks (extra 'ray')
    python -m benchmarks.run --verdict DIR1 DIR2 ...                                   # collect a verdict
    python -m benchmarks.run --verdict DIR1 DIR2 ... --readme README.md                # ... and its headline in README

What a grid does, in order: the single-task baselines (Delta-m%, eq. 14, needs them), then every
``(method, COST variant, seed)``, each cached as JSON, then ``runs.csv``, ``baselines.csv``,
``table.md``, ``summary.png`` and the console tables (:mod:`benchmarks.runner.grid`).
Results go to ``--out`` (default: ``$LIGHTNING_COST_RESULTS/<data set>``, else
``~/.cache/lightning_cost/results/<data set>``). Seeds vary the model initialisation and the training
shuffle; the data split is fixed by ``data_kw.seed`` (default 0), so every run and every baseline
is tested on the same test set.

``--workers N`` trains N runs at once, each in its own process with ``--threads`` torch threads;
``--ray ADDRESS`` sends them as Ray tasks to a cluster (``local``: a new local instance), the results
still written here. Two runners started on the same ``--out`` share the grid: each job is claimed by
one of them (a claim left by a killed runner is taken over), so nothing is split by hand. A run that
fails is reported by name at the end, the others are kept, and the command exits with status 1.
Progress: runs done of the total (cached ones included) and the time left, a rich bar on a terminal
with workers, one line per finished run otherwise.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the grid (or, with ``--verdict``, collect a verdict); returns the summary (or the verdict).
    An unknown data set or a bad option value ends the command with one line on stderr."""
    from benchmarks.registry import UnknownDatasetError
    from benchmarks.runner.config import RunnerConfig, config_from_argv

    argv = list(sys.argv[1:] if argv is None else argv)
    settings, extras = config_from_argv(argv)
    if extras.get("verdict"):
        from pathlib import Path

        from benchmarks.runner.verdict import write_verdict

        verdict = write_verdict(extras["verdict"], extras["verdict_out"])
        print((Path(extras["verdict_out"]) / "VERDICT.md").read_text())
        if extras.get("readme"):
            from benchmarks.runner.headline import update_readme

            update_readme(extras["readme"], (Path(extras["verdict_out"]) / "HEADLINE.md").read_text())
        return verdict
    import torch

    from benchmarks.registry import dataset_title
    from benchmarks.runner.grid import run_benchmark

    try:
        cfg = RunnerConfig(**settings)
        dataset_title(cfg.dataset, cfg.data_kw)  # an unknown name fails here, before anything runs
    except (UnknownDatasetError, ValueError) as err:
        print(f"benchmarks.run: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.set_num_threads(cfg.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("lightning.fabric").setLevel(logging.WARNING)
    return run_benchmark(cfg)
