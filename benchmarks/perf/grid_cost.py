"""What a runner grid costs, from timed steps: CPU-hours per data set before running it.

    python -m benchmarks.perf.grid_cost [--configs benchmarks/configs/verdict/*.yaml] [--steps 12]
        [--finished docs/results/verdict/yeast docs/results/verdict/birds] [--out docs/results/verdict]

For each config, one process, one torch thread: the median time of a training step of every method
of the grid (and of a single-task model) on the config's data, model and batch size, through the
runner's own module and a ``Trainer`` (the engine the grid uses: the Gramian engine for Gramian
methods), and the time of the rest of an epoch (a real one-epoch LS run through the runner, minus its steps:
validation, checkpointing, the trainer's setup). A run then costs ``epochs x (steps per epoch x step
time + the rest)``, a single-task baseline the same with its own step. Two estimates:

* ``cap``: every run trains to the config's epoch cap (an upper bound);
* ``stopped``: each run trains the mean share of the cap that finished grids (``--finished``) really
  trained before early stopping ended them, and a COST run costs its base times the median ratio of
  a COST run's wall time to its base's there, per variant (the teleports' own cost).

Writes ``grid_cost.{json,txt}``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch

from benchmarks.common import load_json, print_and_write, quiet, text_table


class StepTimer(L.Callback):
    """Wall time of each training batch (forward, per-task gradients, update, optimizer step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self._t = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self._t)


def step_seconds(dm: Any, cfg: Any, method: str, task: str | None, steps: int) -> float:
    """Median seconds of a training step after two warm-up steps (no validation)."""
    from benchmarks.runner.train import _module

    module, _ = _module(dm, cfg, method, task)
    module.lr_scheduler = None  # a plateau schedule reads val/score, which these timing runs do not compute
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps + 2, accelerator="cpu", devices=1, logger=False, callbacks=[timer],
                        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    return statistics.median(timer.times[2:])


def epoch_overhead_seconds(dm: Any, cfg: Any, ls_step: float) -> float:
    """What one epoch costs besides its training steps: a real one-epoch LS run of the runner
    (validation, checkpoint, test, the trainer's setup) minus its steps at the timed LS step."""
    import dataclasses
    import tempfile

    from benchmarks.runner.train import train_one

    one = dataclasses.replace(cfg, epochs=1, patience=None, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        wall = train_one(dm, one, seed=0, method="ls", ckpt_dir=Path(tmp) / "ckpt")["wall_time_s"]
    return max(wall - len(dm.train_dataloader()) * ls_step, 0.0)


def calibration(folders: Sequence[Path]) -> dict[str, Any]:
    """Mean share of the epoch cap trained, and per COST variant the median wall ratio to the base."""
    runs = [r for f in folders for r in (load_json(p) for p in sorted(Path(f).glob("runs/*.json"))) if r]
    shares = [r["epochs_run"] / r["config"]["epochs"] for r in runs]
    spent = {}
    for r in runs:
        spent[r["dataset"]] = spent.get(r["dataset"], 0.0) + r["wall_time_s"] / 3600
    base = {(r["dataset"], r["method"], r["seed"]): r["wall_time_s"] for r in runs if r["cost"] == "none"}
    ratios: dict[str, list[float]] = {}
    for r in runs:
        b = base.get((r["dataset"], r["method"], r["seed"]))
        if r["cost"] != "none" and b:
            ratios.setdefault(r["cost"], []).append(r["wall_time_s"] / b)
    return {"epoch_share": statistics.mean(shares) if shares else 1.0, "runs": len(runs),
            "cost_ratio": {c: statistics.median(v) for c, v in ratios.items()},
            "multi_task_cpu_hours_spent": spent}


def estimate(config: Path, steps: int, calib: dict[str, Any], log: Any) -> dict[str, Any]:
    from benchmarks.registry import make_datamodule
    from benchmarks.runner.config import RunnerConfig, config_from_argv

    cfg = RunnerConfig(**config_from_argv(["--config", str(config)])[0])
    dm = make_datamodule(cfg.dataset, **cfg.data_kw)
    dm.setup("fit")
    per_epoch = len(dm.train_dataloader())
    methods = {m: step_seconds(dm, cfg, m, None, steps) for m in dict.fromkeys(cfg.methods)}
    tasks = [s.name for s in dm.task_specs]
    stl = step_seconds(dm, cfg, "ls", tasks[0], steps)
    val = epoch_overhead_seconds(dm, cfg, methods.get("ls", stl))
    run_s = {m: cfg.epochs * (per_epoch * s + val) for m, s in methods.items()}
    stl_s = cfg.epochs * (per_epoch * stl + val)
    jobs = cfg.runs()
    n_stl = len(tasks) * len(cfg.baseline_seed_list()) if cfg.baselines else 0
    cap = sum(run_s[m] for m, _, _ in jobs) + n_stl * stl_s
    share = calib["epoch_share"]
    stopped = share * (sum(run_s[m] * (calib["cost_ratio"].get(c, 1.0) if c != "none" else 1.0) for m, c, _ in jobs)
                       + n_stl * stl_s)
    log(f"  {config.stem}: {len(jobs)} runs + {n_stl} single-task, {per_epoch} steps/epoch, "
        f"cap {cap / 3600:.1f} h, stopped {stopped / 3600:.1f} h")
    return {"config": str(config), "dataset": cfg.dataset, "K": len(tasks), "steps_per_epoch": per_epoch,
            "epochs": cfg.epochs, "step_ms": {m: s * 1e3 for m, s in methods.items()}, "stl_step_ms": stl * 1e3,
            "validation_s": val, "runs": len(jobs), "single_task_runs": n_stl,
            "cpu_hours_cap": cap / 3600, "cpu_hours_stopped": stopped / 3600}


def report(res: dict[str, Any]) -> str:
    rows = []
    for r in res["configs"]:
        ls = r["step_ms"].get("ls")
        slowest = max(r["step_ms"], key=r["step_ms"].get)
        rows.append([Path(r["config"]).stem, r["K"], r["steps_per_epoch"], r["epochs"], f"{ls:.1f}" if ls else "-",
                     f"{slowest} {r['step_ms'][slowest] / ls:.1f}x" if ls else slowest,
                     f"{r['validation_s']:.1f}", r["runs"] + r["single_task_runs"],
                     f"{r['cpu_hours_cap']:.2f}", f"{r['cpu_hours_stopped']:.2f}"])
    total = [sum(r[k] for r in res["configs"]) for k in ("cpu_hours_cap", "cpu_hours_stopped")]
    rows.append(["all", "", "", "", "", "", "", sum(r["runs"] + r["single_task_runs"] for r in res["configs"]),
                 f"{total[0]:.1f}", f"{total[1]:.1f}"])
    c = res["calibration"]
    head = ["config", "K", "steps/epoch", "epoch cap", "LS step ms", "slowest method", "rest of epoch s", "runs",
            "CPU-h (cap)", "CPU-h (stopped)"]
    return (text_table("Estimated CPU-hours of each grid, from timed steps (1 thread)", head, rows) +
            f"\n'stopped': {c['epoch_share']:.2f} of the cap trained on average and COST/base wall ratios "
            f"{ {k: round(v, 2) for k, v in c['cost_ratio'].items()} } over {c['runs']} finished runs; their multi-task "
            f"runs' recorded wall time: { {k: round(v, 2) for k, v in c['multi_task_cpu_hours_spent'].items()} } CPU-h")


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--configs", type=Path, nargs="+", default=sorted(Path("benchmarks/configs/verdict").glob("*.yaml")))
    p.add_argument("--steps", type=int, default=12, help="timed steps per method (after 2 warm-up steps)")
    p.add_argument("--finished", type=Path, nargs="*", default=[Path("docs/results/verdict/yeast"),
                                                                Path("docs/results/verdict/birds")])
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    calib = calibration(args.finished)
    with quiet(everything=True):
        res = {"threads": 1, "steps": args.steps, "calibration": calib,
               "configs": [estimate(c, args.steps, calib, print) for c in args.configs]}
    print_and_write(args.out, "grid_cost", res, report(res))


if __name__ == "__main__":
    main()
